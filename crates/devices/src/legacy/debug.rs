//! Two debug ports: the exit device (the guest writes a status, the VM ends with it) and the
//! boot-time marker (the guest writes once when it has booted; the time is logged).

use std::time::Instant;

use crate::{BusDevice, VmEvent, VmEventSink};

/// The exit device (port 0xf4, as QEMU's `isa-debug-exit` is usually placed).
pub struct ExitDevice {
    events: VmEventSink,
}

impl ExitDevice {
    pub fn new(events: VmEventSink) -> Self {
        ExitDevice { events }
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(&status) = data.first() {
                (self.events)(VmEvent::Exit(status));
            }
        }
    }
}

/// The value a guest writes to the boot marker port (Firecracker's convention).
pub const BOOT_MARKER_VALUE: u8 = 123;

/// The boot-time marker (port 0x3f0, as in Firecracker).
pub struct BootMarker {
    start: Instant,
    seen: Option<std::time::Duration>,
}

impl BootMarker {
    /// `start` is when the VM monitor's process started.
    pub fn new(start: Instant) -> Self {
        BootMarker { start, seen: None }
    }

    /// The time from process start to the guest's first marker write.
    pub fn boot_time(&self) -> Option<std::time::Duration> {
        self.seen
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_MARKER_VALUE) && self.seen.is_none() {
            let t = self.start.elapsed();
            self.seen = Some(t);
            tracing::info!(
                target: "vessel::boot",
                "guest boot marker after {:.3} ms",
                t.as_secs_f64() * 1e3
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn exit_reports_the_status_and_marker_records_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut e = ExitDevice::new(Arc::new(move |ev| s.lock().unwrap().push(ev)));
        e.write(0, &[7, 0, 0, 0]);
        e.write(1, &[9]);
        assert_eq!(*seen.lock().unwrap(), vec![VmEvent::Exit(7)]);

        let mut m = BootMarker::new(Instant::now());
        m.write(0, &[1]);
        assert!(m.boot_time().is_none());
        m.write(0, &[BOOT_MARKER_VALUE]);
        let t = m.boot_time().unwrap();
        m.write(0, &[BOOT_MARKER_VALUE]);
        assert_eq!(m.boot_time(), Some(t));
    }
}
