//! Vessel test guest: a tiny x86_64 kernel that boots through PVH or the
//! Linux 64-bit boot protocol, reports what the VMM gave it, starts every
//! CPU, runs a checksum workload on each one in ring 3 and then exits, powers
//! off, reboots, triple faults or holds as the command line asks.
//!
//! Ring 0 is a few hundred instructions of assembly ([`boot`]); everything
//! here runs in ring 3 with IOPL=3. See README.md for the ABI.

#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

mod acpi;
mod boot;
mod bootinfo;
mod cmdline;
mod cpu;
mod mem;
mod serial;
mod smp;
mod soak;
mod virtio;
mod work;

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bootinfo::{BootInfo, E820_RAM};
use cmdline::{Action, Options};
use serial::Line;
use smp::{DONE, RECORDS, STARTED};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Firecracker's boot-complete marker: byte 123 to port 0x3f0.
const BOOT_MARKER_PORT: u16 = 0x3f0;
const BOOT_MARKER: u8 = 123;
/// i8042 command port and its "pulse reset line" command.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Exit statuses.
const EXIT_FAIL: u8 = 1;
const EXIT_CPU_MISSING: u8 = 3;

/// How long the BSP waits for the APs to reach ring 3.
const START_TIMEOUT_US: u64 = 5_000_000;
/// How long the BSP waits for started APs to finish, per unit of `work=`.
const FINISH_TIMEOUT_US: u64 = 60_000_000;

/// Number of CPUs, work buffer base and bytes per CPU (set by the BSP
/// before it starts the APs).
static NCPUS: AtomicUsize = AtomicUsize::new(1);
static WORK_BASE: AtomicU64 = AtomicU64::new(0);
static WORK_BYTES: AtomicU64 = AtomicU64::new(0);

/// Ring-3 entry of every CPU (from `enter_ring3` in boot.rs); the BSP is 0.
extern "C" fn cpu_entry(index: u32) -> ! {
    match index {
        0 => bsp_main(),
        i => ap_main(i as usize),
    }
}

macro_rules! fail {
    ($code:expr, $($arg:tt)*) => {
        $crate::fail($code, format_args!($($arg)*))
    };
}

/// Print `FAIL: ...` and exit with `code`.
fn fail(code: u8, args: fmt::Arguments) -> ! {
    println!("FAIL: {}", args);
    cpu::exit(code)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = Line::lock_or_steal(100_000);
    let _ = write!(line, "\nFAIL: panic");
    if let Some(loc) = info.location() {
        let _ = write!(line, " at {}:{}", loc.file(), loc.line());
    }
    let _ = writeln!(line, ": {}", info.message());
    drop(line);
    cpu::exit(EXIT_FAIL)
}

/// Referenced by the precompiled `core` in non-LTO (debug) builds; never
/// called, since panics abort.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Displays bytes as text (invalid UTF-8 as '?').
struct Bytes<'a>(&'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                f.write_char('?')?;
            }
        }
        Ok(())
    }
}

fn bsp_main() -> ! {
    let info = BootInfo::read().unwrap_or_else(|e| {
        println!("Vessel guest {VERSION} (boot: unknown)");
        fail!(EXIT_FAIL, "{e}")
    });
    println!("Vessel guest {VERSION} (boot: {})", info.kind.name());
    cpu::outb(BOOT_MARKER_PORT, BOOT_MARKER);
    println!("cmdline: {}", Bytes(info.cmdline()));
    for e in info.memory_map() {
        let last = e.addr.wrapping_add(e.size).wrapping_sub(1);
        println!("e820: 0x{:016x}-0x{:016x} {}", e.addr, last, e.kind_name());
    }
    println!("memory: {} MiB usable", info.usable_bytes() >> 20);
    let opts = Options::parse(info.cmdline())
        .unwrap_or_else(|word| fail!(EXIT_FAIL, "bad option '{}'", Bytes(word)));

    let rsdp = acpi::find_rsdp(info.rsdp);
    let mut cpus = acpi::find_cpus(rsdp);
    smp::set_lapic_base(cpus.lapic);
    let bsp_id = smp::apic_id();
    cpus.ensure(bsp_id);
    {
        let mut line = Line::lock();
        let _ = write!(line, "cpus: {} (apic ids:", cpus.len);
        for id in cpus.ids() {
            let _ = write!(line, " {id}");
        }
        let _ = writeln!(line, ")");
    }
    if cpus.truncated {
        fail!(EXIT_FAIL, "more than {} cpus", boot::MAX_CPUS);
    }
    let n = cpus.len;

    let plan = plan_memory(&info, n, opts.work)
        .unwrap_or_else(|| fail!(EXIT_FAIL, "not enough memory for {n} cpus"));
    NCPUS.store(n, Ordering::Relaxed);
    WORK_BASE.store(plan.work_base, Ordering::Relaxed);
    WORK_BYTES.store(plan.work_bytes, Ordering::Relaxed);
    if opts.action == Action::Soak {
        soak::arm(info.cmdline(), n, plan.work_base, plan.work_bytes)
            .unwrap_or_else(|word| fail!(EXIT_FAIL, "bad option '{}'", Bytes(word)));
    }
    if n > 1 {
        smp::start_aps(cpus.ids(), bsp_id, plan.stacks);
    }

    run_cpu(0, bsp_id);

    if !smp::wait_for(n, STARTED, START_TIMEOUT_US) {
        let mut line = Line::lock();
        let _ = write!(line, "FAIL: cpu(s)");
        for &id in cpus.ids().iter().filter(|&&id| !smp::reported(n, id)) {
            let _ = write!(line, " {id}");
        }
        let _ = writeln!(line, " did not start");
        drop(line);
        cpu::exit(EXIT_CPU_MISSING);
    }
    if !smp::wait_for(n, DONE, FINISH_TIMEOUT_US * opts.work) {
        let mut line = Line::lock();
        let _ = write!(line, "FAIL: cpu(s)");
        for (i, r) in RECORDS[..n].iter().enumerate() {
            if r.state.load(Ordering::Acquire) != DONE {
                let _ = write!(line, " {i}");
            }
        }
        let _ = writeln!(line, " did not finish");
        drop(line);
        cpu::exit(EXIT_CPU_MISSING);
    }
    check_reports(n);
    println!("all {n} cpus ran in ring 3");
    // The work buffers are free again: the virtio drivers' memory starts
    // there (the AP stacks below stay untouched).
    let (ok, soak_disk) = virtio::run(&info, &opts, rsdp, plan.work_base);
    if !ok {
        cpu::exit(virtio::EXIT_VIRTIO);
    }
    let mut free_from = plan.work_base + n as u64 * plan.work_bytes;
    if opts.touch_mib > 0 {
        let from = free_from;
        let end = info
            .memory_map()
            .iter()
            .filter(|e| e.kind == E820_RAM && e.addr <= from && from < e.end())
            .map(|e| e.end().min(cpu::phys::LIMIT))
            .next()
            .unwrap_or(from);
        free_from = soak::touch(from, end, opts.touch_mib);
    }
    let mut disk = None;
    if opts.action == Action::Soak && opts.soak_disk {
        let Some(t) = soak_disk else {
            fail!(
                virtio::EXIT_VIRTIO,
                "soakdisk: no writable virtio-blk disk tested"
            );
        };
        match virtio::soak_disk(&info, t, free_from) {
            Ok(d) => disk = Some(d),
            Err(e) => fail!(virtio::EXIT_VIRTIO, "soakdisk: {e}"),
        }
    }
    let genid = opts.genid;
    let mut last_genid = None;
    let mut hook = move || {
        if let Some(d) = disk.as_mut() {
            soak_disk_step(d);
        }
        if let Some(addr) = genid {
            let id = read_genid(addr);
            if last_genid != Some(id) {
                last_genid = Some(id);
                println!("soak genid={:016x}{:016x}", id[0], id[1]);
            }
        }
    };
    finish(opts.action, rsdp, &mut hook)
}

/// One `soakdisk=on` step; a mismatch or an I/O error ends the guest.
fn soak_disk_step(d: &mut virtio::SoakDisk) {
    match d.step() {
        Ok(()) => println!("soak disk step={} ok", d.steps()),
        Err(virtio::SoakError::Mismatch {
            step,
            sector,
            found,
        }) => {
            match found {
                Some(k) => {
                    println!("soak disk MISMATCH step={step} sector={sector} (holds step {k})")
                }
                None => println!("soak disk MISMATCH step={step} sector={sector} (unknown data)"),
            }
            cpu::exit(soak::EXIT_MISMATCH)
        }
        Err(virtio::SoakError::Io(e)) => fail!(virtio::EXIT_VIRTIO, "soak disk: {e}"),
    }
}

/// The 16 bytes at `addr` (`genid=`), as two little-endian words.
fn read_genid(addr: u64) -> [u64; 2] {
    // SAFETY: the command line named this guest-physical address (8-byte
    // aligned, below 4 GiB, checked when parsed), which the identity map
    // covers; reading it has no side effect (a VM generation ID in RAM).
    unsafe {
        [
            core::ptr::read_volatile(addr as *const u64),
            core::ptr::read_volatile((addr + 8) as *const u64),
        ]
    }
}

fn ap_main(index: usize) -> ! {
    if index < NCPUS.load(Ordering::Relaxed) {
        run_cpu(index, smp::apic_id());
        soak::ap(index);
    }
    cpu::park()
}

/// Record that this CPU is in ring 3, run the workload on its buffer and
/// print its line.
fn run_cpu(index: usize, apic_id: u8) {
    let record = &RECORDS[index];
    let cpl = cpu::cpl();
    record.apic_id.store(u32::from(apic_id), Ordering::Relaxed);
    record.cpl.store(cpl, Ordering::Relaxed);
    record.state.store(STARTED, Ordering::Release);

    let bytes = WORK_BYTES.load(Ordering::Relaxed);
    let base = WORK_BASE.load(Ordering::Relaxed) + index as u64 * bytes;
    // SAFETY: plan_memory reserved `bytes` bytes of usable, identity-mapped
    // RAM at `base` for this CPU index alone; nothing else uses it.
    let buf = unsafe { core::slice::from_raw_parts_mut(base as *mut u64, (bytes / 8) as usize) };
    let (ok, checksum) = work::run(buf);
    record.ok.store(u8::from(ok), Ordering::Relaxed);
    record.checksum.store(checksum, Ordering::Relaxed);
    let verdict = if ok { "ok" } else { "FAILED" };
    println!(
        "cpu {index}: apic id {apic_id}, ring {cpl} (cpl {cpl}), work {verdict} 0x{checksum:016x}"
    );
    record.state.store(DONE, Ordering::Release);
}

/// Every CPU must have verified its memory, run in ring 3 and agreed on the
/// checksum.
fn check_reports(n: usize) {
    let expected = RECORDS[0].checksum.load(Ordering::Relaxed);
    for (i, r) in RECORDS[..n].iter().enumerate() {
        if r.ok.load(Ordering::Relaxed) == 0 {
            fail!(EXIT_FAIL, "cpu {i} read back wrong data");
        }
        let cpl = r.cpl.load(Ordering::Relaxed);
        if cpl != 3 {
            fail!(EXIT_FAIL, "cpu {i} ran in ring {cpl}");
        }
        let sum = r.checksum.load(Ordering::Relaxed);
        if sum != expected {
            fail!(
                EXIT_FAIL,
                "cpu {i} checksum 0x{sum:016x} != 0x{expected:016x}"
            );
        }
    }
}

fn finish(action: Action, rsdp: Option<u64>, soak_hook: &mut dyn FnMut()) -> ! {
    match action {
        Action::Exit(status) => cpu::exit(status),
        Action::Hold => cpu::spin_forever(),
        Action::Idle => cpu::park(),
        Action::TripleFault => cpu::triple_fault(),
        Action::Fault => cpu::invalid_opcode(),
        Action::Soak => soak::bsp(soak_hook),
        Action::Poweroff => {
            if let Err(e) = acpi::poweroff(rsdp) {
                fail!(EXIT_FAIL, "poweroff: {e}");
            }
            cpu::delay_us(1_000_000);
            fail!(EXIT_FAIL, "poweroff did not happen")
        }
        Action::Reboot => {
            cpu::outb(I8042_COMMAND, I8042_RESET);
            cpu::delay_us(1_000_000);
            if acpi::reset(rsdp) {
                cpu::delay_us(1_000_000);
            }
            fail!(EXIT_FAIL, "reboot did not happen")
        }
    }
}

/// Where the APs' stacks and every CPU's work buffer go.
struct MemoryPlan {
    stacks: u64,
    work_base: u64,
    work_bytes: u64,
}

/// Place `n - 1` AP stack areas and `n` work buffers in one usable e820
/// range above the image (and below 4 GiB). The buffer is
/// `2 MiB * work`, halved until everything fits (down to 64 KiB).
fn plan_memory(info: &BootInfo, n: usize, work: u64) -> Option<MemoryPlan> {
    let image_end = &raw const boot::__image_end as u64;
    let align = |x: u64, a: u64| x.div_ceil(a) * a;
    let stacks_len = (n as u64 - 1) * smp::AP_AREA;
    let mut bytes = work::BASE_BYTES * work;
    while bytes >= work::MIN_BYTES {
        let need = stacks_len + n as u64 * bytes;
        for e in info.memory_map().iter().filter(|e| e.kind == E820_RAM) {
            let start = align(e.addr.max(image_end), 1 << 16);
            let end = e.end().min(cpu::phys::LIMIT);
            if start < end && end - start >= need {
                return Some(MemoryPlan {
                    stacks: start,
                    work_base: start + stacks_len,
                    work_bytes: bytes,
                });
            }
        }
        bytes /= 2;
    }
    None
}
