//! Raw image backend: positional I/O on the file, hole punching for discard.
//!
//! With `direct` (`cache=none`) the file is opened with `O_DIRECT`, which needs buffer
//! addresses, offsets and lengths aligned to the file's direct-I/O alignment (probed at open).
//! Callers may pass any buffer: aligned requests go straight to the file, requests whose offset
//! and length are aligned but whose buffer is not go through an aligned bounce buffer, and the
//! rest (only possible when the alignment is above 512) through a second, buffered descriptor of
//! the same file (Linux keeps the two coherent: direct I/O writes back and invalidates the page
//! cache over its range).

use crate::{DiskBackend, Error, RawFile, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Largest piece a misaligned direct request is copied through at a time.
const BOUNCE_CHUNK: usize = 1 << 20;
/// Alignments probed for `O_DIRECT`, smallest first; the last one is assumed if none works.
const PROBE_ALIGNMENTS: [u64; 4] = [512, 1024, 2048, 4096];

/// A zero-filled byte buffer whose start is aligned to `align` (a power of two).
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1);
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align);
        AlignedBuf { raw, start, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A raw disk image.
pub struct RawBackend {
    path: PathBuf,
    file: File,
    /// With `O_DIRECT`: a buffered descriptor for requests that cannot be aligned.
    buffered: Option<File>,
    /// Direct-I/O alignment (1 without `O_DIRECT`).
    align: u64,
    size: u64,
    read_only: bool,
}

impl RawBackend {
    /// Open `path` as a raw image, through the page cache.
    pub fn open(path: &Path, read_only: bool) -> Result<RawBackend> {
        Self::open_with(path, read_only, false)
    }

    /// Open `path` as a raw image; `direct` bypasses the page cache (`O_DIRECT`).
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> Result<RawBackend> {
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(flags)
                .open(path)
                .map_err(|e| Error::io(path, e))
        };
        let file = if direct {
            open(libc::O_DIRECT).map_err(|e| match e {
                Error::Io { path, source } if source.raw_os_error() == Some(libc::EINVAL) => {
                    Error::Unsupported(format!(
                        "{}: the file system does not support O_DIRECT (cache=none)",
                        path.display()
                    ))
                }
                e => e,
            })?
        } else {
            open(0)?
        };
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let (buffered, align) = if direct {
            (Some(open(0)?), probe_alignment(&file))
        } else {
            (None, 1)
        };
        Ok(RawBackend {
            path: path.to_path_buf(),
            file,
            buffered,
            align,
            size,
            read_only,
        })
    }

    /// The direct-I/O alignment (1 without `O_DIRECT`).
    pub fn alignment(&self) -> u64 {
        self.align
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

    /// How a request of `len` bytes at `off` from `ptr` can be served.
    fn route(&self, ptr: *const u8, len: usize, off: u64) -> Route<'_> {
        let Some(buffered) = &self.buffered else {
            return Route::Direct;
        };
        let a = self.align;
        if !(off | len as u64).is_multiple_of(a) {
            Route::Buffered(buffered)
        } else if !(ptr as usize as u64).is_multiple_of(a) {
            Route::Bounce
        } else {
            Route::Direct
        }
    }
}

enum Route<'a> {
    Direct,
    Bounce,
    Buffered(&'a File),
}

/// The smallest alignment an `O_DIRECT` read of `file` accepts, for both the buffer and the
/// offset/length; 4096 if no probe succeeds (an empty file, say).
fn probe_alignment(file: &File) -> u64 {
    let max = PROBE_ALIGNMENTS[PROBE_ALIGNMENTS.len() - 1];
    // A buffer aligned to 2 * max, so that `buf[a..]` is aligned to `a` and to no more.
    let mut buf = AlignedBuf::new(3 * max as usize, 2 * max as usize);
    for a in PROBE_ALIGNMENTS {
        let a_usize = a as usize;
        match file.read_at(&mut buf.as_mut_slice()[a_usize..2 * a_usize], 0) {
            Ok(n) if n > 0 => return a,
            _ => continue,
        }
    }
    max
}

impl DiskBackend for RawBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check(off, buf.len() as u64, false)?;
        let err = |e| Error::io_at(&self.path, off, e);
        match self.route(buf.as_ptr(), buf.len(), off) {
            Route::Direct => self.file.read_exact_at(buf, off).map_err(err),
            Route::Buffered(f) => f.read_exact_at(buf, off).map_err(err),
            Route::Bounce => {
                let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_CHUNK), self.align as usize);
                for (i, piece) in buf.chunks_mut(BOUNCE_CHUNK).enumerate() {
                    let at = off + (i * BOUNCE_CHUNK) as u64;
                    let b = &mut bounce.as_mut_slice()[..piece.len()];
                    self.file.read_exact_at(b, at).map_err(err)?;
                    piece.copy_from_slice(b);
                }
                Ok(())
            }
        }
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check(off, buf.len() as u64, true)?;
        let err = |e| Error::io_at(&self.path, off, e);
        match self.route(buf.as_ptr(), buf.len(), off) {
            Route::Direct => self.file.write_all_at(buf, off).map_err(err),
            Route::Buffered(f) => f.write_all_at(buf, off).map_err(err),
            Route::Bounce => {
                let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_CHUNK), self.align as usize);
                for (i, piece) in buf.chunks(BOUNCE_CHUNK).enumerate() {
                    let at = off + (i * BOUNCE_CHUNK) as u64;
                    let b = &mut bounce.as_mut_slice()[..piece.len()];
                    b.copy_from_slice(piece);
                    self.file.write_all_at(b, at).map_err(err)?;
                }
                Ok(())
            }
        }
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
        let zeros = AlignedBuf::new(BOUNCE_CHUNK, self.align as usize);
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(zeros.len() as u64) as usize;
            self.write_at(&zeros.as_slice()[..n], pos)?;
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

    fn raw_file(&self) -> Option<RawFile> {
        let file = self.file.try_clone().ok()?;
        Some(RawFile {
            file,
            direct: self.buffered.is_some(),
            align: self.align,
            flush: !self.read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &tempfile::TempDir, size: usize) -> PathBuf {
        let p = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn direct_io_serves_any_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir, 1 << 20);
        let d = RawBackend::open_with(&p, false, true).unwrap();
        assert!(d.alignment() >= 512 && d.alignment().is_power_of_two());
        let rf = d.raw_file().unwrap();
        assert!(rf.direct);
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let flags = unsafe { libc::fcntl(rf.file.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_DIRECT, 0);

        let want = |off: usize, len: usize| -> Vec<u8> {
            (off..off + len).map(|i| (i % 251) as u8).collect()
        };
        // Aligned, misaligned buffer, and (on 4 KiB file systems) misaligned offset.
        let mut big = AlignedBuf::new(8192 + 1, 4096);
        for (boff, off, len) in [(0, 4096, 4096), (1, 512, 2048), (0, 512, 512)] {
            let b = &mut big.as_mut_slice()[boff..boff + len];
            d.read_at(b, off as u64).unwrap();
            assert_eq!(
                b,
                &want(off, len)[..],
                "read at {off}+{len}, buffer +{boff}"
            );
        }
        let data = vec![0xabu8; 1536];
        d.write_at(&data[..], 1536).unwrap();
        d.flush().unwrap();
        let mut back = vec![0u8; 1536];
        d.read_at(&mut back, 1536).unwrap();
        assert_eq!(back, data);
        d.write_zeroes(4096, 4096).unwrap();
        d.read_at(&mut back[..512], 4096).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0));
        drop(d);
        let file = std::fs::read(&p).unwrap();
        assert_eq!(&file[1536..3072], &data[..]);
    }

    #[test]
    fn buffered_raw_file_has_no_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(&dir, 4096);
        let d = RawBackend::open(&p, true).unwrap();
        let rf = d.raw_file().unwrap();
        assert!(!rf.direct);
        assert_eq!(rf.align, 1);
        assert!(!rf.flush, "read-only images are never flushed");
    }
}
