#!/usr/bin/env bash
# Block benchmark: 4 KiB random and 1 MiB sequential reads and writes from the bundled guest
# (bench=blk), under Vessel and under QEMU (-M microvm, KVM) on the same raw file, side by side.
# Usage: bench/block/run.sh [--runs R] [--time-ms MS] [--qd N] [--cache writeback|unsafe]
#                           [--transport mmio|pci] [--dir DIR] [--disk-size SIZE] [--json FILE]
#                           [--build] [--no-qemu] [...]        (--help for all options)
# Needs python3, /dev/kvm, cargo (to build the guest) and qemu-system-x86_64 (Debian:
# apt-get install qemu-system-x86) unless --no-qemu.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Extra options for Vessel's --disk (after path= and cache=), e.g. an I/O engine once it exists.
export VESSEL_DISK_OPTS="${VESSEL_DISK_OPTS:-}"
# Extra options for QEMU's -drive (after file=, format=raw, cache= and aio=).
export QEMU_DRIVE_OPTS="${QEMU_DRIVE_OPTS:-}"

source bench/common/build.sh
exec "$py" bench/common/guest_bench.py blk --vessel "$vessel" --guest "$guest" \
    ${args[@]+"${args[@]}"}
