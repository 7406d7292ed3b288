//! The manager: templates and VMs, their processes, the restart policy and the events.
//!
//! A VM's record says what it should be doing ([`Desired`]); its process, while it runs, is
//! in [`Manager`]'s table and watched by a thread that reports its end at once. An end the
//! daemon did not ask for is a crash: the restart policy decides whether the VM starts again
//! (at most [`RESTARTS`] times in [`RESTART_WINDOW`]). When the daemon starts it adopts the
//! VM processes still running (checked by pid and command line) and starts the VMs that
//! should run and do not, so that restarting the daemon never stops a VM.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use spec::bindings::{Console, HostBindings, VmDocument};
use spec::vm::{Disk, VmSpec};
use tokio::sync::broadcast;

use crate::layout::{check_name, rotate_log, Layout};
use crate::process::{VmProcess, Waiter};
use crate::store::{now_s, Desired, Event, RestartPolicy, Store, StoreError, Template, VmRecord};

/// Restarts allowed within [`RESTART_WINDOW`] before the policy gives up.
pub const RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// How long a new VM process may take to open its API.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors of the manager's operations, each with the HTTP status the API gives it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
}

impl Error {
    pub fn status(&self) -> u16 {
        match self {
            Error::Store(StoreError::NotFound { .. }) => 404,
            Error::Store(StoreError::Exists { .. }) | Error::Conflict(_) => 409,
            Error::BadRequest(_) => 400,
            _ => 500,
        }
    }
}

pub(crate) fn bad(e: impl std::fmt::Display) -> Error {
    Error::BadRequest(e.to_string())
}

/// `POST /api/v1/templates`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateCreate {
    pub name: String,
    /// What VMs made from it are (their disks' options too); defaults as `vessel run`.
    #[serde(default)]
    pub spec: VmSpec,
    /// A base image for each disk (an absolute path, or a volume as `POOL/VOLUME`); a VM
    /// gets a thin qcow2 overlay on each.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub base_disks: Vec<PathBuf>,
    /// Made from this stopped VM instead: its spec, its disks flattened into new bases
    /// (then `spec` and `base_disks` must be left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_vm: Option<String>,
}

/// `POST /api/v1/vms`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    pub name: String,
    /// The template it is made from (thin overlays on its bases); or, for a VM defined
    /// without one (`vessel vm define`), empty, with `spec` and `disks`.
    #[serde(default)]
    pub template: String,
    /// A whole spec instead of a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<VmSpec>,
    /// With `spec`: an image for each of its disks, used in place (absolute paths); they are
    /// the user's and stay when the VM is deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub disks: Vec<PathBuf>,
    /// vCPUs (default: the template's).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory in bytes or with a unit (`"512M"`; default: the template's).
    #[serde(default, with = "spec::size::json::option")]
    #[schema(value_type = Option<u64>)]
    pub memory: Option<u64>,
    /// The kernel command line (default: the template's).
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Start it when the daemon starts.
    #[serde(default)]
    pub autostart: bool,
    /// Lower first among autostarted VMs.
    #[serde(default)]
    pub autostart_order: i64,
    /// Seconds to wait after autostarting it before the next VM starts.
    #[serde(default)]
    pub autostart_delay_s: u64,
    /// The size of its first disk (at least the template's base), in bytes or with a unit
    /// (`"20G"`); default the base's.
    #[serde(default, with = "spec::size::json::option")]
    #[schema(value_type = Option<u64>)]
    pub disk_size: Option<u64>,
    /// Volumes (`POOL/VOLUME`) attached as more disks after the template's; they outlive
    /// the VM.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Start it now.
    #[serde(default)]
    pub start: bool,
    /// Its NICs: a managed network each (`NETWORK[,mac=MAC]`), replacing the template's
    /// NICs (whose options they take, in order); a stable MAC each.
    #[serde(default)]
    pub nets: Vec<String>,
    /// A cloud-init NoCloud seed for it (a read-only `CIDATA` disk after the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::seed::Seed>,
}

/// `PUT /api/v1/vms/{name}/stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the guest has to power off after the ACPI power button before it is stopped
    /// (SIGTERM, then SIGKILL); default 30.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// What a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    /// Its vCPUs are parked (`vessel vm pause`).
    Paused,
    /// Saved to disk; its next start (or the daemon's) restores it.
    Suspended,
    Stopped,
    /// It should run and does not: its process ended and the restart policy gave up (or
    /// says never).
    Crashed,
    /// Being sent to another host's daemon (`vessel vm migrate`).
    Migrating,
    /// Being received from another host's daemon, until the migration completes.
    Incoming,
}

impl VmState {
    pub const ALL: [VmState; 7] = [
        VmState::Running,
        VmState::Paused,
        VmState::Suspended,
        VmState::Stopped,
        VmState::Crashed,
        VmState::Migrating,
        VmState::Incoming,
    ];

    /// The state as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Suspended => "suspended",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Migrating => "migrating",
            VmState::Incoming => "incoming",
        }
    }
}

/// A VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmView {
    #[serde(flatten)]
    pub record: VmRecord,
    pub state: VmState,
    /// Milliseconds since its process started (this daemon's count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// Restarts by the policy within the last minute.
    pub restarts: u32,
    /// Its addresses on its networks (from their DHCP leases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<crate::networks::NicAddress>,
    /// Its directory: disks, snapshots, log.
    #[schema(value_type = String)]
    pub dir: PathBuf,
    #[schema(value_type = String)]
    pub api_socket: PathBuf,
    #[schema(value_type = String)]
    pub console_socket: PathBuf,
}

/// A running VM process.
struct Running {
    process: Arc<VmProcess>,
    started: Instant,
    /// Paused through the daemon.
    paused: bool,
}

/// The manager's live state.
#[derive(Default)]
pub(crate) struct Live {
    running: HashMap<String, Running>,
    /// Recent restarts by the policy, per VM.
    restarts: HashMap<String, VecDeque<Instant>>,
    /// VMs migrating away: an end of their process is the migration's to judge (`Some(ok)`
    /// once it ended, ok for exit code 0), never a crash.
    pub(crate) migrating: HashMap<String, Option<bool>>,
    /// VMs a migration is bringing here, until it completes.
    pub(crate) incoming: HashSet<String>,
}

/// The daemon's core.
pub struct Manager {
    store: Arc<dyn Store>,
    layout: Layout,
    /// The `vessel` binary VM processes run.
    vessel: PathBuf,
    /// How VM processes are jailed (their files are made their users').
    jail: Option<crate::jailing::VmJail>,
    live: Mutex<Live>,
    /// The managed networks' live state ([`crate::networks`]).
    pub(crate) nets: Mutex<crate::networks::NetLive>,
    /// Serializes operations that change a VM (start, stop, delete, the restart policy).
    ops: Mutex<()>,
    events: broadcast::Sender<Event>,
}

impl Manager {
    /// The manager; `jail` (as `vessel run --jail` takes it) starts every VM in a jail.
    pub fn new(
        store: Arc<dyn Store>,
        layout: Layout,
        vessel: PathBuf,
        jail: Option<crate::jailing::VmJail>,
    ) -> Result<Arc<Manager>, Error> {
        Ok(Arc::new(Manager {
            store,
            layout,
            vessel,
            jail,
            live: Mutex::default(),
            nets: crate::networks::new_live(),
            ops: Mutex::new(()),
            events: broadcast::channel(1024).0,
        }))
    }

    pub(crate) fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn ops(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// New events as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether VM `name`'s process runs.
    pub fn is_running(&self, name: &str) -> bool {
        self.live().running.contains_key(name)
    }

    /// Records and announces an event (a store failure is logged, never fatal).
    pub(crate) fn event(&self, subject: &str, kind: &str, message: impl AsRef<str>) {
        let message = message.as_ref();
        tracing::info!("{kind} {subject}: {message}");
        match self.store.add_event(subject, kind, message) {
            Ok(e) => {
                let _ = self.events.send(e);
            }
            Err(e) => tracing::error!("cannot record event {kind} {subject}: {e}"),
        }
    }

    // Templates.

    pub fn create_template(&self, mut req: TemplateCreate) -> Result<Template, Error> {
        check_name(&req.name).map_err(bad)?;
        if let Some(vm) = &req.from_vm {
            if req.spec != VmSpec::default() || !req.base_disks.is_empty() {
                return Err(bad("from_vm: spec and base_disks come from the VM"));
            }
            return self.template_from_vm(&req.name, vm);
        }
        for (i, b) in req.base_disks.iter_mut().enumerate() {
            if b.is_relative() {
                let v = b.to_string_lossy().into_owned();
                *b = self
                    .volume_path(&v)
                    .map_err(|e| bad(format!("base_disks[{i}]: {e}")))?;
            }
        }
        let mut spec = req.spec;
        spec.validate().map_err(|e| bad(format!("spec.{e}")))?;
        if spec.disks.len() > req.base_disks.len() {
            return Err(bad(format!(
                "base_disks: {} given for {} disks",
                req.base_disks.len(),
                spec.disks.len()
            )));
        }
        spec.disks.resize(req.base_disks.len(), Disk::default());
        for (i, b) in req.base_disks.iter().enumerate() {
            if !b.is_absolute() {
                return Err(bad(format!(
                    "base_disks[{i}]: {} is not absolute",
                    b.display()
                )));
            }
            block::ops::info(b, false, false).map_err(|e| bad(format!("base_disks[{i}]: {e}")))?;
        }
        let t = Template {
            name: req.name,
            spec,
            base_disks: req.base_disks,
            created: now_s(),
        };
        self.store.add_template(&t)?;
        self.event(&t.name, "template.created", "");
        Ok(t)
    }

    pub fn delete_template(&self, name: &str) -> Result<(), Error> {
        let users: Vec<String> = self
            .store
            .vms()?
            .into_iter()
            .filter(|v| v.template == name)
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "template {name} is the base of {}",
                users.join(", ")
            )));
        }
        self.store.delete_template(name)?;
        // The bases it made (from a VM); bases it was given stay.
        let _ = std::fs::remove_dir_all(self.layout.template_dir(name));
        self.event(name, "template.deleted", "");
        Ok(())
    }

    // VMs.

    /// Makes a VM from a template: its spec with the request's changes, a thin overlay on
    /// each base disk.
    pub fn create_vm(self: &Arc<Self>, req: VmCreate) -> Result<VmView, Error> {
        check_name(&req.name).map_err(bad)?;
        let t = match (&req.spec, req.template.is_empty()) {
            (Some(_), false) => return Err(bad("template, spec: one or the other")),
            (None, true) => return Err(bad("template: required (or a spec and its disks)")),
            (None, false) => self.store.template(&req.template)?,
            (Some(s), true) => {
                if s.disks.len() != req.disks.len() {
                    return Err(bad(format!(
                        "disks: {} given for the spec's {} disks",
                        req.disks.len(),
                        s.disks.len()
                    )));
                }
                for (i, d) in req.disks.iter().enumerate() {
                    if !d.is_absolute() || !d.is_file() {
                        return Err(bad(format!(
                            "disks[{i}]: {} is not an image here",
                            d.display()
                        )));
                    }
                }
                Template {
                    name: String::new(),
                    spec: s.clone(),
                    base_disks: Vec::new(),
                    created: 0,
                }
            }
        };
        if req.spec.is_none() && !req.disks.is_empty() {
            return Err(bad(
                "disks: only with a spec (a template's VM gets overlays)",
            ));
        }
        let mut spec = t.spec.clone();
        if let Some(c) = req.cpus {
            spec.cpus = c;
        }
        if let Some(m) = req.memory {
            spec.memory = m;
        }
        if let Some(c) = &req.cmdline {
            spec.boot.cmdline = c.clone();
        }
        // Its own NICs, on the networks named, each with a MAC of its own.
        let (nics, networks) = self.nics_for(&t.spec.nets, &req.nets)?;
        spec.nets = nics;
        spec.validate().map_err(bad)?;
        let seed = req.cloud_init.clone().filter(|s| !s.is_empty());
        if let Some(s) = &seed {
            s.check().map_err(|e| bad(format!("cloud_init.{e}")))?;
        }
        if req.disk_size.is_some() && t.base_disks.is_empty() {
            return Err(bad(format!("disk_size: template {} has no disk", t.name)));
        }
        let volumes = req
            .volumes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                self.volume_path(v)
                    .map_err(|e| bad(format!("volumes[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let _op = self.ops();
        if self.store.vm(&req.name).is_ok() {
            return Err(StoreError::Exists {
                what: "VM",
                name: req.name,
            }
            .into());
        }
        let dir = self.layout.vm_dir(&req.name);
        if dir.exists() {
            return Err(Error::Conflict(format!(
                "{} exists (left by an earlier VM of this name?)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::Failed(e.to_string()))?;
        let made = (|| {
            // A defined VM's own images, in place.
            let mut disks = req.disks.clone();
            for (i, base) in t.base_disks.iter().enumerate() {
                let path = self.layout.disk(&req.name, i);
                let opts = block::ops::CreateOptions {
                    format: Some(block::Format::Qcow2),
                    size: None,
                    backing: Some(base.display().to_string()),
                    backing_format: None,
                    prealloc: Default::default(),
                    cluster_size: None,
                    force: false,
                };
                block::ops::create(&path, &opts)
                    .map_err(|e| Error::Failed(format!("disk {i}: {e}")))?;
                if let (0, Some(size)) = (i, req.disk_size) {
                    grow(&path, size).map_err(|e| bad(format!("disk_size: {e}")))?;
                }
                disks.push(path);
            }
            for v in &volumes {
                spec.disks.push(Disk::default());
                disks.push(v.clone());
            }
            let mut kept = req.disks.clone();
            kept.extend(volumes.iter().cloned());
            if let Some(s) = &seed {
                self.write_seed(&req.name, s, &mut spec, &mut disks)?;
            }
            let vm = VmRecord {
                name: req.name.clone(),
                template: t.name.clone(),
                spec,
                disks,
                desired: Desired::Stopped,
                restart: req.restart,
                autostart: req.autostart,
                autostart_order: req.autostart_order,
                autostart_delay_s: req.autostart_delay_s,
                cloud_init: seed.clone(),
                volumes: kept,
                networks: networks.clone(),
                home: None,
                jail_uid: None,
                pid: None,
                created: now_s(),
                snapshots: Vec::new(),
                restore_from: None,
            };
            self.store.add_vm(&vm)?;
            Ok(vm)
        })();
        let vm = match made {
            Ok(vm) => vm,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let from = if t.name.is_empty() {
            "from a spec".to_string()
        } else {
            format!("from template {}", t.name)
        };
        self.event(&vm.name, "vm.created", from);
        drop(_op);
        self.sync_hosts(&networks);
        if req.start {
            self.start(&vm.name)?;
        }
        self.view(&vm.name)
    }

    /// Writes VM `name`'s cloud-init seed (a new instance id) and adds it as its last disk.
    pub(crate) fn write_seed(
        &self,
        name: &str,
        seed: &crate::seed::Seed,
        spec: &mut VmSpec,
        disks: &mut Vec<PathBuf>,
    ) -> Result<(), Error> {
        let path = self.layout.vm_dir(name).join("seed.img");
        let instance = format!("{name}-{}", now_s());
        seed.write(&path, &instance)
            .map_err(|e| Error::Failed(format!("the cloud-init seed: {e}")))?;
        spec.disks.push(Disk {
            read_only: true,
            serial: Some("cidata".into()),
            ..Disk::default()
        });
        disks.push(path);
        Ok(())
    }

    /// The VM `name` as the API shows it.
    pub fn view(&self, name: &str) -> Result<VmView, Error> {
        let record = self.store.vm(name)?;
        Ok(self.view_of(record))
    }

    fn view_of(&self, record: VmRecord) -> VmView {
        let addresses = if record.networks.is_empty() {
            Vec::new()
        } else {
            self.addresses(&record)
        };
        let live = self.live();
        let running = live.running.get(&record.name);
        let state = match (running, record.desired) {
            _ if live.incoming.contains(&record.name) => VmState::Incoming,
            _ if live.migrating.contains_key(&record.name) => VmState::Migrating,
            (Some(r), _) if r.paused => VmState::Paused,
            (Some(_), _) => VmState::Running,
            (None, Desired::Running) => VmState::Crashed,
            (None, Desired::Stopped) => VmState::Stopped,
            (None, Desired::Suspended) => VmState::Suspended,
        };
        let restarts = live.restarts.get(&record.name).map_or(0, |r| {
            r.iter().filter(|t| t.elapsed() < RESTART_WINDOW).count()
        }) as u32;
        VmView {
            addresses,
            uptime_ms: running.map(|r| r.started.elapsed().as_millis() as u64),
            restarts,
            dir: record
                .home
                .clone()
                .unwrap_or_else(|| self.layout.vm_dir(&record.name)),
            api_socket: self.layout.api_socket(&record.name),
            console_socket: self.layout.console_socket(&record.name),
            state,
            record,
        }
    }

    pub fn list(&self) -> Result<Vec<VmView>, Error> {
        Ok(self
            .store
            .vms()?
            .into_iter()
            .map(|r| self.view_of(r))
            .collect())
    }

    /// The document the VM's process boots.
    fn document(&self, vm: &VmRecord) -> VmDocument {
        VmDocument {
            spec: vm.spec.clone(),
            bindings: HostBindings {
                disks: vm.disks.clone(),
                nets: (0..vm.networks.len())
                    .map(|i| {
                        spec::netbinding::NetBinding::Tap(crate::networks::tap_name(&vm.name, i))
                    })
                    .collect(),
                console: Some(Console::Socket(self.layout.console_socket(&vm.name))),
                api_socket: Some(self.layout.api_socket(&vm.name)),
                ..HostBindings::default()
            },
        }
    }

    /// Starts the VM (it must not be running).
    pub fn start(self: &Arc<Self>, name: &str) -> Result<VmView, Error> {
        let _op = self.ops();
        let mut vm = self.store.vm(name)?;
        if self.live().running.contains_key(name) {
            return Err(Error::Conflict(format!("{name} is running")));
        }
        vm.desired = Desired::Running;
        self.launch(&mut vm)?;
        self.event(name, "vm.started", format!("pid {}", vm.pid.unwrap_or(0)));
        drop(_op);
        self.view(name)
    }

    /// Gives files the VM's process writes (its directories, disks that came from a
    /// migration, a snapshot's directory) to its jail's user (given one first if it has its
    /// own and none yet).
    pub(crate) fn give_to_jail(&self, vm: &mut VmRecord, paths: &[PathBuf]) -> Result<(), Error> {
        let Some(jail) = &self.jail else {
            return Ok(());
        };
        let others = self.store.vms()?;
        jail.allocate(vm, others.iter())
            .map_err(|e| Error::Conflict(e.to_string()))?;
        if let Some((uid, gid)) = jail.ids(vm) {
            for d in paths {
                crate::jailing::give(d, uid, gid)
                    .map_err(|e| Error::Failed(format!("{}: {e}", d.display())))?;
            }
        }
        Ok(())
    }

    /// Starts the VM's process, waits for its API, records it; `vm.desired` is saved.
    fn launch(self: &Arc<Self>, vm: &mut VmRecord) -> Result<(), Error> {
        self.launch_as(vm, false)
    }

    /// As [`Self::launch`]; `incoming`: an empty VMM (`vessel serve`) that a migration
    /// fills, allowed (in a jail) the VM's disks.
    pub(crate) fn launch_as(
        self: &Arc<Self>,
        vm: &mut VmRecord,
        incoming: bool,
    ) -> Result<(), Error> {
        let vm_name = vm.name.clone();
        let failed = |e: String| Error::Failed(format!("cannot start {vm_name}: {e}"));
        let run = self.layout.vm_run(&vm.name);
        std::fs::create_dir_all(&run).map_err(|e| failed(e.to_string()))?;
        let api = self.layout.api_socket(&vm.name);
        for s in [&api, &self.layout.console_socket(&vm.name)] {
            let _ = std::fs::remove_file(s);
        }
        let config = self.layout.vm_config(&vm.name);
        let doc =
            serde_json::to_string_pretty(&self.document(vm)).map_err(|e| failed(e.to_string()))?;
        std::fs::write(&config, doc).map_err(|e| failed(e.to_string()))?;
        let log = self.layout.vm_log(&vm.name);
        rotate_log(&log);
        // A jailed VMM writes its disks and makes its sockets as the jail's user.
        let own = [self.layout.vm_dir(&vm.name), run.clone()];
        self.give_to_jail(vm, &own)?;
        let owner = self.jail.as_ref().and_then(|j| j.ids(vm)).unwrap_or((0, 0));
        self.plug(vm, owner)?;
        let mut args = vec!["run".to_string()];
        if let Some(j) = &self.jail {
            args.extend(j.args(vm));
            // Its own directory: snapshots and suspends write there.
            let dir = self.layout.vm_dir(&vm.name);
            args.extend(["--jail-path".into(), dir.display().to_string()]);
        }
        // The API socket on the command line too: it tells this VM's process from any other
        // (`recover`), whether it boots or restores.
        args.extend(["--api-socket".into(), api.display().to_string()]);
        let console = format!("socket:{}", self.layout.console_socket(&vm.name).display());
        match &vm.restore_from {
            _ if incoming => {
                args[0] = "serve".into();
                args.extend(["--console".into(), console]);
                if self.jail.is_some() {
                    for d in &vm.disks {
                        args.extend(jail_paths(d).map_err(failed)?);
                    }
                }
            }
            Some(dir) => {
                args.extend([
                    "--restore".into(),
                    dir.display().to_string(),
                    "--console".into(),
                    console,
                ]);
            }
            None => args.extend(["--config".into(), config.display().to_string()]),
        }
        let started = (|| {
            let process =
                VmProcess::spawn(&self.vessel, &args, &log).map_err(|e| failed(e.to_string()))?;
            let waiter = process.waiter().map_err(|e| failed(e.to_string()))?;
            // Ready once its API answers; a process that ends first failed to start.
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if api::client::Client::new(&api).ping().is_ok() {
                    return Ok((process, waiter));
                }
                if waiter.wait(Some(Duration::from_millis(50))) || Instant::now() > deadline {
                    let _ = process.signal(Signal::KILL);
                    waiter.wait(Some(Duration::from_secs(5)));
                    let how = process.reap();
                    return Err(failed(format!("{how}: {}", log_tail(&log))));
                }
            }
        })();
        let (process, waiter) = match started {
            Ok(p) => p,
            Err(e) => {
                self.unplug(vm);
                return Err(e);
            }
        };
        vm.pid = Some(process.pid);
        if let Some(dir) = vm.restore_from.take() {
            // A suspended VM's saved memory and state are spent once it runs again (the
            // overlays in that directory are its disks now).
            if dir.starts_with(self.layout.vm_dir(&vm.name).join("suspended")) {
                for f in ["state", "memory"] {
                    let _ = std::fs::remove_file(dir.join(f));
                }
            }
            // A restored VM writes to fresh overlays on its snapshot's frozen disks: they are
            // its disks from now on.
            match disks_now(&api::client::Client::new(&api), vm.disks.len()) {
                Ok(Some(now)) => vm.disks = now,
                Ok(None) => {}
                Err(e) => tracing::warn!("{}: its disks after the restore: {e}", vm.name),
            }
        }
        self.store.put_vm(vm)?;
        self.watch(&vm.name, process, waiter, Instant::now());
        Ok(())
    }

    /// Takes a snapshot of the running VM: memory, devices and its disks frozen at the same
    /// instant (the VM goes on with a new overlay on each).
    pub fn snapshot_create(&self, name: &str, snap: &str) -> Result<VmView, Error> {
        check_name(snap).map_err(bad)?;
        let _op = self.ops();
        let mut vm = self.store.vm(name)?;
        if !self.live().running.contains_key(name) {
            return Err(Error::Conflict(format!("{name} is not running")));
        }
        if vm.snapshots.iter().any(|s| s.name == snap) {
            return Err(Error::Conflict(format!(
                "{name} has a snapshot {snap} already"
            )));
        }
        let dir = self.layout.vm_dir(name).join("snapshots").join(snap);
        self.save(&mut vm, &dir)?;
        vm.snapshots.push(crate::store::Snapshot {
            name: snap.to_string(),
            dir,
            created: now_s(),
        });
        self.store.put_vm(&vm)?;
        self.event(name, "vm.snapshot-created", snap);
        drop(_op);
        self.view(name)
    }

    /// Saves the running VM into `dir` (memory, devices, and its disks frozen at the same
    /// instant); `vm.disks` become the new overlays it goes on with.
    fn save(&self, vm: &mut VmRecord, dir: &Path) -> Result<(), Error> {
        let name = vm.name.clone();
        std::fs::create_dir_all(dir).map_err(|e| Error::Failed(e.to_string()))?;
        self.give_to_jail(vm, &[dir.to_path_buf()])?;
        let req = api::types::SnapshotRequest {
            dir: dir.to_path_buf(),
            diff: false,
            disk_snapshot: true,
        };
        let api = api::client::Client::new(self.layout.api_socket(&name));
        if let Err(e) = api.snapshot(&req) {
            let _ = std::fs::remove_dir_all(dir);
            return Err(Error::Failed(format!("{name}: snapshot: {e}")));
        }
        // The disks it writes to now.
        if let Some(now) = disks_now(&api, vm.disks.len())
            .map_err(|e| Error::Failed(format!("{name}: after the snapshot: {e}")))?
        {
            vm.disks = now;
        }
        Ok(())
    }

    /// Saves the running VM to disk and ends its process; its next start (by `vm start`, or
    /// the daemon's own start) restores it where it was.
    pub fn suspend(&self, name: &str) -> Result<VmView, Error> {
        let process = {
            let _op = self.ops();
            let mut vm = self.store.vm(name)?;
            let Some(process) = self.live().running.get(name).map(|r| r.process.clone()) else {
                return Err(Error::Conflict(format!("{name} is not running")));
            };
            let dir = self
                .layout
                .vm_dir(name)
                .join("suspended")
                .join(format!("{}", now_s()));
            self.save(&mut vm, &dir)?;
            vm.desired = Desired::Suspended;
            vm.restore_from = Some(dir);
            self.store.put_vm(&vm)?;
            process
        };
        self.kill_process(name, &process);
        self.view(name)
    }

    /// Suspends every running VM (a host going down), one at a time; the names suspended.
    pub fn suspend_all(&self) -> Result<Vec<String>, Error> {
        let names: Vec<String> = self.live().running.keys().cloned().collect();
        let mut done = Vec::new();
        for n in names {
            match self.suspend(&n) {
                Ok(_) => done.push(n),
                Err(e) => self.event(&n, "vm.suspend-failed", e.to_string()),
            }
        }
        Ok(done)
    }

    /// Makes the stopped VM's next start restore snapshot `snap`, and starts it.
    pub fn snapshot_restore(self: &Arc<Self>, name: &str, snap: &str) -> Result<VmView, Error> {
        {
            let _op = self.ops();
            let mut vm = self.store.vm(name)?;
            if self.live().running.contains_key(name) {
                return Err(Error::Conflict(format!("{name} is running: stop it first")));
            }
            let i = snapshot_index(&vm, snap)?;
            vm.restore_from = Some(vm.snapshots[i].dir.clone());
            self.store.put_vm(&vm)?;
        }
        self.event(name, "vm.snapshot-restoring", snap);
        self.start(name)
    }

    /// Deletes a snapshot's memory and state. Its frozen disk images stay: they are layers of
    /// the VM's disks now.
    pub fn snapshot_delete(&self, name: &str, snap: &str) -> Result<VmView, Error> {
        let _op = self.ops();
        let mut vm = self.store.vm(name)?;
        let i = snapshot_index(&vm, snap)?;
        let s = vm.snapshots.remove(i);
        if vm.restore_from.as_ref() == Some(&s.dir) {
            vm.restore_from = None;
        }
        // Overlays a restore made inside the directory may be the VM's disks now: keep those.
        let in_use = vm.disks.iter().any(|d| d.starts_with(&s.dir));
        let removed = if in_use {
            ["state", "memory"]
                .iter()
                .try_for_each(|f| match std::fs::remove_file(s.dir.join(f)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                })
        } else {
            std::fs::remove_dir_all(&s.dir)
        };
        removed.map_err(|e| Error::Failed(format!("{}: {e}", s.dir.display())))?;
        self.store.put_vm(&vm)?;
        self.event(name, "vm.snapshot-deleted", snap);
        drop(_op);
        self.view(name)
    }

    /// Tracks a running process and reports its end.
    fn watch(self: &Arc<Self>, name: &str, process: VmProcess, waiter: Waiter, started: Instant) {
        let process = Arc::new(process);
        self.live().running.insert(
            name.to_string(),
            Running {
                process: process.clone(),
                started,
                paused: false,
            },
        );
        let me = Arc::downgrade(self);
        let name = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{name}"))
            // The default stack: a restart runs here (an HTTP client, a runtime). It is only
            // reserved address space until used.
            .spawn(move || {
                waiter.wait(None);
                if let Some(m) = me.upgrade() {
                    m.ended(&name, process);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot watch the process of a VM: {e}");
        }
    }

    /// A VM's process ended: record it, then restart it if the policy says so.
    fn ended(self: &Arc<Self>, name: &str, process: Arc<VmProcess>) {
        let _op = self.ops();
        let pid = process.pid;
        {
            let mut live = self.live();
            if live.running.get(name).is_some_and(|r| r.process.pid == pid) {
                live.running.remove(name);
            }
        }
        let how = process.reap();
        if let Some(end) = self.live().migrating.get_mut(name) {
            *end = Some(!how.failed());
            return;
        }
        let Ok(mut vm) = self.store.vm(name) else {
            return; // deleted
        };
        // Its taps go with its process (a restart makes them again).
        self.unplug(&vm);
        if vm.pid == Some(pid) {
            vm.pid = None;
            let _ = self.store.put_vm(&vm);
        }
        match vm.desired {
            Desired::Stopped => {
                self.event(name, "vm.stopped", how.to_string());
                return;
            }
            Desired::Suspended => {
                self.event(name, "vm.suspended", "saved to disk");
                return;
            }
            Desired::Running => {}
        }
        self.event(name, "vm.crashed", how.to_string());
        let restart = match vm.restart {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => how.failed(),
            RestartPolicy::Always => true,
        };
        if !restart {
            return;
        }
        let allowed = {
            let mut live = self.live();
            let recent = live.restarts.entry(name.to_string()).or_default();
            recent.retain(|t| t.elapsed() < RESTART_WINDOW);
            if recent.len() >= RESTARTS {
                false
            } else {
                recent.push_back(Instant::now());
                true
            }
        };
        if !allowed {
            self.event(
                name,
                "vm.restart-limit",
                format!(
                    "{RESTARTS} restarts within {}s: left stopped",
                    RESTART_WINDOW.as_secs()
                ),
            );
            return;
        }
        match self.launch(&mut vm) {
            Ok(()) => self.event(name, "vm.restarted", format!("pid {}", vm.pid.unwrap_or(0))),
            Err(e) => self.event(name, "vm.restart-failed", e.to_string()),
        }
    }

    /// Stops the VM: the ACPI power button, then after `timeout` SIGTERM, then SIGKILL.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<VmView, Error> {
        let process = self.mark_stopped(name)?;
        if let Some(p) = process {
            let waiter = p.waiter().map_err(|e| Error::Failed(e.to_string()))?;
            let _ = api::client::Client::new(self.layout.api_socket(name)).shutdown();
            if !waiter.wait(Some(timeout)) {
                let _ = p.signal(Signal::TERM);
                if !waiter.wait(Some(Duration::from_secs(10))) {
                    let _ = p.signal(Signal::KILL);
                    waiter.wait(Some(Duration::from_secs(10)));
                }
            }
            self.wait_gone(name, p.pid);
        }
        self.view(name)
    }

    /// Parks the VM's vCPUs (`paused`) or lets them go.
    pub fn pause(&self, name: &str, paused: bool) -> Result<VmView, Error> {
        let _op = self.ops();
        self.store.vm(name)?;
        if !self.live().running.contains_key(name) {
            return Err(Error::Conflict(format!("{name} is not running")));
        }
        let api = api::client::Client::new(self.layout.api_socket(name));
        let r = if paused { api.pause() } else { api.resume() };
        r.map_err(|e| Error::Conflict(format!("{name}: {e}")))?;
        if let Some(r) = self.live().running.get_mut(name) {
            r.paused = paused;
        }
        let kind = if paused { "vm.paused" } else { "vm.resumed" };
        self.event(name, kind, "");
        drop(_op);
        self.view(name)
    }

    /// The last `lines` lines of the VM's log (its process's output, the rotated file first).
    pub fn log(&self, name: &str, lines: usize) -> Result<String, Error> {
        self.store.vm(name)?;
        let log = self.layout.vm_log(name);
        let mut text =
            std::fs::read_to_string(self.layout.vm_log_rotated(name)).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(&log).unwrap_or_default());
        let all: Vec<&str> = text.lines().collect();
        let mut out = all[all.len().saturating_sub(lines)..].join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        Ok(out)
    }

    /// The Prometheus metrics of the host's VMs and of the daemon.
    pub fn metrics(&self) -> Result<String, Error> {
        let views = self.list()?;
        let pids: Vec<(String, u32)> = {
            let live = self.live();
            live.running
                .iter()
                .map(|(n, r)| (n.clone(), r.process.pid))
                .collect()
        };
        // Each running VM's own counters and migration, asked of all at once (a VM that
        // does not answer within a second is left out).
        let live: Vec<crate::metrics::VmLive> = std::thread::scope(|s| {
            let asks: Vec<_> = pids
                .iter()
                .map(|(name, _)| {
                    let api = api::client::Client::new(self.layout.api_socket(name))
                        .with_timeout(Some(Duration::from_secs(1)));
                    s.spawn(move || crate::metrics::VmLive {
                        name: name.clone(),
                        counters: api.counters().ok(),
                        migration: api.migration_status().ok(),
                    })
                })
                .collect();
            asks.into_iter().filter_map(|a| a.join().ok()).collect()
        });
        Ok(crate::metrics::render(&views, &pids, &live))
    }

    /// Kills the VM's process at once.
    pub fn kill(&self, name: &str) -> Result<VmView, Error> {
        if let Some(p) = self.mark_stopped(name)? {
            self.kill_process(name, &p);
        }
        self.view(name)
    }

    /// SIGKILLs VM `name`'s process and waits until its watcher has recorded the end.
    fn kill_process(&self, name: &str, p: &VmProcess) {
        let _ = p.signal(Signal::KILL);
        if let Ok(w) = p.waiter() {
            w.wait(Some(Duration::from_secs(10)));
        }
        self.wait_gone(name, p.pid);
    }

    /// Records that the VM should be stopped; returns its process if it runs.
    fn mark_stopped(&self, name: &str) -> Result<Option<Arc<VmProcess>>, Error> {
        let _op = self.ops();
        let mut vm = self.store.vm(name)?;
        vm.desired = Desired::Stopped;
        self.store.put_vm(&vm)?;
        Ok(self.live().running.get(name).map(|r| r.process.clone()))
    }

    /// Waits (briefly) until the watcher has recorded the end of process `pid`.
    fn wait_gone(&self, name: &str, pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && self
                .live()
                .running
                .get(name)
                .is_some_and(|r| r.process.pid == pid)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Deletes a stopped VM with its disks and files.
    /// Deletes a stopped VM with its disks and files; `keep_disks` leaves its disks (and the
    /// directory that holds them) where they are.
    pub fn delete(&self, name: &str, keep_disks: bool) -> Result<(), Error> {
        let _op = self.ops();
        let vm = self.store.vm(name)?;
        if self.live().running.contains_key(name) {
            return Err(Error::Conflict(format!("{name} is running: stop it first")));
        }
        if keep_disks {
            for f in self.layout.vm_files(name) {
                let _ = std::fs::remove_file(f);
            }
        }
        // Attached volumes (and a defined VM's images) stay. A VM that migrated here may
        // have its disks and snapshots elsewhere (on storage both hosts reach).
        let doomed = vm
            .disks
            .iter()
            .filter(|d| !keep_disks && !vm.volumes.contains(d));
        for d in doomed {
            if let Err(e) = std::fs::remove_file(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(Error::Failed(format!("{}: {e}", d.display())));
                }
            }
        }
        if !keep_disks {
            for s in &vm.snapshots {
                let _ = std::fs::remove_dir_all(&s.dir);
            }
            if let Some(home) = &vm.home {
                let _ = std::fs::remove_dir_all(home);
            }
            let _ = std::fs::remove_dir_all(self.layout.vm_dir(name));
        }
        let _ = std::fs::remove_dir_all(self.layout.vm_run(name));
        self.store.delete_vm(name)?;
        self.live().restarts.remove(name);
        self.unplug(&vm);
        self.sync_hosts(&vm.networks);
        let kept = if keep_disks {
            format!("its disks kept in {}", self.layout.vm_dir(name).display())
        } else {
            String::new()
        };
        self.event(name, "vm.deleted", kept);
        Ok(())
    }

    /// At the daemon's start: adopts the VM processes still running, then starts the VMs
    /// that should run (autostart ones in their order) and do not.
    pub fn recover(self: &Arc<Self>) -> Result<(), Error> {
        let mut vms = self.store.vms()?;
        vms.sort_by_key(|v| (v.autostart_order, v.name.clone()));
        for mut vm in vms {
            let marker = self.layout.api_socket(&vm.name).display().to_string();
            if let Some(p) = vm.pid.and_then(|pid| VmProcess::adopt(pid, &marker)) {
                match p.waiter() {
                    Ok(w) => {
                        self.event(&vm.name, "vm.adopted", format!("pid {}", p.pid));
                        let ago = crate::process::started_ago(p.pid).unwrap_or_default();
                        let started = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
                        self.watch(&vm.name, p, w, started);
                        continue;
                    }
                    Err(e) => tracing::warn!("cannot watch {}: {e}", vm.name),
                }
            }
            let was_running = vm.pid.take().is_some();
            if vm.autostart || vm.desired != Desired::Stopped {
                if was_running {
                    self.event(&vm.name, "vm.crashed", "ended while the daemon was away");
                }
                vm.desired = Desired::Running;
                let _op = self.ops();
                match self.launch(&mut vm) {
                    Ok(()) => self.event(&vm.name, "vm.started", "at daemon start"),
                    Err(e) => {
                        let _ = self.store.put_vm(&vm);
                        self.event(&vm.name, "vm.start-failed", e.to_string());
                    }
                }
                drop(_op);
                if vm.autostart && vm.autostart_delay_s > 0 {
                    // As Proxmox's `startup: up=`: the next VM waits for this one.
                    std::thread::sleep(Duration::from_secs(vm.autostart_delay_s));
                }
            } else if was_running {
                self.store.put_vm(&vm)?;
            }
        }
        Ok(())
    }
}

/// The image files a running VM's `count` disks are on now, from its API (none if it shows
/// another count).
fn disks_now(
    api: &api::client::Client,
    count: usize,
) -> Result<Option<Vec<PathBuf>>, api::client::ClientError> {
    let now: Vec<PathBuf> = api
        .info()?
        .devices
        .iter()
        .filter(|d| d.kind == "virtio-block")
        .filter_map(|d| d.path.as_ref().map(PathBuf::from))
        .collect();
    Ok((now.len() == count).then_some(now))
}

/// `--jail-path` arguments for a disk and its backing chain (only the disk itself written).
fn jail_paths(disk: &Path) -> Result<Vec<String>, String> {
    let chain = block::chain::resolve_chain(disk, None).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (i, l) in chain.iter().enumerate() {
        let ro = if i == 0 { "" } else { ":ro" };
        out.extend(["--jail-path".into(), format!("{}{ro}", l.path.display())]);
    }
    Ok(out)
}

/// Grows a new disk to `size` (never shrinks it).
fn grow(path: &Path, size: u64) -> Result<(), String> {
    let now = block::ops::info(path, false, false)
        .map_err(|e| e.to_string())?
        .first()
        .map_or(0, |i| i.virtual_size);
    if size < now {
        return Err(format!(
            "{} is smaller than the template's disk ({})",
            spec::size::format(size),
            spec::size::format(now)
        ));
    }
    if size > now {
        block::ops::resize(path, size, false).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Where snapshot `snap` of `vm` is in its list.
fn snapshot_index(vm: &VmRecord, snap: &str) -> Result<usize, Error> {
    vm.snapshots
        .iter()
        .position(|s| s.name == snap)
        .ok_or_else(|| {
            Error::from(StoreError::NotFound {
                what: "snapshot",
                name: format!("{}/{snap}", vm.name),
            })
        })
}

/// The last lines of a VM's log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    if tail.is_empty() {
        format!("no output (log {})", log.display())
    } else {
        tail.join(" / ")
    }
}
