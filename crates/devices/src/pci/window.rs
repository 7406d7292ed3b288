//! The PCI MMIO window: one bus device over the whole 32-bit window that dispatches accesses to
//! the BAR mapped there. Mappings change at run time (the guest moves BARs) behind an `RwLock`;
//! a dispatch holds the read lock only to find the function, then locks the function alone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use super::PciDevice;
use crate::bus::lock;
use crate::BusDevice;

type SharedFunction = Arc<Mutex<dyn PciDevice>>;

struct Mapping {
    len: u64,
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

/// The dispatcher. Clones share the mappings; place one on the MMIO bus at
/// [`PciWindow::base`] for [`PciWindow::len`] bytes.
#[derive(Clone)]
pub struct PciWindow {
    base: u64,
    len: u64,
    map: Arc<RwLock<BTreeMap<u64, Mapping>>>,
}

impl PciWindow {
    pub fn new(base: u64, len: u64) -> Self {
        PciWindow {
            base,
            len,
            map: Arc::default(),
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maps `device`'s BAR `bar` at `[addr, addr + len)`. False (and nothing mapped) if the range
    /// leaves the window or overlaps another BAR.
    pub fn map(&self, addr: u64, len: u64, device: Arc<Mutex<dyn PciDevice>>, bar: usize) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        if len == 0 || addr < self.base || end > self.base + self.len {
            return false;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some((&other, m)) = map.range(..end).next_back() {
            if other + m.len > addr {
                return false;
            }
        }
        map.insert(addr, Mapping { len, device, bar });
        true
    }

    /// Removes the mapping at `addr`.
    pub fn unmap(&self, addr: u64) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }

    /// The function, BAR and offset of an access at absolute address `addr`.
    fn find(&self, addr: u64, size: usize) -> Option<(SharedFunction, usize, u64)> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let (&base, m) = map.range(..=addr).next_back()?;
        let off = addr - base;
        (off.checked_add(size as u64)? <= m.len).then(|| (m.device.clone(), m.bar, off))
    }
}

impl BusDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.find(self.base.wrapping_add(offset), data.len()) {
            Some((dev, bar, off)) => lock(&dev).bar_read(bar, off, data),
            // Nothing decodes there: a master abort reads all ones.
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, bar, off)) = self.find(self.base.wrapping_add(offset), data.len()) {
            lock(&dev).bar_write(bar, off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{PciConfig, PciHeader};

    struct Echo(PciConfig, Vec<(usize, u64, Vec<u8>)>);
    impl PciDevice for Echo {
        fn config(&self) -> &PciConfig {
            &self.0
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.0
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 * 16 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.1.push((bar, offset, data.to_vec()));
        }
    }

    #[test]
    fn maps_moves_and_dispatches() {
        let h = PciHeader {
            vendor_id: 1,
            device_id: 2,
            revision: 0,
            class: (0xff, 0, 0),
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            interrupt_pin: 0,
        };
        let dev = Arc::new(Mutex::new(Echo(PciConfig::new(&h), Vec::new())));
        let mut w = PciWindow::new(0x1000_0000, 0x10_0000);
        assert!(
            !w.map(0x0fff_f000, 0x1000, dev.clone(), 0),
            "below the window"
        );
        assert!(
            !w.map(0x100f_f000, 0x2000, dev.clone(), 0),
            "past the window"
        );
        assert!(!w.map(u64::MAX - 1, 0x1000, dev.clone(), 0));
        assert!(w.map(0x1000_2000, 0x1000, dev.clone(), 2));
        assert!(!w.map(0x1000_2800, 0x1000, dev.clone(), 0), "overlap");
        let mut d = [0u8; 4];
        w.read(0x2004, &mut d);
        assert_eq!(d, [0x24; 4]);
        w.write(0x2ffc, &[1, 2, 3, 4]);
        // Straddling the end of the BAR, or unmapped: all ones, writes dropped.
        w.read(0x2ffe, &mut d);
        assert_eq!(d, [0xff; 4]);
        w.write(0x3000, &[9]);
        w.unmap(0x1000_2000);
        assert!(w.map(0x1000_8000, 0x1000, dev.clone(), 2));
        w.read(0x8001, &mut d);
        assert_eq!(d, [0x21; 4]);
        w.read(0x2004, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(dev.lock().unwrap().1, vec![(2, 0xffc, vec![1, 2, 3, 4])]);
    }
}
