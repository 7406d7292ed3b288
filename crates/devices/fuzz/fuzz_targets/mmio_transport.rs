//! Register accesses on a virtio-mmio transport, with guest memory from the input.
//!
//! Input: 2 bytes length L of the access script, L bytes of script (records of 1 byte op,
//! 1 byte offset / 4, 4 bytes value), then guest memory contents. The device behind the
//! transport serves its queues synchronously with the virtio-blk request handler on every
//! activation, so descriptor chains reached through the registers are parsed too.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use devices::virtio::block::BlockHandler;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::queue::{process_queue, Chain};
use devices::virtio::{
    feature, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use devices::BusDevice;
use guestmem::GuestMem;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct SyncBlock {
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
        _interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let mut chain = Chain::default();
        for mut q in queues {
            let mut h = BlockHandler::new(Arc::new(common::MemDisk::new()), self.acked, [0; 20]);
            let _ = process_queue(&mut q.queue, &mem, &mut chain, &mut h);
            self.states.push((q.index, q.queue.state()));
        }
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

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (script, memory) = data[2..].split_at(len);
    let mem = common::guest_memory(memory);
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let dev = SyncBlock {
        acked: 0,
        states: Vec::new(),
    };
    let mut t = MmioTransport::new(mem, irq, Box::new(dev)).unwrap();
    for rec in script.chunks_exact(6) {
        let offset = u64::from(rec[1]) * 4;
        let value = [rec[2], rec[3], rec[4], rec[5]];
        match rec[0] % 4 {
            0 => t.write(offset, &value),
            1 => {
                let mut d = [0u8; 4];
                t.read(offset, &mut d);
            }
            2 => t.write(
                offset + u64::from(rec[2] % 4),
                &value[..usize::from(rec[3] % 9).min(4)],
            ),
            _ => {
                let mut d = [0u8; 8];
                let n = usize::from(rec[3] % 9);
                t.read(offset + u64::from(rec[2] % 4), &mut d[..n]);
            }
        }
    }
    let state = t.state();
    let _ = state.queues.len();
});
