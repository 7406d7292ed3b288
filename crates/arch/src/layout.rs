//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT (Linux 64-bit boot), IDT at 0x520
//! 0x0000_6000  PVH start_info, module list at 0x6800
//! 0x0000_7000  Linux zero page, or the PVH memory map
//! 0x0000_8ff0  initial stack (Linux 64-bit boot)
//! 0x0000_9000  boot page tables: PML4, PDPT at 0xa000, four PDs at 0xb000..0xf000
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first)
//! 0x000f_0000  MP floating pointer and configuration table
//! 0x000f_e000  VM generation ID: 16 bytes (a page of its own, in the reserved BIOS area)
//! 0x0010_0000  kernel
//!   ...        RAM; the initrd sits at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole (3 GiB..4 GiB): devices, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0xd000_0000  virtio-mmio register windows, 4 KiB each
//! 0xe000_0000  PCI ECAM, bus 0 only (1 MiB; the MCFG says so)          (--transport pci)
//! 0xe010_0000  32-bit PCI MMIO window for BARs, up to the IOAPIC        (--transport pci)
//! 0x1_0000_0000 RAM above 4 GiB, for guests larger than 3 GiB
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6800;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PVH_MEMMAP_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// How many page directories the boot identity map uses (each maps 1 GiB with 2 MiB pages).
pub const PD_COUNT: u64 = 4;
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const LOW_RAM_END: u64 = 0xa_0000;
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_MAX_SIZE: u64 = 0x1_0000;
pub const MPTABLE_START: u64 = 0xf_0000;
pub const BIOS_END: u64 = 0x10_0000;
/// The VM generation ID's 16 bytes (see `acpi::write_vm_generation_id`), inside the reserved
/// `ACPI_START..BIOS_END` range of the e820 map.
pub const VMGENID_ADDR: u64 = 0xf_e000;
/// Where the kernel goes: the 1 MiB line.
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB register window each, from here up.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The ISA interrupt lines free for virtio-mmio devices (4 is COM1, 8 the RTC, 9 the GED), one
/// per device: the most virtio-mmio devices a VM can have.
pub const VIRTIO_MMIO_IRQS: [u32; 9] = [5, 6, 7, 10, 11, 12, 13, 14, 15];
/// PCI: the ECAM area of bus 0 (32 devices x 8 functions x 4 KiB), announced in the MCFG and
/// reserved by a motherboard-resources device in the DSDT.
pub const PCI_ECAM_BASE: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// PCI: the 32-bit MMIO window the host bridge decodes. The VM monitor assigns BARs from its
/// start; the guest may move them anywhere inside it.
pub const PCI_MMIO_BASE: u64 = PCI_ECAM_BASE + PCI_ECAM_SIZE;
pub const PCI_MMIO_END: u64 = IOAPIC_ADDR;
/// PCI devices on bus 0: slots 1 to 31 (slot 0 is the host bridge).
pub const PCI_MAX_DEVICES: usize = 31;
/// PCI INTx (the fallback for guests that do not use MSI-X): INTA# of slot S is IOAPIC pin
/// 16 + (S - 1) mod 8, level-triggered, active low (the DSDT's `_PRT` says so).
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI of INTA# of PCI slot `slot` (1 to 31).
pub const fn pci_intx_gsi(slot: u8) -> u32 {
    PCI_INTX_GSI_BASE + (slot.saturating_sub(1) as u32) % PCI_INTX_GSI_COUNT
}
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

// The boot structures do not overlap one another.
const _: () = assert!(PD_START + PD_COUNT * 0x1000 <= 0x1_0000);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(ACPI_START + ACPI_MAX_SIZE <= MPTABLE_START);
// The PCI areas lie in the hole, above the virtio-mmio windows and below the IOAPIC.
const _: () = assert!(VIRTIO_MMIO_BASE + 0x100_0000 <= PCI_ECAM_BASE);
const _: () = assert!(PCI_MMIO_BASE < PCI_MMIO_END && PCI_MMIO_END <= IOAPIC_ADDR);

/// The smallest guest Vessel builds: room for the boot structures, a kernel and a stack.
pub const MIN_MEMORY: u64 = 8 << 20;

/// The RAM ranges for a guest of `size` bytes: one below the MMIO hole and, past 3 GiB, one
/// above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// The end (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// E820 entry types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

/// One E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// The E820 memory map a guest of `size` bytes is given.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: LOW_RAM_END - EBDA_START,
            kind: E820Type::Reserved,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820Type::Reserved,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_ram_end(size) - HIMEM_START,
            kind: E820Type::Ram,
        },
    ];
    if size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: size - MMIO_HOLE_START,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let m = e820_map(256 << 20);
        assert_eq!(m.last().unwrap().addr + m.last().unwrap().size, 256 << 20);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let r = ram_ranges(5 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 2 << 30));
        let total: u64 = e820_map(5 << 30)
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // RAM below 640 KiB and above 1 MiB, less the EBDA.
        assert_eq!(total, (5 << 30) - (HIMEM_START - EBDA_START));
    }
}
