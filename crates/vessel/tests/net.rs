//! virtio-net on the direct test host: the bundled guest's ring-3 driver against Vessel's
//! virtio-net device on a tap, with a UDP echo server on the host side.
//!
//! Every test works in a network namespace of its own (`ip netns add`): the tap, its address
//! 10.0.2.2/24, the echo server and Vessel all live there, so the host's networking is never
//! touched and the tests run in parallel. The echo server is this test binary itself, run again
//! inside the namespace (`ip netns exec`) as the `echo_server_helper` test with
//! `VESSEL_NET_ECHO` set. Guards delete the namespaces (and with them the taps) even when a
//! test fails. Needs root, `/dev/net/tun` and iproute2; skipped otherwise. One test reads the
//! device's counters (`vm.counters`) back against what the guest says it sent and received.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const GUEST_MAC: &str = "52:54:00:12:34:56";
const ECHO_ENV: &str = "VESSEL_NET_ECHO";

/// Whether this host can run these tests.
fn can_run() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let ok = root
        && have_kvm()
        && std::path::Path::new("/dev/net/tun").exists()
        && Command::new("ip")
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !ok {
        eprintln!("skipped: needs root, /dev/kvm, /dev/net/tun and iproute2");
    }
    ok
}

/// A network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("vessel-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        let ns = NetNs(name);
        ns.ip("link set lo up");
        ns
    }

    /// A command run inside the namespace.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// `ip ARGS` inside the namespace.
    fn ip(&self, args: &str) {
        let o = self
            .cmd("ip")
            .args(args.split_whitespace())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// A tap with the host side's 10.0.2.2/24, up.
    fn tap(&self, name: &str, extra: &str) {
        self.ip(&format!("tuntap add dev {name} mode tap {extra}"));
        self.ip(&format!("addr add 10.0.2.2/24 dev {name}"));
        self.ip(&format!("link set {name} up"));
    }

    /// The UDP echo server on `addr`, once it is listening.
    fn echo_server(&self, addr: &str) -> Echo {
        let exe = std::env::current_exe().unwrap();
        let mut child = self
            .cmd(exe.to_str().unwrap())
            .args([
                "echo_server_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ECHO_ENV, addr)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.any(|l| l.map(|l| l.contains("echo-ready")).unwrap_or(false));
        assert!(ready, "echo server did not start");
        // Keep draining its output so that it never blocks on a full pipe.
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                keep.lock().unwrap().push(l);
            }
        });
        Echo(child, log)
    }

    /// `vessel ARGS` inside the namespace, with a time limit.
    fn vessel(&self, args: &[&str]) -> Output {
        let child = self
            .cmd(VESSEL)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if rx.recv_timeout(Duration::from_secs(60)).is_err() {
                // `ip netns exec` execs vessel: the pid is vessel's.
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = tx.send(());
        let _ = watchdog.join();
        out
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces, taps included.
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The echo server process, killed on drop, and the lines it printed.
struct Echo(Child, Arc<Mutex<Vec<String>>>);

impl Echo {
    /// When (ms since the server started) each datagram whose payload starts with `prefix`
    /// arrived, in order.
    fn arrivals(&self, prefix: &str) -> Vec<u64> {
        self.1
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                // "echo N bytes from ADDR at MS ms: PAYLOAD"
                let (head, payload) = l.split_once(" ms: ")?;
                let ms = head.rsplit(' ').next()?.parse().ok()?;
                payload.starts_with(prefix).then_some(ms)
            })
            .collect()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Not a test on its own: the UDP echo server, when run with `VESSEL_NET_ECHO=ADDR:PORT` (inside
/// a test's namespace). Without it, it returns at once.
#[test]
fn echo_server_helper() {
    let Ok(addr) = std::env::var(ECHO_ENV) else {
        return;
    };
    let sock = std::net::UdpSocket::bind(&addr).expect("bind the echo address");
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    println!("echo-ready {addr}");
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    // Bounded, in case the parent test dies without killing it.
    while start.elapsed() < Duration::from_secs(120) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            println!(
                "echo {n} bytes from {from} at {} ms: {}",
                start.elapsed().as_millis(),
                String::from_utf8_lossy(&buf[..n])
            );
            let _ = sock.send_to(&buf[..n], from);
        }
    }
}

fn tap_name(tag: &str) -> String {
    // At most 15 characters.
    format!("vt{}{tag}", std::process::id() % 1_000_000)
}

fn assert_echo(o: &Output) {
    assert_code(o, 0);
    let out = stdout(o);
    assert!(
        out.contains(&format!("virtio-net mmio@0xd0000000 mac {GUEST_MAC}: sent")),
        "{out}\n{}",
        stderr(o)
    );
    assert!(out.contains("virtio-net echo ok"), "{out}\n{}", stderr(o));
}

#[test]
fn udp_echo_through_a_tap() {
    if !can_run() {
        return;
    }
    let ns = NetNs::new("echo");
    let tap = tap_name("e");
    ns.tap(&tap, "");
    let _echo = ns.echo_server("10.0.2.2:7777");
    let o = ns.vessel(&[
        "run",
        "--net",
        &format!("tap={tap},mac={GUEST_MAC}"),
        "--cmdline",
        "net=echo-peer netip=10.0.2.15 netpeer=10.0.2.2:7777",
    ]);
    assert_echo(&o);
}

#[test]
fn udp_echo_through_a_multi_queue_tap() {
    // The guest drives one queue pair of four: the others' tap queues are detached, so the
    // kernel delivers the reply where the guest reads.
    if !can_run() {
        return;
    }
    let ns = NetNs::new("mq");
    let tap = tap_name("m");
    ns.tap(&tap, "multi_queue");
    let _echo = ns.echo_server("10.0.2.2:7000");
    for _ in 0..2 {
        let o = ns.vessel(&[
            "run",
            "--net",
            &format!("tap={tap},mac={GUEST_MAC},queues=4"),
            "--cmdline",
            "net=echo-peer netip=10.0.2.15 netpeer=10.0.2.2:7000",
        ]);
        assert_echo(&o);
    }
}

#[test]
fn a_transmit_packet_limit_paces_the_guest() {
    // 20 packets per second, the bucket full at the start: of 60 datagrams sent back to back,
    // the first may leave with the 19 tokens left at most, the other 40 need 2 s of refill.
    if !can_run() {
        return;
    }
    let ns = NetNs::new("rl");
    let tap = tap_name("r");
    ns.tap(&tap, "");
    let echo = ns.echo_server("10.0.2.2:7100");
    let o = ns.vessel(&[
        "run",
        "--net",
        &format!("tap={tap},mac={GUEST_MAC},tx_pps=20,rx_bw=1M"),
        "--cmdline",
        "net=echo-peer netip=10.0.2.15 netpeer=10.0.2.2:7100 netburst=60",
    ]);
    assert_echo(&o);
    let at = echo.arrivals("vessel virtio-net burst #");
    assert_eq!(at.len(), 60, "{:?}\n{}", at, stderr(&o));
    let took = at[59] - at[0];
    // 2 s less some slack for how late the first datagram may reach the server.
    assert!(
        took >= 1800,
        "60 datagrams at 20/s arrived within {took} ms"
    );
}

#[test]
fn vessel_creates_a_missing_tap() {
    if !can_run() {
        return;
    }
    let ns = NetNs::new("new");
    let tap = tap_name("n");
    // No echo peer: the guest sends an ARP request and a UDP broadcast and counts frames.
    let o = ns.vessel(&["run", "--net", &format!("tap={tap}")]);
    assert_code(&o, 0);
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("virtio-net mmio@0xd0000000 mac "))
        .unwrap_or_else(|| panic!("{out}"));
    // A random locally administered MAC: second hex digit 2, 6, a or e.
    let mac = &line["virtio-net mmio@0xd0000000 mac ".len()..][..17];
    assert!(
        matches!(mac.as_bytes()[1], b'2' | b'6' | b'a' | b'e'),
        "{line}"
    );
    assert!(line.contains(": sent 2,"), "{line}");
    // The tap was Vessel's own (not persistent): it went away with it.
    let o = ns.cmd("ip").args(["link", "show", &tap]).output().unwrap();
    assert!(!o.status.success(), "tap {tap} still exists");
}

#[test]
fn bad_net_options_are_refused() {
    for (spec, want) in [
        (
            "mac=52:54:00:12:34:56",
            "one of tap=NAME, socket=PATH or passt is required",
        ),
        ("tap=a/b", "tap takes an interface name"),
        ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=t0,queues=99", "queues takes a number from 1 to 16"),
        (
            "tap=t0,tx_pps=0",
            "tx_pps takes a number of packets above zero",
        ),
        (
            "tap=t0,rx_bw=fast",
            "rx_bw takes a number of bytes above zero",
        ),
        ("tap=t0,rx_bw_burst=1M", "rx_bw_burst needs rx_bw"),
    ] {
        let o = vessel(&["run", "--net", spec]);
        assert_code(&o, 2);
        let err = stderr(&o);
        assert!(
            err.contains(&format!("invalid --net '{spec}'")) && err.contains(want),
            "{spec}: {err}"
        );
    }
}

#[test]
fn counters_count_the_frames_each_way_and_the_disk() {
    if !can_run() {
        return;
    }
    let ns = NetNs::new("cnt");
    let tap = tap_name("c");
    ns.tap(&tap, "");
    let _echo = ns.echo_server("10.0.2.2:7300");
    let tmp = TempDir::new("net-counters");
    let disk = tmp.file("disk.raw");
    raw_disk(&disk, 1 << 20);
    let socket = tmp.file("api.sock");
    // The guest tests its disk, then its NIC (ARP, an echo, 5 more datagrams), then holds.
    let mut vm = common::soak::Console::spawn_command(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        VESSEL,
        "run",
        "--api-socket",
        socket.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
        "--net",
        &format!("tap={tap},mac={GUEST_MAC}"),
        "--cmdline",
        "action=hold net=echo-peer netip=10.0.2.15 netpeer=10.0.2.2:7300 netburst=5",
    ]);
    let mut sent_received = None;
    loop {
        let line = vm.line(Duration::from_secs(60));
        assert!(!line.starts_with("FAIL"), "{}", vm.seen);
        if let Some((_, counts)) = line.split_once(&format!("mac {GUEST_MAC}: sent ")) {
            // "N, received M"
            let (sent, received) = counts.split_once(", received ").unwrap();
            sent_received = Some((
                sent.parse::<u64>().unwrap(),
                received.parse::<u64>().unwrap(),
            ));
        }
        if line == "virtio-net echo ok" {
            break;
        }
    }
    let (sent, received) = sent_received.unwrap_or_else(|| panic!("{}", vm.seen));
    let api = api::client::Client::new(&socket).with_timeout(Some(Duration::from_secs(30)));
    let c = api.counters().unwrap();
    assert_eq!(c.nics.len(), 1, "{c:?}");
    let n = &c.nics[0];
    assert_eq!((n.id.as_str(), n.index), ("net0", 0), "{n:?}");
    // Every chain the guest saw used went to the tap (nothing dropped): an ARP request, the
    // echo datagram (more on a retry) and the 5 of the burst at least, each padded to 60
    // bytes and at most a full Ethernet frame.
    assert_eq!(
        (n.tx_packets, n.tx_dropped),
        (sent, 0),
        "guest sent {sent}: {n:?}"
    );
    assert!(n.tx_packets >= 7, "{n:?}");
    assert!(
        n.tx_bytes >= 60 * n.tx_packets && n.tx_bytes <= 1514 * n.tx_packets,
        "{n:?}"
    );
    // The guest took every frame it counted from the used ring (the peer's ARP reply and the
    // echo at least); more may have come after its test.
    assert!(
        n.rx_packets >= received && received >= 2,
        "guest received {received}: {n:?}"
    );
    assert!(
        n.rx_bytes >= 42 * n.rx_packets && n.rx_bytes <= 1514 * n.rx_packets,
        "{n:?}"
    );
    assert_eq!(n.rx_dropped, 0, "{n:?}");
    // The disk's test ran before: 8 sectors and the last one written, read back, flushed.
    assert_eq!(c.disks.len(), 1, "{c:?}");
    let d = &c.disks[0];
    assert_eq!(
        (
            d.id.as_str(),
            d.read_ops,
            d.read_bytes,
            d.write_ops,
            d.write_bytes,
            d.flush_ops
        ),
        ("block0", 2, 4608, 2, 4608, 1),
        "{d:?}"
    );
    assert_eq!(d.errors, 0, "{d:?}");
    assert_eq!(c.vcpus.len(), 1, "{c:?}");
    assert!(
        c.vcpus[0].mmio_exits > 0 && c.vcpus[0].io_exits > 0,
        "{c:?}"
    );
    // Held: nothing goes down on a second read.
    std::thread::sleep(Duration::from_millis(200));
    let again = api.counters().unwrap();
    assert!(again.vcpus[0].exits >= c.vcpus[0].exits, "{again:?}");
    let (n2, d2) = (&again.nics[0], &again.disks[0]);
    assert!(
        n2.rx_packets >= n.rx_packets && n2.tx_packets == n.tx_packets,
        "{n2:?}"
    );
    assert_eq!(d2, d, "the disk is idle");
}
