//! The block benchmark (`bench=blk`): 4 KiB random reads and writes and
//! 1 MiB sequential reads and writes over the first `benchregion=` bytes of
//! the disk (default: all of it), each for `benchtime=` ms after a
//! `benchwarm=` ms warm-up, with `qd=` requests in flight.
//!
//! Requests are chains of three descriptors (header, data, status), so the
//! queue depth is at most a third of the queue size. The driver polls the
//! used ring; whenever requests complete it puts new ones in their slots and
//! notifies the device unless the device has set `VIRTQ_USED_F_NO_NOTIFY`
//! (it is still working through the ring). The contents of the region are
//! overwritten.

use super::bench::{per_second, ticks_to_ns, Tenths};
use super::dma;
use super::queue::{Buf, Queue, LARGEST};
use super::Transport;
use crate::cmdline::BenchOptions;
use crate::{cpu, println};

const F_RO: u64 = 1 << 5;
/// Negotiated as Linux does: a device may (QEMU does) treat a driver
/// without it as one that needs every write to be durable (write-through).
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const SECTOR: u64 = 512;
const BIG: u64 = 1 << 20;
/// No completion for this long: the device is stuck.
const STALL_US: u64 = 10_000_000;
/// No completion for this long: notify the device again (counted as a
/// "rescue"; a correct device never needs one).
const RESCUE_US: u64 = 100_000;

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bytes: u64,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "randread-4k",
        write: false,
        random: true,
        bytes: 4096,
    },
    Workload {
        name: "randwrite-4k",
        write: true,
        random: true,
        bytes: 4096,
    },
    Workload {
        name: "seqread-1m",
        write: false,
        random: false,
        bytes: BIG,
    },
    Workload {
        name: "seqwrite-1m",
        write: true,
        random: false,
        bytes: BIG,
    },
];

/// What one measured run did.
struct Outcome {
    ops: u64,
    bytes: u64,
    ticks: u64,
    kicks: u64,
    rescues: u64,
}

struct Bench<'a> {
    t: &'a Transport,
    q: Queue,
    qd: u16,
    /// `qd` 16-byte headers, `qd` status bytes (16 apart), `qd` 1 MiB data
    /// buffers.
    headers: u64,
    statuses: u64,
    data: u64,
    /// Bytes of the disk used, a multiple of 1 MiB.
    region: u64,
    rng: u64,
    next_seq: u64,
}

impl Bench<'_> {
    /// The next offset (bytes) for `w`.
    fn offset(&mut self, w: &Workload) -> u64 {
        if w.random {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            (self.rng % (self.region / w.bytes)) * w.bytes
        } else {
            let at = self.next_seq;
            self.next_seq = (at + w.bytes) % self.region;
            at
        }
    }

    /// Put a request for `w` in `slot` (not notified yet).
    fn submit(&mut self, w: &Workload, slot: u16) -> Result<(), &'static str> {
        let s = u64::from(slot);
        let header = self.headers + s * 16;
        let status = self.statuses + s * 16;
        let data = self.data + s * BIG;
        let offset = self.offset(w);
        dma::write32(header, if w.write { T_OUT } else { T_IN });
        dma::write32(header + 4, 0);
        dma::write64(header + 8, offset / SECTOR);
        dma::write8(status, 0xff);
        let data = if w.write {
            Buf::read(data, w.bytes as u32)
        } else {
            Buf::write(data, w.bytes as u32)
        };
        self.q.add(
            &[Buf::read(header, 16), data, Buf::write(status, 1)],
            u64::from(slot),
        )
    }

    /// Run `w` for `ticks` TSC ticks: keep `qd` requests in flight until
    /// then, and wait for the last ones. Timed from the first submission to
    /// the last completion.
    fn run(&mut self, w: &Workload, ticks: u64) -> Result<Outcome, &'static str> {
        let mut out = Outcome {
            ops: 0,
            bytes: 0,
            ticks: 0,
            kicks: 1,
            rescues: 0,
        };
        let start = cpu::rdtsc();
        let deadline = start + ticks;
        for slot in 0..self.qd {
            self.submit(w, slot)?;
        }
        self.q.kick(self.t);
        let mut in_flight = self.qd;
        let mut last = start;
        let stall = cpu::us_to_ticks(STALL_US);
        let rescue = cpu::us_to_ticks(RESCUE_US);
        let mut rescued_at = start;
        while in_flight > 0 {
            let mut added = false;
            while let Some(used) = self.q.pop_used() {
                let slot = used.token as u16;
                if dma::read8(self.statuses + used.token * 16) != S_OK {
                    return Err(if w.write {
                        "write failed"
                    } else {
                        "read failed"
                    });
                }
                in_flight -= 1;
                out.ops += 1;
                out.bytes += w.bytes;
                last = cpu::rdtsc();
                if last < deadline {
                    self.submit(w, slot)?;
                    in_flight += 1;
                    added = true;
                }
            }
            if added {
                out.kicks += u64::from(self.q.kick_if_needed(self.t));
                continue;
            }
            let now = cpu::rdtsc();
            if now.wrapping_sub(last) > stall {
                return Err("request timed out");
            }
            if now.wrapping_sub(last.max(rescued_at)) > rescue {
                self.q.kick(self.t);
                out.kicks += 1;
                out.rescues += 1;
                rescued_at = now;
            }
            cpu::pause();
        }
        out.ticks = last - start;
        Ok(out)
    }
}

pub fn bench(t: &mut Transport, opts: &BenchOptions) -> Result<(), &'static str> {
    let features = t.begin(F_RO | F_FLUSH)?;
    let capacity = t.config_read64(0);
    let q = Queue::with_max(t, 0, LARGEST)?;
    t.ready();
    let qd = opts.qd.min(q.size() / 3).max(1);
    let region = opts
        .region
        .unwrap_or(u64::MAX)
        .min(capacity.saturating_mul(SECTOR))
        / BIG
        * BIG;
    if region == 0 {
        return Err("disk smaller than 1 MiB");
    }
    let headers = dma::alloc(u64::from(qd) * 16, 16)?;
    let statuses = dma::alloc(u64::from(qd) * 16, 16)?;
    let data = dma::alloc(u64::from(qd) * BIG, 4096).map_err(|_| {
        "not enough memory for qd x 1 MiB buffers (more --memory, or a smaller qd=)"
    })?;
    let read_only = features & F_RO != 0;
    println!(
        "bench blk {t} capacity {capacity} sectors region {} MiB qd {qd} (queue size {}) flush {} time {} ms warm-up {} ms",
        region >> 20,
        q.size(),
        if features & F_FLUSH != 0 { "on" } else { "off" },
        opts.time_ms,
        opts.warm_ms
    );
    let mut b = Bench {
        t,
        q,
        qd,
        headers,
        statuses,
        data,
        region,
        rng: 0x9e37_79b9_7f4a_7c15,
        next_seq: 0,
    };
    for w in &WORKLOADS {
        if w.write && read_only {
            println!("bench blk {} skipped: read-only disk", w.name);
            continue;
        }
        if w.write {
            // Data no layer can skip as zeroes (the reads before left what
            // they read in these buffers).
            dma::fill_random(data, u64::from(qd) * BIG, 0x5eed);
        }
        if opts.warm_ms > 0 {
            b.run(w, cpu::us_to_ticks(opts.warm_ms * 1000))?;
        }
        let o = b.run(w, cpu::us_to_ticks(opts.time_ms * 1000))?;
        let ns = ticks_to_ns(o.ticks);
        let iops = per_second(o.ops, o.ticks, 1);
        let mbps = Tenths(per_second(o.bytes, o.ticks, 10) / 1_000_000);
        println!(
            "bench blk {} qd={qd} ops={} bytes={} ns={ns} iops={iops} MBps={mbps} kicks={} rescues={}",
            w.name, o.ops, o.bytes, o.kicks, o.rescues
        );
    }
    Ok(())
}
