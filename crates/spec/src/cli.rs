//! The command line's device options (`--disk`, `--net`, `--vsock`, `--balloon`, ...): each
//! parses into its part of a [`VmSpec`](crate::vm::VmSpec) and, where it names a host file,
//! tap or socket, its [`HostBindings`](crate::bindings::HostBindings) part. Ranges are the
//! spec's own checks, so a flag and a spec file refuse the same values.

use std::path::PathBuf;

use crate::bindings::{check_tap, Console, NetBinding, Passt, PortForward};
use crate::rate::{RateLimiterConfig, TokenBucketConfig};
use crate::vm::{
    check_cid, check_queues, check_serial, Balloon, BootProtocol, Disk, Nic, OnReboot, Transport,
    Vsock, MAX_DISK_QUEUES, MAX_NET_QUEUE_PAIRS,
};

/// An option value that cannot be parsed: each says what is wrong and what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix (plain numbers are MiB)")]
    BadSize(String),
    #[error("invalid --on-reboot '{0}': expected exit or restart")]
    BadOnReboot(String),
    #[error("invalid --console '{0}': expected stdio, off, file:PATH or socket:PATH")]
    BadConsole(String),
    #[error("invalid --boot-protocol '{0}': expected auto, pvh or linux64")]
    BadProtocol(String),
    #[error("invalid --disk '{spec}': {why}")]
    BadDisk { spec: String, why: String },
    #[error("invalid --net '{spec}': {why}")]
    BadNet { spec: String, why: String },
    #[error("invalid --transport '{0}': expected mmio or pci")]
    BadTransport(String),
    #[error("invalid --vsock '{spec}': {why}")]
    BadVsock { spec: String, why: String },
    #[error("invalid --virtio-console '{0}': expected stdio, off, file:PATH or socket:PATH")]
    BadVirtioConsole(String),
    #[error("invalid --balloon '{spec}': {why}")]
    BadBalloon { spec: String, why: String },
    #[error("invalid --thp '{0}': expected on or off")]
    BadThp(String),
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses an on/off flag such as `--thp`.
pub fn on_off(s: &str) -> Result<bool, ArgError> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(ArgError::BadThp(s.to_string())),
    }
}

/// Parses a rate or a burst: a number, with an optional binary unit; a plain number is taken
/// as is (bytes or operations). Zero is refused.
fn parse_rate(v: &str) -> Option<u64> {
    let n = crate::size::parse(v, crate::size::Plain::Bytes).ok()?;
    (n > 0).then_some(n)
}

/// Parses a memory size: `512M`, `2G`, `1.5G`, `4GiB`; a plain number is MiB (as in QEMU).
pub fn memory(s: &str) -> Result<u64, ArgError> {
    crate::size::parse(s, crate::size::Plain::MiB).map_err(|_| ArgError::BadSize(s.to_string()))
}

/// Parses a `--disk` value: `path=FILE[,readonly=on|off][,cache=writeback|none|unsafe]
/// [,serial=ID][,queues=N][,engine=auto|io_uring|threads|sync][,bw=BYTES/s][,iops=N]
/// [,bw_burst=BYTES][,iops_burst=N]`; a bare `FILE` is accepted as the path.
pub fn disk(spec: &str) -> Result<(Disk, PathBuf), ArgError> {
    let bad = |why: &str| ArgError::BadDisk {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let mut disk = Disk::default();
    let mut path = PathBuf::new();
    let (mut bw, mut iops, mut bw_burst, mut iops_burst) = (None, None, None, None);
    for (i, item) in spec.split(',').enumerate() {
        match item.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = p.into(),
            Some(("readonly" | "ro", v)) => {
                disk.read_only = parse_bool(v).ok_or_else(|| bad("readonly takes on or off"))?
            }
            Some(("cache", v)) => disk.cache = v.parse().map_err(|e: String| bad(&e))?,
            Some(("serial", v)) => {
                check_serial(v).map_err(|e| bad(&e))?;
                disk.serial = Some(v.into());
            }
            Some(("queues", v)) => {
                let q = v.parse().unwrap_or(0);
                check_queues(q, MAX_DISK_QUEUES).map_err(|e| bad(&e))?;
                disk.queues = q;
            }
            Some(("engine", v)) => disk.engine = v.parse().map_err(|e: String| bad(&e))?,
            Some((key @ ("bw" | "iops" | "bw_burst" | "iops_burst"), v)) => {
                let n = parse_rate(v).ok_or_else(|| {
                    bad(&format!(
                        "{key} takes a number above 0, with an optional K, M or G suffix"
                    ))
                })?;
                *match key {
                    "bw" => &mut bw,
                    "iops" => &mut iops,
                    "bw_burst" => &mut bw_burst,
                    _ => &mut iops_burst,
                } = Some(n);
            }
            None if i == 0 && !item.is_empty() => path = item.into(),
            _ => return Err(bad(&format!("unknown or empty option '{item}'"))),
        }
    }
    if path.as_os_str().is_empty() {
        return Err(bad("path= is required"));
    }
    if bw_burst.is_some() && bw.is_none() {
        return Err(bad("bw_burst needs bw"));
    }
    if iops_burst.is_some() && iops.is_none() {
        return Err(bad("iops_burst needs iops"));
    }
    disk.rate_limit = RateLimiterConfig {
        bandwidth: bw.map(|r| TokenBucketConfig::per_second(r, bw_burst.unwrap_or(0))),
        ops: iops.map(|r| TokenBucketConfig::per_second(r, iops_burst.unwrap_or(0))),
    };
    Ok((disk, path))
}

/// Parses a `--vsock` value: `cid=N,socket=PATH`.
pub fn vsock(spec: &str) -> Result<(Vsock, PathBuf), ArgError> {
    let bad = |why: &str| ArgError::BadVsock {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let (mut cid, mut socket) = (None, None);
    for item in spec.split(',') {
        match item.split_once('=') {
            Some(("cid", v)) => {
                let c = v.parse::<u64>().unwrap_or(0);
                check_cid(c).map_err(|e| bad(&e))?;
                cid = Some(c);
            }
            Some(("socket" | "uds_path" | "path", p)) if !p.is_empty() => {
                socket = Some(PathBuf::from(p))
            }
            _ => return Err(bad(&format!("unknown or empty option '{item}'"))),
        }
    }
    Ok((
        Vsock {
            cid: cid.ok_or_else(|| bad("cid= is required"))?,
        },
        socket.ok_or_else(|| bad("socket= is required"))?,
    ))
}

/// Parses a `--console` value.
pub fn console(s: &str) -> Result<Console, ArgError> {
    s.parse().map_err(|_| ArgError::BadConsole(s.to_string()))
}

/// Parses a `--virtio-console` value (the same forms as `--console`).
pub fn virtio_console(s: &str) -> Result<Console, ArgError> {
    s.parse()
        .map_err(|_| ArgError::BadVirtioConsole(s.to_string()))
}

/// Parses a `--balloon` value: `[size=SIZE][,stats=on][,free-page-reporting=on]
/// [,deflate-on-oom=on]` (empty: a balloon of size 0 with no options).
pub fn balloon(spec: &str) -> Result<Balloon, ArgError> {
    let bad = |why: &str| ArgError::BadBalloon {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let mut b = Balloon::default();
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let flag = |v: &str, name: &str| {
            parse_bool(v).ok_or_else(|| bad(&format!("{name} takes on or off")))
        };
        match item.split_once('=') {
            Some(("size", v)) => {
                b.size = memory(v).map_err(|_| bad("size takes a size such as 512M"))?
            }
            Some(("stats", v)) => b.stats = flag(v, "stats")?,
            Some(("free-page-reporting" | "free_page_reporting", v)) => {
                b.free_page_reporting = flag(v, "free-page-reporting")?
            }
            Some(("deflate-on-oom" | "deflate_on_oom", v)) => {
                b.deflate_on_oom = flag(v, "deflate-on-oom")?
            }
            _ => return Err(bad(&format!("unknown option '{item}'"))),
        }
    }
    Ok(b)
}

/// The rate-limit options of `--net`: `{rx,tx}_{bw,pps}[_burst]`.
const RATE_OPTIONS: [&str; 8] = [
    "rx_bw",
    "rx_pps",
    "tx_bw",
    "tx_pps",
    "rx_bw_burst",
    "rx_pps_burst",
    "tx_bw_burst",
    "tx_pps_burst",
];

/// The limiters from the rate options given (indexed as [`RATE_OPTIONS`]).
fn rate_limiters(
    rates: &[Option<u64>; 8],
) -> Result<(RateLimiterConfig, RateLimiterConfig), String> {
    let bucket = |i: usize| -> Result<Option<TokenBucketConfig>, String> {
        match (rates[i], rates[i + 4]) {
            (Some(rate), burst) => Ok(Some(TokenBucketConfig::per_second(
                rate,
                burst.unwrap_or(0),
            ))),
            (None, Some(_)) => Err(format!("{} needs {}", RATE_OPTIONS[i + 4], RATE_OPTIONS[i])),
            (None, None) => Ok(None),
        }
    };
    Ok((
        RateLimiterConfig {
            bandwidth: bucket(0)?,
            ops: bucket(1)?,
        },
        RateLimiterConfig {
            bandwidth: bucket(2)?,
            ops: bucket(3)?,
        },
    ))
}

/// Parses a `--net` value: the backend, one of `tap=NAME` (a tap interface), `socket=PATH` (a
/// listening Unix stream socket speaking QEMU's stream protocol, such as passt's) or `passt`
/// (Vessel starts passt, with `forward=tcp|udp:HOSTPORT[:GUESTPORT]` repeatable), then
/// `[,mac=AA:BB:CC:DD:EE:FF][,queues=N]` (queues on a tap only) and rate limits
/// `[,tx_bw=BYTES][,tx_pps=N][,rx_bw=BYTES][,rx_pps=N]` per second, each with an optional
/// one-time `_burst` on top (`tx_bw_burst=BYTES`, ...). Returns the device and its binding (a
/// socket's path as given: relative ones are the caller's to resolve).
pub fn net(spec: &str) -> Result<(Nic, NetBinding), ArgError> {
    let bad = |why: &str| ArgError::BadNet {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let mut nic = Nic::default();
    let mut binding: Option<NetBinding> = None;
    let mut forwards: Vec<PortForward> = Vec::new();
    let mut rates = [None; 8];
    let mut bind = |b: NetBinding| {
        if binding.replace(b).is_some() {
            Err(bad("give one of tap=NAME, socket=PATH or passt"))
        } else {
            Ok(())
        }
    };
    for item in spec.split(',') {
        if let Some((key, v)) = item.split_once('=') {
            if let Some(i) = RATE_OPTIONS.iter().position(|o| *o == key) {
                let what = if key.contains("bw") {
                    "bytes"
                } else {
                    "packets"
                };
                rates[i] = Some(parse_rate(v).ok_or_else(|| {
                    bad(&format!(
                        "{key} takes a number of {what} above zero, with an optional K, M or G suffix (powers of 1024)"
                    ))
                })?);
                continue;
            }
        }
        match item.split_once('=') {
            Some(("tap" | "ifname", name)) => {
                check_tap(name).map_err(|e| bad(&e))?;
                bind(NetBinding::Tap(name.to_string()))?;
            }
            Some(("socket", path)) if !path.is_empty() => bind(NetBinding::Socket(path.into()))?,
            None if item == "passt" => bind(NetBinding::Passt(Passt::default()))?,
            Some(("forward", f)) => forwards.push(f.parse().map_err(|e: String| bad(&e))?),
            Some(("mac", v)) => {
                nic.mac =
                    Some(crate::mac::MacAddr::parse_unicast(v).map_err(|e| bad(&e.to_string()))?)
            }
            Some(("queues", v)) => {
                let q = v.parse().unwrap_or(0);
                check_queues(q, MAX_NET_QUEUE_PAIRS).map_err(|e| bad(&e))?;
                nic.queues = q;
            }
            _ => return Err(bad(&format!("unknown or empty option '{item}'"))),
        }
    }
    let mut binding =
        binding.ok_or_else(|| bad("one of tap=NAME, socket=PATH or passt is required"))?;
    match &mut binding {
        NetBinding::Passt(p) => p.forwards = forwards,
        _ if !forwards.is_empty() => {
            return Err(bad(
                "forward= is for passt (Vessel starts it with the forwards); with socket=, the \
                 socket's owner forwards ports",
            ))
        }
        _ => {}
    }
    if binding.is_stream() && nic.queues != 1 {
        return Err(bad(
            "queues= is for taps: a stream socket carries one queue pair",
        ));
    }
    (nic.rx_limit, nic.tx_limit) = rate_limiters(&rates).map_err(|e| bad(&e))?;
    Ok((nic, binding))
}

/// Parses a network device's binding alone (a migration target's): `tap=NAME`,
/// `socket=PATH` or `passt[,forward=...]`, without the device's own options.
pub fn net_binding(spec: &str) -> Result<NetBinding, ArgError> {
    let (nic, binding) = net(spec)?;
    if nic != Nic::default() {
        return Err(ArgError::BadNet {
            spec: spec.to_string(),
            why: "only the binding (tap=NAME, socket=PATH or passt) goes here: the device keeps its MAC, queues and limits".into(),
        });
    }
    Ok(binding)
}

/// Parses a `--transport` value.
pub fn transport(s: &str) -> Result<Transport, ArgError> {
    match s {
        "mmio" => Ok(Transport::Mmio),
        "pci" => Ok(Transport::Pci),
        _ => Err(ArgError::BadTransport(s.to_string())),
    }
}

/// Parses a `--boot-protocol` value.
pub fn protocol(s: &str) -> Result<BootProtocol, ArgError> {
    match s {
        "auto" => Ok(BootProtocol::Auto),
        "pvh" => Ok(BootProtocol::Pvh),
        "linux64" | "linux" => Ok(BootProtocol::Linux64),
        _ => Err(ArgError::BadProtocol(s.to_string())),
    }
}

/// Parses `--on-reboot`.
pub fn on_reboot(s: &str) -> Result<OnReboot, ArgError> {
    match s {
        "exit" => Ok(OnReboot::Exit),
        "restart" => Ok(OnReboot::Restart),
        _ => Err(ArgError::BadOnReboot(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{CacheMode, EngineKind};

    #[test]
    fn vsock_console_and_balloon() {
        assert_eq!(
            vsock("cid=3,socket=/tmp/v.sock"),
            Ok((Vsock { cid: 3 }, "/tmp/v.sock".into()))
        );
        for bad in [
            "",
            "cid=3",
            "socket=/a",
            "cid=2,socket=/a",
            "cid=x,socket=/a",
            "cid=3,socket=/a,x=1",
        ] {
            assert!(vsock(bad).is_err(), "{bad}");
        }
        assert_eq!(virtio_console("off"), Ok(Console::Off));
        assert_eq!(
            virtio_console("tcp:1"),
            Err(ArgError::BadVirtioConsole("tcp:1".into()))
        );
        assert_eq!(balloon(""), Ok(Balloon::default()));
        assert_eq!(
            balloon("size=64M,stats=on,free-page-reporting=on,deflate-on-oom=on"),
            Ok(Balloon {
                size: 64 << 20,
                stats: true,
                free_page_reporting: true,
                deflate_on_oom: true
            })
        );
        for bad in ["size=", "stats=maybe", "colour=red"] {
            assert!(balloon(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nets() {
        let (n, tap) = net("tap=vtap0,mac=52:54:00:12:34:56,queues=4").unwrap();
        assert_eq!(tap, NetBinding::Tap("vtap0".into()));
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert_eq!(n.queues, 4);
        assert_eq!(net("tap=t").unwrap().0.queues, 1);
        assert!(n.rx_limit.is_unlimited() && n.tx_limit.is_unlimited());
        for bad in [
            "",
            "vtap0",
            "mac=52:54:00:12:34:56",
            "tap=",
            "tap=a/b",
            "tap=sixteen-chars-xx",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,mac=52:54:00:12:34",
            "tap=t,queues=0",
            "tap=t,queues=17",
            "tap=t,colour=red",
            "socket=",
            "tap=t,socket=/s",
            "passt,passt",
            "passt,forward=tcp",
            "passt,forward=tcp:0",
            "passt,forward=icmp:1",
            "socket=/s,forward=tcp:80",
            "tap=t,forward=tcp:80",
            "socket=/s,queues=2",
            "passt,queues=4",
            "passt=1",
        ] {
            assert!(net(bad).is_err(), "{bad}");
        }
        let e = net("tap=t,mac=zz").unwrap_err().to_string();
        assert!(e.starts_with("invalid --net 'tap=t,mac=zz': "), "{e}");
        let e = net("mac=52:54:00:12:34:56").unwrap_err().to_string();
        assert!(e.contains("one of tap=NAME, socket=PATH or passt"), "{e}");
        let e = net("socket=/s,queues=2").unwrap_err().to_string();
        assert!(e.contains("one queue pair"), "{e}");
    }

    #[test]
    fn stream_nets() {
        let (n, b) = net("socket=/run/p.sock,mac=52:54:00:12:34:56,rx_pps=100").unwrap();
        assert_eq!(b, NetBinding::Socket("/run/p.sock".into()));
        assert_eq!(n.queues, 1);
        assert!(n.rx_limit.ops.is_some());
        // Relative paths are kept as given (the caller resolves them).
        assert_eq!(
            net("socket=p.sock").unwrap().1,
            NetBinding::Socket("p.sock".into())
        );
        let (_, b) = net("passt").unwrap();
        assert_eq!(b, NetBinding::Passt(Passt::default()));
        let (n, b) =
            net("mac=52:54:00:12:34:56,passt,forward=tcp:8080:80,forward=udp:5353").unwrap();
        assert!(n.mac.is_some());
        let NetBinding::Passt(p) = b else {
            panic!("{b:?}")
        };
        assert_eq!(
            p.forwards,
            [
                "tcp:8080:80".parse().unwrap(),
                "udp:5353:5353".parse().unwrap()
            ]
        );
        assert_eq!(
            net_binding("socket=/s"),
            Ok(NetBinding::Socket("/s".into()))
        );
        assert_eq!(net_binding("tap=t0"), Ok(NetBinding::Tap("t0".into())));
        assert!(net_binding("tap=t0,mac=52:54:00:12:34:56").is_err());
        assert!(net_binding("tap=t0,queues=2").is_err());
    }

    #[test]
    fn net_rate_limits() {
        let (n, _) =
            net("tap=t,tx_bw=10M,tx_pps=1000,rx_bw=512k,rx_pps=2K,tx_bw_burst=1G").unwrap();
        let per_s = TokenBucketConfig::per_second;
        assert_eq!(
            n.tx_limit,
            RateLimiterConfig {
                bandwidth: Some(per_s(10 << 20, 1 << 30)),
                ops: Some(per_s(1000, 0)),
            }
        );
        assert_eq!(
            n.rx_limit,
            RateLimiterConfig {
                bandwidth: Some(per_s(512 << 10, 0)),
                ops: Some(per_s(2048, 0)),
            }
        );
        let (n, _) = net("tap=t,rx_pps=10,rx_pps_burst=5").unwrap();
        assert_eq!(n.rx_limit.ops, Some(per_s(10, 5)));
        assert!(n.rx_limit.bandwidth.is_none() && n.tx_limit.is_unlimited());
        for (spec, want) in [
            ("tap=t,tx_bw=0", "tx_bw takes a number of bytes above zero"),
            (
                "tap=t,tx_pps=",
                "tx_pps takes a number of packets above zero",
            ),
            ("tap=t,rx_bw=1Q", "rx_bw takes a number of bytes"),
            ("tap=t,rx_bw=-5", "rx_bw takes"),
            ("tap=t,rx_bw=1.5", "rx_bw takes"),
            ("tap=t,rx_pps=99999999999999999999", "rx_pps takes"),
            ("tap=t,tx_bw=17179869184G", "tx_bw takes"),
            ("tap=t,tx_bw_burst=1M", "tx_bw_burst needs tx_bw"),
            ("tap=t,rx_pps=5,tx_pps_burst=1", "tx_pps_burst needs tx_pps"),
            ("tap=t,tx_rate=5", "unknown or empty option 'tx_rate=5'"),
        ] {
            let e = net(spec).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid --net '{spec}': ")) && e.contains(want),
                "{spec}: {e}"
            );
        }
    }

    #[test]
    fn disks() {
        let (d, path) = disk("path=/d.img,readonly=on,cache=unsafe,serial=abc,queues=4").unwrap();
        assert_eq!(path, PathBuf::from("/d.img"));
        assert!(d.read_only);
        assert_eq!(d.cache, CacheMode::Unsafe);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.queues, 4);
        assert_eq!(disk("/x.qcow2").unwrap().1, PathBuf::from("/x.qcow2"));
        for bad in [
            "",
            "readonly=on",
            "path=/a,readonly=maybe",
            "path=/a,cache=none2",
            "path=/a,queues=0",
            "path=/a,serial=012345678901234567890",
            "path=/a,colour=red",
            "path=/a,engine=aio",
            "path=/a,bw=0",
            "path=/a,iops=-5",
            "path=/a,iops=many",
            "path=/a,bw=10X",
            "path=/a,bw_burst=1M",
            "path=/a,iops_burst=10",
        ] {
            assert!(disk(bad).is_err(), "{bad}");
        }
        let e = disk("path=/a,engine=aio").unwrap_err().to_string();
        assert!(
            e.contains("expected auto, io_uring, threads or sync"),
            "{e}"
        );
        let (d, _) =
            disk("path=/a,cache=none,engine=io_uring,bw=10M,iops=200,bw_burst=1G").unwrap();
        assert_eq!(d.cache, CacheMode::None);
        assert_eq!(d.engine, EngineKind::IoUring);
        assert_eq!(
            d.rate_limit,
            RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig::per_second(10 << 20, 1 << 30)),
                ops: Some(TokenBucketConfig::per_second(200, 0)),
            }
        );
        let (d, _) = disk("/a,engine=threads,iops=1K,iops_burst=50,bw=4096").unwrap();
        assert_eq!(d.engine, EngineKind::Threads);
        assert_eq!(
            d.rate_limit.ops,
            Some(TokenBucketConfig::per_second(1024, 50))
        );
        assert_eq!(
            d.rate_limit.bandwidth,
            Some(TokenBucketConfig::per_second(4096, 0))
        );
        let (plain, _) = disk("/a").unwrap();
        assert_eq!(plain.engine, EngineKind::Auto);
        assert!(plain.rate_limit.is_unlimited());
        assert_eq!(transport("pci"), Ok(Transport::Pci));
        assert!(transport("isa").is_err());
    }

    #[test]
    fn sizes_consoles_and_protocols() {
        assert_eq!(memory("512"), Ok(512 << 20));
        assert_eq!(memory("2G"), Ok(2 << 30));
        assert!(memory("12X").is_err());
        assert_eq!(console("stdio"), Ok(Console::Stdio));
        assert_eq!(console("file:/tmp/x"), Ok(Console::File("/tmp/x".into())));
        assert!(console("file:").is_err());
        assert!(console("tcp:1").is_err());
        assert_eq!(protocol("pvh"), Ok(BootProtocol::Pvh));
        assert!(protocol("bios").is_err());
        assert_eq!(on_reboot("restart"), Ok(OnReboot::Restart));
        assert_eq!(on_off("off"), Ok(false));
        assert!(on_off("maybe").is_err());
    }
}
