#!/usr/bin/env bash
# Network benchmark: UDP transmit, receive and echo round trips between the bundled guest
# (bench=net) and bench/net/peer.py on a tap in a private network namespace, under Vessel and
# under QEMU (-M microvm, KVM, userspace virtio-net), side by side.
# Usage: bench/net/run.sh [--runs R] [--time-ms MS] [--qd N] [--transport mmio|pci]
#                         [--json FILE] [--build] [--no-qemu] [...]   (--help for all options)
# Needs root (ip netns, tap), iproute2, /dev/net/tun, python3, /dev/kvm, cargo (to build the
# guest) and qemu-system-x86_64 (Debian: apt-get install qemu-system-x86) unless --no-qemu.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Extra options for Vessel's --net (after tap= and mac=).
export VESSEL_NET_OPTS="${VESSEL_NET_OPTS:-}"
# Extra options for QEMU's -netdev tap (after id=, ifname=, script=no, downscript=no).
export QEMU_NETDEV_OPTS="${QEMU_NETDEV_OPTS:-}"

[[ $(id -u) == 0 ]] || { echo "error: the net benchmark needs root (ip netns, tap)" >&2; exit 2; }
command -v ip >/dev/null 2>&1 || { echo "error: ip (iproute2) not found" >&2; exit 2; }

source bench/common/build.sh
exec "$py" bench/common/guest_bench.py net --vessel "$vessel" --guest "$guest" \
    ${args[@]+"${args[@]}"}
