//! virtio-rng: the entropy device (virtio 1.2 §5.4). One queue; each chain's device-writable
//! buffers are filled from the host's `getrandom`, up to [`MAX_BYTES_PER_CHAIN`].

use std::sync::Arc;

use guestmem::GuestMem;
use virtio_queue::QueueState;

use super::queue::{Chain, ChainHandler, Cursor};
use super::worker::QueueWorker;
use super::{
    feature, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, TYPE_RNG,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Most bytes served per chain.
pub const MAX_BYTES_PER_CHAIN: u64 = 64 * 1024;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;

const FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_INDIRECT_DESC)
    | feature(VIRTIO_RING_F_EVENT_IDX);

/// Errors of the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("host getrandom failed: {0}")]
    GetRandom(String),
}

/// The entropy device.
pub struct Rng {
    acked: u64,
    worker: Option<QueueWorker>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    pub fn new() -> Rng {
        Rng {
            acked: 0,
            worker: None,
        }
    }
}

/// Serves one chain: fills its writable buffers with random bytes.
#[derive(Default)]
pub struct RngHandler {
    buf: Vec<u8>,
}

impl RngHandler {
    fn fill(&mut self, mem: &GuestMem, chain: &mut Chain) -> Result<u32, RngError> {
        // Readable buffers are ignored; a chain that fails validation gets nothing.
        if chain.validate(mem, usize::from(QUEUE_SIZE)).is_err() {
            return Ok(0);
        }
        let mut out = Cursor::new(chain.writable(), MAX_BYTES_PER_CHAIN);
        let n = out.remaining() as usize;
        self.buf.resize(n, 0);
        jail::random::fill(&mut self.buf[..n]).map_err(|e| RngError::GetRandom(e.to_string()))?;
        match out.write(mem, &self.buf[..n]) {
            Ok(()) => Ok(n as u32),
            Err(_) => Ok(0),
        }
    }
}

impl ChainHandler for RngHandler {
    fn handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> u32 {
        match self.fill(mem, chain) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("virtio-rng: {e}");
                0
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & FEATURES;
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn config_len(&self) -> usize {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Some(q) = queues.into_iter().find(|q| q.index == 0) else {
            return Err(ActivateError::MissingQueue(0));
        };
        let worker = QueueWorker::spawn(
            "virtio-rng".into(),
            q,
            mem,
            interrupt,
            RngHandler::default(),
        )
        .map_err(|e| ActivateError::Worker(e.into()))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.acked = 0;
    }

    fn queue_states(&self) -> Vec<(u16, QueueState)> {
        self.worker
            .iter()
            .map(|w| (w.index(), w.queue_state()))
            .collect()
    }

    fn pause(&mut self) {
        if let Some(w) = &mut self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        match &mut self.worker {
            Some(w) => w.resume().map_err(|e| ActivateError::Worker(e.into())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::process_queue;
    use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, R, W};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 16);
        let mut q = tq.queue();
        tq.add_chain(&[(0x10000, 100, W), (0x20000, 28, W)]);
        tq.add_chain(&[(0x30000, 1 << 20, W)]);
        tq.add_chain(&[(0x10000, 8, R), (0x3f0000, 4, W)]);
        tq.add_chain(&[(0xffff_0000_0000, 8, W)]);
        let mut h = RngHandler::default();
        let mut c = Chain::default();
        assert!(process_queue(&mut q, &m, &mut c, &mut h).unwrap().notify);
        assert_eq!(tq.used(0), (0, 128));
        assert_eq!(tq.used(1).1, MAX_BYTES_PER_CHAIN as u32);
        assert_eq!(tq.used(2).1, 4);
        assert_eq!(tq.used(3).1, 0);
        let mut a = [0u8; 100];
        m.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        assert!(a.iter().any(|&b| b != 0));
        // Past the cap: untouched.
        let mut tail = [0u8; 16];
        m.read_slice(&mut tail, GuestAddress(0x30000 + MAX_BYTES_PER_CHAIN))
            .unwrap();
        assert_eq!(tail, [0; 16]);
    }

    #[test]
    fn device_serves_and_stops() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 16);
        let q = tq.queue();
        let evt = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let int = Arc::new(CountingInterrupt::default());
        let mut rng = Rng::new();
        rng.ack_features(feature(VIRTIO_F_VERSION_1));
        rng.activate(
            m.clone(),
            int.clone(),
            vec![ActiveQueue {
                index: 0,
                queue: q,
                notifier: evt,
            }],
        )
        .unwrap();
        tq.add_chain(&[(0x10000, 32, W)]);
        kick.write(1).unwrap();
        tq.wait_used(1);
        assert_eq!(rng.queue_states()[0].1.next_used, 1);
        rng.reset();
        assert!(rng.queue_states().is_empty());
        assert!(int.queue.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }
}
