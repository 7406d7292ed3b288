//! ACPI tables for a hardware-reduced ACPI platform: RSDP, XSDT, FADT, MADT and a DSDT with the
//! S5 sleep state, a power button, a VM generation ID device, the Generic Event Device that
//! notifies them, and COM1.
//!
//! The VM generation ID (Microsoft's "Virtual Machine Generation ID" specification, as QEMU's
//! `vmgenid` device): `\_SB.VGEN` with `_HID "VMGENCTR"` and `_CID "VM_Gen_Counter"` (what
//! Linux's `drivers/virt/vmgenid.c` matches), whose `ADDR` method returns the guest-physical
//! address of a 16-byte GUID ([`VMGENID_ADDR`], reserved memory) as a package of its low and
//! high 32 bits. The VMM writes a new GUID there ([`write_vm_generation_id`]) when the VM
//! boots and when a snapshot of it is restored, then raises [`GED_EVENT_VMGENID`]: the GED
//! notifies the device (0x80) and the guest reseeds its random number generator.
//!
//! The platform registers are I/O ports at [`PM_BASE`]: sleep control, sleep status, reset, and
//! the GED event byte (see the `acpi_pm` device).

use acpi_tables::aml::{
    self, Device, EISAName, Equal, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule,
    Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion, OpRegionSpace, Package, Path,
    ResourceTemplate, Scope, Store, IO,
};
use acpi_tables::aml::{AddressSpace as AmlAddressSpace, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};

pub use crate::layout::VMGENID_ADDR;
use crate::layout::{ACPI_MAX_SIZE, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};

/// Base I/O port of the ACPI platform registers.
pub const PM_BASE: u16 = 0x600;
/// Offsets from [`PM_BASE`].
pub const PM_SLEEP_CONTROL: u16 = 0;
pub const PM_SLEEP_STATUS: u16 = 1;
pub const PM_RESET: u16 = 2;
pub const PM_GED_EVENT: u16 = 3;
pub const PM_PORTS: u16 = 4;
/// The value written to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// The S5 (soft off) sleep type the DSDT advertises.
pub const S5_SLEEP_TYPE: u8 = 5;
/// GED event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1;
/// GED event bit: the VM generation ID changed.
pub const GED_EVENT_VMGENID: u8 = 2;
/// Length of the VM generation ID.
pub const VMGENID_LEN: usize = 16;
/// The GSI of the Generic Event Device (free: hardware-reduced ACPI has no SCI).
pub const GED_IRQ: u32 = 9;
/// The CMOS RTC's index port.
pub const RTC_PORT: u16 = 0x70;
/// COM1's port and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

const OEM_ID: [u8; 6] = *b"VESSEL";
const OEM_TABLE_ID: [u8; 8] = *b"VESSELVM";
const OEM_REVISION: u32 = 1;

/// Errors building the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables ({0} bytes) do not fit in their {ACPI_MAX_SIZE}-byte area")]
    TooLarge(u64),
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device the DSDT announces (as `LNRO0005`, which Linux's virtio-mmio driver
/// binds through ACPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

fn virtio_mmio_aml(index: usize, d: &MmioDevice, sink: &mut dyn acpi_tables::AmlSink) {
    let name = format!("V{index:03X}");
    Device::new(
        Path::new(&name),
        vec![
            &Name::new(Path::new("_HID"), &"LNRO0005"),
            &Name::new(Path::new("_UID"), &(index as u32)),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &Memory32Fixed::new(true, d.base as u32, d.size as u32),
                    &Interrupt::new(true, true, false, false, d.irq),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// A PCI host bridge the tables announce: ECAM for buses `0..=last_bus` at `ecam_base` (in the
/// MCFG, and reserved as motherboard resources), configuration mechanism #1 at 0xcf8, and the
/// 32-bit MMIO window `[mmio_base, mmio_end)` the BARs live in. Devices use MSI-X; the `_PRT`
/// routes INTA# of each slot to a GSI ([`crate::layout::pci_intx_gsi`]) for guests that do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHostBridge {
    pub ecam_base: u64,
    pub ecam_size: u64,
    pub last_bus: u8,
    pub mmio_base: u64,
    pub mmio_end: u64,
}

impl PciHostBridge {
    /// The host bridge of Vessel's layout.
    pub fn standard() -> Self {
        use crate::layout::{PCI_ECAM_BASE, PCI_ECAM_SIZE, PCI_MMIO_BASE, PCI_MMIO_END};
        PciHostBridge {
            ecam_base: PCI_ECAM_BASE,
            ecam_size: PCI_ECAM_SIZE,
            last_bus: ((PCI_ECAM_SIZE >> 20) - 1) as u8,
            mmio_base: PCI_MMIO_BASE,
            mmio_end: PCI_MMIO_END,
        }
    }
}

/// `_PRT`: INTA# of slots 1..=31 to GSIs, as `{ address 0xSSSSFFFF, pin 0, source 0, GSI }`.
fn pci_prt() -> Vec<u8> {
    let entries: Vec<(u32, u32)> = (1..=crate::layout::PCI_MAX_DEVICES as u8)
        .map(|slot| {
            (
                (u32::from(slot) << 16) | 0xffff,
                crate::layout::pci_intx_gsi(slot),
            )
        })
        .collect();
    let packages: Vec<Package> = entries
        .iter()
        .map(|(addr, gsi)| Package::new(vec![addr, &0u8, &0u8, gsi]))
        .collect();
    let refs: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();
    let mut v = Vec::new();
    Name::new(Path::new("_PRT"), &Package::new(refs)).to_aml_bytes(&mut v);
    v
}

/// `\_SB.PCI0` and `\_SB.MRES` (the ECAM area as motherboard resources).
fn pci_aml(p: &PciHostBridge, sink: &mut dyn acpi_tables::AmlSink) {
    let prt = RawAml(pci_prt());
    Device::new(
        Path::new("PCI0"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0A08")),
            &Name::new(Path::new("_CID"), &EISAName::new("PNP0A03")),
            &Name::new(Path::new("_ADR"), &0u8),
            &Name::new(Path::new("_SEG"), &0u8),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_BBN"), &0u8),
            &prt,
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &AmlAddressSpace::new_bus_number(0u16, u16::from(p.last_bus)),
                    &IO::new(0xcf8, 0xcf8, 1, 8),
                    &AmlAddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        p.mmio_base as u32,
                        (p.mmio_end - 1) as u32,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
    Device::new(
        Path::new("MRES"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C02")),
            &Name::new(Path::new("_UID"), &1u8),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![&Memory32Fixed::new(
                    false,
                    p.ecam_base as u32,
                    p.ecam_size as u32,
                )]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

fn mcfg(p: &PciHostBridge) -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(p.ecam_base, 0, 0, p.last_bus);
    let mut v = Vec::new();
    m.to_aml_bytes(&mut v);
    v
}

fn dsdt(mmio: &[MmioDevice], pci: Option<&PciHostBridge>) -> Vec<u8> {
    let mut sdt = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // Each table part is built and emitted in one statement: the AML builders borrow their
    // children, which live until the statement ends.
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut sdt);

    let ged_port = (PM_BASE + PM_GED_EVENT) as u32;
    Scope::new(
        Path::new("\\_SB_"),
        vec![
            // The power button, a control-method device notified by the GED.
            &Device::new(
                Path::new("PWRB"),
                vec![
                    &Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C")),
                    &Name::new(Path::new("_UID"), &0u8),
                ],
            ),
            // The Generic Event Device: on its interrupt, _EVT reads the event byte and
            // notifies the devices whose bits are set.
            &Device::new(
                Path::new("GED_"),
                vec![
                    &Name::new(Path::new("_HID"), &"ACPI0013"),
                    &Name::new(Path::new("_UID"), &0u8),
                    &Name::new(
                        Path::new("_CRS"),
                        &ResourceTemplate::new(vec![&Interrupt::new(
                            true, true, false, false, GED_IRQ,
                        )]),
                    ),
                    &OpRegion::new(Path::new("GDST"), OpRegionSpace::SystemIO, &ged_port, &1u8),
                    &aml::Field::new(
                        Path::new("GDST"),
                        FieldAccessType::Byte,
                        FieldLockRule::NoLock,
                        FieldUpdateRule::WriteAsZeroes,
                        vec![FieldEntry::Named(*b"GDAT", 8)],
                    ),
                    &Method::new(
                        Path::new("_EVT"),
                        1,
                        true,
                        vec![
                            &Store::new(&Local(0), &Path::new("GDAT")),
                            &aml::If::new(
                                &Equal::new(
                                    &aml::And::new(&Local(1), &Local(0), &GED_EVENT_POWER_BUTTON),
                                    &GED_EVENT_POWER_BUTTON,
                                ),
                                vec![&Notify::new(&Path::new("\\_SB_.PWRB"), &0x80u8)],
                            ),
                            &aml::If::new(
                                &Equal::new(
                                    &aml::And::new(&Local(1), &Local(0), &GED_EVENT_VMGENID),
                                    &GED_EVENT_VMGENID,
                                ),
                                vec![&Notify::new(&Path::new("\\_SB_.VGEN"), &0x80u8)],
                            ),
                        ],
                    ),
                ],
            ),
            // The VM generation ID (see the module documentation).
            &Device::new(
                Path::new("VGEN"),
                vec![
                    &Name::new(Path::new("_HID"), &"VMGENCTR"),
                    &Name::new(Path::new("_CID"), &"VM_Gen_Counter"),
                    &Name::new(Path::new("_DDN"), &"VM_Gen_Counter"),
                    &Method::new(
                        Path::new("ADDR"),
                        0,
                        false,
                        vec![&aml::Return::new(&Package::new(vec![
                            &(VMGENID_ADDR as u32),
                            &((VMGENID_ADDR >> 32) as u32),
                        ]))],
                    ),
                ],
            ),
            // The CMOS RTC, so that guests bind their RTC driver through ACPI (no alarm IRQ).
            &Device::new(
                Path::new("RTC_"),
                vec![
                    &Name::new(Path::new("_HID"), &EISAName::new("PNP0B00")),
                    &Name::new(
                        Path::new("_CRS"),
                        &ResourceTemplate::new(vec![&IO::new(RTC_PORT, RTC_PORT, 1, 2)]),
                    ),
                ],
            ),
            // COM1, so that guests find the console through ACPI too.
            &Device::new(
                Path::new("COM1"),
                vec![
                    &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
                    &Name::new(Path::new("_UID"), &0u8),
                    &Name::new(
                        Path::new("_CRS"),
                        &ResourceTemplate::new(vec![
                            &IO::new(COM1_PORT, COM1_PORT, 1, 8),
                            &Interrupt::new(true, true, false, false, COM1_IRQ),
                        ]),
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut sdt);
    if !mmio.is_empty() {
        let mut devices = Vec::new();
        for (i, d) in mmio.iter().enumerate() {
            virtio_mmio_aml(i, d, &mut devices);
        }
        Scope::new(Path::new("\\_SB_"), vec![&RawAml(devices)]).to_aml_bytes(&mut sdt);
    }
    if let Some(p) = pci {
        let mut devices = Vec::new();
        pci_aml(p, &mut devices);
        Scope::new(Path::new("\\_SB_"), vec![&RawAml(devices)]).to_aml_bytes(&mut sdt);
    }
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// Already-encoded AML, to nest in a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port as u64,
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.reset_reg = io(PM_BASE + PM_RESET);
    b.reset_value = RESET_VALUE;
    b.sleep_control_reg = io(PM_BASE + PM_SLEEP_CONTROL);
    b.sleep_status_reg = io(PM_BASE + PM_SLEEP_STATUS);
    // IA-PC boot architecture: no VGA; no i8042 is announced (it exists only for reset).
    b.iapc_boot_arch = (1u16 << 2).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"VESSEL\0\0").into();
    let mut v = Vec::new();
    b.finalize().to_aml_bytes(&mut v);
    v
}

fn madt(cpus: u32) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    m.add_structure(IoApic::new(cpus as u8, IOAPIC_ADDR as u32, 0));
    let mut v = Vec::new();
    m.to_aml_bytes(&mut v);
    v
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// The x86 reset vector (real mode F000:FFF0): where a kernel that resets "through the BIOS"
/// jumps (Linux does on hardware-reduced ACPI platforms without EFI, unless given `reboot=`).
pub const RESET_VECTOR: u64 = 0xf_fff0;

/// Puts a tiny firmware at [`RESET_VECTOR`] that resets the machine through the ACPI reset
/// register: `mov dx, PM_BASE+PM_RESET; mov al, RESET_VALUE; out dx, al; hlt; jmp $-1`.
pub fn setup_reset_vector(mem: &GuestMem) -> Result<(), Error> {
    let [lo, hi] = (PM_BASE + PM_RESET).to_le_bytes();
    let code = [0xba, lo, hi, 0xb0, RESET_VALUE, 0xee, 0xf4, 0xeb, 0xfd];
    mem.write_slice(&code, GuestAddress(RESET_VECTOR))
        .map_err(Error::Write)
}

/// Writes a VM generation ID (16 random bytes) at [`VMGENID_ADDR`].
pub fn write_vm_generation_id(mem: &GuestMem, id: &[u8; VMGENID_LEN]) -> Result<(), Error> {
    mem.write_slice(id, GuestAddress(VMGENID_ADDR))
        .map_err(Error::Write)
}

/// Writes the ACPI tables for `cpus` vCPUs and the `mmio` virtio devices and returns the RSDP's
/// address.
pub fn setup_acpi(mem: &GuestMem, cpus: u32, mmio: &[MmioDevice]) -> Result<GuestAddress, Error> {
    setup_acpi_with_pci(mem, cpus, mmio, None)
}

/// [`setup_acpi`], plus a PCI host bridge (in the DSDT, and an MCFG) if `pci` is given.
pub fn setup_acpi_with_pci(
    mem: &GuestMem,
    cpus: u32,
    mmio: &[MmioDevice],
    pci: Option<&PciHostBridge>,
) -> Result<GuestAddress, Error> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);
    // The XSDT holds FADT, MADT and, with PCI, the MCFG.
    let xsdt_len = 36 + if pci.is_some() { 3 } else { 2 } * 8;
    let dsdt_addr = align8(xsdt_addr + xsdt_len);
    let dsdt = dsdt(mmio, pci);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let mcfg_addr = align8(madt_addr + madt.len() as u64);
    let mcfg = pci.map(mcfg).unwrap_or_default();
    let end = mcfg_addr + mcfg.len() as u64;
    if end - ACPI_START > ACPI_MAX_SIZE {
        return Err(Error::TooLarge(end - ACPI_START));
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if pci.is_some() {
        xsdt.add_entry(mcfg_addr);
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    debug_assert_eq!(xsdt_bytes.len() as u64, xsdt_len);

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);

    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt_bytes),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(Error::Write)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_vector_writes_the_reset_register() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_reset_vector(&mem).unwrap();
        let mut code = [0u8; 9];
        mem.read_slice(&mut code, GuestAddress(RESET_VECTOR))
            .unwrap();
        // mov dx, 0x602; mov al, 1; out dx, al; hlt; jmp back to the hlt
        assert_eq!(code, [0xba, 0x02, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd]);
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    fn table_at(mem: &GuestMem, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut t = vec![0u8; len as usize];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    /// An AML integer constant at `b`: its value and length.
    fn aml_int(b: &[u8]) -> (u64, usize) {
        let le = |n: usize| {
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&b[1..1 + n]);
            u64::from_le_bytes(v)
        };
        match b[0] {
            0x00 => (0, 1),
            0x01 => (1, 1),
            0x0a => (le(1), 2),
            0x0b => (le(2), 3),
            0x0c => (le(4), 5),
            0x0e => (le(8), 9),
            op => panic!("not an integer constant: {op:#x}"),
        }
    }

    #[test]
    fn vm_generation_id_device_and_its_notification() {
        let dsdt = dsdt(&[], None);
        let find = |pat: &[u8]| {
            dsdt.windows(pat.len())
                .position(|w| w == pat)
                .unwrap_or_else(|| panic!("{:?} not in the DSDT", String::from_utf8_lossy(pat)))
        };
        // Device (VGEN) with the IDs Linux matches, as AML strings.
        find(b"\x5b\x82");
        let vgen = find(b"VGEN\x08_HID\x0dVMGENCTR\x00");
        assert!(vgen > find(b"GED_"));
        find(b"\x08_CID\x0dVM_Gen_Counter\x00");
        // Method (ADDR, 0, NotSerialized) { Return (Package (2) { low, high }) }
        let at = find(b"ADDR") + 4;
        assert_eq!(dsdt[at], 0, "no arguments, not serialized");
        assert_eq!(&dsdt[at + 1..at + 2], &[0xa4], "Return");
        assert_eq!(dsdt[at + 2], 0x12, "Package");
        let count_at = at + 4; // one-byte package length
        assert_eq!(dsdt[count_at], 2, "two elements");
        let (low, n) = aml_int(&dsdt[count_at + 1..]);
        let (high, _) = aml_int(&dsdt[count_at + 1 + n..]);
        assert_eq!(low | high << 32, VMGENID_ADDR);
        // _EVT: Notify (\_SB.VGEN, 0x80) when the GED's event byte has GED_EVENT_VMGENID.
        find(b"\x86\x5c\x2e_SB_VGEN\x0a\x80");
        // If (LEqual (And (Local0, 2, Local1), 2)): the event bit is tested.
        let evt = find(b"_EVT");
        let test = [
            0x7b,
            0x60,
            0x0a,
            GED_EVENT_VMGENID,
            0x61,
            0x0a,
            GED_EVENT_VMGENID,
        ];
        let t = find(&test);
        assert!(evt < t && t < find(b"\x86\x5c\x2e_SB_VGEN"));
        // The GUID lives in memory that the e820 map reserves.
        let map = crate::layout::e820_map(128 << 20);
        let covering: Vec<_> = map
            .iter()
            .filter(|e| e.addr <= VMGENID_ADDR && VMGENID_ADDR + 16 <= e.addr + e.size)
            .collect();
        assert_eq!(covering.len(), 1);
        assert_eq!(covering[0].kind, crate::layout::E820Type::Reserved);
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_vm_generation_id(&mem, &[0xab; 16]).unwrap();
        let mut back = [0u8; 16];
        mem.read_slice(&mut back, GuestAddress(VMGENID_ADDR))
            .unwrap();
        assert_eq!(back, [0xab; 16]);
    }

    #[test]
    fn tables_link_up_with_valid_checksums() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mmio = [MmioDevice {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
        }];
        let rsdp = setup_acpi(&mem, 4, &mmio).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(sum(&r[0..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = table_at(&mem, entries[0]);
        assert_eq!(&fadt[0..4], b"FACP");
        assert_eq!(sum(&fadt), 0);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        // Sleep control register: I/O space at PM_BASE.
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            PM_BASE as u64
        );
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(sum(&dsdt), 0);
        let has = |pat: &[u8]| dsdt.windows(pat.len()).any(|w| w == pat);
        assert!(has(b"_S5_") && has(b"PWRB") && has(b"GED_") && has(b"_EVT") && has(b"RTC_"));
        assert!(has(b"LNRO0005") && has(b"V000"));
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(sum(&madt), 0);
        let (mut off, mut lapics, mut ioapics) = (44, 0, 0);
        while off < madt.len() {
            match madt[off] {
                0 => lapics += 1,
                1 => ioapics += 1,
                t => panic!("unexpected MADT entry type {t}"),
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (4, 1));
    }

    #[test]
    fn pci_host_bridge_and_mcfg() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let pci = PciHostBridge::standard();
        assert_eq!(pci.last_bus, 0);
        let rsdp = setup_acpi_with_pci(&mem, 2, &[], Some(&pci)).unwrap();
        let xsdt_addr: u64 = mem.read_obj(GuestAddress(rsdp.0 + 24)).unwrap();
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(sum(&xsdt), 0);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 3);
        let mcfg = table_at(&mem, entries[2]);
        assert_eq!(&mcfg[0..4], b"MCFG");
        assert_eq!(sum(&mcfg), 0);
        // Header (36) + reserved (8), then one allocation: base, segment, start and end bus.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            crate::layout::PCI_ECAM_BASE
        );
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0]);
        let fadt = table_at(&mem, entries[0]);
        let dsdt = table_at(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(sum(&dsdt), 0);
        let has = |pat: &[u8]| dsdt.windows(pat.len()).any(|w| w == pat);
        // PNP0A08 and PNP0A03 as EISA IDs, the bridge and the ECAM reservation.
        assert!(has(b"PCI0") && has(b"MRES") && has(b"_SEG") && has(b"_BBN") && has(b"_CRS"));
        // _PRT: slot 1 INTA# (DWordConst 0x0001ffff) to GSI 16, slot 31 to GSI 22.
        assert!(has(b"_PRT"));
        assert!(has(&[0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 0x10]));
        assert!(has(&[0x0c, 0xff, 0xff, 0x1f, 0x00, 0x00, 0x00, 0x0a, 0x16]));
        assert!(has(&[0x41, 0xd0, 0x0a, 0x08]) && has(&[0x41, 0xd0, 0x0a, 0x03]));
        assert!(has(&(crate::layout::PCI_MMIO_BASE as u32).to_le_bytes()));
        // Without PCI: no MCFG, no PCI0.
        let mem2 = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_acpi(&mem2, 2, &[]).unwrap();
        let x2: u64 = mem2.read_obj(GuestAddress(ACPI_START + 24)).unwrap();
        assert_eq!(table_at(&mem2, x2).len(), 36 + 16);
    }

    #[test]
    fn the_largest_vm_fits() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mmio: Vec<MmioDevice> = (0..9)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                irq: 5,
            })
            .collect();
        setup_acpi(&mem, crate::MAX_VCPUS, &mmio).unwrap();
    }
}
