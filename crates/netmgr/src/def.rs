//! What a network is: [`NetworkDef`], as `vessel net create` and the daemon's API give it,
//! checked by [`NetworkDef::validate`] (the message names the field at fault).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A network definition that is not valid: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct DefError {
    pub field: String,
    pub why: String,
}

fn err(field: impl Into<String>, why: impl Into<String>) -> DefError {
    DefError {
        field: field.into(),
        why: why.into(),
    }
}

/// How a network reaches the rest of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A bridge of Vessel's with a gateway address, DHCP and DNS, and the VMs' traffic
    /// masqueraded out through the host (port forwards bring traffic in).
    #[default]
    Nat,
    /// As `nat` without any way out: the VMs reach each other and the host's DHCP and DNS.
    Isolated,
    /// VMs on an existing host bridge, peers on its LAN; no DHCP or firewall of Vessel's.
    Bridge,
}

/// An IPv4 subnet with the host's (gateway's) address in it: `10.88.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    /// The subnet's first address.
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    /// The subnet's last address.
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    pub fn contains(self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr) & self.mask()
    }
    pub fn overlaps(self, other: Ipv4Cidr) -> bool {
        let m = self.mask() & other.mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }
    /// The subnet as nftables and routes write it: `10.88.0.0/24`.
    pub fn subnet(self) -> String {
        format!("{}/{}", self.network(), self.prefix)
    }
    /// The netmask: `255.255.255.0`.
    pub fn netmask(self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not an address with a prefix length such as 10.88.0.1/24");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// Traffic to a host port sent on to a VM's port: `tcp:8080:web:80`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub proto: Proto,
    pub host_port: u16,
    /// The VM (by name); its address comes from its lease.
    pub vm: String,
    pub vm_port: u16,
}

impl FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not PROTO:HOSTPORT:VM:PORT such as tcp:8080:web:80");
        let parts: Vec<&str> = s.split(':').collect();
        let [proto, hp, vm, vp] = parts[..] else {
            return Err(bad());
        };
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad()),
        };
        Ok(Forward {
            proto,
            host_port: hp.parse().map_err(|_| bad())?,
            vm: vm.to_string(),
            vm_port: vp.parse().map_err(|_| bad())?,
        })
    }
}

/// A fixed address for a MAC: `52:54:00:12:34:56=10.88.0.10[=name]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StaticLease {
    #[schema(value_type = String)]
    pub mac: net::MacAddr,
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl FromStr for StaticLease {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not MAC=ADDRESS[=NAME]");
        let mut it = s.split('=');
        let mac = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let ip = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let name = it.next().map(str::to_string);
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(StaticLease { mac, ip, name })
    }
}

/// A network, as `vessel net create` and `POST /api/v1/networks` give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    pub name: String,
    #[serde(default)]
    pub mode: Mode,
    /// The bridge: for `bridge`, an existing one of the host's (required); for `nat` and
    /// `isolated`, Vessel's own (default `vsl-NAME`, cut to 15 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The host's address and the subnet (`nat`, `isolated`): `10.88.0.1/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10.88.0.1/24")]
    pub ipv4: Option<Ipv4Cidr>,
    /// The first and last address DHCP hands out (default: the subnet after the host's
    /// address, up to the last but one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    pub dhcp_range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// The DNS domain the VMs' names are in (default: the network's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<Forward>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub static_leases: Vec<StaticLease>,
    /// Started when the daemon starts (default true).
    #[serde(default = "yes")]
    pub autostart: bool,
}

fn yes() -> bool {
    true
}

/// A stable 64-bit hash of a name (FNV-1a), for the names and addresses derived from it
/// (a network's bridge address, a VM NIC's tap name): the same on every host and run.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether `name` is a Linux interface name (1 to 15 characters, no `/`, space or `:`).
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "'{name}' is not an interface name (1 to 15 characters)"
        ));
    }
    Ok(())
}

impl NetworkDef {
    /// A network of `mode` with the host's address and subnet `ipv4`, and every other
    /// setting at its default.
    pub fn new(name: &str, mode: Mode, ipv4: Option<Ipv4Cidr>) -> NetworkDef {
        NetworkDef {
            name: name.to_string(),
            mode,
            bridge: None,
            ipv4,
            dhcp_range: None,
            domain: None,
            forwards: Vec::new(),
            static_leases: Vec::new(),
            autostart: true,
        }
    }

    /// The bridge's name.
    pub fn bridge_name(&self) -> String {
        match &self.bridge {
            Some(b) => b.clone(),
            None => format!("vsl-{}", self.name).chars().take(15).collect(),
        }
    }

    /// The bridge's address: locally administered, derived from the network's name (stable
    /// across restarts of the network and the host).
    pub fn bridge_mac(&self) -> net::MacAddr {
        let b = name_hash(&self.name).to_be_bytes();
        net::MacAddr::local_from([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// Whether Vessel makes (and removes) the bridge, the addresses and the firewall.
    pub fn managed(&self) -> bool {
        self.mode != Mode::Bridge
    }

    pub fn domain(&self) -> String {
        self.domain.clone().unwrap_or_else(|| self.name.clone())
    }

    /// DHCP's range.
    pub fn range(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        let net = self.ipv4?;
        Some(self.dhcp_range.unwrap_or_else(|| {
            // The larger side of the subnet around the host's address.
            let (first, last) = (u32::from(net.network()) + 1, u32::from(net.broadcast()) - 1);
            let host = u32::from(net.addr);
            let (a, b) = if host - first >= last - host {
                (first, host - 1)
            } else {
                (host + 1, last)
            };
            (Ipv4Addr::from(a), Ipv4Addr::from(b))
        }))
    }

    /// Checks what can be checked without the host (see [`crate::Host`] for the rest).
    pub fn validate(&self) -> Result<(), DefError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 32
            && !self.name.starts_with(['-', '.'])
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(err(
                "name",
                format!("'{}': 1 to 32 letters, digits, '-' or '_'", self.name),
            ));
        }
        if let Some(b) = &self.bridge {
            check_ifname(b).map_err(|e| err("bridge", e))?;
        }
        match self.mode {
            Mode::Bridge => {
                if self.bridge.is_none() {
                    return Err(err("bridge", "a bridge network names the host's bridge"));
                }
                for (field, set) in [
                    ("ipv4", self.ipv4.is_some()),
                    ("dhcp_range", self.dhcp_range.is_some()),
                    ("forwards", !self.forwards.is_empty()),
                    ("static_leases", !self.static_leases.is_empty()),
                ] {
                    if set {
                        return Err(err(
                            field,
                            "a bridge network has no DHCP or firewall of Vessel's",
                        ));
                    }
                }
            }
            Mode::Nat | Mode::Isolated => {
                let net = self.ipv4.ok_or_else(|| {
                    err(
                        "ipv4",
                        "required: the host's address and subnet, e.g. 10.88.0.1/24",
                    )
                })?;
                if !(8..=30).contains(&net.prefix) {
                    return Err(err("ipv4", "the prefix length must be 8 to 30"));
                }
                if net.addr == net.network() || net.addr == net.broadcast() {
                    return Err(err(
                        "ipv4",
                        format!("{} is not a host address of {}", net.addr, net.subnet()),
                    ));
                }
                let (a, b) = self.range().unwrap_or((net.addr, net.addr));
                for (field, x) in [("dhcp_range[0]", a), ("dhcp_range[1]", b)] {
                    if !net.contains(x) || x == net.network() || x == net.broadcast() {
                        return Err(err(
                            field,
                            format!("{x} is not a host address of {}", net.subnet()),
                        ));
                    }
                }
                if u32::from(a) > u32::from(b) {
                    return Err(err("dhcp_range", "the first address is after the last"));
                }
                if (u32::from(a)..=u32::from(b)).contains(&u32::from(net.addr)) {
                    return Err(err(
                        "dhcp_range",
                        format!("it holds the host's address {}", net.addr),
                    ));
                }
                for (i, l) in self.static_leases.iter().enumerate() {
                    if !net.contains(l.ip) || l.ip == net.addr {
                        return Err(err(
                            format!("static_leases[{i}]"),
                            format!("{} is not a free address of {}", l.ip, net.subnet()),
                        ));
                    }
                    if self.static_leases[..i]
                        .iter()
                        .any(|o| o.mac == l.mac || o.ip == l.ip)
                    {
                        return Err(err(
                            format!("static_leases[{i}]"),
                            "the MAC or address is given twice",
                        ));
                    }
                }
                if self.mode == Mode::Isolated && !self.forwards.is_empty() {
                    return Err(err("forwards", "an isolated network has no way in"));
                }
                for (i, f) in self.forwards.iter().enumerate() {
                    if f.host_port == 0 || f.vm_port == 0 {
                        return Err(err(format!("forwards[{i}]"), "ports are 1 to 65535"));
                    }
                    if self.forwards[..i]
                        .iter()
                        .any(|o| o.proto == f.proto && o.host_port == f.host_port)
                    {
                        return Err(err(
                            format!("forwards[{i}]"),
                            format!("{}:{} is forwarded already", f.proto, f.host_port),
                        ));
                    }
                }
            }
        }
        if let Some(d) = &self.domain {
            let ok = !d.is_empty()
                && d.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !ok {
                return Err(err("domain", format!("'{d}' is not a domain name")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(ipv4: &str) -> NetworkDef {
        NetworkDef::new("default", Mode::Nat, Some(ipv4.parse().unwrap()))
    }

    #[test]
    fn subnets() {
        let a: Ipv4Cidr = "10.88.0.1/24".parse().unwrap();
        assert_eq!(a.subnet(), "10.88.0.0/24");
        assert_eq!(a.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(a.overlaps("10.88.0.0/16".parse().unwrap()));
        assert!(!a.overlaps("10.89.0.1/24".parse().unwrap()));
        for bad in ["10.88.0.1", "10.88.0.1/33", "x/24"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::json!("10.88.0.1/24")
        );
    }

    #[test]
    fn defaults_and_checks() {
        let n = nat("10.88.0.1/24");
        n.validate().unwrap();
        assert_eq!(n.bridge_name(), "vsl-default");
        assert_eq!(
            n.range(),
            Some((Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 254)))
        );
        let long = NetworkDef {
            name: "a-very-long-network".into(),
            ..n.clone()
        };
        assert_eq!(long.bridge_name().len(), 15);
        let field = |d: &NetworkDef| d.validate().unwrap_err().field;
        assert_eq!(field(&nat("10.88.0.0/24")), "ipv4");
        assert_eq!(field(&nat("10.88.0.1/31")), "ipv4");
        let mut d = nat("10.88.0.1/24");
        d.dhcp_range = Some((Ipv4Addr::new(10, 88, 1, 2), Ipv4Addr::new(10, 88, 0, 9)));
        assert_eq!(field(&d), "dhcp_range[0]");
        d.dhcp_range = Some((Ipv4Addr::new(10, 88, 0, 1), Ipv4Addr::new(10, 88, 0, 9)));
        assert_eq!(field(&d), "dhcp_range");
        let mut d = nat("10.88.0.1/24");
        d.forwards = vec![
            "tcp:8080:web:80".parse().unwrap(),
            "tcp:8080:db:80".parse().unwrap(),
        ];
        assert_eq!(field(&d), "forwards[1]");
        d.mode = Mode::Isolated;
        assert_eq!(field(&d), "forwards");
        let b = NetworkDef {
            mode: Mode::Bridge,
            ipv4: None,
            ..nat("10.88.0.1/24")
        };
        assert_eq!(field(&b), "bridge");
        let b = NetworkDef {
            bridge: Some("br0".into()),
            ..b
        };
        b.validate().unwrap();
        assert!(!b.managed());
    }

    #[test]
    fn command_line_forms() {
        let f: Forward = "udp:53:dns:5353".parse().unwrap();
        assert_eq!(
            (f.proto, f.host_port, f.vm.as_str(), f.vm_port),
            (Proto::Udp, 53, "dns", 5353)
        );
        assert!("tcp:80:web".parse::<Forward>().is_err());
        let l: StaticLease = "52:54:00:00:00:01=10.88.0.10=web".parse().unwrap();
        assert_eq!(l.name.as_deref(), Some("web"));
        assert!("52:54:00:00:00:01".parse::<StaticLease>().is_err());
        assert!(check_ifname("br0").is_ok());
        assert!(check_ifname("a/b").is_err() && check_ifname(&"x".repeat(16)).is_err());
    }
}
