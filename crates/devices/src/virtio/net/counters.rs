//! A network device's counters: frames and bytes each way, and the frames dropped.
//!
//! The queue-pair workers count as frames go (relaxed atomic additions: no lock, no
//! allocation); every pair of a device counts into the same [`NetCounters`]. Bytes are Ethernet
//! frame bytes, the 12-byte virtio-net header not counted (as the rate limits count them).
//! The counters belong to the device object of this process: they go on across a device reset
//! and a guest reboot, and are not saved: a VM restored from a snapshot, or a migration's
//! target, starts again from 0.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The counters of one network device, shared by its queue-pair workers and read by the VMM
/// (see [`super::Net::counters`]).
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
}

/// [`NetCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCountersSnapshot {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames read from the backend and not delivered: shorter than an Ethernet header, longer
    /// than the receive buffers can ever hold, or met a malformed buffer in the middle of a
    /// merged frame. (Frames the tap's own kernel queue drops are not seen here.)
    pub rx_dropped: u64,
    /// Frames the guest sent that went to the backend.
    pub tx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: u64,
    /// Transmit chains dropped: malformed, too short or too long, outside guest memory, or
    /// refused by the backend.
    pub tx_dropped: u64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl NetCounters {
    /// A frame of `bytes` (header excluded) went to the guest.
    pub(crate) fn received(&self, bytes: u64) {
        add(&self.rx_packets, 1);
        add(&self.rx_bytes, bytes);
    }

    /// A frame from the backend was dropped.
    pub(crate) fn rx_dropped(&self) {
        add(&self.rx_dropped, 1);
    }

    /// A frame of `bytes` (header excluded) from the guest went to the backend.
    pub(crate) fn sent(&self, bytes: u64) {
        add(&self.tx_packets, 1);
        add(&self.tx_bytes, bytes);
    }

    /// A transmit chain was dropped.
    pub(crate) fn tx_dropped(&self) {
        add(&self.tx_dropped, 1);
    }

    /// The counters now (each read on its own: a frame counted meanwhile may show in its
    /// packets and not yet in its bytes).
    pub fn snapshot(&self) -> NetCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCountersSnapshot {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_way_and_snapshots() {
        let c = NetCounters::default();
        assert_eq!(c.snapshot(), NetCountersSnapshot::default());
        c.received(60);
        c.received(1514);
        c.rx_dropped();
        c.sent(42);
        c.tx_dropped();
        c.tx_dropped();
        let s = c.snapshot();
        assert_eq!(
            s,
            NetCountersSnapshot {
                rx_packets: 2,
                rx_bytes: 1574,
                rx_dropped: 1,
                tx_packets: 1,
                tx_bytes: 42,
                tx_dropped: 2,
            }
        );
        c.sent(100);
        assert_eq!(s.tx_packets, 1, "a snapshot is a copy");
        assert_eq!(c.snapshot().tx_bytes, 142);
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["rx_bytes"], 1574);
        assert_eq!(json["tx_dropped"], 2);
    }
}
