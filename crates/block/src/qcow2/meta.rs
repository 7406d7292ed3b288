//! Offline qcow2 metadata access: L1/L2 tables, refcounts and cluster allocation.
//!
//! This is used for everything imago does not do itself: `info`, `check`/repair, internal
//! snapshots and header rewrites. It is only used while the image is not opened through
//! imago (callers hold the image lock).

use super::header::{off, Header, HeaderError};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Mask of the host offset bits in L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "COPIED" flag: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Compressed cluster flag (L2).
pub const COMPRESSED: u64 = 1 << 62;
/// Zero flag (L2, standard clusters).
pub const ZERO: u64 = 1;

/// Errors from qcow2 metadata handling. Every message names the file and, for corruption,
/// the byte offset of the bad structure.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid qcow2 header: {source}")]
    Header { path: PathBuf, source: HeaderError },
    #[error("{path}: corrupt qcow2 image: {what} (at offset {offset:#x})")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{path}: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error(
        "{path}: qcow2: Image is corrupt; cannot be opened read/write (the header's corrupt bit is set; `vessel image check` shows why, `--repair` or `qemu-img check -r all` may fix it)"
    )]
    MarkedCorrupt { path: PathBuf },
    #[error(
        "{path}: qcow2: Image is corrupt; cannot be opened read/write: {what}{}; it still opens read-only, `vessel image check` lists the problems",
        if *.marked { "; the image is now marked corrupt" } else { "" }
    )]
    CorruptFound {
        path: PathBuf,
        what: String,
        /// The corrupt bit was set (qcow2 v3; v2 images have no feature bits).
        marked: bool,
    },
}

/// A decoded L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing file (or zero).
    Unallocated,
    /// Reads as zero; may keep a preallocated host cluster.
    Zero { host: Option<u64>, copied: bool },
    /// Normal data cluster.
    Normal { host: u64, copied: bool },
    /// Compressed data: `start` is the first byte, `len` the number of bytes spanned (whole
    /// 512-byte sectors).
    Compressed { start: u64, len: u64 },
}

/// Decode a raw L2 entry.
pub fn decode_l2(raw: u64, cluster_bits: u32) -> L2Entry {
    if raw & COMPRESSED != 0 {
        let shift = 62 - (cluster_bits - 8);
        let offset = raw & ((1u64 << shift) - 1);
        let mask = (1u64 << (cluster_bits - 8)) - 1;
        let sectors = ((raw >> shift) & mask) + 1;
        return L2Entry::Compressed {
            start: offset & !511,
            len: sectors * 512,
        };
    }
    let host = raw & OFFSET_MASK;
    let copied = raw & COPIED != 0;
    if raw & ZERO != 0 {
        return L2Entry::Zero {
            host: (host != 0).then_some(host),
            copied,
        };
    }
    if host == 0 {
        L2Entry::Unallocated
    } else {
        L2Entry::Normal { host, copied }
    }
}

/// Offline metadata handle for one qcow2 file.
pub struct Qcow2Meta {
    pub path: PathBuf,
    pub file: File,
    pub header: Header,
    pub file_len: u64,
    /// Refcount table entries (host offsets of refcount blocks; 0 = none).
    pub reftable: Vec<u64>,
    /// Refcounts as currently on disk, indexed by host cluster.
    disk_rc: Vec<u64>,
}

impl Qcow2Meta {
    /// Open and validate the header and refcount structures. `writable` opens the file
    /// read-write (for snapshot operations and header rewrites); an image whose header has
    /// the corrupt bit set is refused then (see [`Qcow2Meta::open_for_repair`]).
    pub fn open(path: &Path, writable: bool) -> Result<Self, MetaError> {
        let m = Self::open_inner(path, writable)?;
        if writable && m.header.corrupt() {
            return Err(MetaError::MarkedCorrupt {
                path: path.to_path_buf(),
            });
        }
        Ok(m)
    }

    /// Open read-write even if the image is marked corrupt: for repair (`check --repair`)
    /// and for setting the corrupt bit.
    pub fn open_for_repair(path: &Path) -> Result<Self, MetaError> {
        Self::open_inner(path, true)
    }

    fn open_inner(path: &Path, writable: bool) -> Result<Self, MetaError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let header = Header::read(&file, file_len).map_err(|source| MetaError::Header {
            path: path.to_path_buf(),
            source,
        })?;
        let mut m = Qcow2Meta {
            path: path.to_path_buf(),
            file,
            header,
            file_len,
            reftable: Vec::new(),
            disk_rc: Vec::new(),
        };
        m.load_reftable()?;
        Ok(m)
    }

    pub fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    pub fn corrupt(&self, offset: u64, what: impl Into<String>) -> MetaError {
        MetaError::Corrupt {
            path: self.path.clone(),
            offset,
            what: what.into(),
        }
    }

    pub fn io(&self, e: std::io::Error) -> MetaError {
        io_err(&self.path, e)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), MetaError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.file_len)
        {
            return Err(self.corrupt(
                offset,
                format!("read of {} bytes past end of file", buf.len()),
            ));
        }
        self.file.read_exact_at(buf, offset).map_err(|e| self.io(e))
    }

    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), MetaError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io_err(&self.path, e))?;
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Read a table of big-endian u64 entries.
    pub fn read_table(&self, offset: u64, entries: u64) -> Result<Vec<u64>, MetaError> {
        let mut buf = vec![0u8; (entries * 8) as usize];
        self.read_at(&mut buf, offset)?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Write a table of big-endian u64 entries.
    pub fn write_table(&mut self, offset: u64, table: &[u64]) -> Result<(), MetaError> {
        let buf: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_at(&buf, offset)
    }

    fn load_reftable(&mut self) -> Result<(), MetaError> {
        let h = &self.header;
        let entries = u64::from(h.refcount_table_clusters) * h.cluster_size() / 8;
        let rt_off = h.refcount_table_offset;
        let rt = self.read_table(rt_off, entries)?;
        let cs = self.cs();
        for (i, &e) in rt.iter().enumerate() {
            let ent_off = rt_off + i as u64 * 8;
            if e & (cs - 1) != 0 {
                return Err(
                    self.corrupt(ent_off, format!("refcount block offset {e:#x} unaligned"))
                );
            }
            if e != 0 && e + cs > self.file_len.next_multiple_of(cs) {
                return Err(self.corrupt(
                    ent_off,
                    format!("refcount block at {e:#x} is past end of file"),
                ));
            }
            if e == 0 && i == 0 {
                return Err(self.corrupt(ent_off, "first refcount block missing"));
            }
        }
        self.reftable = rt;
        Ok(())
    }

    /// Entries per refcount block.
    pub fn rb_entries(&self) -> u64 {
        self.cs() * 8 / u64::from(self.header.refcount_bits())
    }

    /// Read all refcounts from disk (cached after the first call).
    pub fn refcounts(&mut self) -> Result<Vec<u64>, MetaError> {
        if self.disk_rc.is_empty() {
            let rbe = self.rb_entries();
            // Only as far as refcount blocks exist (the table is mostly empty).
            let blocks = self
                .reftable
                .iter()
                .rposition(|&e| e != 0)
                .map_or(0, |p| p + 1);
            let mut rc = vec![0u64; blocks * rbe as usize];
            let mut block = vec![0u8; self.cs() as usize];
            for (i, &rb) in self.reftable.iter().enumerate().take(blocks) {
                if rb == 0 {
                    continue;
                }
                self.read_at(&mut block, rb)?;
                let base = i * rbe as usize;
                for (j, slot) in rc[base..base + rbe as usize].iter_mut().enumerate() {
                    *slot = get_rc(&block, j, self.header.refcount_order);
                }
            }
            self.disk_rc = rc;
        }
        Ok(self.disk_rc.clone())
    }

    /// First free cluster index for appending.
    pub fn end_cluster(&self, rc: &[u64]) -> u64 {
        let used = rc.iter().rposition(|&c| c != 0).map_or(0, |p| p + 1) as u64;
        used.max(self.file_len.div_ceil(self.cs()))
    }

    /// Allocate `n` contiguous clusters at the end of the image, marking them in `rc`.
    /// Returns the host offset.
    pub fn alloc(&mut self, rc: &mut Vec<u64>, n: u64) -> u64 {
        let start = self.end_cluster(rc);
        let end = (start + n) as usize;
        if rc.len() < end {
            rc.resize(end, 0);
        }
        for c in &mut rc[start as usize..end] {
            *c = 1;
        }
        // Reserve the space so that later allocations do not reuse it before it is written.
        self.file_len = self.file_len.max(end as u64 * self.cs());
        start * self.cs()
    }

    /// Write the refcounts `rc` to disk, allocating refcount blocks (and a bigger refcount
    /// table) as needed; the clusters for those are accounted in `rc` too.
    pub fn write_refcounts(&mut self, rc: &mut Vec<u64>) -> Result<(), MetaError> {
        let _ = self.refcounts()?;
        let rbe = self.rb_entries();
        let cs = self.cs();
        let mut reftable = self.reftable.clone();
        let mut new_table: Option<(u64, u64)> = None; // (offset, clusters)
        loop {
            let used = rc.iter().rposition(|&c| c != 0).map_or(0, |p| p + 1) as u64;
            let blocks = used.div_ceil(rbe).max(1);
            if blocks > reftable.len() as u64 {
                let clusters = (blocks * 8 + blocks * 4 + 64).div_ceil(cs);
                if let Some((o, n)) = new_table {
                    // Growing again: release the previous candidate.
                    for c in o / cs..o / cs + n {
                        rc[c as usize] = 0;
                    }
                }
                let o = self.alloc(rc, clusters);
                new_table = Some((o, clusters));
                reftable.resize((clusters * cs / 8) as usize, 0);
                continue;
            }
            let mut changed = false;
            for b in 0..blocks {
                let start = (b * rbe) as usize;
                let end = (start + rbe as usize).min(rc.len());
                if reftable[b as usize] == 0 && rc[start..end].iter().any(|&c| c != 0) {
                    reftable[b as usize] = self.alloc(rc, 1);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // Write refcount blocks whose contents changed.
        for (b, &rb) in reftable.iter().enumerate() {
            if rb == 0 {
                continue;
            }
            let start = b * rbe as usize;
            let is_new = self.reftable.get(b).copied().unwrap_or(0) != rb;
            let range = start..(start + rbe as usize);
            let same = !is_new
                && range.clone().all(|i| {
                    rc.get(i).copied().unwrap_or(0) == self.disk_rc.get(i).copied().unwrap_or(0)
                });
            if same {
                continue;
            }
            let mut block = vec![0u8; cs as usize];
            for (j, i) in range.enumerate() {
                let v = rc.get(i).copied().unwrap_or(0);
                if v >> 1 >> (self.header.refcount_bits() - 1) != 0 {
                    return Err(self.corrupt(0, format!("refcount overflow for cluster {i}")));
                }
                set_rc(&mut block, j, self.header.refcount_order, v);
            }
            self.write_at(&block, rb)?;
        }
        self.disk_rc = rc.clone();
        if let Some((o, n)) = new_table {
            self.write_table(o, &reftable)?;
            self.sync()?;
            let old_off = self.header.refcount_table_offset;
            let old_n = u64::from(self.header.refcount_table_clusters);
            self.header.refcount_table_offset = o;
            self.header.refcount_table_clusters = n as u32;
            self.write_at(&o.to_be_bytes(), off::REFTABLE_OFFSET)?;
            self.write_at(&(n as u32).to_be_bytes(), off::REFTABLE_CLUSTERS)?;
            self.reftable = reftable;
            // Free the old table now that nothing points at it any more.
            for c in old_off / cs..old_off / cs + old_n {
                rc[c as usize] = rc[c as usize].saturating_sub(1);
            }
            return self.write_refcounts(rc);
        }
        // Same table: update changed entries.
        let rt_off = self.header.refcount_table_offset;
        for (i, &e) in reftable.iter().enumerate() {
            if self.reftable.get(i).copied().unwrap_or(0) != e {
                self.write_at(&e.to_be_bytes(), rt_off + i as u64 * 8)?;
            }
        }
        self.reftable = reftable;
        Ok(())
    }

    /// Update a u32 header field in place.
    pub fn write_header_u32(&mut self, offset: u64, v: u32) -> Result<(), MetaError> {
        self.write_at(&v.to_be_bytes(), offset)
    }

    /// Update a u64 header field in place.
    pub fn write_header_u64(&mut self, offset: u64, v: u64) -> Result<(), MetaError> {
        self.write_at(&v.to_be_bytes(), offset)
    }

    /// Rewrite the whole header (used when the backing file name changes).
    pub fn rewrite_header(&mut self) -> Result<(), MetaError> {
        let buf = self
            .header
            .serialize()
            .map_err(|source| MetaError::Header {
                path: self.path.clone(),
                source,
            })?;
        self.write_at(&buf, 0)
    }

    /// Set or clear the dirty bit (v3 only).
    pub fn set_dirty(&mut self, dirty: bool) -> Result<(), MetaError> {
        if self.header.version < 3 {
            return Ok(());
        }
        if dirty {
            self.header.incompatible |= super::header::INCOMPAT_DIRTY;
        } else {
            self.header.incompatible &= !super::header::INCOMPAT_DIRTY;
        }
        let v = self.header.incompatible;
        self.write_header_u64(off::INCOMPAT, v)
    }

    /// Set or clear the corrupt bit (v3 only; v2 images have no feature bits, QEMU does
    /// not mark them either).
    pub fn set_corrupt(&mut self, corrupt: bool) -> Result<(), MetaError> {
        if self.header.version < 3 {
            return Ok(());
        }
        if corrupt {
            self.header.incompatible |= super::header::INCOMPAT_CORRUPT;
        } else {
            self.header.incompatible &= !super::header::INCOMPAT_CORRUPT;
        }
        let v = self.header.incompatible;
        self.write_header_u64(off::INCOMPAT, v)
    }

    pub fn sync(&self) -> Result<(), MetaError> {
        self.file.sync_all().map_err(|e| io_err(&self.path, e))
    }

    /// Validate and read an L1 table.
    pub fn read_l1(&self, offset: u64, entries: u32) -> Result<Vec<u64>, MetaError> {
        let l1 = self.read_table(offset, u64::from(entries))?;
        let cs = self.cs();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            let at = offset + i as u64 * 8;
            if l2 & (cs - 1) != 0 {
                return Err(self.corrupt(at, format!("L2 table offset {l2:#x} unaligned")));
            }
            if l2 != 0 && l2 + cs > self.file_len.next_multiple_of(cs) {
                return Err(self.corrupt(at, format!("L2 table at {l2:#x} is past end of file")));
            }
        }
        Ok(l1)
    }

    /// Read one L2 table.
    pub fn read_l2(&self, offset: u64) -> Result<Vec<u64>, MetaError> {
        self.read_table(offset, self.header.l2_entries())
    }

    /// Read the active L1 table.
    pub fn active_l1(&self) -> Result<Vec<u64>, MetaError> {
        self.read_l1(self.header.l1_table_offset, self.header.l1_size)
    }
}

pub fn io_err(path: &Path, source: std::io::Error) -> MetaError {
    MetaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read refcount `idx` from a refcount block with the given order.
pub fn get_rc(block: &[u8], idx: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let byte = block[bit / 8];
            u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[idx]),
        4 => u64::from(u16::from_be_bytes([block[idx * 2], block[idx * 2 + 1]])),
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&block[idx * 4..idx * 4 + 4]);
            u64::from(u32::from_be_bytes(a))
        }
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[idx * 8..idx * 8 + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Store refcount `v` at `idx` (caller checked that it fits).
pub fn set_rc(block: &mut [u8], idx: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => block[idx] = v as u8,
        4 => block[idx * 2..idx * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[idx * 4..idx * 4 + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[idx * 8..idx * 8 + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_roundtrip() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let n = 512 * 8 / (1usize << order);
            for i in 0..n {
                set_rc(&mut block, i, order, (i as u64) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_rc(&block, i, order),
                    (i as u64) & max,
                    "order {order} idx {i}"
                );
            }
        }
    }

    #[test]
    fn decode_entries() {
        assert_eq!(decode_l2(0, 16), L2Entry::Unallocated);
        assert_eq!(
            decode_l2(1, 16),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(
            decode_l2(COPIED | 0x30000, 16),
            L2Entry::Normal {
                host: 0x30000,
                copied: true
            }
        );
        // compressed: 64K clusters -> shift 54, 2 sectors at offset 0x50200
        let raw = COMPRESSED | (1u64 << 54) | 0x50200;
        assert_eq!(
            decode_l2(raw, 16),
            L2Entry::Compressed {
                start: 0x50200,
                len: 1024
            }
        );
    }
}
