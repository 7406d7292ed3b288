//! A VM's configuration and its validation against the host.

use std::path::PathBuf;

use arch::regs::BootProtocol;
use arch::template::CpuTemplate;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The terminal: raw mode when stdin is a TTY, Ctrl-A x quits.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A Unix socket Vessel listens on; one client at a time reads and types.
    Socket(PathBuf),
    /// Discarded.
    Off,
}

/// The kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    Path(PathBuf),
    /// An in-memory image (the bundled guest), with a name for messages.
    Bytes(&'static str, &'static [u8]),
}

/// How a disk's writes reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the host page cache; guest flushes become fsync (the default).
    #[default]
    Writeback,
    /// Guest flushes are ignored: fastest, and data is lost if the host crashes.
    Unsafe,
}

/// A disk given with `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub cache: CacheMode,
    /// The device serial (up to 20 bytes) the guest reads with GET_ID.
    pub serial: Option<String>,
    /// Request queues.
    pub queues: u16,
}

/// Which virtio transport the VM's devices use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    #[default]
    Mmio,
    Pci,
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub console: ConsoleConfig,
    pub cpu_template: CpuTemplate,
    /// Force a boot protocol (`None`: PVH if the ELF has the note, else Linux 64-bit).
    pub boot_protocol: Option<BootProtocol>,
    pub disks: Vec<DiskConfig>,
    /// A virtio entropy device.
    pub rng: bool,
    pub transport: Transport,
}

/// Configuration errors: each says what is wrong and what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix (plain numbers are MiB)")]
    BadSize(String),
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {requested} is over the limit of {limit} vCPUs on this host")]
    TooManyCpus { requested: u32, limit: u32 },
    #[error("--memory {0} is too small: a VM needs at least {min} MiB", min = arch::layout::MIN_MEMORY >> 20)]
    MemoryTooSmall(String),
    #[error("--memory {requested} is larger than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { requested: String, host_mib: u64 },
    #[error("invalid --console '{0}': expected stdio, off, file:PATH or socket:PATH")]
    BadConsole(String),
    #[error("invalid --boot-protocol '{0}': expected auto, pvh or linux64")]
    BadProtocol(String),
    #[error("invalid --disk '{spec}': {why}")]
    BadDisk { spec: String, why: String },
    #[error("invalid --transport '{0}': expected mmio or pci")]
    BadTransport(String),
    #[error("too many virtio devices: {requested} (this VM's transport has room for {limit})")]
    TooManyDevices { requested: usize, limit: usize },
    #[error("the virtio-pci transport is not available yet; use --transport mmio")]
    PciUnavailable,
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses a `--disk` value: `path=FILE[,readonly=on|off][,cache=writeback|unsafe]
/// [,serial=ID][,queues=N]`; a bare `FILE` is accepted as the path.
pub fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let bad = |why: &str| ConfigError::BadDisk {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        cache: CacheMode::default(),
        serial: None,
        queues: 1,
    };
    for (i, item) in spec.split(',').enumerate() {
        match item.split_once('=') {
            Some(("path", p)) if !p.is_empty() => disk.path = p.into(),
            Some(("readonly" | "ro", v)) => {
                disk.read_only = parse_bool(v).ok_or_else(|| bad("readonly takes on or off"))?
            }
            Some(("cache", "writeback")) => disk.cache = CacheMode::Writeback,
            Some(("cache", "unsafe")) => disk.cache = CacheMode::Unsafe,
            Some(("cache", _)) => return Err(bad("cache takes writeback or unsafe")),
            Some(("serial", v)) if v.len() <= 20 && v.is_ascii() => disk.serial = Some(v.into()),
            Some(("serial", _)) => return Err(bad("serial is at most 20 ASCII characters")),
            Some(("queues", v)) => {
                disk.queues = v
                    .parse()
                    .ok()
                    .filter(|q| (1..=64).contains(q))
                    .ok_or_else(|| bad("queues takes a number from 1 to 64"))?
            }
            None if i == 0 && !item.is_empty() => disk.path = item.into(),
            _ => return Err(bad(&format!("unknown or empty option '{item}'"))),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(bad("path= is required"));
    }
    Ok(disk)
}

/// Parses a `--transport` value.
pub fn parse_transport(s: &str) -> Result<Transport, ConfigError> {
    match s {
        "mmio" => Ok(Transport::Mmio),
        "pci" => Ok(Transport::Pci),
        _ => Err(ConfigError::BadTransport(s.to_string())),
    }
}

/// Parses a memory size: `512M`, `2G`, `1048576K`, `4GiB`; a plain number is MiB (as in QEMU).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 20),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Formats a byte count the way users typed it, for messages.
pub fn format_size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Parses a `--console` value.
pub fn parse_console(s: &str) -> Result<ConsoleConfig, ConfigError> {
    match s {
        "stdio" => Ok(ConsoleConfig::Stdio),
        "off" | "none" => Ok(ConsoleConfig::Off),
        _ => match s.split_once(':') {
            Some(("file", p)) if !p.is_empty() => Ok(ConsoleConfig::File(p.into())),
            Some(("socket", p)) if !p.is_empty() => Ok(ConsoleConfig::Socket(p.into())),
            _ => Err(ConfigError::BadConsole(s.to_string())),
        },
    }
}

/// Parses a `--boot-protocol` value.
pub fn parse_protocol(s: &str) -> Result<Option<BootProtocol>, ConfigError> {
    match s {
        "auto" => Ok(None),
        "pvh" => Ok(Some(BootProtocol::Pvh)),
        "linux64" | "linux" => Ok(Some(BootProtocol::Linux64)),
        _ => Err(ConfigError::BadProtocol(s.to_string())),
    }
}

/// The host's total RAM in bytes, from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// Checks the configuration against what this host can run: `max_vcpus` is KVM's limit.
    pub fn validate(&self, max_vcpus: u32, host_memory: Option<u64>) -> Result<(), ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        let limit = max_vcpus.min(arch::MAX_VCPUS);
        if self.cpus > limit {
            return Err(ConfigError::TooManyCpus {
                requested: self.cpus,
                limit,
            });
        }
        if self.memory < arch::layout::MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(format_size(self.memory)));
        }
        let devices = self.disks.len() + usize::from(self.rng);
        match self.transport {
            Transport::Mmio if devices > arch::layout::VIRTIO_MMIO_IRQS.len() => {
                return Err(ConfigError::TooManyDevices {
                    requested: devices,
                    limit: arch::layout::VIRTIO_MMIO_IRQS.len(),
                })
            }
            Transport::Pci if devices > 0 => return Err(ConfigError::PciUnavailable),
            _ => {}
        }
        if let Some(host) = host_memory {
            if self.memory > host {
                return Err(ConfigError::MemoryTooLarge {
                    requested: format_size(self.memory),
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

    fn cfg(cpus: u32, memory: u64) -> VmConfig {
        VmConfig {
            cpus,
            memory,
            kernel: KernelSource::Path("k".into()),
            initrd: None,
            cmdline: String::new(),
            console: ConsoleConfig::Off,
            cpu_template: CpuTemplate::default(),
            boot_protocol: None,
            disks: Vec::new(),
            rng: false,
            transport: Transport::Mmio,
        }
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/d.img,readonly=on,cache=unsafe,serial=abc,queues=4").unwrap();
        assert_eq!(d.path, PathBuf::from("/d.img"));
        assert!(d.read_only);
        assert_eq!(d.cache, CacheMode::Unsafe);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.queues, 4);
        assert_eq!(
            parse_disk("/x.qcow2").unwrap().path,
            PathBuf::from("/x.qcow2")
        );
        for bad in [
            "",
            "readonly=on",
            "path=/a,readonly=maybe",
            "path=/a,cache=none2",
            "path=/a,queues=0",
            "path=/a,serial=012345678901234567890",
            "path=/a,colour=red",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_transport("pci"), Ok(Transport::Pci));
        assert!(parse_transport("isa").is_err());
    }

    #[test]
    fn device_limits() {
        let mut c = cfg(1, 64 << 20);
        c.disks = vec![parse_disk("/a").unwrap(); 10];
        assert!(matches!(
            c.validate(8, None),
            Err(ConfigError::TooManyDevices { .. })
        ));
        c.disks.truncate(1);
        assert_eq!(c.validate(8, None), Ok(()));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(100 << 20), "100M");
    }

    #[test]
    fn consoles_and_protocols() {
        assert_eq!(parse_console("stdio"), Ok(ConsoleConfig::Stdio));
        assert_eq!(
            parse_console("file:/tmp/x"),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert!(parse_console("file:").is_err());
        assert!(parse_console("tcp:1").is_err());
        assert_eq!(parse_protocol("pvh"), Ok(Some(BootProtocol::Pvh)));
        assert!(parse_protocol("bios").is_err());
    }

    #[test]
    fn validation() {
        assert_eq!(cfg(0, 64 << 20).validate(8, None), Err(ConfigError::NoCpus));
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
