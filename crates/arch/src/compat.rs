//! CPU compatibility for restore and migration: which CPUID feature bits a saved vCPU had that
//! this host's KVM cannot offer. A guest that found a feature at boot uses it without asking
//! again, so restoring it where the feature is missing makes it fault (#UD, #GP) at some later
//! point; a restore refuses instead, naming the features.
//!
//! Compared: the feature flag registers (leaves 1, 7.0, 7.1, 0xD.1, 0x8000_0001, 0x8000_0007
//! EDX, 0x8000_0008 EBX, KVM's 0x4000_0001 EAX) and the XSAVE state components (0xD.0 EAX/EDX).
//! Left out: bits the guest's CPUID shows that are no host feature: OSXSAVE and OSPKE (KVM
//! mirrors the guest's CR4 into them), the hypervisor bit and HTT (set by Vessel), and the
//! TSC-deadline timer (emulated by KVM's LAPIC: KVM_CAP_TSC_DEADLINE_TIMER says whether a host
//! offers it, not the supported CPUID).

use std::fmt;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::template::{Reg, FEATURES};

/// A feature flag register: (leaf, subleaf, register, bits to ignore).
const FEATURE_REGS: &[(u32, u32, Reg, u32)] = &[
    // OSXSAVE (27), hypervisor (31), TSC-deadline (24).
    (1, 0, Reg::Ecx, (1 << 27) | (1 << 31) | (1 << 24)),
    // HTT (28).
    (1, 0, Reg::Edx, 1 << 28),
    (7, 0, Reg::Ebx, 0),
    // OSPKE (4).
    (7, 0, Reg::Ecx, 1 << 4),
    (7, 0, Reg::Edx, 0),
    (7, 1, Reg::Eax, 0),
    (0xd, 1, Reg::Eax, 0),
    (0x8000_0001, 0, Reg::Ecx, 0),
    (0x8000_0001, 0, Reg::Edx, 0),
    (0x8000_0007, 0, Reg::Edx, 0),
    (0x8000_0008, 0, Reg::Ebx, 0),
    (0x4000_0001, 0, Reg::Eax, 0),
];

/// XSAVE state components (CPUID 0xD.0 EAX = bits 0-31, EDX = bits 32-63).
const XSAVE_COMPONENTS: &[(u8, &str)] = &[
    (0, "x87"),
    (1, "sse"),
    (2, "avx"),
    (3, "mpx-bndregs"),
    (4, "mpx-bndcsr"),
    (5, "avx512-opmask"),
    (6, "avx512-zmm-hi256"),
    (7, "avx512-hi16-zmm"),
    (9, "pkru"),
    (17, "amx-tilecfg"),
    (18, "amx-tiledata"),
];

/// A CPUID feature bit the saved vCPU had and the host lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFeature {
    /// The name `--cpu-template` uses, or a description of the bit.
    pub name: String,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The error a restore reports when the host lacks features the saved vCPU had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this host's CPU (as KVM offers it) lacks {} feature(s) the saved vCPU had: {}",
    .0.len(),
    .0.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
)]
pub struct Incompatible(pub Vec<MissingFeature>);

fn reg(e: &kvm_cpuid_entry2, r: Reg) -> u32 {
    match r {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

fn reg_name(r: Reg) -> &'static str {
    match r {
        Reg::Eax => "eax",
        Reg::Ebx => "ebx",
        Reg::Ecx => "ecx",
        Reg::Edx => "edx",
    }
}

fn lookup(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, r: Reg) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        // Entries without a subleaf (no KVM_CPUID_FLAG_SIGNIFCANT_INDEX) answer every subleaf.
        .or_else(|| {
            entries.iter().find(|e| {
                e.function == leaf && e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0
            })
        })
        .map_or(0, |e| reg(e, r))
}

fn feature_name(leaf: u32, subleaf: u32, r: Reg, bit: u8) -> String {
    FEATURES
        .iter()
        .find(|f| f.leaf == leaf && f.subleaf == subleaf && f.reg == r && f.bit == bit)
        .map_or_else(
            || format!("cpuid {leaf:#x}.{subleaf} {}[{bit}]", reg_name(r)),
            |f| f.name.to_string(),
        )
}

/// The feature bits `saved` (a vCPU's CPUID from its saved state) has and `host` (the host's
/// supported CPUID, `KVM_GET_SUPPORTED_CPUID`) lacks, named where the template table names them.
pub fn missing_features(saved: &[kvm_cpuid_entry2], host: &CpuId) -> Vec<MissingFeature> {
    let host = host.as_slice();
    let mut missing = Vec::new();
    for &(leaf, subleaf, r, ignore) in FEATURE_REGS {
        let lacking = lookup(saved, leaf, subleaf, r) & !lookup(host, leaf, subleaf, r) & !ignore;
        for bit in (0..32u8).filter(|b| lacking & (1 << b) != 0) {
            missing.push(MissingFeature {
                name: feature_name(leaf, subleaf, r, bit),
                leaf,
                subleaf,
                reg: r,
                bit,
            });
        }
    }
    for (r, base) in [(Reg::Eax, 0u8), (Reg::Edx, 32)] {
        let lacking = lookup(saved, 0xd, 0, r) & !lookup(host, 0xd, 0, r);
        for bit in (0..32u8).filter(|b| lacking & (1 << b) != 0) {
            let n = base + bit;
            let name = XSAVE_COMPONENTS
                .iter()
                .find(|(c, _)| *c == n)
                .map_or_else(|| n.to_string(), |(_, s)| (*s).to_string());
            missing.push(MissingFeature {
                name: format!("xsave state {name}"),
                leaf: 0xd,
                subleaf: 0,
                reg: r,
                bit,
            });
        }
    }
    missing
}

/// [`missing_features`] as a result: `Err` names every missing feature.
pub fn check(saved: &[kvm_cpuid_entry2], host: &CpuId) -> Result<(), Incompatible> {
    let missing = missing_features(saved, host);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Incompatible(missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 || function == 0xd {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn names_the_features_the_host_lacks() {
        // Saved: avx (1.ecx 28), avx2 (7.ebx 5), avx512f (7.ebx 16), an unnamed 7.edx bit 2,
        // the AVX-512 state components, and the OS/hypervisor bits.
        let saved = [
            entry(1, 0, 0, 0, (1 << 28) | (1 << 27) | (1 << 31), 1 << 28),
            entry(7, 0, 0, (1 << 5) | (1 << 16), 1 << 4, 1 << 2),
            entry(0xd, 0, 0xe7, 0, 0, 0),
        ];
        let host = CpuId::from_entries(&[
            entry(1, 0, 0, 0, 1 << 28, 0),
            entry(7, 0, 0, 1 << 5, 0, 0),
            entry(0xd, 0, 0x7, 0, 0, 0),
        ])
        .unwrap();
        let names: Vec<String> = missing_features(&saved, &host)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        assert_eq!(
            names,
            vec![
                "avx512f",
                "cpuid 0x7.0 edx[2]",
                "xsave state avx512-opmask",
                "xsave state avx512-zmm-hi256",
                "xsave state avx512-hi16-zmm"
            ]
        );
        let err = check(&saved, &host).unwrap_err().to_string();
        assert!(err.contains("lacks 5 feature(s)"), "{err}");
        assert!(err.contains("avx512f, cpuid 0x7.0 edx[2]"), "{err}");
    }

    #[test]
    fn the_same_cpuid_is_compatible() {
        let e = [
            entry(1, 0, 0, 0, 0x7ffa_3203, 0x178b_fbff),
            entry(7, 0, 0, 0x219c_07ab, 0x0040_069c, 0xac00_0400),
            entry(0x8000_0001, 0, 0, 0, 0x121, 0x2c10_0800),
        ];
        let host = CpuId::from_entries(&e).unwrap();
        assert!(check(&e, &host).is_ok());
        // A host with more features is fine too.
        let mut more = e;
        more[1].ebx |= 1 << 16;
        assert!(check(&e, &CpuId::from_entries(&more).unwrap()).is_ok());
        // A missing leaf on the host counts as all zero.
        let host = CpuId::from_entries(&e[..2]).unwrap();
        let m = missing_features(&e, &host);
        assert!(m.iter().any(|f| f.name == "nx"), "{m:?}");
        assert!(m.iter().any(|f| f.name == "lahf-lm"), "{m:?}");
    }
}
