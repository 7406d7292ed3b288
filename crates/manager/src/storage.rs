//! Storage pools and their volumes (`vessel pool`, `vessel volume`), as libvirt's directory
//! pools: a pool is a directory, its volumes are the image files in it (a file copied there by
//! hand is a volume too). Templates name volumes as bases (`POOL/VOLUME`) and VMs attach them
//! as extra disks; a volume in use cannot be deleted, and one a running VM uses cannot be
//! resized. Uploads are checked: an image with a backing file (which could name any file of
//! the host) is refused, and a qcow2 image must pass a consistency check.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::check_name;
use crate::store::{now_s, StoragePool, StoreError};
use crate::vms::{bad, Error, Manager};

/// The pool the daemon makes for itself (in its state directory) when none has that name.
pub const DEFAULT_POOL: &str = "default";

fn failed(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Failed(format!("{}: {e}", path.display()))
}

/// `POST /api/v1/pools`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolCreate {
    pub name: String,
    /// Its directory (absolute; made if missing).
    #[schema(value_type = String)]
    pub path: PathBuf,
}

/// A pool as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolView {
    #[serde(flatten)]
    pub pool: StoragePool,
    /// Bytes of its file system, and bytes free there for the daemon.
    pub capacity: u64,
    pub available: u64,
    /// Its volumes.
    pub volumes: usize,
    /// Bytes its volumes take on disk.
    pub allocation: u64,
}

/// A volume's image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    #[default]
    Qcow2,
    Raw,
}

impl From<VolumeFormat> for block::Format {
    fn from(f: VolumeFormat) -> block::Format {
        match f {
            VolumeFormat::Qcow2 => block::Format::Qcow2,
            VolumeFormat::Raw => block::Format::Raw,
        }
    }
}

/// `POST /api/v1/pools/{pool}/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: String,
    /// Its size in bytes or with a unit (`"10G"`); default: its backing volume's.
    #[serde(default, with = "spec::size::json::option")]
    #[schema(value_type = Option<u64>)]
    pub size: Option<u64>,
    #[serde(default)]
    pub format: VolumeFormat,
    /// A volume of the same pool it is a thin qcow2 overlay on.
    #[serde(default)]
    pub backing: Option<String>,
}

/// `PUT /api/v1/pools/{pool}/volumes/{volume}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// The new size in bytes or with a unit (`"20G"`).
    #[serde(with = "spec::size::json")]
    #[schema(value_type = u64)]
    pub size: u64,
    /// Allow a smaller size (the data past it is lost).
    #[serde(default)]
    pub shrink: bool,
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Volume {
    pub name: String,
    pub pool: String,
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// The size the guest sees.
    pub size: u64,
    /// Bytes it takes on disk.
    pub allocation: u64,
    /// Its backing file, for an overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// The templates and VMs that use it (`template:NAME`, `vm:NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}

/// A file's device and inode.
type FileId = (u64, u64);

/// The file's identity, to compare paths that may differ in spelling.
fn identity(p: &Path) -> Option<FileId> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

impl Manager {
    /// Makes the default pool (STATE/images) unless a pool has that name already.
    pub fn ensure_default_pool(&self) -> Result<(), Error> {
        match self.store().pool(DEFAULT_POOL) {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound { .. }) => {
                let path = self.layout().state.join("images");
                self.create_pool(PoolCreate {
                    name: DEFAULT_POOL.into(),
                    path,
                })
                .map(|_| ())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn create_pool(&self, req: PoolCreate) -> Result<PoolView, Error> {
        check_name(&req.name).map_err(|e| bad(format!("name: {e}")))?;
        if !req.path.is_absolute() {
            return Err(bad(format!("path: {} is not absolute", req.path.display())));
        }
        let _op = self.ops();
        if let Some(p) = self
            .store()
            .pools()?
            .into_iter()
            .find(|p| p.path == req.path)
        {
            return Err(Error::Conflict(format!(
                "{} is pool {} already",
                req.path.display(),
                p.name
            )));
        }
        std::fs::create_dir_all(&req.path).map_err(|e| failed(&req.path, e))?;
        if !req.path.is_dir() {
            return Err(bad(format!(
                "path: {} is not a directory",
                req.path.display()
            )));
        }
        let pool = StoragePool {
            name: req.name,
            path: req.path,
            created: now_s(),
        };
        self.store().add_pool(&pool)?;
        self.event(&pool.name, "pool.created", pool.path.display().to_string());
        drop(_op);
        self.pool_view(pool)
    }

    fn pool_view(&self, pool: StoragePool) -> Result<PoolView, Error> {
        let fs = rustix::fs::statvfs(&pool.path).map_err(|e| failed(&pool.path, e))?;
        let volumes = self.volumes_of(&pool)?;
        Ok(PoolView {
            capacity: fs.f_blocks * fs.f_frsize,
            available: fs.f_bavail * fs.f_frsize,
            volumes: volumes.len(),
            allocation: volumes.iter().map(|v| v.allocation).sum(),
            pool,
        })
    }

    pub fn pools(&self) -> Result<Vec<PoolView>, Error> {
        self.store()
            .pools()?
            .into_iter()
            .map(|p| self.pool_view(p))
            .collect()
    }

    pub fn pool(&self, name: &str) -> Result<PoolView, Error> {
        let p = self.store().pool(name)?;
        self.pool_view(p)
    }

    /// Forgets a pool none of whose volumes is in use; its directory and files stay.
    pub fn delete_pool(&self, name: &str) -> Result<(), Error> {
        let _op = self.ops();
        let pool = self.store().pool(name)?;
        let used: Vec<String> = self
            .volumes_of(&pool)?
            .into_iter()
            .filter(|v| !v.used_by.is_empty())
            .map(|v| format!("{} ({})", v.name, v.used_by.join(", ")))
            .collect();
        if !used.is_empty() {
            return Err(Error::Conflict(format!(
                "pool {name} has volumes in use: {}",
                used.join("; ")
            )));
        }
        self.store().delete_pool(name)?;
        self.event(name, "pool.deleted", pool.path.display().to_string());
        Ok(())
    }

    /// Who uses each file: templates' bases and VMs' disks, by file identity.
    fn users(&self) -> Result<Vec<(FileId, String)>, Error> {
        let mut out = Vec::new();
        for t in self.store().templates()? {
            for b in &t.base_disks {
                if let Some(id) = identity(b) {
                    out.push((id, format!("template:{}", t.name)));
                }
            }
        }
        for v in self.store().vms()? {
            for d in &v.disks {
                if let Some(id) = identity(d) {
                    out.push((id, format!("vm:{}", v.name)));
                }
            }
        }
        Ok(out)
    }

    fn volumes_of(&self, pool: &StoragePool) -> Result<Vec<Volume>, Error> {
        let users = self.users()?;
        let dir = std::fs::read_dir(&pool.path).map_err(|e| failed(&pool.path, e))?;
        let mut out = Vec::new();
        for e in dir {
            let e = e.map_err(|e| failed(&pool.path, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue; // hidden (an upload under way) or not a volume
            }
            if let Some(v) = volume_info(pool, &name, &users) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn volumes(&self, pool: &str) -> Result<Vec<Volume>, Error> {
        let pool = self.store().pool(pool)?;
        self.volumes_of(&pool)
    }

    pub fn volume(&self, pool: &str, name: &str) -> Result<Volume, Error> {
        let pool = self.store().pool(pool)?;
        check_name(name).map_err(bad)?;
        volume_info(&pool, name, &self.users()?).ok_or_else(|| {
            StoreError::NotFound {
                what: "volume",
                name: format!("{}/{name}", pool.name),
            }
            .into()
        })
    }

    /// The file of volume `POOL/VOLUME` (which must exist).
    pub fn volume_path(&self, reference: &str) -> Result<PathBuf, Error> {
        let (pool, name) = reference
            .split_once('/')
            .ok_or_else(|| bad(format!("'{reference}' is not POOL/VOLUME")))?;
        Ok(self.volume(pool, name)?.path)
    }

    pub fn create_volume(&self, pool: &str, req: VolumeCreate) -> Result<Volume, Error> {
        check_name(&req.name).map_err(|e| bad(format!("name: {e}")))?;
        let pool = self.store().pool(pool)?;
        let path = pool.path.join(&req.name);
        let backing = match &req.backing {
            Some(b) => {
                check_name(b).map_err(|e| bad(format!("backing: {e}")))?;
                if req.format != VolumeFormat::Qcow2 {
                    return Err(bad("backing: only a qcow2 volume has a backing volume"));
                }
                if !pool.path.join(b).is_file() {
                    return Err(bad(format!("backing: no volume {}/{b}", pool.name)));
                }
                Some(b.clone())
            }
            None if req.size.is_none() => return Err(bad("size: required without backing")),
            None => None,
        };
        let _op = self.ops();
        if path.exists() {
            return Err(StoreError::Exists {
                what: "volume",
                name: format!("{}/{}", pool.name, req.name),
            }
            .into());
        }
        let opts = block::ops::CreateOptions {
            format: Some(req.format.into()),
            size: req.size,
            backing,
            ..Default::default()
        };
        block::ops::create(&path, &opts).map_err(bad)?;
        self.event(&format!("{}/{}", pool.name, req.name), "volume.created", "");
        drop(_op);
        self.volume(&pool.name, &req.name)
    }

    /// Deletes a volume no template or VM uses.
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<(), Error> {
        let _op = self.ops();
        let v = self.volume(pool, name)?;
        if !v.used_by.is_empty() {
            return Err(Error::Conflict(format!(
                "volume {pool}/{name} is in use by {}",
                v.used_by.join(", ")
            )));
        }
        std::fs::remove_file(&v.path).map_err(|e| failed(&v.path, e))?;
        self.event(&format!("{pool}/{name}"), "volume.deleted", "");
        Ok(())
    }

    /// Grows (or with `shrink`, shrinks) a volume no running VM uses.
    pub fn resize_volume(
        &self,
        pool: &str,
        name: &str,
        req: VolumeResize,
    ) -> Result<Volume, Error> {
        let _op = self.ops();
        let v = self.volume(pool, name)?;
        let running: Vec<&String> = v
            .used_by
            .iter()
            .filter(|u| u.strip_prefix("vm:").is_some_and(|n| self.is_running(n)))
            .collect();
        if !running.is_empty() {
            return Err(Error::Conflict(format!(
                "volume {pool}/{name} is in use by running {running:?}"
            )));
        }
        block::ops::resize(&v.path, req.size, req.shrink).map_err(bad)?;
        self.event(
            &format!("{pool}/{name}"),
            "volume.resized",
            spec::size::format(req.size),
        );
        drop(_op);
        self.volume(pool, name)
    }

    /// A new volume from an image's bytes (`chunks`): written to a hidden file, checked,
    /// then renamed into place. Refused: an existing name, an image with a backing file, a
    /// qcow2 image that fails its check.
    pub fn upload_volume(
        &self,
        pool: &str,
        name: &str,
        chunks: impl Iterator<Item = Result<Vec<u8>, String>>,
    ) -> Result<Volume, Error> {
        check_name(name).map_err(|e| bad(format!("name: {e}")))?;
        let pool = self.store().pool(pool)?;
        let path = pool.path.join(name);
        if path.exists() {
            return Err(StoreError::Exists {
                what: "volume",
                name: format!("{}/{name}", pool.name),
            }
            .into());
        }
        let tmp = pool
            .path
            .join(format!(".upload-{name}-{}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(|e| failed(&tmp, e))?;
            for c in chunks {
                let c = c.map_err(|e| bad(format!("the upload: {e}")))?;
                f.write_all(&c).map_err(|e| failed(&tmp, e))?;
            }
            f.sync_all().map_err(|e| failed(&tmp, e))?;
            drop(f);
            check_upload(&tmp)?;
            let _op = self.ops();
            if path.exists() {
                return Err(StoreError::Exists {
                    what: "volume",
                    name: format!("{}/{name}", pool.name),
                }
                .into());
            }
            std::fs::rename(&tmp, &path).map_err(|e| failed(&path, e))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.event(&format!("{}/{name}", pool.name), "volume.uploaded", "");
        self.volume(&pool.name, name)
    }
}

/// Checks an uploaded image: no backing file, and a qcow2 image must be consistent.
fn check_upload(path: &Path) -> Result<(), Error> {
    let info = block::ops::info(path, false, false).map_err(|e| bad(format!("the image: {e}")))?;
    let Some(top) = info.first() else {
        return Err(bad("the image: not readable"));
    };
    if let Some(b) = &top.backing_filename {
        return Err(bad(format!(
            "the image has a backing file ({b}): upload a standalone image"
        )));
    }
    if top.format == "qcow2" {
        let report = block::ops::check(path, false).map_err(|e| bad(format!("the image: {e}")))?;
        if report.corruptions > 0 || report.check_errors > 0 || report.marked_corrupt {
            return Err(bad(format!(
                "the image is not consistent: {}",
                report.messages.join("; ")
            )));
        }
    }
    Ok(())
}

/// The volume `name` of `pool`, if it is an image file there.
fn volume_info(pool: &StoragePool, name: &str, users: &[(FileId, String)]) -> Option<Volume> {
    let path = pool.path.join(name);
    let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file())?;
    let info = block::ops::info(&path, false, false).ok()?;
    let top = info.into_iter().next()?;
    let id = (meta.dev(), meta.ino());
    Some(Volume {
        name: name.to_string(),
        pool: pool.name.clone(),
        format: top.format,
        size: top.virtual_size,
        allocation: meta.blocks() * 512,
        backing: top.backing_filename,
        used_by: users
            .iter()
            .filter(|(u, _)| *u == id)
            .map(|(_, who)| who.clone())
            .collect(),
        path,
    })
}
