#!/usr/bin/env bash
# Density benchmark: `vessel daemon` creates and starts N VMs (default 100) of the bundled guest
# from one template, then reports the time until all run, the host memory each VM process takes
# beyond its guest's RAM, the daemon's own memory, the latency of listing them, and the time to
# stop and delete them all. Usage: bench/density/run.sh [--vms N] [--memory SIZE]
# [--parallel P] [--json FILE] [--build]. Needs python3 (stdlib only) and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/../.."

build=0
args=()
for a in "$@"; do
    if [[ "$a" == "--build" ]]; then build=1; else args+=("$a"); fi
done
vessel="${VESSEL:-$PWD/target/release/vessel}"
if [[ $build == 1 || ! -x "$vessel" ]]; then
    echo "building vessel (cargo build --release -p vessel)..." >&2
    cargo build --release -p vessel >&2
fi
py=python3
command -v python3.11 >/dev/null 2>&1 && py=python3.11
exec "$py" "$PWD/bench/density/density_bench.py" --vessel "$vessel" ${args[@]+"${args[@]}"}
