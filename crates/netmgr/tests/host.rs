//! Managed networks on a real kernel, inside network namespaces the test makes (the host's
//! own stay untouched): the test's process moves to a namespace of its own that stands for
//! the host, with an uplink to a namespace standing for the outside world; "VMs" are
//! namespaces whose veth joins the network's bridge as a tap would. Needs root, `nft`
//! (nftables), `dnsmasq` (dnsmasq-base), `ip` (iproute2) and `busybox` (udhcpc, nc,
//! nslookup).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use netmgr::{Links, Mode, NetworkDef};

fn require_root_and_tools() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests need root (network namespaces, bridges, nftables)"
    );
    for tool in ["nft", "dnsmasq", "ip", "busybox"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).exists();
        assert!(found, "{tool} is missing (scripts/test installs it)");
    }
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

#[track_caller]
fn ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The test's world: named namespaces (removed on drop), the test process in a new one.
struct World {
    tag: String,
    names: Vec<String>,
    dir: tempfile::TempDir,
}

impl World {
    fn new(tag: &str) -> World {
        require_root_and_tools();
        // SAFETY: a new network namespace for this thread (the test's only one, which every
        // netlink socket and child process of the test uses); no memory or descriptor
        // sharing changes.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }.unwrap();
        ok("ip link set lo up");
        let tag = format!("{tag}{}", std::process::id() % 100_000);
        let mut w = World {
            tag,
            names: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        // The outside world: 192.0.2.2, no route back to any VM subnet.
        let out = w.ns("out");
        ok(&format!(
            "ip link add up0 type veth peer name peer0 && ip link set peer0 netns {out} && \
             ip addr add 192.0.2.1/24 dev up0 && ip link set up0 up && \
             ip -n {out} addr add 192.0.2.2/24 dev peer0 && ip -n {out} link set peer0 up && \
             ip -n {out} link set lo up"
        ));
        w
    }

    /// A new named namespace.
    fn ns(&mut self, what: &str) -> String {
        let n = format!("vt{}{what}", self.tag);
        ok(&format!("ip netns add {n}"));
        self.names.push(n.clone());
        n
    }

    /// A "VM": a namespace whose eth0 is a port of `bridge` (as a VM's tap), with `mac`.
    fn vm(&mut self, what: &str, bridge: &str, mac: &str) -> String {
        let n = self.ns(what);
        let host_end = format!("vh{}{what}", self.tag)
            .chars()
            .take(15)
            .collect::<String>();
        ok(&format!(
            "ip link add {host_end} type veth peer name eth0 netns {n} && \
             ip link set {host_end} master {bridge} up && \
             ip -n {n} link set eth0 address {mac} && ip -n {n} link set eth0 up && \
             ip -n {n} link set lo up"
        ));
        n
    }

    /// DHCP in namespace `n`: the address it got.
    fn dhcp(&self, n: &str) -> Result<String, String> {
        let script = self.dir.path().join("udhcpc.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr flush dev $interface\n  \
             ip addr add $ip/${mask:-24} dev $interface\n  \
             [ -n \"$router\" ] && ip route replace default via $router\n  \
             echo \"nameserver $dns\" > /tmp/resolv.$interface\n  echo \"got $ip\";;\nesac\n",
        )
        .unwrap();
        ok(&format!("chmod +x {}", script.display()));
        let o = sh(&format!(
            "ip netns exec {n} busybox udhcpc -i eth0 -n -q -t 10 -T 1 -s {}",
            script.display()
        ));
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        text.lines()
            .find_map(|l| l.strip_prefix("got "))
            .map(str::to_string)
            .ok_or(text)
    }

    /// A TCP server in namespace `n` on `port` answering `reply` once.
    fn serve(&self, n: &str, port: u16, reply: &str) -> Child {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                n,
                "busybox",
                "nc",
                "-l",
                "-p",
                &port.to_string(),
            ])
            .arg("-e")
            .args(["echo", reply])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn dir(&self) -> PathBuf {
        self.dir.path().join("net")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = sh(&format!("ip netns del {n}"));
        }
    }
}

/// A TCP exchange from namespace `n` (or this one when empty): what came back.
fn connect(n: &str, addr: &str, port: u16) -> String {
    let prefix = if n.is_empty() {
        String::new()
    } else {
        format!("ip netns exec {n} ")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = sh(&format!("{prefix}busybox nc -w 2 {addr} {port} </dev/null"));
        let got = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !got.is_empty() || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn end(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn nat(name: &str, ipv4: &str) -> NetworkDef {
    NetworkDef::new(name, Mode::Nat, Some(ipv4.parse().unwrap()))
}

#[test]
fn a_nat_network_gives_leases_names_a_way_out_and_a_way_in() {
    let mut w = World::new("n");
    // A restrictive FORWARD chain of somebody else's, as Docker leaves it.
    ok("nft add table ip filter && nft 'add chain ip filter FORWARD { type filter hook forward priority filter; policy drop; }'");
    let before = ok("nft list ruleset");
    let links = Links::new().unwrap();
    let mut def = nat("lab", "10.88.0.1/24");
    netmgr::check_on_host(&def, &[], &links).unwrap();
    let hosts = [
        netmgr::Host {
            mac: "52:54:00:00:00:01".parse().unwrap(),
            name: "web".into(),
        },
        netmgr::Host {
            mac: "52:54:00:00:00:02".parse().unwrap(),
            name: "db".into(),
        },
    ];
    let running = netmgr::start(&def, &w.dir(), &hosts, &[], &links).unwrap();
    let br = def.bridge_name();
    let web = w.vm("web", &br, "52:54:00:00:00:01");
    let db = w.vm("db", &br, "52:54:00:00:00:02");
    let web_ip = w.dhcp(&web).unwrap();
    let db_ip = w.dhcp(&db).unwrap();
    assert!(
        web_ip.starts_with("10.88.0.") && db_ip.starts_with("10.88.0."),
        "{web_ip} {db_ip}"
    );
    // Names resolve through the network's dnsmasq.
    let looked = ok(&format!(
        "ip netns exec {web} busybox nslookup db.lab 10.88.0.1"
    ));
    assert!(looked.contains(&db_ip), "{looked}");
    // Out through the masquerade: the world sees the host's uplink address.
    let out = w.names[0].clone();
    let server = w.serve(&out, 7000, "hello-from-outside");
    ok(&format!(
        "ip netns exec {web} ip route replace default via 10.88.0.1"
    ));
    assert_eq!(connect(&web, "192.0.2.2", 7000), "hello-from-outside");
    end(server);
    // The leases name both.
    let leases = netmgr::dnsmasq::read_leases(&netmgr::dnsmasq::Files { dir: w.dir() });
    assert_eq!(leases.len(), 2, "{leases:?}");
    // In through a port forward (the firewall rebuilt with it).
    def.forwards = vec!["tcp:8080:web:80".parse().unwrap()];
    let dnat = [netmgr::nft::Dnat {
        proto: netmgr::Proto::Tcp,
        host_port: 8080,
        to: web_ip.parse().unwrap(),
        port: 80,
    }];
    netmgr::nft::apply(&netmgr::nft::ruleset(&def, &dnat)).unwrap();
    let inside = w.serve(&web, 80, "hello-from-web");
    ok(&format!("ip -n {out} route replace default via 192.0.2.1"));
    assert_eq!(connect(&out, "192.0.2.1", 8080), "hello-from-web");
    end(inside);
    // Stopped: the host's ruleset is byte for byte what it was, the bridge gone.
    netmgr::stop(&def, running.dnsmasq, &links).unwrap();
    assert_eq!(ok("nft list ruleset"), before);
    assert!(links.get(&br).unwrap().is_none());
}

#[test]
fn an_isolated_network_has_no_way_out_and_bad_definitions_change_nothing() {
    let mut w = World::new("i");
    let links = Links::new().unwrap();
    let nat_def = nat("lab", "10.88.0.1/24");
    let mut iso = nat("iso", "10.77.0.1/24");
    iso.mode = Mode::Isolated;
    // Overlapping another network, or the host's own uplink: refused, naming the field.
    let overlapping = nat("dup", "10.88.0.100/16");
    let e =
        netmgr::check_on_host(&overlapping, std::slice::from_ref(&nat_def), &links).unwrap_err();
    assert_eq!(e.field, "ipv4", "{e}");
    let e = netmgr::check_on_host(&nat("up", "192.0.2.9/24"), &[], &links).unwrap_err();
    assert!(e.why.contains("up0"), "{e}");
    let mut bridged = nat("b", "10.1.0.1/24");
    bridged.mode = Mode::Bridge;
    bridged.ipv4 = None;
    bridged.bridge = Some("nosuchbr".into());
    let e = netmgr::check_on_host(&bridged, &[], &links).unwrap_err();
    assert!(e.why.contains("no bridge nosuchbr"), "{e}");
    let before = ok("nft list ruleset");
    assert!(links.get(&iso.bridge_name()).unwrap().is_none());

    let running = netmgr::start(&iso, &w.dir(), &[], &[], &links).unwrap();
    let vm = w.vm("vm", &iso.bridge_name(), "52:54:00:00:01:01");
    let ip = w.dhcp(&vm).unwrap();
    assert!(ip.starts_with("10.77.0."), "{ip}");
    // DHCP gave no router; with one set by hand the firewall still keeps it in.
    ok(&format!(
        "ip netns exec {vm} ip route replace default via 10.77.0.1"
    ));
    let out = w.names[0].clone();
    let server = w.serve(&out, 7001, "should-not-arrive");
    assert_eq!(connect(&vm, "192.0.2.2", 7001), "");
    end(server);
    netmgr::stop(&iso, running.dnsmasq, &links).unwrap();
    assert_eq!(ok("nft list ruleset"), before);
}

#[test]
fn a_crash_leaves_nothing_the_sweep_does_not_remove() {
    let w = World::new("s");
    let links = Links::new().unwrap();
    ok("nft add table ip filter && nft 'add chain ip filter FORWARD { type filter hook forward priority filter; policy drop; }'");
    let before = ok("nft list ruleset");
    let def = nat("gone", "10.66.0.1/24");
    let running = netmgr::start(&def, &w.dir(), &[], &[], &links).unwrap();
    assert!(ok("nft list ruleset").contains("vessel:gone"));
    // The daemon "crashes": its dnsmasq and rules stay; the next start sweeps them.
    std::mem::forget(running);
    netmgr::kill_stale_dnsmasq(&w.dir());
    let swept = netmgr::sweep(&[]).unwrap();
    assert_eq!(swept, ["gone"]);
    links.delete(&def.bridge_name()).unwrap();
    assert_eq!(ok("nft list ruleset"), before);
    let pid_gone = !w.dir().join("dnsmasq.pid").exists();
    assert!(pid_gone);
}
