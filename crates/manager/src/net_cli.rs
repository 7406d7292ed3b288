//! `vessel net`: the daemon's managed networks.

use clap::{Args, Subcommand};
use netmgr::{Forward, Ipv4Cidr, Mode, NetworkDef, StaticLease};

use crate::cli::{print_json, CliError, ClientArgs};
use crate::networks::{NetworkCreate, NetworkView};

/// `vessel net`.
#[derive(Args, Debug)]
pub struct NetArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: NetCommand,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Nat,
    Isolated,
    Bridge,
}

fn range(s: &str) -> Result<(std::net::Ipv4Addr, std::net::Ipv4Addr), String> {
    let bad = || format!("'{s}' is not FIRST-LAST such as 10.88.0.100-10.88.0.199");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

#[derive(Subcommand, Debug)]
enum NetCommand {
    /// The networks: mode, bridge, subnet, state, VMs.
    List,
    /// Defines a network and (unless --no-autostart) starts it.
    Create {
        name: String,
        /// nat (a bridge of Vessel's, DHCP, DNS, masquerade), isolated (no way out) or
        /// bridge (an existing host bridge).
        #[arg(long, value_enum, default_value = "nat")]
        mode: ModeArg,
        /// The host's address and subnet: 10.88.0.1/24 (nat, isolated).
        #[arg(long)]
        ipv4: Option<Ipv4Cidr>,
        /// The bridge (bridge mode: the host's; else default vsl-NAME).
        #[arg(long)]
        bridge: Option<String>,
        /// DHCP's addresses: FIRST-LAST.
        #[arg(long, value_parser = range)]
        dhcp_range: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
        /// The VMs' DNS domain (default: the network's name).
        #[arg(long)]
        domain: Option<String>,
        /// A port forward PROTO:HOSTPORT:VM:PORT, e.g. tcp:8080:web:80 (repeatable).
        #[arg(long = "forward")]
        forwards: Vec<Forward>,
        /// A fixed address MAC=IP[=NAME] (repeatable).
        #[arg(long = "static-lease")]
        static_leases: Vec<StaticLease>,
        /// Do not start it now nor when the daemon starts.
        #[arg(long)]
        no_autostart: bool,
    },
    /// All about one network, its leases included.
    Info {
        name: String,
    },
    Start {
        name: String,
    },
    /// Takes it down (refused while a running VM is on it).
    Stop {
        name: String,
    },
    /// Deletes a network no VM is on.
    Delete {
        name: String,
    },
}

fn print_networks(ns: &[NetworkView]) {
    println!(
        "{:<16} {:<9} {:<16} {:<18} {:<8} VMS",
        "NAME", "MODE", "BRIDGE", "IPV4", "STATE"
    );
    for n in ns {
        let d = &n.record.def;
        println!(
            "{:<16} {:<9} {:<16} {:<18} {:<8} {}",
            d.name,
            format!("{:?}", d.mode).to_lowercase(),
            n.bridge,
            d.ipv4.map_or("-".into(), |a| a.to_string()),
            if n.running { "active" } else { "inactive" },
            n.vms.join(",")
        );
    }
}

/// `vessel net ...`.
pub fn net(args: NetArgs) -> Result<i32, CliError> {
    let c = args.client.client()?;
    let json = args.client.json;
    let show = |n: NetworkView, what: &str| -> Result<i32, CliError> {
        if json {
            print_json(&n)?;
        } else {
            println!("network {}: {what}", n.record.def.name);
        }
        Ok(0)
    };
    let at = |name: &str, action: &str| format!("/api/v1/networks/{name}/{action}");
    match args.command {
        NetCommand::List => {
            let ns: Vec<NetworkView> = c.get("/api/v1/networks")?;
            if json {
                print_json(&ns)?;
            } else {
                print_networks(&ns);
            }
            Ok(0)
        }
        NetCommand::Create {
            name,
            mode,
            ipv4,
            bridge,
            dhcp_range,
            domain,
            forwards,
            static_leases,
            no_autostart,
        } => {
            let req = NetworkCreate {
                def: NetworkDef {
                    name,
                    mode: match mode {
                        ModeArg::Nat => Mode::Nat,
                        ModeArg::Isolated => Mode::Isolated,
                        ModeArg::Bridge => Mode::Bridge,
                    },
                    bridge,
                    ipv4,
                    dhcp_range,
                    domain,
                    forwards,
                    static_leases,
                    autostart: !no_autostart,
                },
                start: None,
            };
            let n: NetworkView = c.send_json("POST", "/api/v1/networks", &req)?;
            let what = if n.running {
                "created and started"
            } else {
                "created"
            };
            show(n, what)
        }
        NetCommand::Info { name } => {
            print_json(&c.get::<NetworkView>(&format!("/api/v1/networks/{name}"))?)?;
            Ok(0)
        }
        NetCommand::Start { name } => show(
            c.send_json("PUT", &at(&name, "start"), &serde_json::json!({}))?,
            "started",
        ),
        NetCommand::Stop { name } => show(
            c.send_json("PUT", &at(&name, "stop"), &serde_json::json!({}))?,
            "stopped",
        ),
        NetCommand::Delete { name } => {
            c.call("DELETE", &format!("/api/v1/networks/{name}"), None)?;
            if !json {
                println!("network {name}: deleted");
            }
            Ok(0)
        }
    }
}
