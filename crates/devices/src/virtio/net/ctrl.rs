//! The control queue (virtio 1.2 §5.1.6.5): `{class u8, command u8, data..., ack u8}`.
//!
//! Accepted: RX mode (promiscuous, all-multicast, ...) and MAC table commands, which need no
//! action as the device does no filtering (the tap sees every frame anyway), and
//! `MQ VQ_PAIRS_SET`, which attaches the tap queues of the pairs in use and detaches the others
//! (so that the kernel never queues frames where no one reads them). Anything else is answered
//! with `VIRTIO_NET_ERR`.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use guestmem::GuestMem;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::{apply_active_pairs, NetBackend};
use crate::virtio::queue::{Chain, ChainHandler, Cursor, MAX_CHAIN_DESCRIPTORS};

pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;

pub const VIRTIO_NET_CTRL_RX: u8 = 0;
pub const VIRTIO_NET_CTRL_RX_NOBCAST: u8 = 5;
pub const VIRTIO_NET_CTRL_MAC: u8 = 1;
pub const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = 0;
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;

/// Serves control commands.
pub struct CtrlHandler {
    backends: Arc<[Arc<dyn NetBackend>]>,
    active_pairs: Arc<AtomicU16>,
    /// Wake the queue-pair workers, which poll only attached backend queues.
    wakers: Vec<EventFd>,
}

impl CtrlHandler {
    pub fn new(
        backends: Arc<[Arc<dyn NetBackend>]>,
        active_pairs: Arc<AtomicU16>,
        wakers: Vec<EventFd>,
    ) -> Self {
        CtrlHandler {
            backends,
            active_pairs,
            wakers,
        }
    }

    fn command(&self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        match (class, cmd) {
            (VIRTIO_NET_CTRL_RX, 0..=VIRTIO_NET_CTRL_RX_NOBCAST) => VIRTIO_NET_OK,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => VIRTIO_NET_OK,
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                if data.len() < 2 {
                    return VIRTIO_NET_ERR;
                }
                let pairs = u16::from_le_bytes([data[0], data[1]]);
                if pairs == 0 || usize::from(pairs) > self.backends.len() {
                    return VIRTIO_NET_ERR;
                }
                let applied = apply_active_pairs(&self.backends, pairs);
                for w in &self.wakers {
                    let _ = w.write(1);
                }
                if let Err(e) = applied {
                    tracing::warn!("virtio-net: enabling {pairs} queue pairs: {e}");
                    return VIRTIO_NET_ERR;
                }
                tracing::debug!("virtio-net: {pairs} queue pairs enabled");
                self.active_pairs.store(pairs, Ordering::SeqCst);
                VIRTIO_NET_OK
            }
            _ => {
                tracing::debug!("virtio-net: control class {class} command {cmd} refused");
                VIRTIO_NET_ERR
            }
        }
    }
}

impl ChainHandler for CtrlHandler {
    fn handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> u32 {
        if chain.validate(mem, MAX_CHAIN_DESCRIPTORS).is_err() {
            return 0;
        }
        let Some(status) = chain.status_addr(mem) else {
            return 0;
        };
        // Only the command and the first bytes of its data matter here.
        let mut head = [0u8; 4];
        let n = chain.readable_len.min(head.len() as u64) as usize;
        let ack = if n < 2
            || Cursor::new(chain.readable(), n as u64)
                .read(mem, &mut head[..n])
                .is_err()
        {
            VIRTIO_NET_ERR
        } else {
            self.command(head[0], head[1], &head[2..n])
        };
        match mem.write_obj(ack, status) {
            Ok(()) => 1,
            Err(_) => 0,
        }
    }
}
