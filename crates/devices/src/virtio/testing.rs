//! Test helpers: a driver's view of a split queue in guest memory.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmem::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::*;
use super::{
    VirtioDevice, VirtioInterrupt, VirtioInterruptType, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use crate::BusDevice;

/// Device-readable descriptor flags.
pub const R: u16 = 0;
/// Device-writable descriptor flags.
pub const W: u16 = 2;
const NEXT: u16 = 1;
const INDIRECT: u16 = 4;

pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x3000;
pub const USED: u64 = 0x4000;

/// 4 MiB of guest memory at 0.
pub fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

/// A split queue at [`DESC`], [`AVAIL`] and [`USED`], driven as a driver would.
pub struct TestQueue<'a> {
    mem: &'a GuestMem,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestQueue<'a> {
    pub fn new(mem: &'a GuestMem, size: u16) -> Self {
        Self::new_at(mem, size, 0)
    }

    /// Rings at [`DESC`], [`AVAIL`], [`USED`] plus `shift`.
    pub fn new_at(mem: &'a GuestMem, size: u16, shift: u64) -> Self {
        let z = vec![0u8; 0x1000];
        for a in [DESC, DESC + 0x1000, AVAIL, USED] {
            mem.write_slice(&z, GuestAddress(a + shift)).unwrap();
        }
        TestQueue {
            mem,
            size,
            desc: DESC + shift,
            avail: AVAIL + shift,
            used: USED + shift,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// A ready `Queue` for these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    fn alloc(&mut self) -> u16 {
        let i = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        i
    }

    /// Make `head` available.
    pub fn push_head(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Write the available index directly.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// A well-linked chain of `(addr, len, flags)`; returns its head.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let idx: Vec<u16> = descs.iter().map(|_| self.alloc()).collect();
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let (f, next) = match idx.get(k + 1) {
                Some(&n) => (flags | NEXT, n),
                None => (flags, 0),
            };
            self.write_desc(self.desc, idx[k], addr, len, f, next);
        }
        self.push_head(idx[0]);
        idx[0]
    }

    /// Descriptors `(addr, len, flags, next)` written as given, at consecutive indices from 0
    /// (starting over); the first is made available.
    pub fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        self.next_desc = 0;
        for &(addr, len, flags, next) in descs {
            let i = self.alloc();
            self.write_desc(self.desc, i, addr, len, flags, next);
        }
        self.push_head(0);
        0
    }

    /// A chain whose one descriptor points at an indirect table (at `table`) of `descs`.
    pub fn add_indirect(&mut self, descs: &[(u64, u32, u16)], table: u64) -> u16 {
        let n = descs.len() as u16;
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let k = k as u16;
            let (f, next) = if k + 1 < n && flags & INDIRECT == 0 {
                (flags | NEXT, k + 1)
            } else {
                (flags, 0)
            };
            self.write_desc(table, k, addr, len, f, next);
        }
        let head = self.alloc();
        self.write_desc(self.desc, head, table, u32::from(n) * 16, INDIRECT, 0);
        self.push_head(head);
        head
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// The `i`th used element: (id, len).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Wait (up to 5 s) until the used index reaches `n`.
    pub fn wait_used(&self, n: u16) {
        let start = Instant::now();
        while self.used_idx() != n {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "used index stuck at {} (want {n})",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A [`VirtioInterrupt`] that counts.
#[derive(Default)]
pub struct CountingInterrupt {
    pub queue: AtomicU32,
    pub config: AtomicU32,
    pub needs_reset: Mutex<bool>,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        match kind {
            VirtioInterruptType::Config => self.config.fetch_add(1, Ordering::SeqCst),
            VirtioInterruptType::Queue(_) => self.queue.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
    fn set_needs_reset(&self) {
        *self.needs_reset.lock().unwrap() = true;
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// A virtio-mmio transport for `device`, with its interrupt line.
pub fn mmio_transport(
    mem: &GuestMem,
    device: Box<dyn VirtioDevice>,
) -> (MmioTransport, Arc<EventFd>) {
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let t = MmioTransport::new(mem.clone(), irq.clone(), device).unwrap();
    (t, irq)
}

pub fn mmio_read(t: &mut MmioTransport, off: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(off, &mut d);
    u32::from_le_bytes(d)
}

pub fn mmio_write(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// What a driver does to bring a device up: ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK, the
/// `queues` (index and rings), DRIVER_OK. Panics if the device refuses.
pub fn mmio_start(t: &mut MmioTransport, features: u64, queues: &[(u16, &TestQueue)]) {
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    mmio_write(t, REG_STATUS, STATUS_ACKNOWLEDGE);
    mmio_write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for sel in 0..2u32 {
        mmio_write(t, REG_DRIVER_FEATURES_SEL, sel);
        mmio_write(t, REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
    }
    mmio_write(t, REG_STATUS, ok);
    assert_eq!(
        mmio_read(t, REG_STATUS),
        ok,
        "features {features:#x} refused"
    );
    for (index, q) in queues {
        mmio_write(t, REG_QUEUE_SEL, u32::from(*index));
        mmio_write(t, REG_QUEUE_NUM, u32::from(q.size));
        for (lo, addr) in [
            (REG_QUEUE_DESC_LOW, q.desc),
            (REG_QUEUE_DRIVER_LOW, q.avail),
            (REG_QUEUE_DEVICE_LOW, q.used),
        ] {
            mmio_write(t, lo, addr as u32);
            mmio_write(t, lo + 4, (addr >> 32) as u32);
        }
        mmio_write(t, REG_QUEUE_READY, 1);
    }
    mmio_write(t, REG_STATUS, ok | STATUS_DRIVER_OK);
    assert_eq!(
        mmio_read(t, REG_STATUS),
        ok | STATUS_DRIVER_OK,
        "activation failed"
    );
}

/// The driver notifies queue `q`.
pub fn mmio_notify(t: &mut MmioTransport, q: u16) {
    mmio_write(t, QUEUE_NOTIFY_OFFSET, u32::from(q));
}

/// What a restore in a new process does: a new transport for `device` (built like the saved
/// one), restored from the JSON of a saved state, then resumed.
pub fn mmio_restore(
    mem: &GuestMem,
    json: &str,
    device: Box<dyn VirtioDevice>,
) -> (MmioTransport, Arc<EventFd>) {
    let state: VirtioMmioState = serde_json::from_str(json).unwrap();
    let (mut t, irq) = mmio_transport(mem, device);
    t.restore(&state).unwrap();
    t.resume().unwrap();
    (t, irq)
}

/// Wait (up to 5 s) until `f` holds.
pub fn wait_for(f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(5), "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Give device threads a moment to do what they should not (for "nothing happened" checks,
/// which can only fail, never pass, by luck).
pub fn settle() {
    std::thread::sleep(Duration::from_millis(30));
}
