//! Image operations behind `vessel image`: create, clone, info, check, snapshots, resize,
//! convert, commit and rebase.

mod copy;
pub mod info;

pub use copy::{commit, convert, rebase};
pub use info::{info, ImageInfo};

use crate::chain::{resolve_backing, resolve_chain};
use crate::lock::{ImageLock, LockMode};
use crate::qcow2::check::{guard_write, CheckReport};
use crate::qcow2::meta::{MetaError, Qcow2Meta};
use crate::qcow2::snapshot::{self, Snapshot, SnapshotError};
use crate::{probe, Error, Format};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, Storage, StorageCreateOptions};
use std::path::{Component, Path, PathBuf};

/// Errors of image operations.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Image(#[from] Error),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, OpsError>;

pub(crate) fn invalid(path: &Path, what: impl Into<String>) -> OpsError {
    OpsError::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

pub(crate) fn io(path: &Path, source: std::io::Error) -> OpsError {
    OpsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Progress callback: (done, total) in bytes.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// Preallocation modes (as in `qemu-img create -o preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl std::str::FromStr for Prealloc {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" => Ok(Prealloc::Off),
            "metadata" => Ok(Prealloc::Metadata),
            "falloc" => Ok(Prealloc::Falloc),
            "full" => Ok(Prealloc::Full),
            _ => Err(format!("unknown preallocation mode '{s}'")),
        }
    }
}

/// Options for [`create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub format: Option<Format>,
    /// Virtual size; defaults to the backing file's size.
    pub size: Option<u64>,
    /// Backing file name, stored as given (relative names are relative to the new image).
    pub backing: Option<String>,
    pub backing_format: Option<Format>,
    pub prealloc: Prealloc,
    pub cluster_size: Option<u64>,
    /// Replace an existing file (never one in use: its write lock is taken first).
    pub force: bool,
}

/// Create a new image. An existing file is only replaced with `force`, and only when its
/// write lock can be taken (as `qemu-img create` does): never under a running VM.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let format = opts.format.unwrap_or(Format::Qcow2);
    let mut size = opts.size;
    let mut backing = None;
    if let Some(name) = &opts.backing {
        if format != Format::Qcow2 {
            return Err(invalid(path, "only qcow2 images can have a backing file"));
        }
        let bpath = resolve_backing(path, name);
        let bfmt = match opts.backing_format {
            Some(f) => f,
            None => probe(&bpath).map_err(|_| {
                invalid(
                    path,
                    format!("backing file {} does not exist", bpath.display()),
                )
            })?,
        };
        // Validates the whole chain below (loops, missing files, corrupt headers).
        let layers = resolve_chain(&bpath, Some(bfmt))?;
        if layers.iter().any(|l| same_file(&l.path, path)) {
            return Err(invalid(path, "an image cannot be its own backing file"));
        }
        if size.is_none() {
            size = Some(
                crate::open(
                    &bpath,
                    crate::OpenOptions {
                        read_only: true,
                        format: Some(bfmt),
                        ..Default::default()
                    },
                )?
                .size(),
            );
        }
        backing = Some((name.clone(), bfmt));
    }
    let size = size.ok_or_else(|| invalid(path, "image size is required"))?;
    if format == Format::Qcow2 {
        check_qcow2_options(path, opts, backing.is_some())?;
    }
    let (lock, made) = claim_target(path, opts.force)?;
    let r = match format {
        Format::Raw => create_raw(path, size, opts.prealloc),
        Format::Qcow2 => create_qcow2(path, size, opts, backing),
    };
    drop(lock);
    if r.is_err() && made {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Take the write lock of the file an image is about to be written to: an existing file
/// (replaced only with `force`), or a new empty one made for it. Returns the lock, held
/// while the image is written, and whether the file is new.
fn claim_target(path: &Path, force: bool) -> Result<(ImageLock, bool)> {
    match std::fs::symlink_metadata(path) {
        Ok(_) if !force => Err(invalid(
            path,
            "file exists; use --force to replace it with a new image",
        )),
        Ok(_) => Ok((ImageLock::acquire(path, LockMode::Write)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| io(path, e))?;
            match ImageLock::acquire(path, LockMode::Write) {
                Ok(lock) => Ok((lock, true)),
                Err(e) => {
                    let _ = std::fs::remove_file(path);
                    Err(e.into())
                }
            }
        }
        Err(e) => Err(io(path, e)),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn create_raw(path: &Path, size: u64, prealloc: Prealloc) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| io(path, e))?;
    match prealloc {
        Prealloc::Off => f.set_len(size).map_err(|e| io(path, e)),
        Prealloc::Metadata => Err(invalid(
            path,
            "preallocation=metadata is not supported for raw",
        )),
        Prealloc::Falloc => {
            // SAFETY: posix_fallocate operates on our open descriptor only.
            let r = unsafe {
                libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, size as i64)
            };
            if r != 0 {
                return Err(io(path, std::io::Error::from_raw_os_error(r)));
            }
            Ok(())
        }
        Prealloc::Full => {
            use std::io::Write;
            let mut w = std::io::BufWriter::new(&f);
            let zeros = vec![0u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                w.write_all(&zeros[..n]).map_err(|e| io(path, e))?;
                left -= n as u64;
            }
            w.flush().map_err(|e| io(path, e))
        }
    }
}

/// Options a qcow2 image cannot be made with (checked before any file is touched).
fn check_qcow2_options(path: &Path, opts: &CreateOptions, backing: bool) -> Result<()> {
    let cs = opts.cluster_size.unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(invalid(path, format!("invalid cluster size {cs}")));
    }
    if backing && opts.prealloc != Prealloc::Off {
        return Err(invalid(
            path,
            "preallocation is not supported with a backing file",
        ));
    }
    Ok(())
}

fn create_qcow2(
    path: &Path,
    size: u64,
    opts: &CreateOptions,
    backing: Option<(String, Format)>,
) -> Result<()> {
    let cs = opts.cluster_size.unwrap_or(65536);
    let storage =
        ImagoFile::create_open(StorageCreateOptions::new().filename(path).overwrite(true))
            .map_err(|e| io(path, e))?;
    let mode = match opts.prealloc {
        Prealloc::Off => imago::format::PreallocateMode::None,
        Prealloc::Metadata => imago::format::PreallocateMode::FormatAllocate,
        Prealloc::Falloc => imago::format::PreallocateMode::FullAllocate,
        Prealloc::Full => imago::format::PreallocateMode::WriteData,
    };
    let mut b = Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .preallocate(mode)
        .cluster_size(cs as usize);
    if let Some((name, fmt)) = backing {
        b = b.backing(name, fmt.to_string());
    }
    b.create().map_err(|e| io(path, e))
}

/// Relative path from directory `from` to `to` (both absolute).
pub fn relative_path(to: &Path, from: &Path) -> PathBuf {
    let to: Vec<Component> = to.components().collect();
    let from: Vec<Component> = from.components().collect();
    let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// Create a thin qcow2 overlay on `base` (the template), storing a relative backing path.
/// An existing `path` is only replaced with `force` (and never while in use).
pub fn clone(base: &Path, path: &Path, force: bool) -> Result<()> {
    let base_abs = std::fs::canonicalize(base).map_err(|e| io(base, e))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir_abs = std::fs::canonicalize(dir).map_err(|e| io(dir, e))?;
    let rel = relative_path(&base_abs, &dir_abs);
    let fmt = probe(base)?;
    create(
        path,
        &CreateOptions {
            format: Some(Format::Qcow2),
            backing: Some(rel.to_string_lossy().into_owned()),
            backing_format: Some(fmt),
            force,
            ..Default::default()
        },
    )
}

/// Check an image (qcow2 only); `repair` fixes leaks, refcount errors and COPIED flags.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    if probe(path)? != Format::Qcow2 {
        return Err(invalid(path, "this image format does not support checks"));
    }
    // Like qemu-img check: a shared lock (refused while a VM writes the image), the
    // write lock to repair.
    let _lock = ImageLock::acquire(
        path,
        if repair {
            LockMode::Write
        } else {
            LockMode::Read
        },
    )?;
    let mut m = if repair {
        Qcow2Meta::open_for_repair(path)?
    } else {
        Qcow2Meta::open(path, false)?
    };
    Ok(crate::qcow2::check::check(&mut m, repair)?)
}

/// Internal snapshot operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOp {
    Create,
    Apply,
    Delete,
}

fn open_qcow2_locked(path: &Path, mode: LockMode) -> Result<(ImageLock, Qcow2Meta)> {
    if probe(path)? != Format::Qcow2 {
        return Err(invalid(path, "internal snapshots need a qcow2 image"));
    }
    let lock = ImageLock::acquire(path, mode)?;
    if mode == LockMode::Write {
        guard_write(path)?;
    }
    let mut m = Qcow2Meta::open(path, mode == LockMode::Write)?;
    if m.header.dirty() {
        if mode == LockMode::Write {
            crate::qcow2::check::check(&mut m, true)?;
        } else {
            return Err(Error::Dirty(path.to_path_buf()).into());
        }
    }
    Ok((lock, m))
}

/// List internal snapshots.
pub fn snapshot_list(path: &Path) -> Result<Vec<Snapshot>> {
    let (_lock, m) = open_qcow2_locked(path, LockMode::Read)?;
    Ok(snapshot::list(&m)?)
}

/// Create, apply or delete an internal snapshot.
pub fn snapshot(path: &Path, op: SnapshotOp, name: &str) -> Result<()> {
    let (_lock, mut m) = open_qcow2_locked(path, LockMode::Write)?;
    match op {
        SnapshotOp::Create => snapshot::create(&mut m, name)?,
        SnapshotOp::Apply => snapshot::apply(&mut m, name)?,
        SnapshotOp::Delete => snapshot::delete(&mut m, name)?,
    }
    Ok(())
}

/// Resize an image. Shrinking requires `shrink` (data past the new end is lost).
pub fn resize(path: &Path, new_size: u64, shrink: bool) -> Result<()> {
    let layers = resolve_chain(path, None)?;
    let _locks = crate::chain::lock_chain(&layers, false)?;
    if layers[0].format == Format::Raw {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        let cur = f.metadata().map_err(|e| io(path, e))?.len();
        if new_size < cur && !shrink {
            return Err(invalid(path, "use --shrink to shrink an image"));
        }
        return f.set_len(new_size).map_err(|e| io(path, e));
    }
    guard_write(path)?;
    let m = Qcow2Meta::open(path, false)?;
    let cur = m.header.size;
    if new_size < cur {
        if !shrink {
            return Err(invalid(path, "use --shrink to shrink an image"));
        }
        if m.header.nb_snapshots > 0 {
            return Err(invalid(
                path,
                "cannot shrink an image that has internal snapshots",
            ));
        }
    }
    drop(m);
    let mut access = crate::qcow2::open_imago(&layers, true)?;
    // With a backing file the new range must not show the backing file's data.
    let mode = if layers.len() > 1 {
        imago::format::PreallocateMode::Zero
    } else {
        imago::format::PreallocateMode::None
    };
    access.resize(new_size, mode).map_err(|e| io(path, e))?;
    access.flush().map_err(|e| io(path, e))?;
    access.sync().map_err(|e| io(path, e))
}

/// Parse a size like `10G`, `512M`, `4096`, `1.5G` (binary units; a plain number is bytes,
/// like qemu-img): `spec::size`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    spec::size::parse(s, spec::size::Plain::Bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn create_replaces_only_with_force_and_never_in_use() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.qcow2");
        let opts = |force| CreateOptions {
            size: Some(1 << 20),
            force,
            ..Default::default()
        };
        create(&p, &opts(false)).unwrap();
        let e = create(&p, &opts(false)).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        let lock = ImageLock::acquire(&p, LockMode::Read).unwrap();
        let before = std::fs::read(&p).unwrap();
        let e = create(&p, &opts(true)).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        assert!(std::fs::read(&p).unwrap() == before);
        drop(lock);
        create(&p, &opts(true)).unwrap();
        // A failed create leaves no new file behind.
        let q = d.path().join("y.qcow2");
        let bad = CreateOptions {
            cluster_size: Some(3),
            ..opts(false)
        };
        assert!(create(&q, &bad).is_err());
        let bad = CreateOptions {
            prealloc: Prealloc::Metadata,
            format: Some(Format::Raw),
            ..opts(false)
        };
        assert!(create(&q, &bad).is_err());
        assert!(!q.exists());
    }

    #[test]
    fn relpaths() {
        assert_eq!(
            relative_path(Path::new("/a/b/c.img"), Path::new("/a/b")),
            Path::new("c.img")
        );
        assert_eq!(
            relative_path(Path::new("/a/base/c.img"), Path::new("/a/vms")),
            Path::new("../base/c.img")
        );
    }
}
