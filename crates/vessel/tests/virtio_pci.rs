//! The virtio-pci transport on the direct test host: the bundled guest scans PCI bus 0, finds
//! Vessel's virtio-pci block and entropy functions, and drives them (polled).

mod common;

use common::virtio::{assert_block_pattern, assert_refused, run_ok};
use common::*;

/// blk in slot 1 and rng in slot 2 on `cpus` vCPUs; `extra` goes on the guest command line.
fn blk_and_rng(name: &str, cpus: &str, extra: &str) {
    let dir = TempDir::new(name);
    let disk = dir.file("disk.raw");
    raw_disk(&disk, 16 << 20);
    let spec = format!("path={},serial=pci-disk", disk.display());
    let cmdline = format!("console=ttyS0 virtio=blk,rng {extra}");
    let ran = format!("all {cpus} cpus ran in ring 3");
    run_ok(
        &[
            "run",
            "--transport",
            "pci",
            "--cpus",
            cpus,
            "--disk",
            &spec,
            "--rng",
            "--cmdline",
            &cmdline,
        ],
        &[
            "virtio-blk pci@00:01.0 32768 sectors: write/read/flush ok serial 'pci-disk'",
            "virtio-rng pci@00:02.0: ok",
            &ran,
        ],
    );
    assert_block_pattern(&disk, 32767);
}

#[test]
fn blk_and_rng_on_one_vcpu() {
    blk_and_rng("one", "1", "");
}

#[test]
fn blk_and_rng_on_two_vcpus() {
    blk_and_rng("two", "2", "");
}

/// The guest re-assigns the BARs itself: the MMIO dispatch and the notify ioeventfds follow.
#[test]
fn guest_moves_the_bars() {
    blk_and_rng("moved", "2", "pcibar=assign pciwindow=0xf0000000");
}

#[test]
fn mmio_is_still_the_default() {
    run_ok(
        &["run", "--rng", "--cmdline", "virtio=rng"],
        &["virtio-rng mmio@0xd0000000: ok"],
    );
}

#[test]
fn too_many_pci_devices_are_refused() {
    let dir = TempDir::new("many");
    let disk = dir.file("d.raw");
    raw_disk(&disk, 1 << 20);
    let spec = format!("path={},readonly=on", disk.display());
    let mut args = vec!["run", "--transport", "pci"];
    for _ in 0..32 {
        args.extend(["--disk", &spec]);
    }
    assert_refused(&args, "too many virtio devices: 32");
}
