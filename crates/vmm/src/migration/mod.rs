//! Live migration between two Vessel processes ([`protocol`] says what crosses the wire).
//!
//! - **Source** ([`send`]): `vm.migrate-send` on a running VM. Pre-copy: all used memory, then
//!   round after round the pages the guest dirtied meanwhile (KVM's dirty log), until what is
//!   left would take less than the downtime limit at the measured bandwidth (or 30 rounds have
//!   passed); then stop-and-copy: the vCPUs park, the last dirty pages and the whole device
//!   and vCPU state go over, the target checks a digest of memory and state, and the source
//!   commits and exits. Dirty pages come from [`crate::dirty::DirtyTracker`]: KVM's log of the
//!   vCPUs' writes and vm-memory's of the device threads', so guest I/O goes on during
//!   pre-copy; the device threads pause (finishing the I/O in flight) only for stop-and-copy.
//! - **Target** ([`receive`]): `vessel serve` + `vm.migrate-receive`: listens, receives into
//!   fresh memory, builds the same machine and loads the state, and runs it once the source
//!   commits.
//!
//! - **Post-copy** ([`postcopy`], on request): instead of stop-and-copy, the VM runs on the
//!   target at once and its missing pages come from the source on demand.
//!
//! Every connection starts with [`seal`]'s handshake (both sides prove they hold the
//! migration's token) and every frame after it is encrypted and authenticated.
//!
//! Any failure before the commit leaves the VM running on the source and nothing on the
//! target; after it, only the target runs the VM (after a post-copy commit, a broken
//! connection loses the VM on both sides).

pub mod bindings;
pub mod postcopy;
pub mod protocol;
mod receive;
pub mod seal;
mod send;

pub use receive::{listen, receive, Listener};
pub use send::{send, Outgoing};

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use devices::bus::lock;

use guestmem::GuestMem;

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("invalid address '{0}': expected tcp:HOST:PORT or unix:PATH")]
    Address(String),
    #[error("{addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error(transparent)]
    Auth(#[from] seal::AuthError),
    #[error("this host's resources for the VM: {0}")]
    Bind(#[from] bindings::BindError),
    #[error(transparent)]
    Kvm(#[from] hypervisor::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("cannot build the VM on the target: {0}")]
    Build(String),
    #[error("the target's copy does not match the source's (memory and state digests differ)")]
    Digest,
    #[error("cancelled")]
    Cancelled,
    #[error(
        "pre-copy did not converge by round {rounds}: the last round would pause the VM for \
         {expected_ms} ms, over the {limit_ms} ms limit (raise the limit, or choose \
         stop-and-copy or post-copy for this case)"
    )]
    NotConverged {
        rounds: u32,
        expected_ms: u64,
        limit_ms: u64,
    },
    #[error("reading guest memory at {0:#x}")]
    Memory(u64),
    #[error("handing the disks over: {0}")]
    Disks(String),
    #[error("post-copy failed after the VM moved to the target: {0}")]
    Postcopy(String),
}

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(String),
    Unix(PathBuf),
}

impl Addr {
    pub fn parse(s: &str) -> Result<Addr, MigrationError> {
        match s.split_once(':') {
            Some(("tcp", a)) if a.contains(':') => Ok(Addr::Tcp(a.to_string())),
            Some(("unix", p)) if !p.is_empty() => Ok(Addr::Unix(PathBuf::from(p))),
            _ => Err(MigrationError::Address(s.to_string())),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn connect(addr: &Addr) -> Result<Stream, MigrationError> {
        let err = |source| MigrationError::Connect {
            addr: addr.to_string(),
            source,
        };
        let stream = match addr {
            Addr::Tcp(a) => {
                let s = connect_tcp(a).map_err(err)?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(err)?),
        };
        stream.set_timeout(Some(IO_TIMEOUT)).map_err(err)?;
        Ok(stream)
    }

    /// Read and write time limits (none: wait for ever). Until the commit both sides keep
    /// [`IO_TIMEOUT`], so a peer that goes silent fails the migration instead of hanging it;
    /// after it the stream may idle (post-copy waits for page requests).
    pub(crate) fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Ends the connection both ways: blocked reads and writes on every handle return.
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits on a silent peer before the commit.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects to `addr` (`HOST:PORT`), each of its addresses in turn, within
/// [`CONNECT_TIMEOUT`] each.
fn connect_tcp(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the name has no address")))
}

/// The cancel switch of one side of a migration. Cancelling before the point of no return
/// shuts the connection down, so a side blocked on its peer (connecting, waiting for a frame,
/// sending) stops at once; [`Canceller::disarm`] marks that point (the source's commit, the
/// target's last `Ready`), after which cancel is refused.
#[derive(Default)]
pub struct Canceller(Mutex<CancelState>);

#[derive(Default)]
struct CancelState {
    cancelled: bool,
    disarmed: bool,
    conn: Option<Stream>,
}

impl Canceller {
    /// Cancels, unless past the point of no return; returns whether it did.
    pub fn cancel(&self) -> bool {
        let mut s = lock(&self.0);
        if s.disarmed {
            return false;
        }
        s.cancelled = true;
        if let Some(c) = s.conn.take() {
            c.shutdown();
        }
        true
    }

    pub fn is_cancelled(&self) -> bool {
        lock(&self.0).cancelled
    }

    /// Fails with [`MigrationError::Cancelled`] if cancelled.
    pub fn check(&self) -> Result<(), MigrationError> {
        if self.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// Watches `stream` (a clone of it is shut down on cancel).
    pub(crate) fn attach(&self, stream: &Stream) -> Result<(), MigrationError> {
        let clone = stream.try_clone().map_err(|e| MigrationError::Connect {
            addr: "migration stream".to_string(),
            source: e,
        })?;
        let mut s = lock(&self.0);
        if s.cancelled {
            clone.shutdown();
            return Err(MigrationError::Cancelled);
        }
        s.conn = Some(clone);
        Ok(())
    }

    /// Lets the connection go (the migration failed): nothing is left to cancel.
    pub(crate) fn release(&self) {
        let mut s = lock(&self.0);
        s.disarmed = true;
        s.conn = None;
    }

    /// The point of no return: fails if cancelled already, else refuses every later cancel.
    pub(crate) fn disarm(&self) -> Result<(), MigrationError> {
        let mut s = lock(&self.0);
        if s.cancelled {
            return Err(MigrationError::Cancelled);
        }
        s.disarmed = true;
        s.conn = None;
        Ok(())
    }
}

impl Stream {
    /// A second handle on the same connection (one thread reads while another writes).
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// The switch-over digest both sides compare: the page `log` (pages as sent or received) and
/// `state`, or with `full` all of guest memory ([`digest_skipping`]); the pages at the guest
/// addresses `skip` names are left out (post-copy: the target does not have them yet).
pub(super) fn switch_digest(
    mem: &GuestMem,
    log: &PageLog,
    state: &[u8],
    full: bool,
    skip: impl Fn(u64) -> bool,
) -> Result<u32, MigrationError> {
    if full {
        digest_skipping(mem, state, skip)
    } else {
        Ok(log.digest_skipping(state, skip))
    }
}

/// A digest of guest memory and the state bytes, the same on both sides when the copy is
/// exact: CRC-32 over the address and contents of every page that is not all zeroes (pages
/// never touched are skipped without being faulted in), except the pages at the guest
/// addresses `skip` names (post-copy: the target does not have them yet). Source and target
/// compute it at the same time, during stop-and-copy.
pub fn digest_skipping(
    mem: &GuestMem,
    state: &[u8],
    skip: impl Fn(u64) -> bool,
) -> Result<u32, MigrationError> {
    let page = hypervisor::mem::PAGE_SIZE as usize;
    let mut h = crc32fast::Hasher::new();
    crate::snapshot::memory::scan_used(mem, MigrationError::Memory, |addr, chunk, used| {
        for (i, p) in chunk.chunks(page).enumerate().filter(|(i, _)| used[*i]) {
            let a = addr + (i * page) as u64;
            if !skip(a) {
                h.update(&a.to_le_bytes());
                h.update(p);
            }
        }
        Ok(())
    })?;
    h.update(state);
    Ok(h.finalize())
}

/// The CRC-32 of every page (with its address) as the source last sent it, or as the target
/// last received it, indexed by guest page number; never-sent pages stay 0 on both sides.
/// Folded with the state bytes, the two logs give the same digest when every page arrived
/// intact, at a stop-and-copy cost of 4 bytes a page rather than a pass over all of memory
/// (the pages themselves are hashed as they go, during pre-copy). It trusts the dirty log to
/// name every page that changed; [`digest`] (`full_digest`) checks that too.
pub struct PageLog {
    crcs: Vec<u32>,
}

impl PageLog {
    /// A log covering every page of `mem`.
    pub fn new(mem: &GuestMem) -> PageLog {
        use vm_memory::GuestMemoryBackend;
        let end = mem.last_addr().0.saturating_add(1);
        PageLog {
            crcs: vec![0; end.div_ceil(hypervisor::mem::PAGE_SIZE) as usize],
        }
    }

    /// Notes the contents of the pages `data` holds from guest address `addr` (page-aligned).
    pub fn record(&mut self, addr: u64, data: &[u8]) {
        let page = hypervisor::mem::PAGE_SIZE;
        for (i, p) in data.chunks(page as usize).enumerate() {
            let a = addr + i as u64 * page;
            let mut h = crc32fast::Hasher::new();
            h.update(&a.to_le_bytes());
            h.update(p);
            if let Some(e) = self.crcs.get_mut((a / page) as usize) {
                *e = h.finalize();
            }
        }
    }

    /// The digest of the log and `state`.
    pub fn digest(&self, state: &[u8]) -> u32 {
        self.digest_skipping(state, |_| false)
    }

    /// The digest of the log, with the pages at the guest addresses `skip` names counted as
    /// never sent (post-copy: the target does not have them yet), and `state`.
    pub fn digest_skipping(&self, state: &[u8], skip: impl Fn(u64) -> bool) -> u32 {
        // The same bytes as one update per page's CRC, a block at a time: a call per page
        // took milliseconds of the downtime for 1 GiB.
        const PER_BLOCK: usize = 1024;
        let mut h = crc32fast::Hasher::new();
        let mut block = [0u8; PER_BLOCK * 4];
        for (n, crcs) in self.crcs.chunks(PER_BLOCK).enumerate() {
            for (i, c) in crcs.iter().enumerate() {
                let page = (n * PER_BLOCK + i) as u64;
                let c = if skip(page * hypervisor::mem::PAGE_SIZE) {
                    0
                } else {
                    *c
                };
                block[i * 4..i * 4 + 4].copy_from_slice(&c.to_le_bytes());
            }
            h.update(&block[..crcs.len() * 4]);
        }
        h.update(state);
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_logs_agree_only_on_the_same_pages() {
        let mem = GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let (mut a, mut b) = (PageLog::new(&mem), PageLog::new(&mem));
        let page = vec![7u8; 4096];
        a.record(0x3000, &page);
        b.record(0x3000, &page);
        assert_eq!(a.digest(b"s"), b.digest(b"s"));
        assert_ne!(a.digest(b"s"), b.digest(b"t"));
        // The same contents at another address, or other contents: different digests.
        let mut c = PageLog::new(&mem);
        c.record(0x4000, &page);
        assert_ne!(a.digest(b"s"), c.digest(b"s"));
        let mut d = PageLog::new(&mem);
        d.record(0x3000, &[8u8; 4096]);
        assert_ne!(a.digest(b"s"), d.digest(b"s"));
        // A page sent again replaces its entry; out-of-range pages are ignored.
        d.record(0x3000, &page);
        d.record(1 << 30, &page);
        assert_eq!(a.digest(b"s"), d.digest(b"s"));
        // Skipped pages count as never sent.
        d.record(0x5000, &[9u8; 4096]);
        assert_ne!(a.digest(b"s"), d.digest(b"s"));
        assert_eq!(a.digest(b"s"), d.digest_skipping(b"s", |a| a == 0x5000));
    }

    #[test]
    fn the_page_log_digest_is_the_crc_of_each_page_crc_then_the_state() {
        // 3000 pages: more than one block of the digest, and a partial last block.
        let mem = GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 3000 << 12)]).unwrap();
        let mut log = PageLog::new(&mem);
        for p in (0..3000u64).step_by(7) {
            log.record(p << 12, &[p as u8; 4096]);
        }
        let skip = |a: u64| (a >> 12).is_multiple_of(5);
        let mut h = crc32fast::Hasher::new();
        for (i, c) in log.crcs.iter().enumerate() {
            let c = if skip((i as u64) << 12) { 0 } else { *c };
            h.update(&c.to_le_bytes());
        }
        h.update(b"state");
        assert_eq!(log.digest_skipping(b"state", skip), h.finalize());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            Addr::parse("tcp:127.0.0.1:4444").unwrap(),
            Addr::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            Addr::parse("unix:/tmp/m.sock").unwrap(),
            Addr::Unix("/tmp/m.sock".into())
        );
        for bad in ["", "tcp:4444", "unix:", "udp:1:2", "127.0.0.1:4444"] {
            assert!(Addr::parse(bad).is_err(), "{bad}");
        }
    }
}
