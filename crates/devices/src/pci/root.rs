//! The root bus (bus 0), the host bridge at 00:00.0, and the configuration access mechanisms.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::config::{PciConfig, PciConfigState, PciHeader, COMMAND_MEMORY, NUM_BARS};
use super::{PciDevice, PciError, PciWindow};
use crate::bus::lock;
use crate::BusDevice;

/// Configuration mechanism #1: the address register at 0xcf8, data at 0xcfc..0xcff.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_IO_SIZE: u64 = 8;
/// ECAM for bus 0 only: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS0_SIZE: u64 = 1 << 20;
/// The host bridge's IDs (Intel's "Volume Management Device" bridge ID, as Cloud Hypervisor).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
const SLOTS: usize = 32;

/// The host bridge: a function with a header and nothing else.
pub struct HostBridge(PciConfig);

impl HostBridge {
    pub fn new() -> Self {
        HostBridge(PciConfig::new(&PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            revision: 0,
            class: (0x06, 0x00, 0x00),
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            interrupt_pin: 0,
        }))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.0
    }
}

/// Told when a BAR starts or stops decoding at an address (the guest moved it, or turned memory
/// decoding on or off): `old` is where it decoded until now, `new` where it decodes from now.
pub trait BarObserver: Send + Sync {
    fn bar_moved(&self, slot: u8, bar: usize, size: u64, old: Option<u64>, new: Option<u64>);
}

/// The root's own state for snapshots: the host bridge's configuration space and the
/// mechanism #1 address register. Each function's BARs (where the guest put them) and command
/// register are in its own [`PciConfigState`]; the window mappings follow from those when the
/// restored functions are added to a new root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    pub config_address: u32,
    pub host_bridge: PciConfigState,
}

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    /// Where each BAR is mapped in the window now.
    mapped: [Option<u64>; NUM_BARS],
}

/// PCI bus 0: up to 32 single-function devices.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    host_bridge: Arc<Mutex<HostBridge>>,
    window: PciWindow,
    observer: Option<Arc<dyn BarObserver>>,
}

impl PciRoot {
    /// A bus with the host bridge at slot 0, whose memory BARs decode in `window`.
    pub fn new(window: PciWindow) -> Self {
        let host_bridge = Arc::new(Mutex::new(HostBridge::new()));
        let mut root = PciRoot {
            slots: (0..SLOTS).map(|_| None).collect(),
            host_bridge: host_bridge.clone(),
            window,
            observer: None,
        };
        root.slots[0] = Some(Slot {
            device: host_bridge,
            mapped: [None; NUM_BARS],
        });
        root
    }

    /// Who hears of BAR moves.
    pub fn set_observer(&mut self, observer: Arc<dyn BarObserver>) {
        self.observer = Some(observer);
    }

    /// Places `device` in `slot` and maps the BARs it decodes already.
    pub fn add_device(
        &mut self,
        slot: u8,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciError> {
        match self.slots.get_mut(usize::from(slot)) {
            Some(s @ None) => {
                *s = Some(Slot {
                    device,
                    mapped: [None; NUM_BARS],
                })
            }
            _ => return Err(PciError::SlotTaken(slot)),
        }
        self.update_mappings(slot);
        Ok(())
    }

    /// The first free slot.
    pub fn free_slot(&self) -> Option<u8> {
        self.slots.iter().position(Option::is_none).map(|s| s as u8)
    }

    /// The host bridge's configuration space, for snapshots.
    pub fn host_bridge_state(&self) -> PciConfigState {
        lock(&self.host_bridge).0.state()
    }

    /// Restore [`PciRoot::host_bridge_state`].
    pub fn restore_host_bridge(&mut self, state: &PciConfigState) -> Result<(), PciError> {
        lock(&self.host_bridge).0.restore(state)?;
        self.update_mappings(0);
        Ok(())
    }

    /// Where `slot`'s BAR `bar` decodes now.
    pub fn bar_mapping(&self, slot: u8, bar: usize) -> Option<u64> {
        let s = self.slots.get(usize::from(slot))?.as_ref()?;
        *s.mapped.get(bar)?
    }

    fn slot(&self, bus: u8, dev: u8, func: u8) -> Option<&Slot> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }

    /// A configuration read; absent functions read all ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.slot(bus, dev, func) {
            Some(s) => lock(&s.device).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; writes to absent functions are dropped.
    pub fn config_write(&mut self, bus: u8, dev: u8, func: u8, offset: usize, data: &[u8]) {
        let Some(s) = self.slot(bus, dev, func) else {
            return;
        };
        lock(&s.device).config_write(offset, data);
        if PciConfig::touches_decode(offset, data.len()) {
            self.update_mappings(dev);
        }
    }

    /// Brings every function's window mappings in line with its BARs and command register,
    /// after their configuration spaces were restored behind the root's back (snapshots).
    pub fn refresh_mappings(&mut self) {
        for slot in 0..self.slots.len() as u8 {
            self.update_mappings(slot);
        }
    }

    /// Brings `slot`'s window mappings in line with its BARs and command register.
    fn update_mappings(&mut self, slot: u8) {
        let Some(Some(s)) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        let wanted: Vec<(usize, u64, Option<u64>)> = {
            let d = lock(&s.device);
            let c = d.config();
            let on = c.command() & COMMAND_MEMORY != 0;
            c.bars()
                .map(|(i, size)| {
                    let a = c.bar_addr(i);
                    (i, size, (on && a != 0).then_some(a))
                })
                .collect()
        };
        for (bar, size, want) in wanted {
            let old = s.mapped[bar];
            if old == want {
                continue;
            }
            if let Some(a) = old {
                self.window.unmap(a);
            }
            let new = want.filter(|&a| self.window.map(a, size, s.device.clone(), bar));
            if want.is_some() && new.is_none() {
                tracing::debug!(
                    "pci 00:{slot:02x}.0: BAR {bar} at {:#x} is outside the PCI window or overlaps another; not decoded",
                    want.unwrap_or(0)
                );
            }
            s.mapped[bar] = new;
            if old != new {
                if let Some(o) = &self.observer {
                    o.bar_moved(slot, bar, size, old, new);
                }
            }
        }
    }
}

/// Configuration mechanism #1 (ports 0xcf8..0xcff).
pub struct PciConfigIo {
    address: u32,
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { address: 0, root }
    }

    /// The address register and the root's state, for snapshots.
    pub fn state(&self) -> PciRootState {
        PciRootState {
            config_address: self.address,
            host_bridge: lock(&self.root).host_bridge_state(),
        }
    }

    /// Restore [`PciConfigIo::state`].
    pub fn restore(&mut self, state: &PciRootState) -> Result<(), PciError> {
        lock(&self.root).restore_host_bridge(&state.host_bridge)?;
        self.address = state.config_address;
        Ok(())
    }

    /// (bus, device, function, register offset) if the address register enables an access.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            (a & 0xfc) as usize + data_offset as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let bytes = self.address.to_le_bytes();
            for (i, d) in data.iter_mut().enumerate() {
                *d = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        match self.target(offset - 4) {
            Some((b, d, f, reg)) => lock(&self.root).config_read(b, d, f, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            // Only a dword write at 0xcf8 is the address register.
            if let (0, Ok(b)) = (offset, <[u8; 4]>::try_from(data)) {
                self.address = u32::from_le_bytes(b);
            }
            return;
        }
        if let Some((b, d, f, reg)) = self.target(offset - 4) {
            lock(&self.root).config_write(b, d, f, reg, data);
        }
    }
}

/// The enhanced configuration access mechanism, bus 0 only: 4 KiB per function; registers past
/// the 256 bytes of conventional configuration space read as zero.
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciEcam { root }
    }

    fn target(offset: u64) -> (u8, u8, u8, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            (offset & 0xfff) as usize,
        )
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = Self::target(offset);
        if reg.saturating_add(data.len()) > 0x1000 {
            data.fill(0xff);
            return;
        }
        lock(&self.root).config_read(b, d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = Self::target(offset);
        if reg.saturating_add(data.len()) <= 0x1000 {
            lock(&self.root).config_write(b, d, f, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{BarKind, REG_BAR0, REG_COMMAND};

    struct Func(PciConfig);
    impl PciDevice for Func {
        fn config(&self) -> &PciConfig {
            &self.0
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.0
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(0x10 * bar as u8 + offset as u8);
        }
    }

    type Move = (u8, usize, u64, Option<u64>, Option<u64>);

    #[derive(Default)]
    struct Moves(Mutex<Vec<Move>>);
    impl BarObserver for Moves {
        fn bar_moved(&self, slot: u8, bar: usize, size: u64, old: Option<u64>, new: Option<u64>) {
            self.0.lock().unwrap().push((slot, bar, size, old, new));
        }
    }

    const WIN: u64 = 0xe010_0000;

    fn setup() -> (Arc<Mutex<PciRoot>>, PciWindow, Arc<Moves>) {
        let window = PciWindow::new(WIN, 0x100_0000);
        let mut root = PciRoot::new(window.clone());
        let moves = Arc::new(Moves::default());
        root.set_observer(moves.clone());
        let mut c = PciConfig::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class: (0xff, 0, 0),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
            interrupt_pin: 0,
        });
        c.add_bar(0, 0x4000, BarKind::Mem64).unwrap();
        c.set_bar_addr(0, WIN).unwrap();
        c.set_command(COMMAND_MEMORY);
        root.add_device(3, Arc::new(Mutex::new(Func(c)))).unwrap();
        assert_eq!(
            root.add_device(3, Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciError::SlotTaken(3))
        );
        assert_eq!(
            root.add_device(32, Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciError::SlotTaken(32))
        );
        assert_eq!(root.free_slot(), Some(1));
        (Arc::new(Mutex::new(root)), window, moves)
    }

    fn cf8_read(io: &mut PciConfigIo, dev: u8, reg: u32, len: usize) -> u32 {
        io.write(
            0,
            &(0x8000_0000 | (u32::from(dev) << 11) | (reg & 0xfc)).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        io.read(4 + u64::from(reg & 3), &mut d[..len]);
        u32::from_le_bytes(d)
    }

    #[test]
    fn mechanism_1_accesses_of_every_width() {
        let (root, _w, _m) = setup();
        let mut io = PciConfigIo::new(root);
        // The host bridge.
        assert_eq!(cf8_read(&mut io, 0, 0, 4), 0x0d57_8086);
        assert_eq!(cf8_read(&mut io, 0, 0xa, 2), 0x0600);
        assert_eq!(cf8_read(&mut io, 0, 0xb, 1), 0x06);
        // The device, each width at each offset.
        assert_eq!(cf8_read(&mut io, 3, 0, 4), 0x1044_1af4);
        assert_eq!(cf8_read(&mut io, 3, 0, 2), 0x1af4);
        assert_eq!(cf8_read(&mut io, 3, 2, 2), 0x1044);
        for (i, b) in [0xf4, 0x1a, 0x44, 0x10].iter().enumerate() {
            assert_eq!(cf8_read(&mut io, 3, i as u32, 1), *b);
        }
        // Nobody at slot 4, at function 1, or on bus 1.
        assert_eq!(cf8_read(&mut io, 4, 0, 4), 0xffff_ffff);
        io.write(0, &0x8000_1900u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(0, &0x8001_1800u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // The address register reads back; a non-dword write to it is ignored.
        io.write(0, &0x8000_1808u32.to_le_bytes());
        io.write(1, &[0]);
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_1808);
        // Disabled: all ones, writes dropped.
        io.write(0, &0x1800u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(4, &[0xff; 4]);
        // Byte writes land where addressed: interrupt line via 0xcfc + 0.
        io.write(0, &0x8000_183cu32.to_le_bytes());
        io.write(4, &[0x0a]);
        assert_eq!(cf8_read(&mut io, 3, 0x3c, 1), 0x0a);
        io.write(0, &0x8000_1804u32.to_le_bytes());
        io.write(4, &[0x02, 0x00]);
        assert_eq!(cf8_read(&mut io, 3, 4, 2), 2);
    }

    #[test]
    fn ecam_reaches_the_same_functions() {
        let (root, _w, _m) = setup();
        let mut e = PciEcam::new(root);
        let mut d = [0u8; 4];
        e.read(3 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1044_1af4);
        e.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut b = [0u8; 1];
        e.read((3 << 15) + 0xe, &mut b);
        assert_eq!(b, [0]);
        // Extended space reads zero; function 1, another bus, and straddling all ones.
        e.read((3 << 15) + 0x100, &mut d);
        assert_eq!(d, [0; 4]);
        e.read((3 << 15) + (1 << 12), &mut d);
        assert_eq!(d, [0xff; 4]);
        e.read(1 << 20, &mut d);
        assert_eq!(d, [0xff; 4]);
        e.read((3 << 15) + 0xffe, &mut d);
        assert_eq!(d, [0xff; 4]);
        e.write((3 << 15) + 0x3c, &[7]);
        e.read((3 << 15) + 0x3c, &mut b);
        assert_eq!(b, [7]);
        e.write((3 << 15) + 0xfff, &[1, 2]);
    }

    #[test]
    fn root_state_round_trip_changes_nothing_the_guest_reads() {
        let (root, _w, _m) = setup();
        let mut io = PciConfigIo::new(root.clone());
        // The host bridge's command register and cache line size, then an address left set.
        io.write(0, &0x8000_0004u32.to_le_bytes());
        io.write(4, &[0x06, 0x00]);
        io.write(0, &0x8000_000cu32.to_le_bytes());
        io.write(4, &[0x10]);
        io.write(0, &0x8000_1808u32.to_le_bytes());
        let st = io.state();
        let back: PciRootState =
            serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        let (root2, _w2, _m2) = setup();
        let mut io2 = PciConfigIo::new(root2);
        io2.restore(&back).unwrap();
        assert_eq!(io2.state(), st);
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        io.read(0, &mut a);
        io2.read(0, &mut b);
        assert_eq!(a, b, "address register");
        for reg in (0..256).step_by(4) {
            assert_eq!(cf8_read(&mut io, 0, reg, 4), cf8_read(&mut io2, 0, reg, 4));
        }
        assert_eq!(cf8_read(&mut io2, 0, 4, 2), 6);
        // Another function's state does not fit the host bridge.
        let mut bad = back.clone();
        bad.host_bridge.regs[0] = 0x1044_1af4;
        assert_eq!(io2.restore(&bad), Err(PciError::StateMismatch));
    }

    #[test]
    fn moving_a_bar_moves_its_mapping() {
        let (root, mut w, moves) = setup();
        let mut d = [0u8; 1];
        w.read(4, &mut d);
        assert_eq!(d, [4]);
        let mut e = PciEcam::new(root.clone());
        let cfg = 3 << 15;
        // Sizing with decoding off, as Linux does: the mapping goes away while it is off.
        e.write(cfg + REG_COMMAND as u64, &[0, 0]);
        e.write(cfg + REG_BAR0 as u64, &[0xff; 4]);
        e.write(cfg + REG_BAR0 as u64 + 4, &[0xff; 4]);
        let mut v = [0u8; 4];
        e.read(cfg + REG_BAR0 as u64, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0xffff_c004);
        e.write(
            cfg + REG_BAR0 as u64,
            &((WIN + 0x8000) as u32).to_le_bytes(),
        );
        e.write(cfg + REG_BAR0 as u64 + 4, &[0; 4]);
        w.read(4, &mut d);
        assert_eq!(d, [0xff]);
        e.write(cfg + REG_COMMAND as u64, &[2, 0]);
        w.read(0x8004, &mut d);
        assert_eq!(d, [4]);
        assert_eq!(root.lock().unwrap().bar_mapping(3, 0), Some(WIN + 0x8000));
        // Moving it out of the window (decoding on): not mapped, and said so.
        e.write(cfg + REG_BAR0 as u64 + 4, &[1, 0, 0, 0]);
        assert_eq!(root.lock().unwrap().bar_mapping(3, 0), None);
        assert_eq!(
            *moves.0.lock().unwrap(),
            vec![
                (3, 0, 0x4000, None, Some(WIN)),
                (3, 0, 0x4000, Some(WIN), None),
                (3, 0, 0x4000, None, Some(WIN + 0x8000)),
                (3, 0, 0x4000, Some(WIN + 0x8000), None),
            ]
        );
    }
}
