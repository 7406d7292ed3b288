//! Parsing and executing virtio-blk requests (virtio 1.2 §5.2.6).
//!
//! A request is a chain: device-readable bytes (the 16-byte header, then data for OUT, or the
//! segments of a DISCARD / WRITE_ZEROES), then device-writable bytes (data for IN and GET_ID)
//! ending with the status byte. Any layout of those bytes over descriptors is accepted
//! (`VIRTIO_F_ANY_LAYOUT` is implied by `VERSION_1`); the status byte is the last byte of the
//! last descriptor.
//!
//! A chain whose status byte cannot be written (last buffer device-readable, empty, or outside
//! guest memory, or no buffer at all) is returned unserved with a used length of 0. Every other
//! bad request gets `VIRTIO_BLK_S_IOERR` (or `UNSUPP`), and no I/O.
//!
//! [`Parser::parse`] checks a chain completely (layout, lengths, disk range, features) and turns
//! it into an [`Op`] for an engine, or answers it at once (GET_ID, errors).

use std::sync::Arc;

use block::DiskBackend;
use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use super::engine::{execute_blocking, Bounce, Data, Op};
use super::{
    ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEGMENTS, SECTOR_SIZE, SEG_MAX, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use crate::virtio::has_feature;
use crate::virtio::queue::{Chain, ChainHandler, Cursor, Segment};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// `flags` of a WRITE_ZEROES segment: the device may deallocate.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: usize = 16;

/// Why a request failed; becomes its status byte (and a debug log line).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("bad chain: {0}")]
    Chain(#[from] crate::virtio::queue::QueueError),
    #[error("header shorter than 16 bytes")]
    ShortHeader,
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}+{bytes:#x} bytes past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        bytes: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} not supported")]
    Unsupported(u32),
    #[error("{kind} segment list of {len} bytes (max {max} segments)")]
    BadSegments {
        kind: &'static str,
        len: u64,
        max: u32,
    },
    #[error("{kind} of {sectors} sectors (max {max})")]
    TooManySectors {
        kind: &'static str,
        sectors: u32,
        max: u32,
    },
    #[error("{kind} flags {flags:#x} not supported")]
    Flags { kind: &'static str, flags: u32 },
    #[error("guest buffers: {0}")]
    Buffers(#[from] crate::virtio::queue::CursorError),
    #[error("disk: {0}")]
    Disk(#[from] block::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl RequestError {
    pub(crate) fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::Flags { .. } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// What a chain turned out to be.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// No writable status byte: return the chain with a used length of 0, untouched.
    Unserved,
    /// Answered without the disk (GET_ID, or a bad request): write `status`, report `written`
    /// bytes before it.
    Done {
        status_addr: GuestAddress,
        status: u8,
        written: u32,
    },
    /// Needs the disk; on success `written` bytes were written into the guest's buffers.
    Io {
        status_addr: GuestAddress,
        op: Op,
        written: u32,
    },
}

/// Checks requests against one disk and the features the driver accepted.
#[derive(Debug, Clone)]
pub(crate) struct Parser {
    /// In 512-byte sectors.
    capacity: u64,
    read_only: bool,
    acked_features: u64,
    id: [u8; ID_BYTES],
}

/// The first `len` bytes of `segments` after skipping `skip`, as buffers.
fn sub_segments<'a>(
    segments: impl Iterator<Item = &'a Segment>,
    mut skip: u64,
    mut len: u64,
) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segments {
        if len == 0 {
            break;
        }
        let l = u64::from(s.len);
        if skip >= l {
            skip -= l;
            continue;
        }
        // Both fit in a u32: they are at most `s.len`.
        let take = (l - skip).min(len);
        out.push(Segment {
            addr: GuestAddress(s.addr.0.wrapping_add(skip)),
            len: take as u32,
            writable: s.writable,
        });
        len -= take;
        skip = 0;
    }
    out
}

impl Parser {
    pub(crate) fn new(disk: &dyn DiskBackend, acked_features: u64, id: [u8; ID_BYTES]) -> Self {
        Parser {
            capacity: disk.size() / SECTOR_SIZE,
            read_only: disk.read_only(),
            acked_features,
            id,
        }
    }

    /// Byte offset of `sector`, after checking that `bytes` from there are on the disk.
    fn range(&self, sector: u64, bytes: u64) -> Result<u64, RequestError> {
        match sector.checked_add(bytes.div_ceil(SECTOR_SIZE)) {
            // sector <= capacity = size / 512: the multiplication cannot overflow.
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(RequestError::OutOfRange {
                sector,
                bytes,
                capacity: self.capacity,
            }),
        }
    }

    /// Check the request in `chain` (walked, not yet validated).
    pub(crate) fn parse(&self, mem: &GuestMem, chain: &mut Chain) -> Parsed {
        let Some(status_addr) = chain.status_addr(mem) else {
            tracing::debug!(
                "virtio-blk: chain {} has no writable status byte{}; returned unserved",
                chain.head,
                chain
                    .error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            return Parsed::Unserved;
        };
        let result = chain
            .validate(mem, SEG_MAX as usize + 2)
            .map_err(RequestError::from)
            .and_then(|()| self.request(mem, chain));
        match result {
            Ok(Answer::Now(written)) => Parsed::Done {
                status_addr,
                status: VIRTIO_BLK_S_OK,
                written,
            },
            Ok(Answer::Disk(op, written)) => Parsed::Io {
                status_addr,
                op,
                written,
            },
            Err(e) => {
                tracing::debug!("virtio-blk: request {}: {e}", chain.head);
                Parsed::Done {
                    status_addr,
                    status: e.status(),
                    written: 0,
                }
            }
        }
    }

    fn request(&self, mem: &GuestMem, chain: &Chain) -> Result<Answer, RequestError> {
        if chain.readable_len < HEADER_LEN {
            return Err(RequestError::ShortHeader);
        }
        let mut input = Cursor::new(chain.readable(), u64::MAX);
        let mut header = [0u8; HEADER_LEN as usize];
        input.read(mem, &mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        // Everything writable but the status byte.
        let out_len = chain.writable_len - 1;
        match kind {
            VIRTIO_BLK_T_IN => {
                if !out_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(out_len));
                }
                let offset = self.range(sector, out_len)?;
                let bufs = sub_segments(chain.writable(), 0, out_len);
                let data = Data {
                    offset,
                    len: out_len,
                    bufs,
                };
                Ok(Answer::Disk(Op::Read(data), out_len as u32))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let len = input.remaining();
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                let offset = self.range(sector, len)?;
                let bufs = sub_segments(chain.readable(), HEADER_LEN, len);
                let data = Data { offset, len, bufs };
                // Without FLUSH the driver expects a write-through disk (virtio 1.2 5.2.6.3).
                if has_feature(self.acked_features, VIRTIO_BLK_F_FLUSH) {
                    Ok(Answer::Disk(Op::Write(data), 0))
                } else {
                    Ok(Answer::Disk(Op::WriteThrough(data), 0))
                }
            }
            VIRTIO_BLK_T_FLUSH => Ok(Answer::Disk(Op::Flush, 0)),
            VIRTIO_BLK_T_GET_ID => {
                let mut output = Cursor::new(chain.writable(), out_len);
                let n = out_len.min(ID_BYTES as u64) as usize;
                output.write(mem, &self.id[..n])?;
                Ok(Answer::Now(n as u32))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let ranges = self.discard_or_zero(mem, kind, &mut input)?;
                let op = if kind == VIRTIO_BLK_T_DISCARD {
                    Op::Discard(ranges)
                } else {
                    Op::WriteZeroes(ranges)
                };
                Ok(Answer::Disk(op, 0))
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The byte ranges of a DISCARD or WRITE_ZEROES request, every segment checked (empty
    /// ones dropped).
    fn discard_or_zero(
        &self,
        mem: &GuestMem,
        kind: u32,
        input: &mut Cursor,
    ) -> Result<Vec<(u64, u64)>, RequestError> {
        let discard = kind == VIRTIO_BLK_T_DISCARD;
        let (name, feature, max_segs, max_sectors) = if discard {
            (
                "discard",
                VIRTIO_BLK_F_DISCARD,
                MAX_DISCARD_SEGMENTS,
                MAX_DISCARD_SECTORS,
            )
        } else {
            (
                "write-zeroes",
                VIRTIO_BLK_F_WRITE_ZEROES,
                MAX_WRITE_ZEROES_SEGMENTS,
                MAX_WRITE_ZEROES_SECTORS,
            )
        };
        if !has_feature(self.acked_features, feature) {
            return Err(RequestError::Unsupported(kind));
        }
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        let len = input.remaining();
        let count = len / SEGMENT_LEN as u64;
        if len == 0 || !len.is_multiple_of(SEGMENT_LEN as u64) || count > u64::from(max_segs) {
            return Err(RequestError::BadSegments {
                kind: name,
                len,
                max: max_segs,
            });
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut raw = [0u8; SEGMENT_LEN];
            input.read(mem, &mut raw)?;
            let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or([0; 8]));
            let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(RequestError::Flags { kind: name, flags });
            }
            if sectors > max_sectors {
                return Err(RequestError::TooManySectors {
                    kind: name,
                    sectors,
                    max: max_sectors,
                });
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let off = self.range(sector, bytes)?;
            if bytes > 0 {
                ranges.push((off, bytes));
            }
        }
        Ok(ranges)
    }
}

enum Answer {
    /// Done without the disk; bytes written into the guest's buffers.
    Now(u32),
    /// For the disk; bytes written into the guest's buffers on success.
    Disk(Op, u32),
}

/// Serves one queue's requests synchronously, as a [`ChainHandler`]: the `sync` engine's path
/// without a worker (for fuzzing and simple callers).
pub struct BlockHandler {
    disk: Arc<dyn DiskBackend>,
    parser: Parser,
    bounce: Bounce,
}

impl BlockHandler {
    /// A handler for requests on `disk`, with the features the driver accepted and the device
    /// ID returned by GET_ID.
    pub fn new(disk: Arc<dyn DiskBackend>, acked_features: u64, id: [u8; ID_BYTES]) -> Self {
        BlockHandler {
            parser: Parser::new(&*disk, acked_features, id),
            disk,
            bounce: Bounce::default(),
        }
    }
}

impl ChainHandler for BlockHandler {
    fn handle(&mut self, mem: &GuestMem, chain: &mut Chain) -> u32 {
        let (status_addr, status, written) = match self.parser.parse(mem, chain) {
            Parsed::Unserved => return 0,
            Parsed::Done {
                status_addr,
                status,
                written,
            } => (status_addr, status, written),
            Parsed::Io {
                status_addr,
                op,
                written,
            } => match execute_blocking(&*self.disk, mem, &op, &mut self.bounce) {
                Ok(()) => (status_addr, VIRTIO_BLK_S_OK, written),
                Err(e) => {
                    tracing::debug!("virtio-blk: request {}: {e}", chain.head);
                    (status_addr, e.status(), 0)
                }
            },
        };
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }
}
