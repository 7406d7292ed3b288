//! The host side of virtio-vsock: stream connections between the guest and Unix sockets, as in
//! Firecracker.
//!
//! - Guest-initiated: a REQUEST to host port N connects to the Unix socket `<path>_N`; RESPONSE
//!   if that works, RST if not (also when the service's backlog is full: connecting never blocks).
//! - Host-initiated: a client of the Unix socket `<path>` writes `CONNECT <port>\n`; a REQUEST
//!   goes to the guest from a fresh host port, and when the guest answers with RESPONSE the
//!   client reads `OK <host port>\n` and the stream is connected.
//!
//! Flow control is virtio's credit scheme: the guest may have at most [`CONN_BUF_ALLOC`] bytes
//! in flight towards a connection (buffered here until the socket takes them, so memory per
//! connection is bounded); the guest's own `buf_alloc`/`fwd_cnt` limit what is read from the
//! socket for it. A guest that overruns its credit, or sends anything that makes no sense for
//! the connection's state, gets an RST.
//!
//! The muxer knows nothing of virtqueues: [`Muxer::send_pkt`] takes the guest's packets,
//! [`Muxer::recv_pkt`] produces the guest's next packet. Unix sockets are non-blocking and
//! registered edge-triggered in the muxer's epoll; [`Muxer::handle_event`] takes their events.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;
use super::HOST_CID;

/// Receive space offered to the guest per connection (its credit).
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// A credit update is sent when this much was forwarded since the guest last heard.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Most payload bytes in one packet either way.
pub const MAX_PKT_PAYLOAD: usize = 64 << 10;
/// Most open connections.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most control packets waiting for receive buffers; more are dropped.
pub const MAX_PENDING_CONTROL: usize = 2048;
/// How long a REQUEST or a SHUTDOWN waits for the guest's answer before an RST.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Epoll tokens below this are the worker's; a stream's token is this plus its fd.
pub const TOKEN_STREAM_BASE: u64 = 16;
/// The listener's token.
pub const TOKEN_LISTENER: u64 = 4;

/// A connection: the host port and the guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for RESPONSE until the deadline.
    Connecting(Instant),
    Established,
    /// The host side closed, SHUTDOWN sent; the guest's RST is awaited until the deadline.
    Closing(Instant),
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Guest-to-host bytes the socket has not taken yet (at most [`CONN_BUF_ALLOC`]).
    tx_buf: VecDeque<u8>,
    /// Guest bytes forwarded to the socket, and the value the guest last heard.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Host-to-guest bytes sent, and the guest's credit information.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// In the ready list (or to be put there when credit comes).
    in_ready: bool,
    credit_blocked: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, peer: &Header) -> Conn {
        Conn {
            stream,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: peer.fwd_cnt,
            peer_shutdown: 0,
            in_ready: false,
            credit_blocked: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// A control packet waiting for a receive buffer; credit fields are filled in when it goes.
#[derive(Debug, Clone, Copy)]
struct Control {
    key: ConnKey,
    op: u16,
    flags: u32,
}

enum Owner {
    /// Accepted on the listener, `CONNECT` line not complete yet.
    Pending(UnixStream, Vec<u8>, Instant),
    Conn(ConnKey),
}

/// Errors of the muxer's setup.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("epoll: {0}")]
    Epoll(#[source] io::Error),
    #[error("listener: {0}")]
    Listener(#[source] io::Error),
}

/// The host side of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: Option<UnixListener>,
    conns: HashMap<ConnKey, Conn>,
    fds: HashMap<RawFd, Owner>,
    control: VecDeque<Control>,
    ready: VecDeque<ConnKey>,
    next_local_port: u32,
}

impl Muxer {
    /// A muxer for the guest `guest_cid`, connecting to `<uds_path>_<port>` and accepting host
    /// clients on `listener` (already bound to `uds_path`).
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: Option<UnixListener>,
    ) -> Result<Muxer, MuxerError> {
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        if let Some(l) = &listener {
            l.set_nonblocking(true).map_err(MuxerError::Listener)?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    l.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
                )
                .map_err(MuxerError::Epoll)?;
        }
        Ok(Muxer {
            guest_cid,
            uds_path,
            epoll,
            listener,
            conns: HashMap::new(),
            fds: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// The epoll the worker waits on (it adds its own fds with tokens below
    /// [`TOKEN_STREAM_BASE`], other than [`TOKEN_LISTENER`]).
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= MAX_PENDING_CONTROL {
            crate::warn_limited!("virtio-vsock: too many packets for the guest; op {op} dropped");
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    fn rst(&mut self, key: ConnKey) {
        self.push_control(key, OP_RST, 0);
    }

    fn register(&mut self, fd: RawFd, owner: Owner) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, TOKEN_STREAM_BASE + fd as u64),
        )?;
        self.fds.insert(fd, owner);
        Ok(())
    }

    /// Forget a connection (closing its socket), without telling the guest.
    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.fds.remove(&fd);
        }
    }

    /// Reset a connection: RST to the guest, socket closed.
    fn kill(&mut self, key: ConnKey) {
        self.remove(key);
        self.rst(key);
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_ready {
                c.in_ready = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Take one packet from the guest. Malformed or unexpected packets are dropped or answered
    /// with RST.
    pub fn send_pkt(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                "virtio-vsock: packet from cid {} to cid {} dropped",
                hdr.src_cid,
                hdr.dst_cid
            );
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.rst(key);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match hdr.op {
                OP_REQUEST => self.connect_to_host(key, hdr),
                OP_RST => {}
                _ => self.rst(key),
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        if c.credit_blocked && c.peer_credit() > 0 {
            c.credit_blocked = false;
            self.mark_ready(key);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        match (hdr.op, c.state) {
            (OP_RESPONSE, State::Connecting(_)) => {
                c.state = State::Established;
                let line = format!("OK {}\n", key.local_port);
                // A fresh socket has room for one short line; if not, the client is gone.
                match c.stream.write(line.as_bytes()) {
                    Ok(n) if n == line.len() => self.mark_ready(key),
                    _ => self.kill(key),
                }
            }
            (OP_RST, _) => self.remove(key),
            (OP_SHUTDOWN, State::Established | State::Closing(_)) => {
                c.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    let _ = flush(c);
                    self.kill(key);
                } else if c.peer_shutdown & SHUTDOWN_SEND != 0 && c.tx_buf.is_empty() {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            (OP_RW, State::Established) => {
                let room = (CONN_BUF_ALLOC as usize).saturating_sub(c.tx_buf.len());
                if payload.len() > room || c.peer_shutdown & SHUTDOWN_SEND != 0 {
                    tracing::debug!(
                        "virtio-vsock: {key:?} overran its credit or sent after shutdown"
                    );
                    self.kill(key);
                    return;
                }
                c.tx_buf.extend(payload);
                self.flush_conn(key);
            }
            (OP_RW, State::Closing(_)) => {
                // The host side is gone; the data has nowhere to go. Count it as taken.
                c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.push_control(key, OP_CREDIT_UPDATE, 0),
            _ => self.kill(key),
        }
    }

    fn connect_to_host(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.rst(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(&PathBuf::from(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("virtio-vsock: {}: {e}", PathBuf::from(path).display());
                self.rst(key);
                return;
            }
        };
        if self.register(stream.as_raw_fd(), Owner::Conn(key)).is_err() {
            self.rst(key);
            return;
        }
        self.conns
            .insert(key, Conn::new(stream, State::Established, hdr));
        self.push_control(key, OP_RESPONSE, 0);
        self.mark_ready(key);
    }

    /// Write what the socket takes of a connection's buffered guest data.
    fn flush_conn(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if flush(c).is_err() {
            self.kill(key);
            return;
        }
        if c.tx_buf.is_empty() && c.peer_shutdown & SHUTDOWN_SEND != 0 {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            c.last_fwd_cnt_sent = c.fwd_cnt;
            self.push_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// Whether there is something for the guest (a receive buffer would be used).
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    fn header(&mut self, key: ConnKey, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(c) => {
                c.last_fwd_cnt_sent = c.fwd_cnt;
                (CONN_BUF_ALLOC, c.fwd_cnt)
            }
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// The guest's next packet, its payload (at most `max_payload` bytes) in `payload`.
    pub fn recv_pkt(&mut self, max_payload: usize, payload: &mut Vec<u8>) -> Option<Header> {
        payload.clear();
        loop {
            if let Some(ctl) = self.control.pop_front() {
                return Some(self.header(ctl.key, ctl.op, ctl.flags, 0));
            }
            let key = self.ready.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_ready = false;
            if c.state != State::Established || c.peer_shutdown & SHUTDOWN_RCV != 0 {
                continue;
            }
            let credit = c.peer_credit() as usize;
            if credit == 0 {
                if !c.credit_blocked {
                    c.credit_blocked = true;
                    self.push_control(key, OP_CREDIT_REQUEST, 0);
                }
                continue;
            }
            let n = max_payload.min(credit).min(MAX_PKT_PAYLOAD);
            if n == 0 {
                // No room at all in this receive buffer: try again with the next.
                c.in_ready = true;
                self.ready.push_front(key);
                return None;
            }
            payload.resize(n, 0);
            match c.stream.read(&mut payload[..]) {
                Ok(0) => {
                    // The host side closed: tell the guest, wait for its RST.
                    payload.clear();
                    c.state = State::Closing(Instant::now() + ANSWER_TIMEOUT);
                    self.push_control(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                }
                Ok(k) => {
                    payload.truncate(k);
                    c.rx_cnt = c.rx_cnt.wrapping_add(k as u32);
                    // There may be more: come back after the others had a turn.
                    c.in_ready = true;
                    self.ready.push_back(key);
                    return Some(self.header(key, OP_RW, 0, k as u32));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => payload.clear(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    payload.clear();
                    self.mark_ready(key);
                }
                Err(_) => {
                    payload.clear();
                    self.kill(key);
                }
            }
        }
    }

    /// Handle an epoll event with a token of the muxer's.
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == TOKEN_LISTENER {
            self.accept();
            return;
        }
        let Some(fd) = token
            .checked_sub(TOKEN_STREAM_BASE)
            .and_then(|fd| RawFd::try_from(fd).ok())
        else {
            return;
        };
        match self.fds.get(&fd) {
            Some(Owner::Conn(key)) => {
                let key = *key;
                if events.intersects(EventSet::OUT) {
                    self.flush_conn(key);
                }
                if events.intersects(
                    EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR,
                ) {
                    self.mark_ready(key);
                }
            }
            Some(Owner::Pending(..)) => self.read_connect_line(fd),
            None => {}
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.fds.len() >= 2 * MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let deadline = Instant::now() + ANSWER_TIMEOUT;
            let fd = stream.as_raw_fd();
            if self
                .register(fd, Owner::Pending(stream, Vec::new(), deadline))
                .is_err()
            {
                continue;
            }
            // Edge-triggered: the line may be there already.
            self.read_connect_line(fd);
        }
    }

    /// Read a pending client's `CONNECT <port>\n` a byte at a time (so that no stream data after
    /// it is taken), then start the connection.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(Owner::Pending(stream, line, _)) = self.fds.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(line),
                Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => break None,
            }
        };
        let Some(Owner::Pending(stream, ..)) = self.fds.remove(&fd) else {
            return;
        };
        let Some(port) = port else {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let Some(local_port) = self.alloc_local_port(port) else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        self.fds.insert(fd, Owner::Conn(key));
        let hdr = Header::default();
        let state = State::Connecting(Instant::now() + ANSWER_TIMEOUT);
        self.conns.insert(key, Conn::new(stream, state, &hdr));
        self.push_control(key, OP_REQUEST, 0);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    /// Expire connections whose answer did not come; returns the time until the next deadline.
    pub fn tick(&mut self, now: Instant) -> Option<Duration> {
        let mut next: Option<Instant> = None;
        let mut expired = Vec::new();
        for (key, c) in &self.conns {
            if let State::Connecting(d) | State::Closing(d) = c.state {
                if d <= now {
                    expired.push(*key);
                } else {
                    next = Some(next.map_or(d, |n| n.min(d)));
                }
            }
        }
        for key in expired {
            self.kill(key);
        }
        let stale: Vec<RawFd> = self
            .fds
            .iter()
            .filter_map(|(fd, o)| match o {
                Owner::Pending(_, _, d) if *d <= now => Some(*fd),
                Owner::Pending(_, _, d) => {
                    next = Some(next.map_or(*d, |n| n.min(*d)));
                    None
                }
                _ => None,
            })
            .collect();
        for fd in stale {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.fds.remove(&fd);
        }
        next.map(|d| d.saturating_duration_since(now))
    }
}

/// A non-blocking connection to the Unix socket at `path`. A service whose backlog is full
/// refuses at once (`EAGAIN`) instead of blocking the device until it accepts: Unix stream
/// sockets connect synchronously otherwise, with no `EINPROGRESS`.
fn connect_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    let addr = socket2::SockAddr::unix(path)?;
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.connect(&addr)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(s)))
}

/// Write the connection's buffered bytes until the socket would block.
fn flush(c: &mut Conn) -> io::Result<()> {
    while !c.tx_buf.is_empty() {
        let (a, _) = c.tx_buf.as_slices();
        match c.stream.write(a) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.tx_buf.drain(..n);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    s.strip_prefix("CONNECT ")?.trim().parse().ok()
}
