//! The storage routes: pools and their volumes ([`crate::storage`]).
//!
//! ```text
//! GET    /api/v1/pools                  POST /api/v1/pools          (PoolCreate)
//! GET    /api/v1/pools/{pool}           DELETE /api/v1/pools/{pool} (its files stay)
//! GET    /api/v1/pools/{pool}/volumes   POST .../volumes            (VolumeCreate)
//! GET    /api/v1/pools/{pool}/volumes/{volume}     DELETE .../{volume}
//! PUT    /api/v1/pools/{pool}/volumes/{volume}/resize   (VolumeResize)
//! PUT    /api/v1/pools/{pool}/volumes/{volume}/upload   (the image's bytes, streamed)
//! ```

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use tokio_stream::StreamExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{blocking, body, Errors, Failure, Reply};
use crate::storage::{PoolCreate, PoolView, Volume, VolumeCreate, VolumeResize};
use crate::vms::Manager;

pub(super) fn routes(r: OpenApiRouter<Arc<Manager>>) -> OpenApiRouter<Arc<Manager>> {
    r.routes(routes!(pools, create_pool))
        .routes(routes!(pool, delete_pool))
        .routes(routes!(volumes, create_volume))
        .routes(routes!(volume, delete_volume))
        .routes(routes!(resize_volume))
        .routes(routes!(upload_volume))
}

/// The storage pools, with their space and volume counts.
#[utoipa::path(get, path = "/api/v1/pools", responses((status = 200, body = Vec<PoolView>), Errors))]
async fn pools(State(m): State<Arc<Manager>>) -> Reply<Vec<PoolView>> {
    blocking(move || m.pools()).await
}

/// Makes a pool of a directory (made if missing).
#[utoipa::path(post, path = "/api/v1/pools", request_body = PoolCreate,
    responses((status = 200, body = PoolView), Errors))]
async fn create_pool(State(m): State<Arc<Manager>>, b: Bytes) -> Reply<PoolView> {
    let req = body(&b)?;
    blocking(move || m.create_pool(req)).await
}

/// One pool.
#[utoipa::path(get, path = "/api/v1/pools/{pool}", params(("pool" = String, Path)),
    responses((status = 200, body = PoolView), Errors))]
async fn pool(State(m): State<Arc<Manager>>, UrlPath(pool): UrlPath<String>) -> Reply<PoolView> {
    blocking(move || m.pool(&pool)).await
}

/// Forgets a pool none of whose volumes is in use (its directory and files stay).
#[utoipa::path(delete, path = "/api/v1/pools/{pool}", params(("pool" = String, Path)),
    responses((status = 204), Errors))]
async fn delete_pool(
    State(m): State<Arc<Manager>>,
    UrlPath(pool): UrlPath<String>,
) -> Result<StatusCode, Failure> {
    let _ = blocking(move || m.delete_pool(&pool)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A pool's volumes: the image files in its directory, with who uses them.
#[utoipa::path(get, path = "/api/v1/pools/{pool}/volumes", params(("pool" = String, Path)),
    responses((status = 200, body = Vec<Volume>), Errors))]
async fn volumes(
    State(m): State<Arc<Manager>>,
    UrlPath(pool): UrlPath<String>,
) -> Reply<Vec<Volume>> {
    blocking(move || m.volumes(&pool)).await
}

/// Makes a volume: an empty image of a size, or a thin overlay on another volume.
#[utoipa::path(post, path = "/api/v1/pools/{pool}/volumes", request_body = VolumeCreate,
    params(("pool" = String, Path)), responses((status = 200, body = Volume), Errors))]
async fn create_volume(
    State(m): State<Arc<Manager>>,
    UrlPath(pool): UrlPath<String>,
    b: Bytes,
) -> Reply<Volume> {
    let req = body(&b)?;
    blocking(move || m.create_volume(&pool, req)).await
}

/// One volume.
#[utoipa::path(get, path = "/api/v1/pools/{pool}/volumes/{volume}",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, body = Volume), Errors))]
async fn volume(
    State(m): State<Arc<Manager>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
) -> Reply<Volume> {
    blocking(move || m.volume(&pool, &volume)).await
}

/// Deletes a volume no template or VM uses.
#[utoipa::path(delete, path = "/api/v1/pools/{pool}/volumes/{volume}",
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 204), Errors))]
async fn delete_volume(
    State(m): State<Arc<Manager>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
) -> Result<StatusCode, Failure> {
    let _ = blocking(move || m.delete_volume(&pool, &volume)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resizes a volume no running VM uses (shrinking only when asked).
#[utoipa::path(put, path = "/api/v1/pools/{pool}/volumes/{volume}/resize",
    request_body = VolumeResize, params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, body = Volume), Errors))]
async fn resize_volume(
    State(m): State<Arc<Manager>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
    b: Bytes,
) -> Reply<Volume> {
    let req = body(&b)?;
    blocking(move || m.resize_volume(&pool, &volume, req)).await
}

/// Makes a volume of an image (raw or qcow2) sent as the body, streamed to disk. An image
/// with a backing file, or a qcow2 image that fails its check, is refused.
#[utoipa::path(put, path = "/api/v1/pools/{pool}/volumes/{volume}/upload",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    params(("pool" = String, Path), ("volume" = String, Path)),
    responses((status = 200, body = Volume), Errors))]
async fn upload_volume(
    State(m): State<Arc<Manager>>,
    UrlPath((pool, volume)): UrlPath<(String, String)>,
    b: Body,
) -> Reply<Volume> {
    // The body goes from this task to the blocking writer a chunk at a time; a writer that
    // fails stops the reading.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(4);
    let writer = blocking(move || {
        let chunks = std::iter::from_fn(move || rx.blocking_recv());
        m.upload_volume(&pool, &volume, chunks)
    });
    let reader = async move {
        let mut stream = b.into_data_stream();
        while let Some(c) = stream.next().await {
            let c = c.map(|b| b.to_vec()).map_err(|e| e.to_string());
            let last = c.is_err();
            if tx.send(c).await.is_err() || last {
                break;
            }
        }
    };
    let (answer, ()) = tokio::join!(writer, reader);
    answer
}
