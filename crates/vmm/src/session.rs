//! The VMM process and its control API across the VM's life.
//!
//! The API server talks to an [`ApiSwitch`], which forwards every call to what the process is
//! now: [`Empty`] (`vessel serve`, before a snapshot is restored or a migration received), the
//! running VM's [`crate::api::VmHandle`], or [`Ended`] once the VM has stopped (info still
//! answers, with the exit reason). So one socket serves the whole life of the process.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use api::types::{
    ApiError, BalloonInfo, BalloonSetRequest, MigrateReceiveRequest, MigrateReceiveResponse,
    MigrateSendRequest, MigrationStatus, MigrationToken, RestoreRequest, SnapshotRequest,
    VmCounters, VmDocument, VmInfo, VmState,
};
use api::VmController;
use devices::bus::lock;

use crate::exit::ExitReason;
use crate::migration::Canceller;
use crate::vm::{Error, RestoreOptions, Vm};

/// Forwards API calls to the current controller.
pub struct ApiSwitch {
    current: RwLock<Arc<dyn VmController>>,
}

impl ApiSwitch {
    pub fn new(initial: Arc<dyn VmController>) -> Self {
        ApiSwitch {
            current: RwLock::new(initial),
        }
    }

    /// Sends later calls to `c` (calls in progress finish on the previous one).
    pub fn set(&self, c: Arc<dyn VmController>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = c;
    }

    fn now(&self) -> Arc<dyn VmController> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl VmController for ApiSwitch {
    fn info(&self) -> Result<VmInfo, ApiError> {
        self.now().info()
    }
    fn boot(&self, doc: VmDocument) -> Result<(), ApiError> {
        self.now().boot(doc)
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.now().pause()
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.now().resume()
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.now().shutdown()
    }
    fn reset(&self) -> Result<(), ApiError> {
        self.now().reset()
    }
    fn snapshot(&self, req: SnapshotRequest) -> Result<(), ApiError> {
        self.now().snapshot(req)
    }
    fn restore(&self, req: RestoreRequest) -> Result<(), ApiError> {
        self.now().restore(req)
    }
    fn migrate_send(&self, req: MigrateSendRequest) -> Result<(), ApiError> {
        self.now().migrate_send(req)
    }
    fn migrate_receive(
        &self,
        req: MigrateReceiveRequest,
    ) -> Result<MigrateReceiveResponse, ApiError> {
        self.now().migrate_receive(req)
    }
    fn migration_status(&self) -> Result<MigrationStatus, ApiError> {
        self.now().migration_status()
    }
    fn migrate_cancel(&self) -> Result<(), ApiError> {
        self.now().migrate_cancel()
    }
    fn balloon(&self) -> Result<BalloonInfo, ApiError> {
        self.now().balloon()
    }
    fn set_balloon(&self, req: BalloonSetRequest) -> Result<(), ApiError> {
        self.now().set_balloon(req)
    }
    fn counters(&self) -> Result<VmCounters, ApiError> {
        self.now().counters()
    }
}

/// What `vessel serve` is asked to start.
pub enum Start {
    Boot(Box<VmDocument>),
    Restore(RestoreRequest),
    /// Answered once listening; the VM starts when the migration completes.
    MigrateReceive(MigrateReceiveRequest),
}

type Reply = mpsc::Sender<Result<(), ApiError>>;

/// The process before it has a VM: only a restore (or, later, an incoming migration) does
/// anything; it is handed to the main thread, which answers once the VM is built.
pub struct Empty {
    requests: Mutex<mpsc::Sender<(Start, Reply)>>,
    started: Instant,
    busy: AtomicBool,
    /// The incoming migration's progress.
    migration: Arc<Mutex<MigrationStatus>>,
    /// Cancels the incoming migration, while it can be.
    incoming: Mutex<Option<Arc<Canceller>>>,
}

const NO_VM: &str =
    "no VM yet: boot one (vm.boot), restore a snapshot (vm.restore) or receive a migration first";

impl Empty {
    fn start(&self, what: Start) -> Result<(), ApiError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(ApiError::conflict("a VM is already being started"));
        }
        let (tx, rx) = mpsc::channel();
        let sent = lock(&self.requests).send((what, tx));
        let result = match sent {
            Ok(()) => rx
                .recv()
                .unwrap_or_else(|_| Err(ApiError::internal("the VMM stopped"))),
            Err(_) => Err(ApiError::internal("the VMM stopped")),
        };
        if result.is_err() {
            self.busy.store(false, Ordering::SeqCst);
        }
        result
    }
}

impl VmController for Empty {
    fn info(&self) -> Result<VmInfo, ApiError> {
        Ok(VmInfo {
            state: VmState::Empty,
            vcpus: 0,
            memory_bytes: 0,
            boot_time_ms: None,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            devices: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            exit_reason: None,
            pager: None,
        })
    }
    fn pause(&self) -> Result<(), ApiError> {
        Err(ApiError::conflict(NO_VM))
    }
    fn resume(&self) -> Result<(), ApiError> {
        Err(ApiError::conflict(NO_VM))
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        Err(ApiError::conflict(NO_VM))
    }
    fn reset(&self) -> Result<(), ApiError> {
        Err(ApiError::conflict(NO_VM))
    }
    fn snapshot(&self, _req: SnapshotRequest) -> Result<(), ApiError> {
        Err(ApiError::conflict(NO_VM))
    }
    fn boot(&self, doc: VmDocument) -> Result<(), ApiError> {
        self.start(Start::Boot(Box::new(doc)))
    }
    fn restore(&self, req: RestoreRequest) -> Result<(), ApiError> {
        self.start(Start::Restore(req))
    }
    fn migrate_send(&self, _req: MigrateSendRequest) -> Result<(), ApiError> {
        Err(ApiError::conflict(NO_VM))
    }
    fn migrate_receive(
        &self,
        mut req: MigrateReceiveRequest,
    ) -> Result<MigrateReceiveResponse, ApiError> {
        let token = match req.token.take() {
            Some(t) => {
                crate::migration::seal::check_token(t.expose())
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                t
            }
            None => MigrationToken(
                crate::migration::seal::new_token()
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            ),
        };
        req.token = Some(token.clone());
        self.start(Start::MigrateReceive(req))?;
        Ok(MigrateReceiveResponse { token })
    }
    fn migration_status(&self) -> Result<MigrationStatus, ApiError> {
        Ok(lock(&self.migration).clone())
    }
    fn counters(&self) -> Result<VmCounters, ApiError> {
        Err(ApiError::conflict(NO_VM))
    }
    fn migrate_cancel(&self) -> Result<(), ApiError> {
        match lock(&self.incoming).as_ref() {
            Some(c) if c.cancel() => Ok(()),
            Some(_) => Err(ApiError::conflict(
                "the target is ready and the source decides now: cancel on the source",
            )),
            None => Err(ApiError::conflict("no migration is running")),
        }
    }
}

/// The process after its VM stopped (until it exits): info says how it ended, counters are
/// the last values.
pub struct Ended {
    pub info: VmInfo,
    /// None before the VM ran.
    pub counters: Option<VmCounters>,
}

impl Ended {
    fn gone(&self) -> ApiError {
        ApiError::conflict(format!(
            "the VM has stopped: {}",
            self.info.exit_reason.as_deref().unwrap_or("")
        ))
    }
}

impl VmController for Ended {
    fn info(&self) -> Result<VmInfo, ApiError> {
        Ok(self.info.clone())
    }
    fn pause(&self) -> Result<(), ApiError> {
        Err(self.gone())
    }
    fn resume(&self) -> Result<(), ApiError> {
        Err(self.gone())
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        Err(self.gone())
    }
    fn reset(&self) -> Result<(), ApiError> {
        Err(self.gone())
    }
    fn snapshot(&self, _req: SnapshotRequest) -> Result<(), ApiError> {
        Err(self.gone())
    }
    fn restore(&self, _req: RestoreRequest) -> Result<(), ApiError> {
        Err(self.gone())
    }
    fn migrate_send(&self, _req: MigrateSendRequest) -> Result<(), ApiError> {
        Err(self.gone())
    }
    fn migrate_receive(
        &self,
        _req: MigrateReceiveRequest,
    ) -> Result<MigrateReceiveResponse, ApiError> {
        Err(self.gone())
    }
    fn migration_status(&self) -> Result<MigrationStatus, ApiError> {
        Ok(MigrationStatus::default())
    }
    fn migrate_cancel(&self) -> Result<(), ApiError> {
        Err(self.gone())
    }
    fn counters(&self) -> Result<VmCounters, ApiError> {
        self.counters.clone().ok_or_else(|| self.gone())
    }
}

/// `vessel serve`: an API on `socket` and no VM until one is booted, restored or received
/// through it; then runs that VM to its end. `opts` are the host-side settings of the VM to
/// come (console, ...); `bundled` the kernel a spec that names none boots.
pub fn serve(
    socket: &Path,
    opts: RestoreOptions,
    bundled: Option<(&'static str, &'static [u8])>,
    start: Instant,
) -> Result<ExitReason, Error> {
    let (tx, rx) = mpsc::channel::<(Start, Reply)>();
    let migration = Arc::new(Mutex::new(MigrationStatus::default()));
    let empty = Arc::new(Empty {
        requests: Mutex::new(tx),
        started: start,
        busy: AtomicBool::new(false),
        migration: migration.clone(),
        incoming: Mutex::new(None),
    });
    let switch = Arc::new(ApiSwitch::new(empty.clone()));
    // The stop signals before the socket: whoever sees the socket may signal at once.
    let stop = crate::vm::stop_flags()?;
    let server = api::server::serve(socket, switch.clone())?;
    let result = loop {
        if let Some(sig) = stop.iter().find(|(_, f)| f.load(Ordering::SeqCst)) {
            break Ok(ExitReason::Signal(sig.0));
        }
        let (what, reply) = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(Error::Io {
                    what: "the API stopped",
                    source: std::io::Error::other("request channel closed"),
                })
            }
        };
        match what {
            Start::Boot(doc) => match boot_config(*doc, &opts, socket, bundled) {
                Ok(config) => match Vm::build(config, start) {
                    Ok(vm) => {
                        let _ = reply.send(Ok(()));
                        break vm.run_attached(&switch);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::bad_request(e.to_string())));
                    }
                },
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Start::Restore(req) => {
                let mut o = opts.clone();
                o.memory = req.memory;
                match Vm::restore(&req.dir, o, start) {
                    Ok(vm) => {
                        let _ = reply.send(Ok(()));
                        break vm.run_attached(&switch);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::bad_request(e.to_string())));
                    }
                }
            }
            Start::MigrateReceive(req) => {
                let listener = match crate::migration::listen(&req.listen) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::bad_request(e.to_string())));
                        continue;
                    }
                };
                let cancel = Arc::new(Canceller::default());
                *lock(&empty.incoming) = Some(cancel.clone());
                let _ = reply.send(Ok(()));
                // SIGINT/SIGTERM cancel a migration still waiting or receiving.
                let received = on_stop_signal(&stop, &cancel, || {
                    crate::migration::receive(&listener, &req, &opts, start, &migration, &cancel)
                });
                *lock(&empty.incoming) = None;
                match received {
                    Ok(mut vm) => {
                        drop(listener);
                        vm.set_incoming_migration(lock(&migration).clone());
                        break vm.run_attached(&switch);
                    }
                    Err(e) => {
                        let cancelled = cancel.is_cancelled();
                        let mut s = lock(&migration);
                        if cancelled {
                            tracing::info!("incoming migration cancelled");
                            s.phase = api::types::MigrationPhase::Cancelled;
                        } else {
                            tracing::warn!("incoming migration failed: {e}");
                            s.phase = api::types::MigrationPhase::Failed;
                            s.error = Some(e.to_string());
                        }
                    }
                }
            }
        }
        // Ready for another request.
        empty.busy.store(false, Ordering::SeqCst);
    };
    server.stop();
    result
}

/// The configuration of the VM `doc` describes in this process: its console is the
/// document's or the process's, its API socket the process's own.
fn boot_config(
    doc: VmDocument,
    opts: &RestoreOptions,
    socket: &Path,
    bundled: Option<(&'static str, &'static [u8])>,
) -> Result<crate::config::VmConfig, ApiError> {
    if doc
        .bindings
        .api_socket
        .as_deref()
        .is_some_and(|p| p != socket)
    {
        return Err(ApiError::bad_request(
            "bindings.api_socket: the VM's API is this socket; leave it out",
        ));
    }
    let mut config = crate::config::VmConfig::new(doc.spec, doc.bindings);
    if config.bindings.console.is_none() {
        config.bindings.console = Some(opts.console.clone());
    }
    config.bindings.api_socket = Some(socket.to_path_buf());
    config.bundled_kernel = bundled;
    Ok(config)
}

/// Runs `f` while a watcher cancels `cancel` when one of the stop signals' `flags` is raised.
fn on_stop_signal<T>(
    flags: &[(i32, Arc<AtomicBool>)],
    cancel: &Canceller,
    f: impl FnOnce() -> T,
) -> T {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            if let Err(e) = jail::seccomp::enter(jail::seccomp::ThreadClass::Main) {
                tracing::error!("{e}");
                return;
            }
            while !done.load(Ordering::SeqCst) {
                if flags.iter().any(|(_, f)| f.load(Ordering::SeqCst)) {
                    cancel.cancel();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let r = f();
        done.store(true, Ordering::SeqCst);
        r
    })
}
