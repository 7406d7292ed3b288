//! Tap devices through `/dev/net/tun`.
//!
//! A [`Tap`] is one queue of a tap interface: a non-blocking file on which each `read` returns
//! one frame and each `write` sends one, both prefixed by a virtio-net header of
//! [`VNET_HDR_LEN`] bytes (`IFF_VNET_HDR` with `TUNSETVNETHDRSZ`): the kernel honours the
//! header's checksum and segmentation fields on writes and fills them on reads for the offloads
//! enabled with [`Tap::set_offload`]. A multi-queue interface (`IFF_MULTI_QUEUE`) has one file
//! per queue; the kernel spreads received traffic over the attached ones.
//!
//! Opening an interface that does not exist creates it (non-persistent: it goes away with the
//! last file); opening an existing one (`ip tuntap add ... mode tap [multi_queue]`) attaches to
//! it, which needs the same single/multi-queue mode.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes of the virtio-net header on every frame (`struct virtio_net_hdr_v1`, with
/// `num_buffers`: the header of virtio 1.x devices).
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name (`IFNAMSIZ` less the terminating NUL).
pub const MAX_NAME_LEN: usize = 15;
/// Most queues of one multi-queue tap (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_QUEUES: usize = 256;

/// `TUNSETOFFLOAD` flags (linux/if_tun.h).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

// linux/if_tun.h
const IFF_TAP: i16 = 0x0002;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

// _IOW('T', n, int) / _IOW('T', n, unsigned int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name '{0}': 1 to 15 characters, no '/', ':', whitespace or NUL")]
    InvalidName(String),
    #[error("tap {name}: {queues} queues requested; 1 to {MAX_QUEUES} are possible")]
    Queues { name: String, queues: usize },
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as `TUNSETIFF` and `TUNSETQUEUE` use it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

// The ioctl request numbers encode the argument sizes.
const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// `struct ifreq` as `SIOCSIFHWADDR` uses it: the name and a `struct sockaddr`.
#[repr(C)]
struct IfReqHw {
    name: [u8; libc::IFNAMSIZ],
    family: libc::sa_family_t,
    addr: [u8; 14],
    _pad: [u8; 8],
}

const _: () = assert!(std::mem::size_of::<IfReqHw>() == 40);

/// The MAC address of the host's side of a VM's tap: the guest's with the first byte 0xfe,
/// as libvirt makes it. The tap keeps one address across restarts, restores and migrations
/// of the VM (so the guest's neighbour entry for a host-routed tap stays right), and a
/// bridge, whose address is its lowest port's unless set, never takes it.
pub fn host_mac(guest: crate::MacAddr) -> crate::MacAddr {
    let mut b = guest.bytes();
    b[0] = 0xfe;
    crate::MacAddr(b)
}

/// Checks an interface name the way the kernel will take it.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName(name.to_string()))
    }
}

/// One queue of a tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// Whether the queue is attached (the kernel refuses to attach or detach twice).
    attached: AtomicBool,
}

impl Tap {
    /// Opens (creating it if needed) tap `name` with `queues` queues (multi-queue when more
    /// than one), each non-blocking, with virtio-net headers of [`VNET_HDR_LEN`] bytes and no
    /// offloads yet.
    ///
    /// A single queue is opened multi-queue too when the interface allows it (it is new, or
    /// was made multi-queue), so that another process can attach a queue of its own: the target
    /// of a live migration on the same host. An existing single-queue tap is opened as such.
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        check_name(name)?;
        if queues == 0 || queues > MAX_QUEUES {
            return Err(TapError::Queues {
                name: name.to_string(),
                queues,
            });
        }
        if queues > 1 {
            return Tap::open_with(name, queues, true);
        }
        match Tap::open_with(name, 1, true) {
            Err(TapError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Tap::open_with(name, 1, false)
            }
            r => r,
        }
    }

    fn open_with(name: &str, queues: usize, multi: bool) -> Result<Vec<Tap>, TapError> {
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multi {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut taps = Vec::with_capacity(queues);
        for _ in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = IfReq::new(name, flags);
            // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one (40 bytes, the
            // name NUL-terminated since check_name bounds it to 15 bytes) and lives through the
            // call. The fd is ours and open.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
            let tap = Tap {
                file,
                name: name.to_string(),
                attached: AtomicBool::new(true),
            };
            tap.check(
                rc,
                "TUNSETIFF (attach; an existing tap needs the same queue mode)",
            )?;
            let tap = Tap {
                name: req.name(),
                ..tap
            };
            tap.set_vnet_hdr_size(VNET_HDR_LEN as i32)?;
            tap.set_offload(0)?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Creates multi-queue tap `name`, persistent and owned by `uid`:`gid`, so that a process
    /// of that user with no capabilities can attach to it (a jailed VMM), with MAC address
    /// `mac` if given. Returns false without touching it when an interface of that name exists
    /// already.
    pub fn create_persistent(
        name: &str,
        uid: u32,
        gid: u32,
        mac: Option<crate::MacAddr>,
    ) -> Result<bool, TapError> {
        check_name(name)?;
        if exists(name) {
            return Ok(false);
        }
        let tap = Tap::open_with(name, 1, true)?.remove(0);
        if let Some(m) = mac {
            tap.set_mac(m)?;
        }
        let fd = tap.file.as_raw_fd();
        for (req, arg, what) in [
            (TUNSETOWNER, libc::c_ulong::from(uid), "TUNSETOWNER"),
            (TUNSETGROUP, libc::c_ulong::from(gid), "TUNSETGROUP"),
            (TUNSETPERSIST, 1, "TUNSETPERSIST"),
        ] {
            // SAFETY: TUNSETOWNER, TUNSETGROUP and TUNSETPERSIST take their argument by value;
            // `fd` is the tap's, open.
            let rc = unsafe { libc::ioctl(fd, req, arg) };
            tap.check(rc, what)?;
        }
        Ok(true)
    }

    /// Removes persistent tap `name` (made by [`Tap::create_persistent`]), if it exists.
    pub fn remove_persistent(name: &str) -> Result<(), TapError> {
        check_name(name)?;
        if !exists(name) {
            return Ok(());
        }
        let tap = Tap::open_with(name, 1, true)?.remove(0);
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETPERSIST, 0 as libc::c_ulong) };
        tap.check(rc, "TUNSETPERSIST")
    }

    /// Opens single-queue tap `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let mut v = Tap::open_queues(name, 1)?;
        Ok(v.remove(0))
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name (as the kernel gave it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the interface's own MAC address (`SIOCSIFHWADDR`, which the tun driver takes on
    /// its file).
    pub fn set_mac(&self, mac: crate::MacAddr) -> Result<(), TapError> {
        let mut req = IfReqHw {
            name: [0; libc::IFNAMSIZ],
            family: libc::ARPHRD_ETHER,
            addr: [0; 14],
            _pad: [0; 8],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        req.addr[..6].copy_from_slice(&mac.bytes());
        // SAFETY: SIOCSIFHWADDR reads a `struct ifreq` holding a `struct sockaddr`; `req` is
        // one (40 bytes) and lives through the call. The fd is ours and open.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::SIOCSIFHWADDR,
                &req as *const IfReqHw,
            )
        };
        self.check(rc, "SIOCSIFHWADDR")
    }

    /// Sets the length of the virtio-net header on each frame.
    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), TapError> {
        let v: libc::c_int = size;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `v` for
        // the whole call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &v as *const i32) };
        self.check(rc, "TUNSETVNETHDRSZ")
    }

    /// Sets the offloads the reader accepts (`TUN_F_*`): which checksum-less and GSO frames the
    /// kernel may hand to [`Tap::read`]. Applies to the whole interface.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long); no memory is
        // passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        self.check(rc, "TUNSETOFFLOAD")
    }

    /// Attaches this queue to its multi-queue interface (the kernel delivers frames to it) or
    /// detaches it; nothing if it already is. Single-queue taps refuse.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        if self.attached.load(Ordering::SeqCst) == enabled {
            return Ok(());
        }
        let flags = if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        let mut req = IfReq::new("", flags);
        // SAFETY: TUNSETQUEUE reads a `struct ifreq` (only its flags); `req` is one and lives
        // through the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req as *mut IfReq) };
        self.check(rc, "TUNSETQUEUE")?;
        self.attached.store(enabled, Ordering::SeqCst);
        Ok(())
    }

    /// Whether this queue is attached (queues of a single-queue tap always are).
    pub fn queue_enabled(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    /// Reads one frame (with its header); `WouldBlock` when none is queued. A frame longer than
    /// `buf` is truncated by the kernel.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (with its header), gathered from `bufs`.
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(bufs)
    }

    /// Writes one frame (with its header).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Whether a network interface `name` exists in this network namespace.
pub fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated name that lives through the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_host_side_mac_is_the_guests_with_fe_first() {
        let g: crate::MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(host_mac(g).to_string(), "fe:54:00:12:34:56");
    }

    use super::*;

    fn have_tun() -> bool {
        // Creating interfaces needs CAP_NET_ADMIN; without it the tap tests are skipped.
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .is_ok()
            && Tap::open(&format!("vtn{}", std::process::id() % 100_000)).is_ok()
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "x:1", "has space", ".", "..", "sixteen-chars-xx"] {
            assert!(
                matches!(check_name(bad), Err(TapError::InvalidName(_))),
                "{bad}"
            );
        }
        check_name("vtap0").unwrap();
        assert!(matches!(
            Tap::open_queues("vtap0", 0),
            Err(TapError::Queues { .. })
        ));
    }

    #[test]
    fn a_persistent_tap_outlives_its_file_until_removed() {
        if !have_tun() {
            eprintln!("skipped: no /dev/net/tun or no CAP_NET_ADMIN");
            return;
        }
        let name = format!("vtp{}", std::process::id() % 100_000);
        let mac: crate::MacAddr = "fe:54:00:00:00:07".parse().unwrap();
        assert!(Tap::create_persistent(&name, 4242, 4243, Some(mac)).unwrap());
        assert!(exists(&name), "gone with its file");
        let owner = std::fs::read_to_string(format!("/sys/class/net/{name}/owner")).unwrap();
        assert_eq!(owner.trim(), "4242");
        let address = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap();
        assert_eq!(address.trim(), "fe:54:00:00:00:07");
        // Made already: left alone.
        assert!(!Tap::create_persistent(&name, 1, 1, None).unwrap());
        // A multi-queue persistent tap takes the VMM's queues.
        drop(Tap::open_queues(&name, 2).unwrap());
        Tap::remove_persistent(&name).unwrap();
        assert!(!exists(&name));
        Tap::remove_persistent(&name).unwrap();
    }

    #[test]
    fn open_configure_and_use_a_tap() {
        if !have_tun() {
            eprintln!("skipped: no /dev/net/tun or no CAP_NET_ADMIN");
            return;
        }
        let name = format!("vtq{}", std::process::id() % 100_000);
        let qs = Tap::open_queues(&name, 2).unwrap();
        assert_eq!(qs[0].name(), name);
        for q in &qs {
            q.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
                .unwrap();
        }
        qs[1].set_queue_enabled(false).unwrap();
        qs[1].set_queue_enabled(true).unwrap();
        // Nothing to read on an interface that is down.
        let mut buf = [0u8; 128];
        let e = qs[0].read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // Another single-queue open of a multi-queue tap attaches one more queue (a
        // migration target on the same host).
        let third = Tap::open(&name).unwrap();
        assert_eq!(third.name(), name);
        drop(third);
        // A tap made single-queue takes no second opener.
        let single = format!("vts{}", std::process::id() % 100_000);
        let s1 = Tap::open_with(&single, 1, false).unwrap();
        assert!(matches!(Tap::open(&single), Err(TapError::Ioctl { .. })));
        drop(s1);
        // Kernel-chosen names.
        let t = Tap::open("vtk%d").unwrap();
        assert!(t.name().starts_with("vtk") && !t.name().contains('%'));
    }
}
