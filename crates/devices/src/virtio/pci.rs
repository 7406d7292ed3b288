//! The virtio-pci modern transport (virtio 1.2 §4.1).
//!
//! A [`VirtioPciDevice`] is a PCI function (vendor 0x1af4, device 0x1040 + type, revision 1)
//! with one 64-bit memory BAR ([`VIRTIO_BAR`], [`BAR_SIZE`] bytes) holding every structure:
//!
//! ```text
//! 0x0000  common configuration (0x38 bytes)   0x3000  notifications: queue N at 0x3000 + 4 N
//! 0x1000  ISR status (1 byte, read clears)    0x4000  MSI-X table (16 bytes per vector)
//! 0x2000  device configuration                0x6000  MSI-X PBA
//! ```
//!
//! The vendor capabilities COMMON/NOTIFY/ISR/DEVICE_CFG point there (notify_off_multiplier 4,
//! queue_notify_off = the queue index), then the MSI-X capability: one vector for configuration
//! changes and one per queue, as the driver assigns them (`VIRTIO_MSI_NO_VECTOR` = none). With
//! MSI-X disabled, interrupts set the ISR and pulse the optional INTx line.
//!
//! The status state machine, feature negotiation, queue validation, activation, reset and
//! pause/resume/state/restore are the virtio-mmio transport's too: both own a
//! [`TransportCore`](super::transport::TransportCore).

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use guestmem::GuestMem;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::transport::{CoreState, Half, Ring, TransportCore, TransportError, TransportInterrupt};
use super::{QueueSnapshot, VirtioDevice, VirtioDeviceState, VirtioInterrupt, VirtioInterruptType};
use crate::bus::lock;
use crate::pci::config::{CAP_ID_MSIX, CAP_ID_VENDOR};
use crate::pci::msix::{MsiVectors, Msix, MsixState};
use crate::pci::{BarKind, PciConfig, PciConfigState, PciDevice, PciError, PciHeader};
use crate::Interrupt;

/// The virtio PCI vendor ID.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The subsystem ID of modern devices.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
/// "No vector" in the MSI-X vector registers.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// The BAR holding every structure (64-bit: BARs 0 and 1).
pub const VIRTIO_BAR: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_LEN: u64 = 0x38;
pub const ISR_CFG_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_MAX: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Queues the notification area has room for.
pub const MAX_QUEUES: usize = 1024;
/// Vectors the table has room for (queues + 1 at most).
const MAX_VECTORS: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as usize;

/// `cfg_type` of the vendor capabilities.
pub const CAP_COMMON_CFG: u8 = 1;
pub const CAP_NOTIFY_CFG: u8 = 2;
pub const CAP_ISR_CFG: u8 = 3;
pub const CAP_DEVICE_CFG: u8 = 4;

/// ISR bits.
pub const ISR_QUEUE: u32 = 1;
pub const ISR_CONFIG: u32 = 2;

/// The guest address of queue `q`'s notification register in a BAR at `bar_addr`: register an
/// ioeventfd there (any width, no datamatch) with [`VirtioPciDevice::queue_notifiers`]`[q]`.
pub fn notify_address(bar_addr: u64, q: u16) -> u64 {
    bar_addr + NOTIFY_OFFSET + u64::from(q) * u64::from(NOTIFY_OFF_MULTIPLIER)
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("device has {0} queues; virtio-pci here supports {MAX_QUEUES}")]
    TooManyQueues(usize),
    #[error("PCI function: {0}")]
    Pci(#[from] PciError),
    #[error("saved state does not match this device: {0}")]
    StateMismatch(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// The PCI class of a virtio device type: (base class, subclass, programming interface).
fn class_of(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        1 => (0x02, 0x00, 0x00), // network controller
        2 => (0x01, 0x00, 0x00), // mass storage (as QEMU: SCSI)
        3 => (0x07, 0x80, 0x00), // communication: other
        _ => (0xff, 0x00, 0x00), // unclassified
    }
}

/// State shared with the device's workers.
struct Shared {
    isr: AtomicU32,
    needs_reset: AtomicBool,
    msix: Mutex<Msix>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    intx: Option<Arc<dyn Interrupt>>,
}

impl VirtioInterrupt for Shared {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let (bit, vector) = match kind {
            VirtioInterruptType::Config => (ISR_CONFIG, self.config_vector.load(Ordering::SeqCst)),
            VirtioInterruptType::Queue(q) => (
                ISR_QUEUE,
                self.queue_vectors
                    .get(usize::from(q))
                    .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst)),
            ),
        };
        self.isr.fetch_or(bit, Ordering::SeqCst);
        let mut msix = lock(&self.msix);
        if msix.enabled() {
            if vector == VIRTIO_MSI_NO_VECTOR {
                return Ok(());
            }
            return msix.notify(vector).map(|_| ());
        }
        drop(msix);
        match &self.intx {
            Some(line) => line.trigger(),
            None => Ok(()),
        }
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.trigger(VirtioInterruptType::Config) {
            tracing::warn!("virtio-pci: config interrupt: {e}");
        }
    }
}

impl TransportInterrupt for Shared {
    fn needs_reset(&self) -> &AtomicBool {
        &self.needs_reset
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
    }

    /// A level the old process asserted for a pending ISR: assert it again (MSI-X pending bits
    /// are in the restored PBA).
    fn restarted(&self) {
        self.resample();
    }
}

impl Shared {
    /// Assert the INTx line if an interrupt is pending in the ISR (and MSI-X is off).
    fn resample(&self) {
        if self.isr.load(Ordering::SeqCst) == 0 || lock(&self.msix).enabled() {
            return;
        }
        if let Some(line) = &self.intx {
            if let Err(e) = line.trigger() {
                tracing::warn!("virtio-pci: INTx: {e}");
            }
        }
    }
}

/// The INTx side of a function, for the VM monitor's resample loop.
#[derive(Clone)]
pub struct IntxHandle(Arc<Shared>);

impl IntxHandle {
    /// The guest's EOI de-asserted the (level-triggered) line: assert it again if an interrupt
    /// is still pending in the ISR (and MSI-X is off).
    pub fn resampled(&self) {
        self.0.resample();
    }
}

/// The transport's state for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub pci: PciConfigState,
    pub msix: MsixState,
    /// Device status as the driver set it (without `NEEDS_RESET`).
    pub status: u32,
    pub needs_reset: bool,
    pub isr: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u16,
    pub config_generation: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub queues: Vec<QueueSnapshot>,
    pub device: VirtioDeviceState,
}

/// A virtio device behind a virtio-pci function: the PCI configuration space and the shared
/// transport logic behind the BAR's structures.
pub struct VirtioPciDevice {
    config: PciConfig,
    msix_cap: usize,
    core: TransportCore<Shared>,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len = if extra.is_some() { 20u8 } else { 16 };
    let mut b = vec![cap_len, cfg_type, VIRTIO_BAR as u8, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPciDevice {
    /// Put `device` behind a virtio-pci function. `vectors` delivers its MSI-X vectors (queues +
    /// 1 of them); `intx` is the optional legacy interrupt line (pin INTA#).
    pub fn new(
        mem: GuestMem,
        device: Box<dyn VirtioDevice>,
        vectors: Arc<dyn MsiVectors>,
        intx: Option<Arc<dyn Interrupt>>,
    ) -> Result<VirtioPciDevice, VirtioPciError> {
        let sizes = device.queue_max_sizes().to_vec();
        if sizes.len() > MAX_QUEUES || sizes.len() + 1 > MAX_VECTORS {
            return Err(VirtioPciError::TooManyQueues(sizes.len()));
        }
        let msix = Msix::new(Self::vector_count(sizes.len()), vectors)?;
        let dtype = device.device_type();
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(dtype as u16),
            revision: 1,
            class: class_of(dtype),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            interrupt_pin: u8::from(intx.is_some()),
        });
        config.add_bar(VIRTIO_BAR, BAR_SIZE, BarKind::Mem64)?;
        config.add_capability(
            CAP_ID_VENDOR,
            &vendor_cap(CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LEN, None),
            &[],
        )?;
        let notify_len = (sizes.len().max(1) as u64) * u64::from(NOTIFY_OFF_MULTIPLIER);
        config.add_capability(
            CAP_ID_VENDOR,
            &vendor_cap(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                notify_len,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            &[],
        )?;
        config.add_capability(
            CAP_ID_VENDOR,
            &vendor_cap(CAP_ISR_CFG, ISR_CFG_OFFSET, 1, None),
            &[],
        )?;
        let dev_len = (device.config_len() as u64).min(DEVICE_CFG_MAX);
        if dev_len > 0 {
            config.add_capability(
                CAP_ID_VENDOR,
                &vendor_cap(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, dev_len, None),
                &[],
            )?;
        }
        let (body, wmask) = msix.capability(
            VIRTIO_BAR as u8,
            MSIX_TABLE_OFFSET as u32,
            VIRTIO_BAR as u8,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(CAP_ID_MSIX, &body, &wmask)?;
        let shared = Arc::new(Shared {
            isr: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            msix: Mutex::new(msix),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: sizes
                .iter()
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            intx,
        });
        Ok(VirtioPciDevice {
            config,
            msix_cap,
            core: TransportCore::new("virtio-pci", mem, device, shared)?,
        })
    }

    /// MSI-X vectors for a device with `queues` queues: one per queue and one for config.
    pub fn vector_count(queues: usize) -> u16 {
        (queues + 1).min(MAX_VECTORS) as u16
    }

    /// One eventfd per queue, in queue order: signalled on a notification. Register them as
    /// ioeventfds at [`notify_address`] wherever the BAR is.
    pub fn queue_notifiers(&self) -> &[EventFd] {
        self.core.queue_notifiers()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.core.device.as_ref()
    }

    /// The device behind the transport, to change its backend while it is paused (a disk
    /// snapshot switches a block device's disk).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.core.device.as_mut()
    }

    /// Whether the driver has set `DRIVER_OK` and the device runs.
    pub fn is_active(&self) -> bool {
        self.core.is_active()
    }

    /// The handle the VM monitor's INTx resample loop calls.
    pub fn intx_handle(&self) -> IntxHandle {
        IntxHandle(self.core.shared.clone())
    }

    /// The device status as the guest reads it.
    pub fn device_status(&self) -> u32 {
        self.core.device_status()
    }

    /// The state to save (vCPUs paused).
    pub fn state(&self) -> VirtioPciState {
        let c = self.core.state();
        let shared = &self.core.shared;
        VirtioPciState {
            pci: self.config.state(),
            msix: lock(&shared.msix).state(),
            status: c.status,
            needs_reset: c.needs_reset,
            isr: shared.isr.load(Ordering::SeqCst),
            device_features_sel: c.device_features_sel,
            driver_features_sel: c.driver_features_sel,
            driver_features: c.driver_features,
            // Written as 16 bits (and 8 bits here), restored from them.
            queue_sel: c.queue_sel as u16,
            config_generation: c.config_generation as u8,
            config_vector: shared.config_vector.load(Ordering::SeqCst),
            queue_vectors: shared
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            queues: c.queues,
            device: c.device,
        }
    }

    /// Stop the device's workers (see [`VirtioDevice::pause`]): when this returns the device
    /// writes nothing to guest memory and raises no interrupt. Idempotent; nothing on an
    /// inactive device.
    pub fn pause(&mut self) {
        self.core.pause();
    }

    /// Serve again after [`VirtioPciDevice::pause`], or start a restored device. Nothing on a
    /// running or inactive device.
    pub fn resume(&mut self) -> Result<(), VirtioPciError> {
        Ok(self.core.resume()?)
    }

    /// Restore saved state into a fresh function whose device was built with the same backend
    /// and options. A device that was running is left *paused* (its queues checked now) until
    /// [`VirtioPciDevice::resume`], which the VM monitor calls once the interrupt controllers
    /// and MSI routes are restored. Add the function to the root bus afterwards, so that its
    /// BARs are mapped where the saved registers say.
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), VirtioPciError> {
        let n = self.core.queues.len();
        // (An active device is refused first, below.)
        if !self.core.is_active() && (s.queues.len() != n || s.queue_vectors.len() != n) {
            return Err(VirtioPciError::StateMismatch(format!(
                "{} queues saved, {n} now",
                s.queues.len()
            )));
        }
        self.core.check_restore(&s.queues)?;
        self.config.restore(&s.pci)?;
        lock(&self.core.shared.msix).restore(&s.msix)?;
        let core = CoreState {
            status: s.status,
            needs_reset: s.needs_reset,
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            driver_features: s.driver_features,
            queue_sel: u32::from(s.queue_sel),
            config_generation: u32::from(s.config_generation),
            queues: s.queues.clone(),
            device: s.device.clone(),
        };
        self.core.restore(&core, |shared| {
            shared.isr.store(s.isr, Ordering::SeqCst);
            shared
                .config_vector
                .store(s.config_vector, Ordering::SeqCst);
            for (v, saved) in shared.queue_vectors.iter().zip(&s.queue_vectors) {
                v.store(*saved, Ordering::SeqCst);
            }
        })?;
        Ok(())
    }

    /// A machine reset (the guest rebooted): the device stops and forgets the driver, as on a
    /// driver reset. (Configuration space is the caller's: restore its power-on state.)
    pub fn hard_reset(&mut self) {
        self.core.reset();
    }

    /// The common configuration structure as the guest would read it now.
    fn common_bytes(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let core = &self.core;
        let mut b = [0u8; COMMON_CFG_LEN as usize];
        let features = core.device_features_word();
        let driver = core.driver_features_word();
        b[0x00..0x04].copy_from_slice(&core.device_features_sel.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&features.to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&core.driver_features_sel.to_le_bytes());
        b[0x0c..0x10].copy_from_slice(&driver.to_le_bytes());
        let cv = core.shared.config_vector.load(Ordering::SeqCst);
        b[0x10..0x12].copy_from_slice(&cv.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(core.queues.len() as u16).to_le_bytes());
        b[0x14] = core.device_status() as u8;
        b[0x15] = core.config_generation as u8;
        let queue_sel = core.queue_sel as u16;
        b[0x16..0x18].copy_from_slice(&queue_sel.to_le_bytes());
        let sel = usize::from(queue_sel);
        if let Some(q) = core.queues.get(sel) {
            let qv = core.shared.queue_vectors[sel].load(Ordering::SeqCst);
            b[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&qv.to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&u16::from(q.ready).to_le_bytes());
            b[0x1e..0x20].copy_from_slice(&queue_sel.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
            b[0x28..0x30].copy_from_slice(&q.avail.to_le_bytes());
            b[0x30..0x38].copy_from_slice(&q.used.to_le_bytes());
        }
        b
    }

    /// A vector number as the device stores it: one past the table is "no vector".
    fn checked_vector(&self, v: u16) -> u16 {
        if v < lock(&self.core.shared.msix).count() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        raw[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let v = u64::from_le_bytes(raw);
        match (offset, data.len()) {
            (0x00, 4) => self.core.device_features_sel = v as u32,
            (0x08, 4) => self.core.driver_features_sel = v as u32,
            (0x0c, 4) => self.core.write_driver_features(v as u32),
            (0x10, 2) => {
                let cv = self.checked_vector(v as u16);
                self.core.shared.config_vector.store(cv, Ordering::SeqCst);
            }
            (0x14, 1) => self.core.set_status(v as u32),
            (0x16, 2) => self.core.queue_sel = u32::from(v as u16),
            (0x18, 2) => self.core.write_queue_size(offset, v as u16),
            (0x1a, 2) => {
                let qv = self.checked_vector(v as u16);
                let sel = self.core.queue_sel as usize;
                if let Some(slot) = self.core.shared.queue_vectors.get(sel) {
                    slot.store(qv, Ordering::SeqCst);
                }
            }
            (0x1c, 2) => self.core.write_queue_ready(offset, v as u32),
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(data.len() as u64) => {
                let ring = match offset {
                    0x20..=0x27 => Ring::Desc,
                    0x28..=0x2f => Ring::Avail,
                    _ => Ring::Used,
                };
                let half = match (data.len(), offset & 4) {
                    (8, _) => Half::Whole,
                    (_, 0) => Half::Low,
                    _ => Half::High,
                };
                self.core.write_queue_address(offset, ring, half, v);
            }
            _ => tracing::debug!(
                "virtio-pci: {}-byte write of {v:#x} to common config {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let ctl = self.msix_cap + 2;
        if offset < ctl + 2 && offset.saturating_add(data.len()) > ctl {
            let control = (self.config.read_reg(self.msix_cap) >> 16) as u16;
            lock(&self.core.shared.msix).set_control(control);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != VIRTIO_BAR {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o.saturating_add(len) <= COMMON_CFG_LEN => {
                let b = self.common_bytes();
                data.copy_from_slice(&b[o as usize..(o + len) as usize]);
            }
            ISR_CFG_OFFSET => {
                // Reading clears it.
                data[0] = self.core.shared.isr.swap(0, Ordering::SeqCst) as u8;
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_MAX).contains(&o) => {
                self.core.device.read_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.core.shared.msix).read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if o >= MSIX_PBA_OFFSET => {
                lock(&self.core.shared.msix).read_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != VIRTIO_BAR {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o.saturating_add(len) <= COMMON_CFG_LEN => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_MAX).contains(&o) => {
                self.core.device.write_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                self.core
                    .notify((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER));
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.core.shared.msix).write_table(o - MSIX_TABLE_OFFSET, data);
            }
            _ => tracing::debug!("virtio-pci: {len}-byte write to BAR offset {offset:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::tests::FakeVectors;
    use crate::pci::msix::CONTROL_ENABLE;
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::{mem, settle, TestQueue, AVAIL, DESC, R, USED, W};
    use crate::virtio::{
        feature, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
        STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    };

    fn rng() -> (VirtioPciDevice, Arc<FakeVectors>, GuestMem) {
        let m = mem();
        let fake = Arc::new(FakeVectors::default());
        let d = VirtioPciDevice::new(m.clone(), Box::new(Rng::new()), fake.clone(), None).unwrap();
        (d, fake, m)
    }

    fn cfg(d: &mut VirtioPciDevice, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn r(d: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(VIRTIO_BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(d: &mut VirtioPciDevice, off: u64, len: usize, v: u64) {
        d.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
    }

    /// Walks the capability list: (id, offset) of each.
    fn caps(d: &mut VirtioPciDevice) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut p = cfg(d, 0x34, 1) as usize;
        while p != 0 && out.len() < 16 {
            out.push((cfg(d, p, 1) as u8, p));
            p = cfg(d, p + 1, 1) as usize;
        }
        out
    }

    const OK: u64 = (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64;

    fn negotiate(d: &mut VirtioPciDevice, features: u64) -> u64 {
        w(d, 0x14, 1, STATUS_ACKNOWLEDGE.into());
        w(d, 0x14, 1, (STATUS_ACKNOWLEDGE | STATUS_DRIVER).into());
        w(d, 0x08, 4, 0);
        w(d, 0x0c, 4, features & 0xffff_ffff);
        w(d, 0x08, 4, 1);
        w(d, 0x0c, 4, features >> 32);
        w(d, 0x14, 1, OK);
        r(d, 0x14, 1)
    }

    fn setup_queue(d: &mut VirtioPciDevice, q: u16, size: u16) {
        w(d, 0x16, 2, q.into());
        assert_eq!(r(d, 0x1c, 2), 0);
        w(d, 0x18, 2, size.into());
        w(d, 0x20, 4, DESC);
        w(d, 0x24, 4, 0);
        w(d, 0x28, 8, AVAIL);
        w(d, 0x30, 4, USED);
        w(d, 0x34, 4, 0);
        w(d, 0x1c, 2, 1);
    }

    #[test]
    fn identification_and_capabilities() {
        let (mut d, _, _) = rng();
        assert_eq!(cfg(&mut d, 0, 4), 0x1044_1af4);
        assert_eq!(cfg(&mut d, 8, 4), 0xff00_0001);
        assert_eq!(cfg(&mut d, 0x2c, 4), 0x0040_1af4);
        assert_eq!(cfg(&mut d, 0x10, 4) & 0xf, 4, "64-bit memory BAR");
        let list = caps(&mut d);
        let vendor: Vec<u32> = list
            .iter()
            .filter(|(id, _)| *id == CAP_ID_VENDOR)
            .map(|&(_, p)| cfg(&mut d, p + 3, 1))
            .collect();
        // The rng has no configuration space, so no DEVICE_CFG.
        assert_eq!(vendor, vec![1, 2, 3]);
        let &(_, msix) = list.iter().find(|(id, _)| *id == CAP_ID_MSIX).unwrap();
        assert_eq!(cfg(&mut d, msix + 2, 2), 1, "two vectors: table size - 1");
        assert_eq!(cfg(&mut d, msix + 4, 4), MSIX_TABLE_OFFSET as u32);
        assert_eq!(cfg(&mut d, msix + 8, 4), MSIX_PBA_OFFSET as u32);
        let &(_, notify) = list
            .iter()
            .find(|&&(id, p)| id == CAP_ID_VENDOR && cfg(&mut d, p + 3, 1) == 2)
            .unwrap();
        assert_eq!(cfg(&mut d, notify + 2, 1), 20);
        assert_eq!(cfg(&mut d, notify + 8, 4), NOTIFY_OFFSET as u32);
        assert_eq!(cfg(&mut d, notify + 16, 4), NOTIFY_OFF_MULTIPLIER);
        // Common config basics.
        assert_eq!(r(&mut d, 0x12, 2), 1);
        let f = d.device().features();
        assert_eq!(r(&mut d, 0x04, 4), f & 0xffff_ffff);
        w(&mut d, 0x00, 4, 1);
        assert_eq!(r(&mut d, 0x04, 4), 1, "VERSION_1 is bit 32");
        assert_eq!(r(&mut d, 0x18, 2), 256);
        assert_eq!(r(&mut d, 0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        assert_eq!(notify_address(0xe000_0000, 3), 0xe000_300c);
        // A block device has a device configuration.
        let disk = tempfile::NamedTempFile::new().unwrap();
        disk.as_file().set_len(1 << 20).unwrap();
        let backend = block::open(disk.path(), block::OpenOptions::default()).unwrap();
        let blk = crate::virtio::block::Block::new(Arc::from(backend), Default::default()).unwrap();
        let mut b =
            VirtioPciDevice::new(mem(), Box::new(blk), Arc::new(FakeVectors::default()), None)
                .unwrap();
        assert_eq!(cfg(&mut b, 0, 4), 0x1042_1af4);
        assert_eq!(cfg(&mut b, 8, 4) >> 8, 0x01_0000);
        assert!(caps(&mut b)
            .iter()
            .any(|&(id, p)| id == CAP_ID_VENDOR && cfg(&mut b, p + 3, 1) == 4));
        assert_eq!(r(&mut b, DEVICE_CFG_OFFSET, 8), 2048, "capacity in sectors");
    }

    #[test]
    fn status_machine_and_validation() {
        let (mut d, _, _) = rng();
        // Out of order: ignored.
        w(&mut d, 0x14, 1, STATUS_DRIVER.into());
        assert_eq!(r(&mut d, 0x14, 1), 0);
        // Without VERSION_1: FEATURES_OK stays clear.
        assert_eq!(
            negotiate(&mut d, 0),
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        );
        w(&mut d, 0x14, 1, 0);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        // Features not offered: refused too.
        assert_eq!(
            negotiate(&mut d, feature(VIRTIO_F_VERSION_1) | 1),
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        );
        w(&mut d, 0x14, 1, 0);
        assert_eq!(negotiate(&mut d, feature(VIRTIO_F_VERSION_1)), OK);
        // Queue registers before FEATURES_OK are ignored; a bad size makes DRIVER_OK fail.
        w(&mut d, 0x16, 2, 0);
        w(&mut d, 0x18, 2, 3);
        w(&mut d, 0x20, 4, DESC);
        w(&mut d, 0x28, 4, AVAIL);
        w(&mut d, 0x30, 4, USED);
        w(&mut d, 0x1c, 2, 1);
        assert_eq!(r(&mut d, 0x1c, 2), 1);
        // Ready queues are read-only.
        w(&mut d, 0x18, 2, 16);
        assert_eq!(r(&mut d, 0x18, 2), 3);
        w(&mut d, 0x14, 1, OK | u64::from(STATUS_DRIVER_OK));
        assert!(!d.is_active());
        assert_ne!(r(&mut d, 0x14, 1) & u64::from(STATUS_NEEDS_RESET), 0);
        assert_eq!(r(&mut d, ISR_CFG_OFFSET, 1), u64::from(ISR_CONFIG));
        assert_eq!(r(&mut d, ISR_CFG_OFFSET, 1), 0, "read clears");
        // Vectors past the table read back as NO_VECTOR.
        w(&mut d, 0x10, 2, 5);
        assert_eq!(r(&mut d, 0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        w(&mut d, 0x10, 2, 1);
        assert_eq!(r(&mut d, 0x10, 2), 1);
        w(&mut d, 0x14, 1, 0);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        assert_eq!(
            r(&mut d, 0x10, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR),
            "reset clears vectors"
        );
        // Queue select past the queues: zeros, writes ignored.
        w(&mut d, 0x16, 2, 9);
        assert_eq!(r(&mut d, 0x18, 2), 0);
        w(&mut d, 0x1a, 2, 0);
    }

    #[test]
    fn rng_queue_with_msix_end_to_end() {
        let (mut d, fake, m) = rng();
        let msix = caps(&mut d)
            .iter()
            .find(|(id, _)| *id == CAP_ID_MSIX)
            .unwrap()
            .1;
        d.config_write(msix + 2, &CONTROL_ENABLE.to_le_bytes());
        // Vector 1 for the queue, programmed and unmasked.
        let e = MSIX_TABLE_OFFSET + 16;
        w(&mut d, e, 4, 0xfee0_0000);
        w(&mut d, e + 4, 4, 0);
        w(&mut d, e + 8, 4, 0x45);
        w(&mut d, e + 12, 4, 0);
        assert_eq!(r(&mut d, e + 8, 4), 0x45);
        assert_eq!(negotiate(&mut d, feature(VIRTIO_F_VERSION_1)), OK);
        setup_queue(&mut d, 0, 16);
        w(&mut d, 0x1a, 2, 1);
        assert_eq!(r(&mut d, 0x1a, 2), 1);
        assert_eq!(
            (r(&mut d, 0x20, 8), r(&mut d, 0x28, 8), r(&mut d, 0x30, 8)),
            (DESC, AVAIL, USED)
        );
        assert_eq!(r(&mut d, 0x1e, 2), 0, "queue_notify_off");
        let mut tq = TestQueue::new(&m, 16);
        w(&mut d, 0x14, 1, OK | u64::from(STATUS_DRIVER_OK));
        assert!(d.is_active());
        tq.add_chain(&[(0x10000, 64, W)]);
        tq.add_chain(&[(0x10100, 16, R)]);
        // Any-width write to the queue's notify address.
        w(&mut d, NOTIFY_OFFSET, 2, 0);
        tq.wait_used(2);
        assert_eq!(tq.used(0), (0, 64));
        assert_eq!(tq.used(1), (1, 0));
        let start = std::time::Instant::now();
        while fake.fired.lock().unwrap().is_empty() {
            assert!(start.elapsed().as_secs() < 5, "no MSI-X interrupt");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(fake.fired.lock().unwrap().iter().all(|&v| v == 1));
        assert_eq!(fake.routes.lock().unwrap()[0].1.data, 0x45);
        // The saved state round-trips through serde.
        let s = d.state();
        let back: VirtioPciState =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(d.restore(&s).is_err(), "active");
        w(&mut d, 0x14, 1, 0);
        let (mut d2, _, _) = rng();
        d2.restore(&back).unwrap();
        assert!(d2.is_active());
        w(&mut d2, 0x14, 1, 0);
    }

    #[test]
    fn pause_snapshot_and_restore_continue_the_queue() {
        let (mut d, fake, m) = rng();
        let f = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(negotiate(&mut d, f), OK);
        setup_queue(&mut d, 0, 16);
        let mut tq = TestQueue::new(&m, 16);
        w(&mut d, 0x14, 1, OK | u64::from(STATUS_DRIVER_OK));
        for i in 0..3 {
            tq.add_chain(&[(0x10000 + i * 0x100, 16, W)]);
        }
        w(&mut d, NOTIFY_OFFSET, 2, 0);
        tq.wait_used(3);
        d.pause();
        d.pause();
        for i in 3..5 {
            tq.add_chain(&[(0x10000 + i * 0x100, 16, W)]);
        }
        w(&mut d, NOTIFY_OFFSET, 2, 0);
        settle();
        assert_eq!(tq.used_idx(), 3, "paused");
        let s = d.state();
        assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (3, 3));
        assert_eq!(s.device.specific, crate::virtio::DeviceSpecificState::None);
        let json = serde_json::to_string(&s).unwrap();
        drop(d);
        let mut d2 = VirtioPciDevice::new(m.clone(), Box::new(Rng::new()), fake, None).unwrap();
        d2.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert!(d2.is_active());
        d2.pause();
        settle();
        assert_eq!(tq.used_idx(), 3, "a restored device waits for resume");
        d2.resume().unwrap();
        d2.resume().unwrap();
        tq.wait_used(5);
        tq.add_chain(&[(0x10500, 16, W)]);
        w(&mut d2, NOTIFY_OFFSET, 2, 0);
        tq.wait_used(6);
        settle();
        assert_eq!(tq.used_idx(), 6);
        let ids: Vec<(u32, u32)> = (0..6).map(|i| tq.used(i)).collect();
        assert_eq!(ids, (0..6).map(|i| (i, 16)).collect::<Vec<_>>());
    }

    #[derive(Default)]
    struct Line(std::sync::atomic::AtomicU32);
    impl Interrupt for Line {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn intx_without_msix_and_resampling() {
        let line = Arc::new(Line::default());
        let fake = Arc::new(FakeVectors::default());
        let mut d = VirtioPciDevice::new(
            mem(),
            Box::new(Rng::new()),
            fake.clone(),
            Some(line.clone()),
        )
        .unwrap();
        assert_eq!(cfg(&mut d, 0x3d, 1), 1, "INTA#");
        let intx = d.intx_handle();
        d.core
            .shared
            .trigger(VirtioInterruptType::Queue(0))
            .unwrap();
        assert_eq!(line.0.load(Ordering::SeqCst), 1);
        // EOI with the ISR still set: asserted again; after the ISR read, not.
        intx.resampled();
        assert_eq!(line.0.load(Ordering::SeqCst), 2);
        assert_eq!(r(&mut d, ISR_CFG_OFFSET, 1), u64::from(ISR_QUEUE));
        intx.resampled();
        assert_eq!(line.0.load(Ordering::SeqCst), 2);
        // With MSI-X on, the line stays quiet.
        let msix = caps(&mut d)
            .iter()
            .find(|(id, _)| *id == CAP_ID_MSIX)
            .unwrap()
            .1;
        d.config_write(msix + 2, &CONTROL_ENABLE.to_le_bytes());
        d.core.shared.trigger(VirtioInterruptType::Config).unwrap();
        intx.resampled();
        assert_eq!(line.0.load(Ordering::SeqCst), 2);
        assert!(
            fake.fired.lock().unwrap().is_empty(),
            "config vector is NO_VECTOR"
        );
    }

    #[test]
    fn guest_garbage_is_harmless() {
        let (mut d, _, _) = rng();
        for off in [
            0u64,
            3,
            0x37,
            0x38,
            0xfff,
            ISR_CFG_OFFSET + 1,
            0x2fff,
            0x3ffe,
            0x4ffc,
            0x5fff,
            0x6000,
            0x7ff8,
            0x7fff,
            0x8000,
            u64::MAX - 8,
        ] {
            for len in [1usize, 2, 3, 4, 8] {
                let mut b = [0u8; 8];
                d.bar_read(VIRTIO_BAR, off, &mut b[..len]);
                d.bar_write(VIRTIO_BAR, off, &[0xff; 8][..len]);
                d.bar_read(3, off, &mut b[..len]);
                d.bar_write(3, off, &b[..len]);
            }
        }
        for off in [0usize, 0x10, 0x3c, 0xfe, 0xff, 0x100, usize::MAX] {
            d.config_write(off, &[0xff; 4]);
            let mut b = [0u8; 4];
            d.config_read(off, &mut b);
        }
    }
}
