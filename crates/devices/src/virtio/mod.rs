//! Virtio devices and their transports (MMIO and PCI).
//!
//! A device implements [`VirtioDevice`]: it offers features and queues, exposes a config space
//! and, once the driver has set everything up, is *activated* with guest memory, an interrupt
//! sink ([`VirtioInterrupt`]) and its queues, each with the [`EventFd`] the driver's notifications
//! arrive on. Devices process their queues on worker threads ([`worker`]) that wait on those
//! eventfds, so a KVM ioeventfd can replace the MMIO `QueueNotify` write without a device change.
//!
//! The transports, [`mmio::MmioTransport`] (a [`crate::BusDevice`] implementing virtio-mmio
//! version 2, virtio 1.2 §4.2.2) and [`pci::VirtioPciDevice`] (virtio-pci modern), each own a
//! `transport::TransportCore`: the status state machine, the queue registers and their
//! validation; each adds its register layout and interrupt delivery.
//!
//! Guest input is never trusted: descriptor chains are walked by [`queue`], which bounds their
//! length, detects loops and checks every buffer against guest memory; a bad chain fails only its
//! own request, and unrecoverable ring corruption sets `DEVICE_NEEDS_RESET`.

pub mod balloon;
pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub(crate) mod transport;

pub use transport::TransportError;
pub mod vsock;
pub mod worker;

#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
pub(crate) mod testing;

use std::io;
use std::sync::Arc;

use guestmem::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

/// Device types (virtio 1.2 §5).
pub const TYPE_BLOCK: u32 = 2;
/// Entropy device.
pub const TYPE_RNG: u32 = 4;

/// Feature bits shared by all devices (virtio 1.2 §6).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2 §2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// The largest queue any device here offers. Chains are walked with a bitmap of this many
/// entries, and it bounds what a guest can make a device allocate per request.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// The bit for feature `bit` in a 64-bit feature word.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// Whether `features` has `bit` set.
pub const fn has_feature(features: u64, bit: u32) -> bool {
    features & feature(bit) != 0
}

/// What an interrupt is for; a transport with one line (MMIO) records it in its interrupt status
/// register, a transport with vectors (PCI MSI-X, later) picks the vector from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration changed (or the device needs a reset).
    Config,
    /// Buffers were used in this queue.
    Queue(u16),
}

/// How an active device signals the driver.
pub trait VirtioInterrupt: Send + Sync {
    /// Raise an interrupt of the given type.
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()>;
    /// The device hit an error it cannot recover from (a corrupt ring): set `DEVICE_NEEDS_RESET`
    /// and tell the driver with a configuration-change interrupt.
    fn set_needs_reset(&self);
}

/// A queue handed to [`VirtioDevice::activate`].
#[derive(Debug)]
pub struct ActiveQueue {
    /// Index of the queue in the device.
    pub index: u16,
    /// The validated queue (ready, size and ring addresses checked against guest memory).
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub notifier: EventFd,
}

/// Why a device could not be activated. The transport answers with `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device needs queue {0}, which the driver did not make ready")]
    MissingQueue(u16),
    #[error("device is already active")]
    AlreadyActive,
    #[error("cannot start the device's worker: {0}")]
    Worker(#[source] io::Error),
    #[error("saved device state does not match this device: {0}")]
    StateMismatch(String),
}

/// The snapshot of a device: what it offered, what the driver accepted, its configuration space
/// (to check on restore that the backend still matches) and the device's own state. The queues
/// are the transport's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub device_type: u32,
    pub avail_features: u64,
    pub acked_features: u64,
    pub config: Vec<u8>,
    pub specific: DeviceSpecificState,
}

/// What a device keeps besides its queues and features ([`VirtioDevice::device_state`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSpecificState {
    /// Nothing of its own (virtio-rng).
    None,
    Block(block::BlockState),
    Net(net::NetState),
    Vsock(vsock::VsockState),
    Console(console::ConsoleState),
    Balloon(balloon::BalloonState),
}

impl VirtioDeviceState {
    /// Give a saved network device another MAC address, for a clone of a snapshot restored
    /// into a device built with `mac`: the configuration space and the device's state change
    /// together. A running Linux driver reads the MAC only when it probes the device, so the
    /// guest keeps sending from the old address until its driver is bound again.
    pub fn set_net_mac(&mut self, mac: net::MacAddr) -> Result<(), ActivateError> {
        let DeviceSpecificState::Net(n) = &mut self.specific else {
            return Err(ActivateError::StateMismatch(
                "a MAC address is only for a network device".into(),
            ));
        };
        let Some(cfg) = self.config.get_mut(0..6) else {
            return Err(ActivateError::StateMismatch(
                "network configuration space too short".into(),
            ));
        };
        cfg.copy_from_slice(&mac.bytes());
        n.mac = mac;
        Ok(())
    }

    /// Give a saved network device other rate limits (receive, transmit), for a VM restored
    /// with new ones.
    pub fn set_net_rate_limiters(
        &mut self,
        rx: crate::rate_limiter::RateLimiterConfig,
        tx: crate::rate_limiter::RateLimiterConfig,
    ) -> Result<(), ActivateError> {
        let DeviceSpecificState::Net(n) = &mut self.specific else {
            return Err(ActivateError::StateMismatch(
                "rate limits are only for a network device".into(),
            ));
        };
        n.rx_rate_limiter = rx;
        n.tx_rate_limiter = tx;
        Ok(())
    }

    /// Give a saved vsock device another guest CID, for a clone of a snapshot restored into a
    /// device built with `cid`. The restored device sends the guest a transport reset event,
    /// on which the driver reads the CID again.
    pub fn set_vsock_cid(&mut self, cid: u64) -> Result<(), ActivateError> {
        let DeviceSpecificState::Vsock(v) = &mut self.specific else {
            return Err(ActivateError::StateMismatch(
                "a guest CID is only for a vsock device".into(),
            ));
        };
        if !vsock::valid_guest_cid(cid) {
            return Err(ActivateError::StateMismatch(format!(
                "guest CID {cid} is reserved"
            )));
        }
        let Some(cfg) = self.config.get_mut(0..8) else {
            return Err(ActivateError::StateMismatch(
                "vsock configuration space too short".into(),
            ));
        };
        cfg.copy_from_slice(&cid.to_le_bytes());
        v.guest_cid = cid;
        Ok(())
    }
}

/// A virtio device, as the transport sees it.
pub trait VirtioDevice: Send {
    /// The virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Features the driver accepted (a subset of [`VirtioDevice::features`], checked by the
    /// transport before it calls this at `FEATURES_OK`).
    fn ack_features(&mut self, features: u64);
    /// Features accepted so far.
    fn acked_features(&self) -> u64;
    /// Length of the configuration space in bytes.
    fn config_len(&self) -> usize;
    /// Read from the configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the configuration space (ignored by devices without writable fields).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start serving the queues.
    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Stop serving (joining any worker) and forget the negotiated features: the device is as
    /// new. Called on a driver reset, and safe to call on an inactive or paused device.
    fn reset(&mut self);
    /// The state of the active queues (index and state), for snapshots, also while paused.
    /// Consistent between requests: a worker holds a queue's lock while it serves a request.
    fn queue_states(&self) -> Vec<(u16, QueueState)>;

    /// Stop serving, for a snapshot or a migration: when this returns the device writes
    /// nothing to guest memory and raises no interrupt until [`VirtioDevice::resume`].
    ///
    /// - Every worker finishes the request it is on (its used entry is written), then stops;
    ///   the queues keep their state (ring positions, event-idx state) and the device keeps
    ///   everything it holds between requests (a frame waiting for receive buffers, vsock
    ///   connections, console input, a held statistics buffer), so resuming loses nothing.
    /// - A device with asynchronous I/O in flight: **all in-flight requests complete and their
    ///   used entries are written before `pause` returns**; none is left for `resume`, so the
    ///   state taken while paused has no request that the guest made available, the device
    ///   took, and the used ring does not show (a restored device serves from `next_avail`).
    /// - Driver notifications arriving while paused are kept by their eventfds and served on
    ///   resume.
    ///
    /// Idempotent; nothing on an inactive device.
    fn pause(&mut self);

    /// Serve again after [`VirtioDevice::pause`], from the saved queue states, as an
    /// activation does on a restored queue: whatever became available meanwhile is served
    /// first. Nothing on a running or inactive device.
    fn resume(&mut self) -> Result<(), ActivateError>;

    /// The block device behind this one, if it is one (to switch its disk during a disk
    /// snapshot, see [`self::block::Block::replace_disk`]).
    fn as_block_mut(&mut self) -> Option<&mut self::block::Block> {
        None
    }

    /// The device's own state (see [`DeviceSpecificState`]); take it while paused.
    fn device_state(&self) -> DeviceSpecificState {
        DeviceSpecificState::None
    }

    /// Restore [`VirtioDevice::device_state`] into an inactive device built with the same
    /// backend and options (its negotiated features are restored first). Called by
    /// [`VirtioDevice::restore`].
    fn restore_device_state(&mut self, state: &DeviceSpecificState) -> Result<(), ActivateError> {
        match state {
            DeviceSpecificState::None => Ok(()),
            other => Err(ActivateError::StateMismatch(format!(
                "device type {} has no state like {other:?}",
                self.device_type()
            ))),
        }
    }

    /// The device's state, features and configuration space included.
    fn state(&self) -> VirtioDeviceState {
        let mut config = vec![0u8; self.config_len()];
        self.read_config(0, &mut config);
        VirtioDeviceState {
            device_type: self.device_type(),
            avail_features: self.features(),
            acked_features: self.acked_features(),
            config,
            specific: self.device_state(),
        }
    }

    /// Restore the state saved by [`VirtioDevice::state`] into an inactive device built with the
    /// same backend and options (for a clone with another identity, see
    /// [`VirtioDeviceState::set_net_mac`] and [`VirtioDeviceState::set_vsock_cid`]).
    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), ActivateError> {
        let now = self.state();
        if state.device_type != now.device_type {
            return Err(ActivateError::StateMismatch(format!(
                "device type {} saved, {} now",
                state.device_type, now.device_type
            )));
        }
        if state.avail_features != now.avail_features {
            return Err(ActivateError::StateMismatch(format!(
                "features {:#x} saved, {:#x} offered now",
                state.avail_features, now.avail_features
            )));
        }
        if state.config != now.config {
            return Err(ActivateError::StateMismatch(
                "configuration space differs (disk size or options changed?)".into(),
            ));
        }
        if state.acked_features & !now.avail_features != 0 {
            return Err(ActivateError::StateMismatch(
                "acknowledged features were never offered".into(),
            ));
        }
        self.ack_features(state.acked_features);
        self.restore_device_state(&state.specific)
    }
}

/// A serializable mirror of [`virtio_queue::QueueState`] (which has no serde support).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Copy the bytes of `config` at `offset` into `data`; bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// The state of each of `queues`, numbered from 0 in order: [`VirtioDevice::queue_states`] for
/// devices whose worker shares all its queues.
pub(crate) fn numbered_queue_states(
    queues: &[Arc<std::sync::Mutex<Queue>>],
) -> Vec<(u16, QueueState)> {
    queues
        .iter()
        .enumerate()
        .map(|(i, q)| (i as u16, crate::bus::lock(q).state()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::block::request::*;
    use super::block::*;
    use super::*;
    use virtio_bindings::{virtio_blk as vb, virtio_config as vc, virtio_ids, virtio_ring as vr};

    #[test]
    fn constants_match_the_linux_headers() {
        assert_eq!(TYPE_BLOCK, virtio_ids::VIRTIO_ID_BLOCK);
        assert_eq!(TYPE_RNG, virtio_ids::VIRTIO_ID_RNG);
        assert_eq!(VIRTIO_F_VERSION_1, vc::VIRTIO_F_VERSION_1);
        assert_eq!(VIRTIO_RING_F_INDIRECT_DESC, vr::VIRTIO_RING_F_INDIRECT_DESC);
        assert_eq!(VIRTIO_RING_F_EVENT_IDX, vr::VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(
            [
                STATUS_ACKNOWLEDGE,
                STATUS_DRIVER,
                STATUS_DRIVER_OK,
                STATUS_FEATURES_OK,
                STATUS_NEEDS_RESET,
                STATUS_FAILED
            ],
            [
                vc::VIRTIO_CONFIG_S_ACKNOWLEDGE,
                vc::VIRTIO_CONFIG_S_DRIVER,
                vc::VIRTIO_CONFIG_S_DRIVER_OK,
                vc::VIRTIO_CONFIG_S_FEATURES_OK,
                vc::VIRTIO_CONFIG_S_NEEDS_RESET,
                vc::VIRTIO_CONFIG_S_FAILED
            ]
        );
        assert_eq!(
            [
                VIRTIO_BLK_F_SEG_MAX,
                VIRTIO_BLK_F_RO,
                VIRTIO_BLK_F_BLK_SIZE,
                VIRTIO_BLK_F_FLUSH,
                VIRTIO_BLK_F_MQ,
                VIRTIO_BLK_F_DISCARD,
                VIRTIO_BLK_F_WRITE_ZEROES
            ],
            [
                vb::VIRTIO_BLK_F_SEG_MAX,
                vb::VIRTIO_BLK_F_RO,
                vb::VIRTIO_BLK_F_BLK_SIZE,
                vb::VIRTIO_BLK_F_FLUSH,
                vb::VIRTIO_BLK_F_MQ,
                vb::VIRTIO_BLK_F_DISCARD,
                vb::VIRTIO_BLK_F_WRITE_ZEROES
            ]
        );
        assert_eq!(
            [
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD,
                VIRTIO_BLK_T_WRITE_ZEROES
            ],
            [
                vb::VIRTIO_BLK_T_IN,
                vb::VIRTIO_BLK_T_OUT,
                vb::VIRTIO_BLK_T_FLUSH,
                vb::VIRTIO_BLK_T_GET_ID,
                vb::VIRTIO_BLK_T_DISCARD,
                vb::VIRTIO_BLK_T_WRITE_ZEROES
            ]
        );
        assert_eq!(
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].map(u32::from),
            [
                vb::VIRTIO_BLK_S_OK,
                vb::VIRTIO_BLK_S_IOERR,
                vb::VIRTIO_BLK_S_UNSUPP
            ]
        );
        assert_eq!(ID_BYTES as u32, vb::VIRTIO_BLK_ID_BYTES);
        assert_eq!(
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        );
        // The config layout: write_zeroes_may_unmap at 56, 60 bytes up to secure erase.
        assert!(std::mem::size_of::<vb::virtio_blk_config>() >= CONFIG_LEN);
        use std::mem::offset_of;
        type C = vb::virtio_blk_config;
        assert_eq!(
            [
                offset_of!(C, capacity),
                offset_of!(C, seg_max),
                offset_of!(C, blk_size),
                offset_of!(C, num_queues),
                offset_of!(C, max_discard_sectors),
                offset_of!(C, max_discard_seg),
                offset_of!(C, discard_sector_alignment),
                offset_of!(C, max_write_zeroes_sectors),
                offset_of!(C, max_write_zeroes_seg),
                offset_of!(C, write_zeroes_may_unmap),
            ],
            [0, 12, 20, 34, 36, 40, 44, 48, 52, 56]
        );
    }
}
