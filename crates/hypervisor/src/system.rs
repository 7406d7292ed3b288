//! The `/dev/kvm` system handle and what the host's KVM offers.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::{op, Error, Result, Vm};

/// The host's KVM.
pub struct Hypervisor {
    kvm: Kvm,
}

/// Facts about the host's KVM, for `vessel host-check` and for validating a VM's configuration.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub api_version: i32,
    pub recommended_vcpus: usize,
    pub max_vcpus: usize,
    pub max_memslots: usize,
    /// (capability name, supported)
    pub caps: Vec<(&'static str, bool)>,
}

/// Capabilities Vessel requires to build a VM.
const REQUIRED_CAPS: &[(&str, Cap)] = &[
    ("IRQCHIP", Cap::Irqchip),
    ("PIT2", Cap::Pit2),
    ("IRQFD", Cap::Irqfd),
    ("IOEVENTFD", Cap::Ioeventfd),
    ("USER_MEMORY", Cap::UserMemory),
    ("SET_TSS_ADDR", Cap::SetTssAddr),
    ("EXT_CPUID", Cap::ExtCpuid),
    ("IMMEDIATE_EXIT", Cap::ImmediateExit),
];

/// Capabilities reported for information (used by later features).
const OPTIONAL_CAPS: &[(&str, Cap)] = &[
    ("SPLIT_IRQCHIP", Cap::SplitIrqchip),
    ("X2APIC_API", Cap::X2ApicApi),
    ("TSC_DEADLINE_TIMER", Cap::TscDeadlineTimer),
    ("XSAVE", Cap::Xsave),
    ("XCRS", Cap::Xcrs),
    ("KVMCLOCK_CTRL", Cap::KvmclockCtrl),
    ("ADJUST_CLOCK", Cap::AdjustClock),
    ("DIRTY_LOG_RING", Cap::DirtyLogRing),
    ("TSC_CONTROL", Cap::TscControl),
    ("GET_TSC_KHZ", Cap::GetTscKhz),
];

impl Hypervisor {
    /// Opens `/dev/kvm` and checks the API version and the capabilities Vessel needs.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let v = kvm.get_api_version();
        if v != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(Error::ApiVersion(v));
        }
        for (name, cap) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(Error::MissingCap(name));
            }
        }
        Ok(Hypervisor { kvm })
    }

    /// What this KVM offers.
    pub fn info(&self) -> HostInfo {
        let caps = REQUIRED_CAPS
            .iter()
            .chain(OPTIONAL_CAPS)
            .map(|(n, c)| (*n, self.kvm.check_extension(*c)))
            .collect();
        HostInfo {
            api_version: self.kvm.get_api_version(),
            recommended_vcpus: self.kvm.get_nr_vcpus(),
            max_vcpus: self.kvm.get_max_vcpus(),
            max_memslots: self.kvm.get_nr_memslots(),
            caps,
        }
    }

    /// The most vCPUs one VM may have on this host.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The CPUID entries KVM can virtualize on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(op("KVM_GET_SUPPORTED_CPUID"))
    }

    /// The MSR indices KVM can save and restore.
    pub fn msr_index_list(&self) -> Result<Vec<u32>> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(op("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec())
    }

    /// Creates a VM.
    pub fn create_vm(&self) -> Result<Vm> {
        let fd = self.kvm.create_vm().map_err(op("KVM_CREATE_VM"))?;
        Ok(Vm::new(fd, self.kvm.get_nr_memslots()))
    }
}
