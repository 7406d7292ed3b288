//! The snapshot state file: a magic line, a JSON header line with the format version and the
//! body's length and CRC-32, then the JSON body.
//!
//! ```text
//! VESSEL-SNAPSHOT
//! {"format_version":3,"vessel_version":"0.1.0","body_len":1234,"body_crc32":305419896,
//!  "snapshot_id":"9f2c…","parent":{"dir":"/snaps/full","id":"41d0…"}}
//! {...the state...}
//! ```
//!
//! (the header is one line). Every snapshot has a random `snapshot_id`; a diff snapshot names
//! its `parent` (absolute directory and id), whose memory file holds the pages the diff left
//! out. Version 2 added both; version 3 records the machine as a spec with its host bindings
//! (`VmConfig { spec, bindings }`), and older files are refused with a version error. A file from a newer format is refused with a version error (never half-read), so an
//! older Vessel never mistakes a diff snapshot for a full one. The checksum catches truncation
//! and bit rot before any state reaches KVM. Files are written to a temporary name, synced and
//! renamed, so a crash never leaves a half-written snapshot under the real name.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// First line of every state file.
pub const MAGIC: &str = "VESSEL-SNAPSHOT";
/// The state format this Vessel writes.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest state format this Vessel reads.
pub const OLDEST_VERSION: u32 = 3;
/// Longest header line accepted.
const MAX_HEADER: usize = 4096;

/// The versions this Vessel reads, for messages.
fn supported_versions() -> String {
    if OLDEST_VERSION == FORMAT_VERSION {
        format!("version {FORMAT_VERSION}")
    } else {
        format!("versions {OLDEST_VERSION} to {FORMAT_VERSION}")
    }
}

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a Vessel snapshot state file")]
    NotASnapshot(String),
    #[error(
        "{path}: snapshot format version {found} (written by Vessel {writer}); this Vessel \
         {ours} reads {versions} only",
        versions = supported_versions()
    )]
    Version {
        path: String,
        found: u32,
        writer: String,
        ours: &'static str,
    },
    #[error("{path}: the state is corrupt ({why})")]
    Corrupt { path: String, why: String },
    #[error("cannot encode the state: {0}")]
    Encode(#[source] serde_json::Error),
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format_version: u32,
    vessel_version: String,
    body_len: u64,
    body_crc32: u32,
    #[serde(flatten)]
    lineage: Lineage,
}

/// A snapshot, as another one refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// Its directory (absolute).
    pub dir: PathBuf,
    /// Its `snapshot_id`.
    pub id: String,
}

/// Where a snapshot stands in a chain of diff snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// Random, unique per snapshot (empty in version 1 files).
    #[serde(default, rename = "snapshot_id")]
    pub id: String,
    /// The snapshot this one is a diff against; none for a full snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<SnapshotRef>,
}

impl Lineage {
    /// A new snapshot id: 128 random bits in hex.
    pub fn new_id() -> String {
        let mut b = [0u8; 16];
        if jail::random::fill(&mut b).is_err() {
            // No entropy source: unique enough for telling snapshots apart.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            b = (t ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
        }
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FormatError + '_ {
    move |source| FormatError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `state` to `path` (through `path.tmp`, synced, then renamed).
pub fn write_state<T: Serialize>(
    path: &Path,
    state: &T,
    lineage: &Lineage,
) -> Result<(), FormatError> {
    let body = serde_json::to_vec(state).map_err(FormatError::Encode)?;
    let header = Header {
        format_version: FORMAT_VERSION,
        vessel_version: env!("CARGO_PKG_VERSION").to_string(),
        body_len: body.len() as u64,
        body_crc32: crc32fast::hash(&body),
        lineage: lineage.clone(),
    };
    let header = serde_json::to_string(&header).map_err(FormatError::Encode)?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(format!("{MAGIC}\n{header}\n").as_bytes())
        .and_then(|()| f.write_all(&body))
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads a state file written by [`write_state`], checking magic, version and checksum.
#[cfg(test)]
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    read_state_lineage(path).map(|(t, _)| t)
}

/// [`read_state`], with the snapshot's place in its chain.
pub fn read_state_lineage<T: DeserializeOwned>(path: &Path) -> Result<(T, Lineage), FormatError> {
    let f = File::open(path).map_err(io_err(path))?;
    read_state_from(f, path)
}

/// [`read_state_lineage`] on any reader (`path` names it in errors): the state file parser,
/// which the fuzz target drives from memory.
#[doc(hidden)]
pub fn read_state_from<T: DeserializeOwned>(
    f: impl Read,
    path: &Path,
) -> Result<(T, Lineage), FormatError> {
    let name = || path.display().to_string();
    let mut r = BufReader::new(f);
    let mut line = String::new();
    let mut read_line = |line: &mut String| -> Result<(), FormatError> {
        line.clear();
        (&mut r)
            .take(MAX_HEADER as u64)
            .read_line(line)
            .map_err(io_err(path))?;
        Ok(())
    };
    read_line(&mut line)?;
    if line.trim_end() != MAGIC {
        return Err(FormatError::NotASnapshot(name()));
    }
    read_line(&mut line)?;
    let header: Header =
        serde_json::from_str(line.trim_end()).map_err(|e| FormatError::Corrupt {
            path: name(),
            why: format!("header: {e}"),
        })?;
    if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&header.format_version) {
        return Err(FormatError::Version {
            path: name(),
            found: header.format_version,
            writer: header.vessel_version,
            ours: env!("CARGO_PKG_VERSION"),
        });
    }
    let mut body = Vec::new();
    r.take(header.body_len.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(io_err(path))?;
    if body.len() as u64 != header.body_len {
        return Err(FormatError::Corrupt {
            path: name(),
            why: format!(
                "{} bytes of state where the header says {}",
                body.len(),
                header.body_len
            ),
        });
    }
    if crc32fast::hash(&body) != header.body_crc32 {
        return Err(FormatError::Corrupt {
            path: name(),
            why: "checksum mismatch".to_string(),
        });
    }
    let state = serde_json::from_slice(&body).map_err(|e| FormatError::Corrupt {
        path: name(),
        why: e.to_string(),
    })?;
    Ok((state, header.lineage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u32,
        b: Vec<u8>,
    }

    fn sample() -> S {
        S {
            a: 7,
            b: (0..=255).collect(),
        }
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        let lineage = Lineage {
            id: Lineage::new_id(),
            parent: Some(SnapshotRef {
                dir: "/snaps/a".into(),
                id: Lineage::new_id(),
            }),
        };
        write_state(&p, &sample(), &lineage).unwrap();
        let (s, l) = read_state_lineage::<S>(&p).unwrap();
        assert_eq!(s, sample());
        assert_eq!(l, lineage);
        assert_eq!(l.id.len(), 32);
        assert_ne!(l.id, l.parent.unwrap().id);
        assert!(!p.with_extension("tmp").exists());
        // A version 2 file (a machine before specs) is refused by its version.
        let text = String::from_utf8(std::fs::read(&p).unwrap()).unwrap();
        let mut lines: Vec<&str> = text.splitn(3, '\n').collect();
        let body = lines[2];
        let v2 = format!(
            "{{\"format_version\":2,\"vessel_version\":\"0.1.0\",\"body_len\":{},\"body_crc32\":{}}}",
            body.len(),
            crc32fast::hash(body.as_bytes())
        );
        lines[1] = &v2;
        std::fs::write(&p, lines.join("\n")).unwrap();
        let e = read_state_lineage::<S>(&p).unwrap_err();
        assert!(matches!(e, FormatError::Version { found: 2, .. }), "{e}");
    }

    #[test]
    fn every_corruption_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        write_state(&p, &sample(), &Lineage::default()).unwrap();
        let good = std::fs::read(&p).unwrap();
        let header_end = good.iter().rposition(|&c| c == b'\n').unwrap();
        // Flip each byte of the body in turn: the checksum (or the parser) refuses all.
        for i in (header_end + 1..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            std::fs::write(&p, &bad).unwrap();
            assert!(read_state::<S>(&p).is_err(), "byte {i}");
        }
        // Truncated anywhere.
        for n in [0, 5, 16, header_end, good.len() - 1] {
            std::fs::write(&p, &good[..n]).unwrap();
            assert!(read_state::<S>(&p).is_err(), "truncated to {n}");
        }
        // Not ours.
        std::fs::write(&p, b"hello\n").unwrap();
        assert!(matches!(
            read_state::<S>(&p),
            Err(FormatError::NotASnapshot(_))
        ));
    }

    #[test]
    fn other_versions_get_a_version_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        write_state(&p, &sample(), &Lineage::default()).unwrap();
        let text = String::from_utf8(std::fs::read(&p).unwrap()).unwrap();
        let text = text.replacen("\"format_version\":3", "\"format_version\":99", 1);
        std::fs::write(&p, text).unwrap();
        let e = read_state::<S>(&p).unwrap_err();
        assert!(matches!(e, FormatError::Version { found: 99, .. }), "{e}");
        assert!(e.to_string().contains("reads version 3 only"), "{e}");
    }
}
