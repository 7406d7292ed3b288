//! Live migration of a VM from this daemon to another host's (`vessel vm migrate`), over the
//! VMM's authenticated, encrypted migration stream.
//!
//! The client drives it, holding both daemons' credentials, as `virsh migrate` does:
//! 1. the target daemon ([`Manager::incoming`]) checks that it can reach the VM's disks (the
//!    VM's storage must be shared by both hosts: a shared directory or pool), starts an empty
//!    VMM (`vessel serve`) under the VM's name, has it listen, and answers with the
//!    migration's address and secret; the VM is `incoming` there, never restarted by policy;
//! 2. the source daemon ([`Manager::migrate`]) has its VMM send the VM and waits for the end;
//!    its record goes (the disks stay: the VM runs on them there) once the migration has
//!    completed, and nothing changes if it failed;
//! 3. the target's watcher sees its VMM's migration complete and makes the VM its own
//!    (running, restarted by its policy from then on), or on failure ends the empty VMM and
//!    forgets the VM, leaving its disks alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::types::{
    MigrateDisk, MigrateReceiveRequest, MigrateSendRequest, MigrationPhase, MigrationStatus,
    MigrationToken,
};
use serde::{Deserialize, Serialize};

use crate::store::{Desired, StoreError, VmRecord};
use crate::vms::{bad, Error, Manager};

/// How often a migration's status is read.
const POLL: Duration = Duration::from_millis(100);

/// How long an incoming VMM waits for its source before it is given up.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(120);

/// `POST /api/v1/migrations/incoming`: a VM on its way here.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingMigration {
    /// The VM as the source daemon has it (`GET /api/v1/vms/{name}`): its name, spec, disks
    /// and settings.
    pub vm: VmRecord,
    /// Where this host's VMM listens for the source's: `tcp:HOST:PORT` (port 0: a free
    /// one) or `unix:PATH`; default `tcp:127.0.0.1:0` (both daemons on one host).
    #[serde(default)]
    pub listen: Option<String>,
}

/// The answer to [`IncomingMigration`]: what the source's VMM needs.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IncomingReady {
    /// Where to send the VM (`tcp:HOST:PORT` or `unix:PATH`).
    pub listen: String,
    /// The migration's secret.
    pub token: MigrationToken,
}

/// `PUT /api/v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target's address and secret (its daemon's answer to the incoming migration).
    pub to: String,
    pub token: MigrationToken,
    /// The longest pause of the final round (default 300 ms).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Switch to post-copy when pre-copy does not converge.
    #[serde(default)]
    pub post_copy: bool,
    /// A bandwidth cap, megabits per second.
    #[serde(default)]
    pub bandwidth_mbps: Option<u64>,
}

/// A completed migration.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Migrated {
    pub name: String,
    pub to: String,
    /// The source VMM's last status (absent if it exited before it could be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MigrationStatus>,
}

/// Picks a free port for `tcp:HOST:0`.
fn resolve_listen(listen: &str) -> Result<String, Error> {
    let Some(host) = listen
        .strip_prefix("tcp:")
        .and_then(|a| a.strip_suffix(":0"))
    else {
        return Ok(listen.to_string());
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let l = std::net::TcpListener::bind((bare, 0))
        .map_err(|e| bad(format!("listen: cannot bind {host}: {e}")))?;
    let port = l
        .local_addr()
        .map_err(|e| Error::Failed(e.to_string()))?
        .port();
    Ok(format!("tcp:{host}:{port}"))
}

impl Manager {
    /// Readies this host for VM `req.vm` (see the module's documentation).
    pub fn incoming(self: &Arc<Self>, req: IncomingMigration) -> Result<IncomingReady, Error> {
        let mut vm = req.vm;
        crate::layout::check_name(&vm.name).map_err(|e| bad(format!("vm.name: {e}")))?;
        vm.spec
            .validate()
            .map_err(|e| bad(format!("vm.spec.{e}")))?;
        if vm.disks.len() != vm.spec.disks.len() {
            return Err(bad("vm.disks: one file per disk of the spec"));
        }
        for d in &vm.disks {
            if !d.is_absolute() || !d.exists() {
                return Err(Error::Conflict(format!(
                    "the VM's disk {} is not on this host: live migration needs storage both \
                     hosts reach",
                    d.display()
                )));
            }
        }
        // Loopback TCP by default, not a Unix socket: a jailed source VMM sees no path of
        // this daemon's.
        let listen = resolve_listen(req.listen.as_deref().unwrap_or("tcp:127.0.0.1:0"))?;
        let _op = self.ops();
        if self.store().vm(&vm.name).is_ok() {
            return Err(StoreError::Exists {
                what: "VM",
                name: vm.name,
            }
            .into());
        }
        let dir = self.layout().vm_dir(&vm.name);
        if vm.home.as_ref() == Some(&dir) {
            vm.home = None; // back home
        } else if dir.exists() {
            return Err(Error::Conflict(format!(
                "{} exists (left by an earlier VM of this name?)",
                dir.display()
            )));
        }
        if let Some(home) = &vm.home {
            if !home.is_absolute() || !home.is_dir() {
                return Err(bad(format!(
                    "vm.home: {} is not a directory here",
                    home.display()
                )));
            }
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::Failed(e.to_string()))?;
        // Not running until the migration completes: an end before that is no crash.
        vm.desired = Desired::Stopped;
        vm.pid = None;
        vm.restore_from = None;
        vm.jail_uid = None; // one of this host's
        vm.created = crate::store::now_s();
        let name = vm.name.clone();
        self.live().incoming.insert(name.clone());
        let ready = (|| {
            self.store().add_vm(&vm)?;
            let disks = vm.disks.clone();
            self.give_to_jail(&mut vm, &disks)?;
            self.launch_as(&mut vm, true)?;
            let api = api::client::Client::new(self.layout().api_socket(&name));
            let disks = vm
                .disks
                .iter()
                .map(|p| MigrateDisk {
                    path: p.clone(),
                    cache: None,
                })
                .collect();
            let answer = api
                .migrate_receive(&MigrateReceiveRequest {
                    listen: listen.clone(),
                    token: None,
                    disks,
                    taps: (0..vm.networks.len())
                        .map(|i| crate::networks::tap_name(&name, i))
                        .collect(),
                    nets: Vec::new(),
                    vsock_socket: None,
                    same_paths: false,
                })
                .map_err(|e| Error::Failed(format!("{name}: migrate-receive: {e}")))?;
            Ok(IncomingReady {
                listen: listen.clone(),
                token: answer.token,
            })
        })();
        drop(_op);
        match ready {
            Ok(r) => {
                self.sync_hosts(&vm.networks);
                self.event(&name, "vm.incoming", format!("listening on {listen}"));
                let me = self.clone();
                let watched = std::thread::Builder::new()
                    .name(format!("incoming-{name}"))
                    .spawn(move || me.watch_incoming(&name));
                if let Err(e) = watched {
                    tracing::error!("cannot watch an incoming migration: {e}");
                }
                Ok(r)
            }
            Err(e) => {
                self.forget_incoming(&name);
                Err(e)
            }
        }
    }

    /// Follows an incoming migration to its end.
    fn watch_incoming(self: &Arc<Self>, name: &str) {
        let api = api::client::Client::new(self.layout().api_socket(name));
        let started = Instant::now();
        let outcome = loop {
            std::thread::sleep(POLL);
            match api.migration_status() {
                Ok(s) if s.phase == MigrationPhase::Completed => break Ok(()),
                Ok(s)
                    if s.phase == MigrationPhase::Listening
                        && started.elapsed() > INCOMING_TIMEOUT =>
                {
                    break Err("no source came".to_string())
                }
                Ok(s) if s.phase.is_finished() && s.phase != MigrationPhase::None => {
                    break Err(s.error.unwrap_or_else(|| s.phase.to_string()))
                }
                Ok(_) => {}
                Err(e) => {
                    if !self.is_running(name) {
                        break Err(format!("its VMM ended: {e}"));
                    }
                }
            }
        };
        match outcome {
            Ok(()) => {
                let _op = self.ops();
                if let Ok(mut vm) = self.store().vm(name) {
                    vm.desired = Desired::Running;
                    let _ = self.store().put_vm(&vm);
                }
                self.live().incoming.remove(name);
                self.event(name, "vm.migrated-in", "running here");
            }
            Err(why) => {
                self.event(name, "vm.migration-failed", format!("incoming: {why}"));
                let _ = self.kill(name);
                self.forget_incoming(name);
            }
        }
    }

    /// Drops an incoming VM that did not come: its record and the files made for it here,
    /// never its disks (its directory here may hold them: a VM coming back home).
    fn forget_incoming(&self, name: &str) {
        let _op = self.ops();
        let _ = self.store().delete_vm(name);
        for f in self.layout().vm_files(name) {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir(self.layout().vm_dir(name));
        let _ = std::fs::remove_dir_all(self.layout().vm_run(name));
        self.live().incoming.remove(name);
    }

    /// Sends the running VM `name` to another host's VMM, which its daemon readied; returns
    /// once the migration has ended: completed (the VM is gone from here) or failed (it runs
    /// on here).
    pub fn migrate(self: &Arc<Self>, name: &str, req: MigrateRequest) -> Result<Migrated, Error> {
        {
            let _op = self.ops();
            self.store().vm(name)?;
            if !self.is_running(name) {
                return Err(Error::Conflict(format!("{name} is not running")));
            }
            let mut live = self.live();
            if live.migrating.contains_key(name) {
                return Err(Error::Conflict(format!("{name} is migrating already")));
            }
            live.migrating.insert(name.to_string(), None);
        }
        let api = api::client::Client::new(self.layout().api_socket(name));
        let send = MigrateSendRequest {
            to: req.to.clone(),
            downtime_ms: req.downtime_ms.unwrap_or(api::types::DEFAULT_DOWNTIME_MS),
            bandwidth_mbps: req.bandwidth_mbps,
            post_copy: req.post_copy,
            post_copy_after_rounds: None,
            if_not_converged: None,
            max_rounds: None,
            full_digest: false,
            token: req.token,
        };
        self.event(name, "vm.migrating", format!("to {}", req.to));
        let outcome = match api.migrate_send(&send) {
            Err(e) => Err(format!("migrate-send: {e}")),
            Ok(()) => self.follow_send(name, &api),
        };
        if outcome.is_ok() {
            // The source VMM exits once the VM has gone: let its watcher see it first.
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.is_running(name) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _op = self.ops();
        self.live().migrating.remove(name);
        match outcome {
            Ok(status) => {
                // The VM runs on the other host, on the same disks: they stay (in its home,
                // which is this daemon's directory for it unless it came from elsewhere).
                if let Ok(v) = self.store().vm(name) {
                    self.unplug(&v);
                }
                let away = self.store().vm(name).map(|v| v.home.is_some());
                let networks = self
                    .store()
                    .vm(name)
                    .map(|v| v.networks)
                    .unwrap_or_default();
                let _ = self.store().delete_vm(name);
                self.sync_hosts(&networks);
                if let Ok(true) = away {
                    let _ = std::fs::remove_dir_all(self.layout().vm_dir(name));
                } else {
                    for f in self.layout().vm_files(name) {
                        let _ = std::fs::remove_file(f);
                    }
                }
                let _ = std::fs::remove_dir_all(self.layout().vm_run(name));
                let downtime = status
                    .as_ref()
                    .and_then(|s| s.downtime_ms)
                    .map_or(String::new(), |d| format!(" (downtime {d} ms)"));
                self.event(name, "vm.migrated", format!("to {}{downtime}", req.to));
                Ok(Migrated {
                    name: name.to_string(),
                    to: req.to,
                    status,
                })
            }
            Err(why) => {
                self.event(name, "vm.migration-failed", &why);
                if !self.is_running(name) {
                    // Its VMM ended without completing the migration. It is left crashed,
                    // never restarted here: after a post-copy failure it may not be whole.
                    if let Ok(mut vm) = self.store().vm(name) {
                        vm.pid = None;
                        let _ = self.store().put_vm(&vm);
                        self.unplug(&vm);
                    }
                    self.event(name, "vm.crashed", "its VMM ended during the migration");
                }
                Err(Error::Failed(format!(
                    "{name}: the migration failed: {why}"
                )))
            }
        }
    }

    /// Waits for the end of an outgoing migration.
    fn follow_send(
        &self,
        name: &str,
        api: &api::client::Client,
    ) -> Result<Option<MigrationStatus>, String> {
        loop {
            std::thread::sleep(POLL);
            match api.migration_status() {
                Ok(s) if s.phase == MigrationPhase::Completed => return Ok(Some(s)),
                Ok(s) if s.phase.is_finished() => {
                    return Err(s.error.unwrap_or_else(|| s.phase.to_string()))
                }
                Ok(_) => {}
                Err(e) => {
                    // The VMM exits once the VM has gone (code 0): that is the end too.
                    let ended = self.live().migrating.get(name).copied().flatten();
                    match ended {
                        Some(true) => return Ok(None),
                        Some(false) => return Err(format!("its VMM failed: {e}")),
                        None if !self.is_running(name) => {
                            return Err(format!("its VMM ended: {e}"))
                        }
                        None => {}
                    }
                }
            }
        }
    }
}

/// `vessel vm migrate`: readies the target, has the source send, waits until the VM runs
/// there. On failure the target's empty VMM is ended (the VM runs on at the source).
#[allow(clippy::too_many_arguments)]
pub fn run(
    source: &crate::client::Client,
    target: &crate::client::Client,
    name: &str,
    listen: Option<String>,
    downtime_ms: Option<u64>,
    post_copy: bool,
    bandwidth_mbps: Option<u64>,
    json: bool,
) -> Result<i32, crate::cli::CliError> {
    let v: crate::vms::VmView = source.get(&format!("/api/v1/vms/{name}"))?;
    let mut vm = v.record;
    // Its disks and snapshots stay where they are: their directory is its home there.
    vm.home = Some(v.dir);
    let ready: IncomingReady = target.send_json(
        "POST",
        "/api/v1/migrations/incoming",
        &IncomingMigration { vm, listen },
    )?;
    let req = MigrateRequest {
        to: ready.listen.clone(),
        token: ready.token,
        downtime_ms,
        post_copy,
        bandwidth_mbps,
    };
    let done: Migrated = match source.send_json("PUT", &format!("/api/v1/vms/{name}/migrate"), &req)
    {
        Ok(d) => d,
        Err(e) => {
            let _ = target.call("PUT", &format!("/api/v1/vms/{name}/kill"), None);
            return Err(e.into());
        }
    };
    // The target makes it its own once its VMM reports the migration complete.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let there: crate::vms::VmView = target.get(&format!("/api/v1/vms/{name}"))?;
        if there.state == crate::vms::VmState::Running {
            break;
        }
        if Instant::now() > deadline {
            return Err(crate::cli::CliError::Manager(Error::Failed(format!(
                "{name} left this host but is {} on the target",
                there.state.as_str()
            ))));
        }
        std::thread::sleep(POLL);
    }
    if json {
        crate::cli::print_json(&done)?;
    } else {
        let downtime = done
            .status
            .as_ref()
            .and_then(|s| s.downtime_ms)
            .map_or(String::new(), |d| format!(", downtime {d} ms"));
        println!("{name}: migrated ({}{downtime})", ready.listen);
    }
    Ok(0)
}
