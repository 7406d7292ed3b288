//! The hardware-reduced ACPI platform registers: sleep control (S5 = power off), sleep status,
//! reset, and the Generic Event Device's event byte (power button).
//!
//! Register offsets match what the FADT and DSDT announce (see `arch::acpi`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{BusDevice, Interrupt, VmEvent, VmEventSink};

pub const SLEEP_CONTROL: u64 = 0;
pub const SLEEP_STATUS: u64 = 1;
pub const RESET: u64 = 2;
pub const GED_EVENT: u64 = 3;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const WAKE_STATUS: u8 = 1 << 7;

/// The ACPI registers' state for snapshots: the GED events the guest has not read yet. (Sleep
/// control and reset are write-only commands; sleep status always reads "woken".)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub ged_pending: u8,
}

/// The ACPI platform registers.
pub struct AcpiPm {
    events: VmEventSink,
    ged_irq: Arc<dyn Interrupt>,
    s5_sleep_type: u8,
    reset_value: u8,
    ged_pending: u8,
}

impl AcpiPm {
    pub fn new(
        events: VmEventSink,
        ged_irq: Arc<dyn Interrupt>,
        s5_sleep_type: u8,
        reset_value: u8,
    ) -> Self {
        AcpiPm {
            events,
            ged_irq,
            s5_sleep_type,
            reset_value,
            ged_pending: 0,
        }
    }

    /// The state for snapshots.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            ged_pending: self.ged_pending,
        }
    }

    /// Restore [`AcpiPm::state`]. The GED interrupt that announced pending events is the
    /// interrupt controller's state, not raised again.
    pub fn restore(&mut self, s: &AcpiPmState) {
        self.ged_pending = s.ged_pending;
    }

    /// Presses the power button: the guest's ACPI sees a GED event and (if it handles it) powers
    /// off in an orderly way.
    pub fn press_power_button(&mut self, event_bit: u8) -> std::io::Result<()> {
        self.ged_pending |= event_bit;
        self.ged_irq.trigger()
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            SLEEP_STATUS => data[0] = WAKE_STATUS,
            GED_EVENT => data[0] = std::mem::take(&mut self.ged_pending),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 => {
                let sleep_type = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == self.s5_sleep_type {
                    (self.events)(VmEvent::PowerOff);
                } else {
                    crate::warn_limited!(
                        "guest asked for unsupported ACPI sleep type {sleep_type}"
                    );
                }
            }
            RESET if v == self.reset_value => (self.events)(VmEvent::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn s5_powers_off_reset_resets_and_ged_reports_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let irq = Arc::new(Count::default());
        let mut pm = AcpiPm::new(
            Arc::new(move |e| s.lock().unwrap().push(e)),
            irq.clone(),
            5,
            1,
        );
        pm.write(SLEEP_CONTROL, &[3 << 2 | SLP_EN]); // S3: not supported
        pm.write(SLEEP_CONTROL, &[5 << 2]); // no SLP_EN
        pm.write(SLEEP_CONTROL, &[5 << 2 | SLP_EN]);
        pm.write(RESET, &[1]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![VmEvent::PowerOff, VmEvent::Reset]
        );

        pm.press_power_button(1).unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        let mut d = [0u8];
        pm.read(GED_EVENT, &mut d);
        assert_eq!(d, [1]);
        pm.read(GED_EVENT, &mut d);
        assert_eq!(d, [0]);
    }

    #[test]
    fn pending_ged_events_survive_a_state_round_trip() {
        let irq = Arc::new(Count::default());
        let mut pm = AcpiPm::new(Arc::new(|_| {}), irq.clone(), 5, 1);
        pm.press_power_button(1).unwrap();
        let st = pm.state();
        let back: AcpiPmState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        let irq2 = Arc::new(Count::default());
        let mut fresh = AcpiPm::new(Arc::new(|_| {}), irq2.clone(), 5, 1);
        fresh.restore(&back);
        assert_eq!(
            irq2.0.load(Ordering::SeqCst),
            0,
            "the controller keeps the edge"
        );
        for off in [SLEEP_CONTROL, SLEEP_STATUS, RESET, GED_EVENT, GED_EVENT] {
            let (mut x, mut y) = ([0u8], [0u8]);
            pm.read(off, &mut x);
            fresh.read(off, &mut y);
            assert_eq!(x, y, "offset {off}");
        }
    }
}
