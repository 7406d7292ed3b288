//! Vessel's disk-image layer: raw and qcow2 images with copy-on-write backing chains,
//! internal and external snapshots, and the `vessel image` command line.
//!
//! The data path of qcow2 images is [imago](https://crates.io/crates/imago) (in its native
//! synchronous mode); metadata work that imago does not do (check/repair, internal
//! snapshots, header rewrites, validation with precise error offsets) lives in [`qcow2`].
//!
//! ```no_run
//! let disk = block::open("vm.qcow2", block::OpenOptions::default())?;
//! let mut buf = vec![0u8; 4096];
//! disk.read_at(&mut buf, 0)?;
//! disk.write_at(&buf, 4096)?;
//! disk.flush()?;
//! # Ok::<(), block::Error>(())
//! ```

pub mod chain;
#[cfg(feature = "cli")]
pub mod cli;
pub mod lock;
pub mod ops;
pub mod qcow2;
pub mod raw;

use std::path::{Path, PathBuf};

pub use chain::{open, Layer, OpenOptions};
pub use raw::AlignedBuf;

/// Result type of this crate's top-level API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::Unsupported(format!(
                "unknown image format '{other}'"
            ))),
        }
    }
}

/// A virtual disk as the virtio-block device sees it. Thread safe; all offsets are in
/// bytes of the virtual disk.
pub trait DiskBackend: Send + Sync {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from offset `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
    /// Write `buf` at offset `off` (durable only after [`DiskBackend::flush`]).
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()>;
    /// Make all acknowledged writes durable.
    fn flush(&self) -> Result<()>;
    /// Discard a range; it reads back as zeroes afterwards.
    fn discard(&self, off: u64, len: u64) -> Result<()>;
    /// Make a range read as zeroes, deallocating where cheap.
    fn write_zeroes(&self, off: u64, len: u64) -> Result<()>;
    /// Whether the disk was opened read-only.
    fn read_only(&self) -> bool;
    /// Format of the top image.
    fn format(&self) -> Format;
    /// The image's file, for engines that do their own I/O on it (io_uring): only raw images
    /// without a backing chain have one.
    fn raw_file(&self) -> Option<RawFile> {
        None
    }
    /// Releases the image locks the disk holds: a live migration hands the disk, flushed and
    /// idle, to its target. Nothing for a disk without locks.
    fn release_locks(&self) {}
    /// Takes back what [`DiskBackend::release_locks`] released (a migration that failed); an
    /// error if another process holds the image now.
    fn retake_locks(&self) -> Result<()> {
        Ok(())
    }
}

/// Direct access to a raw image's file (see [`DiskBackend::raw_file`]).
#[derive(Debug)]
pub struct RawFile {
    /// A duplicate of the image's descriptor (the same open file, with its flags and locks).
    pub file: std::fs::File,
    /// The file was opened with `O_DIRECT`: buffer addresses, offsets and lengths must be
    /// multiples of `align`.
    pub direct: bool,
    /// The alignment direct I/O needs (a power of two, at least 512; 1 without `O_DIRECT`).
    pub align: u64,
    /// Whether a guest flush must reach the file (`false` with `cache=unsafe`).
    pub flush: bool,
}

/// Errors of the image layer. Messages name the file and, where known, the offset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: I/O error at offset {offset:#x}: {source}")]
    IoAt {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error(transparent)]
    Meta(#[from] qcow2::meta::MetaError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error("{path}: request at {offset:#x} (+{len:#x}) is beyond the disk size {size:#x}")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{0}: image is read-only")]
    ReadOnly(PathBuf),
    #[error("{path}: backing chain loops back to {again}")]
    BackingLoop { path: PathBuf, again: PathBuf },
    #[error("{path}: backing chain deeper than {max} images")]
    ChainTooDeep { path: PathBuf, max: usize },
    #[error("{image}: cannot open backing file {backing}: {source}")]
    MissingBacking {
        image: PathBuf,
        backing: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0}: image is dirty (unclean shutdown with lazy refcounts); repair it with `vessel image check --repair`"
    )]
    Dirty(PathBuf),
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn io_at(path: &Path, offset: u64, source: std::io::Error) -> Error {
        Error::IoAt {
            path: path.to_path_buf(),
            offset,
            source,
        }
    }
}

/// Check that `[off, off+len)` lies within a disk of `size` bytes.
pub(crate) fn check_range(path: &Path, off: u64, len: u64, size: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            path: path.to_path_buf(),
            offset: off,
            len,
            size,
        }),
    }
}

/// Probe the format of an image file from its first bytes.
pub fn probe(path: &Path) -> Result<Format> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if n == 4 && u32::from_be_bytes(magic) == qcow2::header::MAGIC {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}
