//! The I/O engine behind the block device's requests.
//!
//! Requests reach the disk through [`IoEngine`], so that an asynchronous engine (io_uring,
//! completing requests out of order through an eventfd) can replace [`SyncEngine`] later without
//! touching the request parser. The synchronous engine calls the [`DiskBackend`] directly.

use std::sync::Arc;

use block::DiskBackend;

/// How a queue's requests reach the disk. One engine per queue worker.
pub(crate) trait IoEngine: Send {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> block::Result<()>;
    fn write(&mut self, buf: &[u8], offset: u64) -> block::Result<()>;
    fn flush(&mut self) -> block::Result<()>;
    fn discard(&mut self, offset: u64, len: u64) -> block::Result<()>;
    fn write_zeroes(&mut self, offset: u64, len: u64) -> block::Result<()>;
}

/// Blocking calls into the backend, on the queue's worker thread.
pub(crate) struct SyncEngine {
    disk: Arc<dyn DiskBackend>,
}

impl SyncEngine {
    pub(crate) fn new(disk: Arc<dyn DiskBackend>) -> Self {
        SyncEngine { disk }
    }
}

impl IoEngine for SyncEngine {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> block::Result<()> {
        self.disk.read_at(buf, offset)
    }
    fn write(&mut self, buf: &[u8], offset: u64) -> block::Result<()> {
        self.disk.write_at(buf, offset)
    }
    fn flush(&mut self) -> block::Result<()> {
        self.disk.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> block::Result<()> {
        self.disk.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> block::Result<()> {
        self.disk.write_zeroes(offset, len)
    }
}
