# shellcheck shell=bash
# Shared helpers for the nested test host scripts (sourced, not executed).
#
# Provides: NESTED_DIR, REPO_ROOT, DEFAULT_CACHE_DIR, msg, die, need_cmd,
# ensure_host_packages, load_env, resolve_modules.

NESTED_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$NESTED_DIR/../.." && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
DEFAULT_CACHE_DIR="$REPO_ROOT/.cache/nested"

# Host packages the harness needs. busybox-static provides a static
# /bin/busybox we copy into both initramfs images; file/libc-bin are used to
# check that the vessel binary is static; xz-utils/zstd decompress kernel
# modules when the Debian kernel ships them compressed; kmod's depmod builds
# modules.dep for the unpacked kernel.
HOST_PACKAGES=(qemu-system-x86 busybox-static cpio gzip file xz-utils zstd lz4 kmod)

msg() { printf 'nested: %s\n' "$*" >&2; }
die() { printf 'nested: error: %s\n' "$*" >&2; exit 1; }

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "required command '$1' not found${2:+ ($2)}"
}

# apt-get update at most once per script run.
_APT_UPDATED=0
apt_update_once() {
    if [ "$_APT_UPDATED" = 0 ]; then
        msg "running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        _APT_UPDATED=1
    fi
}

# Install any of HOST_PACKAGES that are missing. Fast (one dpkg-query) when
# everything is present.
ensure_host_packages() {
    local missing=() p status
    for p in "${HOST_PACKAGES[@]}"; do
        status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)"
        case "$status" in
            ii*) ;;
            *) missing+=("$p") ;;
        esac
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing host packages (${missing[*]}) and not root; install them first"
    msg "installing host packages: ${missing[*]}"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

# Source the environment file written by prepare.sh.
load_env() {
    local cache="$1" env="$1/nested.env"
    [ -f "$env" ] || die "$env not found: run tests/nested/prepare.sh $cache"
    # shellcheck disable=SC1090
    . "$env"
}

# resolve_modules MODDIR NAME... : print the module files (paths relative to
# MODDIR, e.g. kernel/drivers/virtio/virtio.ko) needed to load NAMEs, in load
# order (dependencies first), using MODDIR/modules.dep. Module names may use
# '-' or '_' interchangeably.
resolve_modules() {
    local moddir="$1"; shift
    awk -v want="$*" '
        function norm(s) { sub(/.*\//, "", s); sub(/\.ko(\.(xz|zst|gz))?$/, "", s); gsub(/-/, "_", s); return s }
        function visit(m,   i, n, d) {
            if (m in done) return
            if (!(m in path)) { printf "nested: error: module %s not found in modules.dep\n", m > "/dev/stderr"; bad = 1; return }
            done[m] = 1
            n = split(deps[m], d, " ")
            for (i = 1; i <= n; i++) visit(norm(d[i]))
            print path[m]
        }
        {
            f = $1; sub(/:$/, "", f)
            m = norm(f); path[m] = f
            $1 = ""; deps[m] = $0
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) { x = w[i]; gsub(/-/, "_", x); visit(x) }
            exit bad
        }' "$moddir/modules.dep"
}

# check_static PATH : fail unless PATH is a statically linked x86-64 ELF
# executable (it runs in an initramfs with no libc).
check_static() {
    local bin="$1" desc ldd_out
    [ -f "$bin" ] || die "vessel binary '$bin' not found; build it with:
  RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p vessel --target x86_64-unknown-linux-gnu --target-dir $REPO_ROOT/target/static"
    [ -x "$bin" ] || die "'$bin' is not executable"
    desc="$(file -bL "$bin")"
    case "$desc" in
        ELF\ 64-bit*x86-64*) ;;
        *) die "'$bin' is not an x86-64 ELF executable: $desc" ;;
    esac
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) return 0 ;;
    esac
    # Old `file` versions call static-pie "dynamically linked": ask ldd.
    ldd_out="$(ldd "$bin" 2>&1 || true)"
    case "$ldd_out" in
        *"statically linked"*|*"not a dynamic executable"*) return 0 ;;
    esac
    die "'$bin' is dynamically linked but L1 has no libc; build it static with:
  RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p vessel --target x86_64-unknown-linux-gnu --target-dir $REPO_ROOT/target/static"
}

# make_cpio DIR OUT [gzip|none] : pack DIR as a newc initramfs owned by root.
make_cpio() {
    local dir="$1" out="$2" comp="${3:-gzip}"
    if [ "$comp" = gzip ]; then
        (cd "$dir" && find . -print0 | LC_ALL=C sort -z |
            cpio --null -o -H newc --owner=0:0 --quiet | gzip -1 -n) > "$out"
    else
        (cd "$dir" && find . -print0 | LC_ALL=C sort -z |
            cpio --null -o -H newc --owner=0:0 --quiet) > "$out"
    fi
}
