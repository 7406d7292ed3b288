//! Pinning vCPU threads to host CPUs (`--cpu-affinity`).
//!
//! A process-wide setting like the seccomp mode: it belongs to where the VM runs, not to what
//! the VM is, so a restored or migrated VM takes its target's.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// Errors of an affinity specification.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid --cpu-affinity '{spec}': {reason}")]
    Invalid { spec: String, reason: String },
    #[error("--cpu-affinity names vCPU {vcpu}, but the VM has {cpus}")]
    NoSuchVcpu { vcpu: u32, cpus: u32 },
}

/// Host CPUs for all vCPUs, and for some vCPUs in particular.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Affinity {
    pub all: Option<Vec<usize>>,
    pub per_vcpu: BTreeMap<u32, Vec<usize>>,
}

static AFFINITY: OnceLock<Affinity> = OnceLock::new();

/// Parses a CPU list: `2`, `0-3`, `0,2,4-5`.
fn cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = match (lo.parse(), hi.parse()) {
            (Ok(l), Ok(h)) if l <= h && h < libc::CPU_SETSIZE as usize => (l, h),
            _ => return Err(format!("'{part}' is not a CPU or a range of CPUs")),
        };
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The CPUs this process may run on.
fn allowed() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

impl Affinity {
    /// Parses the `--cpu-affinity` values: `LIST` (every vCPU) or `VCPU=LIST` (one vCPU),
    /// checking each CPU is one this process may use.
    pub fn parse(specs: &[String]) -> Result<Affinity, Error> {
        let allowed = allowed();
        let mut a = Affinity::default();
        for spec in specs {
            let invalid = |reason: String| Error::Invalid {
                spec: spec.clone(),
                reason,
            };
            let (vcpu, list) = match spec.split_once('=') {
                Some((v, l)) => (
                    Some(
                        v.parse::<u32>()
                            .map_err(|_| invalid(format!("'{v}' is not a vCPU number")))?,
                    ),
                    l,
                ),
                None => (None, spec.as_str()),
            };
            let cpus = cpu_list(list).map_err(invalid)?;
            if let Some(c) = cpus
                .iter()
                .find(|c| !allowed.is_empty() && !allowed.contains(c))
            {
                return Err(invalid(format!(
                    "host CPU {c} is not one this process may use ({})",
                    allowed
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )));
            }
            match vcpu {
                Some(v) => {
                    a.per_vcpu.insert(v, cpus);
                }
                None => a.all = Some(cpus),
            }
        }
        Ok(a)
    }

    /// Checks the vCPUs named exist in a VM of `cpus`.
    pub fn check(&self, cpus: u32) -> Result<(), Error> {
        match self.per_vcpu.keys().find(|v| **v >= cpus) {
            Some(&vcpu) => Err(Error::NoSuchVcpu { vcpu, cpus }),
            None => Ok(()),
        }
    }

    /// Makes this the process's setting (once).
    pub fn install(self) {
        let _ = AFFINITY.set(self);
    }

    fn for_vcpu(&self, index: u32) -> Option<&[usize]> {
        self.per_vcpu
            .get(&index)
            .or(self.all.as_ref())
            .map(|v| &v[..])
    }
}

/// Pins the calling thread, vCPU `index`'s, as the process's setting says (nothing if unset).
pub fn pin_vcpu(index: u32) -> std::io::Result<()> {
    let Some(cpus) = AFFINITY.get().and_then(|a| a.for_vcpu(index)) else {
        return Ok(());
    };
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays inside it (cpus < CPU_SETSIZE,
    // checked by the parser); sched_setaffinity reads the set, for this thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(*c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_per_vcpu_entries_parse() {
        assert_eq!(cpu_list("0").unwrap(), [0]);
        assert_eq!(cpu_list("0-2,1,5").unwrap(), [0, 1, 2, 5]);
        for bad in ["", "a", "3-1", "1,,2", "-1", "99999"] {
            assert!(cpu_list(bad).is_err(), "{bad}");
        }
        let a = Affinity::parse(&["0".into(), "1=0".into()]).unwrap();
        assert_eq!(a.all, Some(vec![0]));
        assert_eq!(a.for_vcpu(1), Some(&[0][..]));
        assert_eq!(a.for_vcpu(7), Some(&[0][..]));
        assert!(a.check(2).is_ok());
        assert!(matches!(
            a.check(1),
            Err(Error::NoSuchVcpu { vcpu: 1, cpus: 1 })
        ));
        assert!(Affinity::parse(&["x=0".into()]).is_err());
        // A CPU the process may not use is refused up front.
        let outside = allowed().last().copied().unwrap_or(0) + 1;
        assert!(Affinity::parse(&[outside.to_string()]).is_err());
    }
}
