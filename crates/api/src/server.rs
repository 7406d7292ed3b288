//! The API server: an axum router on a Unix socket, in a thread of its own.
//!
//! Every route comes from [`Endpoint::ALL`]. A request body is read whole (at most
//! [`MAX_BODY_BYTES`]) and parsed before the controller sees anything, so a malformed request
//! is answered with a 4xx and never reaches the VM. Every error response is JSON,
//! `{"message": "..."}`: the server's own (404, 405, 413, 400) and the controller's, with the
//! controller's status. Controller calls run on tokio's blocking pool; one that panics is a
//! 500, as is a panic anywhere in request handling.

use std::any::Any;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::watch;
use tower_http::catch_panic::CatchPanicLayer;

use crate::controller::VmController;
use crate::types::{ApiError, Endpoint, Method, Pong};

/// The largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long [`ServerHandle::stop`] lets requests in flight finish.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("API socket {}: exists and is not a socket; not replacing it", .path.display())]
    NotASocket { path: PathBuf },
    #[error("API socket {}: another process is serving on it", .path.display())]
    InUse { path: PathBuf },
    #[error("API socket {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// A running API server. [`ServerHandle::stop`] (or dropping it) stops it and removes its
/// socket.
pub struct ServerHandle {
    path: PathBuf,
    /// (device, inode) of the socket we bound, so we never remove someone else's file.
    socket_id: Option<(u64, u64)>,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, lets requests in flight finish (for a short while), joins the server
    /// thread and removes the socket.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some((dev, ino)) = self.socket_id.take() {
            if let Ok(m) = fs::symlink_metadata(&self.path) {
                if m.file_type().is_socket() && m.dev() == dev && m.ino() == ino {
                    let _ = fs::remove_file(&self.path);
                }
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Who may connect to the API socket: its owner only (whatever the umask), as the API can
/// stop, snapshot and migrate the VM.
const SOCKET_MODE: u32 = 0o600;

/// Binds a listening socket at `path` so that the file appears only once it listens (a client
/// that waits for the file never sees `ECONNREFUSED`) and with mode [`SOCKET_MODE`]: bound
/// under a temporary name beside it, then renamed. A path too long for the temporary name is
/// bound directly (and its mode set at once).
fn bind_then_publish(path: &Path) -> std::io::Result<StdUnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let private = |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(SOCKET_MODE));
    let direct = || {
        let l = StdUnixListener::bind(path)?;
        private(path)?;
        Ok(l)
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = name.map(|n| path.with_file_name(format!(".{n}.{}.tmp", std::process::id())));
    let Some(tmp) = tmp else {
        return direct();
    };
    let _ = fs::remove_file(&tmp);
    let listener = match StdUnixListener::bind(&tmp) {
        Ok(l) => l,
        // Longer than a socket address holds: no room for the temporary name.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return direct(),
        Err(e) => return Err(e),
    };
    if let Err(e) = private(&tmp).and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Starts the API server on `socket_path` and returns once it is listening.
///
/// A stale socket (nothing listening) at the path is replaced; a live one is
/// [`ServeError::InUse`]; any other kind of file is [`ServeError::NotASocket`] and left as it is.
pub fn serve(
    socket_path: impl AsRef<Path>,
    controller: Arc<dyn VmController>,
) -> Result<ServerHandle, ServeError> {
    let path = socket_path.as_ref().to_path_buf();
    let io_err = |source| ServeError::Io {
        path: path.clone(),
        source,
    };
    clear_stale_socket(&path)?;
    let listener = bind_then_publish(&path).map_err(io_err)?;
    listener.set_nonblocking(true).map_err(io_err)?;
    let m = fs::symlink_metadata(&path).map_err(io_err)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .thread_name("vessel-api-blocking")
        .build()
        .map_err(io_err)?;
    let (tx, rx) = watch::channel(false);
    let app = router(controller);
    let mut handle = ServerHandle {
        path: path.clone(),
        socket_id: Some((m.dev(), m.ino())),
        shutdown: Some(tx),
        thread: None,
    };
    let thread = jail::seccomp::spawn(
        jail::seccomp::ThreadClass::Api,
        "vessel-api".into(),
        move || run(rt, listener, app, rx),
    )
    .map_err(io_err)?;
    handle.thread = Some(thread);
    Ok(handle)
}

fn clear_stale_socket(path: &Path) -> Result<(), ServeError> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !m.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(ServeError::InUse {
            path: path.to_path_buf(),
        }),
        Err(_) => fs::remove_file(path).map_err(|source| ServeError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn run(
    rt: tokio::runtime::Runtime,
    listener: StdUnixListener,
    app: Router,
    rx: watch::Receiver<bool>,
) {
    rt.block_on(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("API server: {e}");
                return;
            }
        };
        let mut graceful = rx.clone();
        let mut hard = rx;
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = graceful.wait_for(|stop| *stop).await;
        });
        tokio::select! {
            r = std::future::IntoFuture::into_future(server) => {
                if let Err(e) = r {
                    tracing::error!("API server: {e}");
                }
            }
            _ = async move {
                let _ = hard.wait_for(|stop| *stop).await;
                tokio::time::sleep(STOP_GRACE).await;
            } => {}
        }
    });
    rt.shutdown_timeout(Duration::from_millis(500));
}

/// The router: every [`Endpoint`], JSON errors, the body limit and panic catching.
pub fn router(controller: Arc<dyn VmController>) -> Router {
    let mut r = Router::new();
    for ep in Endpoint::ALL {
        let c = controller.clone();
        let handler = move |body: Bytes| {
            let c = c.clone();
            async move { dispatch(ep, c, body).await.unwrap_or_else(error_response) }
        };
        let route = match ep.method() {
            Method::Get => get(handler),
            Method::Put => put(handler),
        };
        r = r.route(&ep.path(), route);
    }
    with_layers(r)
}

/// The fallbacks and layers around the routes.
pub(crate) fn with_layers(r: Router) -> Router {
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(json_errors))
        .layer(CatchPanicLayer::custom(panic_response))
}

async fn dispatch(
    ep: Endpoint,
    c: Arc<dyn VmController>,
    body: Bytes,
) -> Result<Response, ApiError> {
    Ok(match ep {
        Endpoint::Ping => Json(Pong::current()).into_response(),
        Endpoint::OpenApi => (
            [(header::CONTENT_TYPE, "application/json")],
            crate::openapi::json(),
        )
            .into_response(),
        Endpoint::Info => Json(call(c, |c| c.info()).await?).into_response(),
        Endpoint::MigrationStatus => Json(call(c, |c| c.migration_status()).await?).into_response(),
        Endpoint::Balloon => Json(call(c, |c| c.balloon()).await?).into_response(),
        Endpoint::Counters => Json(call(c, |c| c.counters()).await?).into_response(),
        Endpoint::Pause => action(&body, c, |c| c.pause()).await?,
        Endpoint::Resume => action(&body, c, |c| c.resume()).await?,
        Endpoint::Shutdown => action(&body, c, |c| c.shutdown()).await?,
        Endpoint::Reset => action(&body, c, |c| c.reset()).await?,
        Endpoint::MigrateCancel => action(&body, c, |c| c.migrate_cancel()).await?,
        Endpoint::Snapshot => {
            let req = parse(&body)?;
            no_content(call(c, move |c| c.snapshot(req)).await?)
        }
        Endpoint::Restore => {
            let req = parse(&body)?;
            no_content(call(c, move |c| c.restore(req)).await?)
        }
        Endpoint::Boot => {
            let doc: crate::types::VmDocument = parse(&body)?;
            doc.validate()
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            no_content(call(c, move |c| c.boot(doc)).await?)
        }
        Endpoint::MigrateSend => {
            let req = parse(&body)?;
            no_content(call(c, move |c| c.migrate_send(req)).await?)
        }
        Endpoint::MigrateReceive => {
            let req = parse(&body)?;
            Json(call(c, move |c| c.migrate_receive(req)).await?).into_response()
        }
        Endpoint::BalloonSet => {
            let req = parse(&body)?;
            no_content(call(c, move |c| c.set_balloon(req)).await?)
        }
    })
}

/// Runs a controller method on the blocking pool; a panic there is a 500.
async fn call<T, F>(c: Arc<dyn VmController>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn VmController) -> Result<T, ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(&*c)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(mut e)) => {
            if !(400..=599).contains(&e.status) {
                e.status = 500;
            }
            Err(e)
        }
        Err(e) if e.is_panic() => Err(ApiError::internal(
            "internal error: the VMM failed while handling this request",
        )),
        Err(_) => Err(ApiError::unavailable("the API server is stopping")),
    }
}

/// A request without arguments: the body must be empty or `{}`.
async fn action<F>(body: &[u8], c: Arc<dyn VmController>, f: F) -> Result<Response, ApiError>
where
    F: FnOnce(&dyn VmController) -> Result<(), ApiError> + Send + 'static,
{
    if !body.iter().all(u8::is_ascii_whitespace) {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NoArguments {}
        let _: NoArguments = parse(body)?;
    }
    call(c, f).await.map(no_content)
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("this request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn no_content((): ()) -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn error_response(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e)).into_response()
}

async fn not_found() -> Response {
    error_response(ApiError::not_found(
        "no such route: see GET /api/v1/openapi.json",
    ))
}

async fn method_not_allowed() -> Response {
    error_response(ApiError::new(
        405,
        "method not allowed: queries are GET, actions are PUT",
    ))
}

/// Turns every error response that is not JSON yet (axum's rejections: 413, 400, 415...) into
/// `{"message": "..."}`, keeping its status and `Allow` header.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase(),
        t => t.to_string(),
    };
    let mut out = error_response(ApiError::new(status.as_u16(), message));
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response<Body> {
    let mut r = error_response(ApiError::internal(
        "internal error: the API server failed while handling this request",
    ));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_file_appears_listening_and_alone() {
        let dir = std::env::temp_dir().join(format!("vessel-bind-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = bind_then_publish(&path).unwrap();
        // Connectable at once, and no temporary name left behind.
        StdUnixStream::connect(&path).unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        // Private whatever the umask (the test process's is the usual 022).
        assert_eq!(mode(&path), 0o600);
        drop(listener);
        // A name with no room for the temporary one beside it is bound directly.
        let long = dir.join("x".repeat(100 - dir.as_os_str().len().min(99)));
        if long.as_os_str().len() < 108 {
            let _ = fs::remove_file(&long);
            let _listener = bind_then_publish(&long).unwrap();
            StdUnixStream::connect(&long).unwrap();
            assert_eq!(mode(&long), 0o600);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
