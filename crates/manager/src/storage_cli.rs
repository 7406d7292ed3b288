//! `vessel pool` and `vessel volume`: the daemon's storage pools and their volumes.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::cli::{print_json, size, CliError, ClientArgs};
use crate::storage::{PoolCreate, PoolView, Volume, VolumeCreate, VolumeFormat, VolumeResize};

/// `vessel pool`.
#[derive(Args, Debug)]
pub struct PoolArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: PoolCommand,
}

#[derive(Subcommand, Debug)]
enum PoolCommand {
    /// The pools: path, space, volumes.
    List,
    /// Makes a pool of a directory (made if missing).
    Create {
        name: String,
        #[arg(long)]
        path: PathBuf,
    },
    /// All about one pool.
    Info { name: String },
    /// Forgets a pool none of whose volumes is in use; its files stay.
    Delete { name: String },
}

/// `vessel volume`.
#[derive(Args, Debug)]
pub struct VolumeArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: VolumeCommand,
}

fn size_arg(s: &str) -> Result<u64, String> {
    spec::size::parse(s, spec::size::Plain::Bytes).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// A pool's volumes: format, size, allocation, users.
    List { pool: String },
    /// Makes an empty volume, or a thin overlay on another volume of the pool.
    Create {
        pool: String,
        name: String,
        /// 10G (default: the backing volume's).
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        #[arg(long, value_enum, default_value = "qcow2")]
        format: FormatArg,
        /// A volume of the same pool to be an overlay on.
        #[arg(long, value_name = "VOLUME")]
        backing: Option<String>,
    },
    /// All about one volume.
    Info { pool: String, name: String },
    /// Deletes a volume no template or VM uses.
    Delete { pool: String, name: String },
    /// Resizes a volume no running VM uses.
    Resize {
        pool: String,
        name: String,
        #[arg(value_parser = size_arg)]
        size: u64,
        /// Allow a smaller size (the data past it is lost).
        #[arg(long)]
        shrink: bool,
    },
    /// Makes a volume of a local image file (raw or qcow2, without a backing file).
    Upload {
        pool: String,
        name: String,
        file: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Qcow2,
    Raw,
}

/// `vessel pool ...`.
pub fn pool(args: PoolArgs) -> Result<i32, CliError> {
    let c = args.client.client()?;
    let json = args.client.json;
    match args.command {
        PoolCommand::List => {
            let ps: Vec<PoolView> = c.get("/api/v1/pools")?;
            if json {
                print_json(&ps)?;
            } else {
                println!(
                    "{:<16} {:>7} {:>9} {:>9}  PATH",
                    "NAME", "VOLUMES", "AVAILABLE", "CAPACITY"
                );
                for p in ps {
                    println!(
                        "{:<16} {:>7} {:>9} {:>9}  {}",
                        p.pool.name,
                        p.volumes,
                        size(p.available),
                        size(p.capacity),
                        p.pool.path.display()
                    );
                }
            }
        }
        PoolCommand::Create { name, path } => {
            let path = std::path::absolute(&path).unwrap_or(path);
            let p: PoolView = c.send_json("POST", "/api/v1/pools", &PoolCreate { name, path })?;
            if json {
                print_json(&p)?;
            } else {
                println!("pool {}: created at {}", p.pool.name, p.pool.path.display());
            }
        }
        PoolCommand::Info { name } => {
            print_json(&c.get::<PoolView>(&format!("/api/v1/pools/{name}"))?)?;
        }
        PoolCommand::Delete { name } => {
            c.call("DELETE", &format!("/api/v1/pools/{name}"), None)?;
            if !json {
                println!("pool {name}: deleted (its files stay)");
            }
        }
    }
    Ok(0)
}

/// `vessel volume ...`.
pub fn volume(args: VolumeArgs) -> Result<i32, CliError> {
    let c = args.client.client()?;
    let json = args.client.json;
    let show = |v: Volume, what: &str| -> Result<i32, CliError> {
        if json {
            print_json(&v)?;
        } else {
            println!("volume {}/{}: {what}", v.pool, v.name);
        }
        Ok(0)
    };
    let at = |pool: &str, name: &str| format!("/api/v1/pools/{pool}/volumes/{name}");
    match args.command {
        VolumeCommand::List { pool } => {
            let vs: Vec<Volume> = c.get(&format!("/api/v1/pools/{pool}/volumes"))?;
            if json {
                print_json(&vs)?;
            } else {
                println!(
                    "{:<24} {:<6} {:>8} {:>8}  USED BY",
                    "NAME", "FORMAT", "SIZE", "ON DISK"
                );
                for v in vs {
                    println!(
                        "{:<24} {:<6} {:>8} {:>8}  {}",
                        v.name,
                        v.format,
                        size(v.size),
                        size(v.allocation),
                        v.used_by.join(", ")
                    );
                }
            }
            Ok(0)
        }
        VolumeCommand::Create {
            pool,
            name,
            size,
            format,
            backing,
        } => {
            let req = VolumeCreate {
                name,
                size,
                format: match format {
                    FormatArg::Qcow2 => VolumeFormat::Qcow2,
                    FormatArg::Raw => VolumeFormat::Raw,
                },
                backing,
            };
            let v = c.send_json("POST", &format!("/api/v1/pools/{pool}/volumes"), &req)?;
            show(v, "created")
        }
        VolumeCommand::Info { pool, name } => {
            print_json(&c.get::<Volume>(&at(&pool, &name))?)?;
            Ok(0)
        }
        VolumeCommand::Delete { pool, name } => {
            c.call("DELETE", &at(&pool, &name), None)?;
            if !json {
                println!("volume {pool}/{name}: deleted");
            }
            Ok(0)
        }
        VolumeCommand::Resize {
            pool,
            name,
            size,
            shrink,
        } => {
            let req = VolumeResize { size, shrink };
            let v = c.send_json("PUT", &format!("{}/resize", at(&pool, &name)), &req)?;
            show(v, "resized")
        }
        VolumeCommand::Upload { pool, name, file } => {
            if !file.is_file() {
                return Err(CliError::Usage(format!("{}: not a file", file.display())));
            }
            let v = c.upload(&format!("{}/upload", at(&pool, &name)), &file)?;
            show(v, "uploaded")
        }
    }
}
