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
trap 'rm -f "$out"' EXIT
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

if [ -w /dev/kvm ]; then
    for s in 1 2 4; do
        check "kvm microvm $s cpus exit:0" 1 $s yes -- "${q[@]}" -k -m microvm -s $s -a "action=exit:0"
    done
    check "kvm microvm poweroff" 0 2 yes -- "${q[@]}" -k -m microvm -s 2 -a "action=poweroff"
    check "kvm microvm triplefault" 0 2 yes -- "${q[@]}" -k -m microvm -s 2 -a "action=triplefault"
    check "kvm microvm exception (action=fault)" 5 2 yes -- "${q[@]}" -k -m microvm -s 2 -a "action=fault"
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
