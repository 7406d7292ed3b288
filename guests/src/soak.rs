//! `action=soak`: a self-checking workload that runs forever on every CPU,
//! in ring 3, for snapshot, restore and migration tests.
//!
//! Each CPU owns its work buffer (the one the boot workload used), split
//! into windows of `soakpages=` 4 KiB pages. Iteration `i` verifies window
//! `i mod W` against what iteration `i - W` wrote there (every word is a hash
//! of the CPU, the page, the word and the iteration that wrote it), folds the
//! words it read into a running FNV-1a checksum, and rewrites the window for
//! iteration `i`. Iterations `0..W` only fill. A page that lost its contents,
//! or came back from an older copy of memory, fails the check at once; the
//! counter and the checksum live in the CPU's registers and stack, so a
//! restored vCPU whose memory does not match its registers fails too.
//!
//! Every `soakms=` milliseconds of TSC time each CPU prints
//! `soak cpu=<index> iter=<i> t=<ms> sum=0x<16 hex> ok`, where `t` is the TSC
//! time since that CPU started soaking. On a mismatch it prints
//! `soak cpu=<index> MISMATCH ...` and exits with status [`EXIT_MISMATCH`].

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::cmdline::parse_number;
use crate::cpu;
use crate::println;

/// Exit status after a mismatch.
pub const EXIT_MISMATCH: u8 = 6;

const PAGE_WORDS: usize = 4096 / 8;
const DEFAULT_PERIOD_MS: u64 = 100;
const DEFAULT_WINDOW_PAGES: u64 = 16;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Set by the BSP before it starts the APs: they soak instead of parking.
static ARMED: AtomicBool = AtomicBool::new(false);
/// Set by the BSP once the boot work (and any virtio test) is over.
static GO: AtomicBool = AtomicBool::new(false);
static CPUS: AtomicUsize = AtomicUsize::new(0);
static BASE: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static PERIOD_MS: AtomicU64 = AtomicU64::new(DEFAULT_PERIOD_MS);
static WINDOW_PAGES: AtomicU64 = AtomicU64::new(DEFAULT_WINDOW_PAGES);

/// Reads `soakms=N` (report period, 1-60000 ms, default 100) and
/// `soakpages=N` (pages per iteration, 1-4096, default 16) from the command
/// line and arms soak mode for `cpus` CPUs whose work buffers of `bytes`
/// bytes start at `base`. On a bad value returns the offending word.
pub fn arm(cmdline: &[u8], cpus: usize, base: u64, bytes: u64) -> Result<(), &[u8]> {
    for word in cmdline.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
        if let Some(v) = word.strip_prefix(b"soakms=") {
            let ms = parse_number(v).filter(|n| (1..=60_000).contains(n));
            PERIOD_MS.store(ms.ok_or(word)?, Ordering::Relaxed);
        } else if let Some(v) = word.strip_prefix(b"soakpages=") {
            let pages = parse_number(v).filter(|n| (1..=4096).contains(n));
            WINDOW_PAGES.store(pages.ok_or(word)?, Ordering::Relaxed);
        }
    }
    CPUS.store(cpus, Ordering::Relaxed);
    BASE.store(base, Ordering::Relaxed);
    BYTES.store(bytes, Ordering::Relaxed);
    ARMED.store(true, Ordering::Release);
    Ok(())
}

/// For an AP that has done its boot work: soak forever if armed, else return
/// (and park as usual).
pub fn ap(index: usize) {
    if !ARMED.load(Ordering::Acquire) || index >= CPUS.load(Ordering::Relaxed) {
        return;
    }
    while !GO.load(Ordering::Acquire) {
        cpu::pause();
    }
    run(index, &mut || {})
}

/// The BSP's `action=soak`: report the setup, release the APs, soak on CPU 0,
/// calling `hook` once at the start and after each of its report lines.
pub fn bsp(hook: &mut dyn FnMut()) -> ! {
    let bytes = BYTES.load(Ordering::Relaxed);
    let pages = bytes / 4096;
    let window = WINDOW_PAGES.load(Ordering::Relaxed).min(pages);
    println!(
        "soak: {} cpus, {} pages of 4 KiB each, {} per iteration, report every {} ms",
        CPUS.load(Ordering::Relaxed),
        pages,
        window,
        PERIOD_MS.load(Ordering::Relaxed)
    );
    GO.store(true, Ordering::Release);
    run(0, hook)
}

/// `touch=N`: writes a non-zero pattern (never a zero page, so VMMs that
/// skip zero pages still have to copy it) to `mib` MiB from `from`, at most
/// up to `end`, and prints `touch: <M> MiB at 0x<from>`. The memory stays
/// untouched afterwards: a resident set for snapshot and migration
/// benchmarks, apart from the workload's dirty set. Returns where it ends.
pub fn touch(from: u64, end: u64, mib: u64) -> u64 {
    let from = from.next_multiple_of(4096);
    let bytes = (mib << 20).min(end.saturating_sub(from) & !0xfff);
    // SAFETY: [from, from + bytes) is usable, identity-mapped RAM below
    // 4 GiB past every CPU's work buffer and stacks (the caller took it from
    // the e820 range that holds them); nothing else uses it.
    let words = unsafe { core::slice::from_raw_parts_mut(from as *mut u64, (bytes / 8) as usize) };
    for (k, slot) in words.iter_mut().enumerate() {
        // SAFETY: `slot` is a valid, aligned u64 of that range.
        unsafe { core::ptr::write_volatile(slot, pattern(0xff, 0, 0, k as u64) | 1) };
    }
    println!("touch: {} MiB at 0x{:x}", bytes >> 20, from);
    from + bytes
}

/// The word at `word` of `page` as iteration `iter` of CPU `cpu` writes it.
fn pattern(cpu: u64, iter: u64, page: u64, word: u64) -> u64 {
    let mut x = (cpu << 56)
        ^ iter.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ page.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ word.wrapping_mul(0x1656_67b1_9e37_79f9);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    x
}

fn run(index: usize, hook: &mut dyn FnMut()) -> ! {
    let base = BASE.load(Ordering::Relaxed) + index as u64 * BYTES.load(Ordering::Relaxed);
    let pages = BYTES.load(Ordering::Relaxed) / 4096;
    let window = WINDOW_PAGES.load(Ordering::Relaxed).min(pages).max(1);
    let windows = pages / window;
    let period = cpu::us_to_ticks(PERIOD_MS.load(Ordering::Relaxed) * 1000);
    let ticks_per_ms = (cpu::tsc_hz() / 1000).max(1);
    let cpu_id = index as u64;

    let start = cpu::rdtsc();
    let mut last_report = start;
    let mut sum = FNV_OFFSET;
    let mut iter: u64 = 0;
    hook();
    loop {
        let w = iter % windows;
        let first_page = w * window;
        for page in first_page..first_page + window {
            let addr = base + page * 4096;
            // SAFETY: arm() was given this CPU's work buffer, `pages` pages
            // of identity-mapped RAM that only this CPU uses now; `page` is
            // below `windows * window <= pages`.
            let words = unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, PAGE_WORDS) };
            if iter >= windows {
                let before = iter - windows;
                for (k, slot) in words.iter().enumerate() {
                    // SAFETY: `slot` is a valid, aligned u64 of the buffer;
                    // volatile so the compiler cannot assume what it holds.
                    let got = unsafe { core::ptr::read_volatile(slot) };
                    let want = pattern(cpu_id, before, page, k as u64);
                    if got != want {
                        let addr = addr + k as u64 * 8;
                        mismatch(
                            index,
                            iter,
                            windows,
                            Miss {
                                page,
                                addr,
                                got,
                                want,
                            },
                        );
                    }
                    sum = (sum ^ got).wrapping_mul(FNV_PRIME);
                }
            }
            for (k, slot) in words.iter_mut().enumerate() {
                *slot = pattern(cpu_id, iter, page, k as u64);
            }
        }
        iter += 1;
        let now = cpu::rdtsc();
        if now.wrapping_sub(last_report) >= period {
            last_report = now;
            let t = now.wrapping_sub(start) / ticks_per_ms;
            println!("soak cpu={index} iter={iter} t={t} sum=0x{sum:016x} ok");
            hook();
        }
    }
}

/// A word that does not hold what was written.
struct Miss {
    page: u64,
    addr: u64,
    got: u64,
    want: u64,
}

/// What a mismatching word holds instead.
enum Found {
    /// The pattern of an older iteration: a stale copy of the page.
    Stale(u64),
    Zero,
    Unknown,
}

impl core::fmt::Display for Found {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Found::Stale(it) => write!(f, "stale: written by iter {it}"),
            Found::Zero => f.write_str("zero"),
            Found::Unknown => f.write_str("unknown data"),
        }
    }
}

/// Reports a mismatch, and what the word holds if that is recognisable,
/// then exits with [`EXIT_MISMATCH`].
fn mismatch(index: usize, iter: u64, windows: u64, m: Miss) -> ! {
    let word = (m.addr % 4096) / 8;
    let expected_iter = iter - windows;
    let found = (1..=8u64)
        .filter_map(|n| expected_iter.checked_sub(n * windows))
        .find(|&it| pattern(index as u64, it, m.page, word) == m.got)
        .map_or(
            if m.got == 0 {
                Found::Zero
            } else {
                Found::Unknown
            },
            Found::Stale,
        );
    println!(
        "soak cpu={index} MISMATCH iter={iter} addr=0x{:x} got=0x{:016x} want=0x{:016x} ({found})",
        m.addr, m.got, m.want
    );
    cpu::exit(EXIT_MISMATCH)
}
