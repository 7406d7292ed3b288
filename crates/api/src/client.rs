//! A blocking client for the API: one method per route.
//!
//! It speaks just enough HTTP/1.1 over `std::os::unix::net::UnixStream`: one request per
//! connection (`Connection: close`), a response read to its `Content-Length`, its chunked end
//! or the end of the stream, at most [`MAX_RESPONSE_BYTES`].

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{
    ApiError, BalloonInfo, BalloonSetRequest, Endpoint, MigrateReceiveRequest,
    MigrateReceiveResponse, MigrateSendRequest, MigrationStatus, Pong, RestoreRequest,
    SnapshotRequest, VmInfo,
};

/// The largest response the client reads.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing (or nothing we may talk to) at the socket: is the VM running with
    /// `--api-socket`?
    #[error("cannot connect to the API socket {}: {source}", .path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("API socket {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The server's answer was not what this client understands.
    #[error("bad response from the API server: {0}")]
    Protocol(String),
    /// The server refused or failed the request; `status` and `message` are its.
    #[error("{} (HTTP {})", .0.message, .0.status)]
    Api(ApiError),
}

impl ClientError {
    /// The server's error, if it answered with one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// A raw response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// The API client of one VM.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the API socket at `path`. No connection is made until a call.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Client {
            path: path.as_ref().to_path_buf(),
            timeout: None,
        }
    }

    /// Gives up on a call that has not been answered within `timeout` (none by default: a
    /// snapshot takes as long as it takes).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    pub fn ping(&self) -> Result<Pong, ClientError> {
        self.get(Endpoint::Ping)
    }

    /// The OpenAPI document.
    pub fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.get(Endpoint::OpenApi)
    }

    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.get(Endpoint::Info)
    }

    pub fn pause(&self) -> Result<(), ClientError> {
        self.put(Endpoint::Pause, None::<&()>)
    }

    pub fn resume(&self) -> Result<(), ClientError> {
        self.put(Endpoint::Resume, None::<&()>)
    }

    /// Presses the ACPI power button.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.put(Endpoint::Shutdown, None::<&()>)
    }

    pub fn reset(&self) -> Result<(), ClientError> {
        self.put(Endpoint::Reset, None::<&()>)
    }

    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<(), ClientError> {
        self.put(Endpoint::Snapshot, Some(req))
    }

    /// Boots the VM `doc` describes in an empty `vessel serve`.
    pub fn boot(&self, doc: &crate::types::VmDocument) -> Result<(), ClientError> {
        self.put(Endpoint::Boot, Some(doc))
    }

    pub fn restore(&self, req: &RestoreRequest) -> Result<(), ClientError> {
        self.put(Endpoint::Restore, Some(req))
    }

    pub fn migrate_send(&self, req: &MigrateSendRequest) -> Result<(), ClientError> {
        self.put(Endpoint::MigrateSend, Some(req))
    }

    /// Returns the migration's token.
    pub fn migrate_receive(
        &self,
        req: &MigrateReceiveRequest,
    ) -> Result<MigrateReceiveResponse, ClientError> {
        self.put_for(Endpoint::MigrateReceive, req)
    }

    pub fn migration_status(&self) -> Result<MigrationStatus, ClientError> {
        self.get(Endpoint::MigrationStatus)
    }

    pub fn migrate_cancel(&self) -> Result<(), ClientError> {
        self.put(Endpoint::MigrateCancel, None::<&()>)
    }

    /// The balloon's target, actual size and statistics.
    pub fn balloon(&self) -> Result<BalloonInfo, ClientError> {
        self.get(Endpoint::Balloon)
    }

    /// Sets the balloon's target.
    pub fn set_balloon(&self, req: &BalloonSetRequest) -> Result<(), ClientError> {
        self.put(Endpoint::BalloonSet, Some(req))
    }

    fn get<T: DeserializeOwned>(&self, ep: Endpoint) -> Result<T, ClientError> {
        let resp = self.raw(ep.method().as_str(), &ep.path(), None)?;
        let resp = check(resp)?;
        serde_json::from_slice(&resp.body).map_err(|e| {
            ClientError::Protocol(format!("{}: invalid JSON response: {e}", ep.name()))
        })
    }

    fn put<B: Serialize>(&self, ep: Endpoint, body: Option<&B>) -> Result<(), ClientError> {
        let body = match body {
            Some(b) => Some(
                serde_json::to_vec(b)
                    .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?,
            ),
            None => None,
        };
        check(self.raw(ep.method().as_str(), &ep.path(), body.as_deref())?).map(|_| ())
    }

    /// A PUT whose answer has a JSON body.
    fn put_for<B: Serialize, T: DeserializeOwned>(
        &self,
        ep: Endpoint,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?;
        let resp = check(self.raw(ep.method().as_str(), &ep.path(), Some(&body))?)?;
        serde_json::from_slice(&resp.body).map_err(|e| {
            ClientError::Protocol(format!("{}: invalid JSON response: {e}", ep.name()))
        })
    }

    /// Sends one request as it is and returns the response as it is, whatever its status.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<RawResponse, ClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let io_err = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        stream.set_read_timeout(self.timeout).map_err(io_err)?;
        stream.set_write_timeout(self.timeout).map_err(io_err)?;
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Accept: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let mut msg = req.into_bytes();
        msg.extend_from_slice(body);
        // The server may answer (413) and close before reading everything: still read its
        // answer.
        let write_result = stream.write_all(&msg);
        let mut buf = Vec::new();
        let read_result = stream
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut buf);
        if buf.is_empty() {
            if let Err(e) = write_result.and(read_result) {
                return Err(io_err(e));
            }
            return Err(ClientError::Protocol(
                "the server closed the connection without answering".into(),
            ));
        }
        if buf.len() > MAX_RESPONSE_BYTES {
            return Err(ClientError::Protocol("response too large".into()));
        }
        parse_response(&buf)
    }
}

/// An error status becomes [`ClientError::Api`] with the server's message.
fn check(resp: RawResponse) -> Result<RawResponse, ClientError> {
    if (200..300).contains(&resp.status) {
        return Ok(resp);
    }
    let message = serde_json::from_slice::<ApiError>(&resp.body)
        .map(|e| e.message)
        .unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(&resp.body).trim().to_string();
            if text.is_empty() {
                format!("HTTP status {}", resp.status)
            } else {
                text
            }
        });
    Err(ClientError::Api(ApiError::new(resp.status, message)))
}

fn protocol(what: &str) -> ClientError {
    ClientError::Protocol(what.to_string())
}

fn parse_response(buf: &[u8]) -> Result<RawResponse, ClientError> {
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| protocol("incomplete response header"))?;
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| protocol("response header is not UTF-8"))?;
    let rest = &buf[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(protocol("not an HTTP/1 response"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| protocol("bad status line"))?;
    let mut content_length = None;
    let mut chunked = false;
    let mut content_type = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(protocol("bad header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| protocol("bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_string());
        }
    }
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = content_length {
        rest.get(..n)
            .ok_or_else(|| protocol("response body shorter than its Content-Length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(RawResponse {
        status,
        content_type,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| protocol("truncated chunk header"))?;
        let size_text =
            std::str::from_utf8(&data[..line_end]).map_err(|_| protocol("bad chunk header"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| protocol("bad chunk size"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| protocol("truncated chunk"))?;
        out.extend_from_slice(chunk);
        data = data
            .get(size..)
            .and_then(|d| d.strip_prefix(b"\r\n"))
            .ok_or_else(|| protocol("chunk not followed by CRLF"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}xx",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.0 204 No Content\r\n\r\n").unwrap();
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b""[..],
            b"garbage",
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(
                matches!(parse_response(bad), Err(ClientError::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn error_status_carries_the_message() {
        let e = check(RawResponse {
            status: 409,
            content_type: None,
            body: br#"{"message":"already paused"}"#.to_vec(),
        })
        .unwrap_err();
        let api = e.api_error().unwrap();
        assert_eq!((api.status, api.message.as_str()), (409, "already paused"));
        let e = check(RawResponse {
            status: 502,
            content_type: None,
            body: Vec::new(),
        })
        .unwrap_err();
        assert_eq!(e.api_error().unwrap().message, "HTTP status 502");
    }

    #[test]
    fn connect_error_names_the_socket() {
        let e = Client::new("/nonexistent/vessel.sock").ping().unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }));
        assert!(e.to_string().contains("/nonexistent/vessel.sock"), "{e}");
    }
}
