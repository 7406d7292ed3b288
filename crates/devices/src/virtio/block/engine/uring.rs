//! The io_uring engine (`engine=io_uring`) for raw files.
//!
//! Reads and writes go between the file and the guest's buffers through iovecs (no copy),
//! FLUSH is an `fdatasync`, several requests are in flight at once and complete in any order.
//! One eventfd signals both the ring's completions (registered with the ring) and those of the
//! device's thread pool, which takes what io_uring cannot: DISCARD and WRITE_ZEROES (hole
//! punching with a fallback to writing zeroes), and, with `O_DIRECT`, requests whose buffers,
//! offset or length are not aligned (the pool copies them through an aligned bounce buffer).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, OnceLock};

use guestmem::GuestMem;
use io_uring::{opcode, IoUring, Probe};

use super::ring::Ring;
use super::threads::{Job, ThreadPool};
use super::{Completion, Data, Engine, Op, Sink};
use crate::virtio::block::request::RequestError;

/// Whether io_uring can serve disks on this host: `Err` says why not (checked once).
pub fn available() -> Result<(), String> {
    static PROBED: OnceLock<Result<(), String>> = OnceLock::new();
    PROBED.get_or_init(probe).clone()
}

fn describe(e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (ENOSYS)".into(),
        Some(libc::EPERM) => {
            "not permitted (EPERM: kernel.io_uring_disabled, or a seccomp filter)".into()
        }
        _ => e.to_string(),
    }
}

fn probe() -> Result<(), String> {
    let ring = IoUring::new(4).map_err(describe)?;
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p).map_err(describe)?;
    for (code, name) in [
        (opcode::Readv::CODE, "readv"),
        (opcode::Writev::CODE, "writev"),
        (opcode::Fsync::CODE, "fsync"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("the kernel's io_uring has no {name}"));
        }
    }
    Ok(())
}

pub(crate) struct UringEngine {
    ring: Ring,
    /// `O_DIRECT` alignment, if the file was opened with it.
    direct: Option<u64>,
    /// Whether FLUSH reaches the file (not with `cache=unsafe`).
    flush: bool,
    pool: Arc<ThreadPool>,
    sink: Arc<Sink>,
    mem: GuestMem,
    /// Operations finished at submission (no I/O needed, or refused).
    ready: Vec<Completion>,
    reaped: Vec<(usize, io::Result<()>)>,
    /// Operations handed to the pool.
    pooled: u64,
}

impl UringEngine {
    pub(crate) fn new(
        file: block::RawFile,
        mem: GuestMem,
        pool: Arc<ThreadPool>,
        depth: u16,
    ) -> io::Result<Self> {
        let sink = Sink::new()?;
        let ring = Ring::new(file.file, mem.clone(), depth, sink.eventfd())?;
        Ok(UringEngine {
            ring,
            direct: file.direct.then_some(file.align),
            flush: file.flush,
            pool,
            sink,
            mem,
            ready: Vec::new(),
            reaped: Vec::new(),
            pooled: 0,
        })
    }

    /// Operations handed to the thread pool so far.
    #[cfg(test)]
    pub(crate) fn pooled(&self) -> u64 {
        self.pooled
    }

    /// Operations on the ring, submitted and not yet reaped.
    #[cfg(test)]
    pub(crate) fn ring_in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Start a read or write on the ring if its buffers allow it; gives `data` back otherwise.
    fn try_ring(&mut self, token: usize, write: bool, data: Data) -> Result<(), Data> {
        let Some(iov) = self.ring.iovecs(&data.bufs) else {
            return Err(data);
        };
        if iov.len() != data.len {
            return Err(data);
        }
        if let Some(align) = self.direct {
            if !(data.offset | data.len).is_multiple_of(align) || !iov.aligned(align) {
                return Err(data);
            }
        }
        let started = if write {
            self.ring.writev(token, iov, data.offset)
        } else {
            self.ring.readv(token, iov, data.offset)
        };
        if let Err(e) = started {
            self.ready.push(Completion {
                token,
                result: Err(RequestError::Io(e)),
            });
        }
        Ok(())
    }

    fn send_to_pool(&mut self, token: usize, op: Op) {
        self.pooled += 1;
        self.pool.run(Job {
            token,
            op,
            mem: self.mem.clone(),
            sink: self.sink.clone(),
        });
    }
}

impl Engine for UringEngine {
    fn submit(&mut self, token: usize, op: Op) {
        match op {
            Op::Read(d) | Op::Write(d) if d.len == 0 => self.ready.push(Completion {
                token,
                result: Ok(()),
            }),
            Op::Read(d) => {
                if let Err(d) = self.try_ring(token, false, d) {
                    self.send_to_pool(token, Op::Read(d));
                }
            }
            Op::Write(d) => {
                if let Err(d) = self.try_ring(token, true, d) {
                    self.send_to_pool(token, Op::Write(d));
                }
            }
            Op::Flush if !self.flush => self.ready.push(Completion {
                token,
                result: Ok(()),
            }),
            Op::Flush => {
                if let Err(e) = self.ring.fsync(token) {
                    self.ready.push(Completion {
                        token,
                        result: Err(RequestError::Io(e)),
                    });
                }
            }
            // Write-through is bound by the flush: the pool's blocking write + fsync.
            op @ (Op::Discard(_) | Op::WriteZeroes(_) | Op::WriteThrough(_)) => {
                self.send_to_pool(token, op)
            }
        }
    }

    fn flush_submissions(&mut self) {
        self.ring.submit();
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.sink.eventfd().as_raw_fd())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Clears the shared eventfd before looking at either source.
        self.sink.drain(out);
        if self.ring.in_flight() > 0 {
            self.ring.reap(&mut self.reaped);
            out.extend(self.reaped.drain(..).map(|(token, r)| Completion {
                token,
                result: r.map_err(RequestError::Io),
            }));
        }
        out.append(&mut self.ready);
    }
}
