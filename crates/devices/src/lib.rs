//! Vessel's devices.
//!
//! A device implements [`BusDevice`]: it sees reads and writes at offsets into its own register
//! range and nothing of KVM. Devices raise interrupts through an [`Interrupt`] (an eventfd the VM
//! monitor wires to the irqchip) and report machine-level events (power off, reset, exit) through
//! a [`VmEventSink`].

pub mod bus;
pub mod legacy;
pub mod log;
pub mod output;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

use std::sync::Arc;

/// Something the guest did that ends or changes the whole VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse).
    Reset,
    /// The guest wrote a status to the exit device.
    Exit(u8),
}

/// Where devices report [`VmEvent`]s.
pub type VmEventSink = Arc<dyn Fn(VmEvent) + Send + Sync>;

/// An edge-triggered interrupt line, as devices see it.
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}
