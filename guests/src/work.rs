//! The per-CPU workload: fill a buffer from a xorshift64 generator, verify
//! it, then fold it with FNV-1a over several mixing passes. Deterministic:
//! every CPU gets the same checksum for the same buffer size.

/// Buffer per CPU for `work=1`.
pub const BASE_BYTES: u64 = 2 << 20;
/// Smallest buffer used when memory is short.
pub const MIN_BYTES: u64 = 64 << 10;

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const MIX_PASSES: u32 = 3;

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

fn fnv(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(FNV_PRIME)
}

/// Run the workload on `buf`. Returns whether the memory read back what was
/// written, and the checksum.
pub fn run(buf: &mut [u64]) -> (bool, u64) {
    let mut x = SEED;
    for w in buf.iter_mut() {
        x = xorshift(x);
        *w = x;
    }

    let mut ok = true;
    let mut hash = FNV_OFFSET;
    let mut x = SEED;
    for &w in buf.iter() {
        x = xorshift(x);
        ok &= w == x;
        hash = fnv(hash, w);
    }

    // Mixing passes: each word is rewritten from its neighbour and the hash,
    // so later passes depend on every earlier one.
    for pass in 0..MIX_PASSES {
        let mut prev = u64::from(pass);
        for slot in buf.iter_mut() {
            let w = slot.rotate_left(pass * 7 + 5) ^ prev;
            hash = fnv(hash, w);
            *slot = w ^ hash;
            prev = w;
        }
    }
    (ok, hash)
}
