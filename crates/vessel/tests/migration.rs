//! Live migration on the direct host, between two `vessel` processes: the bundled guest's
//! soak workload (every vCPU checks its memory and reports a counter and a checksum) goes on
//! on the target without a mismatch; a failure or a cancel at any point leaves it running on
//! exactly one side.

mod common;

use std::path::Path;
use std::process::Command;

use common::migration::*;
use common::soak::{assert_went_on, Console};
use common::*;

#[test]
fn migration_over_a_unix_socket_moves_the_running_vm() {
    let mut p = pair("mig-unix", &[], &[], "128M");
    let sock = p.tmp.file("mig.sock");
    let addr = format!("unix:{}", sock.display());
    // All of memory compared on both sides: this also checks that the dirty log (KVM's and
    // the VMM's own writes) missed no page.
    migrate_and_check(&mut p, &addr, &addr, &["--full-digest"]);
}

/// Two network namespaces joined by a veth pair; removed on drop.
struct Netns(Vec<String>);

impl Netns {
    fn pair(tag: &str) -> Netns {
        let a = format!("vmig-a-{tag}");
        let b = format!("vmig-b-{tag}");
        let run = |args: &[&str]| {
            let s = Command::new("ip").args(args).status().expect("ip");
            assert!(s.success(), "ip {args:?}");
        };
        for n in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
            run(&["netns", "add", n]);
        }
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        run(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ]);
        run(&["-n", &a, "addr", "add", "10.77.0.1/24", "dev", &va]);
        run(&["-n", &b, "addr", "add", "10.77.0.2/24", "dev", &vb]);
        for (n, v) in [(&a, &va), (&b, &vb)] {
            run(&["-n", n, "link", "set", v, "up"]);
            run(&["-n", n, "link", "set", "lo", "up"]);
        }
        Netns(vec![a, b])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn migration_over_tcp_between_two_network_namespaces() {
    let ns = Netns::pair(&format!("{}", std::process::id() % 10000));
    let (a, b) = (ns.0[0].clone(), ns.0[1].clone());
    let mut p = pair(
        "mig-tcp",
        &["ip", "netns", "exec", &a],
        &["ip", "netns", "exec", &b],
        "128M",
    );
    migrate_and_check(&mut p, "tcp:10.77.0.2:47001", "tcp:10.77.0.2:47001", &[]);
}

#[test]
fn cancel_and_dead_peers_leave_the_vm_on_one_side() {
    let mut p = pair("mig-fail", &[], &[], "256M");
    let sock = p.tmp.file("mig.sock");
    let addr = format!("unix:{}", sock.display());

    // 1. Cancelled during pre-copy (slowed to 8 Mbit/s): the source runs on, the target
    //    drops what it got and can receive again.
    start_slow_migration(&p, &p.dst_api, &addr);
    assert_code(&ctl(&p.src_api, &["migrate", "cancel"]), 0);
    wait_phase(&p.src_api, "cancelled");
    p.source.soak_lines(CPUS, 2);
    wait_phase(&p.dst_api, "failed");
    let o = ctl(&p.dst_api, &["--json", "info"]);
    assert!(stdout(&o).contains("\"empty\""), "{}", stdout(&o));

    // 2. The target dies during pre-copy: the source notices and runs on.
    start_slow_migration(&p, &p.dst_api, &addr);
    let _ = p.target.child.kill();
    let _ = p.target.child.wait();
    wait_phase(&p.src_api, "failed");
    p.source.soak_lines(CPUS, 2);

    // 3. The source dies during pre-copy: a new target is left empty and can receive again.
    let dst2 = p.tmp.file("dst2.sock");
    let mut target2 = Console::spawn(&["serve", "--api-socket", dst2.to_str().unwrap()]);
    wait_for(&dst2);
    start_slow_migration(&p, &dst2, &addr);
    let _ = p.source.child.kill();
    let _ = p.source.child.wait();
    wait_phase(&dst2, "failed");
    let o = ctl(&dst2, &["--json", "info"]);
    assert!(stdout(&o).contains("\"empty\""), "{}", stdout(&o));
    assert_eq!(target2.stop(), Some(143));
}

#[test]
fn a_side_killed_at_stop_and_copy_or_around_the_commit_leaves_the_vm_on_one_side() {
    // The source holds 2 s at the named point (VESSEL_MIGRATION_HOLD), then either side dies.
    for (hold, kill_target) in [
        ("stop-and-copy", true),
        ("stop-and-copy", false),
        ("commit", true),
        ("commit", false),
        ("committed", false),
    ] {
        let env = format!("VESSEL_MIGRATION_HOLD={hold}");
        let mut p = pair("mig-hold", &["env", &env], &[], "128M");
        let addr = format!("unix:{}", p.tmp.file("mig.sock").display());
        start_migration(&p, &p.dst_api, &addr, &[]);
        wait_phase(&p.src_api, "stop-and-copy");
        if hold == "commit" {
            // The target has the state and has built the VM; nothing is committed.
            wait_phase(&p.dst_api, "stop-and-copy");
        }
        if hold == "committed" {
            // The source is past the point of no return: killing it leaves the VM on the
            // target, which runs on.
            p.target.soak_lines(CPUS, 1);
            let _ = p.source.child.kill();
            let _ = p.source.child.wait();
            p.target.soak_lines(CPUS, 2);
            let o = ctl(&p.dst_api, &["--json", "info"]);
            assert!(stdout(&o).contains("\"running\""), "{}", stdout(&o));
        } else if kill_target {
            let _ = p.target.child.kill();
            let _ = p.target.child.wait();
            // The source takes the VM back: its vCPUs run on.
            wait_phase(&p.src_api, "failed");
            p.source.soak_lines(CPUS, 2);
        } else {
            let _ = p.source.child.kill();
            let _ = p.source.child.wait();
            // The target drops what it received and waits again, empty.
            wait_phase(&p.dst_api, "failed");
            let o = ctl(&p.dst_api, &["--json", "info"]);
            assert!(stdout(&o).contains("\"empty\""), "{hold}: {}", stdout(&o));
        }
    }
}

/// The number after `"key":` in `json`.
fn json_u64(json: &str, key: &str) -> u64 {
    let at = json
        .find(&format!("\"{key}\""))
        .unwrap_or_else(|| panic!("{key}: {json}"));
    let v = json[at + key.len() + 3..].trim_start();
    v[..v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len())]
        .parse()
        .unwrap_or_else(|_| panic!("{key}: {json}"))
}

/// A busy guest: 16 × 2 MiB soak buffers per vCPU rewritten 64 pages at a time, and 64 MiB
/// touched once.
const BUSY: &str = "action=soak soakms=50 work=16 soakpages=64 touch=64";

/// The source's holds for the post-copy tests: after the first round with the busy guest
/// running (it dirties pages, so post-copy has some to fetch), and once the VM runs on the
/// target before any page is sent; each until the test releases it (`Release`).
const HOLD_POSTCOPY: &str = "VESSEL_MIGRATION_HOLD=precopy,postcopy";

/// The directory whose files release the source's holds (`VESSEL_MIGRATION_RELEASE`).
struct Release(TempDir);

impl Release {
    fn new(name: &str) -> Release {
        Release(TempDir::new(&format!("{name}-release")))
    }
    fn env(&self) -> String {
        format!("VESSEL_MIGRATION_RELEASE={}", self.0 .0.display())
    }
    fn release(&self, phase: &str) {
        std::fs::write(self.0.file(phase), b"").unwrap();
    }
}

/// A busy source that holds where [`HOLD_POSTCOPY`] says until released, and a target.
fn postcopy_pair(name: &str, dst_stderr: Option<&Path>) -> (Pair, Release) {
    let release = Release::new(name);
    let env = release.env();
    let p = pair_with(
        name,
        &["env", HOLD_POSTCOPY, &env],
        &[],
        "256M",
        BUSY,
        dst_stderr,
    );
    (p, release)
}

/// Starts a post-copy migration forced after the first round; releases the first hold once
/// the guest has run on (written pages) since the dirty log started; returns when both sides
/// say post-copy, with pages still missing on the target (the source holds before sending
/// any).
fn start_postcopy(p: &mut Pair, release: &Release) {
    let addr = format!("unix:{}", p.tmp.file("mig.sock").display());
    start_migration(
        p,
        &p.dst_api,
        &addr,
        &["--post-copy", "--post-copy-after", "1"],
    );
    // The dirty log runs from before the first round: every window the guest rewrites from
    // here on is dirty when the round ends (a loaded host may starve the guest for seconds,
    // so a fixed wait would not do).
    wait_phase(&p.src_api, "precopy");
    p.source.soak_lines(CPUS, 2);
    release.release("precopy");
    wait_phase(&p.src_api, "postcopy");
    wait_phase(&p.dst_api, "postcopy");
    let o = ctl(&p.dst_api, &["--json", "migrate", "status"]);
    assert!(
        json_u64(&stdout(&o), "remaining_bytes") > 0,
        "no page left for post-copy: {}",
        stdout(&o)
    );
}

#[test]
fn post_copy_moves_a_busy_vm_and_the_source_exits_after_the_last_page() {
    let (mut p, release) = postcopy_pair("mig-postcopy", None);
    let before = latest_iters(&mut p.source);
    start_postcopy(&mut p, &release);
    // The target runs the VM (its missing pages wait for the source, which holds), and the
    // source stays until every page is over.
    assert!(p.source.child.try_wait().unwrap().is_none());
    let o = ctl(&p.src_api, &["--json", "migrate", "status"]);
    assert!(
        json_u64(&stdout(&o), "remaining_bytes") > 0,
        "{}",
        stdout(&o)
    );
    release.release("postcopy");
    assert_eq!(p.source.child.wait().unwrap().code(), Some(0));
    assert_went_on(&p.target.soak_lines(CPUS, 3), CPUS, &before, "");
    wait_phase(&p.dst_api, "completed");
    let o = ctl(&p.dst_api, &["--json", "migrate", "status"]);
    assert!(!stdout(&o).contains("\"error\""), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("\"remaining_bytes\": 0"),
        "{}",
        stdout(&o)
    );
    // The target's pager brought the pages in.
    let o = ctl(&p.dst_api, &["--json", "info"]);
    assert!(stdout(&o).contains("\"running\""), "{}", stdout(&o));
    assert!(json_u64(&stdout(&o), "copied_pages") > 0, "{}", stdout(&o));
    assert_eq!(p.target.stop(), Some(143));
}

#[test]
fn killing_the_source_during_post_copy_fails_the_target_clearly() {
    let tmp = TempDir::new("mig-postcopy-err");
    let err = tmp.file("target.err");
    let (mut p, release) = postcopy_pair("mig-postcopy-kill", Some(&err));
    start_postcopy(&mut p, &release);
    let _ = p.source.child.kill();
    let _ = p.source.child.wait();
    // The target cannot go on without the pages; it ends with an error saying so (no hang:
    // the wait below gives up only after a minute).
    assert_eq!(exit_code(&mut p.target.child, "the target"), Some(1));
    let e = std::fs::read_to_string(&err).unwrap();
    assert!(
        e.contains("lost the connection to the source with") && e.contains("pages"),
        "{e}"
    );
}

#[test]
fn killing_the_target_during_post_copy_never_resumes_the_source() {
    let (mut p, release) = postcopy_pair("mig-postcopy-kill-target", None);
    start_postcopy(&mut p, &release);
    let _ = p.target.child.kill();
    let _ = p.target.child.wait();
    release.release("postcopy");
    // The guest's state moved to the target: the source ends with an error instead of
    // running a stale copy.
    assert_eq!(exit_code(&mut p.source.child, "the source"), Some(1));
    assert!(!p.source.seen.contains("MISMATCH"), "{}", p.source.seen);
}
