//! CPU templates: masking CPUID features by name (`--cpu-template`).
//!
//! A template is a comma-separated list of items: a preset (`host`, `x86-64-v2`, `x86-64-v3`),
//! `-feature` to hide a feature from the guest, or `+feature` / `feature` to require one (an
//! error if this host cannot offer it). Hiding a feature also hides the ones that depend on it.

use kvm_bindings::CpuId;

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Where a feature bit lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

use Reg::*;

/// The features a template can name.
pub const FEATURES: &[Feature] = &[
    // Leaf 1 ECX
    f("sse3", 1, 0, Ecx, 0),
    f("pclmulqdq", 1, 0, Ecx, 1),
    f("monitor", 1, 0, Ecx, 3),
    f("vmx", 1, 0, Ecx, 5),
    f("ssse3", 1, 0, Ecx, 9),
    f("fma", 1, 0, Ecx, 12),
    f("cx16", 1, 0, Ecx, 13),
    f("pcid", 1, 0, Ecx, 17),
    f("sse4.1", 1, 0, Ecx, 19),
    f("sse4.2", 1, 0, Ecx, 20),
    f("x2apic", 1, 0, Ecx, 21),
    f("movbe", 1, 0, Ecx, 22),
    f("popcnt", 1, 0, Ecx, 23),
    f("tsc-deadline", 1, 0, Ecx, 24),
    f("aes", 1, 0, Ecx, 25),
    f("xsave", 1, 0, Ecx, 26),
    f("avx", 1, 0, Ecx, 28),
    f("f16c", 1, 0, Ecx, 29),
    f("rdrand", 1, 0, Ecx, 30),
    // Leaf 1 EDX
    f("pse36", 1, 0, Edx, 17),
    f("clflush", 1, 0, Edx, 19),
    f("mmx", 1, 0, Edx, 23),
    f("sse", 1, 0, Edx, 25),
    f("sse2", 1, 0, Edx, 26),
    // Leaf 7 EBX
    f("fsgsbase", 7, 0, Ebx, 0),
    f("bmi1", 7, 0, Ebx, 3),
    f("hle", 7, 0, Ebx, 4),
    f("avx2", 7, 0, Ebx, 5),
    f("smep", 7, 0, Ebx, 7),
    f("bmi2", 7, 0, Ebx, 8),
    f("erms", 7, 0, Ebx, 9),
    f("invpcid", 7, 0, Ebx, 10),
    f("rtm", 7, 0, Ebx, 11),
    f("avx512f", 7, 0, Ebx, 16),
    f("avx512dq", 7, 0, Ebx, 17),
    f("rdseed", 7, 0, Ebx, 18),
    f("adx", 7, 0, Ebx, 19),
    f("smap", 7, 0, Ebx, 20),
    f("avx512ifma", 7, 0, Ebx, 21),
    f("clflushopt", 7, 0, Ebx, 23),
    f("clwb", 7, 0, Ebx, 24),
    f("avx512cd", 7, 0, Ebx, 28),
    f("sha", 7, 0, Ebx, 29),
    f("avx512bw", 7, 0, Ebx, 30),
    f("avx512vl", 7, 0, Ebx, 31),
    // Leaf 7 ECX
    f("avx512vbmi", 7, 0, Ecx, 1),
    f("umip", 7, 0, Ecx, 2),
    f("pku", 7, 0, Ecx, 3),
    f("waitpkg", 7, 0, Ecx, 5),
    f("avx512vbmi2", 7, 0, Ecx, 6),
    f("gfni", 7, 0, Ecx, 8),
    f("vaes", 7, 0, Ecx, 9),
    f("vpclmulqdq", 7, 0, Ecx, 10),
    f("avx512vnni", 7, 0, Ecx, 11),
    f("avx512bitalg", 7, 0, Ecx, 12),
    f("avx512vpopcntdq", 7, 0, Ecx, 14),
    f("la57", 7, 0, Ecx, 16),
    f("rdpid", 7, 0, Ecx, 22),
    // Leaf 7 EDX
    f("fsrm", 7, 0, Edx, 4),
    f("serialize", 7, 0, Edx, 14),
    f("amx-bf16", 7, 0, Edx, 22),
    f("amx-tile", 7, 0, Edx, 24),
    f("amx-int8", 7, 0, Edx, 25),
    // Leaf 0xD subleaf 1 EAX
    f("xsaveopt", 0xd, 1, Eax, 0),
    f("xsavec", 0xd, 1, Eax, 1),
    f("xsaves", 0xd, 1, Eax, 3),
    // Leaf 0x8000_0001 ECX / EDX
    f("lahf-lm", 0x8000_0001, 0, Ecx, 0),
    f("svm", 0x8000_0001, 0, Ecx, 2),
    f("abm", 0x8000_0001, 0, Ecx, 5),
    f("sse4a", 0x8000_0001, 0, Ecx, 6),
    f("prefetchw", 0x8000_0001, 0, Ecx, 8),
    f("xop", 0x8000_0001, 0, Ecx, 11),
    f("fma4", 0x8000_0001, 0, Ecx, 16),
    f("tbm", 0x8000_0001, 0, Ecx, 21),
    f("topoext", 0x8000_0001, 0, Ecx, 22),
    f("nx", 0x8000_0001, 0, Edx, 20),
    f("pdpe1gb", 0x8000_0001, 0, Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Edx, 27),
    // KVM paravirtual features, leaf 0x4000_0001 EAX
    f("kvmclock", 0x4000_0001, 0, Eax, 0),
    f("kvm-nopiodelay", 0x4000_0001, 0, Eax, 1),
    f("kvmclock2", 0x4000_0001, 0, Eax, 3),
    f("kvm-asyncpf", 0x4000_0001, 0, Eax, 4),
    f("kvm-steal-time", 0x4000_0001, 0, Eax, 5),
    f("kvm-pv-eoi", 0x4000_0001, 0, Eax, 6),
    f("kvm-pv-unhalt", 0x4000_0001, 0, Eax, 7),
    f("kvm-pv-tlb-flush", 0x4000_0001, 0, Eax, 9),
    f("kvm-pv-send-ipi", 0x4000_0001, 0, Eax, 11),
    f("kvm-poll-control", 0x4000_0001, 0, Eax, 12),
    f("kvm-pv-sched-yield", 0x4000_0001, 0, Eax, 13),
    f("kvm-asyncpf-int", 0x4000_0001, 0, Eax, 14),
    f("kvm-msi-ext-dest-id", 0x4000_0001, 0, Eax, 15),
];

/// Features hidden along with a hidden feature.
const DEPENDENTS: &[(&str, &[&str])] = &[
    ("xsave", &["avx", "xsaveopt", "xsavec", "xsaves"]),
    (
        "avx",
        &[
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "vaes",
            "vpclmulqdq",
            "xop",
            "fma4",
        ],
    ),
    (
        "avx512f",
        &[
            "avx512dq",
            "avx512ifma",
            "avx512cd",
            "avx512bw",
            "avx512vl",
            "avx512vbmi",
            "avx512vbmi2",
            "avx512vnni",
            "avx512bitalg",
            "avx512vpopcntdq",
        ],
    ),
    ("sse2", &["sse3"]),
    ("sse3", &["ssse3"]),
    ("ssse3", &["sse4.1"]),
    ("sse4.1", &["sse4.2"]),
    ("sse4.2", &["popcnt", "aes", "pclmulqdq", "sha", "gfni"]),
    ("kvmclock", &["kvmclock2"]),
];

/// Features above the x86-64-v2 level (hidden by the `x86-64-v2` preset).
const ABOVE_V2: &[&str] = &[
    "avx",
    "avx2",
    "bmi1",
    "bmi2",
    "f16c",
    "fma",
    "movbe",
    "abm",
    "xsave",
    "avx512f",
    "sha",
    "vaes",
    "vpclmulqdq",
    "gfni",
    "adx",
    "rdseed",
    "amx-tile",
    "amx-bf16",
    "amx-int8",
    "waitpkg",
    "serialize",
    "xop",
    "fma4",
    "tbm",
    "la57",
];
/// Features above the x86-64-v3 level (hidden by the `x86-64-v3` preset).
const ABOVE_V3: &[&str] = &[
    "avx512f",
    "amx-tile",
    "amx-bf16",
    "amx-int8",
    "waitpkg",
    "serialize",
    "xop",
    "fma4",
    "tbm",
    "la57",
];

/// Errors in a `--cpu-template`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("unknown CPU feature '{0}' in --cpu-template (known: {known})", known = known_names())]
    UnknownFeature(String),
    #[error("--cpu-template requires '{0}', which this host's KVM does not offer")]
    Unavailable(String),
    #[error("empty item in --cpu-template")]
    Empty,
}

fn known_names() -> String {
    let mut v: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
    v.extend(["host", "x86-64-v2", "x86-64-v3"]);
    v.join(", ")
}

/// A parsed template: which features to hide and which must be present.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CpuTemplate {
    pub hide: Vec<&'static Feature>,
    pub require: Vec<&'static Feature>,
}

fn feature(name: &str) -> Result<&'static Feature, Error> {
    FEATURES
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| Error::UnknownFeature(name.to_string()))
}

impl CpuTemplate {
    /// Parses a template specification.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let mut t = CpuTemplate::default();
        for item in spec.split(',').map(str::trim) {
            match item {
                "" => return Err(Error::Empty),
                "host" => {}
                "x86-64-v2" => t.hide_all(ABOVE_V2)?,
                "x86-64-v3" => t.hide_all(ABOVE_V3)?,
                _ => {
                    if let Some(name) = item.strip_prefix('-') {
                        t.hide_with_dependents(feature(name)?);
                    } else {
                        let name = item.strip_prefix('+').unwrap_or(item);
                        t.require.push(feature(name)?);
                    }
                }
            }
        }
        Ok(t)
    }

    fn hide_all(&mut self, names: &[&str]) -> Result<(), Error> {
        for n in names {
            self.hide_with_dependents(feature(n)?);
        }
        Ok(())
    }

    fn hide_with_dependents(&mut self, f: &'static Feature) {
        if self.hide.iter().any(|h| h.name == f.name) {
            return;
        }
        self.hide.push(f);
        if let Some((_, deps)) = DEPENDENTS.iter().find(|(n, _)| *n == f.name) {
            for d in *deps {
                if let Ok(df) = feature(d) {
                    self.hide_with_dependents(df);
                }
            }
        }
    }

    /// Applies the template to the host's supported CPUID.
    pub fn apply(&self, cpuid: &mut CpuId) -> Result<(), Error> {
        for r in &self.require {
            if !has_feature(cpuid, r) {
                return Err(Error::Unavailable(r.name.to_string()));
            }
        }
        for h in &self.hide {
            for e in cpuid.as_mut_slice() {
                if e.function == h.leaf && e.index == h.subleaf {
                    *reg_mut(e, h.reg) &= !(1u32 << h.bit);
                }
            }
        }
        Ok(())
    }
}

fn reg_mut(e: &mut kvm_bindings::kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Eax => &mut e.eax,
        Ebx => &mut e.ebx,
        Ecx => &mut e.ecx,
        Edx => &mut e.edx,
    }
}

/// Whether `cpuid` offers feature `f`.
pub fn has_feature(cpuid: &CpuId, f: &Feature) -> bool {
    cpuid.as_slice().iter().any(|e| {
        e.function == f.leaf && e.index == f.subleaf && {
            let v = match f.reg {
                Eax => e.eax,
                Ebx => e.ebx,
                Ecx => e.ecx,
                Edx => e.edx,
            };
            v & (1 << f.bit) != 0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: (1 << 28) | (1 << 26) | (1 << 21),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: (1 << 5) | (1 << 16) | (1 << 30),
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn hides_a_feature_and_its_dependents() {
        let mut c = cpuid();
        CpuTemplate::parse("-avx").unwrap().apply(&mut c).unwrap();
        let s = c.as_slice();
        assert_eq!(s[0].ecx, (1 << 26) | (1 << 21));
        assert_eq!(s[1].ebx, 0, "avx2 and avx512 go with avx");
    }

    #[test]
    fn presets_and_requirements() {
        let mut c = cpuid();
        CpuTemplate::parse("x86-64-v2, +x2apic")
            .unwrap()
            .apply(&mut c)
            .unwrap();
        assert_eq!(c.as_slice()[0].ecx, 1 << 21);
        let err = CpuTemplate::parse("sha").unwrap().apply(&mut cpuid());
        assert_eq!(err, Err(Error::Unavailable("sha".into())));
    }

    #[test]
    fn unknown_and_empty_items_are_errors() {
        assert!(matches!(
            CpuTemplate::parse("-avx9000"),
            Err(Error::UnknownFeature(n)) if n == "avx9000"
        ));
        assert_eq!(CpuTemplate::parse("avx,,"), Err(Error::Empty));
        assert!(Error::UnknownFeature("x".into())
            .to_string()
            .contains("avx2"));
    }
}
