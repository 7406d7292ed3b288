//! The 16550A UART (through `vm-superio`), its output going to a writer and its interrupt to an
//! edge-triggered line.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

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

/// COM1.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
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
}
