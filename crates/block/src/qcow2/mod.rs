//! qcow2 support: the data path through imago, plus our own metadata code.

pub mod check;
pub mod header;
pub mod meta;
pub mod snapshot;
pub mod storage;

use crate::chain::Layer;
use crate::{DiskBackend, Error, Format, Result};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use storage::ImageFile;

/// An imago image stack (top image with its backing chain).
pub type Access = FormatAccess<ImageFile>;

fn imago_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Open one layer through imago with the given (already opened) backing; `direct` bypasses the
/// page cache (imago aligns requests itself).
fn open_layer(
    layer: &Layer,
    writable: bool,
    direct: bool,
    backing: Option<Arc<Access>>,
) -> Result<Access> {
    let p = &layer.path;
    // A corrupt-marked image opens read-only only (imago would refuse it altogether).
    let hide_corrupt = !writable && layer.format == Format::Qcow2 && marked_corrupt(p)?;
    let storage = ImageFile::open(
        StorageOpenOptions::new()
            .filename(p)
            .write(writable)
            .direct(direct),
        hide_corrupt,
    )
    .map_err(|e| imago_err(p, e))?;
    let gate = DenyImplicitOpenGate::default();
    let access = match layer.format {
        Format::Raw => {
            let raw = Raw::builder(storage)
                .write(writable)
                .open(gate)
                .map_err(|e| imago_err(p, e))?;
            FormatAccess::new(raw)
        }
        Format::Qcow2 => {
            let q = Qcow2::<ImageFile, Arc<Access>>::builder(storage)
                .write(writable)
                .backing(backing)
                .data_file(None)
                .open(gate)
                .map_err(|e| imago_err(p, e))?;
            FormatAccess::new(q)
        }
    };
    Ok(access)
}

/// Whether the qcow2 image at `path` has the corrupt bit set (v3 only).
fn marked_corrupt(path: &Path) -> Result<bool> {
    let m = meta::Qcow2Meta::open(path, false)?;
    Ok(m.header.version >= 3 && m.header.corrupt())
}

/// Open a resolved chain through imago: backing files read-only, bottom up.
pub fn open_imago(layers: &[Layer], top_writable: bool) -> Result<Access> {
    open_imago_with(layers, top_writable, false)
}

/// [`open_imago`], with every file opened `O_DIRECT` when `direct`.
pub fn open_imago_with(layers: &[Layer], top_writable: bool, direct: bool) -> Result<Access> {
    let mut backing: Option<Arc<Access>> = None;
    for (i, l) in layers.iter().enumerate().rev() {
        let a = open_layer(l, i == 0 && top_writable, direct, backing.take())?;
        if i == 0 {
            return Ok(a);
        }
        backing = Some(Arc::new(a));
    }
    Err(Error::Unsupported("empty backing chain".into()))
}

/// Open only the top layer, without its backing file (to inspect its own allocation).
pub fn open_imago_single(layer: &Layer, writable: bool) -> Result<Access> {
    open_layer(layer, writable, false, None)
}

/// A qcow2 image (or a chain whose top is qcow2) as a [`DiskBackend`].
pub struct Qcow2Backend {
    path: PathBuf,
    /// Reads and writes take the lock shared; discards take it exclusively, because imago
    /// requires that no data mappings are in use while clusters are freed.
    access: RwLock<Access>,
    size: u64,
    read_only: bool,
    format: Format,
}

impl Qcow2Backend {
    /// Open a resolved chain.
    pub fn open_chain(layers: &[Layer], read_only: bool) -> Result<Qcow2Backend> {
        Self::open_chain_with(layers, read_only, false)
    }

    /// Open a resolved chain; `direct` opens every file with `O_DIRECT` (`cache=none`).
    pub fn open_chain_with(
        layers: &[Layer],
        read_only: bool,
        direct: bool,
    ) -> Result<Qcow2Backend> {
        let access = open_imago_with(layers, !read_only, direct)?;
        Ok(Qcow2Backend {
            path: layers[0].path.clone(),
            size: access.size(),
            access: RwLock::new(access),
            read_only,
            format: layers[0].format,
        })
    }

    fn check(&self, off: u64, len: u64, write: bool) -> Result<()> {
        if write && self.read_only {
            return Err(Error::ReadOnly(self.path.clone()));
        }
        crate::check_range(&self.path, off, len, self.size)
    }

    fn err(&self, off: u64, e: std::io::Error) -> Error {
        Error::io_at(&self.path, off, e)
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, Access> {
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl DiskBackend for Qcow2Backend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check(off, buf.len() as u64, false)?;
        self.shared().read(buf, off).map_err(|e| self.err(off, e))
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check(off, buf.len() as u64, true)?;
        self.shared().write(buf, off).map_err(|e| self.err(off, e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let a = self.shared();
        a.flush().map_err(|e| Error::io(&self.path, e))?;
        a.sync().map_err(|e| Error::io(&self.path, e))
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check(off, len, true)?;
        let mut a = self.access.write().unwrap_or_else(|p| p.into_inner());
        a.discard_to_zero(off, len).map_err(|e| self.err(off, e))
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.check(off, len, true)?;
        self.shared()
            .write_zeroes(off, len)
            .map_err(|e| self.err(off, e))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> Format {
        self.format
    }
}

impl Drop for Qcow2Backend {
    fn drop(&mut self) {
        // imago flushes its caches on drop; make the result durable too.
        if !self.read_only {
            let _ = self.flush();
        }
    }
}
