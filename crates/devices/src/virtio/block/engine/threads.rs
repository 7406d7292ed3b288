//! The thread-pool engine (`engine=threads`): a few threads per device run the blocking
//! [`DiskBackend`] calls of every queue and post completions to the submitting queue's
//! [`Sink`]. Used when io_uring is unavailable and for backends without a plain file (qcow2
//! through imago), and by the io_uring engine for what io_uring cannot take directly.
//!
//! Memory stays bounded: each thread has one bounce buffer, and a queue never has more jobs
//! queued or running than it has in-flight slots (its size).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use block::DiskBackend;
use guestmem::GuestMem;

use super::{execute_blocking, Bounce, Completion, Engine, Op, Sink};
use crate::bus::lock;
use crate::virtio::block::request::RequestError;

/// Threads of a device's pool.
pub(crate) const POOL_THREADS: usize = 4;

/// One operation for the pool.
pub(crate) struct Job {
    pub token: usize,
    pub op: Op,
    pub mem: GuestMem,
    pub sink: Arc<Sink>,
}

/// The device's I/O threads. Dropping the last handle lets the threads finish the queued jobs
/// and joins them.
pub(crate) struct ThreadPool {
    tx: Mutex<Option<Sender<Job>>>,
    threads: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    pub(crate) fn new(
        disk: Arc<dyn DiskBackend>,
        threads: usize,
        name: &str,
    ) -> io::Result<Arc<ThreadPool>> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = ThreadPool {
            tx: Mutex::new(Some(tx)),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads.max(1) {
            let (rx, disk) = (rx.clone(), disk.clone());
            let t = jail::seccomp::spawn(
                jail::seccomp::ThreadClass::BlockIo,
                format!("{name}-io{i}"),
                move || serve(&rx, &*disk),
            )?;
            pool.threads.push(t);
        }
        Ok(Arc::new(pool))
    }

    /// Queue `job`; it completes through its sink (at once, with an error, if the pool is
    /// shutting down).
    pub(crate) fn run(&self, job: Job) {
        let job = match lock(&self.tx).as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => job,
        };
        job.sink.post(Completion {
            token: job.token,
            result: Err(RequestError::Io(io::Error::other("I/O threads stopped"))),
        });
    }
}

fn serve(rx: &Mutex<Receiver<Job>>, disk: &dyn DiskBackend) {
    let mut bounce = Bounce::default();
    loop {
        // The lock is held only while waiting for the next job.
        let job = match lock(rx).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let result = execute_blocking(disk, &job.mem, &job.op, &mut bounce);
        job.sink.post(Completion {
            token: job.token,
            result,
        });
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        lock(&self.tx).take();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("virtio-blk: an I/O thread panicked");
            }
        }
    }
}

/// A queue's handle on the pool.
pub(crate) struct ThreadsEngine {
    pool: Arc<ThreadPool>,
    sink: Arc<Sink>,
    mem: GuestMem,
}

impl ThreadsEngine {
    pub(crate) fn new(pool: Arc<ThreadPool>, mem: GuestMem) -> io::Result<Self> {
        Ok(ThreadsEngine {
            pool,
            sink: Sink::new()?,
            mem,
        })
    }
}

impl Engine for ThreadsEngine {
    fn submit(&mut self, token: usize, op: Op) {
        self.pool.run(Job {
            token,
            op,
            mem: self.mem.clone(),
            sink: self.sink.clone(),
        });
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.sink.eventfd().as_raw_fd())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.sink.drain(out);
    }
}
