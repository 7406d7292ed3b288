//! userfaultfd: guest memory whose missing pages a thread of the VMM supplies.
//!
//! A [`Userfault`] registers every region of a guest memory map (anonymous private memory) in
//! MISSING mode: the first access to a page, by a vCPU, by KVM itself or by a device thread,
//! blocks until the VMM fills the page with [`Userfault::copy`] or [`Userfault::zero`]. Events
//! arrive with [`Userfault::read_event`]; besides page faults, discards (`MADV_DONTNEED`, the
//! balloon's) are reported as [`UffdEvent::Remove`] before the pages go, so the handler can
//! tell a discarded page (which must come back as zeroes) from one never filled.
//!
//! Everything is in guest-physical addresses: the userfaultfd holds a clone of the memory map,
//! so the host mappings it fills stay mapped as long as it lives, and every fill is checked to
//! lie inside one registered region.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use guestmem::GuestMem;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::mem::PAGE_SIZE;

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const _UFFDIO_COPY: u64 = 0x03;
const _UFFDIO_ZEROPAGE: u64 = 0x04;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (packed, 32 bytes): the event byte, then a union whose first words are
/// (flags, address) for a page fault and (start, end) for a remove.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    arg: [u64; 3],
}

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_RW: u64 = 3;
const UFFDIO_API: u64 = ioc(IOC_RW, 0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_RW, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_RW, 0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_RW, 0x04, std::mem::size_of::<UffdioZeropage>());
/// `/dev/userfaultfd`'s one ioctl (Linux 6.1): a new userfaultfd, allowed by the device's
/// file permissions rather than `vm.unprivileged_userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xaa << 8;

/// Errors of userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "userfaultfd is not allowed here ({0}): run as root or with CAP_SYS_PTRACE, set \
         sysctl vm.unprivileged_userfaultfd=1, or give read/write access to /dev/userfaultfd"
    )]
    NotPermitted(io::Error),
    #[error("this kernel has no userfaultfd ({0})")]
    Unsupported(io::Error),
    #[error("userfaultfd {what}: {source}")]
    Op {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{addr:#x}+{len:#x} is not page aligned or not inside one registered region")]
    Range { addr: u64, len: u64 },
}

fn op(what: &'static str) -> impl FnOnce(io::Error) -> UffdError {
    move |source| UffdError::Op { what, source }
}

/// One region of guest memory as registered.
#[derive(Debug, Clone, Copy)]
struct Registered {
    guest: u64,
    host: u64,
    len: u64,
}

/// What the handler has to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// Some thread touched the missing page at this guest address (page aligned).
    Fault(GuestAddress),
    /// `guest..guest+len` is about to be discarded; pages there will fault again.
    Remove { guest: GuestAddress, len: u64 },
}

/// What a fill did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filled {
    /// Bytes now present from the start of the range: filled by this call or already there.
    pub done: u64,
    /// Of those, bytes this call filled.
    pub filled: u64,
}

/// A userfaultfd over the regions of one guest memory map.
pub struct Userfault {
    fd: OwnedFd,
    regions: Vec<Registered>,
    /// Keeps the registered mappings alive as long as fills may target them.
    _mem: Option<GuestMem>,
}

fn new_fd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd system call takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: `fd` is a descriptor the kernel just gave us and nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS) => return Err(UffdError::Unsupported(e)),
        Some(libc::EPERM) => {}
        _ => return Err(op("create")(e)),
    }
    // Not privileged enough for the system call: /dev/userfaultfd may still allow it.
    let dev = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(f) => f,
        Err(_) => return Err(UffdError::NotPermitted(e)),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags by value and returns it.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(UffdError::NotPermitted(io::Error::last_os_error()));
    }
    // SAFETY: as above, a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Userfault {
    /// A new userfaultfd (non-blocking, close-on-exec) with discard events, registered over
    /// nothing yet.
    pub fn new() -> Result<Userfault, UffdError> {
        let fd = new_fd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_EVENT_REMOVE,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is (repr(C), the
        // kernel's layout); it lives across the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if r != 0 {
            return Err(op("API handshake")(io::Error::last_os_error()));
        }
        Ok(Userfault {
            fd,
            regions: Vec::new(),
            _mem: None,
        })
    }

    /// Registers every region of `mem` (anonymous private memory, nothing touched yet) in
    /// MISSING mode. Call once.
    pub fn register(&mut self, mem: &GuestMem) -> Result<(), UffdError> {
        for r in mem.iter() {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| UffdError::Range {
                    addr: r.start_addr().raw_value(),
                    len: r.len(),
                })? as u64;
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: host,
                    len: r.len(),
                },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register` (`reg`, repr(C));
            // the range is one whole mapping of `mem`, which we keep alive (`_mem`) as long as
            // the registration.
            let r2 = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
            if r2 != 0 {
                return Err(op("register")(io::Error::last_os_error()));
            }
            let need = (1u64 << _UFFDIO_COPY) | (1u64 << _UFFDIO_ZEROPAGE);
            if reg.ioctls & need != need {
                return Err(op("register")(io::Error::other(
                    "the kernel offers no UFFDIO_COPY/ZEROPAGE on this memory",
                )));
            }
            self.regions.push(Registered {
                guest: r.start_addr().raw_value(),
                host,
                len: r.len(),
            });
        }
        self._mem = Some(mem.clone());
        Ok(())
    }

    /// The descriptor, to poll for events.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn to_guest(&self, host: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| (r.host..r.host + r.len).contains(&host))
            .map(|r| r.guest + (host - r.host))
    }

    /// The host address of `guest..guest+len`, which must be page aligned and inside one
    /// registered region.
    fn to_host(&self, guest: u64, len: u64) -> Result<u64, UffdError> {
        let bad = || UffdError::Range { addr: guest, len };
        if !guest.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(bad());
        }
        let r = self
            .regions
            .iter()
            .find(|r| (r.guest..r.guest + r.len).contains(&guest))
            .ok_or_else(bad)?;
        if guest + len > r.guest + r.len {
            return Err(bad());
        }
        Ok(r.host + (guest - r.guest))
    }

    /// The next event, or None when there is none now.
    pub fn read_event(&self) -> Result<Option<UffdEvent>, UffdError> {
        loop {
            let mut msg = UffdMsg::default();
            let size = std::mem::size_of::<UffdMsg>();
            // SAFETY: reads at most `size` bytes into `msg`, a plain 32-byte repr(C) value
            // laid out as the kernel's `uffd_msg`.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), size) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(op("read")(e)),
                };
            }
            if n as usize != size {
                return Err(op("read")(io::Error::other("short message")));
            }
            match msg.event {
                UFFD_EVENT_PAGEFAULT => {
                    let host = msg.arg[1] & !(PAGE_SIZE - 1);
                    if let Some(g) = self.to_guest(host) {
                        return Ok(Some(UffdEvent::Fault(GuestAddress(g))));
                    }
                }
                UFFD_EVENT_REMOVE => {
                    let (start, end) = (msg.arg[0], msg.arg[1]);
                    // Clip to the registered region that holds its start.
                    if let Some(r) = self
                        .regions
                        .iter()
                        .find(|r| (r.host..r.host + r.len).contains(&start))
                    {
                        let end = end.min(r.host + r.len);
                        return Ok(Some(UffdEvent::Remove {
                            guest: GuestAddress(r.guest + (start - r.host)),
                            len: end.saturating_sub(start),
                        }));
                    }
                }
                _ => {}
            }
        }
    }

    /// Fills `guest..guest+data.len()` (page aligned, inside one region) with `data`, waking
    /// whoever waits there. Pages already present are left alone and count as done. Stops
    /// early (done < len) when the kernel asks to retry because the memory map is changing
    /// (a discard event is waiting to be read).
    pub fn copy(&self, guest: GuestAddress, data: &[u8]) -> Result<Filled, UffdError> {
        let len = data.len() as u64;
        let host = self.to_host(guest.raw_value(), len)?;
        self.fill(len, |at, n| {
            let mut c = UffdioCopy {
                dst: host + at,
                src: data[at as usize..].as_ptr() as u64,
                len: n,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads one `uffdio_copy` (`c`) and writes its `copy` field;
            // the kernel copies `n` bytes from `data[at..]` (inside `data`, which outlives the
            // call) into `dst..dst+n`, which lies in one registered mapping kept alive by
            // `_mem` (checked by `to_host`). It only fills missing pages atomically; guest
            // memory is never behind a Rust reference.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
            (r, c.copy)
        })
    }

    /// Maps zero pages at `guest..guest+len` (page aligned, inside one region); as
    /// [`Userfault::copy`].
    pub fn zero(&self, guest: GuestAddress, len: u64) -> Result<Filled, UffdError> {
        let host = self.to_host(guest.raw_value(), len)?;
        self.fill(len, |at, n| {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: host + at,
                    len: n,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads one `uffdio_zeropage` (`z`) and writes its
            // `zeropage` field; the range lies in one registered mapping kept alive by `_mem`
            // (checked by `to_host`), where it only maps the zero page over missing pages.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
            (r, z.zeropage)
        })
    }

    /// Runs a fill ioctl `f(offset, len) -> (result, bytes or -errno)` over `len` bytes,
    /// skipping pages already present.
    fn fill(
        &self,
        len: u64,
        mut f: impl FnMut(u64, u64) -> (i32, i64),
    ) -> Result<Filled, UffdError> {
        let mut out = Filled::default();
        while out.done < len {
            let (r, count) = f(out.done, len - out.done);
            if r == 0 {
                out.done = len;
                out.filled += count.max(0) as u64;
                break;
            }
            let e = io::Error::last_os_error();
            if count > 0 {
                // Partial: some pages went in before one that could not.
                out.done += count as u64;
                out.filled += count as u64;
                continue;
            }
            match e.raw_os_error() {
                // Already present (whoever filled it woke its waiters).
                Some(libc::EEXIST) => out.done += PAGE_SIZE,
                Some(libc::EAGAIN) => return Ok(out),
                _ => return Err(op("fill")(e)),
            }
        }
        Ok(out)
    }

    /// Wakes threads waiting on `guest..guest+len` (page aligned, inside one region) without
    /// filling anything (the pages are present already).
    pub fn wake_range(&self, guest: GuestAddress, len: u64) -> Result<(), UffdError> {
        let host = self.to_host(guest.raw_value(), len)?;
        let mut range = UffdioRange { start: host, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range` (`range`); it only wakes threads.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
        if r != 0 {
            return Err(op("wake")(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Whether this process may use userfaultfd on guest memory: creates one and registers a
/// scratch page (for `vessel host-check`).
pub fn probe() -> Result<(), UffdError> {
    let mut u = Userfault::new()?;
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), PAGE_SIZE as usize)])
        .map_err(|e| op("scratch memory")(io::Error::other(e.to_string())))?;
    u.register(&mem)
}
