//! virtio-net on a Unix stream socket (QEMU's stream protocol, as passt speaks it: each frame
//! preceded by its 32-bit big-endian length).
//!
//! - `--net socket=PATH` against a peer in this test process that answers as a host on
//!   10.0.2.2 would (ARP replies, the guest's UDP echo), counting every frame each way: the
//!   bundled guest's echo goes through, and `vm.counters` and `vessel ctl counters` agree with
//!   the peer's count. A peer that announces a hostile frame length, and one that hangs up, are
//!   dropped cleanly while the VM runs on.
//! - `--net passt` run by an unprivileged user (uid 65534, no capabilities, through `setpriv`,
//!   with a device node of its own for /dev/kvm in a private mount namespace), in a network
//!   namespace whose only route goes nowhere: passt, started by Vessel as that user, carries
//!   the guest's UDP datagram to a server on the host's loopback (the gateway's address maps to
//!   the host) and brings a host-initiated datagram to a forwarded host port into the guest; a
//!   forwarded TCP port listens. The bundled guest has no TCP, so TCP through passt is left to a
//!   real kernel (see the report in ARCHITECTURE.md's tests section).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const GUEST_MAC: &str = "52:54:00:12:34:56";
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const PEER_IP: [u8; 4] = [10, 0, 2, 2];
const PEER_PORT: u16 = 7777;
const PEER_ENV: &str = "VESSEL_PASST_PEER";

/// What the peer saw: the length of each frame each way, and whether the connection ended.
#[derive(Debug, Default, Clone)]
struct PeerLog {
    received: Vec<usize>,
    sent: Vec<usize>,
    eof: bool,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The answer of a host on 10.0.2.2 to `f`: an ARP reply to a request for its address, or the
/// same payload back for the guest's echo datagram.
fn answer(f: &[u8]) -> Option<Vec<u8>> {
    if f.len() >= 42 && be16(f, 12) == 0x0806 && be16(f, 20) == 1 && f[38..42] == PEER_IP {
        let mut r = Vec::with_capacity(42);
        r.extend_from_slice(&f[6..12]);
        r.extend_from_slice(&PEER_MAC);
        r.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        r.extend_from_slice(&PEER_MAC);
        r.extend_from_slice(&PEER_IP);
        r.extend_from_slice(&f[22..32]);
        return Some(r);
    }
    if f.len() < 42 || be16(f, 12) != 0x0800 || f[23] != 17 || f[30..34] != PEER_IP {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    let udp = 14 + ihl;
    let len = usize::from(be16(f, udp + 4));
    let payload = f.get(udp + 8..udp + len)?;
    if be16(f, udp + 2) != PEER_PORT || !payload.starts_with(b"vessel virtio-net echo") {
        return None;
    }
    let mut r = f[..udp + len].to_vec();
    r[0..6].copy_from_slice(&f[6..12]);
    r[6..12].copy_from_slice(&PEER_MAC);
    r[26..30].copy_from_slice(&f[30..34]);
    r[30..34].copy_from_slice(&f[26..30]);
    r[24..26].copy_from_slice(&[0, 0]);
    let sum = ip_checksum(&r[14..14 + ihl]);
    r[24..26].copy_from_slice(&sum.to_be_bytes());
    r[udp..udp + 2].copy_from_slice(&f[udp + 2..udp + 4]);
    r[udp + 2..udp + 4].copy_from_slice(&f[udp..udp + 2]);
    r[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
    Some(r)
}

/// Reads one frame; `None` at the end of the stream.
fn read_frame(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).ok()?;
    Some(f)
}

/// The peer: accepts one connection and answers every frame it can, counting what goes each
/// way, until the connection ends.
fn peer(listener: UnixListener) -> Arc<Mutex<PeerLog>> {
    let log = Arc::new(Mutex::new(PeerLog::default()));
    let keep = log.clone();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        while let Some(f) = read_frame(&mut s) {
            keep.lock().unwrap().received.push(f.len());
            if let Some(r) = answer(&f) {
                let mut wire = (r.len() as u32).to_be_bytes().to_vec();
                wire.extend_from_slice(&r);
                s.write_all(&wire).unwrap();
                keep.lock().unwrap().sent.push(r.len());
            }
        }
        keep.lock().unwrap().eof = true;
    });
    log
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `sent N, received M` of the guest's virtio-net line.
fn guest_counts(line: &str) -> Option<(u64, u64)> {
    let (_, counts) = line.split_once(&format!("mac {GUEST_MAC}: sent "))?;
    let (sent, received) = counts.split_once(", received ")?;
    Some((sent.parse().ok()?, received.parse().ok()?))
}

#[test]
fn frames_flow_both_ways_and_the_counters_agree_with_the_peer() {
    assert!(have_kvm(), "/dev/kvm is required");
    let tmp = TempDir::new("net-stream");
    let sock = tmp.file("net.sock");
    let log = peer(UnixListener::bind(&sock).unwrap());
    let api = tmp.file("api.sock");
    let mut vm = soak::Console::spawn(&[
        "run",
        "--api-socket",
        api.to_str().unwrap(),
        "--net",
        &format!("socket={},mac={GUEST_MAC}", sock.display()),
        "--cmdline",
        "action=hold net=echo-peer netip=10.0.2.15 netpeer=10.0.2.2:7777 netburst=5",
    ]);
    let mut counts = None;
    loop {
        let line = vm.line(Duration::from_secs(60));
        assert!(!line.starts_with("FAIL"), "{}", vm.seen);
        counts = counts.or(guest_counts(&line));
        if line == "virtio-net echo ok" {
            break;
        }
    }
    let (sent, received) = counts.unwrap_or_else(|| panic!("{}", vm.seen));
    // An ARP request, the echo (more on a retry) and the burst of 5.
    assert!(sent >= 7, "{}", vm.seen);
    wait_until("the peer reads what the guest sent", || {
        log.lock().unwrap().received.len() as u64 == sent
    });
    let peer = log.lock().unwrap().clone();
    // Everything the peer sent (ARP replies, echoes) was before the guest's echo ok.
    assert_eq!(peer.sent.len() as u64, received, "{peer:?}");
    let client = api::client::Client::new(&api).with_timeout(Some(Duration::from_secs(30)));
    let c = client.counters().unwrap();
    let n = &c.nics[0];
    let sum = |v: &[usize]| v.iter().sum::<usize>() as u64;
    assert_eq!(
        (n.tx_packets, n.tx_bytes, n.tx_dropped),
        (sent, sum(&peer.received), 0),
        "{n:?} {peer:?}"
    );
    assert_eq!(
        (n.rx_packets, n.rx_bytes, n.rx_dropped),
        (received, sum(&peer.sent), 0),
        "{n:?} {peer:?}"
    );
    // `vessel ctl counters` says the same.
    let o = ctl(&api, &["counters"]);
    assert_code(&o, 0);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let nic = &j["nics"][0];
    for (k, v) in [
        ("tx_packets", n.tx_packets),
        ("tx_bytes", n.tx_bytes),
        ("rx_packets", n.rx_packets),
        ("rx_bytes", n.rx_bytes),
    ] {
        assert_eq!(nic[k], v, "{k}: {j}");
    }
    // vm.info names the backend.
    let info = client.info().unwrap();
    let net0 = info.devices.iter().find(|d| d.id == "net0").unwrap();
    assert_eq!(
        net0.detail.as_deref(),
        Some(format!("socket {}", sock.display()).as_str())
    );
    // The VM's end closes the connection.
    vm.stop();
    wait_until("the peer sees the connection end", || {
        log.lock().unwrap().eof
    });
}

/// Runs the bundled guest's plain network test (an ARP request and a UDP broadcast, then
/// exit 0) on a socket whose peer does `peer` with the connection; returns vessel's output.
fn run_against(peer: impl FnOnce(UnixStream) + Send + 'static) -> std::process::Output {
    assert!(have_kvm(), "/dev/kvm is required");
    let tmp = TempDir::new(&format!("net-stream-{}", rand_tag()));
    let sock = tmp.file("net.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        peer(s);
    });
    let o = vessel(&["run", "--net", &format!("socket={}", sock.display())]);
    t.join().unwrap();
    o
}

fn rand_tag() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        .into()
}

#[test]
fn a_hostile_frame_length_drops_the_connection_and_the_vm_runs_on() {
    let o = run_against(|mut s| {
        s.write_all(&u32::MAX.to_be_bytes()).unwrap();
        s.write_all(&[0xab; 64]).unwrap();
        // Vessel hangs up: nothing is read past the bad prefix, nothing waits to be sent.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    });
    assert_code(&o, 0);
    let err = stderr(&o);
    // Said once by the receiving side (and as the reason of any frame dropped after).
    assert_eq!(
        err.matches("the peer announced a frame of 4294967295 bytes (1 to 65550 are possible): connection dropped; receiving stops")
            .count(),
        1,
        "{err}"
    );
    assert!(
        stdout(&o).contains(": sent 2, received 0"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_peer_that_hangs_up_is_said_once_and_frames_are_dropped() {
    let o = run_against(drop);
    assert_code(&o, 0);
    let err = stderr(&o);
    assert_eq!(
        err.matches("the peer closed the connection; receiving stops")
            .count(),
        1,
        "{err}"
    );
    // The guest's frames after that are dropped (each said, under the log's rate limit).
    assert!(
        err.contains("transmit packet dropped: backend write: connection closed"),
        "{err}"
    );
    assert!(
        stdout(&o).contains(": sent 2, received 0"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn stream_bindings_are_checked() {
    let tmp = TempDir::new("net-stream-bad");
    let missing = tmp.file("none.sock");
    let o = vessel(&["run", "--net", &format!("socket={}", missing.display())]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains(&format!("cannot connect to {}", missing.display())),
        "{}",
        stderr(&o)
    );
    for (spec, want) in [
        ("socket=/s,queues=2", "one queue pair"),
        ("socket=/s,forward=tcp:80", "forward= is for passt"),
        ("passt,forward=tcp:0", "is not a forward"),
        ("passt,tap=t0", "give one of tap=NAME, socket=PATH or passt"),
    ] {
        let o = vessel(&["run", "--net", spec]);
        assert_code(&o, 2);
        assert!(
            stderr(&o).contains(&format!("invalid --net '{spec}'")) && stderr(&o).contains(want),
            "{spec}: {}",
            stderr(&o)
        );
    }
    // The flags' document: an absolute socket, passt with its forwards (not started).
    let o = Command::new(VESSEL)
        .current_dir(&tmp.0)
        .args([
            "run",
            "--print-config",
            "--net",
            "socket=rel.sock",
            "--net",
            "passt,forward=tcp:8080:80,forward=udp:5353",
        ])
        .output()
        .unwrap();
    assert_code(&o, 0);
    let d: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let nets = &d["bindings"]["nets"];
    assert_eq!(
        nets[0]["socket"],
        tmp.0.join("rel.sock").display().to_string(),
        "{d}"
    );
    assert_eq!(
        nets[1],
        serde_json::json!({"passt": {"forwards": [
            {"protocol": "tcp", "host": 8080, "guest": 80},
            {"protocol": "udp", "host": 5353, "guest": 5353}
        ]}})
    );
    assert!(d["bindings"].get("taps").is_none(), "{d}");
    // A document: the socket must be absolute, named by field.
    let doc = tmp.file("vm.json");
    std::fs::write(
        &doc,
        r#"{"spec": {"nets": [{}]}, "bindings": {"nets": [{"socket": "rel.sock"}]}}"#,
    )
    .unwrap();
    let o = vessel(&["run", "--config", doc.to_str().unwrap()]);
    assert_code(&o, 2);
    assert!(
        stderr(&o)
            .contains("bindings.nets[0].socket: rel.sock: the socket's path must be absolute"),
        "{}",
        stderr(&o)
    );
}

// Rootless, with passt.

/// A network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("vessel-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        run_ok("ip", &["netns", "add", &name]);
        let ns = NetNs(name);
        ns.ip("link set lo up");
        ns
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

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
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run_ok(program: &str, args: &[&str]) {
    let o = Command::new(program).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `/proc/PID/status`'s line `key`, without the key.
fn proc_status(pid: u32, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

/// The children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| proc_status(*p, "PPid:").as_deref() == Some(pid.to_string().as_str()))
        .collect()
}

const UDP_FORWARD: u16 = 7600;
const TCP_FORWARD: u16 = 7601;

/// Not a test on its own: the host side of the passt test, run inside its network namespace
/// with `VESSEL_PASST_PEER` set. A UDP server on the loopback at 7777: for each datagram it
/// says where it came from, checks that the forwarded TCP port accepts a connection, and sends
/// the payload to the forwarded UDP port (not back to the sender), so that the guest sees it
/// only if the forward brings it in.
#[test]
fn passt_peer_helper() {
    if std::env::var(PEER_ENV).is_err() {
        return;
    }
    let sock = std::net::UdpSocket::bind(("127.0.0.1", PEER_PORT)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    println!("peer-ready");
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    while start.elapsed() < Duration::from_secs(120) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        println!(
            "datagram from {from}: {}",
            String::from_utf8_lossy(&buf[..n])
        );
        let to = std::net::SocketAddr::from(([127, 0, 0, 1], TCP_FORWARD));
        match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(_) => println!("tcp forward: connected"),
            Err(e) => println!("tcp forward: {e}"),
        }
        match sock.send_to(&buf[..n], ("127.0.0.1", UDP_FORWARD)) {
            Ok(_) => println!("sent to the udp forward"),
            Err(e) => println!("udp forward: {e}"),
        }
    }
}

/// A device node for /dev/kvm that `uid` may open, in `dir`.
fn kvm_node_for(dir: &std::path::Path, uid: u32) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata("/dev/kvm")
        .map_err(|e| e.to_string())?
        .rdev();
    let node = dir.join("kvm");
    let o = Command::new("mknod")
        .arg(&node)
        .arg("c")
        .arg(((rdev >> 8) & 0xfff).to_string())
        .arg((rdev & 0xff).to_string())
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    std::os::unix::fs::chown(&node, Some(uid), Some(uid)).map_err(|e| e.to_string())?;
    Ok(node)
}

#[test]
fn an_unprivileged_vm_reaches_the_host_and_a_forwarded_port_through_passt() {
    let root = proc_status(std::process::id(), "Uid:")
        .is_some_and(|u| u.split_whitespace().nth(1) == Some("0"));
    if !(root && have_kvm() && have("ip", "-V") && have("setpriv", "--version")) {
        eprintln!("skipped: needs root (to set up the unprivileged user's network namespace and /dev/kvm), /dev/kvm, iproute2 and setpriv");
        return;
    }
    assert!(
        have("passt", "--version"),
        "passt is not installed (scripts/setup --tests installs it)"
    );
    const NOBODY: u32 = 65534;
    let tmp = TempDir::new("net-passt");
    std::os::unix::fs::chown(&tmp.0, Some(NOBODY), Some(NOBODY)).unwrap();
    let kvm = match kvm_node_for(&tmp.0, NOBODY) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipped: cannot make a /dev/kvm node for uid {NOBODY} here: {e}");
            return;
        }
    };
    // The namespace's only way out is a veth to nowhere: passt takes its address and default
    // gateway, and nothing leaves the namespace.
    let ns = NetNs::new("passt");
    ns.ip("link add v0 type veth peer name v1");
    ns.ip("addr add 10.0.2.15/24 dev v0");
    ns.ip("link set v0 up");
    ns.ip("link set v1 up");
    ns.ip("route add default via 10.0.2.2");
    let exe = std::env::current_exe().unwrap();
    let mut helper = ns
        .cmd(exe.to_str().unwrap())
        .args([
            "passt_peer_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PEER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("peer-ready"))),
        "the peer did not start"
    );
    let peer_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let keep = peer_lines.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            keep.lock().unwrap().push(l);
        }
    });
    let api = tmp.file("api.sock");
    // As uid 65534 with no capabilities; its /dev/kvm is the node made for it, bound over the
    // real one in a mount namespace of its own. passt's directory goes in TMPDIR.
    let script = format!(
        "mount --bind {kvm} /dev/kvm && exec setpriv --reuid={NOBODY} --regid={NOBODY} \
         --clear-groups --inh-caps=-all --bounding-set=-all -- {VESSEL} run --api-socket {api} \
         --net passt,mac={GUEST_MAC},forward=udp:{UDP_FORWARD}:49152,forward=tcp:{TCP_FORWARD}:80 \
         --cmdline 'action=hold net=echo-peer netip=10.0.2.15 netpeer=10.0.2.2:{PEER_PORT}'",
        kvm = kvm.display(),
        api = api.display(),
    );
    let tmpdir = format!("TMPDIR={}", tmp.0.display());
    let mut vm = soak::Console::spawn_command(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        "env",
        "-u",
        "XDG_RUNTIME_DIR",
        &tmpdir,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let mut counts = None;
    loop {
        let line = vm.line(Duration::from_secs(60));
        assert!(
            !line.starts_with("FAIL"),
            "{}\npeer: {:?}",
            vm.seen,
            peer_lines.lock().unwrap()
        );
        counts = counts.or(guest_counts(&line));
        if line == "virtio-net echo ok" {
            break;
        }
    }
    // Every exec along the way kept the pid: it is vessel's.
    let pid = vm.child.id();
    assert_eq!(
        proc_status(pid, "Uid:").as_deref(),
        Some("65534\t65534\t65534\t65534"),
        "vessel's uids"
    );
    assert_eq!(
        proc_status(pid, "CapEff:").as_deref(),
        Some("0000000000000000")
    );
    let passt = children(pid);
    assert_eq!(passt.len(), 1, "vessel's children: {passt:?}");
    let passt = passt[0];
    assert_eq!(
        proc_status(passt, "Uid:").as_deref(),
        Some("65534\t65534\t65534\t65534"),
        "passt's uids"
    );
    let cmdline = std::fs::read_to_string(format!("/proc/{passt}/cmdline"))
        .unwrap()
        .replace('\0', " ");
    assert!(
        cmdline.contains("--one-off") && cmdline.contains(&format!("{UDP_FORWARD}:49152")),
        "{cmdline}"
    );
    let peer = peer_lines.lock().unwrap().clone();
    // The guest's datagram to its gateway reached the host's loopback ...
    assert!(
        peer.iter()
            .any(|l| l.starts_with("datagram from 127.0.0.1:")
                && l.ends_with("vessel virtio-net echo #0")),
        "{peer:?}"
    );
    // ... the forwarded TCP port listened, and the answer came in through the UDP forward
    // (the guest's echo ok).
    assert!(
        peer.contains(&"tcp forward: connected".to_string()),
        "{peer:?}"
    );
    assert!(
        peer.contains(&"sent to the udp forward".to_string()),
        "{peer:?}"
    );
    let (sent, received) = counts.unwrap_or_else(|| panic!("{}", vm.seen));
    let c = api::client::Client::new(&api)
        .with_timeout(Some(Duration::from_secs(30)))
        .counters()
        .unwrap();
    let n = &c.nics[0];
    assert!(n.tx_packets >= sent && sent >= 2, "{n:?}");
    assert!(n.rx_packets >= received && received >= 2, "{n:?}");
    assert_eq!((n.tx_dropped, n.rx_dropped), (0, 0), "{n:?}");
    // passt's private directory, in TMPDIR, while it runs.
    let passt_dirs = || -> Vec<String> {
        std::fs::read_dir(&tmp.0)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("vessel-passt-"))
            .collect()
    };
    assert_eq!(passt_dirs().len(), 1, "{:?}", passt_dirs());
    vm.stop();
    // passt went with the VM (a zombie at most until it is reaped), and so did its directory.
    wait_until("passt ends", || {
        proc_status(passt, "State:").is_none_or(|s| s.starts_with('Z'))
    });
    assert!(passt_dirs().is_empty(), "{:?}", passt_dirs());
    let _ = helper.kill();
    let _ = helper.wait();
}

// Restores and migrations: the NIC binds to the socket the restore or the target gives.

/// A peer that takes every connection on `listener` (each answered as [`peer`] does);
/// returns how many it took so far.
fn accepting_peer(listener: UnixListener) -> Arc<Mutex<usize>> {
    let count = Arc::new(Mutex::new(0usize));
    let keep = count.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            *keep.lock().unwrap() += 1;
            std::thread::spawn(move || {
                while let Some(f) = read_frame(&mut s) {
                    if let Some(r) = answer(&f) {
                        let mut wire = (r.len() as u32).to_be_bytes().to_vec();
                        wire.extend_from_slice(&r);
                        if s.write_all(&wire).is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    count
}

fn net0_detail(api: &std::path::Path) -> String {
    let info = api::client::Client::new(api)
        .with_timeout(Some(Duration::from_secs(30)))
        .info()
        .unwrap();
    let net0 = info.devices.into_iter().find(|d| d.id == "net0").unwrap();
    net0.detail.unwrap_or_default()
}

#[test]
fn a_restore_and_a_migration_connect_to_the_socket_they_are_given() {
    use common::migration::{pair_in, printed_token, wait_phase, CPUS};
    assert!(have_kvm(), "/dev/kvm is required");
    let tmp = TempDir::new("net-stream-moves");
    let socks: Vec<_> = ["a.sock", "b.sock", "c.sock"]
        .iter()
        .map(|n| tmp.file(n))
        .collect();
    let peers: Vec<_> = socks
        .iter()
        .map(|s| accepting_peer(UnixListener::bind(s).unwrap()))
        .collect();
    let taken = |i: usize| *peers[i].lock().unwrap();
    let snap = tmp.file("snap");
    let snap_arg = snap.to_str().unwrap().to_string();
    let net_a = format!("socket={},mac={GUEST_MAC}", socks[0].display());
    let mut p = pair_in(
        tmp,
        &[],
        &[],
        "128M",
        "action=soak soakms=50",
        None,
        &["--net", &net_a],
    );
    p.source.soak_lines(CPUS, 1);
    assert_eq!(taken(0), 1);
    assert_code(&ctl(&p.src_api, &["snapshot", "--dir", &snap_arg]), 0);

    // A restore with a new socket connects there; one without connects to the saved one.
    let restore_api = p.tmp.file("restored.sock");
    let restore = |net: Option<String>| {
        let mut args = vec![
            "run".to_string(),
            "--restore".into(),
            snap_arg.clone(),
            "--api-socket".into(),
            restore_api.display().to_string(),
        ];
        if let Some(n) = net {
            args.extend(["--net".to_string(), n]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut vm = soak::Console::spawn(&refs);
        vm.soak_lines(CPUS, 2);
        let detail = net0_detail(&restore_api);
        assert_eq!(vm.stop(), Some(143));
        detail
    };
    let detail = restore(Some(format!("socket={}", socks[1].display())));
    assert_eq!(detail, format!("socket {}", socks[1].display()));
    assert_eq!((taken(0), taken(1)), (1, 1));
    let detail = restore(None);
    assert_eq!(detail, format!("socket {}", socks[0].display()));
    assert_eq!(taken(0), 2);
    // A stream device does not move to a tap: its guest negotiated no offloads.
    let o = vessel(&["run", "--restore", &snap_arg, "--net", "tap=vtnever0"]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains("network device 0 was on a stream socket"),
        "{}",
        stderr(&o)
    );

    // A migration target names its own socket (a tap is refused before any memory moves);
    // the source runs on after a refusal.
    let listen = format!("unix:{}", p.tmp.file("mig.sock").display());
    let o = ctl(
        &p.dst_api,
        &[
            "migrate",
            "receive",
            "--listen",
            &listen,
            "--net",
            "tap=vtnever0",
        ],
    );
    assert_code(&o, 0);
    let token = printed_token(&o);
    let o = ctl(
        &p.src_api,
        &["migrate", "send", "--token", &token, "--to", &listen],
    );
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));
    let said = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        said.contains("nets[0]") && said.contains("offloads"),
        "{said}"
    );
    p.source.soak_lines(CPUS, 1);
    // The target is free again once its side of the refusal is over.
    wait_phase(&p.dst_api, "failed");
    let o = ctl(
        &p.dst_api,
        &[
            "migrate",
            "receive",
            "--listen",
            &listen,
            "--net",
            &format!("socket={}", socks[2].display()),
        ],
    );
    assert_code(&o, 0);
    let token = printed_token(&o);
    let o = ctl(
        &p.src_api,
        &["migrate", "send", "--token", &token, "--to", &listen],
    );
    assert_code(&o, 0);
    assert_eq!(p.source.child.wait().unwrap().code(), Some(0));
    p.target.soak_lines(CPUS, 2);
    assert_eq!(taken(2), 1);
    assert_eq!(
        net0_detail(&p.dst_api),
        format!("socket {}", socks[2].display())
    );
    assert_eq!(p.target.stop(), Some(143));
}
