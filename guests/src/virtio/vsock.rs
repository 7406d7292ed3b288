//! virtio-vsock (device type 19, virtio 1.2 §5.10): queue 0 receives,
//! queue 1 transmits, queue 2 carries events. Every packet starts with the
//! 44-byte little-endian header below; stream sockets only.
//!
//! With `vsock=PORT` the test connects to the host (CID 2) on PORT:
//! OP_REQUEST → OP_RESPONSE, sends one OP_RW payload and expects the same
//! bytes back (in one or more OP_RW packets), then OP_SHUTDOWN and waits
//! for the host's OP_RST (sending its own RST if none comes). Without
//! `vsock=` it only brings the device up and reads the guest CID.
//!
//! Transmit chains are the header and the payload in separate descriptors;
//! receive chains are a 44-byte header buffer and a 4 KiB data buffer, as
//! Linux posts them (older devices insist on that layout).

use super::dma;
use super::queue::{Buf, Queue};
use super::Transport;
use crate::{cpu, println};

const HEADER: u64 = 44;
const RX_DATA: u64 = 4096;
const RX_BUFFERS: u64 = 8;
const EVENT_BUFFERS: u64 = 4;

/// Header field offsets.
const SRC_CID: u64 = 0;
const DST_CID: u64 = 8;
const SRC_PORT: u64 = 16;
const DST_PORT: u64 = 20;
const LEN: u64 = 24;
const TYPE: u64 = 28;
const OP: u64 = 30;
const FLAGS: u64 = 32;
const BUF_ALLOC: u64 = 36;
const FWD_CNT: u64 = 40;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;

const HOST_CID: u64 = 2;
const LOCAL_PORT: u32 = 49152;
/// Receive space advertised to the host.
const BUF_ALLOC_BYTES: u32 = 64 << 10;
const PAYLOAD: &[u8] = b"vessel virtio-vsock echo 0123456789";
const TIMEOUT_US: u64 = 5_000_000;

/// A received packet's header fields (and where its payload is).
#[derive(Clone, Copy)]
struct Packet {
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: u64,
}

struct Conn<'a> {
    t: &'a Transport,
    rx: Queue,
    tx: Queue,
    tx_header: u64,
    tx_data: u64,
    cid: u64,
    port: u32,
    /// Payload bytes we consumed (our fwd_cnt) and sent.
    fwd_cnt: u32,
    tx_cnt: u32,
    /// The host's credit information.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Conn<'_> {
    fn send(&mut self, op: u16, flags: u32, payload: &[u8]) -> Result<(), &'static str> {
        let h = self.tx_header;
        dma::fill(h, 0, HEADER as usize);
        dma::write64(h + SRC_CID, self.cid);
        dma::write64(h + DST_CID, HOST_CID);
        dma::write32(h + SRC_PORT, LOCAL_PORT);
        dma::write32(h + DST_PORT, self.port);
        dma::write32(h + LEN, payload.len() as u32);
        dma::write16(h + TYPE, TYPE_STREAM);
        dma::write16(h + OP, op);
        dma::write32(h + FLAGS, flags);
        dma::write32(h + BUF_ALLOC, BUF_ALLOC_BYTES);
        dma::write32(h + FWD_CNT, self.fwd_cnt);
        let header = Buf::read(h, HEADER as u32);
        if payload.is_empty() {
            self.tx.add(&[header], 0)?;
        } else {
            dma::write_bytes(self.tx_data, payload);
            self.tx
                .add(&[header, Buf::read(self.tx_data, payload.len() as u32)], 0)?;
        }
        self.tx.kick(self.t);
        self.tx.wait_used(TIMEOUT_US).ok_or("transmit timed out")?;
        self.tx_cnt = self.tx_cnt.wrapping_add(payload.len() as u32);
        Ok(())
    }

    /// The next packet for this connection within `timeout_us`. Its payload
    /// is copied into `out` (up to its size). Credit requests are answered,
    /// packets for other connections dropped.
    fn recv(&mut self, timeout_us: u64, out: &mut [u8]) -> Result<Option<Packet>, &'static str> {
        let start = cpu::rdtsc();
        let limit = cpu::us_to_ticks(timeout_us);
        loop {
            if let Some(used) = self.rx.pop_used() {
                let h = used.token;
                let p = Packet {
                    src_cid: dma::read64(h + SRC_CID),
                    src_port: dma::read32(h + SRC_PORT),
                    dst_port: dma::read32(h + DST_PORT),
                    len: dma::read32(h + LEN),
                    op: dma::read16(h + OP),
                    flags: dma::read32(h + FLAGS),
                    buf_alloc: dma::read32(h + BUF_ALLOC),
                    fwd_cnt: dma::read32(h + FWD_CNT),
                    data: h + HEADER,
                };
                let n = (p.len as usize).min(out.len()).min(RX_DATA as usize);
                dma::read_bytes(p.data, &mut out[..n]);
                let chain = [
                    Buf::write(h, HEADER as u32),
                    Buf::write(h + HEADER, RX_DATA as u32),
                ];
                self.rx.add(&chain, h)?;
                self.rx.kick(self.t);
                if p.src_cid != HOST_CID || p.src_port != self.port || p.dst_port != LOCAL_PORT {
                    continue;
                }
                self.peer_buf_alloc = p.buf_alloc;
                self.peer_fwd_cnt = p.fwd_cnt;
                if p.op == OP_CREDIT_REQUEST {
                    self.send(OP_CREDIT_UPDATE, 0, &[])?;
                    continue;
                }
                return Ok(Some(p));
            }
            if cpu::rdtsc().wrapping_sub(start) > limit {
                return Ok(None);
            }
            cpu::pause();
        }
    }

    /// Bytes the host can still take.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn echo(&mut self) -> Result<(), &'static str> {
        let mut scratch = [0u8; RX_DATA as usize];
        self.send(OP_REQUEST, 0, &[])?;
        let p = self
            .recv(TIMEOUT_US, &mut scratch)?
            .ok_or("no response to the connection request")?;
        match p.op {
            OP_RESPONSE => {}
            OP_RST => return Err("connection refused (RST)"),
            _ => return Err("unexpected reply to the connection request"),
        }
        if self.credit() < PAYLOAD.len() as u32 {
            self.send(OP_CREDIT_REQUEST, 0, &[])?;
            let mut waited = 0;
            while self.credit() < PAYLOAD.len() as u32 {
                waited += 1;
                if waited > 16 || self.recv(TIMEOUT_US, &mut scratch)?.is_none() {
                    return Err("host gives no credit");
                }
            }
        }
        self.send(OP_RW, 0, PAYLOAD)?;

        let mut echoed = [0u8; PAYLOAD.len()];
        let mut have = 0;
        let mut packets = 0;
        while have < PAYLOAD.len() {
            packets += 1;
            if packets > 64 {
                return Err("no echo from the host");
            }
            let p = self
                .recv(TIMEOUT_US, &mut scratch)?
                .ok_or("no echo from the host")?;
            match p.op {
                OP_RW => {
                    let n = (p.len as usize).min(PAYLOAD.len() - have);
                    echoed[have..have + n].copy_from_slice(&scratch[..n]);
                    have += n;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(p.len);
                }
                OP_RST => return Err("connection reset by the host"),
                OP_SHUTDOWN if p.flags & 2 != 0 => return Err("host shut down before echoing"),
                _ => {}
            }
        }
        if echoed != PAYLOAD {
            return Err("echo differs from what was sent");
        }
        // Tell the host what we consumed, then close.
        self.send(OP_CREDIT_UPDATE, 0, &[])?;
        self.send(OP_SHUTDOWN, SHUTDOWN_BOTH, &[])?;
        let mut closed = false;
        for _ in 0..16 {
            match self.recv(1_000_000, &mut scratch)? {
                Some(p) if p.op == OP_RST => {
                    closed = true;
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
        if !closed {
            self.send(OP_RST, 0, &[])?;
        }
        Ok(())
    }
}

pub fn test(t: &mut Transport, port: Option<u32>) -> Result<(), &'static str> {
    t.begin(0)?;
    let cid = t.config_read64(0);
    let rx = Queue::new(t, 0)?;
    let tx = Queue::new(t, 1)?;
    let mut event = Queue::new(t, 2)?;
    for _ in 0..EVENT_BUFFERS.min(u64::from(event.size())) {
        let buf = dma::alloc(8, 8)?;
        event.add(&[Buf::write(buf, 8)], buf)?;
    }
    let mut conn = Conn {
        t,
        rx,
        tx,
        tx_header: dma::alloc(HEADER, 64)?,
        tx_data: dma::alloc(PAYLOAD.len() as u64, 64)?,
        cid,
        port: port.unwrap_or(0),
        fwd_cnt: 0,
        tx_cnt: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
    };
    for _ in 0..RX_BUFFERS.min(u64::from(conn.rx.size() / 2)) {
        let h = dma::alloc(HEADER + RX_DATA, 64)?;
        let chain = [
            Buf::write(h, HEADER as u32),
            Buf::write(h + HEADER, RX_DATA as u32),
        ];
        conn.rx.add(&chain, h)?;
    }
    conn.t.ready();
    conn.rx.kick(conn.t);
    event.kick(conn.t);

    if port.is_none() {
        println!(
            "virtio-vsock {} cid {cid}: ready (no vsock=PORT given)",
            conn.t
        );
        return Ok(());
    }
    conn.echo()?;
    println!("virtio-vsock {} cid {cid}: echo ok", conn.t);
    Ok(())
}
