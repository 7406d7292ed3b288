//! Disks never lost: image commands refuse an image a running VM uses (its write lock, as
//! `qemu-img` takes it), and a qcow2 image whose metadata overlaps is refused read-write
//! (and marked corrupt, as QEMU marks it) instead of letting guest writes overwrite its
//! refcount table; it still boots read-only.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (package qemu-utils) must be installed")
}

fn qemu_io(img: &Path, cmd: &str) {
    let o = Command::new("qemu-io")
        .args(["-c", cmd, img.to_str().unwrap()])
        .output()
        .expect("qemu-io");
    assert!(o.status.success(), "qemu-io {cmd}: {}", stderr(&o));
}

/// A checksum of the whole file (FNV-1a; the tests compare, they do not defend).
fn checksum(path: &Path) -> u64 {
    std::fs::read(path)
        .unwrap()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// A VM holding `disk` (the guest tests it once, then halts); returns when the guest has
/// used the disk.
struct HeldVm {
    child: Child,
}

impl HeldVm {
    fn start(dir: &TempDir, disk: &Path) -> HeldVm {
        let log = dir.file("console.log");
        let child = Command::new(VESSEL)
            .args([
                "run",
                "--disk",
                &format!("path={}", disk.display()),
                "--console",
                &format!("file:{}", log.display()),
                "--cmdline",
                "action=hold virtio=blk",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut vm = HeldVm { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // The guest's whole block-test line.
            if let Some(at) = text.find("virtio-blk") {
                if text[at..].contains('\n') {
                    assert!(text.contains("write/read/flush ok"), "{text}");
                    break;
                }
            }
            if let Some(s) = vm.child.try_wait().unwrap() {
                panic!("the VM ended ({s}) before it used its disk:\n{text}");
            }
            assert!(Instant::now() < deadline, "the VM never used its disk");
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }
}

impl Drop for HeldVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image(args: &[&str]) -> Output {
    let mut all = vec!["image"];
    all.extend_from_slice(args);
    vessel(&all)
}

#[test]
fn image_commands_refuse_a_running_vms_disk() {
    let dir = TempDir::new("in-use");
    let disk = dir.file("d.qcow2");
    let d = disk.to_str().unwrap();
    let o = qemu_img(&["create", "-q", "-f", "qcow2", d, "16M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let template = dir.file("t.qcow2");
    let t = template.to_str().unwrap();
    assert_code(&image(&["create", t, "16M"]), 0);

    let vm = HeldVm::start(&dir, &disk);
    let before = checksum(&disk);

    // Without --force an existing file is never replaced.
    let o = image(&["create", d, "64M"]);
    assert_ne!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("use --force"), "{}", stderr(&o));
    // With --force, the write lock decides: the running VM holds it.
    let lock_msg = "the image is in use by another process";
    for args in [
        vec!["create", "--force", d, "64M"],
        vec!["create", "--force", "-f", "raw", d, "64M"],
        vec!["clone", "--force", "--from", t, d],
        vec!["convert", "-O", "qcow2", t, d],
        vec!["snapshot", "create", d, "s1"],
        vec!["resize", d, "32M"],
        vec!["rebase", "-u", "-b", "", d],
        vec!["check", "-r", d],
        // Readers that need a consistent image take the shared lock, as qemu-img does.
        vec!["info", d],
        vec!["check", d],
    ] {
        let o = image(&args);
        assert_ne!(o.status.code(), Some(0), "image {args:?} ran");
        assert!(stderr(&o).contains(lock_msg), "{args:?}: {}", stderr(&o));
    }
    // `info -U` (force share) reads it.
    assert_code(&image(&["info", "-U", d]), 0);
    // qemu-img is refused too (the locks are QEMU's).
    let o = qemu_img(&["create", "-f", "qcow2", d, "64M"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("lock"), "{}", stderr(&o));
    assert_eq!(checksum(&disk), before, "the disk changed under the VM");
    drop(vm);

    // Once the VM is gone the image is intact, and --force replaces it.
    let o = qemu_img(&["check", d]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert_eq!(checksum(&disk), before);
    assert_code(&image(&["create", "--force", d, "64M"]), 0);
    let o = qemu_img(&["info", d]);
    assert!(
        stdout(&o).contains("virtual size: 64 MiB"),
        "{}",
        stdout(&o)
    );
}

/// The qcow2 header fields at `off`, big-endian.
fn be64(data: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(data[off..off + 8].try_into().unwrap())
}

/// qemu-img check's number of errors ("N errors were found"; 0 if none).
fn qemu_errors(img: &str) -> u64 {
    let o = qemu_img(&["check", img]);
    let out = stdout(&o);
    out.lines()
        .find_map(|l| l.strip_suffix(" errors were found on the image."))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[test]
fn a_disk_whose_l1_table_points_at_the_refcount_table_is_refused_read_write() {
    let dir = TempDir::new("overlap");
    let disk = dir.file("d.qcow2");
    let d = disk.to_str().unwrap();
    let o = qemu_img(&["create", "-q", "-f", "qcow2", d, "16M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    qemu_io(&disk, "write -P 0x5a 0 128k");
    // L1 entry 0 (COPIED) now points at the refcount table: its L2 table.
    let data = std::fs::read(&disk).unwrap();
    let l1 = be64(&data, 40);
    let reftable = be64(&data, 48);
    let mut bad = data.clone();
    bad[l1 as usize..l1 as usize + 8].copy_from_slice(&((1u64 << 63) | reftable).to_be_bytes());
    std::fs::write(&disk, &bad).unwrap();
    let errors_before = qemu_errors(d);
    assert!(errors_before > 0);

    // Read-write: refused before the guest runs, with QEMU's words.
    let o = vessel(&[
        "run",
        "--disk",
        &format!("path={d}"),
        "--cmdline",
        "action=exit:0 virtio=blk",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("Image is corrupt; cannot be opened read/write")
            && err.contains("refcount table")
            && err.contains(d),
        "{err}"
    );
    // Marked corrupt, as QEMU marks it; nothing else changed.
    let o = qemu_img(&["info", d]);
    assert!(stdout(&o).contains("corrupt: true"), "{}", stdout(&o));
    let after = std::fs::read(&disk).unwrap();
    let mut expect = bad.clone();
    expect[79] |= 2;
    assert!(after == expect, "only the corrupt bit may change");
    assert!(qemu_errors(d) <= errors_before);
    // A second try is refused on the corrupt bit alone.
    let o = vessel(&["run", "--disk", &format!("path={d}")]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("corrupt bit is set"), "{}", stderr(&o));

    // Read-only it still boots: the guest reads the disk.
    let o = vessel(&[
        "run",
        "--disk",
        &format!("path={d},readonly=on"),
        "--cmdline",
        "virtio=blk",
    ]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("read-only, read ok"), "{}", stdout(&o));
    assert!(std::fs::read(&disk).unwrap() == expect, "read-only wrote");
    // And the image commands that only read work on it.
    let o = image(&["info", d]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("corrupt: true"), "{}", stdout(&o));
    let o = image(&["check", d]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stdout(&o).contains("marked corrupt"), "{}", stdout(&o));
}
