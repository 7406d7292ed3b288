//! The API's JSON types, shared by the server, the client and the VMM's controller.
//!
//! Field names are `snake_case`; enum values are lower-case words joined by `-`
//! (`shutting-down`, `stop-and-copy`), as in the route names. Request bodies reject unknown
//! fields, so a typo is a 400, not a silently ignored option. These names are the API's contract:
//! `openapi.json` describes them and its tests check the two agree.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `vm.boot`'s body: the VM to boot (its spec) and this host's files, taps and sockets for it.
pub use spec::bindings::VmDocument;

/// The API version in every route (`/api/v1/...`).
pub const API_VERSION: &str = "v1";

/// The HTTP method of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// Every route of the API. The server's router is built from [`Endpoint::ALL`], the client
/// calls through it and a test checks `openapi.json` against it, so the three cannot drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Ping,
    OpenApi,
    Boot,
    Info,
    Pause,
    Resume,
    Shutdown,
    Reset,
    Snapshot,
    Restore,
    MigrateSend,
    MigrateReceive,
    MigrationStatus,
    MigrateCancel,
    Balloon,
    BalloonSet,
    Counters,
}

impl Endpoint {
    pub const ALL: [Endpoint; 17] = [
        Endpoint::Ping,
        Endpoint::OpenApi,
        Endpoint::Boot,
        Endpoint::Info,
        Endpoint::Pause,
        Endpoint::Resume,
        Endpoint::Shutdown,
        Endpoint::Reset,
        Endpoint::Snapshot,
        Endpoint::Restore,
        Endpoint::MigrateSend,
        Endpoint::MigrateReceive,
        Endpoint::MigrationStatus,
        Endpoint::MigrateCancel,
        Endpoint::Balloon,
        Endpoint::BalloonSet,
        Endpoint::Counters,
    ];

    /// The last path segment (`vm.pause`).
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Ping => "ping",
            Endpoint::OpenApi => "openapi.json",
            Endpoint::Boot => "vm.boot",
            Endpoint::Info => "vm.info",
            Endpoint::Pause => "vm.pause",
            Endpoint::Resume => "vm.resume",
            Endpoint::Shutdown => "vm.shutdown",
            Endpoint::Reset => "vm.reset",
            Endpoint::Snapshot => "vm.snapshot",
            Endpoint::Restore => "vm.restore",
            Endpoint::MigrateSend => "vm.migrate-send",
            Endpoint::MigrateReceive => "vm.migrate-receive",
            Endpoint::MigrationStatus => "vm.migration-status",
            Endpoint::MigrateCancel => "vm.migrate-cancel",
            Endpoint::Balloon => "vm.balloon",
            Endpoint::BalloonSet => "vm.balloon-set",
            Endpoint::Counters => "vm.counters",
        }
    }

    /// The full path (`/api/v1/vm.pause`).
    pub fn path(self) -> String {
        format!("/api/{API_VERSION}/{}", self.name())
    }

    /// Queries are GET; everything that acts on the VM is PUT.
    pub fn method(self) -> Method {
        match self {
            Endpoint::Ping
            | Endpoint::OpenApi
            | Endpoint::Info
            | Endpoint::MigrationStatus
            | Endpoint::Balloon
            | Endpoint::Counters => Method::Get,
            _ => Method::Put,
        }
    }
}

/// The run state of a VM, as the API reports it.
///
/// Mirrors `vmm::control::RunState` (Running, Paused, Stopping) plus `stopped`, once the vCPUs
/// have been joined and an exit reason recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// `vessel serve`: no VM yet; waiting for a restore or an incoming migration.
    Empty,
    Running,
    Paused,
    /// A shutdown was requested (ACPI power button) or the VM is stopping its vCPUs.
    ShuttingDown,
    Stopped,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Empty => "empty",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::Stopped => "stopped",
        })
    }
}

/// One device of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceInfo {
    /// A stable identifier (`serial0`, `block0`, `rng0`, ...).
    pub id: String,
    /// What it is (`serial`, `virtio-block`, `virtio-rng`, `i8042`, ...).
    pub kind: String,
    /// Where the guest finds it, for example `mmio 0xd0000000` or `pio 0x3f8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its interrupt line, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq: Option<u32>,
    /// How the device is backed, for example `raw, engine io_uring, cache none` for a disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A disk's image file now (a disk snapshot moves the VM to a new overlay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `GET /api/v1/vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmInfo {
    pub state: VmState,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Milliseconds from the start of `vessel run` to the guest's boot-complete marker (port
    /// 0x3f0); absent until the guest writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_time_ms: Option<u64>,
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
    pub devices: Vec<DeviceInfo>,
    /// Vessel's version.
    pub version: String,
    /// Why the VM stopped, once it has (`guest powered off`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
    /// What the userfaultfd pager did (a VM restored with memory `userfaultfd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pager: Option<PagerInfo>,
}

/// The counters of a userfaultfd restore's pager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PagerInfo {
    /// Page faults served (each fills up to a 256 KiB chunk around the fault).
    pub faults: u64,
    /// Pages filled from the memory file.
    pub copied_pages: u64,
    /// Pages filled with zeroes (holes in the file, pages discarded since).
    pub zero_pages: u64,
    /// Pages the guest gave back (balloon): they read as zeroes afterwards.
    pub discarded_pages: u64,
}

/// `GET /api/v1/vm.counters`: what the vCPUs and the disk and network devices did, counted
/// since they were made in this process. Every value only grows while the process lives;
/// they are not part of a snapshot or a migration, so a restored VM or a migration's target
/// starts from 0 (a consumer sees a counter reset). Answered while the VM runs and while it is
/// paused; after the VM has stopped, the last values.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmCounters {
    /// One entry per vCPU, by index.
    pub vcpus: Vec<VcpuCounters>,
    /// One entry per disk (virtio-blk device), in the VM's order.
    pub disks: Vec<DiskCounters>,
    /// One entry per network device (virtio-net), in the VM's order.
    pub nics: Vec<NicCounters>,
}

/// A vCPU's exits from `KVM_RUN` to Vessel, by kind. Exits KVM handles itself (the in-kernel
/// irqchip, ioeventfd notifications, halts with an in-kernel LAPIC) never reach Vessel and are
/// not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VcpuCounters {
    /// The vCPU's index (0 is the boot vCPU).
    pub index: u32,
    /// All exits: the sum of the kinds below.
    pub exits: u64,
    /// Port I/O (`in`, `out`) handled by a device on the I/O bus.
    pub io_exits: u64,
    /// MMIO reads and writes handled by a device on the MMIO bus (virtio registers, ...).
    pub mmio_exits: u64,
    /// `hlt` exits that reach Vessel (KVM's in-kernel LAPIC handles halts itself: normally 0).
    pub hlt_exits: u64,
    /// Runs interrupted by a signal: a pause, a snapshot, a stop kicking the vCPU.
    pub interrupted_exits: u64,
    /// Triple faults (the VM ends).
    pub shutdown_exits: u64,
    /// KVM system events: power off, reset, guest crash.
    pub system_event_exits: u64,
    /// Anything else: internal errors, failed VM entries, unexpected exits.
    pub other_exits: u64,
}

/// A disk's requests, counted when the device completes them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskCounters {
    /// The device's identifier in `vm.info`'s devices (`block0`, `block1`, ...).
    pub id: String,
    /// The disk's index in the VM's spec (`disks[index]`).
    pub index: u32,
    /// Reads completed successfully.
    pub read_ops: u64,
    /// Bytes read into guest memory.
    pub read_bytes: u64,
    /// Writes completed successfully.
    pub write_ops: u64,
    /// Bytes written from guest memory.
    pub write_bytes: u64,
    /// Flushes completed successfully (`cache=unsafe` drops them, counted all the same).
    pub flush_ops: u64,
    /// Discards completed successfully.
    pub discard_ops: u64,
    /// Write-zeroes requests completed successfully.
    pub write_zeroes_ops: u64,
    /// Requests completed with an error status: I/O errors of the image, requests out of
    /// range or malformed, writes to a read-only disk, request types not supported.
    pub errors: u64,
}

/// A network device's frames. Bytes are Ethernet frame bytes, without the 12-byte virtio-net
/// header.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NicCounters {
    /// The device's identifier in `vm.info`'s devices (`net0`, `net1`, ...).
    pub id: String,
    /// The device's index in the VM's spec (`nets[index]`).
    pub index: u32,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes of the frames delivered to the guest.
    pub rx_bytes: u64,
    /// Frames read from the backend (tap or stream socket) and dropped: too short, too long for
    /// the guest's buffers, or meeting a malformed buffer (the tap's own queue drops what
    /// overflows it, unseen here).
    pub rx_dropped: u64,
    /// Frames the guest sent to the backend (tap or stream socket).
    pub tx_packets: u64,
    /// Bytes of the frames the guest sent.
    pub tx_bytes: u64,
    /// Frames the guest sent that were dropped: malformed, too short or too long, outside guest
    /// memory, or refused by the backend (a stream socket whose peer went away).
    pub tx_dropped: u64,
}

/// `GET /api/v1/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Pong {
    /// Vessel's API crate version.
    pub version: String,
    /// Always [`API_VERSION`].
    pub api_version: String,
}

impl Pong {
    pub fn current() -> Self {
        Pong {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION.to_string(),
        }
    }
}

/// `PUT /api/v1/vm.snapshot`: a running VM is paused for it and resumed before the files are
/// synced; a paused VM stays paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The directory the snapshot is written to (created if missing, must be empty).
    #[schema(value_type = String)]
    pub dir: PathBuf,
    /// Write only the memory dirtied since the previous snapshot.
    #[serde(default)]
    pub diff: bool,
    /// Also freeze every writable disk at the same instant: the VM goes on with a new qcow2
    /// overlay next to each image; restores open a fresh overlay on the frozen images.
    #[serde(default)]
    pub disk_snapshot: bool,
}

/// How a restored VM gets its memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMemory {
    /// Map the memory file copy-on-write; pages are read on first touch.
    #[default]
    Lazy,
    /// Read all of memory before the vCPUs start.
    Eager,
    /// Serve page faults from the file through userfaultfd.
    Userfaultfd,
}

/// `PUT /api/v1/vm.restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    #[schema(value_type = String)]
    pub dir: PathBuf,
    #[serde(default)]
    pub memory: RestoreMemory,
}

/// The default downtime a live migration aims for.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

fn default_downtime_ms() -> u64 {
    DEFAULT_DOWNTIME_MS
}

/// `PUT /api/v1/vm.migrate-send`: starts sending the VM; returns at once, progress is in
/// `vm.migration-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateSendRequest {
    /// Destination: `tcp:HOST:PORT` or `unix:PATH`.
    pub to: String,
    /// The longest pause the final stop-and-copy round may take.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// A bandwidth cap in megabits per second; none means unlimited. It paces the pages
    /// pushed during post-copy too; pages the target asks for go at once and count against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<u64>,
    /// Switch to post-copy when pre-copy does not converge (the expected downtime stays above
    /// the limit): the VM runs on the target at once and fetches the pages still missing from
    /// the source. If the connection breaks during post-copy the VM is lost on both sides.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub post_copy: bool,
    /// With `post_copy`: switch after this many pre-copy rounds at the latest (1: right after
    /// the first full copy), converged or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy_after_rounds: Option<u32>,
    /// What happens when pre-copy does not converge (after its rounds, the last one would
    /// still pause the VM longer than `downtime_ms`): fail (the default; the VM runs on
    /// here), stop-and-copy (accept the longer pause; the status reports it) or post-copy
    /// (the same as `post_copy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_not_converged: Option<IfNotConverged>,
    /// Pre-copy rounds at most (1 to 1000; default 30) before the migration counts as not
    /// converged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Check at stop-and-copy that all of guest memory is the same on both sides, rather than
    /// only that every page sent arrived intact: this also catches a page the dirty log missed,
    /// but adds a pass over the used memory on both sides to the downtime.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_digest: bool,
    /// The migration's secret, as `vm.migrate-receive` set or returned it on the target: the
    /// two sides prove to each other that they hold it, and it keys the encryption of the
    /// stream. Never logged, and not part of the status.
    pub token: MigrationToken,
}

/// A migration's shared secret (at least 16 characters; the target generates 64 hex digits,
/// 256 bits, when none is given). Its `Debug` form hides it, so it never reaches a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct MigrationToken(pub String);

impl MigrationToken {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for MigrationToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationToken(<hidden>)")
    }
}

impl MigrateSendRequest {
    /// What a migration that does not converge does (`post_copy` is a shorthand for
    /// `if_not_converged: post-copy`).
    pub fn if_not_converged(&self) -> IfNotConverged {
        match (self.post_copy, self.if_not_converged) {
            (true, _) => IfNotConverged::PostCopy,
            (false, p) => p.unwrap_or_default(),
        }
    }
}

/// What a migration does when pre-copy cannot get the last round under the downtime limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IfNotConverged {
    /// The migration fails and the VM runs on at the source.
    #[default]
    Fail,
    /// Stop and copy anyway, pausing the VM longer than the limit (reported in the status).
    StopAndCopy,
    /// Switch to post-copy.
    PostCopy,
}

/// `PUT /api/v1/vm.migrate-receive`: waits for an incoming migration; returns at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateReceiveRequest {
    /// Where to listen: `tcp:HOST:PORT` or `unix:PATH`.
    pub listen: String,
    /// The migration's secret (at least 16 characters); when absent the target generates a
    /// random 256-bit one and returns it. The source must give the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<MigrationToken>,
    /// This host's file for each of the source's disks, in the source's order: the count
    /// must match the source's disks (unless `same_paths`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<MigrateDisk>,
    /// This host's tap for each of the source's network devices, in order (unless
    /// `same_paths`): the older form of `nets`, for taps only (give one or the other). The
    /// guest keeps its MAC address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<String>,
    /// This host's backend for each of the source's network devices, in order (unless
    /// `same_paths`): `{"tap": NAME}` for a device on a tap at the source, `{"socket": PATH}`
    /// (a listening stream socket, such as a passt started here) for one on a stream socket or
    /// passt. A device keeps its kind of backend (its guest negotiated that backend's offloads);
    /// a target does not start passt. The guest keeps its MAC address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<spec::bindings::NetBinding>,
    /// This host's socket for the source's vsock device (the guest keeps its CID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub vsock_socket: Option<PathBuf>,
    /// Use the source's own host paths (disk files, taps, vsock socket, virtio-console file)
    /// for whatever this request does not give: only for a migration between two processes
    /// on one host. Without it, the target never opens a path that came from the source.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub same_paths: bool,
}

/// A disk's binding on the migration target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateDisk {
    /// The disk image on this host (the same contents as the source's, shared or copied).
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// The host cache mode on this host (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<DiskCache>,
}

/// A disk's host cache mode: the spec's.
pub use spec::vm::CacheMode as DiskCache;

/// `vm.migrate-receive`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrateReceiveResponse {
    /// The migration's secret, to give to `vm.migrate-send` on the source.
    pub token: MigrationToken,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// No migration has been started.
    #[default]
    None,
    /// Connecting, exchanging the configuration.
    Setup,
    /// Waiting for a sender (receive side).
    Listening,
    /// Copying memory while the VM runs, round after round.
    Precopy,
    /// The VM is paused and the last dirty pages and device state are sent.
    StopAndCopy,
    /// The VM runs on the target, which fetches the pages still missing from the source.
    Postcopy,
    Completed,
    Cancelled,
    Failed,
}

impl MigrationPhase {
    /// Whether the migration has ended (successfully or not).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationPhase::None
                | MigrationPhase::Completed
                | MigrationPhase::Cancelled
                | MigrationPhase::Failed
        )
    }
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrationPhase::None => "none",
            MigrationPhase::Setup => "setup",
            MigrationPhase::Listening => "listening",
            MigrationPhase::Precopy => "precopy",
            MigrationPhase::StopAndCopy => "stop-and-copy",
            MigrationPhase::Postcopy => "postcopy",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Cancelled => "cancelled",
            MigrationPhase::Failed => "failed",
        })
    }
}

/// Which side of a migration this VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationRole {
    Send,
    Receive,
}

/// `GET /api/v1/vm.migration-status`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationStatus {
    pub phase: MigrationPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<MigrationRole>,
    /// The pre-copy round (1 is the full copy); 0 before the first.
    #[serde(default)]
    pub round: u32,
    /// Guest memory size: what the first round sends.
    #[serde(default)]
    pub total_bytes: u64,
    /// Bytes sent (or received) so far, all rounds together.
    #[serde(default)]
    pub transferred_bytes: u64,
    /// Bytes still dirty: what the next round would send (in post-copy: the pages the
    /// target still misses).
    #[serde(default)]
    pub remaining_bytes: u64,
    /// Bytes the guest dirties per second, measured over the last round.
    #[serde(default)]
    pub dirty_rate: u64,
    /// Measured throughput, bytes per second.
    #[serde(default)]
    pub bandwidth: u64,
    /// What stop-and-copy would take now, at the measured bandwidth.
    #[serde(default)]
    pub expected_downtime_ms: u64,
    /// The downtime actually taken, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// The VM was paused longer than the downtime limit (stop-and-copy chosen for a migration
    /// that did not converge, or a last round slower than measured).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub downtime_limit_exceeded: bool,
    /// Milliseconds since the migration started.
    #[serde(default)]
    pub elapsed_ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The names of the balloon statistics the guest may report (virtio 1.2 §5.5.6.3), in tag
/// order. The memory ones (`free_memory`, `total_memory`, `available_memory`, `disk_caches`)
/// and `swap_in`/`swap_out` are bytes; the others are counts.
pub const BALLOON_STATS: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

/// `GET /api/v1/vm.balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BalloonInfo {
    /// What the guest is asked to hand over, in bytes (a multiple of 4 KiB).
    pub target_bytes: u64,
    /// What the guest says it has handed over, in bytes.
    pub actual_bytes: u64,
    /// The guest's last reported memory statistics, by name: `swap_in`, `swap_out`,
    /// `major_faults`, `minor_faults`, `free_memory`, `total_memory`, `available_memory`,
    /// `disk_caches`, `hugetlb_allocations`, `hugetlb_failures` ([`BALLOON_STATS`]); absent
    /// when the balloon has no statistics queue or the guest has not reported yet. Only the
    /// statistics the guest sent are present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<BTreeMap<String, u64>>,
}

/// `PUT /api/v1/vm.balloon-set`: a new balloon target; the guest is told at once (a
/// configuration change interrupt) and inflates or deflates towards it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalloonSetRequest {
    /// Bytes the guest should hand over (rounded down to 4 KiB pages); must be below the guest
    /// memory. 0 deflates the balloon completely.
    pub target_bytes: u64,
}

/// An API error: an HTTP status and a message. On the wire it is `{"message": "..."}` with the
/// status as the response's.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, utoipa::ToSchema,
)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status (not serialized: it is the response's status).
    #[serde(skip, default = "internal_status")]
    pub status: u16,
    pub message: String,
}

fn internal_status() -> u16 {
    500
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is malformed or invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404: no such route or object.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// 409: the request is valid but not in the VM's current state (pause a paused VM,
    /// snapshot a running one, cancel when no migration runs).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 501: not supported by this VM or build.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(501, message)
    }

    /// 500: the VMM failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// 503: the VM is not able to take requests (stopping).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn enum_values_are_stable() {
        assert_eq!(
            serde_json::to_value(VmState::ShuttingDown).unwrap(),
            json!("shutting-down")
        );
        assert_eq!(
            serde_json::to_value(MigrationPhase::StopAndCopy).unwrap(),
            json!("stop-and-copy")
        );
        assert_eq!(
            serde_json::to_value(RestoreMemory::Userfaultfd).unwrap(),
            json!("userfaultfd")
        );
        for s in [
            VmState::Running,
            VmState::Paused,
            VmState::ShuttingDown,
            VmState::Stopped,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.to_string()));
        }
    }

    #[test]
    fn request_defaults_and_unknown_fields() {
        let r: MigrateSendRequest =
            serde_json::from_str(r#"{"to":"tcp:1.2.3.4:5","token":"t"}"#).unwrap();
        assert_eq!(r.downtime_ms, 300);
        assert_eq!(r.token.expose(), "t");
        assert_eq!(r.bandwidth_mbps, None);
        // The token is required to send; receiving makes one when none is given.
        assert!(serde_json::from_str::<MigrateSendRequest>(r#"{"to":"x"}"#).is_err());
        let r: MigrateReceiveRequest = serde_json::from_str(r#"{"listen":"x"}"#).unwrap();
        assert!(r.token.is_none() && r.disks.is_empty() && !r.same_paths);
        let r: RestoreRequest = serde_json::from_str(r#"{"dir":"/x"}"#).unwrap();
        assert_eq!(r.memory, RestoreMemory::Lazy);
        let r: SnapshotRequest = serde_json::from_str(r#"{"dir":"/x"}"#).unwrap();
        assert!(!r.diff && !r.disk_snapshot);
        assert!(serde_json::from_str::<SnapshotRequest>(r#"{"dir":"/x","dif":true}"#).is_err());
        assert!(serde_json::from_str::<RestoreRequest>(r#"{"dir":"/x","memory":"x"}"#).is_err());
        let r: BalloonSetRequest = serde_json::from_str(r#"{"target_bytes":4096}"#).unwrap();
        assert_eq!(r.target_bytes, 4096);
        assert!(serde_json::from_str::<BalloonSetRequest>(r#"{"target":1}"#).is_err());
        assert!(serde_json::from_str::<BalloonSetRequest>(r#"{"target_bytes":-1}"#).is_err());
        assert!(serde_json::from_str::<BalloonSetRequest>(r#"{"target_bytes":1,"x":1}"#).is_err());
    }

    #[test]
    fn api_error_wire_form() {
        let e = ApiError::conflict("already paused");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"message": "already paused"})
        );
        let back: ApiError = serde_json::from_str(r#"{"message":"m"}"#).unwrap();
        assert_eq!(back.message, "m");
        assert_eq!(e.to_string(), "already paused");
    }
}
