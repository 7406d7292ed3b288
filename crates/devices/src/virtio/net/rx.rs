//! Receive: one frame (header included) into the driver's receive buffers.

use guestmem::GuestMem;
use virtio_queue::{Queue, QueueT};

use super::HDR_LEN;
use crate::virtio::queue::{
    pop_head, walk_chain, Chain, Cursor, QueueError, MAX_CHAIN_DESCRIPTORS,
};

/// Why a received frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a header and an Ethernet header.
    Runt,
    /// Longer than the buffers can ever hold (one chain, or the whole queue with `MRG_RXBUF`).
    TooBig,
    /// A malformed buffer came in the middle of a merged frame.
    Malformed,
}

/// What became of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into this many chains, which are now in the used ring.
    Delivered(u16),
    /// Not enough buffers available: nothing was consumed (but malformed chains met on the way,
    /// which are returned empty and counted in `returned`). The caller keeps the frame.
    NoBuffers {
        /// The available index seen: more buffers were added once it moves.
        seen_avail: u16,
        returned: u16,
    },
    /// The frame is gone; `returned` chains went to the used ring (empty).
    Dropped { why: DropReason, returned: u16 },
}

impl RxOutcome {
    /// Whether the used ring changed.
    pub fn used(&self) -> bool {
        match *self {
            RxOutcome::Delivered(n) => n > 0,
            RxOutcome::NoBuffers { returned, .. } | RxOutcome::Dropped { returned, .. } => {
                returned > 0
            }
        }
    }
}

/// A chain the device can write a frame into: validated, writable buffers only, not empty.
fn usable(mem: &GuestMem, c: &mut Chain) -> bool {
    c.validate(mem, MAX_CHAIN_DESCRIPTORS).is_ok() && c.readable_len == 0 && c.writable_len > 0
}

/// Put `packet` (a header of [`HDR_LEN`] bytes and a frame) into the available receive chains of
/// `queue`: one chain, or as many as needed with `mrg` (mergeable buffers; `num_buffers` in the
/// header says how many). `pool` keeps walked chains between calls. An `Err` is a corrupt ring.
pub fn deliver(
    queue: &mut Queue,
    mem: &GuestMem,
    packet: &mut [u8],
    mrg: bool,
    pool: &mut Vec<Chain>,
) -> Result<RxOutcome, QueueError> {
    let ring = |e: virtio_queue::Error| QueueError::Ring(e.to_string());
    let mut returned = 0u16;
    if packet.len() < HDR_LEN + super::MIN_FRAME_LEN {
        return Ok(RxOutcome::Dropped {
            why: DropReason::Runt,
            returned,
        });
    }
    let size = queue.size();
    let max_chains = if mrg { usize::from(size) } else { 1 };
    // Where to go back to if the frame does not fit: past any malformed chain returned.
    let mut start = queue.next_avail();
    let mut n = 0usize;
    let mut room = 0u64;
    let mut popped = 0u32;
    while room < packet.len() as u64 {
        if n == max_chains || popped >= u32::from(size) {
            // Even every buffer this frame may use is too small.
            queue.set_next_avail(start);
            return Ok(RxOutcome::Dropped {
                why: DropReason::TooBig,
                returned,
            });
        }
        let Some(head) = pop_head(queue, mem)? else {
            let seen_avail = queue.next_avail();
            queue.set_next_avail(start);
            return Ok(RxOutcome::NoBuffers {
                seen_avail,
                returned,
            });
        };
        popped += 1;
        if pool.len() <= n {
            pool.push(Chain::default());
        }
        let c = &mut pool[n];
        walk_chain(queue, mem, head, c);
        if !usable(mem, c) {
            // A buffer the device cannot use: give it back empty.
            queue.add_used(mem, head, 0).map_err(ring)?;
            returned += 1;
            if n == 0 {
                start = queue.next_avail();
                continue;
            }
            // In the middle of a merged frame: give the others back too, drop the frame.
            for c in &pool[..n] {
                queue.add_used(mem, c.head, 0).map_err(ring)?;
                returned += 1;
            }
            return Ok(RxOutcome::Dropped {
                why: DropReason::Malformed,
                returned,
            });
        }
        room += c.writable_len;
        n += 1;
    }
    packet[10..12].copy_from_slice(&(n as u16).to_le_bytes());
    let mut rest: &[u8] = packet;
    for c in &pool[..n] {
        let take = (c.writable_len as usize).min(rest.len());
        let mut out = Cursor::new(c.writable(), take as u64);
        let len = match out.write(mem, &rest[..take]) {
            Ok(()) => take as u32,
            // Validated, so only a memory region going away could do this.
            Err(_) => 0,
        };
        rest = &rest[take..];
        queue.add_used(mem, c.head, len).map_err(ring)?;
    }
    Ok(RxOutcome::Delivered(n as u16))
}
