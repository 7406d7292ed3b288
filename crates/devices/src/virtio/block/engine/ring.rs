//! One queue's io_uring: the only `unsafe` of the block device.
//!
//! Submitting a read or write hands the kernel raw addresses: the iovec array and, through it,
//! the guest's buffers. Both must stay valid until the operation's completion is reaped. The
//! [`Ring`] guarantees it by owning everything the kernel may touch:
//!
//! - the guest memory: `Ring::mem` is a clone of the guest memory (an `Arc` on its mappings),
//!   so the mappings the iovecs point into cannot be unmapped while the ring lives, and
//!   [`Ring::drop`] waits for every operation in flight before that clone goes (or, if they do
//!   not finish in time, leaks a clone so that the mappings stay forever);
//! - the iovec arrays: each operation's array is a `Vec` stored in its slot of `Ring::ops`
//!   from submission until its completion is reaped, never resized meanwhile (a short transfer
//!   is resubmitted only after the kernel is done with the previous submission), and leaked
//!   with the memory if the drop times out;
//! - the file: `Ring::file` is closed only after the operations are done (and the kernel holds
//!   its own reference to the open file from submission on anyway).
//!
//! Iovecs are built only here, from `Ring::mem` ([`Ring::iovecs`]), so no caller can make the
//! kernel write anywhere but guest memory. The device never reads or writes a request's data
//! buffers itself until that request completes; the guest may, which is its own business and
//! no concern of Rust's aliasing rules: no Rust reference to guest memory is ever made, only
//! raw addresses.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use guestmem::GuestMem;
use io_uring::{opcode, register::Restriction, types, IoUring};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::queue::Segment;

/// How long dropping a ring waits for its operations in flight.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most iovecs in one operation (`IOV_MAX`).
const IOV_MAX: usize = 1024;

/// `struct iovec`, with the address as an integer so that it can cross threads.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IoVec {
    base: usize,
    len: usize,
}

// The kernel reads arrays of `IoVec` as arrays of `struct iovec`.
const _: () = assert!(
    std::mem::size_of::<IoVec>() == std::mem::size_of::<libc::iovec>()
        && std::mem::align_of::<IoVec>() == std::mem::align_of::<libc::iovec>()
);

/// Host buffers over guest memory, made by [`Ring::iovecs`].
pub(crate) struct Iovecs {
    v: Vec<IoVec>,
    len: u64,
    /// The same buffers as guest ranges: a read marks them dirty when it completes (the
    /// kernel writes them behind vm-memory's back).
    guest: Vec<(GuestAddress, u64)>,
}

impl Iovecs {
    /// Whether every buffer's address and length is a multiple of `align` (for `O_DIRECT`).
    pub(crate) fn aligned(&self, align: u64) -> bool {
        let mask = align.max(1) as usize - 1;
        self.v.iter().all(|i| (i.base | i.len) & mask == 0)
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Fsync,
}

/// An operation in flight.
struct RingOp {
    kind: Kind,
    iovecs: Vec<IoVec>,
    guest: Vec<(GuestAddress, u64)>,
    /// First iovec not yet transferred.
    first: usize,
    offset: u64,
    remaining: u64,
}

impl RingOp {
    /// Account for `n` bytes transferred (a short read or write).
    fn advance(&mut self, mut n: usize) {
        self.offset += n as u64;
        self.remaining -= n as u64;
        while n > 0 && self.first < self.iovecs.len() {
            let iov = &mut self.iovecs[self.first];
            if n >= iov.len {
                n -= iov.len;
                self.first += 1;
            } else {
                iov.base += n;
                iov.len -= n;
                n = 0;
            }
        }
    }
}

/// A queue's io_uring on one file, with room for `depth` operations in flight.
pub(crate) struct Ring {
    uring: IoUring,
    file: File,
    mem: GuestMem,
    /// The eventfd registered with the ring (a clone), to wait on when dropping.
    wake: EventFd,
    ops: Vec<Option<RingOp>>,
    in_flight: usize,
    cqes: Vec<(u64, i32)>,
}

impl Ring {
    /// A ring on `file` for buffers in `mem`; completions signal `wake`.
    pub(crate) fn new(file: File, mem: GuestMem, depth: u16, wake: &EventFd) -> io::Result<Ring> {
        let depth = depth.max(1);
        // One submission entry per operation in flight is enough: an operation has at most
        // one submission outstanding. The completion queue is twice as large.
        // io_uring's operations bypass seccomp: the ring starts disabled and may only ever
        // carry the three operations this engine submits (no opens, sockets or the like),
        // with no further registrations once enabled.
        let uring = IoUring::builder()
            .setup_r_disabled()
            .build(u32::from(depth).next_power_of_two())?;
        let submitter = uring.submitter();
        submitter.register_eventfd(wake.as_raw_fd())?;
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
        ])?;
        submitter.register_enable_rings()?;
        Ok(Ring {
            uring,
            file,
            mem,
            wake: wake.try_clone()?,
            ops: (0..depth).map(|_| None).collect(),
            in_flight: 0,
            cqes: Vec::new(),
        })
    }

    /// Operations submitted and not yet reaped.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Host iovecs over the guest buffers `bufs` (split where guest memory is not contiguous
    /// on the host); `None` if a buffer is not in guest memory or there are too many pieces.
    pub(crate) fn iovecs(&self, bufs: &[Segment]) -> Option<Iovecs> {
        let mut v = Vec::with_capacity(bufs.len());
        let mut len = 0u64;
        let mut guest = Vec::with_capacity(bufs.len());
        for s in bufs.iter().filter(|s| s.len > 0) {
            guest.push((s.addr, u64::from(s.len)));
            for slice in self.mem.get_slices(s.addr, s.len as usize) {
                let guard = slice.ok()?.ptr_guard_mut();
                v.push(IoVec {
                    base: guard.as_ptr() as usize,
                    len: guard.len(),
                });
                len += guard.len() as u64;
            }
        }
        (v.len() <= IOV_MAX).then_some(Iovecs { v, len, guest })
    }

    /// Read `iov.len()` bytes at `offset` into the guest buffers of `iov`.
    pub(crate) fn readv(&mut self, token: usize, iov: Iovecs, offset: u64) -> io::Result<()> {
        self.start(token, Kind::Read, iov, offset)
    }

    /// Write the guest buffers of `iov` at `offset`.
    pub(crate) fn writev(&mut self, token: usize, iov: Iovecs, offset: u64) -> io::Result<()> {
        self.start(token, Kind::Write, iov, offset)
    }

    /// `fdatasync` the file.
    pub(crate) fn fsync(&mut self, token: usize) -> io::Result<()> {
        let none = Iovecs {
            v: Vec::new(),
            len: 0,
            guest: Vec::new(),
        };
        self.start(token, Kind::Fsync, none, 0)
    }

    fn start(&mut self, token: usize, kind: Kind, iov: Iovecs, offset: u64) -> io::Result<()> {
        let slot = self
            .ops
            .get_mut(token)
            .ok_or_else(|| io::Error::other(format!("token {token} beyond the ring's depth")))?;
        if slot.is_some() {
            return Err(io::Error::other(format!("token {token} already in flight")));
        }
        *slot = Some(RingOp {
            kind,
            iovecs: iov.v,
            guest: iov.guest,
            first: 0,
            offset,
            remaining: iov.len,
        });
        if let Err(e) = self.push(token) {
            self.ops[token] = None;
            return Err(e);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Queue the submission entry for the operation in slot `token`.
    fn push(&mut self, token: usize) -> io::Result<()> {
        let op = self
            .ops
            .get(token)
            .and_then(Option::as_ref)
            .ok_or_else(|| io::Error::other("no operation to submit"))?;
        let fd = types::Fd(self.file.as_raw_fd());
        let rest = &op.iovecs[op.first.min(op.iovecs.len())..];
        let entry = match op.kind {
            Kind::Read => {
                opcode::Readv::new(fd, rest.as_ptr().cast::<libc::iovec>(), rest.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            Kind::Write => {
                opcode::Writev::new(fd, rest.as_ptr().cast::<libc::iovec>(), rest.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            Kind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(token as u64);
        // SAFETY: the entry points at (1) `rest`, the iovec array of this operation, which
        // stays in `self.ops[token]`, unmoved and unchanged, until the completion of this
        // submission is reaped (or is leaked with the memory if the ring is dropped first);
        // (2) through it, guest memory: every iovec was built by `Ring::iovecs` from
        // `self.mem`, whose mappings live at least as long as this ring and, if an operation
        // outlives the drain in `Drop`, forever; (3) `self.file`'s descriptor, open for the
        // ring's whole life. Nothing of the device reads or writes those buffers until the
        // completion arrives.
        unsafe { self.uring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Hand the queued entries to the kernel.
    pub(crate) fn submit(&mut self) {
        for _ in 0..3 {
            if self.uring.submission().is_empty() {
                return;
            }
            match self.uring.submit() {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    std::thread::yield_now();
                }
                Err(e) => {
                    tracing::error!("virtio-blk: io_uring submit: {e}");
                    return;
                }
            }
        }
    }

    /// Collect finished operations into `out` as (token, result). Short transfers are
    /// resubmitted for the rest and reported only when complete.
    pub(crate) fn reap(&mut self, out: &mut Vec<(usize, io::Result<()>)>) {
        self.cqes.clear();
        self.cqes
            .extend(self.uring.completion().map(|c| (c.user_data(), c.result())));
        let mut resubmitted = false;
        for i in 0..self.cqes.len() {
            let (user_data, res) = self.cqes[i];
            let token = user_data as usize;
            let Some(op) = self.ops.get_mut(token).and_then(Option::as_mut) else {
                tracing::warn!("virtio-blk: io_uring completion for unknown token {token}");
                continue;
            };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if op.kind != Kind::Fsync && (res as u64) < op.remaining {
                if res == 0 {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("no progress at offset {:#x}", op.offset),
                    ))
                } else {
                    op.advance(res as usize);
                    match self.push(token) {
                        Ok(()) => {
                            resubmitted = true;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
            } else {
                Ok(())
            };
            if let Some(op) = self.ops[token].take() {
                if op.kind == Kind::Read {
                    // Whatever the kernel wrote (all of it, or part before an error) is in
                    // guest memory now: log it for dirty tracking.
                    for &(addr, len) in &op.guest {
                        guestmem::mark_dirty(&self.mem, addr, len);
                    }
                }
            }
            self.in_flight -= 1;
            out.push((token, result));
        }
        if resubmitted {
            self.submit();
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut done = Vec::new();
        while self.in_flight > 0 {
            self.submit();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            super::wait_readable(self.wake.as_raw_fd(), left.min(Duration::from_millis(100)));
            let _ = self.wake.read();
            self.reap(&mut done);
            done.clear();
        }
        if self.in_flight > 0 {
            tracing::error!(
                "virtio-blk: {} io_uring operations still in flight after {:?}; keeping their \
                 buffers and guest memory mapped",
                self.in_flight,
                DRAIN_TIMEOUT
            );
            std::mem::forget(self.mem.clone());
            std::mem::forget(std::mem::take(&mut self.ops));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// The ring refuses any operation but the engine's three: a `Nop` (or an `openat`, which
    /// would bypass a seccomp filter) completes with EACCES.
    #[test]
    fn the_ring_carries_only_the_engines_operations() {
        if super::super::uring::available().is_err() {
            eprintln!("skipped: io_uring unavailable here");
            return;
        }
        let file = tempfile::tempfile().unwrap();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ring = Ring::new(file, mem, 4, &wake).unwrap();
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a Nop references no memory.
        unsafe { ring.uring.submission().push(&nop).unwrap() };
        ring.uring.submit_and_wait(1).unwrap();
        let cqe = ring.uring.completion().next().unwrap();
        assert_eq!((cqe.user_data(), cqe.result()), (7, -libc::EACCES));
        // Nothing more may be registered once the ring runs.
        assert!(ring
            .uring
            .submitter()
            .register_probe(&mut io_uring::Probe::new())
            .is_err());
    }
}
