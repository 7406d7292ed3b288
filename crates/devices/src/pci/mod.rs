//! PCI: configuration space, a host bridge, the root bus and its two configuration access
//! mechanisms, MSI-X, and a dispatcher for the memory BARs of the 32-bit PCI window.
//!
//! - [`PciConfig`]: a type-0 header with BARs (sizing through the write mask) and a capability
//!   list; each function implements [`PciDevice`] around one.
//! - [`PciRoot`]: bus 0, 32 slots, function 0 each; slot 0 holds the [`HostBridge`]. It routes
//!   configuration accesses and, when the guest changes a BAR or the memory-decode bit, moves the
//!   BAR in the [`PciWindow`] and tells a [`BarObserver`] (the VM monitor moves its ioeventfds).
//! - [`PciConfigIo`] (configuration mechanism #1, ports 0xcf8/0xcfc) and [`PciEcam`] (memory
//!   mapped, bus 0 only) are the [`crate::BusDevice`]s through which the guest reaches the root.
//! - [`PciWindow`] is one [`crate::BusDevice`] owning the whole 32-bit PCI MMIO window and
//!   dispatching to BARs by address, so BARs move without changing the (immutable) MMIO bus.
//! - [`msix::Msix`]: the MSI-X table and PBA with masking; delivery goes through
//!   [`msix::MsiVectors`], which the VM monitor implements with KVM routes and irqfds.

pub mod config;
pub mod msix;
mod root;
mod window;

pub use config::{BarKind, PciConfig, PciConfigState, PciHeader};
pub use root::{
    BarObserver, HostBridge, PciConfigIo, PciEcam, PciRoot, PciRootState, ECAM_BUS0_SIZE,
    HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE,
};
pub use window::PciWindow;

/// Errors of the PCI models.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("BAR {0} does not exist or is already in use")]
    BadBar(usize),
    #[error(
        "BAR size {0:#x} is not a power of two of at least 16 bytes (32-bit BARs: up to 2 GiB)"
    )]
    BadBarSize(u64),
    #[error("address {addr:#x} does not suit BAR {index}")]
    BadBarAddress { index: usize, addr: u64 },
    #[error("no room left for a capability in the configuration space")]
    NoCapabilitySpace,
    #[error("PCI slot {0} does not exist or is taken")]
    SlotTaken(u8),
    #[error("saved PCI state does not match this function")]
    StateMismatch,
    #[error("MSI-X: {0}")]
    Msix(String),
}

/// A PCI function as the root bus sees it.
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &PciConfig;
    /// The configuration space, mutably.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// A guest read of the configuration space.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A guest write to the configuration space; functions with capabilities whose writes have
    /// effects (MSI-X control) override this and call [`PciConfig::write`] themselves.
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    /// A read of memory BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0);
    }
    /// A write to memory BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }
}
