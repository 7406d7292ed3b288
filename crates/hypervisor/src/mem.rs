//! Giving guest memory back to the host: the `madvise` behind virtio-balloon inflation and free
//! page reporting.
//!
//! [`discard`] takes guest-physical ranges, never raw host pointers: it checks the range against
//! the guest memory map first, so it can only ever drop pages of guest RAM (which Rust code only
//! reaches through vm-memory's volatile accessors, never through references).

use std::io;

use guestmem::GuestMem;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

/// Granularity of [`discard`].
pub const PAGE_SIZE: u64 = 4096;

/// Errors of [`discard`].
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("range {addr:#x}+{len:#x} is not page aligned")]
    Unaligned { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} is not in guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("madvise or mmap of {addr:#x}+{len:#x}: {source}")]
    Madvise {
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// Drops the host pages backing the guest-physical range `addr..addr+len` (page aligned; it may
/// span regions, but every byte must be guest RAM). Afterwards the range reads as zeroes and no
/// longer counts in the VMM's resident memory; the guest faults fresh pages in on its next
/// touch. Anonymous private memory gets `MADV_DONTNEED`, file-backed (shared) memory
/// `MADV_REMOVE`, which also frees the file's blocks.
pub fn discard(mem: &GuestMem, addr: GuestAddress, len: u64) -> Result<(), MemError> {
    let raw = addr.raw_value();
    if !raw.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(MemError::Unaligned { addr: raw, len });
    }
    let outside = || MemError::OutsideMemory { addr: raw, len };
    if len == 0 {
        return Ok(());
    }
    let end = raw.checked_add(len).ok_or_else(outside)?;
    // Check all of it before dropping any of it.
    let mut at = raw;
    while at < end {
        let region = mem.find_region(GuestAddress(at)).ok_or_else(outside)?;
        let region_end = region.start_addr().raw_value() + region.len();
        at = region_end.min(end);
    }
    let mut at = raw;
    while at < end {
        let region = mem.find_region(GuestAddress(at)).ok_or_else(outside)?;
        let offset = at - region.start_addr().raw_value();
        let n = (region.len() - offset).min(end - at);
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| outside())?;
        // A private file mapping (a snapshot restored lazily) must not punch holes into the
        // snapshot's file: dropping the private copies suffices (the pages read back as the
        // file's, at no memory cost).
        let shared_file = region.file_offset().is_some() && region.flags() & libc::MAP_SHARED != 0;
        let advice = if shared_file {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: `host..host+n` lies inside one mapping of guest memory (found through the
        // region that owns `at`, `n` bounded by the region's end), which stays mapped while
        // `mem` is borrowed. Discarding it only replaces its contents with zeroes (or fresh
        // file pages); guest memory is never behind a Rust reference, only accessed through
        // vm-memory's volatile copies, so no Rust invariant depends on its contents.
        let r = unsafe { libc::madvise(host.cast(), n as usize, advice) };
        if r != 0 {
            return Err(MemError::Madvise {
                addr: at,
                len: n,
                source: io::Error::last_os_error(),
            });
        }
        // The pages changed (to zeroes, or the file's contents) behind vm-memory's back.
        guestmem::mark_dirty(mem, GuestAddress(at), n);
        at += n;
    }
    Ok(())
}

/// The host address of the guest-physical range `addr..addr+len`, which must be page aligned
/// and inside one region; `None` for an empty range (after the same checks).
fn host_range(mem: &GuestMem, addr: GuestAddress, len: u64) -> Result<Option<*mut u8>, MemError> {
    let raw = addr.raw_value();
    if !raw.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(MemError::Unaligned { addr: raw, len });
    }
    let outside = || MemError::OutsideMemory { addr: raw, len };
    let region = mem.find_region(addr).ok_or_else(outside)?;
    let offset = raw - region.start_addr().raw_value();
    if region.len() - offset < len {
        return Err(outside());
    }
    if len == 0 {
        return Ok(None);
    }
    region
        .get_host_address(MemoryRegionAddress(offset))
        .map(Some)
        .map_err(|_| outside())
}

/// Asks for transparent huge pages on every anonymous region of `mem` (`MADV_HUGEPAGE`), as
/// QEMU and Cloud Hypervisor do: fewer page faults when the guest (or an incoming migration)
/// first touches its memory, and fewer TLB misses; or, with `on` false, rules them out from
/// now on (`MADV_NOHUGEPAGE`: khugepaged no longer fills the holes of a range into a huge
/// page). File mappings (a restored snapshot) are left alone. Returns whether the kernel took
/// the advice everywhere (a kernel without THP refuses it; the memory works the same, with
/// small pages).
pub fn advise_hugepages(mem: &GuestMem, on: bool) -> bool {
    let advice = if on {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    let mut all = true;
    for region in mem.iter() {
        if region.file_offset().is_some() {
            continue;
        }
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            all = false;
            continue;
        };
        // SAFETY: `host..host+len` is exactly one region's mapping of guest memory, mapped
        // while `mem` is borrowed. MADV_(NO)HUGEPAGE only changes how the kernel backs the
        // range (huge or small pages); contents and protection stay as they are.
        let r = unsafe { libc::madvise(host.cast(), region.len() as usize, advice) };
        all &= r == 0;
    }
    all
}

/// Faults in the guest-physical range `addr..addr+len` (page aligned, inside one region) for
/// writing, so that the guest finds it resident (private file mappings get their copies now):
/// `MADV_POPULATE_WRITE` (Linux 5.14); returns false where the kernel lacks it.
pub fn populate(mem: &GuestMem, addr: GuestAddress, len: u64) -> Result<bool, MemError> {
    let Some(host) = host_range(mem, addr, len)? else {
        return Ok(true);
    };
    // SAFETY: `host..host+len` lies inside one mapping of guest memory (checked by
    // `host_range`), which stays mapped while `mem` is borrowed; populating only faults pages
    // in (their contents do not change).
    let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) {
        return Ok(false);
    }
    Err(MemError::Madvise {
        addr: addr.raw_value(),
        len,
        source: e,
    })
}

/// Maps `len` bytes of `file` from `offset` privately over the guest-physical range
/// `addr..addr+len` (page aligned, inside one region), replacing what was mapped there: the
/// range reads as the file from now on, pages come in on first touch, and the guest's writes
/// stay private (the file is never written). For restoring a chain of diff snapshots over
/// the mapping of its full snapshot.
pub fn map_file_over(
    mem: &GuestMem,
    addr: GuestAddress,
    len: u64,
    file: &std::fs::File,
    offset: u64,
) -> Result<(), MemError> {
    use std::os::fd::AsRawFd;
    let raw = addr.raw_value();
    if !offset.is_multiple_of(PAGE_SIZE) {
        return Err(MemError::Unaligned { addr: raw, len });
    }
    let Some(host) = host_range(mem, addr, len)? else {
        return Ok(());
    };
    let file_offset =
        libc::off_t::try_from(offset).map_err(|_| MemError::OutsideMemory { addr: raw, len })?;
    // SAFETY: `host..host+len` lies inside one mapping of guest memory (checked by
    // `host_range`), which stays mapped while `mem` is borrowed; MAP_FIXED replaces exactly
    // those pages with a private mapping of the same size and protection, so the region's
    // own unmap later covers it too. Guest memory is never behind a Rust reference, only
    // accessed through vm-memory's volatile copies, so changing its contents breaks no Rust
    // invariant. The kernel keeps its own reference to `file` for the new mapping.
    let r = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            file_offset,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(MemError::Madvise {
            addr: raw,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Which pages of the guest-physical range `addr..addr+len` (page aligned, inside one region)
/// are resident in this process (`mincore`): pages the guest never touched are not, and can be
/// left out of a snapshot.
pub fn resident_pages(mem: &GuestMem, addr: GuestAddress, len: u64) -> Result<Vec<bool>, MemError> {
    let Some(host) = host_range(mem, addr, len)? else {
        return Ok(Vec::new());
    };
    let mut vec = vec![0u8; (len / PAGE_SIZE) as usize];
    // SAFETY: `host..host+len` lies inside one mapping of guest memory (checked by
    // `host_range`), which stays mapped while `mem` is borrowed; mincore only reads the page
    // tables and writes one byte per page into `vec`, which has exactly that many bytes.
    let r = unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) };
    if r != 0 {
        return Err(MemError::Madvise {
            addr: addr.raw_value(),
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

/// Resident bytes of this process's mappings that contain `addr` (a host address), from
/// `/proc/self/smaps`; for tests and diagnostics.
pub fn resident_bytes_at(host_addr: usize) -> Option<u64> {
    let v = smaps_field_at(host_addr, "Rss:")?;
    let kib: u64 = v.trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The value of `field` (e.g. `Rss:`) in `/proc/self/smaps` for the mapping that holds
/// `host_addr`, trimmed.
fn smaps_field_at(host_addr: usize, field: &str) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&host_addr);
                continue;
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix(field) {
                return Some(v.trim().to_string());
            }
        }
    }
    None
}

/// The host address of guest address `addr`, for [`resident_bytes_at`].
pub fn host_address(mem: &GuestMem, addr: GuestAddress) -> Option<usize> {
    mem.get_host_address(addr).ok().map(|p| p as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn resident_pages_are_the_touched_ones() {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        m.write_slice(&[1u8], GuestAddress(3 * PAGE_SIZE)).unwrap();
        m.write_slice(&[1u8], GuestAddress(7 * PAGE_SIZE + 5))
            .unwrap();
        let r = resident_pages(&m, GuestAddress(0), 16 * PAGE_SIZE).unwrap();
        let touched: Vec<usize> = (0..16).filter(|&i| r[i]).collect();
        assert_eq!(touched, vec![3, 7]);
        assert!(resident_pages(&m, GuestAddress(1 << 20), PAGE_SIZE).is_err());
        assert!(resident_pages(&m, GuestAddress(1), PAGE_SIZE).is_err());
    }

    /// The `VmFlags` of this process's mapping that holds `host`.
    fn vm_flags_at(host: usize) -> String {
        smaps_field_at(host, "VmFlags:").expect("a mapping with VmFlags")
    }

    #[test]
    fn anonymous_guest_memory_asks_for_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"));
        let m =
            GuestMem::from_ranges(&[(GuestAddress(0), 8 << 20), (GuestAddress(1 << 30), 4 << 20)])
                .unwrap();
        let hosts = [
            host_address(&m, GuestAddress(0)).unwrap(),
            host_address(&m, GuestAddress(1 << 30)).unwrap(),
        ];
        for h in hosts {
            assert!(
                !vm_flags_at(h).split(' ').any(|f| f == "hg"),
                "{}",
                vm_flags_at(h)
            );
        }
        let has = |h: usize, flag: &str| vm_flags_at(h).split(' ').any(|f| f == flag);
        assert_eq!(advise_hugepages(&m, true), thp);
        if thp {
            for h in hosts {
                assert!(has(h, "hg"), "{}", vm_flags_at(h));
            }
        }
        // And off again (as before a post-copy drops pages).
        assert_eq!(advise_hugepages(&m, false), thp);
        if thp {
            for h in hosts {
                assert!(has(h, "nh") && !has(h, "hg"), "{}", vm_flags_at(h));
            }
        }
        // The memory works as before.
        m.write_obj(0x5au8, GuestAddress((1 << 30) + 5)).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress((1 << 30) + 5)).unwrap(), 0x5a);
    }

    #[test]
    fn discarded_pages_read_zero_and_leave_rss() {
        let size = 64 << 20;
        let m = GuestMem::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let host = host_address(&m, GuestAddress(0)).unwrap();
        let page = vec![0xa5u8; PAGE_SIZE as usize];
        for p in 0..(size as u64 / PAGE_SIZE) {
            m.write_slice(&page, GuestAddress(p * PAGE_SIZE)).unwrap();
        }
        let before = resident_bytes_at(host).unwrap();
        assert!(before >= size as u64 - (1 << 20), "rss {before}");
        discard(&m, GuestAddress(PAGE_SIZE), 48 << 20).unwrap();
        let after = resident_bytes_at(host).unwrap();
        assert!(after + (40 << 20) <= before, "rss {before} -> {after}");
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(PAGE_SIZE)).unwrap();
        assert_eq!(b, [0; 8]);
        m.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(b, [0xa5; 8]);
    }

    #[test]
    fn bad_ranges_are_refused_untouched() {
        let m =
            GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)])
                .unwrap();
        m.write_obj(7u8, GuestAddress(0xff000)).unwrap();
        assert!(matches!(
            discard(&m, GuestAddress(1), 4096),
            Err(MemError::Unaligned { .. })
        ));
        // Runs into the hole: nothing is dropped.
        assert!(matches!(
            discard(&m, GuestAddress(0xff000), 0x2000),
            Err(MemError::OutsideMemory { .. })
        ));
        assert!(matches!(
            discard(&m, GuestAddress(u64::MAX - 4095), 4096),
            Err(MemError::OutsideMemory { .. })
        ));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0xff000)).unwrap(), 7);
        discard(&m, GuestAddress(0), 0).unwrap();
    }
}
