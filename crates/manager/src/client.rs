//! A blocking client of the daemon's API (hyper over its Unix socket, or over TLS to its TCP
//! listener with a bearer token).

use std::path::{Path, PathBuf};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source} (is `vessel daemon` running? --socket or VESSEL_SOCKET name another)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Http(String),
    /// The daemon's answer: its status and message.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("the daemon's answer is not what was expected: {0}")]
    Decode(#[from] serde_json::Error),
}

/// How the client reaches the daemon.
#[derive(Clone)]
enum Transport {
    Unix(PathBuf),
    Tls {
        /// `HOST:PORT`.
        addr: String,
        connector: tokio_rustls::TlsConnector,
        token: Option<String>,
    },
}

/// The daemon's API.
#[derive(Clone)]
pub struct Client {
    transport: Transport,
}

/// A request body: whole, or streamed (an upload).
type Body = BoxBody<Bytes, std::io::Error>;

type Sender = hyper::client::conn::http1::SendRequest<Body>;

fn whole(data: Vec<u8>) -> Body {
    Full::new(Bytes::from(data))
        .map_err(|never| match never {})
        .boxed()
}

/// An HTTP/1 connection over `io`, driven in the background.
async fn handshake<IO>(io: IO) -> Result<Sender, ClientError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(conn);
    Ok(sender)
}

impl Client {
    /// The daemon on its Unix socket.
    pub fn new(socket: &Path) -> Client {
        Client {
            transport: Transport::Unix(socket.to_path_buf()),
        }
    }

    /// The daemon's TCP listener at `addr` (`HOST:PORT`), trusting the certificates in `ca`,
    /// with a bearer `token`.
    pub fn remote(addr: &str, ca: &Path, token: Option<String>) -> Result<Client, ClientError> {
        let connector = crate::auth::connector(ca).map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(Client {
            transport: Transport::Tls {
                addr: addr.to_string(),
                connector,
                token,
            },
        })
    }

    /// A connection to the daemon.
    async fn connect(&self) -> Result<Sender, ClientError> {
        match &self.transport {
            Transport::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|source| ClientError::Connect {
                        path: path.display().to_string(),
                        source,
                    })?;
                handshake(stream).await
            }
            Transport::Tls {
                addr, connector, ..
            } => {
                let connect = |source| ClientError::Connect {
                    path: addr.clone(),
                    source,
                };
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(connect)?;
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| ClientError::Http(format!("{host}: {e}")))?;
                let tls = connector.connect(name, tcp).await.map_err(connect)?;
                handshake(tls).await
            }
        }
    }

    /// A request to the daemon, with the token when there is one.
    fn request(&self, method: &str, path: &str, body: Body) -> Result<Request<Body>, ClientError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json");
        if let Transport::Tls { token: Some(t), .. } = &self.transport {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(body).map_err(|e| ClientError::Http(e.to_string()))
    }

    fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Http(e.to_string()))
    }

    /// `method path` with an optional JSON body; the answer's body (empty for 204).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, ClientError> {
        let data = match body {
            Some(v) => serde_json::to_vec(v)?,
            None => Vec::new(),
        };
        Self::runtime()?.block_on(self.send(method, path, whole(data)))
    }

    /// `PUT path` with the bytes of `file` as the body, streamed; the answer decoded.
    pub fn upload<T: DeserializeOwned>(&self, path: &str, file: &Path) -> Result<T, ClientError> {
        use hyper::body::Frame;
        use std::io::Read;
        let mut f = std::fs::File::open(file).map_err(|source| ClientError::Connect {
            path: file.display().to_string(),
            source,
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        // The file is read on its own thread, a chunk at a time, as the request takes them.
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let chunk = match f.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => Ok(Frame::data(Bytes::copy_from_slice(&buf[..n]))),
                    Err(e) => Err(e),
                };
                let last = chunk.is_err();
                if tx.blocking_send(chunk).is_err() || last {
                    return;
                }
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
        let mut req = self.request("PUT", path, body)?;
        req.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/octet-stream"),
        );
        let answer = Self::runtime()?.block_on(self.exchange(req));
        let _ = reader.join();
        Ok(serde_json::from_slice(&answer?)?)
    }

    async fn send(&self, method: &str, path: &str, body: Body) -> Result<Bytes, ClientError> {
        let req = self.request(method, path, body)?;
        self.exchange(req).await
    }

    /// Sends `req`; the answer's body, or its error.
    async fn exchange(&self, req: Request<Body>) -> Result<Bytes, ClientError> {
        let http = |e: &dyn std::fmt::Display| ClientError::Http(e.to_string());
        let mut sender = self.connect().await?;
        let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        if status >= 400 {
            let message = serde_json::from_slice::<api::types::ApiError>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api { status, message });
        }
        Ok(bytes)
    }

    /// `GET path`, decoded.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Ok(serde_json::from_slice(&self.call("GET", path, None)?)?)
    }

    /// `method path` with `body`, the answer decoded.
    pub fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_value(body)?;
        Ok(serde_json::from_slice(&self.call(
            method,
            path,
            Some(&body),
        )?)?)
    }

    /// Follows `path` (server-sent events), giving each event's data to `each` until it
    /// returns false or the stream ends.
    pub fn follow(
        &self,
        path: &str,
        mut each: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        Self::runtime()?.block_on(async {
            let http = |e: &dyn std::fmt::Display| ClientError::Http(e.to_string());
            let mut sender = self.connect().await?;
            let req = self.request("GET", path, whole(Vec::new()))?;
            let mut body = sender
                .send_request(req)
                .await
                .map_err(|e| http(&e))?
                .into_body();
            let mut pending = String::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| http(&e))?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.push_str(&String::from_utf8_lossy(data));
                while let Some(end) = pending.find("\n\n") {
                    let block: String = pending.drain(..end + 2).collect();
                    for line in block.lines() {
                        if let Some(d) = line.strip_prefix("data:") {
                            if !each(d.trim_start()) {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    }
}
