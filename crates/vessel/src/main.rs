//! `vessel`: the VM monitor and its tools.

mod confine;
mod host_check;
mod passt;
mod run;

use clap::{Parser, Subcommand};

/// Vessel: a KVM virtualization platform.
#[derive(Parser, Debug)]
#[command(name = "vessel", version, about, propagate_version = true)]
struct Cli {
    /// Log filter (tracing syntax), e.g. `debug` or `warn,vessel::boot=info`. Also VESSEL_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM: a kernel given with --kernel, or the bundled guest.
    Run(Box<run::RunArgs>),
    /// Start an empty VMM with a control API, waiting for a snapshot to restore.
    Serve(run::ServeArgs),
    /// Say what this host's KVM offers and whether it runs guest kernels natively.
    HostCheck(host_check::HostCheckArgs),
    /// Control a running VM through its API socket (`vessel run --api-socket`).
    Ctl(ctl::CtlArgs),
    /// Create, inspect, snapshot, convert and check disk images (raw, qcow2).
    Image(block::cli::ImageArgs),
    /// The host's VM manager: named, persistent VMs from templates, each a supervised
    /// `vessel run` process, behind a REST API on a Unix socket.
    Daemon(manager::cli::DaemonArgs),
    /// The daemon's VMs: list, create, start, stop, console, delete, ...
    Vm(manager::cli::VmArgs),
    /// The daemon's templates: what VMs are made from.
    Template(manager::cli::TemplateArgs),
    /// The daemon's managed networks: NAT, isolated or bridged, with DHCP and DNS.
    Net(manager::net_cli::NetArgs),
    /// The daemon's storage pools (directories of volumes).
    Pool(manager::storage_cli::PoolArgs),
    /// The volumes of the daemon's pools: create, list, resize, upload, delete.
    Volume(manager::storage_cli::VolumeArgs),
    /// The daemon's events (--follow for new ones as they happen).
    Events(manager::cli::EventsArgs),
    /// Tokens for the daemon's TCP listener (admin or read-only).
    Token(manager::cli::TokenArgs),
}

fn init_logging(filter: Option<&str>) {
    let filter = filter
        .map(str::to_string)
        .or_else(|| std::env::var("VESSEL_LOG").ok())
        .unwrap_or_else(|| "warn,vessel::boot=info".to_string());
    let env = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}

fn main() {
    let start = std::time::Instant::now();
    vmm::exit::install_panic_hook();
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    // Each error with its exit code (README, "Exit codes").
    let failed = |e: &dyn std::error::Error, code| (e.to_string(), code);
    let result: Result<i32, (String, i32)> = match cli.command {
        Command::Run(args) => run::run(*args, start).map_err(|e| failed(&e, e.exit_code())),
        Command::Serve(args) => run::serve(args, start).map_err(|e| failed(&e, e.exit_code())),
        Command::HostCheck(args) => {
            host_check::run(args).map_err(|e| failed(&e, vmm::exit::EXIT_ERROR))
        }
        Command::Image(args) => {
            block::cli::run(args).map_err(|e| failed(&e, vmm::exit::EXIT_ERROR))
        }
        Command::Ctl(args) => ctl::run(&args).map_err(|e| failed(&e, e.exit_code())),
        Command::Daemon(args) => manager::cli::daemon(args).map_err(|e| failed(&e, e.exit_code())),
        Command::Vm(args) => manager::cli::vm(args).map_err(|e| failed(&e, e.exit_code())),
        Command::Template(args) => {
            manager::cli::template(args).map_err(|e| failed(&e, e.exit_code()))
        }
        Command::Net(args) => manager::net_cli::net(args).map_err(|e| failed(&e, e.exit_code())),
        Command::Pool(args) => {
            manager::storage_cli::pool(args).map_err(|e| failed(&e, e.exit_code()))
        }
        Command::Volume(args) => {
            manager::storage_cli::volume(args).map_err(|e| failed(&e, e.exit_code()))
        }
        Command::Events(args) => manager::cli::events(args).map_err(|e| failed(&e, e.exit_code())),
        Command::Token(args) => manager::cli::token(args).map_err(|e| failed(&e, e.exit_code())),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err((message, code)) => {
            eprintln!("vessel: error: {message}");
            std::process::exit(code);
        }
    }
}
