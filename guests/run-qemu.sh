#!/usr/bin/env bash
# Boot the Vessel test guest under QEMU.
#
#   guests/run-qemu.sh [options] [-- extra qemu args]
#     -m MACHINE   microvm (default) or pc
#     -k           use KVM (-enable-kvm -cpu host) instead of TCG (-cpu max)
#     -s N         CPUs (default 4)
#     -M MIB       memory in MiB (default 256)
#     -a ARGS      kernel command line (default "")
#     -e ELF       guest ELF (default: build it and use guests/target/release/vessel-guest)
#
# Exit status is QEMU's: with isa-debug-exit a guest status N gives (N << 1) | 1;
# 0 means the VM stopped some other way (poweroff, reboot with -no-reboot, triple fault).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
machine=microvm accel=tcg smp=4 mem=256 append="" elf=""
while getopts "m:ks:M:a:e:h" opt; do
    case "$opt" in
        m) machine="$OPTARG" ;;
        k) accel=kvm ;;
        s) smp="$OPTARG" ;;
        M) mem="$OPTARG" ;;
        a) append="$OPTARG" ;;
        e) elf="$OPTARG" ;;
        *) sed -n '2,13p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift

if [ -z "$elf" ]; then
    cargo build --quiet --release --manifest-path "$here/Cargo.toml"
    elf="${CARGO_TARGET_DIR:-$here/target}/release/vessel-guest"
fi

if [ "$accel" = kvm ]; then
    accel_args=(-enable-kvm -cpu host)
else
    accel_args=(-accel tcg -cpu max)
fi

exec qemu-system-x86_64 -M "$machine" "${accel_args[@]}" -smp "$smp" -m "$mem" \
    -nographic -no-reboot -kernel "$elf" -append "$append" \
    -device isa-debug-exit,iobase=0xf4,iosize=4 "$@"
