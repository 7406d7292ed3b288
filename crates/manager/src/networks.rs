//! The daemon's managed networks (`vessel net`, [`netmgr`]) and the VMs' NICs on them: each
//! NIC of a VM names a network; before its process starts, the daemon makes the NIC's tap
//! (persistent, the VM's jail user's, a port of the network's bridge, up) and removes it
//! when the process has ended. The network's dnsmasq knows every VM's MAC and name; a
//! watcher reads its leases, reports each VM's new address (`vm.address`) and keeps the
//! port forwards pointed at the VMs' addresses.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netmgr::{Lease, Links, NetworkDef};
use serde::{Deserialize, Serialize};

use crate::store::{now_s, NetworkRecord, StoreError, VmRecord};
use crate::vms::{Error, Manager};

/// How often the leases are read.
const LEASE_POLL: Duration = Duration::from_secs(1);

fn failed(e: impl std::fmt::Display) -> Error {
    Error::Failed(e.to_string())
}

/// The networks' live state: each running network's dnsmasq, the addresses last seen.
#[derive(Default)]
pub(crate) struct NetLive {
    dnsmasq: HashMap<String, Child>,
    /// Network -> MAC -> address, as last reported.
    seen: HashMap<String, HashMap<String, Ipv4Addr>>,
    /// Network -> the port forwards last applied.
    dnat: HashMap<String, Vec<netmgr::nft::Dnat>>,
    /// Network -> why its forwards could not be applied, last time (reported once).
    dnat_error: HashMap<String, String>,
}

/// A network as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkView {
    #[serde(flatten)]
    pub record: NetworkRecord,
    /// Whether it is up now.
    pub running: bool,
    pub bridge: String,
    /// The VMs with a NIC on it.
    pub vms: Vec<String>,
    /// Its DHCP leases.
    pub leases: Vec<Lease>,
}

/// A VM's address on one of its networks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NicAddress {
    pub network: String,
    #[schema(value_type = String)]
    pub mac: net::MacAddr,
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
}

/// `POST /api/v1/networks`: a definition, and whether to start it now (default: if it
/// autostarts).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    #[serde(flatten)]
    pub def: NetworkDef,
    #[serde(default)]
    pub start: Option<bool>,
}

/// The tap of NIC `index` of VM `name`: stable (a VM's process finds the same one again),
/// at most 15 characters.
pub fn tap_name(vm: &str, index: usize) -> String {
    let h = netmgr::name_hash(vm);
    format!("vt{:010x}{:x}", h & 0xff_ffff_ffff, index % 16)
}

/// Parses a VM NIC's `NETWORK[,mac=MAC]`.
pub fn parse_nic(s: &str) -> Result<(String, Option<net::MacAddr>), String> {
    let mut parts = s.split(',');
    let name = parts.next().unwrap_or("").trim().to_string();
    if name.is_empty() {
        return Err(format!("'{s}': NETWORK[,mac=MAC]"));
    }
    let mut mac = None;
    for p in parts {
        match p.split_once('=') {
            Some(("mac", m)) => mac = Some(m.parse().map_err(|e| format!("'{s}': {e}"))?),
            _ => return Err(format!("'{s}': unknown option '{p}' (mac=)")),
        }
    }
    Ok((name, mac))
}

impl Manager {
    fn net_live(&self) -> std::sync::MutexGuard<'_, NetLive> {
        self.nets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the network is up: its dnsmasq runs (a `bridge` network has none: it is up
    /// once started).
    fn is_up(&self, rec: &NetworkRecord) -> bool {
        self.net_live().dnsmasq.contains_key(&rec.def.name) || (!rec.def.managed() && rec.active)
    }

    fn net_dir(&self, name: &str) -> PathBuf {
        self.layout().state.join("networks").join(name)
    }

    fn links() -> Result<Links, Error> {
        Links::new().map_err(failed)
    }

    /// The NICs on network `name`: (MAC, VM name) of every VM's.
    fn hosts_on(&self, name: &str) -> Result<Vec<netmgr::Host>, Error> {
        Ok(self
            .store()
            .vms()?
            .iter()
            .flat_map(|v| {
                v.networks
                    .iter()
                    .zip(&v.spec.nets)
                    .filter(|(n, _)| *n == name)
                    .filter_map(|(_, nic)| {
                        Some(netmgr::Host {
                            mac: nic.mac?,
                            name: v.name.clone(),
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    /// The forwards of `def` whose VM has an address (from `leases`).
    fn dnat_of(&self, def: &NetworkDef, leases: &[Lease]) -> Result<Vec<netmgr::nft::Dnat>, Error> {
        let hosts = self.hosts_on(&def.name)?;
        Ok(def
            .forwards
            .iter()
            .filter_map(|f| {
                let mac = hosts.iter().find(|h| h.name == f.vm)?.mac;
                let ip = leases.iter().find(|l| l.mac == mac)?.ip;
                Some(netmgr::nft::Dnat {
                    proto: f.proto,
                    host_port: f.host_port,
                    to: ip,
                    port: f.vm_port,
                })
            })
            .collect())
    }

    fn leases_of(&self, name: &str) -> Vec<Lease> {
        netmgr::dnsmasq::read_leases(&netmgr::dnsmasq::Files {
            dir: self.net_dir(name),
        })
    }

    /// Defines a network (and starts it if asked, or if it autostarts).
    pub fn create_network(&self, req: NetworkCreate) -> Result<NetworkView, Error> {
        let def = req.def;
        {
            let _op = self.ops();
            let others: Vec<NetworkDef> = self
                .store()
                .networks()?
                .into_iter()
                .map(|n| n.def)
                .collect();
            if others.iter().any(|o| o.name == def.name) {
                return Err(StoreError::Exists {
                    what: "network",
                    name: def.name,
                }
                .into());
            }
            netmgr::check_on_host(&def, &others, &Self::links()?)
                .map_err(|e| Error::BadRequest(e.to_string()))?;
            self.store().add_network(&NetworkRecord {
                def: def.clone(),
                active: false,
                created: now_s(),
            })?;
            self.event(
                &def.name,
                "net.created",
                format!("{:?}", def.mode).to_lowercase(),
            );
        }
        if req.start.unwrap_or(def.autostart) {
            self.start_network(&def.name)?;
        }
        self.network_view(&def.name)
    }

    /// Brings a network up.
    pub fn start_network(&self, name: &str) -> Result<NetworkView, Error> {
        {
            let _op = self.ops();
            let mut rec = self.store().network(name)?;
            if self.net_live().dnsmasq.contains_key(name) {
                return Err(Error::Conflict(format!("network {name} is running")));
            }
            self.bring_up(&rec.def)?;
            rec.active = true;
            self.store().put_network(&rec)?;
            self.event(name, "net.started", rec.def.bridge_name());
        }
        self.network_view(name)
    }

    fn bring_up(&self, def: &NetworkDef) -> Result<(), Error> {
        let dir = self.net_dir(&def.name);
        std::fs::create_dir_all(&dir).map_err(failed)?;
        // dnsmasq reads its hosts file again as `nobody` (SIGHUP).
        crate::layout::readable_dir(&dir).map_err(failed)?;
        let leases = self.leases_of(&def.name);
        let dnat = self.dnat_of(def, &leases)?;
        let hosts = self.hosts_on(&def.name)?;
        let running = netmgr::start(def, &dir, &hosts, &dnat, &Self::links()?)
            .map_err(|e| Error::Failed(format!("network {}: {e}", def.name)))?;
        let mut live = self.net_live();
        if let Some(c) = running.dnsmasq {
            live.dnsmasq.insert(def.name.clone(), c);
        }
        live.dnat.insert(def.name.clone(), dnat);
        Ok(())
    }

    /// Takes a network down; refused while a running VM is on it.
    pub fn stop_network(&self, name: &str) -> Result<NetworkView, Error> {
        {
            let _op = self.ops();
            let mut rec = self.store().network(name)?;
            let users: Vec<String> = self
                .store()
                .vms()?
                .into_iter()
                .filter(|v| v.networks.iter().any(|n| n == name) && self.is_running(&v.name))
                .map(|v| v.name)
                .collect();
            if !users.is_empty() {
                return Err(Error::Conflict(format!(
                    "network {name} has running VMs: {}",
                    users.join(", ")
                )));
            }
            let child = {
                let mut live = self.net_live();
                live.seen.remove(name);
                live.dnat.remove(name);
                live.dnsmasq.remove(name)
            };
            netmgr::stop(&rec.def, child, &Self::links()?).map_err(failed)?;
            rec.active = false;
            self.store().put_network(&rec)?;
            self.event(name, "net.stopped", "");
        }
        self.network_view(name)
    }

    /// Deletes a network no VM is on (stopping it first).
    pub fn delete_network(&self, name: &str) -> Result<(), Error> {
        let users: Vec<String> = self
            .store()
            .vms()?
            .into_iter()
            .filter(|v| v.networks.iter().any(|n| n == name))
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "network {name} is used by {}",
                users.join(", ")
            )));
        }
        if self.store().network(name)?.active {
            self.stop_network(name)?;
        }
        let _op = self.ops();
        self.store().delete_network(name)?;
        let _ = std::fs::remove_dir_all(self.net_dir(name));
        self.event(name, "net.deleted", "");
        Ok(())
    }

    pub fn network_view(&self, name: &str) -> Result<NetworkView, Error> {
        let rec = self.store().network(name)?;
        self.view_network(rec)
    }

    fn view_network(&self, record: NetworkRecord) -> Result<NetworkView, Error> {
        let name = record.def.name.clone();
        let mut vms: Vec<String> = self.hosts_on(&name)?.into_iter().map(|h| h.name).collect();
        vms.dedup();
        Ok(NetworkView {
            running: self.is_up(&record),
            bridge: record.def.bridge_name(),
            leases: self.leases_of(&name),
            vms,
            record,
        })
    }

    pub fn networks(&self) -> Result<Vec<NetworkView>, Error> {
        self.store()
            .networks()?
            .into_iter()
            .map(|r| self.view_network(r))
            .collect()
    }

    /// Tells a running network's dnsmasq the VMs' names again (after a VM came or went).
    pub(crate) fn sync_hosts(&self, networks: &[String]) {
        for n in networks {
            let Ok(hosts) = self.hosts_on(n) else {
                continue;
            };
            let pid = {
                let mut live = self.net_live();
                live.dnat.remove(n);
                live.dnsmasq.get(n).map(Child::id)
            };
            let files = netmgr::dnsmasq::Files {
                dir: self.net_dir(n),
            };
            if pid.is_some() {
                if let Err(e) = netmgr::dnsmasq::update_hosts(&files, &hosts, pid) {
                    tracing::warn!("network {n}: {e}");
                }
            }
        }
    }

    /// The VM's NICs: (network, MAC) from its spec and record, checked: every network
    /// exists; returns the NICs' specs with a MAC each (new random ones where absent).
    pub(crate) fn nics_for(
        &self,
        template_nets: &[spec::vm::Nic],
        wanted: &[String],
    ) -> Result<(Vec<spec::vm::Nic>, Vec<String>), Error> {
        if wanted.is_empty() && !template_nets.is_empty() {
            return Err(Error::BadRequest(format!(
                "nets: the template has {} NIC(s): name a network for each",
                template_nets.len()
            )));
        }
        let mut nics = Vec::new();
        let mut names = Vec::new();
        for (i, w) in wanted.iter().enumerate() {
            let (name, mac) =
                parse_nic(w).map_err(|e| Error::BadRequest(format!("nets[{i}]: {e}")))?;
            self.store()
                .network(&name)
                .map_err(|e| Error::BadRequest(format!("nets[{i}]: {e}")))?;
            let mut nic = template_nets.get(i).cloned().unwrap_or_default();
            nic.mac = Some(match mac {
                Some(m) => m,
                None => net::random_local().map_err(failed)?,
            });
            nics.push(nic);
            names.push(name);
        }
        Ok((nics, names))
    }

    /// Makes the VM's taps on its networks' bridges, for its jail user; their names.
    pub(crate) fn plug(&self, vm: &VmRecord, owner: (u32, u32)) -> Result<Vec<String>, Error> {
        if vm.networks.is_empty() {
            return Ok(Vec::new());
        }
        let links = Self::links()?;
        let mut taps = Vec::new();
        for (i, n) in vm.networks.iter().enumerate() {
            let rec = self.store().network(n)?;
            if !self.is_up(&rec) {
                return Err(Error::Conflict(format!(
                    "{}: network {n} is not running (vessel net start {n})",
                    vm.name
                )));
            }
            let tap = tap_name(&vm.name, i);
            let mac = vm.spec.nets.get(i).and_then(|n| n.mac);
            links
                .ensure_tap(&tap, owner.0, owner.1, mac, &rec.def.bridge_name())
                .map_err(|e| Error::Failed(format!("{}: NIC {i} on {n}: {e}", vm.name)))?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Removes the VM's taps (its process has ended).
    pub(crate) fn unplug(&self, vm: &VmRecord) {
        if vm.networks.is_empty() {
            return;
        }
        let Ok(links) = Self::links() else { return };
        for i in 0..vm.networks.len() {
            if let Err(e) = links.remove_tap(&tap_name(&vm.name, i)) {
                tracing::warn!("{}: {e}", vm.name);
            }
        }
    }

    /// The VM's addresses, from its networks' leases.
    pub fn addresses(&self, vm: &VmRecord) -> Vec<NicAddress> {
        vm.networks
            .iter()
            .zip(&vm.spec.nets)
            .filter_map(|(n, nic)| {
                let mac = nic.mac?;
                let ip = self.leases_of(n).into_iter().find(|l| l.mac == mac)?.ip;
                Some(NicAddress {
                    network: n.clone(),
                    mac,
                    ip,
                })
            })
            .collect()
    }

    /// At the daemon's start: removes what a crashed daemon left (tables and rules of
    /// networks that should be down, stale dnsmasqs), brings up the networks that should be
    /// up, and starts the lease watcher.
    pub fn recover_networks(self: &Arc<Self>) -> Result<(), Error> {
        // The lease watcher runs whether or not there are networks yet.
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("leases".into())
            .spawn(move || loop {
                std::thread::sleep(LEASE_POLL);
                match me.upgrade() {
                    Some(m) => m.watch_leases(),
                    None => return,
                }
            });
        let recs = self.store().networks()?;
        if recs.is_empty() {
            return Ok(());
        }
        for r in &recs {
            netmgr::kill_stale_dnsmasq(&self.net_dir(&r.def.name));
        }
        let up: Vec<&NetworkRecord> = recs
            .iter()
            .filter(|r| r.active || r.def.autostart)
            .collect();
        let names: Vec<String> = up.iter().map(|r| r.def.name.clone()).collect();
        if let Err(e) = netmgr::sweep(&names) {
            tracing::warn!("sweeping the networks' leftovers: {e}");
        }
        for r in up {
            let _op = self.ops();
            let mut rec = r.clone();
            match self.bring_up(&rec.def) {
                Ok(()) => {
                    rec.active = true;
                    let _ = self.store().put_network(&rec);
                    self.event(&rec.def.name, "net.started", "at daemon start");
                }
                Err(e) => self.event(&rec.def.name, "net.start-failed", e.to_string()),
            }
        }
        Ok(())
    }

    /// One look at the running networks' leases: new addresses reported, forwards updated.
    fn watch_leases(&self) {
        let running: Vec<String> = self.net_live().dnsmasq.keys().cloned().collect();
        for n in running {
            let leases = self.leases_of(&n);
            let now: HashMap<String, Ipv4Addr> =
                leases.iter().map(|l| (l.mac.to_string(), l.ip)).collect();
            let before = self.net_live().seen.get(&n).cloned().unwrap_or_default();
            if now != before {
                let hosts = self.hosts_on(&n).unwrap_or_default();
                for (mac, ip) in &now {
                    if before.get(mac) != Some(ip) {
                        if let Some(h) = hosts.iter().find(|h| h.mac.to_string() == *mac) {
                            self.event(&h.name, "vm.address", format!("{ip} on {n}"));
                        }
                    }
                }
            }
            // The forwards follow the leases and the VMs on the network (`sync_hosts` drops
            // them to have them made again), and are tried again while they fail.
            let stale = now != before || !self.net_live().dnat.contains_key(&n);
            if now != before {
                self.net_live().seen.insert(n.clone(), now);
            }
            if !stale {
                continue;
            }
            let Ok(rec) = self.store().network(&n) else {
                continue;
            };
            let Ok(dnat) = self.dnat_of(&rec.def, &leases) else {
                continue;
            };
            if self.net_live().dnat.get(&n) != Some(&dnat) {
                match netmgr::nft::apply(&netmgr::nft::ruleset(&rec.def, &dnat)) {
                    Ok(()) => {
                        let mut live = self.net_live();
                        live.dnat.insert(n.clone(), dnat);
                        live.dnat_error.remove(&n);
                    }
                    Err(e) => {
                        let e = e.to_string();
                        let new = self.net_live().dnat_error.insert(n.clone(), e.clone())
                            != Some(e.clone());
                        if new {
                            self.event(&n, "net.forward-failed", e);
                        }
                    }
                }
            }
        }
    }
}

/// The networks' live state, for [`Manager::new`].
pub(crate) fn new_live() -> Mutex<NetLive> {
    Mutex::new(NetLive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_stable_short_and_distinct() {
        let a = tap_name("web", 0);
        assert_eq!(a, tap_name("web", 0));
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, tap_name("web", 1));
        assert_ne!(a, tap_name("db", 0));
        assert!(net::tap::check_name(&a).is_ok());
    }

    #[test]
    fn nic_options() {
        assert_eq!(parse_nic("default").unwrap(), ("default".into(), None));
        let (n, m) = parse_nic("lab,mac=52:54:00:00:00:07").unwrap();
        assert_eq!(
            (n.as_str(), m.unwrap().to_string().as_str()),
            ("lab", "52:54:00:00:00:07")
        );
        assert!(parse_nic("").is_err() && parse_nic("lab,speed=1").is_err());
    }
}
