//! virtio-net's queue handlers on arbitrary guest memory and queue layouts: transmit chains
//! gathered into packets (header and frame, as the tap gets them), control queue commands, and
//! received frames delivered into receive chains (one, or merged with `MRG_RXBUF`).
//!
//! Input: 1 byte queue size exponent, 1 byte flags (bit 0 event idx, bit 1 mergeable buffers),
//! 3 x 3 x 2 bytes of ring offsets (desc, avail, used; aligned down) for the transmit, control
//! and receive queues, 4 x 2 bytes of received frame lengths, then guest memory contents (the
//! received frames are taken from the input too).
//!
//! The device passes the virtio-net header through to the tap unparsed (the kernel checks it);
//! what it must guarantee, and what is asserted here, is that every packet handed to the backend
//! is a whole header plus at least an Ethernet header, and no longer than `MAX_PACKET_LEN`.

#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU16;
use std::sync::Arc;

use devices::virtio::net::{
    deliver, CtrlHandler, NetBackend, NetCounters, TxHandler, HDR_LEN, MAX_PACKET_LEN,
    MIN_FRAME_LEN,
};
use devices::virtio::queue::{process_queue, Chain};
use libfuzzer_sys::fuzz_target;

/// A backend that checks what it is given and has nothing to receive.
struct Sink;

impl NetBackend for Sink {
    fn raw_fd(&self) -> RawFd {
        -1
    }
    fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        assert!(
            (HDR_LEN + MIN_FRAME_LEN..=MAX_PACKET_LEN).contains(&buf.len()),
            "packet of {} bytes sent",
            buf.len()
        );
        Ok(buf.len())
    }
}

const HEADER: usize = 2 + 3 * 6 + 4 * 2;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let size = 1u16 << (data[0] % 9); // 1..=256
    let event_idx = data[1] & 1 != 0;
    let mrg = data[1] & 2 != 0;
    let mem = common::guest_memory(&data[HEADER..]);
    let mut chain = Chain::default();

    if let Some(mut q) = common::queue(data, 2, size, event_idx, &mem) {
        let backend: Arc<dyn NetBackend> = Arc::new(Sink);
        let mut buf = Vec::new();
        let counters = NetCounters::default();
        let mut handler = TxHandler {
            backend: &*backend,
            buf: &mut buf,
            counters: &counters,
            limiter: None,
            blocked: false,
        };
        // Twice: the second pass sees the used ring the first one wrote.
        for _ in 0..2 {
            if process_queue(&mut q, &mem, &mut chain, &mut handler).is_err() {
                break;
            }
        }
        let sent = counters.snapshot();
        assert!(sent.tx_bytes <= sent.tx_packets * MAX_PACKET_LEN as u64);
    }

    if let Some(mut q) = common::queue(data, 8, size, event_idx, &mem) {
        let backends: Arc<[Arc<dyn NetBackend>]> =
            vec![Arc::new(Sink) as Arc<dyn NetBackend>; 2].into();
        let active = Arc::new(AtomicU16::new(1));
        let mut handler = CtrlHandler::new(backends, active.clone(), Vec::new());
        for _ in 0..2 {
            if process_queue(&mut q, &mem, &mut chain, &mut handler).is_err() {
                break;
            }
        }
        let pairs = active.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=2).contains(&pairs), "{pairs} active pairs");
    }

    if let Some(mut q) = common::queue(data, 14, size, event_idx, &mem) {
        let mut pool = Vec::new();
        let mut from = HEADER;
        for i in 0..4 {
            let at = 20 + 2 * i;
            let len =
                usize::from(u16::from_le_bytes([data[at], data[at + 1]])) % (MAX_PACKET_LEN + 1);
            // The frame: input bytes from `from` on, repeated as needed.
            let mut frame = Vec::with_capacity(len);
            let mut src = &data[from..];
            while frame.len() < len {
                let n = src.len().min(len - frame.len());
                frame.extend_from_slice(&src[..n]);
                src = data;
            }
            from = (from + len) % data.len();
            match deliver(&mut q, &mem, &mut frame, mrg, &mut pool) {
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
});
