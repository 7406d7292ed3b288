//! virtio-net tests: queues driven as a driver would, against a datagram socket pair standing in
//! for the tap, and against a real tap in a private network namespace.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::GuestMem;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ctrl::*;
use super::rx::{deliver, DropReason, RxOutcome};
use super::*;
use crate::rate_limiter::TokenBucketConfig;
use crate::virtio::queue::Chain;
use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, R, W};

const RX_SHIFT: u64 = 0;
const TX_SHIFT: u64 = 0x10000;
const CTRL_SHIFT: u64 = 0x20000;
const RX_BUF: u64 = 0x100000;
const TX_BUF: u64 = 0x200000;
const CTRL_BUF: u64 = 0x300000;

fn mac() -> MacAddr {
    "52:54:00:12:34:56".parse().unwrap()
}

/// A packet: a zero header and a frame of `len` bytes whose content depends on `seed`.
fn packet(len: usize, seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    p
}

fn pair() -> (Arc<dyn NetBackend>, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (Arc::new(a), b)
}

fn read(m: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// An active device with one queue pair (and the control queue) on a socket pair.
struct Harness<'a> {
    m: &'a GuestMem,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    ctrl: TestQueue<'a>,
    kicks: Vec<EventFd>,
    int: Arc<CountingInterrupt>,
    dev: Net,
    peers: Vec<UnixDatagram>,
}

impl<'a> Harness<'a> {
    fn new(m: &'a GuestMem, pairs: usize, extra_features: u64) -> Self {
        let none = RateLimiterConfig::default();
        Harness::limited(m, pairs, extra_features, none, none)
    }

    /// With receive and transmit rate limits.
    fn limited(
        m: &'a GuestMem,
        pairs: usize,
        extra_features: u64,
        rx_limit: RateLimiterConfig,
        tx_limit: RateLimiterConfig,
    ) -> Self {
        let (backends, peers): (Vec<_>, Vec<_>) = (0..pairs).map(|_| pair()).unzip();
        let mut dev = Net::new(backends, Some(mac())).unwrap();
        dev.set_rate_limiters(rx_limit, tx_limit).unwrap();
        dev.ack_features(feature(VIRTIO_F_VERSION_1) | extra_features);
        let rx = TestQueue::new_at(m, 16, RX_SHIFT);
        let tx = TestQueue::new_at(m, 16, TX_SHIFT);
        let ctrl = TestQueue::new_at(m, 16, CTRL_SHIFT);
        let mut kicks = Vec::new();
        let mut queues = Vec::new();
        let ctrl_index = (pairs * 2) as u16;
        for (index, q) in [(0, rx.queue()), (1, tx.queue()), (ctrl_index, ctrl.queue())] {
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(evt.try_clone().unwrap());
            queues.push(ActiveQueue {
                index,
                queue: q,
                notifier: evt,
            });
        }
        let int = Arc::new(CountingInterrupt::default());
        dev.activate(m.clone(), int.clone(), queues).unwrap();
        Harness {
            m,
            rx,
            tx,
            ctrl,
            kicks,
            int,
            dev,
            peers,
        }
    }

    fn kick_rx(&self) {
        self.kicks[0].write(1).unwrap();
    }

    fn kick_tx(&self) {
        self.kicks[1].write(1).unwrap();
    }

    /// Queue `p` for transmission as header + frame in two descriptors, at `slot`.
    fn transmit(&mut self, p: &[u8], slot: u64) {
        let at = TX_BUF + slot * 0x1000;
        self.m.write_slice(p, GuestAddress(at)).unwrap();
        self.tx.add_chain(&[
            (at, HDR_LEN as u32, R),
            (at + HDR_LEN as u64, (p.len() - HDR_LEN) as u32, R),
        ]);
    }

    /// Waits (up to 5 s) until the device's counters are `want`.
    fn wait_counters(&self, want: NetCountersSnapshot) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.dev.counters().snapshot();
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "counters {got:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A control command; returns the ack byte.
    fn command(&mut self, n: u16, cmd: &[u8]) -> u8 {
        let at = CTRL_BUF + u64::from(n) * 0x100;
        self.m.write_slice(cmd, GuestAddress(at)).unwrap();
        self.m.write_obj(0xffu8, GuestAddress(at + 0x80)).unwrap();
        self.ctrl
            .add_chain(&[(at, cmd.len() as u32, R), (at + 0x80, 1, W)]);
        self.kicks[2].write(1).unwrap();
        self.ctrl.wait_used(n + 1);
        self.m.read_obj(GuestAddress(at + 0x80)).unwrap()
    }
}

#[test]
fn constants_match_the_linux_headers() {
    use virtio_bindings::virtio_net as vn;
    assert_eq!(TYPE_NET, virtio_bindings::virtio_ids::VIRTIO_ID_NET);
    assert_eq!(
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_MQ,
        ],
        [
            vn::VIRTIO_NET_F_CSUM,
            vn::VIRTIO_NET_F_GUEST_CSUM,
            vn::VIRTIO_NET_F_MAC,
            vn::VIRTIO_NET_F_GUEST_TSO4,
            vn::VIRTIO_NET_F_GUEST_TSO6,
            vn::VIRTIO_NET_F_GUEST_ECN,
            vn::VIRTIO_NET_F_GUEST_UFO,
            vn::VIRTIO_NET_F_HOST_TSO4,
            vn::VIRTIO_NET_F_HOST_TSO6,
            vn::VIRTIO_NET_F_HOST_ECN,
            vn::VIRTIO_NET_F_HOST_UFO,
            vn::VIRTIO_NET_F_MRG_RXBUF,
            vn::VIRTIO_NET_F_STATUS,
            vn::VIRTIO_NET_F_CTRL_VQ,
            vn::VIRTIO_NET_F_CTRL_RX,
            vn::VIRTIO_NET_F_MQ,
        ]
    );
    assert_eq!(u32::from(VIRTIO_NET_S_LINK_UP), vn::VIRTIO_NET_S_LINK_UP);
    assert_eq!(HDR_LEN, std::mem::size_of::<vn::virtio_net_hdr_v1>());
    assert_eq!(
        [VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MQ].map(u32::from),
        [
            vn::VIRTIO_NET_CTRL_RX,
            vn::VIRTIO_NET_CTRL_MAC,
            vn::VIRTIO_NET_CTRL_MQ
        ]
    );
    assert_eq!(
        u32::from(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET),
        vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
    );
    assert_eq!(
        u32::from(VIRTIO_NET_CTRL_MAC_TABLE_SET),
        vn::VIRTIO_NET_CTRL_MAC_TABLE_SET
    );
}

#[test]
fn config_space_and_features() {
    let (b, _peer) = pair();
    let dev = Net::new(vec![b], Some(mac())).unwrap();
    let mut cfg = [0u8; CONFIG_LEN];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[0..6], &mac().bytes());
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    let f = dev.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
    ] {
        assert!(has_feature(f, bit), "feature {bit}");
    }
    assert!(!has_feature(f, VIRTIO_NET_F_MQ));
    assert_eq!(dev.queue_max_sizes().len(), 3);

    let backends: Vec<_> = (0..4).map(|_| pair().0).collect();
    let dev = Net::new(backends, None).unwrap();
    assert!(has_feature(dev.features(), VIRTIO_NET_F_MQ));
    assert_eq!(dev.queue_max_sizes().len(), 9);
    dev.read_config(8, &mut cfg[..2]);
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 4);
    assert!(dev.mac().is_local() && !dev.mac().is_multicast());

    assert!(matches!(
        Net::new(Vec::new(), None),
        Err(NetError::QueuePairs(0))
    ));
    assert_eq!(
        tap_offloads(feature(VIRTIO_NET_F_GUEST_CSUM) | feature(VIRTIO_NET_F_GUEST_TSO4)),
        ::net::tap::TUN_F_CSUM | ::net::tap::TUN_F_TSO4
    );
}

#[test]
fn transmit_reaches_the_backend() {
    let m = mem();
    let mut h = Harness::new(&m, 1, 0);
    let p = packet(100, 1);
    h.transmit(&p, 0);
    h.kick_tx();
    let mut got = vec![0u8; 70000];
    let n = h.peers[0].recv(&mut got).unwrap();
    assert_eq!(&got[..n], &p[..]);
    h.tx.wait_used(1);
    assert_eq!(h.tx.used(0).1, 0);
    // A 64 KiB TSO-sized packet in one write.
    let big = packet(MAX_FRAME_LEN, 2);
    m.write_slice(&big, GuestAddress(TX_BUF + 0x10000)).unwrap();
    h.tx.add_chain(&[(TX_BUF + 0x10000, big.len() as u32, R)]);
    h.kick_tx();
    let n = h.peers[0].recv(&mut got).unwrap();
    assert_eq!(&got[..n], &big[..]);
    assert!(h.int.queue.load(AtomicOrdering::SeqCst) >= 1);
    // Frame bytes, without the virtio-net header.
    h.wait_counters(NetCountersSnapshot {
        tx_packets: 2,
        tx_bytes: (100 + MAX_FRAME_LEN) as u64,
        ..Default::default()
    });
}

#[test]
fn malformed_transmit_chains_drop_only_their_packet() {
    let m = mem();
    let mut h = Harness::new(&m, 1, 0);
    let p = packet(60, 3);
    m.write_slice(&p, GuestAddress(TX_BUF)).unwrap();
    // Wrong direction, a runt, too long, outside memory; then a good one.
    h.tx.add_chain(&[(TX_BUF, p.len() as u32, W)]);
    h.tx.add_chain(&[(TX_BUF, HDR_LEN as u32, R)]);
    h.tx.add_chain(&[
        (TX_BUF, 0x10000, R),
        (TX_BUF + 0x10000, (MAX_PACKET_LEN - 0x10000 + 1) as u32, R),
    ]);
    h.tx.add_chain(&[(0xffff_0000_0000, 100, R)]);
    h.transmit(&p, 0);
    h.kick_tx();
    h.tx.wait_used(5);
    let mut got = vec![0u8; 70000];
    let n = h.peers[0].recv(&mut got).unwrap();
    assert_eq!(&got[..n], &p[..]);
    h.peers[0].set_nonblocking(true).unwrap();
    assert!(h.peers[0].recv(&mut got).is_err(), "only one packet sent");
    assert!(!*h.int.needs_reset.lock().unwrap());
    h.wait_counters(NetCountersSnapshot {
        tx_packets: 1,
        tx_bytes: 60,
        tx_dropped: 4,
        ..Default::default()
    });
}

#[test]
fn receive_into_one_chain_per_frame() {
    let m = mem();
    let mut h = Harness::new(&m, 1, 0);
    for i in 0..4 {
        h.rx.add_chain(&[(RX_BUF + i * 0x1000, 2048, W)]);
    }
    h.kick_rx();
    let p1 = packet(1000, 4);
    let p2 = packet(1514, 5);
    h.peers[0].send(&p1).unwrap();
    h.peers[0].send(&p2).unwrap();
    h.rx.wait_used(2);
    assert_eq!(h.rx.used(0), (0, p1.len() as u32));
    assert_eq!(h.rx.used(1), (1, p2.len() as u32));
    let mut want = p1.clone();
    want[10] = 1; // num_buffers
    assert_eq!(read(&m, RX_BUF, p1.len()), want);
    assert_eq!(
        &read(&m, RX_BUF + 0x1000, p2.len())[HDR_LEN..],
        &p2[HDR_LEN..]
    );
    h.wait_counters(NetCountersSnapshot {
        rx_packets: 2,
        rx_bytes: 1000 + 1514,
        ..Default::default()
    });
}

#[test]
fn receive_merges_buffers() {
    let m = mem();
    let mut h = Harness::new(&m, 1, feature(VIRTIO_NET_F_MRG_RXBUF));
    for i in 0..8 {
        h.rx.add_chain(&[(RX_BUF + i * 0x1000, 1024, W)]);
    }
    let p = packet(3000, 6);
    h.peers[0].send(&p).unwrap();
    h.rx.wait_used(3);
    assert_eq!(
        [h.rx.used(0), h.rx.used(1), h.rx.used(2)],
        [(0, 1024), (1, 1024), (2, p.len() as u32 - 2048)]
    );
    let mut got = Vec::new();
    for i in 0..3 {
        got.extend(read(&m, RX_BUF + i * 0x1000, 1024));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[HDR_LEN..p.len()], &p[HDR_LEN..]);
}

#[test]
fn receive_waits_for_buffers_without_losing_frames() {
    let m = mem();
    let mut h = Harness::new(&m, 1, 0);
    let ps: Vec<_> = (0..3).map(|i| packet(200 + i, i as u8)).collect();
    for p in &ps {
        h.peers[0].send(p).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.rx.used_idx(), 0);
    // The worker asked for a notification (flags 0) and stopped polling the backend.
    let flags: u16 = m.read_obj(GuestAddress(h.rx.used)).unwrap();
    assert_eq!(flags, 0);
    h.rx.add_chain(&[(RX_BUF, 2048, W)]);
    h.kick_rx();
    h.rx.wait_used(1);
    for i in 1..3 {
        h.rx.add_chain(&[(RX_BUF + i * 0x1000, 2048, W)]);
    }
    h.kick_rx();
    h.rx.wait_used(3);
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(h.rx.used(i as u16).1, p.len() as u32);
        let got = read(&m, RX_BUF + i as u64 * 0x1000, p.len());
        assert_eq!(&got[HDR_LEN..], &p[HDR_LEN..]);
    }
    // Polling again: a frame sent now arrives without a kick.
    h.rx.add_chain(&[(RX_BUF + 0x3000, 2048, W)]);
    h.kick_rx();
    std::thread::sleep(Duration::from_millis(20));
    h.peers[0].send(&ps[0]).unwrap();
    h.rx.wait_used(4);
}

#[test]
fn receive_drops_what_cannot_fit_and_returns_bad_buffers() {
    let m = mem();
    let mut h = Harness::new(&m, 1, 0);
    // A chain with a device-readable buffer is returned empty; a small chain stays for the next
    // frame when an oversized one is dropped.
    h.rx.add_chain(&[(RX_BUF, 16, R), (RX_BUF + 0x100, 2048, W)]);
    h.rx.add_chain(&[(RX_BUF + 0x1000, 256, W)]);
    h.kick_rx();
    h.peers[0].send(&packet(1000, 1)).unwrap();
    h.peers[0].send(&packet(100, 2)).unwrap();
    // A runt.
    h.peers[0].send(&[0u8; 20]).unwrap();
    h.peers[0].send(&packet(50, 3)).unwrap();
    h.rx.wait_used(2);
    assert_eq!(h.rx.used(0), (0, 0));
    assert_eq!(h.rx.used(1), (2, 112));
    assert_eq!(
        &read(&m, RX_BUF + 0x1000, 112)[HDR_LEN..],
        &packet(100, 2)[HDR_LEN..]
    );
    assert!(!*h.int.needs_reset.lock().unwrap());
    // The oversized frame and the runt were dropped; the last one waits for buffers.
    h.wait_counters(NetCountersSnapshot {
        rx_packets: 1,
        rx_bytes: 100,
        rx_dropped: 2,
        ..Default::default()
    });
}

#[test]
fn deliver_rewinds_when_the_frame_does_not_fit() {
    let m = mem();
    let mut tq = TestQueue::new(&m, 4);
    let mut q = tq.queue();
    let mut pool: Vec<Chain> = Vec::new();
    let mut p = packet(3000, 1);
    // Mergeable, but the whole queue (4 x 512) cannot hold 3012 bytes.
    for i in 0..4 {
        tq.add_chain(&[(RX_BUF + i * 0x1000, 512, W)]);
    }
    let o = deliver(&mut q, &m, &mut p, true, &mut pool).unwrap();
    assert_eq!(
        o,
        RxOutcome::Dropped {
            why: DropReason::TooBig,
            returned: 0
        }
    );
    assert_eq!(q.next_avail(), 0);
    // Not enough yet: nothing consumed.
    let mut tq = TestQueue::new(&m, 8);
    let mut q = tq.queue();
    tq.add_chain(&[(RX_BUF, 1024, W)]);
    let o = deliver(&mut q, &m, &mut p, true, &mut pool).unwrap();
    assert_eq!(
        o,
        RxOutcome::NoBuffers {
            seen_avail: 1,
            returned: 0
        }
    );
    assert_eq!(q.next_avail(), 0);
    tq.add_chain(&[(RX_BUF + 0x1000, 1024, W)]);
    tq.add_chain(&[(RX_BUF + 0x2000, 1024, W)]);
    let o = deliver(&mut q, &m, &mut p, true, &mut pool).unwrap();
    assert_eq!(o, RxOutcome::Delivered(3));
    // A bad buffer in the middle of a merged frame: all of them go back empty.
    tq.add_chain(&[(RX_BUF, 1024, W)]);
    tq.add_chain(&[(0xffff_0000_0000, 1024, W)]);
    let o = deliver(&mut q, &m, &mut p, true, &mut pool).unwrap();
    assert_eq!(
        o,
        RxOutcome::Dropped {
            why: DropReason::Malformed,
            returned: 2
        }
    );
    assert_eq!(tq.used_idx(), 5);
}

#[test]
fn control_queue_commands() {
    let m = mem();
    let mut h = Harness::new(
        &m,
        2,
        feature(VIRTIO_NET_F_CTRL_VQ) | feature(VIRTIO_NET_F_MQ) | feature(VIRTIO_NET_F_CTRL_RX),
    );
    assert_eq!(h.dev.net_state().active_pairs, 1);
    assert_eq!(h.command(0, &[VIRTIO_NET_CTRL_MQ, 0, 2, 0]), VIRTIO_NET_OK);
    assert_eq!(h.dev.net_state().active_pairs, 2);
    assert_eq!(h.command(1, &[VIRTIO_NET_CTRL_MQ, 0, 3, 0]), VIRTIO_NET_ERR);
    assert_eq!(h.command(2, &[VIRTIO_NET_CTRL_MQ, 0, 0, 0]), VIRTIO_NET_ERR);
    assert_eq!(h.command(3, &[VIRTIO_NET_CTRL_MQ, 0]), VIRTIO_NET_ERR);
    assert_eq!(h.command(4, &[VIRTIO_NET_CTRL_RX, 0, 1]), VIRTIO_NET_OK);
    assert_eq!(h.command(5, &[VIRTIO_NET_CTRL_RX, 1, 0]), VIRTIO_NET_OK);
    assert_eq!(
        h.command(6, &[VIRTIO_NET_CTRL_MAC, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        VIRTIO_NET_OK
    );
    assert_eq!(h.command(7, &[9, 9]), VIRTIO_NET_ERR);
    // Only pair 0's queues were made ready: the second backend is unused but harmless.
    assert_eq!(h.peers.len(), 2);
}

#[test]
fn reset_and_state_round_trip() {
    let m = mem();
    let mut h = Harness::new(&m, 1, feature(VIRTIO_NET_F_MRG_RXBUF));
    // Two queues: the control queue is not served without CTRL_VQ.
    assert_eq!(h.dev.queue_states().len(), 2);
    let s = h.dev.net_state();
    assert_eq!(s.mac, mac());
    let json = serde_json::to_string(&s).unwrap();
    let back: NetState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    let vs = h.dev.state();
    h.dev.reset();
    assert!(h.dev.queue_states().is_empty());
    assert_eq!(h.dev.acked_features(), 0);
    h.dev.restore(&vs).unwrap();
    assert_eq!(h.dev.acked_features(), vs.acked_features);
    h.dev.restore_net_state(&back).unwrap();
    let other = NetState {
        mac: "02:00:00:00:00:09".parse().unwrap(),
        ..s
    };
    assert!(h.dev.restore_net_state(&other).is_err());
}

/// `size` tokens every `ms` milliseconds, no burst.
fn bucket(size: u64, ms: u64) -> TokenBucketConfig {
    TokenBucketConfig {
        size,
        one_time_burst: 0,
        refill_time_ms: ms,
    }
}

fn pps(size: u64, ms: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(size, ms)),
    }
}

/// When the used index of `q` reached 1, 2, ... `n` (polled: never early).
fn used_times(q: &TestQueue, n: u16, start: Instant) -> Vec<Duration> {
    let mut at = Vec::new();
    while at.len() < usize::from(n) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "used index stuck at {}",
            q.used_idx()
        );
        let used = usize::from(q.used_idx());
        while at.len() < used {
            at.push(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    at
}

const MS: Duration = Duration::from_millis(1);

#[test]
fn transmit_beyond_the_packet_budget_waits_in_the_ring() {
    let m = mem();
    // Before the limiter exists: its bucket starts full at creation (2 packets), then one more
    // packet may go every 50 ms.
    let start = Instant::now();
    let mut h = Harness::limited(&m, 1, 0, RateLimiterConfig::default(), pps(2, 100));
    let ps: Vec<_> = (0..5).map(|i| packet(100, i)).collect();
    for (i, p) in ps.iter().enumerate() {
        h.transmit(p, i as u64);
    }
    h.kick_tx();
    let mut got = vec![0u8; 2048];
    let mut at = Vec::new();
    for p in &ps {
        let n = h.peers[0].recv(&mut got).unwrap();
        at.push(start.elapsed());
        assert_eq!(&got[..n], &p[..]);
    }
    for (i, t) in at.iter().enumerate().skip(2) {
        assert!(*t >= 50 * MS * (i as u32 - 1), "packet {i} sent at {t:?}");
    }
    // Every chain went to the used ring, in order: the refused ones waited, none was dropped.
    h.tx.wait_used(5);
    for i in 0..5 {
        assert_eq!(h.tx.used(i), (u32::from(i) * 2, 0));
    }
    assert!(!*h.int.needs_reset.lock().unwrap());
}

#[test]
fn transmit_beyond_the_byte_budget_waits_in_the_ring() {
    let m = mem();
    // 3000 frame bytes per 100 ms; frames of 1000 bytes (the header is not counted).
    let tx = RateLimiterConfig {
        bandwidth: Some(bucket(3000, 100)),
        ops: None,
    };
    let start = Instant::now();
    let mut h = Harness::limited(&m, 1, 0, RateLimiterConfig::default(), tx);
    for i in 0..6 {
        h.transmit(&packet(1000, i as u8), i);
    }
    h.kick_tx();
    let at = used_times(&h.tx, 6, start);
    // Three at once, then one per 33.3 ms.
    assert!(at[5] >= 100 * MS, "{at:?}");
    let mut got = vec![0u8; 2048];
    for i in 0..6 {
        let n = h.peers[0].recv(&mut got).unwrap();
        assert_eq!(&got[..n], &packet(1000, i)[..]);
    }
}

#[test]
fn receive_beyond_the_budget_waits_in_the_backend() {
    let m = mem();
    let start = Instant::now();
    let mut h = Harness::limited(&m, 1, 0, pps(2, 100), RateLimiterConfig::default());
    for i in 0..8 {
        h.rx.add_chain(&[(RX_BUF + i * 0x1000, 2048, W)]);
    }
    h.kick_rx();
    let ps: Vec<_> = (0..5).map(|i| packet(300 + i, i as u8)).collect();
    for p in &ps {
        h.peers[0].send(p).unwrap();
    }
    let at = used_times(&h.rx, 5, start);
    for (i, t) in at.iter().enumerate().skip(2) {
        assert!(*t >= 50 * MS * (i as u32 - 1), "frame {i} at {t:?}");
    }
    // In order, none lost.
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(h.rx.used(i as u16), (i as u32, p.len() as u32));
        let got = read(&m, RX_BUF + i as u64 * 0x1000, p.len());
        assert_eq!(&got[HDR_LEN..], &p[HDR_LEN..]);
    }
}

#[test]
fn a_rate_limited_worker_sleeps() {
    // One frame per 2 s: while the second frame waits in the backend, which stays readable,
    // the worker must not spin on it (nor on anything else).
    let m = mem();
    let mut h = Harness::limited(&m, 1, 0, pps(1, 2000), RateLimiterConfig::default());
    for i in 0..4 {
        h.rx.add_chain(&[(RX_BUF + i * 0x1000, 2048, W)]);
    }
    h.kick_rx();
    for i in 0..3 {
        h.peers[0].send(&packet(300, i)).unwrap();
    }
    h.rx.wait_used(1);
    let before = h.dev.workers[0].cpu_time();
    std::thread::sleep(500 * MS);
    let used = h.dev.workers[0].cpu_time() - before;
    // Blocked in epoll, it uses nothing; spinning, it would take a good part of the 500 ms.
    assert!(
        used < 50 * MS,
        "the worker used {used:?} of CPU while waiting"
    );
    h.rx.wait_used(2);
}

#[test]
fn a_frame_refused_for_lack_of_buffers_is_charged_once() {
    // Two frames of budget; the first waits for buffers, and is not charged again when they
    // come: the second frame needs no timer.
    let m = mem();
    let mut h = Harness::limited(&m, 1, 0, pps(2, 60_000), RateLimiterConfig::default());
    h.peers[0].send(&packet(100, 1)).unwrap();
    h.peers[0].send(&packet(100, 2)).unwrap();
    std::thread::sleep(50 * MS);
    for i in 0..2 {
        h.rx.add_chain(&[(RX_BUF + i * 0x1000, 2048, W)]);
        h.kick_rx();
        h.rx.wait_used(i as u16 + 1);
    }
}

#[test]
fn limits_are_shared_by_the_queue_pairs_and_wake_each() {
    let m = mem();
    let mut backends: Vec<Arc<dyn NetBackend>> = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..2 {
        let (b, peer) = pair();
        backends.push(b);
        peers.push(peer);
    }
    let start = Instant::now();
    let mut dev = Net::new(backends, Some(mac())).unwrap();
    dev.set_rate_limiters(pps(2, 100), pps(2, 100)).unwrap();
    dev.ack_features(feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MQ));
    // rx0, tx0, rx1, tx1.
    let mut qs: Vec<TestQueue> = (0..4)
        .map(|i| TestQueue::new_at(&m, 16, i * 0x10000))
        .collect();
    let mut kicks = Vec::new();
    let mut active = Vec::new();
    for (i, tq) in qs.iter().enumerate() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        kicks.push(evt.try_clone().unwrap());
        active.push(ActiveQueue {
            index: i as u16,
            queue: tq.queue(),
            notifier: evt,
        });
    }
    dev.activate(m.clone(), Arc::new(CountingInterrupt::default()), active)
        .unwrap();
    for pair in 0..2u64 {
        let (rx, tx) = (pair as usize * 2, pair as usize * 2 + 1);
        for i in 0..3u64 {
            let at = TX_BUF + pair * 0x10000 + i * 0x1000;
            let p = packet(100, (pair * 3 + i) as u8);
            m.write_slice(&p, GuestAddress(at)).unwrap();
            qs[tx].add_chain(&[(at, p.len() as u32, R)]);
            qs[rx].add_chain(&[(RX_BUF + pair * 0x10000 + i * 0x1000, 2048, W)]);
        }
        kicks[rx].write(1).unwrap();
    }
    for pair in 0..2 {
        kicks[pair * 2 + 1].write(1).unwrap();
        for i in 0..3 {
            peers[pair].send(&packet(200, i)).unwrap();
        }
    }
    // Six packets each way through one budget: two at once, then one per 50 ms; both pairs
    // get all theirs (each blocked pair is woken).
    let mut got = vec![0u8; 2048];
    for (pair, peer) in peers.iter().enumerate() {
        for i in 0..3 {
            let n = peer.recv(&mut got).unwrap();
            assert_eq!(&got[..n], &packet(100, (pair * 3 + i) as u8)[..]);
        }
    }
    let sent = start.elapsed();
    for q in &qs {
        q.wait_used(3);
    }
    let all = start.elapsed();
    // With a budget per pair, each would be done after 50 ms.
    assert!(sent >= 200 * MS, "sent in {sent:?}");
    assert!(all >= 200 * MS, "received in {all:?}");
    dev.reset();
}

#[test]
fn rate_limits_are_in_the_state() {
    let m = mem();
    let tx = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig::per_second(1 << 20, 1 << 16)),
        ops: Some(bucket(1000, 1000)),
    };
    let mut h = Harness::limited(&m, 1, 0, pps(10, 1000), tx);
    let s = h.dev.net_state();
    assert_eq!((s.rx_rate_limiter, s.tx_rate_limiter), (pps(10, 1000), tx));
    let back: NetState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
    // A state from before rate limits: none.
    let mut old = serde_json::to_value(&s).unwrap();
    old.as_object_mut().unwrap().remove("rx_rate_limiter");
    old.as_object_mut().unwrap().remove("tx_rate_limiter");
    let old: NetState = serde_json::from_value(old).unwrap();
    assert!(old.rx_rate_limiter.is_unlimited() && old.tx_rate_limiter.is_unlimited());
    h.dev.reset();
    h.dev.restore_net_state(&old).unwrap();
    assert_eq!(
        h.dev.rate_limiters(),
        (RateLimiterConfig::default(), RateLimiterConfig::default())
    );
    h.dev.restore_net_state(&s).unwrap();
    assert_eq!(h.dev.rate_limiters(), (pps(10, 1000), tx));
    let bad = NetState {
        tx_rate_limiter: pps(0, 1000),
        ..s
    };
    assert!(h.dev.restore_net_state(&bad).is_err());
}

/// A real tap in a private network namespace (this thread's only): the host side has
/// 10.0.2.2/24 and a static neighbour entry for the "guest" 10.0.2.15, a UDP socket echoes, and
/// the device carries the datagrams both ways. Needs root and /dev/net/tun; skipped otherwise.
#[test]
fn udp_echo_through_a_real_tap() {
    let t = std::thread::spawn(|| {
        // SAFETY: unshare with CLONE_NEWNET takes no pointers; it moves only this thread (and
        // what it creates later) into a new network namespace, leaving the host's networking
        // untouched.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!("skipped: cannot create a network namespace");
            return;
        }
        if std::fs::metadata("/dev/net/tun").is_err() {
            eprintln!("skipped: no /dev/net/tun");
            return;
        }
        real_tap_echo();
    });
    t.join().unwrap();
}

fn ip(args: &str) {
    let st = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run ip");
    assert!(st.success(), "ip {args}");
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst_mac);
    f.extend(src_mac);
    f.extend([0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend(src);
    ip.extend(dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(ip);
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend((8 + payload.len() as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend(payload);
    f
}

fn real_tap_echo() {
    let name = "vtapunit0";
    let mut dev = Net::with_tap(name, Some(mac()), 1).unwrap();
    ip("link set lo up");
    ip(&format!("addr add 10.0.2.2/24 dev {name}"));
    ip(&format!("link set {name} up"));
    ip(&format!(
        "neigh add 10.0.2.15 lladdr {} dev {name} nud permanent",
        mac()
    ));
    // (sysfs shows the namespace it was mounted in: ask ip.)
    let link = std::process::Command::new("ip")
        .args(["-o", "link", "show", name])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    let host_mac: MacAddr = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {link}"))
        .parse()
        .unwrap();
    let sock = std::net::UdpSocket::bind("10.0.2.2:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = sock.local_addr().unwrap().port();

    let m = mem();
    let mut rx = TestQueue::new_at(&m, 64, RX_SHIFT);
    let mut tx = TestQueue::new_at(&m, 64, TX_SHIFT);
    // Guest checksum offload: the tap may hand over frames with a partial checksum.
    dev.ack_features(
        feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_NET_F_MRG_RXBUF)
            | feature(VIRTIO_NET_F_GUEST_CSUM)
            | feature(VIRTIO_NET_F_CSUM),
    );
    let rk = EventFd::new(EFD_NONBLOCK).unwrap();
    let tk = EventFd::new(EFD_NONBLOCK).unwrap();
    let (rkick, tkick) = (rk.try_clone().unwrap(), tk.try_clone().unwrap());
    dev.activate(
        m.clone(),
        Arc::new(CountingInterrupt::default()),
        vec![
            ActiveQueue {
                index: 0,
                queue: rx.queue(),
                notifier: rk,
            },
            ActiveQueue {
                index: 1,
                queue: tx.queue(),
                notifier: tk,
            },
        ],
    )
    .unwrap();
    for i in 0..32 {
        rx.add_chain(&[(RX_BUF + i * 0x1000, 4096, W)]);
    }
    rkick.write(1).unwrap();

    let payload = b"vessel virtio-net unit echo";
    let frame = udp_frame(
        host_mac.bytes(),
        mac().bytes(),
        [10, 0, 2, 15],
        [10, 0, 2, 2],
        49152,
        port,
        payload,
    );
    let mut p = vec![0u8; HDR_LEN];
    p.extend(&frame);
    m.write_slice(&p, GuestAddress(TX_BUF)).unwrap();
    tx.add_chain(&[(TX_BUF, p.len() as u32, R)]);
    tkick.write(1).unwrap();

    let mut buf = [0u8; 256];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("the datagram reaches the host socket");
    assert_eq!(&buf[..n], payload);
    assert_eq!(from.to_string(), "10.0.2.15:49152");
    sock.send_to(b"pong from the host", from).unwrap();

    // Frames arrive (IPv6 router solicitations may come first): find the UDP reply.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no UDP reply in {seen} frames"
        );
        if rx.used_idx() == seen {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let (id, len) = rx.used(seen);
        seen += 1;
        let got = read(&m, RX_BUF + u64::from(id) * 0x1000, len as usize);
        let f = &got[HDR_LEN..];
        if f.len() > 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 {
            assert_eq!(&f[0..6], &mac().bytes());
            assert_eq!(&f[42..], b"pong from the host");
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
            break;
        }
    }
    dev.reset();
}

/// A socket backend that can be detached, like a tap queue.
struct Detachable {
    sock: UnixDatagram,
    enabled: std::sync::atomic::AtomicBool,
}

impl NetBackend for Detachable {
    fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        assert!(self.is_enabled(), "read from a detached queue");
        self.sock.recv(buf)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.send(buf)
    }
    fn set_queue_enabled(&self, enabled: bool) -> std::io::Result<()> {
        self.enabled.store(enabled, AtomicOrdering::SeqCst);
        Ok(())
    }
    fn is_enabled(&self) -> bool {
        self.enabled.load(AtomicOrdering::SeqCst)
    }
}

#[test]
fn second_pair_receives_once_the_driver_enables_it() {
    let m = mem();
    let mut backends: Vec<Arc<dyn NetBackend>> = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..2 {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        backends.push(Arc::new(Detachable {
            sock: a,
            enabled: true.into(),
        }));
        peers.push(b);
    }
    let mut dev = Net::new(backends, Some(mac())).unwrap();
    dev.ack_features(
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_CTRL_VQ) | feature(VIRTIO_NET_F_MQ),
    );
    let mut qs: Vec<TestQueue> = (0..5)
        .map(|i| TestQueue::new_at(&m, 16, i * 0x10000))
        .collect();
    let mut kicks = Vec::new();
    let mut active = Vec::new();
    for (i, tq) in qs.iter().enumerate() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        kicks.push(evt.try_clone().unwrap());
        active.push(ActiveQueue {
            index: i as u16,
            queue: tq.queue(),
            notifier: evt,
        });
    }
    dev.activate(m.clone(), Arc::new(CountingInterrupt::default()), active)
        .unwrap();
    // rx1 has buffers and a frame waits on backend 1, which is detached until VQ_PAIRS_SET.
    qs[2].add_chain(&[(RX_BUF, 2048, W)]);
    kicks[2].write(1).unwrap();
    let p = packet(300, 9);
    peers[1].send(&p).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(qs[2].used_idx(), 0);
    m.write_slice(&[VIRTIO_NET_CTRL_MQ, 0, 2, 0], GuestAddress(CTRL_BUF))
        .unwrap();
    qs[4].add_chain(&[(CTRL_BUF, 4, R), (CTRL_BUF + 0x80, 1, W)]);
    kicks[4].write(1).unwrap();
    qs[4].wait_used(1);
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(CTRL_BUF + 0x80)).unwrap(),
        VIRTIO_NET_OK
    );
    qs[2].wait_used(1);
    assert_eq!(qs[2].used(0).1, p.len() as u32);
    // Back to one pair: backend 1 is left alone again.
    m.write_slice(&[VIRTIO_NET_CTRL_MQ, 0, 1, 0], GuestAddress(CTRL_BUF))
        .unwrap();
    qs[4].add_chain(&[(CTRL_BUF, 4, R), (CTRL_BUF + 0x80, 1, W)]);
    kicks[4].write(1).unwrap();
    qs[4].wait_used(2);
    qs[2].add_chain(&[(RX_BUF + 0x1000, 2048, W)]);
    kicks[2].write(1).unwrap();
    peers[1].send(&p).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(qs[2].used_idx(), 1);
    dev.reset();
}
