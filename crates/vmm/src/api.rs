//! The VM's side of the control API (`vessel run --api-socket`): [`api::VmController`] over the
//! run control, the vCPU kick handles and the ACPI power button; the counters of the vCPUs and
//! devices ([`counters`]), read without stopping or locking anything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use api::types::{
    ApiError, BalloonInfo, BalloonSetRequest, DeviceInfo, DiskCounters, MigrateReceiveRequest,
    MigrateSendRequest, MigrationStatus, NicCounters, RestoreRequest, SnapshotRequest, VmCounters,
    VmInfo, VmState,
};
use api::VmController;
use devices::bus::lock;
use devices::legacy::{AcpiPm, BootMarker};
use devices::virtio::balloon::{BalloonError, BalloonHandle, BalloonStats};
use devices::virtio::block::BlockCountersSnapshot;
use devices::virtio::net::NetCountersSnapshot;
use hypervisor::KickHandle;

use crate::control::{Control, RunState};
use crate::exit::ExitReason;
use crate::migration::Outgoing;

/// How long a pause may take before the API gives up on it.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the API needs of a running VM.
pub struct VmHandle {
    /// This handle, for the migration thread.
    me: Weak<VmHandle>,
    pub machine: Arc<crate::vm::Machine>,
    pub control: Arc<Control>,
    pub kicks: Mutex<Vec<KickHandle>>,
    pub vcpus: u32,
    pub memory: u64,
    pub started: Instant,
    pub boot_marker: Arc<Mutex<BootMarker>>,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    /// Serializes pause and resume.
    transition: Mutex<()>,
    shutdown_requested: AtomicBool,
    /// The current or last outgoing migration.
    migration: Mutex<Option<Arc<Outgoing>>>,
}

impl VmHandle {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: Weak<VmHandle>,
        machine: Arc<crate::vm::Machine>,
        control: Arc<Control>,
        vcpus: u32,
        memory: u64,
        started: Instant,
        boot_marker: Arc<Mutex<BootMarker>>,
        acpi_pm: Arc<Mutex<AcpiPm>>,
    ) -> Self {
        VmHandle {
            me,
            machine,
            control,
            kicks: Mutex::new(Vec::new()),
            vcpus,
            memory,
            started,
            boot_marker,
            acpi_pm,
            transition: Mutex::new(()),
            shutdown_requested: AtomicBool::new(false),
            migration: Mutex::new(None),
        }
    }

    fn stopping(&self) -> Result<(), ApiError> {
        match self.control.exit_reason() {
            Some(r) => Err(ApiError::conflict(format!("the VM is stopping: {r}"))),
            None => Ok(()),
        }
    }

    /// Parks every vCPU between two runs.
    pub fn pause(&self) -> Result<(), ApiError> {
        let _t = lock(&self.transition);
        self.stopping()?;
        if self.control.state() == RunState::Paused {
            return Err(ApiError::conflict("the VM is already paused"));
        }
        self.control.set_state(RunState::Paused);
        for k in lock(&self.kicks).iter() {
            k.kick();
        }
        if !self.control.wait_parked_timeout(self.vcpus, PAUSE_TIMEOUT) {
            self.control.set_state(RunState::Running);
            return Err(ApiError::internal(format!(
                "only {} of {} vCPUs stopped within {PAUSE_TIMEOUT:?}; the VM keeps running",
                self.control.parked(),
                self.vcpus
            )));
        }
        Ok(())
    }

    /// Parks the vCPUs for a migration's stop-and-copy; returns whether this paused them (a
    /// VM the user paused stays paused on the target too).
    pub fn pause_for_migration(&self) -> Result<bool, crate::migration::MigrationError> {
        if self.control.state() == RunState::Paused {
            return Ok(false);
        }
        self.pause()
            .map_err(|e| crate::migration::MigrationError::Build(e.message))?;
        Ok(true)
    }

    /// Shows `status` (the migration that brought this VM here) until one starts from here.
    pub fn set_incoming_migration(&self, status: Arc<Outgoing>) {
        *lock(&self.migration) = Some(status);
    }

    /// Undoes [`VmHandle::pause_for_migration`] after a failed migration.
    pub fn resume_after_migration(&self) {
        if let Err(e) = self.resume() {
            tracing::error!(
                "cannot resume the VM after a failed migration: {}",
                e.message
            );
        }
    }

    fn balloon_handle(&self) -> Result<&BalloonHandle, ApiError> {
        self.machine
            .virtio
            .balloon
            .as_ref()
            .ok_or_else(|| ApiError::conflict(api::controller::NO_BALLOON))
    }

    pub fn resume(&self) -> Result<(), ApiError> {
        let _t = lock(&self.transition);
        self.stopping()?;
        if self.control.state() != RunState::Paused {
            return Err(ApiError::conflict("the VM is not paused"));
        }
        self.control.set_state(RunState::Running);
        Ok(())
    }
}

impl VmController for VmHandle {
    fn info(&self) -> Result<VmInfo, ApiError> {
        let exit = self.control.exit_reason();
        let state = match (self.control.state(), &exit) {
            (_, Some(_)) | (RunState::Stopping, _) => VmState::ShuttingDown,
            (RunState::Paused, _) => VmState::Paused,
            _ if self.shutdown_requested.load(Ordering::SeqCst) => VmState::ShuttingDown,
            _ => VmState::Running,
        };
        Ok(VmInfo {
            state,
            vcpus: self.vcpus,
            memory_bytes: self.memory,
            boot_time_ms: lock(&self.boot_marker)
                .boot_time()
                .map(|d| d.as_millis() as u64),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            // The engines as they are now: a disk snapshot may have moved a disk to another.
            devices: device_list(&self.machine.config_now(), &self.machine.disk_engines()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            exit_reason: exit.map(|r| r.to_string()),
            pager: self.machine.pager.as_ref().map(|p| {
                let s = p.stats();
                api::types::PagerInfo {
                    faults: s.faults,
                    copied_pages: s.copied_pages,
                    zero_pages: s.zero_pages,
                    discarded_pages: s.removed_pages,
                }
            }),
        })
    }

    fn pause(&self) -> Result<(), ApiError> {
        VmHandle::pause(self)
    }

    fn resume(&self) -> Result<(), ApiError> {
        VmHandle::resume(self)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.stopping()?;
        if self.control.state() == RunState::Paused {
            return Err(ApiError::conflict(
                "the VM is paused: resume it so that its OS can handle the power button",
            ));
        }
        lock(&self.acpi_pm)
            .press_power_button(arch::acpi::GED_EVENT_POWER_BUTTON)
            .map_err(|e| ApiError::internal(format!("cannot press the power button: {e}")))?;
        self.shutdown_requested.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn reset(&self) -> Result<(), ApiError> {
        self.stopping()?;
        self.control.request_exit(ExitReason::Reset);
        Ok(())
    }

    fn snapshot(&self, req: SnapshotRequest) -> Result<(), ApiError> {
        if lock(&self.migration)
            .as_ref()
            .is_some_and(|m| lock(&m.status).phase == api::types::MigrationPhase::Postcopy)
        {
            return Err(ApiError::conflict(
                "a post-copy migration is still bringing memory in: snapshot after it ends",
            ));
        }
        // A running VM is paused for the snapshot and resumed after; a paused one stays so.
        let was_paused = self.control.state() == RunState::Paused;
        if !was_paused {
            self.pause()?;
        }
        let t = lock(&self.transition);
        let taken = Instant::now();
        let pending = self
            .machine
            .snapshot_unsynced(&req.dir, req.diff, req.disk_snapshot);
        drop(t);
        if !was_paused {
            self.resume()?;
        }
        // Synced while the guest runs again.
        let info = pending
            .and_then(|p| self.machine.finish_snapshot(p))
            .map_err(|e| {
                use crate::snapshot::SnapshotError as E;
                match e {
                    E::Dir { .. } | E::Disks(_) => ApiError::bad_request(e.to_string()),
                    E::NoBase | E::Parent { .. } => ApiError::conflict(e.to_string()),
                    _ => ApiError::internal(e.to_string()),
                }
            })?;
        tracing::info!(
            "{} snapshot in {}: {} of {} MiB written in {:?} (devices paused {:?})",
            if info.diff { "diff" } else { "full" },
            req.dir.display(),
            info.memory.written >> 20,
            info.memory.total >> 20,
            taken.elapsed(),
            info.devices_paused
        );
        Ok(())
    }

    fn restore(&self, _req: RestoreRequest) -> Result<(), ApiError> {
        Err(ApiError::conflict(
            "this process runs a VM already: restore in a new one (vessel serve, or vessel \
             run --restore DIR)",
        ))
    }

    fn migrate_send(&self, req: MigrateSendRequest) -> Result<(), ApiError> {
        self.stopping()?;
        crate::migration::Addr::parse(&req.to).map_err(|e| ApiError::bad_request(e.to_string()))?;
        crate::migration::seal::check_token(req.token.expose())
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let post_copy = req.if_not_converged() == api::types::IfNotConverged::PostCopy;
        if req.post_copy
            && req
                .if_not_converged
                .is_some_and(|p| !matches!(p, api::types::IfNotConverged::PostCopy))
        {
            return Err(ApiError::bad_request(
                "post_copy contradicts if_not_converged: give one of them",
            ));
        }
        if req.max_rounds.is_some_and(|n| !(1..=1000).contains(&n)) {
            return Err(ApiError::bad_request("max_rounds must be 1 to 1000"));
        }
        match req.post_copy_after_rounds {
            Some(_) if !post_copy => {
                return Err(ApiError::bad_request(
                    "post_copy_after_rounds needs post_copy",
                ))
            }
            Some(0) => {
                return Err(ApiError::bad_request(
                    "post_copy_after_rounds must be at least 1",
                ))
            }
            _ => {}
        }
        let mut slot = lock(&self.migration);
        if slot
            .as_ref()
            .is_some_and(|m| !lock(&m.status).phase.is_finished())
        {
            return Err(ApiError::conflict("a migration is running already"));
        }
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| ApiError::internal("the VM is going away"))?;
        let out = Arc::new(Outgoing::default());
        // Started, as far as a client polling the status can tell, before this returns.
        lock(&out.status).phase = api::types::MigrationPhase::Setup;
        *slot = Some(out.clone());
        drop(slot);
        jail::seccomp::spawn(
            jail::seccomp::ThreadClass::Migration,
            "vessel-migrate".into(),
            move || {
                match crate::migration::send(&me, &req, &out) {
                    Ok(downtime) => {
                        tracing::info!("migrated to {} (downtime {downtime:?})", req.to);
                        // Let a client following the migration see it complete, briefly.
                        let until = Instant::now() + Duration::from_secs(3);
                        while !out.final_status_read.load(Ordering::SeqCst)
                            && Instant::now() < until
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        me.control
                            .request_exit(ExitReason::Migrated(req.to.clone()));
                    }
                    Err(e @ crate::migration::MigrationError::Postcopy(_)) => {
                        // The VM runs on the target: this side must never resume it.
                        tracing::error!("migration to {}: {e}", req.to);
                        me.control.request_exit(ExitReason::Error(e.to_string()));
                    }
                    Err(e) => tracing::warn!("migration to {} failed: {e}", req.to),
                }
            },
        )
        .map_err(|e| ApiError::internal(format!("cannot start the migration: {e}")))?;
        Ok(())
    }

    fn migrate_receive(
        &self,
        _req: MigrateReceiveRequest,
    ) -> Result<api::types::MigrateReceiveResponse, ApiError> {
        Err(ApiError::conflict(
            "this process runs a VM already: receive a migration in a new one (vessel serve)",
        ))
    }

    fn migration_status(&self) -> Result<MigrationStatus, ApiError> {
        Ok(match lock(&self.migration).as_ref() {
            Some(m) => m.status(),
            None => MigrationStatus::default(),
        })
    }

    fn migrate_cancel(&self) -> Result<(), ApiError> {
        match lock(&self.migration).as_ref() {
            Some(m) if lock(&m.status).phase == api::types::MigrationPhase::Postcopy => {
                Err(ApiError::conflict(
                    "post-copy cannot be cancelled: the VM runs on the target already",
                ))
            }
            Some(m) if !lock(&m.status).phase.is_finished() => {
                if m.cancel.cancel() {
                    Ok(())
                } else {
                    Err(ApiError::conflict(
                        "the migration is committed: the VM belongs to the target now",
                    ))
                }
            }
            _ => Err(ApiError::conflict("no migration is running")),
        }
    }

    fn balloon(&self) -> Result<BalloonInfo, ApiError> {
        let b = self.balloon_handle()?;
        let stats_queue = self
            .machine
            .config
            .spec
            .balloon
            .as_ref()
            .is_some_and(|c| c.stats);
        if stats_queue {
            // The guest sends fresh statistics when its buffer comes back: they are for the
            // next call. A driver that did not negotiate the queue is not holding a buffer,
            // and the request is a no-op; without a driver there is nothing to ask.
            match b.request_stats() {
                Ok(()) | Err(BalloonError::NotActive) => {}
                Err(e) => tracing::warn!("virtio-balloon: statistics request: {e}"),
            }
        }
        Ok(BalloonInfo {
            target_bytes: b.target(),
            actual_bytes: b.actual(),
            stats: b.stats().map(|s| stats_map(&s)),
        })
    }

    fn set_balloon(&self, req: BalloonSetRequest) -> Result<(), ApiError> {
        let b = self.balloon_handle()?;
        self.stopping()?;
        // As `--balloon size=` at boot: a balloon of all of memory leaves the guest nothing.
        if req.target_bytes >= self.memory {
            return Err(ApiError::bad_request(format!(
                "the balloon target {} is not below the guest memory of {}",
                crate::config::format_size(req.target_bytes),
                crate::config::format_size(self.memory)
            )));
        }
        b.set_target(req.target_bytes);
        tracing::info!(
            "balloon target set to {}",
            crate::config::format_size(b.target())
        );
        Ok(())
    }

    fn counters(&self) -> Result<VmCounters, ApiError> {
        // Atomic loads only: the same whether the VM runs, is paused or is stopping.
        Ok(counters(&self.machine))
    }
}

/// The counters of `machine`'s vCPUs, disks and network devices now.
pub(crate) fn counters(machine: &crate::vm::Machine) -> VmCounters {
    VmCounters {
        vcpus: machine
            .vcpu_counters
            .iter()
            .enumerate()
            .map(|(i, c)| c.snapshot(i as u32))
            .collect(),
        disks: machine
            .virtio
            .disk_counters
            .iter()
            .enumerate()
            .map(|(i, c)| disk_counters(i, c.snapshot()))
            .collect(),
        nics: machine
            .virtio
            .nic_counters
            .iter()
            .enumerate()
            .map(|(i, c)| nic_counters(i, c.snapshot()))
            .collect(),
    }
}

/// Disk `index`'s counters, named as `vm.info` names its device.
fn disk_counters(index: usize, s: BlockCountersSnapshot) -> DiskCounters {
    DiskCounters {
        id: device_id("block", index),
        index: index as u32,
        read_ops: s.read_ops,
        read_bytes: s.read_bytes,
        write_ops: s.write_ops,
        write_bytes: s.write_bytes,
        flush_ops: s.flush_ops,
        discard_ops: s.discard_ops,
        write_zeroes_ops: s.write_zeroes_ops,
        errors: s.errors,
    }
}

/// Network device `index`'s counters, named as `vm.info` names it.
fn nic_counters(index: usize, s: NetCountersSnapshot) -> NicCounters {
    NicCounters {
        id: device_id("net", index),
        index: index as u32,
        rx_packets: s.rx_packets,
        rx_bytes: s.rx_bytes,
        rx_dropped: s.rx_dropped,
        tx_packets: s.tx_packets,
        tx_bytes: s.tx_bytes,
        tx_dropped: s.tx_dropped,
    }
}

/// The `id` of the `i`-th virtio device of `kind` (`block0`, `net1`).
fn device_id(kind: &str, i: usize) -> String {
    format!("{kind}{i}")
}

/// The statistics the guest sent, by their API names (tags this device does not name are
/// left out).
fn stats_map(s: &BalloonStats) -> BTreeMap<String, u64> {
    let named = [
        s.swap_in,
        s.swap_out,
        s.major_faults,
        s.minor_faults,
        s.free_memory,
        s.total_memory,
        s.available_memory,
        s.disk_caches,
        s.hugetlb_allocations,
        s.hugetlb_failures,
    ];
    api::types::BALLOON_STATS
        .iter()
        .zip(named)
        .filter_map(|(name, v)| Some((name.to_string(), v?)))
        .collect()
}

/// The devices of a VM built from `config`, in the order `virtio::setup` places them;
/// `disk_engines` are the engines serving its disks.
pub fn device_list(
    config: &crate::config::VmConfig,
    disk_engines: &[devices::virtio::block::EngineKind],
) -> Vec<DeviceInfo> {
    use crate::config::Transport;
    let mut list = vec![DeviceInfo {
        id: "serial0".into(),
        kind: "serial".into(),
        address: Some(format!("pio {:#x}", arch::acpi::COM1_PORT)),
        irq: Some(arch::acpi::COM1_IRQ),
        detail: None,
        path: None,
    }];
    let mut kinds: Vec<(&str, usize)> = vec![
        ("block", config.spec.disks.len()),
        ("net", config.spec.nets.len()),
        ("rng", usize::from(config.spec.rng)),
        ("vsock", usize::from(config.spec.vsock.is_some())),
        ("console", usize::from(config.spec.virtio_console)),
        ("balloon", usize::from(config.spec.balloon.is_some())),
    ];
    kinds.retain(|(_, n)| *n > 0);
    let mut slot = 0usize;
    for (kind, n) in kinds {
        for i in 0..n {
            let (address, irq) = match config.spec.transport {
                Transport::Mmio => (
                    format!(
                        "mmio {:#x}",
                        arch::layout::VIRTIO_MMIO_BASE
                            + slot as u64 * arch::layout::VIRTIO_MMIO_SIZE
                    ),
                    arch::layout::VIRTIO_MMIO_IRQS.get(slot).copied(),
                ),
                Transport::Pci => (format!("pci 00:{:02x}.0", slot + 1), None),
            };
            let detail = match (kind, config.spec.disks.get(i)) {
                ("block", Some(d)) => Some(disk_detail(d, disk_engines.get(i).copied())),
                // The network backend: `tap vtap0`, `socket PATH` or `passt`.
                ("net", _) => config.bindings.nets.get(i).map(|b| b.describe()),
                _ => None,
            };
            let path = match kind {
                "block" => config
                    .bindings
                    .disks
                    .get(i)
                    .map(|p| p.display().to_string()),
                _ => None,
            };
            list.push(DeviceInfo {
                id: device_id(kind, i),
                kind: format!("virtio-{kind}"),
                address: Some(address),
                irq,
                detail,
                path,
            });
            slot += 1;
        }
    }
    list
}

/// `engine io_uring, cache none, 2 queues, read-only, bw 10M/s, iops 100/s`.
fn disk_detail(
    d: &crate::config::Disk,
    engine: Option<devices::virtio::block::EngineKind>,
) -> String {
    let mut parts = vec![
        format!("engine {}", engine.unwrap_or(d.engine)),
        format!("cache {}", d.cache.as_str()),
    ];
    if d.queues > 1 {
        parts.push(format!("{} queues", d.queues));
    }
    if d.read_only {
        parts.push("read-only".into());
    }
    if let Some(b) = d.rate_limit.bandwidth {
        parts.push(format!("bw {}/s", b.size));
    }
    if let Some(o) = d.rate_limit.ops {
        parts.push(format!("iops {}", o.size));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_by_name() {
        let s = BalloonStats {
            swap_in: Some(1),
            free_memory: Some(4096),
            hugetlb_failures: Some(0),
            other: vec![(42, 7)],
            ..Default::default()
        };
        let m = stats_map(&s);
        assert_eq!(
            m,
            [
                ("free_memory".to_string(), 4096),
                ("hugetlb_failures".to_string(), 0),
                ("swap_in".to_string(), 1),
            ]
            .into()
        );
        assert!(stats_map(&BalloonStats::default()).is_empty());
    }

    #[test]
    fn counters_name_their_devices_as_info_does() {
        let spec = crate::config::VmSpec {
            disks: vec![crate::config::Disk::default(); 2],
            nets: vec![crate::config::Nic::default()],
            rng: true,
            ..Default::default()
        };
        let bindings = crate::config::HostBindings {
            disks: vec!["/a.raw".into(), "/b.qcow2".into()],
            nets: vec![crate::config::NetBinding::Tap("tap0".into())],
            ..Default::default()
        };
        let config = crate::config::VmConfig::new(spec, bindings);
        let ids = |kind: &str| -> Vec<String> {
            device_list(&config, &[])
                .into_iter()
                .filter(|d| d.kind == kind)
                .map(|d| d.id)
                .collect()
        };
        let blk = BlockCountersSnapshot {
            read_ops: 1,
            read_bytes: 512,
            write_ops: 2,
            write_bytes: 4096,
            flush_ops: 3,
            discard_ops: 4,
            write_zeroes_ops: 5,
            errors: 6,
        };
        let disks: Vec<DiskCounters> = (0..2).map(|i| disk_counters(i, blk)).collect();
        assert_eq!(
            disks.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            ids("virtio-block")
        );
        assert_eq!(
            disks[1],
            DiskCounters {
                id: "block1".into(),
                index: 1,
                read_ops: 1,
                read_bytes: 512,
                write_ops: 2,
                write_bytes: 4096,
                flush_ops: 3,
                discard_ops: 4,
                write_zeroes_ops: 5,
                errors: 6,
            }
        );
        let net = NetCountersSnapshot {
            rx_packets: 1,
            rx_bytes: 60,
            rx_dropped: 2,
            tx_packets: 3,
            tx_bytes: 180,
            tx_dropped: 4,
        };
        let nic = nic_counters(0, net);
        assert_eq!(vec![nic.id.clone()], ids("virtio-net"));
        assert_eq!(
            (nic.index, nic.rx_packets, nic.rx_bytes, nic.rx_dropped),
            (0, 1, 60, 2)
        );
        assert_eq!((nic.tx_packets, nic.tx_bytes, nic.tx_dropped), (3, 180, 4));
    }
}
