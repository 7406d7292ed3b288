//! The snapshot memory file: guest RAM region after region (the 3–4 GiB hole left out), written
//! sparse, and mapped back privately on restore.
//!
//! Writing skips pages the guest never touched (not resident, from `mincore`) and pages that
//! are all zeroes: both stay holes in the file, so a 4 GiB guest that used 100 MiB makes a file
//! of 100 MiB on disk. Restoring maps each region `MAP_PRIVATE` from the file: pages come in
//! from the page cache on first touch (lazy, the default) or all at once (`eager`: the file's
//! data extents are faulted in for writing before the guest runs; holes stay holes and read as
//! zeroes).
//! The guest's writes go to private copies: the file is never modified, so many VMs can be
//! restored from one snapshot at once.
//!
//! A diff snapshot's file has the same layout but holds only the pages dirtied since its
//! parent (written even when zero); its holes mean "see the parent". A chain is restored by
//! mapping the full snapshot's file, then each diff's data extents over it, oldest first.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use guestmem::{GuestMapping, GuestMem, GuestRegion};
use hypervisor::dirty::DirtyBitmap;
use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use api::types::RestoreMemory;
use hypervisor::mem::PAGE_SIZE;

/// Bytes examined per step while writing.
const CHUNK: u64 = 2 << 20;

/// Errors writing or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading guest memory at {addr:#x}: {why}")]
    Guest { addr: u64, why: String },
    #[error("{path} is {len} bytes, but the snapshot's memory needs {need}")]
    Short { path: String, len: u64, need: u64 },
    #[error("cannot map the memory file {path} at {addr:#x}: {why}")]
    Map {
        path: String,
        addr: u64,
        why: String,
    },
    #[error("{0}")]
    Layout(String),
}

/// Where a region of guest RAM is in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionInfo {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// What writing the memory file did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Guest RAM in bytes.
    pub total: u64,
    /// Bytes of data written (the rest are holes).
    pub written: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MemoryError + '_ {
    move |source| MemoryError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A memory file written but not yet on stable storage nor under its name.
pub struct UnsyncedMemory {
    file: File,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl UnsyncedMemory {
    /// Syncs the file and gives it its name.
    pub fn finish(self) -> Result<(), MemoryError> {
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))
    }
}

/// Writes all guest RAM to a new sparse file at `path` (through `path.tmp`, synced, then
/// renamed, so that a VM restored from an older file at `path` keeps its mapping intact).
#[cfg(test)]
fn write_memory(
    mem: &GuestMem,
    path: &Path,
) -> Result<(Vec<MemoryRegionInfo>, WriteStats), MemoryError> {
    let (regions, stats, unsynced) = write_memory_unsynced(mem, path)?;
    unsynced.finish()?;
    Ok((regions, stats))
}

/// [`write_memory`] without the sync and the rename: the guest may run on meanwhile (the
/// file's contents are final), then [`UnsyncedMemory::finish`].
pub fn write_memory_unsynced(
    mem: &GuestMem,
    path: &Path,
) -> Result<(Vec<MemoryRegionInfo>, WriteStats, UnsyncedMemory), MemoryError> {
    let (regions, mut stats, out) = create_file(mem, path)?;
    scan_used(mem, unreadable, |addr, chunk, used| {
        // Regions are packed in the file in guest-address order.
        let at = regions
            .iter()
            .find(|r| (r.guest_addr..r.guest_addr + r.size).contains(&addr))
            .map(|r| r.file_offset + (addr - r.guest_addr))
            .ok_or_else(|| unreadable(addr))?;
        stats.written += write_runs(&out.file, chunk, used, at).map_err(io_err(&out.tmp))?;
        Ok(())
    })?;
    Ok((regions, stats, out))
}

/// Creates `path.tmp` with the layout of `mem` and its size, all holes, to be written by the
/// caller and then [`UnsyncedMemory::finish`]ed.
fn create_file(
    mem: &GuestMem,
    path: &Path,
) -> Result<(Vec<MemoryRegionInfo>, WriteStats, UnsyncedMemory), MemoryError> {
    let regions = layout_of(mem);
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.set_len(total).map_err(io_err(&tmp))?;
    Ok((
        regions,
        WriteStats { total, written: 0 },
        UnsyncedMemory {
            file,
            tmp,
            path: path.to_path_buf(),
        },
    ))
}

fn unreadable(addr: u64) -> MemoryError {
    MemoryError::Guest {
        addr,
        why: "cannot read it".to_string(),
    }
}

/// A diff memory file at `path`: the same layout as a full one, but only the pages `dirty`
/// marks are written (all of them, zero or not: a hole means "unchanged, see the parent").
pub fn write_diff_unsynced(
    mem: &GuestMem,
    dirty: &[DirtyBitmap],
    path: &Path,
) -> Result<(Vec<MemoryRegionInfo>, WriteStats, UnsyncedMemory), MemoryError> {
    let (regions, mut stats, out) = create_file(mem, path)?;
    let mut buf = vec![0u8; CHUNK as usize];
    for b in dirty {
        let r = regions
            .iter()
            .find(|r| r.guest_addr == b.start.0 && r.size == b.len)
            .ok_or_else(|| {
                MemoryError::Layout(format!("no region at {:#x} for dirty pages", b.start.0))
            })?;
        // Runs of dirty pages, at most a chunk each.
        for run in runs(b.pages(), CHUNK / PAGE_SIZE, |p| b.page_dirty(p)) {
            let off = run.start * PAGE_SIZE;
            let bytes = &mut buf[..((run.end - run.start) * PAGE_SIZE) as usize];
            let addr = r.guest_addr + off;
            mem.read_slice(bytes, GuestAddress(addr))
                .map_err(|_| unreadable(addr))?;
            out.file
                .write_all_at(bytes, r.file_offset + off)
                .map_err(io_err(&out.tmp))?;
            stats.written += bytes.len() as u64;
        }
    }
    Ok((regions, stats, out))
}

/// Walks guest memory in chunks of [`CHUNK`] and hands `f` (guest address, contents, which
/// pages are used) each chunk with a used page: one the guest touched (resident, for
/// anonymous memory: untouched pages are skipped without being faulted in; every page of a
/// file mapping, whose residency says nothing of its contents) that is not all zeroes.
/// Snapshots write these pages, migration sends and digests them.
pub(crate) fn scan_used<E>(
    mem: &GuestMem,
    read_err: impl Fn(u64) -> E,
    mut f: impl FnMut(u64, &[u8], &[bool]) -> Result<(), E>,
) -> Result<(), E> {
    let page = PAGE_SIZE as usize;
    let mut buf = vec![0u8; CHUNK as usize];
    for r in mem.iter() {
        let (start, len) = (r.start_addr().raw_value(), r.len());
        let anonymous = r.file_offset().is_none();
        let mut off = 0;
        while off < len {
            let n = CHUNK.min(len - off);
            let addr = start + off;
            off += n;
            let touched = if anonymous {
                hypervisor::mem::resident_pages(mem, GuestAddress(addr), n)
                    .map_err(|_| read_err(addr))?
            } else {
                vec![true; (n / PAGE_SIZE) as usize]
            };
            if !touched.iter().any(|&t| t) {
                continue;
            }
            let chunk = &mut buf[..n as usize];
            mem.read_slice(chunk, GuestAddress(addr))
                .map_err(|_| read_err(addr))?;
            let used: Vec<bool> = chunk
                .chunks(page)
                .zip(&touched)
                .map(|(p, &t)| t && p.iter().any(|&b| b != 0))
                .collect();
            if used.iter().any(|&u| u) {
                f(addr, chunk, &used)?;
            }
        }
    }
    Ok(())
}

/// Writes the runs of `used` pages of `chunk` at `at`; returns the bytes written.
fn write_runs(file: &File, chunk: &[u8], used: &[bool], at: u64) -> std::io::Result<u64> {
    let page = PAGE_SIZE as usize;
    let pages = (chunk.len() / page) as u64;
    let mut written = 0;
    for r in runs(pages, u64::MAX, |i| used[i as usize]) {
        let (start, end) = (r.start as usize, r.end as usize);
        let bytes = &chunk[start * page..end * page];
        file.write_all_at(bytes, at + (start * page) as u64)?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

/// The runs of consecutive indexes in `0..n` for which `keep` holds, in order, each at most
/// `max` long (a longer run is cut into several).
pub(crate) fn runs(
    n: u64,
    max: u64,
    keep: impl Fn(u64) -> bool,
) -> impl Iterator<Item = std::ops::Range<u64>> {
    let mut p = 0;
    std::iter::from_fn(move || {
        while p < n && !keep(p) {
            p += 1;
        }
        if p >= n {
            return None;
        }
        let first = p;
        while p < n && keep(p) && p - first < max {
            p += 1;
        }
        Some(first..p)
    })
}

/// The regions of `mem`, packed one after the other in file order.
pub fn layout_of(mem: &GuestMem) -> Vec<MemoryRegionInfo> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let info = MemoryRegionInfo {
                guest_addr: r.start_addr().raw_value(),
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            info
        })
        .collect()
}

/// Maps the memory file at `path` as guest memory with `regions` (privately: the file is never
/// written).
#[cfg(test)]
pub fn map_memory(
    path: &Path,
    regions: &[MemoryRegionInfo],
    mode: RestoreMemory,
) -> Result<GuestMem, MemoryError> {
    map_memory_chain(&[path.to_path_buf()], regions, mode)
}

/// Maps a chain of memory files as guest memory with `regions`: `files[0]` is a full
/// snapshot's, each later one a diff against the one before. The first is mapped privately
/// region by region, then each data extent of each diff (`SEEK_DATA`/`SEEK_HOLE`; holes mean
/// "unchanged") is mapped privately over it, newest last. No file is ever written. Eager mode
/// then faults in every data extent of every file.
pub fn map_memory_chain(
    files: &[std::path::PathBuf],
    regions: &[MemoryRegionInfo],
    mode: RestoreMemory,
) -> Result<GuestMem, MemoryError> {
    // /proc/self/maps is read only for a chain: a full snapshot maps no extent.
    let budget = if files.len() > 1 { mapping_budget() } else { 0 };
    map_memory_chain_within(files, regions, mode, budget)
}

/// Mappings a restore leaves to the rest of the VMM (threads' stacks, libraries, I/O rings).
const MAP_RESERVE: u64 = 4096;

/// How many more mappings this process may make for a diff chain: `vm.max_map_count` less
/// what is mapped now and [`MAP_RESERVE`].
fn mapping_budget() -> u64 {
    let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(65530);
    let now = std::fs::read_to_string("/proc/self/maps")
        .map(|s| s.lines().count() as u64)
        .unwrap_or(0);
    max.saturating_sub(now).saturating_sub(MAP_RESERVE)
}

/// [`map_memory_chain`] making at most `budget` new mappings: each data extent of a diff is
/// mapped over the full snapshot's mapping (splitting it: two more mappings) while the budget
/// lasts, and read in (copied, as an eager restore would) after that, so a finely scattered
/// chain cannot run the process out of `vm.max_map_count`.
fn map_memory_chain_within(
    files: &[std::path::PathBuf],
    regions: &[MemoryRegionInfo],
    mode: RestoreMemory,
    mut budget: u64,
) -> Result<GuestMem, MemoryError> {
    let Some(path) = files.first() else {
        return Err(MemoryError::Layout("no memory file".to_string()));
    };
    let path = path.as_path();
    let file = open_checked(path, regions)?;
    let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    if mode == RestoreMemory::Userfaultfd {
        return Err(MemoryError::Layout(
            "userfaultfd memory is mapped by the pager (snapshot::pager::Pager::start)".to_string(),
        ));
    }
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let map_err = |why: String| MemoryError::Map {
            path: path.display().to_string(),
            addr: r.guest_addr,
            why,
        };
        let size = usize::try_from(r.size).map_err(|e| map_err(e.to_string()))?;
        let f = file.try_clone().map_err(io_err(path))?;
        let mapping = GuestMapping::build(
            Some(FileOffset::new(f, r.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegion::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| map_err("the region wraps around the address space".into()))?;
        out.push(region);
    }
    let mem = GuestMem::from_regions(out).map_err(|e| MemoryError::Layout(e.to_string()))?;
    let diffs = files[1..]
        .iter()
        .map(|p| DiffFile::open(p, regions))
        .collect::<Result<Vec<_>, _>>()?;
    let mut copied = 0u64;
    for (diff, d) in files[1..].iter().zip(&diffs) {
        for &(guest, offset, len) in &d.extents {
            if budget >= 2 {
                budget -= 2;
                hypervisor::mem::map_file_over(&mem, GuestAddress(guest), len, &d.file, offset)
                    .map_err(|e| MemoryError::Map {
                        path: diff.display().to_string(),
                        addr: guest,
                        why: e.to_string(),
                    })?;
            } else {
                copy_extent(&d.file, diff, &mem, guest, offset, len)?;
                copied += len;
            }
        }
    }
    if copied > 0 {
        tracing::info!(
            "restore: {} KiB of the diff snapshots read in rather than mapped \
             (vm.max_map_count leaves too few mappings for their extents)",
            copied / 1024
        );
    }
    if mode == RestoreMemory::Eager {
        populate_extents(path, &mem, &data_extents(&file, path, regions)?)?;
        for (diff, d) in files[1..].iter().zip(&diffs) {
            populate_extents(diff, &mem, &d.extents)?;
        }
    }
    Ok(mem)
}

/// Reads `len` bytes of `file` from `offset` into guest memory at `guest`.
fn copy_extent(
    file: &File,
    path: &Path,
    mem: &GuestMem,
    guest: u64,
    offset: u64,
    len: u64,
) -> Result<(), MemoryError> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)
            .map_err(io_err(path))?;
        mem.write_slice(&buf[..n], GuestAddress(guest + done))
            .map_err(|e| MemoryError::Map {
                path: path.display().to_string(),
                addr: guest + done,
                why: e.to_string(),
            })?;
        done += n as u64;
    }
    Ok(())
}

/// Opens the memory file at `path` and checks it holds `regions` (page aligned).
pub(crate) fn open_checked(path: &Path, regions: &[MemoryRegionInfo]) -> Result<File, MemoryError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let need = regions
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    if len < need {
        return Err(MemoryError::Short {
            path: path.display().to_string(),
            len,
            need,
        });
    }
    for r in regions {
        if !r.size.is_multiple_of(PAGE_SIZE) || !r.file_offset.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Layout(format!(
                "region at {:#x} is not page aligned",
                r.guest_addr
            )));
        }
    }
    Ok(file)
}

/// A diff snapshot's memory file and its data extents (guest address, file offset, length),
/// in guest-address order.
pub(crate) struct DiffFile {
    pub(crate) file: File,
    pub(crate) extents: Vec<(u64, u64, u64)>,
}

impl DiffFile {
    /// Opens the diff at `path`, checks it holds `regions` and lists its data.
    pub(crate) fn open(path: &Path, regions: &[MemoryRegionInfo]) -> Result<DiffFile, MemoryError> {
        let file = open_checked(path, regions)?;
        let mut extents = data_extents(&file, path, regions)?;
        extents.sort_unstable();
        Ok(DiffFile { file, extents })
    }
}

/// The data extents of a memory file, page aligned, as (guest address, file offset, length).
fn data_extents(
    file: &File,
    path: &Path,
    regions: &[MemoryRegionInfo],
) -> Result<Vec<(u64, u64, u64)>, MemoryError> {
    use nix::unistd::{lseek, Whence};
    let err = |e: nix::Error| MemoryError::Io {
        path: path.display().to_string(),
        source: e.into(),
    };
    let mut out = Vec::new();
    for r in regions {
        let end = r.file_offset + r.size;
        let mut at = r.file_offset as i64;
        while (at as u64) < end {
            let data = match lseek(file, at, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::Error::ENXIO) => break,
                Err(e) => return Err(err(e)),
            };
            if data >= end {
                break;
            }
            let hole = (lseek(file, data as i64, Whence::SeekHole).map_err(err)? as u64).min(end);
            let start = data & !(PAGE_SIZE - 1);
            let stop = (hole.div_ceil(PAGE_SIZE) * PAGE_SIZE).min(end);
            out.push((r.guest_addr + (start - r.file_offset), start, stop - start));
            at = stop as i64;
        }
    }
    Ok(out)
}

/// Eager restore: copies in the data `extents` of the memory file at `path` (holes stay
/// unpopulated: they read as zeroes, or the parent's pages, and cost nothing until the guest
/// writes them).
fn populate_extents(
    path: &Path,
    mem: &GuestMem,
    extents: &[(u64, u64, u64)],
) -> Result<(), MemoryError> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for &(guest, _, len) in extents {
        let done = hypervisor::mem::populate(mem, GuestAddress(guest), len).map_err(|e| {
            MemoryError::Map {
                path: path.display().to_string(),
                addr: guest,
                why: e.to_string(),
            }
        })?;
        if !done {
            // An older kernel: read each page in (the guest's first write copies it).
            for p in (0..len).step_by(PAGE_SIZE as usize) {
                let _ = mem.read_slice(&mut buf, GuestAddress(guest + p));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn runs_are_the_kept_stretches_cut_at_max() {
        let keep = |i: u64| matches!(i, 1..=2 | 4..=8 | 9);
        let all: Vec<_> = runs(10, u64::MAX, keep).collect();
        assert_eq!(all, [1..3, 4..10]);
        let cut: Vec<_> = runs(10, 2, keep).collect();
        assert_eq!(cut, [1..3, 4..6, 6..8, 8..10]);
        assert_eq!(runs(0, 1, |_| true).count(), 0);
        assert_eq!(runs(5, 1, |_| false).count(), 0);
    }

    fn guest(ranges: &[(u64, usize)]) -> GuestMem {
        let ranges: Vec<(GuestAddress, usize)> =
            ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        GuestMem::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn written_file_is_sparse_and_maps_back_identically() {
        // Two regions with a hole between them, as below and above the 3 GiB hole.
        let mem = guest(&[(0, 8 << 20), (64 << 20, 4 << 20)]);
        mem.write_slice(b"first", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress(5 << 20))
            .unwrap();
        mem.write_slice(b"high", GuestAddress((64 << 20) + 0x3ff0))
            .unwrap();
        // Touched but zero: left out too.
        mem.write_slice(&[0u8; 4096], GuestAddress(6 << 20))
            .unwrap();

        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory");
        let (regions, stats) = write_memory(&mem, &p).unwrap();
        assert_eq!(stats.total, 12 << 20);
        assert_eq!(stats.written, 4 * 4096);
        assert_eq!(regions[1].file_offset, 8 << 20);
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 12 << 20);
        assert!(meta.blocks() * 512 <= 64 * 1024, "{} blocks", meta.blocks());

        // Eager first: reading holes through a mapping puts zero pages in the page cache.
        for mode in [RestoreMemory::Eager, RestoreMemory::Lazy] {
            let back = map_memory(&p, &regions, mode).unwrap();
            if mode == RestoreMemory::Eager {
                // Eager copies in data only: holes stay unpopulated.
                let r = hypervisor::mem::resident_pages(&back, GuestAddress(2 << 20), 1 << 20);
                assert!(r.unwrap().iter().all(|&p| !p));
            }
            let mut a = vec![0u8; 12 << 20];
            let mut b = vec![0u8; 12 << 20];
            mem.read_slice(&mut a[..8 << 20], GuestAddress(0)).unwrap();
            mem.read_slice(&mut a[8 << 20..], GuestAddress(64 << 20))
                .unwrap();
            back.read_slice(&mut b[..8 << 20], GuestAddress(0)).unwrap();
            back.read_slice(&mut b[8 << 20..], GuestAddress(64 << 20))
                .unwrap();
            assert!(a == b, "{mode:?}");
            // Writes stay private: the file is unchanged.
            back.write_slice(b"changed", GuestAddress(0x1000)).unwrap();
        }
        let again = map_memory(&p, &regions, RestoreMemory::Lazy).unwrap();
        let mut s = [0u8; 5];
        again.read_slice(&mut s, GuestAddress(0x1000)).unwrap();
        assert_eq!(&s, b"first");
        // A snapshot of a restored VM (file mapping) reads everything, and is the same.
        let p2 = d.path().join("memory2");
        let (_, stats2) = write_memory(&again, &p2).unwrap();
        assert_eq!(stats2.written, stats.written);
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
    }

    fn dirty(mem: &GuestMem, pages: &[u64]) -> Vec<DirtyBitmap> {
        mem.iter()
            .enumerate()
            .map(|(slot, r)| {
                let start = r.start_addr().raw_value();
                let mut bits = vec![0u64; r.len().div_ceil(PAGE_SIZE * 64) as usize];
                for &a in pages {
                    if (start..start + r.len()).contains(&a) {
                        let p = (a - start) / PAGE_SIZE;
                        bits[(p / 64) as usize] |= 1 << (p % 64);
                    }
                }
                DirtyBitmap {
                    slot: slot as u32,
                    start: r.start_addr(),
                    len: r.len(),
                    bits,
                }
            })
            .collect()
    }

    fn contents(mem: &GuestMem) -> Vec<u8> {
        let mut out = Vec::new();
        for r in mem.iter() {
            let mut b = vec![0u8; r.len() as usize];
            mem.read_slice(&mut b, r.start_addr()).unwrap();
            out.extend(b);
        }
        out
    }

    #[test]
    fn a_chain_of_diffs_maps_back_as_the_last_state() {
        let mem = guest(&[(0, 4 << 20), (64 << 20, 2 << 20)]);
        mem.write_slice(&[1u8; 3 * 4096], GuestAddress(0x10000))
            .unwrap();
        mem.write_slice(&[2u8; 4096], GuestAddress(64 << 20))
            .unwrap();
        let d = tempfile::tempdir().unwrap();
        let full = d.path().join("full");
        let (regions, _) = write_memory(&mem, &full).unwrap();

        // Diff 1: one page changed, one zeroed (written as zeroes, not a hole), one new in
        // the high region.
        mem.write_slice(&[3u8; 4096], GuestAddress(0x10000))
            .unwrap();
        mem.write_slice(&[0u8; 4096], GuestAddress(0x11000))
            .unwrap();
        mem.write_slice(&[4u8; 4096], GuestAddress((64 << 20) + 0x5000))
            .unwrap();
        let d1 = d.path().join("diff1");
        let pages1 = [0x10000, 0x11000, (64 << 20) + 0x5000];
        let (r1, s1, u1) = write_diff_unsynced(&mem, &dirty(&mem, &pages1), &d1).unwrap();
        u1.finish().unwrap();
        assert_eq!(r1, regions);
        assert_eq!(s1.written, 3 * 4096);
        let after1 = contents(&mem);

        // Diff 2 on top: a page of diff 1 changed again.
        mem.write_slice(&[5u8; 4096], GuestAddress((64 << 20) + 0x5000))
            .unwrap();
        let d2 = d.path().join("diff2");
        let (_, s2, u2) =
            write_diff_unsynced(&mem, &dirty(&mem, &[(64 << 20) + 0x5000]), &d2).unwrap();
        u2.finish().unwrap();
        assert_eq!(s2.written, 4096);
        use std::os::unix::fs::MetadataExt;
        let alloc = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        assert!(
            alloc(&d2) < alloc(&full),
            "{} vs {}",
            alloc(&d2),
            alloc(&full)
        );

        for mode in [RestoreMemory::Eager, RestoreMemory::Lazy] {
            let back = map_memory_chain(&[full.clone(), d1.clone()], &regions, mode).unwrap();
            assert!(contents(&back) == after1, "{mode:?}: full + diff1");
            let back =
                map_memory_chain(&[full.clone(), d1.clone(), d2.clone()], &regions, mode).unwrap();
            assert!(
                contents(&back) == contents(&mem),
                "{mode:?}: full + diff1 + diff2"
            );
            // Private: writes reach no file.
            back.write_slice(&[9u8; 4096], GuestAddress(0x10000))
                .unwrap();
        }
        let again = map_memory_chain(
            &[full.clone(), d1.clone(), d2.clone()],
            &regions,
            RestoreMemory::Lazy,
        )
        .unwrap();
        assert!(contents(&again) == contents(&mem));
        // Out of mappings: no extent mapped (0), or diff 1's first only (2): the rest is read
        // in, with the same result.
        for budget in [0, 2] {
            let files = [full.clone(), d1.clone(), d2.clone()];
            let back =
                map_memory_chain_within(&files, &regions, RestoreMemory::Lazy, budget).unwrap();
            assert!(contents(&back) == contents(&mem), "budget {budget}");
            back.write_slice(&[9u8; 4096], GuestAddress((64 << 20) + 0x5000))
                .unwrap();
            let again =
                map_memory_chain_within(&files, &regions, RestoreMemory::Lazy, budget).unwrap();
            assert!(
                contents(&again) == contents(&mem),
                "budget {budget}: private"
            );
        }
    }

    #[test]
    fn short_or_misaligned_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("memory");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let r = [MemoryRegionInfo {
            guest_addr: 0,
            size: 8192,
            file_offset: 0,
        }];
        assert!(matches!(
            map_memory(&p, &r, RestoreMemory::Lazy),
            Err(MemoryError::Short { .. })
        ));
        let r = [MemoryRegionInfo {
            guest_addr: 0,
            size: 100,
            file_offset: 0,
        }];
        assert!(matches!(
            map_memory(&p, &r, RestoreMemory::Lazy),
            Err(MemoryError::Layout(_))
        ));
    }
}
