//! [`HostBindings`]: where a VM runs on this host: its disk files, taps, sockets and
//! consoles. A [`crate::vm::VmSpec`] says what the VM is; its bindings are this host's and
//! are never taken from a snapshot's or a migration peer's word without the host's say.
//!
//! Devices and their bindings pair up in order: `disks[i]` is the file of the spec's
//! `disks[i]`, `taps[i]` the tap of `nets[i]`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vm::{SpecError, VmSpec};

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
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostBindings {
    /// One image file per disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub disks: Vec<PathBuf>,
    /// One tap interface per network device (created if it does not exist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<String>,
    /// The vsock device's Unix socket: host clients connect to it; guest connections to port
    /// N go to `<socket>_N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub vsock_socket: Option<PathBuf>,
    /// The serial console; none: the process's own (`vessel run`: the terminal; `vessel
    /// serve`: its `--console`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<Console>,
    /// The virtio console, when the spec has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtio_console: Option<Console>,
    /// Where the control API listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub api_socket: Option<PathBuf>,
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
    /// Checks that these bindings fit `spec`: one file per disk, one distinct tap per network
    /// device, a socket for the vsock device, at most one console on the terminal.
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
        count("taps", self.taps.len(), spec.nets.len(), "network devices")?;
        for (i, d) in self.disks.iter().enumerate() {
            if d.as_os_str().is_empty() {
                return Err(SpecError::new(format!("bindings.disks[{i}]"), "empty path"));
            }
        }
        for (i, t) in self.taps.iter().enumerate() {
            check_tap(t).map_err(|why| SpecError::new(format!("bindings.taps[{i}]"), why))?;
            if self.taps[..i].contains(t) {
                return Err(SpecError::new(
                    format!("bindings.taps[{i}]"),
                    format!("tap {t} is used by another network device"),
                ));
            }
        }
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
            taps: vec!["t0".into(), "t1".into()],
            vsock_socket: Some("/v".into()),
            ..HostBindings::default()
        };
        b.check(&spec).unwrap();
        let field = |b: &HostBindings| b.check(&spec).unwrap_err().field;
        let mut c = b.clone();
        c.disks.clear();
        assert_eq!(field(&c), "bindings.disks");
        c = b.clone();
        c.taps[1] = "t0".into();
        assert_eq!(field(&c), "bindings.taps[1]");
        c = b.clone();
        c.taps[0] = "a/b".into();
        assert_eq!(field(&c), "bindings.taps[0]");
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
    }
}
