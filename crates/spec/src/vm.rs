//! [`VmSpec`]: what a VM is (its vCPUs, memory, boot source and devices), with no host
//! binding in it: disk files, taps, sockets and consoles are [`crate::bindings`].
//!
//! It is the one description of a VM: `vessel run`'s flags build one, `vessel run --config`
//! reads one, the per-VM API boots one, and snapshots and migrations carry one. As JSON it is
//! versioned (`"version": 1`), refuses unknown fields, and fills what it leaves out with the
//! same defaults as the command line. [`VmSpec::validate`] checks it without the host, naming
//! the field at fault (`disks[1].queues: ...`); what depends on the host (KVM's vCPU limit,
//! the host's RAM, the transport's room for devices) is the VMM's to check.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;
use crate::rate::RateLimiterConfig;

/// The spec format this Vessel reads and writes.
pub const VERSION: u32 = 1;

/// The command line given to a kernel when the spec names none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=1";

/// The most request queues a disk may have.
pub const MAX_DISK_QUEUES: u16 = 64;

/// The most queue pairs a network device may have.
pub const MAX_NET_QUEUE_PAIRS: u16 = 16;

/// The longest disk serial (virtio-blk's GET_ID).
pub const MAX_SERIAL: usize = 20;

/// A spec that cannot be a VM: the field at fault (`disks[1].queues`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct SpecError {
    pub field: String,
    pub why: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            why: why.into(),
        }
    }
}

/// A VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The spec format ([`VERSION`]).
    #[serde(default = "version")]
    pub version: u32,
    /// vCPUs.
    #[serde(default = "one")]
    pub cpus: u32,
    /// Guest RAM in bytes (also a string with a unit, such as `"512M"`).
    #[serde(default = "default_memory", with = "crate::size::json")]
    pub memory: u64,
    /// Back guest RAM with transparent huge pages (`MADV_HUGEPAGE`).
    #[serde(default = "yes")]
    pub thp: bool,
    /// CPU features to hide or require (`x86-64-v2`, `-avx512f,+aes`); empty: the host's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cpu_template: String,
    #[serde(default)]
    pub boot: Boot,
    /// The virtio devices' transport.
    #[serde(default)]
    pub transport: Transport,
    /// What a guest-initiated reset does.
    #[serde(default)]
    pub on_reboot: OnReboot,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<Nic>,
    /// A virtio entropy device.
    #[serde(default)]
    pub rng: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// A virtio console (besides the serial port); where it goes is a host binding.
    #[serde(default)]
    pub virtio_console: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
}

fn version() -> u32 {
    VERSION
}
fn one() -> u32 {
    1
}
fn one16() -> u16 {
    1
}
fn yes() -> bool {
    true
}
fn default_memory() -> u64 {
    256 << 20
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

impl Default for VmSpec {
    /// The command line's defaults: 1 vCPU, 256 MiB, the bundled guest, no devices.
    fn default() -> Self {
        VmSpec {
            version: VERSION,
            cpus: 1,
            memory: default_memory(),
            thp: true,
            cpu_template: String::new(),
            boot: Boot::default(),
            transport: Transport::default(),
            on_reboot: OnReboot::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            vsock: None,
            virtio_console: false,
            balloon: None,
        }
    }
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// A bzImage or ELF vmlinux; none: the guest bundled with Vessel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default)]
    pub protocol: BootProtocol,
}

impl Default for Boot {
    fn default() -> Self {
        Boot {
            kernel: None,
            initrd: None,
            cmdline: default_cmdline(),
            protocol: BootProtocol::Auto,
        }
    }
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootProtocol {
    /// PVH when the ELF kernel has the note, else Linux's 64-bit boot protocol.
    #[default]
    Auto,
    Pvh,
    Linux64,
}

/// Which virtio transport the VM's devices use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Mmio,
    Pci,
}

/// What a guest-initiated reset does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnReboot {
    /// Vessel exits with the reset code (3), as Firecracker does.
    #[default]
    Exit,
    /// The VM restarts in the same process: devices reset, memory emptied, the kernel loaded
    /// again (disks, taps, console and API stay).
    Restart,
}

/// How a disk's writes reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
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

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            "unsafe" => Ok(CacheMode::Unsafe),
            _ => Err("cache takes writeback, none or unsafe".into()),
        }
    }
}

/// Which engine serves a disk's I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// io_uring for raw files when the kernel allows it, else threads.
    #[default]
    Auto,
    IoUring,
    Threads,
    Sync,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Auto => "auto",
            EngineKind::IoUring => "io_uring",
            EngineKind::Threads => "threads",
            EngineKind::Sync => "sync",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(EngineKind::IoUring),
            "threads" => Ok(EngineKind::Threads),
            "sync" => Ok(EngineKind::Sync),
            _ => Err(format!(
                "unknown engine '{s}': expected auto, io_uring, threads or sync"
            )),
        }
    }
}

/// A virtio disk; its file is a host binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub cache: CacheMode,
    /// The device serial the guest reads with GET_ID (up to 20 ASCII characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Request queues.
    #[serde(default = "one16")]
    pub queues: u16,
    #[serde(default)]
    pub engine: EngineKind,
    /// Bandwidth and operations per second.
    #[serde(default)]
    pub rate_limit: RateLimiterConfig,
}

/// What `{}` is: read-write, writeback, one queue, the automatic engine, no limit.
impl Default for Disk {
    fn default() -> Disk {
        Disk {
            read_only: false,
            cache: CacheMode::default(),
            serial: None,
            queues: 1,
            engine: EngineKind::default(),
            rate_limit: RateLimiterConfig::default(),
        }
    }
}

/// A virtio network device; its tap is a host binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// The guest's MAC address (a random locally administered one if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "52:54:00:12:34:56")]
    pub mac: Option<MacAddr>,
    /// Queue pairs (a multi-queue tap when more than one).
    #[serde(default = "one16")]
    pub queues: u16,
    /// What the guest may receive: bytes and packets per second, for the whole device.
    #[serde(default)]
    pub rx_limit: RateLimiterConfig,
    /// What the guest may transmit.
    #[serde(default)]
    pub tx_limit: RateLimiterConfig,
}

/// What `{}` is: one queue pair, a random MAC, no limits.
impl Default for Nic {
    fn default() -> Nic {
        Nic {
            mac: None,
            queues: 1,
            rx_limit: RateLimiterConfig::default(),
            tx_limit: RateLimiterConfig::default(),
        }
    }
}

/// A virtio-vsock device; its host socket is a host binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 to 4294967294).
    pub cid: u64,
}

/// A virtio memory balloon.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// The initial target: bytes the guest is asked to give back.
    #[serde(default, with = "crate::size::json")]
    pub size: u64,
    /// The statistics queue.
    #[serde(default)]
    pub stats: bool,
    /// Free page reporting: the guest reports free pages, which go back to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// The guest may deflate when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
}

/// Checks a disk serial.
pub fn check_serial(s: &str) -> Result<(), String> {
    if s.len() <= MAX_SERIAL && s.is_ascii() {
        Ok(())
    } else {
        Err(format!("serial is at most {MAX_SERIAL} ASCII characters"))
    }
}

/// Checks a count of queues against `1..=max`.
pub fn check_queues(n: u16, max: u16) -> Result<(), String> {
    if (1..=max).contains(&n) {
        Ok(())
    } else {
        Err(format!("queues takes a number from 1 to {max}"))
    }
}

/// Checks a vsock context id.
pub fn check_cid(cid: u64) -> Result<(), String> {
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(())
    } else {
        Err("cid takes a number from 3 to 4294967294".into())
    }
}

/// Checks a rate limit: a bucket refills something, and bursts need a rate.
fn check_rate(r: &RateLimiterConfig) -> Result<(), String> {
    for b in [r.bandwidth, r.ops].into_iter().flatten() {
        if b.size == 0 || b.refill_time_ms == 0 {
            return Err("a bucket needs a size and a refill time above zero".into());
        }
    }
    Ok(())
}

impl VmSpec {
    /// Checks what can be checked without the host; the error names the field at fault.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != VERSION {
            return Err(SpecError::new(
                "version",
                format!(
                    "{} is not a spec version this Vessel reads ({VERSION})",
                    self.version
                ),
            ));
        }
        if self.cpus == 0 {
            return Err(SpecError::new("cpus", "must be at least 1"));
        }
        if self.memory == 0 || !self.memory.is_multiple_of(4096) {
            return Err(SpecError::new(
                "memory",
                "must be a whole number of 4 KiB pages",
            ));
        }
        if self.boot.cmdline.contains('\0') {
            return Err(SpecError::new("boot.cmdline", "must not contain NUL"));
        }
        for (i, d) in self.disks.iter().enumerate() {
            let field = |f: &str| format!("disks[{i}].{f}");
            if let Some(s) = &d.serial {
                check_serial(s).map_err(|why| SpecError::new(field("serial"), why))?;
            }
            check_queues(d.queues, MAX_DISK_QUEUES)
                .map_err(|why| SpecError::new(field("queues"), why))?;
            check_rate(&d.rate_limit).map_err(|why| SpecError::new(field("rate_limit"), why))?;
        }
        for (i, n) in self.nets.iter().enumerate() {
            let field = |f: &str| format!("nets[{i}].{f}");
            check_queues(n.queues, MAX_NET_QUEUE_PAIRS)
                .map_err(|why| SpecError::new(field("queues"), why))?;
            check_rate(&n.rx_limit).map_err(|why| SpecError::new(field("rx_limit"), why))?;
            check_rate(&n.tx_limit).map_err(|why| SpecError::new(field("tx_limit"), why))?;
        }
        if let Some(v) = &self.vsock {
            check_cid(v.cid).map_err(|why| SpecError::new("vsock.cid", why))?;
        }
        if let Some(b) = &self.balloon {
            if b.size >= self.memory {
                return Err(SpecError::new(
                    "balloon.size",
                    format!(
                        "{} is not below the guest memory of {}",
                        crate::size::format(b.size),
                        crate::size::format(self.memory)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The number of virtio devices.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.vsock.is_some())
            + usize::from(self.virtio_console)
            + usize::from(self.balloon.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_default_as_an_empty_object_reads() {
        assert_eq!(serde_json::from_str::<Disk>("{}").unwrap(), Disk::default());
        assert_eq!(serde_json::from_str::<Nic>("{}").unwrap(), Nic::default());
    }

    #[test]
    fn an_empty_object_is_the_command_lines_default() {
        let s: VmSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(s, VmSpec::default());
        assert_eq!(s.boot.cmdline, DEFAULT_CMDLINE);
        s.validate().unwrap();
    }

    #[test]
    fn round_trips_and_reads_sizes_with_units() {
        let s: VmSpec = serde_json::from_str(
            r#"{"version":1,"cpus":2,"memory":"1G","boot":{"kernel":"/k","protocol":"pvh"},
                "transport":"pci","disks":[{"read_only":true,"cache":"unsafe","engine":"io_uring"}],
                "nets":[{"mac":"52:54:00:12:34:56","queues":2}],"vsock":{"cid":3},
                "balloon":{"size":"64M","stats":true},"virtio_console":true}"#,
        )
        .unwrap();
        assert_eq!(s.memory, 1 << 30);
        assert_eq!(s.balloon.as_ref().unwrap().size, 64 << 20);
        assert_eq!(s.disks[0].queues, 1);
        assert_eq!(s.disks[0].engine, EngineKind::IoUring);
        assert_eq!(s.virtio_devices(), 5);
        s.validate().unwrap();
        let again: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_by_name() {
        let e = serde_json::from_str::<VmSpec>(r#"{"cpu":2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `cpu`"), "{e}");
        let e = serde_json::from_str::<VmSpec>(r#"{"disks":[{"cache":"fast"}]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `fast`"), "{e}");
        let e = serde_json::from_str::<VmSpec>(r#"{"memory":"lots"}"#).unwrap_err();
        assert!(e.to_string().contains("'lots' is not a size"), "{e}");
        let bad = |json: &str, field: &str| {
            let s: VmSpec = serde_json::from_str(json).unwrap();
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        };
        bad(r#"{"version":2}"#, "version");
        bad(r#"{"cpus":0}"#, "cpus");
        bad(r#"{"memory":1000}"#, "memory");
        bad(r#"{"disks":[{},{"queues":65}]}"#, "disks[1].queues");
        bad(
            r#"{"disks":[{"serial":"123456789012345678901"}]}"#,
            "disks[0].serial",
        );
        bad(r#"{"nets":[{"queues":0}]}"#, "nets[0].queues");
        bad(
            r#"{"nets":[{"tx_limit":{"bandwidth":{"size":0,"refill_time_ms":1}}}]}"#,
            "nets[0].tx_limit",
        );
        bad(r#"{"vsock":{"cid":2}}"#, "vsock.cid");
        bad(
            r#"{"memory":"64M","balloon":{"size":"64M"}}"#,
            "balloon.size",
        );
    }
}
