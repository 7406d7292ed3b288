//! Arbitrary guest memory and queue layout fed to the virtio-blk request parser.
//!
//! Input: 2 bytes queue size exponent and event-idx flag, then 3 x 2 bytes of ring offsets
//! (desc, avail, used; aligned down), then guest memory contents.

#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::sync::Arc;

use devices::virtio::block::BlockHandler;
use devices::virtio::queue::{process_queue, Chain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = 1u16 << (data[0] % 9); // 1..=256
    let event_idx = data[1] & 1 != 0;
    let mem = common::guest_memory(&data[8..]);
    let Some(mut q) = common::queue(data, 2, size, event_idx, &mem) else {
        return;
    };
    let features = u64::MAX;
    let mut handler = BlockHandler::new(
        Arc::new(common::MemDisk::new()),
        features,
        *b"fuzz-serial-00000000",
    );
    let mut chain = Chain::default();
    // Twice: the second pass sees the used ring the first one wrote.
    for _ in 0..2 {
        if process_queue(&mut q, &mem, &mut chain, &mut handler).is_err() {
            break;
        }
    }
});
