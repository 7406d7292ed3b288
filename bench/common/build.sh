# Sourced by bench/block/run.sh and bench/net/run.sh (from the repository root): finds or builds
# what the guest benchmarks need and sets $vessel, $guest and $py. Consumes --build from "$@"
# into $args. Fails loudly when a tool is missing.

die() { echo "error: $*" >&2; exit 2; }

build=0
args=()
for a in "$@"; do
    if [[ "$a" == "--build" ]]; then build=1; else args+=("$a"); fi
done

py=""
for p in python3.11 python3; do
    if command -v "$p" >/dev/null 2>&1; then py="$p"; break; fi
done
[[ -n "$py" ]] || die "python3 not found (Debian: apt-get install python3)"

target="${CARGO_TARGET_DIR:-$PWD/target}"
vessel="${VESSEL:-$target/release/vessel}"
if [[ $build == 1 || ! -x "$vessel" ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found and $vessel is missing (scripts/setup)"
    echo "building vessel (cargo build --release -p vessel)..." >&2
    CARGO_TARGET_DIR="$target" cargo build --release -p vessel >&2
fi

# The guest with its benchmark mode, built on its own (its own workspace and flags); cargo makes
# this a no-op when it is fresh. Both VMMs boot this file with --kernel / -kernel.
guest="${VESSEL_BENCH_GUEST:-}"
if [[ -z "$guest" ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (needed to build the guest; or set VESSEL_BENCH_GUEST)"
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_TARGET -u CARGO_TARGET_DIR \
        cargo build --release --quiet --manifest-path guests/Cargo.toml \
        --target-dir "$target/bench-guest" >&2 || die "building the guest (guests/) failed"
    guest="$target/bench-guest/release/vessel-guest"
fi
[[ -r "$guest" ]] || die "guest ELF not found: $guest"
