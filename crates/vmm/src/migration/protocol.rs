//! The live-migration wire protocol: framed messages over one stream (TCP or Unix).
//!
//! A frame is a one-byte tag, a little-endian `u64` length and that many bytes, sealed
//! (`seal`: the body encrypted, a GCM tag after it) once the handshake has proven that both
//! sides hold the migration's token; nothing else crosses before it. The source speaks first:
//!
//! ```text
//! source                                   target
//! Hello {magic, version, config, layout} →
//!                                        ← Ready            (memory allocated)
//! Pages {addr, count, bytes}...  →                          (round 1: all used memory)
//! Round {n, ...}                 →                          (progress, per round)
//! Pages ...                      →                          (rounds 2..: dirtied pages)
//!         -- the source pauses the VM (stop-and-copy) --
//! Pages ...  State {state}        →
//!                                        ← Ready {digest}   (VM built; both sides digest
//!                                                            memory + state meanwhile)
//!                                        | Error {message}  (the source resumes)
//! Commit (digests equal) | Abort  →
//!                                        ← Resumed          (the VM runs on the target)
//! ```
//!
//! With post-copy the source sends `Postcopy {dirty set}` before `State` and, after
//! `Resumed`, the stream carries pages and page requests both ways (see `postcopy`).
//!
//! Either side may send `Abort`/`Error` instead of its next message, or close the stream: the
//! source then resumes, the target drops what it received. Once the source has sent `Commit` it
//! never runs the VM again, so the VM never runs on both sides.

use std::io::Read;

use hypervisor::mem::PAGE_SIZE;
use serde::{Deserialize, Serialize};

/// First bytes of `Hello`.
pub const MAGIC: &str = "vessel-migration";
/// The protocol version this Vessel speaks.
pub const VERSION: u32 = 3;
/// Largest frame accepted (a batch of pages, or the state).
pub const MAX_FRAME: u64 = 256 << 20;
/// Pages per `Pages` frame at most.
pub const BATCH_PAGES: u64 = 256;

/// Errors on the wire.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected message {got:?} (expected {want})")]
    Unexpected { got: Tag, want: &'static str },
    #[error("bad message: {0}")]
    Bad(String),
    #[error("the other side failed: {0}")]
    Remote(String),
    #[error(transparent)]
    Auth(#[from] super::seal::AuthError),
}

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    Hello = 1,
    Ready = 2,
    Pages = 3,
    Round = 4,
    State = 5,
    Commit = 6,
    Resumed = 7,
    Abort = 8,
    Error = 9,
    /// Post-copy (see `postcopy`): the pages the target misses, before `State`.
    Postcopy = 10,
    /// Post-copy, target to source: `addr: u64, pages: u64` wanted now.
    PageRequest = 11,
    /// Post-copy, target to source: every page arrived; `digest: u64` of them.
    PostcopyDone = 12,
    /// Post-copy, source to target: the end (empty, or what went wrong).
    PostcopyEnd = 13,
}

impl Tag {
    fn from_u8(b: u8) -> Option<Tag> {
        Some(match b {
            1 => Tag::Hello,
            2 => Tag::Ready,
            3 => Tag::Pages,
            4 => Tag::Round,
            5 => Tag::State,
            6 => Tag::Commit,
            7 => Tag::Resumed,
            8 => Tag::Abort,
            9 => Tag::Error,
            10 => Tag::Postcopy,
            11 => Tag::PageRequest,
            12 => Tag::PostcopyDone,
            13 => Tag::PostcopyEnd,
            _ => return None,
        })
    }
}

impl Tag {
    /// The longest body a frame of this kind may have: a peer cannot make this side
    /// allocate more than a frame of its kind needs.
    pub fn max_len(self) -> u64 {
        match self {
            Tag::Hello => 1 << 20,
            Tag::Pages => 12 + BATCH_PAGES * hypervisor::mem::PAGE_SIZE,
            Tag::State => 64 << 20,
            // One bit per page of guest memory, as JSON numbers.
            Tag::Postcopy => MAX_FRAME,
            Tag::Error | Tag::PostcopyEnd => 64 << 10,
            Tag::Round => 4 << 10,
            Tag::Ready | Tag::Commit | Tag::Resumed | Tag::Abort => 64,
            Tag::PageRequest | Tag::PostcopyDone => 64,
        }
    }
}

/// `Hello`'s body.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub magic: String,
    pub version: u32,
    pub vessel_version: String,
    /// The machine: its spec, with none of the source's host bindings.
    pub machine: crate::config::VmSpec,
    /// The source's bindings, used by the target only when its receive request says
    /// `same_paths` (see `bindings`).
    #[serde(default)]
    pub source_paths: crate::config::HostBindings,
    /// Digest all of guest memory at stop-and-copy ([`super::digest`]) rather than the logs
    /// of pages sent and received ([`super::PageLog`]).
    #[serde(default)]
    pub full_digest: bool,
}

/// `Round`'s body: progress the target reports too.
#[derive(Debug, Serialize, Deserialize)]
pub struct Round {
    pub round: u32,
    pub remaining_bytes: u64,
}

/// Writes frames (sealed: [`super::seal::FrameWriter`]).
pub trait FrameWrite {
    /// Writes one frame whose body is the concatenation of `parts`.
    fn write_frame(&mut self, tag: Tag, parts: &[&[u8]]) -> Result<(), ProtocolError>;
}

/// Reads frames (sealed: [`super::seal::FrameReader`]).
pub trait FrameRead {
    /// Reads one frame into `buf` (reused); returns its tag. `Error` frames become
    /// [`ProtocolError::Remote`], `Abort` a remote error too.
    fn read_frame(&mut self, buf: &mut Vec<u8>) -> Result<Tag, ProtocolError>;
}

/// Writes one frame whose body is the concatenation of `parts`.
pub fn write_frame(
    w: &mut impl FrameWrite,
    tag: Tag,
    parts: &[&[u8]],
) -> Result<(), ProtocolError> {
    w.write_frame(tag, parts)
}

/// Writes a frame with a JSON body.
pub fn write_json<T: Serialize>(
    w: &mut impl FrameWrite,
    tag: Tag,
    v: &T,
) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(v).map_err(|e| ProtocolError::Bad(e.to_string()))?;
    w.write_frame(tag, &[&body])
}

/// Reads one frame into `buf` (reused); returns its tag.
pub fn read_frame(r: &mut impl FrameRead, buf: &mut Vec<u8>) -> Result<Tag, ProtocolError> {
    r.read_frame(buf)
}

/// A frame's header: its tag and body length, checked against the kind's limit before any
/// of the body is read or allocated.
pub fn parse_head(head: &[u8; 9]) -> Result<(Tag, u64), ProtocolError> {
    let tag = Tag::from_u8(head[0])
        .ok_or_else(|| ProtocolError::Bad(format!("unknown message type {}", head[0])))?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or([0; 8]));
    if len > tag.max_len() {
        return Err(ProtocolError::Bad(format!(
            "a {len}-byte {tag:?} message (at most {})",
            tag.max_len()
        )));
    }
    Ok((tag, len))
}

/// `tag`, or the peer's error for `Error` and `Abort` frames (`body`: the message).
pub fn remote_errors(tag: Tag, body: &[u8]) -> Result<Tag, ProtocolError> {
    match tag {
        Tag::Error => Err(ProtocolError::Remote(
            String::from_utf8_lossy(body).into_owned(),
        )),
        Tag::Abort => Err(ProtocolError::Remote("migration aborted".to_string())),
        t => Ok(t),
    }
}

/// Reads a `len`-byte body into `buf` (reused) as it comes, into the buffer's spare
/// capacity: a length alone, within its kind's limit, does not make this side allocate and
/// zero that many bytes before the peer sends them.
pub fn read_body(r: &mut impl Read, len: u64, buf: &mut Vec<u8>) -> Result<(), ProtocolError> {
    buf.clear();
    let got = Read::by_ref(r).take(len).read_to_end(buf)?;
    if got as u64 != len {
        return Err(ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the connection ended {got} bytes into a {len}-byte message"),
        )));
    }
    Ok(())
}

/// Reads one unsealed frame: what a target without a handshake answers (tests), and the
/// framing the `migration_frames` fuzz target feeds the decoders through.
#[doc(hidden)]
pub fn read_plain_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Tag, ProtocolError> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let (tag, len) = parse_head(&head)?;
    read_body(r, len, buf)?;
    remote_errors(tag, buf)
}

/// Reads a frame that must be `want`.
pub fn expect(r: &mut impl FrameRead, buf: &mut Vec<u8>, want: Tag) -> Result<(), ProtocolError> {
    let got = r.read_frame(buf)?;
    if got != want {
        return Err(ProtocolError::Unexpected {
            got,
            want: match want {
                Tag::Ready => "ready",
                Tag::Commit => "commit",
                Tag::Resumed => "resumed",
                Tag::Hello => "hello",
                _ => "another message",
            },
        });
    }
    Ok(())
}

/// Parses a JSON body.
pub fn json<T: for<'de> Deserialize<'de>>(buf: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(buf).map_err(|e| ProtocolError::Bad(e.to_string()))
}

/// Splits a `Pages` body (`addr: u64, count: u32`, then `count` pages) into the address and
/// the pages' bytes; the pages are whole and aligned and do not run past the end of the
/// address space (whether guest memory holds them is the caller's to check).
pub fn pages(buf: &[u8]) -> Result<(u64, &[u8]), ProtocolError> {
    let bad = || ProtocolError::Bad("malformed pages".to_string());
    let head = buf.get(..12).ok_or_else(bad)?;
    let addr = u64::from_le_bytes(head[..8].try_into().map_err(|_| bad())?);
    let n = u32::from_le_bytes(head[8..].try_into().map_err(|_| bad())?);
    let data = &buf[12..];
    if data.len() as u64 != u64::from(n) * PAGE_SIZE
        || addr % PAGE_SIZE != 0
        || addr.checked_add(data.len() as u64).is_none()
    {
        return Err(bad());
    }
    Ok((addr, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_against_their_kind() {
        let head = |tag: u8, len: u64| {
            let mut h = [0u8; 9];
            h[0] = tag;
            h[1..].copy_from_slice(&len.to_le_bytes());
            h
        };
        assert_eq!(parse_head(&head(3, 12)).unwrap(), (Tag::Pages, 12));
        // Unknown, oversized.
        assert!(parse_head(&head(77, 0)).is_err());
        assert!(parse_head(&head(Tag::Pages as u8, u64::MAX)).is_err());
        // Each kind has its own limit.
        let e = parse_head(&head(Tag::Ready as u8, Tag::Ready.max_len() + 1)).unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
        let full = Tag::Pages.max_len();
        assert_eq!(parse_head(&head(3, full)).unwrap(), (Tag::Pages, full));
        assert!(remote_errors(Tag::Error, b"disk busy")
            .unwrap_err()
            .to_string()
            .contains("disk busy"));
        assert!(remote_errors(Tag::Abort, b"").is_err());
    }

    #[test]
    fn a_body_is_read_as_it_comes() {
        // A length within the limit and a body that never comes: an error, and no buffer of
        // that size (the fuzz target spent most of its time zeroing such buffers).
        let mut buf = Vec::new();
        let e = read_body(&mut &b"{}"[..], 200 << 20, &mut buf).unwrap_err();
        assert!(
            e.to_string().contains("2 bytes into a 209715200-byte"),
            "{e}"
        );
        assert!(buf.capacity() < 1 << 20, "{}", buf.capacity());
        // The buffer is reused: a shorter body after a longer one is exactly its bytes.
        read_body(&mut &[7u8; 100][..], 100, &mut buf).unwrap();
        assert_eq!(buf, [7; 100]);
        read_body(&mut &b"abcd"[..], 2, &mut buf).unwrap();
        assert_eq!(buf, b"ab");
    }

    #[test]
    fn pages_must_be_whole_aligned_and_inside_the_address_space() {
        let body = |addr: u64, n: u32, len: usize| {
            let mut b = addr.to_le_bytes().to_vec();
            b.extend_from_slice(&n.to_le_bytes());
            b.resize(12 + len, 0x5a);
            b
        };
        let good = body(0x3000, 2, 8192);
        let (addr, data) = pages(&good).unwrap();
        assert_eq!((addr, data.len()), (0x3000, 8192));
        assert!(pages(&body(0x3000, 2, 8191)).is_err());
        assert!(pages(&body(0x3001, 1, 4096)).is_err());
        assert!(pages(&body(0, 0, 0)).is_ok());
        assert!(pages(&[0; 11]).is_err());
        // Seen writing the migration_frames fuzz target (and replayed through it): the
        // post-copy fetcher adds to this address for each page, and overflowed.
        assert!(pages(&body(u64::MAX - 4095, 2, 8192)).is_err());
        assert!(pages(&body(u64::MAX - 8191, 1, 4096)).is_ok());
    }
}
