//! The host side of a migrated machine: the disk files, taps, vsock socket and console files
//! each host chooses for itself.
//!
//! The source takes its bindings out of the machine before it crosses ([`strip`]): `Hello`
//! and `State` carry the [`VmSpec`] only. The target binds its own ([`Bound::from_request`]):
//! what `vm.migrate-receive` names, checked against the spec when `Hello` arrives (before any
//! memory is sent), and applied to the machine in `State` ([`Bound::apply`]; taps and the
//! vsock socket go through [`crate::snapshot::VmSnapshot::rebind`], as for a clone). The
//! source's own bindings travel beside the spec (`Hello.source_paths`) and are used only when
//! the request says `same_paths` (two processes on one host); otherwise the target never
//! opens a path that came from the wire.

use std::path::PathBuf;

use api::types::MigrateReceiveRequest;

use crate::config::{CacheMode, ConsoleConfig, HostBindings, Nic, VmConfig, VmSpec};
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

/// Takes this host's bindings out of `config` (left with none), returning them without the
/// console and API socket, which are the process's own.
pub fn strip(config: &mut VmConfig) -> HostBindings {
    let mut b = std::mem::take(&mut config.bindings);
    b.console = None;
    b.api_socket = None;
    b
}

/// This host's bindings for a machine, as the receive request gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// Each disk's file and cache mode (none: the source's).
    disks: Vec<(PathBuf, Option<CacheMode>)>,
    taps: Vec<String>,
    vsock_socket: Option<PathBuf>,
    virtio_console: Option<ConsoleConfig>,
}

impl Bound {
    /// The bindings for `machine` that `req` gives, the source's `paths` filling in what it
    /// leaves out when it says `same_paths`; refused when they do not fit the machine.
    pub fn from_request(
        req: &MigrateReceiveRequest,
        machine: &VmSpec,
        paths: &HostBindings,
    ) -> Result<Bound, BindError> {
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
                .map(|d| (d.path.clone(), d.cache))
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
        let virtio_console = machine
            .virtio_console
            .then(|| match (&paths.virtio_console, same) {
                (Some(c), true) => c.clone(),
                _ => ConsoleConfig::Off,
            });
        Ok(Bound {
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
        let spec = &mut snap.config.spec;
        if spec.disks.len() != self.disks.len() {
            return Err(changed("disks", spec.disks.len(), self.disks.len()));
        }
        if spec.nets.len() != self.taps.len() {
            return Err(changed("network devices", spec.nets.len(), self.taps.len()));
        }
        if spec.vsock.is_some() != self.vsock_socket.is_some() {
            return Err(BindError::Changed("the vsock device".to_string()));
        }
        for (d, (_, cache)) in spec.disks.iter_mut().zip(&self.disks) {
            if let Some(c) = cache {
                d.cache = *c;
            }
        }
        snap.config.bindings = HostBindings {
            disks: self.disks.iter().map(|(p, _)| p.clone()).collect(),
            taps: self.taps.clone(),
            virtio_console: self.virtio_console.clone(),
            ..HostBindings::default()
        };
        // New taps and vsock socket as a clone gets them; the guest keeps its MAC and CID.
        let nets: Vec<(Nic, String)> = spec
            .nets
            .iter()
            .zip(&self.taps)
            .map(|(n, tap)| {
                (
                    Nic {
                        mac: None,
                        ..n.clone()
                    },
                    tap.clone(),
                )
            })
            .collect();
        let vsock = spec.vsock.zip(self.vsock_socket.clone());
        snap.rebind(&nets, vsock.as_ref())
            .map_err(|e| BindError::Changed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::types::MigrateDisk;

    /// A machine without devices.
    fn bare() -> VmConfig {
        VmConfig::new(VmSpec::default(), HostBindings::default())
    }

    fn machine() -> VmConfig {
        use spec::cli;
        let mut c = bare();
        for d in ["path=/src/a.raw", "path=/src/b.raw,cache=none"] {
            let (d, path) = cli::disk(d).unwrap();
            c.spec.disks.push(d);
            c.bindings.disks.push(path);
        }
        let (nic, tap) = cli::net("tap=vtap0").unwrap();
        c.spec.nets.push(nic);
        c.bindings.taps.push(tap);
        let (v, socket) = cli::vsock("cid=5,socket=/src/v.sock").unwrap();
        c.spec.vsock = Some(v);
        c.bindings.vsock_socket = Some(socket);
        c.spec.virtio_console = true;
        c.bindings.virtio_console = Some(ConsoleConfig::File("/src/console.log".into()));
        c.bindings.api_socket = Some("/src/api.sock".into());
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
        assert_eq!(paths.api_socket, None, "the process's own");
        let wire = serde_json::to_string(&c).unwrap();
        assert!(!wire.contains("/src/") && !wire.contains("vtap0"), "{wire}");
        // The machine itself is intact.
        assert_eq!((c.spec.disks.len(), c.spec.nets.len()), (2, 1));
        assert_eq!(c.spec.disks[1].cache, CacheMode::None);
        assert_eq!(c.spec.vsock.as_ref().unwrap().cid, 5);
    }

    #[test]
    fn the_request_must_name_every_host_resource_unless_same_paths() {
        let mut c = machine();
        let paths = strip(&mut c);
        // Nothing named: refused, saying what is missing.
        let e = Bound::from_request(&request(), &c.spec, &paths).unwrap_err();
        assert!(
            e.to_string().contains("2 disks, this receive names 0"),
            "{e}"
        );
        let mut r = request();
        r.disks = vec![MigrateDisk {
            path: "/dst/a.raw".into(),
            cache: None,
        }];
        let e = Bound::from_request(&r, &c.spec, &paths).unwrap_err();
        assert!(e.to_string().contains("names 1"), "{e}");
        r.disks.push(MigrateDisk {
            path: "/dst/b.raw".into(),
            cache: Some(CacheMode::Writeback),
        });
        let e = Bound::from_request(&r, &c.spec, &paths).unwrap_err();
        assert!(e.to_string().contains("network devices"), "{e}");
        r.taps = vec!["vtap9".into()];
        let e = Bound::from_request(&r, &c.spec, &paths).unwrap_err();
        assert!(e.to_string().contains("vsock"), "{e}");
        r.vsock_socket = Some("/dst/v.sock".into());
        let b = Bound::from_request(&r, &c.spec, &paths).unwrap();
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
        let b = Bound::from_request(&same, &c.spec, &paths).unwrap();
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
        assert!(Bound::from_request(&same, &c.spec, &paths).is_err());
        // A vsock socket for a machine without one.
        let mut bare = bare();
        let none = strip(&mut bare);
        let mut r = request();
        r.vsock_socket = Some("/v".into());
        assert!(matches!(
            Bound::from_request(&r, &bare.spec, &none),
            Err(BindError::NoVsockDevice)
        ));
        assert!(Bound::from_request(&request(), &bare.spec, &none).is_ok());
    }
}
