//! Split virtqueues (virtio 1.2 §2.7), polled: the driver never asks for
//! interrupts (`VIRTQ_AVAIL_F_NO_INTERRUPT`) and watches the used ring's
//! index instead.
//!
//! Queues of at most [`MAX_SIZE`] entries (the tests) take one 4 KiB page:
//! descriptor table at +0 (16 bytes each), available ring at +1024, used
//! ring at +2048. Larger ones (up to [`LARGEST`], the benchmarks) take two
//! pages: descriptors at +0, available ring at +16 × size, used ring 1 KiB
//! after it.

use core::sync::atomic::{fence, Ordering};

use super::{dma, Transport};
use crate::cpu;

/// Largest queue size the drivers use (the device's maximum may be larger).
pub const MAX_SIZE: u16 = 64;
/// Largest queue size [`Queue::with_max`] accepts.
pub const LARGEST: u16 = 256;

const RING_SPACING: u64 = 1024;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// The device writes this buffer (else it reads it).
    pub device_writes: bool,
}

impl Buf {
    pub fn read(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            device_writes: false,
        }
    }

    pub fn write(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            device_writes: true,
        }
    }
}

/// A chain the device has finished with.
#[derive(Clone, Copy)]
pub struct Used {
    /// The token passed to [`Queue::add`].
    pub token: u64,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

pub struct Queue {
    pub index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free_head: u16,
    num_free: u16,
    next_avail: u16,
    last_used: u16,
    tokens: [u64; LARGEST as usize],
}

impl Queue {
    /// Set up queue `index` of the device (size: the device's maximum, at
    /// most [`MAX_SIZE`], rounded down to a power of two).
    pub fn new(t: &mut Transport, index: u16) -> Result<Queue, &'static str> {
        Queue::with_max(t, index, MAX_SIZE)
    }

    /// Set up queue `index` with at most `limit` (at most [`LARGEST`])
    /// entries: the device's maximum, capped, rounded down to a power of two.
    pub fn with_max(t: &mut Transport, index: u16, limit: u16) -> Result<Queue, &'static str> {
        let max = t.queue_max(index);
        if max == 0 {
            return Err("queue not available");
        }
        let size = 1u16 << (15 - max.min(limit.min(LARGEST)).leading_zeros());
        let desc_bytes = (u64::from(size) * 16).max(RING_SPACING);
        let pages = if size > MAX_SIZE { 2 } else { 1 };
        let page = dma::alloc(4096 * pages, 4096)?;
        let q = Queue {
            index,
            size,
            desc: page,
            avail: page + desc_bytes,
            used: page + desc_bytes + RING_SPACING,
            free_head: 0,
            num_free: size,
            next_avail: 0,
            last_used: 0,
            tokens: [0; LARGEST as usize],
        };
        for i in 0..size {
            dma::write16(q.desc_addr(i) + 14, i + 1);
        }
        dma::write16(q.avail, AVAIL_F_NO_INTERRUPT);
        t.queue_setup(index, size, q.desc, q.avail, q.used)?;
        Ok(q)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    fn desc_addr(&self, i: u16) -> u64 {
        self.desc + u64::from(i) * 16
    }

    /// Make a chain of `bufs` available to the device (without notifying
    /// it). `token` comes back in [`Used`].
    pub fn add(&mut self, bufs: &[Buf], token: u64) -> Result<(), &'static str> {
        if bufs.is_empty() || bufs.len() > usize::from(self.num_free) {
            return Err("virtqueue full");
        }
        let head = self.free_head;
        let mut i = head;
        for (n, b) in bufs.iter().enumerate() {
            let d = self.desc_addr(i);
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if n + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            dma::write64(d, b.addr);
            dma::write32(d + 8, b.len);
            dma::write16(d + 12, flags);
            // `next` (d + 14) already links the free list in order.
            i = dma::read16(d + 14);
        }
        self.free_head = i;
        self.num_free -= bufs.len() as u16;
        self.tokens[usize::from(head)] = token;

        let slot = self.next_avail % self.size;
        dma::write16(self.avail + 4 + u64::from(slot) * 2, head);
        // The ring entry (and the descriptors) before the index.
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        dma::write16(self.avail + 2, self.next_avail);
        Ok(())
    }

    /// Tell the device about new buffers.
    pub fn kick(&self, t: &Transport) {
        fence(Ordering::SeqCst);
        t.notify(self.index);
    }

    /// Tell the device about new buffers unless it asked not to be
    /// notified (`VIRTQ_USED_F_NO_NOTIFY`: it is still working through the
    /// ring). Returns whether it notified.
    pub fn kick_if_needed(&self, t: &Transport) -> bool {
        // The new available index before the flag.
        fence(Ordering::SeqCst);
        if dma::read16(self.used) & USED_F_NO_NOTIFY != 0 {
            return false;
        }
        t.notify(self.index);
        true
    }

    /// The next chain the device has used, if any; its descriptors are free
    /// again.
    pub fn pop_used(&mut self) -> Option<Used> {
        fence(Ordering::SeqCst);
        if dma::read16(self.used + 2) == self.last_used {
            return None;
        }
        // The element after the index.
        fence(Ordering::SeqCst);
        let elem = self.used + 4 + u64::from(self.last_used % self.size) * 8;
        let id = dma::read32(elem);
        let len = dma::read32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id).ok().filter(|&h| h < self.size)?;
        // Put the chain back on the free list.
        let mut last = head;
        let mut count = 1;
        while dma::read16(self.desc_addr(last) + 12) & DESC_F_NEXT != 0 && count < self.size {
            last = dma::read16(self.desc_addr(last) + 14);
            count += 1;
        }
        dma::write16(self.desc_addr(last) + 14, self.free_head);
        self.free_head = head;
        self.num_free += count;
        Some(Used {
            token: self.tokens[usize::from(head)],
            len,
        })
    }

    /// Poll for the next used chain for up to `timeout_us`.
    pub fn wait_used(&mut self, timeout_us: u64) -> Option<Used> {
        let start = cpu::rdtsc();
        let limit = cpu::us_to_ticks(timeout_us);
        loop {
            if let Some(u) = self.pop_used() {
                return Some(u);
            }
            if cpu::rdtsc().wrapping_sub(start) > limit {
                return None;
            }
            cpu::pause();
        }
    }
}
