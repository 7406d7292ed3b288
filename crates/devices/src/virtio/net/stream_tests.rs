//! The stream socket backend: framing against split, batched, zero and oversize frames, partial
//! writes, end of file; then a device on it (no offloads offered, frames both ways, a slow peer
//! holding transmission back without losing or tearing a frame, a peer that goes away).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::*;
use super::*;
use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, R, W};
use crate::virtio::{ActiveQueue, VirtioDevice};

/// `frame` as it goes on the wire.
fn wire(frame: &[u8]) -> Vec<u8> {
    let mut v = (frame.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(frame);
    v
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// Feeds `stream` to a reader in reads of at most `chunk` bytes; returns the frames in order.
fn read_all(stream: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, StreamError> {
    let mut r = FrameReader::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        while let Some(f) = r.frame()? {
            frames.push(f.to_vec());
            r.consume();
        }
        if rest.is_empty() {
            return Ok(frames);
        }
        let space = r.space();
        assert!(!space.is_empty(), "no room while no frame is whole");
        let n = space.len().min(chunk).min(rest.len());
        space[..n].copy_from_slice(&rest[..n]);
        r.filled(n);
        rest = &rest[n..];
    }
}

#[test]
fn frames_split_across_reads_and_several_in_one() {
    let frames = [
        frame(60, 1),
        frame(1, 2),
        frame(1514, 3),
        frame(MAX_FRAME_LEN, 4),
    ];
    let stream: Vec<u8> = frames.iter().flat_map(|f| wire(f)).collect();
    // One byte at a time, in odd pieces, and everything at once (the reader takes no more
    // than a frame and the next prefix per read, the rest stays in the stream).
    for chunk in [1, 3, 7, 4096, usize::MAX] {
        assert_eq!(
            read_all(&stream, chunk).unwrap(),
            frames,
            "reads of {chunk}"
        );
    }
}

#[test]
fn a_read_never_goes_past_the_next_prefix() {
    let mut r = FrameReader::new();
    assert_eq!(r.space().len(), PREFIX_LEN);
    r.space()[..4].copy_from_slice(&100u32.to_be_bytes());
    r.filled(4);
    // The frame and the next prefix.
    assert_eq!(r.space().len(), 100 + PREFIX_LEN);
    let next = wire(&frame(50, 9));
    let mut chunk = frame(100, 1);
    chunk.extend_from_slice(&next[..PREFIX_LEN]);
    r.space().copy_from_slice(&chunk);
    r.filled(chunk.len());
    assert!(
        r.space().is_empty(),
        "a whole frame waits: nothing more is read"
    );
    assert_eq!(r.frame().unwrap(), Some(&frame(100, 1)[..]));
    r.consume();
    // The next frame's prefix came along; its body is all that is asked for now.
    assert_eq!(r.partial(), PREFIX_LEN);
    assert_eq!(r.space().len(), 50 + PREFIX_LEN);
}

#[test]
fn a_zero_or_oversized_length_is_refused() {
    for n in [0u32, MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let mut stream = wire(&frame(60, 1));
        stream.extend_from_slice(&n.to_be_bytes());
        stream.extend_from_slice(&[0; 64]);
        let e = read_all(&stream, 7).unwrap_err();
        assert!(matches!(e, StreamError::BadLength(m) if m == n), "{n}: {e}");
        let mut r = FrameReader::new();
        r.space().copy_from_slice(&n.to_be_bytes());
        r.filled(4);
        assert!(r.frame().is_err());
        assert!(
            r.space().is_empty(),
            "nothing more is read after a bad prefix"
        );
    }
    // The largest frame is fine.
    let f = frame(MAX_FRAME_LEN, 5);
    assert_eq!(read_all(&wire(&f), 1 << 20).unwrap(), [f]);
}

/// A non-blocking byte sink that takes at most `take[i]` bytes on its i-th call (0: would
/// block), then everything.
struct Trickle {
    out: Vec<u8>,
    take: Vec<usize>,
    calls: usize,
}

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.take.get(self.calls).copied().unwrap_or(usize::MAX);
        self.calls += 1;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = n.min(buf.len());
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_partial_write_is_finished_before_the_next_frame() {
    let (a, b, c) = (frame(100, 1), frame(3000, 2), frame(60, 3));
    // Two bytes of the first prefix, then blocked twice, then the rest of it; 50 bytes of
    // the second frame, the rest in pieces.
    let mut w = Trickle {
        out: Vec::new(),
        take: vec![2, 0, 0, 1000, 50, 1, 2000],
        calls: 0,
    };
    let mut fw = FrameWriter::new();
    fw.send(&mut w, &a).unwrap();
    assert_eq!(fw.pending(), PREFIX_LEN + 100 - 2);
    // Still blocked: the next frame is refused whole, nothing of it written.
    let e = fw.send(&mut w, &b).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert_eq!(w.out.len(), 2);
    assert!(!fw.flush(&mut w).unwrap());
    assert!(fw.flush(&mut w).unwrap(), "the first frame is out");
    fw.send(&mut w, &b).unwrap();
    assert!(fw.pending() > 0);
    assert!(fw.flush(&mut w).unwrap());
    // This writer's writev takes only the prefix (the default `write_vectored`): the frame
    // is kept whole and follows.
    fw.send(&mut w, &c).unwrap();
    assert_eq!(fw.pending(), c.len());
    assert!(fw.flush(&mut w).unwrap());
    assert_eq!(fw.pending(), 0);
    let want: Vec<u8> = [&a, &b, &c].iter().flat_map(|f| wire(f)).collect();
    assert_eq!(w.out, want);
    assert_eq!(read_all(&w.out, 5).unwrap(), [a, b, c]);
    // Frames no prefix can carry are refused.
    for bad in [Vec::new(), frame(MAX_FRAME_LEN + 1, 0)] {
        let e = fw.send(&mut w, &bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}

/// A backend and the peer's end of its socket.
fn backend() -> (StreamBackend, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (StreamBackend::new(a).unwrap(), b)
}

fn packet(frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p.extend_from_slice(frame);
    p
}

/// Reads one frame from the peer's end.
fn peer_read(peer: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    peer.read_exact(&mut len).unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    peer.read_exact(&mut f).unwrap();
    f
}

#[test]
fn the_backend_adds_and_strips_the_header() {
    let (b, mut peer) = backend();
    let mut buf = vec![0xaau8; MAX_PACKET_LEN + 1];
    assert_eq!(
        b.recv(&mut buf).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    // Three frames in one write, the third split.
    let frames = [frame(60, 1), frame(1514, 2), frame(200, 3)];
    let stream: Vec<u8> = frames.iter().flat_map(|f| wire(f)).collect();
    peer.write_all(&stream[..stream.len() - 100]).unwrap();
    for f in &frames[..2] {
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &packet(f)[..], "a zero header, then the frame");
    }
    assert_eq!(
        b.recv(&mut buf).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    peer.write_all(&stream[stream.len() - 100..]).unwrap();
    let n = b.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &packet(&frames[2])[..]);

    b.send(&packet(&frame(90, 4))).unwrap();
    assert_eq!(peer_read(&mut peer), frame(90, 4));
    // A header asking for a checksum or segmentation offload is refused.
    let mut p = packet(&frame(90, 4));
    p[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    assert_eq!(b.send(&p).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    p[0] = 0;
    p[1] = 1; // GSO_TCPV4
    assert_eq!(b.send(&p).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    assert!(!b.takes_offloads());
    b.set_offload(0).unwrap();
    assert!(b.set_offload(::net::tap::TUN_F_CSUM).is_err());
    // Nothing of the refused packets reached the stream.
    b.send(&packet(&frame(61, 5))).unwrap();
    assert_eq!(peer_read(&mut peer), frame(61, 5));
}

#[test]
fn end_of_file_closes_the_backend() {
    for mid_frame in [false, true] {
        let (b, mut peer) = backend();
        let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
        if mid_frame {
            peer.write_all(&wire(&frame(100, 1))[..50]).unwrap();
        }
        drop(peer);
        let e = b.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert_eq!(
            e.to_string().contains("in the middle of a frame"),
            mid_frame,
            "{e}"
        );
        // Closed for good: reads and writes fail at once, without touching the socket.
        assert_eq!(
            b.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        let e = b.send(&packet(&frame(60, 1))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        assert!(
            e.to_string().contains("the peer closed the connection"),
            "{e}"
        );
        assert!(b.flush().is_err());
    }
}

#[test]
fn a_bad_length_drops_the_connection() {
    for n in [0u32, MAX_FRAME_LEN as u32 + 1, 0xffff_ffff] {
        let (b, mut peer) = backend();
        let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
        peer.write_all(&wire(&frame(60, 1))).unwrap();
        peer.write_all(&n.to_be_bytes()).unwrap();
        peer.write_all(&[7; 100]).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), HDR_LEN + 60);
        let e = b.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains(&format!("{n} bytes")), "{e}");
        // The peer sees the connection end.
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(b.send(&packet(&frame(60, 1))).is_err());
    }
}

/// Makes the socket's send buffer small, so that writes soon come up short.
fn small_send_buffer(s: &UnixStream) {
    socket2::SockRef::from(s)
        .set_send_buffer_size(4096)
        .unwrap();
}

#[test]
fn a_short_write_keeps_the_rest_and_never_tears_a_frame() {
    let (b, mut peer) = backend();
    small_send_buffer(&b.sock);
    let frames: Vec<Vec<u8>> = (0..40).map(|i| frame(9000 + i * 7, i as u8)).collect();
    let mut sent = 0;
    // Until a frame is only partly written: the backend keeps the rest and takes nothing
    // more until it is out.
    while b.flush().unwrap() && sent < frames.len() {
        b.send(&packet(&frames[sent])).unwrap();
        sent += 1;
    }
    assert!(sent < frames.len(), "the socket never filled up");
    assert!(lock(&b.io).writer.pending() > 0);
    assert_eq!(
        b.send(&packet(&frames[sent])).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    // The peer reads; the rest goes out between its reads.
    let reader =
        std::thread::spawn(move || (0..40).map(|_| peer_read(&mut peer)).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(10);
    while sent < frames.len() {
        assert!(Instant::now() < deadline, "stuck at frame {sent}");
        if b.flush().unwrap() {
            b.send(&packet(&frames[sent])).unwrap();
            sent += 1;
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    while !b.flush().unwrap() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reader.join().unwrap(), frames);
}

#[test]
fn connect_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.sock");
    let e = StreamBackend::connect(&path).err().unwrap();
    assert!(e.to_string().contains("none.sock"), "{e}");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let b = StreamBackend::connect(&path).unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    b.send(&packet(&frame(60, 1))).unwrap();
    assert_eq!(peer_read(&mut peer), frame(60, 1));
}

// The device on a stream socket.

const RX_BUF: u64 = 0x100000;
const TX_BUF: u64 = 0x200000;

struct Device<'a> {
    m: &'a GuestMem,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    kicks: Vec<EventFd>,
    dev: Net,
    peer: UnixStream,
    /// The device's end of the socket (for its send buffer).
    sock: UnixStream,
}

impl<'a> Device<'a> {
    fn new(m: &'a GuestMem) -> Self {
        let (a, peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let sock = a.try_clone().unwrap();
        let backend: Arc<dyn NetBackend> = Arc::new(StreamBackend::new(a).unwrap());
        let mut dev = Net::new(vec![backend], None).unwrap();
        // The driver takes whatever is offered.
        dev.ack_features(dev.features());
        let rx = TestQueue::new_at(m, 16, 0);
        let tx = TestQueue::new_at(m, 64, 0x10000);
        let mut kicks = Vec::new();
        let mut queues = Vec::new();
        for (index, q) in [(0, rx.queue()), (1, tx.queue())] {
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(evt.try_clone().unwrap());
            queues.push(ActiveQueue {
                index,
                queue: q,
                notifier: evt,
            });
        }
        dev.activate(m.clone(), Arc::new(CountingInterrupt::default()), queues)
            .unwrap();
        Device {
            m,
            rx,
            tx,
            kicks,
            dev,
            peer,
            sock,
        }
    }

    fn transmit(&mut self, p: &[u8], slot: u64) {
        let at = TX_BUF + slot * 0x4000;
        self.m.write_slice(p, GuestAddress(at)).unwrap();
        self.tx.add_chain(&[(at, p.len() as u32, R)]);
    }
}

#[test]
fn the_device_offers_no_offloads_on_a_stream() {
    let (b, _peer) = backend();
    let dev = Net::new(vec![Arc::new(b)], None).unwrap();
    let f = dev.features();
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MQ,
    ] {
        assert!(!has_feature(f, bit), "feature {bit} offered on a stream");
    }
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
    ] {
        assert!(has_feature(f, bit), "feature {bit}");
    }
}

#[test]
fn frames_flow_both_ways_through_the_device() {
    let m = mem();
    let mut d = Device::new(&m);
    for i in 0..4 {
        d.rx.add_chain(&[(RX_BUF + i * 0x1000, 2048, W)]);
    }
    d.kicks[0].write(1).unwrap();
    let frames = [frame(60, 1), frame(1514, 2), frame(300, 3)];
    let stream: Vec<u8> = frames.iter().flat_map(|f| wire(f)).collect();
    d.peer.write_all(&stream).unwrap();
    d.rx.wait_used(3);
    for (i, f) in frames.iter().enumerate() {
        let (_, len) = d.rx.used(i as u16);
        assert_eq!(len as usize, HDR_LEN + f.len());
        let mut got = vec![0u8; len as usize];
        m.read_slice(&mut got, GuestAddress(RX_BUF + i as u64 * 0x1000))
            .unwrap();
        // num_buffers is 1 (mergeable buffers), the rest of the header zero.
        let mut want = packet(f);
        want[10] = 1;
        assert_eq!(got, want);
    }
    d.transmit(&packet(&frame(70, 9)), 0);
    d.kicks[1].write(1).unwrap();
    assert_eq!(peer_read(&mut d.peer), frame(70, 9));
    d.tx.wait_used(1);
    let c = d.dev.counters().snapshot();
    assert_eq!(
        (c.rx_packets, c.tx_packets, c.tx_dropped),
        (3, 1, 0),
        "{c:?}"
    );
}

#[test]
fn a_slow_peer_holds_transmission_back_without_losing_a_frame() {
    let m = mem();
    let mut d = Device::new(&m);
    small_send_buffer(&d.sock);
    let frames: Vec<Vec<u8>> = (0..48).map(|i| frame(9000 + i * 3, i as u8)).collect();
    for (i, f) in frames.iter().enumerate() {
        d.transmit(&packet(f), i as u64);
    }
    d.kicks[1].write(1).unwrap();
    // The socket takes a few frames; the others wait in the ring, and the worker waits in
    // epoll for the socket to drain (it must not spin meanwhile).
    std::thread::sleep(Duration::from_millis(100));
    let used = d.tx.used_idx();
    assert!(
        used > 0 && (used as usize) < frames.len(),
        "{used} of {} chains used",
        frames.len()
    );
    let before = d.dev.workers[0].cpu_time();
    std::thread::sleep(Duration::from_millis(300));
    let spent = d.dev.workers[0].cpu_time() - before;
    assert!(
        spent < Duration::from_millis(50),
        "the worker used {spent:?}"
    );
    assert_eq!(
        d.tx.used_idx(),
        used,
        "nothing more went while the peer slept"
    );
    // The peer reads: every frame arrives whole and in order, none dropped.
    for f in &frames {
        assert_eq!(&peer_read(&mut d.peer), f);
    }
    d.tx.wait_used(frames.len() as u16);
    let c = d.dev.counters().snapshot();
    assert_eq!((c.tx_packets, c.tx_dropped), (48, 0), "{c:?}");
}

#[test]
fn a_peer_that_goes_away_makes_the_device_drop_frames_without_spinning() {
    let m = mem();
    let mut d = Device::new(&m);
    for i in 0..4 {
        d.rx.add_chain(&[(RX_BUF + i * 0x1000, 2048, W)]);
    }
    d.kicks[0].write(1).unwrap();
    d.peer.write_all(&wire(&frame(60, 1))).unwrap();
    d.rx.wait_used(1);
    d.peer.shutdown(std::net::Shutdown::Both).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let before = d.dev.workers[0].cpu_time();
    std::thread::sleep(Duration::from_millis(300));
    let spent = d.dev.workers[0].cpu_time() - before;
    assert!(
        spent < Duration::from_millis(50),
        "the worker used {spent:?}"
    );
    // What the guest sends now is dropped and counted.
    for i in 0..3 {
        d.transmit(&packet(&frame(60, i)), u64::from(i));
    }
    d.kicks[1].write(1).unwrap();
    d.tx.wait_used(3);
    let c = d.dev.counters().snapshot();
    assert_eq!(
        (c.rx_packets, c.tx_packets, c.tx_dropped),
        (1, 0, 3),
        "{c:?}"
    );
}

#[test]
fn a_hostile_length_ends_receiving_only() {
    let m = mem();
    let mut d = Device::new(&m);
    for i in 0..4 {
        d.rx.add_chain(&[(RX_BUF + i * 0x1000, 2048, W)]);
    }
    d.kicks[0].write(1).unwrap();
    d.peer.write_all(&wire(&frame(60, 1))).unwrap();
    d.peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
    d.rx.wait_used(1);
    // The connection is dropped: the peer reads its end.
    let mut rest = Vec::new();
    d.peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let c = d.dev.counters().snapshot();
    assert_eq!(c.rx_packets, 1, "{c:?}");
}
