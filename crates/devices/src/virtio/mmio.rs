//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! An [`MmioTransport`] is a [`BusDevice`] for a [`MMIO_WINDOW_SIZE`] window: registers below
//! [`CONFIG_OFFSET`], the device's configuration space from there. The VM monitor places it on
//! the MMIO bus, routes an interrupt line to it ([`Interrupt`], an irqfd), and tells the guest
//! where it is ([`cmdline_device`], or an ACPI device `LNRO0005` with the window and the IRQ).
//!
//! A `QueueNotify` write signals the queue's eventfd ([`MmioTransport::queue_notifiers`]); the
//! VM monitor may register the same eventfds as KVM ioeventfds at [`QUEUE_NOTIFY_OFFSET`] (4
//! bytes, datamatch = queue index) so that notifications never reach this code.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use guestmem::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    feature, has_feature, ActivateError, ActiveQueue, QueueSnapshot, VirtioDevice,
    VirtioDeviceState, VirtioInterrupt, VirtioInterruptType, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::{BusDevice, Interrupt};

/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio-mmio version implemented (2: virtio 1.0 and later, no legacy interface).
pub const VERSION: u32 = 2;
/// Vendor ID reported to the guest ("VSSL").
pub const VENDOR_ID: u32 = 0x4c53_5356;
/// Size of the window each device takes on the MMIO bus (one page, so that each device's
/// registers can later be trapped or mapped separately).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the `QueueNotify` register, for ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Interrupt status bits.
pub const INT_USED_BUFFER: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(crate) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(crate) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(crate) const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const REG_QUEUE_NUM: u64 = 0x038;
pub(crate) const REG_QUEUE_READY: u64 = 0x044;
pub(crate) const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
pub(crate) const REG_STATUS: u64 = 0x070;
pub(crate) const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub(crate) const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub(crate) const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub(crate) const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(crate) const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub(crate) const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// The `virtio_mmio.device=` kernel parameter that declares a device to Linux (needs
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn cmdline_device(base: u64, irq: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{base:#x}:{irq}",
        MMIO_WINDOW_SIZE / 1024
    )
}

/// The queues the driver made ready, built and validated against guest memory, each with a
/// clone of its notification eventfd: what [`VirtioDevice::activate`] takes. On error, the
/// index of the offending queue and the reason. Shared by the mmio and pci transports.
pub(crate) fn ready_queues(
    queues: &[QueueRegs],
    notifiers: &[EventFd],
    mem: &GuestMem,
    event_idx: bool,
) -> Result<Vec<ActiveQueue>, (u16, String)> {
    let mut active = Vec::new();
    for (i, (regs, fd)) in queues.iter().zip(notifiers).enumerate() {
        if !regs.ready {
            continue;
        }
        let index = i as u16;
        let queue = regs.build(event_idx, mem).map_err(|e| (index, e))?;
        let notifier = fd
            .try_clone()
            .map_err(|e| (index, format!("eventfd: {e}")))?;
        active.push(ActiveQueue {
            index,
            queue,
            notifier,
        });
    }
    Ok(active)
}

/// The device-status rules both transports share: bits are only added, in order
/// (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK), and FEATURES_OK is only accepted for features
/// the device offered, VERSION_1 included (then acknowledged to the device). Returns the new
/// status and the bits it newly sets, or `None` if the write is ignored. A write of 0 (reset)
/// is the caller's.
pub(crate) fn status_transition(
    transport: &str,
    old: u32,
    value: u32,
    device: &mut dyn VirtioDevice,
    driver_features: u64,
) -> Option<(u32, u32)> {
    // NEEDS_RESET is the device's to set; a driver writing back what it read may include it.
    let mut value = value & !STATUS_NEEDS_RESET;
    if value & old != old {
        tracing::debug!("{transport}: status {value:#x} clears bits of {old:#x}; ignored");
        return None;
    }
    let new = value & !old;
    let requires = [
        (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
        (STATUS_FEATURES_OK, STATUS_DRIVER),
        (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
    ];
    for (bit, needed) in requires {
        if new & bit != 0 && value & needed == 0 {
            tracing::debug!("{transport}: status {value:#x} out of order; ignored");
            return None;
        }
    }
    if new & STATUS_FEATURES_OK != 0 {
        let offered = device.features();
        if driver_features & !offered != 0 || !has_feature(driver_features, VIRTIO_F_VERSION_1) {
            tracing::debug!(
                "{transport}: driver features {driver_features:#x} not acceptable (offered {offered:#x})"
            );
            // FEATURES_OK stays clear: the driver reads it back and gives up.
            value &= !STATUS_FEATURES_OK;
        } else {
            device.ack_features(driver_features);
        }
    }
    Some((value, new))
}

/// Logs why activation at DRIVER_OK failed (the caller then sets NEEDS_RESET).
pub(crate) fn log_activation_failure(transport: &str, queue: u16, reason: &str) {
    if queue == u16::MAX {
        tracing::warn!("{transport}: device activation failed: {reason}");
    } else {
        tracing::warn!("{transport}: queue {queue} is invalid: {reason}");
    }
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("device has {0} queues; at most 65535 are possible")]
    TooManyQueues(usize),
    #[error("cannot create queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("saved state has {saved} queues, the device {now}")]
    QueueCount { saved: usize, now: usize },
    #[error("cannot restore an active device; reset it first")]
    Active,
    #[error("restoring device state: {0}")]
    Device(#[source] ActivateError),
    #[error("saved queue {0} is invalid: {1}")]
    Queue(u16, String),
}

/// State shared with the device's workers: the interrupt status register, the device-set
/// `NEEDS_RESET` bit, and the interrupt line.
struct Shared {
    interrupt_status: AtomicU32,
    needs_reset: AtomicBool,
    irq: Arc<dyn Interrupt>,
}

impl VirtioInterrupt for Shared {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let bit = match kind {
            VirtioInterruptType::Config => INT_CONFIG_CHANGE,
            VirtioInterruptType::Queue(_) => INT_USED_BUFFER,
        };
        self.interrupt_status.fetch_or(bit, Ordering::SeqCst);
        self.irq.trigger()
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.trigger(VirtioInterruptType::Config) {
            tracing::warn!("virtio-mmio: config interrupt: {e}");
        }
    }
}

/// What the driver wrote into one queue's registers (shared with the PCI transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueRegs {
    pub(crate) max_size: u16,
    /// 0 for a value that does not fit 16 bits (invalid either way).
    pub(crate) size: u16,
    pub(crate) ready: bool,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    /// Ring positions to start from (non-zero only after a restore).
    pub(crate) next_avail: u16,
    pub(crate) next_used: u16,
}

impl QueueRegs {
    pub(crate) fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// A `Queue` from these registers, or why not.
    pub(crate) fn build(&self, event_idx: bool, mem: &GuestMem) -> Result<Queue, String> {
        let size = self.size;
        if size == 0 || !size.is_power_of_two() || size > self.max_size {
            return Err(format!(
                "size {size} (must be a power of two up to {})",
                self.max_size
            ));
        }
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(size).map_err(|e| e.to_string())?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| e.to_string())?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|e| e.to_string())?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|e| e.to_string())?;
        q.set_event_idx(event_idx);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(format!(
                "rings at {:#x}/{:#x}/{:#x} are not all in guest memory",
                self.desc, self.avail, self.used
            ));
        }
        Ok(q)
    }

    pub(crate) fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: false,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc,
            avail_ring: self.avail,
            used_ring: self.used,
        }
    }
}

/// The transport's state for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// Device status as the driver set it (without `NEEDS_RESET`).
    pub status: u32,
    pub needs_reset: bool,
    pub interrupt_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: VirtioDeviceState,
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    shared: Arc<Shared>,
    notifiers: Vec<EventFd>,
    queues: Vec<QueueRegs>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
    /// A restored running device, validated and waiting for [`MmioTransport::resume`].
    restored: Option<Vec<ActiveQueue>>,
}

impl MmioTransport {
    /// Put `device` behind virtio-mmio registers. `irq` is the device's interrupt line; `mem`
    /// is the guest memory its queues live in.
    pub fn new(
        mem: GuestMem,
        irq: Arc<dyn Interrupt>,
        device: Box<dyn VirtioDevice>,
    ) -> Result<MmioTransport, MmioError> {
        let sizes = device.queue_max_sizes().to_vec();
        if sizes.len() > usize::from(u16::MAX) {
            return Err(MmioError::TooManyQueues(sizes.len()));
        }
        let notifiers = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            shared: Arc::new(Shared {
                interrupt_status: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
                irq,
            }),
            notifiers,
            queues: sizes.into_iter().map(QueueRegs::new).collect(),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            restored: None,
        })
    }

    /// One eventfd per queue, in queue order: signalled on `QueueNotify`. Register them as
    /// ioeventfds at `base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch = the queue index.
    pub fn queue_notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport, to change its backend while it is paused (a disk
    /// snapshot switches a block device's disk).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Whether the driver has set `DRIVER_OK` and the device runs.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device status register as the guest reads it.
    pub fn device_status(&self) -> u32 {
        let nr = if self.shared.needs_reset.load(Ordering::SeqCst) {
            STATUS_NEEDS_RESET
        } else {
            0
        };
        self.status | nr
    }

    /// The state to save. Take it with the vCPUs paused; the queues' ring positions come from
    /// the device's workers, which hold each queue's lock for a whole processing pass.
    pub fn state(&self) -> VirtioMmioState {
        let mut queues: Vec<QueueSnapshot> = self.queues.iter().map(QueueRegs::snapshot).collect();
        let event_idx = has_feature(self.driver_features, VIRTIO_RING_F_EVENT_IDX);
        for q in queues.iter_mut().filter(|q| q.ready) {
            q.event_idx_enabled = event_idx;
        }
        if self.active {
            for (i, s) in self.device.queue_states() {
                if let Some(q) = queues.get_mut(usize::from(i)) {
                    q.next_avail = s.next_avail;
                    q.next_used = s.next_used;
                }
            }
        }
        VirtioMmioState {
            status: self.status,
            needs_reset: self.shared.needs_reset.load(Ordering::SeqCst),
            interrupt_status: self.shared.interrupt_status.load(Ordering::SeqCst),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            queues,
            device: self.device.state(),
        }
    }

    /// Stop the device's workers (see [`VirtioDevice::pause`]): when this returns the device
    /// writes nothing to guest memory and raises no interrupt. Idempotent; nothing on an
    /// inactive device.
    pub fn pause(&mut self) {
        // A restored device not yet started has nothing running.
        if self.active && self.restored.is_none() {
            self.device.pause();
        }
    }

    /// Serve again after [`MmioTransport::pause`], or start a restored device. Nothing on a
    /// running or inactive device.
    pub fn resume(&mut self) -> Result<(), MmioError> {
        if let Some(queues) = self.restored.take() {
            let interrupt: Arc<dyn VirtioInterrupt> = self.shared.clone();
            self.device
                .activate(self.mem.clone(), interrupt, queues)
                .map_err(MmioError::Device)?;
            if self.shared.interrupt_status.load(Ordering::SeqCst) != 0 {
                // An edge may have been lost with the old process; a spurious one is harmless.
                let _ = self.shared.irq.trigger();
            }
            return Ok(());
        }
        if self.active {
            self.device.resume().map_err(MmioError::Device)?;
        }
        Ok(())
    }

    /// Restore saved state into a fresh transport whose device was built with the same backend
    /// and options. A device that was running is left *paused*: its queues are checked now and
    /// it starts serving from the saved ring positions at [`MmioTransport::resume`] — call that
    /// once the VM's interrupt controllers are restored too, so that no interrupt the device
    /// raises is overwritten.
    pub fn restore(&mut self, state: &VirtioMmioState) -> Result<(), MmioError> {
        if self.active {
            return Err(MmioError::Active);
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                now: self.queues.len(),
            });
        }
        for (i, (saved, regs)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != regs.max_size {
                return Err(MmioError::Queue(
                    i as u16,
                    format!(
                        "maximum size {} saved, {} now",
                        saved.max_size, regs.max_size
                    ),
                ));
            }
        }
        self.device.reset();
        self.device
            .restore(&state.device)
            .map_err(MmioError::Device)?;
        self.queues = state
            .queues
            .iter()
            .map(|s| QueueRegs {
                max_size: s.max_size,
                size: s.size,
                ready: s.ready,
                desc: s.desc_table,
                avail: s.avail_ring,
                used: s.used_ring,
                next_avail: s.next_avail,
                next_used: s.next_used,
            })
            .collect();
        self.status = state.status & !STATUS_NEEDS_RESET;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.shared
            .needs_reset
            .store(state.needs_reset, Ordering::SeqCst);
        self.shared
            .interrupt_status
            .store(state.interrupt_status, Ordering::SeqCst);
        if self.status & STATUS_DRIVER_OK != 0 && !state.needs_reset {
            let event_idx = has_feature(self.driver_features, VIRTIO_RING_F_EVENT_IDX);
            let queues = ready_queues(&self.queues, &self.notifiers, &self.mem, event_idx)
                .map_err(|(i, e)| MmioError::Queue(i, e))?;
            self.restored = Some(queues);
            self.active = true;
        }
        Ok(())
    }

    /// A machine reset (the guest rebooted): the device stops and forgets the driver, as on a
    /// driver reset. (Configuration space, for PCI, is the caller's: restore its power-on
    /// state.)
    pub fn hard_reset(&mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.restored = None;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shared.interrupt_status.store(0, Ordering::SeqCst);
        self.shared.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Build the ready queues and start the device. On error, the index of the offending queue
    /// (or `u16::MAX` for the device itself) and the reason.
    fn activate(&mut self) -> Result<(), (u16, String)> {
        let event_idx = has_feature(self.driver_features, VIRTIO_RING_F_EVENT_IDX);
        let active = ready_queues(&self.queues, &self.notifiers, &self.mem, event_idx)?;
        let interrupt: Arc<dyn VirtioInterrupt> = self.shared.clone();
        self.device
            .activate(self.mem.clone(), interrupt, active)
            .map_err(|e| (u16::MAX, e.to_string()))?;
        self.active = true;
        Ok(())
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let Some((value, new)) = status_transition(
            "virtio-mmio",
            self.status,
            value,
            &mut *self.device,
            self.driver_features,
        ) else {
            return;
        };
        self.status = value;
        if new & STATUS_DRIVER_OK != 0 && value & STATUS_FAILED == 0 {
            if let Err((queue, reason)) = self.activate() {
                log_activation_failure("virtio-mmio", queue, &reason);
                self.shared.set_needs_reset();
            }
        }
    }

    /// The selected queue, if queue registers may be written now (features negotiated, device
    /// not yet running, queue not yet ready).
    fn writable_queue(&mut self, reg: u64) -> Option<&mut QueueRegs> {
        let ok = self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        let q = self.queues.get_mut(self.queue_sel as usize);
        match q {
            Some(q) if ok && (!q.ready || reg == REG_QUEUE_READY) => Some(q),
            _ => {
                tracing::debug!(
                    "virtio-mmio: queue register {reg:#x} written in state {:#x}; ignored",
                    self.status
                );
                None
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let sel_queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => sel_queue.map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => sel_queue.map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.shared.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => self.device_status(),
            // No shared memory regions: length (and base) all ones.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES => {
                let s = self.status;
                if s & STATUS_DRIVER == 0 || s & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 {
                    tracing::debug!("virtio-mmio: driver features written in state {s:#x}");
                    return;
                }
                let v = u64::from(v);
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    // Features past bit 63 do not exist; setting one fails FEATURES_OK.
                    _ if v != 0 => self.driver_features |= feature(63),
                    _ => {}
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.writable_queue(offset) {
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.writable_queue(offset) {
                    q.ready = v == 1;
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.writable_queue(offset) {
                    let field = match offset {
                        REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => &mut q.desc,
                        REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => &mut q.avail,
                        _ => &mut q.used,
                    };
                    let v = u64::from(v);
                    *field = if offset & 4 == 0 {
                        (*field & !0xffff_ffff) | v
                    } else {
                        (*field & 0xffff_ffff) | (v << 32)
                    };
                }
            }
            QUEUE_NOTIFY_OFFSET => match self.notifiers.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: queue {v} notify: {e}");
                    }
                }
                None => tracing::debug!("virtio-mmio: notify of queue {v}, which does not exist"),
            },
            REG_INTERRUPT_ACK => {
                self.shared.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            REG_STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: write of {v:#x} to {offset:#x} ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write to {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{mem, TestQueue, AVAIL, DESC, R, USED, W};
    use std::sync::Mutex;
    use virtio_queue::QueueState;

    #[derive(Default, Debug)]
    struct Log {
        acked: u64,
        activated: Vec<(u16, u16, u64, u16)>,
        resets: u32,
        pauses: u32,
        resumes: u32,
    }

    struct Dummy {
        log: Arc<Mutex<Log>>,
        acked: u64,
        config: [u8; 8],
        queues: Vec<(u16, QueueState)>,
    }

    const DUMMY_FEATURES: u64 = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX) | 1;

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            DUMMY_FEATURES
        }
        fn ack_features(&mut self, f: u64) {
            self.acked = f;
            self.log.lock().unwrap().acked = f;
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn config_len(&self) -> usize {
            8
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMem,
            _interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            let mut log = self.log.lock().unwrap();
            for q in &queues {
                log.activated.push((
                    q.index,
                    q.queue.size(),
                    q.queue.desc_table(),
                    q.queue.next_avail(),
                ));
            }
            self.queues = queues.iter().map(|q| (q.index, q.queue.state())).collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.acked = 0;
            self.queues.clear();
            self.log.lock().unwrap().resets += 1;
        }
        fn queue_states(&self) -> Vec<(u16, QueueState)> {
            self.queues.clone()
        }
        fn pause(&mut self) {
            self.log.lock().unwrap().pauses += 1;
        }
        fn resume(&mut self) -> Result<(), ActivateError> {
            self.log.lock().unwrap().resumes += 1;
            Ok(())
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Log>>, Arc<EventFd>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let dev = Dummy {
            log: log.clone(),
            acked: 0,
            config: *b"vessel!!",
            queues: Vec::new(),
        };
        let t = MmioTransport::new(mem(), irq.clone(), Box::new(dev)).unwrap();
        (t, log, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        r(t, REG_STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, desc: u64, avail: u64, used: u64) {
        w(t, REG_QUEUE_SEL, sel);
        assert_eq!(r(t, REG_QUEUE_READY), 0);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, desc as u32);
        w(t, REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w(t, REG_QUEUE_DRIVER_LOW, avail as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        w(t, REG_QUEUE_DEVICE_LOW, used as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        w(t, REG_QUEUE_READY, 1);
    }

    const OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

    #[test]
    fn identification_and_features() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(r(&mut t, REG_VENDOR_ID), VENDOR_ID);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), DUMMY_FEATURES as u32);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 8);
        w(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        // Config space, any width; past its end: zero.
        let mut b = [0u8; 2];
        t.read(CONFIG_OFFSET + 1, &mut b);
        assert_eq!(&b, b"es");
        let mut b = [0xffu8; 4];
        t.read(CONFIG_OFFSET + 6, &mut b);
        assert_eq!(b, [b'!', b'!', 0, 0]);
        // Narrow or misaligned register reads: zero.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(REG_MAGIC + 1, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn status_machine_and_feature_negotiation() {
        let (mut t, log, _) = transport();
        // DRIVER before ACKNOWLEDGE: ignored.
        w(&mut t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        // Features the device did not offer: FEATURES_OK refused.
        assert_eq!(negotiate(&mut t, DUMMY_FEATURES | 2), 3);
        assert_eq!(log.lock().unwrap().acked, 0);
        w(&mut t, REG_STATUS, 0);
        // Without VERSION_1: refused.
        assert_eq!(negotiate(&mut t, 1), 3);
        w(&mut t, REG_STATUS, 0);
        // A subset with VERSION_1: accepted.
        let f = feature(VIRTIO_F_VERSION_1) | 1;
        assert_eq!(negotiate(&mut t, f), OK);
        assert_eq!(log.lock().unwrap().acked, f);
        // Features cannot change after FEATURES_OK.
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 0);
        assert_eq!(t.driver_features, f);
        // Clearing a bit without a reset: ignored.
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(r(&mut t, REG_STATUS), OK);
        // DRIVER_OK with no queue ready: the dummy accepts it.
        w(&mut t, REG_STATUS, OK | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, REG_STATUS), OK | STATUS_DRIVER_OK);
        assert!(t.is_active());
        // Reset.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert!(!t.is_active());
        assert!(log.lock().unwrap().resets >= 3);
    }

    #[test]
    fn queue_setup_activation_and_notify() {
        let (mut t, log, _) = transport();
        // Queue registers before FEATURES_OK are ignored.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        assert_eq!(negotiate(&mut t, feature(VIRTIO_F_VERSION_1)), OK);
        setup_queue(&mut t, 0, 16, DESC, AVAIL, USED);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        // Writes to a ready queue are ignored.
        w(&mut t, REG_QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size, 16);
        w(&mut t, REG_STATUS, OK | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, REG_STATUS), OK | STATUS_DRIVER_OK);
        assert_eq!(log.lock().unwrap().activated, vec![(0, 16, DESC, 0)]);
        // Queue registers after DRIVER_OK are ignored.
        w(&mut t, REG_QUEUE_SEL, 1);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // Notify signals the queue's eventfd; a bad index is ignored.
        w(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        w(&mut t, QUEUE_NOTIFY_OFFSET, 7);
        assert_eq!(t.queue_notifiers()[0].read().unwrap(), 1);
        assert!(t.queue_notifiers()[1].read().is_err());
    }

    #[test]
    fn invalid_queues_need_reset() {
        let cases: [(u32, u64, u64, u64); 5] = [
            (3, DESC, AVAIL, USED),           // not a power of two
            (32, DESC, AVAIL, USED),          // over the maximum
            (0, DESC, AVAIL, USED),           // zero
            (16, 0x1_0000_0000, AVAIL, USED), // outside guest memory
            (16, DESC + 1, AVAIL, USED),      // misaligned
        ];
        for (size, desc, avail, used) in cases {
            let (mut t, log, irq) = transport();
            assert_eq!(negotiate(&mut t, feature(VIRTIO_F_VERSION_1)), OK);
            setup_queue(&mut t, 0, size, desc, avail, used);
            w(&mut t, REG_STATUS, OK | STATUS_DRIVER_OK);
            assert_eq!(
                r(&mut t, REG_STATUS),
                OK | STATUS_DRIVER_OK | STATUS_NEEDS_RESET,
                "size {size} desc {desc:#x}"
            );
            assert!(!t.is_active());
            assert!(log.lock().unwrap().activated.is_empty());
            assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
            assert_eq!(irq.read().unwrap(), 1);
            w(&mut t, REG_INTERRUPT_ACK, INT_CONFIG_CHANGE);
            assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
            // The driver's reset clears it all.
            w(&mut t, REG_STATUS, 0);
            assert_eq!(r(&mut t, REG_STATUS), 0);
            assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        }
    }

    #[test]
    fn interrupts_set_status_bits() {
        let (t, _, irq) = transport();
        t.shared.trigger(VirtioInterruptType::Queue(0)).unwrap();
        t.shared.trigger(VirtioInterruptType::Config).unwrap();
        let mut t = t;
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 3);
        assert_eq!(irq.read().unwrap(), 2);
        w(&mut t, REG_INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    }

    #[test]
    fn state_round_trip_reactivates() {
        let (mut t, _, _) = transport();
        let f = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(negotiate(&mut t, f), OK);
        setup_queue(&mut t, 1, 8, DESC, AVAIL, USED);
        w(&mut t, REG_STATUS, OK | STATUS_DRIVER_OK);
        let mut state = t.state();
        assert!(state.queues[1].event_idx_enabled);
        // Pretend the device had served 5 chains.
        state.queues[1].next_avail = 5;
        let json = serde_json::to_string(&state).unwrap();
        let back: VirtioMmioState = serde_json::from_str(&json).unwrap();
        let (mut t2, log2, irq2) = transport();
        t2.restore(&back).unwrap();
        assert!(t2.is_active());
        assert_eq!(log2.lock().unwrap().acked, f);
        assert_eq!(r(&mut t2, REG_STATUS), OK | STATUS_DRIVER_OK);
        // Restored paused: the device starts at resume, from the saved positions.
        assert!(log2.lock().unwrap().activated.is_empty());
        assert_eq!(
            t2.state(),
            back,
            "the state of a restored, paused transport"
        );
        t2.pause();
        assert_eq!(log2.lock().unwrap().pauses, 0, "nothing to pause yet");
        t2.resume().unwrap();
        assert_eq!(log2.lock().unwrap().activated, vec![(1, 8, DESC, 5)]);
        assert!(irq2.read().is_err(), "no interrupt was pending");
        t2.pause();
        t2.pause();
        t2.resume().unwrap();
        let counts = {
            let l = log2.lock().unwrap();
            (l.pauses, l.resumes)
        };
        assert_eq!(counts, (2, 1));
        assert_eq!(log2.lock().unwrap().activated.len(), 1);
        // A mismatching device is refused.
        let mut bad = back.clone();
        bad.device.device_type = 7;
        let (mut t3, _, _) = transport();
        assert!(t3.restore(&bad).is_err());
        assert!(t2.restore(&back).is_err(), "active transport");
    }

    #[test]
    fn rng_end_to_end_through_registers() {
        let m = mem();
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(
            m.clone(),
            irq.clone(),
            Box::new(super::super::rng::Rng::new()),
        )
        .unwrap();
        assert_eq!(r(&mut t, REG_DEVICE_ID), 4);
        assert_eq!(negotiate(&mut t, feature(VIRTIO_F_VERSION_1)), OK);
        setup_queue(&mut t, 0, 16, DESC, AVAIL, USED);
        let mut tq = TestQueue::new(&m, 16);
        w(&mut t, REG_STATUS, OK | STATUS_DRIVER_OK);
        tq.add_chain(&[(0x10000, 64, W)]);
        tq.add_chain(&[(0x10100, 16, R)]);
        w(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        tq.wait_used(2);
        assert_eq!(tq.used(0), (0, 64));
        assert_eq!(tq.used(1), (1, 0));
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS) & INT_USED_BUFFER, 1);
        assert!(irq.read().unwrap() >= 1);
        // Reset stops the worker; the device comes back.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn cmdline() {
        assert_eq!(
            cmdline_device(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
