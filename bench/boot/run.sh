#!/usr/bin/env bash
# Boot benchmark: Vessel vs QEMU (-M microvm) booting the same bundled guest.
# Measures exec -> boot marker, exec -> all CPUs ready, exec -> exit, and VMM memory beyond
# guest RAM. Usage: bench/boot/run.sh [--runs R] [--cpus N] [--memory SIZE] [--json FILE]
#                                      [--build] [--no-qemu] [...]   (--help for all options)
# Builds target/release/vessel if it is missing (or with --build). Needs python3 (stdlib only);
# qemu-system-x86_64 is optional (Debian: apt-get install qemu-system-x86).
set -euo pipefail
cd "$(dirname "$0")/../.."

build=0
args=()
for a in "$@"; do
    if [[ "$a" == "--build" ]]; then build=1; else args+=("$a"); fi
done

vessel="$PWD/target/release/vessel"
if [[ $build == 1 || ! -x "$vessel" ]]; then
    echo "building vessel (cargo build --release -p vessel)..." >&2
    CARGO_TARGET_DIR="$PWD/target" cargo build --release -p vessel >&2
fi

py=python3
command -v python3.11 >/dev/null 2>&1 && py=python3.11
exec "$py" "$PWD/bench/boot/boot_bench.py" --vessel "$vessel" ${args[@]+"${args[@]}"}
