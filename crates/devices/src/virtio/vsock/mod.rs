//! virtio-vsock (virtio 1.2 §5.10), with the host side on Unix sockets as in Firecracker (see
//! [`muxer`]).
//!
//! Queues: 0 receive (host to guest), 1 transmit (guest to host), 2 events. One worker thread
//! waits in one epoll on the queues' notifications, the Unix listener and every connection's
//! socket. Receive buffers are only taken when a packet is ready for them; a packet larger than
//! the buffer is split (data) across buffers.
//!
//! Connections do not survive a snapshot: a restored device tells the guest with a
//! `TRANSPORT_RESET` event, as the spec asks, and the guest drops them.

pub mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use guestmem::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{pop_head, walk_chain, Chain, Cursor, QueueError};
use super::worker::{
    pause_thread, resume_thread, DeviceThread, StopSignal, WorkerError, WorkerLoop,
};
use super::{
    feature, read_config_bytes, ActivateError, ActiveQueue, DeviceSpecificState, VirtioDevice,
    VirtioInterrupt, VirtioInterruptType, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::bus::lock;
use muxer::{Muxer, TOKEN_LISTENER, TOKEN_STREAM_BASE};
use packet::{Header, HEADER_LEN};

/// The virtio device type.
pub const TYPE_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Queue size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// The event id of a transport reset (virtio 1.2 §5.10.6.5).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Most payload bytes put in one receive buffer.
pub const RX_PKT_MAX: usize = 64 << 10;

const FEATURES: u64 = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_INDIRECT_DESC);
const CONFIG_LEN: usize = 8;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_EXIT: u64 = 3;

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (must be 3 to 2^32-2)")]
    BadCid(u64),
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on vsock socket {0}: {1}")]
    Listen(PathBuf, #[source] io::Error),
    #[error("vsock host side: {0}")]
    Muxer(#[from] muxer::MuxerError),
    #[error("vsock worker: {0}")]
    Worker(#[source] io::Error),
}

/// The device's own state for snapshots (connections are not kept: see the module docs). The
/// Unix socket path is the host's business: a restored device listens where it was built to.
/// For a clone with another CID, see [`super::VirtioDeviceState::set_vsock_cid`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// Whether `cid` can be a guest's CID (3 to 2^32 - 2).
pub fn valid_guest_cid(cid: u64) -> bool {
    cid > HOST_CID && cid < u64::from(u32::MAX)
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    acked: u64,
    /// Send a transport reset event at the next activation (set by a restore).
    reset_event: bool,
    worker: Option<Worker>,
}

impl Vsock {
    /// A device for guest `cid`, listening for host clients on `uds_path` (a stale socket there
    /// is replaced; anything else there is an error).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !valid_guest_cid(cid) {
            return Err(VsockError::BadCid(cid));
        }
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket(uds_path.to_path_buf()));
            }
            let _ = std::fs::remove_file(uds_path);
        }
        let listener = UnixListener::bind(uds_path)
            .map_err(|e| VsockError::Listen(uds_path.to_path_buf(), e))?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            acked: 0,
            reset_event: false,
            worker: None,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The device's own state.
    pub fn vsock_state(&self) -> VsockState {
        VsockState {
            guest_cid: self.cid,
            uds_path: self.uds_path.clone(),
        }
    }

    /// Restore the device's own state into a new, inactive device; the guest will get a
    /// transport reset event when the device is activated.
    fn restore_vsock_state(&mut self, s: &VsockState) -> Result<(), ActivateError> {
        if s.guest_cid != self.cid {
            return Err(ActivateError::StateMismatch(format!(
                "guest CID {} saved, {} now",
                s.guest_cid, self.cid
            )));
        }
        self.reset_event = true;
        Ok(())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & FEATURES;
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let mut slots: [Option<ActiveQueue>; 3] = [None, None, None];
        for q in queues {
            if let Some(s) = slots.get_mut(usize::from(q.index)) {
                *s = Some(q);
            }
        }
        let [Some(rx), Some(tx), Some(ev)] = slots else {
            let missing = slots.iter().position(|s| s.is_none()).unwrap_or(0);
            return Err(ActivateError::MissingQueue(missing as u16));
        };
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let muxer = Muxer::new(self.cid, self.uds_path.clone(), Some(listener))
            .map_err(|e| ActivateError::Worker(io::Error::other(e)))?;
        let worker = Worker::spawn(
            muxer,
            [rx, tx, ev],
            mem,
            interrupt,
            std::mem::take(&mut self.reset_event),
        )
        .map_err(|e| match e {
            VsockError::Worker(e) => ActivateError::Worker(e),
            e => ActivateError::Worker(io::Error::other(e)),
        })?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.acked = 0;
    }

    fn queue_states(&self) -> Vec<(u16, QueueState)> {
        self.worker
            .as_ref()
            .map_or_else(Vec::new, |w| super::numbered_queue_states(&w.queues))
    }

    fn pause(&mut self) {
        // Connections stay open (the host's sockets buffer meanwhile).
        pause_thread(self.worker.as_mut().map(|w| &mut w.thread));
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_thread(self.worker.as_mut().map(|w| &mut w.thread))
    }

    fn device_state(&self) -> DeviceSpecificState {
        DeviceSpecificState::Vsock(self.vsock_state())
    }

    fn restore_device_state(&mut self, state: &DeviceSpecificState) -> Result<(), ActivateError> {
        match state {
            DeviceSpecificState::Vsock(v) => self.restore_vsock_state(v),
            other => Err(ActivateError::StateMismatch(format!(
                "vsock device state expected, {other:?} saved"
            ))),
        }
    }
}

/// The worker thread; dropping it stops the thread (closing every connection).
struct Worker {
    queues: Vec<Arc<Mutex<Queue>>>,
    thread: DeviceThread<VsockLoop>,
}

/// What the worker thread owns.
struct VsockLoop {
    state: WorkerState,
    notifiers: Vec<EventFd>,
}

impl WorkerLoop for VsockLoop {
    fn run(&mut self) {
        self.state.run(&self.notifiers);
    }
}

impl Worker {
    fn spawn(
        muxer: Muxer,
        queues: [ActiveQueue; 3],
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        reset_event: bool,
    ) -> Result<Worker, VsockError> {
        let mut notifiers = Vec::new();
        let mut shared = Vec::new();
        for q in queues {
            notifiers.push(q.notifier);
            shared.push(Arc::new(Mutex::new(q.queue)));
        }
        let queues = shared.clone();
        let thread = DeviceThread::spawn("virtio-vsock".into(), move |stop| {
            let fds = [
                (notifiers[RXQ].as_raw_fd(), TOKEN_RX),
                (notifiers[TXQ].as_raw_fd(), TOKEN_TX),
                (notifiers[EVQ].as_raw_fd(), TOKEN_EVENT),
                (stop.raw_fd(), TOKEN_EXIT),
            ];
            for (fd, token) in fds {
                muxer
                    .epoll()
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(WorkerError::Epoll)?;
            }
            let state = WorkerState {
                muxer,
                queues,
                mem,
                interrupt,
                chain: Chain::default(),
                payload: Vec::new(),
                staged: None,
                broken: false,
                reset_event,
                stop: Some(stop),
            };
            Ok(VsockLoop { state, notifiers })
        })
        .map_err(|e| VsockError::Worker(e.into()))?;
        Ok(Worker {
            queues: shared,
            thread,
        })
    }
}

/// What the worker thread owns; also usable without the thread (tests and fuzz targets call
/// [`WorkerState::serve_tx`] and [`WorkerState::serve_rx`] themselves).
pub struct WorkerState {
    pub muxer: Muxer,
    pub(crate) queues: Vec<Arc<Mutex<Queue>>>,
    pub(crate) mem: GuestMem,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    chain: Chain,
    payload: Vec<u8>,
    /// A packet taken from the muxer that no receive buffer has had room for yet.
    staged: Option<(Header, Vec<u8>)>,
    broken: bool,
    reset_event: bool,
    /// Raised to pause or stop the thread: passes end after the packet they are on.
    stop: Option<StopSignal>,
}

impl WorkerState {
    /// The worker's state over `queues`: receive, transmit (and events, unused here).
    pub fn new(
        muxer: Muxer,
        queues: Vec<Queue>,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> WorkerState {
        WorkerState {
            muxer,
            queues: queues
                .into_iter()
                .map(|q| Arc::new(Mutex::new(q)))
                .collect(),
            mem,
            interrupt,
            chain: Chain::default(),
            payload: Vec::new(),
            staged: None,
            broken: false,
            reset_event: false,
            stop: None,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(StopSignal::requested)
    }

    fn run(&mut self, notifiers: &[EventFd]) {
        self.serve_events();
        self.serve_tx();
        self.serve_rx();
        let mut events = [EpollEvent::default(); 32];
        loop {
            let timeout = self
                .muxer
                .tick(Instant::now())
                .map_or(-1, |d| d.as_millis().min(60_000) as i32 + 1);
            let n = match self.muxer.epoll().wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll: {e}; worker stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => return,
                    TOKEN_RX => {
                        let _ = notifiers[RXQ].read();
                    }
                    TOKEN_TX => {
                        let _ = notifiers[TXQ].read();
                        self.serve_tx();
                    }
                    TOKEN_EVENT => {
                        let _ = notifiers[EVQ].read();
                        self.serve_events();
                    }
                    t @ (TOKEN_LISTENER | TOKEN_STREAM_BASE..) => {
                        self.muxer.handle_event(t, ev.event_set())
                    }
                    _ => {}
                }
            }
            self.serve_rx();
        }
    }

    fn fatal(&mut self, q: usize, e: QueueError) {
        crate::warn_limited!("virtio-vsock queue {q}: {e}; device needs a reset");
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    fn notify(&self, q: usize) {
        let needed = lock(&self.queues[q]).needs_notification(&self.mem);
        if needed.unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(q as u16)) {
                tracing::warn!("virtio-vsock queue {q}: interrupt: {e}");
            }
        }
    }

    /// Take the guest's packets from the transmit queue.
    pub fn serve_tx(&mut self) {
        if self.broken {
            return;
        }
        let mut used = false;
        let queue = self.queues[TXQ].clone();
        let mut q = lock(&queue);
        // Bounded like process_queue: a pass ends even if the rings feed themselves.
        for _ in 0..q.size() {
            if self.stopping() {
                break;
            }
            let head = match pop_head(&mut q, &self.mem) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    drop(q);
                    return self.fatal(TXQ, e);
                }
            };
            walk_chain(&q, &self.mem, head, &mut self.chain);
            self.read_tx_packet();
            if let Err(e) = q.add_used(&self.mem, head, 0) {
                drop(q);
                return self.fatal(TXQ, QueueError::Ring(e.to_string()));
            }
            used = true;
        }
        drop(q);
        if used {
            self.notify(TXQ);
        }
    }

    fn read_tx_packet(&mut self) {
        if let Err(e) = self.chain.validate(&self.mem, usize::from(QUEUE_SIZE)) {
            tracing::debug!("virtio-vsock: bad transmit chain: {e}");
            return;
        }
        let mut r = Cursor::new(self.chain.readable(), u64::MAX);
        let mut raw = [0u8; HEADER_LEN];
        if r.read(&self.mem, &mut raw).is_err() {
            tracing::debug!("virtio-vsock: transmit chain shorter than a header");
            return;
        }
        let hdr = Header::from_bytes(&raw);
        let len = hdr.len as usize;
        if len > muxer::MAX_PKT_PAYLOAD || len as u64 > r.remaining() {
            tracing::debug!("virtio-vsock: packet length {len} does not fit; dropped");
            return;
        }
        self.payload.resize(len, 0);
        if r.read(&self.mem, &mut self.payload).is_err() {
            return;
        }
        self.muxer.send_pkt(&hdr, &self.payload);
    }

    /// Give the guest what the host side has for it, while it has receive buffers.
    pub fn serve_rx(&mut self) {
        if self.broken {
            return;
        }
        let mut used = false;
        let queue = self.queues[RXQ].clone();
        let mut q = lock(&queue);
        for _ in 0..q.size() {
            if self.stopping() {
                break;
            }
            if self.staged.is_none() {
                let mut payload = Vec::new();
                match self.muxer.recv_pkt(RX_PKT_MAX, &mut payload) {
                    Some(h) => self.staged = Some((h, payload)),
                    None => break,
                }
            }
            let head = match pop_head(&mut q, &self.mem) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    drop(q);
                    return self.fatal(RXQ, e);
                }
            };
            walk_chain(&q, &self.mem, head, &mut self.chain);
            let len = self.write_rx_packet();
            if let Err(e) = q.add_used(&self.mem, head, len) {
                drop(q);
                return self.fatal(RXQ, QueueError::Ring(e.to_string()));
            }
            used = true;
        }
        drop(q);
        if used {
            self.notify(RXQ);
        }
    }

    /// Write the staged packet (or as much of its data as fits) into the walked chain; returns
    /// the bytes written (0 for a chain that cannot hold a header).
    fn write_rx_packet(&mut self) -> u32 {
        if self
            .chain
            .validate(&self.mem, usize::from(QUEUE_SIZE))
            .is_err()
            || self.chain.writable_len < HEADER_LEN as u64
        {
            tracing::debug!("virtio-vsock: unusable receive chain");
            return 0;
        }
        let Some((mut hdr, mut payload)) = self.staged.take() else {
            return 0;
        };
        let room = (self.chain.writable_len - HEADER_LEN as u64).min(RX_PKT_MAX as u64) as usize;
        let rest = if payload.len() > room {
            if hdr.op != packet::OP_RW || room == 0 {
                // Only data can be split; a control packet waits for a big enough buffer.
                self.staged = Some((hdr, payload));
                return 0;
            }
            let rest = payload.split_off(room);
            let mut h = hdr;
            h.len = rest.len() as u32;
            Some((h, rest))
        } else {
            None
        };
        hdr.len = payload.len() as u32;
        let mut w = Cursor::new(self.chain.writable(), u64::MAX);
        if w.write(&self.mem, &hdr.to_bytes()).is_err() || w.write(&self.mem, &payload).is_err() {
            self.staged = rest;
            return 0;
        }
        self.staged = rest;
        (HEADER_LEN + payload.len()) as u32
    }

    /// Put a transport reset event in the event queue, if one is due.
    fn serve_events(&mut self) {
        if !self.reset_event || self.broken {
            return;
        }
        let queue = self.queues[EVQ].clone();
        let mut q = lock(&queue);
        let head = match pop_head(&mut q, &self.mem) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                drop(q);
                return self.fatal(EVQ, e);
            }
        };
        walk_chain(&q, &self.mem, head, &mut self.chain);
        let mut len = 0;
        if self
            .chain
            .validate(&self.mem, usize::from(QUEUE_SIZE))
            .is_ok()
        {
            if let Some(s) = self.chain.writable().next() {
                if s.len >= 4
                    && self
                        .mem
                        .write_obj(EVENT_TRANSPORT_RESET.to_le(), s.addr)
                        .is_ok()
                {
                    len = 4;
                    self.reset_event = false;
                }
            }
        }
        let r = q.add_used(&self.mem, head, len);
        drop(q);
        match r {
            Ok(()) => self.notify(EVQ),
            Err(e) => self.fatal(EVQ, QueueError::Ring(e.to_string())),
        }
    }
}
