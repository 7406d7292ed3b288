//! Just enough of the i8042 keyboard controller for guests to reset the machine with it
//! (command 0xFE on port 0x64, which Linux uses with `reboot=k`).

use crate::{BusDevice, VmEvent, VmEventSink};

const CMD_RESET_CPU: u8 = 0xfe;
/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;

/// The i8042 at ports 0x60..=0x64.
pub struct I8042 {
    events: VmEventSink,
}

impl I8042 {
    pub fn new(events: VmEventSink) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No keyboard: status says nothing to read and the input buffer is empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.events)(VmEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command_reports_a_reset() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut d = I8042::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        d.write(0, &[CMD_RESET_CPU]);
        d.write(COMMAND_OFFSET, &[0xaa]);
        assert!(seen.lock().unwrap().is_empty());
        d.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(*seen.lock().unwrap(), vec![VmEvent::Reset]);
    }
}
