//! Helpers for running the `vessel` binary in tests.

#![allow(dead_code)]

use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");

/// Runs `vessel` with `args`, stdin closed, and a time limit; kills it past the limit.
pub fn vessel(args: &[&str]) -> Output {
    vessel_with_timeout(args, Duration::from_secs(60))
}

pub fn vessel_with_timeout(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(VESSEL)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // The process may be gone already; a failed kill is fine.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = child.wait_with_output().expect("wait for vessel");
    drop(watchdog);
    out
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
pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
