//! Disks never lost: `check` exit codes against `qemu-img check` on the same damaged images,
//! the overlap guard of read-write opens and image operations, and image operations refusing
//! an image that another process holds (as a running VM does).

mod common;
use block::lock::{ImageLock, LockMode};
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn be64_at(img: &str, off: u64) -> u64 {
    let f = std::fs::File::open(img).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn poke(img: &str, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// A 16 MiB qcow2 image made by qemu-img (by vessel without it), with 128 KiB of data at 0
/// and 64 KiB at 8 MiB.
fn image_with_data(d: &Path, name: &str, qemu: bool) -> String {
    let img = p(d, name);
    if qemu {
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "16M"]);
        qemu_io(&img, &["write -P 0xaa 0 128k", "write -P 0xbb 8M 64k"]);
    } else {
        vessel(&["create", &img, "16M"]);
        let disk = block::open(&img, block::OpenOptions::default()).unwrap();
        disk.write_at(&[0xaa; 128 << 10], 0).unwrap();
        disk.write_at(&[0xbb; 64 << 10], 8 << 20).unwrap();
        disk.flush().unwrap();
    }
    img
}

/// How to damage a fresh image.
type Damage = fn(&str);

/// The damaged images: (name, damage).
fn damages() -> Vec<(&'static str, Damage)> {
    vec![
        ("clean", |_| {}),
        ("l2-past-eof", |img| {
            let l1 = be64_at(img, 40);
            poke(img, l1, &((1u64 << 63) | (1 << 40)).to_be_bytes());
        }),
        ("l1-at-refcount-table", |img| {
            let l1 = be64_at(img, 40);
            let rt = be64_at(img, 48);
            poke(img, l1, &((1u64 << 63) | rt).to_be_bytes());
        }),
        ("leak", |img| {
            // One more cluster at the end with refcount 1 that nothing references.
            let c = std::fs::metadata(img).unwrap().len().div_ceil(65536);
            let rb = be64_at(img, be64_at(img, 48));
            poke(img, rb + c * 2, &1u16.to_be_bytes());
            poke(img, (c + 1) * 65536 - 1, &[0]);
        }),
        ("corrupt-bit-only", |img| {
            let f = be64_at(img, 72);
            poke(img, 72, &(f | 2).to_be_bytes());
        }),
    ]
}

#[test]
fn check_exit_codes_match_qemu_img() {
    let qemu = have_qemu();
    let d = tmp();
    let want = [0, 2, 2, 3, 0];
    for ((name, damage), want) in damages().into_iter().zip(want) {
        let img = image_with_data(d.path(), &format!("{name}.qcow2"), qemu);
        damage(&img);
        let o = run(VESSEL, &["check", &img]);
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(want), "{name}: {out}{err}");
        let o = run(VESSEL, &["check", "--json", &img]);
        assert_eq!(o.status.code(), Some(want), "{name} --json");
        if qemu {
            let q = run("qemu-img", &["check", &img]);
            assert_eq!(q.status.code(), Some(want), "qemu-img check {name}");
        }
        if name == "corrupt-bit-only" {
            assert!(out.contains("marked corrupt"), "{out}");
        }
    }
    // Raw: a format without checks; no file: the check cannot run.
    let raw = p(d.path(), "r.raw");
    vessel(&["create", "-f", "raw", &raw, "1M"]);
    let missing = p(d.path(), "missing.qcow2");
    for (img, want) in [(&raw, 63), (&missing, 1)] {
        assert_eq!(run(VESSEL, &["check", img]).status.code(), Some(want));
        if qemu {
            assert_eq!(run("qemu-img", &["check", img]).status.code(), Some(want));
        }
    }
}

#[test]
fn damaged_images_are_refused_read_write_and_marked_corrupt() {
    let qemu = have_qemu();
    let d = tmp();
    for (name, damage) in damages() {
        if matches!(name, "clean" | "leak") {
            continue;
        }
        let img = image_with_data(d.path(), &format!("{name}.qcow2"), qemu);
        let mut good = vec![0u8; 128 << 10];
        block::open(
            &img,
            block::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap()
        .read_at(&mut good, 0)
        .unwrap();
        damage(&img);
        let errors_before = qemu.then(|| run("qemu-img", &["check", &img]).status.code());
        let bytes = std::fs::read(&img).unwrap();
        let e = block::open(&img, block::OpenOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{name}: opened read-write"))
            .to_string();
        assert!(
            e.contains("Image is corrupt; cannot be opened read/write") && e.contains(&img),
            "{name}: {e}"
        );
        // Only the corrupt bit changed.
        let mut marked = bytes.clone();
        marked[79] |= 2;
        assert!(std::fs::read(&img).unwrap() == marked, "{name}");
        let info = json(&vessel(&["info", "--json", &img]));
        assert_eq!(info["format-specific"]["data"]["corrupt"], true, "{name}");
        if qemu {
            assert!(qemu_img(&["info", &img]).contains("corrupt: true"));
            let after = run("qemu-img", &["check", &img]).status.code();
            assert_eq!(after, errors_before.flatten(), "{name}: qemu-img check");
        }
        // Every writing operation refuses it, and writes nothing.
        for args in [
            vec!["snapshot", "create", &img, "s"],
            vec!["resize", &img, "32M"],
            vec!["rebase", "-u", "-b", "", &img],
            vec!["crash-writer", &img, "--count", "1"],
        ] {
            let o = run(VESSEL, &args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{name} {args:?}: {err}");
            assert!(err.contains("Image is corrupt"), "{name} {args:?}: {err}");
        }
        assert!(std::fs::read(&img).unwrap() == marked, "{name}");
        // Read-only it opens, with the data it had (where the damage left the mapping).
        let ro = block::open(
            &img,
            block::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{name}: read-only open: {e}"));
        let mut buf = vec![0u8; 128 << 10];
        ro.read_at(&mut buf, 8 << 20).unwrap();
        if name == "corrupt-bit-only" {
            ro.read_at(&mut buf, 0).unwrap();
            assert!(buf == good);
        }
        assert!(ro.write_at(&[0; 512], 0).is_err());
        drop(ro);
        // convert copies it out (the output is a new, clean image).
        let out = p(d.path(), &format!("{name}.out.qcow2"));
        vessel(&["convert", "-O", "qcow2", &img, &out]);
        run_ok(VESSEL, &["check", &out], 0);
    }
}

#[test]
fn repair_clears_the_corrupt_bit_only_when_nothing_is_left() {
    let d = tmp();
    let img = image_with_data(d.path(), "c.qcow2", false);
    let f = be64_at(&img, 72);
    poke(&img, 72, &(f | 2).to_be_bytes());
    assert!(block::open(&img, block::OpenOptions::default()).is_err());
    let out = run_ok(VESSEL, &["check", "-r", &img], 0);
    assert!(out.contains("No errors"), "{out}");
    assert_eq!(be64_at(&img, 72) & 2, 0);
    drop(block::open(&img, block::OpenOptions::default()).unwrap());

    // Overlapping metadata: repair refuses to touch it.
    let img = image_with_data(d.path(), "o.qcow2", false);
    let l1 = be64_at(&img, 40);
    let rt = be64_at(&img, 48);
    poke(&img, l1, &((1u64 << 63) | rt).to_be_bytes());
    let before = std::fs::read(&img).unwrap();
    let o = run(VESSEL, &["check", "-r", &img]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be repaired"));
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn writing_operations_refuse_an_image_in_use() {
    let qemu = have_qemu();
    let d = tmp();
    let img = image_with_data(d.path(), "busy.qcow2", false);
    let base = p(d.path(), "base.qcow2");
    vessel(&["create", &base, "16M"]);
    let top = p(d.path(), "top.qcow2");
    vessel(&["clone", "--from", &base, &top]);
    // Without --force an existing file is refused before any lock is looked at.
    let o = run(VESSEL, &["create", &img, "8M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("use --force"));
    let o = run(VESSEL, &["clone", "--from", &base, &img]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("use --force"));

    // A writer holds `img` and `top` (as a VM does); `base` is read by the VM on `top`.
    let before = std::fs::read(&img).unwrap();
    let base_before = std::fs::read(&base).unwrap();
    let _w = ImageLock::acquire(Path::new(&img), LockMode::Write).unwrap();
    let _t = ImageLock::acquire(Path::new(&top), LockMode::Write).unwrap();
    let _b = ImageLock::acquire(Path::new(&base), LockMode::Read).unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["create", "--force", &img, "8M"],
        vec!["create", "--force", "-f", "raw", &img, "8M"],
        vec!["clone", "--force", "--from", &base, &img],
        vec!["convert", "-O", "qcow2", &base, &img],
        vec!["snapshot", "create", &img, "s"],
        vec!["snapshot", "delete", &img, "s"],
        vec!["snapshot", "apply", &img, "s"],
        vec!["resize", &img, "32M"],
        vec!["rebase", "-u", "-b", "", &img],
        vec!["check", "-r", &img],
        vec!["commit", &top],
        // The base of a running overlay is not written either.
        vec!["create", "--force", &base, "8M"],
        vec!["resize", &base, "32M"],
        vec!["snapshot", "create", &base, "s"],
        // Shared readers are refused while a writer runs, as with qemu-img.
        vec!["info", &img],
        vec!["check", &img],
        vec!["snapshot", "list", &img],
    ];
    for args in &cases {
        let o = run(VESSEL, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?} ran: {err}");
        assert!(err.contains("in use by another process"), "{args:?}: {err}");
    }
    // `info -U` reads without the lock.
    run_ok(VESSEL, &["info", "-U", &img], 0);
    if qemu {
        // qemu-img agrees on the locks.
        let o = run("qemu-img", &["create", "-f", "qcow2", &img, "8M"]);
        assert_ne!(o.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&o.stderr).contains("lock"));
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "an image in use changed"
    );
    assert!(std::fs::read(&base).unwrap() == base_before);
    drop((_w, _t, _b));
    run_ok(VESSEL, &["create", "--force", &img, "8M"], 0);
    assert_eq!(
        json(&vessel(&["info", "--json", &img]))["virtual-size"],
        8 << 20
    );
}
