//! virtio-net with a real Linux driver: Debian's kernel as L2 in the nested test host (see
//! tests/nested/README.md), on a multi-queue tap in L1. L1 serves a random file over HTTP on
//! the tap's 10.0.2.2; L2 (2 vCPUs, so its driver enables both queue pairs with the control
//! queue) downloads it, then serves a random file of its own that L1 fetches: TCP both ways
//! through the tap with the driver's offloads (checksum, TSO, mergeable receive buffers).
//! Both sides print MD5 sums, which must match. Slow (TCG) and needs what
//! `scripts/setup --tests` installs.

mod common;

use common::nested::*;

/// L1's side, run from the vessel argument list (a command substitution that prints nothing):
/// load tun, configure the tap Vessel creates, serve a random file, fetch L2's file once it is
/// served.
const L1_SETUP: &str = r#"#!/bin/sh
exec >/dev/console 2>&1
insmod /lib/modules/tun.ko || echo "L1NET: insmod tun failed"
ip link set lo up
mkdir -p /www
dd if=/dev/urandom of=/www/blob bs=64k count=16 2>/dev/null
echo "L1NET: blob md5 $(md5sum < /www/blob | cut -d' ' -f1) ."
(
    # busybox ip has no tuntap: Vessel creates the tap, configured here once it exists.
    i=0
    while ! ip link show vtap0 >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -gt 120 ] && echo "L1NET: no vtap0" && exit 1
        sleep 1
    done
    ip addr add 10.0.2.2/24 dev vtap0
    ip link set vtap0 up
    echo "L1NET: vtap0 up"
    httpd -p 10.0.2.2:8080 -h /www
    i=0
    while [ $i -lt 240 ]; do
        if wget -q -O /tmp/up http://10.0.2.15:8081/up 2>/dev/null; then
            echo "L1NET: fetched md5 $(md5sum < /tmp/up | cut -d' ' -f1) ."
            touch /www/fetched
            break
        fi
        i=$((i + 1))
        sleep 1
    done
) &
"#;

/// L2's side.
const L2_CMD: &str = r#"ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "L2NET: mac $(cat /sys/class/net/eth0/address) queues $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
if wget -q -O /tmp/blob http://10.0.2.2:8080/blob; then
    echo "L2NET: got md5 $(md5sum < /tmp/blob | cut -d' ' -f1) ."
else
    echo "L2NET: download failed"
fi
mkdir -p /srv
dd if=/dev/urandom of=/srv/up bs=64k count=16 2>/dev/null
echo "L2NET: up md5 $(md5sum < /srv/up | cut -d' ' -f1) ."
httpd -p 10.0.2.15:8081 -h /srv
i=0
while [ $i -lt 120 ]; do
    wget -q -O /dev/null http://10.0.2.2:8080/fetched 2>/dev/null && break
    i=$((i + 1))
    sleep 1
done
echo "L2NET: done after $i s"
grep virtio /proc/interrupts
"#;

/// The MD5 sum printed after `marker` in the log.
fn md5_after(log: &str, marker: &str) -> String {
    let at = log
        .find(marker)
        .unwrap_or_else(|| panic!("no '{marker}' in:\n{log}"));
    let sum: String = log[at + marker.len()..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    assert_eq!(sum.len(), 32, "'{marker}' in:\n{log}");
    sum
}

#[test]
fn debian_kernel_talks_tcp_through_a_tap() {
    let tun = nested_env("NESTED_MODDIR").join("kernel/drivers/net/tun.ko");
    let setup = repo_root().join(format!("target/nested-net-setup-{}.sh", std::process::id()));
    std::fs::write(&setup, L1_SETUP).unwrap();
    let tun_file = format!("{}:/lib/modules/tun.ko", tun.display());
    let setup_file = format!("{}:/net-setup.sh", setup.display());
    let log = nested_run(&[
        "--timeout",
        "900",
        "--l1-file",
        &tun_file,
        "--l1-file",
        &setup_file,
        "--vessel-args",
        "run --log-level warn,devices::virtio::net=info \
         --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 2 --memory 512M \
         --net tap=vtap0,mac=52:54:00:12:34:56,queues=2 \
         --cmdline 'console=ttyS0 reboot=k panic=1 l2mods=virtio_mmio,virtio_net' \
         $(sh /net-setup.sh)",
        "--l2-cmd",
        L2_CMD,
    ]);
    let _ = std::fs::remove_file(&setup);
    assert!(
        log.contains("L2NET: mac 52:54:00:12:34:56 queues rx-0 rx-1 tx-0 tx-1"),
        "{log}"
    );
    // The driver enabled both pairs (VQ_PAIRS_SET through the control queue) and the offloads.
    assert!(
        log.contains(
            "2 of 2 queue pairs served with a control queue, guest offloads [csum,tso4,tso6"
        ),
        "{log}"
    );
    assert!(log.contains("mergeable rx buffers"), "{log}");
    // Host to guest, then guest to host, byte for byte.
    assert_eq!(
        md5_after(&log, "L1NET: blob md5 "),
        md5_after(&log, "L2NET: got md5 ")
    );
    assert_eq!(
        md5_after(&log, "L2NET: up md5 "),
        md5_after(&log, "L1NET: fetched md5 ")
    );
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}
