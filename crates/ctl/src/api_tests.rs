//! `vessel ctl` against a fake VM behind a real API server (`api::testing`).

use std::time::Duration;

use api::client::ClientError;
use api::testing::*;
use api::types::*;
use clap::Parser;
use serde_json::Value;

use crate::{CtlArgs, CtlError};

fn ctl(path: &std::path::Path, args: &[&str]) -> (Result<i32, CtlError>, String) {
    let mut v = vec!["vessel-ctl", "--api-socket", path.to_str().unwrap()];
    v.extend_from_slice(args);
    let args = CtlArgs::try_parse_from(v).unwrap();
    let mut out = Vec::new();
    let r = crate::run_for_test(&args, &mut out, Duration::from_millis(5));
    (r, String::from_utf8(out).unwrap())
}

#[test]
fn ctl_verbs() {
    let (vm, h, _c) = start();
    let p = h.socket_path().to_path_buf();
    let (r, out) = ctl(&p, &["info"]);
    assert_eq!(r.unwrap(), 0);
    assert!(
        out.contains("state:    running") && out.contains("serial0"),
        "{out}"
    );
    let (r, out) = ctl(&p, &["--json", "info"]);
    assert_eq!(r.unwrap(), 0);
    assert_eq!(serde_json::from_str::<VmInfo>(&out).unwrap(), fake_info());
    let (r, out) = ctl(&p, &["pause"]);
    assert_eq!((r.unwrap(), out.as_str()), (0, "paused\n"));
    let (r, out) = ctl(&p, &["ping"]);
    assert_eq!(
        (r.unwrap(), out.starts_with("ok: Vessel API v1")),
        (0, true)
    );
    let (r, _) = ctl(&p, &["snapshot", "--dir", "/s", "--disk-snapshot"]);
    assert_eq!(r.unwrap(), 0);
    let (r, _) = ctl(&p, &["restore", "--dir", "/s", "--memory", "eager"]);
    assert_eq!(r.unwrap(), 0);
    let (r, out) = ctl(&p, &["openapi"]);
    assert_eq!(r.unwrap(), 0);
    assert!(out.contains("vm.migrate-send"));
    let (r, out) = ctl(&p, &["migrate", "status"]);
    assert_eq!((r.unwrap(), out.as_str()), (0, "migration: none\n"));
    assert_eq!(
        vm.calls()[2..5],
        [
            "pause".to_string(),
            r#"snapshot SnapshotRequest { dir: "/s", diff: false, disk_snapshot: true }"#.into(),
            r#"restore RestoreRequest { dir: "/s", memory: Eager }"#.into(),
        ]
    );
    *vm.balloon.lock().unwrap() = fake_balloon();
    let (r, out) = ctl(&p, &["balloon"]);
    assert_eq!(r.unwrap(), 0);
    assert_eq!(
        out,
        "target:   64.0 MiB\nactual:   32.0 MiB\nstats:\n  swap_in              0 B\n  \
         major_faults         7\n  free_memory          100.0 MiB\n"
    );
    let (r, out) = ctl(&p, &["--json", "balloon"]);
    assert_eq!(r.unwrap(), 0);
    assert_eq!(
        serde_json::from_str::<BalloonInfo>(&out).unwrap(),
        fake_balloon()
    );
    let (r, out) = ctl(&p, &["balloon", "1G"]);
    assert_eq!(
        (r.unwrap(), out.as_str()),
        (0, "balloon target set to 1.0 GiB\n")
    );
    let (r, out) = ctl(&p, &["--json", "balloon", "0"]);
    assert_eq!((r.unwrap(), out.as_str()), (0, "{}\n"));
    assert_eq!(
        vm.calls()[vm.calls().len() - 2..],
        [
            "set_balloon BalloonSetRequest { target_bytes: 1073741824 }".to_string(),
            "set_balloon BalloonSetRequest { target_bytes: 0 }".to_string(),
        ]
    );
    *vm.balloon.lock().unwrap() = BalloonInfo::default();
    let (r, out) = ctl(&p, &["balloon"]);
    assert_eq!(r.unwrap(), 0);
    assert!(out.ends_with("stats:    none\n"), "{out}");
    vm.fail_with(Some(ApiError::bad_request(
        "the balloon target 1G is not below the guest memory of 512M",
    )));
    let (r, _) = ctl(&p, &["balloon", "1G"]);
    assert!(r.unwrap_err().to_string().contains("(HTTP 400)"));
    vm.fail_with(Some(ApiError::conflict("not paused")));
    let (r, _) = ctl(&p, &["resume"]);
    let e = r.unwrap_err();
    assert_eq!(e.to_string(), "not paused (HTTP 409)");
    drop(h);
    let (r, _) = ctl(&p, &["info"]);
    assert!(matches!(
        r,
        Err(CtlError::Client(ClientError::Connect { .. }))
    ));
}

#[test]
fn ctl_counters_prints_the_json() {
    let (vm, h, _c) = start();
    let p = h.socket_path().to_path_buf();
    *vm.counters.lock().unwrap() = fake_counters();
    for args in [&["counters"][..], &["--json", "counters"]] {
        let (r, out) = ctl(&p, args);
        assert_eq!(r.unwrap(), 0, "{args:?}");
        assert_eq!(
            serde_json::from_str::<VmCounters>(&out).unwrap(),
            fake_counters(),
            "{args:?}"
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["disks"][0]["id"], "block0");
        assert_eq!(v["nics"][0]["tx_bytes"], 500);
        assert_eq!(v["vcpus"][1]["io_exits"], 10);
    }
    assert_eq!(vm.calls(), ["counters", "counters"]);
    vm.fail_with(Some(ApiError::conflict("no VM here: nothing is counted")));
    let (r, out) = ctl(&p, &["counters"]);
    assert_eq!(
        r.unwrap_err().to_string(),
        "no VM here: nothing is counted (HTTP 409)"
    );
    assert!(out.is_empty(), "{out}");
}

fn status(phase: MigrationPhase, round: u32, done: u64, left: u64) -> MigrationStatus {
    MigrationStatus {
        phase,
        role: Some(MigrationRole::Send),
        round,
        total_bytes: 1 << 30,
        transferred_bytes: done,
        remaining_bytes: left,
        dirty_rate: 1 << 20,
        expected_downtime_ms: 20,
        ..Default::default()
    }
}

#[test]
fn ctl_migrate_send_follows_progress_until_the_end() {
    let (vm, h, _c) = start();
    let p = h.socket_path().to_path_buf();
    let progress = [
        status(MigrationPhase::Setup, 0, 0, 1 << 30),
        status(MigrationPhase::Precopy, 1, 1 << 29, 1 << 29),
        status(MigrationPhase::Precopy, 2, 1 << 30, 1 << 20),
        status(MigrationPhase::StopAndCopy, 3, (1 << 30) + (1 << 20), 0),
        MigrationStatus {
            downtime_ms: Some(12),
            ..status(MigrationPhase::Completed, 3, (1 << 30) + (1 << 20), 0)
        },
    ];
    *vm.statuses.lock().unwrap() = progress.iter().cloned().collect();
    let (r, out) = ctl(
        &p,
        &[
            "migrate",
            "send",
            "--to",
            "tcp:127.0.0.1:1",
            "--bandwidth",
            "100",
            "--token",
            "t",
        ],
    );
    assert_eq!(r.unwrap(), 0, "{out}");
    assert!(
        out.starts_with("migration: completed (sending), round 3"),
        "{out}"
    );
    assert!(out.contains("downtime 12 ms"), "{out}");
    let polls = vm
        .calls()
        .iter()
        .filter(|c| *c == "migration_status")
        .count();
    assert_eq!(polls, 5);

    *vm.statuses.lock().unwrap() = [MigrationStatus {
        error: Some("connection reset".into()),
        ..status(MigrationPhase::Failed, 2, 5, 5)
    }]
    .into();
    let (r, out) = ctl(
        &p,
        &["--json", "migrate", "send", "--to", "x", "--token", "t"],
    );
    assert_eq!(r.unwrap(), 1);
    let s: MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(s.error.as_deref(), Some("connection reset"));

    *vm.statuses.lock().unwrap() = [status(MigrationPhase::Cancelled, 2, 5, 5)].into();
    let (r, out) = ctl(&p, &["migrate", "receive", "--listen", "x", "--wait"]);
    assert_eq!(r.unwrap(), 1);
    assert!(
        out.starts_with("listening on x\ntoken: generated-token-0123456789\nmigration: cancelled"),
        "{out}"
    );
    // The token the target makes, for scripts.
    let (r, out) = ctl(&p, &["--json", "migrate", "receive", "--listen", "x"]);
    assert_eq!(r.unwrap(), 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["token"], "generated-token-0123456789");
    let (r, out) = ctl(
        &p,
        &[
            "migrate",
            "receive",
            "--listen",
            "x",
            "--token",
            "mine-0123456789abcdef",
        ],
    );
    assert_eq!(r.unwrap(), 0);
    assert!(out.ends_with("token: mine-0123456789abcdef\n"), "{out}");

    let (r, out) = ctl(
        &p,
        &["migrate", "send", "--to", "x", "--no-wait", "--token", "t"],
    );
    assert_eq!((r.unwrap(), out.as_str()), (0, "migration to x started\n"));
    let (r, out) = ctl(&p, &["migrate", "cancel"]);
    assert_eq!((r.unwrap(), out.as_str()), (0, "migration cancelled\n"));
}
