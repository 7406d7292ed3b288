//! Platform devices on the I/O port bus: COM1, i8042 (for reset), the CMOS RTC, the ACPI
//! platform registers, the exit device and the boot-time marker.
//!
//! Snapshots: each device with guest-visible state has `state()` and `restore()` with a plain
//! serde struct, gathered in [`LegacyState`]. The i8042 (reads are all zero, a write only
//! resets), the exit device and the boot marker (its first-write time belongs to the process
//! that saw it) have none.

mod acpi_pm;
mod cmos;
mod debug;
mod i8042;
mod serial;

use serde::{Deserialize, Serialize};

pub use acpi_pm::{AcpiPm, AcpiPmState};
pub use cmos::{Cmos, CmosState};
pub use debug::{BootMarker, ExitDevice, BOOT_MARKER_VALUE};
pub use i8042::I8042;
pub use serial::{Serial, SerialInput, SerialState};

/// Errors restoring a platform device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("saved serial port state: {0}")]
    Serial(String),
    #[error("saved CMOS has {0} bytes of NVRAM; 128 expected")]
    CmosSize(usize),
}

/// The guest-visible state of the platform devices, for the VM monitor's snapshot (the PCI
/// root's is [`crate::pci::PciRootState`], the interrupt controllers' are KVM's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    pub serial: SerialState,
    pub cmos: CmosState,
    pub acpi_pm: AcpiPmState,
}
