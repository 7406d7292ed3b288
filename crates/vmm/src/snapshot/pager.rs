//! Restoring memory through userfaultfd (`--restore-memory uffd`): guest RAM is anonymous
//! private memory registered with a [`Userfault`], and a thread of this process (the pager)
//! fills each page on its first touch from the snapshot's memory file.
//!
//! - A fault fills the aligned [`CHUNK`] around it (pages not yet served): runs of data with
//!   `UFFDIO_COPY`, runs of zeroes (holes in the file) with `UFFDIO_ZEROPAGE`.
//! - The pager remembers every page it served. A discard (balloon inflation, free page
//!   reporting: `MADV_DONTNEED`) is announced to it first (`UFFD_EVENT_REMOVE`) and marks the
//!   range served; a page served before that faults again and gets zeroes, never the file's
//!   old contents, as with ordinary anonymous memory.
//! - [`Pager::populate`] serves every data page still missing (before a snapshot or a
//!   migration of the restored VM, which read only resident pages).
//! - The pager stops when the [`Pager`] drops (the machine ends), logging its counters; a
//!   failure to serve (the file became unreadable) ends the VM with an error through
//!   [`Pager::on_error`].
//! - Where pages come from is a [`PageSource`]: the snapshot's memory file ([`FileSource`]),
//!   or, for a post-copy migration, the source host (`migration::postcopy`), whose pages
//!   arrive asynchronously through a descriptor the pager polls.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use guestmem::GuestMem;
use hypervisor::mem::PAGE_SIZE;
use hypervisor::uffd::{UffdEvent, Userfault};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{DiffFile, MemoryError, MemoryRegionInfo};

/// Bytes served around a fault (aligned): 64 pages.
pub const CHUNK: u64 = 256 << 10;

/// What the pager did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Faults served (each fills up to a chunk).
    pub faults: u64,
    /// Pages filled with the file's data.
    pub copied_pages: u64,
    /// Pages filled with zeroes (holes in the file, discarded pages).
    pub zero_pages: u64,
    /// Pages the guest discarded (they come back as zeroes).
    pub removed_pages: u64,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    copied: AtomicU64,
    zero: AtomicU64,
    removed: AtomicU64,
}

impl Counters {
    fn get(&self) -> PagerStats {
        PagerStats {
            faults: self.faults.load(Ordering::Relaxed),
            copied_pages: self.copied.load(Ordering::Relaxed),
            zero_pages: self.zero.load(Ordering::Relaxed),
            removed_pages: self.removed.load(Ordering::Relaxed),
        }
    }
}

type ErrorSink = Box<dyn Fn(String) + Send>;

/// What arrived at a [`PageSource`]: pages (`guest address`, whole pages of bytes) and
/// whether the source is done.
pub type Arrived = (Vec<(u64, Vec<u8>)>, bool);

/// Where the pager's pages come from.
pub trait PageSource: Send {
    /// Wants the pages of `start..start + buf.len()` (one region) for which `need` holds:
    /// either reads them into `buf` and returns true (all of `buf`: pages not needed may hold
    /// anything), or asks for them and returns false (they come through
    /// [`PageSource::arrived`]).
    fn fetch(&mut self, start: u64, buf: &mut [u8], need: &[bool]) -> Result<bool, String>;

    /// A descriptor that becomes readable when pages arrive, if pages arrive at all.
    fn arrivals(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Reads what arrived: pages (`guest address`, `bytes`, whole pages), and whether the
    /// source is done (every page it owed has come; its descriptor is not polled again).
    fn arrived(&mut self) -> Result<Arrived, String> {
        Ok((Vec::new(), true))
    }

    /// The first guest address at or after `at` inside `r` whose page may hold data (a
    /// populate pass serves the chunk there), or none.
    fn next_data(&mut self, r: &MemoryRegionInfo, at: u64) -> Result<Option<u64>, String>;
}

/// Pages from a snapshot's memory file (holes are zeroes), with the data of a chain of diff
/// snapshots over it (a diff's holes mean "as in the older files").
pub struct FileSource {
    file: File,
    /// The diffs, oldest first.
    diffs: Vec<DiffFile>,
    regions: Vec<MemoryRegionInfo>,
}

impl FileSource {
    /// The extents of diff `d` that overlap `start..end`.
    fn overlapping(&self, d: usize, start: u64, end: u64) -> &[(u64, u64, u64)] {
        let e = &self.diffs[d].extents;
        let first = e.partition_point(|&(g, _, len)| g + len <= start);
        let last = e.partition_point(|&(g, _, _)| g < end);
        &e[first..last.max(first)]
    }
}

impl PageSource for FileSource {
    fn fetch(&mut self, start: u64, buf: &mut [u8], _need: &[bool]) -> Result<bool, String> {
        let r = self
            .regions
            .iter()
            .find(|r| (r.guest_addr..r.guest_addr + r.size).contains(&start))
            .ok_or_else(|| format!("no memory region at {start:#x}"))?;
        self.file
            .read_exact_at(buf, r.file_offset + (start - r.guest_addr))
            .map_err(|e| format!("reading the memory file at guest {start:#x}: {e}"))?;
        let end = start + buf.len() as u64;
        for d in 0..self.diffs.len() {
            for &(g, off, len) in self.overlapping(d, start, end) {
                let (lo, hi) = (g.max(start), (g + len).min(end));
                let into = &mut buf[(lo - start) as usize..(hi - start) as usize];
                self.diffs[d]
                    .file
                    .read_exact_at(into, off + (lo - g))
                    .map_err(|e| format!("reading a diff memory file at guest {lo:#x}: {e}"))?;
            }
        }
        Ok(true)
    }

    fn next_data(&mut self, r: &MemoryRegionInfo, at: u64) -> Result<Option<u64>, String> {
        use nix::unistd::{lseek, Whence};
        let off = r.file_offset + (at - r.guest_addr);
        let end = r.guest_addr + r.size;
        let mut next = match lseek(&self.file, off as i64, Whence::SeekData) {
            Ok(d) if d as u64 >= r.file_offset + r.size => None,
            Ok(d) => Some(r.guest_addr + (d as u64 - r.file_offset) / PAGE_SIZE * PAGE_SIZE),
            Err(nix::Error::ENXIO) => None,
            Err(e) => return Err(format!("seeking data in the memory file: {e}")),
        };
        for d in 0..self.diffs.len() {
            if let Some(&(g, _, _)) = self.overlapping(d, at, end).first() {
                let g = g.max(at) / PAGE_SIZE * PAGE_SIZE;
                next = Some(next.map_or(g, |n| n.min(g)));
            }
        }
        Ok(next)
    }
}

/// The userfaultfd pager of a restored VM; stops when dropped.
pub struct Pager {
    stop: Arc<EventFd>,
    requests: mpsc::Sender<mpsc::Sender<Result<(), String>>>,
    wake: Arc<EventFd>,
    counters: Arc<Counters>,
    on_error: Arc<Mutex<Option<ErrorSink>>>,
    thread: Option<JoinHandle<()>>,
}

/// Which pages were served (or discarded), one bit per page, per region.
struct Served {
    regions: Vec<(u64, u64, Vec<u64>)>,
}

impl Served {
    /// Nothing served yet, or (with `served`) the pages for which `served(guest)` holds
    /// count as served already (present, or zero if they fault).
    fn new(regions: &[MemoryRegionInfo], served: Option<&dyn Fn(u64) -> bool>) -> Served {
        let mut s = Served::empty(regions);
        if let Some(f) = served {
            for r in regions {
                for p in (r.guest_addr..r.guest_addr + r.size).step_by(PAGE_SIZE as usize) {
                    if f(p) {
                        s.set(p, PAGE_SIZE);
                    }
                }
            }
        }
        s
    }

    fn empty(regions: &[MemoryRegionInfo]) -> Served {
        Served {
            regions: regions
                .iter()
                .map(|r| {
                    let pages = r.size / PAGE_SIZE;
                    (
                        r.guest_addr,
                        r.size,
                        vec![0u64; pages.div_ceil(64) as usize],
                    )
                })
                .collect(),
        }
    }

    fn slot(&mut self, guest: u64) -> Option<(&mut Vec<u64>, usize)> {
        self.regions
            .iter_mut()
            .find(|(a, s, _)| (*a..*a + *s).contains(&guest))
            .map(|(a, _, b)| (b, ((guest - *a) / PAGE_SIZE) as usize))
    }

    fn get(&mut self, guest: u64) -> bool {
        self.slot(guest)
            .is_some_and(|(b, i)| b[i / 64] & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, guest: u64, len: u64) {
        for p in (guest..guest + len).step_by(PAGE_SIZE as usize) {
            if let Some((b, i)) = self.slot(p) {
                b[i / 64] |= 1 << (i % 64);
            }
        }
    }
}

/// The pager thread's state.
struct Worker {
    uffd: Userfault,
    source: Box<dyn PageSource>,
    regions: Vec<MemoryRegionInfo>,
    served: Served,
    counters: Arc<Counters>,
    buf: Vec<u8>,
}

/// A step that could not finish now (the memory map is changing: read events first).
struct Busy;

impl Worker {
    fn region(&self, guest: u64) -> Option<MemoryRegionInfo> {
        self.regions
            .iter()
            .find(|r| (r.guest_addr..r.guest_addr + r.size).contains(&guest))
            .copied()
    }

    /// Serves the chunk around a fault at `guest`: the pages not yet served from the file,
    /// and the faulting page with zeroes if it was served before (it was discarded since).
    fn serve_fault(&mut self, guest: u64) -> Result<Result<(), Busy>, String> {
        let Some(r) = self.region(guest) else {
            return Ok(Ok(()));
        };
        if self.served.get(guest) {
            let f = self
                .uffd
                .zero(GuestAddress(guest), PAGE_SIZE)
                .map_err(|e| e.to_string())?;
            if f.done < PAGE_SIZE {
                return Ok(Err(Busy));
            }
            self.counters
                .zero
                .fetch_add(f.filled / PAGE_SIZE, Ordering::Relaxed);
            self.counters.faults.fetch_add(1, Ordering::Relaxed);
            return Ok(Ok(()));
        }
        let start = (guest - r.guest_addr) / CHUNK * CHUNK + r.guest_addr;
        let end = (start + CHUNK).min(r.guest_addr + r.size);
        let done = self.serve_range(&r, start, end)?;
        if done.is_ok() {
            self.counters.faults.fetch_add(1, Ordering::Relaxed);
        }
        Ok(done)
    }

    /// Serves the pages of `start..end` (inside region `r`) not yet served.
    fn serve_range(
        &mut self,
        r: &MemoryRegionInfo,
        start: u64,
        end: u64,
    ) -> Result<Result<(), Busy>, String> {
        let page = PAGE_SIZE as usize;
        let n = ((end - start) / PAGE_SIZE) as usize;
        let need: Vec<bool> = (0..n)
            .map(|i| !self.served.get(start + (i * page) as u64))
            .collect();
        if !need.iter().any(|&b| b) {
            return Ok(Ok(()));
        }
        let _ = r;
        let buf = &mut self.buf[..n * page];
        if !self.source.fetch(start, buf, &need)? {
            // Requested: the pages come through `install`, which wakes the faulting thread.
            return Ok(Ok(()));
        }
        let zero: Vec<bool> = buf
            .chunks(page)
            .map(|p| p.iter().all(|&b| b == 0))
            .collect();
        let mut i = 0;
        while i < n {
            if !need[i] {
                i += 1;
                continue;
            }
            let first = i;
            let z = zero[i];
            while i < n && need[i] && zero[i] == z {
                i += 1;
            }
            let at = start + (first * page) as u64;
            let len = ((i - first) * page) as u64;
            let f = if z {
                self.uffd.zero(GuestAddress(at), len)
            } else {
                self.uffd
                    .copy(GuestAddress(at), &self.buf[first * page..i * page])
            }
            .map_err(|e| e.to_string())?;
            self.served.set(at, f.done);
            let counter = if z {
                &self.counters.zero
            } else {
                &self.counters.copied
            };
            counter.fetch_add(f.filled / PAGE_SIZE, Ordering::Relaxed);
            if f.done < len {
                return Ok(Err(Busy));
            }
        }
        Ok(Ok(()))
    }

    /// Fills the pages of `data` at `guest` that are not served yet (they arrived from the
    /// source), waking whoever waits there.
    fn install(
        &mut self,
        guest: u64,
        data: &[u8],
        faults: &mut VecDeque<u64>,
    ) -> Result<(), String> {
        let page = PAGE_SIZE as usize;
        let n = data.len() / page;
        let mut i = 0;
        while i < n {
            let at = guest + (i * page) as u64;
            if self.served.get(at) {
                i += 1;
                continue;
            }
            let first = i;
            while i < n && !self.served.get(guest + (i * page) as u64) {
                i += 1;
            }
            let mut from = first;
            while from < i {
                let a = guest + (from * page) as u64;
                let f = self
                    .uffd
                    .copy(GuestAddress(a), &data[from * page..i * page])
                    .map_err(|e| e.to_string())?;
                self.served.set(a, f.done);
                self.counters
                    .copied
                    .fetch_add(f.filled / PAGE_SIZE, Ordering::Relaxed);
                from += (f.done / PAGE_SIZE) as usize;
                if from < i {
                    // The memory map is changing: take the discard events in, then go on
                    // with what is still not served.
                    self.read_events(faults)?;
                    while from < i && self.served.get(guest + (from * page) as u64) {
                        from += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads every pending event: faults are queued, discards mark their pages served.
    fn read_events(&mut self, faults: &mut VecDeque<u64>) -> Result<(), String> {
        while let Some(ev) = self.uffd.read_event().map_err(|e| e.to_string())? {
            match ev {
                UffdEvent::Fault(g) => faults.push_back(g.0),
                UffdEvent::Remove { guest, len } => {
                    self.served.set(guest.0, len);
                    self.counters
                        .removed
                        .fetch_add(len / PAGE_SIZE, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}

/// Where a populate pass is: region index and guest address.
struct Populate {
    region: usize,
    at: u64,
    replies: Vec<mpsc::Sender<Result<(), String>>>,
}

impl Populate {
    /// One step: serves the next chunk holding data. Returns true when done.
    fn step(&mut self, w: &mut Worker) -> Result<Result<bool, Busy>, String> {
        while let Some(r) = w.regions.get(self.region).copied() {
            let end = r.guest_addr + r.size;
            if self.at < r.guest_addr {
                self.at = r.guest_addr;
            }
            if self.at >= end {
                self.region += 1;
                continue;
            }
            let Some(guest) = w.source.next_data(&r, self.at)? else {
                self.region += 1;
                continue;
            };
            let start = (guest - r.guest_addr) / CHUNK * CHUNK + r.guest_addr;
            let stop = (start + CHUNK).min(end);
            if w.serve_range(&r, start, stop)?.is_err() {
                self.at = start;
                return Ok(Err(Busy));
            }
            self.at = stop;
            return Ok(Ok(false));
        }
        Ok(Ok(true))
    }
}

const TOKEN_UFFD: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_WAKE: u64 = 2;
const TOKEN_SOURCE: u64 = 3;

fn run(
    mut w: Worker,
    stop: Arc<EventFd>,
    wake: Arc<EventFd>,
    requests: mpsc::Receiver<mpsc::Sender<Result<(), String>>>,
    on_error: Arc<Mutex<Option<ErrorSink>>>,
) {
    let mut faults: VecDeque<u64> = VecDeque::new();
    let mut populate: Option<Populate> = None;
    let result = (|| -> Result<(), String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        let mut polling_source = w.source.arrivals();
        let source = polling_source.map(|fd| (fd, TOKEN_SOURCE));
        for (fd, token) in [
            (w.uffd.fd().as_raw_fd(), TOKEN_UFFD),
            (stop.as_raw_fd(), TOKEN_STOP),
            (wake.as_raw_fd(), TOKEN_WAKE),
        ]
        .into_iter()
        .chain(source)
        {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| format!("epoll: {e}"))?;
        }
        let mut events = [EpollEvent::default(); 4];
        loop {
            // Faults waiting for a retry or a populate pass in progress: only look.
            let timeout = if !faults.is_empty() || populate.is_some() {
                0
            } else {
                -1
            };
            let mut source_ready = false;
            match epoll.wait(timeout, &mut events) {
                Ok(n) => {
                    source_ready = events[..n].iter().any(|e| e.data() == TOKEN_SOURCE);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("epoll: {e}")),
            }
            if stop.read().is_ok() {
                return Ok(());
            }
            if wake.read().is_ok() {
                while let Ok(reply) = requests.try_recv() {
                    match &mut populate {
                        Some(p) => p.replies.push(reply),
                        None => {
                            populate = Some(Populate {
                                region: 0,
                                at: 0,
                                replies: vec![reply],
                            })
                        }
                    }
                }
            }
            w.read_events(&mut faults)?;
            if source_ready {
                let (pages, done) = w.source.arrived()?;
                for (g, data) in pages {
                    w.install(g, &data, &mut faults)?;
                }
                if done {
                    if let Some(fd) = polling_source.take() {
                        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    }
                }
            }
            while let Some(&g) = faults.front() {
                if w.serve_fault(g)?.is_err() {
                    break;
                }
                faults.pop_front();
            }
            if faults.is_empty() {
                if let Some(p) = &mut populate {
                    if let Ok(true) = p.step(&mut w)? {
                        for r in p.replies.drain(..) {
                            let _ = r.send(Ok(()));
                        }
                        populate = None;
                    }
                }
            }
        }
    })();
    tracing::debug!("userfaultfd pager stops: {}", w.counters.get());
    if let Err(e) = result {
        tracing::error!("userfaultfd pager: {e}");
        if let Some(p) = populate {
            for r in p.replies {
                let _ = r.send(Err(e.clone()));
            }
        }
        if let Some(f) = &*on_error.lock().unwrap_or_else(|p| p.into_inner()) {
            f(format!("cannot serve guest memory: {e}"));
        }
        // Dropping the userfaultfd lets blocked threads go on (with zero pages): the VM is
        // ending with an error.
    }
}

impl std::fmt::Display for PagerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} faults, {} pages copied from the file, {} zero pages, {} pages discarded",
            self.faults, self.copied_pages, self.zero_pages, self.removed_pages
        )
    }
}

impl Pager {
    /// Maps anonymous guest memory with `regions`, registers it with a new userfaultfd and
    /// starts the pager thread serving it from the memory files `files`: a full snapshot's,
    /// then the diffs on top of it, oldest first.
    pub fn start(
        files: &[PathBuf],
        regions: &[MemoryRegionInfo],
    ) -> Result<(GuestMem, Pager), MemoryError> {
        let Some(path) = files.first() else {
            return Err(MemoryError::Layout("no memory file".to_string()));
        };
        let file = super::memory::open_checked(path, regions)?;
        let diffs = files[1..]
            .iter()
            .map(|p| DiffFile::open(p, regions))
            .collect::<Result<Vec<_>, _>>()?;
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
            .collect();
        let mem = GuestMem::from_ranges(&ranges)
            .map_err(|e| MemoryError::Layout(format!("cannot map guest memory: {e}")))?;
        let source = FileSource {
            file,
            diffs,
            regions: regions.to_vec(),
        };
        let pager = Pager::serve(&mem, regions, Box::new(source), None)?;
        Ok((mem, pager))
    }

    /// Registers `mem` (anonymous memory laid out as `regions`) with a new userfaultfd and
    /// starts the pager thread serving its missing pages from `source`. Pages for which
    /// `present(guest)` holds are not fetched: they are in `mem` already, or zero if missing.
    pub fn serve(
        mem: &GuestMem,
        regions: &[MemoryRegionInfo],
        source: Box<dyn PageSource>,
        present: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<Pager, MemoryError> {
        let uffd_err = |e: hypervisor::uffd::UffdError| MemoryError::Layout(e.to_string());
        let mut uffd = Userfault::new().map_err(uffd_err)?;
        uffd.register(mem).map_err(uffd_err)?;
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            uffd,
            source,
            regions: regions.to_vec(),
            served: Served::new(regions, present),
            counters: counters.clone(),
            buf: vec![0u8; CHUNK as usize],
        };
        let io = |e: std::io::Error| MemoryError::Layout(format!("userfaultfd pager: {e}"));
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io)?);
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io)?);
        let (tx, rx) = mpsc::channel();
        let on_error: Arc<Mutex<Option<ErrorSink>>> = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, wake, on_error) = (stop.clone(), wake.clone(), on_error.clone());
            jail::seccomp::spawn(
                jail::seccomp::ThreadClass::Pager,
                "uffd-pager".into(),
                move || run(worker, stop, wake, rx, on_error),
            )
            .map_err(io)?
        };
        Ok(Pager {
            stop,
            requests: tx,
            wake,
            counters,
            on_error,
            thread: Some(thread),
        })
    }

    /// What the pager did so far.
    pub fn stats(&self) -> PagerStats {
        self.counters.get()
    }

    /// Where a failure to serve memory is reported (the VM should end with it).
    pub fn on_error(&self, f: impl Fn(String) + Send + 'static) {
        *self.on_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    /// Serves every data page of the file not served yet, and returns when done (faults are
    /// served meanwhile, first).
    pub fn populate(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(tx)
            .map_err(|_| "the userfaultfd pager has stopped".to_string())?;
        self.wake
            .write(1)
            .map_err(|e| format!("waking the pager: {e}"))?;
        rx.recv()
            .map_err(|_| "the userfaultfd pager has stopped".to_string())?
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;
    use vm_memory::Bytes;

    /// A memory file of two regions (as below and above the 3 GiB hole) with data in a few
    /// places; returns the guest memory it was written from and the layout.
    fn snapshot(path: &Path) -> (GuestMem, Vec<MemoryRegionInfo>) {
        let mem = GuestMem::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(64 << 20), 2 << 20),
        ])
        .unwrap();
        mem.write_slice(&[0x11; 8192], GuestAddress(0x3000))
            .unwrap();
        mem.write_slice(&[0x22; 4096], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&[0x33; 4096], GuestAddress(0x20_0000))
            .unwrap();
        mem.write_slice(&[0x44; 4096], GuestAddress((64 << 20) + 0x1000))
            .unwrap();
        let (regions, _, unsynced) =
            super::super::memory::write_memory_unsynced(&mem, path).unwrap();
        unsynced.finish().unwrap();
        (mem, regions)
    }

    /// The pager's counters once `done` holds for them (or after 10 s): a faulting thread
    /// wakes, and a post-copy target confirms its last page, before the pager counts it.
    pub(crate) fn settled(pager: &Pager, done: impl Fn(&PagerStats) -> bool) -> PagerStats {
        for _ in 0..1000 {
            let s = pager.stats();
            if done(&s) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        pager.stats()
    }

    fn byte(mem: &GuestMem, a: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(a)).unwrap()
    }

    #[test]
    fn pages_come_from_the_file_on_first_touch() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory");
        let (orig, regions) = snapshot(&p);
        let (mem, pager) = Pager::start(std::slice::from_ref(&p), &regions).unwrap();
        // Nothing is resident before the first touch.
        let r = hypervisor::mem::resident_pages(&mem, GuestAddress(0), 4 << 20).unwrap();
        assert!(r.iter().all(|&x| !x));
        assert_eq!(byte(&mem, 0x3000), 0x11);
        assert_eq!(byte(&mem, 0x4fff), 0x11);
        assert_eq!(byte(&mem, (64 << 20) + 0x1000), 0x44);
        assert_eq!(byte(&mem, 0x5000), 0);
        // (The counters follow the fills, which wake the faulting thread first.)
        let s = settled(&pager, |s| s.faults == 2);
        // 0x3000..0x5000 came in with the first fault's chunk; the chunk's other pages are
        // holes (zero pages). The high region's chunk, one more fault.
        assert_eq!(s.faults, 2, "{s}");
        assert_eq!(s.copied_pages, 3, "{s}");
        assert_eq!(s.zero_pages, 2 * CHUNK / PAGE_SIZE - 3, "{s}");
        // Only the chunks around faults are resident.
        let r = hypervisor::mem::resident_pages(&mem, GuestAddress(0), 4 << 20).unwrap();
        let resident = r.iter().filter(|&&x| x).count() as u64;
        assert!(resident <= CHUNK / PAGE_SIZE, "{resident}");
        // The guest's writes stay in its memory.
        mem.write_slice(b"new", GuestAddress(0x3000)).unwrap();
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!(&b, b"new\x11");
        // Everything reads as it was written.
        let mut a = vec![0u8; 2 << 20];
        let mut c = vec![0u8; 2 << 20];
        orig.read_slice(&mut a, GuestAddress(64 << 20)).unwrap();
        mem.read_slice(&mut c, GuestAddress(64 << 20)).unwrap();
        assert!(a == c);
        drop(pager);
    }

    #[test]
    fn discarded_pages_come_back_as_zeroes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory");
        let (_, regions) = snapshot(&p);
        let (mem, pager) = Pager::start(std::slice::from_ref(&p), &regions).unwrap();
        // Served, then discarded (as the balloon does).
        assert_eq!(byte(&mem, 0x3000), 0x11);
        hypervisor::mem::discard(&mem, GuestAddress(0x3000), PAGE_SIZE).unwrap();
        assert_eq!(byte(&mem, 0x3000), 0);
        assert_eq!(byte(&mem, 0x4000), 0x11);
        // Never served, discarded: zeroes too, and its neighbours still come from the file.
        hypervisor::mem::discard(&mem, GuestAddress(0x10_0000), PAGE_SIZE).unwrap();
        assert_eq!(byte(&mem, 0x10_0000), 0);
        assert_eq!(byte(&mem, 0x20_0000), 0x33);
        // Written after the discard: kept.
        mem.write_obj(0x5au8, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(byte(&mem, 0x10_0000), 0x5a);
        assert_eq!(settled(&pager, |s| s.removed_pages == 2).removed_pages, 2);
        // A populate pass leaves discarded pages alone.
        hypervisor::mem::discard(&mem, GuestAddress(0x10_0000), PAGE_SIZE).unwrap();
        pager.populate().unwrap();
        let r = hypervisor::mem::resident_pages(&mem, GuestAddress(0x10_0000), PAGE_SIZE).unwrap();
        assert!(!r[0]);
        assert_eq!(byte(&mem, 0x10_0000), 0);
    }

    #[test]
    fn populate_brings_in_every_data_page() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory");
        let (orig, regions) = snapshot(&p);
        let (mem, pager) = Pager::start(std::slice::from_ref(&p), &regions).unwrap();
        pager.populate().unwrap();
        pager.populate().unwrap();
        for (g, v) in [(0x3000u64, 0x11u8), (0x10_0000, 0x22), (0x20_0000, 0x33)] {
            let r = hypervisor::mem::resident_pages(&mem, GuestAddress(g), PAGE_SIZE).unwrap();
            assert!(r[0], "{g:#x}");
            assert_eq!(byte(&mem, g), v);
        }
        // A snapshot of the restored memory equals the original.
        let p2 = d.path().join("memory2");
        let (_, stats, u) = super::super::memory::write_memory_unsynced(&mem, &p2).unwrap();
        u.finish().unwrap();
        assert_eq!(stats.written, 5 * PAGE_SIZE);
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
        drop(orig);
        let s = pager.stats();
        assert_eq!(s.copied_pages, 5, "{s}");
    }

    /// Writes a diff memory file for `regions`: `pages` (guest address, byte) and holes
    /// elsewhere.
    fn diff(path: &Path, regions: &[MemoryRegionInfo], pages: &[(u64, u8)]) {
        let f = File::create(path).unwrap();
        let end = regions
            .iter()
            .map(|r| r.file_offset + r.size)
            .max()
            .unwrap();
        f.set_len(end).unwrap();
        for &(g, v) in pages {
            let r = regions
                .iter()
                .find(|r| (r.guest_addr..r.guest_addr + r.size).contains(&g))
                .unwrap();
            f.write_all_at(&[v; PAGE_SIZE as usize], r.file_offset + (g - r.guest_addr))
                .unwrap();
        }
    }

    #[test]
    fn a_chain_of_diffs_serves_the_newest_data_of_each_page() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory");
        let (_, regions) = snapshot(&p);
        let (d1, d2) = (d.path().join("diff1"), d.path().join("diff2"));
        // Diff 1: a data page changed, another zeroed, a page new in a hole; diff 2 changes
        // diff 1's new page again and adds one in the high region's far chunk.
        diff(
            &d1,
            &regions,
            &[(0x3000, 0x55), (0x10_0000, 0), (0x6000, 0x66)],
        );
        let far = (64 << 20) + (1 << 20);
        diff(&d2, &regions, &[(0x6000, 0x77), (far, 0x88)]);
        let files = [p.clone(), d1.clone(), d2.clone()];
        let (mem, pager) = Pager::start(&files, &regions).unwrap();
        let want = [
            (0x3000u64, 0x55u8),
            (0x4000, 0x11),
            (0x6000, 0x77),
            (0x10_0000, 0),
            (0x20_0000, 0x33),
            ((64 << 20) + 0x1000, 0x44),
            (far, 0x88),
            (far + PAGE_SIZE, 0),
        ];
        for (g, v) in want {
            assert_eq!(byte(&mem, g), v, "{g:#x}");
        }
        // A populate pass finds the diffs' data too (the far page is in a chunk of its own,
        // where the full file has a hole).
        let (mem, pager2) = {
            drop(pager);
            Pager::start(&files, &regions).unwrap()
        };
        pager2.populate().unwrap();
        let r = hypervisor::mem::resident_pages(&mem, GuestAddress(far), PAGE_SIZE).unwrap();
        assert!(r[0], "the diff's far page was not populated");
        for (g, v) in want {
            assert_eq!(byte(&mem, g), v, "{g:#x} after populate");
        }
    }

    #[test]
    fn an_unreadable_file_ends_the_vm_with_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory");
        let (_, regions) = snapshot(&p);
        let (mem, pager) = Pager::start(std::slice::from_ref(&p), &regions).unwrap();
        let (tx, rx) = mpsc::channel();
        pager.on_error(move |e| tx.send(e).unwrap());
        // Cut the file short under the pager: reads fail.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // The faulting thread goes on once the pager has given up (its memory reads zero).
        let _ = byte(&mem, 0x20_0000);
        let e = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
        assert!(e.contains("memory file"), "{e}");
        assert!(pager.populate().is_err());
    }
}
