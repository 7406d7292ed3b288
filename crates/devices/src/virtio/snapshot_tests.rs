//! Pause, snapshot and restore of every device, driven through the virtio-mmio transport as
//! the VM monitor and a driver would: requests in flight, a pause in the middle of them, the
//! state through JSON, a new device on the same backend, a restore and a resume. Every request
//! must be served exactly once and the ring indexes must continue.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::balloon::{Balloon, BalloonOptions, DiscardMemory, ZeroFill, VIRTIO_BALLOON_F_STATS_VQ};
use super::block::request::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use super::block::{Block, BlockOptions, BlockState, EngineKind};
use super::console::{Console, ConsoleBackend, ConsoleInput};
use super::mmio::{MmioTransport, VirtioMmioState, CONFIG_OFFSET};
use super::net::{MacAddr, Net, NetBackend, HDR_LEN, VIRTIO_NET_F_MAC};
use super::rng::Rng;
use super::testing::*;
use super::vsock::packet::*;
use super::vsock::{Vsock, HOST_CID};
use super::*;
use crate::BusDevice;

/// Features every test driver accepts.
const BASE: u64 = feature(VIRTIO_F_VERSION_1);

/// Save a paused transport's state as the VM monitor would: as JSON.
fn save(t: &MmioTransport) -> String {
    serde_json::to_string(&t.state()).unwrap()
}

/// Nothing more arrives on `peer` (a datagram socket).
fn nothing_on(peer: &UnixDatagram) {
    settle();
    peer.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let r = peer.recv(&mut b);
    peer.set_nonblocking(false).unwrap();
    assert!(
        matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "unexpected datagram: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// virtio-blk

/// A disk in memory that counts writes and can hold them at a gate.
#[derive(Default)]
struct GatedDisk {
    data: Mutex<Vec<u8>>,
    closed: Mutex<bool>,
    cv: Condvar,
    writes_started: AtomicU32,
    writes_done: AtomicU32,
}

impl GatedDisk {
    fn new(size: usize) -> Arc<GatedDisk> {
        Arc::new(GatedDisk {
            data: Mutex::new(vec![0; size]),
            ..Default::default()
        })
    }

    fn set_gate(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.cv.notify_all();
    }
}

impl ::block::DiskBackend for GatedDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> ::block::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> ::block::Result<()> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.cv.wait(closed).unwrap();
        }
        drop(closed);
        let mut d = self.data.lock().unwrap();
        d[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        self.writes_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> ::block::Result<()> {
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> ::block::Result<()> {
        self.write_zeroes(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> ::block::Result<()> {
        self.data.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
    fn format(&self) -> ::block::Format {
        ::block::Format::Raw
    }
}

const BLK_HDR: u64 = 0x100000;
const BLK_DATA: u64 = 0x200000;
const BLK_STATUS: u64 = 0x300000;

/// Queue request `n`: write 512 bytes of `n + 1` to sector `n`, status byte preset to 0xff.
fn blk_write(m: &GuestMem, q: &mut TestQueue, n: u64) {
    let hdr = BLK_HDR + 16 * n;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&n.to_le_bytes());
    m.write_slice(&h, GuestAddress(hdr)).unwrap();
    m.write_slice(&[n as u8 + 1; 512], GuestAddress(BLK_DATA + 512 * n))
        .unwrap();
    m.write_obj(0xffu8, GuestAddress(BLK_STATUS + n)).unwrap();
    q.add_chain(&[
        (hdr, 16, R),
        (BLK_DATA + 512 * n, 512, R),
        (BLK_STATUS + n, 1, W),
    ]);
}

fn blk_status(m: &GuestMem, n: u64) -> u8 {
    m.read_obj(GuestAddress(BLK_STATUS + n)).unwrap()
}

fn block_device(disk: &Arc<GatedDisk>) -> Box<dyn VirtioDevice> {
    block_device_with(disk, EngineKind::Sync)
}

fn block_device_with(disk: &Arc<GatedDisk>, engine: EngineKind) -> Box<dyn VirtioDevice> {
    let opts = BlockOptions {
        serial: "snap-disk".into(),
        engine,
        ..Default::default()
    };
    Box::new(Block::new(disk.clone(), opts).unwrap())
}

#[test]
fn block_pause_mid_stream_snapshot_and_restore_serve_each_request_once() {
    let m = mem();
    let disk = GatedDisk::new(1 << 20);
    let (mut t, _irq) = mmio_transport(&m, block_device(&disk));
    let mut q = TestQueue::new(&m, 64);
    let features = t.device().features();
    mmio_start(&mut t, features, &[(0, &q)]);
    let t = Arc::new(Mutex::new(t));
    // Six writes; the first is held inside the disk.
    disk.set_gate(true);
    for n in 0..6 {
        blk_write(&m, &mut q, n);
    }
    mmio_notify(&mut t.lock().unwrap(), 0);
    wait_for(|| disk.writes_started.load(Ordering::SeqCst) == 1);
    // Pause while the worker is in the middle of request 0: it finishes that request only.
    let stops = super::worker::STOPS_RAISED.load(Ordering::SeqCst);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let pauser = {
        let t = t.clone();
        std::thread::spawn(move || {
            t.lock().unwrap().pause();
            done_tx.send(()).unwrap();
        })
    };
    // The worker has been asked to stop before the gate opens.
    wait_for(|| super::worker::STOPS_RAISED.load(Ordering::SeqCst) > stops);
    settle();
    assert!(done_rx.try_recv().is_err(), "pause returned mid-request");
    disk.set_gate(false);
    pauser.join().unwrap();
    let mut t = Arc::into_inner(t).unwrap().into_inner().unwrap();
    assert_eq!(q.used_idx(), 1, "the request in progress completed");
    assert_eq!(blk_status(&m, 0), VIRTIO_BLK_S_OK);
    assert_eq!(disk.writes_done.load(Ordering::SeqCst), 1);
    // Paused: a second pause is nothing, new requests and notifications wait.
    t.pause();
    blk_write(&m, &mut q, 6);
    mmio_notify(&mut t, 0);
    settle();
    assert_eq!(q.used_idx(), 1);
    assert_eq!(disk.writes_started.load(Ordering::SeqCst), 1);
    assert!((1..7).all(|n| blk_status(&m, n) == 0xff));

    let json = save(&t);
    let saved: VirtioMmioState = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (1, 1)
    );
    assert!(saved.queues[0].event_idx_enabled);
    assert_eq!(
        saved.device.specific,
        DeviceSpecificState::Block(BlockState {
            serial: "snap-disk".into(),
            engine: EngineKind::Sync,
            rate_limit: Default::default(),
        })
    );
    drop(t);
    // A new process: a new device on the same disk, restored and resumed.
    let (mut t2, _irq2) = mmio_restore(&m, &json, block_device(&disk));
    q.wait_used(7);
    for n in 0..7 {
        assert_eq!(blk_status(&m, n), VIRTIO_BLK_S_OK, "request {n}");
        assert_eq!(q.used(n as u16).0, 3 * n as u32, "used entry {n}");
        let mut b = [0u8; 512];
        ::block::DiskBackend::read_at(&*disk, &mut b, 512 * n).unwrap();
        assert_eq!(b, [n as u8 + 1; 512]);
    }
    // The indexes go on from there.
    blk_write(&m, &mut q, 7);
    mmio_notify(&mut t2, 0);
    q.wait_used(8);
    settle();
    assert_eq!(q.used_idx(), 8);
    assert_eq!(
        disk.writes_done.load(Ordering::SeqCst),
        8,
        "each write once"
    );
    // A disk with another serial is not the same device.
    let other = Block::new(disk.clone(), BlockOptions::default()).unwrap();
    let (mut t3, _) = mmio_transport(&m, Box::new(other));
    assert!(t3.restore(&saved).is_err());
}

#[test]
fn block_pause_waits_for_requests_in_flight_on_an_async_engine() {
    let m = mem();
    let disk = GatedDisk::new(1 << 20);
    let (mut t, _irq) = mmio_transport(&m, block_device_with(&disk, EngineKind::Threads));
    let mut q = TestQueue::new(&m, 64);
    let features = t.device().features();
    mmio_start(&mut t, features, &[(0, &q)]);
    let t = Arc::new(Mutex::new(t));
    // Six writes, taken together by the engine and all held inside the disk.
    disk.set_gate(true);
    for n in 0..6 {
        blk_write(&m, &mut q, n);
    }
    mmio_notify(&mut t.lock().unwrap(), 0);
    wait_for(|| disk.writes_started.load(Ordering::SeqCst) >= 1);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let pauser = {
        let t = t.clone();
        std::thread::spawn(move || {
            t.lock().unwrap().pause();
            done_tx.send(()).unwrap();
        })
    };
    settle();
    assert!(
        done_rx.try_recv().is_err(),
        "pause returned with requests in flight"
    );
    disk.set_gate(false);
    pauser.join().unwrap();
    let mut t = Arc::into_inner(t).unwrap().into_inner().unwrap();
    // Every request the device took is complete and in the used ring: none is in flight.
    let saved: VirtioMmioState = serde_json::from_str(&save(&t)).unwrap();
    let (avail, used) = (saved.queues[0].next_avail, saved.queues[0].next_used);
    assert_eq!(avail, used, "no request taken and not used");
    assert_eq!(q.used_idx(), used);
    assert_eq!(
        disk.writes_done.load(Ordering::SeqCst),
        u32::from(used),
        "the writes done are those used"
    );
    for n in 0..u64::from(used) {
        assert_eq!(blk_status(&m, n), VIRTIO_BLK_S_OK, "request {n}");
    }
    // Resumed, the device serves the rest, each once.
    t.resume().unwrap();
    q.wait_used(6);
    settle();
    assert_eq!(disk.writes_done.load(Ordering::SeqCst), 6);
    assert!((0..6).all(|n| blk_status(&m, n) == VIRTIO_BLK_S_OK));
}

#[test]
fn block_disk_switched_while_paused_takes_the_writes_after() {
    for engine in [EngineKind::Sync, EngineKind::Threads] {
        let m = mem();
        let old = GatedDisk::new(1 << 20);
        let new = GatedDisk::new(1 << 20);
        let (mut t, _irq) = mmio_transport(&m, block_device_with(&old, engine));
        let mut q = TestQueue::new(&m, 64);
        let features = t.device().features();
        mmio_start(&mut t, features, &[(0, &q)]);
        blk_write(&m, &mut q, 0);
        mmio_notify(&mut t, 0);
        q.wait_used(1);
        fn block(t: &mut MmioTransport) -> &mut Block {
            t.device_mut().as_block_mut().unwrap()
        }
        // Running: refused, nothing changes.
        let running = block(&mut t).replace_disk(new.clone());
        assert!(running.is_err(), "switched a running device");
        t.pause();
        // Another size: refused.
        let small = GatedDisk::new(1 << 19);
        assert!(block(&mut t).replace_disk(small).is_err());
        let was = block(&mut t).replace_disk(new.clone()).unwrap();
        assert!(Arc::ptr_eq(
            &was,
            &(old.clone() as Arc<dyn ::block::DiskBackend>)
        ));
        drop(was);
        t.resume().unwrap();
        blk_write(&m, &mut q, 1);
        mmio_notify(&mut t, 0);
        q.wait_used(2);
        assert_eq!(blk_status(&m, 1), VIRTIO_BLK_S_OK);
        assert_eq!(old.writes_done.load(Ordering::SeqCst), 1, "{engine}");
        assert_eq!(new.writes_done.load(Ordering::SeqCst), 1, "{engine}");
        let mut b = [0u8; 512];
        ::block::DiskBackend::read_at(&*new, &mut b, 512).unwrap();
        assert_eq!(b, [2u8; 512]);
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-net

const NET_RX_BUF: u64 = 0x100000;
const NET_TX_BUF: u64 = 0x200000;

fn net_mac() -> MacAddr {
    "52:54:00:00:00:01".parse().unwrap()
}

/// A packet: a zero virtio-net header and a 60-byte frame filled with `seed`.
fn net_packet(seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p.extend([seed; 60]);
    p
}

fn net_transmit(m: &GuestMem, q: &mut TestQueue, slot: u64, p: &[u8]) {
    let at = NET_TX_BUF + slot * 0x1000;
    m.write_slice(p, GuestAddress(at)).unwrap();
    q.add_chain(&[(at, p.len() as u32, R)]);
}

/// The frame (without its header) of the `i`th used receive buffer.
fn net_received(m: &GuestMem, q: &TestQueue, i: u16) -> Vec<u8> {
    let (id, len) = q.used(i);
    let mut b = vec![0u8; len as usize];
    m.read_slice(&mut b, GuestAddress(NET_RX_BUF + u64::from(id) * 0x1000))
        .unwrap();
    b.split_off(HDR_LEN)
}

fn net_frame(seed: u8) -> Vec<u8> {
    net_packet(seed).split_off(HDR_LEN)
}

#[test]
fn net_pause_snapshot_and_restore_lose_and_repeat_no_frame() {
    let m = mem();
    let (a, peer) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let backend: Arc<dyn NetBackend> = Arc::new(a);
    let net = Net::new(vec![backend.clone()], Some(net_mac())).unwrap();
    let (mut t, _irq) = mmio_transport(&m, Box::new(net));
    let mut rx = TestQueue::new_at(&m, 16, 0);
    let mut tx = TestQueue::new_at(&m, 16, 0x10000);
    let features = BASE | feature(VIRTIO_RING_F_EVENT_IDX) | feature(VIRTIO_NET_F_MAC);
    mmio_start(&mut t, features, &[(0, &rx), (1, &tx)]);
    for i in 0..4 {
        rx.add_chain(&[(NET_RX_BUF + i * 0x1000, 2048, W)]);
    }
    mmio_notify(&mut t, 0);
    for i in 0..3 {
        net_transmit(&m, &mut tx, i, &net_packet(i as u8));
    }
    mmio_notify(&mut t, 1);
    let mut buf = [0u8; 2048];
    for i in 0..3 {
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], net_packet(i));
    }
    peer.send(&net_packet(0xa0)).unwrap();
    rx.wait_used(1);
    assert_eq!(net_received(&m, &rx, 0), net_frame(0xa0));

    t.pause();
    t.pause();
    // While paused: frames from the network wait in the backend, the guest's wait in its ring.
    peer.send(&net_packet(0xa1)).unwrap();
    peer.send(&net_packet(0xa2)).unwrap();
    for i in 3..5 {
        net_transmit(&m, &mut tx, i, &net_packet(i as u8));
    }
    mmio_notify(&mut t, 1);
    mmio_notify(&mut t, 0);
    nothing_on(&peer);
    assert_eq!((rx.used_idx(), tx.used_idx()), (1, 3));

    let json = save(&t);
    drop(t);
    let net = Net::new(vec![backend.clone()], Some(net_mac())).unwrap();
    let (mut t2, _irq2) = mmio_restore(&m, &json, Box::new(net));
    for i in 3..5 {
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], net_packet(i), "transmitted once, in order");
    }
    tx.wait_used(5);
    rx.wait_used(3);
    assert_eq!(net_received(&m, &rx, 1), net_frame(0xa1));
    assert_eq!(net_received(&m, &rx, 2), net_frame(0xa2));
    // Indexes continue; nothing was sent twice.
    net_transmit(&m, &mut tx, 5, &net_packet(5));
    mmio_notify(&mut t2, 1);
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], net_packet(5));
    nothing_on(&peer);
    assert_eq!(tx.used_idx(), 6);
    // An in-process pause and resume also keeps the device serving.
    t2.pause();
    t2.resume().unwrap();
    t2.resume().unwrap();
    peer.send(&net_packet(0xa3)).unwrap();
    rx.wait_used(4);
    assert_eq!(net_received(&m, &rx, 3), net_frame(0xa3));
}

#[test]
fn net_clone_gets_another_mac_only_when_asked() {
    let m = mem();
    let (a, _peer) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let backend: Arc<dyn NetBackend> = Arc::new(a);
    let net = Net::new(vec![backend.clone()], Some(net_mac())).unwrap();
    let (mut t, _irq) = mmio_transport(&m, Box::new(net));
    let rx = TestQueue::new_at(&m, 16, 0);
    let tx = TestQueue::new_at(&m, 16, 0x10000);
    mmio_start(
        &mut t,
        BASE | feature(VIRTIO_NET_F_MAC),
        &[(0, &rx), (1, &tx)],
    );
    t.pause();
    let mut state = t.state();
    drop(t);
    let clone_mac: MacAddr = "52:54:00:00:00:02".parse().unwrap();
    let clone = || Box::new(Net::new(vec![backend.clone()], Some(clone_mac)).unwrap());
    // The saved MAC does not fit a device built with another.
    let (mut t2, _) = mmio_transport(&m, clone());
    assert!(t2.restore(&state).is_err());
    assert!(state.device.set_vsock_cid(9).is_err(), "not a vsock device");
    state.device.set_net_mac(clone_mac).unwrap();
    let json = serde_json::to_string(&state).unwrap();
    let (mut t3, _) = mmio_restore(&m, &json, clone());
    let mut cfg = [0u8; 6];
    t3.read(CONFIG_OFFSET, &mut cfg);
    assert_eq!(cfg, clone_mac.bytes());
    assert!(t3.is_active());
}

// ---------------------------------------------------------------------------------------------
// virtio-vsock

const VS_RX_BUF: u64 = 0x100000;
const VS_TX_BUF: u64 = 0x200000;
const VS_EV_BUF: u64 = 0x300000;

/// The guest side of a vsock device: its rings and the packets it has read.
struct VsockDriver<'a> {
    m: &'a GuestMem,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    ev: TestQueue<'a>,
    cid: u64,
    rx_seen: u16,
    tx_slot: u64,
}

impl<'a> VsockDriver<'a> {
    fn new(m: &'a GuestMem) -> Self {
        VsockDriver {
            m,
            rx: TestQueue::new_at(m, 64, 0),
            tx: TestQueue::new_at(m, 64, 0x10000),
            ev: TestQueue::new_at(m, 16, 0x20000),
            cid: 3,
            rx_seen: 0,
            tx_slot: 0,
        }
    }

    fn post_rx(&mut self, i: u64) {
        let at = VS_RX_BUF + (i % 8) * 0x2000;
        self.rx
            .add_chain(&[(at, HEADER_LEN as u32, W), (at + 0x100, 4096, W)]);
    }

    fn header(&self, op: u16, port: u32, len: u32) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: 5555,
            dst_port: port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 << 10,
            fwd_cnt: 0,
        }
    }

    /// Queue a packet for transmission (the caller notifies).
    fn queue_tx(&mut self, h: Header, payload: &[u8]) {
        let at = VS_TX_BUF + (self.tx_slot % 32) * 0x1000;
        self.tx_slot += 1;
        self.m.write_slice(&h.to_bytes(), GuestAddress(at)).unwrap();
        self.m
            .write_slice(payload, GuestAddress(at + 0x100))
            .unwrap();
        let mut chain = vec![(at, HEADER_LEN as u32, R)];
        if !payload.is_empty() {
            chain.push((at + 0x100, payload.len() as u32, R));
        }
        self.tx.add_chain(&chain);
    }

    /// The next packet received (waiting for it); its buffer is posted again (the caller
    /// notifies the receive queue).
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let want = self.rx_seen.wrapping_add(1);
        wait_for(|| self.rx.used_idx() != self.rx_seen);
        let (id, _) = self.rx.used(self.rx_seen);
        self.rx_seen = want;
        let at = VS_RX_BUF + (u64::from(id) / 2 % 8) * 0x2000;
        let mut raw = [0u8; HEADER_LEN];
        self.m.read_slice(&mut raw, GuestAddress(at)).unwrap();
        let h = Header::from_bytes(&raw);
        let mut data = vec![0u8; h.len as usize];
        self.m
            .read_slice(&mut data, GuestAddress(at + 0x100))
            .unwrap();
        self.post_rx(u64::from(id) / 2);
        (h, data)
    }
}

fn echo_once(path: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            all.extend_from_slice(&buf[..n]);
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        all
    })
}

#[test]
fn vsock_pause_keeps_connections_restore_resets_them_with_a_new_cid() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let server = echo_once(&dir.path().join("v.sock_1234"));
    let dev = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
    let (mut t, _irq) = mmio_transport(&m, Box::new(dev));
    let mut d = VsockDriver::new(&m);
    mmio_start(&mut t, BASE, &[(0, &d.rx), (1, &d.tx), (2, &d.ev)]);
    for i in 0..8 {
        d.post_rx(i);
    }
    for i in 0..2 {
        d.ev.add_chain(&[(VS_EV_BUF + i * 0x100, 8, W)]);
    }
    mmio_notify(&mut t, 0);
    mmio_notify(&mut t, 2);
    d.queue_tx(d.header(OP_REQUEST, 1234, 0), &[]);
    mmio_notify(&mut t, 1);
    assert_eq!(d.recv().0.op, OP_RESPONSE);
    d.queue_tx(d.header(OP_RW, 1234, 5), b"hello");
    mmio_notify(&mut t, 1);
    mmio_notify(&mut t, 0);
    let (h, data) = d.recv();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"hello"[..]));
    mmio_notify(&mut t, 0);

    // An in-process pause: the guest's packet waits, the connection stays.
    t.pause();
    d.queue_tx(d.header(OP_RW, 1234, 5), b"world");
    mmio_notify(&mut t, 1);
    settle();
    assert_eq!(d.tx.used_idx(), 2);
    t.resume().unwrap();
    d.tx.wait_used(3);
    let (h, data) = d.recv();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"world"[..]));
    mmio_notify(&mut t, 0);
    assert_eq!(d.ev.used_idx(), 0, "no reset event for a pause");

    // A snapshot, restored as a clone with CID 4 on another socket.
    t.pause();
    let mut state = t.state();
    let (rx_next, tx_next) = (state.queues[0].next_avail, state.queues[1].next_avail);
    drop(t);
    assert_eq!(server.join().unwrap(), b"helloworld", "each payload once");
    state.device.set_vsock_cid(4).unwrap();
    assert!(state.device.set_vsock_cid(2).is_err(), "the host's CID");
    assert!(
        state.device.set_net_mac(net_mac()).is_err(),
        "not a network device"
    );
    let json = serde_json::to_string(&state).unwrap();
    let dev = Vsock::new(4, &dir.path().join("v2.sock")).unwrap();
    let (mut t2, _irq2) = mmio_restore(&m, &json, Box::new(dev));
    d.ev.wait_used(1);
    let (id, len) = d.ev.used(0);
    assert_eq!(len, 4);
    let event: u32 = m
        .read_obj(GuestAddress(VS_EV_BUF + u64::from(id) * 0x100))
        .unwrap();
    assert_eq!(event, super::vsock::EVENT_TRANSPORT_RESET);
    let mut cfg = [0u8; 8];
    t2.read(CONFIG_OFFSET, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 4);
    let st = t2.state();
    assert_eq!(
        (st.queues[0].next_avail, st.queues[1].next_avail),
        (rx_next, tx_next)
    );
    // The guest, now CID 4, is answered on the rings as they were.
    d.cid = 4;
    d.queue_tx(d.header(OP_REQUEST, 999, 0), &[]);
    mmio_notify(&mut t2, 1);
    let (h, _) = d.recv();
    assert_eq!((h.op, h.dst_cid), (OP_RST, 4));
    settle();
    assert_eq!(d.ev.used_idx(), 1, "one reset event");
    assert_eq!(d.tx.used_idx(), 4);
}

// ---------------------------------------------------------------------------------------------
// virtio-console

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn console(out: &Capture, input: &ConsoleInput) -> Box<dyn VirtioDevice> {
    let backend = ConsoleBackend::new(Box::new(out.clone()), Some(input.clone()));
    Box::new(Console::new(backend).unwrap())
}

#[test]
fn console_output_and_input_survive_pause_and_restore_once() {
    let m = mem();
    let (out, input) = (Capture::default(), ConsoleInput::new().unwrap());
    let (mut t, _irq) = mmio_transport(&m, console(&out, &input));
    let mut rx = TestQueue::new_at(&m, 16, 0);
    let mut tx = TestQueue::new_at(&m, 16, 0x10000);
    mmio_start(&mut t, BASE, &[(0, &rx), (1, &tx)]);
    let say = |tx: &mut TestQueue, s: &[u8], n: u64| {
        m.write_slice(s, GuestAddress(0x100000 + n * 0x100))
            .unwrap();
        tx.add_chain(&[(0x100000 + n * 0x100, s.len() as u32, R)]);
    };
    for (n, s) in [b"a", b"b", b"c"].iter().enumerate() {
        say(&mut tx, *s, n as u64);
    }
    mmio_notify(&mut t, 1);
    tx.wait_used(3);
    assert_eq!(&*out.0.lock().unwrap(), b"abc");

    t.pause();
    say(&mut tx, b"d", 3);
    say(&mut tx, b"e", 4);
    mmio_notify(&mut t, 1);
    input.push(b"xy");
    rx.add_chain(&[(0x200000, 64, W)]);
    mmio_notify(&mut t, 0);
    settle();
    assert_eq!((tx.used_idx(), rx.used_idx()), (3, 0));
    assert_eq!(&*out.0.lock().unwrap(), b"abc");

    let json = save(&t);
    drop(t);
    let (out2, input2) = (Capture::default(), ConsoleInput::new().unwrap());
    let (_t2, _irq2) = mmio_restore(&m, &json, console(&out2, &input2));
    tx.wait_used(5);
    rx.wait_used(1);
    assert_eq!(&*out2.0.lock().unwrap(), b"de");
    assert_eq!(&*out.0.lock().unwrap(), b"abc", "nothing written twice");
    assert_eq!(rx.used(0).1, 2);
    let mut b = [0u8; 2];
    m.read_slice(&mut b, GuestAddress(0x200000)).unwrap();
    assert_eq!(&b, b"xy");
}

// ---------------------------------------------------------------------------------------------
// virtio-balloon

/// Counts the pages it discards.
#[derive(Default)]
struct Discards(AtomicU32);

impl DiscardMemory for Discards {
    fn discard(&self, mem: &GuestMem, addr: GuestAddress, len: u64) -> io::Result<()> {
        self.0.fetch_add((len / 4096) as u32, Ordering::SeqCst);
        ZeroFill.discard(mem, addr, len)
    }
}

fn inflate(m: &GuestMem, q: &mut TestQueue, n: u64) {
    let pfn = (0x200 + n as u32).to_le_bytes();
    m.write_slice(&pfn, GuestAddress(0x80000 + n * 4)).unwrap();
    q.add_chain(&[(0x80000 + n * 4, 4, R)]);
}

#[test]
fn balloon_keeps_its_statistics_buffer_and_inflates_once() {
    let m = mem();
    let opts = BalloonOptions {
        target: 16 << 20,
        stats: true,
        ..Default::default()
    };
    let discards = Arc::new(Discards::default());
    let dev = Balloon::new(opts, discards.clone()).unwrap();
    let handle = dev.handle();
    let (mut t, _irq) = mmio_transport(&m, Box::new(dev));
    let mut infl = TestQueue::new_at(&m, 16, 0);
    let defl = TestQueue::new_at(&m, 16, 0x10000);
    let mut stats = TestQueue::new_at(&m, 16, 0x20000);
    let features = BASE | feature(VIRTIO_BALLOON_F_STATS_VQ);
    mmio_start(&mut t, features, &[(0, &infl), (1, &defl), (2, &stats)]);
    // The statistics buffer, held by the device.
    let mut entry = 4u16.to_le_bytes().to_vec();
    entry.extend(1234u64.to_le_bytes());
    m.write_slice(&entry, GuestAddress(0x90000)).unwrap();
    let stats_head = stats.add_chain(&[(0x90000, 10, R)]);
    mmio_notify(&mut t, 2);
    wait_for(|| handle.stats().is_some());
    inflate(&m, &mut infl, 0);
    mmio_notify(&mut t, 0);
    infl.wait_used(1);
    assert_eq!(discards.0.load(Ordering::SeqCst), 1);

    t.pause();
    inflate(&m, &mut infl, 1);
    mmio_notify(&mut t, 0);
    settle();
    assert_eq!(infl.used_idx(), 1);
    assert_eq!(discards.0.load(Ordering::SeqCst), 1);
    let state = t.state();
    let DeviceSpecificState::Balloon(b) = &state.device.specific else {
        panic!("balloon state expected: {:?}", state.device.specific);
    };
    assert_eq!(b.stats_desc_head, Some(stats_head));
    assert_eq!(b.stats.as_ref().unwrap().free_memory, Some(1234));
    let json = serde_json::to_string(&state).unwrap();
    drop(t);

    let discards2 = Arc::new(Discards::default());
    let dev = Balloon::new(opts, discards2.clone()).unwrap();
    let handle = dev.handle();
    assert!(handle.stats().is_none());
    let (_t2, _irq2) = mmio_restore(&m, &json, Box::new(dev));
    infl.wait_used(2);
    assert_eq!(
        discards2.0.load(Ordering::SeqCst),
        1,
        "the waiting inflate, once"
    );
    assert_eq!(discards.0.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().unwrap().free_memory, Some(1234));
    assert_eq!(stats.used_idx(), 0, "still held");
    // Asking for statistics gives the held buffer back to the driver.
    handle.request_stats().unwrap();
    stats.wait_used(1);
    assert_eq!(stats.used(0).0, u32::from(stats_head));
}

// ---------------------------------------------------------------------------------------------
// Every device

#[test]
fn pause_and_resume_are_idempotent_and_harmless_on_inactive_devices() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let (a, _peer) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let devices: Vec<Box<dyn VirtioDevice>> = vec![
        block_device(&GatedDisk::new(1 << 20)),
        Box::new(Net::new(vec![Arc::new(a)], Some(net_mac())).unwrap()),
        Box::new(Rng::new()),
        Box::new(Vsock::new(3, &dir.path().join("v.sock")).unwrap()),
        console(&Capture::default(), &ConsoleInput::new().unwrap()),
        Box::new(Balloon::new(BalloonOptions::default(), Arc::new(ZeroFill)).unwrap()),
    ];
    for mut dev in devices {
        let kind = dev.device_type();
        dev.resume().unwrap();
        dev.pause();
        dev.pause();
        dev.resume().unwrap();
        dev.resume().unwrap();
        assert!(dev.queue_states().is_empty(), "device {kind}");
        // The transport: inactive, then reset while paused.
        let (mut t, _) = mmio_transport(&m, dev);
        t.pause();
        t.resume().unwrap();
        assert!(!t.is_active());
        t.pause();
        mmio_write(&mut t, super::mmio::REG_STATUS, 0);
        assert_eq!(mmio_read(&mut t, super::mmio::REG_STATUS), 0);
    }
}

#[test]
fn a_running_device_pauses_and_resets_cleanly() {
    let m = mem();
    let (mut t, _irq) = mmio_transport(&m, Box::new(Rng::new()));
    let mut q = TestQueue::new(&m, 16);
    mmio_start(&mut t, BASE, &[(0, &q)]);
    t.pause();
    q.add_chain(&[(0x10000, 8, W)]);
    mmio_notify(&mut t, 0);
    settle();
    assert_eq!(q.used_idx(), 0);
    // A driver reset while paused drops the paused workers; the device comes up again.
    mmio_write(&mut t, super::mmio::REG_STATUS, 0);
    let mut q = TestQueue::new(&m, 16);
    mmio_start(&mut t, BASE, &[(0, &q)]);
    q.add_chain(&[(0x10000, 8, W)]);
    mmio_notify(&mut t, 0);
    q.wait_used(1);
}

// ---------------------------------------------------------------------------------------------
// Transport state: the JSON shape of snapshots

/// A transport's state as JSON, as the code before the shared transport core wrote it: a
/// running rng that served one request and has its interrupt pending. Snapshots from then must
/// still restore.
const MMIO_STATE_BEFORE_CORE: &str = r#"{"status":15,"needs_reset":false,"interrupt_status":1,"device_features_sel":0,"driver_features_sel":1,"driver_features":4831838208,"queue_sel":5,"config_generation":0,"queues":[{"max_size":256,"next_avail":1,"next_used":1,"event_idx_enabled":true,"size":16,"ready":true,"desc_table":4096,"avail_ring":12288,"used_ring":16384}],"device":{"device_type":4,"avail_features":5100273664,"acked_features":4831838208,"config":[],"specific":"none"}}"#;
/// The same through virtio-pci (MSI-X off, an INTx line).
const PCI_STATE_BEFORE_CORE: &str = r#"{"pci":{"regs":[272898804,1048576,4278190081,0,4,0,0,0,0,0,0,4201204,0,64,0,256,17846281,0,0,56,34890761,0,12288,4,4,51409929,0,4096,1,65553,16384,24576,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]},"msix":{"entries":[{"addr_lo":0,"addr_hi":0,"data":0,"control":1},{"addr_lo":0,"addr_hi":0,"data":0,"control":1}],"pba":[0],"enabled":false,"function_masked":false},"status":15,"needs_reset":false,"isr":1,"device_features_sel":0,"driver_features_sel":1,"driver_features":4294967296,"queue_sel":3,"config_generation":0,"config_vector":0,"queue_vectors":[1],"queues":[{"max_size":256,"next_avail":1,"next_used":1,"event_idx_enabled":false,"size":16,"ready":true,"desc_table":4096,"avail_ring":12288,"used_ring":16384}],"device":{"device_type":4,"avail_features":5100273664,"acked_features":4294967296,"config":[],"specific":"none"}}"#;

/// A virtio-pci rng with an INTx line.
fn pci_rng(m: &GuestMem) -> (super::pci::VirtioPciDevice, Arc<EventFd>) {
    use crate::pci::msix::tests::FakeVectors;
    let intx = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let d = super::pci::VirtioPciDevice::new(
        m.clone(),
        Box::new(Rng::new()),
        Arc::new(FakeVectors::default()),
        Some(intx.clone()),
    )
    .unwrap();
    (d, intx)
}

/// Bring each transport to the state of the JSON above and save it.
fn transport_states_now() -> (String, String) {
    use super::pci::{NOTIFY_OFFSET, VIRTIO_BAR};
    use crate::pci::PciDevice;
    let m = mem();
    let (mut t, irq) = mmio_transport(&m, Box::new(Rng::new()));
    let mut q = TestQueue::new(&m, 16);
    mmio_start(&mut t, BASE | feature(VIRTIO_RING_F_EVENT_IDX), &[(0, &q)]);
    q.add_chain(&[(0x10000, 8, W)]);
    mmio_notify(&mut t, 0);
    q.wait_used(1);
    wait_for(|| irq.read().is_ok());
    mmio_write(&mut t, super::mmio::REG_QUEUE_SEL, 5);
    t.pause();
    let mmio = save(&t);

    // Fresh rings before the PCI device goes live: the MMIO device left avail index 1 at
    // the same addresses, and a device that polls on activation would serve that stale
    // chain before the rings were zeroed, then never see the new one.
    let mut q = TestQueue::new(&m, 16);
    let (mut d, intx) = pci_rng(&m);
    let mut w = |off: u64, len: usize, v: u64| {
        d.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
    };
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE));
    w(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
    w(0x08, 4, 1);
    w(0x0c, 4, 1);
    w(0x10, 2, 0);
    w(0x14, 1, u64::from(ok));
    w(0x16, 2, 0);
    w(0x18, 2, 16);
    w(0x1a, 2, 1);
    w(0x20, 8, DESC);
    w(0x28, 8, AVAIL);
    w(0x30, 8, USED);
    w(0x1c, 2, 1);
    w(0x14, 1, u64::from(ok | STATUS_DRIVER_OK));
    w(0x16, 2, 3);
    q.add_chain(&[(0x10000, 8, W)]);
    w(NOTIFY_OFFSET, 2, 0);
    q.wait_used(1);
    wait_for(|| intx.read().is_ok());
    d.pause();
    let pci = serde_json::to_string(&d.state()).unwrap();
    (mmio, pci)
}

#[test]
fn transport_state_json_keeps_its_shape() {
    let (mmio, pci) = transport_states_now();
    assert_eq!(mmio, MMIO_STATE_BEFORE_CORE);
    assert_eq!(pci, PCI_STATE_BEFORE_CORE);
}

#[test]
fn transport_state_json_from_before_the_core_restores_and_serves() {
    use super::pci::{VirtioPciState, NOTIFY_OFFSET, VIRTIO_BAR};
    use crate::pci::PciDevice;
    // Each in new guest memory holding the rings as the saved device left them: one chain
    // made available and served.
    let m = mem();
    let mut q = TestQueue::new(&m, 16);
    q.add_chain(&[(0x10000, 8, W)]);
    let s: VirtioMmioState = serde_json::from_str(MMIO_STATE_BEFORE_CORE).unwrap();
    let (mut t, irq) = mmio_transport(&m, Box::new(Rng::new()));
    t.restore(&s).unwrap();
    assert_eq!(t.state(), s);
    assert!(irq.read().is_err());
    t.resume().unwrap();
    assert_eq!(irq.read().unwrap(), 1, "the pending interrupt raised again");
    q.add_chain(&[(0x10000, 8, W)]);
    mmio_notify(&mut t, 0);
    wait_for(|| q.used_idx() == 2);
    assert_eq!(q.used(1), (1, 8), "served from the saved ring position");

    let m = mem();
    let mut q = TestQueue::new(&m, 16);
    q.add_chain(&[(0x10000, 8, W)]);
    let s: VirtioPciState = serde_json::from_str(PCI_STATE_BEFORE_CORE).unwrap();
    let (mut d, intx) = pci_rng(&m);
    d.restore(&s).unwrap();
    assert_eq!(d.state(), s);
    assert!(intx.read().is_err());
    d.resume().unwrap();
    assert_eq!(intx.read().unwrap(), 1, "the pending INTx asserted again");
    q.add_chain(&[(0x10000, 8, W)]);
    d.bar_write(VIRTIO_BAR, NOTIFY_OFFSET, &[0, 0]);
    wait_for(|| q.used_idx() == 2);
    assert_eq!(q.used(1), (1, 8), "served from the saved ring position");
}
