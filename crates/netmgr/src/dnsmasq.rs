//! A network's DHCP and DNS: one `dnsmasq` (Debian's `dnsmasq-base`) per network, as libvirt
//! and Incus run it, listening only on the network's bridge. The VMs' names come from a hosts
//! file of `MAC,NAME` lines (re-read on SIGHUP) so that they resolve under the network's
//! domain whatever the guest sends; their addresses are read back from the lease file.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::def::NetworkDef;

/// Errors of a network's dnsmasq.
#[derive(Debug, thiserror::Error)]
pub enum DnsmasqError {
    #[error("cannot start dnsmasq (package dnsmasq-base): {0}")]
    Spawn(std::io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dnsmasq ended at once: {0}")]
    Died(String),
}

/// Where a network's dnsmasq keeps its files (a directory of its own).
#[derive(Debug, Clone)]
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    pub fn conf(&self) -> PathBuf {
        self.dir.join("dnsmasq.conf")
    }
    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }
    pub fn leases(&self) -> PathBuf {
        self.dir.join("leases")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("dnsmasq.log")
    }
}

/// A VM's NIC on the network, for the hosts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub mac: net::MacAddr,
    pub name: String,
}

/// The configuration of the network's dnsmasq.
pub fn config(def: &NetworkDef, files: &Files) -> String {
    let mut c = String::from(
        "# Made by vessel: changes are lost.\n\
         strict-order\nexcept-interface=lo\nbind-dynamic\nno-hosts\n\
         dhcp-authoritative\ndhcp-no-override\ndhcp-rapid-commit\nlog-facility=-\n",
    );
    c.push_str(&format!("interface={}\n", def.bridge_name()));
    if let (Some(net), Some((a, b))) = (def.ipv4, def.range()) {
        c.push_str(&format!("listen-address={}\n", net.addr));
        c.push_str(&format!("dhcp-range={a},{b},{},1h\n", net.netmask()));
        let size = u32::from(b) - u32::from(a) + 1;
        c.push_str(&format!("dhcp-lease-max={size}\n"));
    }
    let domain = def.domain();
    c.push_str(&format!(
        "domain={domain}\nlocal=/{domain}/\nexpand-hosts\n"
    ));
    if def.mode == crate::def::Mode::Isolated {
        // No way out: no upstream servers, no default route offered.
        c.push_str("no-resolv\ndhcp-option=3\n");
    }
    for l in &def.static_leases {
        match &l.name {
            Some(n) => c.push_str(&format!("dhcp-host={},{},{n}\n", l.mac, l.ip)),
            None => c.push_str(&format!("dhcp-host={},{}\n", l.mac, l.ip)),
        }
    }
    c.push_str(&format!(
        "dhcp-hostsfile={}\ndhcp-leasefile={}\npid-file={}\n",
        files.hosts().display(),
        files.leases().display(),
        files.pid().display()
    ));
    c
}

/// The hosts file: one `MAC,NAME` line per VM NIC (a name dnsmasq gives the lease and
/// resolves).
pub fn hosts_file(hosts: &[Host]) -> String {
    hosts
        .iter()
        .map(|h| format!("{},{}\n", h.mac, h.name))
        .collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DnsmasqError + '_ {
    move |source| DnsmasqError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the files and starts dnsmasq in the foreground as a child (its output in the log
/// file); the caller keeps the child. The directory must be one dnsmasq's user can read
/// after it dropped its privileges (it reads the hosts file again on SIGHUP).
pub fn start(def: &NetworkDef, files: &Files, hosts: &[Host]) -> Result<Child, DnsmasqError> {
    std::fs::create_dir_all(&files.dir).map_err(io(&files.dir))?;
    let conf = files.conf();
    std::fs::write(&conf, config(def, files)).map_err(io(&conf))?;
    let h = files.hosts();
    std::fs::write(&h, hosts_file(hosts)).map_err(io(&h))?;
    let log_path = files.log();
    let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
    let err = log.try_clone().map_err(io(&log_path))?;
    let mut child = Command::new("dnsmasq")
        .arg(format!("--conf-file={}", conf.display()))
        .arg("--keep-in-foreground")
        .args(unprivileged())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(DnsmasqError::Spawn)?;
    // A bad option or a port in use ends it at once.
    std::thread::sleep(std::time::Duration::from_millis(100));
    if let Ok(Some(status)) = child.try_wait() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        return Err(DnsmasqError::Died(format!("{status}: {}", text.trim())));
    }
    Ok(child)
}

/// Whether `file` (`/etc/passwd`, `/etc/group`) has an entry `name`.
fn has_entry(file: &str, name: &str) -> bool {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(':').next() == Some(name))
}

/// dnsmasq faces the guests: it drops to `nobody` (`nogroup`) once its sockets and files are
/// open, as Debian's own service does, where the host has that user; else it keeps root.
fn unprivileged() -> Vec<String> {
    let mut a = Vec::new();
    if has_entry("/etc/passwd", "nobody") {
        a.push("--user=nobody".to_string());
        for g in ["nogroup", "nobody"] {
            if has_entry("/etc/group", g) {
                a.push(format!("--group={g}"));
                break;
            }
        }
    } else {
        a.push("--user=root".to_string());
    }
    a
}

/// Rewrites the hosts file and has dnsmasq read it again.
pub fn update_hosts(files: &Files, hosts: &[Host], pid: Option<u32>) -> Result<(), DnsmasqError> {
    let h = files.hosts();
    let tmp = h.with_extension("new");
    std::fs::write(&tmp, hosts_file(hosts)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &h).map_err(io(&h))?;
    if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::HUP);
    }
    Ok(())
}

/// A lease: who has which address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Lease {
    /// Seconds since the epoch when it ends (0: never).
    pub expires: u64,
    #[schema(value_type = String)]
    pub mac: net::MacAddr,
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    /// The name the client gave (or the hosts file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// The leases in dnsmasq's lease file (`EXPIRY MAC IP NAME CLIENT-ID` lines); lines it
/// cannot read are left out.
pub fn leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 {
                return None;
            }
            Some(Lease {
                expires: f[0].parse().ok()?,
                mac: f[1].parse().ok()?,
                ip: f[2].parse().ok()?,
                hostname: (f[3] != "*").then(|| f[3].to_string()),
            })
        })
        .collect()
}

/// The lease file's leases (none if it is not there yet).
pub fn read_leases(files: &Files) -> Vec<Lease> {
    leases(&std::fs::read_to_string(files.leases()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::def::{Mode, NetworkDef};

    fn def(mode: Mode) -> NetworkDef {
        NetworkDef {
            static_leases: vec!["52:54:00:00:00:09=10.88.0.9=db".parse().unwrap()],
            ..NetworkDef::new("lab", mode, Some("10.88.0.1/24".parse().unwrap()))
        }
    }

    #[test]
    fn configuration() {
        let files = Files {
            dir: "/var/lib/vessel/networks/lab".into(),
        };
        let c = config(&def(Mode::Nat), &files);
        for want in [
            "interface=vsl-lab\n",
            "listen-address=10.88.0.1\n",
            "dhcp-range=10.88.0.2,10.88.0.254,255.255.255.0,1h\n",
            "domain=lab\nlocal=/lab/\n",
            "dhcp-host=52:54:00:00:00:09,10.88.0.9,db\n",
            "dhcp-hostsfile=/var/lib/vessel/networks/lab/hosts\n",
        ] {
            assert!(c.contains(want), "{want}:\n{c}");
        }
        assert!(!c.contains("no-resolv"));
        let iso = config(&def(Mode::Isolated), &files);
        assert!(iso.contains("no-resolv\ndhcp-option=3\n"), "{iso}");
        let hosts = [Host {
            mac: "52:54:00:00:00:01".parse().unwrap(),
            name: "web".into(),
        }];
        assert_eq!(hosts_file(&hosts), "52:54:00:00:00:01,web\n");
    }

    #[test]
    fn leases_are_read() {
        let l = leases(
            "1796700000 52:54:00:00:00:01 10.88.0.23 web 01:52:54:00:00:00:01\n\
             0 52:54:00:00:00:02 10.88.0.24 * *\nbroken line\n",
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].ip, Ipv4Addr::new(10, 88, 0, 23));
        assert_eq!(l[0].hostname.as_deref(), Some("web"));
        assert_eq!(l[1].hostname, None);
    }
}
