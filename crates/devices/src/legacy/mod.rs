//! Platform devices on the I/O port bus: COM1, i8042 (for reset), the CMOS RTC, the ACPI
//! platform registers, the exit device and the boot-time marker.

mod acpi_pm;
mod cmos;
mod debug;
mod i8042;
mod serial;

pub use acpi_pm::AcpiPm;
pub use cmos::Cmos;
pub use debug::{BootMarker, ExitDevice, BOOT_MARKER_VALUE};
pub use i8042::I8042;
pub use serial::{Serial, SerialInput};
