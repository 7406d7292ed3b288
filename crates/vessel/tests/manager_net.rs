//! The daemon's managed networks on the direct host, in a network namespace the test makes
//! (the host's own links and rules stay untouched): a network made, VMs of the bundled guest
//! with NICs on it (their taps made for them, ports of the bridge, gone with their
//! processes; their MACs and names in the network's dnsmasq), refusals that change nothing,
//! the daemon killed and started again (the network as it was, nothing doubled), and the
//! network deleted with nothing left: no table, rule, bridge, tap or dnsmasq.

mod common;

use std::process::Command;

use common::daemon::*;
use common::*;

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let n = format!("vtm{tag}{}", std::process::id() % 100_000);
        let o = Command::new("ip")
            .args(["netns", "add", &n])
            .output()
            .unwrap();
        assert!(o.status.success(), "ip netns add: {o:?}");
        let ns = Netns(n);
        ns.ok("ip link set lo up");
        ns
    }

    fn sh(&self, cmd: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", cmd])
            .output()
            .unwrap()
    }

    #[track_caller]
    fn ok(&self, cmd: &str) -> String {
        let o = self.sh(cmd);
        assert!(o.status.success(), "{cmd}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn dnsmasqs(conf_dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("dnsmasq") && c.contains(conf_dir.to_str().unwrap())
            })
        })
        .count()
}

#[test]
fn vms_on_a_managed_network_and_nothing_left_behind() {
    require_root();
    assert!(have_kvm(), "/dev/kvm is required");
    let ns = Netns::new("a");
    // Somebody else's restrictive FORWARD chain (Docker's).
    ns.ok("nft add table ip filter && nft 'add chain ip filter FORWARD { type filter hook forward priority filter; policy drop; }'");
    let rules_before = ns.ok("nft list ruleset");
    let dir = TempDir::new("manager-net");
    let jail = ["--vm-uids", "64300-64309"];
    let mut d = Daemon::start_in(&dir.0, Some(&ns.0), &jail);
    let net_dir = d.state.join("networks/lab");

    // Bad definitions: clear, and nothing made.
    for (args, want) in [
        (vec!["net", "create", "x", "--ipv4", "10.88.0.0/24"], "ipv4"),
        (
            vec![
                "net", "create", "x", "--mode", "bridge", "--bridge", "nosuch0",
            ],
            "no bridge nosuch0",
        ),
        (
            vec![
                "net",
                "create",
                "x",
                "--ipv4",
                "10.88.0.1/24",
                "--forward",
                "tcp:80:a:80",
                "--forward",
                "tcp:80:b:81",
            ],
            "forwards[1]",
        ),
    ] {
        let o = d.vessel(&args);
        assert_code(&o, 2);
        assert!(stderr(&o).contains(want), "{want}: {}", stderr(&o));
    }
    assert!(d.json(&["net", "list"]).as_array().unwrap().is_empty());

    d.ok(&[
        "net",
        "create",
        "lab",
        "--ipv4",
        "10.88.0.1/24",
        "--forward",
        "tcp:8080:a:80",
    ]);
    let o = d.vessel(&["net", "create", "lab2", "--ipv4", "10.88.7.1/16"]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains("overlaps network lab"),
        "{}",
        stderr(&o)
    );
    let n = d.json(&["net", "info", "lab"]);
    assert_eq!(
        (n["running"].as_bool(), n["bridge"].as_str()),
        (Some(true), Some("vsl-lab"))
    );
    assert!(ns.ok("ip -o link show vsl-lab").contains("vsl-lab"));
    assert!(ns.ok("ip -o addr show vsl-lab").contains("10.88.0.1/24"));
    assert_eq!(dnsmasqs(&net_dir), 1);

    // VMs with a NIC on it: a tap each, the VM's user's, a port of the bridge.
    d.idle_template_with_disk(&dir, 4 << 20);
    d.ok(&["vm", "create", "a", "-t", "t", "--net", "lab", "--start"]);
    d.ok(&[
        "vm",
        "create",
        "b",
        "-t",
        "t",
        "--net",
        "lab,mac=52:54:00:aa:bb:02",
        "--start",
    ]);
    let a = d.vm("a");
    let mac_a = a["spec"]["nets"][0]["mac"].as_str().unwrap().to_string();
    let ports = ns.ok("ip -o link show master vsl-lab");
    assert_eq!(ports.lines().count(), 2, "{ports}");
    let hosts = std::fs::read_to_string(net_dir.join("hosts")).unwrap();
    assert!(
        hosts.contains(&format!("{mac_a},a")) && hosts.contains("52:54:00:aa:bb:02,b"),
        "{hosts}"
    );
    let tap_owner = ns.ok(
        "cat /sys/class/net/$(ip -o link show master vsl-lab | head -1 | cut -d: -f2 | tr -d ' ' | cut -d@ -f1)/owner",
    );
    assert!(tap_owner.trim().starts_with("6430"), "{tap_owner}");
    // The host's side of b's tap has b's MAC with 0xfe first (as libvirt's), the same each
    // time the tap is made; the bridge keeps an address of its own.
    let links = ns.ok("ip -o link show master vsl-lab");
    assert!(links.contains("fe:54:00:aa:bb:02"), "{links}");
    let bridge_mac = |ns: &Netns| ns.ok("cat /sys/class/net/vsl-lab/address");
    let mac_before = bridge_mac(&ns);
    assert!(!mac_before.starts_with("fe:"), "{mac_before}");
    // Stopping the network is refused while they run; a NIC on a network that is not
    // there is refused when the VM is made.
    let o = d.vessel(&["net", "stop", "lab"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("running VMs: a, b"), "{}", stderr(&o));
    let o = d.vessel(&["vm", "create", "c", "-t", "t", "--net", "nosuch"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("nets[0]"), "{}", stderr(&o));
    // A lease for a's MAC (a namespace standing in for its guest, on the bridge): the daemon
    // sees the address, reports it, shows it, and points the port forward at it.
    let guest = Netns::new("g");
    ns.ok(&format!(
        "ip link add vg{0} type veth peer name eth0 netns {1} && ip link set vg{0} master vsl-lab up",
        std::process::id() % 10_000,
        guest.0
    ));
    let script = dir.file("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && ip addr add $ip/24 dev $interface && echo got $ip\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let got = guest.ok(&format!(
        "ip link set eth0 address {mac_a} && ip link set eth0 up && \
         busybox udhcpc -i eth0 -n -q -t 10 -T 1 -s {}",
        script.display()
    ));
    let ip = got
        .lines()
        .find_map(|l| l.strip_prefix("got "))
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let shown = d.vm("a")["addresses"][0]["ip"] == ip.as_str();
        let table = ns.ok("nft list table ip vessel_lab");
        let events = d.events();
        if shown
            && table.contains(&format!("dnat to {ip}:80"))
            && events
                .iter()
                .any(|e| e.starts_with(&format!("vm.address a {ip} on lab")))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ip}: {table}\n{events:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(guest);
    // A VM's process ends: its tap goes.
    d.ok(&["vm", "kill", "b"]);
    assert_eq!(ns.ok("ip -o link show master vsl-lab").lines().count(), 1);

    // The daemon crashes (SIGKILL) and comes back: the network as it was, once.
    let _ = d.child.kill();
    let _ = d.child.wait();
    let rules_up = ns.ok("nft list ruleset");
    drop(d);
    let d = Daemon::start_in(&dir.0, Some(&ns.0), &jail);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !(d.json(&["net", "info", "lab"])["running"] == true && d.vm("a")["state"] == "running") {
        assert!(std::time::Instant::now() < deadline, "not recovered");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(dnsmasqs(&net_dir), 1, "one dnsmasq, not two");
    assert_eq!(bridge_mac(&ns), mac_before);
    let rules_again = ns.ok("nft list ruleset");
    assert_eq!(
        rules_again.matches("vessel:lab").count(),
        rules_up.matches("vessel:lab").count(),
        "{rules_again}"
    );

    // Deleted: refused while VMs are on it; then nothing is left.
    let o = d.vessel(&["net", "delete", "lab"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("used by a, b"), "{}", stderr(&o));
    for v in ["a", "b"] {
        d.ok(&["vm", "kill", v]);
        d.ok(&["vm", "delete", v]);
    }
    d.ok(&["net", "delete", "lab"]);
    assert_eq!(ns.ok("nft list ruleset"), rules_before);
    assert!(ns.sh("ip link show vsl-lab").stdout.is_empty());
    assert_eq!(ns.ok("ip -o link").lines().count(), 1, "only lo");
    assert_eq!(dnsmasqs(&net_dir), 0);
    let events = d.events();
    for want in ["net.created lab", "net.started lab", "net.deleted lab"] {
        assert!(
            events.iter().any(|e| e.starts_with(want)),
            "{want}: {events:#?}"
        );
    }
}
