//! The daemon's REST API on its Unix socket (JSON; errors are `{"message": ...}` with their
//! status, as in the per-VM API). Routes:
//!
//! ```text
//! GET    /api/v1/ping
//! GET    /api/v1/templates              POST /api/v1/templates      (TemplateCreate)
//! GET    /api/v1/templates/{name}       DELETE /api/v1/templates/{name}
//! GET    /api/v1/vms                    POST /api/v1/vms            (VmCreate)
//! GET    /api/v1/vms/{name}             DELETE /api/v1/vms/{name}
//! PATCH  /api/v1/vms/{name}             (VmEdit)   POST /api/v1/vms/{name}/clone (VmClone)
//! PUT    /api/v1/vms/{name}/migrate     (MigrateRequest): to another daemon's VMM
//! GET    /api/v1/vms/{name}/log?lines=N the end of its process's output
//! POST   /api/v1/migrations/incoming    (IncomingMigration): ready this host for a VM
//! PUT    /api/v1/vms/{name}/start|stop|kill|restart|pause|resume    (stop: StopRequest)
//! PUT    /api/v1/vms/{name}/suspend     PUT /api/v1/suspend-all     (saved to disk)
//! GET    /api/v1/metrics                Prometheus metrics
//! GET    /api/v1/vms/{name}/snapshots   POST (SnapshotCreate): VM and disks together
//! PUT    /api/v1/vms/{name}/snapshots/{snapshot}/restore    DELETE .../{snapshot}
//! GET    /api/v1/events?since=ID        the events after ID (JSON list)
//! GET    /api/v1/events/stream?since=ID the same, then each new one (server-sent events)
//! GET    /api/v1/tokens                 POST /api/v1/tokens         (TokenCreate)
//! DELETE /api/v1/tokens/{name}
//! GET    /api/v1/openapi.json           this API's OpenAPI document
//! ```
//!
//! and the storage pools' and volumes' ([`storage`]), the networks' ([`networks`]).
//!
//! On TCP ([`tcp_router`]) every request needs a token; see [`crate::auth`].

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
use axum::{Json, Router};
use serde::Deserialize;
use tokio_stream::StreamExt;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::store::Template;
use crate::vms::{Error, Manager, StopRequest, TemplateCreate, VmCreate, VmView};

/// The longest request body accepted.
const MAX_BODY: usize = 1 << 20;

mod networks;
mod storage;

pub(crate) struct Failure(ApiError);

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

pub(crate) type Reply<T> = Result<Json<T>, Failure>;

/// Runs a manager call on the blocking pool (they wait on processes and files).
pub(crate) async fn blocking<T: Send + 'static>(
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
pub(crate) fn body<T: for<'de> Deserialize<'de>>(b: &Bytes) -> Result<T, Failure> {
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

/// The errors every route may answer: `{"message": ...}` with the status.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(crate) enum Errors {
    /// A malformed request, or values out of range (the message names the field).
    #[response(status = 400)]
    BadRequest(ApiError),
    /// No such VM or template (or route).
    #[response(status = 404)]
    NotFound(ApiError),
    /// Not possible now: the name exists, the VM runs, the template is in use.
    #[response(status = 409)]
    Conflict(ApiError),
    /// The daemon failed: the message says why (a VM that could not start: its log's end).
    #[response(status = 500)]
    Failed(ApiError),
}

/// The API document: schemas from the types, paths from the routes themselves.
#[derive(utoipa::OpenApi)]
#[openapi(
    components(schemas(ApiError)),
    info(
        title = "Vessel daemon API",
        version = "1",
        description = "The host's VM manager, on the Unix socket of `vessel daemon` \
                   (default /run/vessel/vessel.sock). Bodies and answers are JSON; errors are \
                   {\"message\": \"...\"} with a 4xx/5xx status.",
        license(name = "Apache-2.0"),
    )
)]
struct Doc;

/// The router and its OpenAPI document, made together: a route cannot be missing from one.
pub fn router_and_doc(m: Arc<Manager>) -> (Router, utoipa::openapi::OpenApi) {
    let router = OpenApiRouter::with_openapi(Doc::openapi())
        .routes(routes!(ping))
        .routes(routes!(templates, create_template))
        .routes(routes!(template, delete_template))
        .routes(routes!(vms, create_vm))
        .routes(routes!(vm, delete_vm, edit))
        .routes(routes!(start))
        .routes(routes!(stop))
        .routes(routes!(kill))
        .routes(routes!(pause))
        .routes(routes!(suspend))
        .routes(routes!(suspend_all))
        .routes(routes!(resume))
        .routes(routes!(metrics))
        .routes(routes!(snapshots, create_snapshot))
        .routes(routes!(delete_snapshot))
        .routes(routes!(restore_snapshot))
        .routes(routes!(restart))
        .routes(routes!(clone))
        .routes(routes!(log))
        .routes(routes!(migrate))
        .routes(routes!(incoming))
        .routes(routes!(events))
        .routes(routes!(stream))
        .routes(routes!(tokens, create_token))
        .routes(routes!(delete_token));
    let (router, doc) = networks::routes(storage::routes(router)).split_for_parts();
    let router = router
        .fallback(|| async { Failure(ApiError::not_found("no such route")) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(m);
    (router, doc)
}

/// The router for the TCP listener: every request needs a token ([`crate::auth`]).
pub fn tcp_router(m: Arc<Manager>) -> Router {
    router(m.clone()).layer(axum::middleware::from_fn_with_state(
        m,
        crate::auth::require_token,
    ))
}

/// The router.
pub fn router(m: Arc<Manager>) -> Router {
    let (router, doc) = router_and_doc(m);
    let json = doc.to_pretty_json().unwrap_or_default();
    router.route(
        "/api/v1/openapi.json",
        axum::routing::get(move || async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                json,
            )
        }),
    )
}

/// Checks that the daemon answers.
#[utoipa::path(get, path = "/api/v1/ping", responses((status = 200, body = api::types::Pong)))]
async fn ping() -> Json<api::types::Pong> {
    Json(api::types::Pong::current())
}

/// The templates.
#[utoipa::path(get, path = "/api/v1/templates",
    responses((status = 200, body = Vec<Template>), Errors))]
async fn templates(State(m): State<Arc<Manager>>) -> Reply<Vec<Template>> {
    blocking(move || Ok(m.store().templates()?)).await
}

/// One template.
#[utoipa::path(get, path = "/api/v1/templates/{name}",
    params(("name" = String, Path)), responses((status = 200, body = Template), Errors))]
async fn template(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<Template> {
    blocking(move || Ok(m.store().template(&name)?)).await
}

/// Makes a template: a spec and base disks (checked: they must open).
#[utoipa::path(post, path = "/api/v1/templates", request_body = TemplateCreate,
    responses((status = 200, body = Template), Errors))]
async fn create_template(State(m): State<Arc<Manager>>, b: Bytes) -> Reply<Template> {
    let req = body(&b)?;
    blocking(move || m.create_template(req)).await
}

/// Deletes a template no VM is made from.
#[utoipa::path(delete, path = "/api/v1/templates/{name}",
    params(("name" = String, Path)), responses((status = 204), Errors))]
async fn delete_template(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, Failure> {
    let _ = blocking(move || m.delete_template(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The VMs, with their state.
#[utoipa::path(get, path = "/api/v1/vms", responses((status = 200, body = Vec<VmView>), Errors))]
async fn vms(State(m): State<Arc<Manager>>) -> Reply<Vec<VmView>> {
    blocking(move || m.list()).await
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{name}",
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn vm(State(m): State<Arc<Manager>>, UrlPath(name): UrlPath<String>) -> Reply<VmView> {
    blocking(move || m.view(&name)).await
}

/// Makes a VM from a template, or from a whole spec and its images (and starts it with
/// `start`).
#[utoipa::path(post, path = "/api/v1/vms", request_body = VmCreate,
    responses((status = 200, body = VmView), Errors))]
async fn create_vm(State(m): State<Arc<Manager>>, b: Bytes) -> Reply<VmView> {
    let req = body(&b)?;
    blocking(move || m.create_vm(req)).await
}

#[derive(Deserialize)]
struct Keep {
    #[serde(default)]
    keep_disks: bool,
}

/// Deletes a stopped VM with its disks, files and record (`keep_disks`: its disks stay).
#[utoipa::path(delete, path = "/api/v1/vms/{name}",
    params(("name" = String, Path), ("keep_disks" = Option<bool>, Query)),
    responses((status = 204), Errors))]
async fn delete_vm(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<Keep>,
) -> Result<StatusCode, Failure> {
    let _ = blocking(move || m.delete(&name, q.keep_disks)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a VM; returns once its own API answers.
#[utoipa::path(put, path = "/api/v1/vms/{name}/start",
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn start(State(m): State<Arc<Manager>>, UrlPath(name): UrlPath<String>) -> Reply<VmView> {
    blocking(move || m.start(&name)).await
}

fn timeout(req: &StopRequest) -> Duration {
    Duration::from_secs(req.timeout_s.unwrap_or(30))
}

/// Stops a VM: the ACPI power button, then after the timeout SIGTERM, then SIGKILL.
#[utoipa::path(put, path = "/api/v1/vms/{name}/stop", request_body = Option<StopRequest>,
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn stop(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
    b: Bytes,
) -> Reply<VmView> {
    let req: StopRequest = body(&b)?;
    blocking(move || m.stop(&name, timeout(&req))).await
}

/// Ends a VM's process at once.
#[utoipa::path(put, path = "/api/v1/vms/{name}/kill",
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn kill(State(m): State<Arc<Manager>>, UrlPath(name): UrlPath<String>) -> Reply<VmView> {
    blocking(move || m.kill(&name)).await
}

/// Parks a running VM's vCPUs.
#[utoipa::path(put, path = "/api/v1/vms/{name}/pause",
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn pause(State(m): State<Arc<Manager>>, UrlPath(name): UrlPath<String>) -> Reply<VmView> {
    blocking(move || m.pause(&name, true)).await
}

/// Saves a running VM to disk (memory, devices, disks) and ends its process; its next start
/// restores it.
#[utoipa::path(put, path = "/api/v1/vms/{name}/suspend",
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn suspend(State(m): State<Arc<Manager>>, UrlPath(name): UrlPath<String>) -> Reply<VmView> {
    blocking(move || m.suspend(&name)).await
}

/// Suspends every running VM (a host going down: `vessel-guests.service`); the names done.
/// The daemon restores them when it next starts.
#[utoipa::path(put, path = "/api/v1/suspend-all",
    responses((status = 200, body = Vec<String>), Errors))]
async fn suspend_all(State(m): State<Arc<Manager>>) -> Reply<Vec<String>> {
    blocking(move || m.suspend_all()).await
}

/// Lets a paused VM's vCPUs run again.
#[utoipa::path(put, path = "/api/v1/vms/{name}/resume",
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn resume(State(m): State<Arc<Manager>>, UrlPath(name): UrlPath<String>) -> Reply<VmView> {
    blocking(move || m.pause(&name, false)).await
}

/// Prometheus metrics: VMs by state; each VM's size, state, restarts, uptime, CPU time and
/// memory; the daemon's own.
#[utoipa::path(get, path = "/api/v1/metrics",
    responses((status = 200, content_type = "text/plain; version=0.0.4", body = String), Errors))]
async fn metrics(State(m): State<Arc<Manager>>) -> Result<Response, Failure> {
    let text = blocking(move || m.metrics()).await?.0;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

/// A VM's snapshots.
#[utoipa::path(get, path = "/api/v1/vms/{name}/snapshots", params(("name" = String, Path)),
    responses((status = 200, body = Vec<crate::store::Snapshot>), Errors))]
async fn snapshots(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
) -> Reply<Vec<crate::store::Snapshot>> {
    blocking(move || Ok(m.store().vm(&name)?.snapshots)).await
}

/// `POST /api/v1/vms/{name}/snapshots`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SnapshotCreate {
    name: String,
}

/// Snapshots a running VM with its disks (it pauses for the memory, then goes on).
#[utoipa::path(post, path = "/api/v1/vms/{name}/snapshots", request_body = SnapshotCreate,
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn create_snapshot(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
    b: Bytes,
) -> Reply<VmView> {
    let req: SnapshotCreate = body(&b)?;
    blocking(move || m.snapshot_create(&name, &req.name)).await
}

/// Starts the stopped VM from a snapshot: memory, devices and disks as they were.
#[utoipa::path(put, path = "/api/v1/vms/{name}/snapshots/{snapshot}/restore",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    responses((status = 200, body = VmView), Errors))]
async fn restore_snapshot(
    State(m): State<Arc<Manager>>,
    UrlPath((name, snapshot)): UrlPath<(String, String)>,
) -> Reply<VmView> {
    blocking(move || m.snapshot_restore(&name, &snapshot)).await
}

/// Deletes a snapshot's memory and state (its disk layers stay in the VM's disks).
#[utoipa::path(delete, path = "/api/v1/vms/{name}/snapshots/{snapshot}",
    params(("name" = String, Path), ("snapshot" = String, Path)),
    responses((status = 200, body = VmView), Errors))]
async fn delete_snapshot(
    State(m): State<Arc<Manager>>,
    UrlPath((name, snapshot)): UrlPath<(String, String)>,
) -> Reply<VmView> {
    blocking(move || m.snapshot_delete(&name, &snapshot)).await
}

/// Stops a VM (as stop), then starts it.
#[utoipa::path(put, path = "/api/v1/vms/{name}/restart", request_body = Option<StopRequest>,
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn restart(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
    b: Bytes,
) -> Reply<VmView> {
    let req: StopRequest = body(&b)?;
    blocking(move || {
        m.stop(&name, timeout(&req))?;
        m.start(&name)
    })
    .await
}

/// Changes a VM's spec or settings (the machine's changes apply at its next start).
#[utoipa::path(patch, path = "/api/v1/vms/{name}", request_body = crate::edit::VmEdit,
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn edit(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
    b: Bytes,
) -> Reply<VmView> {
    let req = body(&b)?;
    blocking(move || m.edit(&name, req)).await
}

#[derive(Deserialize)]
struct Lines {
    lines: Option<usize>,
}

/// The end of a VM's log: its process's output (the VMM's messages; its serial console is
/// on the console socket), 100 lines unless `lines` says.
#[utoipa::path(get, path = "/api/v1/vms/{name}/log",
    params(("name" = String, Path), ("lines" = Option<usize>, Query)),
    responses((status = 200, content_type = "text/plain", body = String), Errors))]
async fn log(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<Lines>,
) -> Result<Response, Failure> {
    let lines = q.lines.unwrap_or(100);
    let text = blocking(move || m.log(&name, lines)).await?.0;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Makes a new VM, a copy of a stopped one with its own disks.
#[utoipa::path(post, path = "/api/v1/vms/{name}/clone", request_body = crate::edit::VmClone,
    params(("name" = String, Path)), responses((status = 200, body = VmView), Errors))]
async fn clone(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
    b: Bytes,
) -> Reply<VmView> {
    let req = body(&b)?;
    blocking(move || m.clone_vm(&name, req)).await
}

/// Sends a running VM to another host's daemon, which [`incoming`] readied; returns once the
/// migration has ended (the VM is then gone from here), or failed (it runs on here).
#[utoipa::path(put, path = "/api/v1/vms/{name}/migrate",
    request_body = crate::migrate::MigrateRequest, params(("name" = String, Path)),
    responses((status = 200, body = crate::migrate::Migrated), Errors))]
async fn migrate(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
    b: Bytes,
) -> Reply<crate::migrate::Migrated> {
    let req = body(&b)?;
    blocking(move || m.migrate(&name, req)).await
}

/// Readies this host for a VM another daemon is about to send: checks its disks are
/// reachable here, starts an empty VMM listening for it; the VM is `incoming` until the
/// migration completes.
#[utoipa::path(post, path = "/api/v1/migrations/incoming",
    request_body = crate::migrate::IncomingMigration,
    responses((status = 200, body = crate::migrate::IncomingReady), Errors))]
async fn incoming(State(m): State<Arc<Manager>>, b: Bytes) -> Reply<crate::migrate::IncomingReady> {
    let req = body(&b)?;
    blocking(move || m.incoming(req)).await
}

/// The tokens of the TCP listener (names and roles; never their secrets). Admins only.
#[utoipa::path(get, path = "/api/v1/tokens",
    responses((status = 200, body = Vec<crate::store::Token>), Errors))]
async fn tokens(State(m): State<Arc<Manager>>) -> Reply<Vec<crate::store::Token>> {
    blocking(move || Ok(m.store().tokens()?)).await
}

/// Makes a token for the TCP listener; its secret is in this answer only. Admins only.
#[utoipa::path(post, path = "/api/v1/tokens", request_body = crate::auth::TokenCreate,
    responses((status = 200, body = crate::auth::TokenCreated), Errors))]
async fn create_token(State(m): State<Arc<Manager>>, b: Bytes) -> Reply<crate::auth::TokenCreated> {
    let req = body(&b)?;
    blocking(move || crate::auth::create(m.store(), req)).await
}

/// Revokes a token. Admins only.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}",
    params(("name" = String, Path)), responses((status = 204), Errors))]
async fn delete_token(
    State(m): State<Arc<Manager>>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, Failure> {
    let _ = blocking(move || Ok(m.store().delete_token(&name)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The events after `since`, oldest first.
#[utoipa::path(get, path = "/api/v1/events", params(("since" = Option<i64>, Query)),
    responses((status = 200, body = Vec<crate::store::Event>), Errors))]
async fn events(
    State(m): State<Arc<Manager>>,
    Query(q): Query<Since>,
) -> Reply<Vec<crate::store::Event>> {
    blocking(move || Ok(m.store().events(q.since, 10_000)?)).await
}

/// The events after `since`, then each new one, as server-sent events (`id`, `event` the
/// kind, `data` the event's JSON).
#[utoipa::path(get, path = "/api/v1/events/stream", params(("since" = Option<i64>, Query)),
    responses((status = 200, content_type = "text/event-stream", body = crate::store::Event),
        Errors))]
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
