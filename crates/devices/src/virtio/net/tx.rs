//! Transmit: each chain of the transmit queue, gathered into one write to the backend.
//!
//! With a rate limiter, a well-formed packet is sent only once the limiter grants it (one
//! packet, the frame's bytes without the virtio-net header); otherwise its chain stays in the
//! available ring and the pass ends until the limiter's timer wakes the worker. Likewise while
//! the backend is still writing an earlier packet ([`NetBackend::flush`], a stream socket):
//! the chain waits in the ring ([`TxHandler::blocked`]) until the backend polls writable.

use std::sync::Arc;

use guestmem::GuestMem;
use vmm_sys_util::eventfd::EventFd;

use super::{NetBackend, NetCounters, HDR_LEN, MAX_PACKET_LEN, MIN_FRAME_LEN};
use crate::rate_limiter::SharedLimiter;
use crate::virtio::queue::{Chain, ChainHandler, Cursor, MAX_CHAIN_DESCRIPTORS};

/// Why a transmitted packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("malformed chain: {0}")]
    Chain(#[from] crate::virtio::queue::QueueError),
    #[error("device-writable buffer in a transmit chain")]
    Writable,
    #[error("{0} bytes: shorter than a header and an Ethernet header")]
    Runt(u64),
    #[error("{0} bytes: longer than {MAX_PACKET_LEN}")]
    TooBig(u64),
    #[error("buffers not in guest memory")]
    Memory,
    #[error("backend write: {0}")]
    Backend(String),
}

/// Serves transmit chains for one pass over the queue.
pub struct TxHandler<'a> {
    pub backend: &'a dyn NetBackend,
    /// Holds one packet; [`MAX_PACKET_LEN`] bytes at most.
    pub buf: &'a mut Vec<u8>,
    /// The device's counters: packets sent (frame bytes, the header not counted) and dropped.
    pub counters: &'a NetCounters,
    /// The device's transmit limiter, and this queue pair's wake-up eventfd for it.
    pub limiter: Option<(&'a SharedLimiter, &'a Arc<EventFd>)>,
    /// Set when a chain was left in the ring because the backend has an earlier packet still
    /// to write: poll it for writability before the next pass.
    pub blocked: bool,
}

/// What became of a transmit chain.
enum Sent {
    Done,
    /// The limiter has no tokens for it now.
    Limited,
    /// The backend is still writing an earlier packet.
    Blocked,
}

impl TxHandler<'_> {
    fn send(&mut self, mem: &GuestMem, chain: &mut Chain) -> Result<Sent, TxError> {
        chain.validate(mem, MAX_CHAIN_DESCRIPTORS)?;
        if chain.writable_len > 0 {
            return Err(TxError::Writable);
        }
        let len = chain.readable_len;
        if len < (HDR_LEN + MIN_FRAME_LEN) as u64 {
            return Err(TxError::Runt(len));
        }
        if len > MAX_PACKET_LEN as u64 {
            return Err(TxError::TooBig(len));
        }
        // Before the limiter: a packet put back for the backend is not charged twice.
        match self.backend.flush() {
            Ok(true) => {}
            Ok(false) => return Ok(Sent::Blocked),
            Err(e) => return Err(TxError::Backend(e.to_string())),
        }
        if let Some((limiter, waker)) = self.limiter {
            if !limiter.consume(1, len - HDR_LEN as u64, waker) {
                return Ok(Sent::Limited);
            }
        }
        let len = len as usize;
        self.buf.resize(len, 0);
        Cursor::new(chain.readable(), len as u64)
            .read(mem, &mut self.buf[..len])
            .map_err(|_| TxError::Memory)?;
        match self.backend.send(&self.buf[..len]) {
            Ok(_) => Ok(Sent::Done),
            Err(e) => Err(TxError::Backend(e.to_string())),
        }
    }
}

impl ChainHandler for TxHandler<'_> {
    fn handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> u32 {
        // Only reached without deferral: a limited packet is dropped.
        self.try_handle(mem, chain).unwrap_or(0)
    }

    fn try_handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> Option<u32> {
        match self.send(mem, chain) {
            Ok(Sent::Limited) => return None,
            Ok(Sent::Blocked) => {
                self.blocked = true;
                return None;
            }
            Ok(Sent::Done) => {
                // At least a header and an Ethernet header: checked before sending.
                self.counters
                    .sent(chain.readable_len.saturating_sub(HDR_LEN as u64));
            }
            Err(e) => {
                self.counters.tx_dropped();
                // One line per bad packet would let a guest flood the log.
                crate::warn_limited!("virtio-net: transmit packet dropped: {e}");
            }
        }
        // Nothing is written into transmit buffers.
        Some(0)
    }
}
