//! PCI configuration space through both access mechanisms (ports 0xcf8/0xcfc and ECAM), BAR
//! sizing and relocation, and accesses to the PCI window where the BARs decode.
//!
//! The root bus holds the host bridge (slot 0), two plain functions with 32- and 64-bit BARs
//! of several sizes (slots 1 and 3) and a virtio-pci function (slot 2, MSI-X, INTx) whose device
//! serves its queues synchronously, with guest memory from the input.
//!
//! Input: 2 bytes length L of the access script, L bytes of script (records of 1 byte op,
//! 3 bytes a, b, c, 4 bytes value), then guest memory contents.
//!
//! Checked: every BAR the root maps lies inside the window, naturally aligned; the moves the
//! observer hears of chain up (each one starts where the last one of that BAR ended); the root's
//! state survives a round trip through JSON into a new root.

#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::pci::{
    BarKind, BarObserver, PciConfig, PciConfigIo, PciDevice, PciEcam, PciHeader, PciRoot,
    PciRootState, PciWindow,
};
use devices::virtio::pci::VirtioPciDevice;
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const WIN: u64 = 0xe000_0000;
const WIN_LEN: u64 = 0x100_0000;

/// A function with a few BARs that remembers what was written to them.
struct Func(PciConfig, [u8; 64]);

impl PciDevice for Func {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.0
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.1[(bar * 8 + offset as usize + i) % 64];
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            self.1[(bar * 8 + offset as usize + i) % 64] = *d;
        }
    }
}

fn func(bars: &[(usize, u64, BarKind)]) -> Func {
    let mut c = PciConfig::new(&PciHeader {
        vendor_id: 0x1234,
        device_id: 0x5678,
        revision: 1,
        class: (0xff, 0, 0),
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        interrupt_pin: 1,
    });
    for &(i, size, kind) in bars {
        c.add_bar(i, size, kind).unwrap();
    }
    Func(c, [0; 64])
}

/// Checks each move against the window and the previous move of the same BAR.
#[derive(Default)]
struct Moves(Mutex<HashMap<(u8, usize), u64>>);

impl BarObserver for Moves {
    fn bar_moved(&self, slot: u8, bar: usize, size: u64, old: Option<u64>, new: Option<u64>) {
        let mut m = self.0.lock().unwrap();
        assert_eq!(
            m.get(&(slot, bar)).copied(),
            old,
            "{slot}/{bar} moved from elsewhere"
        );
        assert_ne!(old, new, "{slot}/{bar}: a move to where it was");
        match new {
            Some(a) => {
                assert!(
                    a >= WIN && a + size <= WIN + WIN_LEN,
                    "{a:#x}+{size:#x} outside"
                );
                assert!(
                    a % size == 0,
                    "{slot}/{bar} at {a:#x} not aligned to {size:#x}"
                );
                m.insert((slot, bar), a);
            }
            None => {
                m.remove(&(slot, bar));
            }
        }
    }
}

fn root(mem: &guestmem::GuestMem) -> (Arc<Mutex<PciRoot>>, PciWindow, Arc<Moves>) {
    let window = PciWindow::new(WIN, WIN_LEN);
    let mut root = PciRoot::new(window.clone());
    let moves = Arc::new(Moves::default());
    root.set_observer(moves.clone());
    let one = func(&[(0, 0x1000, BarKind::Mem32), (2, 0x10_0000, BarKind::Mem64)]);
    root.add_device(1, Arc::new(Mutex::new(one))).unwrap();
    let vectors = VirtioPciDevice::vector_count(2);
    let virtio = VirtioPciDevice::new(
        mem.clone(),
        Box::new(common::SyncBlock::default()),
        Arc::new(common::Vectors(vectors)),
        Some(Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())),
    )
    .unwrap();
    root.add_device(2, Arc::new(Mutex::new(virtio))).unwrap();
    let three = func(&[(1, 16, BarKind::Mem32), (4, 0x4000, BarKind::Mem64)]);
    root.add_device(3, Arc::new(Mutex::new(three))).unwrap();
    (Arc::new(Mutex::new(root)), window, moves)
}

const WIDTHS: [usize; 4] = [1, 2, 4, 8];

fuzz_target!(|data: &[u8]| {
    let Some((script, mem)) = common::script_and_memory(data) else {
        return;
    };
    let (root, mut window, _moves) = root(&mem);
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciEcam::new(root.clone());
    for rec in script.chunks_exact(8) {
        let (a, b, c) = (rec[1], rec[2], rec[3]);
        let value = [rec[4], rec[5], rec[6], rec[7]];
        let v32 = u32::from_le_bytes(value);
        let width = WIDTHS[usize::from(a >> 6)];
        let mut buf = [0u8; 8];
        let wdata = &u64::from(v32).to_le_bytes()[..width];
        match rec[0] % 10 {
            // The address register: mostly an enabled access to slots 0-3.
            0 => {
                let addr = if c & 0x80 != 0 {
                    v32
                } else {
                    0x8000_0000 | (u32::from(a % 4) << 11) | u32::from(b & 0xfc)
                };
                io.write(0, &addr.to_le_bytes());
            }
            1 => io.read(4 + u64::from(c % 4), &mut buf[..width.min(4)]),
            2 => io.write(4 + u64::from(c % 4), &wdata[..width.min(4)]),
            // Any port of the two registers, any width.
            3 => io.write(u64::from(c % 8), wdata),
            4 => io.read(u64::from(c % 8), &mut buf[..width]),
            // ECAM: slots 0-3 mostly, anywhere in bus 0's MiB otherwise.
            5 | 6 => {
                let off = if c & 0x80 != 0 {
                    u64::from(v32 & 0xf_ffff)
                } else {
                    (u64::from(a % 4) << 15) | u64::from(b)
                };
                if rec[0] % 10 == 5 {
                    ecam.read(off, &mut buf[..width]);
                } else {
                    ecam.write(off, wdata);
                }
            }
            // The window, where BARs decode.
            7 => window.read(u64::from(v32) % WIN_LEN, &mut buf[..width]),
            8 => window.write(u64::from(v32) % WIN_LEN, &[a, b, c, 0, 1, 2, 3, 4][..width]),
            _ => root.lock().unwrap().refresh_mappings(),
        }
    }
    // The root's state into a new root (the functions are the same).
    let state = io.state();
    let json = serde_json::to_string(&state).unwrap();
    let back: PciRootState = serde_json::from_str(&json).unwrap();
    let (root2, _w2, _m2) = self::root(&mem);
    let mut io2 = PciConfigIo::new(root2);
    io2.restore(&back).unwrap();
    assert_eq!(io2.state(), state);
});
