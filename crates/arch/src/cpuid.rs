//! Per-vCPU CPUID: the host's supported CPUID (after any template) made right for one vCPU of a
//! VM with `cpus` vCPUs, one thread per core and one socket.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;

/// Facts about the VM that shape every vCPU's CPUID.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    /// vCPUs in the VM (all cores of one socket).
    pub cpus: u32,
    /// Whether KVM's LAPIC emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
}

/// Bits needed to hold `n` distinct values (0 for n <= 1).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The CPUID for vCPU `index` (whose APIC ID equals its index).
pub fn for_vcpu(base: &CpuId, index: u32, topo: Topology) -> CpuId {
    let mut cpuid = base.clone();
    let cpus = topo.cpus.max(1);
    let core_bits = bits_for(cpus);
    for e in cpuid.as_mut_slice() {
        normalize(e, index, cpus, core_bits, topo);
    }
    cpuid
}

fn normalize(e: &mut kvm_cpuid_entry2, index: u32, cpus: u32, core_bits: u32, topo: Topology) {
    match e.function {
        1 => {
            // EBX: APIC ID [31:24], logical processors [23:16], CLFLUSH line (8 qwords) [15:8].
            e.ebx = (index << 24) | ((cpus.min(255)) << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= LEAF1_ECX_HYPERVISOR;
            if topo.tsc_deadline {
                e.ecx |= LEAF1_ECX_TSC_DEADLINE;
            } else {
                e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
            }
            if cpus > 1 {
                e.edx |= LEAF1_EDX_HTT;
            } else {
                e.edx &= !LEAF1_EDX_HTT;
            }
        }
        4 => {
            // Deterministic cache parameters: cores per package [31:26], threads sharing [25:14].
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { cpus - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((cpus - 1) & 0x3f) << 26);
        }
        6 => {
            // No thermal or power management to offer.
            e.eax &= !(1 << 1); // no turbo
            e.ecx &= !(1 << 3); // no energy/performance bias
        }
        0xa => {
            // No virtual PMU.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: level 0 = SMT (1 thread per core), level 1 = core.
            e.edx = index;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = cpus;
                    e.ecx = (2 << 8) | 1;
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n & 0xff;
                }
            }
        }
        0x8000_0008 => {
            // AMD: number of cores - 1 [7:0], APIC ID size [15:12].
            e.ecx = (e.ecx & !0xf0ff) | ((core_bits & 0xf) << 12) | ((cpus - 1) & 0xff);
        }
        0x8000_001e => {
            // AMD extended APIC ID, compute unit (one thread each), node 0.
            e.eax = index;
            e.ebx = index & 0xff;
            e.ecx = 0;
            e.edx = 0;
        }
        KVM_SIGNATURE_LEAF => {
            // "KVMKVMKVM\0\0\0" so guests find the KVM paravirtual leaves.
            e.ebx = u32::from_le_bytes(*b"KVMK");
            e.ecx = u32::from_le_bytes(*b"VMKV");
            e.edx = u32::from_le_bytes(*b"M\0\0\0");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        let e = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_0000,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(1, 0),
            e(4, 0),
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                eax: 3 << 5,
                ..Default::default()
            },
            e(0xb, 0),
            e(0xb, 1),
            e(0x4000_0000, 0),
        ])
        .unwrap()
    }

    #[test]
    fn apic_ids_and_topology_per_vcpu() {
        let topo = Topology {
            cpus: 4,
            tsc_deadline: true,
        };
        let c = for_vcpu(&base(), 3, topo);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(s[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(s[1].eax >> 26, 3);
        assert_eq!((s[2].eax >> 14) & 0xfff, 3, "L3 shared by all cores");
        assert_eq!(s[3].edx, 3);
        assert_eq!((s[4].eax, s[4].ebx), (2, 4));
        assert_eq!(s[5].ebx, u32::from_le_bytes(*b"KVMK"));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = for_vcpu(
            &base(),
            0,
            Topology {
                cpus: 1,
                tsc_deadline: false,
            },
        );
        assert_eq!(c.as_slice()[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(5), 3);
    }
}
