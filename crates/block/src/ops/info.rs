//! `info`: image description with qemu-img compatible JSON keys.

use super::{io, Result};
use crate::chain::{resolve_backing, resolve_chain, Layer};
use crate::lock::{ImageLock, LockMode};
use crate::qcow2::meta::Qcow2Meta;
use crate::qcow2::snapshot::read_snapshots;
use crate::Format;
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// One snapshot as `qemu-img info --output=json` prints it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

/// qcow2-specific information.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: String,
    pub lazy_refcounts: bool,
    pub refcount_bits: u32,
    pub corrupt: bool,
    pub extended_l2: bool,
    pub compression_type: String,
}

/// Format specific part of `info`.
#[derive(Debug, Clone, Serialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub ty: String,
    pub data: Qcow2Specific,
}

/// Image information; keys follow `qemu-img info --output=json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: u64,
    pub dirty_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
}

fn layer_info(l: &Layer) -> Result<ImageInfo> {
    let md = std::fs::metadata(&l.path).map_err(|e| io(&l.path, e))?;
    let mut info = ImageInfo {
        filename: l.path.display().to_string(),
        format: l.format.to_string(),
        virtual_size: md.len(),
        actual_size: md.blocks() * 512,
        dirty_flag: false,
        cluster_size: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: Vec::new(),
        format_specific: None,
    };
    if l.format == Format::Raw {
        return Ok(info);
    }
    let m = Qcow2Meta::open(&l.path, false)?;
    let h = &m.header;
    info.virtual_size = h.size;
    info.dirty_flag = h.dirty();
    info.cluster_size = Some(h.cluster_size());
    if let Some(b) = &h.backing_file {
        info.backing_filename = Some(b.clone());
        info.full_backing_filename = Some(resolve_backing(&l.path, b).display().to_string());
        info.backing_filename_format = h.backing_format.clone();
    }
    let (snaps, _) = read_snapshots(&m)?;
    info.snapshots = snaps
        .into_iter()
        .map(|s| SnapshotInfo {
            id: s.id,
            name: s.name,
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount.filter(|&i| i != u64::MAX),
        })
        .collect();
    info.format_specific = Some(FormatSpecific {
        ty: "qcow2".into(),
        data: Qcow2Specific {
            compat: if h.version >= 3 { "1.1" } else { "0.10" }.into(),
            lazy_refcounts: h.compatible & crate::qcow2::header::COMPAT_LAZY_REFCOUNTS != 0,
            refcount_bits: h.refcount_bits(),
            corrupt: h.corrupt(),
            extended_l2: false,
            compression_type: "zlib".into(),
        },
    });
    Ok(info)
}

/// Describe an image (and with `backing_chain`, every image below it). With `lock`, a
/// shared lock is taken like `qemu-img info` does (refused while a writer is active).
pub fn info(path: &Path, backing_chain: bool, lock: bool) -> Result<Vec<ImageInfo>> {
    let layers = resolve_chain(path, None)?;
    let n = if backing_chain { layers.len() } else { 1 };
    let mut out = Vec::with_capacity(n);
    for l in &layers[..n] {
        let _lock = if lock {
            Some(ImageLock::acquire(&l.path, LockMode::Read)?)
        } else {
            None
        };
        out.push(layer_info(l)?);
    }
    Ok(out)
}

/// Human readable size like qemu-img ("1 GiB").
pub fn human_size(v: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut f = v as f64;
    let mut u = 0;
    while f >= 1024.0 && u < UNITS.len() - 1 {
        f /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v} B")
    } else if f.fract() == 0.0 {
        format!("{f:.0} {}", UNITS[u])
    } else {
        format!("{f:.3} {}", UNITS[u])
    }
}

impl ImageInfo {
    /// Text rendering similar to `qemu-img info`.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
            self.filename,
            self.format,
            human_size(self.virtual_size),
            self.virtual_size,
            human_size(self.actual_size)
        );
        if let Some(cs) = self.cluster_size {
            s += &format!("cluster_size: {cs}\n");
        }
        if let Some(b) = &self.backing_filename {
            s += &format!(
                "backing file: {b} (actual path: {})\n",
                self.full_backing_filename.as_deref().unwrap_or(b)
            );
        }
        if let Some(f) = &self.backing_filename_format {
            s += &format!("backing file format: {f}\n");
        }
        if !self.snapshots.is_empty() {
            s += "Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK\n";
            for sn in &self.snapshots {
                s += &format!(
                    "{:<9} {:<17} {:>7} {:>20} {:>12}\n",
                    sn.id,
                    sn.name,
                    human_size(sn.vm_state_size),
                    sn.date_sec,
                    sn.vm_clock_sec
                );
            }
        }
        if let Some(fs) = &self.format_specific {
            s += &format!(
                "Format specific information:\n    compat: {}\n    compression type: {}\n    lazy refcounts: {}\n    refcount bits: {}\n    corrupt: {}\n    extended l2: false\n",
                fs.data.compat, fs.data.compression_type, fs.data.lazy_refcounts, fs.data.refcount_bits, fs.data.corrupt
            );
        }
        s += &format!("dirty flag: {}\n", self.dirty_flag);
        s
    }
}
