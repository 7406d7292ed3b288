#!/usr/bin/env bash
# run.sh --vessel PATH [options]
#
# Boots the nested test host: QEMU (TCG, emulated AMD SVM) runs the Debian
# cloud kernel as L1, whose /init loads kvm-amd and runs the static vessel
# binary, which boots the same kernel as L2 with a busybox initramfs.
# The whole serial console streams to stdout and to a log file.
# Exits 0 only if the log shows `L1: vessel exit code 0` (and every --expect
# string); otherwise prints one `nested: FAIL: <reason>` line and exits non-zero.
#
# Options:
#   --vessel PATH        static vessel binary (required), e.g.
#                        target/static/x86_64-unknown-linux-gnu/release/vessel
#   --vessel-args STR    arguments for vessel in L1, as shell words (quotes
#                        allowed). Default:
#                          run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz
#                              --cpus CPUS --memory MEM --cmdline "L2CMDLINE"
#   --cpus N             L2 vCPUs for the default vessel args (default 2)
#   --memory SIZE        L2 memory for the default vessel args (default 512M)
#   --l2-append STR      appended to the default L2 cmdline
#                        ("console=ttyS0 reboot=k panic=1"), e.g. "l2mods=virtio_blk"
#   --l2-cmd STR         shell script run by L2's /init (stored as /l2-cmd)
#   --l2-modules LIST    kernel modules (+deps) in the L2 initramfs
#   --l1-file SRC:DST    extra file in the L1 initramfs (repeatable)
#   --l1-modules LIST    kernel modules (+deps) L1 scripts may modprobe
#   --l1-bin PATH        a dynamically linked host program for L1, with its
#                        libraries (repeatable; e.g. /usr/sbin/dnsmasq)
#   --l2-file SRC:DST    extra file in the L2 initramfs (repeatable)
#   --l1-cpus N          L1 vCPUs (default 1: two make multi-threaded TCG flaky)
#   --l1-memory MB       L1 memory in MiB (default 2048)
#   --l1-append STR      extra L1 kernel parameters (e.g. "loglevel=7")
#   --expect STR         also require this fixed string in the log (repeatable)
#   --timeout SECS       kill QEMU after SECS seconds (default 300)
#   --log PATH           console log (default CACHE/logs/run-<time>-<pid>.log)
#   --cache DIR          prepare.sh cache (default $NESTED_CACHE_DIR or
#                        <repo>/.cache/nested)
#   --keep               keep the work dir (initramfs images) for inspection
#   --reference-qemu     instead of vessel, run the host's QEMU inside L1
#                        (-enable-kvm -M microvm, same L2 kernel/initrd/cmdline):
#                        a known-good VMM to compare vessel against. --vessel
#                        is then not needed; --vessel-args, if given, are the
#                        QEMU arguments.
#
# Exit codes: 0 pass; 1 fail (vessel non-zero, L1 fatal, missing marker or
# --expect string); 2 usage or setup error; 3 timeout.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail_setup() { printf 'nested: FAIL: %s\n' "$*"; exit 2; }

VESSEL="" VESSEL_ARGS="" HAVE_VESSEL_ARGS=0
L2_CPUS=2 L2_MEM=512M L2_APPEND=""
# One L1 vCPU: QEMU's multi-threaded TCG with two vCPUs and emulated SVM crashes L1 or L2
# now and then (about one run in four, also with QEMU itself as the L1 VMM); with one it has not.
# L2 still gets two vCPUs, time-shared on it.
L1_CPUS=1 L1_MEM=2048 L1_APPEND=""
TIMEOUT=300 LOG="" KEEP=0 REFERENCE=0
CACHE_DIR="${NESTED_CACHE_DIR:-$DEFAULT_CACHE_DIR}"
BUILD_ARGS=() EXPECT=()

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --keep) KEEP=1; shift; continue ;;
        --reference-qemu) REFERENCE=1; shift; continue ;;
        --vessel|--vessel-args|--cpus|--memory|--l2-append|--l2-cmd|--l2-modules|\
        --l1-file|--l1-bin|--l1-modules|--l2-file|--l1-cpus|--l1-memory|--l1-append|--expect|--timeout|\
        --log|--cache)
            [ $# -ge 2 ] || fail_setup "option $1 needs a value (try --help)" ;;
        *) fail_setup "unknown argument '$1' (try --help)" ;;
    esac
    case "$1" in
        --vessel) VESSEL="$2" ;;
        --vessel-args) VESSEL_ARGS="$2"; HAVE_VESSEL_ARGS=1 ;;
        --cpus) L2_CPUS="$2" ;;
        --memory) L2_MEM="$2" ;;
        --l2-append) L2_APPEND="$2" ;;
        --l2-cmd|--l2-modules|--l1-file|--l1-bin|--l1-modules|--l2-file) BUILD_ARGS+=("$1" "$2") ;;
        --l1-cpus) L1_CPUS="$2" ;;
        --l1-memory) L1_MEM="$2" ;;
        --l1-append) L1_APPEND="$2" ;;
        --expect) EXPECT+=("$2") ;;
        --timeout) TIMEOUT="$2" ;;
        --log) LOG="$2" ;;
        --cache) CACHE_DIR="$2" ;;
    esac
    shift 2
done
[ -n "$VESSEL" ] || [ "$REFERENCE" = 1 ] || fail_setup "--vessel PATH is required (try --help)"
case "$TIMEOUT" in ''|*[!0-9]*) fail_setup "--timeout wants whole seconds, got '$TIMEOUT'" ;; esac

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- prepare and build --------------------------------------------------------
# Errors from these steps print their own message; turn them into FAIL lines.
if [ "$REFERENCE" = 0 ] && ! err="$( (check_static "$VESSEL") 2>&1 )"; then
    printf '%s\n' "$err" >&2
    fail_setup "$(printf '%s\n' "$err" | head -n1 | sed 's/^nested: error: //')"
fi
"$NESTED_DIR/prepare.sh" "$CACHE_DIR" || fail_setup "prepare.sh failed (see above)"
load_env "$CACHE_DIR"
need_cmd qemu-system-x86_64 "apt-get install qemu-system-x86"
need_cmd timeout; need_cmd mkfifo

# shell_quote STR: STR as one single-quoted POSIX shell word.
shell_quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
L2_CMDLINE="console=ttyS0 reboot=k panic=1${L2_APPEND:+ $L2_APPEND}"
if [ "$HAVE_VESSEL_ARGS" = 1 ]; then
    :
elif [ "$REFERENCE" = 1 ]; then
    VESSEL_ARGS="-enable-kvm -cpu host -M microvm -smp $L2_CPUS -m $L2_MEM -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel /l2/vmlinuz -initrd /l2/initrd.cpio.gz -append $(shell_quote "$L2_CMDLINE")"
else
    VESSEL_ARGS="run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio.gz --cpus $L2_CPUS --memory $L2_MEM --cmdline $(shell_quote "$L2_CMDLINE")"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/vessel-nested.XXXXXX")"
QEMU_PID="" TEE_PID=""
# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    # Never leave QEMU behind, whatever killed us.
    if [ -n "$QEMU_PID" ]; then kill "$QEMU_PID" 2>/dev/null || true; fi
    if [ -n "${WATCH_PID:-}" ]; then kill "$WATCH_PID" 2>/dev/null || true; fi
    if [ -n "${MON_PID:-}" ]; then kill "$MON_PID" 2>/dev/null || true; fi
    if [ -n "$TEE_PID" ]; then kill "$TEE_PID" 2>/dev/null || true; fi
    if [ "$KEEP" = 1 ]; then msg "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Reference mode: bundle the host's (dynamically linked) QEMU, its libraries
# and the firmware it needs into a tree for L1, with a /vessel wrapper.
if [ "$REFERENCE" = 1 ]; then
    REF="$WORK/refqemu"
    QBIN="$(command -v qemu-system-x86_64)"
    mkdir -p "$REF/qemu/share"
    cp -L "$QBIN" "$REF/qemu/qemu-system-x86_64"
    for lib in $(ldd "$QBIN" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        mkdir -p "$REF$(dirname "$lib")"
        cp -L "$lib" "$REF$lib"
    done
    for fw in bios-microvm.bin qboot.rom linuxboot_dma.bin pvh.bin kvmvapic.bin; do
        if [ -e "/usr/share/qemu/$fw" ]; then cp -L "/usr/share/qemu/$fw" "$REF/qemu/share/"; fi
    done
    printf '#!/bin/sh\nexec /qemu/qemu-system-x86_64 -L /qemu/share "$@"\n' > "$WORK/vessel-ref"
    chmod +x "$WORK/vessel-ref"
    VESSEL="$WORK/vessel-ref"
    BUILD_ARGS+=(--allow-dynamic --l1-tree "$REF")
fi

"$NESTED_DIR/build-initramfs.sh" --cache "$CACHE_DIR" --out "$WORK" --vessel "$VESSEL" \
    --vessel-args "$VESSEL_ARGS" ${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"} ||
    fail_setup "build-initramfs.sh failed (see above)"
T_BUILT=$(elapsed)

if [ -z "$LOG" ]; then
    mkdir -p "$CACHE_DIR/logs"
    # Keep the 20 newest logs.
    { ls -1t "$CACHE_DIR/logs/"run-*.log 2>/dev/null || true; } | tail -n +20 | xargs -r rm -f
    LOG="$CACHE_DIR/logs/run-$(date +%Y%m%d-%H%M%S)-$$.log"
fi
mkdir -p "$(dirname "$LOG")"
: > "$LOG"

# ---- the stall watch --------------------------------------------------------
# No console output for STALL_SECS: ask the outer QEMU (its monitor) where L1's CPU is, five
# times a second apart, name the code (the kernel's System.map, or a module's base from
# L1's "L1: modules" line: L1 boots with nokaslr), log it, and end the run as stalled.
STALL_SECS="${NESTED_STALL_SECS:-150}"
# name_rip RIP: where RIP is: a module's function (from L1's "L1: modules" line and the
# module's own symbol table; Debian's System.map is a stub), kernel text, or user space.
name_rip() {
    local rip="$1" mod
    for mod in $(grep -o 'L1: modules .*' "$LOG" | tail -n1 | cut -d' ' -f3-); do
        local name="${mod%@*}" at="${mod#*@0x}"
        local base size off ko fn
        base="$(printf '%016x' "$((16#${at%:*}))")"
        size="${at#*:}"
        if [[ ! "$rip" < "$base" ]] && [[ "$rip" < "$(printf '%016x' "$((16#$base + size))")" ]]; then
            off=$((16#$rip - 16#$base))
            ko="$(find "$NESTED_MODDIR" -name "${name//_/-}.ko" -o -name "$name.ko" 2>/dev/null | head -n1)"
            fn=""
            if [ -n "$ko" ] && command -v objdump >/dev/null; then
                # The module's core starts with its .text: offsets in it are section offsets.
                local best=-1 a addr n
                while read -r addr n; do
                    a=$((16#$addr))
                    if [ "$a" -le "$off" ] && [ "$a" -gt "$best" ]; then best=$a; fn="$n"; fi
                done < <(objdump -t "$ko" | grep -F "$(printf ' F .text\t')" | awk '{ print $1, $NF }')
                [ -z "$fn" ] || fn="$fn+0x$(printf '%x' $((off - best)))"
            fi
            printf '%s: %s (offset 0x%x)' "$name" "${fn:-?}" "$off"
            return
        fi
    done
    if [[ ! "$rip" < "ffffffff80000000" ]]; then printf 'kernel text'
    elif [[ "$rip" < "0000800000000000" ]]; then printf 'user space'
    else printf 'unknown'; fi
}
watch_stall() {
    local last=-1 same=0 size i rip
    while sleep 5; do
        size="$(stat -c %s "$LOG" 2>/dev/null || echo 0)"
        if [ "$size" = "$last" ]; then same=$((same + 5)); else same=0; last="$size"; fi
        [ "$same" -ge "$STALL_SECS" ] || continue
        {
            echo "nested: STALL: no console output for ${STALL_SECS}s; where the outer QEMU has L1's CPU:"
            for i in 1 2 3 4 5; do printf 'info registers\n' > "$WORK/mon.in"; sleep 1; done
            sleep 1
            for rip in $(grep -o 'RIP=[0-9a-f]*' "$WORK/monitor.log" | cut -d= -f2 | tr 'A-F' 'a-f'); do
                echo "nested: STALL: RIP $rip $(name_rip "$rip")"
            done
            grep -E '^(RAX|RSI|R8 |R12|RIP|CS |CR0|EFER)' "$WORK/monitor.log" | head -n 16 | sed 's/^/nested: STALL: /'
        } | tee -a "$LOG"
        : > "$WORK/stalled"
        pkill -TERM -P "$QEMU_PID" 2>/dev/null || kill "$QEMU_PID" 2>/dev/null
        return
    done
}

# ---- boot L1 ------------------------------------------------------------------
# shellcheck disable=SC2054  # the commas belong to QEMU option values
QEMU=(qemu-system-x86_64
    -accel tcg,thread=multi
    -cpu qemu64,+svm,+npt
    -smp "$L1_CPUS" -m "$L1_MEM"
    -nodefaults -no-user-config -display none -vga none
    -serial stdio -no-reboot
    -kernel "$NESTED_KERNEL" -initrd "$WORK/l1-initrd.cpio"
    -monitor "pipe:$WORK/mon"
    -append "console=ttyS0 panic=-1 quiet nokaslr${L1_APPEND:+ $L1_APPEND}")
msg "log: $LOG"
msg "kernel $NESTED_KVER; timeout ${TIMEOUT}s; vessel args: $VESSEL_ARGS"
msg "qemu: ${QEMU[*]}"

# QEMU -> fifo -> sed (drop CRs, unbuffered) -> tee (stdout + log).
mkfifo "$WORK/console" "$WORK/mon.in" "$WORK/mon.out"
sed -u 's/\r*$//' < "$WORK/console" | tee -a "$LOG" &
TEE_PID=$!
# The outer QEMU's monitor (HMP), read by the stall watch.
cat "$WORK/mon.out" > "$WORK/monitor.log" &
MON_PID=$!
timeout --kill-after=10 "$TIMEOUT" "${QEMU[@]}" </dev/null >"$WORK/console" 2>&1 &
QEMU_PID=$!
watch_stall &
WATCH_PID=$!
QEMU_RC=0
wait "$QEMU_PID" || QEMU_RC=$?
QEMU_PID=""
kill "$WATCH_PID" "$MON_PID" 2>/dev/null || true
wait "$TEE_PID" || true
TEE_PID=""
T_END=$(elapsed)

# ---- verdict ------------------------------------------------------------------
last_line() { grep -E "$1" "$LOG" | tail -n1 || true; }
stage="$(last_line '^L[12]: ')"
stage="${stage:-no L1 or L2 marker line at all}"
stage="${stage:0:120}"
# Not anchored at ^: a guest that stopped mid-line may leave text before it.
exit_line="$(last_line 'L1: vessel exit code [0-9]+$')"
fatal_line="$(last_line '^L1: FATAL: ')"
panic_line="$(last_line 'Kernel panic')"
timing="(build ${T_BUILT}s, total ${T_END}s; log $LOG)"

verdict() { # verdict CODE REASON
    if [ "$1" = 0 ]; then printf 'nested: PASS: %s %s\n' "$2" "$timing"
    else printf 'nested: FAIL: %s %s\n' "$2" "$timing"; fi
    exit "$1"
}

if [ -f "$WORK/stalled" ]; then
    verdict 4 "stalled: no console output for ${STALL_SECS}s (see the STALL lines); last marker: $stage"
fi
if [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
    verdict 3 "timed out after ${TIMEOUT}s; last marker: $stage"
fi
[ -z "$fatal_line" ] || verdict 1 "${fatal_line#L1: FATAL: }"
if [ -z "$exit_line" ]; then
    if [ -n "$panic_line" ]; then
        verdict 1 "no vessel exit code; kernel panic: $panic_line; last marker: $stage"
    fi
    verdict 1 "no 'L1: vessel exit code' line (QEMU rc $QEMU_RC); last marker: $stage"
fi
code="${exit_line##* }"
[ "$code" = 0 ] || verdict 1 "vessel exited with code $code"
for s in ${EXPECT[@]+"${EXPECT[@]}"}; do
    grep -qF -- "$s" "$LOG" || verdict 1 "expected string not in log: $s"
done
verdict 0 "vessel exit code 0"
