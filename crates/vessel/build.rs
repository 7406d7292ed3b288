//! Builds the bundled guest (`guests/`, its own cargo workspace with its own flags) and stages
//! it for `include_bytes!`. Set `VESSEL_GUEST_ELF=/path/to/vessel-guest` to use a prebuilt one.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest_dir = manifest.join("../../guests");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let staged = out_dir.join("vessel-guest.elf");
    println!("cargo:rerun-if-env-changed=VESSEL_GUEST_ELF");

    if let Ok(prebuilt) = env::var("VESSEL_GUEST_ELF") {
        std::fs::copy(&prebuilt, &staged)
            .unwrap_or_else(|e| panic!("cannot copy VESSEL_GUEST_ELF={prebuilt}: {e}"));
        return;
    }
    for p in ["src", "Cargo.toml", "build.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(p).display());
    }

    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&guest_dir);
    // The guest has its own flags: nothing of this build's (static linking, clippy, coverage)
    // may leak into it.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the bundled guest: {e}"));
    assert!(
        status.success(),
        "building the bundled guest (guests/) failed"
    );
    let built = target_dir.join("release/vessel-guest");
    std::fs::copy(&built, &staged)
        .unwrap_or_else(|e| panic!("cannot stage {}: {e}", built.display()));
}
