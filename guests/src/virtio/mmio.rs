//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), and finding its
//! devices: `virtio_mmio.device=` command-line entries (Linux's syntax) and
//! ACPI DSDT devices with `_HID "LNRO0005"`.

use crate::acpi;
use crate::cpu::phys;

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// "virt", little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;

/// One virtio-mmio device (version 2).
pub struct Mmio {
    pub base: u64,
}

/// What a virtio-mmio slot holds.
pub enum Probe {
    /// No virtio-mmio registers there (wrong magic) or an empty slot
    /// (device ID 0).
    Nothing,
    /// A legacy (version 1) device of this type: not supported.
    Legacy(u32),
    /// A version 2 device of this type.
    Device(u32, Mmio),
}

pub fn probe(base: u64) -> Probe {
    if !phys::mapped(base, 0x200) || phys::mmio_read32(base + MAGIC) != MAGIC_VALUE {
        return Probe::Nothing;
    }
    let id = phys::mmio_read32(base + DEVICE_ID);
    match phys::mmio_read32(base + VERSION) {
        _ if id == 0 => Probe::Nothing,
        2 => Probe::Device(id, Mmio { base }),
        _ => Probe::Legacy(id),
    }
}

impl Mmio {
    fn read(&self, reg: u64) -> u32 {
        phys::mmio_read32(self.base + reg)
    }

    fn write(&self, reg: u64, value: u32) {
        phys::mmio_write32(self.base + reg, value)
    }

    fn write64(&self, reg: u64, value: u64) {
        self.write(reg, value as u32);
        self.write(reg + 4, (value >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.read(STATUS) as u8
    }

    pub fn set_status(&self, status: u8) {
        self.write(STATUS, u32::from(status))
    }

    pub fn device_features(&self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        u64::from(low) | u64::from(self.read(DEVICE_FEATURES)) << 32
    }

    pub fn set_driver_features(&self, features: u64) {
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, features as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (features >> 32) as u32);
    }

    pub fn queue_max(&self, index: u16) -> u16 {
        self.write(QUEUE_SEL, u32::from(index));
        if self.read(QUEUE_READY) != 0 {
            return 0;
        }
        self.read(QUEUE_NUM_MAX).min(0x8000) as u16
    }

    pub fn queue_setup(&self, index: u16, size: u16, desc: u64, avail: u64, used: u64) {
        self.write(QUEUE_SEL, u32::from(index));
        self.write(QUEUE_NUM, u32::from(size));
        self.write64(QUEUE_DESC, desc);
        self.write64(QUEUE_DRIVER, avail);
        self.write64(QUEUE_DEVICE, used);
        self.write(QUEUE_READY, 1);
    }

    pub fn notify(&self, index: u16) {
        self.write(QUEUE_NOTIFY, u32::from(index))
    }

    pub fn config_generation(&self) -> u32 {
        self.read(CONFIG_GENERATION)
    }

    pub fn config_read8(&self, offset: u64) -> u8 {
        phys::mmio_read8(self.base + CONFIG + offset)
    }

    pub fn config_read32(&self, offset: u64) -> u32 {
        phys::mmio_read32(self.base + CONFIG + offset)
    }
}

/// Base addresses of virtio-mmio devices described in the DSDT: each
/// `_HID "LNRO0005"` string followed (within the device) by a
/// Memory32Fixed resource descriptor (`86 09 00 <rw> <base u32> <len u32>`).
/// A simple byte scan, not an AML interpreter: it finds what QEMU's microvm
/// and Firecracker-style tables emit.
pub fn acpi_devices(rsdp: Option<u64>, out: &mut [u64], mut len: usize) -> usize {
    let Some(aml) = rsdp.and_then(acpi::dsdt) else {
        return len;
    };
    let mut at = 0;
    while let Some(pos) = find(&aml[at..], b"LNRO0005") {
        let start = at + pos + 8;
        // Look in the next 256 bytes, but not past the next device's _HID.
        let mut end = (start + 256).min(aml.len());
        if let Some(next) = find(&aml[start..end], b"_HID") {
            end = start + next;
        }
        if let Some(d) = find(&aml[start..end], &[0x86, 0x09, 0x00]) {
            let r = start + d + 4;
            if r + 8 <= aml.len() {
                let base = u32::from_le_bytes([aml[r], aml[r + 1], aml[r + 2], aml[r + 3]]);
                let base = u64::from(base);
                if len < out.len() && !out[..len].contains(&base) {
                    out[len] = base;
                    len += 1;
                }
            }
        }
        at = start;
    }
    len
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
