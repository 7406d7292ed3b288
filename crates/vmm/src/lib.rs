//! Vessel's VM monitor: builds a VM from a [`VmConfig`], runs one thread per vCPU, dispatches
//! their exits to the devices, and ends the VM with an [`ExitReason`] whose exit code is
//! documented in [`exit`].

pub mod api;
pub mod config;
pub mod console;
pub mod control;
pub mod dirty;
pub mod exit;
pub mod migration;
pub mod pci;
pub mod session;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use config::{ConsoleConfig, KernelSource, VmConfig};
pub use exit::ExitReason;
pub use vm::{Error, Vm};
