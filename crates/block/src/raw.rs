//! Raw image backend: positional I/O on the file, hole punching for discard.

use crate::{DiskBackend, Error, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A raw disk image.
pub struct RawBackend {
    path: PathBuf,
    file: File,
    size: u64,
    read_only: bool,
}

impl RawBackend {
    /// Open `path` as a raw image.
    pub fn open(path: &Path, read_only: bool) -> Result<RawBackend> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(RawBackend {
            path: path.to_path_buf(),
            file,
            size,
            read_only,
        })
    }

    fn fallocate(&self, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate only operates on our own open descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off as i64, len as i64) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn check(&self, off: u64, len: u64, write: bool) -> Result<()> {
        if write && self.read_only {
            return Err(Error::ReadOnly(self.path.clone()));
        }
        crate::check_range(&self.path, off, len, self.size)
    }
}

impl DiskBackend for RawBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check(off, buf.len() as u64, false)?;
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| Error::io_at(&self.path, off, e))
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check(off, buf.len() as u64, true)?;
        self.file
            .write_all_at(buf, off)
            .map_err(|e| Error::io_at(&self.path, off, e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.write_zeroes(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.check(off, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(punch, off, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> crate::Format {
        crate::Format::Raw
    }
}
