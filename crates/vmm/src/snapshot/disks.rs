//! External disk snapshots taken at the VM snapshot's instant (`disk_snapshot: true`).
//!
//! While the VM is paused (vCPUs parked, device threads paused, requests in flight completed),
//! every writable disk is flushed and its current image *frozen*: a new qcow2 overlay whose
//! backing file is that image is created **next to the image**, named
//! `<image file name>.<snapshot directory name>.qcow2` (backing file stored by its bare name,
//! as `qemu-img create -b` with a relative name does), and the running block device switches
//! to it before the VM goes on. The frozen image is only read from then on (the VM holds a
//! read lock on it, as it does on any backing file). The state file records each frozen image
//! ([`FrozenDisk`]: path, format, size and modification time), so that the memory state goes
//! with that disk content.
//!
//! Restoring such a snapshot ([`prepare_restore`]) checks that every frozen image is unchanged
//! and opens a **fresh overlay on top of it in the snapshot directory**,
//! `<snapshot>/disk-<N>.<pid>.qcow2` (`-2`, `-3`... if taken): many clones restore one
//! snapshot at once, each writing its own overlay, all reading the frozen images. These
//! overlays stay after the VM ends (they are its disks); delete them when done.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use block::DiskBackend;
use serde::{Deserialize, Serialize};

use crate::config::{CacheMode, Disk, VmConfig};

/// A disk image frozen by a disk snapshot: the content that goes with the saved memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenDisk {
    /// The disk's index in the configuration.
    pub index: usize,
    /// The image (absolute).
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    /// The image file's size and modification time when it was frozen: a restore refuses an
    /// image that changed since.
    pub file_size: u64,
    pub mtime_ns: i128,
}

/// Errors taking or restoring disk snapshots.
#[derive(Debug, thiserror::Error)]
pub enum DiskSnapshotError {
    #[error("disk {index} ({path}): {why}")]
    Disk {
        index: usize,
        path: String,
        why: String,
    },
    #[error("the snapshot directory {0} has no usable name for disk overlays")]
    DirName(String),
}

fn disk_err(index: usize, path: &Path, why: impl ToString) -> DiskSnapshotError {
    DiskSnapshotError::Disk {
        index,
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// A disk whose image locks are taken after it is opened (see [`block::chain::Locked`]).
pub(crate) type LateLocked = block::chain::Locked<dyn DiskBackend>;

/// One disk to freeze: its index, current image and the overlay the VM goes on with.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub index: usize,
    pub image: PathBuf,
    pub overlay: PathBuf,
}

/// The overlays a disk snapshot into `dir` creates, checked before anything is paused: every
/// writable disk gets `<image>.<dir name>.qcow2` next to its image, which must not exist.
pub(crate) fn plan(config: &VmConfig, dir: &Path) -> Result<Vec<Planned>, DiskSnapshotError> {
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| DiskSnapshotError::DirName(dir.display().to_string()))?;
    let mut out = Vec::new();
    let disks = config.spec.disks.iter().zip(&config.bindings.disks);
    for (index, (_, path)) in disks.enumerate().filter(|(_, (d, _))| !d.read_only) {
        let image = path.canonicalize().map_err(|e| disk_err(index, path, e))?;
        let file = image
            .file_name()
            .ok_or_else(|| disk_err(index, &image, "no file name"))?;
        let overlay = image.with_file_name(format!("{}.{name}.qcow2", file.to_string_lossy()));
        if overlay.exists() {
            return Err(disk_err(
                index,
                &image,
                format!(
                    "its new overlay {} exists already (a disk snapshot into a directory of \
                     the same name was taken before); use another snapshot directory",
                    overlay.display()
                ),
            ));
        }
        out.push(Planned {
            index,
            image,
            overlay,
        });
    }
    Ok(out)
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

/// What an image is now, for [`FrozenDisk`].
fn describe(index: usize, path: &Path) -> Result<FrozenDisk, DiskSnapshotError> {
    let meta = std::fs::metadata(path).map_err(|e| disk_err(index, path, e))?;
    let format = block::probe(path).map_err(|e| disk_err(index, path, e))?;
    Ok(FrozenDisk {
        index,
        path: path.to_path_buf(),
        format: format.to_string(),
        file_size: meta.len(),
        mtime_ns: mtime_ns(&meta),
    })
}

/// Creates a qcow2 overlay at `overlay` on `backing` (stored as `backing_name`), of `size`
/// bytes, refusing to overwrite anything.
fn create_overlay(
    index: usize,
    overlay: &Path,
    backing: &Path,
    backing_name: &str,
    size: u64,
) -> Result<(), DiskSnapshotError> {
    let fmt = block::probe(backing).map_err(|e| disk_err(index, backing, e))?;
    // Reserve the name (the image creation truncates and rewrites the file).
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(overlay)
        .map_err(|e| disk_err(index, overlay, e))?;
    let opts = block::ops::CreateOptions {
        format: Some(block::Format::Qcow2),
        size: Some(size),
        backing: Some(backing_name.to_string()),
        backing_format: Some(fmt),
        // The empty file reserved above is ours to replace.
        force: true,
        ..Default::default()
    };
    block::ops::create(overlay, &opts).map_err(|e| {
        let _ = std::fs::remove_file(overlay);
        disk_err(index, overlay, e)
    })
}

/// Opens a freshly created overlay for disk `d`, without locks yet.
fn open_overlay(
    index: usize,
    overlay: &Path,
    d: &Disk,
) -> Result<Arc<LateLocked>, DiskSnapshotError> {
    let opts = block::OpenOptions {
        read_only: false,
        direct: d.cache == CacheMode::None,
        lock: false,
        repair_dirty: false,
        ..Default::default()
    };
    let disk = block::open(overlay, opts).map_err(|e| disk_err(index, overlay, e))?;
    let disk: Box<dyn DiskBackend> = match d.cache {
        CacheMode::Unsafe => Box::new(crate::virtio::NoFlush(disk)),
        _ => disk,
    };
    Ok(Arc::new(LateLocked::new(disk, Vec::new())))
}

impl crate::vm::Machine {
    /// The engine serving each disk now, in configuration order.
    pub(crate) fn disk_engines(&self) -> Vec<devices::virtio::block::EngineKind> {
        (0..self.config.spec.disks.len())
            .map(|i| {
                self.with_block(i, |b| b.engine())
                    .unwrap_or(self.config.spec.disks[i].engine)
            })
            .collect()
    }

    /// The block device of disk `index`, locked, given to `f`.
    fn with_block<R>(
        &self,
        index: usize,
        f: impl FnOnce(&mut devices::virtio::block::Block) -> R,
    ) -> Option<R> {
        use devices::bus::lock;
        match &self.virtio.pci {
            Some(pci) => {
                let mut t = lock(pci.transports.get(index)?);
                t.device_mut().as_block_mut().map(f)
            }
            None => {
                let mut t = lock(self.virtio.transports.get(index)?);
                t.device_mut().as_block_mut().map(f)
            }
        }
    }

    /// Disk `i`'s backend.
    fn disk_backend(&self, i: usize) -> Result<std::sync::Arc<dyn DiskBackend>, String> {
        self.with_block(i, |b| b.disk().clone())
            .ok_or_else(|| format!("disk {i}: no block device"))
    }

    /// Hands the disks over to a live migration's target: flushes each and releases its image
    /// locks, so that the target can take them. The devices must be paused.
    pub(crate) fn hand_over_disks(&self) -> Result<(), String> {
        for i in 0..self.config.spec.disks.len() {
            let disk = self.disk_backend(i)?;
            disk.flush().map_err(|e| format!("disk {i}: flush: {e}"))?;
            disk.release_locks();
        }
        Ok(())
    }

    /// Takes the disks' locks back after a migration failed, waiting (up to 10 s) for a target
    /// that is still letting go of them. The VM must not run on without them.
    pub(crate) fn take_back_disks(&self) -> Result<(), String> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for i in 0..self.config.spec.disks.len() {
            let disk = self.disk_backend(i)?;
            loop {
                match disk.retake_locks() {
                    Ok(()) => break,
                    // A target builds its VM with the locks and drops it when told the
                    // migration failed: wait for that, not forever.
                    Err(e) if std::time::Instant::now() >= until => {
                        return Err(format!("disk {i}: {e}"));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
        Ok(())
    }

    /// Freezes the planned disks (see the module documentation). The devices must be paused.
    /// Returns what was frozen; the VM's disks are its new overlays from then on. A disk whose
    /// overlay could not be made stays as it was (its overlay removed), and the error says so.
    pub(crate) fn freeze_disks(
        &self,
        planned: &[Planned],
    ) -> Result<Vec<FrozenDisk>, DiskSnapshotError> {
        let mut frozen = Vec::with_capacity(planned.len());
        for p in planned {
            let d = &self.config.spec.disks[p.index];
            let size = self
                .with_block(p.index, |b| b.disk().size())
                .ok_or_else(|| disk_err(p.index, &p.image, "no block device"))?;
            let name = p
                .image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            create_overlay(p.index, &p.overlay, &p.image, &name, size)?;
            let new = match open_overlay(p.index, &p.overlay, d) {
                Ok(n) => n,
                Err(e) => {
                    let _ = std::fs::remove_file(&p.overlay);
                    return Err(e);
                }
            };
            let switched = self
                .with_block(p.index, |b| b.replace_disk(new.clone()))
                .ok_or_else(|| disk_err(p.index, &p.image, "no block device"))
                .and_then(|r| r.map_err(|e| disk_err(p.index, &p.image, e)));
            let old = match switched {
                Ok(old) => old,
                Err(e) => {
                    drop(new);
                    let _ = std::fs::remove_file(&p.overlay);
                    return Err(e);
                }
            };
            // The old disk closes here (flushed, its locks released): nothing else holds it
            // once the device's engines and I/O threads were replaced.
            if Arc::strong_count(&old) != 1 {
                tracing::warn!("disk {}: the frozen image is still open elsewhere", p.index);
            }
            drop(old);
            devices::bus::lock(&self.disk_paths)[p.index] = p.overlay.clone();
            frozen.push(describe(p.index, &p.image)?);
            let locks = block::chain::resolve_chain(&p.overlay, Some(block::Format::Qcow2))
                .and_then(|layers| block::chain::lock_chain(&layers, false));
            match locks {
                Ok(l) => new.set_locks(l),
                Err(e) => tracing::warn!(
                    "disk {}: cannot lock {} and its backing files: {e}",
                    p.index,
                    p.overlay.display()
                ),
            }
            tracing::info!(
                "disk {}: {} frozen, the VM goes on with {}",
                p.index,
                p.image.display(),
                p.overlay.display()
            );
        }
        Ok(frozen)
    }
}

/// Gives a restored VM a fresh overlay on every frozen image of the snapshot in `dir` (see the
/// module documentation), after checking that the images did not change, and points its disk
/// configuration at them. Returns the overlays created (to remove if the restore fails).
pub(crate) fn prepare_restore(
    frozen: &[FrozenDisk],
    config: &mut VmConfig,
    dir: &Path,
) -> Result<Vec<PathBuf>, DiskSnapshotError> {
    let mut created = Vec::new();
    let result = (|| {
        let dir_abs = dir
            .canonicalize()
            .map_err(|e| DiskSnapshotError::DirName(format!("{}: {e}", dir.display())))?;
        for f in frozen {
            let (Some(d), Some(path)) = (
                config.spec.disks.get_mut(f.index),
                config.bindings.disks.get_mut(f.index),
            ) else {
                return Err(disk_err(f.index, &f.path, "no such disk in the saved VM"));
            };
            let now = describe(f.index, &f.path)?;
            if now.file_size != f.file_size || now.mtime_ns != f.mtime_ns {
                return Err(disk_err(
                    f.index,
                    &f.path,
                    "the image changed since the snapshot (size or modification time); its \
                     content no longer matches the saved memory",
                ));
            }
            let size = block::open(
                &f.path,
                block::OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .map_err(|e| disk_err(f.index, &f.path, e))?
            .size();
            let backing_name = block::ops::relative_path(&f.path, &dir_abs)
                .to_string_lossy()
                .into_owned();
            let pid = std::process::id();
            let mut n = 1;
            let overlay = loop {
                let name = if n == 1 {
                    format!("disk-{}.{pid}.qcow2", f.index)
                } else {
                    format!("disk-{}.{pid}-{n}.qcow2", f.index)
                };
                let path = dir_abs.join(name);
                if !path.exists() {
                    break path;
                }
                n += 1;
            };
            create_overlay(f.index, &overlay, &f.path, &backing_name, size)?;
            created.push(overlay.clone());
            *path = overlay;
            if d.engine == devices::virtio::block::EngineKind::IoUring {
                // A qcow2 overlay: io_uring serves raw files only.
                d.engine = devices::virtio::block::EngineKind::Auto;
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(created),
        Err(e) => {
            remove_overlays(&created);
            Err(e)
        }
    }
}

/// Removes overlays made for a restore that failed.
pub(crate) fn remove_overlays(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with these disks (file, read-only).
    fn disks(list: &[(&Path, bool)]) -> VmConfig {
        let mut c = VmConfig::new(Default::default(), Default::default());
        for (path, read_only) in list {
            c.spec.disks.push(Disk {
                read_only: *read_only,
                ..Disk::default()
            });
            c.bindings.disks.push(path.to_path_buf());
        }
        c
    }

    #[test]
    fn plan_names_overlays_next_to_writable_images_and_refuses_existing_ones() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a.raw"), t.path().join("b.raw"));
        std::fs::write(&a, [0u8; 4096]).unwrap();
        std::fs::write(&b, [0u8; 4096]).unwrap();
        let snap = t.path().join("snap1");
        std::fs::create_dir(&snap).unwrap();
        let p = plan(&disks(&[(&a, false), (&b, true)]), &snap).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].index, 0);
        assert_eq!(
            p[0].overlay,
            t.path().canonicalize().unwrap().join("a.raw.snap1.qcow2")
        );
        std::fs::write(&p[0].overlay, b"").unwrap();
        let e = plan(&disks(&[(&a, false)]), &snap).unwrap_err();
        assert!(e.to_string().contains("exists already"), "{e}");
    }

    #[test]
    fn restore_overlays_are_fresh_and_refuse_a_changed_image() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a.raw");
        std::fs::write(&a, vec![7u8; 1 << 20]).unwrap();
        let snap = t.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        let frozen = vec![describe(0, &a.canonicalize().unwrap()).unwrap()];
        let mut vm = disks(&[(&a, false)]);
        let made = prepare_restore(&frozen, &mut vm, &snap).unwrap();
        let mut vm2 = disks(&[(&a, false)]);
        let made2 = prepare_restore(&frozen, &mut vm2, &snap).unwrap();
        assert_ne!(made, made2, "each restore has its own overlay");
        for (m, c) in [(&made, &vm), (&made2, &vm2)] {
            assert_eq!(c.bindings.disks[0], m[0]);
            assert!(m[0].starts_with(snap.canonicalize().unwrap()));
            let chain = block::chain::resolve_chain(&m[0], None).unwrap();
            assert_eq!(chain.len(), 2);
            assert_eq!(chain[1].path.canonicalize().unwrap(), frozen[0].path);
        }
        // Both clones open their overlays at once, reading the same frozen image.
        let o1 = block::open(&made[0], Default::default()).unwrap();
        let o2 = block::open(&made2[0], Default::default()).unwrap();
        let mut buf = [0u8; 512];
        o2.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [7u8; 512]);
        o1.write_at(&[1u8; 512], 0).unwrap();
        o2.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [7u8; 512], "a clone's write stays in its overlay");
        drop((o1, o2));
        // The frozen image changes: refused, nothing left behind.
        std::fs::write(&a, vec![8u8; 1 << 20]).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let before = std::fs::read_dir(&snap).unwrap().count();
        let mut vm3 = disks(&[(&a, false)]);
        let e = prepare_restore(&frozen, &mut vm3, &snap).unwrap_err();
        assert!(e.to_string().contains("changed since the snapshot"), "{e}");
        assert_eq!(std::fs::read_dir(&snap).unwrap().count(), before);
    }
}
