//! A VM's configuration: its spec (what it is, [`spec::vm::VmSpec`]) and this host's bindings
//! ([`spec::bindings::HostBindings`]), and their validation against the host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use spec::bindings::{Console as ConsoleConfig, HostBindings, NetBinding};
pub use spec::cli::ArgError;
pub use spec::size::format as format_size;
pub use spec::vm::{
    Balloon, BootProtocol, CacheMode, Disk, EngineKind, Nic, OnReboot, SpecError, Transport,
    VmSpec, Vsock,
};

/// The kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    Path(PathBuf),
    /// An in-memory image (the bundled guest), with a name for messages.
    Bytes(&'static str, &'static [u8]),
}

/// Everything needed to build a VM: what it is and this host's side of it.
///
/// A snapshot records both but the console and the API socket, which belong to the process
/// that restores it; a migration carries the spec and leaves every binding to the target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    pub spec: VmSpec,
    pub bindings: HostBindings,
    /// The bundled guest, when the spec names no kernel.
    #[serde(skip)]
    pub bundled_kernel: Option<(&'static str, &'static [u8])>,
    /// The disks come from a live migration's source, which flushed them and released their
    /// locks: lock them as usual, but never repair a dirty image (the source wrote it, with
    /// its own caches, and takes it back if the migration fails).
    #[serde(skip)]
    pub handed_over_disks: bool,
}

impl VmConfig {
    /// A VM of `spec` on `bindings`.
    pub fn new(spec: VmSpec, bindings: HostBindings) -> VmConfig {
        VmConfig {
            spec,
            bindings,
            bundled_kernel: None,
            handed_over_disks: false,
        }
    }

    /// The kernel to load: the spec's file, else the bundled guest.
    pub fn kernel(&self) -> Option<KernelSource> {
        match (&self.spec.boot.kernel, self.bundled_kernel) {
            (Some(p), _) => Some(KernelSource::Path(p.clone())),
            (None, Some((name, bytes))) => Some(KernelSource::Bytes(name, bytes)),
            (None, None) => None,
        }
    }
}

/// Configuration errors: each says what is wrong and what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("--cpus {requested} is over the limit of {limit} vCPUs on this host")]
    TooManyCpus { requested: u32, limit: u32 },
    #[error("--memory {0} is too small: a VM needs at least {min} MiB", min = arch::layout::MIN_MEMORY >> 20)]
    MemoryTooSmall(String),
    #[error("--memory {requested} is larger than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { requested: String, host_mib: u64 },
    #[error("too many virtio devices: {requested} (this VM's transport has room for {limit})")]
    TooManyDevices { requested: usize, limit: usize },
    #[error("no kernel to boot: the spec names none (boot.kernel)")]
    NoKernel,
}

/// The host's total RAM in bytes, from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// Checks the spec, its bindings, and what this host can run: `max_vcpus` is KVM's limit.
    pub fn validate(&self, max_vcpus: u32, host_memory: Option<u64>) -> Result<(), ConfigError> {
        self.validate_machine(max_vcpus, host_memory)?;
        Ok(self.bindings.check(&self.spec)?)
    }

    /// Checks the spec and what this host can run, not the bindings (a migration target
    /// builds the machine before it binds it).
    pub fn validate_machine(
        &self,
        max_vcpus: u32,
        host_memory: Option<u64>,
    ) -> Result<(), ConfigError> {
        let spec = &self.spec;
        spec.validate()?;
        let limit = max_vcpus.min(arch::MAX_VCPUS);
        if spec.cpus > limit {
            return Err(ConfigError::TooManyCpus {
                requested: spec.cpus,
                limit,
            });
        }
        if spec.memory < arch::layout::MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(format_size(spec.memory)));
        }
        let devices = spec.virtio_devices();
        let limit = match spec.transport {
            Transport::Mmio => arch::layout::VIRTIO_MMIO_IRQS.len(),
            Transport::Pci => arch::layout::PCI_MAX_DEVICES,
        };
        if devices > limit {
            return Err(ConfigError::TooManyDevices {
                requested: devices,
                limit,
            });
        }
        if let Some(host) = host_memory {
            if spec.memory > host {
                return Err(ConfigError::MemoryTooLarge {
                    requested: format_size(spec.memory),
                    host_mib: host >> 20,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spec::cli;

    fn cfg(cpus: u32, memory: u64) -> VmConfig {
        VmConfig::new(
            VmSpec {
                cpus,
                memory,
                ..VmSpec::default()
            },
            HostBindings::default(),
        )
    }

    fn add_disks(c: &mut VmConfig, n: usize) {
        for _ in 0..n {
            c.spec.disks.push(Disk::default());
            c.bindings.disks.push("/a".into());
        }
    }

    #[test]
    fn device_limits() {
        let mut c = cfg(1, 64 << 20);
        add_disks(&mut c, 10);
        assert!(matches!(
            c.validate(8, None),
            Err(ConfigError::TooManyDevices { .. })
        ));
        // PCI has room for 31.
        c.spec.transport = Transport::Pci;
        assert_eq!(c.validate(8, None), Ok(()));
        add_disks(&mut c, 22);
        assert_eq!(
            c.validate(8, None),
            Err(ConfigError::TooManyDevices {
                requested: 32,
                limit: 31
            })
        );
        c.spec.transport = Transport::Mmio;
        c.spec.disks.truncate(1);
        c.bindings.disks.truncate(1);
        assert_eq!(c.validate(8, None), Ok(()));
    }

    #[test]
    fn the_spec_and_its_bindings_are_checked_too() {
        let mut c = cfg(1, 64 << 20);
        let (nic, tap) = cli::net("tap=a").unwrap();
        c.spec.nets = vec![nic.clone(), nic];
        c.bindings.nets = vec![tap.clone(), NetBinding::Tap("b".into())];
        assert_eq!(c.validate(8, None), Ok(()));
        c.bindings.nets[1] = tap;
        assert!(
            matches!(c.validate(8, None), Err(ConfigError::Spec(e)) if e.field == "bindings.nets[1].tap")
        );
        let mut c = cfg(1, 64 << 20);
        c.spec.balloon = Some(cli::balloon("size=64M").unwrap());
        assert!(
            matches!(c.validate(8, None), Err(ConfigError::Spec(e)) if e.field == "balloon.size")
        );
    }

    #[test]
    fn validation() {
        let e = cfg(0, 64 << 20).validate(8, None).unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
        assert_eq!(
            cfg(9, 64 << 20).validate(8, None),
            Err(ConfigError::TooManyCpus {
                requested: 9,
                limit: 8
            })
        );
        assert_eq!(
            cfg(255, 64 << 20).validate(1024, None),
            Err(ConfigError::TooManyCpus {
                requested: 255,
                limit: 254
            })
        );
        assert!(matches!(
            cfg(1, 1 << 20).validate(8, None),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            cfg(1, 8 << 30).validate(8, Some(4 << 30)),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        assert_eq!(cfg(2, 128 << 20).validate(8, Some(4 << 30)), Ok(()));
    }
}
