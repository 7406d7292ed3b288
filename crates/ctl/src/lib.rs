//! `vessel ctl --api-socket PATH <verb>`: the command-line client of a VM's API.
//!
//! The `vessel` binary embeds [`CtlArgs`] (a `clap::Parser`, usable as a subcommand's
//! arguments) and calls [`run`]: `Ok(code)` is the process exit code, `Err` a one-line error.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use api::client::{Client, ClientError};
use api::types::{
    BalloonInfo, BalloonSetRequest, DiskCache, IfNotConverged, MigrateDisk, MigrateReceiveRequest,
    MigrateSendRequest, MigrationPhase, MigrationStatus, MigrationToken, RestoreMemory,
    RestoreRequest, SnapshotRequest, VmInfo, DEFAULT_DOWNTIME_MS,
};

/// How often `migrate send` polls the migration's progress.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why `vessel ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
    #[error("{0}")]
    Usage(&'static str),
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the token file {0} is empty")]
    EmptyTokenFile(PathBuf),
    #[error("invalid --disk '{0}': expected PATH or PATH,cache=writeback|none|unsafe")]
    Disk(String),
    #[error("{0}")]
    Net(String),
    #[error("{path}: {why}")]
    Document { path: PathBuf, why: String },
}

impl CtlError {
    /// The exit code: 2 for a bad command line, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlError::Usage(_) | CtlError::Document { .. } | CtlError::Net(_) => 2,
            _ => 1,
        }
    }
}

/// Control a running VM through its API socket.
#[derive(Debug, Clone, Parser)]
#[command(name = "vessel ctl")]
pub struct CtlArgs {
    /// The VM's API socket (`vessel run --api-socket PATH`); before or after the verb.
    #[arg(long, value_name = "PATH", global = true)]
    pub api_socket: Option<PathBuf>,
    /// Print the server's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Checks that the API answers.
    Ping,
    /// The VM's state, size and devices.
    Info,
    /// Parks every vCPU.
    Pause,
    /// Releases the vCPUs.
    Resume,
    /// Presses the ACPI power button (the guest decides when to power off).
    Shutdown,
    /// Resets the machine.
    Reset,
    /// Writes a snapshot of the paused VM.
    Snapshot {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Only the memory dirtied since the last snapshot.
        #[arg(long)]
        diff: bool,
        /// Also freeze the writable disks at the same instant: the VM goes on with a new qcow2
        /// overlay next to each image (`<image>.<dir name>.qcow2`).
        #[arg(long)]
        disk_snapshot: bool,
    },
    /// Boots the VM a JSON document describes (its spec and host bindings, as `vessel run
    /// --print-config` writes them) in an empty `vessel serve`.
    Boot {
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Restores a snapshot.
    Restore {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// How memory is brought back.
        #[arg(long, value_enum, default_value_t = MemoryArg::Lazy)]
        memory: MemoryArg,
    },
    /// Live migration.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// Without SIZE: the balloon's target, actual size and the guest's statistics. With SIZE
    /// (`64M`, `1G`, `0`; K, M, G, T suffixes, a plain number is MiB): sets the target.
    Balloon {
        #[arg(value_name = "SIZE", value_parser = parse_size)]
        size: Option<u64>,
    },
    /// Prints the counters of the vCPUs (exits by kind), disks (requests, bytes, errors) and
    /// network devices (frames, bytes, drops), as JSON. Also while the VM is paused.
    Counters,
    /// Prints the OpenAPI document.
    Openapi,
}

#[derive(Debug, Clone, Subcommand)]
pub enum MigrateCommand {
    /// Sends the VM to a waiting `migrate receive`, showing progress until it ends.
    Send {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        #[arg(long, value_name = "ADDR")]
        to: String,
        /// The longest pause allowed for the final round, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = DEFAULT_DOWNTIME_MS)]
        downtime: u64,
        /// A bandwidth cap, in megabits per second.
        #[arg(long, value_name = "MBPS")]
        bandwidth: Option<u64>,
        /// Switch to post-copy if pre-copy does not converge (the VM runs on the target and
        /// fetches missing pages from the source; a broken connection then loses the VM).
        #[arg(long)]
        post_copy: bool,
        /// If pre-copy does not converge (the last round would still pause the VM longer
        /// than --downtime): fail (the VM runs on here), stop-and-copy (accept the longer
        /// pause) or post-copy (as --post-copy).
        #[arg(long, value_name = "WHAT", value_enum, conflicts_with = "post_copy")]
        if_not_converged: Option<NotConvergedArg>,
        /// Pre-copy rounds at most before the migration counts as not converged (default 30).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
        max_rounds: Option<u32>,
        /// With --post-copy: switch after N pre-copy rounds at the latest (1: right after the
        /// first full copy).
        #[arg(long, value_name = "N", requires = "post_copy", value_parser = clap::value_parser!(u32).range(1..))]
        post_copy_after: Option<u32>,
        /// Compare all of guest memory on both sides at stop-and-copy (also catches a page the
        /// dirty log missed; costs downtime), not only the pages sent.
        #[arg(long)]
        full_digest: bool,
        /// Return once started instead of following the progress.
        #[arg(long)]
        no_wait: bool,
        /// The migration's token, as `migrate receive` printed it on the target (visible to
        /// other local users in the process list: prefer --token-file).
        #[arg(long, value_name = "TOKEN", required_unless_present = "token_file")]
        token: Option<String>,
        /// A file holding the migration's token (its first line).
        #[arg(long, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<PathBuf>,
    },
    /// Waits for an incoming migration; prints the migration's token for `migrate send`.
    Receive {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Follow the migration until it ends.
        #[arg(long)]
        wait: bool,
        /// The migration's token (at least 16 characters); a random one is made if neither
        /// this nor --token-file is given.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// A file holding the migration's token (its first line).
        #[arg(long, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// This host's image for the source's next disk (once per disk, in order), with an
        /// optional cache mode: PATH[,cache=writeback|none|unsafe].
        #[arg(long, value_name = "PATH[,cache=MODE]")]
        disk: Vec<String>,
        /// This host's tap for the source's next network device (once per device, in order).
        #[arg(long, value_name = "NAME", conflicts_with = "net")]
        tap: Vec<String>,
        /// This host's backend for the source's next network device (once per device, in
        /// order): tap=NAME for a device on a tap, socket=PATH (a listening stream socket, such
        /// as `passt --socket PATH` made here) for one on a stream socket or passt.
        #[arg(long, value_name = "tap=NAME|socket=PATH")]
        net: Vec<String>,
        /// This host's socket for the source's vsock device.
        #[arg(long, value_name = "PATH")]
        vsock_socket: Option<PathBuf>,
        /// Use the source's own paths (disks, taps, vsock, console file) for what is not
        /// given here: only for two processes on one host.
        #[arg(long)]
        same_paths: bool,
    },
    /// The current (or last) migration's progress.
    Status,
    /// Cancels the running migration; the source VM carries on.
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NotConvergedArg {
    Fail,
    StopAndCopy,
    PostCopy,
}

impl From<NotConvergedArg> for IfNotConverged {
    fn from(a: NotConvergedArg) -> Self {
        match a {
            NotConvergedArg::Fail => IfNotConverged::Fail,
            NotConvergedArg::StopAndCopy => IfNotConverged::StopAndCopy,
            NotConvergedArg::PostCopy => IfNotConverged::PostCopy,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MemoryArg {
    Lazy,
    Eager,
    #[value(alias = "uffd")]
    Userfaultfd,
}

impl From<MemoryArg> for RestoreMemory {
    fn from(m: MemoryArg) -> Self {
        match m {
            MemoryArg::Lazy => RestoreMemory::Lazy,
            MemoryArg::Eager => RestoreMemory::Eager,
            MemoryArg::Userfaultfd => RestoreMemory::Userfaultfd,
        }
    }
}

/// Runs one `vessel ctl` command, printing to stdout (progress to stderr).
pub fn run(args: &CtlArgs) -> Result<i32, CtlError> {
    run_with(args, &mut io::stdout().lock())
}

/// [`run`], printing to `out`.
pub fn run_with(args: &CtlArgs, out: &mut dyn Write) -> Result<i32, CtlError> {
    run_polling(args, out, POLL_INTERVAL)
}

fn run_polling(args: &CtlArgs, out: &mut dyn Write, poll: Duration) -> Result<i32, CtlError> {
    let socket = args
        .api_socket
        .as_ref()
        .ok_or(CtlError::Usage("--api-socket PATH is required"))?;
    let client = Client::new(socket);
    let json = args.json;
    match &args.command {
        CtlCommand::Ping => {
            let p = client.ping()?;
            if json {
                print_json(out, &p)?;
            } else {
                writeln!(out, "ok: Vessel API {} ({})", p.api_version, p.version)?;
            }
        }
        CtlCommand::Info => {
            let info = client.info()?;
            if json {
                print_json(out, &info)?;
            } else {
                print_info(out, &info)?;
            }
        }
        CtlCommand::Pause => done(out, json, client.pause(), "paused")?,
        CtlCommand::Resume => done(out, json, client.resume(), "resumed")?,
        CtlCommand::Shutdown => done(out, json, client.shutdown(), "power button pressed")?,
        CtlCommand::Reset => done(out, json, client.reset(), "reset")?,
        CtlCommand::Snapshot {
            dir,
            diff,
            disk_snapshot,
        } => {
            let req = SnapshotRequest {
                dir: dir.clone(),
                diff: *diff,
                disk_snapshot: *disk_snapshot,
            };
            let msg = format!("snapshot written to {}", dir.display());
            done(out, json, client.snapshot(&req), &msg)?;
        }
        CtlCommand::Boot { config } => {
            let bad = |why: String| CtlError::Document {
                path: config.clone(),
                why,
            };
            let text = std::fs::read_to_string(config).map_err(|e| bad(e.to_string()))?;
            let doc: api::types::VmDocument =
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            done(out, json, client.boot(&doc), "booted")?;
        }
        CtlCommand::Restore { dir, memory } => {
            let req = RestoreRequest {
                dir: dir.clone(),
                memory: (*memory).into(),
            };
            let msg = format!("restored from {}", dir.display());
            done(out, json, client.restore(&req), &msg)?;
        }
        CtlCommand::Openapi => {
            let doc = client.openapi()?;
            print_json(out, &doc)?;
        }
        // JSON with or without --json: the counters are for programs (and `jq`).
        CtlCommand::Counters => print_json(out, &client.counters()?)?,
        CtlCommand::Migrate(m) => return migrate(&client, m, json, out, poll),
        CtlCommand::Balloon { size: Some(size) } => {
            let req = BalloonSetRequest {
                target_bytes: *size,
            };
            let msg = format!("balloon target set to {}", bytes(*size));
            done(out, json, client.set_balloon(&req), &msg)?;
        }
        CtlCommand::Balloon { size: None } => {
            let b = client.balloon()?;
            if json {
                print_json(out, &b)?;
            } else {
                print_balloon(out, &b)?;
            }
        }
    }
    Ok(0)
}

fn migrate(
    client: &Client,
    cmd: &MigrateCommand,
    json: bool,
    out: &mut dyn Write,
    poll: Duration,
) -> Result<i32, CtlError> {
    match cmd {
        MigrateCommand::Send {
            to,
            downtime,
            bandwidth,
            post_copy,
            if_not_converged,
            max_rounds,
            post_copy_after,
            full_digest,
            no_wait,
            token,
            token_file,
        } => {
            let token = read_token(token, token_file)?
                .ok_or(CtlError::Usage("give --token or --token-file"))?;
            client.migrate_send(&MigrateSendRequest {
                to: to.clone(),
                downtime_ms: *downtime,
                bandwidth_mbps: *bandwidth,
                post_copy: *post_copy,
                post_copy_after_rounds: *post_copy_after,
                if_not_converged: if_not_converged.map(Into::into),
                max_rounds: *max_rounds,
                full_digest: *full_digest,
                token,
            })?;
            if *no_wait {
                done(out, json, Ok(()), &format!("migration to {to} started"))?;
                return Ok(0);
            }
            follow(client, json, out, poll)
        }
        MigrateCommand::Receive {
            listen,
            wait,
            token,
            token_file,
            disk,
            tap,
            net,
            vsock_socket,
            same_paths,
        } => {
            let disks = disk
                .iter()
                .map(|d| parse_disk(d))
                .collect::<Result<Vec<_>, _>>()?;
            let nets = net
                .iter()
                .map(|n| spec::cli::net_binding(n).map_err(|e| CtlError::Net(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            let r = client.migrate_receive(&MigrateReceiveRequest {
                listen: listen.clone(),
                token: read_token(token, token_file)?,
                disks,
                taps: tap.clone(),
                nets,
                vsock_socket: vsock_socket.clone(),
                same_paths: *same_paths,
            })?;
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(out, "listening on {listen}")?;
                writeln!(out, "token: {}", r.token.expose())?;
            }
            out.flush()?;
            if !*wait {
                return Ok(0);
            }
            follow(client, json, out, poll)
        }
        MigrateCommand::Status => {
            let s = client.migration_status()?;
            if json {
                print_json(out, &s)?;
            } else {
                writeln!(out, "{}", summary(&s))?;
            }
            Ok(0)
        }
        MigrateCommand::Cancel => {
            done(out, json, client.migrate_cancel(), "migration cancelled")?;
            Ok(0)
        }
    }
}

/// Polls the migration's status with a progress bar until it ends; 0 if it completed.
fn follow(
    client: &Client,
    json: bool,
    out: &mut dyn Write,
    poll: Duration,
) -> Result<i32, CtlError> {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    };
    let mut last: Option<MigrationStatus> = None;
    let status = loop {
        let s = match client.migration_status() {
            Ok(s) => s,
            // After stop-and-copy the source VM hands over and may exit with its API socket.
            Err(ClientError::Connect { .. })
                if last
                    .as_ref()
                    .is_some_and(|l| l.phase == MigrationPhase::StopAndCopy) =>
            {
                bar.finish_and_clear();
                writeln!(
                    out,
                    "the VM exited after stop-and-copy: migration handed over"
                )?;
                return Ok(0);
            }
            Err(e) => {
                bar.abandon();
                return Err(e.into());
            }
        };
        bar.set_length(s.transferred_bytes + s.remaining_bytes);
        bar.set_position(s.transferred_bytes);
        bar.set_message(progress_message(&s));
        if s.phase.is_finished() {
            break s;
        }
        last = Some(s);
        std::thread::sleep(poll);
    };
    bar.finish_and_clear();
    if json {
        print_json(out, &status)?;
    } else {
        writeln!(out, "{}", summary(&status))?;
    }
    Ok(if status.phase == MigrationPhase::Completed {
        0
    } else {
        1
    })
}

fn progress_message(s: &MigrationStatus) -> String {
    if s.phase == MigrationPhase::Postcopy {
        return format!("postcopy, {} missing", bytes(s.remaining_bytes));
    }
    let mut m = format!("{} round {}", s.phase, s.round);
    if s.dirty_rate > 0 {
        m.push_str(&format!(", dirtying {}/s", bytes(s.dirty_rate)));
    }
    if s.expected_downtime_ms > 0 {
        m.push_str(&format!(", downtime ~{} ms", s.expected_downtime_ms));
    }
    m
}

/// One line about a migration.
pub fn summary(s: &MigrationStatus) -> String {
    let mut line = format!("migration: {}", s.phase);
    if let Some(role) = s.role {
        line.push_str(match role {
            api::types::MigrationRole::Send => " (sending)",
            api::types::MigrationRole::Receive => " (receiving)",
        });
    }
    if s.phase != MigrationPhase::None {
        line.push_str(&format!(
            ", round {}, {} transferred, {} remaining, {:.1} s",
            s.round,
            bytes(s.transferred_bytes),
            bytes(s.remaining_bytes),
            s.elapsed_ms as f64 / 1000.0
        ));
    }
    if let Some(d) = s.downtime_ms {
        line.push_str(&format!(", downtime {d} ms"));
        if s.downtime_limit_exceeded {
            line.push_str(" (over the limit)");
        }
    }
    if let Some(e) = &s.error {
        line.push_str(&format!(": {e}"));
    }
    line
}

/// The token given on the command line or in a file (its first line, trimmed).
fn read_token(
    token: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<MigrationToken>, CtlError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| CtlError::TokenFile {
            path: path.clone(),
            source,
        })?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.is_empty() {
            return Err(CtlError::EmptyTokenFile(path.clone()));
        }
        return Ok(Some(MigrationToken(line.to_string())));
    }
    Ok(token.clone().map(MigrationToken))
}

/// `PATH[,cache=MODE]`.
fn parse_disk(s: &str) -> Result<MigrateDisk, CtlError> {
    let bad = || CtlError::Disk(s.to_string());
    let (path, cache) = match s.rsplit_once(",cache=") {
        Some((p, c)) => (p, Some(c)),
        None => (s, None),
    };
    if path.is_empty() {
        return Err(bad());
    }
    let cache = match cache {
        None => None,
        Some(c) => Some(c.parse::<DiskCache>().map_err(|_| bad())?),
    };
    Ok(MigrateDisk {
        path: PathBuf::from(path),
        cache,
    })
}

fn done(
    out: &mut dyn Write,
    json: bool,
    result: Result<(), ClientError>,
    message: &str,
) -> Result<(), CtlError> {
    result?;
    if json {
        writeln!(out, "{{}}")?;
    } else {
        writeln!(out, "{message}")?;
    }
    Ok(())
}

fn print_json(out: &mut dyn Write, v: &impl serde::Serialize) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
    writeln!(out, "{text}")?;
    Ok(())
}

fn print_info(out: &mut dyn Write, i: &VmInfo) -> io::Result<()> {
    writeln!(out, "state:    {}", i.state)?;
    if let Some(r) = &i.exit_reason {
        writeln!(out, "exit:     {r}")?;
    }
    writeln!(out, "vcpus:    {}", i.vcpus)?;
    writeln!(out, "memory:   {}", bytes(i.memory_bytes))?;
    writeln!(out, "uptime:   {:.1} s", i.uptime_ms as f64 / 1000.0)?;
    if let Some(b) = i.boot_time_ms {
        writeln!(out, "boot:     {b} ms")?;
    }
    if let Some(p) = &i.pager {
        writeln!(
            out,
            "pager:    {} faults, {} pages copied, {} zero, {} discarded",
            p.faults, p.copied_pages, p.zero_pages, p.discarded_pages
        )?;
    }
    writeln!(out, "version:  {}", i.version)?;
    writeln!(out, "devices:  {}", i.devices.len())?;
    for d in &i.devices {
        write!(out, "  {:<10} {:<14}", d.id, d.kind)?;
        if let Some(a) = &d.address {
            write!(out, " {a}")?;
        }
        if let Some(irq) = d.irq {
            write!(out, " irq {irq}")?;
        }
        if let Some(detail) = &d.detail {
            write!(out, " ({detail})")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn print_balloon(out: &mut dyn Write, b: &BalloonInfo) -> io::Result<()> {
    writeln!(out, "target:   {}", bytes(b.target_bytes))?;
    writeln!(out, "actual:   {}", bytes(b.actual_bytes))?;
    let Some(stats) = &b.stats else {
        return writeln!(out, "stats:    none");
    };
    writeln!(out, "stats:")?;
    // In the spec's order; the counts as they are, the rest in bytes.
    for name in api::types::BALLOON_STATS {
        if let Some(v) = stats.get(name) {
            let counted = name.ends_with("faults") || name.starts_with("hugetlb");
            let v = if counted { v.to_string() } else { bytes(*v) };
            writeln!(out, "  {name:<20} {v}")?;
        }
    }
    for (name, v) in stats {
        if !api::types::BALLOON_STATS.contains(&name.as_str()) {
            writeln!(out, "  {name:<20} {v}")?;
        }
    }
    Ok(())
}

/// Parses a size (`spec::size`): a plain number is MiB (as `vessel run --memory` and
/// `--balloon size=` take it).
pub fn parse_size(s: &str) -> Result<u64, String> {
    spec::size::parse(s, spec::size::Plain::MiB).map_err(|e| e.to_string())
}

/// `1536` → `1.5 KiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
pub fn run_for_test(args: &CtlArgs, out: &mut dyn Write, poll: Duration) -> Result<i32, CtlError> {
    run_polling(args, out, poll)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_verb() {
        let p = |args: &[&str]| {
            let mut v = vec!["vessel-ctl", "--api-socket", "/run/v.sock"];
            v.extend_from_slice(args);
            CtlArgs::try_parse_from(v)
        };
        for ok in [
            &["ping"][..],
            &["info"],
            &["--json", "info"],
            &["pause"],
            &["resume"],
            &["shutdown"],
            &["reset"],
            &["snapshot", "--dir", "/s", "--diff"],
            &["restore", "--dir", "/s", "--memory", "userfaultfd"],
            &[
                "migrate",
                "send",
                "--to",
                "tcp:h:1",
                "--downtime",
                "50",
                "--token",
                "t",
            ],
            &[
                "migrate",
                "send",
                "--to",
                "x",
                "--post-copy",
                "--token-file",
                "/t",
            ],
            &[
                "migrate",
                "send",
                "--to",
                "x",
                "--full-digest",
                "--token",
                "t",
            ],
            &[
                "migrate",
                "send",
                "--to",
                "x",
                "--post-copy",
                "--post-copy-after",
                "2",
                "--token",
                "t",
            ],
            &["migrate", "receive", "--listen", "tcp:0.0.0.0:1"],
            &[
                "migrate",
                "receive",
                "--listen",
                "tcp:0.0.0.0:1",
                "--token-file",
                "/t",
                "--disk",
                "/a.raw",
                "--disk",
                "/b.qcow2,cache=none",
                "--tap",
                "vtap0",
                "--vsock-socket",
                "/v.sock",
            ],
            &[
                "migrate",
                "receive",
                "--listen",
                "unix:/m",
                "--net",
                "tap=vtap0",
                "--net",
                "socket=/run/p.sock",
            ],
            &["migrate", "receive", "--listen", "unix:/m", "--same-paths"],
            &["migrate", "status"],
            &["migrate", "cancel"],
            &["openapi"],
            &["counters"],
            &["--json", "counters"],
            &["balloon"],
            &["--json", "balloon"],
            &["balloon", "64M"],
            &["balloon", "0"],
        ] {
            p(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let a = p(&["migrate", "send", "--to", "x", "--token", "t"]).unwrap();
        match a.command {
            CtlCommand::Migrate(MigrateCommand::Send {
                downtime,
                bandwidth,
                ..
            }) => assert_eq!((downtime, bandwidth), (300, None)),
            c => panic!("{c:?}"),
        }
        for bad in [
            &["snapshot"][..],
            &["restore", "--dir", "/s", "--memory", "x"],
            &["migrate", "send"],
            // The token is required, once.
            &["migrate", "send", "--to", "x"],
            &[
                "migrate",
                "send",
                "--to",
                "x",
                "--token",
                "a",
                "--token-file",
                "/b",
            ],
            &[
                "migrate",
                "receive",
                "--listen",
                "x",
                "--token",
                "a",
                "--token-file",
                "/b",
            ],
            &["migrate", "send", "--to", "x", "--downtime", "-1"],
            &["migrate", "send", "--to", "x", "--post-copy-after", "2"],
            &[
                "migrate",
                "send",
                "--to",
                "x",
                "--post-copy",
                "--post-copy-after",
                "0",
            ],
            &["frobnicate"],
            &["balloon", "lots"],
            &["balloon", "-1M"],
            &["balloon", "64M", "extra"],
            &["counters", "extra"],
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        // The socket and --json go before or after the verb; without a socket, a usage error.
        let after = CtlArgs::try_parse_from([
            "vessel-ctl",
            "migrate",
            "status",
            "--json",
            "--api-socket",
            "/run/v.sock",
        ])
        .unwrap();
        assert!(after.json);
        assert_eq!(after.api_socket, Some(PathBuf::from("/run/v.sock")));
        let none = CtlArgs::try_parse_from(["vessel-ctl", "info"]).unwrap();
        let e = run_with(&none, &mut Vec::new()).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains("--api-socket"), "{e}");
        // What a migration that does not converge does.
        let a = p(&[
            "migrate",
            "send",
            "--to",
            "x",
            "--if-not-converged",
            "stop-and-copy",
            "--token",
            "t",
        ]);
        match a.unwrap().command {
            CtlCommand::Migrate(MigrateCommand::Send {
                if_not_converged, ..
            }) => assert_eq!(if_not_converged, Some(NotConvergedArg::StopAndCopy)),
            c => panic!("{c:?}"),
        }
        assert!(p(&[
            "migrate",
            "send",
            "--to",
            "x",
            "--post-copy",
            "--if-not-converged",
            "fail",
            "--token",
            "t"
        ])
        .is_err());
    }

    #[test]
    fn disks_and_token_files() {
        assert_eq!(
            parse_disk("/a b.raw").unwrap(),
            MigrateDisk {
                path: "/a b.raw".into(),
                cache: None
            }
        );
        assert_eq!(
            parse_disk("/x,y.qcow2,cache=unsafe").unwrap().cache,
            Some(DiskCache::Unsafe)
        );
        for bad in ["", ",cache=none", "/a,cache=fast"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        let dir = std::env::temp_dir().join(format!("vessel-ctl-token-{}", std::process::id()));
        std::fs::write(&dir, "  s3cret-token-0123456789  \nrest\n").unwrap();
        let t = read_token(&None, &Some(dir.clone())).unwrap().unwrap();
        assert_eq!(t.expose(), "s3cret-token-0123456789");
        // Never in a Debug form.
        assert!(!format!("{t:?}").contains("s3cret"));
        std::fs::write(&dir, "\n").unwrap();
        assert!(read_token(&None, &Some(dir.clone())).is_err());
        std::fs::remove_file(&dir).unwrap();
        assert!(read_token(&None, &Some(dir)).is_err());
        assert_eq!(read_token(&None, &None).unwrap(), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("16"), Ok(16 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        for bad in ["", "M", "x", "-1M", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("lots").unwrap_err().contains("'lots'"));
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(2 << 30), "2.0 GiB");
    }
}

#[cfg(test)]
mod api_tests;
