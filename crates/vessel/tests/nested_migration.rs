//! Snapshots and live migration with Debian's stock kernel as L2 in the nested test host (see
//! tests/nested/README.md): L2 writes numbered records to its virtio disk and keeps a TCP
//! connection to an echo server in L1 busy, while L1 pauses it, snapshots it, kills it and
//! restores it in a new Vessel (two more tests then migrate that one to a third, with pre-copy
//! or post-copy). L2 then checks that every record is on the disk and every line came back
//! over the one connection. Slow (TCG) and needs what `scripts/setup --tests` installs.

mod common;

use common::nested::*;

/// L1's script (run instead of a single vessel by l1-init): three Vessels in turn.
const L1_CMD: &str = r#"
V=/vessel
insmod /lib/modules/tun.ko || echo "L1MIG: insmod tun failed"
ip link set lo up
mkdir -p /tmp
# The tap comes and goes with the Vessel that created it: give it its address each time.
( while :; do
    if ip link show vtap0 >/dev/null 2>&1 && ! ip addr show vtap0 | grep -q 10.0.2.2; then
        ip addr add 10.0.2.2/24 dev vtap0 && ip link set vtap0 up && echo "L1MIG: vtap0 up"
    fi
    sleep 0.3
  done ) &
nc -ll -p 7000 -e /bin/cat &
# The stall watchdog: when the guest's records and echoes stop coming for 60 s while a Vessel
# runs, dump what each Vessel thread is doing (state, CPU time, kernel stack) and KVM's exit counters
# (twice, 5 s apart) and L1's interrupts, then power off: the test fails with the evidence.
# It runs at the highest priority, in case the stall starves L1's other processes.
diag() {
    mount -t debugfs none /sys/kernel/debug 2>/dev/null
    for round in 1 2; do
        echo "L1DIAG: round $round, uptime $(cut -d' ' -f1 /proc/uptime)"
        for pid in $(pidof vessel); do
            for t in /proc/$pid/task/*; do
                echo "L1DIAG: pid $pid $(cat $t/comm) state/utime/stime $(cut -d' ' -f3,14,15 $t/stat) wchan $(cat $t/wchan 2>/dev/null)"
                sed 's/^/L1DIAG:     /' $t/stack 2>/dev/null
            done
        done
        for f in /sys/kernel/debug/kvm/*; do
            [ -f "$f" ] && echo "L1DIAG: kvm $(basename $f) $(cat $f 2>/dev/null)"
        done
        sed 's/^/L1DIAG: irq /' /proc/interrupts
        for s in /tmp/*.sock; do $V ctl --json --api-socket $s info 2>&1 | tr -d '\n' | sed "s|^|L1DIAG: $s |"; echo; done
        sleep 5
    done
}
watchdog() {
    last=-1; same=0
    while :; do
        # Progress: records written, or lines echoed over TCP (after the last record).
        n="$(cat /tmp/*.out 2>/dev/null | grep -c "L2MIG: record") $(cat /tmp/*.out 2>/dev/null | sed -n 's/.*echoed //p' | tail -n 1)"
        if [ "$n" = "$last" ] && pidof vessel >/dev/null; then same=$((same + 1)); else same=0; fi
        last=$n
        if [ $same -ge 60 ] && ! grep -q "L2MIG: disk records" /tmp/*.out 2>/dev/null; then
            echo "L1MIG: STALL: no new record or echo for 60 s (records, echoed: $n)"
            tail -n 60 /tmp/net.diag
            diag
            poweroff -f
        fi
        sleep 1
    done
}
# Every 3 s: each Vessel's NIC counters and L1's side of the echo connection (its send queue
# and retransmission timer in /proc/net/tcp: port 7000 is 1B58), to tell a guest that
# receives nothing from a host that sends nothing.
( while :; do
    for s in /tmp/*.sock; do
        [ -S "$s" ] || continue
        c=$($V ctl --json --api-socket $s counters 2>/dev/null | tr -d ' \n' | sed -n 's/.*"nics":\[{\([^]]*\)}\].*/\1/p')
        [ -n "$c" ] && echo "L1NET: $(basename $s) $c"
    done
    awk '$2 ~ /:1B58$/ && $4 == "01" { print "L1NET: tcp tx_queue:rx_queue " $5 " timer " $6 " retrans " $7 }' /proc/net/tcp
    sleep 3
  done ) > /tmp/net.diag 2>&1 &
watchdog &
# At the highest priority, so that it runs even if a stalled guest starves L1's processes.
renice -n -20 -p $! >/dev/null 2>&1
wait_for() { i=0; while ! grep -q "$2" "$1" 2>/dev/null; do i=$((i + 1)); [ $i -gt 600 ] && echo "L1MIG: no '$2' in $1" && return 1; sleep 0.5; done; }
ARGS="--kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus 1 --memory 256M \
 --disk path=/disk.raw --net tap=vtap0,mac=52:54:00:12:34:56"

$V run $ARGS --api-socket /tmp/a.sock \
  --cmdline "console=ttyS0 panic=1 l2mods=virtio_mmio,virtio_blk,virtio_net" | tee /tmp/a.out &
wait_for /tmp/a.out "L2MIG: record 20 " || exit 1
$V ctl --api-socket /tmp/a.sock pause && $V ctl --api-socket /tmp/a.sock snapshot --dir /tmp/snap || exit 1
echo "L1MIG: snapshot taken, $(du -k /tmp/snap/memory | cut -f1) KiB of memory on disk"
kill $(pidof vessel) ; sleep 1
# The file exists before tail looks (the shell creates it in the background job).
: > /tmp/b.out
$V run --restore /tmp/snap --api-socket /tmp/b.sock >> /tmp/b.out 2>&1 &
restored=$!
tail -n +1 -f /tmp/b.out &
wait_for /tmp/b.out "L2MIG: record 50 " || exit 1
echo "L1MIG: restored VM is writing"
if [ -n "$MIGRATE" ]; then
    $V serve --api-socket /tmp/c.sock > /tmp/c.out 2>&1 &
    restored=$!
    sleep 1
    # The target's own bindings for the disk and the tap; it makes the token.
    $V ctl --api-socket /tmp/c.sock migrate receive --listen unix:/tmp/mig.sock \
      --disk /disk.raw --tap vtap0 > /tmp/recv.out || exit 1
    sed -n 's/^token: //p' /tmp/recv.out > /tmp/mig.token
    $V ctl --json --api-socket /tmp/b.sock migrate send $SEND_ARGS --token-file /tmp/mig.token \
      --to unix:/tmp/mig.sock >/dev/null || exit 1
    echo "L1MIG: migrated"
    # Post-copy: the pages the target's pager fetched from the source after it started.
    [ -n "$SEND_ARGS" ] && ( sleep 8; $V ctl --json --api-socket /tmp/c.sock info \
        | grep '"copied_pages"' | sed 's/^ */L1MIG: pager /' ) &
    tail -n +1 -f /tmp/c.out &
fi
wait $restored
rc=$?
sleep 1
echo "L1MIG: last VMM exit code $rc"
grep -v '^$' /tmp/net.diag | tail -n 60
exit $rc
"#;

/// L2's side: numbered 512-byte records written (and flushed) one by one to the disk, and
/// numbered lines through one TCP connection to L1's echo server; then both are checked.
const L2_CMD: &str = r#"ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
N=150
( i=0; while [ $i -lt $N ]; do echo "ping $i"; i=$((i + 1)); sleep 0.3; done; sleep 8 ) \
    | nc 10.0.2.2 7000 > /tmp/echo.out &
tcp=$!
( while :; do echo "L2MIG: beat $(cut -d' ' -f1 /proc/uptime) echoed $(wc -l < /tmp/echo.out)"; sleep 3; done ) &
beat=$!
i=0
while [ $i -lt $N ]; do
    printf 'rec %08d\n' $i | dd of=/dev/vda bs=512 seek=$i conv=notrunc,fsync 2>/dev/null
    echo "L2MIG: record $i written"
    i=$((i + 1))
    sleep 0.3
done
wait $tcp
kill $beat
bad=0
i=0
while [ $i -lt $N ]; do
    got=$(dd if=/dev/vda bs=512 skip=$i count=1 2>/dev/null | head -c 12)
    [ "$got" = "$(printf 'rec %08d' $i)" ] || { bad=$((bad + 1)); echo "L2MIG: record $i is '$got'"; }
    i=$((i + 1))
done
echo "L2MIG: disk records bad: $bad"
lines=$(wc -l < /tmp/echo.out)
expect=$(i=0; while [ $i -lt $N ]; do echo "ping $i"; i=$((i + 1)); done | md5sum | cut -d' ' -f1)
echo "L2MIG: echoed lines $lines, match $([ "$(md5sum < /tmp/echo.out | cut -d' ' -f1)" = "$expect" ] && echo yes || echo no)"
echo "L2MIG: done"
"#;

/// After the restore: nothing more, or a live migration of the restored VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Nothing,
    PreCopy,
    /// Post-copy right after the first round.
    PostCopy,
}

/// Runs the L1 script; returns the log.
fn run_l1(then: Then) -> String {
    let tun = nested_env("NESTED_MODDIR").join("kernel/drivers/net/tun.ko");
    let tag = format!("{}-{then:?}", std::process::id());
    let disk = repo_root().join(format!("target/nested-mig-{tag}.raw"));
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let cmd = repo_root().join(format!("target/nested-mig-{tag}.sh"));
    let (migrate, send_args) = match then {
        Then::Nothing => ("", ""),
        Then::PreCopy => ("1", ""),
        Then::PostCopy => ("1", "--post-copy --post-copy-after 1"),
    };
    let script = format!("MIGRATE={migrate}\nSEND_ARGS='{send_args}'\n{L1_CMD}");
    std::fs::write(&cmd, script).unwrap();
    let log = nested_run(&[
        "--timeout",
        "600",
        "--l1-memory",
        "3072",
        "--l1-file",
        &format!("{}:/lib/modules/tun.ko", tun.display()),
        "--l1-file",
        &format!("{}:/disk.raw", disk.display()),
        "--l1-file",
        &format!("{}:/l1-cmd", cmd.display()),
        "--l2-cmd",
        L2_CMD,
    ]);
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&cmd);
    log
}

#[test]
fn debian_guest_keeps_its_disk_and_tcp_connection_across_snapshot_and_restore() {
    let log = run_l1(Then::Nothing);
    assert!(log.contains("L1MIG: snapshot taken"), "{log}");
    assert!(log.contains("L1MIG: restored VM is writing"), "{log}");
    assert!(log.contains("L2MIG: disk records bad: 0"), "{log}");
    assert!(log.contains("L2MIG: echoed lines 150, match yes"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}

/// The same, then a live migration of the restored VM to a third Vessel, with the disk
/// writes and the TCP traffic going on through pre-copy (device threads keep running).
#[test]
fn debian_guest_keeps_its_disk_and_tcp_connection_across_live_migration() {
    let log = run_l1(Then::PreCopy);
    assert_migrated(&log);
}

/// The same with post-copy forced after the first round: the migrated guest runs on the
/// target while its pager fetches the pages it lacks from the source (userfaultfd under
/// Linux's KVM with nested SVM).
#[test]
fn debian_guest_keeps_its_disk_and_tcp_connection_across_post_copy_migration() {
    let log = run_l1(Then::PostCopy);
    assert_migrated(&log);
    let copied: u64 = log
        .lines()
        // Anywhere in a line: L1's line is one write, but L2's console may have left half a
        // line before it.
        .find_map(|l| {
            l.split_once("L1MIG: pager \"copied_pages\": ")
                .map(|(_, n)| n)
        })
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no pager figures in the log:\n{log}"));
    assert!(copied > 0, "nothing came through post-copy:\n{log}");
}

fn assert_migrated(log: &str) {
    assert!(log.contains("L1MIG: snapshot taken"), "{log}");
    assert!(log.contains("L1MIG: migrated"), "{log}");
    assert!(log.contains("L2MIG: disk records bad: 0"), "{log}");
    assert!(log.contains("L2MIG: echoed lines 150, match yes"), "{log}");
    assert!(log.contains("L1: vessel exit code 0"), "{log}");
}
