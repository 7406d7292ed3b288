#!/usr/bin/env bash
# build-initramfs.sh --out DIR --vessel PATH [options]
#
# Builds the two initramfs images of the nested test host:
#   DIR/l2-initrd.cpio.gz  L2 guest: busybox + init/l2-init + virtio modules
#   DIR/l1-initrd.cpio     L1 host:  busybox + init/l1-init + irqbypass/kvm/kvm-amd
#                          + /vessel + /vessel-args + /l2/vmlinuz + /l2/initrd.cpio.gz
# run.sh calls this; it is also usable on its own. Needs prepare.sh to have run.
#
# Options:
#   --out DIR            output directory (created)
#   --vessel PATH        static vessel binary (or any static stand-in)
#   --vessel-args STR    shell words for /vessel in L1 (default: see run.sh)
#   --l2-cmd STR         shell script text stored as /l2-cmd in the L2 initramfs
#   --l2-modules LIST    modules (and their deps) to put in the L2 initramfs;
#                        default: virtio transports/devices and vsock
#   --l1-file SRC:DST    extra file for the L1 initramfs (repeatable)
#   --l2-file SRC:DST    extra file for the L2 initramfs (repeatable)
#   --l1-tree DIR        copy DIR's contents into the L1 initramfs root
#   --l1-modules LIST    kernel modules (+deps) L1 scripts may `modprobe` (e.g. the
#                        bridge, tun, veth and nf_tables ones for networks)
#   --l1-bin PATH        a host program for L1 at the same path, with the shared
#                        libraries `ldd` names and the loader (repeatable): L1 has
#                        no libc of its own (e.g. /usr/sbin/dnsmasq, /usr/sbin/nft)
#   --allow-dynamic      skip the "vessel must be static" check (run.sh's
#                        --reference-qemu uses a shell wrapper as /vessel)
#   --cache DIR          cache dir of prepare.sh (default <repo>/.cache/nested)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT="" VESSEL="" L2_CMD="" HAVE_L2_CMD=0
VESSEL_ARGS=""
CACHE_DIR="${NESTED_CACHE_DIR:-$DEFAULT_CACHE_DIR}"
L2_MODULES="virtio_mmio virtio_pci virtio_blk virtio_net virtio_console virtio-rng vmw_vsock_virtio_transport virtio_balloon"
L1_FILES=() L2_FILES=() L1_TREES=() L1_BINS=() L1_MODULES="" CHECK_STATIC=1

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --vessel) VESSEL="$2"; shift 2 ;;
        --vessel-args) VESSEL_ARGS="$2"; shift 2 ;;
        --l2-cmd) L2_CMD="$2"; HAVE_L2_CMD=1; shift 2 ;;
        --l2-modules) L2_MODULES="$2"; shift 2 ;;
        --l1-file) L1_FILES+=("$2"); shift 2 ;;
        --l2-file) L2_FILES+=("$2"); shift 2 ;;
        --l1-tree) L1_TREES+=("$2"); shift 2 ;;
        --l1-bin) L1_BINS+=("$2"); shift 2 ;;
        --l1-modules) L1_MODULES="$2"; shift 2 ;;
        --allow-dynamic) CHECK_STATIC=0; shift ;;
        --cache) CACHE_DIR="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "build-initramfs.sh: unknown argument '$1' (try --help)" ;;
    esac
done
[ -n "$OUT" ] || die "build-initramfs.sh: --out DIR is required"
[ -n "$VESSEL" ] || die "build-initramfs.sh: --vessel PATH is required"
if [ "$CHECK_STATIC" = 1 ]; then check_static "$VESSEL"; else [ -x "$VESSEL" ] || die "'$VESSEL' is not executable"; fi
load_env "$CACHE_DIR"
need_cmd cpio; need_cmd gzip

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# Common skeleton: busybox, /init, directories, /dev/console.
skeleton() {
    local root="$1" init="$2"
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,lib/modules}
    cp "$NESTED_BUSYBOX" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    install -m 0755 "$NESTED_DIR/init/$init" "$root/init"
    mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
}

# add_files ROOT SRC:DST...
add_files() {
    local root="$1" spec src dst; shift
    for spec in "$@"; do
        src="${spec%%:*}" dst="${spec#*:}"
        if [ "$src" = "$spec" ] || [ -z "$dst" ]; then die "bad file spec '$spec' (want SRC:DST)"; fi
        [ -e "$src" ] || die "file '$src' (from '$spec') not found"
        mkdir -p "$root/$(dirname "$dst")"
        cp -a "$src" "$root/$dst"
    done
}

# add_binary ROOT PATH: a dynamically linked host program at its own path under ROOT, with
# each shared library ldd resolves and the program loader, at theirs.
add_binary() {
    local root="$1" bin="$2" lib
    [ -x "$bin" ] || die "--l1-bin '$bin' is not an executable"
    need_cmd ldd
    for lib in "$bin" $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        mkdir -p "$root/$(dirname "$lib")"
        cp -L "$lib" "$root/$lib"
    done
}

# add_modules ROOT NAME... : the modules and their dependencies in the normal tree layout
# under ROOT, with a matching modules.dep, so that busybox `modprobe NAME` works there.
add_modules() {
    local root="$1" moddir mods m; shift
    moddir="$root/lib/modules/$NESTED_KVER"
    mkdir -p "$moddir"
    mods="$(resolve_modules "$NESTED_MODDIR" "$@")" || die "cannot resolve modules: $*"
    for m in $mods; do
        mkdir -p "$moddir/$(dirname "$m")"
        cp "$NESTED_MODDIR/$m" "$moddir/$m"
    done
    # Keep only the modules.dep lines of the modules copied.
    # shellcheck disable=SC2086
    printf '%s\n' $mods | sed 's/$/:/' > "$OUT/mods.txt"
    grep -F -f "$OUT/mods.txt" "$NESTED_MODDIR/modules.dep" |
        awk -F: 'NR==FNR { want[$1]=1; next } ($1 in want)' "$OUT/mods.txt" - >> "$moddir/modules.dep"
    rm -f "$OUT/mods.txt"
}

# ---- L2 ----------------------------------------------------------------------
L2="$OUT/l2-root"
skeleton "$L2" l2-init
if [ -n "$L2_MODULES" ]; then
    # shellcheck disable=SC2086  # word lists on purpose
    add_modules "$L2" $L2_MODULES
fi
if [ "$HAVE_L2_CMD" = 1 ]; then
    printf '%s\n' "$L2_CMD" > "$L2/l2-cmd"
fi
add_files "$L2" ${L2_FILES[@]+"${L2_FILES[@]}"}
make_cpio "$L2" "$OUT/l2-initrd.cpio.gz" gzip

# ---- L1 ----------------------------------------------------------------------
L1="$OUT/l1-root"
skeleton "$L1" l1-init
cp "$NESTED_MOD_IRQBYPASS" "$L1/lib/modules/irqbypass.ko"
cp "$NESTED_MOD_KVM" "$L1/lib/modules/kvm.ko"
cp "$NESTED_MOD_KVM_AMD" "$L1/lib/modules/kvm-amd.ko"
install -m 0755 "$VESSEL" "$L1/vessel"
printf '%s\n' "$VESSEL_ARGS" > "$L1/vessel-args"
mkdir -p "$L1/l2"
cp "$NESTED_KERNEL" "$L1/l2/vmlinuz"
cp "$OUT/l2-initrd.cpio.gz" "$L1/l2/initrd.cpio.gz"
add_files "$L1" ${L1_FILES[@]+"${L1_FILES[@]}"}
if [ -n "$L1_MODULES" ]; then
    # shellcheck disable=SC2086
    add_modules "$L1" $L1_MODULES
fi
for b in ${L1_BINS[@]+"${L1_BINS[@]}"}; do
    add_binary "$L1" "$b"
done
for t in ${L1_TREES[@]+"${L1_TREES[@]}"}; do
    [ -d "$t" ] || die "--l1-tree '$t' is not a directory"
    cp -a "$t/." "$L1/"
done
# Uncompressed: the big parts (vmlinuz, L2 initrd) are compressed already, and
# gunzip under TCG would only cost L1 boot time.
make_cpio "$L1" "$OUT/l1-initrd.cpio" none

msg "built $OUT/l1-initrd.cpio ($(du -h "$OUT/l1-initrd.cpio" | cut -f1)) and $OUT/l2-initrd.cpio.gz ($(du -h "$OUT/l2-initrd.cpio.gz" | cut -f1))"
