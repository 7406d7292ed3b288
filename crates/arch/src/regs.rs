//! Boot-time vCPU state: general and segment registers for each boot protocol, the boot GDT and
//! identity page tables, FPU, MSRs and the LAPIC's local interrupt pins.

use guestmem::GuestMem;
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;

/// Errors writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the boot {what} into guest memory: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, identity-mapped, %rsi = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, %ebx = hvm_start_info.
    Pvh,
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from flags (access byte in bits 0..8, flags in 12..16), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The KVM segment a GDT entry describes.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The boot GDT: null, code, data, TSS. 64-bit code for Linux64, 32-bit for PVH.
fn gdt(protocol: BootProtocol) -> [u64; 4] {
    let code = match protocol {
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMem,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), Error> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| Error::Write { what, source })
}

/// Writes the GDT (and an empty IDT) and returns the special registers for `protocol`.
/// For Linux64 it also writes the identity page tables covering the first 4 GiB (2 MiB pages).
pub fn setup_sregs(
    mem: &GuestMem,
    protocol: BootProtocol,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, Error> {
    let table = gdt(protocol);
    for (i, e) in table.iter().enumerate() {
        write(mem, *e, GDT_START + 8 * i as u64, "GDT")?;
    }
    write(mem, 0u64, IDT_START, "IDT")?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = segment(table[1], 1);
    let data = segment(table[2], 2);
    let mut tss = segment(table[3], 3);
    if protocol == BootProtocol::Pvh {
        // PVH enters with a busy 32-bit TSS type (as Xen and QEMU do).
        tss.type_ = 0xb;
    }
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::Linux64 => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// Identity-maps 0..4 GiB with 2 MiB pages (1 GiB pages are not universally supported).
fn setup_page_tables(mem: &GuestMem) -> Result<(), Error> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write(mem, PDPT_START | PRESENT_RW, PML4_START, "page tables")?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_START + pd * 0x1000;
        write(
            mem,
            pd_addr | PRESENT_RW,
            PDPT_START + pd * 8,
            "page tables",
        )?;
        let mut entries = [0u64; 512];
        for (i, e) in entries.iter_mut().enumerate() {
            *e = ((pd * 512 + i as u64) << 21) | PRESENT_RW | PAGE_SIZE_2M;
        }
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(pd_addr))
            .map_err(|source| Error::Write {
                what: "page tables",
                source,
            })?;
    }
    Ok(())
}

/// General registers at the kernel's entry.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// The FPU state at reset: x87 control word and MXCSR defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// The MSRs every vCPU starts with, limited to those `supported` (KVM's MSR index list) holds:
/// syscall MSRs cleared, fast strings on, MTRRs on with write-back as the default type. The TSC
/// is left alone: KVM starts all vCPUs of a VM with synchronized TSCs, and writing it from here,
/// one vCPU after the other, could only unsynchronize them.
pub fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    [
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_MISC_ENABLE, 1),
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .into_iter()
    .filter(|m| supported.contains(&m.index))
    .collect()
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware does.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let l0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, set_mode(l0, APIC_MODE_EXTINT));
    let l1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, set_mode(l1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_the_expected_segments() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.l, code.db, code.g, code.type_, code.present),
            (1, 0, 1, 0xb, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, 8);
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.db, data.s, data.type_), (1, 1, 3));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn linux64_sets_long_mode_and_maps_4g() {
        let m = mem();
        let s = setup_sregs(&m, BootProtocol::Linux64, kvm_sregs::default()).unwrap();
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
        let last_pd: u64 = m
            .read_obj(GuestAddress(PD_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last_pd, 0xffe0_0083);
        let r = boot_regs(BootProtocol::Linux64, 0x100200);
        assert_eq!((r.rip, r.rsi), (0x100200, ZERO_PAGE_START));
    }

    #[test]
    fn pvh_is_protected_mode_without_paging() {
        let s = setup_sregs(&mem(), BootProtocol::Pvh, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0, CR0_PE | CR0_ET);
        assert_eq!((s.cs.db, s.cs.l), (1, 0));
        assert_eq!(boot_regs(BootProtocol::Pvh, 0x10_0000).rbx, PVH_INFO_START);
    }

    #[test]
    fn msrs_are_filtered_and_lint_is_wired() {
        let m = boot_msrs(&[MSR_IA32_TSC, MSR_MTRR_DEF_TYPE, MSR_STAR]);
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|e| e.index != MSR_IA32_TSC));
        let mut l = kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!((lapic_reg(&l, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&l, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
