//! Where a network device's frames go: [`NetBackend`], implemented by a tap queue. Tests use a
//! datagram socket pair instead, which keeps frame boundaries the same way.

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
    /// Write one frame.
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
    /// Accept these offloads (`TUN_F_*`) in received frames. Backends without offloads accept
    /// them all: their frames never need them.
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
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
