//! virtio-net: the network device (virtio 1.2 §5.1) on a [`NetBackend`]: a tap, or a Unix
//! stream socket speaking QEMU's stream protocol ([`stream`]: passt).
//!
//! Queues: a receive and a transmit queue per queue pair (`rx0, tx0, rx1, tx1, ...`), then the
//! control queue. Every frame carries the 12-byte `virtio_net_hdr_v1`, passed through to the tap
//! as it is (`IFF_VNET_HDR`), so checksum and segmentation offloads work end to end: the tap's
//! offloads (`TUNSETOFFLOAD`) follow the negotiated `GUEST_*` features. A backend that takes no
//! offloads ([`NetBackend::takes_offloads`]: the stream socket, whose peer sees bare frames)
//! gets a device that offers neither `CSUM`/`HOST_*` nor `GUEST_*`: every frame is complete.
//!
//! One worker thread per queue pair ([`worker`]) waits on the backend and both queues'
//! notifications. Receive ([`rx`]): a frame read from the backend goes into the next available
//! chain, or chains with `MRG_RXBUF`; with no room, the frame is kept and the backend is not
//! polled until the driver adds buffers. Transmit ([`tx`]): each chain is gathered into one
//! write; a backend that could not finish the last one ([`NetBackend::flush`]) leaves the
//! chains in the ring and is polled for writability until it has. A malformed chain or an oversized frame drops only that packet. The control queue
//! ([`ctrl`]) accepts RX-mode and MAC-table commands (no filtering is done) and
//! `VQ_PAIRS_SET`, which attaches and detaches the tap's queues.
//!
//! Rate limits ([`Net::set_rate_limiters`]): one token-bucket limiter per direction (packets
//! and frame bytes, the virtio-net header not counted), shared by all queue pairs
//! ([`SharedLimiter`]). Transmit chains beyond the budget stay in the ring; received frames beyond it
//! stay in the tap's kernel queue.
//!
//! Every pair counts the frames it passes and drops in the device's [`NetCounters`].

mod backend;
mod counters;
mod ctrl;
mod rx;
mod stream;
mod tx;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use guestmem::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

pub use ::net::MacAddr;
pub use backend::NetBackend;
pub use counters::{NetCounters, NetCountersSnapshot};
// The queue handlers on their own, for fuzz targets.
pub use ctrl::CtrlHandler;
pub use rx::{deliver, DropReason, RxOutcome};
pub use stream::{FrameReader, FrameWriter, StreamBackend, StreamError, PREFIX_LEN};
pub use tx::{TxError, TxHandler};

use super::worker::QueueWorker;
use super::{
    feature, has_feature, read_config_bytes, ActivateError, ActiveQueue, DeviceSpecificState,
    VirtioDevice, VirtioInterrupt, MAX_QUEUE_SIZE, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::rate_limiter::{RateLimiterConfig, RateLimiterError, SharedLimiter};
use worker::{Limiters, PairOptions, PairWorker};

/// Device type (virtio 1.2 §5.1).
pub const TYPE_NET: u32 = 1;

pub const VIRTIO_NET_F_CSUM: u32 = 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
pub const VIRTIO_NET_F_MAC: u32 = 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
pub const VIRTIO_NET_F_GUEST_UFO: u32 = 10;
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
pub const VIRTIO_NET_F_HOST_UFO: u32 = 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
pub const VIRTIO_NET_F_STATUS: u32 = 16;
pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
pub const VIRTIO_NET_F_CTRL_RX: u32 = 18;
pub const VIRTIO_NET_F_MQ: u32 = 22;

/// `status` bit of the configuration space.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Bytes of the header on every frame (`virtio_net_hdr_v1`, with `num_buffers`).
pub const HDR_LEN: usize = ::net::tap::VNET_HDR_LEN;
/// The largest Ethernet frame (without the header) either way: 64 KiB of GSO payload and
/// headers plus the Ethernet header. Longer frames are dropped.
pub const MAX_FRAME_LEN: usize = 64 * 1024 + 14;
/// The largest packet (header + frame).
pub const MAX_PACKET_LEN: usize = HDR_LEN + MAX_FRAME_LEN;
/// The shortest frame passed on: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Most queue pairs.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Length of the configuration space: mac, status, max_virtqueue_pairs.
pub const CONFIG_LEN: usize = 10;

/// Offloads the guest may receive, and the tap flag each needs.
const GUEST_OFFLOADS: [(u32, u32); 5] = [
    (VIRTIO_NET_F_GUEST_CSUM, ::net::tap::TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, ::net::tap::TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, ::net::tap::TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, ::net::tap::TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, ::net::tap::TUN_F_UFO),
];

/// Errors building a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0} queue pairs requested; 1 to {MAX_QUEUE_PAIRS} are possible")]
    QueuePairs(usize),
    #[error("cannot make a random MAC address: {0}")]
    Mac(#[source] std::io::Error),
    #[error(transparent)]
    Tap(#[from] ::net::TapError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

/// The tap flags for the offloads in the guest features `acked`.
pub fn tap_offloads(acked: u64) -> u32 {
    GUEST_OFFLOADS
        .iter()
        .filter(|(bit, _)| has_feature(acked, *bit))
        .fold(0, |flags, (_, f)| flags | f)
}

/// The device-specific state of a network device, for snapshots (the queues are saved by the
/// transport, the features with the device). A received frame still waiting in a worker for
/// receive buffers is not saved: it is dropped, as a network may drop any frame. (A pause keeps
/// it.) For a clone with another MAC, see [`super::VirtioDeviceState::set_net_mac`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: MacAddr,
    pub queue_pairs: u16,
    /// Queue pairs the driver enabled with `VQ_PAIRS_SET` (1 without `MQ`).
    pub active_pairs: u16,
    /// The receive rate limit (the buckets restart full).
    #[serde(default)]
    pub rx_rate_limiter: RateLimiterConfig,
    /// The transmit rate limit.
    #[serde(default)]
    pub tx_rate_limiter: RateLimiterConfig,
}

/// The network device.
pub struct Net {
    backends: Arc<[Arc<dyn NetBackend>]>,
    mac: MacAddr,
    features: u64,
    acked: u64,
    queue_sizes: Vec<u16>,
    config: [u8; CONFIG_LEN],
    active_pairs: Arc<AtomicU16>,
    rx_limit: RateLimiterConfig,
    tx_limit: RateLimiterConfig,
    limiters: Limiters,
    workers: Vec<PairWorker>,
    ctrl: Option<QueueWorker>,
    /// What the queue pairs passed and dropped, since the device was made.
    counters: Arc<NetCounters>,
}

impl Net {
    /// A network device with one queue pair per backend (`MQ` when more than one), the MAC
    /// address `mac` or a random locally administered one.
    pub fn new(backends: Vec<Arc<dyn NetBackend>>, mac: Option<MacAddr>) -> Result<Net, NetError> {
        let pairs = backends.len();
        if pairs == 0 || pairs > usize::from(MAX_QUEUE_PAIRS) {
            return Err(NetError::QueuePairs(pairs));
        }
        let mac = match mac {
            Some(m) => m,
            None => ::net::random_local().map_err(NetError::Mac)?,
        };
        let mut features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_NET_F_MAC)
            | feature(VIRTIO_NET_F_STATUS)
            | feature(VIRTIO_NET_F_MRG_RXBUF)
            | feature(VIRTIO_NET_F_CTRL_VQ)
            | feature(VIRTIO_NET_F_CTRL_RX);
        let backend = &backends[0];
        if backend.takes_offloads() {
            // The tap takes any header the guest writes: checksum and segmentation offloads.
            features |= feature(VIRTIO_NET_F_CSUM)
                | feature(VIRTIO_NET_F_HOST_TSO4)
                | feature(VIRTIO_NET_F_HOST_TSO6)
                | feature(VIRTIO_NET_F_HOST_ECN)
                | feature(VIRTIO_NET_F_HOST_UFO);
            // Guest offloads: those the backend accepts (UFO is refused by some kernels).
            let all = GUEST_OFFLOADS.iter().fold(0, |a, (_, f)| a | f);
            for (try_flags, without) in [
                (all, 0u32),
                (all & !::net::tap::TUN_F_UFO, VIRTIO_NET_F_GUEST_UFO),
            ] {
                if backend.set_offload(try_flags).is_ok() {
                    for (bit, _) in GUEST_OFFLOADS {
                        if without == 0 || bit != without {
                            features |= feature(bit);
                        }
                    }
                    break;
                }
            }
            if let Err(e) = backend.set_offload(0) {
                tracing::warn!("virtio-net: cannot clear the backend's offloads: {e}");
            }
        }
        if pairs > 1 {
            features |= feature(VIRTIO_NET_F_MQ);
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&mac.bytes());
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&(pairs as u16).to_le_bytes());
        Ok(Net {
            backends: backends.into(),
            mac,
            features,
            acked: 0,
            queue_sizes: vec![MAX_QUEUE_SIZE; pairs * 2 + 1],
            config,
            active_pairs: Arc::new(AtomicU16::new(1)),
            rx_limit: RateLimiterConfig::default(),
            tx_limit: RateLimiterConfig::default(),
            limiters: Limiters::default(),
            workers: Vec::new(),
            ctrl: None,
            counters: Arc::default(),
        })
    }

    /// The device's counters (frames and bytes each way, drops), updated by its queue-pair
    /// workers; they go on across resets.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Limit what the device receives (`rx`) and transmits (`tx`), for all its queue pairs
    /// together. Takes effect at the next activation.
    pub fn set_rate_limiters(
        &mut self,
        rx: RateLimiterConfig,
        tx: RateLimiterConfig,
    ) -> Result<(), NetError> {
        self.limiters = Limiters {
            rx: SharedLimiter::new(rx)?,
            tx: SharedLimiter::new(tx)?,
        };
        self.rx_limit = rx;
        self.tx_limit = tx;
        Ok(())
    }

    /// The receive and transmit rate limits.
    pub fn rate_limiters(&self) -> (RateLimiterConfig, RateLimiterConfig) {
        (self.rx_limit, self.tx_limit)
    }

    /// A network device on tap `name` (created if absent) with `queue_pairs` queue pairs.
    pub fn with_tap(name: &str, mac: Option<MacAddr>, queue_pairs: u16) -> Result<Net, NetError> {
        if queue_pairs == 0 || queue_pairs > MAX_QUEUE_PAIRS {
            return Err(NetError::QueuePairs(usize::from(queue_pairs)));
        }
        let mac = match mac {
            Some(m) => m,
            None => ::net::random_local().map_err(NetError::Mac)?,
        };
        let made = !::net::tap::exists(name);
        let taps = ::net::Tap::open_queues(name, usize::from(queue_pairs))?;
        if made {
            // A tap made here gets the address derived from the guest's (`host_mac`): the
            // same again when the VM is restored or moves to another tap of that name.
            taps[0].set_mac(::net::tap::host_mac(mac))?;
        }
        let backends = taps
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn NetBackend>)
            .collect();
        Net::new(backends, Some(mac))
    }

    /// A network device on the listening Unix stream socket at `path` (QEMU's stream
    /// protocol: passt), connected now; one queue pair, no offloads.
    pub fn with_stream(path: &std::path::Path, mac: Option<MacAddr>) -> Result<Net, NetError> {
        let backend = StreamBackend::connect(path)?;
        Net::new(vec![Arc::new(backend)], mac)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.backends.len() as u16
    }

    /// The device-specific state.
    pub fn net_state(&self) -> NetState {
        NetState {
            mac: self.mac,
            queue_pairs: self.queue_pairs(),
            active_pairs: self.active_pairs.load(Ordering::SeqCst),
            rx_rate_limiter: self.rx_limit,
            tx_rate_limiter: self.tx_limit,
        }
    }

    /// Restore [`Net::net_state`] into an inactive device with the same backend and options,
    /// whose features are restored (the rate limits are taken from the state).
    fn restore_net_state(&mut self, state: &NetState) -> Result<(), ActivateError> {
        if state.mac != self.mac || state.queue_pairs != self.queue_pairs() {
            return Err(ActivateError::StateMismatch(format!(
                "network device {} with {} queue pairs saved, {} with {} now",
                state.mac,
                state.queue_pairs,
                self.mac,
                self.queue_pairs()
            )));
        }
        if state.active_pairs == 0 || state.active_pairs > self.queue_pairs() {
            return Err(ActivateError::StateMismatch(
                "saved number of active queue pairs is not possible here".into(),
            ));
        }
        if (state.rx_rate_limiter, state.tx_rate_limiter) != self.rate_limiters() {
            self.set_rate_limiters(state.rx_rate_limiter, state.tx_rate_limiter)
                .map_err(|e| ActivateError::StateMismatch(e.to_string()))?;
        }
        self.active_pairs
            .store(state.active_pairs, Ordering::SeqCst);
        Ok(())
    }

    fn ctrl_index(&self) -> u16 {
        self.queue_pairs() * 2
    }
}

/// `N bytes/N packets per T ms` for a log line.
fn describe_limit(l: &RateLimiterConfig) -> String {
    [(l.bandwidth, "bytes"), (l.ops, "packets")]
        .iter()
        .filter_map(|(b, what)| b.map(|b| format!("{} {what} per {} ms", b.size, b.refill_time_ms)))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Attach the backends' queues of the first `active` pairs, detach the others (only for more
/// than one pair: a single queue is always attached).
pub(super) fn apply_active_pairs(
    backends: &[Arc<dyn NetBackend>],
    active: u16,
) -> std::io::Result<()> {
    if backends.len() < 2 {
        return Ok(());
    }
    // Attach first, so the interface never has no queue.
    for b in &backends[..usize::from(active)] {
        b.set_queue_enabled(true)?;
    }
    for b in &backends[usize::from(active)..] {
        b.set_queue_enabled(false)?;
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only in legacy devices.
        tracing::debug!("virtio-net: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if !self.workers.is_empty() || self.ctrl.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        for need in [0, 1] {
            if !queues.iter().any(|q| q.index == need) {
                return Err(ActivateError::MissingQueue(need));
            }
        }
        let offloads = tap_offloads(self.acked);
        self.backends[0]
            .set_offload(offloads)
            .map_err(ActivateError::Worker)?;
        if !has_feature(self.acked, VIRTIO_NET_F_MQ) {
            self.active_pairs.store(1, Ordering::SeqCst);
        }
        apply_active_pairs(&self.backends, self.active_pairs.load(Ordering::SeqCst))
            .map_err(ActivateError::Worker)?;

        let mrg = has_feature(self.acked, VIRTIO_NET_F_MRG_RXBUF);
        let ctrl_index = self.ctrl_index();
        let mut slots: Vec<Option<ActiveQueue>> = (0..=ctrl_index).map(|_| None).collect();
        for q in queues {
            if let Some(s) = slots.get_mut(usize::from(q.index)) {
                *s = Some(q);
            }
        }
        let ctrl_queue = slots.pop().flatten();
        let mut workers = Vec::new();
        let mut slots = slots.into_iter();
        for (pair, backend) in self.backends.iter().enumerate() {
            let (Some(Some(rxq)), Some(Some(txq))) = (slots.next(), slots.next()) else {
                continue;
            };
            let w = PairWorker::spawn(
                format!("virtio-net-q{pair}"),
                rxq,
                txq,
                mem.clone(),
                interrupt.clone(),
                backend.clone(),
                PairOptions {
                    mrg,
                    limiters: self.limiters.clone(),
                    counters: self.counters.clone(),
                },
            )
            .map_err(|e| ActivateError::Worker(e.into()))?;
            workers.push(w);
        }
        if let Some(q) = ctrl_queue {
            if has_feature(self.acked, VIRTIO_NET_F_CTRL_VQ) {
                let wakers = workers
                    .iter()
                    .map(|w| w.waker())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ActivateError::Worker)?;
                let handler =
                    CtrlHandler::new(self.backends.clone(), self.active_pairs.clone(), wakers);
                let w = QueueWorker::spawn("virtio-net-ctrl".into(), q, mem, interrupt, handler)
                    .map_err(|e| ActivateError::Worker(e.into()))?;
                self.ctrl = Some(w);
            }
        }
        self.workers = workers;
        let names = ["csum", "tso4", "tso6", "ecn", "ufo"];
        let on: Vec<&str> = (0..names.len())
            .filter(|i| offloads & (1 << i) != 0)
            .map(|i| names[i])
            .collect();
        let limits = [("rx", &self.rx_limit), ("tx", &self.tx_limit)]
            .iter()
            .filter(|(_, l)| !l.is_unlimited())
            .map(|(d, l)| format!(", {d} limited to {}", describe_limit(l)))
            .collect::<String>();
        tracing::info!(
            "virtio-net {}: {} of {} queue pairs served{}, guest offloads [{}]{}{limits}",
            self.mac,
            self.workers.len(),
            self.backends.len(),
            if self.ctrl.is_some() {
                " with a control queue"
            } else {
                ""
            },
            on.join(","),
            if mrg { ", mergeable rx buffers" } else { "" }
        );
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping a worker stops and joins its thread.
        self.workers.clear();
        self.ctrl = None;
        for l in [&self.limiters.rx, &self.limiters.tx].into_iter().flatten() {
            l.clear_waiters();
        }
        self.acked = 0;
        self.active_pairs.store(1, Ordering::SeqCst);
        if let Err(e) = self.backends[0].set_offload(0) {
            tracing::warn!("virtio-net: cannot clear the backend's offloads: {e}");
        }
    }

    fn queue_states(&self) -> Vec<(u16, QueueState)> {
        let mut v: Vec<(u16, QueueState)> =
            self.workers.iter().flat_map(|w| w.queue_states()).collect();
        if let Some(c) = &self.ctrl {
            v.push((c.index(), c.queue_state()));
        }
        v
    }

    fn pause(&mut self) {
        // The control queue first: it may wake the pair workers.
        if let Some(c) = &mut self.ctrl {
            c.pause();
        }
        for w in &mut self.workers {
            w.pause();
        }
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        for w in &mut self.workers {
            w.resume().map_err(|e| ActivateError::Worker(e.into()))?;
        }
        if let Some(c) = &mut self.ctrl {
            c.resume().map_err(|e| ActivateError::Worker(e.into()))?;
        }
        Ok(())
    }

    fn device_state(&self) -> DeviceSpecificState {
        DeviceSpecificState::Net(self.net_state())
    }

    fn restore_device_state(&mut self, state: &DeviceSpecificState) -> Result<(), ActivateError> {
        match state {
            DeviceSpecificState::Net(n) => self.restore_net_state(n),
            other => Err(ActivateError::StateMismatch(format!(
                "network device state expected, {other:?} saved"
            ))),
        }
    }
}
