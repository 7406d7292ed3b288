//! Polled output on the 16550A UART at COM1 (I/O port 0x3f8), from ring 3.
//!
//! Lines from different CPUs are serialized by a spinlock in shared memory;
//! each `println!` holds it for the whole line. Lines end with "\n" only.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu;

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 0x20;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Write one byte once the transmitter holding register is empty (bounded
/// wait, so a broken UART cannot hang the guest).
pub fn write_byte(byte: u8) {
    for _ in 0..100_000 {
        if cpu::inb(LSR) & LSR_THRE != 0 {
            break;
        }
        cpu::pause();
    }
    cpu::outb(COM1, byte);
}

pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        write_byte(b);
    }
}

/// The UART as a `fmt::Write` sink. Use while holding the lock (see [`Line`]).
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Exclusive access to the serial port for one or more whole lines.
pub struct Line {
    locked: bool,
}

impl Line {
    pub fn lock() -> Line {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            cpu::pause();
        }
        Line { locked: true }
    }

    /// Take the lock if it frees up within about `us` microseconds, else go
    /// ahead without it (for panic messages: the panicking CPU may hold it).
    pub fn lock_or_steal(us: u64) -> Line {
        let start = cpu::rdtsc();
        let limit = cpu::us_to_ticks(us);
        loop {
            if LOCK
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Line { locked: true };
            }
            if cpu::rdtsc().wrapping_sub(start) > limit {
                return Line { locked: false };
            }
            cpu::pause();
        }
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Serial.write_str(s)
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.locked {
            LOCK.store(false, Ordering::Release);
        }
    }
}

/// Print one formatted line, atomically with respect to other CPUs.
pub fn print_line(args: fmt::Arguments) {
    let mut line = Line::lock();
    let _ = line.write_fmt(args);
    let _ = line.write_str("\n");
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print_line(format_args!($($arg)*))
    };
}
