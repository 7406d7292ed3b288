//! Malformed images must give clear errors (file name + offset), never panics or writes.

mod common;
use common::*;
use std::os::unix::fs::FileExt;

/// Create a valid 8 MiB qcow2 image with some data and return its path.
fn valid(d: &std::path::Path, name: &str) -> String {
    let img = p(d, name);
    vessel(&["create", &img, "8M"]);
    let disk = block::open(&img, block::OpenOptions::default()).unwrap();
    disk.write_at(&[0xaa; 65536], 0).unwrap();
    disk.flush().unwrap();
    img
}

fn poke(img: &str, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Opening (library, `info` and `check`) fails with a message containing all `needles`.
fn expect_error(img: &str, needles: &[&str]) {
    let ro = block::OpenOptions {
        read_only: true,
        format: Some(block::Format::Qcow2),
        ..Default::default()
    };
    let before = std::fs::read(img).unwrap();
    let e = block::open(img, ro)
        .err()
        .expect("open must fail")
        .to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} lacks {n:?}");
    }
    assert!(e.contains(img), "error {e:?} must name the file");
    for args in [
        vec!["info", img],
        vec!["check", img],
        vec!["snapshot", "list", img],
    ] {
        let o = run(VESSEL, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("vessel: error:") && !err.contains("panick"),
            "{err}"
        );
    }
    assert!(
        std::fs::read(img).unwrap() == before,
        "a failed open must not write"
    );
}

#[test]
fn truncated_header() {
    let d = tmp();
    let img = valid(d.path(), "t.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(40)
        .unwrap();
    expect_error(&img, &["too short"]);
}

#[test]
fn bad_magic() {
    let d = tmp();
    let img = valid(d.path(), "m.qcow2");
    poke(&img, 0, b"XXXX");
    let ro = block::OpenOptions {
        read_only: true,
        format: Some(block::Format::Qcow2),
        ..Default::default()
    };
    let e = block::open(&img, ro).err().expect("must fail").to_string();
    assert!(
        e.contains("bad magic") && e.contains("offset 0x0") && e.contains(&img),
        "{e}"
    );
    // Without an explicit format it is probed as raw, like qemu-img does.
    let info = json(&vessel(&["info", "--json", &img]));
    assert_eq!(info["format"], "raw");
    // Probed as raw: a format without checks (63, as qemu-img check says).
    let o = run(VESSEL, &["check", &img]);
    assert_eq!(o.status.code(), Some(63));
    if have_qemu() {
        assert_eq!(run("qemu-img", &["check", &img]).status.code(), Some(63));
    }
}

#[test]
fn l1_table_past_eof() {
    let d = tmp();
    let img = valid(d.path(), "l1.qcow2");
    poke(&img, 40, &(1u64 << 40).to_be_bytes());
    expect_error(&img, &["L1 table", "past end of file", "offset 0x28"]);
}

#[test]
fn refcount_table_overlaps_header() {
    let d = tmp();
    let img = valid(d.path(), "rt.qcow2");
    poke(&img, 48, &0u64.to_be_bytes());
    expect_error(
        &img,
        &["refcount table", "overlaps the header", "offset 0x30"],
    );
}

#[test]
fn huge_size() {
    let d = tmp();
    let img = valid(d.path(), "h.qcow2");
    poke(&img, 24, &(u64::MAX - 5).to_be_bytes());
    expect_error(&img, &["virtual size", "offset 0x18"]);
}

#[test]
fn l2_offset_past_eof() {
    let d = tmp();
    let img = valid(d.path(), "l2.qcow2");
    let f = std::fs::File::open(&img).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    poke(&img, l1, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    let o = run(VESSEL, &["check", &img]);
    let err = String::from_utf8_lossy(&o.stderr);
    // A corruption the check finds (2, as qemu-img check says), not a check that failed (1).
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("L2 table at 0x10000000000") && err.contains(&format!("{l1:#x}")),
        "{err}"
    );
    if have_qemu() {
        assert_eq!(run("qemu-img", &["check", &img]).status.code(), Some(2));
    }
    // Refused read-write (and marked corrupt), still readable read-only.
    let e = block::open(&img, block::OpenOptions::default())
        .err()
        .expect("a read-write open must fail")
        .to_string();
    assert!(e.contains("Image is corrupt"), "{e}");
    let ro = block::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let disk = block::open(&img, ro).expect("read-only open");
    let mut buf = [0u8; 512];
    disk.read_at(&mut buf, 1 << 20).unwrap();
}

#[test]
fn backing_loop_and_missing_backing() {
    let d = tmp();
    let a = p(d.path(), "a.qcow2");
    let b = p(d.path(), "b.qcow2");
    vessel(&["create", &a, "8M"]);
    vessel(&["create", "-b", "a.qcow2", "-F", "qcow2", &b]);
    // rebase refuses to create a loop ...
    let o = run(
        VESSEL,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", &a],
    );
    assert_eq!(o.status.code(), Some(1));
    // ... so write the looping header directly.
    let mut m = block::qcow2::meta::Qcow2Meta::open(std::path::Path::new(&a), true).unwrap();
    m.header.backing_file = Some("b.qcow2".into());
    m.header.backing_format = Some("qcow2".into());
    m.rewrite_header().unwrap();
    drop(m);
    let e = block::open(&b, block::OpenOptions::default())
        .err()
        .expect("loop")
        .to_string();
    assert!(e.contains("loops"), "{e}");
    let o = run(VESSEL, &["info", "--backing-chain", &b]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("loops"));
    // creating an image on a loop is refused too
    let o = run(
        VESSEL,
        &["create", "-b", "b.qcow2", &p(d.path(), "c.qcow2")],
    );
    assert_eq!(o.status.code(), Some(1));

    std::fs::remove_file(&a).unwrap();
    let e = block::open(&b, block::OpenOptions::default())
        .err()
        .expect("missing")
        .to_string();
    assert!(
        e.contains("cannot open backing file") && e.contains("a.qcow2"),
        "{e}"
    );
}

#[test]
fn random_garbage_never_panics() {
    let d = tmp();
    let img = valid(d.path(), "g.qcow2");
    let good = std::fs::read(&img).unwrap();
    let mut rng = Rng(0x1234_5678);
    for _ in 0..300 {
        let mut bad = good.clone();
        for _ in 0..(rng.next() % 8 + 1) {
            let pos = (rng.next() % 512) as usize;
            bad[pos] = rng.next() as u8;
        }
        std::fs::write(&img, &bad).unwrap();
        let ro = block::OpenOptions {
            read_only: true,
            format: Some(block::Format::Qcow2),
            ..Default::default()
        };
        if let Ok(disk) = block::open(&img, ro) {
            let mut buf = vec![0u8; 65536];
            let _ = disk.read_at(&mut buf, 0);
        }
        let _ = block::ops::check(std::path::Path::new(&img), false);
    }
}
