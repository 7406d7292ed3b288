//! The network benchmark (`bench=net`): UDP between the guest (`netip`,
//! port 49152) and a peer program on the host (`netpeer`, default
//! 10.0.2.2:7777), which speaks this protocol (bench/net/peer.py); the first
//! payload byte says what a datagram is:
//!
//! - `D...` (guest → peer): data, counted and dropped by the peer;
//! - `E...` (guest → peer → guest): echoed back unchanged;
//! - `C reset` → `C ok`: zero the peer's counters of `D` datagrams;
//!   `C stat` → `C stat <datagrams> <bytes>`: read them;
//!   `C flood <ms> <bytes>` → `F...` datagrams of `<bytes>` to the guest as
//!   fast as the peer can for `<ms>`, then `C done <sent> <ns>` (three
//!   times, 20 ms apart).
//!
//! Workloads (the number is the UDP payload: 1472 fills a 1514-byte
//! Ethernet frame, 18 makes a minimum-size 60-byte frame), each after a
//! `benchwarm=` warm-up and for `benchtime=`:
//!
//! - `tx-1472`, `tx-18`: the guest keeps `qd=` frames in flight on the
//!   transmit queue (one descriptor each: header and frame), refilling and
//!   notifying as they complete;
//! - `rx-1472`: the peer floods; the guest counts what it receives in the
//!   measured window, with every receive queue entry posted, refilled in
//!   batches;
//! - `rr-18`: one `E` datagram at a time, waiting for its echo (round trips
//!   per second and their mean time).
//!
//! The guest must know the peer's MAC (it ARPs once at the start) and the
//! peer's host must know the guest's: the bench script adds a permanent
//! neighbour entry, so no ARP traffic happens during the workloads.

use super::bench::{per_second, ticks_to_ns, Tenths};
use super::dma;
use super::net::{be16, deadline_in, Frame, Nic, BUF_BYTES, ETH_IPV4, FRAME_MIN, HDR};
use super::queue::{Buf, LARGEST};
use super::{Mac, Transport};
use crate::cmdline::{BenchOptions, NetOptions};
use crate::{cpu, println};

/// No progress for this long: the device is stuck.
const STALL_US: u64 = 10_000_000;
/// No completion for this long: notify the device again.
const RESCUE_US: u64 = 100_000;
/// How long a control request waits for its answer (per try, 3 tries).
const CONTROL_US: u64 = 1_000_000;
/// How long a round trip may take before it counts as lost.
const ECHO_US: u64 = 1_000_000;
/// Bytes of a received buffer looked at: virtio header, Ethernet, IPv4
/// (without options), UDP, and the first bytes of the payload.
const PEEK: usize = HDR + 14 + 20 + 8 + 48;

struct Net<'a> {
    nic: Nic<'a>,
    peer_mac: [u8; 6],
    qd: u16,
    /// One transmit buffer per queue entry.
    tx_bufs: u64,
    tx_slots: u16,
}

/// A received buffer's first bytes, as a UDP datagram from the peer: the
/// payload bytes present (up to [`PEEK`]) and the payload's full length.
struct Peek {
    bytes: [u8; PEEK],
    payload_at: usize,
    payload_len: usize,
}

impl Peek {
    fn payload(&self) -> &[u8] {
        let end = (self.payload_at + self.payload_len).min(PEEK);
        &self.bytes[self.payload_at.min(end)..end]
    }
}

/// Parse the decimal number starting at `text[at..]`; returns it and the
/// index after it.
fn number(text: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut n = 0u64;
    let mut i = at;
    while i < text.len() && text[i].is_ascii_digit() {
        n = n.checked_mul(10)?.checked_add(u64::from(text[i] - b'0'))?;
        i += 1;
    }
    (i > at).then_some((n, i))
}

/// Write the decimal digits of `n` into `out` at `at`; returns the end.
fn put_number(out: &mut [u8], mut at: usize, n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut d = 0;
    let mut v = n;
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        out[at] = digits[d];
        at += 1;
    }
    at
}

impl Net<'_> {
    fn datagram(&self, payload: &[u8]) -> Frame {
        self.nic.udp(
            self.peer_mac,
            self.nic.opts.peer,
            self.nic.opts.port,
            payload,
        )
    }

    /// Send a control request and wait for an answer starting with
    /// `expect` (3 tries). Other frames are dropped.
    fn control(&mut self, request: &[u8], expect: &[u8]) -> Result<Frame, &'static str> {
        for _ in 0..3 {
            let frame = self.datagram(request);
            self.nic.send(&frame)?;
            let deadline = deadline_in(CONTROL_US);
            while let Some(f) = self.nic.recv(deadline)? {
                if self
                    .nic
                    .udp_payload(&f)
                    .is_some_and(|p| p.starts_with(expect))
                {
                    return Ok(f);
                }
            }
        }
        Err("no answer from the bench peer (bench/net/peer.py)")
    }

    /// The peer's counters of `D` datagrams: (datagrams, bytes).
    fn peer_stat(&mut self) -> Result<(u64, u64), &'static str> {
        let f = self.control(b"C stat", b"C stat ")?;
        let p = self.nic.udp_payload(&f).unwrap_or(&[]);
        let (n, end) = number(p, 7).ok_or("bad stat answer")?;
        let (bytes, _) = number(p, end + 1).ok_or("bad stat answer")?;
        Ok((n, bytes))
    }

    /// Put a received buffer back.
    fn repost(&mut self, token: u64) -> Result<(), &'static str> {
        self.nic
            .rx
            .add(&[Buf::write(token, BUF_BYTES as u32)], token)
    }

    /// Take every received buffer, give it to `f`, post it again and
    /// notify (if needed). Returns how many there were.
    fn drain_rx(&mut self, mut f: impl FnMut(&Peek, u64)) -> Result<u64, &'static str> {
        let mut n = 0;
        while let Some(used) = self.nic.rx.pop_used() {
            let now = cpu::rdtsc();
            let mut p = Peek {
                bytes: [0; PEEK],
                payload_at: 0,
                payload_len: 0,
            };
            let len = (used.len as usize).min(PEEK);
            dma::read_bytes(used.token, &mut p.bytes[..len]);
            if self.classify(&mut p, used.len as usize) {
                f(&p, now);
            }
            self.repost(used.token)?;
            n += 1;
        }
        if n > 0 {
            self.nic.rx.kick_if_needed(self.nic.t);
        }
        Ok(n)
    }

    /// Whether the buffer holds a UDP datagram from the peer's port to
    /// ours; sets the payload position and length.
    fn classify(&self, p: &mut Peek, len: usize) -> bool {
        let b = &p.bytes[HDR..];
        if len < HDR + 14 + 20 + 8 || be16(b, 12) != ETH_IPV4 || b[14] != 0x45 || b[23] != 17 {
            return false;
        }
        let opts = self.nic.opts;
        if b[26..30] != opts.peer || b[30..34] != opts.ip {
            return false;
        }
        let udp = 14 + 20;
        let ulen = usize::from(be16(b, udp + 4));
        if be16(b, udp) != opts.port || be16(b, udp + 2) != super::net::SOURCE_PORT || ulen < 8 {
            return false;
        }
        p.payload_at = HDR + udp + 8;
        p.payload_len = ulen - 8;
        true
    }

    /// Fill the transmit buffers with a `D` datagram of `payload` bytes;
    /// returns the length of each buffer (header + frame).
    fn prepare_tx(&mut self, payload: usize) -> u32 {
        let mut data = [b'.'; 1472];
        data[0] = b'D';
        let frame = self.datagram(&data[..payload]);
        let len = HDR + frame.len.max(FRAME_MIN);
        for i in 0..u64::from(self.tx_slots) {
            let buf = self.tx_bufs + i * BUF_BYTES;
            dma::fill(buf, 0, len);
            dma::write_bytes(buf + HDR as u64, frame.data());
        }
        len as u32
    }

    /// Keep `qd` frames of `len` bytes in flight for `ticks`; returns
    /// (frames, ticks from the first submission to the last completion,
    /// notifications, rescue notifications).
    fn stream(&mut self, len: u32, ticks: u64) -> Result<(u64, u64, u64, u64), &'static str> {
        let in_flight_max = self.qd.min(self.tx_slots);
        let start = cpu::rdtsc();
        let deadline = start + ticks;
        for i in 0..in_flight_max {
            let buf = self.tx_bufs + u64::from(i) * BUF_BYTES;
            self.nic.tx.add(&[Buf::read(buf, len)], buf)?;
        }
        self.nic.tx.kick(self.nic.t);
        let (mut frames, mut kicks, mut rescues) = (0u64, 1u64, 0u64);
        let mut in_flight = in_flight_max;
        let mut last = start;
        let mut rescued_at = start;
        let stall = cpu::us_to_ticks(STALL_US);
        let rescue = cpu::us_to_ticks(RESCUE_US);
        while in_flight > 0 {
            let mut added = false;
            while let Some(used) = self.nic.tx.pop_used() {
                in_flight -= 1;
                frames += 1;
                last = cpu::rdtsc();
                if last < deadline {
                    self.nic.tx.add(&[Buf::read(used.token, len)], used.token)?;
                    in_flight += 1;
                    added = true;
                }
            }
            if added {
                kicks += u64::from(self.nic.tx.kick_if_needed(self.nic.t));
                continue;
            }
            // Nothing is expected on the receive side; drop whatever comes.
            self.drain_rx(|_, _| {})?;
            let now = cpu::rdtsc();
            if now.wrapping_sub(last) > stall {
                return Err("transmit timed out");
            }
            if now.wrapping_sub(last.max(rescued_at)) > rescue {
                self.nic.tx.kick(self.nic.t);
                kicks += 1;
                rescues += 1;
                rescued_at = now;
            }
            cpu::pause();
        }
        Ok((frames, last - start, kicks, rescues))
    }

    fn tx(&mut self, payload: usize, opts: &BenchOptions) -> Result<(), &'static str> {
        let len = self.prepare_tx(payload);
        if opts.warm_ms > 0 {
            self.stream(len, cpu::us_to_ticks(opts.warm_ms * 1000))?;
        }
        self.control(b"C reset", b"C ok")?;
        let (frames, ticks, kicks, rescues) =
            self.stream(len, cpu::us_to_ticks(opts.time_ms * 1000))?;
        let (peer, _) = self.peer_stat()?;
        let pps = per_second(frames, ticks, 1);
        let mbps = Tenths(per_second(frames * payload as u64, ticks, 10) / 1_000_000);
        println!(
            "bench net tx-{payload} qd={} frames={frames} ns={} pps={pps} MBps={mbps} peer_received={peer} kicks={kicks} rescues={rescues}",
            self.qd.min(self.tx_slots),
            ticks_to_ns(ticks)
        );
        Ok(())
    }

    fn rx(&mut self, payload: usize, opts: &BenchOptions) -> Result<(), &'static str> {
        // Drop anything left over.
        self.drain_rx(|_, _| {})?;
        let mut request = [0u8; 40];
        request[..8].copy_from_slice(b"C flood ");
        let mut at = put_number(&mut request, 8, opts.warm_ms + opts.time_ms);
        request[at] = b' ';
        at = put_number(&mut request, at + 1, payload as u64);
        let frame = self.datagram(&request[..at]);
        self.nic.send(&frame)?;

        let warm = cpu::us_to_ticks(opts.warm_ms * 1000);
        let window = cpu::us_to_ticks(opts.time_ms * 1000);
        let (mut first, mut counted, mut total) = (None::<u64>, 0u64, 0u64);
        let mut done = None::<(u64, u64)>;
        let started = cpu::rdtsc();
        let give_up = cpu::us_to_ticks(opts.warm_ms * 1000 + opts.time_ms * 1000 + 5_000_000);
        let rescue = cpu::us_to_ticks(RESCUE_US);
        let (mut last_rx, mut rescues) = (started, 0u64);
        while done.is_none() {
            let n = self.drain_rx(|p, now| {
                let data = p.payload();
                if data.first() == Some(&b'F') {
                    let t0 = *first.get_or_insert(now);
                    total += 1;
                    if now >= t0 + warm && now < t0 + warm + window {
                        counted += 1;
                    }
                } else if data.starts_with(b"C done ") {
                    if let Some((sent, end)) = number(data, 7) {
                        let ns = number(data, end + 1).map_or(0, |(ns, _)| ns);
                        done = Some((sent, ns));
                    }
                }
            })?;
            let now = cpu::rdtsc();
            if n > 0 {
                last_rx = now;
            } else if now.wrapping_sub(last_rx) > rescue {
                // Nothing for a while: in case the device waits for a
                // notification it asked not to get. Counted only while the
                // flood is on (before it, the peer may be slow to start;
                // after it, the guest waits for "C done").
                self.nic.rx.kick(self.nic.t);
                if first.is_some_and(|t0| now < t0 + warm + window) {
                    rescues += 1;
                }
                last_rx = now;
            }
            if now.wrapping_sub(started) > give_up {
                break;
            }
            cpu::pause();
        }
        if first.is_none() {
            return Err("no datagrams from the bench peer's flood");
        }
        // The peer floods for the warm-up and the window: the window is
        // full unless the peer stopped early (then peer_pps shows it).
        let ticks = window;
        let (sent, sent_ns) = done.unwrap_or((0, 0));
        let pps = per_second(counted, ticks, 1);
        let mbps = Tenths(per_second(counted * payload as u64, ticks, 10) / 1_000_000);
        let peer_pps = if sent_ns > 0 {
            u128::from(sent) * 1_000_000_000 / u128::from(sent_ns)
        } else {
            0
        };
        println!(
            "bench net rx-{payload} frames={counted} ns={} pps={pps} MBps={mbps} received={total} peer_sent={sent} peer_pps={peer_pps} rescues={rescues}",
            ticks_to_ns(ticks)
        );
        Ok(())
    }

    /// Round trips of `E` datagrams of `payload` bytes for `ticks`; returns
    /// (round trips, ticks, lost).
    fn ping_pong(&mut self, payload: usize, ticks: u64) -> Result<(u64, u64, u64), &'static str> {
        let mut data = [b'.'; 64];
        data[0] = b'E';
        let start = cpu::rdtsc();
        let deadline = start + ticks;
        let (mut trips, mut lost) = (0u64, 0u64);
        let mut now = start;
        let mut seq = 0u64;
        while now < deadline {
            seq += 1;
            put_number(&mut data, 1, seq % 10_000_000_000_000_000);
            let frame = self.datagram(&data[..payload]);
            self.nic.send(&frame)?;
            let wait = deadline_in(ECHO_US);
            let mut back = false;
            while let Some(f) = self.nic.recv(wait)? {
                if self.nic.udp_payload(&f) == Some(&data[..payload]) {
                    back = true;
                    break;
                }
            }
            now = cpu::rdtsc();
            if back {
                trips += 1;
            } else {
                lost += 1;
                if lost > 10 {
                    return Err("echoes lost");
                }
            }
        }
        Ok((trips, now - start, lost))
    }

    fn rr(&mut self, payload: usize, opts: &BenchOptions) -> Result<(), &'static str> {
        if opts.warm_ms > 0 {
            self.ping_pong(payload, cpu::us_to_ticks(opts.warm_ms * 1000))?;
        }
        let (trips, ticks, lost) =
            self.ping_pong(payload, cpu::us_to_ticks(opts.time_ms * 1000))?;
        let tps = per_second(trips, ticks, 1);
        let rtt_ns = ticks_to_ns(ticks).checked_div(trips).unwrap_or(0);
        println!(
            "bench net rr-{payload} trips={trips} ns={} tps={tps} rtt_us={} lost={lost}",
            ticks_to_ns(ticks),
            Tenths(rtt_ns / 100)
        );
        Ok(())
    }
}

pub fn bench(t: &mut Transport, net: &NetOptions, opts: &BenchOptions) -> Result<(), &'static str> {
    let mut nic = Nic::open(t, net, LARGEST, u64::from(LARGEST))?;
    let peer_mac = nic.resolve_peer()?;
    let tx_slots = nic.tx.size();
    let tx_bufs = dma::alloc(u64::from(tx_slots) * BUF_BYTES, 4096)?;
    println!(
        "bench net {} mac {} peer {}.{}.{}.{}:{} mac {} qd {} (queue sizes rx {} tx {}) time {} ms warm-up {} ms",
        nic.t,
        Mac(nic.mac),
        net.peer[0],
        net.peer[1],
        net.peer[2],
        net.peer[3],
        net.port,
        Mac(peer_mac),
        opts.qd.min(tx_slots),
        nic.rx.size(),
        tx_slots,
        opts.time_ms,
        opts.warm_ms
    );
    let mut n = Net {
        nic,
        peer_mac,
        qd: opts.qd,
        tx_bufs,
        tx_slots,
    };
    n.tx(1472, opts)?;
    n.tx(18, opts)?;
    n.rx(1472, opts)?;
    n.rr(18, opts)?;
    Ok(())
}
