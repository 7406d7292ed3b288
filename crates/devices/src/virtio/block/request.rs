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

use std::sync::Arc;

use block::DiskBackend;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::engine::{IoEngine, SyncEngine};
use super::{
    ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEGMENTS, SECTOR_SIZE, SEG_MAX, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use crate::virtio::has_feature;
use crate::virtio::queue::{Chain, ChainHandler, Cursor};

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
/// Size of the bounce buffer data moves through between guest memory and the disk.
const BOUNCE_LEN: usize = 256 * 1024;

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
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::Flags { .. } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Serves one queue's requests.
pub struct BlockHandler {
    engine: Box<dyn IoEngine>,
    /// In 512-byte sectors.
    capacity: u64,
    read_only: bool,
    acked_features: u64,
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
}

impl BlockHandler {
    /// A handler for requests on `disk`, with the features the driver accepted and the device
    /// ID returned by GET_ID.
    pub fn new(disk: Arc<dyn DiskBackend>, acked_features: u64, id: [u8; ID_BYTES]) -> Self {
        BlockHandler {
            capacity: disk.size() / SECTOR_SIZE,
            read_only: disk.read_only(),
            engine: Box::new(SyncEngine::new(disk)),
            acked_features,
            id,
            bounce: Vec::new(),
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

    /// Run the request in `chain` (validated); returns the bytes written into the guest's
    /// buffers before the status byte.
    fn execute(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> Result<u32, RequestError> {
        if chain.readable_len < HEADER_LEN {
            return Err(RequestError::ShortHeader);
        }
        let mut input = Cursor::new(chain.readable(), u64::MAX);
        let mut header = [0u8; HEADER_LEN as usize];
        input.read(mem, &mut header)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        // Everything writable but the status byte.
        let mut output = Cursor::new(chain.writable(), chain.writable_len - 1);
        if self.bounce.is_empty() {
            self.bounce = vec![0u8; BOUNCE_LEN];
        }
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = output.remaining();
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                let mut off = self.range(sector, len)?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(BOUNCE_LEN as u64) as usize;
                    self.engine.read(&mut self.bounce[..n], off)?;
                    output.write(mem, &self.bounce[..n])?;
                    off += n as u64;
                    left -= n as u64;
                }
                Ok(len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let len = input.remaining();
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                let mut off = self.range(sector, len)?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(BOUNCE_LEN as u64) as usize;
                    input.read(mem, &mut self.bounce[..n])?;
                    self.engine.write(&self.bounce[..n], off)?;
                    off += n as u64;
                    left -= n as u64;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.engine.flush()?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = output.remaining().min(ID_BYTES as u64) as usize;
                output.write(mem, &self.id[..n])?;
                Ok(n as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                self.discard_or_zero(mem, kind, &mut input)?;
                Ok(0)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    fn discard_or_zero(
        &mut self,
        mem: &GuestMemoryMmap,
        kind: u32,
        input: &mut Cursor,
    ) -> Result<(), RequestError> {
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
        // Check every segment before touching the disk.
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
            ranges.push((self.range(sector, bytes)?, bytes));
        }
        for (off, bytes) in ranges {
            if bytes == 0 {
                continue;
            }
            if discard {
                self.engine.discard(off, bytes)?;
            } else {
                // The backend deallocates where cheap whether or not UNMAP was set: the range
                // reads as zeroes either way, which is all WRITE_ZEROES promises.
                self.engine.write_zeroes(off, bytes)?;
            }
        }
        Ok(())
    }
}

impl ChainHandler for BlockHandler {
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: &mut Chain) -> u32 {
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
            return 0;
        };
        let result = chain
            .validate(mem, SEG_MAX as usize + 2)
            .map_err(RequestError::from)
            .and_then(|()| self.execute(mem, chain));
        let (status, written) = match result {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(e) => {
                tracing::debug!("virtio-blk: request {}: {e}", chain.head);
                (e.status(), 0)
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }
}
