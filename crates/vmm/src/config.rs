//! A VM's configuration and its validation against the host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use arch::regs::BootProtocol;
use arch::template::CpuTemplate;
use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use devices::virtio::block::EngineKind;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ConsoleConfig {
    /// The terminal: raw mode when stdin is a TTY, Ctrl-A x quits.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A Unix socket Vessel listens on; one client at a time reads and types.
    Socket(PathBuf),
    /// Discarded.
    #[default]
    Off,
}

/// The kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    Path(PathBuf),
    /// An in-memory image (the bundled guest), with a name for messages.
    Bytes(&'static str, &'static [u8]),
}

/// No kernel: a VM restored from a snapshot boots nothing.
impl Default for KernelSource {
    fn default() -> Self {
        KernelSource::Path(PathBuf::new())
    }
}

/// How a disk's writes reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CacheMode {
    /// Through the host page cache; guest flushes become fsync (the default).
    #[default]
    Writeback,
    /// Around the host page cache (`O_DIRECT`); guest flushes become fsync.
    None,
    /// Guest flushes are ignored: fastest, and data is lost if the host crashes.
    Unsafe,
}

impl CacheMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::Unsafe => "unsafe",
        }
    }
}

/// A disk given with `--disk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub cache: CacheMode,
    /// The device serial (up to 20 bytes) the guest reads with GET_ID.
    pub serial: Option<String>,
    /// Request queues.
    pub queues: u16,
    /// The I/O engine.
    pub engine: EngineKind,
    /// Bandwidth and operations per second (`bw=`, `iops=`, with their bursts).
    pub rate_limit: RateLimiterConfig,
}

/// A network device given with `--net`: a virtio-net device on a tap interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The tap interface (created if it does not exist).
    pub tap: String,
    /// The guest's MAC address (random, locally administered, if absent).
    pub mac: Option<devices::virtio::net::MacAddr>,
    /// Queue pairs (a multi-queue tap when more than one).
    pub queues: u16,
    /// What the guest may receive: frame bytes and packets per second, for the whole device.
    #[serde(default)]
    pub rx_limit: RateLimiterConfig,
    /// What the guest may transmit.
    #[serde(default)]
    pub tx_limit: RateLimiterConfig,
}

/// A virtio-vsock device given with `--vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// Host clients connect here; guest connections to port N go to `<socket>_N`.
    pub socket: PathBuf,
}

/// A virtio-balloon device given with `--balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// The initial target: bytes the guest is asked to give back.
    pub size: u64,
    /// The statistics queue.
    pub stats: bool,
    /// Free page reporting: the guest reports free pages, which are given back to the host.
    pub free_page_reporting: bool,
    /// The guest may deflate when it runs out of memory.
    pub deflate_on_oom: bool,
}

/// What a guest-initiated reset does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OnReboot {
    /// Vessel exits with the reset code (3), as Firecracker does.
    #[default]
    Exit,
    /// The VM restarts in the same process: devices reset, memory emptied, the kernel loaded
    /// again (disks, taps, console and API stay).
    Restart,
}

/// Parses `--on-reboot`.
pub fn parse_on_reboot(s: &str) -> Result<OnReboot, ConfigError> {
    match s {
        "exit" => Ok(OnReboot::Exit),
        "restart" => Ok(OnReboot::Restart),
        _ => Err(ConfigError::BadOnReboot(s.to_string())),
    }
}

/// Which virtio transport the VM's devices use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Transport {
    #[default]
    Mmio,
    Pci,
}

/// Everything needed to build a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
///
/// A snapshot records the machine part (vCPUs, memory, devices and their backends); what only
/// matters to booting (kernel, command line, template: the CPUID is saved per vCPU) or belongs
/// to the host process (console, API socket) is not saved and comes from the restoring command.
pub struct VmConfig {
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Back anonymous guest RAM with transparent huge pages (`MADV_HUGEPAGE`), the default.
    /// A migration target follows the source's choice.
    #[serde(default = "yes")]
    pub thp: bool,
    #[serde(skip)]
    pub kernel: KernelSource,
    #[serde(skip)]
    pub initrd: Option<PathBuf>,
    #[serde(skip)]
    pub cmdline: String,
    #[serde(skip)]
    pub console: ConsoleConfig,
    #[serde(skip)]
    pub cpu_template: CpuTemplate,
    /// Force a boot protocol (`None`: PVH if the ELF has the note, else Linux 64-bit).
    #[serde(skip)]
    pub boot_protocol: Option<BootProtocol>,
    pub disks: Vec<DiskConfig>,
    /// A virtio entropy device.
    pub rng: bool,
    /// Network devices on taps.
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// A virtio console (a second console, besides the serial port).
    pub virtio_console: Option<ConsoleConfig>,
    /// A virtio memory balloon.
    pub balloon: Option<BalloonConfig>,
    pub transport: Transport,
    /// Where the control API listens (`--api-socket`).
    #[serde(skip)]
    pub api_socket: Option<PathBuf>,
    /// What a guest reset does.
    #[serde(skip)]
    pub on_reboot: OnReboot,
    /// The disks come from a live migration's source, which flushed them and released their
    /// locks: lock them as usual, but never repair a dirty image (the source wrote it, with
    /// its own caches, and takes it back if the migration fails).
    #[serde(skip)]
    pub handed_over_disks: bool,
}

fn yes() -> bool {
    true
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
    #[error("invalid --on-reboot '{0}': expected exit or restart")]
    BadOnReboot(String),
    #[error("invalid --console '{0}': expected stdio, off, file:PATH or socket:PATH")]
    BadConsole(String),
    #[error("invalid --boot-protocol '{0}': expected auto, pvh or linux64")]
    BadProtocol(String),
    #[error("invalid --disk '{spec}': {why}")]
    BadDisk { spec: String, why: String },
    #[error("invalid --net '{spec}': {why}")]
    BadNet { spec: String, why: String },
    #[error("invalid --transport '{0}': expected mmio or pci")]
    BadTransport(String),
    #[error("too many virtio devices: {requested} (this VM's transport has room for {limit})")]
    TooManyDevices { requested: usize, limit: usize },
    #[error("invalid --vsock '{spec}': {why}")]
    BadVsock { spec: String, why: String },
    #[error("invalid --virtio-console '{0}': expected stdio, off, file:PATH or socket:PATH")]
    BadVirtioConsole(String),
    #[error("--virtio-console stdio needs the serial console off the terminal (--console off, file:PATH or socket:PATH)")]
    StdioTwice,
    #[error("invalid --balloon '{spec}': {why}")]
    BadBalloon { spec: String, why: String },
    #[error("--balloon size {size} is not below the guest memory of {memory}")]
    BalloonTooLarge { size: String, memory: String },
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses a rate or a burst: a number, with an optional binary unit (`spec::size`); a plain
/// number is taken as is (bytes or operations). Zero is refused.
fn parse_rate(v: &str) -> Option<u64> {
    let n = spec::size::parse(v, spec::size::Plain::Bytes).ok()?;
    (n > 0).then_some(n)
}

/// Parses a `--disk` value: `path=FILE[,readonly=on|off][,cache=writeback|none|unsafe]
/// [,serial=ID][,queues=N][,engine=auto|io_uring|threads|sync][,bw=BYTES/s][,iops=N]
/// [,bw_burst=BYTES][,iops_burst=N]`; a bare `FILE` is accepted as the path.
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
        engine: EngineKind::Auto,
        rate_limit: RateLimiterConfig::default(),
    };
    let (mut bw, mut iops, mut bw_burst, mut iops_burst) = (None, None, None, None);
    for (i, item) in spec.split(',').enumerate() {
        match item.split_once('=') {
            Some(("path", p)) if !p.is_empty() => disk.path = p.into(),
            Some(("readonly" | "ro", v)) => {
                disk.read_only = parse_bool(v).ok_or_else(|| bad("readonly takes on or off"))?
            }
            Some(("cache", "writeback")) => disk.cache = CacheMode::Writeback,
            Some(("cache", "none")) => disk.cache = CacheMode::None,
            Some(("cache", "unsafe")) => disk.cache = CacheMode::Unsafe,
            Some(("cache", _)) => return Err(bad("cache takes writeback, none or unsafe")),
            Some(("serial", v)) if v.len() <= 20 && v.is_ascii() => disk.serial = Some(v.into()),
            Some(("serial", _)) => return Err(bad("serial is at most 20 ASCII characters")),
            Some(("queues", v)) => {
                disk.queues = v
                    .parse()
                    .ok()
                    .filter(|q| (1..=64).contains(q))
                    .ok_or_else(|| bad("queues takes a number from 1 to 64"))?
            }
            Some(("engine", v)) => disk.engine = v.parse().map_err(|e: String| bad(&e))?,
            Some((key @ ("bw" | "iops" | "bw_burst" | "iops_burst"), v)) => {
                let n = parse_rate(v).ok_or_else(|| {
                    bad(&format!(
                        "{key} takes a number above 0, with an optional K, M or G suffix"
                    ))
                })?;
                *match key {
                    "bw" => &mut bw,
                    "iops" => &mut iops,
                    "bw_burst" => &mut bw_burst,
                    _ => &mut iops_burst,
                } = Some(n);
            }
            None if i == 0 && !item.is_empty() => disk.path = item.into(),
            _ => return Err(bad(&format!("unknown or empty option '{item}'"))),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(bad("path= is required"));
    }
    if bw_burst.is_some() && bw.is_none() {
        return Err(bad("bw_burst needs bw"));
    }
    if iops_burst.is_some() && iops.is_none() {
        return Err(bad("iops_burst needs iops"));
    }
    disk.rate_limit = RateLimiterConfig {
        bandwidth: bw.map(|r| TokenBucketConfig::per_second(r, bw_burst.unwrap_or(0))),
        ops: iops.map(|r| TokenBucketConfig::per_second(r, iops_burst.unwrap_or(0))),
    };
    Ok(disk)
}

/// Parses a `--vsock` value: `cid=N,socket=PATH`.
pub fn parse_vsock(spec: &str) -> Result<VsockConfig, ConfigError> {
    let bad = |why: &str| ConfigError::BadVsock {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let (mut cid, mut socket) = (None, None);
    for item in spec.split(',') {
        match item.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|c| (3..u64::from(u32::MAX)).contains(c))
                        .ok_or_else(|| bad("cid takes a number from 3 to 4294967294"))?,
                )
            }
            Some(("socket" | "uds_path" | "path", p)) if !p.is_empty() => {
                socket = Some(PathBuf::from(p))
            }
            _ => return Err(bad(&format!("unknown or empty option '{item}'"))),
        }
    }
    Ok(VsockConfig {
        cid: cid.ok_or_else(|| bad("cid= is required"))?,
        socket: socket.ok_or_else(|| bad("socket= is required"))?,
    })
}

/// Parses a `--virtio-console` value (the same forms as `--console`).
pub fn parse_virtio_console(s: &str) -> Result<ConsoleConfig, ConfigError> {
    parse_console(s).map_err(|_| ConfigError::BadVirtioConsole(s.to_string()))
}

/// Parses a `--balloon` value: `[size=SIZE][,stats=on][,free-page-reporting=on]
/// [,deflate-on-oom=on]` (empty: a balloon of size 0 with no options).
pub fn parse_balloon(spec: &str) -> Result<BalloonConfig, ConfigError> {
    let bad = |why: &str| ConfigError::BadBalloon {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let mut b = BalloonConfig::default();
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let flag = |v: &str, name: &str| {
            parse_bool(v).ok_or_else(|| bad(&format!("{name} takes on or off")))
        };
        match item.split_once('=') {
            Some(("size", v)) => {
                b.size = parse_size(v).map_err(|_| bad("size takes a size such as 512M"))?
            }
            Some(("stats", v)) => b.stats = flag(v, "stats")?,
            Some(("free-page-reporting" | "free_page_reporting", v)) => {
                b.free_page_reporting = flag(v, "free-page-reporting")?
            }
            Some(("deflate-on-oom" | "deflate_on_oom", v)) => {
                b.deflate_on_oom = flag(v, "deflate-on-oom")?
            }
            _ => return Err(bad(&format!("unknown option '{item}'"))),
        }
    }
    Ok(b)
}

/// The rate-limit options of `--net`: `{rx,tx}_{bw,pps}[_burst]`.
const RATE_OPTIONS: [&str; 8] = [
    "rx_bw",
    "rx_pps",
    "tx_bw",
    "tx_pps",
    "rx_bw_burst",
    "rx_pps_burst",
    "tx_bw_burst",
    "tx_pps_burst",
];

/// The limiters from the rate options given (indexed as [`RATE_OPTIONS`]).
fn rate_limiters(
    rates: &[Option<u64>; 8],
) -> Result<(RateLimiterConfig, RateLimiterConfig), String> {
    let bucket = |i: usize| -> Result<Option<TokenBucketConfig>, String> {
        match (rates[i], rates[i + 4]) {
            (Some(rate), burst) => Ok(Some(TokenBucketConfig::per_second(
                rate,
                burst.unwrap_or(0),
            ))),
            (None, Some(_)) => Err(format!("{} needs {}", RATE_OPTIONS[i + 4], RATE_OPTIONS[i])),
            (None, None) => Ok(None),
        }
    };
    Ok((
        RateLimiterConfig {
            bandwidth: bucket(0)?,
            ops: bucket(1)?,
        },
        RateLimiterConfig {
            bandwidth: bucket(2)?,
            ops: bucket(3)?,
        },
    ))
}

/// Parses a `--net` value: `tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,queues=N]` and rate limits
/// `[,tx_bw=BYTES][,tx_pps=N][,rx_bw=BYTES][,rx_pps=N]` per second, each with an optional
/// one-time `_burst` on top (`tx_bw_burst=BYTES`, ...).
pub fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let bad = |why: &str| ConfigError::BadNet {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let max = devices::virtio::net::MAX_QUEUE_PAIRS;
    let mut net = NetConfig {
        tap: String::new(),
        mac: None,
        queues: 1,
        rx_limit: RateLimiterConfig::default(),
        tx_limit: RateLimiterConfig::default(),
    };
    let mut rates = [None; 8];
    for item in spec.split(',') {
        if let Some((key, v)) = item.split_once('=') {
            if let Some(i) = RATE_OPTIONS.iter().position(|o| *o == key) {
                let what = if key.contains("bw") {
                    "bytes"
                } else {
                    "packets"
                };
                rates[i] = Some(parse_rate(v).ok_or_else(|| {
                    bad(&format!(
                        "{key} takes a number of {what} above zero, with an optional K, M or G suffix (powers of 1024)"
                    ))
                })?);
                continue;
            }
        }
        match item.split_once('=') {
            Some(("tap" | "ifname", name)) => {
                let ok = !name.is_empty()
                    && name.len() <= 15
                    && name != "."
                    && name != ".."
                    && !name
                        .chars()
                        .any(|c| c == '/' || c == ':' || c == '%' || c.is_whitespace());
                if !ok {
                    return Err(bad(
                        "tap takes an interface name of 1 to 15 characters without '/', ':', '%' or spaces",
                    ));
                }
                net.tap = name.to_string();
            }
            Some(("mac", v)) => {
                net.mac = Some(
                    devices::virtio::net::MacAddr::parse_unicast(v)
                        .map_err(|e| bad(&e.to_string()))?,
                )
            }
            Some(("queues", v)) => {
                net.queues = v
                    .parse()
                    .ok()
                    .filter(|q| (1..=max).contains(q))
                    .ok_or_else(|| bad(&format!("queues takes a number from 1 to {max}")))?
            }
            _ => return Err(bad(&format!("unknown or empty option '{item}'"))),
        }
    }
    if net.tap.is_empty() {
        return Err(bad("tap= is required"));
    }
    (net.rx_limit, net.tx_limit) = rate_limiters(&rates).map_err(|e| bad(&e))?;
    Ok(net)
}

/// Parses a `--transport` value.
pub fn parse_transport(s: &str) -> Result<Transport, ConfigError> {
    match s {
        "mmio" => Ok(Transport::Mmio),
        "pci" => Ok(Transport::Pci),
        _ => Err(ConfigError::BadTransport(s.to_string())),
    }
}

/// Parses a memory size: `512M`, `2G`, `1.5G`, `4GiB`; a plain number is MiB (as in QEMU).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    spec::size::parse(s, spec::size::Plain::MiB).map_err(|_| ConfigError::BadSize(s.to_string()))
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
        for (i, n) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|o| o.tap == n.tap) {
                return Err(ConfigError::BadNet {
                    spec: format!("tap={}", n.tap),
                    why: "the tap is used by another --net".into(),
                });
            }
        }
        let devices = self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.vsock.is_some())
            + usize::from(self.virtio_console.is_some())
            + usize::from(self.balloon.is_some());
        if self.virtio_console == Some(ConsoleConfig::Stdio) && self.console == ConsoleConfig::Stdio
        {
            return Err(ConfigError::StdioTwice);
        }
        if let Some(b) = &self.balloon {
            if b.size >= self.memory {
                return Err(ConfigError::BalloonTooLarge {
                    size: format_size(b.size),
                    memory: format_size(self.memory),
                });
            }
        }
        match self.transport {
            Transport::Mmio if devices > arch::layout::VIRTIO_MMIO_IRQS.len() => {
                return Err(ConfigError::TooManyDevices {
                    requested: devices,
                    limit: arch::layout::VIRTIO_MMIO_IRQS.len(),
                })
            }
            Transport::Pci if devices > arch::layout::PCI_MAX_DEVICES => {
                return Err(ConfigError::TooManyDevices {
                    requested: devices,
                    limit: arch::layout::PCI_MAX_DEVICES,
                })
            }
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
            thp: true,
            kernel: KernelSource::Path("k".into()),
            initrd: None,
            cmdline: String::new(),
            console: ConsoleConfig::Off,
            cpu_template: CpuTemplate::default(),
            boot_protocol: None,
            disks: Vec::new(),
            rng: false,
            nets: Vec::new(),
            vsock: None,
            virtio_console: None,
            balloon: None,
            transport: Transport::Mmio,
            api_socket: None,
            on_reboot: OnReboot::Exit,
            handed_over_disks: false,
        }
    }

    #[test]
    fn vsock_console_and_balloon() {
        assert_eq!(
            parse_vsock("cid=3,socket=/tmp/v.sock"),
            Ok(VsockConfig {
                cid: 3,
                socket: "/tmp/v.sock".into()
            })
        );
        for bad in [
            "",
            "cid=3",
            "socket=/a",
            "cid=2,socket=/a",
            "cid=x,socket=/a",
            "cid=3,socket=/a,x=1",
        ] {
            assert!(parse_vsock(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_virtio_console("off"), Ok(ConsoleConfig::Off));
        assert_eq!(
            parse_virtio_console("tcp:1"),
            Err(ConfigError::BadVirtioConsole("tcp:1".into()))
        );
        assert_eq!(parse_balloon(""), Ok(BalloonConfig::default()));
        assert_eq!(
            parse_balloon("size=64M,stats=on,free-page-reporting=on,deflate-on-oom=on"),
            Ok(BalloonConfig {
                size: 64 << 20,
                stats: true,
                free_page_reporting: true,
                deflate_on_oom: true
            })
        );
        for bad in ["size=", "stats=maybe", "colour=red"] {
            assert!(parse_balloon(bad).is_err(), "{bad}");
        }
        let mut c = cfg(1, 64 << 20);
        c.balloon = Some(parse_balloon("size=64M").unwrap());
        assert!(matches!(
            c.validate(8, None),
            Err(ConfigError::BalloonTooLarge { .. })
        ));
        c.balloon = Some(parse_balloon("size=32M").unwrap());
        c.console = ConsoleConfig::Stdio;
        c.virtio_console = Some(ConsoleConfig::Stdio);
        assert_eq!(c.validate(8, None), Err(ConfigError::StdioTwice));
        c.console = ConsoleConfig::Off;
        c.vsock = parse_vsock("cid=3,socket=/a").ok();
        assert_eq!(c.validate(8, None), Ok(()));
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=vtap0,mac=52:54:00:12:34:56,queues=4").unwrap();
        assert_eq!(n.tap, "vtap0");
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert_eq!(n.queues, 4);
        assert_eq!(parse_net("tap=t").unwrap().queues, 1);
        assert!(n.rx_limit.is_unlimited() && n.tx_limit.is_unlimited());
        for bad in [
            "",
            "vtap0",
            "mac=52:54:00:12:34:56",
            "tap=",
            "tap=a/b",
            "tap=sixteen-chars-xx",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,mac=52:54:00:12:34",
            "tap=t,queues=0",
            "tap=t,queues=17",
            "tap=t,colour=red",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        let e = parse_net("tap=t,mac=zz").unwrap_err().to_string();
        assert!(e.starts_with("invalid --net 'tap=t,mac=zz': "), "{e}");
        let mut c = cfg(1, 64 << 20);
        c.nets = vec![parse_net("tap=a").unwrap(), parse_net("tap=b").unwrap()];
        assert_eq!(c.validate(8, None), Ok(()));
        c.nets.push(parse_net("tap=a").unwrap());
        assert!(matches!(
            c.validate(8, None),
            Err(ConfigError::BadNet { .. })
        ));
        c.nets = vec![parse_net("tap=a").unwrap(); 1];
        c.disks = vec![parse_disk("/a").unwrap(); arch::layout::VIRTIO_MMIO_IRQS.len()];
        assert!(matches!(
            c.validate(8, None),
            Err(ConfigError::TooManyDevices { .. })
        ));
    }

    #[test]
    fn net_rate_limits() {
        let n =
            parse_net("tap=t,tx_bw=10M,tx_pps=1000,rx_bw=512k,rx_pps=2K,tx_bw_burst=1G").unwrap();
        let per_s = TokenBucketConfig::per_second;
        assert_eq!(
            n.tx_limit,
            RateLimiterConfig {
                bandwidth: Some(per_s(10 << 20, 1 << 30)),
                ops: Some(per_s(1000, 0)),
            }
        );
        assert_eq!(
            n.rx_limit,
            RateLimiterConfig {
                bandwidth: Some(per_s(512 << 10, 0)),
                ops: Some(per_s(2048, 0)),
            }
        );
        let n = parse_net("tap=t,rx_pps=10,rx_pps_burst=5").unwrap();
        assert_eq!(n.rx_limit.ops, Some(per_s(10, 5)));
        assert!(n.rx_limit.bandwidth.is_none() && n.tx_limit.is_unlimited());
        for (spec, want) in [
            ("tap=t,tx_bw=0", "tx_bw takes a number of bytes above zero"),
            (
                "tap=t,tx_pps=",
                "tx_pps takes a number of packets above zero",
            ),
            ("tap=t,rx_bw=1Q", "rx_bw takes a number of bytes"),
            ("tap=t,rx_bw=-5", "rx_bw takes"),
            ("tap=t,rx_bw=1.5", "rx_bw takes"),
            ("tap=t,rx_pps=99999999999999999999", "rx_pps takes"),
            ("tap=t,tx_bw=17179869184G", "tx_bw takes"),
            ("tap=t,tx_bw_burst=1M", "tx_bw_burst needs tx_bw"),
            ("tap=t,rx_pps=5,tx_pps_burst=1", "tx_pps_burst needs tx_pps"),
            ("tap=t,tx_rate=5", "unknown or empty option 'tx_rate=5'"),
        ] {
            let e = parse_net(spec).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid --net '{spec}': ")) && e.contains(want),
                "{spec}: {e}"
            );
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
            "path=/a,engine=aio",
            "path=/a,bw=0",
            "path=/a,iops=-5",
            "path=/a,iops=many",
            "path=/a,bw=10X",
            "path=/a,bw_burst=1M",
            "path=/a,iops_burst=10",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        let e = parse_disk("path=/a,engine=aio").unwrap_err().to_string();
        assert!(
            e.contains("expected auto, io_uring, threads or sync"),
            "{e}"
        );
        let d =
            parse_disk("path=/a,cache=none,engine=io_uring,bw=10M,iops=200,bw_burst=1G").unwrap();
        assert_eq!(d.cache, CacheMode::None);
        assert_eq!(d.engine, EngineKind::IoUring);
        assert_eq!(
            d.rate_limit,
            RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig::per_second(10 << 20, 1 << 30)),
                ops: Some(TokenBucketConfig::per_second(200, 0)),
            }
        );
        let d = parse_disk("/a,engine=threads,iops=1K,iops_burst=50,bw=4096").unwrap();
        assert_eq!(d.engine, EngineKind::Threads);
        assert_eq!(
            d.rate_limit.ops,
            Some(TokenBucketConfig::per_second(1024, 50))
        );
        assert_eq!(
            d.rate_limit.bandwidth,
            Some(TokenBucketConfig::per_second(4096, 0))
        );
        let plain = parse_disk("/a").unwrap();
        assert_eq!(plain.engine, EngineKind::Auto);
        assert!(plain.rate_limit.is_unlimited());
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
        // PCI has room for 31.
        c.transport = Transport::Pci;
        assert_eq!(c.validate(8, None), Ok(()));
        c.disks = vec![parse_disk("/a").unwrap(); 32];
        assert_eq!(
            c.validate(8, None),
            Err(ConfigError::TooManyDevices {
                requested: 32,
                limit: 31
            })
        );
        c.transport = Transport::Mmio;
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
