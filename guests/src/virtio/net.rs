//! virtio-net (device type 1, virtio 1.2 §5.1): queue 0 receives, queue 1
//! transmits; every buffer starts with the 12-byte `virtio_net_hdr` (all
//! zero on transmit: no offloads are negotiated, only MAC).
//!
//! Without options the test sends an ARP request for the peer and a UDP
//! broadcast and counts what arrives in the next 300 ms. With
//! `net=echo-peer` it ARPs for the peer, sends a UDP datagram to
//! `netpeer` (default 10.0.2.2:7777) from `netip` (10.0.2.15) and waits for
//! the same payload to come back. ARP requests for `netip` are answered.
//! `netburst=N` then sends N more datagrams to the peer (to the broadcast
//! address without `net=echo-peer`), each once the previous one was used,
//! without waiting for replies: a paced device (rate limits) shows in how
//! long they take to arrive.

use super::dma;
use super::queue::{Buf, Queue, MAX_SIZE};
use super::{Mac, Transport};
use crate::cmdline::NetOptions;
use crate::{cpu, println};

const F_MAC: u64 = 1 << 5;

pub(super) const HDR: usize = 12;
pub(super) const BUF_BYTES: u64 = 2048;
const RX_BUFFERS: u64 = 16;
/// Largest frame handled (without FCS).
pub(super) const FRAME_MAX: usize = 1514;
pub(super) const FRAME_MIN: usize = 60;
const TX_TIMEOUT_US: u64 = 2_000_000;

const ETH_ARP: u16 = 0x0806;
pub(super) const ETH_IPV4: u16 = 0x0800;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Used when the device offers no MAC (locally administered).
const DEFAULT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub(super) const SOURCE_PORT: u16 = 49152;
const PAYLOAD: &[u8] = b"vessel virtio-net echo #0";
const BURST_PAYLOAD: &[u8] = b"vessel virtio-net burst #";

pub(super) struct Frame {
    pub(super) bytes: [u8; FRAME_MAX],
    pub(super) len: usize,
}

impl Frame {
    fn new() -> Frame {
        Frame {
            bytes: [0; FRAME_MAX],
            len: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    pub(super) fn data(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TSC value `us` microseconds from now.
pub(super) fn deadline_in(us: u64) -> u64 {
    cpu::rdtsc() + cpu::us_to_ticks(us)
}

pub(super) struct Nic<'a> {
    pub(super) t: &'a Transport,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    tx_buf: u64,
    pub(super) mac: [u8; 6],
    pub(super) opts: &'a NetOptions,
    sent: u32,
    received: u32,
}

impl<'a> Nic<'a> {
    /// Negotiate, set up the queues (at most `queue_limit` entries each),
    /// post up to `rx_buffers` receive buffers and set DRIVER_OK.
    pub(super) fn open(
        t: &'a mut Transport,
        opts: &'a NetOptions,
        queue_limit: u16,
        rx_buffers: u64,
    ) -> Result<Nic<'a>, &'static str> {
        let features = t.begin(F_MAC)?;
        let mut mac = DEFAULT_MAC;
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = t.config_read8(i as u64);
            }
        }
        let rx = Queue::with_max(t, 0, queue_limit)?;
        let tx = Queue::with_max(t, 1, queue_limit)?;
        let tx_buf = dma::alloc(BUF_BYTES, 4096)?;
        let mut nic = Nic {
            t,
            rx,
            tx,
            tx_buf,
            mac,
            opts,
            sent: 0,
            received: 0,
        };
        let buffers = rx_buffers.min(u64::from(nic.rx.size()));
        for _ in 0..buffers {
            let buf = dma::alloc(BUF_BYTES, 4096)?;
            nic.rx.add(&[Buf::write(buf, BUF_BYTES as u32)], buf)?;
        }
        nic.t.ready();
        nic.rx.kick(nic.t);
        Ok(nic)
    }

    /// Send one frame and wait until the device has used it (the transmit
    /// queue must have nothing else in flight).
    pub(super) fn send(&mut self, frame: &Frame) -> Result<(), &'static str> {
        let len = HDR + frame.len.max(FRAME_MIN);
        dma::fill(self.tx_buf, 0, len);
        dma::write_bytes(self.tx_buf + HDR as u64, frame.data());
        self.tx.add(&[Buf::read(self.tx_buf, len as u32)], 0)?;
        self.tx.kick(self.t);
        self.tx
            .wait_used(TX_TIMEOUT_US)
            .ok_or("transmit timed out")?;
        self.sent += 1;
        Ok(())
    }

    fn ethernet(&self, dst: [u8; 6], kind: u16) -> Frame {
        let mut f = Frame::new();
        f.push(&dst);
        f.push(&self.mac);
        f.push(&kind.to_be_bytes());
        f
    }

    /// ARP request (`op` 1) or reply (2).
    fn arp(&self, op: u16, dst_mac: [u8; 6], target_mac: [u8; 6], target_ip: [u8; 4]) -> Frame {
        let mut f = self.ethernet(dst_mac, ETH_ARP);
        f.push(&[0, 1, 8, 0, 6, 4]);
        f.push(&op.to_be_bytes());
        f.push(&self.mac);
        f.push(&self.opts.ip);
        f.push(&target_mac);
        f.push(&target_ip);
        f
    }

    pub(super) fn udp(
        &self,
        dst_mac: [u8; 6],
        dst_ip: [u8; 4],
        port: u16,
        payload: &[u8],
    ) -> Frame {
        let mut f = self.ethernet(dst_mac, ETH_IPV4);
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64; // TTL
        ip[9] = 17; // UDP
        ip[12..16].copy_from_slice(&self.opts.ip);
        ip[16..20].copy_from_slice(&dst_ip);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.push(&ip);
        f.push(&SOURCE_PORT.to_be_bytes());
        f.push(&port.to_be_bytes());
        f.push(&(total - 20).to_be_bytes());
        f.push(&[0, 0]); // no UDP checksum
        f.push(payload);
        f
    }

    /// Next received frame before the TSC reaches `deadline` (ARP requests
    /// for our address are answered and not returned).
    pub(super) fn recv(&mut self, deadline: u64) -> Result<Option<Frame>, &'static str> {
        loop {
            if let Some(used) = self.rx.pop_used() {
                self.received += 1;
                let mut f = Frame::new();
                let len = (used.len as usize).saturating_sub(HDR).min(FRAME_MAX);
                dma::read_bytes(used.token + HDR as u64, &mut f.bytes[..len]);
                f.len = len;
                self.rx
                    .add(&[Buf::write(used.token, BUF_BYTES as u32)], used.token)?;
                self.rx.kick(self.t);
                if let Some((sender_mac, sender_ip)) = self.arp_request_for_us(&f) {
                    let reply = self.arp(2, sender_mac, sender_mac, sender_ip);
                    self.send(&reply)?;
                    continue;
                }
                return Ok(Some(f));
            }
            if cpu::rdtsc() > deadline {
                return Ok(None);
            }
            cpu::pause();
        }
    }

    /// (sender MAC, sender IP) of an ARP request for our address.
    pub(super) fn arp_request_for_us(&self, f: &Frame) -> Option<([u8; 6], [u8; 4])> {
        let b = f.data();
        if b.len() < 42 || be16(b, 12) != ETH_ARP || be16(b, 20) != 1 || b[38..42] != self.opts.ip {
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[22..28]);
        let mut ip = [0u8; 4];
        ip.copy_from_slice(&b[28..32]);
        Some((mac, ip))
    }

    /// The peer's MAC, if `f` is an ARP reply from it.
    fn arp_reply_from_peer(&self, f: &Frame) -> Option<[u8; 6]> {
        let b = f.data();
        if b.len() < 42 || be16(b, 12) != ETH_ARP || be16(b, 20) != 2 || b[28..32] != self.opts.peer
        {
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[22..28]);
        Some(mac)
    }

    /// The payload of `f` if it is a UDP datagram from the peer's port to
    /// ours.
    pub(super) fn udp_payload<'f>(&self, f: &'f Frame) -> Option<&'f [u8]> {
        let b = f.data();
        if b.len() < 14 + 20 + 8 || be16(b, 12) != ETH_IPV4 || b[14] >> 4 != 4 || b[23] != 17 {
            return None;
        }
        let ihl = usize::from(b[14] & 0xf) * 4;
        let udp = 14 + ihl;
        if b[26..30] != self.opts.peer || b[30..34] != self.opts.ip || b.len() < udp + 8 {
            return None;
        }
        let len = usize::from(be16(b, udp + 4));
        if be16(b, udp) != self.opts.port || be16(b, udp + 2) != SOURCE_PORT || len < 8 {
            return None;
        }
        b.get(udp + 8..udp + len)
    }

    /// Whether `f` is a UDP datagram from the peer to our port carrying
    /// `payload`.
    fn is_echo(&self, f: &Frame, payload: &[u8]) -> bool {
        self.udp_payload(f) == Some(payload)
    }

    /// ARP for the peer (5 tries, 1 s each).
    pub(super) fn resolve_peer(&mut self) -> Result<[u8; 6], &'static str> {
        for _ in 0..5 {
            let request = self.arp(1, BROADCAST, [0; 6], self.opts.peer);
            self.send(&request)?;
            let deadline = deadline_in(1_000_000);
            while let Some(f) = self.recv(deadline)? {
                if let Some(mac) = self.arp_reply_from_peer(&f) {
                    return Ok(mac);
                }
            }
        }
        Err("no ARP reply from the peer")
    }

    /// Send a datagram to the peer and wait for it to come back (3 tries,
    /// 2 s each).
    fn echo(&mut self, peer_mac: [u8; 6]) -> Result<(), &'static str> {
        let mut payload = [0u8; PAYLOAD.len()];
        payload.copy_from_slice(PAYLOAD);
        for attempt in 0..3u8 {
            payload[PAYLOAD.len() - 1] = b'0' + attempt;
            let datagram = self.udp(peer_mac, self.opts.peer, self.opts.port, &payload);
            self.send(&datagram)?;
            let deadline = deadline_in(2_000_000);
            while let Some(f) = self.recv(deadline)? {
                if self.is_echo(&f, &payload) {
                    return Ok(());
                }
            }
        }
        Err("no echo from the peer")
    }

    /// `count` datagrams to `dst`, carrying `vessel virtio-net burst #<i>`.
    fn burst(&mut self, dst: ([u8; 6], [u8; 4]), count: u32) -> Result<(), &'static str> {
        let mut payload = [0u8; BURST_PAYLOAD.len() + 10];
        payload[..BURST_PAYLOAD.len()].copy_from_slice(BURST_PAYLOAD);
        for i in 0..count {
            let mut digits = [0u8; 10];
            let mut n = i;
            let mut len = 0;
            loop {
                digits[len] = b'0' + (n % 10) as u8;
                len += 1;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            for k in 0..len {
                payload[BURST_PAYLOAD.len() + k] = digits[len - 1 - k];
            }
            let datagram = self.udp(
                dst.0,
                dst.1,
                self.opts.port,
                &payload[..BURST_PAYLOAD.len() + len],
            );
            self.send(&datagram)?;
        }
        Ok(())
    }
}

pub fn test(t: &mut Transport, opts: &NetOptions) -> Result<(), &'static str> {
    let mut nic = Nic::open(t, opts, MAX_SIZE, RX_BUFFERS)?;
    let echoed = if opts.echo {
        let peer_mac = nic.resolve_peer()?;
        nic.echo(peer_mac)?;
        nic.burst((peer_mac, opts.peer), opts.burst)?;
        true
    } else {
        let request = nic.arp(1, BROADCAST, [0; 6], opts.peer);
        nic.send(&request)?;
        let datagram = nic.udp(BROADCAST, [255; 4], opts.port, PAYLOAD);
        nic.send(&datagram)?;
        nic.burst((BROADCAST, [255; 4]), opts.burst)?;
        let deadline = deadline_in(300_000);
        while nic.recv(deadline)?.is_some() {}
        false
    };
    println!(
        "virtio-net {} mac {}: sent {}, received {}",
        nic.t,
        Mac(nic.mac),
        nic.sent,
        nic.received
    );
    if echoed {
        println!("virtio-net echo ok");
    }
    Ok(())
}
