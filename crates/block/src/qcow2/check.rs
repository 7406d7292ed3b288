//! `check`: refcount and COPIED-flag consistency, with repair (like `qemu-img check -r all`),
//! and the metadata overlap check that guards every read-write open ([`guard_write`]).
//!
//! One walk does both: it follows the header, the active and every snapshot's L1 table, all
//! L2 tables, the refcount table and blocks and the snapshot table, counts the references
//! to each host cluster and records what each cluster is used for. A cluster used for two
//! different things (the refcount table as an L2 table, an L2 table as a data cluster...),
//! a reference outside the file, an unaligned table, or a refcount lower than the
//! references (a cluster the allocator could hand out again, and so overwrite) makes the
//! image unsafe to write.

use super::meta::{decode_l2, L2Entry, MetaError, Qcow2Meta, COPIED, OFFSET_MASK};
use super::snapshot::read_snapshots;
use serde::Serialize;
use std::path::Path;

/// What a host cluster is used for (one bit each; a cluster with two bits set overlaps).
mod role {
    pub const HEADER: u8 = 1 << 0;
    pub const L1: u8 = 1 << 1;
    pub const L2: u8 = 1 << 2;
    pub const DATA: u8 = 1 << 3;
    pub const REFTABLE: u8 = 1 << 4;
    pub const REFBLOCK: u8 = 1 << 5;
    pub const SNAPTABLE: u8 = 1 << 6;
    pub const SNAP_L1: u8 = 1 << 7;

    pub fn names(bits: u8) -> Vec<&'static str> {
        const NAMES: [&str; 8] = [
            "the header",
            "the active L1 table",
            "an L2 table",
            "a data cluster",
            "the refcount table",
            "a refcount block",
            "the snapshot table",
            "a snapshot's L1 table",
        ];
        (0..8)
            .filter(|b| bits & (1 << b) != 0)
            .map(|b| NAMES[b])
            .collect()
    }
}

/// Kinds of problems that make writing to an image unsafe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HazardKind {
    /// A cluster is used for two different structures.
    Overlap,
    /// A structure or data cluster lies (partly) outside the file.
    OutsideFile,
    /// A table or data cluster offset is not cluster aligned.
    Unaligned,
    /// A cluster's refcount is lower than its references (it could be allocated again).
    RefcountTooLow,
}

/// One problem that makes writing to an image unsafe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hazard {
    pub kind: HazardKind,
    pub what: String,
}

impl HazardKind {
    /// Problems of the structure itself, that fixing refcounts cannot repair.
    pub fn structural(self) -> bool {
        self != HazardKind::RefcountTooLow
    }
}

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
    /// The problems that make writing unsafe (a subset of the corruptions).
    #[serde(skip)]
    pub hazards: Vec<Hazard>,
    /// The header's corrupt bit is set (`qemu-img check` does not count it as an error).
    #[serde(skip)]
    pub marked_corrupt: bool,
}

impl CheckReport {
    /// Count a corruption that makes writing unsafe.
    fn hazard(&mut self, kind: HazardKind, what: String) {
        self.corruptions += 1;
        self.messages.push(format!("ERROR: {what}"));
        self.hazards.push(Hazard { kind, what });
    }

    /// Exit code like `qemu-img check`: 0 clean, 1 check errors, 2 corruptions, 3 leaks
    /// only.
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
    /// What each host cluster is used for ([`role`] bits).
    roles: Vec<u8>,
    /// Copied-flag fixes needed on active tables: (table offset, index, new raw entry).
    l1_fixes: Vec<(usize, u64)>,
    l2_fixes: Vec<(u64, usize, u64)>,
    allocated: u64,
}

impl Walk {
    fn new() -> Walk {
        Walk {
            refs: Vec::new(),
            roles: Vec::new(),
            l1_fixes: Vec::new(),
            l2_fixes: Vec::new(),
            allocated: 0,
        }
    }
}

/// Count a reference from a structure of kind `role` to the clusters of `[start, start+len)`.
fn inc(m: &Qcow2Meta, w: &mut Walk, start: u64, len: u64, role: u8, r: &mut CheckReport) {
    if len == 0 {
        return;
    }
    let cs = m.cs();
    let first = start / cs;
    let last = start.saturating_add(len - 1) / cs;
    let file_clusters = m.file_len.div_ceil(cs);
    if last >= file_clusters {
        let what = role::names(role).join(", ");
        r.hazard(
            HazardKind::OutsideFile,
            format!(
                "{what} at offset {start:#x} (+{len:#x}) is beyond the end of the file ({:#x})",
                m.file_len
            ),
        );
    }
    for c in first..=last.min(file_clusters.saturating_sub(1)) {
        let i = c as usize;
        if w.refs.len() <= i {
            w.refs.resize(i + 1, 0);
            w.roles.resize(i + 1, 0);
        }
        w.refs[i] += 1;
        w.roles[i] |= role;
    }
}

/// Whether `[off, off+len)` can be read from the file.
fn inside(m: &Qcow2Meta, off: u64, len: u64) -> bool {
    off.checked_add(len).is_some_and(|e| e <= m.file_len)
}

/// Walk one L1 table, counting references. For the active table, `disk_rc` is used to
/// verify COPIED flags. Tables outside the file are reported, not read.
fn walk_l1(
    m: &Qcow2Meta,
    l1_off: u64,
    l1_size: u32,
    active: Option<&[u64]>,
    w: &mut Walk,
    r: &mut CheckReport,
) -> Result<(), MetaError> {
    let cs = m.cs();
    let l1_role = if active.is_some() {
        role::L1
    } else {
        role::SNAP_L1
    };
    let l1_bytes = u64::from(l1_size) * 8;
    if l1_off & (cs - 1) != 0 {
        r.hazard(
            HazardKind::Unaligned,
            format!("L1 table offset {l1_off:#x} is not cluster aligned"),
        );
        return Ok(());
    }
    inc(m, w, l1_off, l1_bytes, l1_role, r);
    if !inside(m, l1_off, l1_bytes) {
        return Ok(());
    }
    let l1 = m.read_table(l1_off, u64::from(l1_size))?;
    for (i, &e) in l1.iter().enumerate() {
        let l2_off = e & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        if l2_off & (cs - 1) != 0 {
            r.hazard(
                HazardKind::Unaligned,
                format!("L2 table offset {l2_off:#x} (L1 entry {i} at {l1_off:#x}) is not cluster aligned"),
            );
            continue;
        }
        let fits = inside(m, l2_off, cs);
        if fits {
            inc(m, w, l2_off, cs, role::L2, r);
        } else {
            r.hazard(
                HazardKind::OutsideFile,
                format!(
                    "L2 table at {l2_off:#x} (L1 entry {i} at {:#x}) is beyond the end of the file ({:#x})",
                    l1_off + i as u64 * 8,
                    m.file_len
                ),
            );
        }
        if let Some(rc) = active {
            let count = rc.get((l2_off / cs) as usize).copied().unwrap_or(0);
            let want = count == 1;
            if (e & COPIED != 0) != want {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={count}"
                ));
                let fixed = if want { e | COPIED } else { e & !COPIED };
                w.l1_fixes.push((i, fixed));
            }
        }
        if !fits {
            continue;
        }
        let l2 = m.read_l2(l2_off)?;
        for (j, &raw) in l2.iter().enumerate() {
            let (host, copied) = match decode_l2(raw, m.header.cluster_bits) {
                L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => continue,
                L2Entry::Compressed { start, len } => {
                    inc(m, w, start, len, role::DATA, r);
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
                r.hazard(
                    HazardKind::Unaligned,
                    format!("unaligned data cluster offset {host:#x} in L2 table at {l2_off:#x} entry {j}"),
                );
                continue;
            }
            w.allocated += u64::from(active.is_some());
            inc(m, w, host, cs, role::DATA, r);
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

/// Report every cluster used for more than one kind of structure.
fn find_overlaps(w: &Walk, cs: u64, r: &mut CheckReport) {
    for (c, &bits) in w.roles.iter().enumerate() {
        if bits.count_ones() > 1 {
            let off = c as u64 * cs;
            r.hazard(
                HazardKind::Overlap,
                format!(
                    "cluster {c} (offset {off:#x}) is used as {}",
                    role::names(bits).join(" and as ")
                ),
            );
        }
    }
}

/// Count all references to host clusters.
fn walk(m: &mut Qcow2Meta, r: &mut CheckReport) -> Result<(Walk, Vec<u64>), MetaError> {
    let disk_rc = m.refcounts()?;
    let cs = m.cs();
    let mut w = Walk::new();
    inc(m, &mut w, 0, cs, role::HEADER, r);
    let h = m.header.clone();
    walk_l1(m, h.l1_table_offset, h.l1_size, Some(&disk_rc), &mut w, r)?;
    let (snaps, table_len) = read_snapshots(m)?;
    if h.nb_snapshots > 0 {
        inc(m, &mut w, h.snapshots_offset, table_len, role::SNAPTABLE, r);
    }
    for s in &snaps {
        walk_l1(m, s.l1_table_offset, s.l1_size, None, &mut w, r)?;
    }
    inc(
        m,
        &mut w,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        role::REFTABLE,
        r,
    );
    for &rb in &m.reftable.clone() {
        if rb != 0 {
            inc(m, &mut w, rb, cs, role::REFBLOCK, r);
        }
    }
    find_overlaps(&w, cs, r);
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
            r.hazard(
                HazardKind::RefcountTooLow,
                format!("cluster {c} (offset {off:#x}) refcount={have} reference={want}"),
            );
        } else {
            r.leaks += 1;
            r.messages.push(format!(
                "Leaked cluster {c} (offset {off:#x}) refcount={have} reference={want}"
            ));
        }
    }
}

/// A fresh report for `m`.
fn report(m: &Qcow2Meta) -> CheckReport {
    CheckReport {
        filename: m.path.display().to_string(),
        format: "qcow2".into(),
        marked_corrupt: m.header.corrupt(),
        ..Default::default()
    }
}

/// Check the image; with `repair`, fix refcounts (leaks and refcount corruption) and
/// COPIED flags, and clear the dirty bit and, once no corruption is left, the corrupt bit.
///
/// Structural problems (overlapping metadata, references outside the file, unaligned
/// tables) are not repaired: new refcounts computed from such a walk would be as wrong as
/// the old ones, so the image is left untouched and the report says so.
pub fn check(m: &mut Qcow2Meta, repair: bool) -> Result<CheckReport, MetaError> {
    let mut r = report(m);
    let (w, disk) = walk(m, &mut r)?;
    compare(&w.refs, &disk, &mut r, m.cs());
    r.allocated_clusters = w.allocated;
    r.total_clusters = m.header.size.div_ceil(m.cs());
    r.image_end_offset = m.end_cluster(&w.refs) * m.cs();
    let clean = r.corruptions == 0 && r.leaks == 0;
    if !repair || (clean && !m.header.dirty() && !m.header.corrupt()) {
        return Ok(r);
    }
    if r.hazards.iter().any(|h| h.kind.structural()) {
        r.messages.push(
            "ERROR: overlapping or misplaced metadata cannot be repaired by vessel (no change \
             was made); `qemu-img check -r all` rebuilds the refcount structure"
                .into(),
        );
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
    let mut after = report(m);
    let (w2, disk2) = walk(m, &mut after)?;
    compare(&w2.refs, &disk2, &mut after, m.cs());
    if after.corruptions == 0 && m.header.corrupt() {
        // As QEMU does: a repaired image is no longer corrupt.
        m.set_corrupt(false)?;
        m.sync()?;
        after.marked_corrupt = false;
    }
    after.allocated_clusters = w2.allocated;
    after.total_clusters = before.total_clusters;
    after.image_end_offset = m.end_cluster(&w2.refs) * m.cs();
    after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
    after.leaks_fixed = before.leaks.saturating_sub(after.leaks);
    after.messages = before.messages;
    Ok(after)
}

/// Validate a qcow2 image before it is opened for writing (by the VMM for a disk, or by an
/// image operation); the caller holds the image's write lock.
///
/// Refuses an image whose corrupt bit is set, and an image whose metadata overlaps, points
/// outside the file, is unaligned, or has clusters whose refcount is lower than their
/// references (an allocator could hand such a cluster out again, and so overwrite the
/// refcount table with guest data). Such an image gets the corrupt bit (as QEMU sets it
/// when it catches an invalid metadata write), so that QEMU refuses it read-write too; it
/// still opens read-only. A dirty image (lazy refcounts, unclean shutdown) has stale
/// refcounts by design: only its structure is checked here, the caller repairs it.
///
/// Cost: one [`check`] walk without repair: it reads the L1 tables, every L2 table and the
/// refcount blocks (for 64 KiB clusters 1/8192 of the allocated data plus 1/32768 of the
/// file) and keeps about 25 bytes of memory per host cluster while it runs (references,
/// role, the on-disk refcounts and their copy).
pub fn guard_write(path: &Path) -> Result<(), MetaError> {
    let mut m = Qcow2Meta::open(path, false)?;
    if m.header.corrupt() {
        return Err(MetaError::MarkedCorrupt {
            path: path.to_path_buf(),
        });
    }
    let dirty = m.header.dirty();
    let r = check(&mut m, false)?;
    let bad: Vec<&Hazard> = r
        .hazards
        .iter()
        .filter(|h| !dirty || h.kind.structural())
        .collect();
    let Some(first) = bad.first() else {
        return Ok(());
    };
    let marked = m.header.version >= 3;
    drop(m);
    if marked {
        let mut w = Qcow2Meta::open_for_repair(path)?;
        w.set_corrupt(true)?;
        w.sync()?;
    }
    let more = match bad.len() {
        1 => String::new(),
        n => format!(" (and {} more problems)", n - 1),
    };
    Err(MetaError::CorruptFound {
        path: path.to_path_buf(),
        what: format!("{}{more}", first.what),
        marked,
    })
}

/// Set COPIED flags of the active L1 and L2 tables from the on-disk refcounts.
pub fn fix_copied_flags(m: &mut Qcow2Meta) -> Result<(), MetaError> {
    let rc = m.refcounts()?;
    let mut r = CheckReport::default();
    let mut w = Walk::new();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{create, CreateOptions};
    use std::os::unix::fs::FileExt;

    /// A 16 MiB qcow2 image with data at 0 and 8 MiB.
    fn image(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("t.qcow2");
        create(
            &p,
            &CreateOptions {
                size: Some(16 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let d = crate::open(&p, crate::OpenOptions::default()).unwrap();
        d.write_at(&[1; 65536], 0).unwrap();
        d.write_at(&[2; 65536], 8 << 20).unwrap();
        d.flush().unwrap();
        p
    }

    fn be64(p: &Path, off: u64) -> u64 {
        let mut b = [0u8; 8];
        std::fs::File::open(p)
            .unwrap()
            .read_exact_at(&mut b, off)
            .unwrap();
        u64::from_be_bytes(b)
    }

    fn poke(p: &Path, off: u64, v: u64) {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(&v.to_be_bytes(), off).unwrap();
    }

    fn kinds(p: &Path) -> Vec<HazardKind> {
        let mut m = Qcow2Meta::open(p, false).unwrap();
        check(&mut m, false)
            .unwrap()
            .hazards
            .iter()
            .map(|h| h.kind)
            .collect()
    }

    #[test]
    fn clean_image_has_no_hazards_and_passes_the_guard() {
        let d = tempfile::tempdir().unwrap();
        let p = image(d.path());
        assert!(kinds(&p).is_empty());
        guard_write(&p).unwrap();
        assert_eq!(be64(&p, 72) & 2, 0);
    }

    #[test]
    fn l1_entry_at_the_refcount_table_is_an_overlap() {
        let d = tempfile::tempdir().unwrap();
        let p = image(d.path());
        let l1 = be64(&p, 40);
        poke(&p, l1, COPIED | be64(&p, 48));
        assert!(kinds(&p).contains(&HazardKind::Overlap));
        let e = guard_write(&p).unwrap_err().to_string();
        assert!(
            e.contains("cannot be opened read/write") && e.contains("the refcount table"),
            "{e}"
        );
        assert_eq!(be64(&p, 72) & 2, 2, "corrupt bit set");
        let e = guard_write(&p).unwrap_err();
        assert!(matches!(e, MetaError::MarkedCorrupt { .. }), "{e}");
    }

    #[test]
    fn data_cluster_on_an_l2_table_is_an_overlap() {
        let d = tempfile::tempdir().unwrap();
        let p = image(d.path());
        let l2 = be64(&p, be64(&p, 40)) & OFFSET_MASK;
        // L2 entry 1 points at the L2 table itself.
        poke(&p, l2 + 8, COPIED | l2);
        let mut m = Qcow2Meta::open(&p, false).unwrap();
        let r = check(&mut m, false).unwrap();
        assert!(r.hazards.iter().any(|h| h.kind == HazardKind::Overlap
            && h.what.contains("an L2 table and as a data cluster")));
        assert_eq!(r.exit_code(), 2);
    }

    #[test]
    fn l2_past_eof_and_unaligned_are_reported_not_failed() {
        let d = tempfile::tempdir().unwrap();
        let p = image(d.path());
        let l1 = be64(&p, 40);
        poke(&p, l1, COPIED | (1 << 40));
        assert!(kinds(&p).contains(&HazardKind::OutsideFile));
        poke(&p, l1, COPIED | 0x10200);
        assert!(kinds(&p).contains(&HazardKind::Unaligned));
    }

    #[test]
    fn zero_refcount_of_a_referenced_cluster_is_a_hazard_unless_dirty() {
        let d = tempfile::tempdir().unwrap();
        let p = image(d.path());
        // Refcount of the L2 table's cluster to 0: the allocator could hand it out again.
        let l2 = be64(&p, be64(&p, 40)) & OFFSET_MASK;
        let rb = be64(&p, be64(&p, 48));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&0u16.to_be_bytes(), rb + (l2 >> 16) * 2)
            .unwrap();
        assert!(kinds(&p).contains(&HazardKind::RefcountTooLow));
        // Dirty (lazy refcounts after a crash): stale refcounts are expected, the open
        // repairs them.
        poke(&p, 72, be64(&p, 72) | 1);
        guard_write(&p).unwrap();
        let mut m = Qcow2Meta::open(&p, true).unwrap();
        let r = check(&mut m, true).unwrap();
        assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        // Clean again, refcount 0 on a referenced cluster: refused.
        drop(m);
        f.write_all_at(&0u16.to_be_bytes(), rb + (l2 >> 16) * 2)
            .unwrap();
        assert!(guard_write(&p).is_err());
        assert_eq!(be64(&p, 72) & 2, 2);
    }

    #[test]
    fn v2_images_are_refused_without_a_bit_to_set() {
        let d = tempfile::tempdir().unwrap();
        let p = image(d.path());
        // Make it v2 (the header's v3 fields are then ignored).
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&2u32.to_be_bytes(), 4).unwrap();
        let l1 = be64(&p, 40);
        poke(&p, l1, COPIED | be64(&p, 48));
        let before = std::fs::read(&p).unwrap();
        let e = guard_write(&p).unwrap_err();
        assert!(
            matches!(e, MetaError::CorruptFound { marked: false, .. }),
            "{e}"
        );
        assert!(
            std::fs::read(&p).unwrap() == before,
            "a v2 image is not written"
        );
    }
}
