//! Where a network device's frames go: [`NetBackend`], implemented by a tap queue and by a
//! stream socket ([`super::stream::StreamBackend`]: passt, QEMU's `-netdev stream` peers).
//! Tests use a datagram socket pair too, which keeps frame boundaries as a tap does.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// One queue of a frame-oriented, non-blocking backend. Each frame read or written starts with
/// the 12-byte virtio-net header.
pub trait NetBackend: Send + Sync {
    /// The file descriptor that polls readable when a frame is waiting.
    fn raw_fd(&self) -> RawFd;
    /// Read one frame into `buf`; `WouldBlock` when there is none. A frame longer than `buf` may
    /// be truncated to its length.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one frame. A backend on a byte stream may keep the part the stream does not take
    /// now, to finish in [`NetBackend::flush`].
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
    /// Write what an earlier [`NetBackend::send`] kept. `Ok(false)` while some of it is still to
    /// go: the caller sends nothing more until then, and polls [`NetBackend::raw_fd`] for
    /// writability meanwhile. Backends that take each frame whole have nothing kept.
    fn flush(&self) -> io::Result<bool> {
        Ok(true)
    }
    /// Accept these offloads (`TUN_F_*`) in received frames. Backends without offloads accept
    /// them all: their frames never need them.
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
    /// Whether the backend honours the checksum and segmentation fields of the virtio-net
    /// header (a tap's kernel does). Without, the device offers the guest none of those
    /// offloads, either way, and never asks [`NetBackend::set_offload`] for any.
    fn takes_offloads(&self) -> bool {
        true
    }
    /// Attach (deliver frames to) or detach this queue of a multi-queue backend.
    fn set_queue_enabled(&self, _enabled: bool) -> io::Result<()> {
        Ok(())
    }
    /// Whether this queue is attached (see [`NetBackend::set_queue_enabled`]).
    fn is_enabled(&self) -> bool {
        true
    }
}

fn tap_err(e: ::net::TapError) -> io::Error {
    match e {
        ::net::TapError::Ioctl { source, .. } => source,
        e => io::Error::other(e),
    }
}

impl NetBackend for ::net::Tap {
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.write(buf)
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        ::net::Tap::set_offload(self, flags).map_err(tap_err)
    }
    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        ::net::Tap::set_queue_enabled(self, enabled).map_err(tap_err)
    }
    fn is_enabled(&self) -> bool {
        self.queue_enabled()
    }
}

impl NetBackend for std::os::unix::net::UnixDatagram {
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::os::unix::net::UnixDatagram::recv(self, buf)
    }
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        std::os::unix::net::UnixDatagram::send(self, buf)
    }
}
