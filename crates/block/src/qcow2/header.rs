//! qcow2 header parsing, validation and (partial) rewriting.
//!
//! Parsing never panics: every malformed field is reported as a [`HeaderError`] that names
//! the byte offset of the offending field.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// qcow2 magic, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of the v2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Size of the v3 header that we write (includes the compression type byte + padding).
pub const V3_HEADER_LEN: usize = 112;
/// Largest L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header field offsets, used for in-place updates.
pub mod off {
    pub const SIZE: u64 = 24;
    pub const L1_SIZE: u64 = 36;
    pub const L1_OFFSET: u64 = 40;
    pub const REFTABLE_OFFSET: u64 = 48;
    pub const REFTABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPAT: u64 = 72;
}

/// Errors while parsing a qcow2 header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("I/O error reading the header: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what} (header field at offset {offset:#x})")]
    Invalid { offset: u64, what: String },
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
}

fn invalid(offset: u64, what: impl Into<String>) -> HeaderError {
    HeaderError::Invalid {
        offset,
        what: what.into(),
    }
}

/// A parsed qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Header extensions other than the backing format, kept verbatim (type, data).
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Number of 8-byte entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether the dirty bit is set.
    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// Whether the corrupt bit is set (QEMU sets it when it catches a write that would
    /// overwrite metadata; such an image may only be opened read-only, or repaired).
    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l1 = self.cluster_size() * self.l2_entries();
        size.div_ceil(per_l1)
    }

    /// Read and validate the header of `file` (whose length is `file_len`).
    pub fn read(file: &File, file_len: u64) -> Result<Header, HeaderError> {
        if file_len < V2_HEADER_LEN as u64 {
            return Err(invalid(
                0,
                format!("file is {file_len} bytes, too short for a qcow2 header (72 bytes)"),
            ));
        }
        let mut first = [0u8; V2_HEADER_LEN];
        file.read_exact_at(&mut first, 0)?;
        let cluster_bits = be32(&first, 20);
        if be32(&first, 0) != MAGIC {
            return Err(invalid(0, "bad magic, not a qcow2 image"));
        }
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(
                20,
                format!("cluster_bits {cluster_bits} out of range 9..=21"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        let mut buf = vec![0u8; cs.min(file_len) as usize];
        file.read_exact_at(&mut buf, 0)?;
        Self::parse(&buf, file_len)
    }

    /// Parse and validate a header from `buf`, the first cluster of the image (or the whole
    /// file if shorter); `file_len` is the length of the image file.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if buf.len() < V2_HEADER_LEN {
            return Err(invalid(
                0,
                format!("header truncated at {} bytes", buf.len()),
            ));
        }
        if be32(buf, 0) != MAGIC {
            return Err(invalid(0, "bad magic, not a qcow2 image"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(invalid(4, format!("unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(
                20,
                format!("cluster_bits {cluster_bits} out of range 9..=21"),
            ));
        }
        if be32(buf, 32) != 0 {
            return Err(HeaderError::Unsupported("encryption".into()));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            other_extensions: Vec::new(),
        };
        if version == 3 {
            h.parse_v3(buf)?;
        }
        h.validate_tables(file_len)?;
        h.parse_backing_name(buf)?;
        if version == 3 {
            h.parse_extensions(buf)?;
        }
        Ok(h)
    }

    fn parse_v3(&mut self, buf: &[u8]) -> Result<(), HeaderError> {
        if buf.len() < 104 {
            return Err(invalid(72, "v3 header truncated"));
        }
        self.incompatible = be64(buf, 72);
        self.compatible = be64(buf, 80);
        self.autoclear = be64(buf, 88);
        self.refcount_order = be32(buf, 96);
        self.header_length = be32(buf, 100);
        if self.refcount_order > 6 {
            return Err(invalid(
                96,
                format!("refcount_order {} > 6", self.refcount_order),
            ));
        }
        let hl = self.header_length as usize;
        if hl < 104 || hl > buf.len() || hl as u64 > self.cluster_size() {
            return Err(invalid(100, format!("invalid header_length {hl}")));
        }
        if hl > 104 {
            self.compression_type = buf[104];
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION;
        let unknown = self.incompatible & !known;
        if unknown & INCOMPAT_EXTL2 != 0 {
            return Err(HeaderError::Unsupported("extended L2 entries".into()));
        }
        if unknown != 0 {
            return Err(invalid(
                72,
                format!("unknown incompatible feature bits {unknown:#x}"),
            ));
        }
        // The corrupt bit is accepted here: such an image may still be opened read-only
        // (and checked, repaired); writers refuse it (`crate::qcow2::guard`).
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(HeaderError::Unsupported("external data file".into()));
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 && self.compression_type != 0 {
            return Err(HeaderError::Unsupported(format!(
                "compression type {} (only zlib is supported)",
                self.compression_type
            )));
        }
        Ok(())
    }

    fn validate_tables(&self, file_len: u64) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        if self.size > (1u64 << 62) {
            return Err(invalid(
                24,
                format!("virtual size {} is too large", self.size),
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(
                36,
                format!("L1 table too large ({} entries)", self.l1_size),
            ));
        }
        let needed = self.l1_entries_for(self.size);
        if needed > u64::from(self.l1_size) {
            return Err(invalid(
                36,
                format!(
                    "L1 table has {} entries but virtual size {} needs {needed}",
                    self.l1_size, self.size
                ),
            ));
        }
        let l1 = self.l1_table_offset;
        if l1_bytes > 0 {
            check_area(40, "L1 table", l1, l1_bytes, cs, file_len)?;
        }
        let rt = self.refcount_table_offset;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes == 0 {
            return Err(invalid(56, "refcount table is empty"));
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(56, "refcount table too large"));
        }
        check_area(48, "refcount table", rt, rt_bytes, cs, file_len)?;
        if l1_bytes > 0 && l1 < rt + rt_bytes && rt < l1 + l1_bytes {
            return Err(invalid(
                40,
                format!("L1 table at {l1:#x} overlaps the refcount table at {rt:#x}"),
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                60,
                format!("too many snapshots ({})", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            check_area(
                64,
                "snapshot table",
                self.snapshots_offset,
                40,
                cs,
                file_len,
            )?;
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<(), HeaderError> {
        let off = be64(buf, 8);
        if off == 0 {
            return Ok(());
        }
        let len = u64::from(be32(buf, 16));
        if len > 1023 {
            return Err(invalid(
                16,
                format!("backing file name too long ({len} bytes)"),
            ));
        }
        let end = off.checked_add(len).filter(|&e| e <= buf.len() as u64);
        let Some(end) = end else {
            return Err(invalid(
                8,
                format!("backing file name at {off:#x} (+{len}) is outside the header cluster"),
            ));
        };
        let name = std::str::from_utf8(&buf[off as usize..end as usize])
            .map_err(|_| invalid(off, "backing file name is not UTF-8"))?;
        if !name.is_empty() {
            self.backing_file = Some(name.to_string());
        }
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), HeaderError> {
        let mut pos = self.header_length as usize;
        loop {
            if pos + 8 > buf.len() {
                return Err(invalid(
                    pos as u64,
                    "header extensions run past the first cluster",
                ));
            }
            let ty = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            if ty == EXT_END {
                return Ok(());
            }
            let data_start = pos + 8;
            let Some(data_end) = data_start.checked_add(len).filter(|&e| e <= buf.len()) else {
                return Err(invalid(
                    pos as u64,
                    format!("header extension {ty:#x} too long"),
                ));
            };
            let data = buf[data_start..data_end].to_vec();
            // A feature name table is whole 48-byte entries (type, bit, 46-byte name); imago
            // 0.2.6 indexes into a shorter last entry and panics, so none reaches it.
            if ty == EXT_FEATURE_TABLE && !len.is_multiple_of(48) {
                return Err(invalid(
                    data_start as u64,
                    format!("feature name table of {len} bytes is not whole 48-byte entries"),
                ));
            }
            if ty == EXT_BACKING_FORMAT {
                let f = String::from_utf8(data)
                    .map_err(|_| invalid(data_start as u64, "backing format is not UTF-8"))?;
                self.backing_format = Some(f);
            } else {
                self.other_extensions.push((ty, data));
            }
            pos = data_start + len.next_multiple_of(8);
        }
    }

    /// Serialize the full header (fields, extensions, backing name) into one cluster-sized
    /// buffer prefix. Fails if it does not fit into the first cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, HeaderError> {
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing size
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // crypt
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&(V3_HEADER_LEN as u32).to_be_bytes());
            b.push(self.compression_type);
            b.resize(V3_HEADER_LEN, 0);
            let mut exts: Vec<(u32, &[u8])> = Vec::new();
            if let Some(f) = &self.backing_format {
                exts.push((EXT_BACKING_FORMAT, f.as_bytes()));
            }
            for (t, d) in &self.other_extensions {
                exts.push((*t, d));
            }
            for (t, d) in exts {
                b.extend_from_slice(&t.to_be_bytes());
                b.extend_from_slice(&(d.len() as u32).to_be_bytes());
                b.extend_from_slice(d);
                b.resize(b.len().next_multiple_of(8), 0);
            }
            b.extend_from_slice(&[0u8; 8]); // end of extensions
        }
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(invalid(0, "header does not fit into the first cluster"));
        }
        Ok(b)
    }
}

/// Check that a metadata area is cluster aligned, does not overlap the header and lies
/// within the file.
fn check_area(
    field: u64,
    what: &str,
    offset: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<(), HeaderError> {
    if !offset.is_multiple_of(cs) {
        return Err(invalid(
            field,
            format!("{what} offset {offset:#x} is not cluster aligned"),
        ));
    }
    if offset == 0 {
        return Err(invalid(
            field,
            format!("{what} at offset 0 overlaps the header"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len.next_multiple_of(cs) => Ok(()),
        _ => Err(invalid(
            field,
            format!("{what} at {offset:#x} (+{len:#x}) extends past end of file ({file_len:#x})"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            other_extensions: vec![(0x1234, vec![1, 2, 3])],
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let mut buf = h.serialize().unwrap();
        buf.resize(1 << 16, 0);
        let p = Header::parse(&buf, 4 << 16).unwrap();
        assert_eq!(p, h);
    }

    #[test]
    fn corrupt_bit_parses() {
        let mut h = sample();
        h.incompatible = INCOMPAT_CORRUPT;
        let mut buf = h.serialize().unwrap();
        buf.resize(1 << 16, 0);
        let p = Header::parse(&buf, 4 << 16).unwrap();
        assert!(p.corrupt() && !p.dirty());
        assert!(!sample().corrupt());
    }

    /// Found by the qcow2 fuzz target (CI, first run): a feature name table whose last entry
    /// is shorter than 48 bytes made imago panic while opening the image.
    #[test]
    fn a_feature_name_table_is_whole_entries() {
        let mut h = sample();
        h.other_extensions = vec![(EXT_FEATURE_TABLE, vec![0; 49])];
        let mut buf = h.serialize().unwrap();
        buf.resize(1 << 16, 0);
        let e = Header::parse(&buf, 4 << 16).unwrap_err().to_string();
        assert!(e.contains("not whole 48-byte entries"), "{e}");
        h.other_extensions = vec![(EXT_FEATURE_TABLE, vec![0; 96])];
        let mut buf = h.serialize().unwrap();
        buf.resize(1 << 16, 0);
        Header::parse(&buf, 4 << 16).unwrap();
    }

    #[test]
    fn rejects_bad_input() {
        let h = sample();
        let mut buf = h.serialize().unwrap();
        buf.resize(1 << 16, 0);
        assert!(Header::parse(&buf[..50], 4 << 16).is_err());
        let mut bad = buf.clone();
        bad[0] = 0;
        assert!(Header::parse(&bad, 4 << 16)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        // L1 past EOF
        let e = Header::parse(&buf, 2 << 16).unwrap_err().to_string();
        assert!(e.contains("past end of file"), "{e}");
        // refcount table overlapping the header
        let mut bad = buf.clone();
        bad[48..56].copy_from_slice(&0u64.to_be_bytes());
        let e = Header::parse(&bad, 4 << 16).unwrap_err().to_string();
        assert!(e.contains("overlaps the header"), "{e}");
        // huge size
        let mut bad = buf.clone();
        bad[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(Header::parse(&bad, 4 << 16).is_err());
    }
}
