//! The worker thread of one queue pair: epoll on the backend, both queues' notification eventfds
//! and an exit eventfd.
//!
//! Receive: while the backend polls readable, frames are read and delivered. A frame that finds
//! no room is kept (one at most) and the backend leaves the epoll set until the driver notifies
//! the receive queue, so an idle guest costs nothing and no frame is lost here (the kernel's tap
//! queue drops what overflows it). Transmit: every notification serves the available chains.
//!
//! A backend still writing an earlier packet ([`NetBackend::flush`]: a stream socket whose peer
//! reads slowly) makes transmission stop the same way: the chain stays in the ring and the
//! backend is polled for writability (`EPOLLOUT`, beside `EPOLLIN` for receiving) until the
//! packet is out, then the pass goes on.
//!
//! Rate limits ([`SharedLimiter`], one per direction, shared by all pairs): a transmit chain
//! the limiter refuses stays in the ring and transmission stops; a received frame it refuses is
//! kept (as when there are no buffers) and the backend leaves the epoll set, so that the kernel
//! queues further frames in the tap. Both resume when the limiter's timer wakes the pair
//! (through its `wake` eventfd).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use guestmem::GuestMem;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rx::{deliver, RxOutcome};
use super::tx::TxHandler;
use super::{NetBackend, NetCounters, HDR_LEN, MAX_PACKET_LEN};
use crate::bus::lock;
use crate::rate_limiter::SharedLimiter;
use crate::virtio::queue::{process_queue_until, Chain, QueueError};
use crate::virtio::worker::{DeviceThread, StopSignal, WorkerError, WorkerLoop};
use crate::virtio::{ActiveQueue, VirtioInterrupt, VirtioInterruptType};

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_EXIT: u64 = 3;
const TOKEN_WAKE: u64 = 4;
const TOKEN_TX_TIMER: u64 = 5;
const TOKEN_RX_TIMER: u64 = 6;

/// Frames delivered per wake-up before the worker looks at its other events again.
const RX_BUDGET: usize = 256;

/// A running queue-pair worker. Dropping it stops the thread.
pub struct PairWorker {
    rx_index: u16,
    tx_index: u16,
    rx: Arc<Mutex<Queue>>,
    tx: Arc<Mutex<Queue>>,
    wake: Arc<EventFd>,
    thread: DeviceThread<Pair>,
}

/// The device's rate limiters (`None`: no limit that way).
#[derive(Clone, Default)]
pub struct Limiters {
    pub rx: Option<Arc<SharedLimiter>>,
    pub tx: Option<Arc<SharedLimiter>>,
}

/// How a queue pair works, from the negotiated features and the device's options.
#[derive(Clone, Default)]
pub struct PairOptions {
    /// Mergeable receive buffers.
    pub mrg: bool,
    pub limiters: Limiters,
    /// The device's counters, shared by its pairs.
    pub counters: Arc<NetCounters>,
}

struct Pair {
    mem: GuestMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    backend: Arc<dyn NetBackend>,
    epoll: Epoll,
    rx_index: u16,
    tx_index: u16,
    rx: Arc<Mutex<Queue>>,
    tx: Arc<Mutex<Queue>>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    /// Written by the control queue and by the rate limiters' timers.
    wake: Arc<EventFd>,
    stop: StopSignal,
    mrg: bool,
    limiters: Limiters,
    /// Transmission waits for the transmit limiter.
    tx_limited: bool,
    /// Transmission waits for the backend to finish writing a packet (it is polled writable).
    tx_blocked: bool,
    /// The pending frame waits for the receive limiter.
    rx_limited: bool,
    /// The receive limiter granted the pending frame already.
    rx_granted: bool,
    /// One packet read from the backend; `pending` bytes of it wait for receive buffers.
    rx_buf: Vec<u8>,
    pending: Option<usize>,
    /// The pending frame waits for receive buffers (the driver was asked to notify).
    waiting: bool,
    /// The backend failed (say, the tap was deleted): it is not polled any more.
    backend_failed: bool,
    /// The events the backend is polled for (none: not in the epoll set).
    backend_polled: EventSet,
    pool: Vec<Chain>,
    tx_buf: Vec<u8>,
    tx_chain: Chain,
    counters: Arc<NetCounters>,
    broken: bool,
}

impl PairWorker {
    /// Serve the receive queue `rx` and the transmit queue `tx` with `backend` on a new thread.
    pub fn spawn(
        name: String,
        rx: ActiveQueue,
        tx: ActiveQueue,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        backend: Arc<dyn NetBackend>,
        opts: PairOptions,
    ) -> Result<PairWorker, WorkerError> {
        let PairOptions {
            mrg,
            limiters,
            counters,
        } = opts;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(WorkerError::EventFd)?);
        let wake_thread = wake.clone();
        let (rx_index, tx_index) = (rx.index, tx.index);
        let rxq = Arc::new(Mutex::new(rx.queue));
        let txq = Arc::new(Mutex::new(tx.queue));
        let (rx_shared, tx_shared) = (rxq.clone(), txq.clone());
        let thread = DeviceThread::spawn(name, move |stop| {
            let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
            let timers = [
                limiters.tx.as_ref().map(|l| (l.timer_fd(), TOKEN_TX_TIMER)),
                limiters.rx.as_ref().map(|l| (l.timer_fd(), TOKEN_RX_TIMER)),
            ];
            for (fd, token) in [
                (rx.notifier.as_raw_fd(), TOKEN_RX),
                (tx.notifier.as_raw_fd(), TOKEN_TX),
                (stop.raw_fd(), TOKEN_EXIT),
                (wake_thread.as_raw_fd(), TOKEN_WAKE),
            ]
            .into_iter()
            .chain(timers.into_iter().flatten())
            {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(WorkerError::Epoll)?;
            }
            Ok(Pair {
                mem,
                interrupt,
                backend,
                epoll,
                rx_index,
                tx_index,
                rx: rx_shared,
                tx: tx_shared,
                rx_kick: rx.notifier,
                tx_kick: tx.notifier,
                wake: wake_thread,
                stop,
                mrg,
                limiters,
                tx_limited: false,
                tx_blocked: false,
                rx_limited: false,
                rx_granted: false,
                rx_buf: vec![0; MAX_PACKET_LEN + 1],
                pending: None,
                waiting: false,
                backend_failed: false,
                backend_polled: EventSet::empty(),
                pool: Vec::new(),
                tx_buf: Vec::new(),
                tx_chain: Chain::default(),
                counters,
                broken: false,
            })
        })?;
        Ok(PairWorker {
            rx_index,
            tx_index,
            rx: rxq,
            tx: txq,
            wake,
            thread,
        })
    }

    /// A handle that makes the worker look again at whether its backend queue is enabled (after
    /// the control queue attached or detached it).
    pub fn waker(&self) -> io::Result<EventFd> {
        self.wake.try_clone()
    }

    /// CPU time the worker thread has used so far (zero while paused).
    #[cfg(test)]
    pub(super) fn cpu_time(&self) -> std::time::Duration {
        let Some(t) = self.thread.as_pthread_t() else {
            return std::time::Duration::ZERO;
        };
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `t` is a running thread (it is joined only through `&mut self`) and `clock` a
        // valid place for the result.
        assert_eq!(unsafe { libc::pthread_getcpuclockid(t, &mut clock) }, 0);
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a valid timespec to fill.
        assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// The queues' states, each taken between two requests (or while paused).
    pub fn queue_states(&self) -> Vec<(u16, QueueState)> {
        vec![
            (self.rx_index, lock(&self.rx).state()),
            (self.tx_index, lock(&self.tx).state()),
        ]
    }

    /// Stop the thread after the frame it is on; a received frame still waiting for buffers
    /// is kept for [`PairWorker::resume`].
    pub fn pause(&mut self) {
        self.thread.pause();
    }

    /// Serve again after a pause. Nothing on a running worker.
    pub fn resume(&mut self) -> Result<(), WorkerError> {
        self.thread.resume()
    }
}

impl WorkerLoop for Pair {
    fn run(&mut self) {
        // The backend wakes the worker for receive work; the driver's receive notifications are
        // only wanted when the queue runs out of buffers.
        let disabled = lock(&self.rx).disable_notification(&self.mem);
        if let Err(e) = disabled {
            self.fatal(self.rx_index, QueueError::Ring(e.to_string()));
        }
        self.update_poll();
        // The driver may have queued packets before the thread existed (or a restored queue may
        // hold some).
        self.tx_pass();
        self.rx_pass();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(
                        "virtio-net queue {}: epoll: {e}; worker stops",
                        self.rx_index
                    );
                    return;
                }
            };
            let mut rx = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => return,
                    TOKEN_TX => {
                        // A non-blocking read: it only clears the counter.
                        let _ = self.tx_kick.read();
                        self.tx_pass();
                    }
                    TOKEN_RX => {
                        let _ = self.rx_kick.read();
                        rx = true;
                    }
                    TOKEN_BACKEND => {
                        let ready = ev.event_set();
                        let out = EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP;
                        if self.tx_blocked && ready.intersects(out) {
                            // The backend can take more (or failed: the pass finds out).
                            self.tx_blocked = false;
                            self.tx_pass();
                        }
                        if self.backend_polled.contains(EventSet::IN) {
                            rx = true;
                        }
                    }
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        // The backend queue may have been attached or detached, or a limiter
                        // may have tokens again: retry whatever waited.
                        self.rx_limited = false;
                        self.update_poll();
                        if std::mem::take(&mut self.tx_limited) {
                            self.tx_pass();
                        }
                        rx = true;
                    }
                    TOKEN_TX_TIMER => {
                        if let Some(l) = &self.limiters.tx {
                            l.on_timer();
                        }
                    }
                    TOKEN_RX_TIMER => {
                        if let Some(l) = &self.limiters.rx {
                            l.on_timer();
                        }
                    }
                    _ => {}
                }
            }
            if rx {
                self.rx_pass();
            }
        }
    }
}

impl Pair {
    fn fatal(&mut self, queue: u16, e: QueueError) {
        crate::warn_limited!("virtio-net queue {queue}: {e}; device needs a reset");
        self.broken = true;
        self.update_poll();
        self.interrupt.set_needs_reset();
    }

    fn notify(&self, queue: u16) {
        if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(queue)) {
            tracing::warn!("virtio-net queue {queue}: interrupt: {e}");
        }
    }

    /// Poll the backend for reading only while frames can go somewhere: not broken, the
    /// backend queue enabled (a detached tap queue polls as an error forever) and working, and
    /// no frame waiting for receive buffers or for the receive limiter; for writing while a
    /// packet it could not finish holds transmission back.
    fn update_poll(&mut self) {
        let read = !self.broken
            && !self.backend_failed
            && !self.waiting
            && !self.rx_limited
            && self.backend.is_enabled();
        let write = !self.broken && self.tx_blocked;
        let mut want = EventSet::empty();
        if read {
            want |= EventSet::IN;
        }
        if write {
            want |= EventSet::OUT;
        }
        if self.backend_polled == want {
            return;
        }
        let fd = self.backend.raw_fd();
        let event = EpollEvent::new(want, TOKEN_BACKEND);
        let r = if want.is_empty() {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        } else if self.backend_polled.is_empty() {
            self.epoll.ctl(ControlOperation::Add, fd, event)
        } else {
            self.epoll.ctl(ControlOperation::Modify, fd, event)
        };
        match r {
            Ok(()) => self.backend_polled = want,
            Err(e) => tracing::error!("virtio-net queue {}: epoll: {e}", self.rx_index),
        }
    }

    fn tx_pass(&mut self) {
        if self.broken || self.tx_blocked {
            return;
        }
        if !self.tx_limited {
            self.serve_tx();
        }
        // The backend may still hold the end of a packet (the last one sent, or one whose
        // chain went back to the ring): poll it for writability until that is out, even when
        // the ring is empty.
        if !self.broken && !self.tx_blocked {
            self.tx_blocked = matches!(self.backend.flush(), Ok(false));
        }
        self.update_poll();
    }

    /// One pass over the transmit ring.
    fn serve_tx(&mut self) {
        let q = self.tx.clone();
        let mut q = lock(&q);
        let mut handler = TxHandler {
            backend: &*self.backend,
            buf: &mut self.tx_buf,
            counters: &self.counters,
            limiter: self.limiters.tx.as_deref().map(|l| (l, &self.wake)),
            blocked: false,
        };
        let result = process_queue_until(
            &mut q,
            &self.mem,
            &mut self.tx_chain,
            &mut handler,
            self.stop.flag(),
        );
        let blocked = handler.blocked;
        match result {
            Ok(p) => {
                if p.notify {
                    self.notify(self.tx_index);
                }
                // The limiter refused a packet (its timer wakes this worker), or the backend
                // is still writing an earlier one (it is polled writable: see update_poll).
                self.tx_blocked = p.deferred && blocked;
                self.tx_limited = p.deferred && !blocked;
                if p.pending {
                    // More to do: come back through epoll, so that a stop request and receive
                    // work are seen between two passes.
                    let _ = self.tx_kick.write(1);
                }
            }
            Err(e) => {
                drop(q);
                self.fatal(self.tx_index, e);
            }
        }
    }

    /// Read and deliver frames until the backend has none, the budget is spent or the receive
    /// queue is full (then the backend is left alone until the driver adds buffers).
    fn rx_pass(&mut self) {
        if self.broken || self.backend_failed || self.rx_limited || !self.backend.is_enabled() {
            return;
        }
        let q = self.rx.clone();
        let mut q = lock(&q);
        let mut used = false;
        let mut result = Ok(());
        for _ in 0..RX_BUDGET {
            if self.stop.requested() {
                // Pausing: the rest waits in the backend (and a pending frame here).
                break;
            }
            let len = match self.pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(len) if len > MAX_PACKET_LEN => {
                        // Filled the whole buffer: possibly truncated.
                        self.counters.rx_dropped();
                        continue;
                    }
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(
                            "virtio-net queue {}: backend read: {e}; receiving stops",
                            self.rx_index
                        );
                        self.backend_failed = true;
                        break;
                    }
                },
            };
            self.pending = Some(len);
            if !self.rx_granted {
                if let Some(l) = &self.limiters.rx {
                    let bytes = len.saturating_sub(HDR_LEN) as u64;
                    if !l.consume(1, bytes, &self.wake) {
                        // Keep the frame; leave the backend alone until the timer fires.
                        self.rx_limited = true;
                        break;
                    }
                }
                self.rx_granted = true;
            }
            let outcome = match deliver(
                &mut q,
                &self.mem,
                &mut self.rx_buf[..len],
                self.mrg,
                &mut self.pool,
            ) {
                Ok(o) => o,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            used |= outcome.used();
            match outcome {
                RxOutcome::Delivered(_) => {
                    self.pending = None;
                    self.rx_granted = false;
                    self.counters.received(len.saturating_sub(HDR_LEN) as u64);
                }
                RxOutcome::Dropped { why, .. } => {
                    self.pending = None;
                    self.rx_granted = false;
                    self.counters.rx_dropped();
                    crate::warn_limited!(
                        "virtio-net queue {}: received frame of {len} bytes dropped: {why:?}",
                        self.rx_index
                    );
                }
                RxOutcome::NoBuffers { seen_avail, .. } => {
                    // Ask the driver for a notification when it adds buffers past those seen,
                    // then check it did not just do so.
                    let next = q.next_avail();
                    q.set_next_avail(seen_avail);
                    let more = q.enable_notification(&self.mem);
                    q.set_next_avail(next);
                    match more {
                        Ok(true) => continue,
                        Ok(false) => {
                            self.waiting = true;
                            break;
                        }
                        Err(e) => {
                            result = Err(QueueError::Ring(e.to_string()));
                            break;
                        }
                    }
                }
            }
        }
        if self.pending.is_none() && self.waiting {
            // The frame that waited went in: poll the backend again, with notifications off
            // (the backend is what wakes the worker now).
            self.waiting = false;
            if let Err(e) = q.disable_notification(&self.mem) {
                result = Err(QueueError::Ring(e.to_string()));
            }
        }
        self.update_poll();
        if let Err(e) = result {
            drop(q);
            self.fatal(self.rx_index, e);
            return;
        }
        if used {
            match q.needs_notification(&self.mem) {
                Ok(true) => self.notify(self.rx_index),
                Ok(false) => {}
                Err(e) => {
                    drop(q);
                    self.fatal(self.rx_index, QueueError::Ring(e.to_string()));
                }
            }
        }
    }
}
