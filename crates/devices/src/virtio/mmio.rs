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
use vmm_sys_util::eventfd::EventFd;

use super::transport::{CoreState, Half, Ring, TransportCore, TransportError, TransportInterrupt};
use super::{QueueSnapshot, VirtioDevice, VirtioDeviceState, VirtioInterrupt, VirtioInterruptType};
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

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("device has {0} queues; at most 65535 are possible")]
    TooManyQueues(usize),
    #[error(transparent)]
    Transport(#[from] TransportError),
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

impl TransportInterrupt for Shared {
    fn needs_reset(&self) -> &AtomicBool {
        &self.needs_reset
    }

    fn reset(&self) {
        self.interrupt_status.store(0, Ordering::SeqCst);
    }

    fn restarted(&self) {
        if self.interrupt_status.load(Ordering::SeqCst) != 0 {
            // An edge may have been lost with the old process; a spurious one is harmless.
            let _ = self.irq.trigger();
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

/// A virtio device behind virtio-mmio registers: the shared transport logic and the register
/// layout.
pub struct MmioTransport {
    core: TransportCore<Shared>,
}

impl MmioTransport {
    /// Put `device` behind virtio-mmio registers. `irq` is the device's interrupt line; `mem`
    /// is the guest memory its queues live in.
    pub fn new(
        mem: GuestMem,
        irq: Arc<dyn Interrupt>,
        device: Box<dyn VirtioDevice>,
    ) -> Result<MmioTransport, MmioError> {
        let queues = device.queue_max_sizes().len();
        if queues > usize::from(u16::MAX) {
            return Err(MmioError::TooManyQueues(queues));
        }
        let shared = Arc::new(Shared {
            interrupt_status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        });
        Ok(MmioTransport {
            core: TransportCore::new("virtio-mmio", mem, device, shared)?,
        })
    }

    /// One eventfd per queue, in queue order: signalled on `QueueNotify`. Register them as
    /// ioeventfds at `base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch = the queue index.
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

    /// The device status register as the guest reads it.
    pub fn device_status(&self) -> u32 {
        self.core.device_status()
    }

    /// The state to save. Take it with the vCPUs paused; the queues' ring positions come from
    /// the device's workers, which hold each queue's lock for a whole processing pass.
    pub fn state(&self) -> VirtioMmioState {
        let c = self.core.state();
        VirtioMmioState {
            status: c.status,
            needs_reset: c.needs_reset,
            interrupt_status: self.core.shared.interrupt_status.load(Ordering::SeqCst),
            device_features_sel: c.device_features_sel,
            driver_features_sel: c.driver_features_sel,
            driver_features: c.driver_features,
            queue_sel: c.queue_sel,
            config_generation: c.config_generation,
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

    /// Serve again after [`MmioTransport::pause`], or start a restored device. Nothing on a
    /// running or inactive device.
    pub fn resume(&mut self) -> Result<(), MmioError> {
        Ok(self.core.resume()?)
    }

    /// Restore saved state into a fresh transport whose device was built with the same backend
    /// and options. A device that was running is left *paused*: its queues are checked now and
    /// it starts serving from the saved ring positions at [`MmioTransport::resume`] — call that
    /// once the VM's interrupt controllers are restored too, so that no interrupt the device
    /// raises is overwritten.
    pub fn restore(&mut self, state: &VirtioMmioState) -> Result<(), MmioError> {
        self.core.check_restore(&state.queues)?;
        let core = CoreState {
            status: state.status,
            needs_reset: state.needs_reset,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            config_generation: state.config_generation,
            queues: state.queues.clone(),
            device: state.device.clone(),
        };
        self.core.restore(&core, |shared| {
            shared
                .interrupt_status
                .store(state.interrupt_status, Ordering::SeqCst);
        })?;
        Ok(())
    }

    /// A machine reset (the guest rebooted): the device stops and forgets the driver, as on a
    /// driver reset.
    pub fn hard_reset(&mut self) {
        self.core.reset();
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let core = &self.core;
        let sel_queue = core.selected_queue();
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => core.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => core.device_features_word(),
            REG_QUEUE_NUM_MAX => sel_queue.map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => sel_queue.map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => core.shared.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => core.device_status(),
            // No shared memory regions: length (and base) all ones.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => core.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let core = &mut self.core;
        let half = if offset & 4 == 0 {
            Half::Low
        } else {
            Half::High
        };
        match offset {
            REG_DEVICE_FEATURES_SEL => core.device_features_sel = v,
            REG_DRIVER_FEATURES => core.write_driver_features(v),
            REG_DRIVER_FEATURES_SEL => core.driver_features_sel = v,
            REG_QUEUE_SEL => core.queue_sel = v,
            REG_QUEUE_NUM => core.write_queue_size(offset, u16::try_from(v).unwrap_or(0)),
            REG_QUEUE_READY => core.write_queue_ready(offset, v),
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                core.write_queue_address(offset, Ring::Desc, half, u64::from(v));
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                core.write_queue_address(offset, Ring::Avail, half, u64::from(v));
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                core.write_queue_address(offset, Ring::Used, half, u64::from(v));
            }
            QUEUE_NOTIFY_OFFSET => core.notify(u64::from(v)),
            REG_INTERRUPT_ACK => {
                core.shared.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            REG_STATUS => core.set_status(v),
            _ => tracing::debug!("virtio-mmio: write of {v:#x} to {offset:#x} ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.core.device.read_config(offset - CONFIG_OFFSET, data);
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
            self.core.device.write_config(offset - CONFIG_OFFSET, data);
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
    use crate::virtio::{
        feature, ActivateError, ActiveQueue, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
        STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    };
    use std::sync::Mutex;
    use virtio_queue::QueueState;
    use virtio_queue::QueueT;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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
        assert_eq!(t.core.driver_features, f);
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
        assert_eq!(t.core.queues[0].size, 16);
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
        t.core
            .shared
            .trigger(VirtioInterruptType::Queue(0))
            .unwrap();
        t.core.shared.trigger(VirtioInterruptType::Config).unwrap();
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
