//! Checks the virtio tests of both transports share: what a guest run printed, what it was
//! refused with, and what the guest's block test wrote.

use std::path::Path;

use super::{assert_code, sector, stderr, stdout, vessel};

/// Runs `vessel` with `args`, asserts it exits 0 and printed each of `lines`; returns its
/// output.
pub fn run_ok(args: &[&str], lines: &[&str]) -> String {
    let o = vessel(args);
    assert_code(&o, 0);
    let out = stdout(&o);
    for line in lines {
        assert!(out.contains(line), "{args:?}: no {line:?} in:\n{out}");
    }
    out
}

/// Runs `vessel` with `args` and asserts it is refused (exit status 2) with `message`.
pub fn assert_refused(args: &[&str], message: &str) {
    let o = vessel(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(message), "{args:?}: {err}");
}

/// The guest's block test wrote its pattern to `disk`: sectors 8 and `last` say their number.
pub fn assert_block_pattern(disk: &Path, last: u64) {
    for n in [8, last] {
        let s = sector(disk, n);
        let expected = format!("vessel virtio-blk sector {n}\n");
        assert!(
            s.starts_with(expected.as_bytes()),
            "sector {n}: {:?}",
            &s[..32]
        );
    }
}
