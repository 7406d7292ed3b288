//! The I/O engines behind the block device's requests.
//!
//! The request parser turns a chain into an [`Op`] (guest buffers and disk offsets, already
//! checked); the queue worker hands it to its queue's [`Engine`] under a token (a slot of the
//! queue's in-flight table) and later collects [`Completion`]s, in any order, writing each
//! request's status byte and used-ring entry when its completion arrives.
//!
//! - [`sync::SyncEngine`]: blocking calls into the [`DiskBackend`] on the worker thread, through
//!   a bounce buffer, one request at a time.
//! - [`threads::ThreadsEngine`]: the same calls on a small pool of threads shared by the
//!   device's queues; completions come back through an eventfd the worker polls.
//! - [`uring::UringEngine`]: raw files through io_uring, with iovecs over the guest's buffers
//!   (no copy), several requests in flight; completions through an eventfd registered with the
//!   ring. What io_uring cannot take directly (discard, write-zeroes, buffers that `O_DIRECT`
//!   cannot use) goes to the thread pool.

pub(crate) mod ring;
pub(crate) mod sync;
pub(crate) mod threads;
pub(crate) mod uring;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use block::{AlignedBuf, DiskBackend};
use guestmem::GuestMem;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::RequestError;
use crate::bus::lock;
use crate::virtio::queue::{Cursor, Segment};

/// Size of the bounce buffer a blocking engine moves data through (per thread).
pub(crate) const BOUNCE_LEN: usize = 256 * 1024;
/// Alignment of bounce buffers: enough for `O_DIRECT` on any file.
pub(crate) const BOUNCE_ALIGN: usize = 4096;

pub use spec::vm::EngineKind;

/// Errors choosing or starting an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine=io_uring needs a raw image without a backing file (this disk is {0}; use engine=threads or sync)")]
    NotRaw(block::Format),
    #[error("engine=io_uring: io_uring is unavailable: {0}")]
    Unavailable(String),
    #[error("cannot start the I/O engine: {0}")]
    Io(#[from] std::io::Error),
}

/// The engine that serves `disk` when `requested` is asked for; `uring` says whether io_uring
/// works on this host (see [`uring::available`]).
pub fn resolve(
    requested: EngineKind,
    disk: &dyn DiskBackend,
    uring: Result<(), String>,
) -> Result<EngineKind, EngineError> {
    let raw = disk.raw_file().is_some();
    match requested {
        EngineKind::Auto if raw && uring.is_ok() => Ok(EngineKind::IoUring),
        EngineKind::Auto => Ok(EngineKind::Threads),
        EngineKind::IoUring if !raw => Err(EngineError::NotRaw(disk.format())),
        EngineKind::IoUring => uring
            .map(|()| EngineKind::IoUring)
            .map_err(EngineError::Unavailable),
        other => Ok(other),
    }
}

/// A request's data: `len` bytes at disk offset `offset`, in the guest buffers `bufs` (exactly
/// `len` bytes in all, the status byte excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Data {
    pub offset: u64,
    pub len: u64,
    pub bufs: Vec<Segment>,
}

/// What a request asks of the disk, checked against the disk and guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Read(Data),
    Write(Data),
    /// A write completed only once it is on stable storage: the driver did not negotiate
    /// FLUSH, so it cannot ask for that later (the device is write-through for it).
    WriteThrough(Data),
    Flush,
    /// Byte ranges (offset, length).
    Discard(Vec<(u64, u64)>),
    WriteZeroes(Vec<(u64, u64)>),
}

impl Op {
    /// Bytes the request moves, for bandwidth limits.
    pub fn bytes(&self) -> u64 {
        match self {
            Op::Read(d) | Op::Write(d) | Op::WriteThrough(d) => d.len,
            _ => 0,
        }
    }
}

/// A finished operation.
#[derive(Debug)]
pub(crate) struct Completion {
    pub token: usize,
    pub result: Result<(), RequestError>,
}

/// How a queue's requests reach the disk. One engine per queue worker.
pub(crate) trait Engine: Send {
    /// Start `op`; its completion is returned by a later [`Engine::reap`] under `token`.
    fn submit(&mut self, token: usize, op: Op);
    /// Hand the operations submitted so far to the kernel (io_uring batches them).
    fn flush_submissions(&mut self) {}
    /// Readable when completions are ready; `None` if every operation is complete as soon as
    /// it is submitted.
    fn completion_fd(&self) -> Option<RawFd>;
    /// Append the operations that finished to `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
}

/// Completions posted by other threads (the pool), with an eventfd to wake the queue worker.
pub(crate) struct Sink {
    eventfd: EventFd,
    done: Mutex<Vec<Completion>>,
}

impl Sink {
    pub fn new() -> std::io::Result<Arc<Sink>> {
        Ok(Arc::new(Sink {
            eventfd: EventFd::new(EFD_NONBLOCK)?,
            done: Mutex::new(Vec::new()),
        }))
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    pub fn post(&self, c: Completion) {
        lock(&self.done).push(c);
        if let Err(e) = self.eventfd.write(1) {
            tracing::error!("virtio-blk: cannot signal a completion: {e}");
        }
    }

    /// Clear the eventfd, then take what was posted (a completion posted in between is taken
    /// now and leaves the eventfd set: a spurious wake-up, never a lost one).
    pub fn drain(&self, out: &mut Vec<Completion>) {
        let _ = self.eventfd.read();
        out.append(&mut lock(&self.done));
    }
}

/// Wait until `fd` is readable or `timeout` has passed (for draining; not on the fast path).
pub(crate) fn wait_readable(fd: RawFd, timeout: std::time::Duration) {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let waited = Epoll::new().and_then(|ep| {
        ep.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))?;
        ep.wait(ms, &mut [EpollEvent::default()])
    });
    if waited.is_err() {
        std::thread::sleep(timeout.min(std::time::Duration::from_millis(1)));
    }
}

/// A bounce buffer for blocking engines, allocated on first use.
#[derive(Default)]
pub(crate) struct Bounce(Option<AlignedBuf>);

impl Bounce {
    fn get(&mut self, n: usize) -> &mut [u8] {
        let b = self
            .0
            .get_or_insert_with(|| AlignedBuf::new(BOUNCE_LEN, BOUNCE_ALIGN));
        &mut b.as_mut_slice()[..n]
    }
}

/// Run `op` with blocking calls into `disk`, moving data between guest memory and the disk
/// through `bounce` in pieces of [`BOUNCE_LEN`].
pub(crate) fn execute_blocking(
    disk: &dyn DiskBackend,
    mem: &GuestMem,
    op: &Op,
    bounce: &mut Bounce,
) -> Result<(), RequestError> {
    match op {
        Op::Read(d) => {
            let mut out = Cursor::new(d.bufs.iter(), d.len);
            let (mut off, mut left) = (d.offset, d.len);
            while left > 0 {
                let n = left.min(BOUNCE_LEN as u64) as usize;
                let b = bounce.get(n);
                disk.read_at(b, off)?;
                out.write(mem, b)?;
                off += n as u64;
                left -= n as u64;
            }
        }
        Op::Write(d) | Op::WriteThrough(d) => {
            let mut input = Cursor::new(d.bufs.iter(), d.len);
            let (mut off, mut left) = (d.offset, d.len);
            while left > 0 {
                let n = left.min(BOUNCE_LEN as u64) as usize;
                let b = bounce.get(n);
                input.read(mem, b)?;
                disk.write_at(b, off)?;
                off += n as u64;
                left -= n as u64;
            }
            if matches!(op, Op::WriteThrough(_)) {
                disk.flush()?;
            }
        }
        Op::Flush => disk.flush()?,
        Op::Discard(ranges) => {
            for &(off, len) in ranges {
                disk.discard(off, len)?;
            }
        }
        Op::WriteZeroes(ranges) => {
            for &(off, len) in ranges {
                // The backend deallocates where cheap whether or not UNMAP was set: the range
                // reads as zeroes either way, which is all WRITE_ZEROES promises.
                disk.write_zeroes(off, len)?;
            }
        }
    }
    Ok(())
}

/// Everything a queue's engine is built from.
pub(crate) struct EngineSetup<'a> {
    pub kind: EngineKind,
    pub disk: &'a Arc<dyn DiskBackend>,
    pub mem: &'a GuestMem,
    /// The device's thread pool (threads and io_uring engines).
    pub pool: Option<&'a Arc<threads::ThreadPool>>,
    /// Most requests in flight (the queue size).
    pub depth: u16,
}

/// Build the engine `setup.kind` (already resolved: not `Auto`).
pub(crate) fn build(setup: EngineSetup) -> Result<Box<dyn Engine>, EngineError> {
    let pool = || {
        setup
            .pool
            .cloned()
            .ok_or_else(|| EngineError::Io(std::io::Error::other("the device has no thread pool")))
    };
    Ok(match setup.kind {
        EngineKind::Sync | EngineKind::Auto => {
            Box::new(sync::SyncEngine::new(setup.disk.clone(), setup.mem.clone()))
        }
        EngineKind::Threads => Box::new(threads::ThreadsEngine::new(pool()?, setup.mem.clone())?),
        EngineKind::IoUring => {
            let file = setup
                .disk
                .raw_file()
                .ok_or(EngineError::NotRaw(setup.disk.format()))?;
            Box::new(uring::UringEngine::new(
                file,
                setup.mem.clone(),
                pool()?,
                setup.depth,
            )?)
        }
    })
}
