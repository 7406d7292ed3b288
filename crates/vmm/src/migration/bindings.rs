//! The host side of a migrated machine: the disk files, taps, vsock socket and console files
//! each host chooses for itself.
//!
//! The source takes its host paths out of the machine description before it crosses
//! ([`strip`]): `Hello` and `State` describe the machine only. The target binds its own
//! ([`HostBindings::from_request`]): what `vm.migrate-receive` names, checked against the
//! machine when `Hello` arrives (before any memory is sent), and applied to the machine in
//! `State` ([`HostBindings::apply`]; taps and the vsock socket go through
//! [`crate::snapshot::VmSnapshot::rebind`], as for a clone). The source's own paths travel
//! beside the description (`Hello.source_paths`) and are used only when the request says
//! `same_paths` (two processes on one host); otherwise the target never opens a path that came
//! from the wire.

use std::path::PathBuf;

use api::types::{DiskCache, MigrateReceiveRequest};
use serde::{Deserialize, Serialize};

use crate::config::{CacheMode, ConsoleConfig, NetConfig, VmConfig, VsockConfig};
use crate::snapshot::VmSnapshot;

/// Errors binding a machine to this host.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "the source has {has} {what}, this receive names {named}: give one {flag} per {one}, \
         in the source's order{same}"
    )]
    Count {
        what: &'static str,
        one: &'static str,
        flag: &'static str,
        has: usize,
        named: usize,
        same: &'static str,
    },
    #[error("the source has a vsock device: give this host's socket (vsock_socket){0}")]
    NoVsock(&'static str),
    #[error("the source has no vsock device, but this receive names a vsock socket")]
    NoVsockDevice,
    #[error("the machine changed during the migration: {0}")]
    Changed(String),
}

const OR_SAME: &str = ", or same_paths for two processes on one host";

/// A machine's host paths, as the source has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePaths {
    pub disks: Vec<PathBuf>,
    pub taps: Vec<String>,
    pub vsock_socket: Option<PathBuf>,
    pub virtio_console: Option<ConsoleConfig>,
}

/// Takes the host paths out of `config` (they become empty), returning them.
pub fn strip(config: &mut VmConfig) -> SourcePaths {
    SourcePaths {
        disks: config
            .disks
            .iter_mut()
            .map(|d| std::mem::take(&mut d.path))
            .collect(),
        taps: config
            .nets
            .iter_mut()
            .map(|n| std::mem::take(&mut n.tap))
            .collect(),
        vsock_socket: config.vsock.as_mut().map(|v| std::mem::take(&mut v.socket)),
        virtio_console: config
            .virtio_console
            .as_mut()
            .map(|c| std::mem::replace(c, ConsoleConfig::Off)),
    }
}

/// This host's paths for a machine, as the receive request gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBindings {
    /// Each disk's file and cache mode (none: the source's).
    disks: Vec<(PathBuf, Option<CacheMode>)>,
    taps: Vec<String>,
    vsock_socket: Option<PathBuf>,
    virtio_console: Option<ConsoleConfig>,
}

impl HostBindings {
    /// The bindings for `machine` (the source's description, stripped) that `req` gives, the
    /// source's `paths` filling in what it leaves out when it says `same_paths`; refused when
    /// they do not fit the machine.
    pub fn from_request(
        req: &MigrateReceiveRequest,
        machine: &VmConfig,
        paths: &SourcePaths,
    ) -> Result<HostBindings, BindError> {
        let same = req.same_paths;
        let or_same = if same { "" } else { OR_SAME };
        let count = |what, one, flag, has: usize, named: usize| BindError::Count {
            what,
            one,
            flag,
            has,
            named,
            same: or_same,
        };
        let disks = if req.disks.is_empty() && same && paths.disks.len() == machine.disks.len() {
            paths.disks.iter().map(|p| (p.clone(), None)).collect()
        } else if req.disks.len() == machine.disks.len() {
            req.disks
                .iter()
                .map(|d| (d.path.clone(), d.cache.map(cache_mode)))
                .collect()
        } else {
            return Err(count(
                "disks",
                "disk",
                "--disk",
                machine.disks.len(),
                req.disks.len(),
            ));
        };
        let taps = if req.taps.is_empty() && same && paths.taps.len() == machine.nets.len() {
            paths.taps.clone()
        } else if req.taps.len() == machine.nets.len() {
            req.taps.clone()
        } else {
            return Err(count(
                "network devices",
                "device",
                "--tap",
                machine.nets.len(),
                req.taps.len(),
            ));
        };
        let vsock_socket = match (&machine.vsock, &req.vsock_socket) {
            (None, None) => None,
            (None, Some(_)) => return Err(BindError::NoVsockDevice),
            (Some(_), Some(p)) => Some(p.clone()),
            (Some(_), None) if same && paths.vsock_socket.is_some() => paths.vsock_socket.clone(),
            (Some(_), None) => return Err(BindError::NoVsock(or_same)),
        };
        // A virtio console writing to a file or socket: the source's only with same_paths,
        // else its output is discarded here.
        let virtio_console =
            machine
                .virtio_console
                .as_ref()
                .map(|_| match (&paths.virtio_console, same) {
                    (Some(c), true) => c.clone(),
                    _ => ConsoleConfig::Off,
                });
        Ok(HostBindings {
            disks,
            taps,
            vsock_socket,
            virtio_console,
        })
    }

    /// Binds the machine in `snap` (the source's state, stripped) to this host.
    pub fn apply(&self, snap: &mut VmSnapshot) -> Result<(), BindError> {
        let changed = |what: &str, has: usize, bound: usize| {
            BindError::Changed(format!(
                "the state has {has} {what}, the greeting announced {bound}"
            ))
        };
        if snap.config.disks.len() != self.disks.len() {
            return Err(changed("disks", snap.config.disks.len(), self.disks.len()));
        }
        if snap.config.nets.len() != self.taps.len() {
            return Err(changed(
                "network devices",
                snap.config.nets.len(),
                self.taps.len(),
            ));
        }
        if snap.config.vsock.is_some() != self.vsock_socket.is_some() {
            return Err(BindError::Changed("the vsock device".to_string()));
        }
        for (d, (path, cache)) in snap.config.disks.iter_mut().zip(&self.disks) {
            d.path = path.clone();
            if let Some(c) = cache {
                d.cache = *c;
            }
        }
        // New taps and vsock socket as a clone gets them; the guest keeps its MAC and CID.
        let nets: Vec<NetConfig> = snap
            .config
            .nets
            .iter()
            .zip(&self.taps)
            .map(|(n, tap)| NetConfig {
                tap: tap.clone(),
                mac: None,
                ..n.clone()
            })
            .collect();
        let vsock = snap
            .config
            .vsock
            .as_ref()
            .zip(self.vsock_socket.as_ref())
            .map(|(v, socket)| VsockConfig {
                cid: v.cid,
                socket: socket.clone(),
            });
        snap.rebind(&nets, vsock.as_ref())
            .map_err(|e| BindError::Changed(e.to_string()))?;
        if let Some(c) = &self.virtio_console {
            snap.config.virtio_console = Some(c.clone());
        }
        Ok(())
    }
}

fn cache_mode(c: DiskCache) -> CacheMode {
    match c {
        DiskCache::Writeback => CacheMode::Writeback,
        DiskCache::None => CacheMode::None,
        DiskCache::Unsafe => CacheMode::Unsafe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::types::MigrateDisk;

    /// A machine without devices.
    fn bare() -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "cpus": 1, "memory": 128 << 20, "disks": [], "rng": false, "nets": [],
            "vsock": null, "virtio_console": null, "balloon": null, "transport": "Mmio",
        }))
        .unwrap()
    }

    fn machine() -> VmConfig {
        use crate::config::{parse_disk, parse_net, parse_vsock};
        let mut c = bare();
        c.disks = vec![
            parse_disk("path=/src/a.raw").unwrap(),
            parse_disk("path=/src/b.raw,cache=none").unwrap(),
        ];
        c.nets = vec![parse_net("tap=vtap0").unwrap()];
        c.vsock = Some(parse_vsock("cid=5,socket=/src/v.sock").unwrap());
        c.virtio_console = Some(ConsoleConfig::File("/src/console.log".into()));
        c
    }

    fn request() -> MigrateReceiveRequest {
        MigrateReceiveRequest {
            listen: "unix:/m".into(),
            token: None,
            disks: vec![],
            taps: vec![],
            vsock_socket: None,
            same_paths: false,
        }
    }

    #[test]
    fn no_host_path_crosses_in_the_description() {
        let mut c = machine();
        let paths = strip(&mut c);
        assert_eq!(
            paths.disks,
            [PathBuf::from("/src/a.raw"), "/src/b.raw".into()]
        );
        assert_eq!(paths.taps, ["vtap0"]);
        assert_eq!(paths.vsock_socket, Some("/src/v.sock".into()));
        let wire = serde_json::to_string(&c).unwrap();
        assert!(!wire.contains("/src/") && !wire.contains("vtap0"), "{wire}");
        // The machine itself is intact.
        assert_eq!((c.disks.len(), c.nets.len()), (2, 1));
        assert_eq!(c.disks[1].cache, CacheMode::None);
        assert_eq!(c.vsock.as_ref().unwrap().cid, 5);
    }

    #[test]
    fn the_request_must_name_every_host_resource_unless_same_paths() {
        let mut c = machine();
        let paths = strip(&mut c);
        // Nothing named: refused, saying what is missing.
        let e = HostBindings::from_request(&request(), &c, &paths).unwrap_err();
        assert!(
            e.to_string().contains("2 disks, this receive names 0"),
            "{e}"
        );
        let mut r = request();
        r.disks = vec![MigrateDisk {
            path: "/dst/a.raw".into(),
            cache: None,
        }];
        let e = HostBindings::from_request(&r, &c, &paths).unwrap_err();
        assert!(e.to_string().contains("names 1"), "{e}");
        r.disks.push(MigrateDisk {
            path: "/dst/b.raw".into(),
            cache: Some(DiskCache::Writeback),
        });
        let e = HostBindings::from_request(&r, &c, &paths).unwrap_err();
        assert!(e.to_string().contains("network devices"), "{e}");
        r.taps = vec!["vtap9".into()];
        let e = HostBindings::from_request(&r, &c, &paths).unwrap_err();
        assert!(e.to_string().contains("vsock"), "{e}");
        r.vsock_socket = Some("/dst/v.sock".into());
        let b = HostBindings::from_request(&r, &c, &paths).unwrap();
        assert_eq!(
            b.disks[1],
            ("/dst/b.raw".into(), Some(CacheMode::Writeback))
        );
        // The source's console file is not opened here.
        assert_eq!(b.virtio_console, Some(ConsoleConfig::Off));

        // same_paths: the source's, for what the request leaves out.
        let mut same = request();
        same.same_paths = true;
        same.taps = vec!["vtap7".into()];
        let b = HostBindings::from_request(&same, &c, &paths).unwrap();
        assert_eq!(b.disks[0], ("/src/a.raw".into(), None));
        assert_eq!(b.taps, ["vtap7"]);
        assert_eq!(b.vsock_socket, Some("/src/v.sock".into()));
        assert_eq!(
            b.virtio_console,
            Some(ConsoleConfig::File("/src/console.log".into()))
        );
        // Still the right count.
        same.disks = vec![MigrateDisk {
            path: "/x".into(),
            cache: None,
        }];
        assert!(HostBindings::from_request(&same, &c, &paths).is_err());
        // A vsock socket for a machine without one.
        let mut bare = bare();
        let none = strip(&mut bare);
        let mut r = request();
        r.vsock_socket = Some("/v".into());
        assert!(matches!(
            HostBindings::from_request(&r, &bare, &none),
            Err(BindError::NoVsockDevice)
        ));
        assert!(HostBindings::from_request(&request(), &bare, &none).is_ok());
    }
}
