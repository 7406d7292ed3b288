//! The migration stream is authenticated and sealed, on the direct host: a wrong token, a
//! plain peer without the handshake and a frame tampered with on the wire are refused before
//! anything reaches guest memory, the VM running on at the source with its soak checksums
//! intact; the right token then migrates. The target takes its host resources from its own
//! request, not from the source.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::migration::*;
use common::soak::assert_went_on;
use common::*;

/// The source still runs the guest, its checksums intact.
fn source_runs_on(p: &mut Pair) {
    p.source.soak_lines(CPUS, 2);
    let o = ctl(&p.src_api, &["--json", "info"]);
    assert!(stdout(&o).contains("\"running\""), "{}", stdout(&o));
}

/// `vessel ctl migrate status --json` on `socket`.
fn status_json(socket: &Path) -> String {
    stdout(&ctl(socket, &["--json", "migrate", "status"]))
}

/// Sends to `to` with `token` and follows the migration to its end (with `extra` arguments).
fn send(p: &Pair, to: &str, token: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["migrate", "send", "--to", to, "--token", token];
    args.extend_from_slice(extra);
    ctl(&p.src_api, &args)
}

/// The source hands over and exits 0; the target runs the VM on from where it was.
fn handed_over(p: &mut Pair, before: &[u64]) {
    assert_eq!(p.source.child.wait().unwrap().code(), Some(0));
    assert_went_on(&p.target.soak_lines(CPUS, 3), CPUS, before, "");
    assert_eq!(phase(&p.dst_api), "completed");
    assert_eq!(p.target.stop(), Some(143));
}

#[test]
fn a_wrong_token_or_a_plain_peer_is_refused_and_the_target_listens_on() {
    let mut p = pair("auth-token", &[], &[], "128M");
    let addr = format!("unix:{}", p.tmp.file("mig.sock").display());
    let o = ctl(&p.dst_api, &["migrate", "receive", "--listen", &addr]);
    assert_code(&o, 0);
    let token = printed_token(&o);

    // 1. The wrong token: the source fails at once and runs on; the target refuses the
    // connection, says so, and listens on with nothing received.
    let o = send(&p, &addr, "not-the-token-0123456789", &[]);
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("refused the migration token"),
        "{}",
        stdout(&o)
    );
    source_runs_on(&mut p);
    let s = status_json(&p.dst_api);
    assert!(
        s.contains("\"listening\"") && s.contains("wrong token"),
        "{s}"
    );
    assert!(s.contains("\"transferred_bytes\": 0"), "{s}");

    // 2. A plain peer that starts with a migration frame (an older Vessel): told that the
    // target needs the handshake, and refused.
    let path = p.tmp.file("mig.sock");
    let mut plain = UnixStream::connect(&path).unwrap();
    let hello = br#"{"magic":"vessel-migration","version":1}"#;
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(hello.len() as u64).to_le_bytes());
    frame.extend_from_slice(hello);
    frame.resize(frame.len().max(64), b' ');
    plain.write_all(&frame).unwrap();
    let mut head = [0u8; 9];
    plain.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 9, "an Error frame");
    let mut msg = vec![0u8; u64::from_le_bytes(head[1..].try_into().unwrap()) as usize];
    plain.read_exact(&mut msg).unwrap();
    let msg = String::from_utf8_lossy(&msg);
    assert!(msg.contains("authenticated migrations only"), "{msg}");
    drop(plain);
    let s = status_json(&p.dst_api);
    assert!(s.contains("\"listening\""), "{s}");

    // 3. The right token: the VM moves.
    let before = latest_iters(&mut p.source);
    let o = send(&p, &addr, &token, &[]);
    assert_code(&o, 0);
    handed_over(&mut p, &before);
}

/// A Unix-socket proxy from `listen` to `target` that flips one bit of the source's byte
/// number `at` (counted from the start of the connection) on its way; returns a flag set
/// once the flip is done.
fn tampering_proxy(listen: &Path, target: &Path, at: u64) -> Arc<AtomicBool> {
    let l = UnixListener::bind(listen).unwrap();
    let target = target.to_path_buf();
    let flipped = Arc::new(AtomicBool::new(false));
    let done = flipped.clone();
    std::thread::spawn(move || {
        let (mut src, _) = l.accept().unwrap();
        let mut dst = UnixStream::connect(&target).unwrap();
        let (mut src_r, mut dst_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut seen = 0u64;
            loop {
                let n = match src_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if (seen..seen + n as u64).contains(&at) {
                    buf[(at - seen) as usize] ^= 0x01;
                    done.store(true, Ordering::SeqCst);
                }
                seen += n as u64;
                if dst_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = dst_w.shutdown(std::net::Shutdown::Both);
        });
        let _ = std::io::copy(&mut dst, &mut src);
        let _ = src.shutdown(std::net::Shutdown::Both);
    });
    flipped
}

#[test]
fn a_tampered_frame_fails_the_migration_with_the_vm_on_the_source_only() {
    let mut p = pair("auth-tamper", &[], &[], "128M");
    p.source.soak_lines(CPUS, 1);
    let real = p.tmp.file("mig.sock");
    let addr = format!("unix:{}", real.display());
    assert_code(
        &ctl(
            &p.dst_api,
            &["migrate", "receive", "--listen", &addr, "--token", TOKEN],
        ),
        0,
    );
    // One bit, 300 KiB into the stream: inside the first round's pages, long after the
    // handshake.
    let proxy = p.tmp.file("proxy.sock");
    let flipped = tampering_proxy(&proxy, &real, 300 << 10);
    let o = send(&p, &format!("unix:{}", proxy.display()), TOKEN, &[]);
    assert_code(&o, 1);
    assert!(flipped.load(Ordering::SeqCst));
    // Both sides say what happened: the target found a frame that fails authentication.
    assert!(
        stdout(&o).contains("failed authentication"),
        "{}",
        stdout(&o)
    );
    wait_phase(&p.dst_api, "failed");
    let s = status_json(&p.dst_api);
    assert!(s.contains("failed authentication"), "{s}");
    let o = ctl(&p.dst_api, &["--json", "info"]);
    assert!(stdout(&o).contains("\"empty\""), "{}", stdout(&o));
    source_runs_on(&mut p);

    // The same target, asked again, receives the VM over a clean connection.
    let before = latest_iters(&mut p.source);
    assert_code(
        &ctl(
            &p.dst_api,
            &["migrate", "receive", "--listen", &addr, "--token", TOKEN],
        ),
        0,
    );
    let o = send(&p, &addr, TOKEN, &[]);
    assert_code(&o, 0);
    handed_over(&mut p, &before);
}

/// The `soak disk step=N ok` lines' last step after `n` of them (a panic on a mismatch: the
/// guest checks each sector against what it wrote a round before).
fn disk_steps(c: &mut common::soak::Console, n: usize) -> u64 {
    let (mut last, mut seen) = (0, 0);
    while seen < n {
        let line = c.line(std::time::Duration::from_secs(60));
        assert!(
            !line.contains("MISMATCH") && !line.starts_with("FAIL"),
            "{}",
            c.seen
        );
        if let Some(rest) = line.strip_prefix("soak disk step=") {
            last = rest.strip_suffix(" ok").unwrap().parse().unwrap();
            seen += 1;
        }
    }
    last
}

/// The files process `pid` has open.
fn open_files(pid: u32) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect()
}

#[test]
fn the_target_opens_the_disk_its_own_request_names() {
    let tmp = TempDir::new("auth-disk");
    let src_disk = tmp.file("src.raw");
    std::fs::write(&src_disk, vec![0u8; 16 << 20]).unwrap();
    // The same image under another name on the "target host" (shared storage mounted
    // elsewhere): the guest's writes before the switch are there.
    let dst_disk = tmp.file("dst-view.raw");
    std::fs::hard_link(&src_disk, &dst_disk).unwrap();
    let disk_arg = format!("path={}", src_disk.display());
    let mut p = pair_in(
        tmp,
        &[],
        &[],
        "128M",
        "action=soak soakms=20 soakdisk=on virtio=blk",
        None,
        &["--disk", &disk_arg],
    );
    disk_steps(&mut p.source, 3);
    let addr = format!("unix:{}", p.tmp.file("mig.sock").display());

    // A receive that names no disk, or two, for a VM with one: refused once the source says
    // what it has, before any memory is sent; the source runs on.
    for disks in [
        &[][..],
        &["--disk", "/nonexistent/a.raw", "--disk", "/b.raw"],
    ] {
        let mut args = vec!["migrate", "receive", "--listen", &addr, "--token", TOKEN];
        args.extend_from_slice(disks);
        assert_code(&ctl(&p.dst_api, &args), 0);
        let o = send(&p, &addr, TOKEN, &[]);
        assert_code(&o, 1);
        let named = format!("names {}", disks.len() / 2);
        assert!(
            stdout(&o).contains("the source has 1 disks") && stdout(&o).contains(&named),
            "{}",
            stdout(&o)
        );
        wait_phase(&p.dst_api, "failed");
        let s = status_json(&p.dst_api);
        assert!(s.contains("\"transferred_bytes\": 0"), "{s}");
        disk_steps(&mut p.source, 2);
    }

    // The target's own path: the VM moves and its disk checks go on against the same
    // content; the target has its path open, never the source's.
    let dst = dst_disk.display().to_string();
    let disk = format!("{dst},cache=writeback");
    assert_code(
        &ctl(
            &p.dst_api,
            &[
                "migrate", "receive", "--listen", &addr, "--token", TOKEN, "--disk", &disk,
            ],
        ),
        0,
    );
    let before = disk_steps(&mut p.source, 1);
    let o = send(&p, &addr, TOKEN, &[]);
    assert_code(&o, 0);
    assert_eq!(p.source.child.wait().unwrap().code(), Some(0));
    assert!(disk_steps(&mut p.target, 3) > before);
    let files = open_files(p.target.child.id());
    assert!(files.contains(&dst_disk), "{files:?}");
    assert!(!files.contains(&src_disk), "{files:?}");
    assert_eq!(p.target.stop(), Some(143));
}

/// Whether another process could take `path`'s write lock now (taken and let go at once).
fn lockable(path: &Path) -> bool {
    block::lock::ImageLock::acquire(path, block::lock::LockMode::Write).is_ok()
}

#[test]
fn the_disk_locks_change_hands_at_the_switch_and_come_back_if_it_fails() {
    let (mut p, disk, release) = held_pair_with_disk("auth-locks", "stop-and-copy");
    disk_steps(&mut p.source, 2);
    // A running VM holds its disk.
    assert!(!lockable(&disk));
    let addr = format!("unix:{}", p.tmp.file("mig.sock").display());
    let disk_path = disk.display().to_string();
    let receive = [
        "migrate", "receive", "--listen", &addr, "--token", TOKEN, "--disk", &disk_path,
    ];

    // The source lets the disk go once its devices stopped (held there by the test hook); a
    // third process takes it meanwhile, so the target cannot: the migration fails, and once
    // the squatter goes the source has its disk back and runs on.
    assert_code(&ctl(&p.dst_api, &receive), 0);
    let send = [
        "migrate",
        "send",
        "--to",
        &addr,
        "--token",
        TOKEN,
        "--no-wait",
    ];
    assert_code(&ctl(&p.src_api, &send), 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let squatter = loop {
        match block::lock::ImageLock::acquire(&disk, block::lock::LockMode::Write) {
            Ok(l) => break l,
            Err(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the source never let the disk go"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    };
    std::fs::write(release.join("stop-and-copy"), b"").unwrap();
    wait_phase(&p.dst_api, "failed");
    let s = status_json(&p.dst_api);
    assert!(s.contains("in use by another process"), "{s}");
    drop(squatter);
    wait_phase(&p.src_api, "failed");
    disk_steps(&mut p.source, 2);
    assert!(
        !lockable(&disk),
        "the source runs on without its disk's lock"
    );

    // A migration that commits leaves the disk with the target, which goes on with it.
    assert_code(&ctl(&p.dst_api, &receive), 0);
    let o = ctl(&p.src_api, &send[..send.len() - 1]);
    assert_code(&o, 0);
    assert_eq!(p.source.child.wait().unwrap().code(), Some(0));
    disk_steps(&mut p.target, 2);
    assert!(!lockable(&disk), "the target runs without its disk's lock");
    assert_eq!(p.target.stop(), Some(143));
    assert!(lockable(&disk));
}
