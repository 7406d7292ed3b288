//! [`HostBindings`]: where a VM runs on this host: its disk files, network backends (taps,
//! stream sockets, passt), sockets and consoles. A [`crate::vm::VmSpec`] says what the VM is;
//! its bindings are this host's and are never taken from a snapshot's or a migration peer's
//! word without the host's say.
//!
//! Devices and their bindings pair up in order: `disks[i]` is the file of the spec's
//! `disks[i]`, `nets[i]` ([`NetBinding`]) the backend of the spec's `nets[i]`.
//!
//! JSON: `"nets": [{"tap": "vtap0"}, {"socket": "/run/p.sock"}, {"passt": {}}]`. Documents
//! from before stream sockets bind taps only, as `"taps": ["vtap0", ...]`: still read (the
//! same as `nets` of taps; a document may not have both), and still written when every
//! binding is a tap, so an older Vessel reads what this one writes for such a VM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vm::{SpecError, VmSpec};

pub use crate::netbinding::{
    check_socket_path, NetBinding, Passt, PortForward, Protocol, MAX_SOCKET_PATH,
};

/// Where a console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Console {
    /// The terminal: raw mode when stdin is a TTY, Ctrl-A x quits.
    Stdio,
    /// Output appended to a file; no input.
    #[schema(value_type = String)]
    File(PathBuf),
    /// A Unix socket Vessel listens on; one client at a time reads and types.
    #[schema(value_type = String)]
    Socket(PathBuf),
    /// Discarded.
    #[default]
    Off,
}

impl std::str::FromStr for Console {
    type Err = String;
    /// `stdio`, `off`, `file:PATH` or `socket:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Console::Stdio),
            "off" | "none" => Ok(Console::Off),
            _ => match s.split_once(':') {
                Some(("file", p)) if !p.is_empty() => Ok(Console::File(p.into())),
                Some(("socket", p)) if !p.is_empty() => Ok(Console::Socket(p.into())),
                _ => Err(format!(
                    "'{s}' is not a console: expected stdio, off, file:PATH or socket:PATH"
                )),
            },
        }
    }
}

/// This host's side of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "BindingsDoc", into = "BindingsDoc")]
pub struct HostBindings {
    /// One image file per disk.
    pub disks: Vec<PathBuf>,
    /// One backend per network device: a tap, a stream socket or passt.
    pub nets: Vec<NetBinding>,
    /// The vsock device's Unix socket: host clients connect to it; guest connections to port
    /// N go to `<socket>_N`.
    pub vsock_socket: Option<PathBuf>,
    /// The serial console; none: the process's own (`vessel run`: the terminal; `vessel
    /// serve`: its `--console`).
    pub console: Option<Console>,
    /// The virtio console, when the spec has one.
    pub virtio_console: Option<Console>,
    /// Where the control API listens.
    pub api_socket: Option<PathBuf>,
}

/// [`HostBindings`] as JSON: `nets`, or `taps` as documents wrote it before stream sockets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HostBindings)]
struct BindingsDoc {
    /// One image file per disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    disks: Vec<PathBuf>,
    /// One backend per network device, in order: `{"tap": NAME}` (created if it does not
    /// exist), `{"socket": PATH}` (a listening Unix stream socket speaking QEMU's stream
    /// protocol, such as passt's) or `{"passt": {"forwards": [...]}}` (passt started by Vessel).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    nets: Vec<NetBinding>,
    /// One tap interface per network device: the older form of `nets` when every device is on
    /// a tap (either field, not both).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    taps: Vec<String>,
    /// The vsock device's Unix socket: host clients connect to it; guest connections to port
    /// N go to `<socket>_N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    vsock_socket: Option<PathBuf>,
    /// The serial console; none: the process's own (`vessel run`: the terminal; `vessel
    /// serve`: its `--console`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    console: Option<Console>,
    /// The virtio console, when the spec has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    virtio_console: Option<Console>,
    /// Where the control API listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    api_socket: Option<PathBuf>,
}

impl TryFrom<BindingsDoc> for HostBindings {
    type Error = String;
    fn try_from(d: BindingsDoc) -> Result<Self, String> {
        let nets = match (d.nets.is_empty(), d.taps.is_empty()) {
            (_, true) => d.nets,
            (true, false) => d.taps.into_iter().map(NetBinding::Tap).collect(),
            (false, false) => {
                return Err("bindings: give nets or taps (its older form), not both".to_string())
            }
        };
        Ok(HostBindings {
            disks: d.disks,
            nets,
            vsock_socket: d.vsock_socket,
            console: d.console,
            virtio_console: d.virtio_console,
            api_socket: d.api_socket,
        })
    }
}

impl From<HostBindings> for BindingsDoc {
    fn from(b: HostBindings) -> Self {
        // Taps only: the older form, which every Vessel reads.
        let taps: Option<Vec<String>> = b.nets.iter().map(|n| n.tap().map(String::from)).collect();
        let (nets, taps) = match taps {
            Some(taps) => (Vec::new(), taps),
            None => (b.nets, Vec::new()),
        };
        BindingsDoc {
            disks: b.disks,
            nets,
            taps,
            vsock_socket: b.vsock_socket,
            console: b.console,
            virtio_console: b.virtio_console,
            api_socket: b.api_socket,
        }
    }
}

impl utoipa::PartialSchema for HostBindings {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <BindingsDoc as utoipa::PartialSchema>::schema()
    }
}

impl utoipa::ToSchema for HostBindings {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("HostBindings")
    }
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        <BindingsDoc as utoipa::ToSchema>::schemas(schemas)
    }
}

/// Checks a tap interface name (what the kernel takes, and no path or alias characters).
pub fn check_tap(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '%' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(
            "tap takes an interface name of 1 to 15 characters without '/', ':', '%' or spaces"
                .into(),
        )
    }
}

impl HostBindings {
    /// Checks that these bindings fit `spec`: one file per disk, one backend per network
    /// device (distinct taps, absolute distinct sockets, one queue pair on a stream), a socket
    /// for the vsock device, at most one console on the terminal.
    pub fn check(&self, spec: &VmSpec) -> Result<(), SpecError> {
        let count = |field: &str, has: usize, want: usize, what: &str| {
            if has == want {
                Ok(())
            } else {
                Err(SpecError::new(
                    format!("bindings.{field}"),
                    format!("{has} given for {want} {what}"),
                ))
            }
        };
        count("disks", self.disks.len(), spec.disks.len(), "disks")?;
        for (i, d) in self.disks.iter().enumerate() {
            if d.as_os_str().is_empty() {
                return Err(SpecError::new(format!("bindings.disks[{i}]"), "empty path"));
            }
        }
        crate::netbinding::check(&self.nets, &spec.nets)?;
        match (&spec.vsock, &self.vsock_socket) {
            (Some(_), None) => {
                return Err(SpecError::new(
                    "bindings.vsock_socket",
                    "the vsock device needs one",
                ))
            }
            (None, Some(_)) => {
                return Err(SpecError::new(
                    "bindings.vsock_socket",
                    "the spec has no vsock device",
                ))
            }
            _ => {}
        }
        if self.virtio_console.is_some() && !spec.virtio_console {
            return Err(SpecError::new(
                "bindings.virtio_console",
                "the spec has no virtio console",
            ));
        }
        if self.virtio_console == Some(Console::Stdio) && self.console == Some(Console::Stdio) {
            return Err(SpecError::new(
                "bindings.virtio_console",
                "stdio needs the serial console off the terminal (console off, file:PATH or socket:PATH)",
            ));
        }
        Ok(())
    }
}

/// A VM to run: what it is and where (`vessel run --config FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDocument {
    pub spec: VmSpec,
    #[serde(default)]
    pub bindings: HostBindings,
}

impl VmDocument {
    /// Checks the spec, then the bindings against it.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.spec.validate()?;
        self.bindings.check(&self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{Disk, Nic, Vsock};

    #[test]
    fn consoles_parse() {
        assert_eq!("stdio".parse(), Ok(Console::Stdio));
        assert_eq!("none".parse(), Ok(Console::Off));
        assert_eq!("file:/a".parse(), Ok(Console::File("/a".into())));
        assert_eq!("socket:/s".parse(), Ok(Console::Socket("/s".into())));
        for bad in ["file:", "tcp:1", ""] {
            assert!(bad.parse::<Console>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bindings_must_fit_the_spec() {
        let spec = VmSpec {
            disks: vec![Disk::default()],
            nets: vec![Nic::default(), Nic::default()],
            vsock: Some(Vsock { cid: 3 }),
            ..VmSpec::default()
        };
        let mut b = HostBindings {
            disks: vec!["/d".into()],
            nets: vec![NetBinding::Tap("t0".into()), NetBinding::Tap("t1".into())],
            vsock_socket: Some("/v".into()),
            ..HostBindings::default()
        };
        b.check(&spec).unwrap();
        let field = |b: &HostBindings| b.check(&spec).unwrap_err().field;
        let mut c = b.clone();
        c.disks.clear();
        assert_eq!(field(&c), "bindings.disks");
        c = b.clone();
        c.nets[1] = NetBinding::Tap("t0".into());
        assert_eq!(field(&c), "bindings.nets[1].tap");
        c = b.clone();
        c.nets[0] = NetBinding::Tap("a/b".into());
        assert_eq!(field(&c), "bindings.nets[0].tap");
        c = b.clone();
        c.nets.pop();
        assert_eq!(field(&c), "bindings.nets");
        c = b.clone();
        c.nets[1] = NetBinding::Socket("relative.sock".into());
        assert_eq!(field(&c), "bindings.nets[1].socket");
        c.nets[1] = NetBinding::Socket("/run/p.sock".into());
        c.check(&spec).unwrap();
        c = b.clone();
        c.vsock_socket = None;
        assert_eq!(field(&c), "bindings.vsock_socket");
        c = b.clone();
        c.virtio_console = Some(Console::Off);
        assert_eq!(field(&c), "bindings.virtio_console");
        b.console = Some(Console::Stdio);
        b.check(&spec).unwrap();
    }

    #[test]
    fn a_document_reads_as_json() {
        let d: VmDocument = serde_json::from_str(
            r#"{"spec":{"cpus":2,"disks":[{}]},
                "bindings":{"disks":["/img.qcow2"],"console":{"file":"/log"}}}"#,
        )
        .unwrap();
        d.validate().unwrap();
        assert_eq!(d.bindings.console, Some(Console::File("/log".into())));
        let e = serde_json::from_str::<VmDocument>(r#"{"spec":{},"bindngs":{}}"#).unwrap_err();
        assert!(e.to_string().contains("bindngs"), "{e}");
        let e = serde_json::from_str::<HostBindings>(r#"{"tapz":[]}"#).unwrap_err();
        assert!(e.to_string().contains("tapz"), "{e}");
    }

    #[test]
    fn older_documents_bind_taps_as_taps() {
        let old = r#"{"disks":["/d"],"taps":["vtap0","vtap1"],"vsock_socket":"/v"}"#;
        let b: HostBindings = serde_json::from_str(old).unwrap();
        assert_eq!(
            b.nets,
            [
                NetBinding::Tap("vtap0".into()),
                NetBinding::Tap("vtap1".into())
            ]
        );
        // Written as it was read: taps only take the older form.
        assert_eq!(serde_json::to_string(&b).unwrap(), old);
        let new = r#"{"nets":[{"tap":"vtap0"},{"socket":"/run/p.sock"},{"passt":{}}]}"#;
        let b: HostBindings = serde_json::from_str(new).unwrap();
        assert_eq!(b.nets[1], NetBinding::Socket("/run/p.sock".into()));
        assert_eq!(b.nets[2], NetBinding::Passt(Passt::default()));
        assert_eq!(serde_json::to_string(&b).unwrap(), new);
        // nets of taps only: read, written the older way.
        let b: HostBindings = serde_json::from_str(r#"{"nets":[{"tap":"t"}]}"#).unwrap();
        assert_eq!(serde_json::to_string(&b).unwrap(), r#"{"taps":["t"]}"#);
        let e = serde_json::from_str::<HostBindings>(r#"{"taps":["a"],"nets":[{"tap":"b"}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let empty: HostBindings = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, HostBindings::default());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");
    }
}
