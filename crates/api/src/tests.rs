//! The server and client together, over real Unix sockets, against a fake VM
//! ([`crate::testing`]).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::client::{Client, ClientError};
use crate::server::{serve, ServeError, MAX_BODY_BYTES};
use crate::testing::*;
use crate::types::*;
use crate::VmController;

/// A controller that implements only what it must: the balloon methods are the trait's.
struct Bare;

impl VmController for Bare {
    fn info(&self) -> Result<VmInfo, ApiError> {
        Ok(fake_info())
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
    fn snapshot(&self, _: SnapshotRequest) -> Result<(), ApiError> {
        Ok(())
    }
    fn restore(&self, _: RestoreRequest) -> Result<(), ApiError> {
        Ok(())
    }
    fn migrate_send(&self, _: MigrateSendRequest) -> Result<(), ApiError> {
        Ok(())
    }
    fn migrate_receive(
        &self,
        _: MigrateReceiveRequest,
    ) -> Result<MigrateReceiveResponse, ApiError> {
        Err(ApiError::conflict("bare"))
    }
    fn migration_status(&self) -> Result<MigrationStatus, ApiError> {
        Ok(MigrationStatus::default())
    }
    fn migrate_cancel(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

fn json_body(r: &crate::client::RawResponse) -> Value {
    assert_eq!(
        r.content_type.as_deref(),
        Some("application/json"),
        "status {} body {:?}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body).unwrap()
}

/// Asserts an error response: its status and a JSON message containing `needle`.
fn assert_error(r: &crate::client::RawResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
    let v = json_body(r);
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
}

#[test]
fn every_route_through_the_client() {
    let (vm, _h, c) = start();
    let pong = c.ping().unwrap();
    assert_eq!(pong.api_version, "v1");
    assert_eq!(c.info().unwrap(), fake_info());
    c.pause().unwrap();
    c.resume().unwrap();
    c.shutdown().unwrap();
    c.reset().unwrap();
    c.snapshot(&SnapshotRequest {
        dir: "/snap".into(),
        diff: true,
        disk_snapshot: false,
    })
    .unwrap();
    c.restore(&RestoreRequest {
        dir: "/snap".into(),
        memory: RestoreMemory::Userfaultfd,
    })
    .unwrap();
    c.migrate_send(&MigrateSendRequest {
        to: "tcp:127.0.0.1:4444".into(),
        downtime_ms: 100,
        bandwidth_mbps: Some(1000),
        post_copy: false,
        post_copy_after_rounds: None,
        if_not_converged: None,
        max_rounds: None,
        full_digest: false,
        token: MigrationToken("s3cret-0123456789abcdef".into()),
    })
    .unwrap();
    let r = c
        .migrate_receive(&MigrateReceiveRequest {
            listen: "unix:/tmp/m.sock".into(),
            token: None,
            disks: vec![MigrateDisk {
                path: "/d.raw".into(),
                cache: Some(DiskCache::None),
            }],
            taps: vec!["vtap1".into()],
            nets: vec![],
            vsock_socket: None,
            same_paths: false,
        })
        .unwrap();
    assert_eq!(r.token.expose(), "generated-token-0123456789");
    assert_eq!(c.migration_status().unwrap().phase, MigrationPhase::None);
    c.migrate_cancel().unwrap();
    *vm.balloon.lock().unwrap() = fake_balloon();
    assert_eq!(c.balloon().unwrap(), fake_balloon());
    c.set_balloon(&BalloonSetRequest {
        target_bytes: 1 << 30,
    })
    .unwrap();
    assert_eq!(c.balloon().unwrap().target_bytes, 1 << 30);
    *vm.counters.lock().unwrap() = fake_counters();
    assert_eq!(c.counters().unwrap(), fake_counters());
    let doc = c.openapi().unwrap();
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(crate::openapi::json()).unwrap()
    );
    assert_eq!(
        vm.calls(),
        [
            "info",
            "pause",
            "resume",
            "shutdown",
            "reset",
            r#"snapshot SnapshotRequest { dir: "/snap", diff: true, disk_snapshot: false }"#,
            r#"restore RestoreRequest { dir: "/snap", memory: Userfaultfd }"#,
            r#"migrate_send MigrateSendRequest { to: "tcp:127.0.0.1:4444", downtime_ms: 100, bandwidth_mbps: Some(1000), post_copy: false, post_copy_after_rounds: None, if_not_converged: None, max_rounds: None, full_digest: false, token: MigrationToken(<hidden>) }"#,
            r#"migrate_receive MigrateReceiveRequest { listen: "unix:/tmp/m.sock", token: None, disks: [MigrateDisk { path: "/d.raw", cache: Some(None) }], taps: ["vtap1"], nets: [], vsock_socket: None, same_paths: false }"#,
            "migration_status",
            "migrate_cancel",
            "balloon",
            "set_balloon BalloonSetRequest { target_bytes: 1073741824 }",
            "balloon",
            "counters",
        ]
    );
}

#[test]
fn openapi_covers_every_route_and_schema() {
    let doc: Value = serde_json::from_str(crate::openapi::json()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for ep in Endpoint::ALL {
        let method = ep.method().as_str().to_ascii_lowercase();
        let op = &paths
            .get(&ep.path())
            .unwrap_or_else(|| panic!("{} missing from openapi.json", ep.path()))[&method];
        assert!(op.is_object(), "{method} {} missing", ep.path());
        assert_eq!(
            paths[&ep.path()].as_object().unwrap().len(),
            1,
            "{}: one method per route",
            ep.path()
        );
    }
    assert_eq!(
        paths.len(),
        Endpoint::ALL.len(),
        "openapi.json has extra paths"
    );
    // Every $ref resolves.
    assert_eq!(unresolved_refs(&doc), Vec::<String>::new());
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    // The schemas' properties match the types' JSON.
    let check = |schema: &str, v: Value| {
        let props = schemas[schema]["properties"].as_object().unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(
                props.contains_key(k),
                "{schema}.{k} missing from openapi.json"
            );
        }
    };
    check("VmInfo", serde_json::to_value(fake_info()).unwrap());
    check(
        "DeviceInfo",
        serde_json::to_value(&fake_info().devices[0]).unwrap(),
    );
    let status = MigrationStatus {
        role: Some(MigrationRole::Send),
        downtime_ms: Some(1),
        error: Some("x".into()),
        ..Default::default()
    };
    check("MigrationStatus", serde_json::to_value(&status).unwrap());
    check(
        "MigrateSendRequest",
        serde_json::to_value(MigrateSendRequest {
            to: "x".into(),
            downtime_ms: 1,
            bandwidth_mbps: Some(1),
            post_copy: true,
            post_copy_after_rounds: Some(1),
            if_not_converged: None,
            max_rounds: None,
            full_digest: false,
            token: MigrationToken("t".into()),
        })
        .unwrap(),
    );
    check(
        "MigrateReceiveRequest",
        serde_json::to_value(MigrateReceiveRequest {
            listen: "x".into(),
            token: Some(MigrationToken("t".into())),
            disks: vec![MigrateDisk {
                path: "/d".into(),
                cache: Some(DiskCache::Writeback),
            }],
            taps: vec!["t".into()],
            nets: vec![spec::bindings::NetBinding::Socket("/s".into())],
            vsock_socket: Some("/v".into()),
            same_paths: true,
        })
        .unwrap(),
    );
    check(
        "MigrateDisk",
        serde_json::to_value(MigrateDisk {
            path: "/d".into(),
            cache: Some(DiskCache::Unsafe),
        })
        .unwrap(),
    );
    check(
        "MigrateReceiveResponse",
        serde_json::to_value(MigrateReceiveResponse {
            token: MigrationToken("t".into()),
        })
        .unwrap(),
    );
    check("BalloonInfo", serde_json::to_value(fake_balloon()).unwrap());
    // The counters: every field of every part (fake_counters sets them all).
    let counters = fake_counters();
    check("VmCounters", serde_json::to_value(&counters).unwrap());
    check(
        "VcpuCounters",
        serde_json::to_value(counters.vcpus[0]).unwrap(),
    );
    check(
        "DiskCounters",
        serde_json::to_value(&counters.disks[0]).unwrap(),
    );
    check(
        "NicCounters",
        serde_json::to_value(&counters.nics[0]).unwrap(),
    );
    for schema in ["VmCounters", "VcpuCounters", "DiskCounters", "NicCounters"] {
        let s = &schemas[schema];
        assert!(
            s["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{schema} has no description: {s}"
        );
        for (name, p) in s["properties"].as_object().unwrap() {
            assert!(
                p["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{schema}.{name} has no description"
            );
        }
    }
    let counters_route = &doc["paths"][Endpoint::Counters.path()]["get"];
    assert_eq!(counters_route["operationId"], "vmCounters");
    assert_eq!(
        counters_route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/VmCounters"
    );
    check(
        "BalloonSetRequest",
        serde_json::to_value(BalloonSetRequest { target_bytes: 1 }).unwrap(),
    );
    // The statistics are a map of counters, their names in its description.
    let stats = &schemas["BalloonInfo"]["properties"]["stats"];
    let text = stats.to_string();
    for name in BALLOON_STATS {
        assert!(
            text.contains(name),
            "BalloonInfo.stats does not name {name}: {text}"
        );
    }
    // The boot document: a spec and its bindings, with the spec's fields.
    check(
        "VmDocument",
        serde_json::to_value(VmDocument::default()).unwrap(),
    );
    check(
        "VmSpec",
        serde_json::to_value(spec::vm::VmSpec::default()).unwrap(),
    );
    // The bindings' schema has both network fields: nets, and taps (its older form).
    let bindings: Value = serde_json::from_str(
        r#"{"disks": ["/d"], "nets": [{"socket": "/s"}], "vsock_socket": "/v",
            "console": "stdio", "virtio_console": "off", "api_socket": "/a"}"#,
    )
    .unwrap();
    check("HostBindings", bindings);
    check("HostBindings", serde_json::json!({"taps": ["t"]}));
    assert!(
        schemas.contains_key("NetBinding"),
        "NetBinding schema missing"
    );
    let phases = schemas["MigrationPhase"]["enum"].as_array().unwrap();
    for p in [
        MigrationPhase::None,
        MigrationPhase::Setup,
        MigrationPhase::Listening,
        MigrationPhase::Precopy,
        MigrationPhase::StopAndCopy,
        MigrationPhase::Completed,
        MigrationPhase::Cancelled,
        MigrationPhase::Failed,
    ] {
        assert!(phases.contains(&serde_json::to_value(p).unwrap()), "{p}");
    }
}

#[test]
fn boot_takes_a_document_and_refuses_a_bad_one_by_field() {
    let (vm, _h, c) = start();
    let boot = Endpoint::Boot.path();
    let put = |body: &str| c.raw("PUT", &boot, Some(body.as_bytes())).unwrap();
    assert_error(
        &put(r#"{"spec": {"cpus": 0}}"#),
        400,
        "cpus: must be at least 1",
    );
    assert_error(&put(r#"{"spec": {"cpu": 2}}"#), 400, "unknown field `cpu`");
    assert_error(
        &put(r#"{"spec": {"disks": [{"queues": 0}]}, "bindings": {"disks": ["/d"]}}"#),
        400,
        "disks[0].queues",
    );
    assert_error(&put(r#"{"spec": {"disks": [{}]}}"#), 400, "bindings.disks");
    assert_error(
        &put(r#"{"spec": {"memory": "lots"}}"#),
        400,
        "'lots' is not a size",
    );
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    let doc: VmDocument = serde_json::from_str(
        r#"{"spec": {"cpus": 2, "memory": "128M", "disks": [{}]},
            "bindings": {"disks": ["/img.qcow2"]}}"#,
    )
    .unwrap();
    c.boot(&doc).unwrap();
    assert_eq!(vm.calls(), [r#"boot 2 cpus, disks ["/img.qcow2"]"#]);
}

/// PUTs `body` to `path` on the socket as raw HTTP, reading what comes back while it writes.
fn raw_exchange(socket: &std::path::Path, path: &str, body: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut reader = s.try_clone().unwrap();
    let read = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out);
        out
    });
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    let _ = s.shutdown(std::net::Shutdown::Write);
    String::from_utf8_lossy(&read.join().unwrap()).into_owned()
}

#[test]
fn bad_requests_are_json_4xx_and_never_reach_the_vm() {
    let (vm, _h, c) = start();
    let snap = "/api/v1/vm.snapshot";
    assert_error(
        &c.raw("PUT", snap, Some(b"{not json")).unwrap(),
        400,
        "invalid",
    );
    assert_error(
        &c.raw("PUT", snap, Some(br#"{"dir":"/s","dif":true}"#))
            .unwrap(),
        400,
        "unknown field",
    );
    assert_error(
        &c.raw("PUT", snap, Some(br#"{"diff":true}"#)).unwrap(),
        400,
        "dir",
    );
    assert_error(&c.raw("PUT", snap, None).unwrap(), 400, "needs a JSON body");
    assert_error(
        &c.raw(
            "PUT",
            "/api/v1/vm.restore",
            Some(br#"{"dir":"/s","memory":"x"}"#),
        )
        .unwrap(),
        400,
        "unknown variant",
    );
    assert_error(
        &c.raw("PUT", "/api/v1/vm.pause", Some(br#"{"force":true}"#))
            .unwrap(),
        400,
        "unknown field",
    );
    let bset = "/api/v1/vm.balloon-set";
    assert_error(&c.raw("PUT", bset, None).unwrap(), 400, "needs a JSON body");
    assert_error(
        &c.raw("PUT", bset, Some(br#"{"target_bytes":1,"stats":true}"#))
            .unwrap(),
        400,
        "unknown field",
    );
    assert_error(
        &c.raw("PUT", bset, Some(br#"{"target_bytes":-4096}"#))
            .unwrap(),
        400,
        "invalid",
    );
    assert_error(
        &c.raw("PUT", bset, Some(br#"{"target_mib":64}"#)).unwrap(),
        400,
        "target_bytes",
    );
    assert_error(&c.raw("GET", bset, None).unwrap(), 405, "method");
    assert_error(
        &c.raw("PUT", "/api/v1/vm.balloon", None).unwrap(),
        405,
        "method",
    );
    assert_error(
        &c.raw("GET", "/api/v1/vm.nope", None).unwrap(),
        404,
        "no such route",
    );
    assert_error(&c.raw("GET", "/", None).unwrap(), 404, "no such route");
    assert_error(
        &c.raw("GET", "/api/v1/vm.pause", None).unwrap(),
        405,
        "method",
    );
    assert_error(
        &c.raw("PUT", "/api/v1/vm.info", None).unwrap(),
        405,
        "method",
    );
    assert_error(
        &c.raw("DELETE", "/api/v1/vm.reset", None).unwrap(),
        405,
        "method",
    );
    // Oversized bodies, sent as they are: the server answers 413 without reading them and
    // closes. A client still writing may not see that answer: the kernel can report the
    // close (the body unread) before the 413. Either way nothing reaches the VM.
    let big = vec![b' '; MAX_BODY_BYTES + 1];
    let mut json_big = br#"{"dir":""#.to_vec();
    json_big.extend(std::iter::repeat_n(b'a', 4 * MAX_BODY_BYTES));
    json_big.extend_from_slice(br#""}"#);
    for body in [&big, &json_big] {
        let answer = raw_exchange(c.socket_path(), snap, body);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 413"),
            "{answer:?}"
        );
    }
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    // Empty and `{}` bodies are fine for actions.
    assert_eq!(
        c.raw("PUT", "/api/v1/vm.pause", Some(b"{}"))
            .unwrap()
            .status,
        204
    );
    assert_eq!(
        c.raw("PUT", "/api/v1/vm.pause", Some(b" \n"))
            .unwrap()
            .status,
        204
    );
    assert_eq!(vm.calls(), ["pause", "pause"]);
}

#[test]
fn controller_errors_keep_status_and_message() {
    let (vm, _h, c) = start();
    vm.fail_with(Some(ApiError::conflict("the VM is already paused")));
    let e = c.pause().unwrap_err();
    let api = e.api_error().unwrap();
    assert_eq!(
        (api.status, api.message.as_str()),
        (409, "the VM is already paused")
    );
    assert!(e.to_string().contains("already paused"), "{e}");
    let r = c.raw("GET", "/api/v1/vm.info", None).unwrap();
    assert_error(&r, 409, "already paused");
    // A status that is not an error status is a 500.
    vm.fail_with(Some(ApiError::new(200, "confused")));
    assert_error(
        &c.raw("PUT", "/api/v1/vm.reset", None).unwrap(),
        500,
        "confused",
    );
    vm.fail_with(Some(ApiError::not_implemented(
        "no migration in this build",
    )));
    let e = c
        .migrate_send(&MigrateSendRequest {
            to: "x".into(),
            downtime_ms: 1,
            bandwidth_mbps: None,
            post_copy: false,
            post_copy_after_rounds: None,
            if_not_converged: None,
            max_rounds: None,
            full_digest: false,
            token: MigrationToken("t".into()),
        })
        .unwrap_err();
    assert_eq!(e.api_error().unwrap().status, 501);
}

#[test]
fn counters_default_to_no_vm_and_are_a_get() {
    let path = socket_path();
    let _h = serve(&path, Arc::new(Bare)).unwrap();
    let c = Client::new(&path);
    let e = c.counters().unwrap_err();
    let api = e.api_error().unwrap();
    assert_eq!(api.status, 409, "{e}");
    assert!(api.message.contains("no VM"), "{e}");
    assert_eq!(Endpoint::Counters.path(), "/api/v1/vm.counters");
    assert_error(
        &c.raw("PUT", "/api/v1/vm.counters", None).unwrap(),
        405,
        "method",
    );
    let (vm, _h2, c2) = start();
    assert_eq!(c2.counters().unwrap(), VmCounters::default());
    let r = c2.raw("GET", "/api/v1/vm.counters", None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        json_body(&r),
        serde_json::json!({"vcpus": [], "disks": [], "nics": []})
    );
    assert_eq!(vm.calls(), ["counters", "counters"]);
}

#[test]
fn balloon_routes_default_to_no_balloon() {
    let path = socket_path();
    let _h = serve(&path, Arc::new(Bare)).unwrap();
    let c = Client::new(&path);
    for e in [
        c.balloon().unwrap_err(),
        c.set_balloon(&BalloonSetRequest { target_bytes: 0 })
            .unwrap_err(),
    ] {
        let api = e.api_error().unwrap();
        assert_eq!(api.status, 409);
        assert!(api.message.contains("this VM has no balloon"), "{e}");
    }
    assert_eq!(
        c.balloon().unwrap_err().to_string(),
        "this VM has no balloon (start it with --balloon) (HTTP 409)"
    );
    // The rest of the API is unaffected.
    c.ping().unwrap();
}

#[test]
fn a_panicking_controller_is_a_500_and_the_server_carries_on() {
    let (vm, h, c) = start();
    *vm.panic_on.lock().unwrap() = Some("reset");
    assert_error(
        &c.raw("PUT", "/api/v1/vm.reset", None).unwrap(),
        500,
        "internal error",
    );
    c.pause().unwrap();
    assert_eq!(c.info().unwrap().vcpus, 2);
    h.stop();
}

#[test]
fn garbage_on_the_socket_does_not_disturb_the_server() {
    let (vm, h, c) = start();
    for junk in [
        &b"garbage\r\n\r\n"[..],
        b"\x00\x01\x02\xff\r\n\r\n",
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"PUT /api/v1/vm.pause HTTP/1.1\r\n",
    ] {
        let mut s = UnixStream::connect(h.socket_path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            !out.starts_with(b"HTTP/1.1 2"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    c.ping().unwrap();
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
}

#[test]
fn concurrent_requests() {
    let (vm, _h, c) = start();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    if i % 2 == 0 {
                        assert_eq!(c.info().unwrap().vcpus, 2);
                    } else {
                        c.pause().unwrap();
                        let r = c.raw("PUT", "/api/v1/vm.snapshot", Some(b"{")).unwrap();
                        assert_eq!(r.status, 400);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let calls = vm.calls();
    assert_eq!(calls.len(), 200);
    assert_eq!(calls.iter().filter(|c| *c == "pause").count(), 100);
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_refused() {
    let vm: Arc<FakeVm> = Arc::new(FakeVm::default());
    // Stale: a socket nobody listens on.
    let path = socket_path();
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let h = serve(&path, vm.clone()).unwrap();
    Client::new(&path).ping().unwrap();
    // Live: refused, and the live server is untouched.
    match serve(&path, vm.clone()) {
        Err(e @ ServeError::InUse { .. }) => assert!(e.to_string().contains("serving")),
        other => panic!("{other:?}"),
    }
    Client::new(&path).ping().unwrap();
    h.stop();
    assert!(!path.exists(), "stop removes the socket");
    assert!(matches!(
        Client::new(&path).ping(),
        Err(ClientError::Connect { .. })
    ));
    // A regular file: refused and left as it was.
    std::fs::write(&path, b"precious").unwrap();
    match serve(&path, vm.clone()) {
        Err(e @ ServeError::NotASocket { .. }) => {
            assert!(e.to_string().contains("not a socket"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    // A directory, and a path whose parent is missing.
    std::fs::create_dir(&path).unwrap();
    assert!(matches!(
        serve(&path, vm.clone()),
        Err(ServeError::NotASocket { .. })
    ));
    std::fs::remove_dir(&path).unwrap();
    assert!(matches!(
        serve("/nonexistent-dir/x.sock", vm),
        Err(ServeError::Io { .. })
    ));
}

#[test]
fn stop_does_not_remove_a_replaced_socket() {
    let vm: Arc<FakeVm> = Arc::new(FakeVm::default());
    let path = socket_path();
    let h = serve(&path, vm.clone()).unwrap();
    // Someone replaced the socket file: stopping must leave theirs alone.
    std::fs::remove_file(&path).unwrap();
    let theirs = UnixListener::bind(&path).unwrap();
    drop(h);
    assert!(path.exists());
    drop(theirs);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn stop_is_prompt_with_an_idle_connection_open() {
    let (_vm, h, c) = start();
    let path = h.socket_path().to_path_buf();
    // A keep-alive client that made one request and then sits idle.
    let mut idle = UnixStream::connect(&path).unwrap();
    idle.write_all(b"GET /api/v1/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(idle.read(&mut buf).unwrap() > 0);
    // A half-sent request too.
    let mut half = UnixStream::connect(&path).unwrap();
    half.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        .unwrap();
    c.ping().unwrap();
    let t = std::time::Instant::now();
    h.stop();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!path.exists());
}

fn handler_bug() -> &'static str {
    panic!("handler bug")
}

#[test]
fn a_panic_in_request_handling_is_a_json_500() {
    use axum::routing::get;
    // The real router's layers, around a handler that panics.
    let app = crate::server::with_layers(
        axum::Router::new().route("/p", get(|| async { handler_bug() })),
    );
    let path = socket_path();
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let p2 = path.clone();
    let t = std::thread::spawn(move || {
        let c = Client::new(&p2);
        let r = c.raw("GET", "/p", None).unwrap();
        // Still serving: the next request gets its (404) answer.
        let next = c.raw("GET", "/q", None).map(|r| r.status);
        let _ = tx.send(());
        (r, next.ok() == Some(404))
    });
    rt.block_on(async move {
        let l = tokio::net::UnixListener::from_std(listener).unwrap();
        axum::serve(l, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    let (r, still_serving) = t.join().unwrap();
    assert_error(&r, 500, "internal error");
    assert!(still_serving);
    std::fs::remove_file(&path).unwrap();
}
