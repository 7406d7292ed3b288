//! The platform devices on the I/O port bus as the guest reaches them: COM1 (with host input
//! pushed into its FIFO), the i8042, the CMOS/RTC, the ACPI registers, the exit device and the
//! boot marker, each on a real `Bus` at its usual ports; random port reads and writes of every
//! width, then each device's state through JSON into a fresh device.
//!
//! Input: records of 1 byte op, 2 bytes port (folded into the legacy port ranges), 1 byte
//! width, 4 bytes value.

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::{
    AcpiPm, BootMarker, Cmos, ExitDevice, LegacyState, Serial, SerialInput, I8042,
};
use devices::{Bus, Interrupt, VmEvent, VmEventSink};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Count(AtomicUsize);

impl Interrupt for Count {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// (base, length) of each device's ports, in the order they are placed.
const PORTS: [(u64, u64); 6] = [
    (0x3f8, 8), // COM1
    (0x60, 5),  // i8042
    (0x70, 2),  // CMOS
    (0x600, 4), // ACPI
    (0xf4, 1),  // exit
    (0x3f0, 1), // boot marker
];
const WIDTHS: [usize; 4] = [1, 2, 4, 8];

fuzz_target!(|data: &[u8]| {
    let events: VmEventSink = Arc::new(|e: VmEvent| {
        let _ = e;
    });
    let irq = Arc::new(Count::default());
    let serial = Arc::new(Mutex::new(Serial::new(
        irq.clone(),
        Box::new(std::io::sink()),
    )));
    let cmos = Arc::new(Mutex::new(Cmos::new(3 << 30, 1 << 30)));
    let acpi = Arc::new(Mutex::new(AcpiPm::new(events.clone(), irq.clone(), 5, 0xf)));
    let mut bus = Bus::new();
    bus.insert(serial.clone(), PORTS[0].0, PORTS[0].1).unwrap();
    bus.insert(
        Arc::new(Mutex::new(I8042::new(events.clone()))),
        PORTS[1].0,
        PORTS[1].1,
    )
    .unwrap();
    bus.insert(cmos.clone(), PORTS[2].0, PORTS[2].1).unwrap();
    bus.insert(acpi.clone(), PORTS[3].0, PORTS[3].1).unwrap();
    bus.insert(
        Arc::new(Mutex::new(ExitDevice::new(events.clone()))),
        PORTS[4].0,
        PORTS[4].1,
    )
    .unwrap();
    let marker = Arc::new(Mutex::new(BootMarker::new(Instant::now())));
    bus.insert(marker, PORTS[5].0, PORTS[5].1).unwrap();
    let input = SerialInput(serial.clone());
    for rec in data.chunks_exact(8) {
        let raw = u16::from_le_bytes([rec[1], rec[2]]);
        // Mostly a port of a device (a few past its end); any port otherwise.
        let port = if raw & 0x8000 == 0 {
            let (base, len) = PORTS[usize::from(raw & 0xff) % PORTS.len()];
            base + u64::from(raw >> 8) % (len + 2)
        } else {
            u64::from(raw & 0x7fff)
        };
        let width = WIDTHS[usize::from(rec[3] % 4)];
        let value = [
            rec[4], rec[5], rec[6], rec[7], rec[4], rec[5], rec[6], rec[7],
        ];
        match rec[0] % 6 {
            0 | 1 => {
                let _ = bus.write(port, &value[..width]);
            }
            2 | 3 => {
                let mut buf = [0u8; 8];
                let _ = bus.read(port, &mut buf[..width]);
            }
            4 => {
                // Host input into COM1's receive FIFO.
                let n = usize::from(rec[4] % 80);
                input.push(&vec![rec[5]; n]);
            }
            _ => {
                let _ = acpi.lock().unwrap().press_power_button(rec[4]);
            }
        }
    }
    // Each device's state into a fresh one.
    let state = LegacyState {
        serial: serial.lock().unwrap().state(),
        cmos: cmos.lock().unwrap().state(),
        acpi_pm: acpi.lock().unwrap().state(),
    };
    let json = serde_json::to_string(&state).unwrap();
    let back: LegacyState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    let mut s2 = Serial::new(irq.clone(), Box::new(std::io::sink()));
    s2.restore(&back.serial).unwrap();
    assert_eq!(s2.state(), state.serial);
    let mut c2 = Cmos::new(3 << 30, 1 << 30);
    c2.restore(&back.cmos).unwrap();
    let mut a2 = AcpiPm::new(events, irq, 5, 0xf);
    a2.restore(&back.acpi_pm);
    assert_eq!(a2.state(), state.acpi_pm);
});
