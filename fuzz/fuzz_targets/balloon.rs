//! virtio-balloon: inflate and deflate frame-number arrays, statistics buffers and free page
//! reports from arbitrary queues, with configuration accesses and statistics requests in
//! between.
//!
//! Input: 1 byte queue size exponent, 1 byte flags (bit 0 event idx), 4 x 3 x 2 bytes of ring
//! offsets (desc, avail, used; aligned down) for the inflate, deflate, statistics and reporting
//! queues, 1 byte script length L, L x 4 bytes of script, then guest memory contents.
//!
//! Script records `op, a, b, c`: serve queue `op % 4` (the statistics queue as the worker does:
//! a new buffer replaces the one held); write `a, b, c` into the configuration at offset
//! `a % 12`; read the configuration; set the target to `a | b << 8` pages; write `c` into guest
//! memory at `(a | b << 8) * 2` (the driver adding buffers).
//!
//! Discards must be page aligned (the device's contract with the VMM); they zero the pages.

#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use devices::virtio::balloon::{
    serve_stats, Balloon, BalloonOptions, DiscardMemory, PagesHandler, Role, ZeroFill,
    BALLOON_PAGE_SIZE,
};
use devices::virtio::queue::{process_queue, Chain};
use devices::virtio::VirtioDevice;
use guestmem::GuestMem;
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

/// Checks the device's side of the contract, then zeroes the pages.
struct Checked;

impl DiscardMemory for Checked {
    fn discard(&self, mem: &GuestMem, addr: GuestAddress, len: u64) -> io::Result<()> {
        assert!(
            addr.0 % BALLOON_PAGE_SIZE == 0 && len % BALLOON_PAGE_SIZE == 0,
            "unaligned discard {:#x}+{len:#x}",
            addr.0
        );
        assert!(addr.0.checked_add(len).is_some(), "discard wraps around");
        ZeroFill.discard(mem, addr, len)
    }
}

const HEADER: usize = 2 + 4 * 6 + 1;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let size = 1u16 << (data[0] % 9);
    let event_idx = data[1] & 1 != 0;
    let script_len = usize::from(data[HEADER - 1]) * 4;
    let rest = &data[HEADER..];
    let (script, memory) = rest.split_at(script_len.min(rest.len()));
    let mem = common::guest_memory(memory);
    let opts = BalloonOptions {
        target: 1 << 20,
        stats: true,
        free_page_reporting: true,
        deflate_on_oom: true,
    };
    let discard: Arc<dyn DiscardMemory> = Arc::new(Checked);
    let mut dev = Balloon::new(opts, discard.clone()).unwrap();
    let handle = dev.handle();
    let roles = [Role::Inflate, Role::Deflate, Role::Stats, Role::Reporting];
    let mut queues: Vec<Option<Queue>> = (0..4)
        .map(|i| common::queue(data, 2 + 6 * i, size, event_idx, &mem))
        .collect();
    let mut handlers: Vec<PagesHandler> = roles
        .iter()
        .map(|&r| PagesHandler::new(r, handle.clone(), discard.clone()))
        .collect();
    let mut chain = Chain::default();
    let never = AtomicBool::new(false);
    let mut broken = [false; 4];
    for rec in script.chunks_exact(4) {
        let (a, b, c) = (rec[1], rec[2], rec[3]);
        match rec[0] % 9 {
            op @ 0..=4 => {
                let i = usize::from(op % 4);
                let Some(q) = queues[i].as_mut().filter(|_| !broken[i]) else {
                    continue;
                };
                let r = if roles[i] == Role::Stats {
                    serve_stats(q, &mem, &mut chain, &handle, &never).map(|_| ())
                } else {
                    process_queue(q, &mem, &mut chain, &mut handlers[i]).map(|_| ())
                };
                broken[i] = r.is_err();
            }
            5 => dev.write_config(u64::from(a % 12), &[a, b, c][..usize::from(c % 4)]),
            6 => {
                let mut d = [0u8; 8];
                dev.read_config(u64::from(a % 12), &mut d[..usize::from(b % 9)]);
            }
            7 => handle.set_target(u64::from(u16::from_le_bytes([a, b])) * BALLOON_PAGE_SIZE),
            _ => {
                let at = u64::from(u16::from_le_bytes([a, b])) * 2;
                let _ = mem.write_obj(c, GuestAddress(at));
            }
        }
    }
    let state = dev.balloon_state();
    assert!(state.reported_bytes % BALLOON_PAGE_SIZE == 0);
    let _ = handle.stats();
});
