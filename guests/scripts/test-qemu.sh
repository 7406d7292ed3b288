#!/usr/bin/env bash
# Smoke-test the guest under QEMU (TCG, and KVM when /dev/kvm works) and,
# with KVM, the Linux 64-bit entry through scripts/kvm-linux64.py.
#
#   guests/scripts/test-qemu.sh [ELF]
#
# Prints one line per case and "N passed, M failed" at the end; exits non-zero
# if any case failed.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
elf="${1:-}"
if [ -z "$elf" ]; then
    cargo build --quiet --release --manifest-path "$here/Cargo.toml" || exit 1
    elf="${CARGO_TARGET_DIR:-$here/target}/release/vessel-guest"
fi
out="$(mktemp)"
tmp="$(mktemp -d)"
echo_pid=""
vsock_pids=()
cleanup() {
    [ -n "$echo_pid" ] && kill "$echo_pid" 2>/dev/null
    for p in "${vsock_pids[@]}"; do kill "$p" 2>/dev/null; done
    rm -rf "$out" "$tmp"
}
trap cleanup EXIT
pass=0 fail=0

# check NAME EXPECTED_STATUS EXPECTED_CPUS EXPECT_FINAL_LINE(yes/no) -- command...
check() {
    local name="$1" want="$2" cpus="$3" final="$4"
    shift 5
    local start end rc why=""
    start=$(date +%s%N)
    timeout 120 "$@" >"$out" 2>&1
    rc=$?
    end=$(date +%s%N)
    [ "$rc" = "$want" ] || why="status $rc, want $want;"
    # (under -M pc, SeaBIOS output precedes the banner on the same line)
    grep -q 'Vessel guest 0\.1\.0 (boot: \(pvh\|linux64\))$' "$out" || why="$why no banner;"
    grep -q '^memory: [0-9]* MiB usable$' "$out" || why="$why no memory line;"
    if [ "$final" = yes ]; then
        grep -q "^cpus: $cpus (apic ids:\( [0-9]*\)*)$" "$out" || why="$why no 'cpus: $cpus';"
        local ran
        ran=$(grep -c '^cpu [0-9]*: apic id [0-9]*, ring 3 (cpl 3), work ok 0x[0-9a-f]\{16\}$' "$out")
        [ "$ran" = "$cpus" ] || why="$why $ran cpu lines;"
        [ "$(grep '^cpu [0-9]*:' "$out" | awk '{print $NF}' | sort -u | wc -l)" = 1 ] || why="$why checksums differ;"
        grep -q "^all $cpus cpus ran in ring 3$" "$out" || why="$why no final line;"
    fi
    if [ -z "$why" ]; then
        pass=$((pass + 1))
        printf 'ok   %-45s %5d ms\n' "$name" $(((end - start) / 1000000))
    else
        fail=$((fail + 1))
        printf 'FAIL %-45s %s\n' "$name" "$why"
        sed 's/^/     | /' "$out" | tail -20
    fi
}

q=("$here/run-qemu.sh" -e "$elf")

for m in microvm pc; do
    check "tcg $m 4 cpus exit:0" 1 4 yes -- "${q[@]}" -m $m -s 4 -a "action=exit:0"
    check "tcg $m 4 cpus exit:7 work=2" 15 4 yes -- "${q[@]}" -m $m -s 4 -a "action=exit:7 work=2"
    check "tcg $m poweroff" 0 4 yes -- "${q[@]}" -m $m -s 4 -a "action=poweroff"
    check "tcg $m reboot" 0 4 yes -- "${q[@]}" -m $m -s 4 -a "action=reboot"
    check "tcg $m triplefault" 0 4 yes -- "${q[@]}" -m $m -s 4 -a "action=triplefault"
done
check "tcg microvm acpi=off (MP table) 3 cpus" 1 3 yes -- "${q[@]}" -m microvm,acpi=off -s 3
check "tcg microvm 1 cpu 16 MiB" 1 1 yes -- "${q[@]}" -m microvm -s 1 -M 16
check "tcg microvm bad option" 3 0 no -- "${q[@]}" -m microvm -s 1 -a "work=abc"
check "tcg microvm exception (action=fault)" 5 2 yes -- "${q[@]}" -m microvm -s 2 -a "action=fault"

# --- virtio drivers (TCG) ---
# vcheck NAME EXPECTED_STATUS PATTERN... -- command...: every PATTERN (a
# grep -E regex) must match a whole line of the output.
vcheck() {
    local name="$1" want="$2"
    shift 2
    local pats=() rc why="" start end
    while [ "$1" != "--" ]; do pats+=("$1"); shift; done
    shift
    start=$(date +%s%N)
    timeout 120 "$@" >"$out" 2>&1
    rc=$?
    end=$(date +%s%N)
    [ "$rc" = "$want" ] || why="status $rc, want $want;"
    for p in "${pats[@]}"; do
        grep -Eq "^$p\$" "$out" || why="$why no line '$p';"
    done
    vresult "$name" "$why" $(((end - start) / 1000000))
}

vresult() {
    if [ -z "$2" ]; then
        pass=$((pass + 1))
        printf 'ok   %-45s %5d ms\n' "$1" "${3:-0}"
    else
        fail=$((fail + 1))
        printf 'FAIL %-45s %s\n' "$1" "$2"
        sed 's/^/     | /' "$out" | tail -20
    fi
}

# diskcheck NAME IMAGE: the guest's pattern reached the host file (sectors
# 8..15 and the last sector).
diskcheck() {
    local name="$1" img="$2" why="" last s
    last=$(($(stat -c %s "$img") / 512 - 1))
    for s in 8 15 "$last"; do
        dd if="$img" bs=512 skip="$s" count=1 status=none | head -c 40 |
            grep -aq "^vessel virtio-blk sector $s\$" || why="$why sector $s lacks the pattern;"
    done
    vresult "$name" "$why"
}

newdisk() {
    rm -f "$tmp/$1"
    qemu-img create -q -f raw "$tmp/$1" "$2"
    echo "$tmp/$1"
}

# A UDP echo server on the host for net=echo-peer: QEMU's user networking
# forwards 10.0.2.2:PORT to the host's 127.0.0.1:PORT.
python3 -u -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(data, addr)
' >"$tmp/echo-port" &
echo_pid=$!
for _ in $(seq 50); do [ -s "$tmp/echo-port" ] && break; sleep 0.1; done
eport=$(cat "$tmp/echo-port")

legacy_off=(-global virtio-mmio.force-legacy=false)
blk='virtio-blk (mmio@0x[0-9a-f]+|pci@00:[0-9a-f]{2}\.[0-7]) [0-9]+ sectors: write/read/flush ok serial'
net_ok="virtio-net .* mac 52:54:00:12:34:56: sent [0-9]+, received [1-9][0-9]*"

d=$(newdisk mmio.raw 1M)
vcheck "tcg microvm virtio-mmio (cmdline) blk rng net echo" 1 \
    "$blk 'mmio-disk'" "virtio-rng mmio@0x[0-9a-f]+: ok" "$net_ok" "virtio-net echo ok" \
    "all 1 cpus ran in ring 3" -- \
    "${q[@]}" -m microvm,acpi=off -s 1 -a "virtio=blk,rng,net net=echo-peer netpeer=10.0.2.2:$eport" \
    -- "${legacy_off[@]}" -drive id=d0,file="$d",format=raw,if=none \
    -device virtio-blk-device,drive=d0,serial=mmio-disk -device virtio-rng-device \
    -netdev user,id=n0 -device virtio-net-device,netdev=n0
diskcheck "  mmio disk image holds the pattern" "$d"

d=$(newdisk acpi.raw 3M)
vcheck "tcg microvm virtio-mmio (DSDT) blk rng, 2 cpus" 1 \
    "$blk ''" "virtio-rng mmio@0x[0-9a-f]+: ok" "all 2 cpus ran in ring 3" -- \
    "${q[@]}" -m microvm -s 2 -- "${legacy_off[@]}" -drive id=d0,file="$d",format=raw,if=none \
    -device virtio-blk-device,drive=d0 -device virtio-rng-device
diskcheck "  DSDT disk image holds the pattern" "$d"

d=$(newdisk pc.raw 2M)
vcheck "tcg pc virtio-pci blk rng net echo" 1 \
    "$blk 'pc-disk'" "virtio-rng pci@00:[0-9a-f]{2}\.0: ok" "$net_ok" "virtio-net echo ok" -- \
    "${q[@]}" -m pc -s 2 -a "net=echo-peer netpeer=10.0.2.2:$eport" \
    -- -drive id=d0,file="$d",format=raw,if=none \
    -device virtio-blk-pci,drive=d0,disable-legacy=on,serial=pc-disk \
    -device virtio-rng-pci,disable-legacy=on \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,disable-legacy=on
diskcheck "  pc disk image holds the pattern" "$d"

d=$(newdisk q35.raw 1M)
vcheck "tcg q35 virtio-pci (ECAM, pcibar=assign) blk rng" 1 \
    "$blk ''" "virtio-rng pci@00:[0-9a-f]{2}\.0: ok" -- \
    "${q[@]}" -m q35 -s 1 -a "virtio=blk,rng pcibar=assign" \
    -- -drive id=d0,file="$d",format=raw,if=none -device virtio-blk-pci,drive=d0,disable-legacy=on \
    -device virtio-rng-pci,disable-legacy=on
diskcheck "  q35 disk image holds the pattern" "$d"

d=$(newdisk pcie.raw 1M)
vcheck "tcg microvm pcie (no firmware BARs) blk, transitional rng" 1 \
    "$blk ''" "virtio-rng pci@00:[0-9a-f]{2}\.0: ok" -- \
    "${q[@]}" -m microvm,pcie=on -s 1 -a "virtio=all pciecam=0xe0000000 pciwindow=0xc0000000" \
    -- -drive id=d0,file="$d",format=raw,if=none -device virtio-blk-pci,drive=d0,disable-legacy=on \
    -device virtio-rng-pci
diskcheck "  pcie disk image holds the pattern" "$d"

vcheck "tcg microvm virtio=blk without a device (status 5)" 11 \
    "FAIL: virtio-blk: no device found" -- "${q[@]}" -m microvm -s 1 -a "virtio=blk"
vcheck "tcg microvm virtio=all without a device" 1 \
    "virtio: none found" "all 1 cpus ran in ring 3" -- "${q[@]}" -m microvm -s 1 -a "virtio=all"
vcheck "tcg microvm legacy virtio-mmio is skipped" 1 \
    "virtio: mmio@0x[0-9a-f]+: legacy \(version 1\) device type 4 skipped" -- \
    "${q[@]}" -m microvm -s 1 -- -device virtio-rng-device

# vsock through QEMU's vhost-user-vsock and rust-vmm's vhost-device-vsock
# (`cargo install vhost-device-vsock`; on PATH or in $VHOST_DEVICE_VSOCK), if
# installed: the daemon maps a guest connection to host port 1234 onto the
# Unix socket <uds>_1234, where a Python echo server listens. One daemon per
# VM (it may exit when QEMU disconnects).
vhd="${VHOST_DEVICE_VSOCK:-$(command -v vhost-device-vsock || true)}"
vsock_case() {
    local name="$1" machine="$2" dev="$3" pattern="$4"
    shift 4
    rm -f "$tmp"/vm.vsock* "$tmp/vhost.sock"
    python3 -u -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(4)
print("ready")
while True:
    c, _ = s.accept()
    while True:
        data = c.recv(4096)
        if not data:
            break
        c.sendall(data)
    c.close()
' "$tmp/vm.vsock_1234" >"$tmp/vsock-echo" &
    vsock_pids+=($!)
    "$vhd" --guest-cid 3 --socket "$tmp/vhost.sock" --uds-path "$tmp/vm.vsock" >"$tmp/vhd.log" 2>&1 &
    vsock_pids+=($!)
    for _ in $(seq 50); do [ -S "$tmp/vhost.sock" ] && [ -s "$tmp/vsock-echo" ] && break; sleep 0.1; done
    vcheck "$name" 1 "$pattern" -- \
        "${q[@]}" -m "$machine,memory-backend=mem" -s 1 -M 256 -a "virtio=vsock vsock=1234" \
        -- "$@" -object memory-backend-memfd,id=mem,size=256M,share=on \
        -chardev socket,id=vs0,path="$tmp/vhost.sock" -device "$dev,chardev=vs0"
    for p in "${vsock_pids[@]}"; do kill "$p" 2>/dev/null; done
    vsock_pids=()
}
if [ -n "$vhd" ] && [ -x "$vhd" ]; then
    vsock_case "tcg microvm vhost-user-vsock (mmio) echo" microvm,acpi=off vhost-user-vsock-device \
        "virtio-vsock mmio@0x[0-9a-f]+ cid 3: echo ok" "${legacy_off[@]}"
    vsock_case "tcg q35 vhost-user-vsock-pci echo" q35 vhost-user-vsock-pci,disable-legacy=on \
        "virtio-vsock pci@00:[0-9a-f]{2}\\.0 cid 3: echo ok"
else
    echo "skip vsock cases: vhost-device-vsock not installed"
fi

if [ -w /dev/kvm ]; then
    for s in 1 2 4; do
        check "kvm microvm $s cpus exit:0" 1 $s yes -- "${q[@]}" -k -m microvm -s $s -a "action=exit:0"
    done
    check "kvm microvm poweroff" 0 2 yes -- "${q[@]}" -k -m microvm -s 2 -a "action=poweroff"
    check "kvm microvm triplefault" 0 2 yes -- "${q[@]}" -k -m microvm -s 2 -a "action=triplefault"
    check "kvm microvm exception (action=fault)" 5 2 yes -- "${q[@]}" -k -m microvm -s 2 -a "action=fault"
    d=$(newdisk kvm.raw 1M)
    vcheck "kvm microvm virtio-mmio blk rng net echo" 1 \
        "$blk 'kvm-disk'" "virtio-rng mmio@0x[0-9a-f]+: ok" "$net_ok" "virtio-net echo ok" \
        "all 2 cpus ran in ring 3" -- \
        "${q[@]}" -k -m microvm,acpi=off -s 2 -a "net=echo-peer netpeer=10.0.2.2:$eport" \
        -- "${legacy_off[@]}" -drive id=d0,file="$d",format=raw,if=none \
        -device virtio-blk-device,drive=d0,serial=kvm-disk -device virtio-rng-device \
        -netdev user,id=n0 -device virtio-net-device,netdev=n0
    diskcheck "  kvm disk image holds the pattern" "$d"
    k=(python3 "$here/scripts/kvm-linux64.py" "$elf")
    check "kvm linux64 1 cpu exit:4" 4 1 yes -- "${k[@]}" -s 1 -a "action=exit:4"
    check "kvm linux64 4 cpus (MP table)" 0 4 yes -- "${k[@]}" -s 4
    check "kvm linux64 triplefault" 100 2 yes -- "${k[@]}" -s 2 -a "action=triplefault"
    check "kvm linux64 reboot" 101 2 yes -- "${k[@]}" -s 2 -a "action=reboot"
else
    echo "skip KVM cases: /dev/kvm not usable"
fi

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
