//! Split-virtqueue processing on guest-controlled memory, defensively.
//!
//! `virtio-queue`'s [`Queue`] keeps the queue state, writes the used ring and decides on
//! notifications; popping heads and walking chains is done here instead, because its iterators
//! end silently on a bad descriptor and a device must tell "end of chain" from "corrupt chain".
//!
//! - [`pop_head`] reads the next head from the available ring. A bad available index or an
//!   out-of-range head is unrecoverable ([`QueueError`]): the device sets `DEVICE_NEEDS_RESET`.
//! - [`walk_chain`] follows one chain (direct or through one indirect table) with a visited
//!   bitmap, so loops end it; it never reads more than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
//!   Whatever it collected before an error is kept, so a device can still find the chain's
//!   status byte and report the error in it.
//! - [`Chain::validate`] then checks every buffer against guest memory, the total length, the
//!   readable-before-writable order and a device's limit on the number of descriptors.

use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};

use guestmem::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::MAX_QUEUE_SIZE;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

/// The most descriptors one chain may have, counting those of an indirect table (virtio says a
/// chain is never longer than the queue, [`MAX_QUEUE_SIZE`] for every device here).
pub const MAX_CHAIN_DESCRIPTORS: usize = MAX_QUEUE_SIZE as usize;

const BITMAP_WORDS: usize = MAX_CHAIN_DESCRIPTORS.div_ceil(64);

/// Errors of queue processing.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    // Unrecoverable: the ring itself is corrupt or unreachable.
    #[error("available index {avail} is more than the queue size {size} ahead of {next}")]
    AvailIndex { avail: u16, next: u16, size: u16 },
    #[error("available ring names head {head}, outside the queue of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("cannot access the rings: {0}")]
    Ring(String),
    // One chain is bad; the others are served.
    #[error("descriptor {index} links to {next}, outside its table of {size}")]
    NextOutOfRange { index: u16, next: u16, size: u16 },
    #[error("descriptor chain loops back to descriptor {0}")]
    Loop(u16),
    #[error("descriptor chain has more than {0} descriptors")]
    TooLong(usize),
    #[error("cannot read descriptor at {0:#x}")]
    DescriptorUnreadable(u64),
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor also has the NEXT flag")]
    IndirectWithNext,
    #[error("indirect table of {0} bytes (not a non-zero multiple of 16, or too long)")]
    IndirectTableLength(u32),
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    BufferOutsideMemory { addr: u64, len: u32 },
    #[error("buffers add up to more than 4 GiB")]
    LengthOverflow,
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
}

impl QueueError {
    /// Whether the error leaves the queue unusable (as opposed to failing one chain).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            QueueError::AvailIndex { .. } | QueueError::HeadOutOfRange { .. } | QueueError::Ring(_)
        )
    }
}

fn ring_err(e: impl std::fmt::Display) -> QueueError {
    QueueError::Ring(e.to_string())
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A walked descriptor chain.
#[derive(Debug, Default)]
pub struct Chain {
    /// Head index, for the used ring.
    pub head: u16,
    /// The buffers, in chain order (all of them, or those before `error`).
    pub segments: Vec<Segment>,
    /// Why the walk stopped early, if it did.
    pub error: Option<QueueError>,
    /// Bytes in device-readable buffers (set by [`Chain::validate`]).
    pub readable_len: u64,
    /// Bytes in device-writable buffers (set by [`Chain::validate`]).
    pub writable_len: u64,
}

impl Chain {
    /// The last byte of the chain's last buffer, if it is device-writable and in guest memory:
    /// where a request's status byte goes. Available even for a chain that failed its walk.
    pub fn status_addr(&self, mem: &GuestMem) -> Option<GuestAddress> {
        let last = self.segments.last()?;
        if !last.writable || last.len == 0 {
            return None;
        }
        let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
        GuestMemoryBackend::check_range(mem, addr, 1).then_some(addr)
    }

    /// Check a walked chain: no walk error, at most `max_descriptors` buffers, all inside guest
    /// memory, readable ones before writable ones, less than 4 GiB in total. Sets the lengths.
    pub fn validate(&mut self, mem: &GuestMem, max_descriptors: usize) -> Result<(), QueueError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.segments.len() > max_descriptors {
            return Err(QueueError::TooLong(max_descriptors));
        }
        let (mut readable, mut writable) = (0u64, 0u64);
        let mut seen_writable = false;
        for s in &self.segments {
            let in_memory =
                s.len == 0 || GuestMemoryBackend::check_range(mem, s.addr, s.len as usize);
            if !in_memory {
                return Err(QueueError::BufferOutsideMemory {
                    addr: s.addr.raw_value(),
                    len: s.len,
                });
            }
            if s.writable {
                seen_writable = true;
                writable += u64::from(s.len);
            } else if seen_writable {
                return Err(QueueError::ReadableAfterWritable);
            } else {
                readable += u64::from(s.len);
            }
        }
        if readable + writable > u64::from(u32::MAX) {
            return Err(QueueError::LengthOverflow);
        }
        self.readable_len = readable;
        self.writable_len = writable;
        Ok(())
    }

    /// The device-readable buffers.
    pub fn readable(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|s| !s.writable)
    }

    /// The device-writable buffers.
    pub fn writable(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|s| s.writable)
    }
}

/// Read the next head from the available ring, if the driver made one available.
pub fn pop_head(queue: &mut Queue, mem: &GuestMem) -> Result<Option<u16>, QueueError> {
    let size = queue.size();
    let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(ring_err)?;
    let next = Wrapping(queue.next_avail());
    if avail == next {
        return Ok(None);
    }
    if (avail - next).0 > size || size == 0 {
        return Err(QueueError::AvailIndex {
            avail: avail.0,
            next: next.0,
            size,
        });
    }
    let slot = u64::from(next.0 % size);
    let addr = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * slot)
        .ok_or_else(|| ring_err("available ring address overflows"))?;
    let head = u16::from_le(mem.load(addr, Ordering::Acquire).map_err(ring_err)?);
    queue.set_next_avail(next.0.wrapping_add(1));
    if head >= size {
        return Err(QueueError::HeadOutOfRange { head, size });
    }
    Ok(Some(head))
}

fn read_descriptor(mem: &GuestMem, addr: GuestAddress) -> Option<(u64, u32, u16, u16)> {
    let mut raw = [0u8; DESC_SIZE as usize];
    mem.read_slice(&mut raw, addr).ok()?;
    let a = u64::from_le_bytes(raw[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes(raw[12..14].try_into().ok()?);
    let next = u16::from_le_bytes(raw[14..16].try_into().ok()?);
    Some((a, len, flags, next))
}

/// Walk the chain starting at `head` of the descriptor table of `queue` into `chain`
/// (reusing its allocation). Walk errors are recorded in `chain.error`.
pub fn walk_chain(queue: &Queue, mem: &GuestMem, head: u16, chain: &mut Chain) {
    chain.head = head;
    chain.segments.clear();
    chain.error = None;
    chain.readable_len = 0;
    chain.writable_len = 0;
    if let Err(e) = walk(
        mem,
        GuestAddress(queue.desc_table()),
        queue.size(),
        head,
        &mut chain.segments,
    ) {
        chain.error = Some(e);
    }
}

fn walk(
    mem: &GuestMem,
    mut table: GuestAddress,
    mut table_len: u16,
    head: u16,
    out: &mut Vec<Segment>,
) -> Result<(), QueueError> {
    let mut visited = [0u64; BITMAP_WORDS];
    let mut index = head;
    let mut indirect = false;
    if usize::from(table_len) > MAX_CHAIN_DESCRIPTORS {
        return Err(QueueError::TooLong(MAX_CHAIN_DESCRIPTORS));
    }
    loop {
        if index >= table_len {
            return Err(QueueError::NextOutOfRange {
                index: out.len() as u16,
                next: index,
                size: table_len,
            });
        }
        let (word, bit) = (usize::from(index) / 64, index % 64);
        if visited[word] & (1 << bit) != 0 {
            return Err(QueueError::Loop(index));
        }
        visited[word] |= 1 << bit;
        if out.len() >= MAX_CHAIN_DESCRIPTORS {
            return Err(QueueError::TooLong(MAX_CHAIN_DESCRIPTORS));
        }
        let at = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(QueueError::DescriptorUnreadable(table.raw_value()))?;
        let (addr, len, flags, next) =
            read_descriptor(mem, at).ok_or(QueueError::DescriptorUnreadable(at.raw_value()))?;
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(QueueError::NestedIndirect);
            }
            if flags & VRING_DESC_F_NEXT != 0 {
                return Err(QueueError::IndirectWithNext);
            }
            let entries = u64::from(len) / DESC_SIZE;
            if len == 0
                || u64::from(len) % DESC_SIZE != 0
                || entries + out.len() as u64 > MAX_CHAIN_DESCRIPTORS as u64
            {
                return Err(QueueError::IndirectTableLength(len));
            }
            table = GuestAddress(addr);
            table_len = entries as u16;
            index = 0;
            indirect = true;
            visited = [0; BITMAP_WORDS];
            continue;
        }
        out.push(Segment {
            addr: GuestAddress(addr),
            len,
            writable: flags & VRING_DESC_F_WRITE != 0,
        });
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = next;
    }
}

/// What a device does with one chain.
pub trait ChainHandler {
    /// Serve `chain` (walked, not yet validated) and return the number of bytes written into its
    /// buffers, for the used ring.
    fn handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> u32;

    /// Like [`ChainHandler::handle`], but may decline to serve `chain` now (`None`, say because
    /// a rate limiter is out of tokens): [`process_queue`] then leaves the chain in the
    /// available ring and ends the pass with [`Progress::deferred`].
    fn try_handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> Option<u32> {
        Some(self.handle(mem, chain))
    }
}

/// What a [`process_queue`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The driver must be interrupted.
    pub notify: bool,
    /// The pass stopped at its budget with chains still available: call again (after checking
    /// for other work, such as a request to stop).
    pub pending: bool,
    /// The handler declined a chain ([`ChainHandler::try_handle`]): it is still available, and
    /// the caller calls again once the handler can serve it. Driver notifications may be left
    /// disabled meanwhile.
    pub deferred: bool,
}

/// Serve the available chains of `queue` with `handler`, adding each to the used ring, with
/// notifications suppressed while working. A pass serves at most as many chains as the queue
/// has entries: a driver can lay out its rings so that the device's own used-ring writes keep
/// "adding" available entries, and a pass must end anyway.
/// A chain the handler declines ends the pass early, left available (see [`Progress::deferred`]).
/// An `Err` is a corrupt ring ([`QueueError::is_fatal`]): the queue must not be used again
/// before a reset.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMem,
    chain: &mut Chain,
    handler: &mut dyn ChainHandler,
) -> Result<Progress, QueueError> {
    process_queue_until(queue, mem, chain, handler, &AtomicBool::new(false))
}

/// [`process_queue`], except that the pass also ends, with `pending` set, as soon as `stop` is
/// set (a pause request: see [`super::worker::StopSignal`]): the chain being served is finished
/// and put in the used ring first, so a pause waits for one request, never for a whole pass.
pub fn process_queue_until(
    queue: &mut Queue,
    mem: &GuestMem,
    chain: &mut Chain,
    handler: &mut dyn ChainHandler,
    stop: &AtomicBool,
) -> Result<Progress, QueueError> {
    let budget = u32::from(queue.size());
    let mut served = 0u32;
    let mut rounds = 0u32;
    let mut pending = false;
    let mut deferred = false;
    'passes: loop {
        // Rounds count too: with rings that overlap, flipping the notification flag can change
        // the available index without any chain being served.
        rounds += 1;
        if rounds > budget {
            pending = true;
            break;
        }
        queue.disable_notification(mem).map_err(ring_err)?;
        loop {
            if stop.load(Ordering::Acquire) {
                pending = true;
                break 'passes;
            }
            let Some(head) = pop_head(queue, mem)? else {
                break;
            };
            walk_chain(queue, mem, head, chain);
            let Some(len) = handler.try_handle(mem, chain) else {
                // Put the chain back: the next pass pops it again.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                deferred = true;
                break 'passes;
            };
            queue.add_used(mem, head, len).map_err(ring_err)?;
            served += 1;
            if served >= budget {
                pending = true;
                break 'passes;
            }
        }
        if !queue.enable_notification(mem).map_err(ring_err)? {
            break;
        }
    }
    if pending {
        // Leave notifications on: whoever calls again must not depend on them, but a driver
        // that stalls should still be able to wake the device.
        queue.enable_notification(mem).map_err(ring_err)?;
    }
    let notify = served > 0 && queue.needs_notification(mem).map_err(ring_err)?;
    Ok(Progress {
        notify,
        pending,
        deferred,
    })
}

/// A position in a list of buffers, to read or write them as one stream.
pub struct Cursor<'a> {
    segments: Vec<&'a Segment>,
    index: usize,
    offset: u32,
    remaining: u64,
}

impl<'a> Cursor<'a> {
    /// A stream over `segments`, limited to `limit` bytes.
    pub fn new(segments: impl Iterator<Item = &'a Segment>, limit: u64) -> Self {
        let segments: Vec<&Segment> = segments.collect();
        let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        Cursor {
            segments,
            index: 0,
            offset: 0,
            remaining: total.min(limit),
        }
    }

    /// Bytes left in the stream.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Visit the next `n` bytes as guest ranges, advancing. Fails if fewer are left.
    fn advance(
        &mut self,
        mut n: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    ) -> Result<(), CursorError> {
        if n as u64 > self.remaining {
            return Err(CursorError::Short);
        }
        let mut done = 0;
        while n > 0 {
            let seg = self.segments.get(self.index).ok_or(CursorError::Short)?;
            let left = (seg.len - self.offset) as usize;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let take = left.min(n);
            let addr = seg
                .addr
                .checked_add(u64::from(self.offset))
                .ok_or(CursorError::Memory)?;
            f(addr, done, take).map_err(|_| CursorError::Memory)?;
            self.offset += take as u32;
            self.remaining -= take as u64;
            done += take;
            n -= take;
        }
        Ok(())
    }

    /// Fill `buf` from the stream.
    pub fn read(&mut self, mem: &GuestMem, buf: &mut [u8]) -> Result<(), CursorError> {
        let len = buf.len();
        self.advance(len, |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], addr)
        })
    }

    /// Write `buf` into the stream.
    pub fn write(&mut self, mem: &GuestMem, buf: &[u8]) -> Result<(), CursorError> {
        self.advance(buf.len(), |addr, at, n| {
            mem.write_slice(&buf[at..at + n], addr)
        })
    }
}

/// Errors of [`Cursor`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("buffers are shorter than the transfer")]
    Short,
    #[error("buffer not in guest memory")]
    Memory,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{mem, TestQueue, R, W};

    struct Count(u32);
    impl ChainHandler for Count {
        fn handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> u32 {
            self.0 += 1;
            match chain.validate(mem, 8) {
                Ok(()) => 7,
                Err(_) => 0,
            }
        }
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 16);
        let mut q = tq.queue();
        tq.add_chain(&[(0x10000, 16, R), (0x11000, 512, W), (0x12000, 1, W)]);
        let head = tq.add_indirect(&[(0x20000, 16, R), (0x21000, 8, W)], 0x30000);
        let mut c = Chain::default();
        let h = pop_head(&mut q, &m).unwrap().unwrap();
        walk_chain(&q, &m, h, &mut c);
        c.validate(&m, 8).unwrap();
        assert_eq!(
            (c.segments.len(), c.readable_len, c.writable_len),
            (3, 16, 513)
        );
        assert_eq!(c.status_addr(&m), Some(GuestAddress(0x12000)));
        let h = pop_head(&mut q, &m).unwrap().unwrap();
        assert_eq!(h, head);
        walk_chain(&q, &m, h, &mut c);
        c.validate(&m, 8).unwrap();
        assert_eq!((c.readable_len, c.writable_len), (16, 8));
        assert_eq!(pop_head(&mut q, &m).unwrap(), None);
    }

    #[test]
    fn malformed_chains_fail_alone() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 16);
        let mut q = tq.queue();
        let mut c = Chain::default();
        let mut check = |q: &mut Queue, want: QueueError| {
            let h = pop_head(q, &m).unwrap().unwrap();
            walk_chain(q, &m, h, &mut c);
            assert_eq!(c.validate(&m, 8), Err(want));
        };
        // Loop: 0 -> 1 -> 0.
        tq.add_raw(&[(0x10000, 16, R | 1, 1), (0x11000, 1, W | 1, 0)]);
        check(&mut q, QueueError::Loop(0));
        // Next out of range.
        tq.add_raw(&[(0x10000, 16, R | 1, 99)]);
        check(
            &mut q,
            QueueError::NextOutOfRange {
                index: 1,
                next: 99,
                size: 16,
            },
        );
        // Outside guest memory.
        tq.add_chain(&[(0xffff_0000_0000, 16, R), (0x11000, 1, W)]);
        check(
            &mut q,
            QueueError::BufferOutsideMemory {
                addr: 0xffff_0000_0000,
                len: 16,
            },
        );
        // Lengths that overflow: fake buffers of 4 GiB - 1 each are also outside memory, so use
        // an address range that wraps instead.
        tq.add_chain(&[(u64::MAX - 3, 16, R), (0x11000, 1, W)]);
        check(
            &mut q,
            QueueError::BufferOutsideMemory {
                addr: u64::MAX - 3,
                len: 16,
            },
        );
        // Readable after writable.
        tq.add_chain(&[(0x11000, 1, W), (0x10000, 16, R)]);
        check(&mut q, QueueError::ReadableAfterWritable);
        // Too many descriptors for the device's limit of 8.
        let many: Vec<_> = (0..9).map(|i| (0x10000 + i * 16, 16, R)).collect();
        tq.add_chain(&many);
        check(&mut q, QueueError::TooLong(8));
        // Nested indirect table.
        tq.add_indirect(&[(0x30000, 32, 4)], 0x31000);
        check(&mut q, QueueError::NestedIndirect);
        // Indirect table of bad length.
        tq.add_raw(&[(0x30000, 17, 4, 0)]);
        check(&mut q, QueueError::IndirectTableLength(17));
        // Indirect table outside memory.
        tq.add_raw(&[(0xffff_0000_0000, 32, 4, 0)]);
        check(&mut q, QueueError::DescriptorUnreadable(0xffff_0000_0000));
        // And a good one after all that.
        tq.add_chain(&[(0x10000, 16, R), (0x11000, 1, W)]);
        let h = pop_head(&mut q, &m).unwrap().unwrap();
        walk_chain(&q, &m, h, &mut c);
        c.validate(&m, 8).unwrap();
    }

    #[test]
    fn total_length_overflow_is_an_error() {
        // Two buffers of 2.25 GiB each (the same memory twice): each is inside guest memory,
        // together they pass 4 GiB. The memory is reserved, never touched.
        let big = 0x9000_0000u64;
        let m = GuestMem::from_ranges(&[(GuestAddress(0), big as usize)]).unwrap();
        let mut tq = TestQueue::new(&m, 16);
        let mut q = tq.queue();
        let mut c = Chain::default();
        tq.add_chain(&[
            (0x100000, big as u32 - 0x100000, R),
            (0x100000, big as u32 - 0x100000, W),
        ]);
        let h = pop_head(&mut q, &m).unwrap().unwrap();
        walk_chain(&q, &m, h, &mut c);
        assert_eq!(c.validate(&m, 8), Err(QueueError::LengthOverflow));
    }

    #[test]
    fn bad_avail_index_and_head_are_fatal() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 16);
        let mut q = tq.queue();
        tq.set_avail_idx(17);
        let e = pop_head(&mut q, &m).unwrap_err();
        assert!(e.is_fatal());
        let mut tq = TestQueue::new(&m, 16);
        let mut q = tq.queue();
        tq.push_head(16);
        assert_eq!(
            pop_head(&mut q, &m),
            Err(QueueError::HeadOutOfRange { head: 16, size: 16 })
        );
    }

    #[test]
    fn process_queue_uses_every_chain() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 16);
        let mut q = tq.queue();
        tq.add_raw(&[(0x10000, 16, R | 1, 0)]);
        tq.add_chain(&[(0x10000, 16, R), (0x11000, 1, W)]);
        tq.add_chain(&[(0x10000, 16, R), (0x11000, 1, W)]);
        let mut h = Count(0);
        let mut c = Chain::default();
        let p = process_queue(&mut q, &m, &mut c, &mut h).unwrap();
        assert!(p.notify && !p.pending);
        assert_eq!(h.0, 3);
        assert_eq!(tq.used_idx(), 3);
        assert_eq!(tq.used(0), (0, 0));
        assert_eq!(tq.used(1), (1, 7));
        assert_eq!(tq.used(2), (3, 7));
    }

    /// Serves `budget` chains, then declines.
    struct Budget(u32);
    impl ChainHandler for Budget {
        fn handle(&mut self, _: &GuestMem, _: &mut Chain) -> u32 {
            unreachable!("process_queue calls try_handle")
        }
        fn try_handle(&mut self, _: &GuestMem, _: &mut Chain) -> Option<u32> {
            self.0 = self.0.checked_sub(1)?;
            Some(1)
        }
    }

    #[test]
    fn a_declined_chain_stays_available() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 16);
        let mut q = tq.queue();
        for i in 0..3 {
            tq.add_chain(&[(0x10000 + i * 0x1000, 16, R)]);
        }
        let mut c = Chain::default();
        let p = process_queue(&mut q, &m, &mut c, &mut Budget(1)).unwrap();
        assert!(p.deferred && p.notify && !p.pending);
        assert_eq!((tq.used_idx(), q.next_avail()), (1, 1));
        let p = process_queue(&mut q, &m, &mut c, &mut Budget(0)).unwrap();
        assert!(p.deferred && !p.notify);
        assert_eq!((tq.used_idx(), q.next_avail()), (1, 1));
        let p = process_queue(&mut q, &m, &mut c, &mut Budget(5)).unwrap();
        assert!(!p.deferred);
        assert_eq!(tq.used_idx(), 3);
        assert_eq!([tq.used(1).0, tq.used(2).0], [1, 2]);
    }

    #[test]
    fn a_pass_ends_even_if_the_used_ring_feeds_the_avail_ring() {
        // Rings that overlap: used ring on the available ring, or its flags on the available
        // index (found by fuzzing: flipping the notification flag rewrote the index forever).
        use crate::virtio::testing::DESC;
        for (avail, used) in [(0x3000u64, 0x3000u64), (0x3006, 0x3008)] {
            let m = mem();
            let tq = TestQueue::new(&m, 4);
            let mut q = tq.queue();
            q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
            q.try_set_used_ring_address(GuestAddress(used)).unwrap();
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&0x10000u64.to_le_bytes());
            raw[8..12].copy_from_slice(&16u32.to_le_bytes());
            m.write_slice(&raw, GuestAddress(DESC)).unwrap();
            m.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
            let mut h = Count(0);
            let mut c = Chain::default();
            for _ in 0..3 {
                match process_queue(&mut q, &m, &mut c, &mut h) {
                    Ok(p) if p.pending => continue,
                    _ => break,
                }
            }
            assert!(h.0 <= 12);
        }
    }

    #[test]
    fn cursor_spans_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x10000),
                len: 3,
                writable: true,
            },
            Segment {
                addr: GuestAddress(0x20000),
                len: 5,
                writable: true,
            },
        ];
        let mut c = Cursor::new(segs.iter(), 7);
        assert_eq!(c.remaining(), 7);
        c.write(&m, b"abcdef").unwrap();
        assert_eq!(c.write(&m, b"gh"), Err(CursorError::Short));
        let mut out = [0u8; 3];
        m.read_slice(&mut out, GuestAddress(0x20000)).unwrap();
        assert_eq!(&out, b"def");
        let mut r = Cursor::new(segs.iter(), u64::MAX);
        let mut all = [0u8; 6];
        r.read(&m, &mut all).unwrap();
        assert_eq!(&all, b"abcdef");
    }
}
