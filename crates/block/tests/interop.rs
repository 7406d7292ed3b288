//! Interoperability with Debian's qemu-img in both directions.

mod common;
use common::*;

const MB: u64 = 1 << 20;

fn make_ref(path: &str, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

#[test]
fn vessel_written_qcow2_passes_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let (img, refr) = (p(d.path(), "a.qcow2"), p(d.path(), "a.raw"));
    vessel(&["create", "-f", "qcow2", &img, "48M"]);
    make_ref(&refr, 48 * MB);
    random_io(path_buf(&img).as_path(), path_buf(&refr).as_path(), 7, 150);
    qemu_img(&["check", &img]);
    vessel(&["check", &img]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &refr, &img]);
    // small clusters and preallocation
    let img2 = p(d.path(), "b.qcow2");
    vessel(&[
        "create",
        "--cluster-size",
        "4096",
        "--preallocation",
        "metadata",
        &img2,
        "8M",
    ]);
    let ref2 = p(d.path(), "b.raw");
    make_ref(&ref2, 8 * MB);
    random_io(path_buf(&img2).as_path(), path_buf(&ref2).as_path(), 9, 60);
    qemu_img(&["check", &img2]);
    qemu_img(&["compare", &ref2, &img2]);
    let raw = p(d.path(), "c.raw");
    vessel(&[
        "create",
        "-f",
        "raw",
        "--preallocation",
        "falloc",
        &raw,
        "4M",
    ]);
    let info = json(&qemu_img(&["info", "--output=json", &raw]));
    assert_eq!(info["virtual-size"], 4 * MB);
}

#[test]
fn overlay_chains_interop() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let base = p(d.path(), "base.raw");
    let mid = p(d.path(), "mid.qcow2");
    let top = p(d.path(), "top.qcow2");
    let refr = p(d.path(), "ref.raw");
    vessel(&["create", "-f", "raw", &base, "32M"]);
    make_ref(&refr, 32 * MB);
    random_io(path_buf(&base).as_path(), path_buf(&refr).as_path(), 1, 40);
    vessel(&["clone", "--from", &base, &mid]);
    random_io(path_buf(&mid).as_path(), path_buf(&refr).as_path(), 2, 40);
    vessel(&["create", "-b", "mid.qcow2", "-F", "qcow2", &top]);
    random_io(path_buf(&top).as_path(), path_buf(&refr).as_path(), 3, 40);
    for img in [&mid, &top] {
        qemu_img(&["check", img]);
    }
    qemu_img(&["compare", &refr, &top]);
    // qemu sees the same chain and sizes
    let q = json(&qemu_img(&[
        "info",
        "--output=json",
        "--backing-chain",
        &top,
    ]));
    let v = json(&vessel(&["info", "--json", "--backing-chain", &top]));
    let (q, v) = (q.as_array().unwrap(), v.as_array().unwrap());
    assert_eq!(q.len(), 3);
    assert_eq!(v.len(), 3);
    for (a, b) in q.iter().zip(v) {
        for key in [
            "filename",
            "format",
            "virtual-size",
            "actual-size",
            "cluster-size",
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
            "dirty-flag",
        ] {
            assert_eq!(a.get(key), b.get(key), "key {key}");
        }
    }
    // flatten the chain: convert to qcow2 and to raw
    let flat = p(d.path(), "flat.qcow2");
    vessel(&["convert", "-O", "qcow2", &top, &flat]);
    qemu_img(&["check", &flat]);
    qemu_img(&["compare", &refr, &flat]);
    let flat_raw = p(d.path(), "flat.raw");
    vessel(&["convert", "-O", "raw", &flat, &flat_raw]);
    assert!(std::fs::read(&flat_raw).unwrap() == std::fs::read(&refr).unwrap());
}

#[test]
fn qemu_created_images_read_back_identically() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let base = p(d.path(), "base.qcow2");
    let top = p(d.path(), "top.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "compat=0.10", &base, "16M"]);
    qemu_io(
        &base,
        &[
            "write -P 0x5a 0 3M",
            "write -P 0x33 5M 100k",
            "write -z 1M 64k",
        ],
    );
    qemu_img(&["snapshot", "-c", "snap1", &base]);
    qemu_io(&base, &["write -P 0x77 0 64k"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    qemu_io(
        &top,
        &["write -P 0x99 2M 1M", "write -z 5M 64k", "discard 0 64k"],
    );
    let exported = p(d.path(), "exp.raw");
    qemu_img(&["convert", "-O", "raw", &top, &exported]);
    assert!(read_all(path_buf(&top).as_path()) == std::fs::read(&exported).unwrap());
    // v2 base alone, and its snapshot is visible
    let snaps = json(&vessel(&["snapshot", "list", "--json", &base]));
    assert_eq!(snaps[0]["name"], "snap1");
    // compressed clusters
    let comp = p(d.path(), "comp.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", &exported, &comp]);
    assert!(read_all(path_buf(&comp).as_path()) == std::fs::read(&exported).unwrap());
    vessel(&["check", &comp]);
    let info = json(&vessel(&["info", "--json", &comp]));
    let qinfo = json(&qemu_img(&["info", "--output=json", &comp]));
    assert_eq!(info["virtual-size"], qinfo["virtual-size"]);
    assert_eq!(info["actual-size"], qinfo["actual-size"]);
    // writing into a compressed image through vessel keeps it consistent
    let ref2 = p(d.path(), "ref2.raw");
    std::fs::copy(&exported, &ref2).unwrap();
    random_io(path_buf(&comp).as_path(), path_buf(&ref2).as_path(), 11, 30);
    qemu_img(&["check", &comp]);
    qemu_img(&["compare", &ref2, &comp]);
}

#[test]
fn internal_snapshots_both_ways() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let img = p(d.path(), "s.qcow2");
    vessel(&["create", &img, "16M"]);
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    vessel(&["snapshot", "create", &img, "one"]);
    qemu_img(&["check", &img]);
    qemu_io(&img, &["write -P 0x22 0 512k"]);
    qemu_img(&["snapshot", "-c", "two", &img]);
    qemu_io(&img, &["write -P 0x33 0 64k"]);
    vessel(&["check", &img]);
    let list = qemu_img(&["snapshot", "-l", &img]);
    assert!(list.contains("one") && list.contains("two"), "{list}");
    let info = json(&vessel(&["info", "--json", &img]));
    let qinfo = json(&qemu_img(&["info", "--output=json", &img]));
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].to_string())
            .collect()
    };
    assert_eq!(names(&info), names(&qinfo));
    // vessel applies qemu's snapshot, qemu applies vessel's
    vessel(&["snapshot", "apply", &img, "two"]);
    qemu_img(&["check", &img]);
    qemu_io(&img, &["read -P 0x22 0 512k", "read -P 0x11 512k 512k"]);
    qemu_img(&["snapshot", "-a", "one", &img]);
    let data = read_all(path_buf(&img).as_path());
    assert!(data[..1 << 20].iter().all(|&b| b == 0x11));
    // write through vessel after snapshots (COW of shared clusters)
    let refr = p(d.path(), "r.raw");
    std::fs::write(&refr, &data).unwrap();
    random_io(path_buf(&img).as_path(), path_buf(&refr).as_path(), 5, 40);
    qemu_img(&["check", &img]);
    qemu_img(&["compare", &refr, &img]);
    vessel(&["snapshot", "delete", &img, "one"]);
    qemu_img(&["check", &img]);
    qemu_img(&["snapshot", "-d", "two", &img]);
    vessel(&["check", &img]);
    qemu_img(&["compare", &refr, &img]);
}

#[test]
fn commit_rebase_resize() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let base = p(d.path(), "base.qcow2");
    let ov = p(d.path(), "ov.qcow2");
    let refr = p(d.path(), "ref.raw");
    vessel(&["create", &base, "16M"]);
    make_ref(&refr, 16 * MB);
    random_io(path_buf(&base).as_path(), path_buf(&refr).as_path(), 21, 30);
    vessel(&["clone", "--from", &base, &ov]);
    random_io(path_buf(&ov).as_path(), path_buf(&refr).as_path(), 22, 30);
    vessel(&["commit", &ov]);
    qemu_img(&["check", &base]);
    qemu_img(&["check", &ov]);
    qemu_img(&["compare", &refr, &base]);
    qemu_img(&["compare", &refr, &ov]);
    // the overlay is empty again
    let map = qemu_img(&["map", "--output=json", &ov]);
    assert!(!map.contains("\"depth\": 0, \"present\": true"), "{map}");

    // safe rebase onto a different base keeps the visible content
    let other = p(d.path(), "other.qcow2");
    vessel(&["create", &other, "16M"]);
    qemu_io(&other, &["write -P 0x44 0 4M"]);
    random_io(path_buf(&ov).as_path(), path_buf(&refr).as_path(), 23, 10);
    vessel(&["rebase", "-b", "other.qcow2", &ov]);
    qemu_img(&["check", &ov]);
    qemu_img(&["compare", &refr, &ov]);
    let info = json(&qemu_img(&["info", "--output=json", &ov]));
    assert_eq!(info["backing-filename"], "other.qcow2");
    // unsafe rebase only rewrites the header
    std::fs::rename(&other, p(d.path(), "moved.qcow2")).unwrap();
    vessel(&["rebase", "-u", "-b", "moved.qcow2", &ov]);
    qemu_img(&["compare", &refr, &ov]);

    vessel(&["resize", &ov, "+8M"]);
    qemu_img(&["check", &ov]);
    let info = json(&qemu_img(&["info", "--output=json", &ov]));
    assert_eq!(info["virtual-size"], 24 * MB);
    let data = read_all(path_buf(&ov).as_path());
    assert!(data[16 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn check_finds_and_repairs_leaks() {
    if !have_qemu() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let d = tmp();
    let img = p(d.path(), "leak.qcow2");
    vessel(&["create", &img, "8M"]);
    qemu_io(&img, &["write -P 1 0 1M"]);
    // Drop the first L2 entry: its data cluster becomes a leak.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&[0u8; 8], l2).unwrap();
    drop(f);
    run_ok("qemu-img", &["check", &img], 3);
    let out = run_ok(VESSEL, &["check", "--json", &img], 3);
    assert_eq!(json(&out)["leaks"], 1);
    vessel(&["check", "--repair", &img]);
    qemu_img(&["check", &img]);
}

#[test]
fn locking_refuses_second_writer() {
    let d = tmp();
    let img = p(d.path(), "l.qcow2");
    vessel(&["create", &img, "8M"]);
    let disk = block::open(&img, block::OpenOptions::default()).unwrap();
    let e = block::open(&img, block::OpenOptions::default())
        .err()
        .expect("second open must fail");
    assert!(e.to_string().contains("in use"), "{e}");
    let o = run(VESSEL, &["snapshot", "create", &img, "x"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("vessel: error:") && err.contains("lock"),
        "{err}"
    );
    if have_qemu() {
        let o = run("qemu-img", &["info", &img]);
        assert!(!o.status.success(), "qemu-img must see the lock");
    }
    // the base of a running overlay cannot be written
    drop(disk);
    let ov = p(d.path(), "ov.qcow2");
    vessel(&["clone", "--from", &img, &ov]);
    let _running = block::open(&ov, block::OpenOptions::default()).unwrap();
    let e = block::open(&img, block::OpenOptions::default())
        .err()
        .expect("base is locked");
    assert!(e.to_string().contains("in use"), "{e}");
    // read-only sharing of the base is fine
    let ro = block::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    block::open(&img, ro).unwrap();
}

#[test]
fn dirty_lazy_refcount_image_is_repaired_on_open() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let img = p(d.path(), "lazy.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        &img,
        "8M",
    ]);
    // qemu-io aborts after the write: refcounts were never updated, dirty bit stays set.
    let _ = run(
        "qemu-io",
        &["-c", "write -P 0x42 0 128k", "-c", "abort", &img],
    );
    let info = json(&vessel(&["info", "--json", &img]));
    assert_eq!(info["dirty-flag"], true);
    run_ok(VESSEL, &["check", &img], 2);
    // read-only open of a dirty image is refused with a clear message
    let ro = block::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let e = block::open(&img, ro).err().expect("dirty").to_string();
    assert!(e.contains("dirty"), "{e}");
    // writable open repairs (as QEMU does) and the data is there
    let disk = block::open(&img, block::OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    drop(disk);
    qemu_img(&["check", &img]);
    let info = json(&qemu_img(&["info", "--output=json", &img]));
    assert_eq!(info["dirty-flag"], false);
}
