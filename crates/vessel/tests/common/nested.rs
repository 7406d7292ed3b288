//! Helpers for tests on the nested test host (tests/nested/).

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A statically linked vessel for the L1 initramfs: $VESSEL_STATIC_BIN, or built here.
pub fn static_vessel() -> PathBuf {
    if let Some(p) = std::env::var_os("VESSEL_STATIC_BIN") {
        return PathBuf::from(p);
    }
    let root = repo_root();
    let target_dir = root.join("target/static");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "vessel",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(&root)
        .status()
        .expect("run cargo to build a static vessel");
    assert!(status.success(), "static vessel build failed");
    target_dir.join("x86_64-unknown-linux-gnu/release/vessel")
}

/// The outer QEMU's own known crash (QEMU 7.2's TCG, see ../shared/notes/platform.md): a
/// run that ends with it says nothing about Vessel and is run again.
const OUTER_QEMU_CRASH: &str = "tcg_handle_interrupt: assertion failed";

/// Runs tried at most: the first, and one more per outer QEMU crash.
const RUNS: usize = 3;

/// Runs tests/nested/run.sh with `args` (later options override earlier ones, such as the
/// default 600 s timeout) and returns its console log, failing on a failed run. A run that
/// the outer QEMU's own known crash ended is run again (each retry printed with its cause);
/// any other failure fails at once.
pub fn nested_run(args: &[&str]) -> String {
    let vessel = static_vessel();
    for attempt in 1..=RUNS {
        let out = Command::new("bash")
            .arg(repo_root().join("tests/nested/run.sh"))
            .arg("--vessel")
            .arg(&vessel)
            .args(["--timeout", "600"])
            .args(args)
            .output()
            .expect("run tests/nested/run.sh");
        let log = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return log;
        }
        match outer_qemu_crash(&log) {
            Some(line) if attempt < RUNS => {
                eprintln!(
                    "nested: retry {attempt} of {}: the outer QEMU crashed: {line}",
                    RUNS - 1
                );
            }
            _ => panic!("nested run failed: {err}\n{log}"),
        }
    }
    unreachable!("the last run returns or fails")
}

/// The line of `log` that shows the outer QEMU's known crash, if any.
fn outer_qemu_crash(log: &str) -> Option<&str> {
    log.lines()
        .find(|l| l.contains(OUTER_QEMU_CRASH))
        .map(str::trim)
}

/// A path tests/nested/prepare.sh records in nested.env (`NESTED_KERNEL`, `NESTED_MODDIR`, ...);
/// runs prepare.sh first (idempotent, fast when the cache is warm).
pub fn nested_env(key: &str) -> PathBuf {
    let status = Command::new("bash")
        .arg(repo_root().join("tests/nested/prepare.sh"))
        .status()
        .expect("run tests/nested/prepare.sh");
    assert!(status.success(), "tests/nested/prepare.sh failed");
    let env = std::fs::read_to_string(repo_root().join(".cache/nested/nested.env"))
        .expect("tests/nested/prepare.sh wrote nested.env");
    let prefix = format!("{key}=");
    let line = env
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{key} in nested.env"));
    PathBuf::from(line.trim_matches('\''))
}

/// An ext4 image (64 MiB, label `vessel-root`) holding busybox and `init` as `/init`, made
/// with `mkfs.ext4 -d` (e2fsprogs) at `target/nested-root-TAG.ext4`.
pub fn ext4_root(tag: &str, init: &str) -> PathBuf {
    let tree = repo_root().join(format!("target/nested-root-{tag}"));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("busybox-static");
    let path = tree.join("init");
    std::fs::write(&path, init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = repo_root().join(format!("target/nested-root-{tag}.ext4"));
    let _ = std::fs::remove_file(&image);
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vessel-root", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("64M")
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(status.success(), "mkfs.ext4");
    let _ = std::fs::remove_dir_all(&tree);
    image
}
