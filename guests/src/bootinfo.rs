//! What the VMM handed over: the PVH `hvm_start_info` or the Linux
//! `boot_params` zero page. Both give a command line, an e820-style memory
//! map and (optionally) the RSDP address.

use crate::boot::{BOOT_INFO, BOOT_KIND, BOOT_LINUX64, BOOT_PVH};
use crate::cpu::phys;
use core::sync::atomic::Ordering;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Most memory map entries kept (the zero page holds at most 128).
pub const MAX_E820: usize = 128;
/// Longest command line read.
const MAX_CMDLINE: usize = 4096;

pub const E820_RAM: u32 = 1;

#[derive(Clone, Copy, Default)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    /// The name printed on the `e820:` lines.
    pub fn kind_name(&self) -> KindName {
        KindName(self.kind)
    }

    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Displays an e820 type: usable, reserved, acpi, nvs, unusable or "type N".
pub struct KindName(u32);

impl core::fmt::Display for KindName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            1 => f.write_str("usable"),
            2 => f.write_str("reserved"),
            3 => f.write_str("acpi"),
            4 => f.write_str("nvs"),
            5 => f.write_str("unusable"),
            n => write!(f, "type {n}"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    Pvh,
    Linux64,
}

impl BootKind {
    pub fn name(self) -> &'static str {
        match self {
            BootKind::Pvh => "pvh",
            BootKind::Linux64 => "linux64",
        }
    }
}

pub struct BootInfo {
    pub kind: BootKind,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    pub e820: [E820Entry; MAX_E820],
    pub e820_len: usize,
    /// RSDP address from the boot information, 0 if none was given.
    pub rsdp: u64,
}

impl BootInfo {
    /// Read the boot information the entry code recorded.
    pub fn read() -> Result<BootInfo, &'static str> {
        let addr = BOOT_INFO.load(Ordering::Relaxed);
        match BOOT_KIND.load(Ordering::Relaxed) {
            BOOT_PVH => Self::read_pvh(addr),
            BOOT_LINUX64 => Self::read_linux(addr),
            _ => Err("unknown boot protocol"),
        }
    }

    /// The command line (copied: the VMM's copy may be overwritten later).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    pub fn memory_map(&self) -> &[E820Entry] {
        &self.e820[..self.e820_len]
    }

    /// Total usable RAM in bytes.
    pub fn usable_bytes(&self) -> u64 {
        self.memory_map()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    fn empty(kind: BootKind) -> BootInfo {
        BootInfo {
            kind,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            e820: [E820Entry::default(); MAX_E820],
            e820_len: 0,
            rsdp: 0,
        }
    }

    /// `struct hvm_start_info`: magic 0x00, version 0x04, cmdline_paddr 0x18,
    /// rsdp_paddr 0x20, memmap_paddr 0x28, memmap_entries 0x30 (version >= 1).
    /// Memory map entries: addr u64, size u64, type u32, reserved u32.
    fn read_pvh(si: u64) -> Result<BootInfo, &'static str> {
        if si == 0 || !phys::mapped(si, 0x38) {
            return Err("no hvm_start_info");
        }
        if phys::u32(si) != PVH_MAGIC {
            return Err("bad hvm_start_info magic");
        }
        let mut info = Self::empty(BootKind::Pvh);
        info.read_cmdline(phys::u64(si + 0x18));
        info.rsdp = phys::u64(si + 0x20);
        if phys::u32(si + 4) >= 1 {
            let map = phys::u64(si + 0x28);
            let count = (phys::u32(si + 0x30) as usize).min(MAX_E820);
            if map != 0 && phys::mapped(map, count as u64 * 24) {
                for i in 0..count {
                    let e = map + i as u64 * 24;
                    info.push(phys::u64(e), phys::u64(e + 8), phys::u32(e + 16));
                }
            }
        }
        Ok(info)
    }

    /// Linux `boot_params`: acpi_rsdp_addr 0x70, ext_cmd_line_ptr 0xc8,
    /// e820_entries 0x1e8, cmd_line_ptr 0x228, e820_table 0x2d0 (20-byte
    /// packed entries: addr u64, size u64, type u32).
    fn read_linux(bp: u64) -> Result<BootInfo, &'static str> {
        if bp == 0 || !phys::mapped(bp, 0x1000) {
            return Err("no boot_params");
        }
        let mut info = Self::empty(BootKind::Linux64);
        let cmdline = u64::from(phys::u32(bp + 0x228)) | u64::from(phys::u32(bp + 0xc8)) << 32;
        info.read_cmdline(cmdline);
        info.rsdp = phys::u64(bp + 0x70);
        let count = (phys::u8(bp + 0x1e8) as usize).min(MAX_E820);
        for i in 0..count {
            let e = bp + 0x2d0 + i as u64 * 20;
            info.push(phys::u64(e), phys::u64(e + 8), phys::u32(e + 16));
        }
        Ok(info)
    }

    /// Copy the NUL-terminated command line at `addr` (none if 0).
    fn read_cmdline(&mut self, addr: u64) {
        self.cmdline_len = 0;
        if addr == 0 {
            return;
        }
        while self.cmdline_len < MAX_CMDLINE && phys::mapped(addr + self.cmdline_len as u64, 1) {
            let b = phys::u8(addr + self.cmdline_len as u64);
            if b == 0 {
                break;
            }
            self.cmdline[self.cmdline_len] = b;
            self.cmdline_len += 1;
        }
    }

    /// Record a memory map entry (empty ones, as QEMU's PVH ROM appends, are skipped).
    fn push(&mut self, addr: u64, size: u64, kind: u32) {
        if size != 0 && self.e820_len < MAX_E820 {
            self.e820[self.e820_len] = E820Entry { addr, size, kind };
            self.e820_len += 1;
        }
    }
}
