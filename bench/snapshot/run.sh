#!/usr/bin/env bash
# Snapshot/restore and live-migration benchmark: Vessel vs QEMU (-M microvm) on the same
# bundled guest. Usage: bench/snapshot/run.sh [--runs R] [--sizes 128M,1G,4G] [--json FILE]
#                                            [--build] [...]   (--help for all options)
# Builds $CARGO_TARGET_DIR/release/vessel (default target/) if missing or with --build.
# Needs python3 (stdlib only), /dev/kvm and qemu-system-x86_64 (it fails without it;
# Debian: apt-get install -y qemu-system-x86).
set -euo pipefail
cd "$(dirname "$0")/../.."

build=0
args=()
for a in "$@"; do
    if [[ "$a" == "--build" ]]; then build=1; else args+=("$a"); fi
done

qemu="${QEMU:-qemu-system-x86_64}"
if ! command -v "$qemu" >/dev/null 2>&1; then
    echo "error: $qemu not found; this benchmark compares Vessel with QEMU." >&2
    echo "       Debian/Ubuntu: apt-get install -y qemu-system-x86" >&2
    exit 2
fi

target="${CARGO_TARGET_DIR:-$PWD/target}"
vessel="$target/release/vessel"
if [[ $build == 1 || ! -x "$vessel" ]]; then
    echo "building vessel (cargo build --release -p vessel, target $target)..." >&2
    CARGO_TARGET_DIR="$target" cargo build --release -p vessel >&2
fi

py=python3
command -v python3.11 >/dev/null 2>&1 && py=python3.11
exec "$py" "$PWD/bench/snapshot/bench.py" --vessel "$vessel" --target-dir "$target" \
    --qemu "$qemu" ${args[@]+"${args[@]}"}
