//! VM snapshots: a directory with a state file ([`format`], [`STATE_FILE`]) and a memory file
//! ([`memory`], [`MEMORY_FILE`]).
//!
//! Taking one ([`Machine::snapshot_unsynced`], then [`Machine::finish_snapshot`]) needs the
//! vCPUs parked; it pauses the device threads, reads every vCPU's, KVM's and device's state,
//! writes memory, lets the devices go on, and syncs the files and writes the state file once
//! the VM runs again. Restoring ([`crate::Vm::restore`]) builds the same machine in a new process on the
//! mapped memory file, loads the saved state into it, and starts the devices where they were.
//!
//! Diff snapshots: every snapshot becomes the VM's *base* (so does the snapshot a VM was
//! restored from), and the dirty tracker ([`crate::dirty`], consumer `SnapshotBase`) collects
//! the pages written since. A diff snapshot writes only those into its memory file and names
//! the base as its parent in the state file's header ([`format::Lineage`]); restoring follows
//! the parents ([`resolve_chain`]) and maps the files over one another.

pub mod disks;
pub mod format;
pub mod memory;
pub mod pager;

use std::path::Path;
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::legacy::LegacyState;
use devices::pci::PciRootState;
use devices::virtio::mmio::VirtioMmioState;
use devices::virtio::pci::VirtioPciState;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::dirty::Consumer;
use crate::vm::Machine;
pub use format::{Lineage, SnapshotRef as SnapshotBase};
use memory::MemoryRegionInfo;

/// Longest chain of diff snapshots a restore follows.
pub const MAX_CHAIN: usize = 64;

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot directory {path}: {why}")]
    Dir { path: String, why: String },
    #[error(transparent)]
    Kvm(#[from] hypervisor::Error),
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("device {index}: {why}")]
    Device { index: usize, why: String },
    #[error("this host cannot run the saved VM: its vCPUs used {0}, which this host lacks")]
    Cpu(String),
    #[error("the snapshot does not match: {0}")]
    Mismatch(String),
    #[error(
        "a diff snapshot needs a base: take a full snapshot first (or restore this VM from one)"
    )]
    NoBase,
    #[error("the parent snapshot {dir} (of {child}): {why}")]
    Parent {
        dir: String,
        child: String,
        why: String,
    },
    #[error("disk snapshot: {0}")]
    Disks(#[from] disks::DiskSnapshotError),
}

/// The virtio devices, by transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtioState {
    Mmio(Vec<VirtioMmioState>),
    Pci {
        root: PciRootState,
        functions: Vec<VirtioPciState>,
    },
}

/// Everything in a state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The machine: vCPUs, memory size, devices and their backends.
    pub config: VmConfig,
    pub memory: Vec<MemoryRegionInfo>,
    pub vcpus: Vec<hypervisor::VcpuState>,
    pub vm: hypervisor::VmState,
    pub legacy: LegacyState,
    pub virtio: VirtioState,
    /// With a disk snapshot: the images frozen at the snapshot's instant (their paths are the
    /// disks' in `config`); a restore opens a fresh overlay on each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen_disks: Vec<disks::FrozenDisk>,
}

/// A snapshot whose files are written but not yet synced: [`Machine::finish_snapshot`] once
/// the VM runs again (the state file appears last, so a crash never leaves a snapshot that
/// looks complete).
pub struct PendingSnapshot {
    memory: memory::UnsyncedMemory,
    state: Box<VmSnapshot>,
    dir: std::path::PathBuf,
    lineage: Lineage,
    /// The dirty pages a diff consumed (given back if it fails).
    taken: Option<Vec<hypervisor::dirty::DirtyBitmap>>,
    pub info: SnapshotInfo,
}

/// What taking a snapshot did.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotInfo {
    pub memory: memory::WriteStats,
    /// Whether this is a diff snapshot.
    pub diff: bool,
    /// How long the device threads were paused (the vCPUs were paused longer).
    pub devices_paused: Duration,
}

fn device_err(index: usize) -> impl Fn(String) -> SnapshotError {
    move |why| SnapshotError::Device { index, why }
}

impl Machine {
    /// Stops every device thread (see `VirtioDevice::pause`).
    pub(crate) fn pause_devices(&self) {
        for t in &self.virtio.transports {
            lock(t).pause();
        }
        if let Some(pci) = &self.virtio.pci {
            for t in &pci.transports {
                lock(t).pause();
            }
        }
    }

    /// Lets the device threads go on (or start, after a restore).
    pub(crate) fn resume_devices(&self) -> Result<(), SnapshotError> {
        for (i, t) in self.virtio.transports.iter().enumerate() {
            lock(t).resume().map_err(|e| device_err(i)(e.to_string()))?;
        }
        if let Some(pci) = &self.virtio.pci {
            for (i, t) in pci.transports.iter().enumerate() {
                lock(t).resume().map_err(|e| device_err(i)(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Makes every page of guest memory that holds data resident (a userfaultfd restore
    /// serves the pages not touched yet); nothing to do for other memory.
    pub(crate) fn populate_memory(&self) -> Result<(), SnapshotError> {
        match &self.pager {
            Some(p) => p
                .populate()
                .map_err(|e| SnapshotError::Memory(memory::MemoryError::Layout(e))),
            None => Ok(()),
        }
    }

    /// Reads the state of everything but memory. vCPUs parked, devices paused.
    pub(crate) fn state(&self, memory: Vec<MemoryRegionInfo>) -> Result<VmSnapshot, SnapshotError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| lock(v).save_state(&self.msr_indices))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm_fd.save_state()?;
        let legacy = LegacyState {
            serial: lock(&self.serial).state(),
            cmos: lock(&self.cmos).state(),
            acpi_pm: lock(&self.acpi_pm).state(),
        };
        let virtio = match &self.virtio.pci {
            Some(pci) => VirtioState::Pci {
                root: lock(&pci.config_io).state(),
                functions: pci.transports.iter().map(|t| lock(t).state()).collect(),
            },
            None => VirtioState::Mmio(
                self.virtio
                    .transports
                    .iter()
                    .map(|t| lock(t).state())
                    .collect(),
            ),
        };
        Ok(VmSnapshot {
            config: self.config_now(),
            memory,
            vcpus,
            vm,
            legacy,
            virtio,
            frozen_disks: Vec::new(),
        })
    }

    /// Writes a snapshot into `dir` (created if missing; it must not hold a snapshot already)
    /// up to the point where the VM may run again: all used memory, or with `diff` only the
    /// pages written since the base snapshot. Every vCPU must be parked; the device threads
    /// are paused meanwhile and go on after. The caller resumes the vCPUs and then calls
    /// [`Machine::finish_snapshot`] (the sync is off the pause). With `disk_snapshot`, the
    /// writable disks are frozen at the same instant and the VM goes on with new overlays
    /// (see [`disks`]).
    pub fn snapshot_unsynced(
        &self,
        dir: &Path,
        diff: bool,
        disk_snapshot: bool,
    ) -> Result<PendingSnapshot, SnapshotError> {
        let bad_dir = |why: String| SnapshotError::Dir {
            path: dir.display().to_string(),
            why,
        };
        let parent = if diff {
            let base = lock(&self.snapshot_base).clone();
            let base = base
                .filter(|_| self.dirty.has(Consumer::SnapshotBase))
                .ok_or(SnapshotError::NoBase)?;
            check_parent(&base, dir)?;
            Some(base)
        } else {
            None
        };
        std::fs::create_dir_all(dir).map_err(|e| bad_dir(e.to_string()))?;
        if dir.join(STATE_FILE).exists() {
            return Err(bad_dir(
                "it holds a snapshot already; use another directory".to_string(),
            ));
        }
        let dir = dir.canonicalize().map_err(|e| bad_dir(e.to_string()))?;
        if parent.as_ref().is_some_and(|p| p.dir == dir) {
            return Err(bad_dir("it holds the base snapshot".to_string()));
        }
        let planned = if disk_snapshot {
            disks::plan(&self.config_now(), &dir)?
        } else {
            Vec::new()
        };
        // Memory a pager still serves: a full snapshot's scan sees resident pages only (a
        // diff reads only pages written since its base, which are resident).
        if !diff {
            self.populate_memory()?;
        }
        let paused = Instant::now();
        self.pause_devices();
        let mut taken = None;
        let result = (|| {
            // Disks first: an image that cannot be frozen fails the snapshot before memory is
            // written.
            let frozen = self.freeze_disks(&planned)?;
            // The vCPUs' state first: their TSCs go on while memory is written, and the
            // restored guest should not see that time pass.
            let mut state = self.state(memory::layout_of(&self.mem))?;
            for f in &frozen {
                state.config.bindings.disks[f.index] = f.path.clone();
            }
            state.frozen_disks = frozen;
            let path = dir.join(MEMORY_FILE);
            let (regions, stats, unsynced) = if diff {
                let pages = self
                    .dirty
                    .take(&self.vm_fd, &self.mem, Consumer::SnapshotBase)?
                    .ok_or(SnapshotError::NoBase)?;
                let written = memory::write_diff_unsynced(&self.mem, &pages, &path);
                taken = Some(pages);
                written?
            } else {
                // From this instant on, the pages written are the next diff's.
                *lock(&self.snapshot_base) = None;
                self.dirty
                    .start(&self.vm_fd, &self.mem, Consumer::SnapshotBase)?;
                memory::write_memory_unsynced(&self.mem, &path)?
            };
            if regions != state.memory {
                return Err(SnapshotError::Mismatch(
                    "guest memory changed its layout while it was written".to_string(),
                ));
            }
            Ok((state, stats, unsynced))
        })();
        let devices_paused = paused.elapsed();
        let resumed = self.resume_devices();
        let (state, stats, unsynced) = match result {
            Ok(r) => r,
            Err(e) => {
                self.snapshot_failed(taken.as_deref());
                return Err(e);
            }
        };
        resumed?;
        Ok(PendingSnapshot {
            memory: unsynced,
            state: Box::new(state),
            dir,
            lineage: Lineage {
                id: Lineage::new_id(),
                parent,
            },
            taken,
            info: SnapshotInfo {
                memory: stats,
                diff,
                devices_paused,
            },
        })
    }

    /// Syncs and names the memory file, then writes the state file; the snapshot becomes the
    /// base of the next diff.
    pub fn finish_snapshot(&self, p: PendingSnapshot) -> Result<SnapshotInfo, SnapshotError> {
        let state_path = p.dir.join(STATE_FILE);
        let done = p
            .memory
            .finish()
            .map_err(SnapshotError::from)
            .and_then(|()| Ok(format::write_state(&state_path, &*p.state, &p.lineage)?));
        match done {
            Ok(()) => {
                *lock(&self.snapshot_base) = Some(SnapshotBase {
                    dir: p.dir,
                    id: p.lineage.id,
                });
                Ok(p.info)
            }
            Err(e) => {
                self.snapshot_failed(p.taken.as_deref());
                Err(e)
            }
        }
    }

    /// After a failed snapshot: a diff's pages count as dirty again (the base stays); a
    /// failed full snapshot leaves no base.
    fn snapshot_failed(&self, taken: Option<&[hypervisor::dirty::DirtyBitmap]>) {
        match taken {
            Some(pages) => self.dirty.give_back(Consumer::SnapshotBase, pages),
            None => *lock(&self.snapshot_base) = None,
        }
    }

    /// Makes the snapshot this machine was restored from the base of its diff snapshots
    /// (before its vCPUs first run).
    pub(crate) fn set_restored_base(&self, base: SnapshotBase) -> Result<(), SnapshotError> {
        self.dirty
            .start(&self.vm_fd, &self.mem, Consumer::SnapshotBase)?;
        *lock(&self.snapshot_base) = Some(base);
        Ok(())
    }

    /// Loads `snap` into this freshly built machine (same configuration, memory mapped from
    /// the snapshot), vCPUs first, then KVM's interrupt controllers and clock, then the
    /// devices, which stay paused until [`Machine::resume_devices`].
    pub(crate) fn restore_state(&self, snap: &VmSnapshot) -> Result<(), SnapshotError> {
        if snap.vcpus.len() != self.vcpus.len() {
            return Err(SnapshotError::Mismatch(format!(
                "{} vCPUs saved, {} built",
                snap.vcpus.len(),
                self.vcpus.len()
            )));
        }
        for (v, s) in self.vcpus.iter().zip(&snap.vcpus) {
            lock(v).restore_state(s)?;
        }
        self.vm_fd
            .restore_state(&snap.vm, hypervisor::ClockMode::Continue)?;
        lock(&self.serial)
            .restore(&snap.legacy.serial)
            .map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
        lock(&self.cmos)
            .restore(&snap.legacy.cmos)
            .map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
        lock(&self.acpi_pm).restore(&snap.legacy.acpi_pm);
        match (&snap.virtio, &self.virtio.pci) {
            (VirtioState::Mmio(saved), None) => {
                if saved.len() != self.virtio.transports.len() {
                    return Err(SnapshotError::Mismatch(format!(
                        "{} virtio devices saved, {} built",
                        saved.len(),
                        self.virtio.transports.len()
                    )));
                }
                for (i, (t, s)) in self.virtio.transports.iter().zip(saved).enumerate() {
                    lock(t)
                        .restore(s)
                        .map_err(|e| device_err(i)(e.to_string()))?;
                }
            }
            (VirtioState::Pci { root, functions }, Some(pci)) => {
                if functions.len() != pci.transports.len() {
                    return Err(SnapshotError::Mismatch(format!(
                        "{} PCI functions saved, {} built",
                        functions.len(),
                        pci.transports.len()
                    )));
                }
                lock(&pci.config_io)
                    .restore(root)
                    .map_err(|e| SnapshotError::Mismatch(e.to_string()))?;
                for (i, (t, s)) in pci.transports.iter().zip(functions).enumerate() {
                    lock(t)
                        .restore(s)
                        .map_err(|e| device_err(i)(e.to_string()))?;
                }
                pci.remap_bars();
            }
            _ => {
                return Err(SnapshotError::Mismatch(
                    "the saved VM used another virtio transport".to_string(),
                ))
            }
        }
        Ok(())
    }
}

impl VmSnapshot {
    /// Gives the restored VM new host-side backends for its network devices (all of them, in
    /// order: a clone needs its own taps or sockets) and its vsock device (a clone needs its
    /// own socket), with a new MAC, guest CID or network rate limits (each direction) where
    /// given; the saved ones otherwise. Each device is then built with the address and limits
    /// its state holds. A device keeps its kind of backend: a tap's device offers the guest
    /// offloads a stream socket cannot carry, and the guest negotiated them.
    pub fn rebind(
        &mut self,
        nets: &[(crate::config::Nic, crate::config::NetBinding)],
        vsock: Option<&(crate::config::Vsock, std::path::PathBuf)>,
    ) -> Result<(), SnapshotError> {
        let mismatch = |s: String| SnapshotError::Mismatch(s);
        let (spec, host) = (&mut self.config.spec, &mut self.config.bindings);
        let first_net = spec.disks.len();
        if !nets.is_empty() && nets.len() != spec.nets.len() {
            return Err(mismatch(format!(
                "the saved VM has {} network devices; give a --net for each, or none",
                spec.nets.len()
            )));
        }
        for i in 0..spec.nets.len() {
            let (saved_mac, saved_rx, saved_tx) =
                match device_mut(&mut self.virtio, first_net + i).map(|d| &d.specific) {
                    Some(devices::virtio::DeviceSpecificState::Net(n)) => {
                        (n.mac, n.rx_rate_limiter, n.tx_rate_limiter)
                    }
                    _ => return Err(mismatch(format!("no saved state for network device {i}"))),
                };
            let given = |l: devices::rate_limiter::RateLimiterConfig, saved| {
                if l.is_unlimited() {
                    saved
                } else {
                    l
                }
            };
            let (rx_limit, tx_limit) = match nets.get(i) {
                Some((n, _)) => (given(n.rx_limit, saved_rx), given(n.tx_limit, saved_tx)),
                None => (saved_rx, saved_tx),
            };
            let mac = match nets.get(i) {
                Some((n, binding)) => {
                    if n.queues != spec.nets[i].queues {
                        return Err(mismatch(format!(
                            "network device {i} had {} queue pairs, not {}",
                            spec.nets[i].queues, n.queues
                        )));
                    }
                    if let Some(saved) = host.nets.get(i) {
                        check_same_kind(i, saved, binding).map_err(mismatch)?;
                    }
                    match host.nets.get_mut(i) {
                        Some(b) => *b = binding.clone(),
                        None => host.nets.push(binding.clone()),
                    }
                    n.mac.unwrap_or(saved_mac)
                }
                None => saved_mac,
            };
            if let Some(d) = device_mut(&mut self.virtio, first_net + i) {
                d.set_net_mac(mac).map_err(|e| mismatch(e.to_string()))?;
                d.set_net_rate_limiters(rx_limit, tx_limit)
                    .map_err(|e| mismatch(e.to_string()))?;
            }
            spec.nets[i].mac = Some(mac);
            spec.nets[i].rx_limit = rx_limit;
            spec.nets[i].tx_limit = tx_limit;
        }
        if let Some((v, socket)) = vsock {
            let Some(saved) = &mut spec.vsock else {
                return Err(mismatch("the saved VM has no vsock device".to_string()));
            };
            if saved.cid != v.cid {
                let index = first_net + spec.nets.len() + usize::from(spec.rng);
                let d = device_mut(&mut self.virtio, index)
                    .ok_or_else(|| mismatch("no saved state for the vsock device".to_string()))?;
                d.set_vsock_cid(v.cid)
                    .map_err(|e| mismatch(e.to_string()))?;
            }
            *saved = *v;
            host.vsock_socket = Some(socket.clone());
        }
        Ok(())
    }
}

/// Refuses to move network device `i` between a tap and a stream socket: the device offered
/// the guest what its backend takes (a tap: checksum and segmentation offloads; a stream:
/// none), and a restored or migrated guest goes on with what it negotiated.
pub fn check_same_kind(
    i: usize,
    was: &crate::config::NetBinding,
    now: &crate::config::NetBinding,
) -> Result<(), String> {
    if was.is_stream() == now.is_stream() {
        return Ok(());
    }
    let kind = |b: &crate::config::NetBinding| {
        if b.is_stream() {
            "a stream socket (socket= or passt)"
        } else {
            "a tap"
        }
    };
    Err(format!(
        "network device {i} was on {}, and its guest negotiated that backend's offloads: give it {} again, not {}",
        kind(was),
        kind(was),
        kind(now)
    ))
}

/// The network devices of the snapshot in `dir` and their saved bindings (for the host side
/// to prepare a restore: the passt a saved `passt` binding needs).
pub fn saved_nets(
    dir: &Path,
) -> Result<Vec<(crate::config::Nic, crate::config::NetBinding)>, SnapshotError> {
    let (snap, _): (VmSnapshot, Lineage) = format::read_state_lineage(&dir.join(STATE_FILE))?;
    let config = snap.config;
    Ok(config
        .spec
        .nets
        .into_iter()
        .zip(config.bindings.nets)
        .collect())
}

/// The saved state of virtio device `index` (in `virtio::setup` order).
fn device_mut(
    virtio: &mut VirtioState,
    index: usize,
) -> Option<&mut devices::virtio::VirtioDeviceState> {
    match virtio {
        VirtioState::Mmio(t) => t.get_mut(index).map(|t| &mut t.device),
        VirtioState::Pci { functions, .. } => functions.get_mut(index).map(|f| &mut f.device),
    }
}

/// Checks that this host offers every CPU feature the saved vCPUs had.
pub fn check_cpu(offered: &hypervisor::kvm::CpuId, snap: &VmSnapshot) -> Result<(), SnapshotError> {
    for v in &snap.vcpus {
        if let Err(missing) = arch::compat::check(&v.cpuid, offered) {
            return Err(SnapshotError::Cpu(missing.to_string()));
        }
    }
    Ok(())
}

/// Checks that the base snapshot is still there, unchanged, before a diff builds on it.
fn check_parent(base: &SnapshotBase, child: &Path) -> Result<(), SnapshotError> {
    let (_, lineage): (serde_json::Value, Lineage) =
        format::read_state_lineage(&base.dir.join(STATE_FILE)).map_err(|e| {
            SnapshotError::Parent {
                dir: base.dir.display().to_string(),
                child: child.display().to_string(),
                why: e.to_string(),
            }
        })?;
    if lineage.id != base.id {
        return Err(SnapshotError::Parent {
            dir: base.dir.display().to_string(),
            child: child.display().to_string(),
            why: "it was replaced by another snapshot; take a full snapshot".to_string(),
        });
    }
    Ok(())
}

/// Follows the parents of the snapshot in `dir` (whose header says `lineage`, whose memory
/// is `regions`) down to its full snapshot; returns the memory files, the full snapshot's
/// first. Each parent must be there, have the id its child recorded and the same memory
/// layout.
/// The snapshot directories of a chain, and its disks' files with whether each is read-only.
pub type RestorePaths = (Vec<std::path::PathBuf>, Vec<(std::path::PathBuf, bool)>);

/// What restoring the snapshot in `dir` reads and writes on the host: the directories of its
/// chain of snapshots, and its disk files (each with whether it is read-only). A jail
/// exposes these to the restoring VMM.
pub fn restore_paths(dir: &Path) -> Result<RestorePaths, SnapshotError> {
    let (snap, lineage): (VmSnapshot, Lineage) = format::read_state_lineage(&dir.join(STATE_FILE))?;
    let dirs = resolve_chain(dir, &lineage, &snap.memory)?
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    let disks = snap.config.bindings.disks.into_iter();
    let read_only = snap.config.spec.disks.iter().map(|d| d.read_only);
    Ok((dirs, disks.zip(read_only).collect()))
}

pub fn resolve_chain(
    dir: &Path,
    lineage: &Lineage,
    regions: &[MemoryRegionInfo],
) -> Result<Vec<std::path::PathBuf>, SnapshotError> {
    let mut files = vec![dir.join(MEMORY_FILE)];
    let mut child = dir.to_path_buf();
    let mut next = lineage.parent.clone();
    while let Some(parent) = next {
        let err = |why: String| SnapshotError::Parent {
            dir: parent.dir.display().to_string(),
            child: child.display().to_string(),
            why,
        };
        if files.len() > MAX_CHAIN {
            return Err(err(format!(
                "the chain of diff snapshots is longer than {MAX_CHAIN}"
            )));
        }
        let (snap, l): (VmSnapshot, Lineage) =
            format::read_state_lineage(&parent.dir.join(STATE_FILE))
                .map_err(|e| err(e.to_string()))?;
        if l.id != parent.id {
            return Err(err(format!(
                "it is snapshot {}, not {} which the diff was taken against",
                if l.id.is_empty() { "without id" } else { &l.id },
                parent.id
            )));
        }
        if snap.memory != regions {
            return Err(err("its memory layout differs".to_string()));
        }
        files.push(parent.dir.join(MEMORY_FILE));
        child = parent.dir.clone();
        next = l.parent;
    }
    files.reverse();
    Ok(files)
}
