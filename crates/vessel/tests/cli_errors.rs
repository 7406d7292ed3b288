//! Bad input gets a one-line error and a non-zero exit, never a panic.

mod common;

use common::*;

/// Runs `vessel run` with `args` and checks for a single `vessel: error:` line naming `needle`.
fn rejects(args: &[&str], needle: &str) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let o = vessel(&full);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(lines[0].starts_with("vessel: error: "), "{args:?}: {err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: '{needle}' not in: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(stdout(&o).is_empty(), "no guest output expected");
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("vessel-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_kernel() {
    rejects(
        &["--kernel", "/nonexistent/vmlinuz"],
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn corrupt_kernels() {
    let garbage = temp_file("garbage", &[0xa5; 8192]);
    rejects(
        &["--kernel", garbage.to_str().unwrap()],
        "neither an ELF vmlinux nor a bzImage",
    );
    let empty = temp_file("empty", &[]);
    rejects(
        &["--kernel", empty.to_str().unwrap()],
        "neither an ELF vmlinux nor a bzImage",
    );
    // An ELF header cut short.
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(40, 0);
    let truncated = temp_file("truncated", &elf);
    rejects(
        &["--kernel", truncated.to_str().unwrap()],
        "cannot load kernel",
    );
    // A bzImage header with nothing behind it.
    let mut bz = vec![0u8; 0x400];
    bz[0x1fe] = 0x55;
    bz[0x1ff] = 0xaa;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let bzimage = temp_file("bzimage", &bz);
    rejects(
        &["--kernel", bzimage.to_str().unwrap()],
        "cannot load kernel",
    );
    for p in [garbage, empty, truncated, bzimage] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn missing_initrd() {
    rejects(
        &["--initrd", "/nonexistent/initrd.img"],
        "/nonexistent/initrd.img",
    );
}

#[test]
fn memory_too_small() {
    rejects(&["--memory", "1M"], "too small");
}

#[test]
fn memory_larger_than_host() {
    rejects(&["--memory", "64T"], "larger than this host");
}

#[test]
fn bad_memory_size() {
    rejects(&["--memory", "lots"], "invalid size 'lots'");
}

#[test]
fn bad_thp_switch() {
    rejects(
        &["--thp", "maybe"],
        "invalid --thp 'maybe': expected on or off",
    );
}

#[test]
fn zero_cpus() {
    rejects(&["--cpus", "0"], "at least 1");
}

#[test]
fn too_many_cpus() {
    rejects(&["--cpus", "300"], "over the limit");
}

#[test]
fn unknown_cpu_template_feature() {
    rejects(
        &["--cpu-template", "-avx,-warpdrive"],
        "unknown CPU feature 'warpdrive'",
    );
}

#[test]
fn bad_console() {
    rejects(&["--console", "tcp:1234"], "invalid --console");
}

#[test]
fn bad_boot_protocol() {
    rejects(&["--boot-protocol", "bios"], "invalid --boot-protocol");
}

#[test]
fn kernel_command_line_too_long() {
    let long = "x".repeat(70_000);
    rejects(&["--cmdline", &long], "command line");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let o = vessel(&["run", "--no-such-flag"]);
    assert_code(&o, 2);
    assert!(!stderr(&o).contains("panicked"));
}
