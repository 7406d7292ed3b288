//! Ring-3 CPU helpers: port I/O (allowed by IOPL=3), the TSC, CPUID, the
//! ring-0 services behind `int 0x80`, and physical memory access (all of
//! 0..4 GiB is identity mapped and user accessible).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot::{SYS_PARK, SYS_TRIPLE_FAULT, SYS_WRITE32};

/// The exit device: writing N makes the VMM exit with status N (QEMU's
/// `isa-debug-exit` exits with `(N << 1) | 1`).
pub const EXIT_PORT: u16 = 0xf4;

pub fn outb(port: u16, value: u8) {
    // SAFETY: ring 3 runs with IOPL=3, so port I/O is permitted; the ports
    // the guest uses are device registers, not memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// The current privilege level: the low two bits of CS.
pub fn cpl() -> u8 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    (cs & 3) as u8
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed in ring 3 (CR4.TSD is clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn pause() {
    core::hint::spin_loop();
}

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// TSC frequency from CPUID (leaf 0x15, 0x16 or the hypervisor's 0x40000010),
/// else a guess of 3 GHz (or what [`set_tsc_hz`] stored). Used for timeouts
/// and small delays; the benchmarks calibrate it ([`pit_tsc_hz`]).
pub fn tsc_hz() -> u64 {
    let cached = TSC_HZ.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let hz = cpuid_tsc_hz().map_or(3_000_000_000, |(hz, _)| hz);
    TSC_HZ.store(hz, Ordering::Relaxed);
    hz
}

/// Use `hz` as the TSC frequency from now on.
pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
}

/// The TSC frequency CPUID states, and the leaf that said so: 0x15 (crystal
/// ratio), 0x16 (base MHz) or 0x40000010 (hypervisor, kHz). None if no leaf
/// gives a plausible value (at least 100 MHz).
pub fn cpuid_tsc_hz() -> Option<(u64, u32)> {
    let max_leaf = core::arch::x86_64::__cpuid(0).eax;
    let plausible = |hz: u64| hz >= 100_000_000;
    if max_leaf >= 0x15 {
        let r = core::arch::x86_64::__cpuid(0x15);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            let hz = u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax);
            if plausible(hz) {
                return Some((hz, 0x15));
            }
        }
    }
    if max_leaf >= 0x16 {
        let hz = u64::from(core::arch::x86_64::__cpuid(0x16).eax & 0xffff) * 1_000_000;
        if plausible(hz) {
            return Some((hz, 0x16));
        }
    }
    if core::arch::x86_64::__cpuid(0x4000_0000).eax >= 0x4000_0010 {
        let hz = u64::from(core::arch::x86_64::__cpuid(0x4000_0010).eax) * 1000;
        if plausible(hz) {
            return Some((hz, 0x4000_0010));
        }
    }
    None
}

/// The PIT's input clock.
const PIT_HZ: u64 = 1_193_182;

/// Measure the TSC frequency against the PIT over about `ms` milliseconds
/// (at most 50). Channel 0 is used, in mode 0 from 0xffff, with its count
/// read back through the latch command: channel 2 needs the speaker port
/// (0x61) for its gate, which QEMU's microvm does not have. Each read is
/// three exits to the hypervisor's in-kernel PIT; the TSC is sampled
/// between the latch and the reads. None if the count does not move (no
/// PIT) or wrapped (the vCPU was descheduled for ~5 ms).
pub fn pit_tsc_hz(ms: u64) -> Option<u64> {
    let span = PIT_HZ * ms.min(50) / 1000;
    // Channel 0, low then high byte, mode 0, binary; count 0xffff.
    outb(0x43, 0x30);
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let read = || {
        outb(0x43, 0x00);
        let tsc = rdtsc();
        let low = inb(0x40);
        let high = inb(0x40);
        (tsc, u64::from(u16::from_le_bytes([low, high])))
    };
    let (t0, c0) = read();
    let mut prev = c0;
    loop {
        let (t, c) = read();
        if c > prev {
            return None;
        }
        if c0 - c >= span {
            return Some(t.wrapping_sub(t0) * PIT_HZ / (c0 - c));
        }
        // A count that does not move: give up after 10^10 ticks (a few s).
        if t.wrapping_sub(t0) > 10_000_000_000 {
            return None;
        }
        prev = c;
    }
}

/// TSC ticks in `us` microseconds.
pub fn us_to_ticks(us: u64) -> u64 {
    tsc_hz() / 1000 * us / 1000
}

pub fn delay_us(us: u64) {
    let start = rdtsc();
    let ticks = us_to_ticks(us);
    while rdtsc().wrapping_sub(start) < ticks {
        pause();
    }
}

/// Exit through the exit device; if that does not stop the VM, park.
pub fn exit(code: u8) -> ! {
    outb(EXIT_PORT, code);
    park()
}

/// Park this CPU in ring 0 (`cli; hlt` forever).
pub fn park() -> ! {
    // SAFETY: the ring-0 service 0 never returns; it touches no memory.
    unsafe { asm!("int 0x80", in("rax") SYS_PARK, options(noreturn, nostack)) }
}

/// Spin in ring 3 forever (the `hold` action).
pub fn spin_forever() -> ! {
    loop {
        pause();
    }
}

/// Load a zero-limit IDT in ring 0 and fault: a deliberate triple fault.
pub fn triple_fault() -> ! {
    // SAFETY: the ring-0 service 1 never returns.
    unsafe { asm!("int 0x80", in("rax") SYS_TRIPLE_FAULT, options(noreturn, nostack)) }
}

/// Raise #UD from ring 3 (the ring-0 handler reports it and exits 2).
pub fn invalid_opcode() -> ! {
    // SAFETY: `ud2` only raises an exception; the handler never returns.
    unsafe { asm!("ud2", options(noreturn, nostack)) }
}

/// A 32-bit store done from ring 0 (fallback for MMIO that ring 3 cannot do).
///
/// # Safety
/// `addr` must be a device register (or memory) that may be written.
#[allow(dead_code)]
pub unsafe fn kernel_write32(addr: u64, value: u32) {
    // SAFETY: the caller guarantees the store is harmless; service 2 does
    // only `mov %esi, (%rdi)` and returns.
    unsafe {
        asm!("int 0x80", in("rax") SYS_WRITE32, in("rdi") addr, in("rsi") u64::from(value), options(nostack))
    }
}

/// Physical memory below 4 GiB: identity mapped, user accessible.
pub mod phys {
    /// Largest physical address range the guest maps.
    pub const LIMIT: u64 = 1 << 32;

    /// Whether `[addr, addr + len)` lies inside the identity map.
    pub fn mapped(addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| end <= LIMIT)
    }

    /// Read a `T` at physical address `addr`.
    fn read<T: Copy>(addr: u64) -> T {
        assert!(
            mapped(addr, core::mem::size_of::<T>() as u64),
            "read outside the identity map"
        );
        // SAFETY: the range is mapped (checked above); `T` is one of the
        // integer types below, any bit pattern is valid, and unaligned reads are fine.
        unsafe { core::ptr::read_unaligned(addr as *const T) }
    }

    pub fn u8(addr: u64) -> u8 {
        read(addr)
    }

    pub fn u16(addr: u64) -> u16 {
        read(addr)
    }

    pub fn u32(addr: u64) -> u32 {
        read(addr)
    }

    pub fn u64(addr: u64) -> u64 {
        read(addr)
    }

    /// A byte slice of physical memory that is not written while in use
    /// (boot information and firmware tables).
    pub fn bytes(addr: u64, len: usize) -> &'static [u8] {
        assert!(mapped(addr, len as u64), "slice outside the identity map");
        // SAFETY: the range is mapped and readable; the guest never writes
        // the boot structures and firmware tables it reads this way.
        unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
    }

    /// Volatile 32-bit MMIO read.
    pub fn mmio_read32(addr: u64) -> u32 {
        assert!(mapped(addr, 4));
        // SAFETY: a device register inside the identity map (uncached page).
        unsafe { core::ptr::read_volatile(addr as *const u32) }
    }

    /// Volatile 32-bit MMIO write.
    pub fn mmio_write32(addr: u64, value: u32) {
        assert!(mapped(addr, 4));
        // SAFETY: a device register inside the identity map.
        unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
    }

    /// Volatile 8-bit MMIO read.
    pub fn mmio_read8(addr: u64) -> u8 {
        assert!(mapped(addr, 1));
        // SAFETY: a device register inside the identity map.
        unsafe { core::ptr::read_volatile(addr as *const u8) }
    }

    /// Volatile 16-bit MMIO read.
    pub fn mmio_read16(addr: u64) -> u16 {
        assert!(mapped(addr, 2));
        // SAFETY: a device register inside the identity map.
        unsafe { core::ptr::read_volatile(addr as *const u16) }
    }

    /// Volatile 16-bit MMIO write.
    pub fn mmio_write16(addr: u64, value: u16) {
        assert!(mapped(addr, 2));
        // SAFETY: a device register inside the identity map.
        unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
    }

    /// Volatile 8-bit MMIO write.
    pub fn mmio_write8(addr: u64, value: u8) {
        assert!(mapped(addr, 1));
        // SAFETY: a device register inside the identity map.
        unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
    }
}
