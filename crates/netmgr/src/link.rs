//! Bridges, taps and addresses through netlink (rtnetlink), blocking: each call runs on a
//! small runtime of its own connection.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::def::Ipv4Cidr;

/// Errors changing links and addresses.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface {0}")]
    Missing(String),
    #[error("tap {name}: {source}")]
    Tap {
        name: String,
        #[source]
        source: net::TapError,
    },
}

/// The errno of a netlink error answer.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// A link as [`Links::links`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub bridge: bool,
    /// The bridge it is a port of.
    pub controller: Option<u32>,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        bridge: false,
        controller: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Controller(c) => l.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                l.bridge = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
            }
            _ => {}
        }
    }
    l
}

/// The host's links and addresses.
pub struct Links {
    rt: tokio::runtime::Runtime,
}

impl Links {
    pub fn new() -> Result<Links, LinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Links { rt })
    }

    fn run<T>(&self, f: impl AsyncFnOnce(Handle) -> Result<T, LinkError>) -> Result<T, LinkError> {
        self.rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            let task = tokio::spawn(conn);
            let r = f(handle).await;
            task.abort();
            r
        })
    }

    /// Every link.
    pub fn links(&self) -> Result<Vec<Link>, LinkError> {
        self.run(async |h| {
            let mut out = Vec::new();
            let mut s = h.link().get().execute();
            while let Some(m) = s.try_next().await.map_err(nl("list links"))? {
                out.push(link_of(&m));
            }
            Ok(out)
        })
    }

    /// Link `name`, if there is one.
    pub fn get(&self, name: &str) -> Result<Option<Link>, LinkError> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    fn index(&self, name: &str) -> Result<u32, LinkError> {
        self.get(name)?
            .map(|l| l.index)
            .ok_or_else(|| LinkError::Missing(name.to_string()))
    }

    /// Makes bridge `name` with address `mac` unless it exists; whether it made it. A bridge
    /// with an address set keeps it: otherwise it takes its lowest port's, and changes as
    /// VMs come and go (the guests' neighbour entries for their gateway then go stale).
    pub fn ensure_bridge(&self, name: &str, mac: net::MacAddr) -> Result<bool, LinkError> {
        if self.get(name)?.is_some() {
            return Ok(false);
        }
        let name = name.to_string();
        self.run(async |h| {
            h.link()
                .add(LinkBridge::new(&name).address(mac.bytes().to_vec()).build())
                .execute()
                .await
                .map_err(nl(format!("make bridge {name}")))
        })?;
        Ok(true)
    }

    /// Brings `name` up.
    pub fn up(&self, name: &str) -> Result<(), LinkError> {
        let i = self.index(name)?;
        self.run(async |h| {
            h.link()
                .set(LinkUnspec::new_with_index(i).up().build())
                .execute()
                .await
                .map_err(nl(format!("bring {name} up")))
        })
    }

    /// Makes `port` a port of `bridge`.
    pub fn enslave(&self, port: &str, bridge: &str) -> Result<(), LinkError> {
        let (p, b) = (self.index(port)?, self.index(bridge)?);
        self.run(async |h| {
            h.link()
                .set(LinkUnspec::new_with_index(p).controller(b).build())
                .execute()
                .await
                .map_err(nl(format!("add {port} to {bridge}")))
        })
    }

    /// Deletes link `name` (gone already is fine).
    pub fn delete(&self, name: &str) -> Result<(), LinkError> {
        let Some(l) = self.get(name)? else {
            return Ok(());
        };
        self.run(async |h| match h.link().del(l.index).execute().await {
            Err(e) if errno(&e) == Some(libc_enodev()) => Ok(()),
            r => r.map_err(nl(format!("delete {name}"))),
        })
    }

    /// Gives `name` the address `a` (present already is fine).
    pub fn add_address(&self, name: &str, a: Ipv4Cidr) -> Result<(), LinkError> {
        let i = self.index(name)?;
        self.run(async |h| {
            match h
                .address()
                .add(i, IpAddr::V4(a.addr), a.prefix)
                .execute()
                .await
            {
                Err(e) if errno(&e) == Some(libc_eexist()) => Ok(()),
                r => r.map_err(nl(format!("add {a} to {name}"))),
            }
        })
    }

    /// Every IPv4 address of the host, with its link's name.
    pub fn ipv4_addresses(&self) -> Result<Vec<(String, Ipv4Cidr)>, LinkError> {
        let links = self.links()?;
        self.run(async |h| {
            let mut out = Vec::new();
            let mut s = h.address().get().execute();
            while let Some(m) = s.try_next().await.map_err(nl("list addresses"))? {
                let name = links
                    .iter()
                    .find(|l| l.index == m.header.index)
                    .map_or_else(String::new, |l| l.name.clone());
                for a in &m.attributes {
                    if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                        out.push((
                            name.clone(),
                            Ipv4Cidr {
                                addr: *ip,
                                prefix: m.header.prefix_len,
                            },
                        ));
                    }
                }
            }
            Ok(out)
        })
    }

    /// Makes a persistent tap `name` for `uid`:`gid` (unless it exists) with the host-side
    /// address of guest MAC `mac` ([`net::tap::host_mac`]), a port of `bridge`, up.
    pub fn ensure_tap(
        &self,
        name: &str,
        uid: u32,
        gid: u32,
        mac: Option<net::MacAddr>,
        bridge: &str,
    ) -> Result<(), LinkError> {
        let host = mac.map(net::tap::host_mac);
        net::Tap::create_persistent(name, uid, gid, host).map_err(|source| LinkError::Tap {
            name: name.to_string(),
            source,
        })?;
        self.enslave(name, bridge)?;
        self.up(name)
    }

    /// Removes a persistent tap (gone already is fine).
    pub fn remove_tap(&self, name: &str) -> Result<(), LinkError> {
        if self.get(name)?.is_none() {
            return Ok(());
        }
        net::Tap::remove_persistent(name).map_err(|source| LinkError::Tap {
            name: name.to_string(),
            source,
        })
    }
}

fn libc_enodev() -> i32 {
    19
}

fn libc_eexist() -> i32 {
    17
}

/// Whether `a` is in a subnet the host has an address in (other than on `except`).
pub fn overlapping(
    addrs: &[(String, Ipv4Cidr)],
    net: Ipv4Cidr,
    except: &str,
) -> Option<(String, Ipv4Cidr)> {
    addrs
        .iter()
        .filter(|(n, _)| n != except)
        .find(|(_, a)| a.overlaps(net))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_with_the_hosts_subnets() {
        let addrs = vec![
            ("eth0".to_string(), "192.168.1.10/24".parse().unwrap()),
            ("lo".to_string(), "127.0.0.1/8".parse().unwrap()),
            ("vsl-a".to_string(), "10.88.0.1/24".parse().unwrap()),
        ];
        let n = |s: &str| s.parse::<Ipv4Cidr>().unwrap();
        assert_eq!(
            overlapping(&addrs, n("192.168.1.1/24"), "x").unwrap().0,
            "eth0"
        );
        assert!(overlapping(&addrs, n("10.88.0.1/24"), "vsl-a").is_none());
        assert!(overlapping(&addrs, n("10.89.0.1/24"), "x").is_none());
    }
}
