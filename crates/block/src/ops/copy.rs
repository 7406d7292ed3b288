//! Data-copying operations: convert (flattening), commit and rebase.

use super::{create, invalid, io, CreateOptions, Progress, Result};
use crate::chain::{lock_chain, resolve_backing, resolve_chain, Layer};
use crate::qcow2::check::guard_write;
use crate::qcow2::meta::Qcow2Meta;
use crate::qcow2::{open_imago, open_imago_single, Access};
use crate::{DiskBackend, Format, OpenOptions};
use imago::Mapping;
use std::path::Path;

/// Copy granularity.
const CHUNK: u64 = 1 << 20;
/// Granularity of zero detection (sparse output).
const ZERO_BLOCK: usize = 64 << 10;

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned bytes.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Convert `src` (any chain) into a new standalone image `dst` of format `out_fmt`.
pub fn convert(
    src: &Path,
    src_fmt: Option<Format>,
    dst: &Path,
    out_fmt: Format,
    cluster_size: Option<u64>,
    progress: Progress<'_>,
) -> Result<()> {
    let input = crate::open(
        src,
        OpenOptions {
            read_only: true,
            format: src_fmt,
            ..Default::default()
        },
    )?;
    let size = input.size();
    create(
        dst,
        &CreateOptions {
            format: Some(out_fmt),
            size: Some(size),
            cluster_size,
            // Like qemu-img convert: the target is replaced, but never while in use.
            force: true,
            ..Default::default()
        },
    )?;
    let output = crate::open(
        dst,
        OpenOptions {
            format: Some(out_fmt),
            ..Default::default()
        },
    )?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(CHUNK) as usize;
        input.read_at(&mut buf[..n], pos)?;
        for (i, block) in buf[..n].chunks(ZERO_BLOCK).enumerate() {
            if !is_zero(block) {
                output.write_at(block, pos + (i * ZERO_BLOCK) as u64)?;
            }
        }
        pos += n as u64;
        progress(pos, size);
    }
    output.flush()?;
    Ok(())
}

/// Allocated ranges of an image opened without its backing file:
/// (offset, length, explicit zero).
fn allocated_ranges(top: &Access, path: &Path) -> Result<Vec<(u64, u64, bool)>> {
    let size = top.size();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (m, len) = top.get_mapping(pos, size - pos).map_err(|e| io(path, e))?;
        if len == 0 {
            break;
        }
        match m {
            Mapping::Zero {
                explicit: false, ..
            }
            | Mapping::Eof { .. } => {}
            Mapping::Zero { explicit: true, .. } => out.push((pos, len, true)),
            _ => out.push((pos, len, false)),
        }
        pos += len;
    }
    Ok(out)
}

/// Merge the overlay `path` into its backing file, then empty the overlay (as
/// `qemu-img commit` does).
pub fn commit(path: &Path, progress: Progress<'_>) -> Result<()> {
    let layers = resolve_chain(path, None)?;
    if layers.len() < 2 {
        return Err(invalid(path, "image has no backing file to commit into"));
    }
    // The overlay and its direct backing file are both written.
    let _top_lock = lock_chain(&layers[..1], false)?;
    let _base_locks = lock_chain(&layers[1..], false)?;
    for l in &layers[..2] {
        if l.format == Format::Qcow2 {
            guard_write(&l.path)?;
        }
    }
    let mut top = open_imago_single(&layers[0], true)?;
    let base = open_imago(&layers[1..], true)?;
    let size = top.size();
    if base.size() < size {
        let mut base = base;
        base.resize(size, imago::format::PreallocateMode::Zero)
            .map_err(|e| io(&layers[1].path, e))?;
        return finish_commit(path, &layers, &mut top, base, progress);
    }
    finish_commit(path, &layers, &mut top, base, progress)
}

fn finish_commit(
    path: &Path,
    layers: &[Layer],
    top: &mut Access,
    base: Access,
    progress: Progress<'_>,
) -> Result<()> {
    let base_path = &layers[1].path;
    let ranges = allocated_ranges(top, path)?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let mut done = 0;
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, len, zero) in ranges {
        if zero {
            base.write_zeroes(start, len)
                .map_err(|e| io(base_path, e))?;
        } else {
            let mut pos = start;
            while pos < start + len {
                let n = (start + len - pos).min(CHUNK) as usize;
                top.read(&mut buf[..n], pos).map_err(|e| io(path, e))?;
                base.write(&buf[..n], pos).map_err(|e| io(base_path, e))?;
                pos += n as u64;
            }
        }
        done += len;
        progress(done, total);
    }
    base.flush().map_err(|e| io(base_path, e))?;
    base.sync().map_err(|e| io(base_path, e))?;
    drop(base);
    // Base now holds the data: empty the overlay so the backing shows through.
    let size = top.size();
    top.discard_to_backing(0, size).map_err(|e| io(path, e))?;
    top.flush().map_err(|e| io(path, e))?;
    top.sync().map_err(|e| io(path, e))?;
    Ok(())
}

/// Change the backing file of `path` to `new_base` (`None`: no backing file).
///
/// Safe mode copies every cluster whose content differs between the old and the new
/// backing chain into the overlay first, so the guest-visible content is unchanged.
/// `unsafe_` only rewrites the header (for renamed/moved backing files).
pub fn rebase(
    path: &Path,
    new_base: Option<&str>,
    new_fmt: Option<Format>,
    unsafe_: bool,
    progress: Progress<'_>,
) -> Result<()> {
    let _lock = crate::lock::ImageLock::acquire(path, crate::lock::LockMode::Write)?;
    if crate::probe(path)? != Format::Qcow2 {
        return Err(invalid(path, "only qcow2 images have a backing file"));
    }
    guard_write(path)?;
    let new_fmt = match (new_base, new_fmt) {
        (Some(b), None) => Some(crate::probe(&resolve_backing(path, b))?),
        (_, f) => f,
    };
    if let Some(b) = new_base {
        let layers = resolve_chain(&resolve_backing(path, b), new_fmt)?;
        let me = std::fs::canonicalize(path).map_err(|e| io(path, e))?;
        if layers
            .iter()
            .any(|l| std::fs::canonicalize(&l.path).is_ok_and(|p| p == me))
        {
            return Err(invalid(
                path,
                "new backing chain would contain the image itself",
            ));
        }
    }
    if !unsafe_ {
        copy_differences(path, new_base, new_fmt, progress)?;
    }
    let mut m = Qcow2Meta::open(path, true)?;
    m.header.backing_file = new_base.map(str::to_string);
    m.header.backing_format = new_fmt.map(|f| f.to_string());
    if m.header.version < 3 {
        m.header.backing_format = None;
    }
    m.rewrite_header()?;
    m.sync()?;
    Ok(())
}

fn copy_differences(
    path: &Path,
    new_base: Option<&str>,
    new_fmt: Option<Format>,
    progress: Progress<'_>,
) -> Result<()> {
    let layers = resolve_chain(path, Some(Format::Qcow2))?;
    let _old_locks = lock_chain(&layers[1..], true)?;
    let top = open_imago_single(&layers[0], true)?;
    let old = if layers.len() > 1 {
        Some(open_imago(&layers[1..], false)?)
    } else {
        None
    };
    let new: Option<Box<dyn DiskBackend>> = match new_base {
        Some(b) => Some(crate::open(
            resolve_backing(path, b),
            OpenOptions {
                read_only: true,
                format: new_fmt,
                ..Default::default()
            },
        )?),
        None => None,
    };
    let size = top.size();
    let allocated = allocated_ranges(&top, path)?;
    let cs = 64 << 10;
    let mut a = vec![0u8; cs];
    let mut b = vec![0u8; cs];
    let mut pos = 0u64;
    let mut alloc_iter = allocated.iter().peekable();
    while pos < size {
        let n = (size - pos).min(cs as u64);
        // Skip ranges the overlay allocates itself.
        while alloc_iter.peek().is_some_and(|r| r.0 + r.1 <= pos) {
            alloc_iter.next();
        }
        let covered = alloc_iter
            .peek()
            .is_some_and(|r| r.0 <= pos && pos + n <= r.0 + r.1);
        if !covered {
            let n = n as usize;
            read_opt(
                old.as_ref().map(|o| o as &dyn ReadAt),
                &mut a[..n],
                pos,
                path,
            )?;
            read_opt(
                new.as_ref().map(|o| o as &dyn ReadAt),
                &mut b[..n],
                pos,
                path,
            )?;
            if a[..n] != b[..n] {
                top.write(&a[..n], pos).map_err(|e| io(path, e))?;
            }
        }
        pos += n;
        progress(pos, size);
    }
    top.flush().map_err(|e| io(path, e))?;
    top.sync().map_err(|e| io(path, e))?;
    Ok(())
}

/// Reading from either an imago stack or a backend, zero past its end.
trait ReadAt {
    fn size_of(&self) -> u64;
    fn read_into(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
}

impl ReadAt for Access {
    fn size_of(&self) -> u64 {
        self.size()
    }
    fn read_into(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read(buf, off)
    }
}

impl ReadAt for Box<dyn DiskBackend> {
    fn size_of(&self) -> u64 {
        self.size()
    }
    fn read_into(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read_at(buf, off).map_err(std::io::Error::other)
    }
}

fn read_opt(src: Option<&dyn ReadAt>, buf: &mut [u8], off: u64, path: &Path) -> Result<()> {
    buf.fill(0);
    let Some(src) = src else { return Ok(()) };
    let size = src.size_of();
    if off >= size {
        return Ok(());
    }
    let n = ((size - off) as usize).min(buf.len());
    src.read_into(&mut buf[..n], off).map_err(|e| io(path, e))
}
