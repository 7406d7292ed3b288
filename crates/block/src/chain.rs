//! Opening images: format probing, backing-chain resolution (with loop detection), locking
//! and building the imago driver stack.

use crate::lock::{ImageLock, LockMode};
use crate::qcow2::meta::Qcow2Meta;
use crate::qcow2::Qcow2Backend;
use crate::raw::RawBackend;
use crate::{probe, DiskBackend, Error, Format, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Longest backing chain we follow (QEMU has no hard limit; this only stops runaway
/// chains, loops are detected separately).
pub const MAX_CHAIN_DEPTH: usize = 1000;

/// Options for [`open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open the top image read-only. Backing files are always read-only.
    pub read_only: bool,
    /// Format of the top image; probed when `None`.
    pub format: Option<Format>,
    /// Take OFD locks (like QEMU). Only disable for diagnostics (`info -U`) and for a
    /// migration target (the source holds the locks). A locked read-write open of a qcow2
    /// image first validates its metadata ([`crate::qcow2::check::guard_write`]); an
    /// unlocked one does not (someone else may be writing the image).
    pub lock: bool,
    /// Repair a dirty (lazy-refcount, unclean shutdown) top image when opening it writable.
    pub repair_dirty: bool,
    /// Bypass the host page cache (`O_DIRECT`, `cache=none`) on every file of the chain.
    pub direct: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            format: None,
            lock: true,
            repair_dirty: true,
            direct: false,
        }
    }
}

/// One image of a backing chain.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Path as used to open it (backing names resolved relative to the overlay).
    pub path: PathBuf,
    pub format: Format,
    /// Backing file name as stored in the header.
    pub backing_name: Option<String>,
    /// Backing format as stored in the header.
    pub backing_format: Option<String>,
}

/// Resolve a backing file name the way QEMU does: relative to the overlay's directory.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// Walk the backing chain starting at `path`, validating every qcow2 header on the way.
pub fn resolve_chain(path: &Path, format: Option<Format>) -> Result<Vec<Layer>> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen = HashSet::new();
    let mut cur = path.to_path_buf();
    let mut fmt = format;
    loop {
        let canon = std::fs::canonicalize(&cur).map_err(|e| match layers.last() {
            Some(prev) => Error::MissingBacking {
                image: prev.path.clone(),
                backing: cur.clone(),
                source: e,
            },
            None => Error::io(&cur, e),
        })?;
        if !seen.insert(canon.clone()) {
            return Err(Error::BackingLoop {
                path: path.to_path_buf(),
                again: cur,
            });
        }
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::ChainTooDeep {
                path: path.to_path_buf(),
                max: MAX_CHAIN_DEPTH,
            });
        }
        let f = match fmt {
            Some(f) => f,
            None => probe(&cur)?,
        };
        let mut layer = Layer {
            path: cur.clone(),
            format: f,
            backing_name: None,
            backing_format: None,
        };
        if f == Format::Qcow2 {
            let m = Qcow2Meta::open(&cur, false)?;
            layer.backing_name = m.header.backing_file.clone();
            layer.backing_format = m.header.backing_format.clone();
        }
        let next = layer.backing_name.clone();
        fmt = match layer.backing_format.as_deref() {
            Some(s) => Some(s.parse()?),
            None => None,
        };
        layers.push(layer);
        match next {
            Some(name) => cur = resolve_backing(&cur, &name),
            None => return Ok(layers),
        }
    }
}

/// Lock every layer: the top for writing (unless read-only), backing files for reading.
pub fn lock_chain(layers: &[Layer], read_only: bool) -> Result<Vec<ImageLock>> {
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mode = if i == 0 && !read_only {
                LockMode::Write
            } else {
                LockMode::Read
            };
            ImageLock::acquire(&l.path, mode).map_err(Error::from)
        })
        .collect()
}

/// Open a disk image with its backing chain: probes the format, opens backing files
/// read-only and takes OFD locks on every file of the chain.
pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Box<dyn DiskBackend>> {
    let path = path.as_ref();
    let layers = resolve_chain(path, opts.format)?;
    let locks = if opts.lock {
        lock_chain(&layers, opts.read_only)?
    } else {
        Vec::new()
    };
    if layers.len() == 1 && layers[0].format == Format::Raw {
        let raw = RawBackend::open_with(path, opts.read_only, opts.direct)?;
        return Ok(Box::new(Locked::new(Box::new(raw), locks)));
    }
    if opts.lock && !opts.read_only && layers[0].format == Format::Qcow2 {
        crate::qcow2::check::guard_write(&layers[0].path)?;
    }
    prepare_dirty(&layers, opts.read_only, opts.repair_dirty)?;
    let q = Qcow2Backend::open_chain_with(&layers, opts.read_only, opts.direct)?;
    Ok(Box::new(Locked::new(Box::new(q), locks)))
}

/// Dirty images: repair the writable top (as QEMU does); refuse dirty backing files.
fn prepare_dirty(layers: &[Layer], read_only: bool, repair: bool) -> Result<()> {
    for (i, l) in layers.iter().enumerate() {
        if l.format != Format::Qcow2 {
            continue;
        }
        let m = Qcow2Meta::open(&l.path, false)?;
        if !m.header.dirty() {
            continue;
        }
        if i == 0 && !read_only && repair {
            drop(m);
            let mut m = Qcow2Meta::open(&l.path, true)?;
            crate::qcow2::check::check(&mut m, true)?;
        } else {
            return Err(Error::Dirty(l.path.clone()));
        }
    }
    Ok(())
}

/// A backend together with the locks of its chain (released when dropped, after the
/// backend has been flushed and closed). The locks may also come after the backend was
/// opened ([`Locked::set_locks`]): a switched disk's backing file is the image the old disk
/// held the write lock on until it closed.
pub struct Locked<B: DiskBackend + ?Sized> {
    inner: Box<B>,
    locks: Mutex<Vec<ImageLock>>,
    /// What [`DiskBackend::release_locks`] let go of, to take back.
    released: Mutex<Vec<(PathBuf, LockMode)>>,
}

impl<B: DiskBackend + ?Sized> Locked<B> {
    pub fn new(inner: Box<B>, locks: Vec<ImageLock>) -> Self {
        Locked {
            inner,
            locks: Mutex::new(locks),
            released: Mutex::new(Vec::new()),
        }
    }

    /// Replaces the locks held (the old ones are released).
    pub fn set_locks(&self, locks: Vec<ImageLock>) {
        *self.locks.lock().unwrap_or_else(|e| e.into_inner()) = locks;
    }
}

impl<B: DiskBackend + ?Sized> DiskBackend for Locked<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.inner.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(off, len)
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn raw_file(&self) -> Option<crate::RawFile> {
        self.inner.raw_file()
    }
    fn release_locks(&self) {
        let locks = std::mem::take(&mut *self.locks.lock().unwrap_or_else(|e| e.into_inner()));
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        released.extend(locks.iter().map(|l| (l.path().to_path_buf(), l.mode())));
        // The locks go as `locks` drops: each closes its own descriptor.
    }
    fn retake_locks(&self) -> Result<()> {
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        // All or none: a lock taken before one that fails is let go again with `taken`.
        let taken = released
            .iter()
            .map(|(path, mode)| ImageLock::acquire(path, *mode))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        released.clear();
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(taken);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_locks_are_taken_back_all_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let opts = crate::OpenOptions {
            lock: true,
            ..Default::default()
        };
        let disk = open(&p, opts).unwrap();
        let other = || ImageLock::acquire(&p, LockMode::Write);
        assert!(other().is_err(), "an open disk holds its image");
        disk.release_locks();
        // Handed over: someone else may take it, and then the disk cannot have it back.
        let squatter = other().unwrap();
        assert!(disk.retake_locks().is_err());
        drop(squatter);
        disk.retake_locks().unwrap();
        assert!(other().is_err());
        // Nothing released, nothing to take.
        disk.retake_locks().unwrap();
    }
}
