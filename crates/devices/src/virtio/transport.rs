//! What the virtio-mmio and virtio-pci transports share (virtio 1.2 §2.1, §3.1): the device
//! status state machine, feature negotiation, the queue registers and their validation,
//! activation at `DRIVER_OK`, reset, and pause, resume, state and restore of the device and its
//! queues. Each transport owns a [`TransportCore`] and adds only its register layout and its
//! interrupt delivery (a [`TransportInterrupt`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use guestmem::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    feature, has_feature, ActivateError, ActiveQueue, QueueSnapshot, VirtioDevice,
    VirtioDeviceState, VirtioInterrupt, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Errors of the shared transport logic; both transports' errors wrap them.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
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

/// A transport's interrupt state, shared with the device's workers.
pub trait TransportInterrupt: VirtioInterrupt + 'static {
    /// The device-set `NEEDS_RESET` status bit.
    fn needs_reset(&self) -> &AtomicBool;
    /// A reset: forget pending interrupts (and vector assignments).
    fn reset(&self);
    /// A restored device started serving: raise again what the old process may have raised
    /// for a pending interrupt (a spurious one is harmless).
    fn restarted(&self);
}

/// Which ring address a queue register holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    Desc,
    Avail,
    Used,
}

/// Which part of a 64-bit value a register write sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Low,
    High,
    Whole,
}

impl Half {
    /// `old` with this part replaced by `v`.
    fn splice(self, old: u64, v: u64) -> u64 {
        match self {
            Half::Low => (old & !0xffff_ffff) | v,
            Half::High => (old & 0xffff_ffff) | (v << 32),
            Half::Whole => v,
        }
    }
}

/// What the driver wrote into one queue's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegs {
    pub max_size: u16,
    /// 0 for a value that does not fit 16 bits (invalid either way).
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Ring positions to start from (non-zero only after a restore).
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueueRegs {
    pub fn new(max_size: u16) -> Self {
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
    pub fn build(&self, event_idx: bool, mem: &GuestMem) -> Result<Queue, String> {
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

    pub fn snapshot(&self) -> QueueSnapshot {
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

    fn from_snapshot(s: &QueueSnapshot) -> Self {
        QueueRegs {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc: s.desc_table,
            avail: s.avail_ring,
            used: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }
}

/// The state both transports save (each in its own serde struct, with its interrupt state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreState {
    /// Device status as the driver set it (without `NEEDS_RESET`).
    pub status: u32,
    pub needs_reset: bool,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: VirtioDeviceState,
}

/// The transport logic common to virtio-mmio and virtio-pci, around a device and the
/// transport's interrupt state `S`.
pub struct TransportCore<S> {
    /// "virtio-mmio" or "virtio-pci", for the log.
    name: &'static str,
    pub device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    pub shared: Arc<S>,
    notifiers: Vec<EventFd>,
    pub queues: Vec<QueueRegs>,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    active: bool,
    /// A restored running device, validated and waiting for [`TransportCore::resume`].
    restored: Option<Vec<ActiveQueue>>,
}

impl<S: TransportInterrupt> TransportCore<S> {
    /// The core for `device` (its queue count checked by the caller): one eventfd per queue.
    pub fn new(
        name: &'static str,
        mem: GuestMem,
        device: Box<dyn VirtioDevice>,
        shared: Arc<S>,
    ) -> Result<Self, TransportError> {
        let sizes = device.queue_max_sizes().to_vec();
        let notifiers = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TransportCore {
            name,
            device,
            mem,
            shared,
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

    /// One eventfd per queue, in queue order: signalled on a notification.
    pub fn queue_notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    /// Whether the driver has set `DRIVER_OK` and the device runs.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device status as the guest reads it.
    pub fn device_status(&self) -> u32 {
        let nr = if self.shared.needs_reset().load(Ordering::SeqCst) {
            STATUS_NEEDS_RESET
        } else {
            0
        };
        self.status | nr
    }

    /// The state to save. Take it with the vCPUs paused; the queues' ring positions come from
    /// the device's workers, which hold each queue's lock for a whole processing pass.
    pub fn state(&self) -> CoreState {
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
        CoreState {
            status: self.status,
            needs_reset: self.shared.needs_reset().load(Ordering::SeqCst),
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

    /// Serve again after [`TransportCore::pause`], or start a restored device. Nothing on a
    /// running or inactive device.
    pub fn resume(&mut self) -> Result<(), TransportError> {
        if let Some(queues) = self.restored.take() {
            let interrupt: Arc<dyn VirtioInterrupt> = self.shared.clone();
            self.device
                .activate(self.mem.clone(), interrupt, queues)
                .map_err(TransportError::Device)?;
            self.shared.restarted();
            return Ok(());
        }
        if self.active {
            self.device.resume().map_err(TransportError::Device)?;
        }
        Ok(())
    }

    /// Whether saved queues fit this device, on a transport that may be restored.
    pub fn check_restore(&self, saved: &[QueueSnapshot]) -> Result<(), TransportError> {
        if self.active {
            return Err(TransportError::Active);
        }
        if saved.len() != self.queues.len() {
            return Err(TransportError::QueueCount {
                saved: saved.len(),
                now: self.queues.len(),
            });
        }
        for (i, (saved, regs)) in saved.iter().zip(&self.queues).enumerate() {
            if saved.max_size != regs.max_size {
                return Err(TransportError::Queue(
                    i as u16,
                    format!(
                        "maximum size {} saved, {} now",
                        saved.max_size, regs.max_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Restore saved state (checked with [`TransportCore::check_restore`]) into a fresh
    /// transport whose device was built with the same backend and options;
    /// `restore_interrupts` restores the transport's own interrupt state. A device that was
    /// running is left *paused*: its queues are checked now and it starts serving from the
    /// saved ring positions at [`TransportCore::resume`].
    pub fn restore(
        &mut self,
        s: &CoreState,
        restore_interrupts: impl FnOnce(&S),
    ) -> Result<(), TransportError> {
        self.device.reset();
        self.device
            .restore(&s.device)
            .map_err(TransportError::Device)?;
        self.queues = s.queues.iter().map(QueueRegs::from_snapshot).collect();
        self.status = s.status & !STATUS_NEEDS_RESET;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.shared
            .needs_reset()
            .store(s.needs_reset, Ordering::SeqCst);
        restore_interrupts(&self.shared);
        if self.status & STATUS_DRIVER_OK != 0 && !s.needs_reset {
            let queues = self
                .ready_queues()
                .map_err(|(i, e)| TransportError::Queue(i, e))?;
            self.restored = Some(queues);
            self.active = true;
        }
        Ok(())
    }

    /// A driver or machine reset: the device stops and forgets the driver.
    pub fn reset(&mut self) {
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
        self.shared.needs_reset().store(false, Ordering::SeqCst);
        self.shared.reset();
    }

    /// The queues the driver made ready, built and validated against guest memory, each with
    /// a clone of its notification eventfd: what [`VirtioDevice::activate`] takes. On error,
    /// the index of the offending queue and the reason.
    fn ready_queues(&self) -> Result<Vec<ActiveQueue>, (u16, String)> {
        let event_idx = has_feature(self.driver_features, VIRTIO_RING_F_EVENT_IDX);
        let mut active = Vec::new();
        for (i, (regs, fd)) in self.queues.iter().zip(&self.notifiers).enumerate() {
            if !regs.ready {
                continue;
            }
            let index = i as u16;
            let queue = regs.build(event_idx, &self.mem).map_err(|e| (index, e))?;
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

    /// Build the ready queues and start the device. On error, the index of the offending queue
    /// (or `u16::MAX` for the device itself) and the reason.
    fn activate(&mut self) -> Result<(), (u16, String)> {
        let active = self.ready_queues()?;
        let interrupt: Arc<dyn VirtioInterrupt> = self.shared.clone();
        self.device
            .activate(self.mem.clone(), interrupt, active)
            .map_err(|e| (u16::MAX, e.to_string()))?;
        self.active = true;
        Ok(())
    }

    /// A write to the device status: 0 resets; otherwise bits are only added, in order
    /// (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK), FEATURES_OK only for features the device
    /// offered, VERSION_1 included (then acknowledged to the device), and DRIVER_OK starts the
    /// device, or sets `NEEDS_RESET` if it cannot start.
    pub fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let Some((value, new)) = self.status_transition(value) else {
            return;
        };
        self.status = value;
        if new & STATUS_DRIVER_OK != 0 && value & STATUS_FAILED == 0 {
            if let Err((queue, reason)) = self.activate() {
                let name = self.name;
                if queue == u16::MAX {
                    crate::warn_limited!("{name}: device activation failed: {reason}");
                } else {
                    crate::warn_limited!("{name}: queue {queue} is invalid: {reason}");
                }
                self.shared.set_needs_reset();
            }
        }
    }

    /// The new status and the bits it newly sets, or `None` if the write is ignored.
    fn status_transition(&mut self, value: u32) -> Option<(u32, u32)> {
        let (name, old) = (self.name, self.status);
        // NEEDS_RESET is the device's to set; a driver writing back what it read may include it.
        let mut value = value & !STATUS_NEEDS_RESET;
        if value & old != old {
            tracing::debug!("{name}: status {value:#x} clears bits of {old:#x}; ignored");
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
                tracing::debug!("{name}: status {value:#x} out of order; ignored");
                return None;
            }
        }
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let driver = self.driver_features;
            if driver & !offered != 0 || !has_feature(driver, VIRTIO_F_VERSION_1) {
                tracing::debug!(
                    "{name}: driver features {driver:#x} not acceptable (offered {offered:#x})"
                );
                // FEATURES_OK stays clear: the driver reads it back and gives up.
                value &= !STATUS_FEATURES_OK;
            } else {
                self.device.ack_features(driver);
            }
        }
        Some((value, new))
    }

    /// The device features word that `device_features_sel` selects.
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver features word that `driver_features_sel` selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// A write to the driver features word that `driver_features_sel` selects (only between
    /// DRIVER and FEATURES_OK).
    pub fn write_driver_features(&mut self, v: u32) {
        let s = self.status;
        if s & STATUS_DRIVER == 0 || s & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 {
            tracing::debug!("{}: driver features written in state {s:#x}", self.name);
            return;
        }
        let v = u64::from(v);
        match self.driver_features_sel {
            0 => self.driver_features = Half::Low.splice(self.driver_features, v),
            1 => self.driver_features = Half::High.splice(self.driver_features, v),
            // Features past bit 63 do not exist; setting one fails FEATURES_OK.
            _ if v != 0 => self.driver_features |= feature(63),
            _ => {}
        }
    }

    /// The queue `queue_sel` selects, if any.
    pub fn selected_queue(&self) -> Option<&QueueRegs> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if queue register `reg` may be written now (features negotiated,
    /// device not yet running, queue not yet ready unless `reg` is the ready register).
    fn writable_queue(&mut self, reg: u64, is_ready_reg: bool) -> Option<&mut QueueRegs> {
        let ok = self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(q) if ok && (!q.ready || is_ready_reg) => Some(q),
            _ => {
                tracing::debug!(
                    "{}: queue register {reg:#x} written in state {:#x}; ignored",
                    self.name,
                    self.status
                );
                None
            }
        }
    }

    /// A write of the selected queue's size (register `reg`).
    pub fn write_queue_size(&mut self, reg: u64, size: u16) {
        if let Some(q) = self.writable_queue(reg, false) {
            q.size = size;
        }
    }

    /// A write of the selected queue's ready register `reg`.
    pub fn write_queue_ready(&mut self, reg: u64, v: u32) {
        if let Some(q) = self.writable_queue(reg, true) {
            q.ready = v == 1;
        }
    }

    /// A write of (part of) one of the selected queue's ring addresses (register `reg`).
    pub fn write_queue_address(&mut self, reg: u64, ring: Ring, half: Half, v: u64) {
        if let Some(q) = self.writable_queue(reg, false) {
            let field = match ring {
                Ring::Desc => &mut q.desc,
                Ring::Avail => &mut q.avail,
                Ring::Used => &mut q.used,
            };
            *field = half.splice(*field, v);
        }
    }

    /// The driver notified queue `q`: signal its eventfd.
    pub fn notify(&self, q: u64) {
        let name = self.name;
        match usize::try_from(q).ok().and_then(|i| self.notifiers.get(i)) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("{name}: queue {q} notify: {e}");
                }
            }
            None => tracing::debug!("{name}: notify of queue {q}, which does not exist"),
        }
    }
}
