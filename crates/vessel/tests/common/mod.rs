//! Helpers for running the `vessel` binary in tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod daemon;
pub mod migration;
pub mod nested;
pub mod soak;
pub mod virtio;

pub const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");

/// Runs `vessel` with `args`, stdin closed, and a time limit; kills it past the limit.
pub fn vessel(args: &[&str]) -> Output {
    vessel_with_timeout(args, Duration::from_secs(60))
}

pub fn vessel_with_timeout(args: &[&str], limit: Duration) -> Output {
    vessel_env(args, &[], limit)
}

/// [`vessel_with_timeout`] with `env` set.
pub fn vessel_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let child = Command::new(VESSEL)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    // Killed through its handle, before it is reaped: never another process that got its
    // pid later (pids wrap quickly here).
    let mut child = child;
    let read = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read(child.stdout.take().map(|o| Box::new(o) as _));
    let err = read(child.stderr.take().map(|e| Box::new(e) as _));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for vessel") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait for vessel");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs `vessel ctl` against the VM whose API listens on `socket`.
pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    let mut full = vec!["ctl", "--api-socket", socket.to_str().unwrap()];
    full.extend_from_slice(args);
    vessel(&full)
}

/// Waits for `path` to appear (up to 60 s).
pub fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).replace('\r', "")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).replace('\r', "")
}

/// Asserts the run ended with `code`, showing its output otherwise.
pub fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Whether this machine can run VMs at all (every test host of this project can).
/// Fails unless this runs as root with /dev/kvm (the jail's tests need both).
pub fn require_root() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    assert!(root && have_kvm(), "the jail tests need root and /dev/kvm");
}

pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A scratch directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vessel-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sparse raw disk image of `size` bytes.
pub fn raw_disk(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// The 512 bytes at `sector` of a disk image.
pub fn sector(path: &Path, sector: u64) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    data[(sector * 512) as usize..(sector * 512 + 512) as usize].to_vec()
}
