#!/usr/bin/env bash
# Image-layer benchmark: Vessel's block layer vs `qemu-img bench` on the same files.
# Usage: bench/image/run.sh [--size MIB] [--count N] [--dir DIR]
# Needs qemu-img (Debian: apt-get install qemu-utils) for the comparison column.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/block}"
exec cargo bench -q -p block --bench image -- "$@"
