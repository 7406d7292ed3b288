//! The OpenAPI document, generated: the schemas from the types themselves (`utoipa`'s
//! `ToSchema`, their doc comments becoming descriptions), the paths from [`Endpoint::ALL`]
//! and what [`route`] says of each. Nothing is written by hand twice: a new field appears in
//! the document with the type, a new route as soon as it is in the table.

use std::sync::OnceLock;

use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{ResponseBuilder, ResponsesBuilder};
use utoipa::openapi::{ContentBuilder, OpenApi, PathsBuilder, Ref, RefOr, Response};
use utoipa::OpenApi as _;

use crate::types::*;

/// What the document says of a route beyond its path and method.
pub struct Route {
    pub operation_id: &'static str,
    pub summary: &'static str,
    pub description: Option<&'static str>,
    /// The JSON body's schema, if the route takes one.
    pub request: Option<&'static str>,
    /// The 200 answer's schema; none: 204, no content.
    pub response: Option<&'static str>,
}

/// Each route's entry in the document.
pub fn route(ep: Endpoint) -> Route {
    let r = |operation_id, summary, description, request, response| Route {
        operation_id,
        summary,
        description,
        request,
        response,
    };
    match ep {
        Endpoint::Ping => r(
            "ping",
            "Checks that the API answers.",
            None,
            None,
            Some("Pong"),
        ),
        Endpoint::OpenApi => r("openapi", "This document.", None, None, Some("")),
        Endpoint::Boot => r(
            "vmBoot",
            "Boots a VM in an empty `vessel serve`.",
            Some(
                "The body is the VM's spec (what it is) and this host's bindings for it (disk \
                 files, taps, sockets, console), as `vessel run --config` reads them. Returns \
                 once the VM runs. The console defaults to the process's `--console`; the API \
                 socket is this one. A spec or bindings that cannot be a VM is a 400 naming \
                 the field; a process that has a VM already answers 409.",
            ),
            Some("VmDocument"),
            None,
        ),
        Endpoint::Info => r(
            "vmInfo",
            "The VM's state, size, devices and version.",
            None,
            None,
            Some("VmInfo"),
        ),
        Endpoint::Pause => r(
            "vmPause",
            "Parks every vCPU; returns once they are parked.",
            Some("The body, if any, must be empty or {}."),
            None,
            None,
        ),
        Endpoint::Resume => r("vmResume", "Releases the parked vCPUs.", None, None, None),
        Endpoint::Shutdown => r(
            "vmShutdown",
            "Presses the ACPI power button.",
            Some("Returns at once; the guest decides when to power off."),
            None,
            None,
        ),
        Endpoint::Reset => r("vmReset", "Resets the machine.", None, None, None),
        Endpoint::Snapshot => r(
            "vmSnapshot",
            "Writes a snapshot of the paused VM.",
            None,
            Some("SnapshotRequest"),
            None,
        ),
        Endpoint::Restore => r(
            "vmRestore",
            "Restores a snapshot.",
            None,
            Some("RestoreRequest"),
            None,
        ),
        Endpoint::MigrateSend => r(
            "vmMigrateSend",
            "Starts a live migration to a receiving Vessel.",
            Some("Returns once started; follow vm.migration-status."),
            Some("MigrateSendRequest"),
            None,
        ),
        Endpoint::MigrateReceive => r(
            "vmMigrateReceive",
            "Listens for an incoming migration.",
            Some(
                "Returns once listening, with the migration's token (the request's, or a \
                 random 256-bit one): give it to vm.migrate-send on the source. Before any \
                 other message, both sides prove they hold the token; then every frame is \
                 encrypted and authenticated (AES-256-GCM). A connection that fails the \
                 handshake is refused and the target listens on. Host resources (disk files, \
                 taps, vsock socket) come from this request, never from the source, unless \
                 same_paths. Follow vm.migration-status.",
            ),
            Some("MigrateReceiveRequest"),
            Some("MigrateReceiveResponse"),
        ),
        Endpoint::MigrationStatus => r(
            "vmMigrationStatus",
            "Progress of the current or last migration.",
            None,
            None,
            Some("MigrationStatus"),
        ),
        Endpoint::MigrateCancel => r(
            "vmMigrateCancel",
            "Cancels the running migration; the source VM carries on.",
            None,
            None,
            None,
        ),
        Endpoint::Balloon => r(
            "vmBalloon",
            "The balloon's target, actual size and the guest's memory statistics.",
            Some(
                "Also asks the guest for fresh statistics (when it negotiated the statistics \
                 queue); they arrive asynchronously, so this answer has the last ones reported. \
                 409 when the VM has no balloon.",
            ),
            None,
            Some("BalloonInfo"),
        ),
        Endpoint::BalloonSet => r(
            "vmBalloonSet",
            "Sets the balloon's target.",
            Some(
                "The guest is told at once (a configuration change interrupt) and inflates or \
                 deflates towards it; follow vm.balloon for actual_bytes. 400 when the target \
                 is not below the guest memory, 409 when the VM has no balloon.",
            ),
            Some("BalloonSetRequest"),
            None,
        ),
        Endpoint::Counters => r(
            "vmCounters",
            "Counters of the vCPUs, disks and network devices.",
            Some(
                "vCPU exits by kind, each disk's requests and bytes by kind and its errors, each \
                 network device's frames and bytes each way and its drops. Counted since the \
                 devices were made in this process: a VM restored from a snapshot or received \
                 by a migration starts from 0. Answers while the VM runs or is paused (without \
                 disturbing it), and with the last values once it has stopped; 409 in a \
                 `vessel serve` that has no VM yet.",
            ),
            None,
            Some("VmCounters"),
        ),
    }
}

/// The schemas: every request and answer type, and what they contain.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Vessel VM control API",
        version = "1",
        description = "One API per VM, on the Unix socket given to `vessel run --api-socket \
                       PATH` or `vessel serve`. Queries are GET, actions PUT. Errors are JSON \
                       {\"message\": \"...\"} with a 4xx/5xx status; a request that fails to \
                       parse never reaches the VM.",
        license(name = "Apache-2.0"),
    ),
    servers((url = "http://localhost", description = "over the Unix socket")),
    components(schemas(
        ApiError,
        Pong,
        VmDocument,
        VmInfo,
        SnapshotRequest,
        RestoreRequest,
        MigrateSendRequest,
        MigrateReceiveRequest,
        MigrateReceiveResponse,
        MigrationStatus,
        BalloonInfo,
        BalloonSetRequest,
        VmCounters,
    ))
)]
struct Schemas;

/// The errors every route may answer.
const ERRORS: [(&str, &str); 7] = [
    (
        "400",
        "Malformed request: bad JSON, unknown field, missing field, unexpected body, a value \
         out of range (the message names the field).",
    ),
    ("405", "Wrong method."),
    ("409", "Not possible in the VM's current state."),
    ("413", "Request body larger than 64 KiB."),
    ("500", "The VMM failed (or panicked) handling the request."),
    ("501", "Not supported by this VM or build."),
    ("503", "The VM is stopping."),
];

fn json_ref(schema: &str) -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(RefOr::Ref(Ref::from_schema_name(schema))))
        .build()
}

fn response(description: &str, schema: Option<&str>) -> RefOr<Response> {
    let r = ResponseBuilder::new().description(description);
    RefOr::T(match schema {
        Some(s) => r.content("application/json", json_ref(s)).build(),
        None => r.build(),
    })
}

/// The document.
pub fn document() -> OpenApi {
    let mut doc = Schemas::openapi();
    let mut paths = PathsBuilder::new();
    for ep in Endpoint::ALL {
        let route = route(ep);
        let mut responses = ResponsesBuilder::new();
        responses = match (ep, route.response) {
            (Endpoint::OpenApi, _) => responses.response(
                "200",
                ResponseBuilder::new()
                    .description("The OpenAPI document.")
                    .content("application/json", ContentBuilder::new().build()),
            ),
            (_, Some(s)) => responses.response("200", response("OK", Some(s))),
            (_, None) => responses.response("204", response("Done.", None)),
        };
        if ep != Endpoint::OpenApi {
            for (code, why) in ERRORS {
                responses = responses.response(code, response(why, Some("ApiError")));
            }
        }
        let mut op = OperationBuilder::new()
            .operation_id(Some(route.operation_id))
            .summary(Some(route.summary))
            .description(route.description)
            .responses(responses.build());
        if let Some(body) = route.request {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", json_ref(body))
                    .required(Some(utoipa::openapi::Required::True))
                    .build(),
            ));
        }
        let method = match ep.method() {
            Method::Get => HttpMethod::Get,
            Method::Put => HttpMethod::Put,
        };
        paths = paths.path(ep.path(), PathItem::new(method, op.build()));
    }
    doc.paths = paths.build();
    doc
}

/// The document as JSON, made once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        document()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    })
}
