//! Device threads that can be paused: [`DeviceThread`] runs a [`WorkerLoop`] (the state a
//! device's thread owns) and hands that state back when it stops, so the same thread can be
//! started again where it left off; [`QueueWorker`] is the common case, one thread serving one
//! queue with a [`ChainHandler`], woken by the queue's notification eventfd.
//!
//! A stop (for a pause, a reset or a drop) sets a flag and signals an eventfd ([`StopSignal`]):
//! the loop finishes the request it is on (passes check the flag between chains, see
//! [`process_queue_until`]), then returns from [`WorkerLoop::run`] the next time it looks at its
//! events.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use guestmem::GuestMem;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{process_queue_until, Chain, ChainHandler};
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
    #[error("worker thread {0} is gone (it panicked or could not be started)")]
    Gone(String),
}

impl From<WorkerError> for io::Error {
    fn from(e: WorkerError) -> io::Error {
        match e {
            WorkerError::EventFd(e) | WorkerError::Epoll(e) | WorkerError::Spawn(e) => e,
            e @ WorkerError::Gone(_) => io::Error::other(e),
        }
    }
}

/// How a device thread is asked to stop: a flag, checked between requests, and an eventfd that
/// wakes the thread's epoll. Cloning shares both.
#[derive(Clone)]
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    fd: Arc<EventFd>,
}

impl StopSignal {
    fn new() -> Result<StopSignal, WorkerError> {
        Ok(StopSignal {
            flag: Arc::new(AtomicBool::new(false)),
            fd: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(WorkerError::EventFd)?),
        })
    }

    /// Whether a stop was asked for: finish the current request and return.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// The flag, for [`process_queue_until`].
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// The eventfd to watch (level-triggered) in the thread's epoll; it stays readable until the
    /// thread has stopped.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn raise(&self) -> io::Result<()> {
        self.flag.store(true, Ordering::Release);
        #[cfg(test)]
        STOPS_RAISED.fetch_add(1, Ordering::SeqCst);
        self.fd.write(1)
    }

    fn clear(&self) {
        // A non-blocking read: it only clears the counter.
        let _ = self.fd.read();
        self.flag.store(false, Ordering::Release);
    }
}

/// How many stops this process has raised: a test that pauses a device from another thread
/// waits for it before it lets the worker go on (nextest runs each test in its own process).
#[cfg(test)]
pub(crate) static STOPS_RAISED: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// What a device thread owns and runs.
pub trait WorkerLoop: Send + 'static {
    /// Serve until the [`StopSignal`] the loop was built with is raised, then return (the state
    /// is kept for the next `run`). Each run starts by serving whatever is already available,
    /// as after an activation.
    fn run(&mut self);
}

enum Run<S> {
    Running(JoinHandle<S>),
    Paused(S),
    Gone,
}

/// `VirtioDevice::pause` for a device whose thread exists only once it is active.
pub(crate) fn pause_thread<S: WorkerLoop>(thread: Option<&mut DeviceThread<S>>) {
    if let Some(t) = thread {
        t.pause();
    }
}

/// `VirtioDevice::resume` for a device whose thread exists only once it is active.
pub(crate) fn resume_thread<S: WorkerLoop>(
    thread: Option<&mut DeviceThread<S>>,
) -> Result<(), super::ActivateError> {
    match thread {
        Some(t) => t
            .resume()
            .map_err(|e| super::ActivateError::Worker(e.into())),
        None => Ok(()),
    }
}

/// A device thread that can be paused and resumed; dropping it stops the thread.
pub struct DeviceThread<S: WorkerLoop> {
    name: String,
    stop: StopSignal,
    run: Run<S>,
}

impl<S: WorkerLoop> DeviceThread<S> {
    /// Build the loop's state with `build` (given the stop signal to watch) and run it on a new
    /// thread named `name`.
    pub fn spawn(
        name: String,
        build: impl FnOnce(StopSignal) -> Result<S, WorkerError>,
    ) -> Result<DeviceThread<S>, WorkerError> {
        let stop = StopSignal::new()?;
        let state = build(stop.clone())?;
        let mut t = DeviceThread {
            name,
            stop,
            run: Run::Paused(state),
        };
        t.resume()?;
        Ok(t)
    }

    /// Stop the thread, keeping its state: when this returns, the thread has finished the
    /// request it was on and exited. Nothing on a paused thread.
    pub fn pause(&mut self) {
        let t = match std::mem::replace(&mut self.run, Run::Gone) {
            Run::Running(t) => t,
            other => {
                self.run = other;
                return;
            }
        };
        if let Err(e) = self.stop.raise() {
            tracing::error!("{}: cannot stop worker: {e}", self.name);
            self.run = Run::Running(t);
            return;
        }
        match t.join() {
            Ok(state) => self.run = Run::Paused(state),
            Err(_) => tracing::error!("{}: worker panicked", self.name),
        }
        self.stop.clear();
    }

    /// Start the thread again from its saved state. Nothing on a running thread; an error if
    /// the thread is gone (it panicked) or cannot be started.
    pub fn resume(&mut self) -> Result<(), WorkerError> {
        match std::mem::replace(&mut self.run, Run::Gone) {
            Run::Running(t) => {
                self.run = Run::Running(t);
                Ok(())
            }
            Run::Gone => Err(WorkerError::Gone(self.name.clone())),
            Run::Paused(mut state) => {
                let t = jail::seccomp::spawn(
                    jail::seccomp::ThreadClass::Device,
                    self.name.clone(),
                    move || {
                        state.run();
                        state
                    },
                )
                .map_err(WorkerError::Spawn)?;
                self.run = Run::Running(t);
                Ok(())
            }
        }
    }

    /// Whether the thread is paused (its state is kept, nothing runs).
    pub fn is_paused(&self) -> bool {
        matches!(self.run, Run::Paused(_))
    }

    /// The running thread's pthread handle (tests measure its CPU time).
    #[cfg(test)]
    pub(crate) fn as_pthread_t(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        match &self.run {
            Run::Running(t) => Some(t.as_pthread_t()),
            _ => None,
        }
    }

    /// The state of a paused thread.
    pub fn paused_state(&self) -> Option<&S> {
        match &self.run {
            Run::Paused(s) => Some(s),
            _ => None,
        }
    }

    /// The state of a paused thread, to change it before [`DeviceThread::resume`].
    pub fn paused_state_mut(&mut self) -> Option<&mut S> {
        match &mut self.run {
            Run::Paused(s) => Some(s),
            _ => None,
        }
    }

    /// Stop the thread and drop its state.
    pub fn stop(&mut self) {
        self.pause();
        self.run = Run::Gone;
    }
}

impl<S: WorkerLoop> Drop for DeviceThread<S> {
    fn drop(&mut self) {
        self.stop();
    }
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_EXIT: u64 = 1;

/// What a queue worker's thread owns.
struct Serving {
    index: u16,
    queue: Arc<Mutex<Queue>>,
    notifier: EventFd,
    self_kick: EventFd,
    epoll: Epoll,
    stop: StopSignal,
    mem: GuestMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    handler: Box<dyn ChainHandler + Send>,
    chain: Chain,
    broken: bool,
}

impl Serving {
    fn serve(&mut self) {
        if self.broken {
            return;
        }
        let index = self.index;
        let mut q = lock(&self.queue);
        match process_queue_until(
            &mut q,
            &self.mem,
            &mut self.chain,
            &mut *self.handler,
            self.stop.flag(),
        ) {
            Ok(p) => {
                if p.notify {
                    if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(index)) {
                        tracing::warn!("virtio queue {index}: interrupt: {e}");
                    }
                }
                if p.pending {
                    // More to do: come back through epoll, so that a stop request is seen
                    // between two passes.
                    let _ = self.self_kick.write(1);
                }
            }
            Err(e) => {
                crate::warn_limited!("virtio queue {index}: {e}; device needs a reset");
                self.broken = true;
                self.interrupt.set_needs_reset();
            }
        }
    }
}

impl WorkerLoop for Serving {
    fn run(&mut self) {
        self.serve();
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio queue {}: epoll: {e}; worker stops", self.index);
                    return;
                }
            };
            if events[..n].iter().any(|ev| ev.data() == TOKEN_EXIT) {
                return;
            }
            // A non-blocking read: it only clears the counter.
            let _ = self.notifier.read();
            self.serve();
        }
    }
}

/// A running queue worker. Dropping it stops the thread.
pub struct QueueWorker {
    index: u16,
    queue: Arc<Mutex<Queue>>,
    thread: DeviceThread<Serving>,
}

impl QueueWorker {
    /// Serve `active` with `handler` on a new thread named `name`. Available chains are served
    /// once at start (the driver may have queued some before the thread existed, or a restored
    /// queue may hold some), then after every notification.
    pub fn spawn<H: ChainHandler + Send + 'static>(
        name: String,
        active: ActiveQueue,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        handler: H,
    ) -> Result<QueueWorker, WorkerError> {
        let index = active.index;
        let queue = Arc::new(Mutex::new(active.queue));
        let shared = queue.clone();
        let notifier = active.notifier;
        let thread = DeviceThread::spawn(name, move |stop| {
            let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
            for (fd, token) in [
                (notifier.as_raw_fd(), TOKEN_QUEUE),
                (stop.raw_fd(), TOKEN_EXIT),
            ] {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(WorkerError::Epoll)?;
            }
            Ok(Serving {
                index,
                queue: shared,
                self_kick: notifier.try_clone().map_err(WorkerError::EventFd)?,
                notifier,
                epoll,
                stop,
                mem,
                interrupt,
                handler: Box::new(handler),
                chain: Chain::default(),
                broken: false,
            })
        })?;
        Ok(QueueWorker {
            index,
            queue,
            thread,
        })
    }

    /// Index of the queue served.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue's state, taken between two requests (or while paused).
    pub fn queue_state(&self) -> virtio_queue::QueueState {
        lock(&self.queue).state()
    }

    /// Stop the thread after the request it is on, keeping the queue and the handler.
    pub fn pause(&mut self) {
        self.thread.pause();
    }

    /// Serve again after [`QueueWorker::pause`] (first whatever became available meanwhile).
    /// Nothing on a running worker.
    pub fn resume(&mut self) -> Result<(), WorkerError> {
        self.thread.resume()
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        self.thread.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, W};
    use std::sync::atomic::AtomicU32;
    use std::sync::Condvar;
    use std::time::Duration;

    /// Counts the chains it serves; blocks inside a chain while the gate is closed.
    #[derive(Default)]
    struct Gate {
        closed: Mutex<bool>,
        cv: Condvar,
        entered: AtomicU32,
        served: AtomicU32,
    }

    struct Gated(Arc<Gate>);

    impl ChainHandler for Gated {
        fn handle(&mut self, _mem: &GuestMem, _chain: &mut Chain) -> u32 {
            self.0.entered.fetch_add(1, Ordering::SeqCst);
            let mut closed = self.0.closed.lock().unwrap();
            while *closed {
                closed = self.0.cv.wait(closed).unwrap();
            }
            self.0.served.fetch_add(1, Ordering::SeqCst);
            1
        }
    }

    fn wait_for(f: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(5), "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn pause_finishes_the_current_chain_and_resume_serves_the_rest() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 16);
        let gate = Arc::new(Gate::default());
        *gate.closed.lock().unwrap() = true;
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let int = Arc::new(CountingInterrupt::default());
        let mut w = QueueWorker::spawn(
            "test-q".into(),
            ActiveQueue {
                index: 0,
                queue: tq.queue(),
                notifier: evt,
            },
            m.clone(),
            int,
            Gated(gate.clone()),
        )
        .unwrap();
        for i in 0..5 {
            tq.add_chain(&[(0x10000 + i * 0x100, 16, W)]);
        }
        kick.write(1).unwrap();
        wait_for(|| gate.entered.load(Ordering::SeqCst) == 1);
        // Pause from another thread: it cannot return while the chain is being served.
        let stop = w.thread.stop.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let pauser = std::thread::spawn(move || {
            w.pause();
            w.pause(); // twice: nothing more
            done_tx.send(()).unwrap();
            w
        });
        wait_for(|| stop.requested());
        std::thread::sleep(Duration::from_millis(20));
        assert!(done_rx.try_recv().is_err(), "pause returned mid-request");
        *gate.closed.lock().unwrap() = false;
        gate.cv.notify_all();
        let mut w = pauser.join().unwrap();
        // The chain in progress is in the used ring; the other four wait.
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(gate.served.load(Ordering::SeqCst), 1);
        assert_eq!(w.queue_state().next_avail, 1);
        assert!(w.thread.is_paused());
        // Notifications while paused are remembered, not served.
        tq.add_chain(&[(0x20000, 16, W)]);
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(tq.used_idx(), 1);
        w.resume().unwrap();
        w.resume().unwrap(); // twice: nothing more
        tq.wait_used(6);
        assert_eq!(gate.served.load(Ordering::SeqCst), 6);
        let heads: Vec<u32> = (0..6).map(|i| tq.used(i).0).collect();
        assert_eq!(heads, [0, 1, 2, 3, 4, 5]);
        w.stop();
        assert!(w.resume().is_err(), "a stopped worker stays stopped");
    }
}
