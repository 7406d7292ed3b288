//! The target side of a live migration.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::types::{MigrationPhase, MigrationRole, MigrationStatus};
use devices::bus::lock;
use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, Hello, Round, Tag};
use super::Outgoing;
use super::{Addr, MigrationError, PageLog, Stream};
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

fn accept(l: &Listener) -> Result<Stream, MigrationError> {
    let err = |source| MigrationError::Connect {
        addr: "incoming migration".to_string(),
        source,
    };
    Ok(match l {
        Listener::Tcp(t) => {
            let (s, _) = t.accept().map_err(err)?;
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
        Listener::Unix(u, _) => Stream::Unix(u.accept().map_err(err)?.0),
    })
}

/// Tells the source why the target gives up, and returns the error.
fn refuse(stream: &mut Stream, e: MigrationError) -> MigrationError {
    let _ = protocol::write_frame(stream, Tag::Error, &[e.to_string().as_bytes()]);
    e
}

/// Receives one migration on `listener` and returns the VM, ready to run (the source has
/// committed). The host-side settings (console, API socket) come from `opts`.
pub fn receive(
    listener: &Listener,
    opts: &RestoreOptions,
    start: Instant,
    status: &Mutex<MigrationStatus>,
) -> Result<Vm, MigrationError> {
    let update = |f: &dyn Fn(&mut MigrationStatus)| f(&mut lock(status));
    *lock(status) = MigrationStatus {
        phase: MigrationPhase::Listening,
        role: Some(MigrationRole::Receive),
        ..Default::default()
    };
    let mut stream = accept(listener)?;
    let began = Instant::now();
    update(&|s| s.phase = MigrationPhase::Setup);
    let mut buf = Vec::new();
    protocol::expect(&mut stream, &mut buf, Tag::Hello)?;
    let hello: Hello = protocol::json(&buf)?;
    if hello.magic != protocol::MAGIC || hello.version != protocol::VERSION {
        return Err(refuse(
            &mut stream,
            protocol::ProtocolError::Bad(format!(
                "migration protocol {} version {} (from Vessel {}); this Vessel speaks version {}",
                hello.magic,
                hello.version,
                hello.vessel_version,
                protocol::VERSION
            ))
            .into(),
        ));
    }
    let full_digest = hello.full_digest;
    let config: VmConfig = match serde_json::from_value(hello.config) {
        Ok(c) => c,
        Err(e) => {
            return Err(refuse(
                &mut stream,
                MigrationError::Build(format!("configuration: {e}")),
            ))
        }
    };
    let mem = match GuestMem::from_ranges(&arch::layout::ram_ranges(config.memory)) {
        Ok(m) => m,
        Err(e) => {
            return Err(refuse(
                &mut stream,
                MigrationError::Build(format!("{} MiB of memory: {e}", config.memory >> 20)),
            ))
        }
    };
    if config.thp {
        // Fewer faults as the pages arrive, and the guest keeps the source's page size.
        hypervisor::mem::advise_hugepages(&mem, true);
    }
    // The KVM half of the machine now, not in the downtime; a host that cannot build it
    // refuses before any page is sent.
    let kvm = match KvmMachine::build(&config, &mem) {
        Ok(k) => k,
        Err(e) => return Err(refuse(&mut stream, MigrationError::Build(e.to_string()))),
    };
    update(&|s| {
        s.total_bytes = config.memory;
        s.phase = MigrationPhase::Precopy;
        s.round = 1;
    });
    protocol::write_frame(&mut stream, Tag::Ready, &[])?;

    let ram: Vec<(u64, u64)> = arch::layout::ram_ranges(config.memory)
        .iter()
        .map(|(a, l)| (a.0, *l as u64))
        .collect();
    let mut received = 0u64;
    let mut log = PageLog::new(&mem);
    let mut postcopy: Option<super::postcopy::DirtySet> = None;
    let state = loop {
        match protocol::read_frame(&mut stream, &mut buf)? {
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
    let snap: VmSnapshot = match serde_json::from_slice(&state) {
        Ok(s) => s,
        Err(e) => {
            return Err(refuse(
                &mut stream,
                MigrationError::Build(format!("state: {e}")),
            ))
        }
    };
    let mut config = snap.config.clone();
    config.console = opts.console.clone();
    config.api_socket = opts.api_socket.clone();
    config.on_reboot = crate::config::OnReboot::Exit;
    // The source holds its disks' locks until it exits; it has flushed and stopped its
    // devices, and never writes again once it commits.
    config.skip_disk_locks = true;
    // Post-copy: the missing pages fault into the pager, which fetches them from the source
    // once it commits.
    let mut pager = None;
    let mut live = None;
    if let Some(set) = postcopy {
        let out = Arc::new(Outgoing::default());
        *lock(&out.status) = lock(status).clone();
        let regions = layout_of(&mem);
        let started = super::postcopy::Fetcher::new(&stream, set.clone(), out.clone()).and_then(
            |(fetcher, go)| {
                let p = Pager::serve(
                    &mem,
                    &regions,
                    Box::new(fetcher),
                    Some(&|g| !set.contains(g)),
                )
                .map_err(|e| MigrationError::Build(format!("userfaultfd: {e}")))?;
                Ok((p, go))
            },
        );
        match started {
            Ok((p, go)) => {
                pager = Some(p);
                live = Some((out, go));
            }
            Err(e) => return Err(refuse(&mut stream, e)),
        }
    }
    let mut vm = match Vm::create_restored(Some(kvm), config, mem, pager, start, &snap) {
        Ok(vm) => vm,
        Err(e) => return Err(refuse(&mut stream, MigrationError::Build(e.to_string()))),
    };
    tracing::debug!(
        "incoming stop-and-copy: digest {:?}, VM built and restored {:?}",
        digested_at - state_at,
        digested_at.elapsed()
    );
    // The source compares the digests and commits, or aborts.
    protocol::write_frame(&mut stream, Tag::Ready, &[&sum.to_le_bytes()])?;
    protocol::expect(&mut stream, &mut buf, Tag::Commit)?;
    if let Some((out, go)) = live {
        // From here the stream is the pager's.
        protocol::write_frame(&mut stream, Tag::Resumed, &[])?;
        go.store(true, std::sync::atomic::Ordering::SeqCst);
        out.update(|s| {
            s.phase = MigrationPhase::Postcopy;
            s.elapsed_ms = began.elapsed().as_millis() as u64;
        });
        update(&|s| s.phase = MigrationPhase::Postcopy);
        vm.set_incoming_live(out);
        return Ok(vm);
    }
    let _ = protocol::write_frame(&mut stream, Tag::Resumed, &[]);
    update(&|s| {
        s.phase = MigrationPhase::Completed;
        s.elapsed_ms = began.elapsed().as_millis() as u64;
    });
    Ok(vm)
}
