//! The nested test host: a real Debian kernel booted by Vessel inside a QEMU-emulated AMD-V
//! machine (see tests/nested/README.md). Slow (about 30 s) and needs `qemu-system-x86_64`,
//! which tests/nested/prepare.sh installs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A statically linked vessel for the L1 initramfs: $VESSEL_STATIC_BIN, or built here.
fn static_vessel() -> PathBuf {
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

#[test]
fn debian_kernel_boots_on_2_vcpus_and_powers_off() {
    let vessel = static_vessel();
    let out = Command::new("bash")
        .arg(repo_root().join("tests/nested/run.sh"))
        .arg("--vessel")
        .arg(&vessel)
        .args(["--cpus", "2", "--memory", "512M", "--timeout", "600"])
        .args([
            "--l2-cmd",
            "echo RTC=$(cat /sys/class/rtc/rtc0/since_epoch) NOW=$(date +%s)",
        ])
        .output()
        .expect("run tests/nested/run.sh");
    let log = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nested run failed: {err}\n{log}");
    // Both vCPUs came up, through the MADT Vessel wrote.
    assert!(log.contains("smp: Brought up 1 node, 2 CPUs"), "{log}");
    assert!(log.contains("L2: cpus=2"), "{log}");
    // The e820 map is the one Vessel gave a 512 MiB guest.
    for line in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved",
        "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
    ] {
        assert!(log.contains(line), "missing '{line}' in:\n{log}");
    }
    // The CMOS RTC tells the real time.
    let rtc_line = log
        .lines()
        .find(|l| l.starts_with("RTC="))
        .unwrap_or_else(|| panic!("no RTC line in:\n{log}"));
    let nums: Vec<i64> = rtc_line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse().ok()))
        .collect();
    assert_eq!(nums.len(), 2, "{rtc_line}");
    assert!(
        (nums[0] - nums[1]).abs() <= 5,
        "RTC far from the clock: {rtc_line}"
    );
    // poweroff -f in the guest reached Vessel through ACPI S5 and ended it with 0.
    assert!(log.contains("reboot: Power down"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}
