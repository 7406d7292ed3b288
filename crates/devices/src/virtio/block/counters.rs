//! A block device's counters: requests and bytes by kind, and the requests that failed.
//!
//! The queue workers count each request when its status is written (so a request the rate
//! limiter put back into the ring counts once, when it is finally served), with relaxed atomic
//! additions: no lock, no allocation. The counters belong to the device object of this process:
//! they go on across a device reset, a guest reboot (`--on-reboot restart`) and a disk snapshot
//! (the same device), and are not saved: a VM restored from a snapshot, or a migration's
//! target, starts again from 0.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::engine::Op;

/// What a request that reached the disk was, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl OpKind {
    pub(crate) fn of(op: &Op) -> OpKind {
        match op {
            Op::Read(_) => OpKind::Read,
            Op::Write(_) | Op::WriteThrough(_) => OpKind::Write,
            Op::Flush => OpKind::Flush,
            Op::Discard(_) => OpKind::Discard,
            Op::WriteZeroes(_) => OpKind::WriteZeroes,
        }
    }
}

/// The counters of one block device, shared by its queue workers and read by the VMM (see
/// [`super::Block::counters`]). Counted since the device was created in this process: a VM
/// restored from a snapshot or received by a migration starts at 0.
#[derive(Debug, Default)]
pub struct BlockCounters {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    flush_ops: AtomicU64,
    discard_ops: AtomicU64,
    write_zeroes_ops: AtomicU64,
    errors: AtomicU64,
}

/// [`BlockCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCountersSnapshot {
    /// Reads (`VIRTIO_BLK_T_IN`) completed successfully.
    pub read_ops: u64,
    /// Bytes those reads brought into guest memory.
    pub read_bytes: u64,
    /// Writes (`VIRTIO_BLK_T_OUT`) completed successfully.
    pub write_ops: u64,
    /// Bytes those writes took from guest memory.
    pub write_bytes: u64,
    /// Flushes completed successfully.
    pub flush_ops: u64,
    /// Discards completed successfully.
    pub discard_ops: u64,
    /// Write-zeroes requests completed successfully.
    pub write_zeroes_ops: u64,
    /// Requests completed with an error status (`IOERR`: a bad request or a failed disk
    /// operation; `UNSUPP`: a request type or flag the device does not take).
    pub errors: u64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl BlockCounters {
    /// A request of `kind` moving `bytes` completed successfully.
    pub(crate) fn completed(&self, kind: OpKind, bytes: u64) {
        match kind {
            OpKind::Read => {
                add(&self.read_ops, 1);
                add(&self.read_bytes, bytes);
            }
            OpKind::Write => {
                add(&self.write_ops, 1);
                add(&self.write_bytes, bytes);
            }
            OpKind::Flush => add(&self.flush_ops, 1),
            OpKind::Discard => add(&self.discard_ops, 1),
            OpKind::WriteZeroes => add(&self.write_zeroes_ops, 1),
        }
    }

    /// A request completed with an error status.
    pub(crate) fn failed(&self) {
        add(&self.errors, 1);
    }

    /// The counters now (each read on its own: a request completing meanwhile may show in
    /// its ops and not yet in its bytes).
    pub fn snapshot(&self) -> BlockCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockCountersSnapshot {
            read_ops: get(&self.read_ops),
            read_bytes: get(&self.read_bytes),
            write_ops: get(&self.write_ops),
            write_bytes: get(&self.write_bytes),
            flush_ops: get(&self.flush_ops),
            discard_ops: get(&self.discard_ops),
            write_zeroes_ops: get(&self.write_zeroes_ops),
            errors: get(&self.errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::engine::Data;

    #[test]
    fn counts_by_kind_and_snapshots() {
        let c = BlockCounters::default();
        assert_eq!(c.snapshot(), BlockCountersSnapshot::default());
        c.completed(OpKind::Read, 4096);
        c.completed(OpKind::Read, 512);
        c.completed(OpKind::Write, 1024);
        c.completed(OpKind::Flush, 0);
        c.completed(OpKind::Discard, 0);
        c.completed(OpKind::WriteZeroes, 0);
        c.completed(OpKind::WriteZeroes, 0);
        c.failed();
        let s = c.snapshot();
        assert_eq!(
            s,
            BlockCountersSnapshot {
                read_ops: 2,
                read_bytes: 4608,
                write_ops: 1,
                write_bytes: 1024,
                flush_ops: 1,
                discard_ops: 1,
                write_zeroes_ops: 2,
                errors: 1,
            }
        );
        // A snapshot is a copy: later requests do not change it.
        c.completed(OpKind::Write, 512);
        assert_eq!(s.write_ops, 1);
        assert_eq!(c.snapshot().write_bytes, 1536);
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["read_bytes"], 4608);
        assert_eq!(json["write_zeroes_ops"], 2);
    }

    #[test]
    fn kinds_of_ops() {
        let data = Data {
            offset: 0,
            len: 512,
            bufs: Vec::new(),
        };
        assert_eq!(OpKind::of(&Op::Read(data.clone())), OpKind::Read);
        assert_eq!(OpKind::of(&Op::Write(data.clone())), OpKind::Write);
        assert_eq!(OpKind::of(&Op::WriteThrough(data)), OpKind::Write);
        assert_eq!(OpKind::of(&Op::Flush), OpKind::Flush);
        assert_eq!(OpKind::of(&Op::Discard(vec![(0, 4096)])), OpKind::Discard);
        assert_eq!(
            OpKind::of(&Op::WriteZeroes(Vec::new())),
            OpKind::WriteZeroes
        );
    }

    #[test]
    fn concurrent_queues_lose_nothing() {
        let c = std::sync::Arc::new(BlockCounters::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.completed(OpKind::Write, 512);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = c.snapshot();
        assert_eq!((s.write_ops, s.write_bytes), (40_000, 40_000 * 512));
    }
}
