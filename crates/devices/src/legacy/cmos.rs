//! The CMOS real-time clock and NVRAM (ports 0x70/0x71): the host's current time (UTC, BCD,
//! 24-hour) and the memory-size bytes firmware-style guests read.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::StateError;
use crate::BusDevice;

const INDEX_MASK: u8 = 0x7f;
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
const STATUS_B_24H: u8 = 1 << 1;
const STATUS_D_VALID: u8 = 1 << 7;

/// The CMOS's registers for snapshots: the index register and the 128 bytes of NVRAM (status
/// registers included). The clock is not state: it reads the host's time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    pub nvram: Vec<u8>,
}

/// The CMOS RTC.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: fn() -> u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// A CMOS for a guest with `mem_below_4g` and `mem_above_4g` bytes of RAM.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, unix_now)
    }

    fn with_clock(mem_below_4g: u64, mem_above_4g: u64, now: fn() -> u64) -> Self {
        let mut nvram = [0u8; 128];
        // Extended memory between 1 MiB and 64 MiB, in KiB.
        let ext_kib = (mem_below_4g.saturating_sub(1 << 20) >> 10).min(0xffff);
        nvram[0x30] = ext_kib as u8;
        nvram[0x31] = (ext_kib >> 8) as u8;
        nvram[0x17] = nvram[0x30];
        nvram[0x18] = nvram[0x31];
        // Memory above 16 MiB below 4 GiB, in 64 KiB units.
        let above_16m = (mem_below_4g.saturating_sub(16 << 20) >> 16).min(0xffff);
        nvram[0x34] = above_16m as u8;
        nvram[0x35] = (above_16m >> 8) as u8;
        // Memory above 4 GiB, in 64 KiB units (three bytes).
        let above_4g = mem_above_4g >> 16;
        nvram[0x5b] = above_4g as u8;
        nvram[0x5c] = (above_4g >> 8) as u8;
        nvram[0x5d] = (above_4g >> 16) as u8;
        nvram[REG_STATUS_A as usize] = 0x26;
        nvram[REG_STATUS_B as usize] = STATUS_B_24H;
        Cmos {
            index: 0,
            nvram,
            now,
        }
    }

    /// The registers, for snapshots.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// Restore [`Cmos::state`].
    pub fn restore(&mut self, s: &CmosState) -> Result<(), StateError> {
        let nvram: [u8; 128] = s
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| StateError::CmosSize(s.nvram.len()))?;
        self.nvram = nvram;
        self.index = s.index & INDEX_MASK;
        Ok(())
    }

    fn register(&self, index: u8) -> u8 {
        let t = (self.now)();
        let days = (t / 86_400) as i64;
        let secs = t % 86_400;
        let (year, month, day) = civil_from_days(days);
        match index {
            REG_SECONDS => bcd(secs % 60),
            REG_MINUTES => bcd(secs / 60 % 60),
            REG_HOURS => bcd(secs / 3600),
            REG_WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u64),
            REG_DAY => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year.rem_euclid(100) as u64),
            REG_CENTURY => bcd((year / 100) as u64),
            // Never mid-update.
            REG_STATUS_A => self.nvram[REG_STATUS_A as usize] & 0x7f,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D_VALID,
            i => self.nvram[i as usize],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 {
            data[0] = self.register(self.index);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask.
            0 => self.index = v & INDEX_MASK,
            // The clock follows the host: writes to it are dropped, NVRAM keeps the rest.
            1 if self.index > REG_YEAR && self.index != REG_CENTURY => {
                self.nvram[self.index as usize] = v
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut d = [0u8];
        c.read(1, &mut d);
        d[0]
    }

    #[test]
    fn reads_a_known_time_in_bcd() {
        // 2026-11-21 22:56:46 UTC, a Saturday.
        let mut c = Cmos::with_clock(256 << 20, 0, || 1_795_301_806);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_DAY), 0x21);
        assert_eq!(read(&mut c, REG_HOURS), 0x22);
        assert_eq!(read(&mut c, REG_MINUTES), 0x56);
        assert_eq!(read(&mut c, REG_SECONDS), 0x46);
        assert_eq!(read(&mut c, REG_WEEKDAY), 7);
        assert_eq!(read(&mut c, REG_STATUS_D), STATUS_D_VALID);
        // NMI-mask bit on the index is ignored; memory size is there.
        assert_eq!(read(&mut c, 0x80 | 0x35), (((256 - 16) * 16) >> 8) as u8);
    }

    #[test]
    fn clock_writes_are_dropped_nvram_writes_kept() {
        let mut c = Cmos::with_clock(64 << 20, 0, || 0);
        c.write(0, &[REG_SECONDS]);
        c.write(1, &[0x59]);
        assert_eq!(read(&mut c, REG_SECONDS), 0);
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        assert_eq!(read(&mut c, 0x40), 0xab);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    #[test]
    fn state_round_trip_changes_nothing_the_guest_reads() {
        let mut a = Cmos::with_clock(512 << 20, 1 << 30, || 1_795_301_806);
        a.write(0, &[0x40]);
        a.write(1, &[0xab]);
        a.write(0, &[REG_STATUS_B]);
        a.write(1, &[STATUS_B_24H | 4]);
        a.write(0, &[0x80 | 0x41]); // index left at 0x41, with the NMI-mask bit
        let st = a.state();
        let back: CmosState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        let mut b = Cmos::with_clock(0, 0, || 1_795_301_806);
        b.restore(&back).unwrap();
        assert_eq!(b.state(), st);
        // The index register first (a data read without writing it), then every register.
        let mut d = [[0u8], [0u8]];
        a.read(1, &mut d[0]);
        b.read(1, &mut d[1]);
        assert_eq!(d[0], d[1]);
        for reg in 0..128 {
            assert_eq!(read(&mut a, reg), read(&mut b, reg), "register {reg:#x}");
        }
        let bad = CmosState {
            index: 0,
            nvram: vec![0; 12],
        };
        assert_eq!(b.restore(&bad), Err(StateError::CmosSize(12)));
    }
}
