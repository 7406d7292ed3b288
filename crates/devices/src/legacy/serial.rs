//! The 16550A UART (through `vm-superio`), its output going to a writer and its interrupt to an
//! edge-triggered line.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::Trigger;

use super::StateError;
use crate::bus::lock;
use crate::{BusDevice, Interrupt};

/// Adapts an [`Interrupt`] to `vm-superio`'s trigger.
pub struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// The output writer, shared so that a restore can rebuild the UART around it.
#[derive(Clone)]
struct Output(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// The UART's registers and receive FIFO, for snapshots (vm-superio's `SerialState`, with
/// serde). The output and the host input are not state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl From<UartState> for SerialState {
    fn from(s: UartState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, Output>,
    irq: Arc<dyn Interrupt>,
    out: Output,
}

impl Serial {
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        let out = Output(Arc::new(Mutex::new(out)));
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq.clone()), out.clone()),
            irq,
            out,
        }
    }

    /// The registers and the receive FIFO, for snapshots.
    pub fn state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Restore [`Serial::state`]; the output and interrupt line stay this port's. An interrupt
    /// the saved registers show pending is raised again.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), StateError> {
        // The output is shared: a failure (a FIFO over 64 bytes) leaves this port as it was.
        let uart = vm_superio::Serial::from_state(
            &state.into(),
            IrqTrigger(self.irq.clone()),
            NoEvents,
            self.out.clone(),
        )
        .map_err(|e| StateError::Serial(format!("{e:?}")))?;
        self.uart = uart;
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // An output error (a closed terminal or a full disk) must not stop the guest.
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                tracing::debug!("serial output: {e}");
            }
        }
    }
}

/// Feeds host input into a shared serial port's receive FIFO.
#[derive(Clone)]
pub struct SerialInput(pub Arc<Mutex<Serial>>);

impl SerialInput {
    /// Queues as many of `bytes` as the FIFO takes and returns how many that was.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut s = lock(&self.0);
        let room = s.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        s.uart.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input_with_interrupts() {
        let irq = Arc::new(Count::default());
        let out = Shared::default();
        let serial = Arc::new(Mutex::new(Serial::new(irq.clone(), Box::new(out.clone()))));
        serial.lock().unwrap().write(0, b"h");
        serial.lock().unwrap().write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then type.
        serial.lock().unwrap().write(1, &[1]);
        let input = SerialInput(serial.clone());
        assert_eq!(input.push(b"ok"), 2);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut d = [0u8];
        serial.lock().unwrap().read(0, &mut d);
        assert_eq!(d, [b'o']);
        // Odd sizes are ignored, not a panic.
        serial.lock().unwrap().write(0, b"xy");
        serial.lock().unwrap().read(0, &mut [0u8; 4]);
    }

    /// Everything the guest can read, in one fixed sequence (which changes the port as reading
    /// does: the FIFO empties, DLAB goes on and off).
    fn guest_view(s: &mut Serial) -> Vec<u8> {
        let rd = |s: &mut Serial, off: u64| {
            let mut d = [0u8];
            s.read(off, &mut d);
            d[0]
        };
        let mut v: Vec<u8> = (1..8).map(|off| rd(s, off)).collect();
        let lcr = rd(s, 3);
        s.write(3, &[lcr | 0x80]);
        v.push(rd(s, 0));
        v.push(rd(s, 1));
        s.write(3, &[lcr]);
        for _ in 0..4 {
            v.push(rd(s, 5));
            v.push(rd(s, 0));
        }
        v.push(rd(s, 2));
        v
    }

    #[test]
    fn state_round_trip_changes_nothing_the_guest_reads() {
        let mut a = Serial::new(Arc::new(Count::default()), Box::new(std::io::sink()));
        // Divisor 0x0c03 (DLAB on, then off), 8N1, received-data interrupt, DTR/RTS/OUT2,
        // scratch, and three bytes of input.
        for (off, v) in [
            (3, 0x80),
            (0, 0x03),
            (1, 0x0c),
            (3, 0x03),
            (1, 1),
            (4, 0x0b),
            (7, 0x5a),
        ] {
            a.write(off, &[v]);
        }
        assert_eq!(a.uart.enqueue_raw_bytes(b"xyz").unwrap(), 3);
        let st = a.state();
        assert_eq!(st.in_buffer, b"xyz");
        let back: SerialState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        let out = Shared::default();
        let irq = Arc::new(Count::default());
        let mut b = Serial::new(irq.clone(), Box::new(out.clone()));
        b.restore(&back).unwrap();
        assert_eq!(b.state(), st);
        // The pending received-data interrupt is raised again.
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(guest_view(&mut a), guest_view(&mut b));
        // The restored port writes to its own output.
        b.write(0, b"!");
        assert_eq!(&*out.0.lock().unwrap(), b"!");
        // A FIFO longer than the UART's is refused; the port is unchanged.
        let before = b.state();
        let big = SerialState {
            in_buffer: vec![0; 65],
            ..st
        };
        assert!(b.restore(&big).is_err());
        assert_eq!(b.state(), before);
    }
}
