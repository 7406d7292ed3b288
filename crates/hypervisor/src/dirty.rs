//! Dirty page tracking, for diff snapshots and live migration.
//!
//! Two sources of writes to guest memory have to be tracked, and KVM sees only the first:
//! - **The guest's own writes** (vCPUs, and KVM's writes on their behalf such as kvmclock
//!   pages): KVM logs them per memory slot once the slots are registered with
//!   `KVM_MEM_LOG_DIRTY_PAGES` ([`Vm::set_dirty_logging`]); [`Vm::dirty_bitmap`] fetches and
//!   clears the log (`KVM_GET_DIRTY_LOG`).
//! - **The VMM's writes** (virtio used rings and descriptors' buffers written by device
//!   workers, the boot loader, the balloon): they go through the host mapping, so KVM never sees
//!   them. vm-memory can log them: guest memory created as
//!   `GuestMemoryMmap<AtomicBitmap>` ([`TrackedMemory`], vm-memory's `backend-bitmap` feature,
//!   enabled in the workspace) marks every page written through its `Bytes`/`VolatileSlice`
//!   accessors (which is how Vessel's devices write) in a per-region bitmap;
//!   [`take_vmm_dirty`] fetches and clears it. Writes through raw host pointers
//!   (`get_host_address`) bypass it. Page-sized bits match KVM's, so [`DirtyBitmap::merge`]
//!   ORs the two.
//!
//! Vessel's guest memory is [`TrackedMemory`] (`guestmem::GuestMem`) everywhere; the few
//! writes that bypass vm-memory (io_uring reads into guest buffers, `madvise` discards) mark
//! their pages with `guestmem::mark_dirty`. `vmm::dirty` owns both logs and shares them
//! between their consumers (diff snapshots, migration).

use std::ops::Deref;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::mem::PAGE_SIZE;
use crate::{op, Result, Vm};

/// Guest memory that also logs the VMM's own writes (see the module documentation).
pub type TrackedMemory = guestmem::GuestMem;

/// The dirty pages of one memory region (one KVM slot): bit `i` of word `i / 64` is the page at
/// `start + i * 4 KiB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Index of the region in the guest memory (and its KVM slot).
    pub slot: u32,
    pub start: GuestAddress,
    /// Bytes in the region.
    pub len: u64,
    pub bits: Vec<u64>,
}

impl DirtyBitmap {
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len.div_ceil(PAGE_SIZE)
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the page holding `addr` is dirty (false outside the region).
    pub fn is_dirty(&self, addr: GuestAddress) -> bool {
        let Some(off) = addr.0.checked_sub(self.start.0).filter(|&o| o < self.len) else {
            return false;
        };
        self.page_dirty(off / PAGE_SIZE)
    }

    /// Whether page `page` (an index in the region) is dirty (false past the bitmap).
    pub fn page_dirty(&self, page: u64) -> bool {
        self.bits
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The guest addresses of the dirty pages, in order.
    pub fn dirty_pages(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        let pages = self.pages();
        self.bits.iter().enumerate().flat_map(move |(i, &w)| {
            (0..64u64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
                .filter(move |&p| p < pages)
                .map(move |p| GuestAddress(self.start.0 + p * PAGE_SIZE))
        })
    }

    /// Adds the dirty pages of `other`, a bitmap of the same region.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        debug_assert_eq!((self.start, self.len), (other.start, other.len));
        if self.bits.len() < other.bits.len() {
            self.bits.resize(other.bits.len(), 0);
        }
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }
}

/// ORs `vmm` (from [`take_vmm_dirty`]) into `kvm` (from [`Vm::dirty_bitmap`]), region by region.
pub fn merge_all(mut kvm: Vec<DirtyBitmap>, vmm: &[DirtyBitmap]) -> Vec<DirtyBitmap> {
    for v in vmm {
        match kvm.iter_mut().find(|k| k.slot == v.slot) {
            Some(k) => k.merge(v),
            None => kvm.push(v.clone()),
        }
    }
    kvm
}

/// Fetches and clears the log of the VMM's own writes to `mem`, one bitmap per region.
pub fn take_vmm_dirty(mem: &TrackedMemory) -> Vec<DirtyBitmap> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            let mapping: &MmapRegion<AtomicBitmap> = region.deref();
            DirtyBitmap {
                slot: slot as u32,
                start: region.start_addr(),
                len: region.len(),
                bits: mapping.bitmap().get_and_reset(),
            }
        })
        .collect()
}

impl Vm {
    /// Turns KVM's dirty page log on or off for every region of `mem`, by re-registering the
    /// same slots (as [`Vm::register_memory`] made them) with or without
    /// `KVM_MEM_LOG_DIRTY_PAGES`. Turning it on starts from a clean log. The vCPUs may be
    /// running.
    pub fn set_dirty_logging<B: Bitmap>(&self, mem: &GuestMemoryMmap<B>, on: bool) -> Result<()> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.set_memory_slots(mem, flags)
    }

    /// Fetches and clears KVM's dirty log for every region of `mem` (`KVM_GET_DIRTY_LOG`): the
    /// pages the guest wrote since logging was turned on or since the previous call. Logging
    /// must be on. Pages the VMM wrote are not in it (see the module documentation).
    pub fn dirty_bitmap<B: Bitmap>(&self, mem: &GuestMemoryMmap<B>) -> Result<Vec<DirtyBitmap>> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                let bits = self
                    .fd()
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(op("KVM_GET_DIRTY_LOG"))?;
                Ok(DirtyBitmap {
                    slot: slot as u32,
                    start: region.start_addr(),
                    len: region.len(),
                    bits,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn bitmap(start: u64, len: u64, pages: &[u64]) -> DirtyBitmap {
        let mut bits = vec![0u64; len.div_ceil(PAGE_SIZE * 64) as usize];
        for p in pages {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        DirtyBitmap {
            slot: 0,
            start: GuestAddress(start),
            len,
            bits,
        }
    }

    #[test]
    fn pages_are_listed_merged_and_bounded() {
        let mut a = bitmap(0x10_0000, 100 * PAGE_SIZE, &[0, 63, 64, 99]);
        assert_eq!(a.count(), 4);
        let pages: Vec<u64> = a.dirty_pages().map(|g| g.0).collect();
        assert_eq!(
            pages,
            vec![
                0x10_0000,
                0x10_0000 + 63 * 4096,
                0x10_0000 + 64 * 4096,
                0x10_0000 + 99 * 4096
            ]
        );
        assert!(a.is_dirty(GuestAddress(0x10_0fff)));
        assert!(!a.is_dirty(GuestAddress(0x10_1000)));
        assert!(!a.is_dirty(GuestAddress(0xf_f000)));
        assert!(!a.is_dirty(GuestAddress(0x10_0000 + 100 * 4096)));
        a.merge(&bitmap(0x10_0000, 100 * PAGE_SIZE, &[1, 99]));
        assert_eq!(a.count(), 5);
        // Bits past the region's end (a KVM bitmap is rounded up to 64 pages) are never pages.
        a.bits[1] |= 1 << 40;
        assert_eq!(a.dirty_pages().count(), 5);
    }

    #[test]
    fn tracked_memory_logs_the_vmms_writes() {
        let mem = TrackedMemory::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap();
        mem.write_obj(7u32, GuestAddress(0x3004)).unwrap();
        mem.write_slice(&[1u8; 8192], GuestAddress((4 << 20) + 0x1800))
            .unwrap();
        let _: u32 = mem.read_obj(GuestAddress(0x9000)).unwrap();
        let d = take_vmm_dirty(&mem);
        let pages: Vec<u64> = d
            .iter()
            .flat_map(|b| b.dirty_pages())
            .map(|g| g.0)
            .collect();
        assert_eq!(
            pages,
            vec![
                0x3000,
                (4 << 20) + 0x1000,
                (4 << 20) + 0x2000,
                (4 << 20) + 0x3000
            ]
        );
        assert!(take_vmm_dirty(&mem).iter().all(|b| b.count() == 0));
        let merged = merge_all(vec![bitmap(0, 1 << 20, &[5])], &[bitmap(0, 1 << 20, &[3])]);
        assert_eq!(merged[0].count(), 2);
    }
}
