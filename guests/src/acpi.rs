//! Firmware tables: ACPI (RSDP, RSDT/XSDT, MADT, FADT, DSDT `_S5_`) and the
//! Intel MultiProcessor table, read-only, straight from physical memory.

use crate::boot::MAX_CPUS;
use crate::cpu::{self, phys};

/// Local APIC base when no table says otherwise.
pub const DEFAULT_LAPIC: u64 = 0xfee0_0000;
/// Upper bound on the size of a table we are willing to read.
const MAX_TABLE_LEN: u32 = 1 << 20;

/// The CPUs to run on, by APIC ID, in table order.
pub struct CpuList {
    pub ids: [u8; MAX_CPUS],
    pub len: usize,
    pub lapic: u64,
    /// More CPUs were listed than the guest supports.
    pub truncated: bool,
}

impl CpuList {
    fn new() -> CpuList {
        CpuList {
            ids: [0; MAX_CPUS],
            len: 0,
            lapic: DEFAULT_LAPIC,
            truncated: false,
        }
    }

    pub fn ids(&self) -> &[u8] {
        &self.ids[..self.len]
    }

    fn push(&mut self, id: u8) {
        if self.ids().contains(&id) {
            return;
        }
        if self.len == MAX_CPUS {
            self.truncated = true;
            return;
        }
        self.ids[self.len] = id;
        self.len += 1;
    }

    /// Make sure the BSP is in the list (first if it had to be added).
    pub fn ensure(&mut self, id: u8) {
        if !self.ids().contains(&id) {
            if self.len == MAX_CPUS {
                self.len -= 1;
                self.truncated = true;
            }
            self.ids.copy_within(0..self.len, 1);
            self.ids[0] = id;
            self.len += 1;
        }
    }
}

fn checksum_ok(addr: u64, len: usize) -> bool {
    phys::mapped(addr, len as u64)
        && phys::bytes(addr, len)
            .iter()
            .fold(0u8, |s, &b| s.wrapping_add(b))
            == 0
}

/// The EBDA segment from the BIOS data area, if it looks sane.
fn ebda() -> Option<u64> {
    let ebda = u64::from(phys::u16(0x40e)) << 4;
    (0x8_0000..0xa_0000).contains(&ebda).then_some(ebda)
}

/// Scan `[start, end)` on 16-byte boundaries for `sig` at a structure whose
/// first `len(addr)` bytes checksum to zero.
fn scan(start: u64, end: u64, sig: &[u8], len: impl Fn(u64) -> usize) -> Option<u64> {
    (start..end)
        .step_by(16)
        .find(|&a| phys::bytes(a, sig.len()) == sig && checksum_ok(a, len(a)))
}

fn rsdp_valid(addr: u64) -> bool {
    if !phys::mapped(addr, 36) || phys::bytes(addr, 8) != b"RSD PTR " || !checksum_ok(addr, 20) {
        return false;
    }
    phys::u8(addr + 15) < 2 || checksum_ok(addr, 36)
}

/// The RSDP: the address from the boot information if valid, else a scan
/// of the first KiB of the EBDA and of 0xe0000..0x100000.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && rsdp_valid(hint) {
        return Some(hint);
    }
    let rsdp_len = |a: u64| if phys::u8(a + 15) >= 2 { 36 } else { 20 };
    ebda()
        .and_then(|e| scan(e, e + 1024, b"RSD PTR ", rsdp_len))
        .or_else(|| scan(0xe_0000, 0x10_0000, b"RSD PTR ", rsdp_len))
}

/// A validated ACPI table: address and length.
#[derive(Clone, Copy)]
pub struct Table {
    pub addr: u64,
    pub len: u32,
}

impl Table {
    fn at(addr: u64) -> Option<Table> {
        if addr == 0 || !phys::mapped(addr, 36) {
            return None;
        }
        let len = phys::u32(addr + 4);
        (36..=MAX_TABLE_LEN).contains(&len).then_some(())?;
        checksum_ok(addr, len as usize).then_some(Table { addr, len })
    }

    fn signature(&self) -> &'static [u8] {
        phys::bytes(self.addr, 4)
    }

    fn body(&self) -> &'static [u8] {
        phys::bytes(self.addr, self.len as usize)
    }
}

/// Find the table with signature `sig` through the XSDT (ACPI 2.0+) or RSDT.
pub fn find_table(rsdp: u64, sig: &[u8; 4]) -> Option<Table> {
    let xsdt = if phys::u8(rsdp + 15) >= 2 {
        phys::u64(rsdp + 24)
    } else {
        0
    };
    let (root, entry) = match Table::at(xsdt) {
        Some(t) => (t, 8),
        None => (Table::at(u64::from(phys::u32(rsdp + 16)))?, 4),
    };
    let count = (root.len as u64 - 36) / entry;
    (0..count)
        .map(|i| root.addr + 36 + i * entry)
        .map(|a| {
            if entry == 8 {
                phys::u64(a)
            } else {
                u64::from(phys::u32(a))
            }
        })
        .filter_map(Table::at)
        .find(|t| t.signature() == sig)
}

/// CPUs from the MADT (type-0 entries with the enabled flag), else from the
/// MP table, else just the BSP.
pub fn find_cpus(rsdp: Option<u64>) -> CpuList {
    rsdp.and_then(|r| find_table(r, b"APIC"))
        .and_then(madt_cpus)
        .or_else(mp_cpus)
        .unwrap_or_else(CpuList::new)
}

fn madt_cpus(madt: Table) -> Option<CpuList> {
    let body = madt.body();
    if body.len() < 44 {
        return None;
    }
    let mut cpus = CpuList::new();
    cpus.lapic = u64::from(phys::u32(madt.addr + 36));
    let mut off = 44;
    while off + 2 <= body.len() {
        let (kind, len) = (body[off], body[off + 1] as usize);
        if len < 2 || off + len > body.len() {
            break;
        }
        match kind {
            // Processor Local APIC: ACPI id, APIC id, flags (bit 0 enabled).
            0 if len >= 8 && body[off + 4] & 1 != 0 => cpus.push(body[off + 3]),
            // Local APIC address override.
            5 if len >= 12 => cpus.lapic = phys::u64(madt.addr + off as u64 + 4),
            _ => {}
        }
        off += len;
    }
    (cpus.len > 0).then_some(cpus)
}

/// The MP floating pointer ("_MP_"): first KiB of the EBDA, the last KiB of
/// base memory, then the BIOS area 0xf0000..0x100000.
fn find_mp() -> Option<u64> {
    let len16 = |a: u64| usize::from(phys::u8(a + 8)).max(1) * 16;
    ebda()
        .and_then(|e| scan(e, e + 1024, b"_MP_", len16))
        .or_else(|| scan(0x9_fc00, 0xa_0000, b"_MP_", len16))
        .or_else(|| scan(0xf_0000, 0x10_0000, b"_MP_", len16))
}

fn mp_cpus() -> Option<CpuList> {
    let table = u64::from(phys::u32(find_mp()? + 4));
    if table == 0 || !phys::mapped(table, 44) || phys::bytes(table, 4) != b"PCMP" {
        return None;
    }
    let len = phys::u16(table + 4) as usize;
    if len < 44 || !checksum_ok(table, len) {
        return None;
    }
    let mut cpus = CpuList::new();
    cpus.lapic = u64::from(phys::u32(table + 36));
    // Walk the entries by the table length, like Linux: some firmware
    // (qboot) leaves the entry count at 0.
    let end = table + len as u64;
    let mut entry = table + 44;
    while entry < end {
        match phys::u8(entry) {
            // Processor: type, APIC id, APIC version, flags (bit 0 enabled).
            0 => {
                if phys::u8(entry + 3) & 1 != 0 {
                    cpus.push(phys::u8(entry + 1));
                }
                entry += 20;
            }
            1..=4 => entry += 8,
            _ => break,
        }
    }
    (cpus.len > 0).then_some(cpus)
}

/// FADT offsets.
const FADT_DSDT: u64 = 40;
const FADT_PM1A_CNT: u64 = 64;
const FADT_FLAGS: u64 = 112;
const FADT_RESET_REG: u64 = 116;
const FADT_RESET_VALUE: u64 = 128;
const FADT_X_DSDT: u64 = 140;
const FADT_SLEEP_CONTROL: u64 = 244;
const FLAG_RESET_REG_SUP: u32 = 1 << 10;
const FLAG_HW_REDUCED: u32 = 1 << 20;
const SLP_EN_PM1: u16 = 1 << 13;
const SLP_EN_HW_REDUCED: u8 = 1 << 5;
/// SLP_TYP for S5 when the DSDT has no usable `_S5_`.
const DEFAULT_S5: u8 = 5;

/// Write `value` to a Generic Address Structure (system memory or I/O).
fn write_gas(gas: u64, value: u8) -> bool {
    let space = phys::u8(gas);
    let addr = phys::u64(gas + 4);
    if addr == 0 {
        return false;
    }
    match space {
        0 => phys::mmio_write8(addr, value),
        1 if addr <= 0xffff => cpu::outb(addr as u16, value),
        _ => return false,
    }
    true
}

/// SLP_TYPa of `\_S5_` in the DSDT, if it can be found.
fn s5_sleep_type(fadt: Table) -> Option<u8> {
    let x_dsdt = if fadt.len as u64 >= FADT_X_DSDT + 8 {
        phys::u64(fadt.addr + FADT_X_DSDT)
    } else {
        0
    };
    let dsdt =
        Table::at(x_dsdt).or_else(|| Table::at(u64::from(phys::u32(fadt.addr + FADT_DSDT))))?;
    let aml = &dsdt.body()[36..];
    let at = aml.windows(4).position(|w| w == b"_S5_")?;
    // NameOp (0x08), optionally a root prefix, then "_S5_" PackageOp ...
    let named = (at >= 1 && aml[at - 1] == 0x08)
        || (at >= 2 && aml[at - 1] == b'\\' && aml[at - 2] == 0x08);
    let rest = aml.get(at + 4..)?;
    if !named || rest.first() != Some(&0x12) {
        return None;
    }
    let pkg_len_bytes = usize::from(rest.get(1)? >> 6) + 1;
    // PackageOp, PkgLength, NumElements, then the first element.
    let element = rest.get(1 + pkg_len_bytes + 1..)?;
    match *element.first()? {
        0x0a => element.get(1).copied(), // BytePrefix
        0x00 => Some(0),                 // ZeroOp
        0x01 => Some(1),                 // OneOp
        b if b < 0x08 => Some(b),
        _ => None,
    }
}

/// Request ACPI S5 (soft off). Returns an error if there is no way to ask;
/// returns `Ok` after asking (the caller checks that the VM did stop).
pub fn poweroff(rsdp: Option<u64>) -> Result<(), &'static str> {
    let fadt = rsdp
        .and_then(|r| find_table(r, b"FACP"))
        .ok_or("no ACPI FADT")?;
    let flags = phys::u32(fadt.addr + FADT_FLAGS);
    let slp_typ = s5_sleep_type(fadt).unwrap_or(DEFAULT_S5);
    if flags & FLAG_HW_REDUCED != 0 {
        if (fadt.len as u64) < FADT_SLEEP_CONTROL + 12 {
            return Err("FADT has no sleep control register");
        }
        let value = ((slp_typ & 7) << 2) | SLP_EN_HW_REDUCED;
        return if write_gas(fadt.addr + FADT_SLEEP_CONTROL, value) {
            Ok(())
        } else {
            Err("unusable sleep control register")
        };
    }
    let port = phys::u32(fadt.addr + FADT_PM1A_CNT);
    if port == 0 || port > 0xffff {
        return Err("FADT has no PM1a control block");
    }
    // Keep SCI_EN as it is (unless the register reads as all ones); set
    // SLP_TYP and SLP_EN.
    let current = cpu::inw(port as u16);
    let sci_en = if current == 0xffff { 0 } else { current & 1 };
    let value = sci_en | (u16::from(slp_typ & 7) << 10) | SLP_EN_PM1;
    cpu::outw(port as u16, value);
    Ok(())
}

/// Write the FADT reset register, if the platform has one.
pub fn reset(rsdp: Option<u64>) -> bool {
    let Some(fadt) = rsdp.and_then(|r| find_table(r, b"FACP")) else {
        return false;
    };
    if fadt.len < 129 || phys::u32(fadt.addr + FADT_FLAGS) & FLAG_RESET_REG_SUP == 0 {
        return false;
    }
    write_gas(
        fadt.addr + FADT_RESET_REG,
        phys::u8(fadt.addr + FADT_RESET_VALUE),
    )
}

/// The DSDT's AML (the bytes after the table header), through the FADT.
pub fn dsdt(rsdp: u64) -> Option<&'static [u8]> {
    let fadt = find_table(rsdp, b"FACP")?;
    let x_dsdt = if fadt.len as u64 >= FADT_X_DSDT + 8 {
        phys::u64(fadt.addr + FADT_X_DSDT)
    } else {
        0
    };
    let dsdt =
        Table::at(x_dsdt).or_else(|| Table::at(u64::from(phys::u32(fadt.addr + FADT_DSDT))))?;
    Some(&dsdt.body()[36..])
}

/// The MCFG entry for PCI segment 0: (ECAM base, first bus, last bus).
pub fn mcfg_bus0(rsdp: u64) -> Option<(u64, u8, u8)> {
    let mcfg = find_table(rsdp, b"MCFG")?;
    // Header (36 bytes), 8 reserved, then 16-byte entries: base u64,
    // segment u16, start bus u8, end bus u8, reserved u32.
    let mut entry = mcfg.addr + 44;
    while entry + 16 <= mcfg.addr + u64::from(mcfg.len) {
        if phys::u16(entry + 8) == 0 {
            return Some((phys::u64(entry), phys::u8(entry + 10), phys::u8(entry + 11)));
        }
        entry += 16;
    }
    None
}
