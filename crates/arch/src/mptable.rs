//! The Intel MultiProcessor Specification 1.4 table: how guests without ACPI find their CPUs,
//! the IOAPIC and the ISA interrupt routing.

use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyCpus(u32),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_EXTINT: u8 = 3;
const MP_IRQ_SRC_NMI: u8 = 1;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP configuration table body (entries) for `cpus` vCPUs, the IOAPIC taking the ID
/// after the last CPU.
fn entries(cpus: u32) -> (Vec<u8>, u16) {
    let mut v = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        // Processor entry: type 0, APIC ID, version, flags (enabled, BSP), signature, features.
        v.push(0);
        v.push(id as u8);
        v.push(APIC_VERSION);
        v.push(1 | if id == 0 { 2 } else { 0 });
        v.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        v.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        v.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus entry: type 1, bus 0, "ISA   ".
    v.push(1);
    v.push(0);
    v.extend_from_slice(b"ISA   ");
    count += 1;
    // IOAPIC entry: type 2, ID, version, enabled, address.
    let ioapic_id = cpus as u8;
    v.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    v.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // I/O interrupt entries: ISA IRQ n -> IOAPIC pin n (IRQ 0 is the PIC cascade: ExtINT).
    for irq in 0..ISA_IRQS {
        let kind = if irq == 0 {
            MP_IRQ_SRC_EXTINT
        } else {
            MP_IRQ_SRC_INT
        };
        v.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupt entries: LINT0 ExtINT, LINT1 NMI, to all local APICs.
    v.extend_from_slice(&[4, MP_IRQ_SRC_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    v.extend_from_slice(&[4, MP_IRQ_SRC_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    (v, count)
}

/// Writes the MP floating pointer and configuration table at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMem, cpus: u32) -> Result<(), Error> {
    if cpus == 0 || cpus > crate::MAX_VCPUS {
        return Err(Error::TooManyCpus(cpus));
    }
    let table_addr = MPTABLE_START + 16;
    let (body, count) = entries(cpus);

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + body.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"VESSEL  ");
    header.extend_from_slice(b"VESSEL-VM   ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // revision 1.4
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // no default configuration, IMCR absent
    fp[10] = checksum(&fp);

    mem.write_slice(&fp, GuestAddress(MPTABLE_START))
        .and_then(|_| mem.write_slice(&table, GuestAddress(table_addr)))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_and_counts() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(checksum(&fp), 0);
        let len: u16 = mem.read_obj(GuestAddress(MPTABLE_START + 16 + 4)).unwrap();
        let mut table = vec![0u8; len as usize];
        mem.read_slice(&mut table, GuestAddress(MPTABLE_START + 16))
            .unwrap();
        assert_eq!(checksum(&table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        // The largest VM still fits below 1 MiB.
        setup_mptable(&mem, crate::MAX_VCPUS).unwrap();
        assert!(setup_mptable(&mem, 0).is_err());
    }
}
