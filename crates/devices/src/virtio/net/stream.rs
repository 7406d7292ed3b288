//! A [`NetBackend`] on a connected Unix stream socket that speaks QEMU's stream protocol
//! (`-netdev stream`, passt): each Ethernet frame is preceded by its length, a 32-bit
//! big-endian integer; there is no virtio-net header on the wire.
//!
//! Receive ([`FrameReader`]): a read never goes past the frame in progress and the next frame's
//! length prefix. Frames not yet taken therefore stay in the socket, which keeps polling
//! readable while one is there (the worker polls level-triggered, as it does a tap), and a
//! frame split across reads is put together in one buffer, allocated once at the largest frame.
//! Since every frame has at least one byte, a read that takes the next prefix along leaves
//! that frame's body in the socket: one read per frame once traffic flows.
//!
//! Transmit ([`FrameWriter`]): a frame goes out with its prefix in one `writev`. What the
//! socket does not take is kept (one frame at most, copied) and finished before the next frame
//! starts: [`NetBackend::flush`] says whether it is out. Until it is, the device leaves the
//! guest's further transmit chains in the ring and polls the socket for writability, so the
//! guest feels the peer's pace (as a real link would) instead of Vessel buffering without
//! bound or dropping frames, and the byte stream never loses its framing.
//!
//! A hostile or broken peer: a length prefix of 0 or above [`MAX_FRAME_LEN`] shuts the
//! connection down (the buffer is never sized by what the peer says). End of file, a bad prefix
//! or a socket error close the backend for good: a read then fails (the worker says so once
//! and stops polling the socket, so nothing spins) and every send fails (the frame is dropped
//! and counted; the device's warning is rate-limited). The connection is not made again: the
//! VM keeps running without a network until it is restored or migrated onto a new one.
//!
//! No offloads: on receive the device gets a zero virtio-net header (a complete frame with its
//! checksums), on transmit the header is checked and stripped. [`NetBackend::takes_offloads`]
//! is false, so the device offers the guest neither checksum nor segmentation offloads, and
//! [`NetBackend::set_offload`] accepts none.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{NetBackend, HDR_LEN, MAX_FRAME_LEN};
use crate::bus::lock;

/// Bytes of the length prefix before each frame.
pub const PREFIX_LEN: usize = 4;

/// How long a connect waits for a peer whose backlog is full.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// `flags` of the virtio-net header: the driver left the checksum to the device.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `gso_type` of the virtio-net header: not a segmentation offload.
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// What goes wrong on a stream socket.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the peer announced a frame of {0} bytes (1 to {MAX_FRAME_LEN} are possible): connection dropped")]
    BadLength(u32),
    #[error("a frame of {0} bytes cannot be sent (1 to {MAX_FRAME_LEN} are possible)")]
    FrameLength(usize),
    #[error("{0} bytes: shorter than a virtio-net header")]
    NoHeader(usize),
    #[error("the frame asks for a checksum or segmentation offload, which a stream socket does not take")]
    Offload,
    #[error("a stream socket takes no offloads (asked for {0:#x})")]
    NoOffloads(u32),
    #[error("connection closed: {0}")]
    Closed(String),
}

impl StreamError {
    fn io(self, kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, self)
    }
}

/// Puts frames back together from a byte stream read in pieces of any size.
///
/// Use: while [`FrameReader::frame`] has no frame, read into [`FrameReader::space`] and report
/// the bytes with [`FrameReader::filled`]; take a frame, then [`FrameReader::consume`] it.
pub struct FrameReader {
    /// A prefix, a frame of [`MAX_FRAME_LEN`] bytes at most and the next prefix.
    buf: Box<[u8]>,
    /// Bytes of `buf` read.
    have: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader {
            buf: vec![0; PREFIX_LEN + MAX_FRAME_LEN + PREFIX_LEN].into_boxed_slice(),
            have: 0,
        }
    }

    /// The length the current frame's prefix announces, once the prefix is in.
    fn announced(&self) -> Result<Option<usize>, StreamError> {
        if self.have < PREFIX_LEN {
            return Ok(None);
        }
        let n = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        match usize::try_from(n) {
            Ok(len) if (1..=MAX_FRAME_LEN).contains(&len) => Ok(Some(len)),
            _ => Err(StreamError::BadLength(n)),
        }
    }

    /// Where the next bytes from the stream go: the rest of the prefix, or the rest of the
    /// frame and the next frame's prefix; never more. Empty after a bad prefix, and while a
    /// whole frame and the next prefix wait to be taken.
    pub fn space(&mut self) -> &mut [u8] {
        let end = match self.announced() {
            Ok(None) => PREFIX_LEN,
            Ok(Some(n)) => PREFIX_LEN + n + PREFIX_LEN,
            Err(_) => self.have,
        };
        &mut self.buf[self.have..end]
    }

    /// `n` bytes were read into [`FrameReader::space`] (at most its length).
    pub fn filled(&mut self, n: usize) {
        let room = self.space().len();
        debug_assert!(n <= room, "{n} bytes filled into {room}");
        self.have += n.min(room);
    }

    /// The next whole frame, once it is in; an error for a prefix no frame may have.
    pub fn frame(&self) -> Result<Option<&[u8]>, StreamError> {
        Ok(match self.announced()? {
            Some(n) if self.have >= PREFIX_LEN + n => Some(&self.buf[PREFIX_LEN..PREFIX_LEN + n]),
            _ => None,
        })
    }

    /// Drops the frame [`FrameReader::frame`] returned, keeping what follows it.
    pub fn consume(&mut self) {
        if let Ok(Some(n)) = self.announced() {
            let end = PREFIX_LEN + n;
            if self.have >= end {
                self.buf.copy_within(end..self.have, 0);
                self.have -= end;
            }
        }
    }

    /// Bytes held of a frame not yet whole (0 between frames).
    pub fn partial(&self) -> usize {
        self.have
    }
}

/// Writes frames, each with its prefix, to a non-blocking byte stream; what the stream does
/// not take at once is kept and written before anything else.
pub struct FrameWriter {
    /// The unwritten end of the last frame (its prefix included), `done` bytes of it written.
    pending: Vec<u8>,
    done: usize,
}

impl Default for FrameWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameWriter {
    pub fn new() -> FrameWriter {
        FrameWriter {
            pending: Vec::with_capacity(PREFIX_LEN + MAX_FRAME_LEN),
            done: 0,
        }
    }

    /// Bytes of an earlier frame still to write.
    pub fn pending(&self) -> usize {
        self.pending.len() - self.done
    }

    /// Writes what an earlier [`FrameWriter::send`] left; `Ok(true)` once nothing is left,
    /// `Ok(false)` while the stream would block.
    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<bool> {
        while self.done < self.pending.len() {
            match w.write(&self.pending[self.done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pending.clear();
        self.done = 0;
        Ok(true)
    }

    /// Sends `frame` with its prefix: what the stream does not take now is kept for
    /// [`FrameWriter::flush`]. `WouldBlock` (nothing of `frame` taken) while an earlier frame
    /// is unfinished; `InvalidInput` for an empty frame or one above [`MAX_FRAME_LEN`].
    pub fn send(&mut self, w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
        if frame.is_empty() || frame.len() > MAX_FRAME_LEN {
            return Err(StreamError::FrameLength(frame.len()).io(io::ErrorKind::InvalidInput));
        }
        if !self.flush(w)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let prefix = (frame.len() as u32).to_be_bytes();
        let written = loop {
            match w.write_vectored(&[IoSlice::new(&prefix), IoSlice::new(frame)]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if written < PREFIX_LEN {
            self.pending.extend_from_slice(&prefix[written..]);
            self.pending.extend_from_slice(frame);
        } else if written < PREFIX_LEN + frame.len() {
            self.pending
                .extend_from_slice(&frame[written - PREFIX_LEN..]);
        }
        Ok(())
    }
}

/// The frame of a packet from the device (virtio-net header + frame), if its header asks for
/// nothing a stream cannot do.
fn strip_header(packet: &[u8]) -> Result<&[u8], StreamError> {
    if packet.len() < HDR_LEN {
        return Err(StreamError::NoHeader(packet.len()));
    }
    let (flags, gso_type) = (packet[0], packet[1]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return Err(StreamError::Offload);
    }
    Ok(&packet[HDR_LEN..])
}

struct Io {
    reader: FrameReader,
    writer: FrameWriter,
    /// Why the connection is over, once it is.
    closed: Option<String>,
}

/// A connected stream socket as a network device's backend (one queue pair).
pub struct StreamBackend {
    sock: UnixStream,
    io: Mutex<Io>,
}

/// A non-blocking connection to the Unix socket at `path` (`EAGAIN` when its backlog is full,
/// rather than blocking).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let addr = socket2::SockAddr::unix(path)?;
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.connect(&addr)?;
    Ok(UnixStream::from(OwnedFd::from(s)))
}

impl StreamBackend {
    /// The backend on `sock`, made non-blocking.
    pub fn new(sock: UnixStream) -> io::Result<StreamBackend> {
        sock.set_nonblocking(true)?;
        Ok(StreamBackend {
            sock,
            io: Mutex::new(Io {
                reader: FrameReader::new(),
                writer: FrameWriter::new(),
                closed: None,
            }),
        })
    }

    /// Connects to the listening socket at `path`; a peer whose backlog is full is tried again
    /// for a few seconds.
    pub fn connect(path: &Path) -> Result<StreamBackend, StreamError> {
        let failed = |source| StreamError::Connect {
            path: path.display().to_string(),
            source,
        };
        let deadline = Instant::now() + CONNECT_WAIT;
        let sock = loop {
            match connect_nonblocking(path) {
                Ok(s) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(failed(e)),
            }
        };
        StreamBackend::new(sock).map_err(failed)
    }

    /// Ends the connection for good (the peer sees it closed).
    fn close(&self, io: &mut Io, why: String) {
        if io.closed.is_none() {
            let _ = self.sock.shutdown(Shutdown::Both);
            io.closed = Some(why);
        }
    }

    fn closed_error(why: &str, kind: io::ErrorKind) -> io::Error {
        StreamError::Closed(why.to_string()).io(kind)
    }
}

/// Why a failed write ends the connection.
fn write_failed(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
            "the peer closed the connection".to_string()
        }
        _ => format!("write: {e}"),
    }
}

impl NetBackend for StreamBackend {
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut io = lock(&self.io);
        loop {
            if let Some(why) = &io.closed {
                return Err(Self::closed_error(why, io::ErrorKind::NotConnected));
            }
            let copied = match io.reader.frame() {
                Ok(Some(frame)) => {
                    // A buffer shorter than the packet gets what fits (the caller's contract).
                    let n = (HDR_LEN + frame.len()).min(buf.len());
                    let hdr = HDR_LEN.min(n);
                    buf[..hdr].fill(0);
                    buf[hdr..n].copy_from_slice(&frame[..n - hdr]);
                    Some(n)
                }
                Ok(None) => None,
                Err(e) => {
                    let why = e.to_string();
                    self.close(&mut io, why);
                    return Err(e.io(io::ErrorKind::InvalidData));
                }
            };
            if let Some(n) = copied {
                io.reader.consume();
                return Ok(n);
            }
            match (&self.sock).read(io.reader.space()) {
                Ok(0) => {
                    let why = match io.reader.partial() {
                        0 => "the peer closed the connection".to_string(),
                        n => format!(
                            "the peer closed the connection in the middle of a frame ({n} bytes of it read)"
                        ),
                    };
                    self.close(&mut io, why.clone());
                    return Err(Self::closed_error(&why, io::ErrorKind::UnexpectedEof));
                }
                Ok(n) => io.reader.filled(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(&mut io, format!("read: {e}"));
                    return Err(e);
                }
            }
        }
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let frame = strip_header(buf).map_err(|e| e.io(io::ErrorKind::InvalidInput))?;
        let mut io = lock(&self.io);
        if let Some(why) = &io.closed {
            return Err(Self::closed_error(why, io::ErrorKind::BrokenPipe));
        }
        match io.writer.send(&mut &self.sock, frame) {
            Ok(()) => Ok(buf.len()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::InvalidInput
                ) =>
            {
                Err(e)
            }
            Err(e) => {
                self.close(&mut io, write_failed(&e));
                Err(e)
            }
        }
    }

    fn flush(&self) -> io::Result<bool> {
        let mut io = lock(&self.io);
        if let Some(why) = &io.closed {
            return Err(Self::closed_error(why, io::ErrorKind::BrokenPipe));
        }
        match io.writer.flush(&mut &self.sock) {
            Ok(done) => Ok(done),
            Err(e) => {
                self.close(&mut io, write_failed(&e));
                Err(e)
            }
        }
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        if flags == 0 {
            Ok(())
        } else {
            Err(StreamError::NoOffloads(flags).io(io::ErrorKind::Unsupported))
        }
    }

    fn takes_offloads(&self) -> bool {
        false
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
