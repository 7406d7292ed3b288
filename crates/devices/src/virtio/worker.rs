//! Queue worker threads: one thread serves one queue, woken by the queue's notification eventfd
//! and stopped through an exit eventfd (on device reset or drop).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{process_queue, Chain, ChainHandler};
use super::{ActiveQueue, VirtioInterrupt, VirtioInterruptType};
use crate::bus::lock;

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("epoll: {0}")]
    Epoll(#[source] io::Error),
    #[error("spawning thread: {0}")]
    Spawn(#[source] io::Error),
}

impl From<WorkerError> for io::Error {
    fn from(e: WorkerError) -> io::Error {
        match e {
            WorkerError::EventFd(e) | WorkerError::Epoll(e) | WorkerError::Spawn(e) => e,
        }
    }
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_EXIT: u64 = 1;

/// A running queue worker. Dropping it stops the thread.
pub struct QueueWorker {
    index: u16,
    queue: Arc<Mutex<Queue>>,
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl QueueWorker {
    /// Serve `active` with `handler` on a new thread named `name`. Available chains are served
    /// once at start (the driver may have queued some before the thread existed, or a restored
    /// queue may hold some), then after every notification.
    pub fn spawn<H: ChainHandler + Send + 'static>(
        name: String,
        active: ActiveQueue,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut handler: H,
    ) -> Result<QueueWorker, WorkerError> {
        let exit = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::EventFd)?;
        let exit_thread = exit.try_clone().map_err(WorkerError::EventFd)?;
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        for (fd, token) in [
            (active.notifier.as_raw_fd(), TOKEN_QUEUE),
            (exit_thread.as_raw_fd(), TOKEN_EXIT),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(WorkerError::Epoll)?;
        }
        let index = active.index;
        let queue = Arc::new(Mutex::new(active.queue));
        let shared = queue.clone();
        let notifier = active.notifier;
        let self_kick = notifier.try_clone().map_err(WorkerError::EventFd)?;
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _keep = exit_thread;
                let mut chain = Chain::default();
                let mut broken = false;
                let mut serve = |broken: &mut bool| {
                    if *broken {
                        return;
                    }
                    let mut q = lock(&shared);
                    match process_queue(&mut q, &mem, &mut chain, &mut handler) {
                        Ok(p) => {
                            if p.notify {
                                if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(index))
                                {
                                    tracing::warn!("virtio queue {index}: interrupt: {e}");
                                }
                            }
                            if p.pending {
                                // More to do: come back through epoll, so that a stop request
                                // is seen between two passes.
                                let _ = self_kick.write(1);
                            }
                        }
                        Err(e) => {
                            tracing::warn!("virtio queue {index}: {e}; device needs a reset");
                            *broken = true;
                            interrupt.set_needs_reset();
                        }
                    }
                };
                serve(&mut broken);
                let mut events = [EpollEvent::default(); 2];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!("virtio queue {index}: epoll: {e}; worker stops");
                            return;
                        }
                    };
                    if events[..n].iter().any(|ev| ev.data() == TOKEN_EXIT) {
                        return;
                    }
                    // A non-blocking read: it only clears the counter.
                    let _ = notifier.read();
                    serve(&mut broken);
                }
            })
            .map_err(WorkerError::Spawn)?;
        Ok(QueueWorker {
            index,
            queue,
            exit,
            thread: Some(thread),
        })
    }

    /// Index of the queue served.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue's state, taken between two processing passes.
    pub fn queue_state(&self) -> virtio_queue::QueueState {
        lock(&self.queue).state()
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            if let Err(e) = self.exit.write(1) {
                tracing::error!("virtio queue {}: cannot stop worker: {e}", self.index);
                return;
            }
            if t.join().is_err() {
                tracing::error!("virtio queue {}: worker panicked", self.index);
            }
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop();
    }
}
