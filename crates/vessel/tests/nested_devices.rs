//! Debian's stock kernel as L2 in the nested test host (see tests/nested/README.md), with the
//! virtio devices whose Linux drivers need user-space peers: vsock (a static helper,
//! tests/nested/tools/vsock-echo.c, on both sides) and the balloon (Vessel's RSS read in L1).
//! Slow (TCG) and needs what `scripts/setup --tests` installs.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::nested::*;

/// tests/nested/tools/`name`.c built static (gcc), for L1 and L2's initramfs.
fn static_tool(name: &str) -> PathBuf {
    let src = repo_root().join(format!("tests/nested/tools/{name}.c"));
    let out = repo_root().join(format!("target/nested-{name}-{}", std::process::id()));
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run gcc (scripts/setup --tests installs it)");
    assert!(status.success(), "gcc -static {}", src.display());
    out
}

/// L1's side of the vsock test, run from the vessel argument list (a command substitution
/// that prints nothing): an echo server on the Unix socket for guest port 5000, and a client
/// that connects to the guest's port 6000 through Vessel's `CONNECT` once L2 listens.
const VSOCK_L1: &str = r#"#!/bin/sh
exec >/dev/console 2>&1
/vsock-echo unix-echo /tmp/vsock.sock_5000 &
(
    i=0
    while [ $i -lt 300 ]; do
        [ -S /tmp/vsock.sock ] && /vsock-echo unix-connect /tmp/vsock.sock 6000 ping-from-L1 \
            2>/dev/null | grep -q '^VSOCK: host-to-guest' && echo "L1VSOCK: host-to-guest ok" && exit 0
        i=$((i + 1))
        sleep 1
    done
    echo "L1VSOCK: gave up"
) &
"#;

/// L2's side: listen on 6000 (served once), connect to the host's 5000, wait for L1's call.
const VSOCK_L2: &str = r#"/vsock-echo listen 6000 &
listener=$!
/vsock-echo connect 2 5000 hello-from-L2
i=0
while kill -0 $listener 2>/dev/null && [ $i -lt 120 ]; do i=$((i + 1)); sleep 1; done
echo "L2VSOCK: listener done after $i s"
"#;

#[test]
fn debian_kernel_echoes_through_vsock_both_ways() {
    let tool = static_tool("vsock-echo");
    let setup = repo_root().join(format!(
        "target/nested-vsock-setup-{}.sh",
        std::process::id()
    ));
    std::fs::write(&setup, VSOCK_L1).unwrap();
    let l1_tool = format!("{}:/vsock-echo", tool.display());
    let l2_tool = l1_tool.clone();
    let setup_file = format!("{}:/vsock-setup.sh", setup.display());
    let log = nested_run(&[
        "--timeout",
        "900",
        "--l1-file",
        &l1_tool,
        "--l1-file",
        &setup_file,
        "--l2-file",
        &l2_tool,
        "--vessel-args",
        "run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 2 --memory 512M \
         --vsock cid=3,socket=/tmp/vsock.sock \
         --cmdline 'console=ttyS0 panic=1 l2mods=virtio_mmio,vmw_vsock_virtio_transport' \
         $(sh /vsock-setup.sh)",
        "--l2-cmd",
        VSOCK_L2,
    ]);
    let _ = std::fs::remove_file(&setup);
    let _ = std::fs::remove_file(&tool);
    // Guest to host: L2 connected to CID 2 port 5000, Vessel connected /tmp/vsock.sock_5000.
    assert!(log.contains("VSOCK: guest-to-host hello-from-L2"), "{log}");
    // Host to guest: L1 wrote CONNECT 6000 on /tmp/vsock.sock and got its bytes back.
    assert!(log.contains("VSOCK: listening on 6000"), "{log}");
    assert!(log.contains("L1VSOCK: host-to-guest ok"), "{log}");
    assert!(log.contains("VSOCK: served one connection"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}

/// L1's side of the balloon test: Vessel's resident memory every second while it runs, and
/// the balloon driven through the API: once the guest has dirtied its memory, inflate to
/// 256 MiB, then deflate to 0.
const BALLOON_L1: &str = r#"#!/bin/sh
# To a file, printed by BALLOON_L1_AFTER once vessel has exited: on the console these lines
# and the guest's cut into each other.
exec >>/tmp/l1-balloon.log 2>&1
(
    i=0
    while [ -z "$(pidof vessel)" ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    pid=$(pidof vessel)
    while [ -d /proc/$pid ]; do
        echo "L1RSS: $(grep VmRSS /proc/$pid/status | tr -s ' ' | cut -d' ' -f2) kB"
        sleep 1
    done
) &
(
    rss() { grep VmRSS /proc/$(pidof vessel)/status 2>/dev/null | tr -s ' ' | cut -d' ' -f2; }
    ctl() { /vessel ctl --api-socket /tmp/balloon.sock "$@"; }
    # Wait until the guest has dirtied its 320 MiB and let it go (RSS high and steady for 3 s:
    # inflating while the tmpfs file still exists would run the guest out of memory).
    i=0 last=0 steady=0
    while [ $steady -lt 3 ] && [ $i -lt 600 ]; do
        now=$(rss || echo 0)
        if [ "$now" -gt 330000 ] && [ $((now - last)) -lt 2048 ]; then steady=$((steady + 1)); else steady=0; fi
        last=$now i=$((i + 1))
        sleep 1
    done
    sleep 2
    peak=$(rss)
    echo "L1BALLOON: guest dirtied its memory, rss $peak kB; inflating"
    ctl balloon 256M
    i=0
    while ! ctl --json balloon | grep -q '"actual_bytes": *268435456'; do
        i=$((i + 1)); [ $i -gt 240 ] && break; sleep 0.5
    done
    echo "L1BALLOON: inflated, rss $(rss) kB (peak $peak kB)"
    ctl --json balloon | tr -d ' \n'; echo
    # Time for the guest to see it before deflating.
    sleep 6
    ctl balloon 0
    i=0
    while ! ctl --json balloon | grep -q '"actual_bytes": *0'; do
        i=$((i + 1)); [ $i -gt 240 ] && break; sleep 0.5
    done
    echo "L1BALLOON: deflated"
) &
"#;

/// L1's `/l1-after`: the log of BALLOON_L1's scripts.
const BALLOON_L1_AFTER: &str = "cat /tmp/l1-balloon.log\n";

/// L2's side: dirty 320 MiB (a tmpfs file, then removed: free in the guest, resident on the
/// host), then follow MemTotal as L1 inflates the balloon and deflates it again.
const BALLOON_L2: &str = r#"full=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)
mkdir -p /scratch && mount -t tmpfs -o size=400m tmpfs /scratch
dd if=/dev/zero of=/scratch/fill bs=1M count=320 2>/dev/null && sync
rm /scratch/fill
echo "L2BALLOON: dirtied, MemTotal $full kB"
mem() { grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2; }
i=0
while [ $((full - $(mem))) -lt 250000 ] && [ $i -lt 300 ]; do i=$((i + 1)); sleep 1; done
echo "L2BALLOON: inflated after $i s, MemTotal $(mem) kB"
i=0
while [ $((full - $(mem))) -gt 4096 ] && [ $i -lt 300 ]; do i=$((i + 1)); sleep 1; done
echo "L2BALLOON: deflated after $i s, MemTotal $(mem) kB"
sleep 2
echo "L2BALLOON: done"
"#;

/// The `L1RSS:` samples (kB) in the log, in order (printed after vessel exits; a line that is
/// not a whole sample is skipped).
fn rss_samples(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("L1RSS: "))
        .filter_map(|l| l.strip_suffix(" kB")?.trim().parse().ok())
        .collect()
}

#[test]
fn debian_kernel_balloon_returns_memory_to_the_host() {
    let setup = repo_root().join(format!(
        "target/nested-balloon-setup-{}.sh",
        std::process::id()
    ));
    std::fs::write(&setup, BALLOON_L1).unwrap();
    let setup_file = format!("{}:/balloon-setup.sh", setup.display());
    let after = setup.with_extension("after");
    std::fs::write(&after, BALLOON_L1_AFTER).unwrap();
    let after_file = format!("{}:/l1-after", after.display());
    let log = nested_run(&[
        "--timeout",
        "900",
        "--l1-file",
        &setup_file,
        "--l1-file",
        &after_file,
        "--vessel-args",
        "run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 1 --memory 512M \
         --balloon size=0,stats=on --api-socket /tmp/balloon.sock \
         --cmdline 'console=ttyS0 panic=1 l2mods=virtio_mmio,virtio_balloon' \
         $(sh /balloon-setup.sh)",
        "--l2-cmd",
        BALLOON_L2,
    ]);
    let _ = std::fs::remove_file(&setup);
    let _ = std::fs::remove_file(&after);
    assert!(log.contains("L2BALLOON: done"), "{log}");
    // L1 inflated once the guest had dirtied its memory, which Vessel then held: 256 MiB of
    // it went back to the host (allow for pages the guest kept busy).
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("L1BALLOON: inflated, rss "))
        .unwrap_or_else(|| panic!("no inflation in:\n{log}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (after, peak) = (nums[0], nums[1]);
    assert!(peak >= 320 * 1024, "peak RSS {peak} kB\n{log}");
    assert!(
        after + 200 * 1024 <= peak,
        "RSS after inflating: {after} kB, peak {peak} kB\n{log}"
    );
    assert!(log.contains("\"actual_bytes\":268435456"), "{log}");
    // The guest saw its memory go and come back.
    assert!(log.contains("L2BALLOON: inflated after"), "{log}");
    assert!(log.contains("L1BALLOON: deflated"), "{log}");
    assert!(log.contains("L2BALLOON: deflated after"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
    // Every sample was read; the peak is the guest's dirtying.
    assert!(rss_samples(&log).iter().any(|&r| r >= 320 * 1024), "{log}");
}

/// `/init` of the ext4 root file system: the first boot writes a file, syncs and reboots; the
/// second finds the file and powers off.
const ROOTFS_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "ROOTFS: / is $(grep ' / ' /proc/mounts | cut -d' ' -f1,3,4)"
if [ -f /persist ]; then
    echo "ROOTFS: after reboot: $(cat /persist)"
    poweroff -f
else
    echo "written before reboot $(cat /proc/sys/kernel/random/uuid)" > /persist
    sync
    echo "ROOTFS: wrote $(cat /persist), rebooting"
    reboot -f
fi
sleep 10
"#;

#[test]
fn debian_kernel_ext4_root_survives_write_sync_and_reboot() {
    // An ext4 image with busybox and the init above (mkfs.ext4 -d copies a directory in).
    let image = ext4_root(&std::process::id().to_string(), ROOTFS_INIT);
    let l1_file = format!("{}:/root.ext4", image.display());
    let log = nested_run(&[
        "--timeout",
        "900",
        "--l1-file",
        &l1_file,
        "--vessel-args",
        "run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 2 --memory 512M \
         --disk path=/root.ext4 --on-reboot restart \
         --cmdline 'console=ttyS0 panic=1 l2mods=virtio_mmio,virtio_blk l2root=/dev/vda'",
    ]);
    // Mounted read-write as the root, written, synced; the VM reset and booted again in the
    // same Vessel, and the second boot read the file back.
    assert!(log.contains("ROOTFS: / is /dev/vda ext4 rw"), "{log}");
    let wrote = log
        .lines()
        .find_map(|l| l.strip_prefix("ROOTFS: wrote "))
        .unwrap_or_else(|| panic!("no write in:\n{log}"));
    let content = wrote.trim_end_matches(", rebooting");
    assert!(
        log.contains(&format!("ROOTFS: after reboot: {content}")),
        "{log}"
    );
    assert!(
        log.contains("restarting") || log.matches("Linux version").count() >= 2,
        "{log}"
    );
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
    // And the host sees a clean file system with the file in it.
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&image)
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let _ = std::fs::remove_file(&image);
}
