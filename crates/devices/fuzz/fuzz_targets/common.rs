//! Shared by the fuzz targets: an in-memory disk and guest memory made of the input.

use std::sync::Mutex;

use block::{DiskBackend, Format};
use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory size: small, so that most guest addresses in the input are in range.
pub const MEM_SIZE: usize = 64 * 1024;

/// Guest memory holding `bytes` from address 0 (the rest zero).
pub fn guest_memory(bytes: &[u8]) -> GuestMem {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = bytes.len().min(MEM_SIZE);
    mem.write_slice(&bytes[..n], GuestAddress(0)).unwrap();
    mem
}

/// A 64 KiB disk in memory.
pub struct MemDisk(pub Mutex<Vec<u8>>);

impl MemDisk {
    pub fn new() -> MemDisk {
        MemDisk(Mutex::new(vec![0; 64 * 1024]))
    }

    fn range(&self, off: u64, len: u64) -> block::Result<std::ops::Range<usize>> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(off as usize..end as usize),
            _ => Err(block::Error::OutOfRange {
                path: "mem".into(),
                offset: off,
                len,
                size,
            }),
        }
    }
}

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> block::Result<()> {
        let r = self.range(off, buf.len() as u64)?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> block::Result<()> {
        let r = self.range(off, buf.len() as u64)?;
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> block::Result<()> {
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> block::Result<()> {
        self.write_zeroes(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> block::Result<()> {
        let r = self.range(off, len)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}
