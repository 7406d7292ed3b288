//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const VESSEL: &str = env!("CARGO_BIN_EXE_vessel-image");

/// Whether Debian's qemu-img (package qemu-utils) is available. The interop tests need it:
/// without it they fail, unless VESSEL_ALLOW_NO_QEMU_IMG=1 says to skip their qemu half.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var_os("VESSEL_ALLOW_NO_QEMU_IMG").is_some(),
            "qemu-img not found: install qemu-utils (scripts/setup --tests), or set \
             VESSEL_ALLOW_NO_QEMU_IMG=1 to skip the qemu half of the interop tests"
        );
        eprintln!("qemu-img not found: skipping the qemu half (VESSEL_ALLOW_NO_QEMU_IMG)");
    }
    ok
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Run and require exit code `code`; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str], code: i32) -> String {
    let o = run(cmd, args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "{cmd} {args:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn vessel(args: &[&str]) -> String {
    run_ok(VESSEL, args, 0)
}

pub fn qemu_img(args: &[&str]) -> String {
    run_ok("qemu-img", args, 0)
}

pub fn qemu_io(img: &str, cmds: &[&str]) {
    let mut args = vec![];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    run_ok("qemu-io", &args, 0);
}

pub fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Small deterministic PRNG.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Apply the same random writes, zeroes and discards to a block image and to a plain
/// reference file.
pub fn random_io(img: &Path, reference: &Path, seed: u64, ops: usize) {
    use std::os::unix::fs::FileExt;
    let disk = block::open(img, block::OpenOptions::default()).expect("open image");
    let size = disk.size();
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(reference)
        .unwrap();
    assert_eq!(r.metadata().unwrap().len(), size);
    let mut rng = Rng(seed | 1);
    for _ in 0..ops {
        let len = (rng.next() % (200 << 10)) + 1;
        let off = rng.next() % (size - len);
        match rng.next() % 8 {
            0 => {
                disk.write_zeroes(off, len).unwrap();
                r.write_all_at(&vec![0u8; len as usize], off).unwrap();
            }
            1 => {
                disk.discard(off, len).unwrap();
                r.write_all_at(&vec![0u8; len as usize], off).unwrap();
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                disk.write_at(&buf, off).unwrap();
                r.write_all_at(&buf, off).unwrap();
            }
        }
    }
    disk.flush().unwrap();
}

/// Read the whole disk through the block layer.
pub fn read_all(img: &Path) -> Vec<u8> {
    let disk = block::open(
        img,
        block::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .expect("open image");
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad json {e}: {s}"))
}

pub fn path_buf(s: &str) -> PathBuf {
    PathBuf::from(s)
}
