//! `vessel run`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use spec::bindings::{Console, HostBindings, NetBinding, VmDocument};
use spec::cli;
use spec::vm::{Nic, VmSpec, DEFAULT_CMDLINE};
use vmm::vm::RestoreOptions;
use vmm::{Vm, VmConfig};

use crate::confine::{absolutize, absolutize_restore, ConfineArgs, Needs};
use crate::passt::{Passt, PasstError};

/// The bundled guest (guests/), built by build.rs.
static BUNDLED_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vessel-guest.elf"));

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel to boot: bzImage, or ELF vmlinux (PVH entry used when present). Default: the
    /// bundled guest.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest memory: 512M, 2G, ... (a plain number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// Back guest memory with transparent huge pages (MADV_HUGEPAGE): on or off. Huge pages
    /// mean fewer page faults and TLB misses; off keeps the memory of a guest that touches
    /// little of each 2 MiB smaller.
    #[arg(long, value_name = "on|off", default_value = "on")]
    thp: String,
    /// Serial console: stdio (the default), file:PATH, socket:PATH or off.
    #[arg(long, value_name = "WHERE")]
    console: Option<String>,
    /// CPU features to hide or require, e.g. `x86-64-v2`, `-avx512f,-x2apic`, `+aes`.
    #[arg(long, value_name = "SPEC", allow_hyphen_values = true)]
    cpu_template: Option<String>,
    /// Boot protocol: auto (PVH when the ELF kernel has the note), pvh, linux64.
    #[arg(long, value_name = "PROTOCOL", default_value = "auto")]
    boot_protocol: String,
    /// A virtio disk (raw or qcow2), repeatable:
    /// `path=FILE[,readonly=on][,cache=writeback|none|unsafe][,serial=ID][,queues=N]
    /// [,engine=auto|io_uring|threads|sync][,bw=BYTES][,iops=N][,bw_burst=BYTES][,iops_burst=N]`.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio network device, repeatable, on one of: `tap=NAME` (a tap interface, created if
    /// absent), `socket=PATH` (a listening Unix stream socket speaking QEMU's stream protocol,
    /// such as `passt --socket PATH` made), `passt` (Vessel starts passt as the VM's user, no
    /// privileges needed; `forward=tcp|udp:HOSTPORT[:GUESTPORT]` repeatable brings host ports
    /// in). Then `[,mac=AA:BB:CC:DD:EE:FF][,queues=N]` (queues: taps only) and rate limits per
    /// second for the device: `[,tx_bw=BYTES][,tx_pps=N][,rx_bw=BYTES][,rx_pps=N]` (K/M/G
    /// suffixes) with one-time bursts `[,tx_bw_burst=BYTES]` (likewise `tx_pps_burst`,
    /// `rx_bw_burst`, `rx_pps_burst`).
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// A virtio entropy device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device: `cid=N,socket=PATH`. Guest connections to host port P go to the
    /// Unix socket `PATH_P`; host clients connect to `PATH` and write `CONNECT <port>\n`.
    #[arg(long, value_name = "SPEC")]
    vsock: Option<String>,
    /// A virtio console (a second console besides the serial one): stdio, file:PATH,
    /// socket:PATH or off.
    #[arg(long, value_name = "WHERE")]
    virtio_console: Option<String>,
    /// A virtio memory balloon: `[size=SIZE][,stats=on][,free-page-reporting=on]
    /// [,deflate-on-oom=on]`; SIZE is the memory the guest is asked to give back.
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<String>,
    /// Serve the control API (REST over HTTP) on this Unix socket; `vessel ctl` is its client.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Transport of the virtio devices: mmio or pci.
    #[arg(long, value_name = "TRANSPORT", default_value = "mmio")]
    transport: String,
    /// What a guest reset does: exit (Vessel ends with code 3) or restart (the VM boots again
    /// in this process).
    #[arg(long, value_name = "ACTION", default_value = "exit")]
    on_reboot: String,
    /// Restore the VM saved in this snapshot directory (`vessel ctl snapshot`) instead of
    /// booting: the machine (vCPUs, memory, devices) comes from the snapshot; the console and
    /// API socket from this command.
    /// With --restore, --net (one per saved network device) and --vsock give the restored VM
    /// new backends, MACs, network rate limits and guest CID: a clone beside the original needs
    /// its own backends.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initrd", "cpu_template", "disk", "rng", "virtio_console", "balloon", "config",
    ])]
    restore: Option<PathBuf>,
    /// Boot the VM a JSON document describes: `{"spec": {...}, "bindings": {...}}`, the spec
    /// being what the VM is (vCPUs, memory, boot source, devices) and the bindings this host's
    /// files, taps, sockets and console (`--print-config` shows the document any flags make).
    /// --api-socket and --console, when given, replace the document's.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "thp", "cpu_template", "boot_protocol",
        "disk", "net", "rng", "vsock", "virtio_console", "balloon", "transport", "on_reboot",
    ])]
    config: Option<PathBuf>,
    /// Print the VM document (spec and host bindings, JSON) these flags describe, and exit
    /// without starting it.
    #[arg(long, conflicts_with = "restore")]
    print_config: bool,
    /// How a restored VM's memory comes in: lazy (mapped from the file, on first touch), eager
    /// (all before the guest runs) or uffd (anonymous memory; a userfaultfd thread copies
    /// each page in from the file on first touch).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "lazy",
        requires = "restore"
    )]
    restore_memory: String,
    #[command(flatten)]
    confine: ConfineArgs,
}

/// `vessel serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The control API's Unix socket: `vessel ctl --api-socket PATH restore DIR` starts a VM.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Serial console of the VM to come: stdio, file:PATH, socket:PATH or off.
    #[arg(long, value_name = "WHERE", default_value = "stdio")]
    console: String,
    #[command(flatten)]
    confine: ConfineArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] vmm::config::ConfigError),
    #[error(transparent)]
    Arg(#[from] spec::cli::ArgError),
    #[error("{path}: {why}")]
    Document { path: String, why: String },
    #[error(transparent)]
    Template(#[from] arch::template::Error),
    #[error(transparent)]
    Vm(#[from] vmm::Error),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Seccomp(#[from] jail::seccomp::Error),
    #[error(transparent)]
    Jail(#[from] jail::sandbox::Error),
    #[error(transparent)]
    Affinity(#[from] jail::affinity::Error),
    #[error(transparent)]
    Passt(#[from] PasstError),
}

impl Error {
    /// The exit code: 2 for a configuration Vessel cannot start (README, "Exit codes"),
    /// 1 for a failure of the host or of Vessel.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Vm(e) if !e.is_config() => vmm::exit::EXIT_ERROR,
            Error::Seccomp(jail::seccomp::Error::Mode(_)) => vmm::exit::EXIT_USAGE,
            Error::Seccomp(_) => vmm::exit::EXIT_ERROR,
            Error::Jail(e) if !e.is_config() => vmm::exit::EXIT_ERROR,
            _ => vmm::exit::EXIT_USAGE,
        }
    }
}

/// The VM document the flags describe.
fn document(args: &RunArgs) -> Result<VmDocument, Error> {
    let mut spec = VmSpec {
        cpus: args.cpus,
        memory: cli::memory(&args.memory)?,
        thp: cli::on_off(&args.thp)?,
        cpu_template: args.cpu_template.clone().unwrap_or_default(),
        transport: cli::transport(&args.transport)?,
        on_reboot: cli::on_reboot(&args.on_reboot)?,
        rng: args.rng,
        virtio_console: args.virtio_console.is_some(),
        balloon: args.balloon.as_deref().map(cli::balloon).transpose()?,
        ..VmSpec::default()
    };
    spec.boot.kernel = args.kernel.clone();
    spec.boot.initrd = args.initrd.clone();
    spec.boot.cmdline = args.cmdline.clone();
    spec.boot.protocol = cli::protocol(&args.boot_protocol)?;
    let mut bindings = HostBindings {
        console: Some(cli::console(args.console.as_deref().unwrap_or("stdio"))?),
        virtio_console: args
            .virtio_console
            .as_deref()
            .map(cli::virtio_console)
            .transpose()?,
        api_socket: args.api_socket.clone(),
        ..HostBindings::default()
    };
    for d in &args.disk {
        let (disk, path) = cli::disk(d)?;
        spec.disks.push(disk);
        bindings.disks.push(path);
    }
    for (nic, binding) in parse_nets(&args.net)? {
        spec.nets.push(nic);
        bindings.nets.push(binding);
    }
    if let Some(v) = &args.vsock {
        let (vsock, socket) = cli::vsock(v)?;
        spec.vsock = Some(vsock);
        bindings.vsock_socket = Some(socket);
    }
    Ok(VmDocument { spec, bindings })
}

/// The VM document in `path`, with the flags' --api-socket and --console over its own.
fn read_document(path: &std::path::Path, args: &RunArgs) -> Result<VmDocument, Error> {
    let bad = |why: String| Error::Document {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut doc: VmDocument = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    // The flag's console, else the document's, else the terminal.
    match &args.console {
        Some(c) => doc.bindings.console = Some(cli::console(c)?),
        None if doc.bindings.console.is_none() => doc.bindings.console = Some(Console::Stdio),
        None => {}
    }
    if let Some(p) = &args.api_socket {
        doc.bindings.api_socket = Some(p.clone());
    }
    doc.validate().map_err(|e| bad(e.to_string()))?;
    Ok(doc)
}

/// The configuration of the VM `doc` describes (the bundled guest when it names no kernel).
fn config(doc: VmDocument) -> VmConfig {
    let mut config = VmConfig::new(doc.spec, doc.bindings);
    config.bundled_kernel = Some(("bundled-guest", BUNDLED_GUEST));
    config
}

/// The `--net` flags' devices and bindings, a socket's path made absolute (a document's must
/// be).
fn parse_nets(specs: &[String]) -> Result<Vec<(Nic, NetBinding)>, Error> {
    specs
        .iter()
        .map(|n| {
            let (nic, mut binding) = cli::net(n)?;
            if let NetBinding::Socket(p) = &mut binding {
                if let Ok(a) = std::path::absolute(&*p) {
                    *p = a;
                }
            }
            Ok((nic, binding))
        })
        .collect()
}

/// Starts a passt for each `passt` binding and gives the binding its socket. The processes
/// end when the returned values drop.
fn start_passts<'a>(
    nets: impl Iterator<Item = &'a mut NetBinding>,
    jail_user: Option<(u32, u32)>,
) -> Result<Vec<Passt>, Error> {
    let mut started = Vec::new();
    for (i, b) in nets.enumerate() {
        if let NetBinding::Passt(p) = b {
            let passt = Passt::start(i, &p.forwards, jail_user)?;
            p.socket = Some(passt.socket().to_path_buf());
            started.push(passt);
        }
    }
    Ok(started)
}

/// After the jail: the jailed VMM leaves its passts to the keeper, which started them.
fn after_jail(passts: Vec<Passt>, jailed: bool) -> Vec<Passt> {
    if jailed {
        passts.into_iter().for_each(Passt::disown);
        Vec::new()
    } else {
        passts
    }
}

fn parse_restore_memory(s: &str) -> Result<api::types::RestoreMemory, Error> {
    match s {
        "lazy" => Ok(api::types::RestoreMemory::Lazy),
        "eager" => Ok(api::types::RestoreMemory::Eager),
        "uffd" | "userfaultfd" => Ok(api::types::RestoreMemory::Userfaultfd),
        _ => Err(Error::Usage(format!(
            "invalid --restore-memory '{s}': expected lazy, eager or uffd"
        ))),
    }
}

pub fn run(mut args: RunArgs, start: Instant) -> Result<i32, Error> {
    let confine = std::mem::take(&mut args.confine);
    let jailed = confine.jailed();
    // Each passt started for the VM lives (in this process, or the jail's keeper) until the
    // VM has ended.
    let passts: Vec<Passt>;
    let vm = match args.restore.clone() {
        Some(dir) => {
            let mut opts = RestoreOptions {
                memory: parse_restore_memory(&args.restore_memory)?,
                console: cli::console(args.console.as_deref().unwrap_or("stdio"))?,
                api_socket: args.api_socket.clone(),
                nets: parse_nets(&args.net)?,
                vsock: args.vsock.as_deref().map(cli::vsock).transpose()?,
            };
            if opts.nets.is_empty() {
                // A device saved on passt needs a new one: bind every device as it was.
                let saved = vmm::snapshot::saved_nets(&dir).map_err(vmm::Error::from)?;
                if saved.iter().any(|(_, b)| matches!(b, NetBinding::Passt(_))) {
                    opts.nets = saved
                        .into_iter()
                        .map(|(n, b)| (Nic { mac: None, ..n }, b))
                        .collect();
                }
            }
            let started = start_passts(opts.nets.iter_mut().map(|(_, b)| b), confine.jail_user()?)?;
            let dir = if jailed {
                absolutize_restore(&mut opts);
                crate::confine::absolute(&dir)
            } else {
                dir
            };
            if let Some(code) = confine.apply(None, || Needs::of_restore(&dir, &opts))? {
                return Ok(code);
            }
            passts = after_jail(started, jailed);
            Vm::restore(&dir, opts, start)?
        }
        None => {
            let doc = match &args.config {
                Some(path) => read_document(path, &args)?,
                None => document(&args)?,
            };
            // Refused here, before a jail forks, rather than when the VM is built.
            if !doc.spec.cpu_template.is_empty() {
                arch::template::CpuTemplate::parse(&doc.spec.cpu_template)?;
            }
            if args.print_config {
                let json = serde_json::to_string_pretty(&doc).map_err(|e| Error::Document {
                    path: "-".into(),
                    why: e.to_string(),
                })?;
                println!("{json}");
                return Ok(0);
            }
            let mut config = config(doc);
            if config
                .bindings
                .nets
                .iter()
                .any(|b| matches!(b, NetBinding::Passt(_)))
            {
                // No passt for a VM that cannot start.
                config
                    .spec
                    .validate()
                    .and_then(|()| config.bindings.check(&config.spec))
                    .map_err(vmm::config::ConfigError::from)?;
            }
            let started = start_passts(config.bindings.nets.iter_mut(), confine.jail_user()?)?;
            if jailed {
                absolutize(&mut config);
            }
            if let Some(code) =
                confine.apply(Some(config.spec.cpus), || Ok(Needs::of_config(&config)))?
            {
                return Ok(code);
            }
            passts = after_jail(started, jailed);
            Vm::build(config, start)?
        }
    };
    let reason = vm.run()?;
    drop(passts);
    report(reason)
}

/// `vessel serve`: an empty VMM with an API, waiting for a snapshot to restore.
pub fn serve(args: ServeArgs, start: Instant) -> Result<i32, Error> {
    let jailed = args.confine.jailed();
    let mut opts = RestoreOptions {
        console: cli::console(&args.console)?,
        api_socket: Some(args.api_socket.clone()),
        ..Default::default()
    };
    if jailed {
        absolutize_restore(&mut opts);
    }
    let socket = opts.api_socket.clone().unwrap_or(args.api_socket);
    if let Some(code) = args
        .confine
        .apply(None, || Ok(Needs::of_serve(&socket, &opts.console)))?
    {
        return Ok(code);
    }
    report(vmm::session::serve(
        &socket,
        opts,
        Some(("bundled-guest", BUNDLED_GUEST)),
        start,
    )?)
}

/// Says how the VM ended; returns the exit code.
fn report(reason: vmm::ExitReason) -> Result<i32, Error> {
    match &reason {
        vmm::ExitReason::PowerOff | vmm::ExitReason::GuestExit(0) => {
            tracing::info!("{reason}")
        }
        vmm::ExitReason::Crash(_) | vmm::ExitReason::Error(_) => {
            eprintln!("vessel: {reason}")
        }
        _ => tracing::warn!("{reason}"),
    }
    Ok(reason.code())
}
