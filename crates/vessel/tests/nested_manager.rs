//! `vessel daemon` in the nested test host (see tests/nested/README.md): a template of
//! Debian's cloud kernel with an ext4 root disk, a VM made from it with a hostname and an SSH
//! key in its cloud-init NoCloud seed (which the guest's init reads), its serial console through
//! `vessel vm console`, and a snapshot of VM and disk that restores with the file written
//! before it.

mod common;

use common::nested::*;

/// `/init` of the VM's ext4 root: reads the NoCloud seed (the second disk, FAT, label
/// CIDATA) as cloud-init would, prints a login banner, writes a file on the first boot (and
/// finds it on later ones), then beats every 2 s.
const ROOTFS_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /seed
if mount -t vfat -o ro /dev/vdb /seed; then
    hostname "$(sed -n 's/^local-hostname: //p' /seed/meta-data)"
    # The FAT volume label, from the boot sector (offset 43, 11 bytes).
    echo "CLOUDINIT: label $(dd if=/dev/vdb bs=1 skip=43 count=11 2>/dev/null | tr -d ' ')"
    echo "CLOUDINIT: hostname $(hostname)"
    echo "CLOUDINIT: key $(sed -n 's/^  - "\(.*\)"$/\1/p' /seed/user-data)"
else
    echo "CLOUDINIT: no seed"
fi
echo
echo "Debian GNU/Linux 12 $(hostname) ttyS0"
echo
echo "$(hostname) login: "
if [ -f /before ]; then
    echo "ROOTFS: found /before: $(cat /before)"
else
    echo "before the snapshot $(cat /proc/sys/kernel/random/uuid)" > /before
    sync
    echo "ROOTFS: wrote /before: $(cat /before)"
fi
n=0
while :; do n=$((n + 1)); echo "GUEST: beat $n"; sleep 2; done
"#;

/// L1's script: the daemon, the template, the VM, its console, a snapshot and its restore,
/// then a cold boot on the restored disks.
const L1_CMD: &str = r#"
V=/vessel
export VESSEL_SOCKET=/tmp/run/vessel.sock
mkdir -p /tmp
$V daemon --state-dir /tmp/state --run-dir /tmp/run > /tmp/daemon.log 2>&1 &
i=0; until $V vm list >/dev/null 2>&1; do i=$((i + 1)); [ $i -gt 100 ] && { cat /tmp/daemon.log; exit 1; }; sleep 0.2; done
# The console so far (its scrollback), each line marked.
console() { timeout 3 $V vm console web1 </dev/null 2>/dev/null | tr -d '\r' | sed 's/^/L1CONSOLE: /'; }
wait_console() {
    i=0
    until timeout 3 $V vm console web1 </dev/null 2>/dev/null | grep -q "$1"; do
        i=$((i + 1)); [ $i -gt 100 ] && { echo "L1MGR: no '$1' on the console"; console; return 1; }
        sleep 2
    done
}
# Every 60 s, the state of the processes this script waits on (a console poll once hung here
# with L1 idle): pid, state, wait channel, command line.
( while :; do
    sleep 60
    for p in /proc/[0-9]*; do
        c=$(tr '\0' ' ' < $p/cmdline 2>/dev/null)
        case "$c" in *vessel*|timeout*|grep*) echo "L1DIAG: ${p#/proc/} $(cut -d' ' -f3 $p/stat 2>/dev/null) $(cat $p/wchan 2>/dev/null) $c";; esac
    done
  done ) &
MODS=virtio_mmio,virtio_blk,vfat,nls_cp437,nls_ascii,nls_utf8
$V template create deb --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --memory 256M \
  --cmdline "console=ttyS0 panic=1 l2mods=$MODS l2root=/dev/vda" --disk /root.ext4 || exit 1
$V vm create web1 -t deb --hostname web1 --restart never --start \
  --ssh-key "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIVessel tester@vessel" || exit 1
$V vm list | sed 's/^/L1MGR: list: /'
wait_console "GUEST: beat 2" || exit 1
echo "L1MGR: console:"
console
$V vm snapshot create web1 s1 || exit 1
echo "L1MGR: snapshot taken"
$V vm kill web1 || exit 1
$V vm snapshot restore web1 s1 || exit 1
echo "L1MGR: restored"
$V vm list | sed 's/^/L1MGR: list: /'
wait_console "GUEST: beat" || exit 1
sleep 5
echo "L1MGR: console after the restore:"
console
$V vm kill web1 || exit 1
$V vm start web1 || exit 1
echo "L1MGR: booted again"
wait_console "ROOTFS: found" || exit 1
echo "L1MGR: console after a boot on the restored disks:"
console
$V vm kill web1 && $V vm delete web1 && $V template delete deb || exit 1
$V events | sed 's/^/L1MGR: event: /'
echo "L1MGR: done"
"#;

#[test]
fn the_daemon_runs_a_debian_vm_with_its_cloud_init_seed_console_and_snapshot() {
    let tag = std::process::id().to_string();
    let image = ext4_root(&format!("mgr-{tag}"), ROOTFS_INIT);
    let cmd = repo_root().join(format!("target/nested-mgr-{tag}.sh"));
    std::fs::write(&cmd, L1_CMD).unwrap();
    let log = nested_run(&[
        "--timeout",
        "900",
        "--l1-memory",
        "2048",
        "--l2-modules",
        "virtio_mmio virtio_blk vfat nls_cp437 nls_ascii nls_utf8",
        "--l1-file",
        &format!("{}:/root.ext4", image.display()),
        "--l1-file",
        &format!("{}:/l1-cmd", cmd.display()),
    ]);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&cmd);
    let console = |from: &str, to: &str| -> String {
        let start = log
            .find(from)
            .unwrap_or_else(|| panic!("no '{from}' in:\n{log}"));
        let rest = &log[start..];
        let end = rest.find(to).unwrap_or(rest.len());
        rest[..end]
            .lines()
            .filter_map(|l| l.split_once("L1CONSOLE: ").map(|(_, c)| c))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(log.contains("L1MGR: done"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
    // The seed, read by the guest: label, hostname and key; the banner on the console.
    let first = console("L1MGR: console:", "L1MGR: snapshot taken");
    assert!(first.contains("CLOUDINIT: label CIDATA"), "{first}");
    assert!(first.contains("CLOUDINIT: hostname web1"), "{first}");
    assert!(
        first.contains("CLOUDINIT: key ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIVessel tester@vessel"),
        "{first}"
    );
    assert!(first.contains("web1 login:"), "{first}");
    let wrote = first
        .lines()
        .find_map(|l| l.strip_prefix("ROOTFS: wrote /before: "))
        .unwrap_or_else(|| panic!("no write in:\n{first}"))
        .to_string();
    // Restored: the guest goes on where it was (its beats carry on, no new boot).
    let restored = console("L1MGR: console after the restore:", "L1MGR: booted again");
    let beats = |text: &str| -> Vec<u32> {
        text.lines()
            .filter_map(|l| l.strip_prefix("GUEST: beat ")?.trim().parse().ok())
            .collect()
    };
    let (before, after) = (beats(&first), beats(&restored));
    assert!(
        !after.is_empty() && after.iter().min() > before.iter().max(),
        "beats before the snapshot {before:?}, after the restore {after:?}"
    );
    assert!(
        !restored.contains("Linux version"),
        "a restore is not a boot:\n{restored}"
    );
    // Booted cold on the restored disks: the file written before the snapshot is there.
    let again = console(
        "L1MGR: console after a boot on the restored disks:",
        "L1MGR: event",
    );
    assert!(
        again.contains(&format!("ROOTFS: found /before: {wrote}")),
        "{again}"
    );
    let events: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("L1MGR: event: ").map(|(_, e)| e))
        .collect();
    for e in [
        "vm.snapshot-created",
        "vm.snapshot-restoring",
        "vm.started",
        "vm.deleted",
    ] {
        assert!(events.iter().any(|l| l.contains(e)), "{e}: {events:#?}");
    }
}
