//! The host side of a migrated machine: the disk files, network backends (taps, stream
//! sockets), vsock socket and console files each host chooses for itself.
//!
//! The source takes its bindings out of the machine before it crosses ([`strip`]): `Hello`
//! and `State` carry the [`VmSpec`] only. The target binds its own ([`Bound::from_request`]):
//! what `vm.migrate-receive` names, checked against the spec when `Hello` arrives (before any
//! memory is sent), and applied to the machine in `State` ([`Bound::apply`]; taps and the
//! vsock socket go through [`crate::snapshot::VmSnapshot::rebind`], as for a clone). The
//! source's own bindings travel beside the spec (`Hello.source_paths`) and are used only when
//! the request says `same_paths` (two processes on one host); otherwise the target never
//! opens a path that came from the wire (it reads only their kinds: a network device stays on
//! a tap or on a stream socket). A stream socket is never shared: its peer (passt) serves one
//! connection, so the target names its own even with `same_paths`; it never starts passt.

use std::path::PathBuf;

use api::types::MigrateReceiveRequest;

use crate::config::{CacheMode, ConsoleConfig, HostBindings, NetBinding, Nic, VmConfig, VmSpec};
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
    #[error("this receive names both taps and nets: give the network devices' bindings in nets (taps is its older form)")]
    TapsAndNets,
    #[error(
        "network device {0} is on a stream socket at the source, which same_paths cannot share \
         (its peer serves one connection): name this host's socket for it in nets"
    )]
    SharedStream(usize),
    #[error(
        "nets[{0}]: a migration target does not start passt: start one here (passt --socket \
         PATH) and give {{\"socket\": PATH}}"
    )]
    Passt(usize),
    #[error("nets[{0}]: {1}")]
    Net(usize, String),
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
    nets: Vec<NetBinding>,
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
        if !req.taps.is_empty() && !req.nets.is_empty() {
            return Err(BindError::TapsAndNets);
        }
        let given: Vec<NetBinding> = if req.nets.is_empty() {
            req.taps.iter().cloned().map(NetBinding::Tap).collect()
        } else {
            req.nets.clone()
        };
        let nets = if given.is_empty() && same && paths.nets.len() == machine.nets.len() {
            // Taps are shared (both sides attach to a multi-queue tap); streams are not.
            if let Some(i) = paths.nets.iter().position(NetBinding::is_stream) {
                return Err(BindError::SharedStream(i));
            }
            paths.nets.clone()
        } else if given.len() == machine.nets.len() {
            given
        } else {
            return Err(count(
                "network devices",
                "device",
                "nets entry (--net)",
                machine.nets.len(),
                given.len(),
            ));
        };
        for (i, b) in nets.iter().enumerate() {
            match b {
                NetBinding::Passt(_) => return Err(BindError::Passt(i)),
                NetBinding::Socket(p) => {
                    spec::bindings::check_socket_path(p).map_err(|why| BindError::Net(i, why))?
                }
                NetBinding::Tap(t) => {
                    spec::bindings::check_tap(t).map_err(|why| BindError::Net(i, why))?
                }
            }
            // Only the kind of the source's binding is read here, never its path.
            if let Some(was) = paths.nets.get(i) {
                crate::snapshot::check_same_kind(i, was, b)
                    .map_err(|why| BindError::Net(i, why))?;
            }
            if b.is_stream() && machine.nets[i].queues != 1 {
                return Err(BindError::Net(
                    i,
                    format!(
                        "the device has {} queue pairs; a stream socket carries one",
                        machine.nets[i].queues
                    ),
                ));
            }
        }
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
            nets,
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
        if spec.nets.len() != self.nets.len() {
            return Err(changed("network devices", spec.nets.len(), self.nets.len()));
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
            nets: self.nets.clone(),
            virtio_console: self.virtio_console.clone(),
            ..HostBindings::default()
        };
        // New backends and vsock socket as a clone gets them; the guest keeps its MAC and CID.
        let nets: Vec<(Nic, NetBinding)> = spec
            .nets
            .iter()
            .zip(&self.nets)
            .map(|(n, binding)| {
                (
                    Nic {
                        mac: None,
                        ..n.clone()
                    },
                    binding.clone(),
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
        c.bindings.nets.push(tap);
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
            nets: vec![],
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
        assert_eq!(paths.nets, [NetBinding::Tap("vtap0".into())]);
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
        assert_eq!(b.nets, [NetBinding::Tap("vtap7".into())]);
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

    #[test]
    fn a_stream_socket_is_the_targets_own_and_stays_a_stream() {
        use spec::cli;
        let mut c = bare();
        for n in ["tap=vtap0", "socket=/src/p.sock", "passt"] {
            let (nic, b) = cli::net(n).unwrap();
            c.spec.nets.push(nic);
            c.bindings.nets.push(b);
        }
        let paths = strip(&mut c);
        let wire = serde_json::to_string(&c).unwrap();
        assert!(!wire.contains("/src/p.sock"), "{wire}");
        let mut r = request();
        let tap = || NetBinding::Tap("vtap9".into());
        let sock = |p: &str| NetBinding::Socket(p.into());
        r.nets = vec![tap(), sock("/dst/a.sock"), sock("/dst/b.sock")];
        let b = Bound::from_request(&r, &c.spec, &paths).unwrap();
        assert_eq!(b.nets, r.nets);
        // The older field for taps, and not both.
        r.taps = vec!["vtap9".into()];
        assert!(matches!(
            Bound::from_request(&r, &c.spec, &paths),
            Err(BindError::TapsAndNets)
        ));
        r.taps.clear();
        // A device keeps its kind of backend.
        for (i, wrong) in [(0, sock("/dst/a.sock")), (1, tap()), (2, tap())] {
            let mut w = r.clone();
            w.nets[i] = wrong;
            let e = Bound::from_request(&w, &c.spec, &paths).unwrap_err();
            assert!(
                matches!(&e, BindError::Net(n, why) if *n == i && why.contains("offloads")),
                "{i}: {e}"
            );
        }
        // No passt here; sockets are absolute.
        let mut w = r.clone();
        w.nets[2] = NetBinding::Passt(Default::default());
        assert!(matches!(
            Bound::from_request(&w, &c.spec, &paths),
            Err(BindError::Passt(2))
        ));
        w.nets[2] = sock("relative.sock");
        let e = Bound::from_request(&w, &c.spec, &paths).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        // same_paths shares the source's taps, never its streams.
        let mut same = request();
        same.same_paths = true;
        let e = Bound::from_request(&same, &c.spec, &paths).unwrap_err();
        assert!(matches!(e, BindError::SharedStream(1)), "{e}");
        same.nets = r.nets.clone();
        assert!(Bound::from_request(&same, &c.spec, &paths).is_ok());
        // A JSON request names them as the document does.
        let req: MigrateReceiveRequest = serde_json::from_str(
            r#"{"listen": "unix:/m", "nets": [{"tap": "t"}, {"socket": "/s"}, {"socket": "/t"}]}"#,
        )
        .unwrap();
        assert_eq!(req.nets[1], sock("/s"));
    }
}
