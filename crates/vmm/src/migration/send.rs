//! The source side of a live migration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::types::{
    IfNotConverged, MigrateSendRequest, MigrationPhase, MigrationRole, MigrationStatus,
};
use devices::bus::lock;
use guestmem::GuestMem;
use hypervisor::dirty::DirtyBitmap;
use hypervisor::mem::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, Hello, Round, Tag, BATCH_PAGES};
use super::seal::{Channel, Role};
use super::{Addr, Canceller, MigrationError, PageLog, Stream};
use crate::api::VmHandle;
use crate::dirty::Consumer;
use crate::snapshot::memory::{layout_of, runs, scan_used};

/// Pre-copy rounds before stop-and-copy is forced (the guest dirties memory faster than it
/// can be sent).
const MAX_ROUNDS: u32 = 30;

/// A migration in progress or done, as the API sees it.
#[derive(Default)]
pub struct Outgoing {
    pub status: Mutex<MigrationStatus>,
    pub cancel: Canceller,
    /// The status was read after the migration ended (the source may exit now).
    pub final_status_read: AtomicBool,
}

impl Outgoing {
    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.status));
    }

    /// The status now (and a note that it was read once the migration ended).
    pub fn status(&self) -> MigrationStatus {
        let s = lock(&self.status).clone();
        if s.phase.is_finished() {
            self.final_status_read.store(true, Ordering::SeqCst);
        }
        s
    }
}

/// Sends pages to the target, paced to the bandwidth limit.
struct Pages<'a> {
    stream: &'a mut Channel,
    mem: &'a GuestMem,
    out: &'a Outgoing,
    buf: Vec<u8>,
    started: Instant,
    sent: u64,
    /// Bytes per second, or none.
    limit: Option<u64>,
    /// What was sent of each page.
    log: PageLog,
}

impl Pages<'_> {
    /// Sends `pages` pages from `addr` (inside one region), read from guest memory now.
    fn run(&mut self, addr: u64, pages: u64) -> Result<(), MigrationError> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = (0..pages).step_by(BATCH_PAGES as usize).try_for_each(|at| {
            let a = addr + at * PAGE_SIZE;
            buf.resize(((pages - at).min(BATCH_PAGES) * PAGE_SIZE) as usize, 0);
            self.mem
                .read_slice(&mut buf, GuestAddress(a))
                .map_err(|_| MigrationError::Memory(a))?;
            self.batch(a, &buf)
        });
        self.buf = buf;
        result
    }

    /// Sends the pages `data` holds from `addr`, already read from guest memory (after the
    /// dirty log started, so a later write to them is sent again).
    fn copied(&mut self, addr: u64, data: &[u8]) -> Result<(), MigrationError> {
        let batch = (BATCH_PAGES * PAGE_SIZE) as usize;
        for (i, b) in data.chunks(batch).enumerate() {
            self.batch(addr + (i * batch) as u64, b)?;
        }
        Ok(())
    }

    /// Sends one frame of pages, paced to the limit.
    fn batch(&mut self, addr: u64, data: &[u8]) -> Result<(), MigrationError> {
        self.out.cancel.check()?;
        let n = data.len() as u64 / PAGE_SIZE;
        protocol::write_frame(
            self.stream,
            Tag::Pages,
            &[&addr.to_le_bytes(), &(n as u32).to_le_bytes(), data],
        )?;
        self.log.record(addr, data);
        self.sent += data.len() as u64;
        self.out.update(|s| s.transferred_bytes = self.sent);
        if let Some(wait) = ahead(self.sent, self.limit, self.started) {
            std::thread::sleep(wait);
        }
        Ok(())
    }

    /// Sends the runs of pages for which `want(page index in region)` holds, region by region.
    fn runs(
        &mut self,
        start: u64,
        pages: u64,
        want: impl Fn(u64) -> bool,
    ) -> Result<(), MigrationError> {
        for r in runs(pages, u64::MAX, want) {
            self.run(start + r.start * PAGE_SIZE, r.end - r.start)?;
        }
        Ok(())
    }

    /// Round 1: every page the guest has touched and that is not all zeroes (the target's
    /// memory starts zeroed), sent from the copy the scan read.
    fn used(&mut self) -> Result<(), MigrationError> {
        let mem = self.mem;
        let page = PAGE_SIZE as usize;
        scan_used(mem, MigrationError::Memory, |addr, chunk, used| {
            for r in runs(used.len() as u64, u64::MAX, |p| used[p as usize]) {
                let (from, to) = (r.start as usize * page, r.end as usize * page);
                self.copied(addr + from as u64, &chunk[from..to])?;
            }
            Ok(())
        })
    }

    /// Every dirty page of `bitmaps`.
    fn dirty(&mut self, bitmaps: &[DirtyBitmap]) -> Result<(), MigrationError> {
        for b in bitmaps {
            self.runs(b.start.0, b.pages(), |p| b.page_dirty(p))?;
        }
        Ok(())
    }
}

/// How far `sent` bytes since `since` are ahead of a `limit` in bytes per second: how long
/// the sender waits before sending more (none: unlimited, or not ahead).
pub(super) fn ahead(sent: u64, limit: Option<u64>, since: Instant) -> Option<Duration> {
    limit
        .map(|l| Duration::from_secs_f64(sent as f64 / l.max(1) as f64))
        .and_then(|due| due.checked_sub(since.elapsed()))
        .filter(|d| !d.is_zero())
}

/// A fault-injection point for tests: with `VESSEL_MIGRATION_HOLD=<phase>[,<phase>...]` in
/// the source's environment, the migration waits 2 s at each of those points (`precopy`: the
/// first round is sent and the guest runs on, so it dirties pages for the next; `stop-and-copy`:
/// vCPUs just parked; `commit`: the target is ready, nothing committed; `committed`: the commit
/// is sent; `postcopy`: the VM runs on the target, no page sent yet), so a test can kill either
/// side there. With `VESSEL_MIGRATION_RELEASE=DIR` as well, it writes `DIR/<phase>.held`
/// there and waits instead until the file `DIR/<phase>` exists (at most 60 s): the test knows
/// where the migration is and decides when it goes on.
pub(super) fn hold(phase: &str) {
    if std::env::var("VESSEL_MIGRATION_HOLD").is_ok_and(|p| p.split(',').any(|p| p == phase)) {
        match std::env::var_os("VESSEL_MIGRATION_RELEASE") {
            Some(dir) => {
                tracing::warn!("VESSEL_MIGRATION_HOLD: holding the migration at {phase}");
                let _ = std::fs::write(
                    std::path::Path::new(&dir).join(format!("{phase}.held")),
                    b"",
                );
                let release = std::path::Path::new(&dir).join(phase);
                let until = Instant::now() + Duration::from_secs(60);
                while !release.exists() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            None => {
                tracing::warn!("VESSEL_MIGRATION_HOLD: holding the migration at {phase} for 2 s");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}

/// Stops the VM for the switch: phase stop-and-copy, vCPUs parked, devices paused (the I/O in
/// flight completes, its pages logged, before the last dirty pages), disks flushed and their
/// locks handed over. Returns when the pause began; `paused_vcpus`/`paused_devices` say what
/// a failure has to undo.
pub(super) fn stop_for_switch(
    h: &VmHandle,
    out: &Outgoing,
    paused_vcpus: &mut bool,
    paused_devices: &mut bool,
) -> Result<Instant, MigrationError> {
    out.update(|s| s.phase = MigrationPhase::StopAndCopy);
    let paused_at = Instant::now();
    *paused_vcpus = h.pause_for_migration()?;
    h.machine.pause_devices();
    *paused_devices = true;
    h.machine.hand_over_disks().map_err(MigrationError::Disks)?;
    hold("stop-and-copy");
    Ok(paused_at)
}

/// Once the target is ready (`ready`: its `Ready` frame, the digest of its copy): checks the
/// digest against `sum` (this side's) and that the migration was not cancelled meanwhile,
/// then sends the commit, the point of no return: from here the VM belongs to the target.
pub(super) fn commit(
    stream: &mut Channel,
    ready: &[u8],
    sum: u32,
    out: &Outgoing,
) -> Result<(), MigrationError> {
    let theirs = ready
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    if theirs != Some(sum) {
        return Err(MigrationError::Digest);
    }
    hold("commit");
    out.cancel.disarm()?;
    protocol::write_frame(stream, Tag::Commit, &[])?;
    // From here the VM is the target's; the stream may idle (post-copy page requests).
    let _ = stream.set_timeout(None);
    Ok(())
}

/// The target's error, if it sent one before closing the connection (the source learns why a
/// write failed).
fn last_word(s: &mut Channel) -> Option<MigrationError> {
    let _ = s.set_timeout(Some(Duration::from_secs(1)));
    match protocol::read_frame(s, &mut Vec::new()) {
        Err(e @ protocol::ProtocolError::Remote(_)) => Some(e.into()),
        _ => None,
    }
}

/// The pages dirtied since the last call (the guest's and the VMM's writes).
pub(super) fn take_dirty(m: &crate::vm::Machine) -> Result<Vec<DirtyBitmap>, MigrationError> {
    m.dirty
        .take(&m.vm_fd, &m.mem, Consumer::Migration)?
        .ok_or_else(|| MigrationError::Build("dirty tracking stopped".to_string()))
}

fn dirty_bytes(bitmaps: &[DirtyBitmap]) -> u64 {
    bitmaps.iter().map(DirtyBitmap::count).sum::<u64>() * PAGE_SIZE
}

/// Runs a migration of the VM behind `h` to `req.to`, reporting in `out`. On success the
/// target runs the VM and the caller must end this one; on failure the VM runs on here.
/// Returns the downtime.
pub fn send(
    h: &VmHandle,
    req: &MigrateSendRequest,
    out: &Outgoing,
) -> Result<Duration, MigrationError> {
    let started = Instant::now();
    let m = &h.machine;
    out.update(|s| {
        *s = MigrationStatus {
            phase: MigrationPhase::Setup,
            role: Some(MigrationRole::Send),
            total_bytes: m.config.spec.memory,
            ..Default::default()
        }
    });
    let mut stream: Option<Channel> = None;
    let mut buf = Vec::new();
    // The dirty tracker logs the guest's writes (KVM) and the device threads' (vm-memory's
    // bitmap), so the devices run on through pre-copy; they pause for stop-and-copy only.
    let mut paused_vcpus = false;
    let mut paused_devices = false;
    let mut committed = false;
    let result = (|| -> Result<(Duration, bool), MigrationError> {
        // Connecting and the greeting fail like any later step: the status says so and the
        // VM runs on.
        let conn = Stream::connect(&Addr::parse(&req.to)?)?;
        out.cancel.attach(&conn)?;
        // Both sides prove they hold the token before anything else crosses; every frame
        // after it is sealed.
        let stream = stream.insert(Channel::handshake(conn, req.token.expose(), Role::Source)?);
        // The machine without this host's paths: the target binds its own.
        let mut machine = m.config_now();
        let source_paths = super::bindings::strip(&mut machine);
        let hello = Hello {
            magic: protocol::MAGIC.to_string(),
            version: protocol::VERSION,
            vessel_version: env!("CARGO_PKG_VERSION").to_string(),
            machine: machine.spec,
            full_digest: req.full_digest,
            source_paths,
        };
        protocol::write_json(stream, Tag::Hello, &hello)?;
        protocol::expect(stream, &mut buf, Tag::Ready)?;
        // A userfaultfd-restored VM's untouched pages come in first: the first round sends
        // resident pages only, and the pager's fills are in neither dirty log.
        m.populate_memory()?;
        m.dirty.start(&m.vm_fd, &m.mem, Consumer::Migration)?;
        let mut pages = Pages {
            stream,
            mem: &m.mem,
            out,
            buf: Vec::new(),
            started,
            sent: 0,
            limit: req.bandwidth_mbps.map(|mbps| mbps.max(1) * 1_000_000 / 8),
            log: PageLog::new(&m.mem),
        };
        out.update(|s| {
            s.phase = MigrationPhase::Precopy;
            s.round = 1;
        });
        let mut round_start = Instant::now();
        let mut round_sent = 0;
        pages.used()?;
        hold("precopy");
        let downtime = Duration::from_millis(req.downtime_ms);
        let mut round = 1;
        let (bitmaps, expected) = loop {
            let bitmaps = take_dirty(m)?;
            let dirty = dirty_bytes(&bitmaps);
            let took = round_start.elapsed().as_secs_f64().max(1e-6);
            let bandwidth = ((pages.sent - round_sent) as f64 / took).max(1.0);
            let expected = Duration::from_secs_f64(dirty as f64 / bandwidth);
            out.update(|s| {
                s.remaining_bytes = dirty;
                s.bandwidth = bandwidth as u64;
                s.dirty_rate = (dirty as f64 / took) as u64;
                s.expected_downtime_ms = expected.as_millis() as u64;
                s.elapsed_ms = started.elapsed().as_millis() as u64;
            });
            if expected <= downtime
                || round >= req.max_rounds.unwrap_or(MAX_ROUNDS)
                || (req.post_copy && req.post_copy_after_rounds.is_some_and(|n| round >= n))
            {
                break (bitmaps, expected);
            }
            round += 1;
            round_start = Instant::now();
            round_sent = pages.sent;
            out.update(|s| s.round = round);
            protocol::write_json(
                pages.stream,
                Tag::Round,
                &Round {
                    round,
                    remaining_bytes: dirty,
                },
            )?;
            pages.dirty(&bitmaps)?;
        };

        let forced = req.post_copy_after_rounds.is_some_and(|n| round >= n);
        let expected_ms = expected.as_millis() as u64;
        let converged = expected <= downtime;
        let policy = req.if_not_converged();
        if !converged && policy == IfNotConverged::Fail {
            return Err(MigrationError::NotConverged {
                rounds: round,
                expected_ms,
                limit_ms: req.downtime_ms,
            });
        }
        if !converged && policy == IfNotConverged::StopAndCopy {
            tracing::warn!(
                "pre-copy did not converge after {round} rounds: stop-and-copy as asked, with \
                 about {expected_ms} ms of downtime (limit {} ms)",
                req.downtime_ms
            );
        }
        if policy == IfNotConverged::PostCopy && (forced || !converged) {
            return super::postcopy::run_source(
                h,
                pages.stream,
                super::postcopy::Precopied {
                    pending: &bitmaps,
                    log: &pages.log,
                    full_digest: req.full_digest,
                    limit: pages.limit,
                },
                out,
                &mut paused_vcpus,
                &mut paused_devices,
                &mut committed,
            )
            .map(|d| (d, true));
        }
        // Stop and copy.
        let paused_at = stop_for_switch(h, out, &mut paused_vcpus, &mut paused_devices)?;
        pages.dirty(&bitmaps)?;
        let last = take_dirty(m)?;
        pages.dirty(&last)?;
        let mut state = m.state(layout_of(&m.mem))?;
        super::bindings::strip(&mut state.config);
        let state =
            serde_json::to_vec(&state).map_err(|e| protocol::ProtocolError::Bad(e.to_string()))?;
        // The target digests its copy while this side digests the original.
        protocol::write_frame(pages.stream, Tag::State, &[&state])?;
        let copied_at = Instant::now();
        let sum = super::switch_digest(&m.mem, &pages.log, &state, req.full_digest, |_| false)?;
        let digested_at = Instant::now();
        protocol::expect(pages.stream, &mut buf, Tag::Ready)?;
        tracing::debug!(
            "stop-and-copy: last pages and state {:?}, digest {:?}, target ready after {:?}",
            copied_at - paused_at,
            digested_at - copied_at,
            digested_at.elapsed()
        );
        commit(pages.stream, &buf, sum, out)?;
        committed = true;
        hold("committed");
        if let Err(e) = protocol::expect(pages.stream, &mut buf, Tag::Resumed) {
            tracing::error!("migration committed but the target did not confirm: {e}");
        }
        Ok((paused_at.elapsed(), converged))
    })();
    // The connection closes when `stream` drops: the cancel switch keeps no handle on it.
    out.cancel.release();
    match result {
        Ok((downtime, converged)) => {
            let ms = downtime.as_millis() as u64;
            if ms > req.downtime_ms {
                tracing::warn!(
                    "the VM was paused for {ms} ms, over the {} ms limit",
                    req.downtime_ms
                );
            }
            out.update(|s| {
                s.phase = MigrationPhase::Completed;
                s.remaining_bytes = 0;
                s.downtime_ms = Some(ms);
                s.downtime_limit_exceeded = !converged || ms > req.downtime_ms;
                s.elapsed_ms = started.elapsed().as_millis() as u64;
            });
            Ok(downtime)
        }
        Err(e) if committed => {
            out.update(|s| {
                s.phase = MigrationPhase::Failed;
                s.error = Some(e.to_string());
                s.elapsed_ms = started.elapsed().as_millis() as u64;
            });
            Err(e)
        }
        Err(e) => {
            // A write the target cut short: its reason is likely waiting to be read.
            let e = match (e, stream.as_mut()) {
                (MigrationError::Protocol(protocol::ProtocolError::Io(io)), Some(s))
                    if !out.cancel.is_cancelled() =>
                {
                    last_word(s).unwrap_or(protocol::ProtocolError::Io(io).into())
                }
                (e, _) => e,
            };
            // Tell the target why (if it still listens), then carry on here.
            if let Some(s) = stream.as_mut() {
                let _ = match &e {
                    MigrationError::Protocol(protocol::ProtocolError::Remote(_)) => {
                        protocol::write_frame(s, Tag::Abort, &[])
                    }
                    e => protocol::write_frame(s, Tag::Error, &[e.to_string().as_bytes()]),
                };
            }
            m.dirty.stop(&m.vm_fd, &m.mem, Consumer::Migration);
            // The disks' locks first: a VM that cannot have them back must not write.
            let disks = if paused_devices {
                m.take_back_disks()
            } else {
                Ok(())
            };
            let e = match disks {
                Ok(()) => {
                    if paused_devices {
                        if let Err(r) = m.resume_devices() {
                            tracing::error!("after a failed migration: {r}");
                        }
                    }
                    if paused_vcpus {
                        h.resume_after_migration();
                    }
                    e
                }
                Err(d) => {
                    let e = MigrationError::Disks(format!(
                        "{e}; then the disks could not be taken back ({d}): the VM stays paused"
                    ));
                    tracing::error!("{e}");
                    e
                }
            };
            // A cancel shuts the connection down: whatever failed then, it was the cancel.
            let cancelled = out.cancel.is_cancelled();
            out.update(|s| {
                s.phase = if cancelled {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                };
                s.error = (!cancelled).then(|| e.to_string());
                s.elapsed_ms = started.elapsed().as_millis() as u64;
            });
            Err(e)
        }
    }
}
