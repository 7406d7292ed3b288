//! `vessel image ...`: the command line for disk images.
//!
//! Wire it into a binary as `Image(block::cli::ImageArgs)` and call [`run`]; errors are
//! returned for the caller to print as one line.

use crate::ops::{self, CreateOptions, OpsError, Prealloc, SnapshotOp};
use crate::{Format, OpenOptions};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

/// Errors of the image command line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Image(#[from] crate::Error),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Disk image management (`vessel image`).
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse().map_err(|e: crate::Error| e.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    ops::parse_size(s)
}

/// `vessel image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create a new image (optionally as an overlay on a backing file).
    Create {
        /// Image format.
        #[arg(short = 'f', long = "format", value_parser = parse_format, default_value = "qcow2")]
        format: Format,
        /// Virtual size (e.g. 10G); defaults to the backing file's size.
        #[arg(short = 's', long, value_parser = parse_size)]
        size: Option<u64>,
        /// Backing file (relative names are relative to the new image).
        #[arg(short = 'b', long)]
        backing: Option<String>,
        /// Format of the backing file (probed if omitted).
        #[arg(short = 'F', long, value_parser = parse_format)]
        backing_format: Option<Format>,
        /// Preallocation: off, metadata, falloc or full.
        #[arg(long, default_value = "off")]
        preallocation: Prealloc,
        /// qcow2 cluster size in bytes (default 64K).
        #[arg(long, value_parser = parse_size)]
        cluster_size: Option<u64>,
        /// Replace an existing file. An image in use (by a VM, or any process holding its
        /// lock) is refused even so.
        #[arg(long)]
        force: bool,
        /// Image file.
        path: PathBuf,
        /// Virtual size, as qemu-img accepts it positionally.
        #[arg(value_parser = parse_size)]
        size_pos: Option<u64>,
    },
    /// Show image information.
    Info {
        #[arg(long)]
        json: bool,
        /// Describe every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        /// Do not take the shared lock (inspect an image in use).
        #[arg(short = 'U', long)]
        force_share: bool,
        path: PathBuf,
    },
    /// Create a thin copy-on-write clone of a template image.
    Clone {
        /// Template (base) image.
        #[arg(long = "from")]
        from: PathBuf,
        /// Replace an existing file (never one in use).
        #[arg(long)]
        force: bool,
        /// New overlay image.
        path: PathBuf,
    },
    /// Internal snapshots: create, list, apply, delete.
    Snapshot {
        #[command(subcommand)]
        op: SnapshotCmd,
    },
    /// Merge an overlay into its backing file and empty the overlay.
    Commit {
        #[arg(short = 'p', long)]
        progress: bool,
        path: PathBuf,
    },
    /// Change the backing file of an overlay.
    Rebase {
        /// New backing file ("" for none).
        #[arg(short = 'b', long)]
        backing: String,
        #[arg(short = 'F', long, value_parser = parse_format)]
        backing_format: Option<Format>,
        /// Only rewrite the header (do not copy differing data).
        #[arg(short = 'u', long = "unsafe")]
        unsafe_: bool,
        #[arg(short = 'p', long)]
        progress: bool,
        path: PathBuf,
    },
    /// Convert (and flatten) an image into a new standalone image.
    Convert {
        #[arg(short = 'f', long = "format", value_parser = parse_format)]
        format: Option<Format>,
        #[arg(short = 'O', long = "output-format", value_parser = parse_format)]
        output_format: Format,
        #[arg(long, value_parser = parse_size)]
        cluster_size: Option<u64>,
        #[arg(short = 'p', long)]
        progress: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Change the virtual size (`+N`/`-N` are relative).
    Resize {
        #[arg(long)]
        shrink: bool,
        path: PathBuf,
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Check image consistency (qcow2), like `qemu-img check`.
    ///
    /// Exit status: 0 no problems; 1 the check could not run (unreadable file, header
    /// invalid, image in use); 2 corruptions found (overlapping or misplaced metadata,
    /// refcounts lower than the references, wrong COPIED flags); 3 leaked clusters only
    /// (wasted space, no harm to data); 63 the format (raw) does not support checks. An
    /// image marked corrupt (header bit) is reported; with --repair that leaves no
    /// corruption the mark is cleared.
    Check {
        /// Repair leaked clusters, refcount errors and COPIED flags.
        #[arg(short = 'r', long)]
        repair: bool,
        #[arg(long)]
        json: bool,
        path: PathBuf,
    },
    /// Test helper for the crash test: allocating writes, each line printed on stdout
    /// after it was written and flushed.
    #[command(hide = true)]
    CrashWriter {
        path: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
}

/// Snapshot subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    Create {
        path: PathBuf,
        name: String,
    },
    List {
        #[arg(long)]
        json: bool,
        path: PathBuf,
    },
    Apply {
        path: PathBuf,
        name: String,
    },
    Delete {
        path: PathBuf,
        name: String,
    },
}

fn bar(enabled: bool, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn progress_fn(pb: &ProgressBar) -> impl Fn(u64, u64) + '_ {
    move |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Run an image subcommand; returns the process exit code.
pub fn run(args: ImageArgs) -> Result<i32, CliError> {
    match args.command {
        ImageCommand::Create {
            format,
            size,
            backing,
            backing_format,
            preallocation,
            cluster_size,
            force,
            path,
            size_pos,
        } => {
            let opts = CreateOptions {
                format: Some(format),
                size: size.or(size_pos),
                backing,
                backing_format,
                prealloc: preallocation,
                cluster_size,
                force,
            };
            ops::create(&path, &opts)?;
            Ok(0)
        }
        ImageCommand::Info {
            json,
            backing_chain,
            force_share,
            path,
        } => {
            let infos = ops::info(&path, backing_chain, !force_share)?;
            if json {
                if backing_chain {
                    print_json(&infos)?;
                } else {
                    print_json(&infos[0])?;
                }
            } else {
                let text: Vec<String> = infos.iter().map(|i| i.to_text()).collect();
                print!("{}", text.join("\n"));
            }
            Ok(0)
        }
        ImageCommand::Clone { from, force, path } => {
            ops::clone(&from, &path, force)?;
            Ok(0)
        }
        ImageCommand::Snapshot { op } => run_snapshot(op),
        ImageCommand::Commit { progress, path } => {
            let pb = bar(progress, "commit");
            ops::commit(&path, &progress_fn(&pb))?;
            pb.finish_and_clear();
            println!("Image committed.");
            Ok(0)
        }
        ImageCommand::Rebase {
            backing,
            backing_format,
            unsafe_,
            progress,
            path,
        } => {
            let pb = bar(progress, "rebase");
            let b = (!backing.is_empty()).then_some(backing.as_str());
            ops::rebase(&path, b, backing_format, unsafe_, &progress_fn(&pb))?;
            pb.finish_and_clear();
            Ok(0)
        }
        ImageCommand::Convert {
            format,
            output_format,
            cluster_size,
            progress,
            src,
            dst,
        } => {
            let pb = bar(progress, "convert");
            ops::convert(
                &src,
                format,
                &dst,
                output_format,
                cluster_size,
                &progress_fn(&pb),
            )?;
            pb.finish_and_clear();
            Ok(0)
        }
        ImageCommand::Resize { shrink, path, size } => run_resize(&path, &size, shrink),
        ImageCommand::Check { repair, json, path } => run_check(&path, repair, json),
        ImageCommand::CrashWriter { path, seed, count } => crash_writer(&path, seed, count),
    }
}

fn run_snapshot(op: SnapshotCmd) -> Result<i32, CliError> {
    let (path, op, name) = match op {
        SnapshotCmd::List { json, path } => {
            let snaps = ops::snapshot_list(&path)?;
            if json {
                print_json(&snaps)?;
            } else {
                println!("ID        TAG               DATE         DISK SIZE");
                for s in snaps {
                    println!(
                        "{:<9} {:<17} {:<12} {}",
                        s.id,
                        s.name,
                        s.date_sec,
                        s.disk_size.map(ops::info::human_size).unwrap_or_default()
                    );
                }
            }
            return Ok(0);
        }
        SnapshotCmd::Create { path, name } => (path, SnapshotOp::Create, name),
        SnapshotCmd::Apply { path, name } => (path, SnapshotOp::Apply, name),
        SnapshotCmd::Delete { path, name } => (path, SnapshotOp::Delete, name),
    };
    ops::snapshot(&path, op, &name)?;
    Ok(0)
}

fn run_resize(path: &std::path::Path, size: &str, shrink: bool) -> Result<i32, CliError> {
    let cur = ops::info(path, false, false)?[0].virtual_size;
    let new = if let Some(rest) = size.strip_prefix('+') {
        cur.checked_add(parse_size(rest).map_err(CliError::Usage)?)
            .ok_or_else(|| CliError::Usage("size overflow".into()))?
    } else if let Some(rest) = size.strip_prefix('-') {
        cur.checked_sub(parse_size(rest).map_err(CliError::Usage)?)
            .ok_or_else(|| CliError::Usage("new size would be negative".into()))?
    } else {
        parse_size(size).map_err(CliError::Usage)?
    };
    ops::resize(path, new, shrink)?;
    println!("Image resized.");
    Ok(0)
}

/// `qemu-img check`'s exit status for a format without checks.
pub const EXIT_CHECK_UNSUPPORTED: i32 = 63;

fn run_check(path: &std::path::Path, repair: bool, json: bool) -> Result<i32, CliError> {
    if crate::probe(path)? != Format::Qcow2 {
        eprintln!(
            "vessel: {}: this image format does not support checks",
            path.display()
        );
        return Ok(EXIT_CHECK_UNSUPPORTED);
    }
    let r = ops::check(path, repair)?;
    if json {
        print_json(&r)?;
        return Ok(r.exit_code());
    }
    for m in &r.messages {
        eprintln!("{m}");
    }
    if r.marked_corrupt {
        println!(
            "The image is marked corrupt (corrupt bit set in the header): it opens read-only \
             only; --repair clears the mark once no corruption is left."
        );
    }
    if repair && (r.corruptions_fixed > 0 || r.leaks_fixed > 0) {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions > 0 {
        println!("\n{} errors were found on the image.", r.corruptions);
    }
    if r.leaks > 0 {
        println!("\n{} leaked clusters were found on the image.", r.leaks);
    }
    if r.corruptions == 0 && r.leaks == 0 {
        println!("No errors were found on the image.");
    }
    println!(
        "{}/{} = {:.2}% allocated\nImage end offset: {}",
        r.allocated_clusters,
        r.total_clusters,
        100.0 * r.allocated_clusters as f64 / r.total_clusters.max(1) as f64,
        r.image_end_offset
    );
    Ok(r.exit_code())
}

/// Deterministic content for crash-test write `i`.
pub fn crash_pattern(seed: u64, i: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_add(1);
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Offsets written by the crash-test writer, in order.
pub fn crash_offsets(seed: u64, size: u64) -> impl Iterator<Item = u64> {
    let slots = (size / 4096).max(1);
    let mut rng = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    std::iter::repeat_with(move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % slots) * 4096
    })
}

fn crash_writer(path: &std::path::Path, seed: u64, count: u64) -> Result<i32, CliError> {
    let disk = crate::open(path, OpenOptions::default())?;
    let mut buf = vec![0u8; 4096];
    let mut out = std::io::stdout().lock();
    for (i, off) in crash_offsets(seed, disk.size())
        .take(count as usize)
        .enumerate()
    {
        let i = i as u64;
        crash_pattern(seed, i, &mut buf);
        disk.write_at(&buf, off)?;
        disk.flush()?;
        writeln!(out, "{i} {off}")?;
        out.flush()?;
    }
    drop(disk);
    Ok(0)
}
