//! Register accesses on a virtio-mmio transport, with guest memory from the input.
//!
//! Input: 2 bytes length L of the access script, L bytes of script (records of 1 byte op,
//! 1 byte offset / 4, 4 bytes value), then guest memory contents. The device behind the
//! transport serves its queues synchronously with the virtio-blk request handler on every
//! activation, so descriptor chains reached through the registers are parsed too.

#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::sync::Arc;

use devices::virtio::mmio::MmioTransport;
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fuzz_target!(|data: &[u8]| {
    let Some((script, mem)) = common::script_and_memory(data) else {
        return;
    };
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let dev = common::SyncBlock::default();
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
