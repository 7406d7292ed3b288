//! What a VM is, apart from where it runs: the value types that the command line, the control
//! API, the snapshots, the migration stream and the image tools share, parsed once.
//!
//! - [`vm`]: [`vm::VmSpec`], a VM's vCPUs, memory, boot source and devices, versioned serde.
//! - [`bindings`]: [`bindings::HostBindings`], this host's files, network backends, sockets and
//!   consoles for a spec, and [`bindings::VmDocument`] (a spec with its bindings: `vessel run
//!   --config`); [`netbinding`]: a network device's backend (tap, stream socket, passt).
//! - [`cli`]: the command line's device options, parsed into both.
//! - [`size`]: the one size parser (`512M`, `1.5G`, `4096B`, `2GiB`).
//! - [`mac`], [`rate`]: MAC addresses and rate limits as a spec states them.

pub mod bindings;
pub mod cli;
pub mod mac;
pub mod netbinding;
pub mod rate;
pub mod size;
pub mod vm;
