//! The host's managed networks, as libvirt's network driver and Incus's managed bridges do
//! them: a `nat` or `isolated` network is a bridge of Vessel's with the host's address on it,
//! a firewall in nftables tables of its own ([`nft`]) and a dnsmasq for DHCP and DNS
//! ([`dnsmasq`]); a `bridge` network is an existing host bridge the VMs' taps join. The
//! VMs' taps are made persistent for the VM's (jail) user, ports of the bridge, up
//! ([`link`]). Everything a network set up is undone by [`stop`], and by [`sweep`] after a
//! crash: no table, rule, bridge or dnsmasq of Vessel's stays behind.
//!
//! - [`def`]: what a network is ([`NetworkDef`]), checked field by field.
//! - [`link`]: bridges, taps and addresses through netlink.
//! - [`nft`]: the firewall.
//! - [`dnsmasq`]: DHCP and DNS, the VMs' names and their leases.

pub mod def;
pub mod dnsmasq;
pub mod link;
pub mod nft;

use std::path::Path;
use std::process::Child;

pub use def::{name_hash, DefError, Forward, Ipv4Cidr, Mode, NetworkDef, Proto, StaticLease};
pub use dnsmasq::{Host, Lease};
pub use link::Links;

/// Errors of a network's start and stop.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Def(#[from] DefError),
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error(transparent)]
    Dnsmasq(#[from] dnsmasq::DnsmasqError),
    #[error("{0}")]
    Host(String),
}

/// Checks `def` against the host and the other networks (`others`): its subnet overlaps
/// none of theirs nor any address of the host's (its own bridge's aside), its forwarded
/// ports are not theirs, a bridge network's bridge exists and is a bridge, a managed
/// network's bridge is not somebody else's.
pub fn check_on_host(
    def: &NetworkDef,
    others: &[NetworkDef],
    links: &Links,
) -> Result<(), DefError> {
    def.validate()?;
    let err = |field: &str, why: String| DefError {
        field: field.to_string(),
        why,
    };
    let br = def.bridge_name();
    for o in others.iter().filter(|o| o.name != def.name) {
        if o.bridge_name() == br {
            return Err(err("bridge", format!("{br} is network {}'s", o.name)));
        }
        if let (Some(a), Some(b)) = (def.ipv4, o.ipv4) {
            if a.overlaps(b) {
                return Err(err(
                    "ipv4",
                    format!(
                        "{} overlaps network {}'s {}",
                        a.subnet(),
                        o.name,
                        b.subnet()
                    ),
                ));
            }
        }
        for (i, f) in def.forwards.iter().enumerate() {
            if o.forwards
                .iter()
                .any(|g| g.proto == f.proto && g.host_port == f.host_port)
            {
                return Err(err(
                    &format!("forwards[{i}]"),
                    format!(
                        "{}:{} is forwarded by network {} already",
                        f.proto, f.host_port, o.name
                    ),
                ));
            }
        }
    }
    let host = |e: link::LinkError| err("bridge", format!("cannot read the host's links: {e}"));
    match def.mode {
        Mode::Bridge => match links.get(&br).map_err(host)? {
            Some(l) if l.bridge => {}
            Some(_) => return Err(err("bridge", format!("{br} is not a bridge"))),
            None => return Err(err("bridge", format!("the host has no bridge {br}"))),
        },
        Mode::Nat | Mode::Isolated => {
            if let Some(net) = def.ipv4 {
                let addrs = links.ipv4_addresses().map_err(host)?;
                if let Some((ifname, a)) = link::overlapping(&addrs, net, &br) {
                    return Err(err(
                        "ipv4",
                        format!("{} overlaps the host's {a} on {ifname}", net.subnet()),
                    ));
                }
            }
            if let Some(l) = links.get(&br).map_err(host)? {
                if !l.bridge {
                    return Err(err("bridge", format!("{br} exists and is not a bridge")));
                }
            }
        }
    }
    Ok(())
}

/// A started network: its dnsmasq, if it has one.
pub struct Running {
    pub dnsmasq: Option<Child>,
}

/// Sets up a network: its bridge with the host's address, forwarding, its firewall, its
/// dnsmasq (files in `dir`). On failure what was done is undone.
pub fn start(
    def: &NetworkDef,
    dir: &Path,
    hosts: &[Host],
    dnat: &[nft::Dnat],
    links: &Links,
) -> Result<Running, NetError> {
    if !def.managed() {
        return Ok(Running { dnsmasq: None });
    }
    let r = (|| {
        let br = def.bridge_name();
        links.ensure_bridge(&br, def.bridge_mac())?;
        if let Some(a) = def.ipv4 {
            links.add_address(&br, a)?;
        }
        links.up(&br)?;
        if def.mode == Mode::Nat {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|e| NetError::Host(format!("cannot turn on IPv4 forwarding: {e}")))?;
        }
        nft::apply(&nft::ruleset(def, dnat))?;
        nft::open_foreign(def)?;
        let files = dnsmasq::Files {
            dir: dir.to_path_buf(),
        };
        let child = dnsmasq::start(def, &files, hosts)?;
        Ok(Running {
            dnsmasq: Some(child),
        })
    })();
    if r.is_err() {
        let _ = stop(def, None, links);
    }
    r
}

/// Undoes [`start`]: ends its dnsmasq (the child, or the one its pid file names), deletes
/// its table and its rules in other tables, deletes its bridge.
pub fn stop(def: &NetworkDef, dnsmasq: Option<Child>, links: &Links) -> Result<(), NetError> {
    if !def.managed() {
        return Ok(());
    }
    if let Some(mut c) = dnsmasq {
        let _ = c.kill();
        let _ = c.wait();
    }
    nft::close_foreign(&def.name)?;
    nft::remove(&def.name)?;
    links.delete(&def.bridge_name())?;
    Ok(())
}

/// Ends a dnsmasq that a crashed daemon left running for a network (by its pid file, checked
/// against its command line).
pub fn kill_stale_dnsmasq(dir: &Path) {
    let files = dnsmasq::Files {
        dir: dir.to_path_buf(),
    };
    let Some(pid) = std::fs::read_to_string(files.pid())
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let conf = files.conf().display().to_string();
    if String::from_utf8_lossy(&cmdline).contains(&conf) {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
    let _ = std::fs::remove_file(files.pid());
}

/// After a crash: deletes the tables of Vessel's networks not in `active` and their rules
/// in other tables.
pub fn sweep(active: &[String]) -> Result<Vec<String>, NetError> {
    nft::close_foreign_except(active)?;
    let mut swept = Vec::new();
    for t in nft::tables()? {
        if !active
            .iter()
            .any(|a| nft::table(a) == format!("vessel_{t}"))
        {
            nft::remove(&t)?;
            swept.push(t);
        }
    }
    Ok(swept)
}
