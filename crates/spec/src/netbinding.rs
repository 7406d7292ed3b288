//! Where a network device's frames go on this host: [`NetBinding`], a tap, a Unix stream socket
//! that speaks QEMU's stream protocol (each frame preceded by its 32-bit big-endian length: a
//! passt someone started, `qemu -netdev stream`'s peers), or a passt Vessel starts for the VM
//! (rootless networking: outbound connections and port forwards as the VM's own user).
//!
//! As JSON, one object per device: `{"tap": "vtap0"}`, `{"socket": "/run/user/1000/p.sock"}`,
//! `{"passt": {"forwards": [{"protocol": "tcp", "host": 8080, "guest": 80}]}}`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bindings::check_tap;
use crate::vm::{Nic, SpecError};

/// The longest path a Unix socket address holds (`sun_path` less its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// What a network device is bound to on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NetBinding {
    /// A tap interface (created if it does not exist): needs `CAP_NET_ADMIN` or a tap made for
    /// the VM's user. Offloads and multi-queue.
    Tap(String),
    /// A listening Unix stream socket (an absolute path) speaking QEMU's stream protocol, such
    /// as one `passt --socket PATH` made. One queue pair, no offloads; the connection is made
    /// when the device is, and not made again if the peer goes away.
    #[schema(value_type = String)]
    Socket(PathBuf),
    /// passt, started by `vessel run` for this device as the VM's user (no privileges): the
    /// guest reaches what the host reaches, and `forwards` bring host ports in.
    Passt(Passt),
}

/// The passt Vessel starts for a network device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Passt {
    /// Host ports whose traffic passt brings to the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<PortForward>,
    /// Where the passt started for this run listens: set when `vessel run` starts it, never
    /// saved (a restore starts its own).
    #[serde(skip)]
    pub socket: Option<PathBuf>,
}

/// A transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Traffic to a host port, forwarded to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub protocol: Protocol,
    /// The port passt listens on, on every host address (1 to 65535; below 1024 needs the
    /// privilege to bind it).
    pub host: u16,
    /// The guest's port.
    pub guest: u16,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.protocol, self.host, self.guest)
    }
}

impl std::str::FromStr for PortForward {
    type Err = String;
    /// `tcp:HOSTPORT[:GUESTPORT]` or `udp:...` (the guest's port is the host's when absent).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{s}' is not a forward: expected tcp:HOSTPORT[:GUESTPORT] or udp:HOSTPORT[:GUESTPORT], ports 1 to 65535"
            )
        };
        let mut parts = s.split(':');
        let protocol = match parts.next() {
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            _ => return Err(bad()),
        };
        let port = |p: Option<&str>| -> Result<u16, String> {
            match p.map(str::parse::<u16>) {
                Some(Ok(n)) if n > 0 => Ok(n),
                _ => Err(bad()),
            }
        };
        let host = port(parts.next())?;
        let guest = match parts.next() {
            None => host,
            p => port(p)?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(PortForward {
            protocol,
            host,
            guest,
        })
    }
}

impl NetBinding {
    /// For messages: `tap vtap0`, `socket /run/p.sock`, `passt`.
    pub fn describe(&self) -> String {
        match self {
            NetBinding::Tap(t) => format!("tap {t}"),
            NetBinding::Socket(p) => format!("socket {}", p.display()),
            NetBinding::Passt(_) => "passt".to_string(),
        }
    }

    /// Whether the device talks to a stream socket (one queue pair, no offloads).
    pub fn is_stream(&self) -> bool {
        !matches!(self, NetBinding::Tap(_))
    }

    /// The tap's name, for a tap.
    pub fn tap(&self) -> Option<&str> {
        match self {
            NetBinding::Tap(t) => Some(t),
            _ => None,
        }
    }

    /// The socket a stream binding connects to: its own, or that of the passt started for it
    /// (none until it is).
    pub fn stream_path(&self) -> Option<&Path> {
        match self {
            NetBinding::Tap(_) => None,
            NetBinding::Socket(p) => Some(p),
            NetBinding::Passt(p) => p.socket.as_deref(),
        }
    }
}

/// Checks a stream socket's path: absolute, and short enough for a socket address.
pub fn check_socket_path(p: &Path) -> Result<(), String> {
    let len = p.as_os_str().len();
    if len == 0 {
        return Err("empty path".into());
    }
    if !p.is_absolute() {
        return Err(format!(
            "{}: the socket's path must be absolute",
            p.display()
        ));
    }
    if len > MAX_SOCKET_PATH {
        return Err(format!(
            "{}: {len} bytes, longer than a Unix socket's {MAX_SOCKET_PATH}",
            p.display()
        ));
    }
    if p.as_os_str().as_encoded_bytes().contains(&0) {
        return Err("a NUL in the socket's path".into());
    }
    Ok(())
}

/// Checks the network bindings against the spec's devices (`nets[i]` binds `spec_nets[i]`):
/// one each; taps well named and each used once; sockets absolute, short enough and each used
/// once; one queue pair on a stream; no host port forwarded twice.
pub(crate) fn check(nets: &[NetBinding], spec_nets: &[Nic]) -> Result<(), SpecError> {
    if nets.len() != spec_nets.len() {
        return Err(SpecError::new(
            "bindings.nets",
            format!(
                "{} given for {} network devices (one tap, socket or passt each)",
                nets.len(),
                spec_nets.len()
            ),
        ));
    }
    let mut forwards: Vec<(Protocol, u16)> = Vec::new();
    for (i, (b, nic)) in nets.iter().zip(spec_nets).enumerate() {
        let field = |sub: &str| format!("bindings.nets[{i}]{sub}");
        match b {
            NetBinding::Tap(t) => {
                check_tap(t).map_err(|why| SpecError::new(field(".tap"), why))?;
                if nets[..i].iter().any(|o| o.tap() == Some(t)) {
                    return Err(SpecError::new(
                        field(".tap"),
                        format!("tap {t} is used by another network device"),
                    ));
                }
            }
            NetBinding::Socket(p) => {
                check_socket_path(p).map_err(|why| SpecError::new(field(".socket"), why))?;
                if nets[..i]
                    .iter()
                    .any(|o| matches!(o, NetBinding::Socket(q) if q == p))
                {
                    return Err(SpecError::new(
                        field(".socket"),
                        format!(
                            "{} is used by another network device (a stream carries one)",
                            p.display()
                        ),
                    ));
                }
            }
            NetBinding::Passt(p) => {
                for (k, f) in p.forwards.iter().enumerate() {
                    if f.host == 0 || f.guest == 0 {
                        return Err(SpecError::new(
                            field(&format!(".passt.forwards[{k}]")),
                            "ports are 1 to 65535",
                        ));
                    }
                    if forwards.contains(&(f.protocol, f.host)) {
                        return Err(SpecError::new(
                            field(&format!(".passt.forwards[{k}]")),
                            format!("host port {} {} is forwarded twice", f.protocol, f.host),
                        ));
                    }
                    forwards.push((f.protocol, f.host));
                }
            }
        }
        if b.is_stream() && nic.queues != 1 {
            return Err(SpecError::new(
                field(""),
                format!(
                    "{} carries one queue pair, but nets[{i}].queues is {}",
                    b.describe(),
                    nic.queues
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_and_print() {
        let f: PortForward = "tcp:8080:80".parse().unwrap();
        assert_eq!(
            f,
            PortForward {
                protocol: Protocol::Tcp,
                host: 8080,
                guest: 80
            }
        );
        assert_eq!(f.to_string(), "tcp:8080:80");
        let f: PortForward = "udp:5353".parse().unwrap();
        assert_eq!((f.protocol, f.host, f.guest), (Protocol::Udp, 5353, 5353));
        for bad in [
            "",
            "tcp",
            "tcp:",
            "sctp:1",
            "tcp:0",
            "tcp:1:0",
            "tcp:65536",
            "tcp:1:2:3",
            "tcp:x",
            "TCP:1",
        ] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bindings_read_and_write_as_json() {
        let b: Vec<NetBinding> = serde_json::from_str(
            r#"[{"tap": "vtap0"}, {"socket": "/run/p.sock"},
                {"passt": {"forwards": [{"protocol": "tcp", "host": 8080, "guest": 80}]}},
                {"passt": {}}]"#,
        )
        .unwrap();
        assert_eq!(b[0], NetBinding::Tap("vtap0".into()));
        assert_eq!(b[1], NetBinding::Socket("/run/p.sock".into()));
        assert_eq!(
            b[2],
            NetBinding::Passt(Passt {
                forwards: vec!["tcp:8080:80".parse().unwrap()],
                socket: None
            })
        );
        assert_eq!(b[3], NetBinding::Passt(Passt::default()));
        let again: Vec<NetBinding> =
            serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(again, b);
        // The socket of a started passt is never written.
        let started = NetBinding::Passt(Passt {
            forwards: vec![],
            socket: Some("/tmp/x/passt.sock".into()),
        });
        assert_eq!(serde_json::to_string(&started).unwrap(), r#"{"passt":{}}"#);
        for bad in [
            r#"{"tap": "a", "socket": "/s"}"#,
            r#"{"passt": {"socket": "/s"}}"#,
            r#"{"passt": {"forwards": [{"protocol": "icmp", "host": 1, "guest": 1}]}}"#,
            r#"{"bridge": "br0"}"#,
        ] {
            assert!(serde_json::from_str::<NetBinding>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_name_the_binding_at_fault() {
        let nics = |n: usize| vec![Nic::default(); n];
        let field = |nets: &[NetBinding], spec: &[Nic]| check(nets, spec).unwrap_err().field;
        let tap = |t: &str| NetBinding::Tap(t.into());
        let socket = |p: &str| NetBinding::Socket(p.into());
        let passt = |f: &[&str]| {
            NetBinding::Passt(Passt {
                forwards: f.iter().map(|f| f.parse().unwrap()).collect(),
                socket: None,
            })
        };
        check(
            &[
                tap("t0"),
                socket("/run/a.sock"),
                passt(&["tcp:80"]),
                passt(&["udp:80"]),
            ],
            &nics(4),
        )
        .unwrap();
        assert_eq!(field(&[tap("t0")], &nics(2)), "bindings.nets");
        assert_eq!(
            field(&[tap("t0"), tap("t0")], &nics(2)),
            "bindings.nets[1].tap"
        );
        assert_eq!(field(&[tap("a/b")], &nics(1)), "bindings.nets[0].tap");
        for bad in ["", "rel.sock", &format!("/{}", "x".repeat(107))] {
            assert_eq!(
                field(&[socket(bad)], &nics(1)),
                "bindings.nets[0].socket",
                "{bad}"
            );
        }
        assert_eq!(
            field(&[socket("/a"), socket("/a")], &nics(2)),
            "bindings.nets[1].socket"
        );
        assert_eq!(
            field(&[passt(&["tcp:80"]), passt(&["tcp:80:81"])], &nics(2)),
            "bindings.nets[1].passt.forwards[0]"
        );
        let bad_port = NetBinding::Passt(Passt {
            forwards: vec![PortForward {
                protocol: Protocol::Tcp,
                host: 0,
                guest: 1,
            }],
            socket: None,
        });
        assert_eq!(
            field(&[bad_port], &nics(1)),
            "bindings.nets[0].passt.forwards[0]"
        );
        let multi = vec![Nic {
            queues: 2,
            ..Nic::default()
        }];
        check(&[tap("t0")], &multi).unwrap();
        let e = check(&[socket("/s")], &multi).unwrap_err();
        assert_eq!(e.field, "bindings.nets[0]");
        assert!(e.why.contains("one queue pair"), "{e}");
        assert_eq!(field(&[passt(&[])], &multi), "bindings.nets[0]");
    }
}
