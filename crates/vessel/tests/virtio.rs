//! virtio devices on the direct test host: the bundled guest's ring-3 drivers against Vessel's
//! virtio-mmio block and entropy devices.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::virtio::{assert_block_pattern, assert_refused, run_ok};
use common::*;

/// The guest's block test on a fresh 32 MiB raw disk with `options` added to `--disk`; checks
/// the pattern reached the file. Returns how long the run took.
fn block_pattern(name: &str, options: &str) -> Duration {
    let dir = TempDir::new(name);
    let disk = dir.file("disk.raw");
    raw_disk(&disk, 32 << 20);
    let spec = format!("path={},serial=disk-serial-1{options}", disk.display());
    let start = Instant::now();
    let o = vessel(&["run", "--disk", &spec, "--log-level", "debug"]);
    let took = start.elapsed();
    assert_code(&o, 0);
    // The debug log names the engine and cache mode asked for.
    let log = stderr(&o);
    for (key, value) in options.split(',').filter_map(|o| o.split_once('=')) {
        if key == "engine" || key == "cache" {
            assert!(log.contains(&format!("{key} {value}")), "{log}");
        }
    }
    let out = stdout(&o);
    assert!(
        out.contains(
            "virtio-blk mmio@0xd0000000 65536 sectors: write/read/flush ok serial 'disk-serial-1'"
        ),
        "{out}"
    );
    // Found through the DSDT: the command line stays as given.
    assert!(!out.contains("virtio_mmio.device="), "{out}");
    assert_block_pattern(&disk, 65535);
    took
}

#[test]
fn block_writes_reach_the_host_file() {
    block_pattern("raw", "");
}

#[test]
fn block_engine_io_uring() {
    block_pattern("uring", ",engine=io_uring");
}

#[test]
fn block_engine_threads() {
    block_pattern("threads", ",engine=threads");
}

#[test]
fn block_engine_sync() {
    block_pattern("sync", ",engine=sync");
}

#[test]
fn block_cache_none() {
    block_pattern("direct", ",cache=none");
    block_pattern("direct-threads", ",cache=none,engine=threads");
}

#[test]
fn block_iops_limit_paces_the_guest() {
    // The guest's test makes five disk requests (two writes, a flush, two reads; GET_ID is not
    // an I/O). Two operations per second, the first two from the full bucket: the other three
    // wait 0.5 s each, counted from the device's creation.
    let took = block_pattern("iops", ",iops=2");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
}

#[test]
fn block_bench_mode_runs_every_workload() {
    // The guest's benchmark mode (bench/block/run.sh): not timed here, only that every
    // workload runs, completes requests and writes reach the file.
    let dir = TempDir::new("bench");
    let disk = dir.file("disk.raw");
    raw_disk(&disk, 4 << 20);
    let spec = format!("path={}", disk.display());
    let out = run_ok(
        &[
            "run",
            "--memory",
            "64M",
            "--disk",
            &spec,
            "--cmdline",
            "bench=blk qd=4 benchtime=20 benchwarm=0",
        ],
        &[
            "bench tsc ",
            "bench blk mmio@0xd0000000 capacity 8192 sectors region 4 MiB qd 4",
        ],
    );
    for w in ["randread-4k", "randwrite-4k", "seqread-1m", "seqwrite-1m"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("bench blk {w} qd=4 ops=")))
            .unwrap_or_else(|| panic!("no {w} line: {out}"));
        assert!(!line.contains(" ops=0 "), "{line}");
    }
    let data = std::fs::read(&disk).unwrap();
    assert!(data.iter().any(|b| *b != 0), "nothing written");
}

#[test]
fn without_acpi_devices_are_on_the_command_line() {
    run_ok(
        &["run", "--rng", "--cmdline", "acpi=off"],
        &[
            "cmdline: acpi=off virtio_mmio.device=4K@0xd0000000:5",
            "virtio-rng mmio@0xd0000000: ok",
        ],
    );
}

#[test]
fn read_only_disks_refuse_writes() {
    let dir = TempDir::new("ro");
    let disk = dir.file("disk.raw");
    raw_disk(&disk, 1 << 20);
    let spec = format!("path={},readonly=on", disk.display());
    run_ok(
        &["run", "--disk", &spec],
        &["2048 sectors: read-only, read ok"],
    );
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|b| *b == 0),
        "nothing written"
    );
}

#[test]
fn qcow2_overlay_disk_stays_consistent() {
    let dir = TempDir::new("qcow2");
    let base = dir.file("base.qcow2");
    let top = dir.file("top.qcow2");
    let ok = |args: &[&str]| {
        let o = vessel(args);
        assert_code(&o, 0);
    };
    ok(&[
        "image",
        "create",
        "-f",
        "qcow2",
        "--size",
        "64M",
        base.to_str().unwrap(),
    ]);
    ok(&[
        "image",
        "clone",
        "--from",
        base.to_str().unwrap(),
        top.to_str().unwrap(),
    ]);
    for options in ["", ",cache=none"] {
        let spec = format!("path={},queues=2{options}", top.display());
        run_ok(
            &["run", "--disk", &spec, "--cpus", "2"],
            &["131072 sectors: write/read/flush ok"],
        );
        // The writes went to the overlay; both images are consistent.
        ok(&["image", "check", top.to_str().unwrap()]);
        ok(&["image", "check", base.to_str().unwrap()]);
    }
    // qcow2 has no plain file for io_uring.
    let spec = format!("path={},engine=io_uring", top.display());
    assert_refused(
        &["run", "--disk", &spec],
        "engine=io_uring needs a raw image",
    );
}

#[test]
fn entropy_device() {
    run_ok(&["run", "--rng"], &["virtio-rng mmio@0xd0000000: ok"]);
}

#[test]
fn a_disk_in_use_is_locked() {
    let dir = TempDir::new("lock");
    let disk = dir.file("disk.raw");
    raw_disk(&disk, 1 << 20);
    let spec = format!("path={}", disk.display());
    let log = dir.file("console.log");
    let console = format!("file:{}", log.display());
    let mut first = Command::new(VESSEL)
        .args([
            "run",
            "--disk",
            &spec,
            "--console",
            &console,
            "--cmdline",
            "action=hold",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("virtio-blk")
    {
        assert!(Instant::now() < deadline, "first VM never used its disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = vessel(&["run", "--disk", &spec]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    let err = stderr(&second);
    assert!(err.contains("vessel: error: cannot open disk"), "{err}");
    assert!(err.to_lowercase().contains("lock"), "{err}");
}

#[test]
fn bad_disk_options_are_refused() {
    for (spec, needle) in [
        (
            "path=/nonexistent/disk.img",
            "cannot open disk /nonexistent/disk.img",
        ),
        (
            "path=/tmp/x,cache=sometimes",
            "cache takes writeback, none or unsafe",
        ),
        (
            "path=/tmp/x,engine=aio",
            "expected auto, io_uring, threads or sync",
        ),
        ("path=/tmp/x,iops=0", "iops takes a number above 0"),
        ("path=/tmp/x,bw_burst=1M", "bw_burst needs bw"),
        ("readonly=on", "path= is required"),
    ] {
        assert_refused(&["run", "--disk", spec], needle);
    }
    assert_refused(
        &["run", "--transport", "isa", "--rng"],
        "invalid --transport 'isa'",
    );
}
