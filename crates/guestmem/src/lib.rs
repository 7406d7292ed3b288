//! The one guest memory type of Vessel.
//!
//! Guest RAM is vm-memory's mmap backend with an [`AtomicBitmap`] per region: every write the
//! VMM makes through vm-memory's `Bytes` / `VolatileSlice` accessors (device workers filling
//! receive buffers and used rings, block reads, the boot loader) sets the bit of each page it
//! touches. KVM's dirty log sees only the guest's own writes; together they say which pages
//! changed (`hypervisor::dirty`). arch, devices, hypervisor and vmm all name guest memory as
//! [`GuestMem`].
//!
//! Writes that do not go through vm-memory (the kernel filling io_uring read buffers, pages
//! dropped with `madvise`) must be reported with [`mark_dirty`].

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use vm_memory::bitmap::AtomicBitmap as DirtyBits;

/// Guest memory: mmap regions that log the VMM's writes.
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMem`].
pub type GuestRegion = vm_memory::GuestRegionMmap<AtomicBitmap>;
/// The mapping behind a [`GuestRegion`].
pub type GuestMapping = vm_memory::MmapRegion<AtomicBitmap>;

/// Marks the pages of `addr..addr+len` dirty, for writes that bypass vm-memory's accessors.
/// Parts of the range outside guest memory are ignored (there is nothing to log there).
pub fn mark_dirty(mem: &GuestMem, addr: GuestAddress, len: u64) {
    let end = addr.raw_value().saturating_add(len);
    let mut at = addr.raw_value();
    while at < end {
        let Some(region) = mem.find_region(GuestAddress(at)) else {
            // Skip to the next region that starts inside the range, if any.
            match mem
                .iter()
                .map(|r| r.start_addr().raw_value())
                .filter(|&s| s > at && s < end)
                .min()
            {
                Some(next) => {
                    at = next;
                    continue;
                }
                None => return,
            }
        };
        let start = region.start_addr().raw_value();
        let offset = at - start;
        let n = (region.len() - offset).min(end - at);
        region.bitmap().mark_dirty(offset as usize, n as usize);
        at += n;
    }
}

/// Clears the log of the VMM's writes to `mem` (every region).
pub fn clear_dirty(mem: &GuestMem) {
    for region in mem.iter() {
        let mapping: &GuestMapping = region;
        mapping.bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn dirty_pages(mem: &GuestMem) -> Vec<u64> {
        let mut out = Vec::new();
        for r in mem.iter() {
            let base = r.start_addr().raw_value();
            for p in 0..r.len() / 4096 {
                if r.bitmap().dirty_at((p * 4096) as usize) {
                    out.push(base + p * 4096);
                }
            }
        }
        out
    }

    #[test]
    fn writes_and_explicit_marks_are_logged() {
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)])
                .unwrap();
        mem.write_obj(1u8, GuestAddress(0x2001)).unwrap();
        assert_eq!(dirty_pages(&mem), vec![0x2000]);
        // Across the gap between the regions: both sides, nothing in between.
        mark_dirty(&mem, GuestAddress(0xf000), 0x12000);
        assert_eq!(dirty_pages(&mem), vec![0x2000, 0xf000, 0x20000]);
        // Entirely outside: ignored.
        mark_dirty(&mem, GuestAddress(0x100000), 0x1000);
        mark_dirty(&mem, GuestAddress(u64::MAX - 10), 100);
        assert_eq!(dirty_pages(&mem).len(), 3);
        clear_dirty(&mem);
        assert!(dirty_pages(&mem).is_empty());
    }
}
