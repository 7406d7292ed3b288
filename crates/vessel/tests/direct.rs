//! The direct test host: the bundled guest on this machine's /dev/kvm.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::soak::{parse_soak, SoakLine};
use common::*;

fn cpu_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.starts_with("cpu ") && l.contains("ring 3 (cpl 3)"))
        .collect()
}

#[test]
fn run_boots_the_bundled_guest_and_exits_0() {
    assert!(have_kvm(), "/dev/kvm is required");
    let o = vessel(&["run"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("Vessel guest"), "{out}");
    assert!(
        out.contains("(boot: pvh)"),
        "ELF with a PVH note boots through PVH: {out}"
    );
    assert!(out.contains("cmdline: console=ttyS0 panic=1"), "{out}");
    assert_eq!(cpu_lines(&out).len(), 1, "{out}");
    assert!(out.contains("all 1 cpus ran in ring 3"), "{out}");
    // The boot-time marker is logged with the time since the process started.
    assert!(
        stderr(&o).contains("guest boot marker after"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn four_vcpus_each_report_from_ring_3() {
    let o = vessel(&["run", "--cpus", "4"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("cpus: 4 (apic ids: 0 1 2 3)"), "{out}");
    let lines = cpu_lines(&out);
    assert_eq!(lines.len(), 4, "{out}");
    for id in 0..4 {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("cpu {id}:"))),
            "cpu {id} missing: {out}"
        );
    }
    // The same workload gives the same checksum everywhere.
    let sums: Vec<&str> = lines
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert!(sums.windows(2).all(|w| w[0] == w[1]), "{out}");
    assert!(out.contains("all 4 cpus ran in ring 3"), "{out}");
}

#[test]
fn linux_64bit_boot_protocol_also_boots_it() {
    let o = vessel(&["run", "--boot-protocol", "linux64", "--cpus", "2"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("(boot: linux64)"), "{out}");
    assert_eq!(cpu_lines(&out).len(), 2, "{out}");
}

/// The guest's e820 lines, as (start, end inclusive, type).
fn e820(out: &str) -> Vec<(u64, u64, String)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("e820: "))
        .map(|l| {
            let mut parts = l.split_whitespace();
            let range = parts.next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let p = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (p(a), p(b), parts.next().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn guest_sees_the_memory_map_vessel_gives() {
    let o = vessel(&["run", "--memory", "64M"]);
    assert_code(&o, 0);
    let map = e820(&stdout(&o));
    assert!(
        map.contains(&(0x10_0000, (64 << 20) - 1, "usable".into())),
        "{map:x?}"
    );
    assert!(map.contains(&(0, 0x9_fbff, "usable".into())), "{map:x?}");
}

#[test]
fn large_guests_get_memory_above_4g() {
    // Guest memory is mapped lazily: a 5 GiB guest costs what it touches.
    let o = vessel(&["run", "--memory", "5G"]);
    assert_code(&o, 0);
    let map = e820(&stdout(&o));
    assert!(
        map.contains(&(0x10_0000, 0xbfff_ffff, "usable".into())),
        "RAM below the 3 GiB hole: {map:x?}"
    );
    assert!(
        map.contains(&(1 << 32, (1u64 << 32) + (2 << 30) - 1, "usable".into())),
        "RAM above 4 GiB: {map:x?}"
    );
}

#[test]
fn exit_device_status_is_the_exit_code() {
    let o = vessel(&["run", "--cmdline", "action=exit:7"]);
    assert_code(&o, 7);
}

#[test]
fn acpi_poweroff_exits_0() {
    let o = vessel(&["run", "--cmdline", "action=poweroff"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("all 1 cpus ran in ring 3"));
}

#[test]
fn reboot_exits_3() {
    let o = vessel(&["run", "--cmdline", "action=reboot"]);
    assert_code(&o, 3);
}

/// Runs vessel until its stdout has `want` lines containing `needle`, then stops it with
/// SIGTERM; returns the output so far. Fails after 60 s.
fn run_until_lines(args: &[&str], needle: &str, want: usize) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Past 60 s the child is killed, but only while it is unreaped (its pid still its own).
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .is_err()
        {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    });
    let mut out = String::new();
    let mut seen = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        seen += usize::from(line.contains(needle));
        out.push_str(&line);
        out.push('\n');
        if seen >= want {
            break;
        }
    }
    let _ = done.send(());
    let _ = watchdog.join();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(
        seen >= want,
        "{seen} of {want} '{needle}' lines ({status}):\n{out}"
    );
    out
}

#[test]
fn reboot_restarts_in_place_with_on_reboot_restart() {
    let dir = TempDir::new("reboot");
    let disk = dir.file("disk.img");
    raw_disk(&disk, 16 << 20);
    for transport in ["mmio", "pci"] {
        let spec = format!("path={}", disk.display());
        // The guest reboots as soon as it is done: each boot starts both CPUs and drives both
        // devices from scratch, so the devices and vCPUs were reset each time.
        let out = run_until_lines(
            &[
                "run",
                "--cpus",
                "2",
                "--transport",
                transport,
                "--rng",
                "--disk",
                &spec,
                "--on-reboot",
                "restart",
                "--cmdline",
                "action=reboot",
            ],
            "virtio-rng",
            3,
        );
        assert!(
            out.matches("all 2 cpus ran in ring 3").count() >= 3,
            "{out}"
        );
        assert!(out.matches("write/read/flush ok").count() >= 3, "{out}");
        assert!(!out.contains("FAIL"), "{out}");
    }
}

#[test]
fn triple_fault_exits_4_with_a_message() {
    let o = vessel(&["run", "--cmdline", "action=triplefault"]);
    assert_code(&o, 4);
    assert!(stderr(&o).contains("triple fault"), "{}", stderr(&o));
}

#[test]
fn cpu_template_masks_features() {
    let o = vessel(&["run", "--cpu-template", "x86-64-v2,-x2apic", "--cpus", "2"]);
    assert_code(&o, 0);
}

#[test]
fn console_to_a_file() {
    let p = std::env::temp_dir().join(format!("vessel-console-{}.log", std::process::id()));
    let arg = format!("file:{}", p.display());
    let o = vessel(&["run", "--console", &arg]);
    assert_code(&o, 0);
    assert!(stdout(&o).is_empty());
    let log = std::fs::read_to_string(&p).unwrap();
    assert!(log.contains("Vessel guest"), "{log}");
    std::fs::remove_file(p).unwrap();
}

/// Starts a held guest (it spins after booting) and waits for its boot banner on the console
/// socket; returns the child and what the socket showed.
fn start_held_guest(sock: &std::path::Path) -> (std::process::Child, String) {
    let arg = format!("socket:{}", sock.display());
    let child = Command::new(VESSEL)
        .args(["run", "--console", &arg, "--cmdline", "action=hold"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("console socket never appeared: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("all 1 cpus ran in ring 3") {
        assert!(Instant::now() < deadline, "guest output: {seen}");
        if let Ok(n) = stream.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    (child, seen)
}

fn stop_with(child: std::process::Child, signal: &str) -> std::process::Output {
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn socket_console_and_sigterm() {
    let sock = std::env::temp_dir().join(format!("vessel-term-{}.sock", std::process::id()));
    let (child, seen) = start_held_guest(&sock);
    assert!(
        seen.contains("Vessel guest"),
        "backlog replayed to the client: {seen}"
    );
    let o = stop_with(child, "-TERM");
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    let _ = std::fs::remove_file(sock);
}

#[test]
fn sigint_stops_the_vm() {
    let sock = std::env::temp_dir().join(format!("vessel-int-{}.sock", std::process::id()));
    let (child, _) = start_held_guest(&sock);
    let o = stop_with(child, "-INT");
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let _ = std::fs::remove_file(sock);
}

#[test]
fn host_check_reports_the_ring0_verdict() {
    let o = vessel(&["host-check", "--json"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("\"ring0_native\""), "{out}");
    assert!(out.contains("\"verdict\""), "{out}");
    assert!(out.contains("\"userfaultfd\""), "{out}");
    // On the development machines' kvm_pvm, ring 0 is emulated; elsewhere it is native.
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(out.contains("\"ring0_native\": false"), "{out}");
    }
}

/// A running `vessel`, killed if the test ends without stopping it.
struct Running(Option<std::process::Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn soak_runs_on_every_vcpu_until_stopped() {
    let mut child = Command::new(VESSEL)
        .args(["run", "--cpus", "2", "--cmdline", "action=soak soakms=50"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut vm = Running(Some(child));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut per_cpu: Vec<Vec<SoakLine>> = vec![Vec::new(); 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    while per_cpu.iter().any(|l| l.len() < 4) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(e) => panic!("{e:?} before 4 soak lines per cpu; output:\n{seen}"),
        };
        let line = line.replace('\r', "");
        seen.push_str(&line);
        seen.push('\n');
        assert!(
            !line.contains("MISMATCH") && !line.starts_with("FAIL"),
            "{seen}"
        );
        if line.starts_with("soak cpu=") {
            let s = parse_soak(&line).unwrap_or_else(|| panic!("bad soak line '{line}'"));
            per_cpu[s.cpu].push(s);
        }
    }
    assert!(
        seen.contains(
            "soak: 2 cpus, 512 pages of 4 KiB each, 16 per iteration, report every 50 ms"
        ),
        "{seen}"
    );
    for lines in &per_cpu {
        for w in lines.windows(2) {
            assert!(w[1].iter > w[0].iter, "the counter advances: {seen}");
            // A line is printed only once 50 ms of TSC time have passed since the last one.
            assert!(w[1].t >= w[0].t + 50, "TSC time advances: {seen}");
            assert_ne!(w[1].sum, w[0].sum, "{seen}");
        }
    }
    let child = vm.0.take().unwrap();
    let o = stop_with(child, "-TERM");
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
}

#[test]
fn soak_rejects_a_bad_period() {
    let o = vessel(&["run", "--cmdline", "action=soak soakms=0"]);
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("FAIL: bad option 'soakms=0'"),
        "{}",
        stdout(&o)
    );
}

/// The `VmFlags` of the mappings of process `pid` that are exactly `len` bytes long.
fn flags_of_mappings(pid: u32, len: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = Vec::new();
    let mut sized = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                sized = hi - lo == len;
                continue;
            }
        }
        if let (true, Some(f)) = (sized, line.strip_prefix("VmFlags:")) {
            out.push(f.trim().to_string());
        }
    }
    out
}

#[test]
fn guest_memory_gets_transparent_huge_pages_unless_told_not_to() {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"));
    // 200 MiB: a size no other mapping of the process has.
    for (switch, want) in [(None, thp), (Some("off"), false)] {
        let mut args = vec![
            "run",
            "--memory",
            "200M",
            "--cmdline",
            "action=soak soakms=50",
        ];
        if let Some(s) = switch {
            args.extend(["--thp", s]);
        }
        let mut vm = common::soak::Console::spawn(&args);
        vm.soak_lines(1, 1);
        let flags = flags_of_mappings(vm.child.id(), 200 << 20);
        assert_eq!(flags.len(), 1, "{switch:?}: {flags:?}");
        let hg = flags[0].split(' ').any(|f| f == "hg");
        assert_eq!(hg, want, "{switch:?}: {}", flags[0]);
        assert_eq!(vm.stop(), Some(143));
    }
}
