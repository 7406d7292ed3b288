//! The virtio-pci modern transport (virtio 1.2 §4.1), found by scanning PCI
//! bus 0 through configuration mechanism #1 (ports 0xcf8/0xcfc, 32-bit
//! accesses). Memory BARs that the firmware left unassigned (or put above
//! 4 GiB, outside the guest's identity map) are assigned here from a window
//! below the local APIC/IOAPIC area.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi;
use crate::cpu::{self, phys};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

const VENDOR_VIRTIO: u16 = 0x1af4;
/// Transitional device IDs are 0x1000..=0x103f, modern 0x1040 + type.
const DEVICE_FIRST: u16 = 0x1000;
const DEVICE_MODERN: u16 = 0x1040;
const DEVICE_LAST: u16 = 0x107f;

const PCI_COMMAND: u8 = 0x04;
const PCI_STATUS_CAP_LIST: u32 = 1 << 20;
const PCI_HEADER_TYPE: u8 = 0x0e;
const PCI_BAR0: u8 = 0x10;
const PCI_SUBSYSTEM_ID: u8 = 0x2e;
const PCI_CAP_PTR: u8 = 0x34;
const CMD_MEMORY: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;
const CAP_VENDOR: u8 = 0x09;

/// `cfg_type` of the virtio vendor capabilities.
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;

/// `struct virtio_pci_common_cfg` offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Unassigned BARs go from the window start (`pciwindow=`, default
/// 0xe0000000, or the end of RAM if that is higher) up to here, avoiding
/// every BAR already assigned and the ECAM area.
const WINDOW_END: u64 = 0xfe00_0000;
/// Queues whose notify offsets are remembered.
const MAX_QUEUES: usize = 8;

/// ECAM base of bus 0 (from the MCFG), 0 to use ports 0xcf8/0xcfc.
static ECAM: AtomicU64 = AtomicU64::new(0);

/// Bytes of ECAM space per bus.
const ECAM_BUS_BYTES: u64 = 1 << 20;

/// Use the ECAM area of PCI segment 0, bus 0: `given` (`pciecam=`, one bus
/// assumed) or what the MCFG lists, if inside the identity map. Returns its
/// range.
pub fn use_ecam(given: Option<u64>, rsdp: Option<u64>) -> Option<(u64, u64)> {
    let (base, start_bus, end_bus) = match given {
        Some(base) => (base, 0, 0),
        None => rsdp.and_then(acpi::mcfg_bus0)?,
    };
    if start_bus != 0 || !phys::mapped(base, ECAM_BUS_BYTES) {
        return None;
    }
    ECAM.store(base, Ordering::Relaxed);
    Some((base, base + (u64::from(end_bus) + 1) * ECAM_BUS_BYTES))
}

fn config_address(dev: u8, func: u8, offset: u8) -> u32 {
    0x8000_0000 | u32::from(dev) << 11 | u32::from(func) << 8 | u32::from(offset & 0xfc)
}

/// The ECAM address of a register, if ECAM is in use.
fn ecam(dev: u8, func: u8, offset: u8) -> Option<u64> {
    let base = ECAM.load(Ordering::Relaxed);
    (base != 0)
        .then(|| base + (u64::from(dev) << 15 | u64::from(func) << 12 | u64::from(offset & 0xfc)))
}

fn read32(dev: u8, func: u8, offset: u8) -> u32 {
    if let Some(addr) = ecam(dev, func, offset) {
        return phys::mmio_read32(addr);
    }
    cpu::outl(CONFIG_ADDRESS, config_address(dev, func, offset));
    cpu::inl(CONFIG_DATA)
}

fn write32(dev: u8, func: u8, offset: u8, value: u32) {
    if let Some(addr) = ecam(dev, func, offset) {
        return phys::mmio_write32(addr, value);
    }
    cpu::outl(CONFIG_ADDRESS, config_address(dev, func, offset));
    cpu::outl(CONFIG_DATA, value);
}

fn read8(dev: u8, func: u8, offset: u8) -> u8 {
    (read32(dev, func, offset) >> ((offset & 3) * 8)) as u8
}

fn read16(dev: u8, func: u8, offset: u8) -> u16 {
    (read32(dev, func, offset) >> ((offset & 2) * 8)) as u16
}

/// A virtio function on bus 0.
#[derive(Clone, Copy)]
pub struct Function {
    pub dev: u8,
    pub func: u8,
    pub device_type: u32,
}

/// Every function of bus 0 with a virtio vendor/device ID, in slot order.
pub fn scan(out: &mut [Function]) -> usize {
    let mut n = 0;
    for dev in 0..32 {
        if read32(dev, 0, 0) & 0xffff == 0xffff {
            continue;
        }
        let funcs = if read8(dev, 0, PCI_HEADER_TYPE) & 0x80 != 0 {
            8
        } else {
            1
        };
        for func in 0..funcs {
            let id = read32(dev, func, 0);
            let (vendor, device) = (id as u16, (id >> 16) as u16);
            if vendor != VENDOR_VIRTIO || !(DEVICE_FIRST..=DEVICE_LAST).contains(&device) {
                continue;
            }
            let device_type = if device >= DEVICE_MODERN {
                u32::from(device - DEVICE_MODERN)
            } else {
                u32::from(read16(dev, func, PCI_SUBSYSTEM_ID))
            };
            if n < out.len() {
                out[n] = Function {
                    dev,
                    func,
                    device_type,
                };
                n += 1;
            }
        }
    }
    n
}

/// A memory BAR: base (0 if unassigned), size, 64-bit.
struct Bar {
    base: u64,
    size: u64,
    wide: bool,
}

/// Read and size memory BAR `i` (decoding is off while sizing). `None` for
/// an I/O BAR or the upper half of a 64-bit one.
fn bar(dev: u8, func: u8, i: u8) -> Option<Bar> {
    let off = PCI_BAR0 + 4 * i;
    let low = read32(dev, func, off);
    if low & 1 != 0 {
        return None;
    }
    let wide = (low >> 1) & 3 == 2;
    if wide && i == 5 {
        return None;
    }
    let high = if wide { read32(dev, func, off + 4) } else { 0 };
    let command = read32(dev, func, PCI_COMMAND) & 0xffff;
    write32(dev, func, PCI_COMMAND, command & !CMD_MEMORY);
    write32(dev, func, off, !0);
    let mask_low = read32(dev, func, off);
    write32(dev, func, off, low);
    let mask_high = if wide {
        write32(dev, func, off + 4, !0);
        let m = read32(dev, func, off + 4);
        write32(dev, func, off + 4, high);
        m
    } else {
        !0
    };
    write32(dev, func, PCI_COMMAND, command);
    let mask = u64::from(mask_low & !0xf) | u64::from(mask_high) << 32;
    if mask_low & !0xf == 0 {
        return None;
    }
    Some(Bar {
        base: u64::from(low & !0xf) | u64::from(high) << 32,
        size: (!mask).wrapping_add(1),
        wide,
    })
}

/// Hands out addresses for unassigned BARs.
pub struct Window {
    next: u64,
    /// Already assigned memory BARs (base, end) on bus 0, filled on first use.
    taken: [(u64, u64); 64],
    taken_len: usize,
    surveyed: bool,
    /// Assign BARs even if they already have an address.
    pub force: bool,
}

impl Window {
    /// A window starting at `start`, around `reserved` (the ECAM area).
    pub fn new(start: u64, reserved: Option<(u64, u64)>, force: bool) -> Window {
        let mut w = Window {
            next: start,
            taken: [(0, 0); 64],
            taken_len: 0,
            surveyed: false,
            force,
        };
        if let Some(r) = reserved {
            w.taken[0] = r;
            w.taken_len = 1;
        }
        w
    }

    /// Record every assigned memory BAR of bus 0 below 4 GiB.
    fn survey(&mut self) {
        self.surveyed = true;
        for dev in 0..32 {
            if read32(dev, 0, 0) & 0xffff == 0xffff {
                continue;
            }
            let funcs = if read8(dev, 0, PCI_HEADER_TYPE) & 0x80 != 0 {
                8
            } else {
                1
            };
            for func in 0..funcs {
                if read32(dev, func, 0) & 0xffff == 0xffff {
                    continue;
                }
                let bars = match read8(dev, func, PCI_HEADER_TYPE) & 0x7f {
                    0 => 6,
                    1 => 2,
                    _ => 0,
                };
                let mut i = 0;
                while i < bars {
                    let b = bar(dev, func, i);
                    if let Some(b) = &b {
                        if b.base != 0 && b.base < phys::LIMIT && self.taken_len < self.taken.len()
                        {
                            self.taken[self.taken_len] = (b.base, b.base.saturating_add(b.size));
                            self.taken_len += 1;
                        }
                    }
                    i += if b.is_some_and(|b| b.wide) { 2 } else { 1 };
                }
            }
        }
    }

    fn alloc(&mut self, size: u64) -> Option<u64> {
        if !self.surveyed {
            self.survey();
        }
        let size = size.max(4096);
        let mut addr = self.next.div_ceil(size) * size;
        'retry: loop {
            if addr + size > WINDOW_END {
                return None;
            }
            for &(start, end) in &self.taken[..self.taken_len] {
                if addr < end && start < addr + size {
                    addr = end.div_ceil(size) * size;
                    continue 'retry;
                }
            }
            break;
        }
        if self.taken_len < self.taken.len() {
            self.taken[self.taken_len] = (addr, addr + size);
            self.taken_len += 1;
        }
        self.next = addr + size;
        Some(addr)
    }
}

/// One structure a virtio capability points at.
#[derive(Clone, Copy, Default)]
struct Cap {
    bar: u8,
    offset: u32,
    length: u32,
    found: bool,
}

/// A virtio-pci modern device, ready to drive through its common config.
pub struct Pci {
    pub dev: u8,
    pub func: u8,
    common: u64,
    notify: u64,
    notify_mul: u32,
    device_cfg: u64,
    notify_off: [u16; MAX_QUEUES],
}

impl Pci {
    /// Find the virtio capabilities of `f`, make sure their BARs are
    /// assigned (below 4 GiB) and enable memory decoding and bus mastering.
    pub fn open(f: Function, window: &mut Window) -> Result<Pci, &'static str> {
        let (dev, func) = (f.dev, f.func);
        let mut caps = [Cap::default(); 5];
        let mut notify_mul = 0;
        if read32(dev, func, PCI_COMMAND) & PCI_STATUS_CAP_LIST != 0 {
            let mut ptr = read8(dev, func, PCI_CAP_PTR) & 0xfc;
            let mut hops = 0;
            while ptr >= 0x40 && hops < 48 {
                if read8(dev, func, ptr) == CAP_VENDOR {
                    let kind = read8(dev, func, ptr + 3);
                    let bar = read8(dev, func, ptr + 4);
                    if (1..=4).contains(&kind) && bar < 6 && !caps[usize::from(kind)].found {
                        caps[usize::from(kind)] = Cap {
                            bar,
                            offset: read32(dev, func, ptr + 8),
                            length: read32(dev, func, ptr + 12),
                            found: true,
                        };
                        if kind == CAP_NOTIFY_CFG {
                            notify_mul = read32(dev, func, ptr + 16);
                        }
                    }
                }
                ptr = read8(dev, func, ptr + 1) & 0xfc;
                hops += 1;
            }
        }
        let (common, notify) = (
            caps[usize::from(CAP_COMMON_CFG)],
            caps[CAP_NOTIFY_CFG as usize],
        );
        if !common.found || !notify.found {
            return Err("no virtio 1.x capabilities (legacy-only device)");
        }
        if common.length < 0x38 {
            return Err("common config structure too small");
        }

        // Base address of every BAR a capability uses.
        let mut bases = [0u64; 6];
        for cap in caps.iter().filter(|c| c.found) {
            let i = cap.bar;
            if bases[usize::from(i)] != 0 {
                continue;
            }
            let b = bar(dev, func, i).ok_or("capability in an I/O or bad BAR")?;
            let mut base = b.base;
            if base == 0 || base.saturating_add(b.size) > phys::LIMIT || window.force {
                base = window.alloc(b.size).ok_or("no room to assign a BAR")?;
                let off = PCI_BAR0 + 4 * i;
                let low = read32(dev, func, off) & 0xf;
                write32(dev, func, off, base as u32 | low);
                if b.wide {
                    write32(dev, func, off + 4, 0);
                }
            }
            bases[usize::from(i)] = base;
        }
        let command = read32(dev, func, PCI_COMMAND) & 0xffff;
        write32(
            dev,
            func,
            PCI_COMMAND,
            command | CMD_MEMORY | CMD_BUS_MASTER,
        );

        let at = |c: Cap| bases[usize::from(c.bar)] + u64::from(c.offset);
        let device = caps[usize::from(CAP_DEVICE_CFG)];
        let _isr = caps[usize::from(CAP_ISR_CFG)];
        Ok(Pci {
            dev,
            func,
            common: at(common),
            notify: at(notify),
            notify_mul,
            device_cfg: if device.found { at(device) } else { 0 },
            notify_off: [0; MAX_QUEUES],
        })
    }

    fn r8(&self, off: u64) -> u8 {
        phys::mmio_read8(self.common + off)
    }

    fn r16(&self, off: u64) -> u16 {
        phys::mmio_read16(self.common + off)
    }

    fn r32(&self, off: u64) -> u32 {
        phys::mmio_read32(self.common + off)
    }

    fn w16(&self, off: u64, value: u16) {
        phys::mmio_write16(self.common + off, value)
    }

    fn w32(&self, off: u64, value: u32) {
        phys::mmio_write32(self.common + off, value)
    }

    fn w64(&self, off: u64, value: u64) {
        self.w32(off, value as u32);
        self.w32(off + 4, (value >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.r8(DEVICE_STATUS)
    }

    pub fn set_status(&self, status: u8) {
        phys::mmio_write8(self.common + DEVICE_STATUS, status)
    }

    pub fn device_features(&self) -> u64 {
        self.w32(DEVICE_FEATURE_SELECT, 0);
        let low = self.r32(DEVICE_FEATURE);
        self.w32(DEVICE_FEATURE_SELECT, 1);
        u64::from(low) | u64::from(self.r32(DEVICE_FEATURE)) << 32
    }

    pub fn set_driver_features(&self, features: u64) {
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, features as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (features >> 32) as u32);
    }

    pub fn queue_max(&self, index: u16) -> u16 {
        if usize::from(index) >= MAX_QUEUES || index >= self.r16(NUM_QUEUES) {
            return 0;
        }
        self.w16(QUEUE_SELECT, index);
        if self.r16(QUEUE_ENABLE) != 0 {
            return 0;
        }
        self.r16(QUEUE_SIZE)
    }

    pub fn queue_setup(&mut self, index: u16, size: u16, desc: u64, avail: u64, used: u64) {
        self.w16(QUEUE_SELECT, index);
        self.w16(QUEUE_SIZE, size);
        self.w64(QUEUE_DESC, desc);
        self.w64(QUEUE_DRIVER, avail);
        self.w64(QUEUE_DEVICE, used);
        self.notify_off[usize::from(index)] = self.r16(QUEUE_NOTIFY_OFF);
        self.w16(QUEUE_ENABLE, 1);
    }

    pub fn notify(&self, index: u16) {
        let off = u64::from(self.notify_off[usize::from(index)]) * u64::from(self.notify_mul);
        phys::mmio_write16(self.notify + off, index)
    }

    pub fn config_generation(&self) -> u32 {
        u32::from(self.r8(CONFIG_GENERATION))
    }

    /// Device-specific configuration; reads as all ones if the device has
    /// none.
    fn config(&self, offset: u64) -> Option<u64> {
        (self.device_cfg != 0).then_some(self.device_cfg + offset)
    }

    pub fn config_read8(&self, offset: u64) -> u8 {
        self.config(offset).map_or(!0, phys::mmio_read8)
    }

    pub fn config_read32(&self, offset: u64) -> u32 {
        self.config(offset).map_or(!0, phys::mmio_read32)
    }
}
