#!/usr/bin/env bash
# Snapshot/restore and live-migration benchmark: Vessel vs QEMU (-M microvm, KVM) on the same
# bundled guest (PVH, --kernel / -kernel), side by side with ratios.
# Usage: bench/snapshot/run.sh [--runs R] [--sizes 128M,1G,4G] [--mig-memory 1G]
#                              [--scenarios idle,light,busy] [--cpus N] [--json FILE] [-v]
#                              [--post-copy] [--build] [...]    (--help for all options)
# Needs python3 (stdlib only), /dev/kvm, cargo (to build the guest) and qemu-system-x86_64:
# without QEMU it stops (Debian: apt-get install -y qemu-system-x86). Snapshots go to a new
# directory in /var/tmp (--workdir): up to about 2 x half of the largest guest size on disk.
set -euo pipefail
cd "$(dirname "$0")/../.."

qemu="${QEMU:-qemu-system-x86_64}"
if ! command -v "$qemu" >/dev/null 2>&1; then
    echo "error: $qemu not found; this benchmark compares Vessel with QEMU." >&2
    echo "       Debian/Ubuntu: apt-get install -y qemu-system-x86" >&2
    exit 2
fi

source bench/common/build.sh
exec "$py" bench/snapshot/bench.py --vessel "$vessel" --guest "$guest" --qemu "$qemu" \
    ${args[@]+"${args[@]}"}
