//! The one owner of the dirty page logs.
//!
//! Two logs say which guest pages changed: KVM's (the guest's writes, `KVM_GET_DIRTY_LOG`) and
//! vm-memory's bitmap (the VMM's own writes, `hypervisor::dirty::take_vmm_dirty`). Reading
//! either clears it, so two readers would steal bits from each other. [`DirtyTracker`] is the
//! only reader: each [`Consumer`] (the base of the next diff snapshot, a live migration) has
//! its own accumulator; a sync fetches both logs once and ORs them into every accumulator,
//! and a consumer takes (and empties) only its own.
//!
//! KVM's logging costs a write fault per page per epoch, so it is turned on only when a
//! consumer first registers (the first snapshot, a restore, a migration) and off when the last
//! one leaves.

use std::sync::Mutex;

use guestmem::GuestMem;
use hypervisor::dirty::{merge_all, take_vmm_dirty, DirtyBitmap};

/// Who reads the dirty logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumer {
    /// Pages changed since the last snapshot (the base of the next diff snapshot).
    SnapshotBase,
    /// A live migration's pre-copy rounds.
    Migration,
}

#[derive(Default)]
struct Inner {
    /// Whether KVM's log is on.
    logging: bool,
    accumulators: Vec<(Consumer, Vec<DirtyBitmap>)>,
}

/// See the module documentation.
#[derive(Default)]
pub struct DirtyTracker {
    inner: Mutex<Inner>,
}

/// One empty bitmap per region of `mem`.
fn empty(mem: &GuestMem) -> Vec<DirtyBitmap> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .enumerate()
        .map(|(slot, r)| DirtyBitmap {
            slot: slot as u32,
            start: r.start_addr(),
            len: r.len(),
            bits: vec![0; r.len().div_ceil(hypervisor::mem::PAGE_SIZE * 64) as usize],
        })
        .collect()
}

fn or_into(acc: &mut [DirtyBitmap], new: &[DirtyBitmap]) {
    for n in new {
        if let Some(a) = acc.iter_mut().find(|a| a.slot == n.slot) {
            a.merge(n);
        }
    }
}

impl DirtyTracker {
    /// Whether `consumer` is registered.
    pub fn has(&self, consumer: Consumer) -> bool {
        devices::bus::lock(&self.inner)
            .accumulators
            .iter()
            .any(|(c, _)| *c == consumer)
    }

    /// Starts (or restarts) tracking for `consumer` from now: its accumulator is emptied.
    /// Turns KVM's log on if it was off (the VMM's log, which ran since boot, is cleared then).
    pub fn start(
        &self,
        vm: &hypervisor::Vm,
        mem: &GuestMem,
        consumer: Consumer,
    ) -> Result<(), hypervisor::Error> {
        let mut inner = devices::bus::lock(&self.inner);
        if inner.logging {
            // What happened until now belongs to the other consumers.
            Self::sync_locked(&mut inner, vm, mem)?;
        } else {
            vm.set_dirty_logging(mem, true)?;
            take_vmm_dirty(mem);
            inner.logging = true;
        }
        inner.accumulators.retain(|(c, _)| *c != consumer);
        inner.accumulators.push((consumer, empty(mem)));
        Ok(())
    }

    /// Stops tracking for `consumer`; KVM's log goes off with the last consumer.
    pub fn stop(&self, vm: &hypervisor::Vm, mem: &GuestMem, consumer: Consumer) {
        let mut inner = devices::bus::lock(&self.inner);
        inner.accumulators.retain(|(c, _)| *c != consumer);
        if inner.accumulators.is_empty() && inner.logging {
            if let Err(e) = vm.set_dirty_logging(mem, false) {
                tracing::warn!("cannot turn dirty logging off: {e}");
            }
            inner.logging = false;
        }
    }

    /// The pages dirtied since `consumer` started or last took them (both logs, fetched now);
    /// its accumulator is emptied. `None` if `consumer` is not registered.
    pub fn take(
        &self,
        vm: &hypervisor::Vm,
        mem: &GuestMem,
        consumer: Consumer,
    ) -> Result<Option<Vec<DirtyBitmap>>, hypervisor::Error> {
        let mut inner = devices::bus::lock(&self.inner);
        if !inner.accumulators.iter().any(|(c, _)| *c == consumer) {
            return Ok(None);
        }
        Self::sync_locked(&mut inner, vm, mem)?;
        let fresh = empty(mem);
        Ok(inner
            .accumulators
            .iter_mut()
            .find(|(c, _)| *c == consumer)
            .map(|(_, acc)| std::mem::replace(acc, fresh)))
    }

    /// Gives back pages taken from `consumer` that it could not use (a snapshot that failed):
    /// they count as dirty again.
    pub fn give_back(&self, consumer: Consumer, pages: &[DirtyBitmap]) {
        let mut inner = devices::bus::lock(&self.inner);
        if let Some((_, acc)) = inner.accumulators.iter_mut().find(|(c, _)| *c == consumer) {
            or_into(acc, pages);
        }
    }

    fn sync_locked(
        inner: &mut Inner,
        vm: &hypervisor::Vm,
        mem: &GuestMem,
    ) -> Result<(), hypervisor::Error> {
        if !inner.logging {
            return Ok(());
        }
        let kvm = vm.dirty_bitmap(mem)?;
        let vmm = take_vmm_dirty(mem);
        let all = merge_all(kvm, &vmm);
        for (_, acc) in &mut inner.accumulators {
            or_into(acc, &all);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn pages(b: &Option<Vec<DirtyBitmap>>) -> Vec<u64> {
        b.iter()
            .flatten()
            .flat_map(|b| b.dirty_pages())
            .map(|g| g.0)
            .collect()
    }

    /// Consumers never steal each other's bits (the VMM's writes; KVM's log needs a VM with
    /// running vCPUs, covered by the integration tests).
    #[test]
    fn consumers_each_see_every_write() {
        let hv = match hypervisor::Hypervisor::new() {
            Ok(h) => h,
            Err(e) => {
                eprintln!("no KVM ({e}): skipped");
                return;
            }
        };
        let vm = hv.create_vm().unwrap();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        vm.register_memory(&mem).unwrap();
        let t = DirtyTracker::default();
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        t.start(&vm, &mem, Consumer::SnapshotBase).unwrap();
        // Before the start: not counted.
        mem.write_obj(1u8, GuestAddress(0x2000)).unwrap();
        t.start(&vm, &mem, Consumer::Migration).unwrap();
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        let m = t.take(&vm, &mem, Consumer::Migration).unwrap();
        assert_eq!(pages(&m), vec![0x3000]);
        mem.write_obj(1u8, GuestAddress(0x4000)).unwrap();
        let m = t.take(&vm, &mem, Consumer::Migration).unwrap();
        assert_eq!(pages(&m), vec![0x4000]);
        t.stop(&vm, &mem, Consumer::Migration);
        assert!(t.take(&vm, &mem, Consumer::Migration).unwrap().is_none());
        let s = t.take(&vm, &mem, Consumer::SnapshotBase).unwrap();
        assert_eq!(pages(&s), vec![0x2000, 0x3000, 0x4000]);
        // Given back: dirty again, with what came since.
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        t.give_back(Consumer::SnapshotBase, s.as_deref().unwrap());
        let s = t.take(&vm, &mem, Consumer::SnapshotBase).unwrap();
        assert_eq!(pages(&s), vec![0x2000, 0x3000, 0x4000, 0x5000]);
        t.stop(&vm, &mem, Consumer::SnapshotBase);
        assert!(!t.has(Consumer::SnapshotBase));
    }
}
