#!/usr/bin/env bash
# prepare.sh [CACHE_DIR]
#
# Prepares everything the nested test host needs, idempotently:
#   * host packages: qemu-system-x86, busybox-static, cpio, ... (apt-get install)
#   * the real, versioned Debian cloud kernel package that the metapackage
#     linux-image-cloud-amd64 depends on, fetched with `apt-get download` (never
#     installed: nothing touches the host's /boot) and unpacked with
#     `dpkg-deb -x` into CACHE_DIR/kernel/<kernel-version>/;
#     compressed modules (.ko.xz/.ko.zst/.ko.gz) are decompressed in place so
#     busybox insmod/modprobe can load them;
#   * CACHE_DIR/nested.env: a shell fragment recording the kernel and module
#     paths, sourced by build-initramfs.sh and run.sh.
#
# CACHE_DIR defaults to $NESTED_CACHE_DIR or <repo>/.cache/nested.
# Set NESTED_KERNEL_PKG=linux-image-<ver>-cloud-amd64 to pin another kernel.
# A warm cache costs one dpkg-query and a few stat calls.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CACHE_DIR="${1:-${NESTED_CACHE_DIR:-$DEFAULT_CACHE_DIR}}"
ENV_FORMAT=1          # bump when the layout of nested.env changes
META_PKG=linux-image-cloud-amd64

ensure_host_packages

mkdir -p "$CACHE_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"
ENV_FILE="$CACHE_DIR/nested.env"

# Serialise concurrent runs (e.g. parallel cargo tests) on one cache.
exec 9>"$CACHE_DIR/.lock"
flock 9

# ---- fast path: a complete cache --------------------------------------------
cache_ok() {
    [ -f "$ENV_FILE" ] || return 1
    (
        set +u
        # shellcheck disable=SC1090
        . "$ENV_FILE"
        [ "${NESTED_ENV_FORMAT:-}" = "$ENV_FORMAT" ] || exit 1
        [ -z "${NESTED_KERNEL_PKG_WANTED:-}" ] || [ "$NESTED_KERNEL_PKG_WANTED" = "$NESTED_KERNEL_PKG" ] || exit 1
        for f in "$NESTED_KERNEL" "$NESTED_MOD_IRQBYPASS" "$NESTED_MOD_KVM" \
                 "$NESTED_MOD_KVM_AMD" "$NESTED_MODDIR/modules.dep" "$NESTED_BUSYBOX"; do
            [ -f "$f" ] || exit 1
        done
    )
}
NESTED_KERNEL_PKG_WANTED="${NESTED_KERNEL_PKG:-}"
export NESTED_KERNEL_PKG_WANTED
if cache_ok; then
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    msg "cache ready: $NESTED_KERNEL_PKG ($NESTED_KERNEL_PKG_VERSION) in $CACHE_DIR"
    exit 0
fi

need_cmd apt-get; need_cmd apt-cache; need_cmd dpkg-deb; need_cmd depmod

# ---- which versioned kernel package? ----------------------------------------
# linux-image-cloud-amd64 is a metapackage; its Depends names the real package,
# e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_kernel_pkg() {
    apt-cache depends "$META_PKG" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64(-unsigned)?$/ { print $2; exit }'
}
KPKG="$NESTED_KERNEL_PKG_WANTED"
if [ -z "$KPKG" ]; then
    KPKG="$(resolve_kernel_pkg || true)"
    if [ -z "$KPKG" ]; then
        apt_update_once
        KPKG="$(resolve_kernel_pkg || true)"
    fi
    [ -n "$KPKG" ] || die "cannot resolve the kernel package behind $META_PKG (apt-cache depends $META_PKG)"
fi
msg "kernel package: $KPKG"

# ---- download (not install) -------------------------------------------------
DEB_DIR="$CACHE_DIR/debs"
mkdir -p "$DEB_DIR"
download_kernel() {
    rm -f "$DEB_DIR/${KPKG}_"*.deb
    # APT::Sandbox::User=root: the cache dir may not be readable by _apt.
    (cd "$DEB_DIR" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG" >&2)
}
if ! download_kernel; then
    msg "download failed; refreshing package lists and retrying"
    apt_update_once
    download_kernel || die "apt-get download $KPKG failed"
fi
DEB="$(ls -1t "$DEB_DIR/${KPKG}_"*.deb | head -n1)"
KPKG_VERSION="$(dpkg-deb -f "$DEB" Version)"
msg "downloaded $(basename "$DEB")"

# ---- extract ----------------------------------------------------------------
TMP_ROOT="$CACHE_DIR/kernel/.extract.$$"
rm -rf "$TMP_ROOT"; mkdir -p "$TMP_ROOT"
trap 'rm -rf "$TMP_ROOT"' EXIT
dpkg-deb -x "$DEB" "$TMP_ROOT"

KVER="$(ls -1 "$TMP_ROOT/lib/modules" | head -n1)"
[ -n "$KVER" ] || die "no lib/modules/<version> in $DEB"
[ -f "$TMP_ROOT/boot/vmlinuz-$KVER" ] || die "no boot/vmlinuz-$KVER in $DEB"
MODDIR_TMP="$TMP_ROOT/lib/modules/$KVER"

# Decompress modules so busybox insmod can load them whatever Debian chose.
COMPRESSED=none
n_xz=$(find "$MODDIR_TMP" -name '*.ko.xz' | wc -l)
n_zst=$(find "$MODDIR_TMP" -name '*.ko.zst' | wc -l)
n_gz=$(find "$MODDIR_TMP" -name '*.ko.gz' | wc -l)
if [ "$n_xz" -gt 0 ]; then COMPRESSED=xz; find "$MODDIR_TMP" -name '*.ko.xz' -exec xz -d -q {} +; fi
if [ "$n_zst" -gt 0 ]; then COMPRESSED=zstd; find "$MODDIR_TMP" -name '*.ko.zst' -exec zstd -d -q --rm {} +; fi
if [ "$n_gz" -gt 0 ]; then COMPRESSED=gzip; find "$MODDIR_TMP" -name '*.ko.gz' -exec gzip -d -q {} +; fi
[ "$COMPRESSED" = none ] || msg "decompressed $COMPRESSED kernel modules"

# The .deb ships no modules.dep (its postinst runs depmod): generate it, for
# dependency resolution at initramfs build time and busybox modprobe in L2.
depmod -b "$TMP_ROOT" "$KVER" || die "depmod -b $TMP_ROOT $KVER failed"

FINAL_ROOT="$CACHE_DIR/kernel/$KVER"
rm -rf "$FINAL_ROOT"
mv "$TMP_ROOT" "$FINAL_ROOT"
trap - EXIT
MODDIR="$FINAL_ROOT/lib/modules/$KVER"

find_mod() {
    local f
    f="$(find "$MODDIR/kernel" -name "$1.ko" | head -n1)"
    [ -n "$f" ] || die "module $1.ko not found under $MODDIR"
    printf '%s\n' "$f"
}

BUSYBOX="$(command -v busybox || true)"
if [ -z "$BUSYBOX" ] || ! file -L "$BUSYBOX" | grep -q 'statically linked'; then
    die "busybox (${BUSYBOX:-not found}) is missing or not static: install busybox-static"
fi

# ---- record -----------------------------------------------------------------
cat > "$ENV_FILE.tmp" <<ENV
# Written by tests/nested/prepare.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Shell fragment.
NESTED_ENV_FORMAT=$ENV_FORMAT
NESTED_CACHE_DIR='$CACHE_DIR'
NESTED_KERNEL_PKG='$KPKG'
NESTED_KERNEL_PKG_VERSION='$KPKG_VERSION'
NESTED_KVER='$KVER'
NESTED_KERNEL='$FINAL_ROOT/boot/vmlinuz-$KVER'
NESTED_KCONFIG='$FINAL_ROOT/boot/config-$KVER'
NESTED_MODDIR='$MODDIR'
NESTED_MOD_COMPRESSION='$COMPRESSED'
NESTED_MOD_IRQBYPASS='$(find_mod irqbypass)'
NESTED_MOD_KVM='$(find_mod kvm)'
NESTED_MOD_KVM_AMD='$(find_mod kvm-amd)'
NESTED_BUSYBOX='$BUSYBOX'
ENV
mv "$ENV_FILE.tmp" "$ENV_FILE"
# Drop unpacked trees of other kernel versions.
for d in "$CACHE_DIR/kernel/"*; do
    [ "$d" = "$FINAL_ROOT" ] || rm -rf "$d"
done
msg "cache ready: $KPKG ($KPKG_VERSION, kernel $KVER, modules compression: $COMPRESSED) in $CACHE_DIR"
