//! What the benchmarks (`bench=blk`, `bench=net`) share: the TSC frequency
//! they time with, and integer arithmetic for rates.

use core::fmt;

use crate::{cpu, println};

/// Calibrate the TSC against the PIT (the median of five 50 ms runs) and
/// use that frequency from now on, unless CPUID states one. Prints one
/// `bench tsc` line.
pub fn init_clock() {
    let mut runs = [0u64; 5];
    let mut n = 0;
    for _ in 0..runs.len() {
        if let Some(hz) = cpu::pit_tsc_hz(50) {
            runs[n] = hz;
            n += 1;
        }
    }
    runs[..n].sort_unstable();
    let pit = (n > 0).then(|| runs[n / 2]);
    let cpuid = cpu::cpuid_tsc_hz();
    let (hz, source) = match (cpuid, pit) {
        (Some((hz, _)), _) => (hz, "cpuid"),
        (None, Some(hz)) => (hz, "pit"),
        (None, None) => (cpu::tsc_hz(), "guessed"),
    };
    cpu::set_tsc_hz(hz);
    let mut leaf_text = [0u8; 24];
    let cpuid_text = match cpuid {
        Some((hz, leaf)) => fmt_into(&mut leaf_text, format_args!("{hz} (leaf {leaf:#x})")),
        None => "none",
    };
    println!(
        "bench tsc {hz} Hz from {source}; pit {} Hz, cpuid {cpuid_text}",
        pit.unwrap_or(0)
    );
}

/// Format into a stack buffer (truncated if it does not fit).
fn fmt_into<'a>(buf: &'a mut [u8], args: fmt::Arguments) -> &'a str {
    struct W<'b> {
        buf: &'b mut [u8],
        len: usize,
    }
    impl fmt::Write for W<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let n = s.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut w = W { buf, len: 0 };
    let _ = fmt::write(&mut w, args);
    let len = w.len;
    core::str::from_utf8(&buf[..len]).unwrap_or("")
}

/// `value * scale` per second over `ticks` TSC ticks, as an integer.
pub fn per_second(value: u64, ticks: u64, scale: u64) -> u64 {
    if ticks == 0 {
        return 0;
    }
    let v = u128::from(value) * u128::from(cpu::tsc_hz()) * u128::from(scale) / u128::from(ticks);
    v as u64
}

/// TSC ticks in nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000 / u128::from(cpu::tsc_hz().max(1))) as u64
}

/// A number of tenths, shown with one decimal.
pub struct Tenths(pub u64);

impl fmt::Display for Tenths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0 / 10, self.0 % 10)
    }
}
