//! The daemon's REST API on its Unix socket (JSON; errors are `{"message": ...}` with their
//! status, as in the per-VM API). Routes:
//!
//! ```text
//! GET    /api/v1/ping
//! GET    /api/v1/templates              POST /api/v1/templates      (TemplateCreate)
//! GET    /api/v1/templates/{name}       DELETE /api/v1/templates/{name}
//! GET    /api/v1/vms                    POST /api/v1/vms            (VmCreate)
//! GET    /api/v1/vms/{name}             DELETE /api/v1/vms/{name}
//! PUT    /api/v1/vms/{name}/start|stop|kill|restart                 (stop: StopRequest)
//! GET    /api/v1/events?since=ID        the events after ID (JSON list)
//! GET    /api/v1/events/stream?since=ID the same, then each new one (server-sent events)
//! ```

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use api::types::ApiError;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use tokio_stream::StreamExt;

use crate::vms::{Error, Manager, StopRequest};

/// The longest request body accepted.
const MAX_BODY: usize = 1 << 20;

struct Failure(ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure(ApiError::new(e.status(), e.to_string()))
    }
}

type Reply<T> = Result<Json<T>, Failure>;

/// Runs a manager call on the blocking pool (they wait on processes and files).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<Json<T>, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(Json(r?)),
        Err(_) => Err(Failure(ApiError::internal(
            "internal error: the daemon failed while handling this request",
        ))),
    }
}

/// A JSON body of type `T` (an empty body is `{}`).
fn body<T: for<'de> Deserialize<'de>>(b: &Bytes) -> Result<T, Failure> {
    let b: &[u8] = if b.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        b
    };
    serde_json::from_slice(b).map_err(|e| Failure(ApiError::bad_request(e.to_string())))
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: i64,
}

/// The router.
pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/api/v1/ping", get(ping))
        .route("/api/v1/templates", get(templates).post(create_template))
        .route(
            "/api/v1/templates/{name}",
            get(template).delete(delete_template),
        )
        .route("/api/v1/vms", get(vms).post(create_vm))
        .route("/api/v1/vms/{name}", get(vm).delete(delete_vm))
        .route("/api/v1/vms/{name}/{action}", put(act))
        .route("/api/v1/events", get(events))
        .route("/api/v1/events/stream", get(stream))
        .fallback(|| async { Failure(ApiError::not_found("no such route")) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(m)
}

async fn ping() -> Json<api::types::Pong> {
    Json(api::types::Pong::current())
}

async fn templates(State(m): State<Arc<Manager>>) -> Reply<Vec<crate::store::Template>> {
    blocking(move || Ok(m.store().templates()?)).await
}

async fn template(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<crate::store::Template> {
    blocking(move || Ok(m.store().template(&name)?)).await
}

async fn create_template(State(m): State<Arc<Manager>>, b: Bytes) -> Reply<crate::store::Template> {
    let req = body(&b)?;
    blocking(move || m.create_template(req)).await
}

async fn delete_template(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, Failure> {
    let _ = blocking(move || m.delete_template(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vms(State(m): State<Arc<Manager>>) -> Reply<Vec<crate::vms::VmView>> {
    blocking(move || m.list()).await
}

async fn vm(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<crate::vms::VmView> {
    blocking(move || m.view(&name)).await
}

async fn create_vm(State(m): State<Arc<Manager>>, b: Bytes) -> Reply<crate::vms::VmView> {
    let req = body(&b)?;
    blocking(move || m.create_vm(req)).await
}

async fn delete_vm(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, Failure> {
    let _ = blocking(move || m.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn act(
    State(m): State<Arc<Manager>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    b: Bytes,
) -> Reply<crate::vms::VmView> {
    match action.as_str() {
        "start" => blocking(move || m.start(&name)).await,
        "stop" => {
            let req: StopRequest = body(&b)?;
            let timeout = Duration::from_secs(req.timeout_s.unwrap_or(30));
            blocking(move || m.stop(&name, timeout)).await
        }
        "kill" => blocking(move || m.kill(&name)).await,
        "restart" => {
            let req: StopRequest = body(&b)?;
            let timeout = Duration::from_secs(req.timeout_s.unwrap_or(30));
            blocking(move || {
                m.stop(&name, timeout)?;
                m.start(&name)
            })
            .await
        }
        other => Err(Failure(ApiError::not_found(format!(
            "no action '{other}': start, stop, kill or restart"
        )))),
    }
}

async fn events(
    State(m): State<Arc<Manager>>,
    Query(q): Query<Since>,
) -> Reply<Vec<crate::store::Event>> {
    blocking(move || Ok(m.store().events(q.since, 10_000)?)).await
}

/// The events after `since`, then each new one, as server-sent events (`id`, `event` the
/// kind, `data` the event's JSON).
async fn stream(
    State(m): State<Arc<Manager>>,
    Query(q): Query<Since>,
) -> Result<Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>>, Failure> {
    // Subscribe first, then read the past: nothing falls between the two.
    let rx = m.subscribe();
    let m2 = m.clone();
    let past = blocking(move || Ok(m2.store().events(q.since, 10_000)?))
        .await?
        .0;
    let last = past.last().map_or(q.since, |e| e.id);
    let to_sse = |e: &crate::store::Event| {
        Ok(SseEvent::default()
            .id(e.id.to_string())
            .event(e.kind.clone())
            .data(serde_json::to_string(e).unwrap_or_default()))
    };
    let past = tokio_stream::iter(past.iter().map(to_sse).collect::<Vec<_>>());
    let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| match e {
        Ok(e) if e.id > last => Some(to_sse(&e)),
        _ => None,
    });
    Ok(Sse::new(past.chain(live)).keep_alive(KeepAlive::default()))
}

/// Serves `router` on the Unix socket `path` (replacing a stale socket; created 0600) until
/// `stop` resolves.
pub async fn serve(
    path: &Path,
    router: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{}: another daemon answers there", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
}
