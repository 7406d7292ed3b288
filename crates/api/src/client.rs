//! A blocking client for the API: one method per route, over hyper (HTTP/1.1 on the Unix
//! socket, one connection per call, a response body of at most [`MAX_RESPONSE_BYTES`]).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{
    ApiError, BalloonInfo, BalloonSetRequest, Endpoint, MigrateReceiveRequest,
    MigrateReceiveResponse, MigrateSendRequest, MigrationStatus, Pong, RestoreRequest,
    SnapshotRequest, VmCounters, VmInfo,
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

    /// The vCPUs', disks' and network devices' counters.
    pub fn counters(&self) -> Result<VmCounters, ClientError> {
        self.get(Endpoint::Counters)
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        let call = self.send(method, path, body.unwrap_or_default().to_vec());
        rt.block_on(async {
            match self.timeout {
                Some(t) => tokio::time::timeout(t, call).await.unwrap_or_else(|_| {
                    Err(ClientError::Io {
                        path: self.path.clone(),
                        source: io::Error::new(io::ErrorKind::TimedOut, "no answer in time"),
                    })
                }),
                None => call.await,
            }
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<RawResponse, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| protocol(&e.to_string()))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("accept", "application/json");
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| protocol(&e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| {
            ClientError::Protocol(format!(
                "the server closed the connection without answering: {e}"
            ))
        })?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| protocol(&format!("reading the response: {e}")))?
            .to_bytes()
            .to_vec();
        Ok(RawResponse {
            status,
            content_type,
            body,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A server at a fresh socket that answers one connection with `answer`, as it is.
    fn one_answer(answer: &'static [u8]) -> (tempfile::TempDir, Client) {
        use std::io::{Read, Write};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let _ = c.write_all(answer);
            }
        });
        let c = Client::new(&path).with_timeout(Some(Duration::from_secs(10)));
        (d, c)
    }

    #[test]
    fn reads_content_length_and_chunked_answers() {
        let (_d, c) = one_answer(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        );
        let r = c.raw("GET", "/x", None).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let (_d, c) = one_answer(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        let r = c.raw("GET", "/x", None).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        for bad in [
            &b""[..],
            b"garbage\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let (_d, c) = one_answer(bad);
            assert!(
                matches!(c.raw("GET", "/x", None), Err(ClientError::Protocol(_))),
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
