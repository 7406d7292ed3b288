//! Starting the application processors, from ring 3.
//!
//! The BSP copies the real-mode trampoline to 0x10000, hands out stacks, and
//! sends INIT, SIPI, SIPI (vector 0x10) to every APIC ID other than its own by
//! writing the local APIC's ICR (memory-mapped at 0xfee00300/0xfee00310).
//! Each AP takes the next CPU index in ring 0, enters ring 3 on its own
//! stacks and reports through the shared records below.

use core::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::boot::{self, MAX_CPUS, SIPI_VECTOR, TRAMPOLINE_ADDR};
use crate::cpu::{self, phys};

const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
const ICR_INIT: u32 = 0x0000_4500; // INIT, level assert
const ICR_STARTUP: u32 = 0x0000_4600; // Start-up, level assert
const ICR_BUSY: u32 = 1 << 12; // delivery status

/// Local APIC base used by every CPU (set by the BSP from the tables).
static LAPIC_BASE: AtomicU64 = AtomicU64::new(crate::acpi::DEFAULT_LAPIC);

/// One CPU's report, indexed by CPU index. `state` goes 0 -> STARTED -> DONE.
pub struct Record {
    pub state: AtomicU32,
    pub apic_id: AtomicU32,
    pub cpl: AtomicU8,
    pub ok: AtomicU8,
    pub checksum: AtomicU64,
}

pub const STARTED: u32 = 1;
pub const DONE: u32 = 2;

pub static RECORDS: [Record; MAX_CPUS] = [const {
    Record {
        state: AtomicU32::new(0),
        apic_id: AtomicU32::new(0),
        cpl: AtomicU8::new(0),
        ok: AtomicU8::new(0),
        checksum: AtomicU64::new(0),
    }
}; MAX_CPUS];

pub fn set_lapic_base(base: u64) {
    LAPIC_BASE.store(base, Ordering::Relaxed);
}

fn lapic_read(reg: u64) -> u32 {
    phys::mmio_read32(LAPIC_BASE.load(Ordering::Relaxed) + reg)
}

fn lapic_write(reg: u64, value: u32) {
    phys::mmio_write32(LAPIC_BASE.load(Ordering::Relaxed) + reg, value);
}

/// This CPU's local APIC ID (xAPIC ID register, bits 31:24).
pub fn apic_id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

fn wait_icr_idle() {
    let start = cpu::rdtsc();
    let limit = cpu::us_to_ticks(100_000);
    while lapic_read(LAPIC_ICR_LOW) & ICR_BUSY != 0 && cpu::rdtsc().wrapping_sub(start) < limit {
        cpu::pause();
    }
}

fn send_ipi(apic_id: u8, command: u32) {
    wait_icr_idle();
    lapic_write(LAPIC_ICR_HIGH, u32::from(apic_id) << 24);
    lapic_write(LAPIC_ICR_LOW, command);
    wait_icr_idle();
}

/// Physical memory for the APs' stacks: `count` areas of
/// [`boot::AP_KSTACK_SIZE`] + [`boot::AP_USTACK_SIZE`] bytes at `base`.
pub const AP_AREA: u64 = boot::AP_KSTACK_SIZE + boot::AP_USTACK_SIZE;

/// Start CPUs 1..ids.len() (every APIC ID in `ids` except `bsp_id`), using
/// the stack memory at `stacks`.
pub fn start_aps(ids: &[u8], bsp_id: u8, stacks: u64) {
    copy_trampoline();
    for index in 1..ids.len() {
        let area = stacks + (index as u64 - 1) * AP_AREA;
        boot::AP_KSTACK_TOP[index].store(area + boot::AP_KSTACK_SIZE, Ordering::Relaxed);
        boot::AP_USTACK_TOP[index].store(area + AP_AREA, Ordering::Relaxed);
    }
    // Trampoline and stack tables must be visible before any AP runs.
    fence(Ordering::SeqCst);

    // Software-enable the local APIC (spurious vector 0xff).
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff);
    let aps = || ids.iter().copied().filter(move |&id| id != bsp_id);
    for id in aps() {
        send_ipi(id, ICR_INIT);
    }
    cpu::delay_us(10_000);
    for id in aps() {
        send_ipi(id, ICR_STARTUP | SIPI_VECTOR);
    }
    cpu::delay_us(200);
    for id in aps() {
        send_ipi(id, ICR_STARTUP | SIPI_VECTOR);
    }
}

fn copy_trampoline() {
    let start = &raw const boot::ap_trampoline_start;
    let end = &raw const boot::ap_trampoline_end;
    let len = end as usize - start as usize;
    assert!(len > 0 && len <= 4096, "bad trampoline size");
    // SAFETY: the trampoline bytes are part of the loaded image; the target
    // page 0x10000 is reserved for it by the boot ABI and nothing else of
    // ours lives there.
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDR as *mut u8, len) };
}

/// Wait until every CPU in `1..count` reaches `state`, or `timeout_us`
/// passes. Returns whether all did.
pub fn wait_for(count: usize, state: u32, timeout_us: u64) -> bool {
    let start = cpu::rdtsc();
    let limit = cpu::us_to_ticks(timeout_us);
    loop {
        let all = RECORDS[1..count]
            .iter()
            .all(|r| r.state.load(Ordering::Acquire) >= state);
        if all {
            return true;
        }
        if cpu::rdtsc().wrapping_sub(start) > limit {
            return false;
        }
        cpu::pause();
    }
}

/// Whether some started CPU reported APIC ID `id`.
pub fn reported(count: usize, id: u8) -> bool {
    RECORDS[..count].iter().any(|r| {
        r.state.load(Ordering::Acquire) >= STARTED
            && r.apic_id.load(Ordering::Relaxed) == u32::from(id)
    })
}
