//! Migrations that fail fail safe, on the direct host: a refused connect, a silent, garbled
//! or impostor peer, cancel on either side, SIGTERM to a waiting target and a downtime limit that cannot
//! be met each end with a clear status, the VM running on exactly one side with its soak
//! checksums intact, and a new migration that succeeds afterwards.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::migration::*;
use common::soak::Console;
use common::*;

/// Runs `vessel ctl migrate send --to addr extra...` (following it) and returns its output,
/// which must come within 60 s (a hang is killed and fails the exit-code checks).
fn send(p: &Pair, to: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["migrate", "send", "--token", TOKEN, "--to", to];
    args.extend_from_slice(extra);
    ctl(&p.src_api, &args)
}

/// `vessel ctl migrate status --json` on `socket`.
fn status_json(socket: &std::path::Path) -> String {
    stdout(&ctl(socket, &["--json", "migrate", "status"]))
}

/// SIGTERM to `c`; its exit code, which must come within a minute.
fn terminate(c: &mut Console, who: &str) -> Option<i32> {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &c.child.id().to_string()])
        .status();
    exit_code(&mut c.child, who)
}

/// The source still runs the guest, its checksums intact.
fn source_runs_on(p: &mut Pair) {
    p.source.soak_lines(CPUS, 2);
    let o = ctl(&p.src_api, &["--json", "info"]);
    assert!(stdout(&o).contains("\"running\""), "{}", stdout(&o));
}

/// A migration to a fresh target on a Unix socket that completes (the last step of each
/// test: a failure left nothing behind that stops the next try).
fn then_one_succeeds(p: &mut Pair) {
    let dst = p.tmp.file("final.sock");
    p.target = Console::spawn(&["serve", "--api-socket", dst.to_str().unwrap()]);
    p.dst_api = dst;
    wait_for(&p.dst_api);
    let addr = format!("unix:{}", p.tmp.file("final-mig.sock").display());
    migrate_and_check(p, &addr, &addr, &[]);
}

#[test]
fn a_refused_connect_fails_at_once_and_leaves_the_vm_ready_for_another_try() {
    let mut p = pair("fs-refused", &[], &[], "128M");
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let began = Instant::now();
    let o = send(&p, &format!("tcp:127.0.0.1:{port}"), &[]);
    assert_code(&o, 1);
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
    assert!(stdout(&o).contains("failed"), "{}", stdout(&o));
    let s = status_json(&p.src_api);
    assert!(s.contains("\"failed\"") && s.contains("refused"), "{s}");
    // Nothing is running: cancel says so, and the VM runs on.
    let o = ctl(&p.src_api, &["migrate", "cancel"]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains("no migration is running"),
        "{}",
        stderr(&o)
    );
    source_runs_on(&mut p);
    then_one_succeeds(&mut p);
}

/// A fake target on a Unix socket: accepts one connection, reads what comes for a moment,
/// then answers `reply` (nothing: it stays silent) and keeps the connection open until the
/// source closes it.
fn fake_target(path: &std::path::Path, reply: Vec<u8>) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut hello = [0u8; 64];
        let _ = c.read(&mut hello);
        if !reply.is_empty() {
            let _ = c.write_all(&reply);
        }
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    })
}

#[test]
fn a_silent_or_garbled_target_fails_or_is_cancelled_in_setup() {
    let mut p = pair("fs-peers", &[], &[], "128M");

    // 1. Silent after the greeting: cancel ends the wait at once.
    let silent = p.tmp.file("silent.sock");
    let peer = fake_target(&silent, Vec::new());
    let addr = format!("unix:{}", silent.display());
    assert_code(&send(&p, &addr, &["--no-wait"]), 0);
    wait_phase(&p.src_api, "setup");
    assert_code(&ctl(&p.src_api, &["migrate", "cancel"]), 0);
    wait_phase(&p.src_api, "cancelled");
    peer.join().unwrap();
    source_runs_on(&mut p);

    // 2. Garbage instead of the handshake: refused before any frame.
    let garbled = p.tmp.file("garbled.sock");
    let peer = fake_target(&garbled, b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
    let o = send(&p, &format!("unix:{}", garbled.display()), &[]);
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("did not start the authenticated migration handshake"),
        "{}",
        stdout(&o)
    );
    peer.join().unwrap();
    source_runs_on(&mut p);

    // 3. A target that greets as Vessel does but cannot prove it holds the token: the
    // source sends nothing of the VM to it.
    let fake = p.tmp.file("fake.sock");
    let mut reply = b"vessel-mig-auth\x01".to_vec();
    reply.extend_from_slice(&[7u8; 32]);
    reply.push(0);
    reply.extend_from_slice(&[0u8; 32]);
    let peer = fake_target(&fake, reply);
    let o = send(&p, &format!("unix:{}", fake.display()), &[]);
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("could not prove it holds the migration token"),
        "{}",
        stdout(&o)
    );
    peer.join().unwrap();
    source_runs_on(&mut p);

    then_one_succeeds(&mut p);
}

#[test]
fn a_waiting_target_ends_on_sigterm_and_either_side_can_cancel() {
    let mut p = pair("fs-target", &[], &[], "256M");
    let addr = format!("unix:{}", p.tmp.file("mig.sock").display());

    // 1. SIGTERM to a target waiting for a source: it ends, with SIGTERM's code.
    assert_code(
        &ctl(
            &p.dst_api,
            &["migrate", "receive", "--token", TOKEN, "--listen", &addr],
        ),
        0,
    );
    wait_phase(&p.dst_api, "listening");
    assert_eq!(terminate(&mut p.target, "a waiting target"), Some(143));

    // 2. Cancel on a waiting target: it is empty again and listens again on request.
    let dst2 = p.tmp.file("dst2.sock");
    let mut target2 = Console::spawn(&["serve", "--api-socket", dst2.to_str().unwrap()]);
    wait_for(&dst2);
    assert_code(
        &ctl(
            &dst2,
            &["migrate", "receive", "--token", TOKEN, "--listen", &addr],
        ),
        0,
    );
    wait_phase(&dst2, "listening");
    assert_code(&ctl(&dst2, &["migrate", "cancel"]), 0);
    wait_phase(&dst2, "cancelled");

    // 3. Cancel on the target during pre-copy: the source fails and runs on.
    start_slow_migration(&p, &dst2, &addr);
    wait_phase(&dst2, "precopy");
    assert_code(&ctl(&dst2, &["migrate", "cancel"]), 0);
    wait_phase(&dst2, "cancelled");
    wait_phase(&p.src_api, "failed");
    source_runs_on(&mut p);
    let o = ctl(&dst2, &["--json", "info"]);
    assert!(stdout(&o).contains("\"empty\""), "{}", stdout(&o));

    // 4. SIGTERM to the target during pre-copy: it ends; the source fails and runs on.
    start_slow_migration(&p, &dst2, &addr);
    wait_phase(&dst2, "precopy");
    assert_eq!(terminate(&mut target2, "a receiving target"), Some(143));
    wait_phase(&p.src_api, "failed");
    source_runs_on(&mut p);

    then_one_succeeds(&mut p);
}

#[test]
fn a_downtime_limit_that_cannot_be_met_fails_unless_the_caller_accepts_it() {
    // One round, after which the source holds 2 s while the busy guest rewrites its buffers:
    // the pages left can never go in 0 ms.
    let mut p = pair_with(
        "fs-downtime",
        &["env", "VESSEL_MIGRATION_HOLD=precopy"],
        &[],
        "256M",
        "action=soak soakms=50 work=16 soakpages=64 touch=64",
        None,
    );
    p.source.soak_lines(CPUS, 1);
    let addr = format!("unix:{}", p.tmp.file("mig.sock").display());
    let limits = ["--downtime", "0", "--max-rounds", "1"];
    assert_code(
        &ctl(
            &p.dst_api,
            &["migrate", "receive", "--token", TOKEN, "--listen", &addr],
        ),
        0,
    );
    let o = send(&p, &addr, &limits);
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("did not converge by round 1"),
        "{}",
        stdout(&o)
    );
    source_runs_on(&mut p);
    wait_phase(&p.dst_api, "failed");

    // Accepting the longer pause is the caller's choice, and the status says it happened.
    assert_code(
        &ctl(
            &p.dst_api,
            &["migrate", "receive", "--token", TOKEN, "--listen", &addr],
        ),
        0,
    );
    let mut args = limits.to_vec();
    args.extend(["--if-not-converged", "stop-and-copy", "--json"]);
    let o = send(&p, &addr, &args);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("\"downtime_limit_exceeded\": true"),
        "{}",
        stdout(&o)
    );
    assert_eq!(p.source.child.wait().unwrap().code(), Some(0));
    p.target.soak_lines(CPUS, 2);
    let s = status_json(&p.dst_api);
    assert!(s.contains("\"completed\""), "{s}");
}

/// Which side a cancel goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

#[test]
fn cancel_at_each_point_on_each_side_leaves_the_vm_on_exactly_one_side() {
    // The source stops at each point (the test hook) until the test lets it go, so the
    // cancel lands exactly there: in pre-copy; at stop-and-copy (vCPUs and devices stopped,
    // the disk handed over); at the commit (the target built the VM, holds the disk and is
    // ready; nothing committed); after the commit.
    for hold in ["precopy", "stop-and-copy", "commit", "committed"] {
        for side in [Side::Source, Side::Target] {
            cancel_at(hold, side);
        }
    }
}

fn cancel_at(hold: &str, side: Side) {
    let what = format!("cancel on the {side:?} at {hold}");
    let (mut p, disk, release) = held_pair_with_disk(&format!("fs-cancel-{hold}-{side:?}"), hold);
    p.source.soak_lines(CPUS, 1);
    let addr = format!("unix:{}", p.tmp.file("mig.sock").display());
    let disk_path = disk.display().to_string();
    let receive = [
        "migrate", "receive", "--listen", &addr, "--token", TOKEN, "--disk", &disk_path,
    ];
    assert_code(&ctl(&p.dst_api, &receive), 0);
    let send_args = [
        "migrate",
        "send",
        "--token",
        TOKEN,
        "--to",
        &addr,
        "--no-wait",
    ];
    assert_code(&ctl(&p.src_api, &send_args), 0);
    wait_for(&release.join(format!("{hold}.held")));
    let api = match side {
        Side::Source => &p.src_api,
        Side::Target => &p.dst_api,
    };
    let o = ctl(api, &["migrate", "cancel"]);
    // The target is past its point of no return once it said it was ready; the source once
    // it committed.
    let refused = hold == "committed" || (hold == "commit" && side == Side::Target);
    if refused {
        assert_ne!(o.status.code(), Some(0), "{what}: {}", stdout(&o));
    } else {
        assert_code(&o, 0);
    }
    std::fs::write(release.join(hold), b"").unwrap();
    if refused {
        // The migration goes on to the end: the VM is the target's.
        assert_eq!(
            exit_code(&mut p.source.child, "the source"),
            Some(0),
            "{what}"
        );
        wait_phase(&p.dst_api, "completed");
        p.target.soak_lines(CPUS, 2);
        assert_eq!(p.target.stop(), Some(143), "{what}");
        return;
    }
    let (cancelled, other) = match side {
        Side::Source => (&p.src_api, &p.dst_api),
        Side::Target => (&p.dst_api, &p.src_api),
    };
    wait_phase(cancelled, "cancelled");
    wait_phase(other, "failed");
    // The VM is on the source only: it runs on there, and the target is empty.
    source_runs_on(&mut p);
    let o = ctl(&p.dst_api, &["--json", "info"]);
    assert!(stdout(&o).contains("\"empty\""), "{what}: {}", stdout(&o));
    // And a new migration (the hold is let go) succeeds.
    assert_code(&ctl(&p.dst_api, &receive), 0);
    let o = ctl(&p.src_api, &send_args[..send_args.len() - 1]);
    assert_code(&o, 0);
    assert_eq!(
        exit_code(&mut p.source.child, "the source"),
        Some(0),
        "{what}"
    );
    p.target.soak_lines(CPUS, 2);
    assert_eq!(p.target.stop(), Some(143), "{what}");
}
