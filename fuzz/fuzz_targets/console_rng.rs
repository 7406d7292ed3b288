//! virtio-console and virtio-rng queues: console transmit chains gathered into the output,
//! receive chains filled from host input (pushed by the script), the console's configuration
//! (`emerg_wr` included), and rng chains filled with random bytes; rings from the input.
//!
//! Input: 1 byte queue size exponent, 1 byte flags (bit 0 event idx), 3 x 3 x 2 bytes of ring
//! offsets (desc, avail, used; aligned down) for the console's receive and transmit queues and
//! the rng's queue, 1 byte script length L, L x 4 bytes of script, then guest memory contents.
//!
//! Script records `op, a, b, c`: serve the console's queues (as one worker pass); serve the
//! rng queue; push `a` bytes of `b` as host input; write `b` to the configuration at `a % 12`;
//! read `c % 9` bytes of it; write `c` into guest memory at `(a | b << 8) * 2`.

#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::virtio::console::{serve_once, Console, ConsoleBackend, ConsoleInput};
use devices::virtio::queue::{process_queue, Chain};
use devices::virtio::rng::RngHandler;
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

/// Output that counts what it is given (a transmit chain is at most 1 MiB).
#[derive(Clone, Default)]
struct Counted(Arc<Mutex<u64>>);

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        *self.0.lock().unwrap() += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const HEADER: usize = 2 + 3 * 6 + 1;

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
    let mut queues: Vec<Option<Queue>> = (0..3)
        .map(|i| common::queue(data, 2 + 6 * i, size, event_idx, &mem))
        .collect();
    let out = Counted::default();
    let input = ConsoleInput::new().unwrap();
    let mut console = Console::new(ConsoleBackend::new(
        Box::new(out.clone()),
        Some(input.clone()),
    ))
    .unwrap();
    let mut rng = RngHandler::default();
    let mut chain = Chain::default();
    let mut broken = [false; 2];
    for rec in script.chunks_exact(4) {
        let (a, b, c) = (rec[1], rec[2], rec[3]);
        match rec[0] % 6 {
            0 => {
                let (rx, rest) = queues.split_at_mut(1);
                if let (Some(rx), Some(tx), false) = (&mut rx[0], &mut rest[0], broken[0]) {
                    broken[0] = serve_once(tx, rx, &mem, Box::new(out.clone()), &input).is_err();
                }
            }
            1 => {
                if let (Some(q), false) = (&mut queues[2], broken[1]) {
                    broken[1] = process_queue(q, &mem, &mut chain, &mut rng).is_err();
                }
            }
            2 => {
                input.push(&vec![b; usize::from(a) * 16]);
            }
            3 => console.write_config(u64::from(a % 12), &[b, c][..usize::from(c % 3)]),
            4 => {
                let mut d = [0u8; 8];
                console.read_config(u64::from(a % 12), &mut d[..usize::from(c % 9)]);
            }
            _ => {
                let at = u64::from(u16::from_le_bytes([a, b])) * 2;
                let _ = mem.write_obj(c, GuestAddress(at));
            }
        }
    }
    let _ = console.console_state();
});
