//! virtio-blk: the block device (virtio 1.2 §5.2) on a [`block::DiskBackend`].
//!
//! Requests: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES. Features: VERSION_1, RO (read-only
//! backends), SEG_MAX, BLK_SIZE (512), FLUSH, DISCARD and WRITE_ZEROES (writable backends), MQ
//! (more than one queue), INDIRECT_DESC, EVENT_IDX.
//!
//! One worker thread per queue ([`worker`]) parses requests ([`request`]) and hands them to an
//! I/O engine ([`engine`]: io_uring, a thread pool, or synchronous calls), several in flight and
//! completing in any order, within an optional rate limit shared by the queues ([`limiter`]).
//! The workers count what they complete in the device's [`BlockCounters`].

mod counters;
pub mod engine;
pub mod request;
mod worker;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_engines;

use std::sync::Arc;

use block::DiskBackend;
use guestmem::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use self::engine::threads::{ThreadPool, POOL_THREADS};
use self::engine::EngineSetup;
use self::request::Parser;
use self::worker::{BlockQueue, BlockWorker};
use super::{
    feature, read_config_bytes, ActivateError, ActiveQueue, DeviceSpecificState, VirtioDevice,
    VirtioInterrupt, MAX_QUEUE_SIZE, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::rate_limiter::RateLimiterConfig;
use crate::rate_limiter::SharedLimiter;
pub use counters::{BlockCounters, BlockCountersSnapshot};
pub use engine::{EngineError, EngineKind};
pub use request::BlockHandler;

pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Sector size of the virtio-blk protocol (capacity and request offsets).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Data segments per request (a chain has two more: header and status).
pub const SEG_MAX: u32 = 126;
/// Limits advertised for DISCARD and WRITE_ZEROES.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 4096 / SECTOR_SIZE as u32;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
pub const MAX_WRITE_ZEROES_SEGMENTS: u32 = 16;
/// Most queues a device may have.
pub const MAX_QUEUES: u16 = 64;
/// Length of the configuration space (through `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;

/// Errors building a block device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("{0} queues requested; 1 to {MAX_QUEUES} are possible")]
    NumQueues(u16),
    #[error("queue size {0} must be a power of two from 4 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("serial '{0}' is longer than 20 bytes")]
    SerialTooLong(String),
    #[error("{0}")]
    Engine(String),
    #[error("rate limit: {0}")]
    RateLimit(String),
    #[error("cannot switch the disk: {0}")]
    Replace(String),
}

/// Options of a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOptions {
    /// Returned by GET_ID (Linux: `/sys/block/vdX/serial`), at most 20 bytes.
    pub serial: String,
    /// Number of request queues (`MQ` when more than one).
    pub num_queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
    /// The I/O engine (`Auto`: io_uring for raw files when the kernel allows it, else threads).
    pub engine: EngineKind,
    /// Bandwidth and operations per second, for the whole device.
    pub rate_limit: RateLimiterConfig,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            serial: String::new(),
            num_queues: 1,
            queue_size: MAX_QUEUE_SIZE,
            engine: EngineKind::Auto,
            rate_limit: RateLimiterConfig::default(),
        }
    }
}

/// The block device's own state for snapshots: its serial (guest-visible through GET_ID, so
/// checked on restore), the engine asked for and the rate limit. Capacity, queues and
/// read-only-ness are in the features and the configuration space. Requests in flight are not
/// part of it: a paused device has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub serial: String,
    /// The engine asked for (resolved again on restore: the host may differ).
    #[serde(default)]
    pub engine: EngineKind,
    /// The device's rate limit, taken over by a restored device.
    #[serde(default)]
    pub rate_limit: RateLimiterConfig,
}

/// The block device.
pub struct Block {
    disk: Arc<dyn DiskBackend>,
    id: [u8; ID_BYTES],
    features: u64,
    acked: u64,
    queue_sizes: Vec<u16>,
    config: [u8; CONFIG_LEN],
    /// The engine asked for, and the one serving.
    requested_engine: EngineKind,
    engine: EngineKind,
    rate_limit: RateLimiterConfig,
    limiter: Option<Arc<SharedLimiter>>,
    workers: Vec<BlockWorker>,
    /// The I/O threads of the threads and io_uring engines, while active.
    pool: Option<Arc<ThreadPool>>,
    /// What the queue workers completed, since the device was made.
    counters: Arc<BlockCounters>,
}

impl Block {
    /// A block device on `disk`. Read-only backends get the RO feature and refuse writes.
    pub fn new(disk: Arc<dyn DiskBackend>, opts: BlockOptions) -> Result<Block, BlockError> {
        if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
            return Err(BlockError::NumQueues(opts.num_queues));
        }
        let qs = opts.queue_size;
        if !(4..=MAX_QUEUE_SIZE).contains(&qs) || !qs.is_power_of_two() {
            return Err(BlockError::QueueSize(qs));
        }
        if opts.serial.len() > ID_BYTES {
            return Err(BlockError::SerialTooLong(opts.serial));
        }
        let mut id = [0u8; ID_BYTES];
        id[..opts.serial.len()].copy_from_slice(opts.serial.as_bytes());
        let engine = engine::resolve(opts.engine, &*disk, engine::uring::available())
            .map_err(|e| BlockError::Engine(e.to_string()))?;
        let limiter = SharedLimiter::new(opts.rate_limit)
            .map_err(|e| BlockError::RateLimit(e.to_string()))?;
        tracing::debug!(
            "virtio-blk: {} disk of {} bytes, engine {engine} (asked: {}){}",
            disk.format(),
            disk.size(),
            opts.engine,
            if limiter.is_some() {
                ", rate limited"
            } else {
                ""
            }
        );

        let read_only = disk.read_only();
        let mut features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= feature(VIRTIO_BLK_F_RO);
        } else {
            features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if opts.num_queues > 1 {
            features |= feature(VIRTIO_BLK_F_MQ);
        }
        // A chain must fit the queue: header + data segments + status <= queue size.
        let seg_max = SEG_MAX.min(u32::from(qs) - 2);

        let mut config = [0u8; CONFIG_LEN];
        let mut put =
            |off: usize, bytes: &[u8]| config[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(disk.size() / SECTOR_SIZE).to_le_bytes()); // capacity
        put(12, &seg_max.to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(34, &opts.num_queues.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &MAX_WRITE_ZEROES_SEGMENTS.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap

        Ok(Block {
            disk,
            id,
            features,
            acked: 0,
            queue_sizes: vec![qs; usize::from(opts.num_queues)],
            config,
            requested_engine: opts.engine,
            engine,
            rate_limit: opts.rate_limit,
            limiter,
            workers: Vec::new(),
            pool: None,
            counters: Arc::default(),
        })
    }

    /// The device's counters (requests and bytes by kind, errors), updated by its queue
    /// workers as requests complete; they go on across resets and disk switches.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// The disk served.
    pub fn disk(&self) -> &Arc<dyn DiskBackend> {
        &self.disk
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// The engine serving the disk (never `Auto`).
    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// The engine for one queue; an `auto` io_uring that cannot start falls back to threads.
    fn queue_engine(
        &mut self,
        mem: &GuestMem,
        depth: u16,
    ) -> Result<Box<dyn engine::Engine>, ActivateError> {
        let setup = |kind, pool| EngineSetup {
            kind,
            disk: &self.disk,
            mem,
            pool,
            depth,
        };
        match engine::build(setup(self.engine, self.pool.as_ref())) {
            Ok(e) => Ok(e),
            Err(e)
                if self.engine == EngineKind::IoUring
                    && self.requested_engine == EngineKind::Auto =>
            {
                tracing::warn!("virtio-blk: {e}; using engine=threads");
                self.engine = EngineKind::Threads;
                engine::build(setup(EngineKind::Threads, self.pool.as_ref()))
                    .map_err(|e| ActivateError::Worker(std::io::Error::other(e)))
            }
            Err(e) => Err(ActivateError::Worker(std::io::Error::other(e))),
        }
    }

    /// Switches the device to `disk` (a disk snapshot's new overlay, with the same size and
    /// read-only-ness) while it is paused or inactive: the old disk is flushed first, then each
    /// queue gets an engine on the new one (io_uring falls back to threads when the new disk is
    /// not a raw file). Returns the old disk; on an error nothing changed.
    pub fn replace_disk(
        &mut self,
        disk: Arc<dyn DiskBackend>,
    ) -> Result<Arc<dyn DiskBackend>, BlockError> {
        let bad = |s: String| BlockError::Replace(s);
        if disk.size() != self.disk.size() || disk.read_only() != self.disk.read_only() {
            return Err(bad(format!(
                "the new disk has {} bytes{}, the old one {} bytes{}",
                disk.size(),
                if disk.read_only() { " (read-only)" } else { "" },
                self.disk.size(),
                if self.disk.read_only() {
                    " (read-only)"
                } else {
                    ""
                },
            )));
        }
        if self.workers.iter().any(|w| !w.is_paused()) {
            return Err(bad("the device is running; pause it first".to_string()));
        }
        self.disk.flush().map_err(|e| bad(e.to_string()))?;
        let uring = engine::uring::available();
        let engine = match engine::resolve(self.requested_engine, &*disk, uring) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("virtio-blk: {e}; using engine=threads on the new disk");
                EngineKind::Threads
            }
        };
        // An inactive device makes its pool when it is activated.
        let inactive = self.workers.is_empty() && self.pool.is_none();
        let pool = if inactive || engine == EngineKind::Sync {
            None
        } else {
            Some(
                ThreadPool::new(disk.clone(), POOL_THREADS, "virtio-blk")
                    .map_err(|e| bad(e.to_string()))?,
            )
        };
        // Build every queue's engine before touching any worker.
        let mut engines = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let setup = EngineSetup {
                kind: engine,
                disk: &disk,
                mem: w.mem(),
                pool: pool.as_ref(),
                depth: w.queue_size(),
            };
            engines.push(engine::build(setup).map_err(|e| bad(e.to_string()))?);
        }
        let parser = Parser::new(&*disk, self.acked, self.id);
        for (w, e) in self.workers.iter_mut().zip(engines) {
            // Paused with nothing in flight (checked above, pause drains): cannot fail but for
            // epoll, which would leave that queue on the old disk.
            w.replace_engine(e, parser.clone())
                .map_err(|e| bad(format!("queue {}: {e}", w.index())))?;
        }
        self.pool = pool;
        self.engine = engine;
        tracing::debug!(
            "virtio-blk: switched to a {} disk of {} bytes, engine {engine}",
            disk.format(),
            disk.size()
        );
        Ok(std::mem::replace(&mut self.disk, disk))
    }

    fn serial(&self) -> String {
        let end = self.id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        String::from_utf8_lossy(&self.id[..end]).into_owned()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Nothing is writable without CONFIG_WCE, which is not offered.
        tracing::debug!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if !self.workers.is_empty() {
            return Err(ActivateError::AlreadyActive);
        }
        if !queues.iter().any(|q| q.index == 0) {
            return Err(ActivateError::MissingQueue(0));
        }
        if self.engine != EngineKind::Sync && self.pool.is_none() {
            let pool = ThreadPool::new(self.disk.clone(), POOL_THREADS, "virtio-blk")
                .map_err(ActivateError::Worker)?;
            self.pool = Some(pool);
        }
        let parser = Parser::new(&*self.disk, self.acked, self.id);
        let mut workers = Vec::with_capacity(queues.len());
        for ActiveQueue {
            index,
            queue,
            notifier,
        } in queues
        {
            let engine = self.queue_engine(&mem, virtio_queue::QueueT::size(&queue))?;
            let bq = BlockQueue::new(
                queue,
                mem.clone(),
                parser.clone(),
                engine,
                self.limiter.clone(),
                self.counters.clone(),
            )
            .map_err(ActivateError::Worker)?;
            let name = format!("virtio-blk-q{index}");
            let w = BlockWorker::spawn(name, index, notifier, interrupt.clone(), bq)
                .map_err(|e| ActivateError::Worker(e.into()))?;
            workers.push(w);
        }
        self.workers = workers;
        tracing::debug!(
            "virtio-blk: {} queues active, engine {}",
            self.workers.len(),
            self.engine
        );
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping a worker stops its thread after its requests in flight; then the pool.
        self.workers.clear();
        self.pool = None;
        self.acked = 0;
    }

    fn queue_states(&self) -> Vec<(u16, QueueState)> {
        self.workers
            .iter()
            .map(|w| (w.index(), w.queue_state()))
            .collect()
    }

    fn pause(&mut self) {
        // Each worker stops taking requests and completes those in flight (status and used
        // entry written) before its thread stops; then the pool is idle.
        for w in &mut self.workers {
            w.pause();
        }
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        for w in &mut self.workers {
            w.resume().map_err(|e| ActivateError::Worker(e.into()))?;
        }
        Ok(())
    }

    fn as_block_mut(&mut self) -> Option<&mut Block> {
        Some(self)
    }

    fn device_state(&self) -> DeviceSpecificState {
        DeviceSpecificState::Block(BlockState {
            serial: self.serial(),
            engine: self.requested_engine,
            rate_limit: self.rate_limit,
        })
    }

    fn restore_device_state(&mut self, state: &DeviceSpecificState) -> Result<(), ActivateError> {
        match state {
            DeviceSpecificState::Block(b) if b.serial == self.serial() => {
                if b.engine != self.requested_engine {
                    tracing::info!(
                        "virtio-blk: engine {} saved, {} asked now; keeping {}",
                        b.engine,
                        self.requested_engine,
                        self.engine
                    );
                }
                if b.rate_limit != self.rate_limit {
                    self.limiter = SharedLimiter::new(b.rate_limit)
                        .map_err(|e| ActivateError::StateMismatch(format!("rate limit: {e}")))?;
                    self.rate_limit = b.rate_limit;
                }
                Ok(())
            }
            DeviceSpecificState::Block(b) => Err(ActivateError::StateMismatch(format!(
                "disk serial '{}' saved, '{}' now",
                b.serial,
                self.serial()
            ))),
            other => Err(ActivateError::StateMismatch(format!(
                "block device state expected, {other:?} saved"
            ))),
        }
    }
}
