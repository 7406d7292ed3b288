//! The control API's request path: a request to any route (and the wrong method now and then)
//! with a fuzzed body, through the real router (body limit, JSON errors, panic catching) to a
//! controller that validates what the VM monitor's validates without a VM (migration
//! addresses, the balloon target against guest memory) and accepts the rest. Every request body
//! type is deserialized here (`deny_unknown_fields` included); the API must answer every
//! request with a status below 500 and a JSON error body when it refuses.
//!
//! Input: 1 byte route (index into `Endpoint::ALL`; bit 7: the other method), then the body.

#![no_main]

use std::sync::{Arc, OnceLock};

use api::types::{
    ApiError, BalloonSetRequest, Endpoint, Method, MigrateReceiveRequest, MigrateReceiveResponse,
    MigrateSendRequest, MigrationStatus, MigrationToken, RestoreRequest, SnapshotRequest, VmInfo,
};
use api::VmController;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use vmm::migration::Addr;

const MEMORY: u64 = 1 << 30;

struct Controller;

impl VmController for Controller {
    fn info(&self) -> Result<VmInfo, ApiError> {
        Err(ApiError::conflict("no VM"))
    }
    fn pause(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn reset(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn snapshot(&self, req: SnapshotRequest) -> Result<(), ApiError> {
        let _ = req.dir.is_absolute();
        Ok(())
    }
    fn restore(&self, req: RestoreRequest) -> Result<(), ApiError> {
        let _ = (req.dir, req.memory);
        Ok(())
    }
    fn migrate_send(&self, req: MigrateSendRequest) -> Result<(), ApiError> {
        Addr::parse(&req.to).map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(())
    }
    fn migrate_receive(
        &self,
        req: MigrateReceiveRequest,
    ) -> Result<MigrateReceiveResponse, ApiError> {
        Addr::parse(&req.listen).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let token = match req.token {
            Some(t) => {
                vmm::migration::seal::check_token(t.expose())
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                t
            }
            None => MigrationToken("0".repeat(64)),
        };
        Ok(MigrateReceiveResponse { token })
    }
    fn migration_status(&self) -> Result<MigrationStatus, ApiError> {
        Ok(MigrationStatus::default())
    }
    fn migrate_cancel(&self) -> Result<(), ApiError> {
        Err(ApiError::conflict("no migration"))
    }
    fn set_balloon(&self, req: BalloonSetRequest) -> Result<(), ApiError> {
        if req.target_bytes >= MEMORY {
            return Err(ApiError::bad_request("not below the guest memory"));
        }
        Ok(())
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn router() -> &'static axum::Router {
    static R: OnceLock<axum::Router> = OnceLock::new();
    R.get_or_init(|| api::server::router(Arc::new(Controller)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let ep = Endpoint::ALL[usize::from(sel & 0x7f) % Endpoint::ALL.len()];
    let method = match (ep.method(), sel & 0x80 != 0) {
        (Method::Get, false) | (Method::Put, true) => "GET",
        _ => "PUT",
    };
    let req = Request::builder()
        .method(method)
        .uri(ep.path())
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let resp = runtime().block_on(router().clone().oneshot(req)).unwrap();
    let status = resp.status();
    assert!(
        status.as_u16() < 500,
        "{method} {} answered {status}",
        ep.path()
    );
    if !status.is_success() {
        let bytes = runtime()
            .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
            .unwrap();
        let e: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(e["message"].is_string(), "{status}: {e}");
    } else {
        assert!(status == StatusCode::OK || status == StatusCode::NO_CONTENT);
    }
});
