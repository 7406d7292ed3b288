//! The file under imago: [`ImagoFile`], and for a read-only qcow2 image whose corrupt bit is
//! set, a view of it that hides that bit.
//!
//! imago refuses every image with an incompatible feature bit it does not implement, the
//! corrupt bit included, even read-only. QEMU opens a corrupt-marked image read-only (so
//! its data can be copied out); so do we: the bit is masked in what imago reads, and the
//! view refuses every write.

use super::header::{off, INCOMPAT_CORRUPT};
use imago::file::File as ImagoFile;
use imago::io_buffers::{IoBuffer, IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{Storage, StorageOpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The header byte holding the corrupt bit (incompatible_features is a big-endian u64).
const CORRUPT_BYTE: u64 = off::INCOMPAT + 7;
const CORRUPT_MASK: u8 = INCOMPAT_CORRUPT as u8;

/// An image file as imago accesses it.
#[derive(Debug)]
pub struct ImageFile {
    inner: ImagoFile,
    /// Reads return the header without the corrupt bit; writes are refused.
    hide_corrupt: bool,
}

impl ImageFile {
    /// Open `opts`' file; `hide_corrupt` (only for read-only opens of a v3 qcow2 image whose
    /// corrupt bit is set) masks that bit.
    pub fn open(opts: StorageOpenOptions, hide_corrupt: bool) -> io::Result<ImageFile> {
        Ok(ImageFile {
            inner: ImagoFile::open(opts)?,
            hide_corrupt,
        })
    }

    fn refuse(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the image is marked corrupt and open read-only",
        )
    }
}

impl std::fmt::Display for ImageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Storage for ImageFile {
    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }

    fn get_filename(&self) -> Option<PathBuf> {
        self.inner.get_filename()
    }

    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let covers = offset <= CORRUPT_BYTE && offset + bufv.len() > CORRUPT_BYTE;
        if !(self.hide_corrupt && covers) {
            // SAFETY: the caller's request, passed on unchanged, with the caller's guarantees
            // (aligned to our alignments, which are the inner file's).
            return unsafe { self.inner.pure_readv(bufv, offset) };
        }
        // The header: read into a buffer of our own, mask the bit, copy it out.
        let mut tmp = IoBuffer::new(bufv.len() as usize, self.inner.mem_align())?;
        // SAFETY: same offset and length as the caller's request (so aligned to the inner
        // file's request alignment); `tmp` is aligned to its memory alignment.
        unsafe { self.inner.pure_readv(IoVectorMut::from(&mut tmp), offset)? };
        let bytes = tmp.as_mut().into_slice();
        bytes[(CORRUPT_BYTE - offset) as usize] &= !CORRUPT_MASK;
        bufv.copy_from_slice(bytes);
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        if self.hide_corrupt {
            return Err(self.refuse());
        }
        // SAFETY: the caller's request, passed on unchanged, with the caller's guarantees.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.hide_corrupt {
            return Err(self.refuse());
        }
        // SAFETY: the caller's request, passed on unchanged, with the caller's guarantees.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.hide_corrupt {
            return Err(self.refuse());
        }
        // SAFETY: the caller's request, passed on unchanged, with the caller's guarantees.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.hide_corrupt {
            return Err(self.refuse());
        }
        // SAFETY: the caller's request, passed on unchanged, with the caller's guarantees.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn settle_writes(&self) -> io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: passed on with the caller's guarantee (consistent on-disk state).
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        if self.hide_corrupt {
            return Err(self.refuse());
        }
        self.inner.resize(new_size, prealloc_mode)
    }
}

#[cfg(test)]
mod tests {
    use crate::qcow2::meta::Qcow2Meta;
    use crate::{open, OpenOptions};

    #[test]
    fn a_corrupt_marked_image_reads_but_never_writes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.qcow2");
        crate::ops::create(
            &p,
            &crate::ops::CreateOptions {
                size: Some(4 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let disk = open(&p, OpenOptions::default()).unwrap();
        disk.write_at(&[7; 4096], 65536).unwrap();
        drop(disk);
        let mut m = Qcow2Meta::open_for_repair(&p).unwrap();
        m.set_corrupt(true).unwrap();
        drop(m);
        let before = std::fs::read(&p).unwrap();
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let disk = open(&p, ro).unwrap();
        let mut buf = [0u8; 4096];
        disk.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [7; 4096]);
        assert!(disk.write_at(&buf, 0).is_err());
        drop(disk);
        // Read-write: refused, by us (and imago would refuse it too).
        let e = open(&p, OpenOptions::default()).err().unwrap().to_string();
        assert!(e.contains("cannot be opened read/write"), "{e}");
        assert!(Qcow2Meta::open(&p, true).is_err());
        assert!(std::fs::read(&p).unwrap() == before);
    }
}
