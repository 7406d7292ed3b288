//! `check`: refcount and COPIED-flag consistency, with repair (like `qemu-img check -r all`).

use super::meta::{decode_l2, L2Entry, MetaError, Qcow2Meta, COPIED, OFFSET_MASK};
use super::snapshot::read_snapshots;
use serde::Serialize;

/// Result of a consistency check. Field names follow `qemu-img check --output=json`.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    /// Human readable problem descriptions.
    #[serde(skip)]
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Exit code like `qemu-img check`: 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Computed state of an image walk.
struct Walk {
    refs: Vec<u64>,
    /// Copied-flag fixes needed on active tables: (table offset, index, new raw entry).
    l1_fixes: Vec<(usize, u64)>,
    l2_fixes: Vec<(u64, usize, u64)>,
    allocated: u64,
}

fn inc(m: &Qcow2Meta, refs: &mut Vec<u64>, start: u64, len: u64, r: &mut CheckReport) {
    if len == 0 {
        return;
    }
    let cs = m.cs();
    let first = start / cs;
    let last = (start + len - 1) / cs;
    let file_clusters = m.file_len.div_ceil(cs);
    for c in first..=last {
        if c >= file_clusters {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR: cluster {c} (offset {:#x}) is beyond end of file",
                c * cs
            ));
            continue;
        }
        if refs.len() <= c as usize {
            refs.resize(c as usize + 1, 0);
        }
        refs[c as usize] += 1;
    }
}

/// Walk one L1 table, counting references. For the active table, `disk_rc` is used to
/// verify COPIED flags.
fn walk_l1(
    m: &Qcow2Meta,
    l1_off: u64,
    l1_size: u32,
    active: Option<&[u64]>,
    w: &mut Walk,
    r: &mut CheckReport,
) -> Result<(), MetaError> {
    let cs = m.cs();
    inc(m, &mut w.refs, l1_off, u64::from(l1_size) * 8, r);
    let l1 = m.read_l1(l1_off, l1_size)?;
    for (i, &e) in l1.iter().enumerate() {
        let l2_off = e & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        inc(m, &mut w.refs, l2_off, cs, r);
        if let Some(rc) = active {
            let want = rc.get((l2_off / cs) as usize).copied().unwrap_or(0) == 1;
            if (e & COPIED != 0) != want {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={}",
                    rc.get((l2_off / cs) as usize).copied().unwrap_or(0)
                ));
                let fixed = if want { e | COPIED } else { e & !COPIED };
                w.l1_fixes.push((i, fixed));
            }
        }
        let l2 = m.read_l2(l2_off)?;
        for (j, &raw) in l2.iter().enumerate() {
            let (host, copied) = match decode_l2(raw, m.header.cluster_bits) {
                L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => continue,
                L2Entry::Compressed { start, len } => {
                    inc(m, &mut w.refs, start, len, r);
                    w.allocated += u64::from(active.is_some());
                    continue;
                }
                L2Entry::Zero {
                    host: Some(h),
                    copied,
                } => (h, copied),
                L2Entry::Normal { host, copied } => (host, copied),
            };
            if host & (cs - 1) != 0 {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR: unaligned data cluster offset {host:#x} in L2 table at {l2_off:#x} entry {j}"
                ));
                continue;
            }
            w.allocated += u64::from(active.is_some());
            inc(m, &mut w.refs, host, cs, r);
            if let Some(rc) = active {
                let count = rc.get((host / cs) as usize).copied().unwrap_or(0);
                if copied != (count == 1) {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={count}"
                    ));
                    let fixed = if count == 1 {
                        raw | COPIED
                    } else {
                        raw & !COPIED
                    };
                    w.l2_fixes.push((l2_off, j, fixed));
                }
            }
        }
    }
    Ok(())
}

/// Count all references to host clusters.
fn walk(m: &mut Qcow2Meta, r: &mut CheckReport) -> Result<(Walk, Vec<u64>), MetaError> {
    let disk_rc = m.refcounts()?;
    let cs = m.cs();
    let mut w = Walk {
        refs: Vec::new(),
        l1_fixes: Vec::new(),
        l2_fixes: Vec::new(),
        allocated: 0,
    };
    inc(m, &mut w.refs, 0, cs, r); // header
    let h = m.header.clone();
    walk_l1(m, h.l1_table_offset, h.l1_size, Some(&disk_rc), &mut w, r)?;
    let (snaps, table_len) = read_snapshots(m)?;
    if h.nb_snapshots > 0 {
        inc(m, &mut w.refs, h.snapshots_offset, table_len, r);
    }
    for s in &snaps {
        walk_l1(m, s.l1_table_offset, s.l1_size, None, &mut w, r)?;
    }
    inc(
        m,
        &mut w.refs,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        r,
    );
    for &rb in &m.reftable.clone() {
        if rb != 0 {
            inc(m, &mut w.refs, rb, cs, r);
        }
    }
    Ok((w, disk_rc))
}

/// Compare computed references with on-disk refcounts.
fn compare(refs: &[u64], disk: &[u64], r: &mut CheckReport, cs: u64) {
    let n = refs.len().max(disk.len());
    for c in 0..n {
        let want = refs.get(c).copied().unwrap_or(0);
        let have = disk.get(c).copied().unwrap_or(0);
        if want == have {
            continue;
        }
        let off = c as u64 * cs;
        if have < want {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR cluster {c} (offset {off:#x}) refcount={have} reference={want}"
            ));
        } else {
            r.leaks += 1;
            r.messages.push(format!(
                "Leaked cluster {c} (offset {off:#x}) refcount={have} reference={want}"
            ));
        }
    }
}

/// Check the image; with `repair`, fix refcounts (leaks and refcount corruption) and
/// COPIED flags, and clear the dirty bit.
pub fn check(m: &mut Qcow2Meta, repair: bool) -> Result<CheckReport, MetaError> {
    let mut r = CheckReport {
        filename: m.path.display().to_string(),
        format: "qcow2".into(),
        ..Default::default()
    };
    let (w, disk) = walk(m, &mut r)?;
    compare(&w.refs, &disk, &mut r, m.cs());
    r.allocated_clusters = w.allocated;
    r.total_clusters = m.header.size.div_ceil(m.cs());
    r.image_end_offset = m.end_cluster(&w.refs) * m.cs();
    if !repair || (r.corruptions == 0 && r.leaks == 0 && !m.header.dirty()) {
        return Ok(r);
    }
    let before = r.clone();
    // Repair: refcounts first, then flags computed from the new refcounts.
    let mut refs = w.refs;
    m.write_refcounts(&mut refs)?;
    m.sync()?;
    fix_copied_flags(m)?;
    m.sync()?;
    m.set_dirty(false)?;
    m.sync()?;
    let mut after = CheckReport {
        filename: r.filename.clone(),
        format: "qcow2".into(),
        ..Default::default()
    };
    let (w2, disk2) = walk(m, &mut after)?;
    compare(&w2.refs, &disk2, &mut after, m.cs());
    after.allocated_clusters = w2.allocated;
    after.total_clusters = before.total_clusters;
    after.image_end_offset = m.end_cluster(&w2.refs) * m.cs();
    after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
    after.leaks_fixed = before.leaks.saturating_sub(after.leaks);
    after.messages = before.messages;
    Ok(after)
}

/// Set COPIED flags of the active L1 and L2 tables from the on-disk refcounts.
pub fn fix_copied_flags(m: &mut Qcow2Meta) -> Result<(), MetaError> {
    let rc = m.refcounts()?;
    let mut r = CheckReport::default();
    let mut w = Walk {
        refs: Vec::new(),
        l1_fixes: Vec::new(),
        l2_fixes: Vec::new(),
        allocated: 0,
    };
    let h = m.header.clone();
    walk_l1(m, h.l1_table_offset, h.l1_size, Some(&rc), &mut w, &mut r)?;
    for (l2_off, j, raw) in w.l2_fixes {
        m.write_at(&raw.to_be_bytes(), l2_off + j as u64 * 8)?;
    }
    for (i, raw) in w.l1_fixes {
        m.write_at(&raw.to_be_bytes(), h.l1_table_offset + i as u64 * 8)?;
    }
    Ok(())
}
