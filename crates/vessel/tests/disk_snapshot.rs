//! Disk snapshots taken with VM snapshots (`vessel ctl snapshot --disk-snapshot`) on the direct
//! host: the bundled guest soaks with `soakdisk=on`, writing a ring of sectors of its disk and
//! checking each against what it wrote one round before (the round counter is in guest
//! memory). A restored guest therefore fails at once unless its disk holds exactly the content
//! of the snapshot's instant — not what the original VM wrote after it, nor what another clone
//! writes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::soak::Console;
use common::*;

/// A `soak disk step=N ok` line's step, or a panic on a mismatch or a failure.
fn disk_steps(c: &mut Console, n: usize) -> u64 {
    let mut last = 0;
    let mut seen = 0;
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

fn soak_disk_vm(socket: &Path, disk: &Path) -> Console {
    Console::spawn(&[
        "run",
        "--memory",
        "128M",
        "--api-socket",
        socket.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
        "--cmdline",
        "action=soak soakms=20 soakdisk=on virtio=blk",
    ])
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img")
}

fn overlays_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("disk-0.") && n.ends_with(".qcow2")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn disk_snapshot_freezes_a_raw_disk_and_clones_restore_its_content() {
    disk_snapshot_and_clones("raw");
}

#[test]
fn disk_snapshot_freezes_a_qcow2_disk_and_clones_restore_its_content() {
    disk_snapshot_and_clones("qcow2");
}

fn disk_snapshot_and_clones(format: &str) {
    let tmp = TempDir::new(&format!("disk-snapshot-{format}"));
    let name = format!("disk.{format}");
    let disk = tmp.file(&name);
    if format == "raw" {
        raw_disk(&disk, 4 << 20);
    } else {
        let o = qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "4M"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let socket = tmp.file("api.sock");
    let dir = tmp.file("snap");
    let mut vm = soak_disk_vm(&socket, &disk);
    // More than one round of the ring (8 sectors): every step checks the disk.
    disk_steps(&mut vm, 12);
    let o = ctl(
        &socket,
        &[
            "snapshot",
            "--dir",
            dir.to_str().unwrap(),
            "--disk-snapshot",
        ],
    );
    assert_code(&o, 0);
    // The VM goes on, on a new overlay next to its image; the image stays as it was.
    let overlay = tmp.file(&format!("{name}.snap.qcow2"));
    assert!(overlay.exists());
    let frozen = std::fs::read(&disk).unwrap();
    // The info names the engine serving the overlay (a qcow2 file: the thread pool), not the
    // one the raw image had at boot.
    let o = ctl(&socket, &["info"]);
    assert!(
        stdout(&o).contains("(engine threads, cache writeback)"),
        "{}",
        stdout(&o)
    );
    let step = disk_steps(&mut vm, 12);
    assert!(step >= 24, "{step}");
    assert!(
        std::fs::read(&disk).unwrap() == frozen,
        "the frozen image changed"
    );
    // A disk snapshot whose new overlay exists already is refused before anything changes.
    std::fs::write(tmp.file(&format!("{name}.snap.qcow2.snap2.qcow2")), b"").unwrap();
    let o = ctl(
        &socket,
        &[
            "snapshot",
            "--dir",
            tmp.file("snap2").to_str().unwrap(),
            "--disk-snapshot",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("exists already"), "{}", stderr(&o));
    disk_steps(&mut vm, 2);

    // Two clones at once, while the original runs on: each on its own overlay of the frozen
    // image, each finding the disk as it was at the snapshot (or the soak fails).
    let mut clones: Vec<Console> = (0..2)
        .map(|_| Console::spawn(&["run", "--restore", dir.to_str().unwrap()]))
        .collect();
    for c in &mut clones {
        disk_steps(c, 12);
    }
    disk_steps(&mut vm, 2);
    let made = overlays_in(&dir);
    assert_eq!(made.len(), 2, "{made:?}");
    for mut c in clones {
        assert_eq!(c.stop(), Some(143));
    }
    assert_eq!(vm.stop(), Some(143));
    assert!(
        std::fs::read(&disk).unwrap() == frozen,
        "the frozen image changed"
    );

    // qemu-img agrees with the chains.
    for o in made.iter().chain([&overlay]) {
        let out = qemu_img(&["check", o.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}{}",
            o.display(),
            stdout(&out),
            stderr(&out)
        );
        let out = qemu_img(&["info", "--backing-chain", o.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let info = stdout(&out);
        assert!(
            info.contains(&format!("{name}\n")) && info.contains(&format!("file format: {format}")),
            "{info}"
        );
    }

    // A frozen image that changed is refused.
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(10))
        .unwrap();
    drop(f);
    let o = vessel(&["run", "--restore", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("changed since the snapshot"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        overlays_in(&dir).len(),
        2,
        "a refused restore leaves nothing"
    );
}
