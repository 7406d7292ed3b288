//! Shared by the fuzz targets: an in-memory disk, guest memory made of the input, a device
//! serving its queues synchronously, and MSI-X vectors that go nowhere.

use std::io;
use std::sync::{Arc, Mutex};

use block::{DiskBackend, Format};
use devices::pci::msix::{MsiMessage, MsiVectors};
use devices::virtio::block::BlockHandler;
use devices::virtio::queue::{process_queue, Chain};
use devices::virtio::{
    feature, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use guestmem::GuestMem;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory size: small, so that most guest addresses in the input are in range.
pub const MEM_SIZE: usize = 64 * 1024;

/// Guest memory holding `bytes` from address 0 (the rest zero).
pub fn guest_memory(bytes: &[u8]) -> GuestMem {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = bytes.len().min(MEM_SIZE);
    mem.write_slice(&bytes[..n], GuestAddress(0)).unwrap();
    mem
}

/// The register-access targets' input: a little-endian u16 length, that many bytes of
/// script, and the rest as guest memory; `None` for an input too short to say.
pub fn script_and_memory(data: &[u8]) -> Option<(&[u8], GuestMem)> {
    let head = data.get(..2)?;
    let len = usize::from(u16::from_le_bytes([head[0], head[1]])).min(data.len() - 2);
    let (script, memory) = data[2..].split_at(len);
    Some((script, guest_memory(memory)))
}

/// A queue of `size` whose ring addresses are the three little-endian u16s at `data[at..]`
/// (desc, avail, used; aligned down as the spec requires), if the layout is valid in `mem`.
pub fn queue(data: &[u8], at: usize, size: u16, event_idx: bool, mem: &GuestMem) -> Option<Queue> {
    let off =
        |i: usize, align: u16| u16::from_le_bytes([data[at + i], data[at + i + 1]]) & !(align - 1);
    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(u32::from(off(0, 16))), Some(0));
    q.set_avail_ring_address(Some(u32::from(off(2, 2))), Some(0));
    q.set_used_ring_address(Some(u32::from(off(4, 4))), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

/// A 64 KiB disk in memory.
pub struct MemDisk(pub Mutex<Vec<u8>>);

impl MemDisk {
    pub fn new() -> MemDisk {
        MemDisk(Mutex::new(vec![0; 64 * 1024]))
    }

    fn range(&self, off: u64, len: u64) -> block::Result<std::ops::Range<usize>> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(off as usize..end as usize),
            _ => Err(block::Error::OutOfRange {
                path: "mem".into(),
                offset: off,
                len,
                size,
            }),
        }
    }
}

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> block::Result<()> {
        let r = self.range(off, buf.len() as u64)?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> block::Result<()> {
        let r = self.range(off, buf.len() as u64)?;
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> block::Result<()> {
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> block::Result<()> {
        self.write_zeroes(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> block::Result<()> {
        let r = self.range(off, len)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

/// A virtio-blk-like device serving its queues synchronously at activation with the real
/// request handler on a [`MemDisk`]: nothing runs between two register accesses.
#[derive(Default)]
pub struct SyncBlock {
    acked: u64,
    states: Vec<(u16, QueueState)>,
}

const FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << 13)
    | (1 << 14);

impl VirtioDevice for SyncBlock {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 16]
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn ack_features(&mut self, f: u64) {
        self.acked = f;
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn config_len(&self) -> usize {
        8
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0x11);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let mut chain = Chain::default();
        for mut q in queues {
            let mut h = BlockHandler::new(Arc::new(MemDisk::new()), self.acked, [0; 20]);
            if let Ok(p) = process_queue(&mut q.queue, &mem, &mut chain, &mut h) {
                if p.notify {
                    let _ = interrupt.trigger(VirtioInterruptType::Queue(q.index));
                }
            }
            self.states.push((q.index, q.queue.state()));
        }
        let _ = interrupt.trigger(VirtioInterruptType::Config);
        Ok(())
    }
    fn reset(&mut self) {
        self.acked = 0;
        self.states.clear();
    }
    fn queue_states(&self) -> Vec<(u16, QueueState)> {
        self.states.clone()
    }
    // Queues are served synchronously at activation: nothing runs between accesses.
    fn pause(&mut self) {}
    fn resume(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }
}

/// MSI-X vectors that check the vector number and go nowhere.
pub struct Vectors(pub u16);

impl MsiVectors for Vectors {
    fn trigger(&self, vector: u16) -> io::Result<()> {
        assert!(vector < self.0, "vector {vector} of {}", self.0);
        Ok(())
    }
    fn program(&self, vector: u16, _msg: MsiMessage) -> io::Result<()> {
        assert!(vector < self.0, "vector {vector} of {}", self.0);
        Ok(())
    }
}
