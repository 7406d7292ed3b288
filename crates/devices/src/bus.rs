//! Address buses (port I/O and MMIO) that route an access to the device owning the address.
//!
//! A bus is built before the vCPUs start and is read-only afterwards, so vCPU threads dispatch
//! through it without a bus-wide lock: each device has its own mutex, and two vCPUs touching
//! two devices never wait for each other.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address bus.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((&other, e)) = self.devices.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (&base, e) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= e.len).then_some((offset, e))
    }

    /// Dispatches a read; returns false (leaving `data` untouched) if no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, e)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, e)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a panic in another holder rather than propagating it: a
/// device's registers stay usable, and the VM monitor never dies of a poisoned lock.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Reg::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Reg::default())), 0x3f0, 9),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9,
                other: 0x3f8
            })
        );
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Reg::default())), 0x3fc, 2),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 2,
                other: 0x3f8
            })
        );
        assert!(bus
            .insert(Arc::new(Mutex::new(Reg::default())), u64::MAX, 2)
            .is_err());
        bus.insert(Arc::new(Mutex::new(Reg::default())), 0x3f0, 8)
            .unwrap();

        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(a.lock().unwrap().last, vec![(0, vec![b'x'])]);
        // Past the end, or straddling it: nobody's.
        assert!(!bus.read(0x400, &mut d));
        let mut d4 = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut d4));
    }
}
