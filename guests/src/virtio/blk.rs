//! virtio-blk (device type 2, virtio 1.2 §5.2): write a pattern to sectors
//! 8..16 and to the last sector, flush, read them back, compare, and ask for
//! the serial (GET_ID).
//!
//! Each request is one chain: a 16-byte header (type, reserved, sector),
//! the data (device-writable for reads) and a 1-byte status.

use super::dma;
use super::queue::{Buf, Queue};
use super::Transport;
use crate::println;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_UNSUPP: u8 = 2;

const SECTOR: usize = 512;
/// The run of sectors written at [`FIRST`].
const FIRST: u64 = 8;
const COUNT: u64 = 8;
const ID_BYTES: usize = 20;
const TIMEOUT_US: u64 = 10_000_000;

/// The test pattern of `sector`: the text `vessel virtio-blk sector <N>\n`,
/// then a xorshift stream seeded by the sector number.
fn pattern(sector: u64, out: &mut [u8]) {
    stamp(b"vessel virtio-blk sector ", sector, out)
}

/// `prefix`, `number` in decimal and a newline, then a xorshift stream
/// seeded by `number`.
fn stamp(prefix: &[u8], number: u64, out: &mut [u8]) {
    let sector = number;
    let mut text = [0u8; 48];
    let mut n = 0;
    for &b in prefix {
        text[n] = b;
        n += 1;
    }
    let mut digits = [0u8; 20];
    let mut d = 0;
    let mut v = sector;
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        text[n] = digits[d];
        n += 1;
    }
    text[n] = b'\n';
    n += 1;
    let mut x = 0x9e37_79b9_7f4a_7c15 ^ sector.wrapping_mul(0x1000_0000_01b3);
    for (i, b) in out.iter_mut().enumerate() {
        if i < n {
            *b = text[i];
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
}

struct Disk<'a> {
    t: &'a Transport,
    q: &'a mut Queue,
    header: u64,
    status: u64,
}

impl Disk<'_> {
    /// One request; returns the status byte.
    fn request(&mut self, kind: u32, sector: u64, data: Option<Buf>) -> Result<u8, &'static str> {
        dma::write32(self.header, kind);
        dma::write32(self.header + 4, 0);
        dma::write64(self.header + 8, sector);
        dma::write8(self.status, 0xff);
        let head = Buf::read(self.header, 16);
        let status = Buf::write(self.status, 1);
        match data {
            Some(d) => self.q.add(&[head, d, status], 0)?,
            None => self.q.add(&[head, status], 0)?,
        }
        self.q.kick(self.t);
        self.q.wait_used(TIMEOUT_US).ok_or("request timed out")?;
        Ok(dma::read8(self.status))
    }

    fn flush(&mut self) -> Result<(), &'static str> {
        match self.request(T_FLUSH, 0, None)? {
            S_OK => Ok(()),
            _ => Err("flush failed"),
        }
    }

    fn write(&mut self, sector: u64, buf: u64, sectors: u64) -> Result<(), &'static str> {
        let data = Buf::read(buf, (sectors as usize * SECTOR) as u32);
        match self.request(T_OUT, sector, Some(data))? {
            S_OK => Ok(()),
            _ => Err("write failed"),
        }
    }

    fn read(&mut self, sector: u64, buf: u64, sectors: u64) -> Result<(), &'static str> {
        dma::fill(buf, 0, sectors as usize * SECTOR);
        let data = Buf::write(buf, (sectors as usize * SECTOR) as u32);
        match self.request(T_IN, sector, Some(data))? {
            S_OK => Ok(()),
            _ => Err("read failed"),
        }
    }
}

/// Fill `sectors` sectors at `buf` with the pattern of `first`, `first+1`...
fn fill_pattern(buf: u64, first: u64, sectors: u64) {
    let mut bytes = [0u8; SECTOR];
    for s in 0..sectors {
        pattern(first + s, &mut bytes);
        dma::write_bytes(buf + s * SECTOR as u64, &bytes);
    }
}

/// Whether `sectors` sectors at `buf` hold the pattern of `first`...
fn check_pattern(buf: u64, first: u64, sectors: u64) -> bool {
    let mut want = [0u8; SECTOR];
    let mut got = [0u8; SECTOR];
    (0..sectors).all(|s| {
        pattern(first + s, &mut want);
        dma::read_bytes(buf + s * SECTOR as u64, &mut got);
        want == got
    })
}

pub fn test(t: &mut Transport) -> Result<(), &'static str> {
    let features = t.begin(F_FLUSH | F_RO)?;
    let capacity = t.config_read64(0);
    let mut q = Queue::new(t, 0)?;
    t.ready();
    let header = dma::alloc(16, 16)?;
    let status = dma::alloc(16, 16)?;
    let out = dma::alloc(COUNT * SECTOR as u64, 4096)?;
    let back = dma::alloc(COUNT * SECTOR as u64, 4096)?;
    let id = dma::alloc(ID_BYTES as u64, 16)?;
    let mut disk = Disk {
        t,
        q: &mut q,
        header,
        status,
    };
    if capacity < FIRST + COUNT + 1 {
        return Err("disk too small (need at least 17 sectors)");
    }
    let last = capacity - 1;
    let read_only = features & F_RO != 0;
    let flush = features & F_FLUSH != 0;

    if !read_only {
        fill_pattern(out, FIRST, COUNT);
        disk.write(FIRST, out, COUNT)?;
        fill_pattern(out, last, 1);
        disk.write(last, out, 1)?;
        if flush {
            disk.flush()?;
        }
        disk.read(FIRST, back, COUNT)?;
        if !check_pattern(back, FIRST, COUNT) {
            return Err("sectors 8..16 read back wrong data");
        }
        disk.read(last, back, 1)?;
        if !check_pattern(back, last, 1) {
            return Err("last sector read back wrong data");
        }
    } else {
        disk.read(FIRST, back, COUNT)?;
        disk.read(last, back, 1)?;
    }

    let mut serial = [0u8; ID_BYTES];
    let mut serial_len = 0;
    match disk.request(T_GET_ID, 0, Some(Buf::write(id, ID_BYTES as u32)))? {
        S_OK => {
            dma::read_bytes(id, &mut serial);
            serial_len = serial.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        }
        S_UNSUPP => {}
        _ => return Err("GET_ID failed"),
    }
    let done = match (read_only, flush) {
        (true, _) => "read-only, read",
        (false, true) => "write/read/flush",
        (false, false) => "write/read",
    };
    println!(
        "virtio-blk {t} {capacity} sectors: {done} ok serial '{}'",
        crate::Bytes(&serial[..serial_len])
    );
    Ok(())
}

/// The sectors `soakdisk=on` writes: a ring of [`SOAK_RING`] from
/// [`SOAK_FIRST`].
const SOAK_FIRST: u64 = 64;
const SOAK_RING: u64 = 8;
const SOAK_TEXT: &[u8] = b"vessel soak disk step ";

/// `soakdisk=on`: step `j` of the soak's BSP reads sector
/// `SOAK_FIRST + j % SOAK_RING`, checks that it holds what step `j - SOAK_RING`
/// wrote (from the second round on), then writes step `j`'s stamp there and
/// flushes. The step counter lives in guest memory, so a VM restored with a
/// disk that does not match its memory (newer or older content) fails the
/// check within one round.
pub struct SoakDisk {
    t: Transport,
    q: Queue,
    header: u64,
    status: u64,
    buf: u64,
    flush: bool,
    step: u64,
}

/// What a soak disk step found wrong.
pub enum SoakError {
    /// The sector does not hold the expected stamp; what it holds instead
    /// (another step's stamp) if recognisable.
    Mismatch {
        step: u64,
        sector: u64,
        found: Option<u64>,
    },
    Io(&'static str),
}

impl SoakDisk {
    /// Sets up the device behind `t` again (DMA memory must be initialised).
    pub fn start(mut t: Transport) -> Result<SoakDisk, &'static str> {
        let features = t.begin(F_FLUSH | F_RO)?;
        if features & F_RO != 0 {
            return Err("read-only disk");
        }
        if t.config_read64(0) < SOAK_FIRST + SOAK_RING {
            return Err("disk too small for soakdisk=on");
        }
        let q = Queue::new(&mut t, 0)?;
        t.ready();
        Ok(SoakDisk {
            header: dma::alloc(16, 16)?,
            status: dma::alloc(16, 16)?,
            buf: dma::alloc(SECTOR as u64, 4096)?,
            flush: features & F_FLUSH != 0,
            t,
            q,
            step: 0,
        })
    }

    /// Steps done.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One step (see [`SoakDisk`]).
    pub fn step(&mut self) -> Result<(), SoakError> {
        let j = self.step;
        let sector = SOAK_FIRST + j % SOAK_RING;
        let (buf, flush) = (self.buf, self.flush);
        let mut disk = Disk {
            t: &self.t,
            q: &mut self.q,
            header: self.header,
            status: self.status,
        };
        let result = (|| {
            disk.read(sector, buf, 1).map_err(SoakError::Io)?;
            if j >= SOAK_RING {
                let mut want = [0u8; SECTOR];
                let mut got = [0u8; SECTOR];
                stamp(SOAK_TEXT, j - SOAK_RING, &mut want);
                dma::read_bytes(buf, &mut got);
                if want != got {
                    return Err(SoakError::Mismatch {
                        step: j,
                        sector,
                        found: stamped(SOAK_TEXT, &got),
                    });
                }
            }
            let mut out = [0u8; SECTOR];
            stamp(SOAK_TEXT, j, &mut out);
            dma::write_bytes(buf, &out);
            disk.write(sector, buf, 1).map_err(SoakError::Io)?;
            if flush {
                disk.flush().map_err(SoakError::Io)?;
            }
            Ok(())
        })();
        result?;
        self.step += 1;
        Ok(())
    }
}

/// The number of a stamp with `prefix` that `sector` holds in full.
fn stamped(prefix: &[u8], sector: &[u8; SECTOR]) -> Option<u64> {
    let rest = sector.strip_prefix(prefix)?;
    let end = rest.iter().position(|&b| b == b'\n')?;
    let n = crate::cmdline::parse_number(&rest[..end])?;
    let mut want = [0u8; SECTOR];
    stamp(prefix, n, &mut want);
    (&want == sector).then_some(n)
}
