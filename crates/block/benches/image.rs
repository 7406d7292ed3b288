//! Image-layer throughput benchmark: sequential and "random" (large-stride, as
//! `qemu-img bench -S` can do) 4 KiB reads and writes through Vessel's block layer on a
//! raw image and on a qcow2 overlay over a qcow2 base, next to `qemu-img bench` on the
//! same files. Run via `bench/image/run.sh`.
//!
//! Options: `--dir DIR` (default: a temp dir), `--size MIB` (default 256),
//! `--count N` (4 KiB requests per test, default 65536).

use block::{DiskBackend, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const BS: u64 = 4096;
/// Stride for the random pattern: a prime number of blocks, so the sequence visits the
/// image in a scattered order (same sequence for Vessel and qemu-img).
const STRIDE_BLOCKS: u64 = 7919;

struct Cfg {
    dir: PathBuf,
    size: u64,
    count: u64,
}

fn parse_args() -> Cfg {
    let mut cfg = Cfg {
        dir: std::env::temp_dir().join(format!("vessel-image-bench-{}", std::process::id())),
        size: 256 << 20,
        count: 65536,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--dir" => cfg.dir = PathBuf::from(v),
            "--size" => cfg.size = v.parse::<u64>().expect("--size MIB") << 20,
            "--count" => cfg.count = v.parse().expect("--count N"),
            _ => {
                i += 1;
                continue; // ignore cargo's own flags such as --bench
            }
        }
        i += 2;
    }
    cfg
}

fn open(path: &Path) -> Box<dyn DiskBackend> {
    block::open(path, OpenOptions::default()).expect("open image")
}

fn fill(path: &Path, size: u64, step: u64) {
    let d = open(path);
    let mut buf = vec![0u8; 1 << 20];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let mut off = 0;
    while off < size {
        d.write_at(&buf[..(64 << 10)], off).expect("fill");
        off += step;
    }
    d.flush().expect("flush");
}

/// Offsets of the pattern: sequential or large-stride, wrapping like qemu-img bench.
fn offset(i: u64, random: bool, size: u64) -> u64 {
    let step = if random { STRIDE_BLOCKS * BS } else { BS };
    (i * step) % size
}

fn run_vessel(path: &Path, write: bool, random: bool, cfg: &Cfg) -> f64 {
    let d = open(path);
    let mut buf = vec![0x5au8; BS as usize];
    let t = Instant::now();
    for i in 0..cfg.count {
        let off = offset(i, random, cfg.size);
        if write {
            d.write_at(&buf, off).expect("write");
        } else {
            d.read_at(&mut buf, off).expect("read");
        }
    }
    let secs = t.elapsed().as_secs_f64();
    drop(d);
    secs
}

fn run_qemu(path: &Path, fmt: &str, write: bool, random: bool, cfg: &Cfg) -> Option<f64> {
    let step = if random { STRIDE_BLOCKS * BS } else { BS };
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "bench",
        "-f",
        fmt,
        "-t",
        "writeback",
        "-d",
        "1",
        "-s",
        "4096",
    ])
    .args(["-c", &cfg.count.to_string(), "-S", &step.to_string()]);
    if write {
        cmd.arg("-w");
    }
    let out = cmd.arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "Run completed in 1.234 seconds."
    let secs = text
        .split("Run completed in ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(secs)
}

fn fresh_overlay(cfg: &Cfg) -> PathBuf {
    let ov = cfg.dir.join("overlay.qcow2");
    let _ = std::fs::remove_file(&ov);
    block::ops::clone(&cfg.dir.join("base.qcow2"), &ov, false).expect("clone");
    ov
}

fn main() {
    let cfg = parse_args();
    std::fs::create_dir_all(&cfg.dir).expect("bench dir");
    let have_qemu = Command::new("qemu-img").arg("--version").output().is_ok();
    eprintln!(
        "preparing {} MiB images in {} ...",
        cfg.size >> 20,
        cfg.dir.display()
    );
    let raw = cfg.dir.join("disk.raw");
    let base = cfg.dir.join("base.qcow2");
    let create = |p: &Path, f| {
        let o = block::ops::CreateOptions {
            format: Some(f),
            size: Some(cfg.size),
            force: true,
            ..Default::default()
        };
        block::ops::create(p, &o).expect("create");
    };
    create(&raw, block::Format::Raw);
    fill(&raw, cfg.size, 64 << 10);
    create(&base, block::Format::Qcow2);
    fill(&base, cfg.size, 64 << 10);

    println!(
        "{:<12} {:<22} {:>12} {:>12} {:>8}",
        "test", "image", "vessel MB/s", "qemu MB/s", "ratio"
    );
    let mb = (cfg.count * BS) as f64 / 1e6;
    for (name, write, random) in [
        ("seq-read", false, false),
        ("rand-read", false, true),
        ("seq-write", true, false),
        ("rand-write", true, true),
    ] {
        for kind in ["raw", "qcow2-overlay"] {
            let (path, fmt) = if kind == "raw" {
                (raw.clone(), "raw")
            } else {
                let ov = fresh_overlay(&cfg);
                if !write {
                    // half of the clusters live in the overlay, half in the base
                    fill(&ov, cfg.size, 128 << 10);
                }
                (ov, "qcow2")
            };
            let v = run_vessel(&path, write, random, &cfg);
            let q = if have_qemu {
                if kind != "raw" && write {
                    fresh_overlay(&cfg);
                }
                run_qemu(&path, fmt, write, random, &cfg)
            } else {
                None
            };
            let vr = mb / v;
            let (qs, ratio) = match q {
                Some(q) => (format!("{:.1}", mb / q), format!("{:.2}", vr / (mb / q))),
                None => ("n/a".into(), "n/a".into()),
            };
            println!("{name:<12} {kind:<22} {vr:>12.1} {qs:>12} {ratio:>8}");
        }
    }
    println!("(ratio = vessel / qemu-img bench; 4 KiB requests, queue depth 1, page cache)");
    let _ = std::fs::remove_dir_all(&cfg.dir);
}
