//! The network routes ([`crate::networks`]).
//!
//! ```text
//! GET    /api/v1/networks               POST /api/v1/networks          (NetworkCreate)
//! GET    /api/v1/networks/{network}     DELETE /api/v1/networks/{network}
//! PUT    /api/v1/networks/{network}/start|stop
//! ```

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{blocking, body, Errors, Failure, Reply};
use crate::networks::{NetworkCreate, NetworkView};
use crate::vms::Manager;

pub(super) fn routes(r: OpenApiRouter<Arc<Manager>>) -> OpenApiRouter<Arc<Manager>> {
    r.routes(routes!(networks, create_network))
        .routes(routes!(network, delete_network))
        .routes(routes!(start_network))
        .routes(routes!(stop_network))
}

/// The managed networks, with their leases.
#[utoipa::path(get, path = "/api/v1/networks",
    responses((status = 200, body = Vec<NetworkView>), Errors))]
async fn networks(State(m): State<Arc<Manager>>) -> Reply<Vec<NetworkView>> {
    blocking(move || m.networks()).await
}

/// Defines a network (checked against the host and the other networks) and starts it if it
/// autostarts (or `start` says so).
#[utoipa::path(post, path = "/api/v1/networks", request_body = NetworkCreate,
    responses((status = 200, body = NetworkView), Errors))]
async fn create_network(State(m): State<Arc<Manager>>, b: Bytes) -> Reply<NetworkView> {
    let req = body(&b)?;
    blocking(move || m.create_network(req)).await
}

/// One network.
#[utoipa::path(get, path = "/api/v1/networks/{network}", params(("network" = String, Path)),
    responses((status = 200, body = NetworkView), Errors))]
async fn network(
    State(m): State<Arc<Manager>>,
    UrlPath(network): UrlPath<String>,
) -> Reply<NetworkView> {
    blocking(move || m.network_view(&network)).await
}

/// Deletes a network no VM is on (taking it down first).
#[utoipa::path(delete, path = "/api/v1/networks/{network}", params(("network" = String, Path)),
    responses((status = 204), Errors))]
async fn delete_network(
    State(m): State<Arc<Manager>>,
    UrlPath(network): UrlPath<String>,
) -> Result<StatusCode, Failure> {
    let _ = blocking(move || m.delete_network(&network)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Brings a network up: its bridge, firewall and dnsmasq.
#[utoipa::path(put, path = "/api/v1/networks/{network}/start",
    params(("network" = String, Path)), responses((status = 200, body = NetworkView), Errors))]
async fn start_network(
    State(m): State<Arc<Manager>>,
    UrlPath(network): UrlPath<String>,
) -> Reply<NetworkView> {
    blocking(move || m.start_network(&network)).await
}

/// Takes a network down (refused while a running VM is on it): nothing of it stays.
#[utoipa::path(put, path = "/api/v1/networks/{network}/stop",
    params(("network" = String, Path)), responses((status = 200, body = NetworkView), Errors))]
async fn stop_network(
    State(m): State<Arc<Manager>>,
    UrlPath(network): UrlPath<String>,
) -> Reply<NetworkView> {
    blocking(move || m.stop_network(&network)).await
}
