//! The virtio-pci transport as the guest drives it: configuration space (the MSI-X capability's
//! control word included), the BAR's common configuration, ISR, device configuration,
//! notifications, MSI-X table and PBA; a device behind it serving its queues synchronously at
//! activation (raising queue and configuration interrupts) from guest memory in the input;
//! pause, resume, state and restore into a fresh function, and a machine reset.
//!
//! Input: 2 bytes length L of the access script, L bytes of script (records of 1 byte op,
//! 1 byte region and width, 2 bytes offset, 4 bytes value), then guest memory contents.

#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::sync::Arc;

use devices::pci::PciDevice;
use devices::virtio::pci::{
    VirtioPciDevice, VirtioPciState, COMMON_CFG_LEN, DEVICE_CFG_OFFSET, ISR_CFG_OFFSET,
    MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_OFFSET, VIRTIO_BAR,
};
use guestmem::GuestMem;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// (start, length) of each BAR structure; the last is the whole BAR.
const REGIONS: [(u64, u64); 7] = [
    (0, COMMON_CFG_LEN),
    (ISR_CFG_OFFSET, 4),
    (DEVICE_CFG_OFFSET, 0x20),
    (NOTIFY_OFFSET, 0x10),
    (MSIX_TABLE_OFFSET, 0x40),
    (MSIX_PBA_OFFSET, 0x10),
    (0, 0x8000),
];
const WIDTHS: [usize; 4] = [1, 2, 4, 8];

fn device(mem: &GuestMem) -> VirtioPciDevice {
    VirtioPciDevice::new(
        mem.clone(),
        Box::new(common::SyncBlock::default()),
        Arc::new(common::Vectors(VirtioPciDevice::vector_count(2))),
        Some(Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())),
    )
    .unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((script, mem)) = common::script_and_memory(data) else {
        return;
    };
    let mut d = device(&mem);
    for rec in script.chunks_exact(8) {
        let width = WIDTHS[usize::from(rec[1] >> 6)];
        let (start, span) = REGIONS[usize::from(rec[1] & 7) % REGIONS.len()];
        let off = start + u64::from(u16::from_le_bytes([rec[2], rec[3]])) % span;
        let value = u64::from(u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]));
        let wdata = &value.to_le_bytes()[..width];
        let mut buf = [0u8; 8];
        match rec[0] % 10 {
            0 | 1 => d.bar_write(VIRTIO_BAR, off, wdata),
            2 | 3 => d.bar_read(VIRTIO_BAR, off, &mut buf[..width]),
            // Configuration space: anywhere, and the MSI-X capability's control word.
            4 => d.config_write(usize::from(rec[2]), &wdata[..width.min(4)]),
            5 => d.config_read(usize::from(rec[2]), &mut buf[..width.min(4)]),
            // Another BAR index: nothing there.
            6 => d.bar_write(1 + usize::from(rec[2] % 5), off, wdata),
            7 => d.pause(),
            8 => {
                let _ = d.resume();
            }
            _ => {
                if rec[2] & 1 == 0 {
                    d.hard_reset();
                } else {
                    // Save and restore into a fresh function, which goes on from there.
                    d.pause();
                    let state = d.state();
                    let json = serde_json::to_string(&state).unwrap();
                    let back: VirtioPciState = serde_json::from_str(&json).unwrap();
                    assert_eq!(back, state);
                    let mut fresh = device(&mem);
                    if fresh.restore(&back).is_ok() {
                        assert_eq!(fresh.state(), state, "restored state differs");
                        let _ = fresh.resume();
                        d = fresh;
                    } else {
                        let _ = d.resume();
                    }
                }
            }
        }
    }
    let _ = d.state();
    let _ = d.device_status();
});
