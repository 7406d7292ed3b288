//! Internal qcow2 snapshots, on-disk compatible with `qemu-img snapshot`.
//!
//! Operations follow QEMU's order so that a crash in the middle leaves at worst leaked
//! clusters: refcounts are raised before new metadata references them, the header update
//! is the commit point, and refcounts are lowered last.

use super::check::fix_copied_flags;
use super::header::off;
use super::meta::{decode_l2, L2Entry, MetaError, Qcow2Meta, COPIED, OFFSET_MASK};
use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors from snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{path}: snapshot '{name}' not found")]
    NotFound { path: String, name: String },
    #[error("{path}: a snapshot named '{name}' already exists")]
    Exists { path: String, name: String },
    #[error("{path}: internal snapshots need qcow2 v3 or v2 with 16-bit refcounts or wider")]
    RefcountTooNarrow { path: String },
}

/// One snapshot table entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    #[serde(skip)]
    pub l1_table_offset: u64,
    #[serde(skip)]
    pub l1_size: u32,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
    /// Unknown extra data past the fields we know, kept verbatim.
    #[serde(skip)]
    pub extra_rest: Vec<u8>,
}

fn rd<const N: usize>(b: &[u8], o: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[o..o + N]);
    a
}

/// Read the snapshot table. Returns the snapshots and the table's byte length.
pub fn read_snapshots(m: &Qcow2Meta) -> Result<(Vec<Snapshot>, u64), MetaError> {
    let n = m.header.nb_snapshots;
    if n == 0 {
        return Ok((Vec::new(), 0));
    }
    let start = m.header.snapshots_offset;
    let mut pos = start;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut fixed = [0u8; 40];
        m.read_at(&mut fixed, pos)
            .map_err(|_| m.corrupt(pos, format!("snapshot table entry {i} past end of file")))?;
        let l1_table_offset = u64::from_be_bytes(rd(&fixed, 0));
        let l1_size = u32::from_be_bytes(rd(&fixed, 8));
        let id_len = u16::from_be_bytes(rd(&fixed, 12)) as usize;
        let name_len = u16::from_be_bytes(rd(&fixed, 14)) as usize;
        let extra_len = u32::from_be_bytes(rd(&fixed, 36)) as usize;
        if extra_len > 1024 {
            return Err(m.corrupt(
                pos + 36,
                format!("snapshot extra data too large ({extra_len})"),
            ));
        }
        let var_len = extra_len + id_len + name_len;
        let mut var = vec![0u8; var_len];
        m.read_at(&mut var, pos + 40)
            .map_err(|_| m.corrupt(pos, format!("snapshot table entry {i} truncated")))?;
        let extra = &var[..extra_len];
        let mut s = Snapshot {
            id: String::from_utf8_lossy(&var[extra_len..extra_len + id_len]).into_owned(),
            name: String::from_utf8_lossy(&var[extra_len + id_len..]).into_owned(),
            l1_table_offset,
            l1_size,
            date_sec: u32::from_be_bytes(rd(&fixed, 16)),
            date_nsec: u32::from_be_bytes(rd(&fixed, 20)),
            vm_clock_nsec: u64::from_be_bytes(rd(&fixed, 24)),
            vm_state_size: u64::from(u32::from_be_bytes(rd(&fixed, 32))),
            disk_size: None,
            icount: None,
            extra_rest: Vec::new(),
        };
        if extra.len() >= 8 {
            s.vm_state_size = u64::from_be_bytes(rd(extra, 0));
        }
        if extra.len() >= 16 {
            s.disk_size = Some(u64::from_be_bytes(rd(extra, 8)));
        }
        if extra.len() >= 24 {
            s.icount = Some(u64::from_be_bytes(rd(extra, 16)));
            s.extra_rest = extra[24..].to_vec();
        }
        let cs = m.cs();
        if !l1_table_offset.is_multiple_of(cs) || l1_table_offset == 0 && l1_size > 0 {
            return Err(m.corrupt(
                pos,
                format!("snapshot '{}' has an invalid L1 table offset", s.name),
            ));
        }
        if u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES {
            return Err(m.corrupt(pos + 8, format!("snapshot '{}' L1 table too large", s.name)));
        }
        pos += (40 + var_len as u64).next_multiple_of(8);
        out.push(s);
    }
    Ok((out, pos - start))
}

fn serialize(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        let mut extra = Vec::new();
        extra.extend_from_slice(&s.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        extra.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        extra.extend_from_slice(&s.extra_rest);
        b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(s.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&extra);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b
}

/// Add `delta` (+1/-1) to the refcount of every cluster an L1 tree references (the L2
/// tables and their data clusters), like QEMU's `update_snapshot_refcount`.
fn adjust_tree(m: &Qcow2Meta, l1: &[u64], rc: &mut Vec<u64>, delta: i64) -> Result<(), MetaError> {
    let cs = m.cs();
    let bump = |rc: &mut Vec<u64>, start: u64, len: u64| {
        for c in start / cs..=(start + len - 1) / cs {
            if rc.len() <= c as usize {
                rc.resize(c as usize + 1, 0);
            }
            let v = &mut rc[c as usize];
            *v = if delta > 0 {
                *v + 1
            } else {
                v.saturating_sub(1)
            };
        }
    };
    for &e in l1 {
        let l2_off = e & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        for &raw in &m.read_l2(l2_off)? {
            match decode_l2(raw, m.header.cluster_bits) {
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    host: Some(host), ..
                } => bump(rc, host, cs),
                L2Entry::Compressed { start, len } => bump(rc, start, len),
                _ => {}
            }
        }
        bump(rc, l2_off, cs);
    }
    Ok(())
}

fn require_refcounts(m: &Qcow2Meta) -> Result<(), SnapshotError> {
    if m.header.refcount_order < 1 {
        return Err(SnapshotError::RefcountTooNarrow {
            path: m.path.display().to_string(),
        });
    }
    Ok(())
}

/// Write a new snapshot table and point the header at it; frees the old table.
fn replace_table(
    m: &mut Qcow2Meta,
    snaps: &[Snapshot],
    rc: &mut Vec<u64>,
) -> Result<(), MetaError> {
    let (_, old_len) = read_snapshots(m)?;
    let old_off = m.header.snapshots_offset;
    let buf = serialize(snaps);
    let cs = m.cs();
    let new_off = if snaps.is_empty() {
        0
    } else {
        let o = m.alloc(rc, (buf.len() as u64).div_ceil(cs));
        m.write_refcounts(rc)?;
        let mut padded = buf;
        padded.resize(padded.len().next_multiple_of(cs as usize), 0);
        m.write_at(&padded, o)?;
        o
    };
    m.sync()?;
    // Commit point: the header now describes the new snapshot list.
    let mut hdr = Vec::with_capacity(12);
    hdr.extend_from_slice(&(snaps.len() as u32).to_be_bytes());
    hdr.extend_from_slice(&new_off.to_be_bytes());
    m.write_at(&hdr, off::NB_SNAPSHOTS)?;
    m.header.nb_snapshots = snaps.len() as u32;
    m.header.snapshots_offset = new_off;
    m.sync()?;
    if old_len > 0 {
        for c in old_off / cs..=(old_off + old_len - 1) / cs {
            rc[c as usize] = rc[c as usize].saturating_sub(1);
        }
    }
    Ok(())
}

/// List the internal snapshots.
pub fn list(m: &Qcow2Meta) -> Result<Vec<Snapshot>, MetaError> {
    Ok(read_snapshots(m)?.0)
}

/// Create an internal snapshot of the current disk state.
pub fn create(m: &mut Qcow2Meta, name: &str) -> Result<(), SnapshotError> {
    require_refcounts(m)?;
    let (mut snaps, _) = read_snapshots(m)?;
    if snaps.iter().any(|s| s.name == name) {
        return Err(SnapshotError::Exists {
            path: m.path.display().to_string(),
            name: name.into(),
        });
    }
    let mut rc = m.refcounts()?;
    let l1 = m.active_l1()?;
    adjust_tree(m, &l1, &mut rc, 1)?;
    // Copy the L1 table (without COPIED flags).
    let snap_l1: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
    let l1_bytes = (snap_l1.len() as u64 * 8).max(1);
    let l1_off = m.alloc(&mut rc, l1_bytes.div_ceil(m.cs()));
    m.write_refcounts(&mut rc)?;
    m.write_table(l1_off, &snap_l1)?;
    let next_id = snaps
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    snaps.push(Snapshot {
        id: next_id.to_string(),
        name: name.into(),
        l1_table_offset: l1_off,
        l1_size: m.header.l1_size,
        date_sec: now.as_secs() as u32,
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: Some(m.header.size),
        icount: Some(u64::MAX),
        extra_rest: Vec::new(),
    });
    m.sync()?;
    replace_table(m, &snaps, &mut rc)?;
    m.write_refcounts(&mut rc)?;
    m.sync()?;
    fix_copied_flags(m)?;
    m.sync()?;
    Ok(())
}

fn find(m: &Qcow2Meta, snaps: &[Snapshot], name: &str) -> Result<usize, SnapshotError> {
    snaps
        .iter()
        .position(|s| s.name == name)
        .or_else(|| snaps.iter().position(|s| s.id == name))
        .ok_or_else(|| SnapshotError::NotFound {
            path: m.path.display().to_string(),
            name: name.into(),
        })
}

/// Delete an internal snapshot (by name, or by id).
pub fn delete(m: &mut Qcow2Meta, name: &str) -> Result<(), SnapshotError> {
    let (mut snaps, _) = read_snapshots(m)?;
    let idx = find(m, &snaps, name)?;
    let s = snaps.remove(idx);
    let mut rc = m.refcounts()?;
    replace_table(m, &snaps, &mut rc)?;
    let l1 = m.read_l1(s.l1_table_offset, s.l1_size)?;
    adjust_tree(m, &l1, &mut rc, -1)?;
    let cs = m.cs();
    let l1_bytes = u64::from(s.l1_size) * 8;
    if l1_bytes > 0 {
        for c in s.l1_table_offset / cs..=(s.l1_table_offset + l1_bytes - 1) / cs {
            rc[c as usize] = rc[c as usize].saturating_sub(1);
        }
    }
    m.write_refcounts(&mut rc)?;
    m.sync()?;
    fix_copied_flags(m)?;
    m.sync()?;
    Ok(())
}

/// Revert the disk to an internal snapshot; the snapshot itself is kept.
pub fn apply(m: &mut Qcow2Meta, name: &str) -> Result<(), SnapshotError> {
    let (snaps, _) = read_snapshots(m)?;
    let s = snaps[find(m, &snaps, name)?].clone();
    let mut rc = m.refcounts()?;
    let snap_l1 = m.read_l1(s.l1_table_offset, s.l1_size)?;
    let old_l1 = m.active_l1()?;
    adjust_tree(m, &snap_l1, &mut rc, 1)?;
    let cs = m.cs();
    let cur_clusters = (u64::from(m.header.l1_size) * 8).div_ceil(cs);
    let new_clusters = (u64::from(s.l1_size) * 8).div_ceil(cs);
    let old_l1_off = m.header.l1_table_offset;
    let relocate = new_clusters > cur_clusters || old_l1_off == 0;
    let l1_off = if relocate {
        m.alloc(&mut rc, new_clusters.max(1))
    } else {
        old_l1_off
    };
    m.write_refcounts(&mut rc)?;
    m.sync()?;
    // New active L1: snapshot entries, COPIED cleared (refcounts are now >= 2), zero padded
    // up to the old table size when written in place.
    let mut new_l1: Vec<u64> = snap_l1.iter().map(|e| e & !COPIED).collect();
    if !relocate {
        new_l1.resize(old_l1.len().max(new_l1.len()), 0);
    }
    m.write_table(l1_off, &new_l1)?;
    m.sync()?;
    let size = s.disk_size.unwrap_or(m.header.size);
    let mut hdr = Vec::with_capacity(24);
    hdr.extend_from_slice(&size.to_be_bytes());
    hdr.extend_from_slice(&0u32.to_be_bytes()); // crypt method
    hdr.extend_from_slice(&s.l1_size.to_be_bytes());
    hdr.extend_from_slice(&l1_off.to_be_bytes());
    m.write_at(&hdr, off::SIZE)?;
    m.header.size = size;
    m.header.l1_size = s.l1_size;
    m.header.l1_table_offset = l1_off;
    m.sync()?;
    adjust_tree(m, &old_l1, &mut rc, -1)?;
    if relocate && old_l1_off != 0 {
        let bytes = (old_l1.len() as u64 * 8).max(1);
        for c in old_l1_off / cs..=(old_l1_off + bytes - 1) / cs {
            rc[c as usize] = rc[c as usize].saturating_sub(1);
        }
    }
    m.write_refcounts(&mut rc)?;
    m.sync()?;
    fix_copied_flags(m)?;
    m.sync()?;
    Ok(())
}
