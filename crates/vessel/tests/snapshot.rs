//! Snapshots on the direct host: the bundled guest's soak workload (every vCPU checks, in
//! ring 3, that its memory holds what it wrote, and reports a counter and a checksum) goes on
//! after snapshot and restore without a mismatch, in one restored copy or several at once.
//!
//! (On this development host the guest's TSC follows the host's across a restore, because
//! kvm_pvm runs guest ring 3 natively: the soak's `t=` jumps by the time between snapshot and
//! restore. Counters and checksums carry on exactly.)

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::soak::{assert_went_on, last_iters, Console, SoakLine};
use common::*;

const CPUS: usize = 2;

fn soak_vm(socket: &Path) -> Console {
    soak_vm_with(socket, "action=soak soakms=50")
}

/// A 2-CPU VM with its API on `socket`, booted with `cmdline` (a soak workload).
fn soak_vm_with(socket: &Path, cmdline: &str) -> Console {
    Console::spawn(&[
        "run",
        "--cpus",
        "2",
        "--memory",
        "128M",
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ])
}

/// Takes a snapshot of a soaking VM into `dir`; returns the iterations reported before it
/// (the snapshot was taken after them) and those reported after it (possibly before the
/// snapshot point: the console lags).
fn snapshot_soak(dir: &Path, socket: &Path) -> (Vec<u64>, Vec<u64>) {
    let mut vm = soak_vm(socket);
    let before = vm.soak_lines(CPUS, 2);
    let o = ctl(socket, &["snapshot", "--dir", dir.to_str().unwrap()]);
    assert_code(&o, 0);
    // The VM goes on after a snapshot.
    let after = vm.soak_lines(CPUS, 2);
    assert_eq!(vm.stop(), Some(143));
    (last_iters(&before, CPUS), last_iters(&after, CPUS))
}

#[test]
fn restored_vm_continues_the_soak_workload() {
    let tmp = TempDir::new("snapshot");
    let dir = tmp.file("snap");
    let (before, _) = snapshot_soak(&dir, &tmp.file("api.sock"));
    // Untouched guest memory stays a hole in the memory file.
    let meta = std::fs::metadata(dir.join("memory")).unwrap();
    assert_eq!(meta.len(), 128 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 32 << 20, "{} blocks", meta.blocks());

    let mut restored = Console::spawn(&["run", "--restore", dir.to_str().unwrap()]);
    let lines = restored.soak_lines(CPUS, 3);
    // Every CPU goes on from where the snapshot was taken: past what it had reported, with
    // every page check passing (soak_lines fails on a MISMATCH).
    assert_went_on(&lines, CPUS, &before, "");
    // The workload is deterministic: a second restore reports the same iterations and sums.
    assert_eq!(restored.stop(), Some(143));
    let mut again = Console::spawn(&["run", "--restore", dir.to_str().unwrap()]);
    let lines2 = again.soak_lines(CPUS, 1);
    let first = |ls: &[SoakLine], c: usize| ls.iter().find(|l| l.cpu == c).cloned().unwrap();
    for c in 0..CPUS {
        let (a, b) = (first(&lines, c), first(&lines2, c));
        if a.iter == b.iter {
            assert_eq!(a.sum, b.sum, "cpu {c}");
        }
    }
    assert_eq!(again.stop(), Some(143));
}

#[test]
fn one_snapshot_restores_into_several_vms_at_once() {
    let tmp = TempDir::new("clones");
    let dir = tmp.file("snap");
    snapshot_soak(&dir, &tmp.file("api.sock"));
    let mut clones: Vec<Console> = (0..3)
        .map(|_| Console::spawn(&["run", "--restore", dir.to_str().unwrap()]))
        .collect();
    for c in &mut clones {
        c.soak_lines(CPUS, 3);
    }
    for mut c in clones {
        assert_eq!(c.stop(), Some(143));
    }
    // The clones wrote to private copies: the snapshot restores the same again.
    let mut after = Console::spawn(&["run", "--restore", dir.to_str().unwrap()]);
    after.soak_lines(CPUS, 1);
}

#[test]
fn serve_restores_through_the_api_and_eagerly() {
    let tmp = TempDir::new("serve");
    let dir = tmp.file("snap");
    snapshot_soak(&dir, &tmp.file("api.sock"));
    let socket: PathBuf = tmp.file("serve.sock");
    let mut vm = Console::spawn(&["serve", "--api-socket", socket.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let o = ctl(&socket, &["--json", "info"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("\"empty\""), "{}", stdout(&o));
    // A bad directory is a clear error and the VMM waits on.
    let o = ctl(
        &socket,
        &["restore", "--dir", tmp.file("nothing").to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing/state"), "{}", stderr(&o));
    let o = ctl(
        &socket,
        &[
            "restore",
            "--dir",
            dir.to_str().unwrap(),
            "--memory",
            "eager",
        ],
    );
    assert_code(&o, 0);
    vm.soak_lines(CPUS, 2);
    let o = ctl(&socket, &["--json", "info"]);
    assert!(stdout(&o).contains("\"running\""), "{}", stdout(&o));
    assert_eq!(vm.stop(), Some(143));
}

#[test]
fn corrupt_or_foreign_state_is_refused() {
    let tmp = TempDir::new("corrupt");
    let dir = tmp.file("snap");
    snapshot_soak(&dir, &tmp.file("api.sock"));
    let state = dir.join("state");
    let good = std::fs::read(&state).unwrap();
    // A flipped byte in the body: the checksum catches it before anything reaches KVM.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 10] ^= 1;
    std::fs::write(&state, &bad).unwrap();
    let o = vessel(&["run", "--restore", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
    // A state file of another format version.
    let text =
        String::from_utf8_lossy(&good).replacen("\"format_version\":3", "\"format_version\":7", 1);
    std::fs::write(&state, text.as_bytes()).unwrap();
    let o = vessel(&["run", "--restore", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("format version 7"), "{}", stderr(&o));
    // A truncated memory file.
    std::fs::write(&state, &good).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    let o = vessel(&["run", "--restore", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("needs"), "{}", stderr(&o));
    // Snapshots never overwrite one another.
    let socket = tmp.file("api2.sock");
    let mut vm = soak_vm(&socket);
    vm.soak_lines(CPUS, 1);
    let o = ctl(&socket, &["snapshot", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("holds a snapshot already"),
        "{}",
        stderr(&o)
    );
    vm.soak_lines(CPUS, 1);
}

#[test]
fn clones_get_their_own_vsock_socket_and_cid() {
    let tmp = TempDir::new("vsock-clones");
    let dir = tmp.file("snap");
    let socket = tmp.file("api.sock");
    let v0 = format!("cid=3,socket={}", tmp.file("v0.sock").display());
    let mut vm = Console::spawn(&[
        "run",
        "--cpus",
        "2",
        "--memory",
        "128M",
        "--vsock",
        &v0,
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        "action=soak soakms=50",
    ]);
    vm.soak_lines(CPUS, 1);
    assert_code(
        &ctl(&socket, &["snapshot", "--dir", dir.to_str().unwrap()]),
        0,
    );
    // Two clones beside the original, each with its own socket and CID.
    let mut clones = Vec::new();
    for (cid, name) in [(4, "v1.sock"), (5, "v2.sock")] {
        let spec = format!("cid={cid},socket={}", tmp.file(name).display());
        clones.push(Console::spawn(&[
            "run",
            "--restore",
            dir.to_str().unwrap(),
            "--vsock",
            &spec,
        ]));
    }
    for c in &mut clones {
        c.soak_lines(CPUS, 2);
    }
    for name in ["v0.sock", "v1.sock", "v2.sock"] {
        assert!(tmp.file(name).exists(), "{name}");
    }
    vm.soak_lines(CPUS, 1);
    // Network devices are rebound all or none: this VM has none.
    let o = vessel(&[
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--net",
        "tap=vclone0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("0 network devices"), "{}", stderr(&o));
}

/// Rewrites the snapshot's state file with `edit` applied to its JSON body (header fixed up).
fn edit_state(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("state");
    let text = std::fs::read(&path).unwrap();
    let mut lines = text.splitn(3, |&c| c == b'\n');
    let magic = lines.next().unwrap().to_vec();
    let header: serde_json::Value = serde_json::from_slice(lines.next().unwrap()).unwrap();
    let mut body: serde_json::Value = serde_json::from_slice(lines.next().unwrap()).unwrap();
    edit(&mut body);
    let body = serde_json::to_vec(&body).unwrap();
    let mut header = header;
    header["body_len"] = body.len().into();
    header["body_crc32"] = crc32fast::hash(&body).into();
    let mut out = magic;
    out.push(b'\n');
    out.extend_from_slice(&serde_json::to_vec(&header).unwrap());
    out.push(b'\n');
    out.extend_from_slice(&body);
    std::fs::write(&path, out).unwrap();
}

#[test]
fn a_host_without_the_guests_cpu_features_refuses_the_snapshot() {
    let tmp = TempDir::new("cpu");
    let dir = tmp.file("snap");
    snapshot_soak(&dir, &tmp.file("api.sock"));
    // A feature this host's CPU lacks, written into every saved vCPU's CPUID.
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags: Vec<&str> = flags
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap()
        .split_whitespace()
        .collect();
    // (cpuinfo flag, Vessel's name, leaf, register 0..3 = eax..edx, bit): Intel-only and
    // AMD-only features, so that every host lacks some.
    let candidates = [
        ("amx_tile", "amx-tile", 7u32, 3usize, 24u32),
        ("amx_int8", "amx-int8", 7, 3, 25),
        ("avx512f", "avx512f", 7, 1, 16),
        ("sse4a", "sse4a", 0x8000_0001, 2, 6),
        ("xop", "xop", 0x8000_0001, 2, 11),
        ("fma4", "fma4", 0x8000_0001, 2, 16),
        ("tbm", "tbm", 0x8000_0001, 2, 21),
    ];
    let Some(&(_, name, leaf, reg, bit)) = candidates.iter().find(|c| !flags.contains(&c.0)) else {
        eprintln!("skipped: this CPU has every candidate feature");
        return;
    };
    edit_state(&dir, |body| {
        for v in body["vcpus"].as_array_mut().unwrap() {
            for e in v["cpuid"].as_array_mut().unwrap() {
                let bytes: Vec<u8> = e
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                let word =
                    |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
                // kvm_cpuid_entry2: function, index, flags, eax, ebx, ecx, edx, padding.
                if word(0) == leaf && word(1) == 0 {
                    let at = (3 + reg) * 4;
                    let v = word(3 + reg) | (1 << bit);
                    let arr = e.as_array_mut().unwrap();
                    for (k, b) in v.to_le_bytes().iter().enumerate() {
                        arr[at + k] = (*b).into();
                    }
                }
            }
        }
    });
    let o = vessel(&["run", "--restore", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot run the saved VM") && stderr(&o).contains(name),
        "{}",
        stderr(&o)
    );
}

/// Resident memory of process `pid`, from /proc.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

#[test]
fn uffd_restore_serves_pages_on_demand_and_snapshots_again() {
    let tmp = TempDir::new("uffd");
    let dir = tmp.file("snap");
    let socket = tmp.file("api.sock");
    // 64 MiB touched once and never again: data in the memory file the soak never reads.
    let mut vm = Console::spawn(&[
        "run",
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--api-socket",
        socket.to_str().unwrap(),
        "--cmdline",
        "action=soak soakms=50 touch=64",
    ]);
    let before = last_iters(&vm.soak_lines(CPUS, 2), CPUS);
    assert_code(
        &ctl(&socket, &["snapshot", "--dir", dir.to_str().unwrap()]),
        0,
    );
    assert_eq!(vm.stop(), Some(143));
    use std::os::unix::fs::MetadataExt;
    let written = std::fs::metadata(dir.join("memory")).unwrap().blocks() * 512;
    assert!(written >= 64 << 20, "{written}");

    let socket2 = tmp.file("api2.sock");
    let mut restored = Console::spawn(&[
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--restore-memory",
        "uffd",
        "--api-socket",
        socket2.to_str().unwrap(),
    ]);
    let lines = restored.soak_lines(CPUS, 3);
    assert_went_on(&lines, CPUS, &before, "");
    // The touched 64 MiB were never asked for: neither resident nor served.
    let resident = rss(restored.child.id());
    assert!(resident < 48 << 20, "RSS {resident}");
    let o = ctl(&socket2, &["--json", "info"]);
    assert_code(&o, 0);
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let pager = &info["pager"];
    let copied = pager["copied_pages"].as_u64().unwrap();
    assert!(pager["faults"].as_u64().unwrap() > 0, "{info}");
    assert!(copied > 0, "{info}");
    assert!(copied < (48 << 20) / 4096, "{info}");

    // A snapshot of the restored VM brings in what was never touched, and holds it all.
    let dir2 = tmp.file("snap2");
    assert_code(
        &ctl(&socket2, &["snapshot", "--dir", dir2.to_str().unwrap()]),
        0,
    );
    restored.soak_lines(CPUS, 1);
    assert_eq!(restored.stop(), Some(143));
    let written2 = std::fs::metadata(dir2.join("memory")).unwrap().blocks() * 512;
    assert!(written2 >= 64 << 20, "{written2}");
    let mut again = Console::spawn(&["run", "--restore", dir2.to_str().unwrap()]);
    again.soak_lines(CPUS, 2);
    assert_eq!(again.stop(), Some(143));
}

/// Bytes the file at `p` has on disk.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// A restored VM goes on from after `before` (the iterations each CPU reported before the
/// snapshot) with every check passing; returns what it reported.
fn restore_continues(args: &[&str], before: &[u64]) -> Vec<SoakLine> {
    let mut vm = Console::spawn(args);
    let lines = vm.soak_lines(CPUS, 3);
    assert_went_on(&lines, CPUS, before, &format!("{args:?} "));
    assert_eq!(vm.stop(), Some(143));
    lines
}

#[test]
fn diff_snapshots_restore_as_a_chain() {
    let tmp = TempDir::new("diff");
    let socket = tmp.file("api.sock");
    let (full, d1, d2, d3) = (
        tmp.file("full"),
        tmp.file("d1"),
        tmp.file("d2"),
        tmp.file("d3"),
    );
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    // 16 MiB written once before the soak: in the full snapshot, never in a diff.
    let mut vm = soak_vm_with(&socket, "action=soak soakms=50 touch=16");
    vm.soak_lines(CPUS, 1);
    // No base yet: a diff is refused, clearly, and the VM runs on.
    let o = ctl(&socket, &["snapshot", "--dir", &path(&d1), "--diff"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("full snapshot first"), "{}", stderr(&o));
    assert!(!d1.exists());
    vm.soak_lines(CPUS, 1);
    assert_code(&ctl(&socket, &["snapshot", "--dir", &path(&full)]), 0);
    vm.soak_lines(CPUS, 2);
    assert_code(
        &ctl(&socket, &["snapshot", "--dir", &path(&d1), "--diff"]),
        0,
    );
    vm.soak_lines(CPUS, 2);
    let before = last_iters(&vm.soak_lines(CPUS, 1), CPUS);
    assert_code(
        &ctl(&socket, &["snapshot", "--dir", &path(&d2), "--diff"]),
        0,
    );
    vm.soak_lines(CPUS, 1);
    assert_eq!(vm.stop(), Some(143));

    // The diffs hold only what the soak rewrote (its work buffers), not the touched 16 MiB.
    let (fa, d1a, d2a) = (
        allocated(&full.join("memory")),
        allocated(&d1.join("memory")),
        allocated(&d2.join("memory")),
    );
    eprintln!("allocated: full {fa}, d1 {d1a}, d2 {d2a}");
    assert!(d1a < fa && d2a < fa, "full {fa}, d1 {d1a}, d2 {d2a}");
    assert!(fa >= 16 << 20, "full {fa}");
    let state = std::fs::read_to_string(d2.join("state")).unwrap_or_default();
    assert!(state.contains("\"parent\""), "no parent in d2's header");

    // The last diff restores, lazily, eagerly and through userfaultfd: full + d1 + d2.
    restore_continues(&["run", "--restore", &path(&d2)], &before);
    for mode in ["eager", "uffd"] {
        restore_continues(
            &["run", "--restore", &path(&d2), "--restore-memory", mode],
            &before,
        );
    }

    // A VM restored from d2 takes d2 as its base: a diff of it chains on.
    let socket2 = tmp.file("api2.sock");
    let mut vm = Console::spawn(&[
        "run",
        "--restore",
        &path(&d2),
        "--api-socket",
        socket2.to_str().unwrap(),
    ]);
    vm.soak_lines(CPUS, 2);
    let before3 = last_iters(&vm.soak_lines(CPUS, 1), CPUS);
    assert_code(
        &ctl(&socket2, &["snapshot", "--dir", &path(&d3), "--diff"]),
        0,
    );
    assert_eq!(vm.stop(), Some(143));
    assert!(allocated(&d3.join("memory")) < fa);
    restore_continues(&["run", "--restore", &path(&d3)], &before3);

    // A parent that is not the one the diff was taken against is refused: another id...
    let d1_state = d1.join("state");
    let good = std::fs::read(&d1_state).unwrap();
    let text = String::from_utf8_lossy(&good).to_string();
    let id_at = text.find("\"snapshot_id\":\"").unwrap() + 15;
    let mut other = text.clone();
    other.replace_range(id_at..id_at + 32, &"0".repeat(32));
    std::fs::write(&d1_state, other).unwrap();
    let o = vessel(&["run", "--restore", &path(&d2)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("parent snapshot") && stderr(&o).contains("not "),
        "{}",
        stderr(&o)
    );
    // ... a corrupt one ...
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 10] ^= 1;
    std::fs::write(&d1_state, &bad).unwrap();
    let o = vessel(&["run", "--restore", &path(&d2)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));
    assert!(stderr(&o).contains("parent snapshot"), "{}", stderr(&o));
    // ... or none at all.
    std::fs::write(&d1_state, &good).unwrap();
    std::fs::rename(&full, tmp.file("moved")).unwrap();
    let o = vessel(&["run", "--restore", &path(&d2)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("parent snapshot") && stderr(&o).contains("full/state"),
        "{}",
        stderr(&o)
    );
}
