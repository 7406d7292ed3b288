//! virtio 1.x drivers (block, entropy, network, vsock) over virtio-mmio v2
//! and virtio-pci modern, run by the BSP in ring 3 after the per-CPU
//! workload. Everything is polled: no interrupts, no MSI-X.
//!
//! Discovery: `virtio_mmio.device=` command-line entries, DSDT devices with
//! `_HID "LNRO0005"`, and PCI bus 0 (vendor 0x1af4). Each device found is
//! reset, negotiated (VERSION_1 plus what the driver implements), given its
//! queues in [`dma`] memory and exercised; then it is reset again so that it
//! stops using guest memory.

mod bench;
mod blk;
mod blkbench;
mod dma;
mod mmio;
mod net;
mod netbench;
mod pci;
mod queue;
mod rng;
mod vsock;

pub use blk::{SoakDisk, SoakError};

use core::fmt;

use crate::bootinfo::{BootInfo, E820_RAM};
use crate::cmdline::{BenchKind, Options, VirtioSel, VIRTIO_TYPES};
use crate::cpu::{self, phys};
use crate::println;

/// Exit status after any virtio failure.
pub const EXIT_VIRTIO: u8 = 5;

/// Device status bits.
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const FAILED: u8 = 0x80;

/// Feature bit every device must offer and every driver here accepts.
const F_VERSION_1: u64 = 1 << 32;

/// The device types tested, in the bit order of `virtio=` ([`VIRTIO_TYPES`]).
const DEVICE_IDS: [u32; 4] = [2, 4, 1, 19];

/// Most devices looked at per boot.
const MAX_DEVICES: usize = 16;

/// How a device is reached.
pub enum Transport {
    Mmio(mmio::Mmio),
    Pci(pci::Pci),
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Mmio(m) => write!(f, "mmio@0x{:x}", m.base),
            Transport::Pci(p) => write!(f, "pci@00:{:02x}.{}", p.dev, p.func),
        }
    }
}

macro_rules! both {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            Transport::Mmio($t) => $e,
            Transport::Pci($t) => $e,
        }
    };
}

impl Transport {
    pub fn status(&self) -> u8 {
        both!(self, t => t.status())
    }

    pub fn set_status(&self, status: u8) {
        both!(self, t => t.set_status(status))
    }

    pub fn device_features(&self) -> u64 {
        both!(self, t => t.device_features())
    }

    pub fn set_driver_features(&self, features: u64) {
        both!(self, t => t.set_driver_features(features))
    }

    /// Largest size of queue `index`, 0 if it does not exist (or is already
    /// enabled).
    pub fn queue_max(&self, index: u16) -> u16 {
        both!(self, t => t.queue_max(index))
    }

    pub fn queue_setup(
        &mut self,
        index: u16,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<(), &'static str> {
        both!(self, t => t.queue_setup(index, size, desc, avail, used));
        Ok(())
    }

    pub fn notify(&self, index: u16) {
        both!(self, t => t.notify(index))
    }

    fn config_generation(&self) -> u32 {
        both!(self, t => t.config_generation())
    }

    pub fn config_read8(&self, offset: u64) -> u8 {
        both!(self, t => t.config_read8(offset))
    }

    pub fn config_read32(&self, offset: u64) -> u32 {
        both!(self, t => t.config_read32(offset))
    }

    /// A 64-bit configuration field, read as two 32-bit halves under a
    /// stable configuration generation.
    pub fn config_read64(&self, offset: u64) -> u64 {
        loop {
            let generation = self.config_generation();
            let low = self.config_read32(offset);
            let high = self.config_read32(offset + 4);
            if self.config_generation() == generation {
                return u64::from(low) | u64::from(high) << 32;
            }
        }
    }

    /// Reset, acknowledge, negotiate `wanted` (plus VERSION_1, which is
    /// required) and set FEATURES_OK. Returns the accepted features.
    pub fn begin(&mut self, wanted: u64) -> Result<u64, &'static str> {
        self.reset()?;
        self.set_status(ACKNOWLEDGE);
        self.set_status(ACKNOWLEDGE | DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err("device does not offer VERSION_1");
        }
        let features = offered & (wanted | F_VERSION_1);
        self.set_driver_features(features);
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if self.status() & FEATURES_OK == 0 {
            return Err("device did not accept the features");
        }
        Ok(features)
    }

    /// Set DRIVER_OK once the queues are set up.
    pub fn ready(&self) {
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Write 0 to the status and wait (up to 1 s) until the device reads
    /// back 0: it has stopped using its queues.
    fn reset(&self) -> Result<(), &'static str> {
        self.set_status(0);
        let start = cpu::rdtsc();
        let limit = cpu::us_to_ticks(1_000_000);
        while self.status() != 0 {
            if cpu::rdtsc().wrapping_sub(start) > limit {
                return Err("device did not reset");
            }
            cpu::pause();
        }
        Ok(())
    }
}

/// A device to test: its transport (PCI functions are opened lazily) and
/// its type.
enum Candidate {
    Mmio(u64),
    Pci(pci::Function),
}

/// Index into [`VIRTIO_TYPES`] of a virtio device ID.
fn kind_of(device_type: u32) -> Option<usize> {
    DEVICE_IDS.iter().position(|&id| id == device_type)
}

/// Find the devices, test those selected and print one line per device.
/// Returns false if anything failed (the `FAIL:` lines are printed), and with
/// `soakdisk=on` the first virtio-blk disk tested, for [`soak_disk`].
pub fn run(
    info: &BootInfo,
    opts: &Options,
    rsdp: Option<u64>,
    free_from: u64,
) -> (bool, Option<Transport>) {
    // The device type a benchmark runs on (bit of `virtio=`), if any.
    let bench_bit = match opts.bench.kind {
        BenchKind::None => 0,
        BenchKind::Blk => 1 << 0,
        BenchKind::Net => 1 << 2,
    };
    let only = match opts.virtio {
        VirtioSel::Off => return (true, None),
        VirtioSel::Only(mask) => mask | bench_bit,
        // A benchmark alone, unless `virtio=` asks for more.
        VirtioSel::Default if bench_bit != 0 => bench_bit,
        VirtioSel::Default | VirtioSel::All => 0xf,
    };
    let mut benched = false;

    let mut list: [Option<(Candidate, u32)>; MAX_DEVICES] = [const { None }; MAX_DEVICES];
    let mut len = 0;
    let mut push = |c: Candidate, device_type: u32| {
        if len < MAX_DEVICES {
            list[len] = Some((c, device_type));
            len += 1;
        }
    };
    let mut bases = [0u64; MAX_DEVICES];
    let mut nbases = 0;
    for r in opts.mmio() {
        if nbases < MAX_DEVICES && !bases[..nbases].contains(&r.base) {
            bases[nbases] = r.base;
            nbases += 1;
        }
    }
    let nbases = mmio::acpi_devices(rsdp, &mut bases, nbases);
    let mut legacy_found = false;
    for &base in &bases[..nbases] {
        match mmio::probe(base) {
            mmio::Probe::Nothing => {}
            mmio::Probe::Legacy(id) => {
                legacy_found = true;
                println!("virtio: mmio@0x{base:x}: legacy (version 1) device type {id} skipped");
            }
            mmio::Probe::Device(id, _) => push(Candidate::Mmio(base), id),
        }
    }
    let ecam = pci::use_ecam(opts.pci_ecam, rsdp);
    let mut functions = [pci::Function {
        dev: 0,
        func: 0,
        device_type: 0,
    }; MAX_DEVICES];
    let nfunctions = pci::scan(&mut functions);
    for f in &functions[..nfunctions] {
        push(Candidate::Pci(*f), f.device_type);
    }

    let mut ok = true;
    let mut soak_disk = None;
    let mut tested = 0u8;
    let mut arena_ready = false;
    let window_start = opts.pci_window.max(ram_end(info));
    let mut window = pci::Window::new(window_start, ecam, opts.pci_assign);
    for (candidate, device_type) in list[..len].iter().flatten() {
        let Some(kind) = kind_of(*device_type) else {
            continue;
        };
        if only & (1 << kind) == 0 {
            continue;
        }
        let name = VIRTIO_TYPES[kind];
        if !arena_ready {
            let want = if opts.bench.kind == BenchKind::None {
                dma::ARENA_BYTES
            } else {
                dma::BENCH_ARENA_BYTES
            };
            match arena(info, free_from, want) {
                Some((start, len)) => dma::init(start, len),
                None => {
                    println!("FAIL: virtio: no memory for the queues");
                    return (false, None);
                }
            }
            arena_ready = true;
            if bench_bit != 0 {
                bench::init_clock();
            }
        }
        let mut t = match candidate {
            Candidate::Mmio(base) => match mmio::probe(*base) {
                mmio::Probe::Device(_, m) => Transport::Mmio(m),
                _ => continue,
            },
            Candidate::Pci(f) => match pci::Pci::open(*f, &mut window) {
                Ok(p) => Transport::Pci(p),
                Err(e) => {
                    println!("FAIL: virtio-{name} pci@00:{:02x}.{}: {e}", f.dev, f.func);
                    ok = false;
                    continue;
                }
            },
        };
        tested |= 1 << kind;
        // The first device of the benchmark's type gets the benchmark
        // instead of its test.
        let bench_this = !benched && bench_bit == 1 << kind;
        benched |= bench_this;
        let result = match kind {
            0 if bench_this => blkbench::bench(&mut t, &opts.bench),
            2 if bench_this => netbench::bench(&mut t, &opts.net, &opts.bench),
            0 => blk::test(&mut t),
            1 => rng::test(&mut t),
            2 => net::test(&mut t, &opts.net),
            _ => vsock::test(&mut t, opts.vsock_port),
        };
        if let Err(e) = result {
            println!("FAIL: virtio-{name} {t}: {e}");
            t.set_status(t.status() | FAILED);
            ok = false;
        }
        // Stop the device from touching its queues and buffers.
        let _ = t.reset();
        if opts.soak_disk && kind == 0 && !bench_this && soak_disk.is_none() {
            soak_disk = Some(t);
        }
    }

    if bench_bit != 0 && !benched {
        let name = VIRTIO_TYPES[bench_bit.trailing_zeros() as usize];
        println!("FAIL: bench: no virtio-{name} device found");
        ok = false;
    }
    match opts.virtio {
        VirtioSel::All if tested == 0 && !legacy_found => println!("virtio: none found"),
        VirtioSel::Only(mask) => {
            for (kind, name) in VIRTIO_TYPES.iter().enumerate() {
                if mask & !tested & (1 << kind) != 0 {
                    println!("FAIL: virtio-{name}: no device found");
                    ok = false;
                }
            }
        }
        _ => {}
    }
    (ok, soak_disk)
}

/// `soakdisk=on`: the disk behind `t` set up again for the soak, with its
/// own DMA memory at or above `free_from` (past the soak's work buffers).
pub fn soak_disk(info: &BootInfo, t: Transport, free_from: u64) -> Result<SoakDisk, &'static str> {
    let (start, len) =
        arena(info, free_from, dma::ARENA_BYTES).ok_or("no memory for the queues")?;
    dma::init(start, len);
    SoakDisk::start(t)
}

/// End of the highest usable RAM below 4 GiB (BARs are never assigned
/// below it).
fn ram_end(info: &BootInfo) -> u64 {
    info.memory_map()
        .iter()
        .filter(|e| e.kind == E820_RAM && e.addr < phys::LIMIT)
        .map(|e| e.end().min(phys::LIMIT))
        .max()
        .unwrap_or(0)
        .div_ceil(1 << 20)
        << 20
}

/// Where the DMA arena goes: the first usable e820 range (below 4 GiB) with
/// [`dma::ARENA_BYTES`] free at or above `free_from`. Returns its start and
/// length: up to `want` bytes, as much as that range has.
fn arena(info: &BootInfo, free_from: u64, want: u64) -> Option<(u64, u64)> {
    info.memory_map()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .find_map(|e| {
            let start = e.addr.max(free_from).div_ceil(4096) * 4096;
            let end = e.end().min(phys::LIMIT) / 4096 * 4096;
            (start < end && end - start >= dma::ARENA_BYTES)
                .then(|| (start, (end - start).min(want)))
        })
}

/// Format helper: a MAC address as `aa:bb:cc:dd:ee:ff`.
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}
