//! The memory the virtio drivers share with devices: one arena of usable,
//! identity-mapped RAM (physical address == virtual address), handed out by a
//! bump allocator and accessed only through the volatile helpers below, each
//! of which checks that the access stays inside the arena.

use core::sync::atomic::{AtomicU64, Ordering};

/// Bytes set aside for all virtio queues and buffers of one boot.
pub const ARENA_BYTES: u64 = 512 << 10;
/// Most bytes set aside when a benchmark runs (its data buffers: up to
/// `qd` × 1 MiB for the block workloads).
pub const BENCH_ARENA_BYTES: u64 = 160 << 20;

static START: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Take `[start, start + len)` as the arena. The caller guarantees that it
/// is usable RAM inside the identity map that nothing else uses from now on.
pub fn init(start: u64, len: u64) {
    START.store(start, Ordering::Relaxed);
    END.store(start + len, Ordering::Relaxed);
    NEXT.store(start, Ordering::Relaxed);
}

/// `len` zeroed bytes aligned to `align` (a power of two).
pub fn alloc(len: u64, align: u64) -> Result<u64, &'static str> {
    let next = NEXT.load(Ordering::Relaxed);
    let addr = next.div_ceil(align) * align;
    let end = addr.checked_add(len).ok_or("arena overflow")?;
    if end > END.load(Ordering::Relaxed) {
        return Err("out of DMA memory");
    }
    NEXT.store(end, Ordering::Relaxed);
    fill(addr, 0, len as usize);
    Ok(addr)
}

/// Panics unless `[addr, addr + len)` lies inside the arena.
fn check(addr: u64, len: usize) {
    let inside = addr >= START.load(Ordering::Relaxed)
        && addr
            .checked_add(len as u64)
            .is_some_and(|end| end <= END.load(Ordering::Relaxed));
    assert!(inside, "DMA access outside the arena");
}

/// [`check`], plus natural alignment for a `size`-byte integer.
fn check_typed(addr: u64, size: usize) {
    check(addr, size);
    assert!(addr.is_multiple_of(size as u64), "misaligned DMA access");
}

macro_rules! accessors {
    ($($read:ident $write:ident $ty:ty),*) => {$(
        pub fn $read(addr: u64) -> $ty {
            check_typed(addr, core::mem::size_of::<$ty>());
            // SAFETY: inside the arena and naturally aligned (checked):
            // identity-mapped RAM that only the drivers and their devices
            // use; any bit pattern is a valid integer.
            unsafe { core::ptr::read_volatile(addr as *const $ty) }
        }

        pub fn $write(addr: u64, value: $ty) {
            check_typed(addr, core::mem::size_of::<$ty>());
            // SAFETY: as above; the arena belongs to the drivers.
            unsafe { core::ptr::write_volatile(addr as *mut $ty, value) }
        }
    )*};
}

accessors!(read8 write8 u8, read16 write16 u16, read32 write32 u32, read64 write64 u64);

/// Copy `data` into the arena at `addr`.
pub fn write_bytes(addr: u64, data: &[u8]) {
    check(addr, data.len());
    for (i, &b) in data.iter().enumerate() {
        write8(addr + i as u64, b);
    }
}

/// Copy from the arena at `addr` into `out`.
pub fn read_bytes(addr: u64, out: &mut [u8]) {
    check(addr, out.len());
    for (i, b) in out.iter_mut().enumerate() {
        *b = read8(addr + i as u64);
    }
}

/// Fill `len` bytes at `addr` with `value`.
pub fn fill(addr: u64, value: u8, len: usize) {
    check(addr, len);
    // SAFETY: inside the arena (checked), which belongs to the drivers.
    unsafe { core::ptr::write_bytes(addr as *mut u8, value, len) }
}

/// Fill `len` bytes at `addr` (8-byte aligned, `len` a multiple of 8) with
/// a xorshift stream seeded by `seed`: data that no layer can compress or
/// skip as zeroes.
pub fn fill_random(addr: u64, len: u64, seed: u64) {
    check_typed(addr, 8);
    check(addr, len as usize);
    let mut x = seed | 1;
    for i in 0..len / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: inside the arena (checked), aligned, which belongs to the
        // drivers.
        unsafe { core::ptr::write_volatile((addr + i * 8) as *mut u64, x) }
    }
}
