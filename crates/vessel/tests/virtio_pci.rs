//! The virtio-pci transport on the direct test host: the bundled guest scans PCI bus 0, finds
//! Vessel's virtio-pci block and entropy functions, and drives them (polled).

mod common;

use common::*;

/// blk in slot 1 and rng in slot 2 on `cpus` vCPUs; `extra` goes on the guest command line.
fn blk_and_rng(name: &str, cpus: &str, extra: &str) {
    let dir = TempDir::new(name);
    let disk = dir.file("disk.raw");
    raw_disk(&disk, 16 << 20);
    let spec = format!("path={},serial=pci-disk", disk.display());
    let cmdline = format!("console=ttyS0 virtio=blk,rng {extra}");
    let o = vessel(&[
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
    ]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains("virtio-blk pci@00:01.0 32768 sectors: write/read/flush ok serial 'pci-disk'"),
        "{out}"
    );
    assert!(out.contains("virtio-rng pci@00:02.0: ok"), "{out}");
    assert!(
        out.contains(&format!("all {cpus} cpus ran in ring 3")),
        "{out}"
    );
    let s8 = sector(&disk, 8);
    assert!(
        s8.starts_with(b"vessel virtio-blk sector 8\n"),
        "{:?}",
        &s8[..32]
    );
    let last = sector(&disk, 32767);
    assert!(
        last.starts_with(b"vessel virtio-blk sector 32767\n"),
        "{:?}",
        &last[..32]
    );
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
    let o = vessel(&["run", "--rng", "--cmdline", "virtio=rng"]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("virtio-rng mmio@0xd0000000: ok"),
        "{}",
        stdout(&o)
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
    let o = vessel(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("too many virtio devices: 32"),
        "{}",
        stderr(&o)
    );
}
