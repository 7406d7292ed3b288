//! virtio-balloon: the memory balloon (virtio 1.2 §5.5).
//!
//! The host sets a target (`num_pages`, 4 KiB pages the guest should hand over); the guest
//! inflates towards it, sending the frame numbers of pages it gave up on the inflate queue, and
//! reports progress in `actual`. Inflated pages are *discarded*: their host memory is freed
//! (through [`DiscardMemory`], which the VMM implements with `madvise`), so the VMM's resident
//! memory drops; a guest touching them again gets fresh zero pages. Deflating needs no host
//! work and is only acknowledged.
//!
//! Options: the statistics queue (`STATS_VQ`: the guest's memory statistics, kept for the VMM,
//! refreshed on request), free page reporting (`REPORTING`: the guest reports free ranges,
//! which are discarded the same way) and `DEFLATE_ON_OOM`.
//!
//! The VMM keeps a [`BalloonHandle`] to change the target at run time (with a configuration
//! change interrupt), read `actual` and the statistics.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use guestmem::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{
    pop_head, process_queue_until, walk_chain, Chain, ChainHandler, Cursor, QueueError,
};
use super::worker::{
    pause_thread, resume_thread, DeviceThread, StopSignal, WorkerError, WorkerLoop,
};
use super::{
    feature, has_feature, read_config_bytes, ActivateError, ActiveQueue, DeviceSpecificState,
    VirtioDevice, VirtioInterrupt, VirtioInterruptType, VIRTIO_F_VERSION_1,
};
use crate::bus::lock;

/// The virtio device type.
pub const TYPE_BALLOON: u32 = 5;
/// Feature bits.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// The balloon's page size (the protocol's, whatever the guest's).
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// Queue size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of one statistics entry: tag (u16) and value (u64), packed.
pub const STAT_ENTRY_LEN: usize = 10;
/// Most statistics entries read from one buffer.
pub const MAX_STATS: usize = 64;

const CONFIG_LEN: usize = 8;
const TOKEN_EXIT: u64 = 100;
const TOKEN_STATS_REQUEST: u64 = 101;

/// Errors of the balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("balloon worker: {0}")]
    Worker(#[source] io::Error),
    #[error("the balloon is not active (no driver)")]
    NotActive,
}

/// Frees the host memory behind guest-physical ranges; the VMM's implementation calls
/// `madvise`. Devices know nothing of how.
pub trait DiscardMemory: Send + Sync {
    /// Discard `len` bytes at `addr` (both multiples of 4 KiB): they read as zero afterwards.
    fn discard(&self, mem: &GuestMem, addr: GuestAddress, len: u64) -> io::Result<()>;
}

/// Options of a balloon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Initial target in bytes (rounded down to 4 KiB pages).
    pub target: u64,
    pub stats: bool,
    pub free_page_reporting: bool,
    pub deflate_on_oom: bool,
}

/// The guest's memory statistics (virtio 1.2 §5.5.6.3), as last reported. Values are bytes
/// for the memory tags, counts otherwise; `None` when the guest did not send the tag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    /// Tags this device does not name.
    pub other: Vec<(u16, u64)>,
}

impl BalloonStats {
    fn set(&mut self, tag: u16, val: u64) {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            _ => {
                self.other.push((tag, val));
                return;
            }
        };
        *slot = Some(val);
    }
}

/// The balloon's state for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub num_pages: u32,
    pub actual: u32,
    pub stats: Option<BalloonStats>,
    /// The head of the statistics buffer the device holds until the VMM asks for fresh
    /// statistics (the driver waits for it to come back before it sends more).
    pub stats_desc_head: Option<u16>,
    pub inflated_pages: u64,
    pub reported_bytes: u64,
}

/// What the device, its worker and the VMM's handle share.
struct Shared {
    num_pages: u32,
    actual: u32,
    stats: Option<BalloonStats>,
    /// Pages discarded through the inflate queue, bytes through free page reporting.
    inflated_pages: u64,
    reported_bytes: u64,
    /// The statistics buffer held (its descriptor head).
    stats_head: Option<u16>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

/// The VMM's handle on a balloon.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Mutex<Shared>>,
    stats_request: Arc<EventFd>,
}

impl BalloonHandle {
    /// Ask the guest to hand over `bytes` (rounded down to 4 KiB pages, capped at 2^32-1 pages);
    /// an active driver is told with a configuration change interrupt.
    pub fn set_target(&self, bytes: u64) {
        let pages = u32::try_from(bytes / BALLOON_PAGE_SIZE).unwrap_or(u32::MAX);
        let mut s = lock(&self.shared);
        s.num_pages = pages;
        if let Some(i) = &s.interrupt {
            if let Err(e) = i.trigger(VirtioInterruptType::Config) {
                tracing::warn!("virtio-balloon: config interrupt: {e}");
            }
        }
    }

    /// The target in bytes.
    pub fn target(&self) -> u64 {
        u64::from(lock(&self.shared).num_pages) * BALLOON_PAGE_SIZE
    }

    /// What the guest says it has handed over, in bytes.
    pub fn actual(&self) -> u64 {
        u64::from(lock(&self.shared).actual) * BALLOON_PAGE_SIZE
    }

    /// The last statistics the guest sent.
    pub fn stats(&self) -> Option<BalloonStats> {
        lock(&self.shared).stats.clone()
    }

    /// Ask the guest for fresh statistics (they arrive asynchronously in [`Self::stats`]).
    pub fn request_stats(&self) -> Result<(), BalloonError> {
        if lock(&self.shared).interrupt.is_none() {
            return Err(BalloonError::NotActive);
        }
        self.stats_request.write(1).map_err(BalloonError::Worker)
    }

    /// The state for snapshots.
    pub fn state(&self) -> BalloonState {
        let s = lock(&self.shared);
        BalloonState {
            num_pages: s.num_pages,
            actual: s.actual,
            stats: s.stats.clone(),
            stats_desc_head: s.stats_head,
            inflated_pages: s.inflated_pages,
            reported_bytes: s.reported_bytes,
        }
    }
}

/// The balloon device.
pub struct Balloon {
    features: u64,
    acked: u64,
    queue_sizes: Vec<u16>,
    handle: BalloonHandle,
    discard: Arc<dyn DiscardMemory>,
    worker: Option<Worker>,
}

impl Balloon {
    pub fn new(
        opts: BalloonOptions,
        discard: Arc<dyn DiscardMemory>,
    ) -> Result<Balloon, BalloonError> {
        let mut features = feature(VIRTIO_F_VERSION_1);
        // inflateq, deflateq, then statsq and reporting_vq when offered (Linux numbers the
        // queues it uses consecutively, skipping those of features not negotiated).
        let mut queues = 2;
        if opts.stats {
            features |= feature(VIRTIO_BALLOON_F_STATS_VQ);
            queues += 1;
        }
        if opts.deflate_on_oom {
            features |= feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
        }
        if opts.free_page_reporting {
            features |= feature(VIRTIO_BALLOON_F_REPORTING);
            queues += 1;
        }
        let stats_request = EventFd::new(EFD_NONBLOCK).map_err(BalloonError::Worker)?;
        let shared = Shared {
            num_pages: u32::try_from(opts.target / BALLOON_PAGE_SIZE).unwrap_or(u32::MAX),
            actual: 0,
            stats: None,
            inflated_pages: 0,
            reported_bytes: 0,
            stats_head: None,
            interrupt: None,
        };
        Ok(Balloon {
            features,
            acked: 0,
            queue_sizes: vec![QUEUE_SIZE; queues],
            handle: BalloonHandle {
                shared: Arc::new(Mutex::new(shared)),
                stats_request: Arc::new(stats_request),
            },
            discard,
            worker: None,
        })
    }

    /// The VMM's handle.
    pub fn handle(&self) -> BalloonHandle {
        self.handle.clone()
    }

    /// The balloon's state for snapshots.
    pub fn balloon_state(&self) -> BalloonState {
        self.handle.state()
    }

    /// Restore a snapshot's balloon state into an inactive device with the same options,
    /// whose features are restored.
    fn restore_balloon_state(&mut self, st: &BalloonState) -> Result<(), ActivateError> {
        if st.stats_desc_head.is_some_and(|h| h >= QUEUE_SIZE)
            || (st.stats_desc_head.is_some() && !has_feature(self.acked, VIRTIO_BALLOON_F_STATS_VQ))
        {
            return Err(ActivateError::StateMismatch(
                "saved statistics buffer is not possible here".into(),
            ));
        }
        let mut s = lock(&self.handle.shared);
        s.num_pages = st.num_pages;
        s.actual = st.actual;
        s.stats = st.stats.clone();
        s.stats_head = st.stats_desc_head;
        s.inflated_pages = st.inflated_pages;
        s.reported_bytes = st.reported_bytes;
        Ok(())
    }

    /// Which role each queue index has, given the negotiated features.
    fn roles(&self) -> Vec<Role> {
        let mut r = vec![Role::Inflate, Role::Deflate];
        if has_feature(self.acked, VIRTIO_BALLOON_F_STATS_VQ) {
            r.push(Role::Stats);
        }
        if has_feature(self.acked, VIRTIO_BALLOON_F_REPORTING) {
            r.push(Role::Reporting);
        }
        r
    }
}

/// What a balloon queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = lock(&self.handle.shared);
        let mut config = [0u8; CONFIG_LEN];
        config[0..4].copy_from_slice(&s.num_pages.to_le_bytes());
        config[4..8].copy_from_slice(&s.actual.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, 4 bytes) is the driver's to write; partial writes update the
        // bytes they cover.
        let mut s = lock(&self.handle.shared);
        let mut actual = s.actual.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(o @ 4..=7) => actual[o as usize - 4] = *b,
                _ => tracing::debug!("virtio-balloon: config write at {offset:#x} ignored"),
            }
        }
        s.actual = u32::from_le_bytes(actual);
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
        let roles = self.roles();
        let mut served = Vec::new();
        for q in queues {
            match roles.get(usize::from(q.index)) {
                Some(&role) => served.push((role, q)),
                None => tracing::debug!("virtio-balloon: queue {} unused", q.index),
            }
        }
        for (i, _) in roles.iter().enumerate() {
            if !served.iter().any(|(_, q)| usize::from(q.index) == i) {
                return Err(ActivateError::MissingQueue(i as u16));
            }
        }
        lock(&self.handle.shared).interrupt = Some(interrupt.clone());
        let worker = Worker::spawn(
            served,
            mem,
            interrupt,
            self.handle.clone(),
            self.discard.clone(),
        )
        .map_err(|e| ActivateError::Worker(e.into()))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.acked = 0;
        let mut s = lock(&self.handle.shared);
        s.interrupt = None;
        s.actual = 0;
        s.stats_head = None;
    }

    fn queue_states(&self) -> Vec<(u16, QueueState)> {
        match &self.worker {
            Some(w) => w
                .queues
                .iter()
                .map(|(i, q)| (*i, lock(q).state()))
                .collect(),
            None => Vec::new(),
        }
    }

    fn pause(&mut self) {
        // The held statistics buffer stays held; a statistics request waits for the resume.
        pause_thread(self.worker.as_mut().map(|w| &mut w.thread));
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        resume_thread(self.worker.as_mut().map(|w| &mut w.thread))
    }

    fn device_state(&self) -> DeviceSpecificState {
        DeviceSpecificState::Balloon(self.balloon_state())
    }

    fn restore_device_state(&mut self, state: &DeviceSpecificState) -> Result<(), ActivateError> {
        match state {
            DeviceSpecificState::Balloon(b) => self.restore_balloon_state(b),
            other => Err(ActivateError::StateMismatch(format!(
                "balloon state expected, {other:?} saved"
            ))),
        }
    }
}

/// Inflate, deflate and reporting chains.
pub struct PagesHandler {
    role: Role,
    handle: BalloonHandle,
    discard: Arc<dyn DiscardMemory>,
}

impl PagesHandler {
    /// The handler of a queue with `role` (not [`Role::Stats`]: see [`serve_stats`]), counting
    /// in `handle` and discarding through `discard`.
    pub fn new(role: Role, handle: BalloonHandle, discard: Arc<dyn DiscardMemory>) -> Self {
        PagesHandler {
            role,
            handle,
            discard,
        }
    }

    fn discard_range(&self, mem: &GuestMem, start: u64, len: u64) {
        if let Err(e) = self.discard.discard(mem, GuestAddress(start), len) {
            tracing::debug!("virtio-balloon: discard {start:#x}+{len:#x}: {e}");
        }
    }

    /// Inflate: the readable buffers are little-endian u32 frame numbers; runs of consecutive
    /// frames are discarded together.
    fn inflate(&self, mem: &GuestMem, chain: &Chain) -> u64 {
        let mut r = Cursor::new(chain.readable(), chain.readable_len);
        let mut run: Option<(u64, u64)> = None;
        let mut pages = 0;
        let mut pfn = [0u8; 4];
        while r.remaining() >= 4 && r.read(mem, &mut pfn).is_ok() {
            let addr = u64::from(u32::from_le_bytes(pfn)) * BALLOON_PAGE_SIZE;
            pages += 1;
            run = match run {
                Some((start, len)) if start + len == addr => Some((start, len + BALLOON_PAGE_SIZE)),
                Some((start, len)) => {
                    self.discard_range(mem, start, len);
                    Some((addr, BALLOON_PAGE_SIZE))
                }
                None => Some((addr, BALLOON_PAGE_SIZE)),
            };
        }
        if let Some((start, len)) = run {
            self.discard_range(mem, start, len);
        }
        pages
    }
}

impl ChainHandler for PagesHandler {
    fn handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> u32 {
        if let Err(e) = chain.validate(mem, usize::from(QUEUE_SIZE)) {
            tracing::debug!("virtio-balloon: bad chain: {e}");
            return 0;
        }
        match self.role {
            Role::Inflate => {
                let pages = self.inflate(mem, chain);
                lock(&self.handle.shared).inflated_pages += pages;
            }
            Role::Reporting => {
                // Each buffer is a free range (device-writable by the spec's convention).
                let mut bytes = 0;
                for s in chain.segments.iter() {
                    let start = s.addr.raw_value();
                    let len = u64::from(s.len);
                    if start.is_multiple_of(BALLOON_PAGE_SIZE)
                        && len.is_multiple_of(BALLOON_PAGE_SIZE)
                    {
                        self.discard_range(mem, start, len);
                        bytes += len;
                    }
                }
                lock(&self.handle.shared).reported_bytes += bytes;
            }
            Role::Deflate | Role::Stats => {}
        }
        0
    }
}

/// Parse a statistics buffer.
fn read_stats(mem: &GuestMem, chain: &mut Chain) -> Option<BalloonStats> {
    chain.validate(mem, usize::from(QUEUE_SIZE)).ok()?;
    let mut r = Cursor::new(chain.readable(), (MAX_STATS * STAT_ENTRY_LEN) as u64);
    let mut stats = BalloonStats::default();
    let mut entry = [0u8; STAT_ENTRY_LEN];
    while r.remaining() >= STAT_ENTRY_LEN as u64 && r.read(mem, &mut entry).is_ok() {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&entry[2..]);
        stats.set(tag, u64::from_le_bytes(v));
    }
    Some(stats)
}

struct Worker {
    queues: Vec<(u16, Arc<Mutex<Queue>>)>,
    thread: DeviceThread<BalloonLoop>,
}

/// One served queue: its role, the queue, its notification eventfd and its handler.
type Served = (Role, Arc<Mutex<Queue>>, EventFd, PagesHandler);

/// What the worker thread owns.
struct BalloonLoop {
    loops: HashMap<u16, Served>,
    epoll: Epoll,
    stop: StopSignal,
    mem: GuestMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    handle: BalloonHandle,
    chain: Chain,
    broken: bool,
}

impl Worker {
    fn spawn(
        served: Vec<(Role, ActiveQueue)>,
        mem: GuestMem,
        interrupt: Arc<dyn VirtioInterrupt>,
        handle: BalloonHandle,
        discard: Arc<dyn DiscardMemory>,
    ) -> Result<Worker, WorkerError> {
        let mut queues = Vec::new();
        let mut loops = HashMap::new();
        for (role, q) in served {
            let shared = Arc::new(Mutex::new(q.queue));
            queues.push((q.index, shared.clone()));
            let handler = PagesHandler::new(role, handle.clone(), discard.clone());
            loops.insert(q.index, (role, shared, q.notifier, handler));
        }
        let thread = DeviceThread::spawn("virtio-balloon".into(), move |stop| {
            let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
            let add = |fd, token| {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(WorkerError::Epoll)
            };
            add(stop.raw_fd(), TOKEN_EXIT)?;
            add(handle.stats_request.as_raw_fd(), TOKEN_STATS_REQUEST)?;
            for (index, (_, _, notifier, _)) in &loops {
                add(notifier.as_raw_fd(), u64::from(*index))?;
            }
            Ok(BalloonLoop {
                loops,
                epoll,
                stop,
                mem,
                interrupt,
                handle,
                chain: Chain::default(),
                broken: false,
            })
        })?;
        Ok(Worker { queues, thread })
    }
}

impl BalloonLoop {
    /// Serve queue `index`; returns whether its pass stopped at its budget.
    fn serve(&mut self, index: u16) -> bool {
        let Some((role, q, _, handler)) = self.loops.get_mut(&index) else {
            return false;
        };
        let mut again = false;
        let mut q = lock(q);
        let r = if *role == Role::Stats {
            serve_stats(
                &mut q,
                &self.mem,
                &mut self.chain,
                &self.handle,
                self.stop.flag(),
            )
        } else {
            process_queue_until(
                &mut q,
                &self.mem,
                &mut self.chain,
                handler,
                self.stop.flag(),
            )
            .map(|p| {
                again = p.pending;
                p.notify
            })
        };
        drop(q);
        match r {
            Ok(true) => {
                if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(index)) {
                    tracing::warn!("virtio-balloon: interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => {
                crate::warn_limited!("virtio-balloon queue {index}: {e}; device needs a reset");
                self.broken = true;
                self.interrupt.set_needs_reset();
            }
        }
        again
    }

    /// The VMM asked for statistics: give the held buffer back, the driver refills and
    /// re-queues it.
    fn stats_requested(&mut self) {
        let _ = self.handle.stats_request.read();
        if self.broken {
            return;
        }
        let Some(head) = lock(&self.handle.shared).stats_head.take() else {
            return;
        };
        let stats = self.loops.iter().find(|(_, l)| l.0 == Role::Stats);
        if let Some((&index, (_, q, _, _))) = stats {
            if lock(q).add_used(&self.mem, head, 0).is_ok() {
                let _ = self.interrupt.trigger(VirtioInterruptType::Queue(index));
            }
        }
    }
}

impl WorkerLoop for BalloonLoop {
    fn run(&mut self) {
        let mut events = [EpollEvent::default(); 8];
        // Chains queued before the thread (re)started.
        let mut pending: Vec<u16> = self.loops.keys().copied().collect();
        let mut again: Vec<u16> = Vec::new();
        loop {
            for index in std::mem::take(&mut pending) {
                if self.broken || self.stop.requested() {
                    break;
                }
                if self.serve(index) {
                    // Budget reached: serve again after checking for a stop.
                    again.push(index);
                }
            }
            let timeout = if again.is_empty() { -1 } else { 0 };
            pending.append(&mut again);
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-balloon: epoll: {e}; worker stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => return,
                    TOKEN_STATS_REQUEST => self.stats_requested(),
                    t => {
                        let index = t as u16;
                        if let Some((_, _, notifier, _)) = self.loops.get(&index) {
                            let _ = notifier.read();
                            pending.push(index);
                        }
                    }
                }
            }
        }
    }
}

/// The statistics queue: the driver's buffer is read, then held (its head in
/// `stats_head`) until the VMM asks for fresh statistics (virtio 1.2 §5.5.6.3). Returns
/// whether to interrupt the driver.
pub fn serve_stats(
    q: &mut Queue,
    mem: &GuestMem,
    chain: &mut Chain,
    handle: &BalloonHandle,
    stop: &AtomicBool,
) -> Result<bool, QueueError> {
    let mut notify = false;
    for _ in 0..q.size() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Some(head) = pop_head(q, mem)? else {
            break;
        };
        // A buffer already held is given back: the driver must not have two outstanding.
        let old = lock(&handle.shared).stats_head.take();
        if let Some(old) = old {
            q.add_used(mem, old, 0)
                .map_err(|e| QueueError::Ring(e.to_string()))?;
            notify = true;
        }
        walk_chain(q, mem, head, chain);
        let stats = read_stats(mem, chain);
        let mut s = lock(&handle.shared);
        if let Some(stats) = stats {
            s.stats = Some(stats);
        }
        s.stats_head = Some(head);
    }
    Ok(notify)
}

/// A [`DiscardMemory`] that only writes zeroes (no memory is given back): for tests and for
/// hosts where discarding is not possible.
pub struct ZeroFill;

impl DiscardMemory for ZeroFill {
    fn discard(&self, mem: &GuestMem, addr: GuestAddress, len: u64) -> io::Result<()> {
        let zero = [0u8; BALLOON_PAGE_SIZE as usize];
        let mut at = 0;
        while at < len {
            let a = addr
                .checked_add(at)
                .ok_or_else(|| io::Error::other("address overflow"))?;
            mem.write_slice(&zero, a).map_err(io::Error::other)?;
            at += BALLOON_PAGE_SIZE;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{mem, CountingInterrupt, TestQueue, R, W};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    /// Records what is discarded, and zero-fills it.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u64)>>);

    impl DiscardMemory for Recorder {
        fn discard(&self, mem: &GuestMem, addr: GuestAddress, len: u64) -> io::Result<()> {
            lock(&self.0).push((addr.raw_value(), len));
            ZeroFill.discard(mem, addr, len)
        }
    }

    fn eventfd() -> (EventFd, EventFd) {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        let k = e.try_clone().unwrap();
        (e, k)
    }

    struct Setup<'a> {
        queues: Vec<TestQueue<'a>>,
        kicks: Vec<EventFd>,
        dev: Balloon,
        rec: Arc<Recorder>,
        int: Arc<CountingInterrupt>,
    }

    fn setup(m: &GuestMem, opts: BalloonOptions, ack: u64) -> Setup<'_> {
        let rec = Arc::new(Recorder::default());
        let mut dev = Balloon::new(opts, rec.clone()).unwrap();
        dev.ack_features(ack);
        let n = dev.roles().len();
        let mut queues = Vec::new();
        let mut active = Vec::new();
        let mut kicks = Vec::new();
        for i in 0..n {
            let tq = TestQueue::new_at(m, 16, 0x10000 * i as u64);
            let (e, k) = eventfd();
            active.push(ActiveQueue {
                index: i as u16,
                queue: tq.queue(),
                notifier: e,
            });
            kicks.push(k);
            queues.push(tq);
        }
        let int = Arc::new(CountingInterrupt::default());
        dev.activate(m.clone(), int.clone(), active).unwrap();
        Setup {
            queues,
            kicks,
            dev,
            rec,
            int,
        }
    }

    fn all_features() -> BalloonOptions {
        BalloonOptions {
            target: 64 << 20,
            stats: true,
            free_page_reporting: true,
            deflate_on_oom: true,
        }
    }

    #[test]
    fn config_target_and_actual() {
        let m = mem();
        let mut s = setup(&m, all_features(), feature(VIRTIO_F_VERSION_1));
        assert_eq!(s.dev.queue_max_sizes().len(), 4);
        assert!(has_feature(
            s.dev.features(),
            VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        ));
        let mut c = [0u8; 8];
        s.dev.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes(c[0..4].try_into().unwrap()), 16384);
        s.dev.write_config(4, &100u32.to_le_bytes());
        s.dev.write_config(0, &[9, 9]); // num_pages is the device's: ignored
        let h = s.dev.handle();
        assert_eq!((h.target(), h.actual()), (64 << 20, 100 * 4096));
        h.set_target(1 << 20);
        s.dev.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes(c[0..4].try_into().unwrap()), 256);
        assert_eq!(s.int.config.load(Ordering::SeqCst), 1);
        // Without the stats feature the stats request has no queue, but no harm.
        let st = s.dev.balloon_state();
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<BalloonState>(&json).unwrap(), st);
        s.dev.reset();
        assert!(h.request_stats().is_err());
        let mut fresh = Balloon::new(all_features(), s.rec.clone()).unwrap();
        fresh.restore_balloon_state(&st).unwrap();
        assert_eq!(fresh.handle().actual(), 100 * 4096);
    }

    #[test]
    fn inflated_pages_are_discarded_in_runs() {
        let m = mem();
        let s = setup(&m, all_features(), feature(VIRTIO_F_VERSION_1));
        m.write_slice(&[0xaa; 0x4000], GuestAddress(0x100000))
            .unwrap();
        let pfns: Vec<u8> = [0x100u32, 0x101, 0x102, 0x200, 0xffff_ffff]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        m.write_slice(&pfns, GuestAddress(0x80000)).unwrap();
        let mut inflate = TestQueue::new_at(&m, 16, 0);
        inflate.add_chain(&[(0x80000, pfns.len() as u32, R)]);
        s.kicks[0].write(1).unwrap();
        s.queues[0].wait_used(1);
        assert_eq!(
            *lock(&s.rec.0),
            [
                (0x100000, 0x3000),
                (0x200000, 0x1000),
                (0xffff_ffff000, 0x1000)
            ]
        );
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(0x102ffc)).unwrap();
        assert_eq!(b, [0; 4]);
        m.read_slice(&mut b, GuestAddress(0x103000)).unwrap();
        assert_eq!(b, [0xaa; 4]);
        assert_eq!(s.dev.balloon_state().inflated_pages, 5);
        // Deflate: acknowledged, nothing discarded.
        let mut deflate = TestQueue::new_at(&m, 16, 0x10000);
        deflate.add_chain(&[(0x80000, 8, R)]);
        s.kicks[1].write(1).unwrap();
        s.queues[1].wait_used(1);
        assert_eq!(lock(&s.rec.0).len(), 3);
        assert!(s.int.queue.load(Ordering::SeqCst) >= 2);
    }

    #[test]
    fn malformed_inflate_chains_are_used_and_ignored() {
        let m = mem();
        let s = setup(&m, BalloonOptions::default(), feature(VIRTIO_F_VERSION_1));
        let mut q = TestQueue::new_at(&m, 16, 0);
        m.write_slice(&[0x10, 0, 0, 0, 7, 7], GuestAddress(0x80000))
            .unwrap();
        q.add_chain(&[(0x80000, 6, R)]); // one PFN and 2 stray bytes
        q.add_chain(&[(0xffff_0000_0000, 8, R)]); // outside memory
        q.add_chain(&[(0x80000, 8, W)]); // nothing readable
        s.kicks[0].write(1).unwrap();
        s.queues[0].wait_used(3);
        q.add_raw(&[(0x80000, 8, R | 1, 0)]); // loop
        s.kicks[0].write(1).unwrap();
        s.queues[0].wait_used(4);
        assert_eq!(*lock(&s.rec.0), [(0x10000, 0x1000)]);
        assert!(!*s.int.needs_reset.lock().unwrap());
    }

    #[test]
    fn stats_are_kept_and_refreshed_on_request() {
        let m = mem();
        let s = setup(
            &m,
            all_features(),
            feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BALLOON_F_STATS_VQ),
        );
        let mut buf = Vec::new();
        for (tag, val) in [(4u16, 1000u64), (5, 2000), (77, 1)] {
            buf.extend(tag.to_le_bytes());
            buf.extend(val.to_le_bytes());
        }
        m.write_slice(&buf, GuestAddress(0x90000)).unwrap();
        let mut q = TestQueue::new_at(&m, 16, 0x20000);
        q.add_chain(&[(0x90000, buf.len() as u32 + 3, R)]);
        s.kicks[2].write(1).unwrap();
        let h = s.dev.handle();
        let start = Instant::now();
        while h.stats().is_none() {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        let st = h.stats().unwrap();
        assert_eq!((st.free_memory, st.total_memory), (Some(1000), Some(2000)));
        assert_eq!(st.other, [(77, 1)]);
        assert_eq!(q.used_idx(), 0, "the buffer is held");
        h.request_stats().unwrap();
        q.wait_used(1);
    }

    #[test]
    fn reported_free_ranges_are_discarded() {
        let m = mem();
        // Without stats the reporting queue is queue 2.
        let s = setup(
            &m,
            all_features(),
            feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BALLOON_F_REPORTING),
        );
        assert_eq!(s.queues.len(), 3);
        let mut q = TestQueue::new_at(&m, 16, 0x20000);
        q.add_chain(&[
            (0x100000, 0x4000, W),
            (0x200100, 0x1000, W),
            (0x300000, 0x2000, W),
        ]);
        s.kicks[2].write(1).unwrap();
        s.queues[2].wait_used(1);
        assert_eq!(*lock(&s.rec.0), [(0x100000, 0x4000), (0x300000, 0x2000)]);
        assert_eq!(s.dev.balloon_state().reported_bytes, 0x6000);
    }

    #[test]
    fn missing_queues_refuse_activation() {
        let m = mem();
        let rec = Arc::new(Recorder::default());
        let mut dev = Balloon::new(all_features(), rec).unwrap();
        dev.ack_features(feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BALLOON_F_STATS_VQ));
        let tq = TestQueue::new(&m, 16);
        let (e, _k) = eventfd();
        let r = dev.activate(
            m.clone(),
            Arc::new(CountingInterrupt::default()),
            vec![ActiveQueue {
                index: 0,
                queue: tq.queue(),
                notifier: e,
            }],
        );
        assert!(matches!(r, Err(ActivateError::MissingQueue(1))));
    }
}
