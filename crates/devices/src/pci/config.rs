//! A type-0 PCI configuration header (PCI Local Bus 3.0 §6.1) with BARs and a capability list.
//!
//! The 256-byte space is a register file plus a per-bit write mask: writes change only the
//! writable bits, so BAR sizing (write all-ones, read back the size mask), read-only IDs and
//! reserved fields fall out of the mask. Accesses of any width at any offset inside the 256
//! bytes are served; anything past the end reads as zero and ignores writes.

use serde::{Deserialize, Serialize};

use super::PciError;

/// Size of the configuration space this model implements (conventional PCI).
pub const CONFIG_SPACE_SIZE: usize = 256;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;

pub const REG_ID: usize = 0x00;
pub const REG_COMMAND: usize = 0x04;
pub const REG_STATUS: usize = 0x06;
pub const REG_CLASS: usize = 0x08;
pub const REG_HEADER_TYPE: usize = 0x0e;
pub const REG_BAR0: usize = 0x10;
pub const REG_SUBSYSTEM: usize = 0x2c;
pub const REG_CAPABILITIES: usize = 0x34;
pub const REG_INTERRUPT_LINE: usize = 0x3c;

/// Command register bits.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list pointer is valid.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
/// First byte of the capability area.
const CAP_START: usize = 0x40;

/// Capability IDs.
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR: takes this index and the next.
    Mem64,
}

/// The identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class, subclass and programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// Interrupt pin (0: none, 1: INTA#).
    pub interrupt_pin: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Bar {
    size: u64,
    kind: Option<BarKind>,
    /// The upper half of a 64-bit BAR.
    upper: bool,
}

/// The configuration space of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciConfig {
    regs: [u32; NUM_REGS],
    wmask: [u32; NUM_REGS],
    bars: [Bar; NUM_BARS],
    /// Offset of the last capability added (its next pointer is patched by the next one).
    last_cap: Option<usize>,
    next_cap: usize,
}

/// The guest-visible registers of a [`PciConfig`], for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    pub regs: Vec<u32>,
}

impl PciConfig {
    pub fn new(h: &PciHeader) -> Self {
        let mut c = PciConfig {
            regs: [0; NUM_REGS],
            wmask: [0; NUM_REGS],
            bars: [Bar::default(); NUM_BARS],
            last_cap: None,
            next_cap: CAP_START,
        };
        c.regs[REG_ID / 4] = u32::from(h.vendor_id) | (u32::from(h.device_id) << 16);
        c.regs[REG_CLASS / 4] = u32::from(h.revision)
            | (u32::from(h.class.2) << 8)
            | (u32::from(h.class.1) << 16)
            | (u32::from(h.class.0) << 24);
        c.regs[REG_SUBSYSTEM / 4] =
            u32::from(h.subsystem_vendor_id) | (u32::from(h.subsystem_id) << 16);
        c.regs[REG_INTERRUPT_LINE / 4] = u32::from(h.interrupt_pin) << 8;
        // Command: I/O, memory, bus master, parity, SERR, INTx disable. Status: read-only.
        c.wmask[REG_COMMAND / 4] = 0x0547;
        // Cache line size and latency timer; header type and BIST read-only.
        c.wmask[0x0c / 4] = 0x0000_ffff;
        // Interrupt line.
        c.wmask[REG_INTERRUPT_LINE / 4] = 0xff;
        c
    }

    /// Declares BAR `index` of `size` bytes (a power of two, at least 16).
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), PciError> {
        let last = match kind {
            BarKind::Mem32 => index,
            BarKind::Mem64 => index + 1,
        };
        if last >= NUM_BARS
            || self.bars[index].kind.is_some()
            || self.bars[index].upper
            || (kind == BarKind::Mem64 && self.bars[index + 1].kind.is_some())
        {
            return Err(PciError::BadBar(index));
        }
        if !size.is_power_of_two() || size < 16 || (kind == BarKind::Mem32 && size > 1 << 31) {
            return Err(PciError::BadBarSize(size));
        }
        self.bars[index] = Bar {
            size,
            kind: Some(kind),
            upper: false,
        };
        let mask = !(size - 1);
        let reg = REG_BAR0 / 4 + index;
        self.wmask[reg] = (mask as u32) & !0xf;
        if kind == BarKind::Mem64 {
            // Type 10b: 64-bit; the next BAR is the upper half.
            self.regs[reg] = 0x4;
            self.wmask[reg + 1] = (mask >> 32) as u32;
            self.bars[index + 1].upper = true;
        }
        Ok(())
    }

    /// The size of BAR `index` (0 if unused or the upper half of a 64-bit BAR).
    pub fn bar_size(&self, index: usize) -> u64 {
        self.bars.get(index).map_or(0, |b| b.size)
    }

    /// The address BAR `index` holds now.
    pub fn bar_addr(&self, index: usize) -> u64 {
        let Some(bar) = self.bars.get(index) else {
            return 0;
        };
        let reg = REG_BAR0 / 4 + index;
        match bar.kind {
            None => 0,
            Some(BarKind::Mem32) => u64::from(self.regs[reg] & !0xf),
            Some(BarKind::Mem64) => {
                u64::from(self.regs[reg] & !0xf) | (u64::from(self.regs[reg + 1]) << 32)
            }
        }
    }

    /// Sets BAR `index`'s address (the VMM's allocation; the guest may move it later).
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let bar = *self.bars.get(index).ok_or(PciError::BadBar(index))?;
        let kind = bar.kind.ok_or(PciError::BadBar(index))?;
        if addr & (bar.size - 1) != 0 || (kind == BarKind::Mem32 && addr > u64::from(u32::MAX)) {
            return Err(PciError::BadBarAddress { index, addr });
        }
        let reg = REG_BAR0 / 4 + index;
        self.regs[reg] = (self.regs[reg] & 0xf) | (addr as u32 & !0xf);
        if kind == BarKind::Mem64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// The memory BARs: (index, size) of each.
    pub fn bars(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter(|(_, b)| b.kind.is_some())
            .map(|(i, b)| (i, b.size))
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND / 4] as u16
    }

    /// Sets the command register (the VMM's firmware role).
    pub fn set_command(&mut self, v: u16) {
        let r = &mut self.regs[REG_COMMAND / 4];
        *r = (*r & 0xffff_0000) | u32::from(v & 0x0547);
    }

    /// Appends a capability with ID `id`: `body` follows the ID and next-pointer bytes, and
    /// `wmask` (as long as `body` or empty) says which of its bits the guest may write. Returns
    /// the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> Result<usize, PciError> {
        let len = 2 + body.len();
        let off = self.next_cap;
        if off + len > CONFIG_SPACE_SIZE || (!wmask.is_empty() && wmask.len() != body.len()) {
            return Err(PciError::NoCapabilitySpace);
        }
        self.set_byte(off, id);
        self.set_byte(off + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(off + 2 + i, *b);
        }
        for (i, m) in wmask.iter().enumerate() {
            let at = off + 2 + i;
            let shift = (at % 4) * 8;
            self.wmask[at / 4] = (self.wmask[at / 4] & !(0xff << shift)) | (u32::from(*m) << shift);
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, off as u8),
            None => {
                self.set_byte(REG_CAPABILITIES, off as u8);
                self.regs[REG_COMMAND / 4] |= u32::from(STATUS_CAPABILITIES) << 16;
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        Ok(off)
    }

    fn set_byte(&mut self, at: usize, v: u8) {
        let shift = (at % 4) * 8;
        self.regs[at / 4] = (self.regs[at / 4] & !(0xff << shift)) | (u32::from(v) << shift);
    }

    fn byte(&self, at: usize) -> u8 {
        (self.regs[at / 4] >> ((at % 4) * 8)) as u8
    }

    /// The dword register at byte offset `offset & !3` (0 past the end).
    pub fn read_reg(&self, offset: usize) -> u32 {
        self.regs.get(offset / 4).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i);
            *d = if at < CONFIG_SPACE_SIZE {
                self.byte(at)
            } else {
                0
            };
        }
    }

    /// Writes `data` at `offset`, changing only writable bits; bytes past the end are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            let at = offset.saturating_add(i);
            if at >= CONFIG_SPACE_SIZE {
                break;
            }
            let shift = (at % 4) * 8;
            let m = (self.wmask[at / 4] >> shift) as u8;
            let old = self.byte(at);
            self.set_byte(at, (old & !m) | (d & m));
        }
    }

    /// Whether a write at `offset` of `len` bytes touches the BARs or the command register.
    pub fn touches_decode(offset: usize, len: usize) -> bool {
        let end = offset.saturating_add(len);
        let overlaps = |a: usize, b: usize| offset < b && end > a;
        overlaps(REG_COMMAND, REG_COMMAND + 2) || overlaps(REG_BAR0, REG_BAR0 + 4 * NUM_BARS)
    }

    /// The registers, for snapshots.
    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            regs: self.regs.to_vec(),
        }
    }

    /// Restores registers saved by [`PciConfig::state`] into a function built the same way.
    pub fn restore(&mut self, s: &PciConfigState) -> Result<(), PciError> {
        if s.regs.len() != NUM_REGS || s.regs[0] != self.regs[0] {
            return Err(PciError::StateMismatch);
        }
        self.regs.copy_from_slice(&s.regs);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: (0x01, 0x00, 0x00),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
            interrupt_pin: 1,
        }
    }

    fn r32(c: &PciConfig, off: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ids_are_read_only_and_reads_of_any_width_work() {
        let mut c = PciConfig::new(&header());
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        c.write(0, &[0xff; 4]);
        assert_eq!(r32(&c, 0), 0x1042_1af4);
        let mut b = [0u8; 1];
        c.read(1, &mut b);
        assert_eq!(b, [0x1a]);
        let mut w = [0u8; 2];
        c.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        assert_eq!(r32(&c, 8), 0x0100_0001);
        assert_eq!(r32(&c, REG_SUBSYSTEM), 0x0040_1af4);
        assert_eq!(r32(&c, REG_INTERRUPT_LINE) >> 8 & 0xff, 1);
        // Interrupt line is writable, the pin is not.
        c.write(REG_INTERRUPT_LINE, &[0x0b, 0x07]);
        assert_eq!(r32(&c, REG_INTERRUPT_LINE) & 0xffff, 0x010b);
        // Past the end: zeros, writes ignored, no panic.
        let mut d = [0xaau8; 8];
        c.read(252, &mut d);
        assert_eq!(&d[4..], &[0; 4]);
        c.write(usize::MAX - 1, &[1, 2, 3]);
        c.read(usize::MAX, &mut d);
        assert_eq!(d, [0; 8]);
    }

    #[test]
    fn command_register_masks_reserved_bits() {
        let mut c = PciConfig::new(&header());
        c.write(REG_COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x0547);
        assert!(PciConfig::touches_decode(REG_COMMAND, 2));
        assert!(PciConfig::touches_decode(0x24, 4));
        assert!(!PciConfig::touches_decode(0x28, 4));
    }

    #[test]
    fn bar_sizing_32_and_64_bit() {
        let mut c = PciConfig::new(&header());
        c.add_bar(0, 0x8000, BarKind::Mem64).unwrap();
        c.add_bar(2, 0x1000, BarKind::Mem32).unwrap();
        assert!(c.add_bar(1, 0x1000, BarKind::Mem32).is_err());
        assert!(c.add_bar(5, 0x1000, BarKind::Mem64).is_err());
        assert!(c.add_bar(3, 0x1001, BarKind::Mem32).is_err());
        assert!(c.add_bar(9, 0x1000, BarKind::Mem32).is_err());
        // Sizing: all ones, read back the mask with the type bits.
        c.write(REG_BAR0, &[0xff; 4]);
        c.write(REG_BAR0 + 4, &[0xff; 4]);
        assert_eq!(r32(&c, REG_BAR0), 0xffff_8004);
        assert_eq!(r32(&c, REG_BAR0 + 4), 0xffff_ffff);
        c.write(REG_BAR0 + 8, &[0xff; 4]);
        assert_eq!(r32(&c, REG_BAR0 + 8), 0xffff_f000);
        // Unused BARs read zero.
        c.write(REG_BAR0 + 12, &[0xff; 4]);
        assert_eq!(r32(&c, REG_BAR0 + 12), 0);
        // Program addresses.
        c.write(REG_BAR0, &0xe000_0000u32.to_le_bytes());
        c.write(REG_BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), 0x1_e000_0000);
        // A misaligned address loses its low bits.
        c.write(REG_BAR0 + 8, &0xe000_1234u32.to_le_bytes());
        assert_eq!(c.bar_addr(2), 0xe000_1000);
        c.set_bar_addr(0, 0xd000_8000).unwrap();
        assert_eq!(c.bar_addr(0), 0xd000_8000);
        assert_eq!(r32(&c, REG_BAR0) & 0xf, 4);
        assert!(c.set_bar_addr(0, 0xd000_1000).is_err());
        assert!(c.set_bar_addr(2, 1 << 32).is_err());
        assert!(c.set_bar_addr(4, 0).is_err());
        assert_eq!(c.bars().collect::<Vec<_>>(), vec![(0, 0x8000), (2, 0x1000)]);
        assert_eq!(c.bar_size(1), 0);
    }

    #[test]
    fn capability_list_links_up() {
        let mut c = PciConfig::new(&header());
        assert_eq!(
            r32(&c, REG_COMMAND) >> 16 & u32::from(STATUS_CAPABILITIES),
            0
        );
        let a = c
            .add_capability(CAP_ID_VENDOR, &[14, 1, 0, 0], &[])
            .unwrap();
        let b = c
            .add_capability(
                CAP_ID_MSIX,
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &[0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0],
            )
            .unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(
            r32(&c, REG_COMMAND) >> 16 & u32::from(STATUS_CAPABILITIES),
            0
        );
        let mut p = [0u8; 1];
        c.read(REG_CAPABILITIES, &mut p);
        assert_eq!(p[0], 0x40);
        c.read(0x41, &mut p);
        assert_eq!(p[0], 0x48);
        c.read(0x49, &mut p);
        assert_eq!(p[0], 0);
        // Only the masked bits of a capability are writable.
        c.write(0x4a, &[0xff, 0xff]);
        let mut w = [0u8; 2];
        c.read(0x4a, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0xc000);
        c.write(0x42, &[0xff]);
        c.read(0x42, &mut p);
        assert_eq!(p[0], 14);
        assert!(c.add_capability(CAP_ID_VENDOR, &[0; 250], &[]).is_err());
    }

    #[test]
    fn state_round_trip() {
        let mut c = PciConfig::new(&header());
        c.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
        c.write(REG_BAR0, &0xe000_0000u32.to_le_bytes());
        let s = c.state();
        let mut d = PciConfig::new(&header());
        d.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
        d.restore(&s).unwrap();
        assert_eq!(d.bar_addr(0), 0xe000_0000);
        let mut other = header();
        other.device_id = 1;
        assert!(PciConfig::new(&other).restore(&s).is_err());
    }
}
