//! Post-copy: when pre-copy does not converge (or after the rounds the request allows), the
//! source parks the vCPUs, sends the device/vCPU state and the set of pages still dirty, and
//! the VM runs on the target at once; the target fetches the missing pages from the source.
//!
//! Wire (the same stream as pre-copy, used in both directions once the VM runs on the
//! target):
//!
//! ```text
//! source                                   target
//! Postcopy {dirty set}  State {state}  →             (the dirty pages are dropped, the
//!                                                     rest digested, memory registered
//!                                                     with userfaultfd, VM built)
//!                                        ← Ready {digest of memory outside the set + state}
//! Commit                              →
//!                                        ← Resumed   (the VM runs on the target)
//! Pages ... (pushed in address order,  ← PageRequest {addr, pages}  (a vCPU faulted there:
//!  requested pages first)                             the source sends them next)
//!                                        ← PostcopyDone {digest of the post-copied pages}
//! PostcopyEnd {"" | error}            →              (the source exits)
//! ```
//!
//! The target's pager ([`crate::snapshot::pager::Pager`]) reads the incoming pages and
//! writes the requests ([`Fetcher`] is its page source); the source answers requests from a
//! reader thread. Pages already present on the target are skipped (the pager tracks what it
//! served; the kernel refuses a second fill with EEXIST).
//!
//! The risk of post-copy: once the target runs, the guest's state exists only there but part
//! of its memory only on the source. If the connection breaks, the target's VM cannot go on
//! (it ends with an error naming how many pages were lost) and the source cannot resume (its
//! copy is stale): it exits with an error too.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use api::types::MigrationPhase;
use guestmem::GuestMem;
use hypervisor::dirty::DirtyBitmap;
use hypervisor::mem::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, FrameRead, FrameWrite, Tag, BATCH_PAGES};
use super::seal::Channel;
use super::send::{hold, Outgoing};
use super::{MigrationError, Stream};
use crate::api::VmHandle;
use crate::snapshot::memory::{layout_of, MemoryRegionInfo};
use crate::snapshot::pager::{Arrived, PageSource};
use devices::bus::lock;

/// The pages the target misses: one bit per page, per region.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DirtySet {
    /// (first guest address, bytes, bits).
    pub regions: Vec<(u64, u64, Vec<u64>)>,
}

impl DirtySet {
    /// The union of KVM dirty bitmaps (of the same regions).
    pub fn union(sets: &[&[DirtyBitmap]]) -> DirtySet {
        let mut out = DirtySet::default();
        for bitmaps in sets {
            for b in *bitmaps {
                let i = match out.regions.iter().position(|r| r.0 == b.start.0) {
                    Some(i) => i,
                    None => {
                        out.regions.push((
                            b.start.0,
                            b.len,
                            vec![0; b.pages().div_ceil(64) as usize],
                        ));
                        out.regions.len() - 1
                    }
                };
                for (w, x) in out.regions[i].2.iter_mut().zip(&b.bits) {
                    *w |= x;
                }
            }
        }
        out
    }

    /// Checks a set the source sent against guest memory (`ram`: start and length of each
    /// range): each region whole pages inside one range, regions apart, one bit per page and
    /// none past the region's end. Everything else the target does with the set (dropping the
    /// pages, the fetcher's count of missing pages) relies on this.
    pub fn check(&self, ram: &[(u64, u64)]) -> Result<(), protocol::ProtocolError> {
        let mut regions: Vec<&(u64, u64, Vec<u64>)> = self.regions.iter().collect();
        regions.sort_by_key(|r| r.0);
        let mut prev_end = 0;
        for (i, (a, l, bits)) in regions.into_iter().enumerate() {
            let bad = |why: &str| bad(&format!("dirty set region at {a:#x}+{l:#x}: {why}"));
            let end = a
                .checked_add(*l)
                .ok_or_else(|| bad("past the address space"))?;
            if *l == 0 || a % PAGE_SIZE != 0 || l % PAGE_SIZE != 0 {
                return Err(bad("not whole pages"));
            }
            if !ram
                .iter()
                .any(|&(ra, rl)| *a >= ra && end <= ra.saturating_add(rl))
            {
                return Err(bad("not in guest memory"));
            }
            if i > 0 && *a < prev_end {
                return Err(bad("overlaps another"));
            }
            prev_end = end;
            let pages = l / PAGE_SIZE;
            if bits.len() as u64 != pages.div_ceil(64) {
                return Err(bad("not one bit per page"));
            }
            let tail = pages % 64;
            if tail != 0 && bits.last().is_some_and(|w| w >> tail != 0) {
                return Err(bad("bits past its end"));
            }
        }
        Ok(())
    }

    fn slot(&self, guest: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .position(|(a, l, _)| guest.checked_sub(*a).is_some_and(|d| d < *l))
            .map(|i| (i, ((guest - self.regions[i].0) / PAGE_SIZE) as usize))
    }

    pub fn contains(&self, guest: u64) -> bool {
        self.slot(guest).is_some_and(|(r, p)| {
            self.regions[r]
                .2
                .get(p / 64)
                .is_some_and(|w| w & (1 << (p % 64)) != 0)
        })
    }

    /// Clears the page's bit; returns whether it was set.
    pub fn take(&mut self, guest: u64) -> bool {
        let Some((r, p)) = self.slot(guest) else {
            return false;
        };
        match self.regions[r].2.get_mut(p / 64) {
            Some(w) if *w & (1 << (p % 64)) != 0 => {
                *w &= !(1 << (p % 64));
                true
            }
            _ => false,
        }
    }

    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.2.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum()
    }

    /// The first page in the set at or after `at`.
    pub fn next(&self, at: u64) -> Option<u64> {
        for (a, l, bits) in &self.regions {
            if at >= a.saturating_add(*l) {
                continue;
            }
            let from = (at.max(*a) - a) / PAGE_SIZE;
            // No page past the bits (nor past the address space) is in the set.
            let pages = (l / PAGE_SIZE)
                .min((bits.len() as u64).saturating_mul(64))
                .min((u64::MAX - a) / PAGE_SIZE + 1);
            let mut p = from;
            while p < pages {
                let w = bits.get((p / 64) as usize).copied().unwrap_or(0) >> (p % 64);
                if w == 0 {
                    p = (p / 64 + 1) * 64;
                    continue;
                }
                p += u64::from(w.trailing_zeros());
                if p < pages {
                    return Some(a + p * PAGE_SIZE);
                }
            }
        }
        None
    }

    /// Calls `f(start, end)` for each run of consecutive pages in the set, in address order.
    pub fn for_each_run<E>(&self, mut f: impl FnMut(u64, u64) -> Result<(), E>) -> Result<(), E> {
        let mut at = 0;
        while let Some(a) = self.next(at) {
            let mut end = a.saturating_add(PAGE_SIZE);
            while end.checked_add(PAGE_SIZE).is_some() && self.contains(end) {
                end += PAGE_SIZE;
            }
            f(a, end)?;
            at = end;
        }
        Ok(())
    }
}

/// A running digest of pages, independent of their order: the wrapping sum of CRC-32s of
/// each page's address and contents.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageDigest(pub u64);

impl PageDigest {
    pub fn add(&mut self, guest: u64, page: &[u8]) {
        let mut h = crc32fast::Hasher::new();
        h.update(&guest.to_le_bytes());
        h.update(page);
        self.0 = self.0.wrapping_add(u64::from(h.finalize()));
    }
}

fn bad(what: &str) -> protocol::ProtocolError {
    protocol::ProtocolError::Bad(what.to_string())
}

fn json_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, protocol::ProtocolError> {
    serde_json::to_vec(v).map_err(|e| bad(&e.to_string()))
}

/// What pre-copy leaves to the switch-over.
pub(super) struct Precopied<'a> {
    /// The dirty bitmaps not sent yet.
    pub pending: &'a [DirtyBitmap],
    /// What was sent of each page.
    pub log: &'a super::PageLog,
    /// Digest all of memory rather than the log (`full_digest`).
    pub full_digest: bool,
    /// The bandwidth cap in bytes per second, if any: it paces the background push of
    /// post-copy too (requested pages go at once, and count against it).
    pub limit: Option<u64>,
}

/// The source's switch-over and post-copy, after the pre-copy rounds `pre`.
/// Sets `paused` once the vCPUs are parked by this, `paused_devices` once the device threads
/// are, and `committed` at the point of no return;
/// returns the downtime (from the pause to the VM running on the target).
pub(super) fn run_source(
    h: &VmHandle,
    stream: &mut Channel,
    pre: Precopied,
    out: &Outgoing,
    paused: &mut bool,
    paused_devices: &mut bool,
    committed: &mut bool,
) -> Result<Duration, MigrationError> {
    let m = &h.machine;
    let paused_at = super::send::stop_for_switch(h, out, paused, paused_devices)?;
    let last = super::send::take_dirty(m)?;
    let mut set = DirtySet::union(&[pre.pending, &last]);
    let mut state = m.state(layout_of(&m.mem))?;
    super::bindings::strip(&mut state.config);
    let state = json_bytes(&state)?;
    protocol::write_frame(stream, Tag::Postcopy, &[&json_bytes(&set)?])?;
    protocol::write_frame(stream, Tag::State, &[&state])?;
    let sum = super::switch_digest(&m.mem, pre.log, &state, pre.full_digest, |a| {
        set.contains(a)
    })?;
    let mut buf = Vec::new();
    protocol::expect(stream, &mut buf, Tag::Ready)?;
    // The point of no return: the VM runs on the target, with pages only this side has.
    super::send::commit(stream, &buf, sum, out)?;
    *committed = true;
    let lost = |e: &dyn std::fmt::Display| MigrationError::Postcopy(e.to_string());
    protocol::expect(stream, &mut buf, Tag::Resumed).map_err(|e| lost(&e))?;
    let downtime = paused_at.elapsed();
    let total = set.count();
    out.update(|s| {
        s.phase = MigrationPhase::Postcopy;
        s.remaining_bytes = total * PAGE_SIZE;
        s.downtime_ms = Some(downtime.as_millis() as u64);
    });
    tracing::info!("post-copy: the VM runs on the target, {total} pages to go");
    hold("postcopy");
    serve_pages(stream, &m.mem, &mut set, out, pre.limit).map_err(|e| lost(&e))?;
    Ok(downtime)
}

enum FromTarget {
    Pages(u64, u64),
    Done(u64),
    Lost(String),
}

/// Pushes every page of `set` to the target, requested ones first, and waits for its done.
/// With a `limit` (bytes per second) the push waits while it is ahead of that rate; a request
/// is served at once all the same (the guest is waiting for it), and the push makes up for it.
fn serve_pages(
    stream: &mut Channel,
    mem: &GuestMem,
    set: &mut DirtySet,
    out: &Outgoing,
    limit: Option<u64>,
) -> Result<(), String> {
    // The reader thread opens the target's frames with its own state (the direction's key
    // and counter); this thread seals what it sends.
    let mut reader = stream
        .take_reader()
        .map_err(|e| format!("connection: {e}"))?;
    let (tx, rx) = mpsc::channel();
    jail::seccomp::spawn(
        jail::seccomp::ThreadClass::Migration,
        "vessel-postcopy-rx".into(),
        move || {
            let mut buf = Vec::new();
            loop {
                let msg = match reader.read_frame(&mut buf) {
                    Ok(Tag::PageRequest) if buf.len() == 16 => {
                        let a = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                        let n = u64::from_le_bytes(buf[8..].try_into().unwrap_or_default());
                        FromTarget::Pages(a, n)
                    }
                    Ok(Tag::PostcopyDone) if buf.len() == 8 => {
                        FromTarget::Done(u64::from_le_bytes(buf[..].try_into().unwrap_or_default()))
                    }
                    Ok(t) => FromTarget::Lost(format!("unexpected message {t:?}")),
                    Err(e) => FromTarget::Lost(e.to_string()),
                };
                let last = !matches!(msg, FromTarget::Pages(..));
                if tx.send(msg).is_err() || last {
                    return;
                }
            }
        },
    )
    .map_err(|e| format!("cannot start the post-copy reader: {e}"))?;
    let mut digest = PageDigest::default();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut batch: Vec<u8> = Vec::new();
    let mut cursor = 0u64;
    let mut sent = 0u64;
    // Sends the pages of `set` in `from..from + n pages` (a run at a time).
    let mut send_range = |stream: &mut Channel,
                          set: &mut DirtySet,
                          from: u64,
                          n: u64,
                          digest: &mut PageDigest|
     -> Result<u64, String> {
        let mut count = 0;
        let mut run_start = None;
        batch.clear();
        for i in 0..=n {
            let a = from + i * PAGE_SIZE;
            let take = i < n && set.take(a);
            if take {
                mem.read_slice(&mut page, GuestAddress(a))
                    .map_err(|_| format!("reading guest memory at {a:#x}"))?;
                digest.add(a, &page);
                run_start.get_or_insert(a);
                batch.extend_from_slice(&page);
                count += 1;
            }
            if !take || batch.len() as u64 >= BATCH_PAGES * PAGE_SIZE {
                if let Some(s) = run_start.take() {
                    let pages = (batch.len() as u64 / PAGE_SIZE) as u32;
                    protocol::write_frame(
                        stream,
                        Tag::Pages,
                        &[&s.to_le_bytes(), &pages.to_le_bytes(), &batch],
                    )
                    .map_err(|e| e.to_string())?;
                    batch.clear();
                }
            }
        }
        Ok(count)
    };
    let mut theirs = None;
    let mut wanted: VecDeque<(u64, u64)> = VecDeque::new();
    let began = Instant::now();
    let mut total = 0u64;
    loop {
        // How long the push must wait to keep to the limit.
        let ahead = super::send::ahead(total, limit, began);
        // Requests first.
        loop {
            let msg = if set.count() == 0 && wanted.is_empty() {
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => return Err("the post-copy reader stopped".to_string()),
                }
            } else if let (Some(wait), true) = (ahead, wanted.is_empty()) {
                // Paced: nothing to push before `wait`, unless the target asks.
                match rx.recv_timeout(wait) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err("the post-copy reader stopped".to_string())
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            };
            match msg {
                FromTarget::Pages(a, n) => wanted.push_back((a, n.min(1 << 20))),
                FromTarget::Done(d) => {
                    theirs = Some(d);
                    break;
                }
                FromTarget::Lost(e) => {
                    return Err(format!(
                        "the target's connection broke with {} pages not sent: {e}",
                        set.count()
                    ))
                }
            }
        }
        if let Some(d) = theirs {
            let remaining = set.count();
            let result = if remaining != 0 {
                Err(format!(
                    "the target says done with {remaining} pages not sent"
                ))
            } else if d != digest.0 {
                Err(
                    "the target's post-copied memory does not match (memory digests differ)"
                        .to_string(),
                )
            } else {
                Ok(())
            };
            let msg = result.as_ref().err().map(String::as_str).unwrap_or("");
            let _ = protocol::write_frame(stream, Tag::PostcopyEnd, &[msg.as_bytes()]);
            return result;
        }
        if let Some((a, n)) = wanted.pop_front() {
            sent += send_range(stream, set, a, n, &mut digest)?;
        } else if ahead.is_some() {
            // Waited above with nothing asked: the rate is checked again.
            continue;
        } else if let Some(a) = set.next(cursor) {
            sent += send_range(stream, set, a, BATCH_PAGES, &mut digest)?;
            cursor = a + BATCH_PAGES * PAGE_SIZE;
        } else {
            cursor = 0;
        }
        let left = set.count() * PAGE_SIZE;
        let bytes = std::mem::take(&mut sent) * PAGE_SIZE;
        total += bytes;
        out.update(|s| {
            s.remaining_bytes = left;
            s.transferred_bytes += bytes;
        });
    }
}

/// Where the target's migration thread hands the connection to the [`Fetcher`] once the
/// source has committed (and this side has said `Resumed`): the sealing state of each
/// direction goes on from there.
pub type Handover = Arc<Mutex<Option<Channel>>>;

/// The target's page source during post-copy: requests and receives pages over the
/// migration stream.
pub struct Fetcher {
    /// A handle on the connection, polled for arrivals.
    fd: Stream,
    /// The connection, once handed over.
    io: Option<Channel>,
    handover: Handover,
    /// Pages still owed by the source.
    missing: DirtySet,
    missing_count: u64,
    digest: PageDigest,
    /// Requests made before the handover.
    queued: Vec<(u64, u64)>,
    out: Arc<Outgoing>,
    done_sent: bool,
    buf: Vec<u8>,
}

impl Fetcher {
    pub fn new(
        stream: &Channel,
        missing: DirtySet,
        out: Arc<Outgoing>,
    ) -> Result<(Fetcher, Handover), MigrationError> {
        let io = |e| protocol::ProtocolError::Io(e);
        let handover: Handover = Arc::default();
        let missing_count = missing.count();
        out.update(|s| s.remaining_bytes = missing_count * PAGE_SIZE);
        Ok((
            Fetcher {
                fd: stream.stream().try_clone().map_err(io)?,
                io: None,
                handover: handover.clone(),
                missing,
                missing_count,
                digest: PageDigest::default(),
                queued: Vec::new(),
                out,
                done_sent: false,
                buf: Vec::new(),
            },
            handover,
        ))
    }

    /// Whether the connection is this side's now (taking it if it was just handed over).
    fn connected(&mut self) -> bool {
        if self.io.is_none() {
            self.io = lock(&self.handover).take();
        }
        self.io.is_some()
    }

    fn write(&mut self, tag: Tag, parts: &[&[u8]]) -> Result<(), String> {
        let r = match self.io.as_mut() {
            Some(io) => io.write_frame(tag, parts),
            None => Err(protocol::ProtocolError::Bad("not connected".to_string())),
        };
        r.map_err(|e| self.lost(&e))
    }

    fn request(&mut self, start: u64, pages: u64) -> Result<(), String> {
        self.write(
            Tag::PageRequest,
            &[&start.to_le_bytes(), &pages.to_le_bytes()],
        )
    }

    fn lost(&self, e: &dyn std::fmt::Display) -> String {
        let msg = format!(
            "post-copy migration: lost the connection to the source with {} pages ({} KiB) \
             missing: {e}",
            self.missing_count,
            self.missing_count * PAGE_SIZE / 1024
        );
        self.out.update(|s| {
            s.phase = MigrationPhase::Failed;
            s.error = Some(msg.clone());
        });
        msg
    }
}

impl PageSource for Fetcher {
    fn fetch(&mut self, start: u64, _buf: &mut [u8], need: &[bool]) -> Result<bool, String> {
        // Ask for the run from the first needed page to the last.
        let first = need.iter().position(|&b| b).unwrap_or(0) as u64;
        let last = need.iter().rposition(|&b| b).unwrap_or(0) as u64;
        let (a, n) = (start + first * PAGE_SIZE, last - first + 1);
        if self.connected() {
            for (qa, qn) in std::mem::take(&mut self.queued) {
                self.request(qa, qn)?;
            }
            self.request(a, n)?;
        } else {
            self.queued.push((a, n));
        }
        Ok(false)
    }

    fn arrivals(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn arrived(&mut self) -> Result<Arrived, String> {
        if !self.connected() {
            // The migration thread still reads the stream (the commit).
            std::thread::sleep(Duration::from_millis(1));
            return Ok((Vec::new(), false));
        }
        for (qa, qn) in std::mem::take(&mut self.queued) {
            self.request(qa, qn)?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let tag = match self.io.as_mut() {
            Some(io) => io.read_frame(&mut buf),
            None => Err(protocol::ProtocolError::Bad("not connected".to_string())),
        };
        let tag = tag.map_err(|e| self.lost(&e));
        let tag = match tag {
            Ok(t) => t,
            Err(_) if self.missing_count == 0 => {
                // Every page is here: the VM goes on without the source's last word.
                tracing::warn!("post-copy: the source went away before confirming the end");
                self.out.update(|s| {
                    s.phase = MigrationPhase::Completed;
                    s.remaining_bytes = 0;
                    s.error = Some("the source did not confirm the end".to_string());
                });
                return Ok((Vec::new(), true));
            }
            Err(e) => {
                self.buf = buf;
                return Err(e);
            }
        };
        let mut pages = Vec::new();
        let mut done = false;
        match tag {
            Tag::Pages => {
                let (addr, data) = protocol::pages(&buf).map_err(|e| self.lost(&e))?;
                for (i, p) in data.chunks(PAGE_SIZE as usize).enumerate() {
                    let g = addr + i as u64 * PAGE_SIZE;
                    if self.missing.take(g) {
                        self.missing_count -= 1;
                        self.digest.add(g, p);
                    }
                }
                pages.push((addr, data.to_vec()));
                let left = self.missing_count;
                let got = data.len() as u64;
                self.out.update(|s| {
                    s.remaining_bytes = left * PAGE_SIZE;
                    s.transferred_bytes += got;
                });
                if left == 0 && !self.done_sent {
                    self.done_sent = true;
                    let digest = self.digest.0.to_le_bytes();
                    self.write(Tag::PostcopyDone, &[&digest])?;
                }
            }
            Tag::PostcopyEnd => {
                let err = String::from_utf8_lossy(&buf).into_owned();
                tracing::info!(
                    "post-copy migration completed{}",
                    if err.is_empty() {
                        String::new()
                    } else {
                        format!(": {err}")
                    }
                );
                self.out.update(|s| {
                    s.phase = MigrationPhase::Completed;
                    s.remaining_bytes = 0;
                    s.error = (!err.is_empty()).then(|| err.clone());
                });
                done = true;
            }
            t => return Err(self.lost(&format!("unexpected message {t:?}"))),
        }
        self.buf = buf;
        Ok((pages, done))
    }

    fn next_data(&mut self, _r: &MemoryRegionInfo, _at: u64) -> Result<Option<u64>, String> {
        // Snapshots and migrations wait for the post-copy to end (the API refuses them).
        Ok(None)
    }
}

/// Drops the pages of `set` from `mem` (they are stale: the source sends them again).
pub fn drop_pages(mem: &GuestMem, set: &DirtySet) -> Result<(), MigrationError> {
    // Until the pager has them, the dropped pages must stay missing: khugepaged would fill
    // a dropped page with zeroes if it merged its range into a huge page before userfaultfd
    // is armed (once armed, it leaves holes alone).
    hypervisor::mem::advise_hugepages(mem, false);
    set.for_each_run(|a, end| {
        hypervisor::mem::discard(mem, GuestAddress(a), end - a)
            .map_err(|_| MigrationError::Memory(a))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::seal::pair;
    use crate::snapshot::pager::Pager;
    use devices::bus::lock;

    const HIGH: u64 = 64 << 20;

    fn memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 4 << 20), (GuestAddress(HIGH), 2 << 20)]).unwrap()
    }

    fn byte(mem: &GuestMem, a: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(a)).unwrap()
    }

    /// The source's memory, the target's (a pre-copied page, a stale copy of a dirty one)
    /// and the dirty set.
    fn setup() -> (GuestMem, GuestMem, DirtySet) {
        let (src, dst) = (memory(), memory());
        let dirty = [0x1000u64, 0x2000, 0x10_0000, HIGH + 0x3000];
        for (i, &a) in dirty.iter().enumerate() {
            src.write_slice(&[i as u8 + 1; 4096], GuestAddress(a))
                .unwrap();
        }
        src.write_slice(&[0x77; 4096], GuestAddress(0x3000))
            .unwrap();
        dst.write_slice(&[0x77; 4096], GuestAddress(0x3000))
            .unwrap();
        dst.write_slice(&[0xee; 4096], GuestAddress(0x1000))
            .unwrap();
        let mut set = DirtySet {
            regions: vec![(0, 4 << 20, vec![0; 16]), (HIGH, 2 << 20, vec![0; 8])],
        };
        for a in dirty {
            let (r, p) = set.slot(a).unwrap();
            set.regions[r].2[p / 64] |= 1 << (p % 64);
        }
        drop_pages(&dst, &set).unwrap();
        (src, dst, set)
    }

    fn start_target(dst: &GuestMem, set: &DirtySet, stream: Channel) -> (Pager, Arc<Outgoing>) {
        let out = Arc::new(Outgoing::default());
        let (fetcher, handover) = Fetcher::new(&stream, set.clone(), out.clone()).unwrap();
        *lock(&handover) = Some(stream);
        let pager = Pager::serve(
            dst,
            &layout_of(dst),
            Box::new(fetcher),
            Some(&|g| !set.contains(g)),
        )
        .unwrap();
        (pager, out)
    }

    #[test]
    fn missing_pages_come_from_the_source_and_both_sides_agree_at_the_end() {
        let (src, dst, set) = setup();
        let (a, b) = pair();
        let (pager, out) = start_target(&dst, &set, b);
        // The target's first touch may come before the push: it waits for its page.
        let source = start_source(&src, &set, a, None);
        assert_eq!(byte(&dst, HIGH + 0x3000), 4);
        assert_eq!(byte(&dst, 0x1000), 1);
        assert_eq!(byte(&dst, 0x10_0000), 3);
        // Present before, or never touched: as they were.
        assert_eq!(byte(&dst, 0x3000), 0x77);
        assert_eq!(byte(&dst, 0x20_0000), 0);
        source.join().unwrap().unwrap();
        for _ in 0..1000 {
            if lock(&out.status).phase == MigrationPhase::Completed {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let s = lock(&out.status).clone();
        assert_eq!(s.phase, MigrationPhase::Completed, "{s:?}");
        assert_eq!((s.error, s.remaining_bytes), (None, 0));
        assert_eq!(byte(&dst, 0x2000), 2);
        assert_eq!(copied_pages(&pager, 4), 4);
    }

    /// The pager's count of pages copied in, once it reaches `want` (or after 10 s).
    fn copied_pages(pager: &Pager, want: u64) -> u64 {
        crate::snapshot::pager::tests::settled(pager, |s| s.copied_pages >= want).copied_pages
    }

    /// Runs the source's side of post-copy for `setup()`'s set on a thread, capped at `limit`
    /// bytes per second.
    fn start_source(
        src: &GuestMem,
        set: &DirtySet,
        mut stream: Channel,
        limit: Option<u64>,
    ) -> std::thread::JoinHandle<Result<(), String>> {
        let (src, mut set) = (src.clone(), set.clone());
        std::thread::spawn(move || {
            serve_pages(&mut stream, &src, &mut set, &Outgoing::default(), limit)
        })
    }

    #[test]
    fn the_bandwidth_cap_paces_the_push() {
        let (src, dst, set) = setup();
        let (a, b) = pair();
        let (pager, _out) = start_target(&dst, &set, b);
        let began = Instant::now();
        // The first frame carries the three low pages (12 KiB, one batch); at 8 KiB/s the
        // last page may not leave before 1.5 s.
        start_source(&src, &set, a, Some(8192))
            .join()
            .unwrap()
            .unwrap();
        assert!(
            began.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(byte(&dst, HIGH + 0x3000), 4);
        assert_eq!(copied_pages(&pager, 4), 4);
    }

    #[test]
    fn a_requested_page_goes_at_once_under_the_cap() {
        let (src, dst, set) = setup();
        let (a, b) = pair();
        let (_pager, _out) = start_target(&dst, &set, b);
        // At 1 byte/s the push would send the high page hours after the first frame: the
        // guest's touch asks for it, and the source serves the request without waiting.
        let source = start_source(&src, &set, a, Some(1));
        assert_eq!(byte(&dst, HIGH + 0x3000), 4);
        assert_eq!(byte(&dst, 0x1000), 1);
        source.join().unwrap().unwrap();
    }

    #[test]
    fn a_lost_source_fails_the_target_with_the_missing_pages() {
        let (_, dst, set) = setup();
        let (a, b) = pair();
        let (pager, out) = start_target(&dst, &set, b);
        let (tx, rx) = mpsc::channel();
        pager.on_error(move |e| tx.send(e).unwrap());
        drop(a);
        let e = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(e.contains("with 4 pages"), "{e}");
        assert_eq!(lock(&out.status).phase, MigrationPhase::Failed);
    }

    #[test]
    fn a_dirty_set_from_the_source_is_checked_against_guest_memory() {
        let ram = [(0, 1 << 20), (4 << 20, 1 << 20)];
        let set = |regions: Vec<(u64, u64, Vec<u64>)>| DirtySet { regions };
        let ok = set(vec![
            (0, 1 << 20, vec![1; 4]),
            (4 << 20, 64 * PAGE_SIZE, vec![3]),
        ]);
        ok.check(&ram).unwrap();
        // Seen writing the migration_frames fuzz target (and replayed through it): a region
        // as large as half the address space with no bits made the walk that drops stale
        // pages run for hours, and a region ending past the address space overflowed.
        let huge = set(vec![(0, 1 << 63, vec![])]);
        let past_end = set(vec![(u64::MAX - 4095, 8192, vec![3])]);
        for bad in [
            &huge,
            &past_end,
            &set(vec![(0, 0, vec![])]),
            &set(vec![(100, PAGE_SIZE, vec![1])]),
            &set(vec![(1 << 20, PAGE_SIZE, vec![1])]),
            &set(vec![(0, 64 * PAGE_SIZE, vec![1, 1])]),
            &set(vec![(0, 2 * PAGE_SIZE, vec![4])]),
            &set(vec![
                (0, 64 * PAGE_SIZE, vec![1]),
                (PAGE_SIZE, PAGE_SIZE, vec![1]),
            ]),
        ] {
            assert!(bad.check(&ram).is_err(), "{bad:?}");
        }
        // The walk itself ends, without overflow, on what the check refuses.
        assert_eq!(huge.next(0), None);
        assert_eq!(past_end.next(0), Some(u64::MAX - 4095));
        assert!(past_end.contains(u64::MAX - 4095));
        let mut runs = 0;
        past_end
            .for_each_run(|_, _| {
                runs += 1;
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(runs, 1);
    }

    #[test]
    fn dirty_sets_union_walk_and_take() {
        let bm = |start: u64, bits: Vec<u64>| DirtyBitmap {
            slot: 0,
            start: GuestAddress(start),
            len: bits.len() as u64 * 64 * PAGE_SIZE,
            bits,
        };
        let a = [bm(0, vec![0b101, 0]), bm(1 << 30, vec![1 << 63])];
        let b = [bm(0, vec![0b10, 1])];
        let mut s = DirtySet::union(&[&a, &b]);
        assert_eq!(s.count(), 5);
        assert!(s.contains(0) && s.contains(PAGE_SIZE) && s.contains(2 * PAGE_SIZE));
        assert!(!s.contains(3 * PAGE_SIZE));
        assert_eq!(s.next(3 * PAGE_SIZE), Some(64 * PAGE_SIZE));
        assert_eq!(s.next(65 * PAGE_SIZE), Some((1 << 30) + 63 * PAGE_SIZE));
        assert!(s.take(PAGE_SIZE));
        assert!(!s.take(PAGE_SIZE));
        assert_eq!(s.count(), 4);
        assert_eq!(s.next((1 << 30) + 64 * PAGE_SIZE), None);
        let wire: DirtySet = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(wire.count(), 4);
    }

    #[test]
    fn page_digests_ignore_order_but_not_contents() {
        let (mut x, mut y) = (PageDigest::default(), PageDigest::default());
        x.add(0, &[1; 8]);
        x.add(4096, &[2; 8]);
        y.add(4096, &[2; 8]);
        y.add(0, &[1; 8]);
        assert_eq!(x, y);
        y.add(8192, &[0; 8]);
        assert_ne!(x, y);
    }
}
