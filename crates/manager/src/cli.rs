//! The manager's command line: `vessel daemon`, and its clients `vessel vm`, `vessel
//! template` and `vessel events`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use spec::vm::VmSpec;

use crate::client::{Client, ClientError};
use crate::layout::{default_run, default_socket, default_state, Layout};
use crate::store::{Event, RestartPolicy, SqliteStore, Template};
use crate::vms::{Manager, StopRequest, TemplateCreate, VmCreate, VmView};

/// Errors of the manager's commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Manager(#[from] crate::vms::Error),
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    /// 2 for a bad command line or request the daemon refused as such, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Client(ClientError::Api { status: 400, .. }) => 2,
            _ => 1,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Io { what, source }
}

/// `vessel daemon`.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The API's Unix socket (default: RUN/vessel.sock, or $VESSEL_SOCKET).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where templates, VMs, disks and the database live (default: /var/lib/vessel for
    /// root, else $XDG_STATE_HOME/vessel).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where sockets live (default: /run/vessel for root, else $XDG_RUNTIME_DIR/vessel).
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Start every VM in a jail with these settings (`vessel run --jail`), e.g.
    /// `uid=990,gid=990`.
    #[arg(long, value_name = "SPEC")]
    vm_jail: Option<String>,
    /// Jail every VM as a user (and group) of its own from this range, e.g.
    /// `200000-265535` (instead of --vm-jail's uid and gid; its other settings apply).
    #[arg(long, value_name = "FIRST-LAST",
        value_parser = |s: &str| crate::jailing::parse_range(s).map_err(|e| e.to_string()))]
    vm_uids: Option<(u32, u32)>,
    /// Also serve the API on TCP (`ADDR:PORT`), over TLS, to holders of a token (`vessel
    /// token create`).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// The TLS certificate (PEM) for --listen (default: STATE/tls/daemon.crt, self-signed,
    /// made the first time).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// The client commands' common options.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon's socket (default: $VESSEL_SOCKET, else RUN/vessel.sock).
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// A daemon's TCP listener instead (`HOST:PORT`, TLS; or $VESSEL_REMOTE).
    #[arg(long, value_name = "HOST:PORT", global = true)]
    remote: Option<String>,
    /// The token for --remote (or $VESSEL_TOKEN).
    #[arg(long, value_name = "SECRET", global = true)]
    token: Option<String>,
    /// The certificate to trust for --remote (PEM; the daemon's STATE/tls/daemon.crt, or
    /// $VESSEL_TLS_CA).
    #[arg(long, value_name = "FILE", global = true)]
    tls_ca: Option<PathBuf>,
    /// Print the daemon's JSON.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl ClientArgs {
    pub(crate) fn client(&self) -> Result<Client, CliError> {
        let Some(remote) = self.remote.clone().or_else(|| env("VESSEL_REMOTE")) else {
            return Ok(Client::new(
                &self.socket.clone().unwrap_or_else(default_socket),
            ));
        };
        let ca = self
            .tls_ca
            .clone()
            .or_else(|| env("VESSEL_TLS_CA").map(PathBuf::from))
            .ok_or_else(|| {
                CliError::Usage(
                    "--remote needs --tls-ca FILE (the daemon's certificate, \
                     STATE/tls/daemon.crt) or VESSEL_TLS_CA"
                        .into(),
                )
            })?;
        let token = self.token.clone().or_else(|| env("VESSEL_TOKEN"));
        Ok(Client::remote(&remote, &ca, token)?)
    }
}

/// `vessel token`.
#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// The tokens (names and roles).
    List,
    /// Makes a token for the TCP listener and prints its secret (shown this once).
    Create {
        name: String,
        /// admin (everything) or read-only (GET requests only).
        #[arg(long, value_enum, default_value = "read-only")]
        role: RoleArg,
    },
    /// Revokes a token.
    Delete { name: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Admin,
    ReadOnly,
}

/// `vessel token ...`.
pub fn token(args: TokenArgs) -> Result<i32, CliError> {
    let c = args.client.client()?;
    match args.command {
        TokenCommand::List => {
            let ts: Vec<crate::store::Token> = c.get("/api/v1/tokens")?;
            if args.client.json {
                print_json(&ts)?;
            } else {
                for t in ts {
                    let role = serde_json::to_value(t.role).unwrap_or_default();
                    println!("{:<20} {}", t.name, role.as_str().unwrap_or(""));
                }
            }
        }
        TokenCommand::Create { name, role } => {
            let role = match role {
                RoleArg::Admin => crate::store::Role::Admin,
                RoleArg::ReadOnly => crate::store::Role::ReadOnly,
            };
            let req = crate::auth::TokenCreate { name, role };
            let t: crate::auth::TokenCreated = c.send_json("POST", "/api/v1/tokens", &req)?;
            if args.client.json {
                print_json(&t)?;
            } else {
                println!("{}", t.secret);
            }
        }
        TokenCommand::Delete { name } => {
            c.call("DELETE", &format!("/api/v1/tokens/{name}"), None)?;
            println!("token {name}: deleted");
        }
    }
    Ok(0)
}

/// `vessel vm`.
#[derive(Args, Debug)]
pub struct VmArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// The VMs: name, state, vCPUs, memory, uptime.
    List,
    /// Makes a VM from a template (thin overlays on its disks).
    Create {
        name: String,
        #[arg(long, short)]
        template: String,
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory: 512M, 2G (a plain number is MiB).
        #[arg(long, value_parser = |s: &str| spec::cli::memory(s).map_err(|e| e.to_string()))]
        memory: Option<u64>,
        /// The kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// never, on-failure or always.
        #[arg(long, value_enum, default_value = "on-failure")]
        restart: RestartArg,
        /// Start it when the daemon starts.
        #[arg(long)]
        autostart: bool,
        /// Its place among autostarted VMs (lower first).
        #[arg(long, default_value_t = 0)]
        order: i64,
        /// Seconds the daemon waits after autostarting it before the next VM.
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        delay: u64,
        /// The size of its first disk (at least the template's): 20G.
        #[arg(long, value_parser = |s: &str| spec::size::parse(s, spec::size::Plain::Bytes).map_err(|e| e.to_string()))]
        disk_size: Option<u64>,
        /// A NIC on a managed network: NETWORK[,mac=MAC] (repeatable; replaces the template's
        /// NICs, taking their options in order).
        #[arg(long = "net", value_name = "NETWORK[,mac=MAC]")]
        nets: Vec<String>,
        /// A pool volume (POOL/VOLUME) attached as one more disk; it outlives the VM
        /// (repeatable).
        #[arg(long = "volume", value_name = "POOL/VOLUME")]
        volumes: Vec<String>,
        /// Start it now.
        #[arg(long)]
        start: bool,
        /// cloud-init: the guest's hostname (in a NoCloud seed disk, label CIDATA).
        #[arg(long)]
        hostname: Option<String>,
        /// cloud-init: an SSH public key, or a file holding one (repeatable).
        #[arg(long = "ssh-key", value_name = "KEY|FILE")]
        ssh_keys: Vec<String>,
        /// cloud-init: the user-data file (a #cloud-config or a script) instead of the one
        /// made from --hostname and --ssh-key.
        #[arg(long, value_name = "FILE")]
        user_data: Option<PathBuf>,
    },
    /// All about one VM.
    Info { name: String },
    /// Starts the VM (restoring it if it was suspended); returns once its API answers.
    Start { name: String },
    /// The ACPI power button, then after --timeout seconds SIGTERM, then SIGKILL.
    Stop {
        name: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Ends the VM's process at once.
    Kill { name: String },
    /// Snapshots: the VM and its disks together.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Saves the VM to disk and ends its process; `vm start` (or the daemon's next start)
    /// brings it back where it was. `--all`: every running VM (a host going down).
    Suspend {
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Parks the VM's vCPUs.
    Pause { name: String },
    /// Lets a paused VM run again.
    Resume { name: String },
    /// Stops the VM (as stop), then starts it.
    Restart {
        name: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Deletes a stopped VM and its disks (attached pool volumes and a defined VM's images
    /// stay).
    Delete {
        name: String,
        /// Leave its disks where they are (`vm info` showed them).
        #[arg(long)]
        keep_disks: bool,
    },
    /// Defines a VM from a whole spec (the `spec` of `vessel run --print-config`) and an
    /// image for each of its disks, used in place (they stay when the VM is deleted).
    Define {
        name: String,
        #[arg(long, value_name = "FILE")]
        spec: PathBuf,
        /// An image for each disk of the spec, in order (repeatable).
        #[arg(long = "disk", value_name = "IMAGE")]
        disks: Vec<PathBuf>,
        /// A NIC on a managed network for each NIC of the spec: NETWORK[,mac=MAC].
        #[arg(long = "net", value_name = "NETWORK[,mac=MAC]")]
        nets: Vec<String>,
        #[arg(long, value_enum, default_value = "on-failure")]
        restart: RestartArg,
        #[arg(long)]
        autostart: bool,
        #[arg(long)]
        start: bool,
    },
    /// Changes the VM's machine (applied at its next start) or settings; with no flag,
    /// opens its spec in $EDITOR.
    Edit {
        name: String,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long, value_parser = |s: &str| spec::cli::memory(s).map_err(|e| e.to_string()))]
        memory: Option<u64>,
        #[arg(long)]
        cmdline: Option<String>,
        #[arg(long, value_enum)]
        restart: Option<RestartArg>,
        #[arg(long)]
        autostart: Option<bool>,
        /// Its place among autostarted VMs.
        #[arg(long)]
        order: Option<i64>,
        /// Seconds before the next autostarted VM.
        #[arg(long, value_name = "SECONDS")]
        delay: Option<u64>,
        /// The whole spec from a file.
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
    },
    /// Moves the running VM to another host's daemon, live (its disks must be on storage
    /// both hosts reach).
    Migrate {
        name: String,
        /// The target daemon's socket (a daemon on this host).
        #[arg(long, value_name = "PATH", required_unless_present = "to_remote")]
        to_socket: Option<PathBuf>,
        /// The target daemon's TCP listener (`HOST:PORT`, TLS).
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "to_socket")]
        to_remote: Option<String>,
        /// The token for --to-remote.
        #[arg(long, value_name = "SECRET")]
        to_token: Option<String>,
        /// The certificate to trust for --to-remote.
        #[arg(long, value_name = "FILE", requires = "to_remote")]
        to_tls_ca: Option<PathBuf>,
        /// Where the target's VMM listens (`tcp:HOST:PORT`, port 0 for any, or `unix:PATH`;
        /// default: `tcp:127.0.0.1:0` with --to-socket, `tcp:HOST:0` of --to-remote).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// The longest pause of the last round.
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Switch to post-copy when pre-copy does not converge.
        #[arg(long)]
        post_copy: bool,
        /// A bandwidth cap in megabits per second.
        #[arg(long, value_name = "MBPS")]
        bandwidth: Option<u64>,
    },
    /// Makes NEW, a copy of the stopped VM NAME with its own disks and new MACs.
    Clone {
        name: String,
        new: String,
        #[arg(long)]
        start: bool,
    },
    /// The end of the VM's log (its VMM's messages; the guest's output is on `vm console`).
    Log {
        name: String,
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: usize,
    },
    /// Attaches this terminal to the VM's serial console (Ctrl-] detaches).
    Console { name: String },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Snapshots the running VM: memory, devices and disks at one instant.
    Create { name: String, snapshot: String },
    /// The VM's snapshots.
    List { name: String },
    /// Starts the stopped VM from the snapshot.
    Restore { name: String, snapshot: String },
    /// Deletes a snapshot's memory and state.
    Delete { name: String, snapshot: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RestartArg {
    Never,
    OnFailure,
    Always,
}

impl From<RestartArg> for RestartPolicy {
    fn from(r: RestartArg) -> RestartPolicy {
        match r {
            RestartArg::Never => RestartPolicy::Never,
            RestartArg::OnFailure => RestartPolicy::OnFailure,
            RestartArg::Always => RestartPolicy::Always,
        }
    }
}

/// `vessel template`.
#[derive(Args, Debug)]
pub struct TemplateArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Subcommand, Debug)]
enum TemplateCommand {
    List,
    /// Makes a template: a VM spec (from --spec FILE, else the flags) and base disks.
    Create {
        name: String,
        /// A spec file (the `spec` of `vessel run --print-config`).
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
        /// The kernel (default: the bundled guest).
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long)]
        cmdline: Option<String>,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long, value_parser = |s: &str| spec::cli::memory(s).map_err(|e| e.to_string()))]
        memory: Option<u64>,
        /// A base disk image or a pool volume as POOL/VOLUME (repeatable); each VM gets a
        /// thin overlay on it.
        #[arg(long = "disk", value_name = "IMAGE|POOL/VOLUME")]
        disks: Vec<PathBuf>,
        /// Made from this stopped VM instead: its spec, its disks flattened into new bases.
        #[arg(long, value_name = "VM", conflicts_with_all = ["spec", "kernel", "initrd",
            "cmdline", "cpus", "memory", "disks"])]
        from_vm: Option<String>,
    },
    Delete {
        name: String,
    },
}

/// `vessel events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only events after this id.
    #[arg(long, default_value_t = 0)]
    since: i64,
    /// Keep printing new events as they happen.
    #[arg(long, short)]
    follow: bool,
}

/// Runs `vessel daemon` until SIGINT or SIGTERM; its VMs run on.
pub fn daemon(args: DaemonArgs) -> Result<i32, CliError> {
    let layout = Layout {
        state: args.state_dir.unwrap_or_else(default_state),
        run: args.run_dir.unwrap_or_else(default_run),
    };
    let socket = args
        .socket
        .unwrap_or_else(|| layout.run.join("vessel.sock"));
    layout
        .create()
        .map_err(io(format!("cannot create {}", layout.state.display())))?;
    let store = Arc::new(SqliteStore::open(&layout.db())?);
    let vessel = std::env::current_exe().map_err(io("cannot find the vessel binary"))?;
    let listen = args.listen;
    let tls = match &listen {
        Some(_) => {
            let usage = |e: crate::auth::AuthError| CliError::Usage(e.to_string());
            let (cert, key) =
                crate::auth::certificate(&layout.state, args.tls_cert.zip(args.tls_key))
                    .map_err(usage)?;
            Some((crate::auth::acceptor(&cert, &key).map_err(usage)?, cert))
        }
        None => None,
    };
    let jail = crate::jailing::VmJail::new(args.vm_jail, args.vm_uids)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let manager = Manager::new(store, layout, vessel, jail)?;
    manager.ensure_default_pool()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("cannot start the runtime"))?;
    rt.block_on(async {
        let router = crate::server::router(manager.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async {
            let _ = rx.await;
        };
        let serving = tokio::spawn({
            let socket = socket.clone();
            async move { crate::server::serve(&socket, router, stop).await }
        });
        // VMs come back (adopted or started) with the API already answering.
        let m = manager.clone();
        let recovered = tokio::task::spawn_blocking(move || {
            // Networks first: the VMs that start now need their bridges.
            if let Err(e) = m.recover_networks() {
                tracing::error!("recovering the networks: {e}");
            }
            m.recover()
        })
        .await;
        match recovered {
            Ok(Err(e)) => tracing::error!("recovering the VMs: {e}"),
            Err(e) => tracing::error!("recovering the VMs: {e}"),
            Ok(Ok(())) => {}
        }
        tracing::info!("vessel daemon on {}", socket.display());
        eprintln!("vessel daemon: listening on {}", socket.display());
        let (stop_tcp, stopped) = tokio::sync::watch::channel(false);
        if let (Some(addr), Some((acceptor, cert))) = (&listen, &tls) {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("cannot listen on {addr}")))?;
            tokio::spawn(crate::auth::serve_tls(
                listener,
                acceptor.clone(),
                crate::server::tcp_router(manager.clone()),
                stopped,
            ));
            eprintln!(
                "vessel daemon: listening on {addr} (TLS, certificate {}; tokens: vessel token)",
                cert.display()
            );
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io("signals"))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            r = serving => {
                return match r {
                    Ok(Ok(())) => Ok(0),
                    Ok(Err(e)) => Err(io(format!("serving {}", socket.display()))(e)),
                    Err(e) => Err(CliError::Usage(e.to_string())),
                };
            }
        }
        let _ = tx.send(());
        let _ = stop_tcp.send(true);
        // Followers of the events stream do not hold the daemon up.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let _ = std::fs::remove_file(&socket);
        eprintln!("vessel daemon: stopped (its VMs run on)");
        Ok(0)
    })
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).unwrap_or_default();
    writeln!(std::io::stdout(), "{s}").map_err(io("stdout"))
}

pub(crate) fn size(bytes: u64) -> String {
    spec::size::format(bytes)
}

fn uptime(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) => {
            let s = ms / 1000;
            match s {
                0..60 => format!("{s}s"),
                60..3600 => format!("{}m{}s", s / 60, s % 60),
                _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
            }
        }
    }
}

fn print_vms(vms: &[VmView]) {
    println!(
        "{:<20} {:<9} {:>5} {:>7} {:>9} {:>8}  {:<15} TEMPLATE",
        "NAME", "STATE", "VCPUS", "MEMORY", "UPTIME", "PID", "ADDRESS"
    );
    for v in vms {
        let ips: Vec<String> = v.addresses.iter().map(|a| a.ip.to_string()).collect();
        println!(
            "{:<20} {:<9} {:>5} {:>7} {:>9} {:>8}  {:<15} {}",
            v.record.name,
            v.state.as_str(),
            v.record.spec.cpus,
            size(v.record.spec.memory),
            uptime(v.uptime_ms),
            v.record.pid.map_or("-".into(), |p| p.to_string()),
            if ips.is_empty() {
                "-".to_string()
            } else {
                ips.join(",")
            },
            v.record.template
        );
    }
}

/// `vessel vm ...`.
pub fn vm(args: VmArgs) -> Result<i32, CliError> {
    let c = args.client.client()?;
    let json = args.client.json;
    let show = |v: VmView, what: &str| -> Result<i32, CliError> {
        if json {
            print_json(&v)?;
        } else {
            println!("{}: {what}", v.record.name);
        }
        Ok(0)
    };
    let path = |name: &str, action: &str| format!("/api/v1/vms/{name}/{action}");
    // A VM action without a body, its answer shown with `what`.
    let act = |name: &str, action: &str, what: &str| -> Result<i32, CliError> {
        show(
            c.send_json("PUT", &path(name, action), &serde_json::json!({}))?,
            what,
        )
    };
    match args.command {
        VmCommand::List => {
            let vms: Vec<VmView> = c.get("/api/v1/vms")?;
            if json {
                print_json(&vms)?;
            } else {
                print_vms(&vms);
            }
            Ok(0)
        }
        VmCommand::Create {
            name,
            template,
            cpus,
            memory,
            cmdline,
            restart,
            autostart,
            order,
            delay,
            disk_size,
            nets,
            volumes,
            start,
            hostname,
            ssh_keys,
            user_data,
        } => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(io(p.display().to_string()))
            };
            let mut keys = Vec::new();
            for k in ssh_keys {
                let path = std::path::Path::new(&k);
                if !k.contains(' ') && path.exists() {
                    keys.extend(
                        read(path)?
                            .lines()
                            .filter(|l| !l.trim().is_empty())
                            .map(str::to_string),
                    );
                } else {
                    keys.push(k);
                }
            }
            let seed = crate::seed::Seed {
                hostname,
                ssh_keys: keys,
                user_data: user_data.as_deref().map(read).transpose()?,
            };
            let req = VmCreate {
                name,
                template,
                cpus,
                memory,
                cmdline,
                restart: restart.into(),
                autostart,
                autostart_order: order,
                autostart_delay_s: delay,
                disk_size,
                volumes,
                nets,
                start,
                cloud_init: (!seed.is_empty()).then_some(seed),
                ..VmCreate::default()
            };
            let v: VmView = c.send_json("POST", "/api/v1/vms", &req)?;
            let what = if start {
                "created and started"
            } else {
                "created"
            };
            show(v, what)
        }
        VmCommand::Info { name } => {
            let v: VmView = c.get(&format!("/api/v1/vms/{name}"))?;
            print_json(&v)?;
            Ok(0)
        }
        VmCommand::Start { name } => act(&name, "start", "started"),
        VmCommand::Stop { name, timeout } => {
            let req = StopRequest {
                timeout_s: Some(timeout),
            };
            show(c.send_json("PUT", &path(&name, "stop"), &req)?, "stopped")
        }
        VmCommand::Kill { name } => act(&name, "kill", "killed"),
        VmCommand::Snapshot(cmd) => match cmd {
            SnapshotCommand::Create { name, snapshot } => {
                let path = format!("/api/v1/vms/{name}/snapshots");
                let v = c.send_json("POST", &path, &serde_json::json!({ "name": snapshot }))?;
                show(v, &format!("snapshot {snapshot} taken"))
            }
            SnapshotCommand::List { name } => {
                let ss: Vec<crate::store::Snapshot> =
                    c.get(&format!("/api/v1/vms/{name}/snapshots"))?;
                if json {
                    print_json(&ss)?;
                } else {
                    for s in ss {
                        println!("{:<20} {}", s.name, s.dir.display());
                    }
                }
                Ok(0)
            }
            SnapshotCommand::Restore { name, snapshot } => {
                let path = format!("/api/v1/vms/{name}/snapshots/{snapshot}/restore");
                let v = c.send_json("PUT", &path, &serde_json::json!({}))?;
                show(v, &format!("restored from snapshot {snapshot}"))
            }
            SnapshotCommand::Delete { name, snapshot } => {
                let path = format!("/api/v1/vms/{name}/snapshots/{snapshot}");
                let v: VmView = serde_json::from_slice(&c.call("DELETE", &path, None)?)
                    .map_err(ClientError::from)?;
                show(v, &format!("snapshot {snapshot} deleted"))
            }
        },
        VmCommand::Suspend {
            name: Some(name), ..
        } => act(&name, "suspend", "suspended (saved to disk)"),
        VmCommand::Suspend { name: None, .. } => {
            let done: Vec<String> =
                c.send_json("PUT", "/api/v1/suspend-all", &serde_json::json!({}))?;
            if json {
                print_json(&done)?;
            } else {
                for n in done {
                    println!("{n}: suspended (saved to disk)");
                }
            }
            Ok(0)
        }
        VmCommand::Pause { name } => act(&name, "pause", "paused"),
        VmCommand::Resume { name } => act(&name, "resume", "resumed"),
        VmCommand::Restart { name, timeout } => {
            let req = StopRequest {
                timeout_s: Some(timeout),
            };
            show(
                c.send_json("PUT", &path(&name, "restart"), &req)?,
                "restarted",
            )
        }
        VmCommand::Delete { name, keep_disks } => {
            let q = if keep_disks { "?keep_disks=true" } else { "" };
            c.call("DELETE", &format!("/api/v1/vms/{name}{q}"), None)?;
            if !json {
                println!(
                    "{name}: deleted{}",
                    if keep_disks { " (its disks kept)" } else { "" }
                );
            }
            Ok(0)
        }
        VmCommand::Define {
            name,
            spec,
            disks,
            nets,
            restart,
            autostart,
            start,
        } => {
            let text = std::fs::read_to_string(&spec).map_err(io(spec.display().to_string()))?;
            let s: VmSpec = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", spec.display())))?;
            let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let req = VmCreate {
                name,
                spec: Some(s),
                disks: disks.into_iter().map(abs).collect(),
                nets,
                restart: restart.into(),
                autostart,
                start,
                ..VmCreate::default()
            };
            let v: VmView = c.send_json("POST", "/api/v1/vms", &req)?;
            show(
                v,
                if start {
                    "defined and started"
                } else {
                    "defined"
                },
            )
        }
        VmCommand::Edit {
            name,
            cpus,
            memory,
            cmdline,
            restart,
            autostart,
            order,
            delay,
            spec,
        } => {
            let read_spec = |f: &std::path::Path| -> Result<VmSpec, CliError> {
                let text = std::fs::read_to_string(f).map_err(io(f.display().to_string()))?;
                serde_json::from_str(&text)
                    .map_err(|e| CliError::Usage(format!("{}: {e}", f.display())))
            };
            let mut req = crate::edit::VmEdit {
                spec: spec.as_deref().map(read_spec).transpose()?,
                cpus,
                memory,
                cmdline,
                restart: restart.map(Into::into),
                autostart,
                autostart_order: order,
                autostart_delay_s: delay,
            };
            if serde_json::to_value(&req).ok()
                == serde_json::to_value(crate::edit::VmEdit::default()).ok()
            {
                let v: VmView = c.get(&format!("/api/v1/vms/{name}"))?;
                match edit_in_editor(&v.record.spec)? {
                    Some(s) => req.spec = Some(s),
                    None => {
                        println!("{name}: unchanged");
                        return Ok(0);
                    }
                }
            }
            show(
                c.send_json("PATCH", &format!("/api/v1/vms/{name}"), &req)?,
                "changed",
            )
        }
        VmCommand::Migrate {
            name,
            to_socket,
            to_remote,
            to_token,
            to_tls_ca,
            listen,
            downtime_ms,
            post_copy,
            bandwidth,
        } => {
            let target = match (&to_socket, &to_remote) {
                (Some(s), _) => Client::new(s),
                (None, Some(r)) => {
                    let ca = to_tls_ca.ok_or_else(|| {
                        CliError::Usage("--to-remote needs --to-tls-ca FILE".into())
                    })?;
                    Client::remote(r, &ca, to_token)?
                }
                (None, None) => return Err(CliError::Usage("--to-socket or --to-remote".into())),
            };
            let listen = listen.or_else(|| {
                let host = to_remote.as_ref()?.rsplit_once(':')?.0.to_string();
                Some(format!("tcp:{host}:0"))
            });
            crate::migrate::run(
                &c,
                &target,
                &name,
                listen,
                downtime_ms,
                post_copy,
                bandwidth,
                json,
            )
        }
        VmCommand::Clone { name, new, start } => {
            let req = crate::edit::VmClone { name: new, start };
            let v: VmView = c.send_json("POST", &path(&name, "clone"), &req)?;
            show(v, &format!("created, a clone of {name}"))
        }
        VmCommand::Log { name, lines } => {
            let text = c.call(
                "GET",
                &format!("/api/v1/vms/{name}/log?lines={lines}"),
                None,
            )?;
            std::io::stdout().write_all(&text).map_err(io("stdout"))?;
            Ok(0)
        }
        VmCommand::Console { name } => {
            let v: VmView = c.get(&format!("/api/v1/vms/{name}"))?;
            crate::console::attach(&name, &v.console_socket)
        }
    }
}

/// `vessel template ...`.
pub fn template(args: TemplateArgs) -> Result<i32, CliError> {
    let c = args.client.client()?;
    match args.command {
        TemplateCommand::List => {
            let ts: Vec<Template> = c.get("/api/v1/templates")?;
            if args.client.json {
                print_json(&ts)?;
            } else {
                println!(
                    "{:<20} {:>5} {:>7} {:>5}  KERNEL",
                    "NAME", "VCPUS", "MEMORY", "DISKS"
                );
                for t in ts {
                    let kernel = t
                        .spec
                        .boot
                        .kernel
                        .as_ref()
                        .map_or("(bundled guest)".into(), |k| k.display().to_string());
                    println!(
                        "{:<20} {:>5} {:>7} {:>5}  {kernel}",
                        t.name,
                        t.spec.cpus,
                        size(t.spec.memory),
                        t.base_disks.len()
                    );
                }
            }
            Ok(0)
        }
        TemplateCommand::Create {
            name,
            spec,
            kernel,
            initrd,
            cmdline,
            cpus,
            memory,
            disks,
            from_vm,
        } => {
            let mut s: VmSpec = match &spec {
                Some(f) => {
                    let text = std::fs::read_to_string(f).map_err(io(f.display().to_string()))?;
                    serde_json::from_str(&text)
                        .map_err(|e| CliError::Usage(format!("{}: {e}", f.display())))?
                }
                None => VmSpec::default(),
            };
            // A path stays as given when it names a volume (POOL/VOLUME, not a file here).
            let abs = |p: PathBuf| {
                if p.is_relative() && !p.exists() && p.components().count() == 2 {
                    return p;
                }
                std::path::absolute(&p).unwrap_or(p)
            };
            if let Some(k) = kernel {
                s.boot.kernel = Some(abs(k));
            }
            if let Some(i) = initrd {
                s.boot.initrd = Some(abs(i));
            }
            if let Some(c) = cmdline {
                s.boot.cmdline = c;
            }
            if let Some(n) = cpus {
                s.cpus = n;
            }
            if let Some(m) = memory {
                s.memory = m;
            }
            let req = TemplateCreate {
                name,
                spec: s,
                base_disks: disks.into_iter().map(abs).collect(),
                from_vm,
            };
            let t: Template = c.send_json("POST", "/api/v1/templates", &req)?;
            if args.client.json {
                print_json(&t)?;
            } else {
                println!("template {}: created", t.name);
            }
            Ok(0)
        }
        TemplateCommand::Delete { name } => {
            c.call("DELETE", &format!("/api/v1/templates/{name}"), None)?;
            println!("template {name}: deleted");
            Ok(0)
        }
    }
}

/// Opens `spec` in $EDITOR (or vi) until it parses or the user gives up; None when unchanged.
fn edit_in_editor(spec: &VmSpec) -> Result<Option<VmSpec>, CliError> {
    let text = serde_json::to_string_pretty(spec).map_err(|e| CliError::Usage(e.to_string()))?;
    let path = std::env::temp_dir().join(format!("vessel-edit-{}.json", std::process::id()));
    std::fs::write(&path, &text).map_err(io(path.display().to_string()))?;
    let editor = env("VISUAL")
        .or_else(|| env("EDITOR"))
        .unwrap_or_else(|| "vi".into());
    let result = loop {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&path)
            .status()
            .map_err(io(format!("cannot run {editor}")))?;
        if !status.success() {
            break Err(CliError::Usage(format!(
                "{editor} failed ({status}): nothing changed"
            )));
        }
        let new = std::fs::read_to_string(&path).map_err(io(path.display().to_string()))?;
        if new == text {
            break Ok(None);
        }
        match serde_json::from_str::<VmSpec>(&new) {
            Ok(s) => break Ok(Some(s)),
            Err(e) => {
                eprint!("{e}\nedit again? [Y/n] ");
                let mut answer = String::new();
                let _ = std::io::stdin().read_line(&mut answer);
                if answer.trim().eq_ignore_ascii_case("n") {
                    break Err(CliError::Usage(
                        "the spec does not parse: nothing changed".into(),
                    ));
                }
            }
        }
    };
    let _ = std::fs::remove_file(&path);
    result
}

fn print_event(e: &Event, json: bool) -> bool {
    let line = if json {
        serde_json::to_string(e).unwrap_or_default()
    } else {
        format!("{:>6} {:<18} {:<16} {}", e.id, e.kind, e.subject, e.message)
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// `vessel events`.
pub fn events(args: EventsArgs) -> Result<i32, CliError> {
    let c = args.client.client()?;
    let json = args.client.json;
    if args.follow {
        c.follow(
            &format!("/api/v1/events/stream?since={}", args.since),
            |data| match serde_json::from_str::<Event>(data) {
                Ok(e) => print_event(&e, json),
                Err(_) => true,
            },
        )?;
    } else {
        let es: Vec<Event> = c.get(&format!("/api/v1/events?since={}", args.since))?;
        if json {
            print_json(&es)?;
        } else {
            for e in &es {
                print_event(e, false);
            }
        }
    }
    Ok(0)
}
