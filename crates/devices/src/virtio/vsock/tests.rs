//! The vsock device driven as a driver would, against real Unix sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::muxer::CONN_BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, R, W};

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 49152;
const RX_BUFS: u64 = 0x200000;
const TX_BUFS: u64 = 0x300000;
const RX_CHAINS: u16 = 8;

struct Driver<'a> {
    mem: &'a GuestMem,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    kicks: Vec<EventFd>,
    _dev: Vsock,
    int: Arc<CountingInterrupt>,
    rx_seen: u16,
    tx_slot: u64,
    /// Guest credit information sent in every packet.
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMem, dir: &Path) -> Driver<'a> {
        let rx = TestQueue::new_at(mem, 64, 0);
        let tx = TestQueue::new_at(mem, 64, 0x10000);
        let ev = TestQueue::new_at(mem, 16, 0x20000);
        let mut dev = Vsock::new(GUEST_CID, &dir.join("v.sock")).unwrap();
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), GUEST_CID);
        dev.ack_features(feature(VIRTIO_F_VERSION_1));
        let mut kicks = Vec::new();
        let mut queues = Vec::new();
        for (i, q) in [rx.queue(), tx.queue(), ev.queue()].into_iter().enumerate() {
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(evt.try_clone().unwrap());
            queues.push(ActiveQueue {
                index: i as u16,
                queue: q,
                notifier: evt,
            });
        }
        let int = Arc::new(CountingInterrupt::default());
        dev.activate(mem.clone(), int.clone(), queues).unwrap();
        let mut d = Driver {
            mem,
            rx,
            tx,
            kicks,
            _dev: dev,
            int,
            rx_seen: 0,
            tx_slot: 0,
            buf_alloc: 64 << 10,
            fwd_cnt: 0,
        };
        for i in 0..u64::from(RX_CHAINS) {
            d.post_rx(i, 4096);
        }
        d.kick(0);
        d
    }

    fn post_rx(&mut self, i: u64, data_len: u32) {
        let at = RX_BUFS + (i % u64::from(RX_CHAINS)) * 0x2000;
        self.rx
            .add_chain(&[(at, HEADER_LEN as u32, W), (at + 0x100, data_len, W)]);
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    fn header(&self, op: u16, port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Transmit a packet (header and payload in separate descriptors) and wait for it.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let at = TX_BUFS + (self.tx_slot % 32) * 0x1000;
        self.tx_slot += 1;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(at))
            .unwrap();
        if payload.is_empty() {
            self.tx.add_chain(&[(at, HEADER_LEN as u32, R)]);
        } else {
            self.mem
                .write_slice(payload, GuestAddress(at + 0x100))
                .unwrap();
            self.tx.add_chain(&[
                (at, HEADER_LEN as u32, R),
                (at + 0x100, payload.len() as u32, R),
            ]);
        }
        self.send_raw_chain_done();
    }

    fn send_raw_chain_done(&mut self) {
        let want = self.tx.used_idx().wrapping_add(1);
        self.kick(1);
        self.tx.wait_used(want);
    }

    /// The next received packet and its payload; the buffer is posted again.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let start = std::time::Instant::now();
        while self.rx.used_idx() == self.rx_seen {
            assert!(start.elapsed() < Duration::from_secs(5), "no packet");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (id, len) = self.rx.used(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        // Chains are two descriptors, allocated in order: id / 2 is the buffer number.
        let at = RX_BUFS + (u64::from(id) / 2 % u64::from(RX_CHAINS)) * 0x2000;
        let mut raw = [0u8; HEADER_LEN];
        self.mem.read_slice(&mut raw, GuestAddress(at)).unwrap();
        let h = Header::from_bytes(&raw);
        assert_eq!(len as usize, HEADER_LEN + h.len as usize, "{h:?}");
        let mut data = vec![0u8; h.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(at + 0x100))
            .unwrap();
        self.post_rx(u64::from(id) / 2, 4096);
        self.kick(0);
        (h, data)
    }

    fn no_more_rx(&self) {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(self.rx.used_idx(), self.rx_seen, "unexpected packet");
    }
}

fn echo_server(path: PathBuf) -> std::thread::JoinHandle<Vec<u8>> {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return all,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).is_err() {
                        return all;
                    }
                }
            }
        }
    })
}

#[test]
fn guest_connects_to_a_host_socket_and_gets_an_echo() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let server = echo_server(dir.path().join("v.sock_1234"));
    let mut d = Driver::new(&m, dir.path());
    d.send(d.header(OP_REQUEST, 1234, 0), &[]);
    let (h, _) = d.recv();
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (OP_RESPONSE, HOST_CID, GUEST_CID, 1234, GUEST_PORT)
    );
    assert_eq!((h.buf_alloc, h.type_), (CONN_BUF_ALLOC, TYPE_STREAM));
    d.send(d.header(OP_RW, 1234, 5), b"hello");
    let mut got = Vec::new();
    while got.len() < 5 {
        let (h, data) = d.recv();
        assert_eq!(h.op, OP_RW);
        got.extend(data);
    }
    assert_eq!(got, b"hello");
    d.fwd_cnt = 5;
    d.send(d.header(OP_CREDIT_REQUEST, 1234, 0), &[]);
    let (h, _) = d.recv();
    assert_eq!((h.op, h.fwd_cnt), (OP_CREDIT_UPDATE, 5));
    let mut s = d.header(OP_SHUTDOWN, 1234, 0);
    s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    d.send(s, &[]);
    let (h, _) = d.recv();
    assert_eq!(h.op, OP_RST);
    assert_eq!(server.join().unwrap(), b"hello");
    assert!(d.int.queue.load(Ordering::SeqCst) > 0);
    assert!(!*d.int.needs_reset.lock().unwrap());
}

#[test]
fn a_port_without_a_socket_is_refused() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&m, dir.path());
    d.send(d.header(OP_REQUEST, 999, 0), &[]);
    let (h, _) = d.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 999, GUEST_PORT));
}

#[test]
fn host_connects_to_a_guest_port() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&m, dir.path());
    let mut client = UnixStream::connect(dir.path().join("v.sock")).unwrap();
    client.write_all(b"CONNECT 5000\n").unwrap();
    let (h, _) = d.recv();
    assert_eq!((h.op, h.dst_port, h.dst_cid), (OP_REQUEST, 5000, GUEST_CID));
    let local = h.src_port;
    let mut r = d.header(OP_RESPONSE, local, 0);
    r.src_port = 5000;
    d.send(r, &[]);
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));
    client.write_all(b"abc").unwrap();
    let (h, data) = d.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, local, 5000));
    assert_eq!(data, b"abc");
    let mut rw = d.header(OP_RW, local, 3);
    rw.src_port = 5000;
    d.send(rw, b"xyz");
    let mut back = [0u8; 3];
    reader.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"xyz");
    // The host closes: the guest hears SHUTDOWN and answers RST.
    drop(reader);
    drop(client);
    let (h, _) = d.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
    let mut rst = d.header(OP_RST, local, 0);
    rst.src_port = 5000;
    d.send(rst, &[]);
    d.no_more_rx();
}

#[test]
fn bad_connect_lines_are_dropped() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let d = Driver::new(&m, dir.path());
    for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'A'; 100]] {
        let mut c = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(line);
        let mut b = [0u8; 8];
        // Closed by the device: EOF (or a reset).
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    }
    d.no_more_rx();
}

#[test]
fn host_data_respects_the_guest_credit() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let l = std::os::unix::net::UnixListener::bind(dir.path().join("v.sock_7")).unwrap();
    let mut d = Driver::new(&m, dir.path());
    d.buf_alloc = 16;
    d.send(d.header(OP_REQUEST, 7, 0), &[]);
    assert_eq!(d.recv().0.op, OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.write_all(&[7u8; 40]).unwrap();
    let (h, data) = d.recv();
    assert_eq!((h.op, data.len()), (OP_RW, 16));
    let (h, _) = d.recv();
    assert_eq!(h.op, OP_CREDIT_REQUEST);
    d.no_more_rx();
    d.fwd_cnt = 16;
    d.send(d.header(OP_CREDIT_UPDATE, 7, 0), &[]);
    let (h, data) = d.recv();
    assert_eq!((h.op, data.len()), (OP_RW, 16));
    assert_eq!(d.recv().0.op, OP_CREDIT_REQUEST);
    d.fwd_cnt = 32;
    d.send(d.header(OP_CREDIT_UPDATE, 7, 0), &[]);
    let (h, data) = d.recv();
    assert_eq!((h.op, data.len()), (OP_RW, 8));
}

#[test]
fn malformed_packets_are_dropped_or_reset() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(&m, dir.path());
    // Shorter than a header.
    d.tx.add_chain(&[(TX_BUFS, 20, R)]);
    d.send_raw_chain_done();
    // A length past the chain, and past the packet limit.
    d.send(d.header(OP_RW, 1, 100), &[1, 2, 3]);
    d.send(d.header(OP_RW, 1, u32::MAX), &[]);
    // Other CIDs.
    let mut h = d.header(OP_REQUEST, 1, 0);
    h.src_cid = 7;
    d.send(h, &[]);
    let mut h = d.header(OP_REQUEST, 1, 0);
    h.dst_cid = 1;
    d.send(h, &[]);
    // Buffers outside memory, writable-only chains.
    d.tx.add_chain(&[(0xffff_0000_0000, 44, R)]);
    d.send_raw_chain_done();
    d.tx.add_chain(&[(TX_BUFS, 44, W)]);
    d.send_raw_chain_done();
    d.no_more_rx();
    // These get an RST: unknown op, another socket type, data without a connection.
    d.send(d.header(99, 1, 0), &[]);
    let mut h = d.header(OP_REQUEST, 1, 0);
    h.type_ = 2;
    d.send(h, &[]);
    d.send(d.header(OP_RW, 1, 3), b"abc");
    for _ in 0..3 {
        assert_eq!(d.recv().0.op, OP_RST);
    }
    d.no_more_rx();
    assert!(!*d.int.needs_reset.lock().unwrap());
}

#[test]
fn small_receive_buffers_split_data_and_tiny_ones_are_skipped() {
    let m = mem();
    let dir = tempfile::tempdir().unwrap();
    let l = std::os::unix::net::UnixListener::bind(dir.path().join("v.sock_8")).unwrap();
    let rx = TestQueue::new_at(&m, 16, 0);
    let tx = TestQueue::new_at(&m, 16, 0x10000);
    let mut muxer = Muxer::new(GUEST_CID, dir.path().join("v.sock"), None).unwrap();
    let mut hdr = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: 8,
        type_: TYPE_STREAM,
        op: OP_REQUEST,
        buf_alloc: 1 << 20,
        ..Default::default()
    };
    muxer.send_pkt(&hdr, &[]);
    let (mut s, _) = l.accept().unwrap();
    s.write_all(&[9u8; 100]).unwrap();
    let int = Arc::new(CountingInterrupt::default());
    let mut w = WorkerState::new(muxer, vec![rx.queue(), tx.queue()], m.clone(), int);
    let mut rx = rx;
    // Too small for a header: used empty, the RESPONSE waits.
    rx.add_chain(&[(RX_BUFS, 20, W)]);
    rx.add_chain(&[(RX_BUFS, 44, W)]);
    rx.add_chain(&[(RX_BUFS + 0x1000, 44, W), (RX_BUFS + 0x1100, 60, W)]);
    rx.add_chain(&[(RX_BUFS + 0x2000, 44, W), (RX_BUFS + 0x2100, 60, W)]);
    w.serve_rx();
    assert_eq!(rx.used(0), (0, 0));
    assert_eq!(rx.used(1).1, 44);
    assert_eq!(rx.used(2).1, 44 + 60);
    assert_eq!(rx.used(3).1, 44 + 40);
    let mut raw = [0u8; HEADER_LEN];
    m.read_slice(&mut raw, GuestAddress(RX_BUFS)).unwrap();
    assert_eq!(Header::from_bytes(&raw).op, OP_RESPONSE);
    m.read_slice(&mut raw, GuestAddress(RX_BUFS + 0x2000))
        .unwrap();
    let h = Header::from_bytes(&raw);
    assert_eq!((h.op, h.len), (OP_RW, 40));
    hdr.op = OP_RST;
    w.muxer.send_pkt(&hdr, &[]);
    assert_eq!(w.muxer.connections(), 0);
}

#[test]
fn a_host_socket_with_a_full_backlog_refuses_instead_of_blocking() {
    // A host service that does not accept (yet): once its backlog is full, more guest
    // connections to it are refused at once. A blocking connect would stall the device's only
    // thread until the service accepted, and a guest could do that at will.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock_9");
    let l = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    l.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
    l.listen(1).unwrap();
    let (done_tx, done) = std::sync::mpsc::channel();
    let base = dir.path().join("v.sock");
    std::thread::spawn(move || {
        let mut muxer = Muxer::new(GUEST_CID, base, None).unwrap();
        for port in 1..=6 {
            let hdr = Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: port,
                dst_port: 9,
                type_: TYPE_STREAM,
                op: OP_REQUEST,
                buf_alloc: 1 << 16,
                ..Default::default()
            };
            muxer.send_pkt(&hdr, &[]);
        }
        let mut ops = Vec::new();
        let mut payload = Vec::new();
        while let Some(h) = muxer.recv_pkt(4096, &mut payload) {
            ops.push((h.dst_port, h.op));
        }
        let _ = done_tx.send((ops, muxer.connections()));
    });
    let (ops, conns) = done
        .recv_timeout(Duration::from_secs(10))
        .expect("the muxer blocked on a connect");
    // Every request is answered, in order: the first ones connected, the rest refused.
    assert_eq!(ops.len(), 6, "{ops:?}");
    let accepted = ops.iter().filter(|(_, op)| *op == OP_RESPONSE).count();
    assert!((1..6).contains(&accepted), "{ops:?}");
    assert_eq!(accepted, conns);
    for (i, (port, op)) in ops.iter().enumerate() {
        assert_eq!(*port, i as u32 + 1);
        assert_eq!(*op, if i < accepted { OP_RESPONSE } else { OP_RST });
    }
    drop(l);
}
