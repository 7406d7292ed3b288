//! A block queue's worker: takes requests from the ring, hands them to the queue's engine and
//! writes each one's status and used-ring entry when its completion arrives (in any order).
//!
//! The worker thread waits (epoll) on the queue's notifier, the engine's completion eventfd,
//! the rate limiter's timerfd, its own limiter wake-up eventfd and the exit eventfd. Requests
//! in flight are capped at the queue size (a guest that makes the same head available again
//! and again gets no more), so what a guest can make the VMM hold is bounded. When the rate
//! limiter refuses a request, the request goes back to the ring (the available index is
//! rewound) and the worker takes no more until the limiter wakes it.
//!
//! On a pause (snapshot, migration) or a stop (device reset or drop) the worker takes no new
//! requests and completes those in flight, status and used entries included, before its thread
//! ends (a paused device has nothing in flight). Should the disk not answer for
//! [`DRAIN_TIMEOUT`], the thread ends anyway; an io_uring engine dropped then keeps the guest
//! memory mapped rather than free it under the kernel's feet (see `engine/ring.rs`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmem::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::counters::{BlockCounters, OpKind};
use super::engine::{wait_readable, Completion, Engine};
use super::request::{Parsed, Parser, VIRTIO_BLK_S_OK};
use crate::bus::lock;
use crate::rate_limiter::SharedLimiter;
use crate::virtio::queue::{pop_head, walk_chain, Chain, Progress, QueueError};
use crate::virtio::worker::{DeviceThread, StopSignal, WorkerError, WorkerLoop};
use crate::virtio::{VirtioInterrupt, VirtioInterruptType};

/// How long a stopping worker waits for its requests in flight.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn ring_err(e: impl std::fmt::Display) -> QueueError {
    QueueError::Ring(e.to_string())
}

/// A request handed to the engine.
struct InFlight {
    head: u16,
    status: GuestAddress,
    written: u32,
    /// For the counters.
    kind: OpKind,
    bytes: u64,
}

/// One queue's requests: parsing, submission, completion.
pub(crate) struct BlockQueue {
    queue: Arc<Mutex<Queue>>,
    mem: GuestMem,
    parser: Parser,
    engine: Box<dyn Engine>,
    limiter: Option<Arc<SharedLimiter>>,
    /// Written by the limiter when this queue may try again.
    wake: Arc<EventFd>,
    /// Refused by the limiter: take no requests until woken.
    limited: bool,
    /// In-flight table, indexed by engine token; `free` lists the empty slots.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    chain: Chain,
    done: Vec<Completion>,
    /// The device's counters, shared by its queues.
    counters: Arc<BlockCounters>,
}

impl BlockQueue {
    pub(crate) fn new(
        queue: Queue,
        mem: GuestMem,
        parser: Parser,
        engine: Box<dyn Engine>,
        limiter: Option<Arc<SharedLimiter>>,
        counters: Arc<BlockCounters>,
    ) -> io::Result<Self> {
        let depth = usize::from(queue.size().max(1));
        Ok(BlockQueue {
            queue: Arc::new(Mutex::new(queue)),
            mem,
            parser,
            engine,
            limiter,
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            limited: false,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            chain: Chain::default(),
            done: Vec::new(),
            counters,
        })
    }

    /// Requests handed to the engine and not yet completed.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The limiter may let requests through again: its timer fired (`timer`), or the worker
    /// that handled it woke this one.
    pub(crate) fn limiter_woke(&mut self, timer: bool) {
        let _ = self.wake.read();
        if timer {
            if let Some(l) = &self.limiter {
                l.on_timer();
            }
        }
        self.limited = false;
    }

    /// Write a request's status byte and its used-ring entry.
    fn finish(
        &self,
        q: &mut Queue,
        head: u16,
        status_addr: GuestAddress,
        status: u8,
        written: u32,
    ) -> Result<(), QueueError> {
        let len = match self.mem.write_obj(status, status_addr) {
            Ok(()) => written.saturating_add(1),
            Err(_) => 0,
        };
        q.add_used(&self.mem, head, len).map_err(ring_err)
    }

    /// Complete what the engine finished; returns how many used entries were written.
    fn complete(&mut self, q: &mut Queue) -> Result<u32, QueueError> {
        let mut done = std::mem::take(&mut self.done);
        self.engine.reap(&mut done);
        let mut n = 0;
        let mut result = Ok(());
        for c in done.drain(..) {
            let Some(f) = self.slots.get_mut(c.token).and_then(Option::take) else {
                tracing::warn!("virtio-blk: completion for unknown token {}", c.token);
                continue;
            };
            self.free.push(c.token);
            if result.is_err() {
                continue;
            }
            let (status, written) = match c.result {
                Ok(()) => {
                    self.counters.completed(f.kind, f.bytes);
                    (VIRTIO_BLK_S_OK, f.written)
                }
                Err(e) => {
                    tracing::debug!("virtio-blk: request {}: {e}", f.head);
                    self.counters.failed();
                    (e.status(), 0)
                }
            };
            result = self.finish(q, f.head, f.status, status, written);
            n += 1;
        }
        self.done = done;
        result.map(|()| n)
    }

    /// One processing pass: complete what finished, then take available requests until the
    /// ring is empty, the in-flight table is full, the limiter refuses, or the pass has served
    /// as many chains as the queue has entries (`pending`: call again). An `Err` is a corrupt
    /// ring: the queue must not be used again before a reset.
    pub(crate) fn process(&mut self, stop: &AtomicBool) -> Result<Progress, QueueError> {
        let queue = self.queue.clone();
        let mut q = lock(&queue);
        let mem = self.mem.clone();
        let mut used = self.complete(&mut q)?;
        let mut pending = false;
        // The pass stopped because every slot was in flight.
        let mut full = false;
        if !self.limited {
            let budget = u32::from(q.size());
            let (mut served, mut rounds) = (0u32, 0u32);
            'passes: loop {
                // Rounds count too: with rings that overlap, flipping the notification flag can
                // change the available index without any chain being served.
                rounds += 1;
                if rounds > budget {
                    pending = true;
                    break;
                }
                q.disable_notification(&mem).map_err(ring_err)?;
                loop {
                    if stop.load(Ordering::Acquire) {
                        // A pause: take no more; the caller completes what is in flight.
                        pending = true;
                        break 'passes;
                    }
                    if self.free.is_empty() {
                        // Full: a completion wakes the worker.
                        full = true;
                        break 'passes;
                    }
                    let Some(head) = pop_head(&mut q, &mem)? else {
                        break;
                    };
                    walk_chain(&q, &mem, head, &mut self.chain);
                    match self.parser.parse(&mem, &mut self.chain) {
                        Parsed::Unserved => {
                            q.add_used(&mem, head, 0).map_err(ring_err)?;
                            used += 1;
                        }
                        Parsed::Done {
                            status_addr,
                            status,
                            written,
                        } => {
                            // GET_ID, or a request refused without I/O.
                            if status != VIRTIO_BLK_S_OK {
                                self.counters.failed();
                            }
                            self.finish(&mut q, head, status_addr, status, written)?;
                            used += 1;
                        }
                        Parsed::Io {
                            status_addr,
                            op,
                            written,
                        } => {
                            let allowed = match &self.limiter {
                                Some(l) => l.consume(1, op.bytes(), &self.wake),
                                None => true,
                            };
                            let token = match self.free.pop() {
                                Some(t) if allowed => t,
                                other => {
                                    // Back to the ring: it is taken again when the limiter
                                    // (or a completion) wakes the worker.
                                    full = other.is_none();
                                    self.free.extend(other);
                                    let back = q.next_avail().wrapping_sub(1);
                                    q.set_next_avail(back);
                                    self.limited = !allowed;
                                    break 'passes;
                                }
                            };
                            self.slots[token] = Some(InFlight {
                                head,
                                status: status_addr,
                                written,
                                kind: OpKind::of(&op),
                                bytes: op.bytes(),
                            });
                            self.engine.submit(token, op);
                        }
                    }
                    served += 1;
                    if served >= budget {
                        pending = true;
                        break 'passes;
                    }
                }
                if !q.enable_notification(&mem).map_err(ring_err)? {
                    break;
                }
            }
            if pending {
                // Leave notifications on: whoever calls again must not depend on them, but a
                // driver that stalls should still be able to wake the device.
                q.enable_notification(&mem).map_err(ring_err)?;
            }
        }
        self.engine.flush_submissions();
        used += self.complete(&mut q)?;
        if full && !self.free.is_empty() {
            // The completions that free slots were reaped here, clearing the eventfd that would
            // have woken the worker: come back for the chains still in the ring.
            pending = true;
        }
        let notify = used > 0 && q.needs_notification(&mem).map_err(ring_err)?;
        Ok(Progress {
            notify,
            pending,
            deferred: self.limited,
        })
    }

    /// Forget finished requests without touching the rings (a broken or stopping queue).
    fn discard_completions(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        self.engine.reap(&mut done);
        for c in done.drain(..) {
            if self.slots.get_mut(c.token).and_then(Option::take).is_some() {
                self.free.push(c.token);
            }
        }
        self.done = done;
    }

    /// Complete what the engine finished (status bytes, used entries), taking nothing new;
    /// returns whether the driver must be interrupted.
    fn complete_only(&mut self) -> Result<bool, QueueError> {
        let queue = self.queue.clone();
        let mut q = lock(&queue);
        let used = self.complete(&mut q)?;
        Ok(used > 0 && q.needs_notification(&self.mem).map_err(ring_err)?)
    }

    /// Wait (up to 5 s, for tests) until no request is in flight, completing them.
    #[cfg(test)]
    pub(crate) fn run_to_idle(&mut self) -> Result<Progress, QueueError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let never = AtomicBool::new(false);
        let mut p = self.process(&never)?;
        while self.in_flight() > 0 || p.pending || self.limited {
            assert!(Instant::now() < deadline, "requests never completed");
            if self.limited {
                if let Some(l) = &self.limiter {
                    wait_readable(l.timer_fd(), Duration::from_millis(100));
                }
                self.limiter_woke(true);
            } else if let Some(fd) = self.engine.completion_fd() {
                wait_readable(fd, Duration::from_millis(100));
            }
            p = self.process(&never)?;
        }
        Ok(p)
    }

    /// The device's counters now (tests).
    #[cfg(test)]
    pub(crate) fn counters(&self) -> super::BlockCountersSnapshot {
        self.counters.snapshot()
    }

    /// The next available-ring index the queue will take.
    #[cfg(test)]
    pub(crate) fn next_avail(&self) -> u16 {
        lock(&self.queue).next_avail()
    }

    /// Wait up to 100 ms for a completion (tests).
    #[cfg(test)]
    pub(crate) fn wait_completion(&self) {
        match self.engine.completion_fd() {
            Some(fd) => wait_readable(fd, Duration::from_millis(100)),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }

    /// The engine's completion eventfd, if it has one.
    fn completion_fd(&self) -> Option<RawFd> {
        self.engine.completion_fd()
    }
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_EXIT: u64 = 1;
const TOKEN_COMPLETION: u64 = 2;
const TOKEN_TIMER: u64 = 3;
const TOKEN_WAKE: u64 = 4;

/// What a block queue's thread owns (kept while paused).
struct BlockServing {
    index: u16,
    bq: BlockQueue,
    notifier: EventFd,
    self_kick: EventFd,
    epoll: Epoll,
    stop: StopSignal,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The ring is corrupt: serve nothing until a reset.
    broken: bool,
}

impl BlockServing {
    fn notify(&self) {
        if let Err(e) = self
            .interrupt
            .trigger(VirtioInterruptType::Queue(self.index))
        {
            tracing::warn!("virtio-blk queue {}: interrupt: {e}", self.index);
        }
    }

    fn fail(&mut self, e: QueueError) {
        crate::warn_limited!("virtio-blk queue {}: {e}; device needs a reset", self.index);
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    fn serve(&mut self) {
        if self.broken {
            self.bq.discard_completions();
            return;
        }
        match self.bq.process(self.stop.flag()) {
            Ok(p) => {
                if p.notify {
                    self.notify();
                }
                if p.pending && !self.stop.requested() {
                    // More to do: come back through epoll, so that a stop request is seen
                    // between two passes.
                    let _ = self.self_kick.write(1);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    /// Complete every request in flight, writing their used entries (a pause or a stop), for
    /// up to [`DRAIN_TIMEOUT`].
    fn finish_in_flight(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            if self.broken {
                self.bq.discard_completions();
            } else {
                match self.bq.complete_only() {
                    Ok(true) => self.notify(),
                    Ok(false) => {}
                    Err(e) => self.fail(e),
                }
            }
            if self.bq.in_flight() == 0 {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::error!(
                    "virtio-blk queue {}: {} requests still in flight after {:?}",
                    self.index,
                    self.bq.in_flight(),
                    DRAIN_TIMEOUT
                );
                return;
            }
            match self.bq.completion_fd() {
                Some(fd) => wait_readable(fd, left.min(Duration::from_millis(100))),
                None => return,
            }
        }
    }
}

impl WorkerLoop for BlockServing {
    fn run(&mut self) {
        self.serve();
        let mut events = [EpollEvent::default(); 5];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-blk queue {}: epoll: {e}; worker stops", self.index);
                    self.finish_in_flight();
                    return;
                }
            };
            let ready = |t: u64| events[..n].iter().any(|ev| ev.data() == t);
            if ready(TOKEN_EXIT) {
                self.finish_in_flight();
                return;
            }
            if ready(TOKEN_QUEUE) {
                // A non-blocking read: it only clears the counter.
                let _ = self.notifier.read();
            }
            if ready(TOKEN_TIMER) || ready(TOKEN_WAKE) {
                self.bq.limiter_woke(ready(TOKEN_TIMER));
            }
            self.serve();
        }
    }
}

/// A block queue's worker thread, which can be paused. Dropping it stops the thread after the
/// requests in flight complete.
pub(crate) struct BlockWorker {
    index: u16,
    queue: Arc<Mutex<Queue>>,
    mem: GuestMem,
    thread: DeviceThread<BlockServing>,
}

impl BlockWorker {
    /// Serve queue `index` with `bq` on a new thread named `name`. Available requests are taken
    /// at start (and on every resume), then after every notification, completion or limiter
    /// wake-up.
    pub(crate) fn spawn(
        name: String,
        index: u16,
        notifier: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
        bq: BlockQueue,
    ) -> Result<BlockWorker, WorkerError> {
        let queue = bq.queue.clone();
        let mem = bq.mem.clone();
        let thread = DeviceThread::spawn(name, move |stop| {
            let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
            let mut fds = vec![
                (notifier.as_raw_fd(), TOKEN_QUEUE),
                (stop.raw_fd(), TOKEN_EXIT),
                (bq.wake.as_raw_fd(), TOKEN_WAKE),
            ];
            if let Some(fd) = bq.completion_fd() {
                fds.push((fd, TOKEN_COMPLETION));
            }
            if let Some(l) = &bq.limiter {
                fds.push((l.timer_fd(), TOKEN_TIMER));
            }
            for (fd, token) in fds {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(WorkerError::Epoll)?;
            }
            Ok(BlockServing {
                index,
                bq,
                self_kick: notifier.try_clone().map_err(WorkerError::EventFd)?,
                notifier,
                epoll,
                stop,
                interrupt,
                broken: false,
            })
        })?;
        Ok(BlockWorker {
            index,
            queue,
            mem,
            thread,
        })
    }

    /// Index of the queue served.
    pub(crate) fn index(&self) -> u16 {
        self.index
    }

    /// The queue's state, taken between two processing passes (or while paused).
    pub(crate) fn queue_state(&self) -> virtio_queue::QueueState {
        lock(&self.queue).state()
    }

    /// Stop taking requests, complete those in flight, and stop the thread (keeping its
    /// state).
    pub(crate) fn pause(&mut self) {
        self.thread.pause();
    }

    /// The guest memory the queue's requests point into.
    pub(crate) fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// The queue's size (the most requests in flight).
    pub(crate) fn queue_size(&self) -> u16 {
        lock(&self.queue).size()
    }

    /// Whether the worker's thread is paused.
    pub(crate) fn is_paused(&self) -> bool {
        self.thread.is_paused()
    }

    /// Give a paused worker another engine and parser (the disk was switched, see
    /// [`super::Block::replace_disk`]); the old engine is dropped here. Refused while the
    /// thread runs or requests are in flight.
    pub(crate) fn replace_engine(
        &mut self,
        engine: Box<dyn Engine>,
        parser: Parser,
    ) -> io::Result<()> {
        let s = self
            .thread
            .paused_state_mut()
            .ok_or_else(|| io::Error::other("the queue worker is not paused"))?;
        if s.bq.in_flight() > 0 {
            return Err(io::Error::other(format!(
                "{} requests still in flight",
                s.bq.in_flight()
            )));
        }
        if let Some(fd) = s.bq.completion_fd() {
            s.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
        }
        s.bq.engine = engine;
        s.bq.parser = parser;
        if let Some(fd) = s.bq.completion_fd() {
            s.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_COMPLETION),
            )?;
        }
        Ok(())
    }

    /// Serve again after [`BlockWorker::pause`].
    pub(crate) fn resume(&mut self) -> Result<(), WorkerError> {
        self.thread.resume()
    }
}
