//! The target side of a live migration.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::types::{MigrateReceiveRequest, MigrationPhase, MigrationRole, MigrationStatus};
use devices::bus::lock;
use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use super::bindings::Bound;
use super::protocol::{self, Hello, Round, Tag};
use super::seal::{Channel, Role};
use super::Outgoing;
use super::{Addr, Canceller, MigrationError, PageLog, Stream};
use crate::config::VmConfig;
use crate::snapshot::memory::layout_of;
use crate::snapshot::pager::Pager;
use crate::snapshot::VmSnapshot;
use crate::vm::{KvmMachine, RestoreOptions, Vm};

/// A bound migration listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds `addr` (a stale Unix socket file is replaced).
pub fn listen(addr: &str) -> Result<Listener, MigrationError> {
    let a = Addr::parse(addr)?;
    let err = |source| MigrationError::Connect {
        addr: addr.to_string(),
        source,
    };
    Ok(match a {
        Addr::Tcp(t) => Listener::Tcp(TcpListener::bind(t).map_err(err)?),
        Addr::Unix(p) => {
            if std::fs::symlink_metadata(&p)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(&p);
            }
            Listener::Unix(UnixListener::bind(&p).map_err(err)?, p)
        }
    })
}

impl Listener {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Listener::Tcp(t) => t.as_fd(),
            Listener::Unix(u, _) => u.as_fd(),
        }
    }
}

/// Waits for the source, checking `cancel` every 100 ms.
fn accept(l: &Listener, cancel: &Canceller) -> Result<Stream, MigrationError> {
    let err = |source| MigrationError::Connect {
        addr: "incoming migration".to_string(),
        source,
    };
    loop {
        cancel.check()?;
        let mut fds = [nix::poll::PollFd::new(l.fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(err(e.into())),
        }
    }
    let stream = match l {
        Listener::Tcp(t) => {
            let (s, _) = t.accept().map_err(err)?;
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
        Listener::Unix(u, _) => Stream::Unix(u.accept().map_err(err)?.0),
    };
    stream.set_timeout(Some(super::IO_TIMEOUT)).map_err(err)?;
    cancel.attach(&stream)?;
    Ok(stream)
}

/// Waits for a source that proves it holds `token`. A connection that fails the handshake
/// (a wrong token, a peer that does not speak it) is refused and closed, the refusal noted
/// in the status, and the listener waits on: a stray peer cannot end the migration.
fn accept_authenticated(
    l: &Listener,
    token: &str,
    cancel: &Canceller,
    status: &Mutex<MigrationStatus>,
) -> Result<Channel, MigrationError> {
    loop {
        let stream = accept(l, cancel)?;
        let peer = match &stream {
            Stream::Tcp(t) => t
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".to_string()),
            Stream::Unix(_) => "a Unix socket peer".to_string(),
        };
        match Channel::handshake(stream, token, Role::Target) {
            Ok(c) => return Ok(c),
            Err(e) => {
                cancel.check()?;
                tracing::warn!("incoming migration: refused a connection from {peer}: {e}");
                lock(status).error = Some(format!("refused a connection from {peer}: {e}"));
            }
        }
    }
}

/// Receives one migration on `listener` and returns the VM, ready to run (the source has
/// committed). The host-side settings (console, API socket) come from `opts`, the token from
/// `req`. `cancel` ends it (waiting for the source, or receiving) until the target says it
/// is ready to run the VM; from then the source decides. Any failure after the handshake is
/// told to the source (an `Error` frame) before the connection closes.
pub fn receive(
    listener: &Listener,
    req: &MigrateReceiveRequest,
    opts: &RestoreOptions,
    start: Instant,
    status: &Mutex<MigrationStatus>,
    cancel: &Canceller,
) -> Result<Vm, MigrationError> {
    *lock(status) = MigrationStatus {
        phase: MigrationPhase::Listening,
        role: Some(MigrationRole::Receive),
        ..Default::default()
    };
    let token = req
        .token
        .as_ref()
        .ok_or_else(|| MigrationError::Build("no migration token".to_string()))?;
    let mut chan = Some(accept_authenticated(
        listener,
        token.expose(),
        cancel,
        status,
    )?);
    lock(status).error = None;
    let result = receive_on(&mut chan, req, opts, start, status, cancel);
    if let (Err(e), Some(c)) = (&result, chan.as_mut()) {
        if !matches!(
            e,
            MigrationError::Protocol(protocol::ProtocolError::Remote(_))
        ) {
            let _ = protocol::write_frame(c, Tag::Error, &[e.to_string().as_bytes()]);
        }
    }
    result
}

/// [`receive`] once the source is authenticated; `chan` is handed to the post-copy pager at
/// the end (it is left empty then).
fn receive_on(
    chan: &mut Option<Channel>,
    req: &MigrateReceiveRequest,
    opts: &RestoreOptions,
    start: Instant,
    status: &Mutex<MigrationStatus>,
    cancel: &Canceller,
) -> Result<Vm, MigrationError> {
    let update = |f: &dyn Fn(&mut MigrationStatus)| f(&mut lock(status));
    let stream = chan
        .as_mut()
        .ok_or_else(|| MigrationError::Build("no connection".to_string()))?;
    let began = Instant::now();
    update(&|s| s.phase = MigrationPhase::Setup);
    let mut buf = Vec::new();
    protocol::expect(stream, &mut buf, Tag::Hello)?;
    let hello: Hello = protocol::json(&buf)?;
    if hello.magic != protocol::MAGIC || hello.version != protocol::VERSION {
        return Err(protocol::ProtocolError::Bad(format!(
            "migration protocol {} version {} (from Vessel {}); this Vessel speaks version {}",
            hello.magic,
            hello.version,
            hello.vessel_version,
            protocol::VERSION
        ))
        .into());
    }
    let full_digest = hello.full_digest;
    let config = VmConfig::new(hello.machine, Default::default());
    // This host's disks, taps and sockets, from the receive request: refused now, before any
    // memory is sent, if they do not fit the machine.
    let bindings = Bound::from_request(req, &config.spec, &hello.source_paths)?;
    let ranges = arch::layout::ram_ranges(config.spec.memory);
    let mem = GuestMem::from_ranges(&ranges).map_err(|e| {
        MigrationError::Build(format!("{} MiB of memory: {e}", config.spec.memory >> 20))
    })?;
    // The source's choice: huge pages (fewer faults as the pages arrive) or none at all.
    hypervisor::mem::advise_hugepages(&mem, config.spec.thp);
    // The KVM half of the machine now, not in the downtime; a host that cannot build it
    // refuses before any page is sent.
    let kvm = KvmMachine::build(&config, &mem).map_err(|e| MigrationError::Build(e.to_string()))?;
    update(&|s| {
        s.total_bytes = config.spec.memory;
        s.phase = MigrationPhase::Precopy;
        s.round = 1;
    });
    protocol::write_frame(stream, Tag::Ready, &[])?;

    let ram: Vec<(u64, u64)> = ranges.iter().map(|(a, l)| (a.0, *l as u64)).collect();
    let mut received = 0u64;
    let mut log = PageLog::new(&mem);
    let mut postcopy: Option<super::postcopy::DirtySet> = None;
    let state = loop {
        match protocol::read_frame(stream, &mut buf)? {
            Tag::Pages => {
                let (addr, data) = protocol::pages(&buf)?;
                mem.write_slice(data, GuestAddress(addr))
                    .map_err(|_| protocol::ProtocolError::Bad(format!("pages at {addr:#x}")))?;
                log.record(addr, data);
                received += data.len() as u64;
                update(&|s| s.transferred_bytes = received);
            }
            Tag::Round => {
                let r: Round = protocol::json(&buf)?;
                update(&|s| {
                    s.round = r.round;
                    s.remaining_bytes = r.remaining_bytes;
                });
            }
            Tag::Postcopy => {
                let set: super::postcopy::DirtySet = protocol::json(&buf)?;
                set.check(&ram)?;
                postcopy = Some(set);
            }
            Tag::State => break std::mem::take(&mut buf),
            other => {
                return Err(protocol::ProtocolError::Unexpected {
                    got: other,
                    want: "pages or state",
                }
                .into())
            }
        }
    };
    update(&|s| s.phase = MigrationPhase::StopAndCopy);
    let state_at = Instant::now();
    let sum = match &postcopy {
        // What the target has of memory (the rest comes later) and the state.
        Some(set) => {
            let sum = super::switch_digest(&mem, &log, &state, full_digest, |a| set.contains(a))?;
            super::postcopy::drop_pages(&mem, set)?;
            sum
        }
        None => super::switch_digest(&mem, &log, &state, full_digest, |_| false)?,
    };
    let digested_at = Instant::now();
    let mut snap: VmSnapshot =
        serde_json::from_slice(&state).map_err(|e| MigrationError::Build(format!("state: {e}")))?;
    bindings.apply(&mut snap)?;
    let mut config = snap.config.clone();
    config.bindings.console = Some(opts.console.clone());
    config.bindings.api_socket = opts.api_socket.clone();
    config.spec.on_reboot = crate::config::OnReboot::Exit;
    // The source has flushed its disks, stopped its devices and released the disks' locks:
    // this side takes them (and fails the migration if someone else has them).
    config.handed_over_disks = true;
    // Post-copy: the missing pages fault into the pager, which fetches them from the source
    // once it commits.
    let mut pager = None;
    let mut live = None;
    if let Some(set) = postcopy {
        let out = Arc::new(Outgoing::default());
        *lock(&out.status) = lock(status).clone();
        let regions = layout_of(&mem);
        let (fetcher, handover) = super::postcopy::Fetcher::new(stream, set.clone(), out.clone())?;
        let p = Pager::serve(
            &mem,
            &regions,
            Box::new(fetcher),
            Some(&|g| !set.contains(g)),
        )
        .map_err(|e| MigrationError::Build(format!("userfaultfd: {e}")))?;
        pager = Some(p);
        live = Some((out, handover));
    }
    let mut vm = Vm::create_restored(Some(kvm), config, mem, pager, start, &snap)
        .map_err(|e| MigrationError::Build(e.to_string()))?;
    tracing::debug!(
        "incoming stop-and-copy: digest {:?}, VM built and restored {:?}",
        digested_at - state_at,
        digested_at.elapsed()
    );
    // The source compares the digests and commits, or aborts: this side cannot cancel any
    // more (the source might commit while it does).
    cancel.disarm()?;
    protocol::write_frame(stream, Tag::Ready, &[&sum.to_le_bytes()])?;
    protocol::expect(stream, &mut buf, Tag::Commit)?;
    // The VM is this side's; the stream may idle (post-copy page requests).
    let _ = stream.set_timeout(None);
    if let Some((out, handover)) = live {
        // From here the stream is the pager's.
        protocol::write_frame(stream, Tag::Resumed, &[])?;
        *lock(&handover) = chan.take();
        out.update(|s| {
            s.phase = MigrationPhase::Postcopy;
            s.elapsed_ms = began.elapsed().as_millis() as u64;
        });
        // Until the API serves the VM, status calls read `status`: the live one's copy (with
        // the pages still missing), not a post-copy phase with nothing remaining.
        let now = out.status();
        update(&|s| *s = now.clone());
        vm.set_incoming_live(out);
        return Ok(vm);
    }
    let _ = protocol::write_frame(stream, Tag::Resumed, &[]);
    update(&|s| {
        s.phase = MigrationPhase::Completed;
        s.elapsed_ms = began.elapsed().as_millis() as u64;
    });
    Ok(vm)
}
