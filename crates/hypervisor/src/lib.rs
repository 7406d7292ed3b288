//! Vessel's KVM layer.
//!
//! Thin, typed wrappers over `kvm-ioctls`: the system handle ([`Hypervisor`]), a VM ([`Vm`]) and
//! its vCPUs ([`Vcpu`]). Every `unsafe` ioctl of the project lives in this crate. Nothing above it
//! sees a raw KVM structure except the register and CPUID types re-exported here.

mod cpu;
pub mod dirty;
mod kick;
pub mod mem;
mod msi;
mod probe;
pub mod state;
mod system;
pub mod uffd;
mod vm;

pub use cpu::{Vcpu, VcpuExit};
pub use kick::{install_kick_handler, KickHandle};
pub use msi::{LevelIrqLine, MsiRouter, MsiVector, FIRST_MSI_GSI, MAX_MSI_VECTORS};
pub use probe::{Ring0Probe, PROBE_ITERATIONS};
pub use state::{ClockMode, FpuState, LegacyFpu, MsrEntry, VcpuState, VmState};
pub use system::{HostInfo, Hypervisor};
pub use vm::{IoSpace, IrqLine, Vm};

/// KVM structures the layers above use to describe CPU state.
pub mod kvm {
    pub use kvm_bindings::{
        kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
        kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
    };
}

/// Errors from the KVM layer; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and do you have access to /dev/kvm?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability Vessel needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM operation `{op}` failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {wanted} MSRs (first rejected: {first_rejected:#x})")]
    PartialMsrs {
        set: usize,
        wanted: usize,
        first_rejected: u32,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("host probe failed: {0}")]
    Probe(String),
    #[error("signal setup failed: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("invalid saved state: {0}")]
    BadState(&'static str),
    #[error("KVM refused to restore MSR(s) {}", hex_list(.0))]
    MsrsRefused(Vec<u32>),
    #[error(
        "the saved TSC runs at {saved} kHz, this host's at {host} kHz, and KVM cannot scale it: {source}"
    )]
    TscFrequency {
        saved: u32,
        host: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn hex_list(v: &[u32]) -> String {
    v.iter()
        .map(|i| format!("{i:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T> = std::result::Result<T, Error>;

/// Maps a `kvm_ioctls` error to [`Error::Kvm`] naming the operation.
pub(crate) fn op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
