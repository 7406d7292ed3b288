//! The control API: `vessel run --api-socket` and `vessel ctl`, against the bundled guest.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Vm {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Vm {
    /// Starts a held guest (it spins in ring 3 after booting) with an API socket.
    fn start(name: &str, extra: &[&str]) -> Vm {
        let dir = std::env::temp_dir().join(format!("vessel-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let console = format!("file:{}", dir.join("console.log").display());
        let child = Command::new(VESSEL)
            .args(["run", "--console", &console, "--cmdline", "action=hold"])
            .arg("--api-socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let vm = Vm { child, socket, dir };
        vm.wait_for_console("all 1 cpus ran in ring 3");
        vm
    }

    fn wait_for_console(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
            if log.contains(text) && self.socket.exists() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "guest never printed '{text}': {log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        common::ctl(&self.socket, args)
    }

    /// CPU time (user + system, in clock ticks) the VMM process has used.
    fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.child.id())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces): state is field 3, utime 14.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn json_field<'a>(out: &'a str, key: &str) -> &'a str {
    let at = out
        .find(&format!("\"{key}\""))
        .unwrap_or_else(|| panic!("{key} in {out}"));
    let v = out[at..].split_once(':').unwrap().1.trim_start();
    v.split([',', '}', '\n'])
        .next()
        .unwrap()
        .trim()
        .trim_matches('"')
}

#[test]
fn info_pause_resume() {
    let vm = Vm::start("pause", &["--rng"]);
    let o = vm.ctl(&["--json", "info"]);
    assert_code(&o, 0);
    let info = stdout(&o);
    assert_eq!(json_field(&info, "state"), "running", "{info}");
    assert_eq!(json_field(&info, "vcpus"), "1", "{info}");
    assert!(info.contains("virtio-rng"), "{info}");
    assert!(info.contains("\"boot_time_ms\""), "{info}");

    // A held guest spins in ring 3: a running VM burns CPU, a paused one does not. A running
    // one reaches 10 ticks (0.1 s of CPU) within 10 s however loaded the machine is; a paused
    // one burns at most 5 in a second.
    let spins = |vm: &Vm| {
        let a = vm.cpu_ticks();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while vm.cpu_ticks() - a < 10 {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    };
    let busy = |vm: &Vm| {
        let a = vm.cpu_ticks();
        std::thread::sleep(Duration::from_millis(1000));
        vm.cpu_ticks() - a
    };
    assert!(spins(&vm), "the held guest should be spinning");
    assert_code(&vm.ctl(&["pause"]), 0);
    let o = vm.ctl(&["--json", "info"]);
    assert_eq!(json_field(&stdout(&o), "state"), "paused");
    assert!(busy(&vm) <= 5, "a paused VM must not run its vCPUs");
    // Pausing twice is a conflict with a message, and changes nothing.
    let o = vm.ctl(&["pause"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already paused"), "{}", stderr(&o));
    assert_code(&vm.ctl(&["resume"]), 0);
    assert!(spins(&vm), "resumed");
}

#[test]
fn info_shows_how_disks_are_served() {
    let dir = TempDir::new("api-disk");
    let disk = dir.file("disk.raw");
    raw_disk(&disk, 1 << 20);
    let spec = format!("path={},engine=threads,iops=100", disk.display());
    let vm = Vm::start("disk", &["--disk", &spec]);
    let o = vm.ctl(&["info"]);
    assert_code(&o, 0);
    let info = stdout(&o);
    assert!(
        info.contains("virtio-block")
            && info.contains("(engine threads, cache writeback, iops 100)"),
        "{info}"
    );
}

#[test]
fn reset_ends_the_vm_with_code_3() {
    let mut vm = Vm::start("reset", &[]);
    assert_code(&vm.ctl(&["reset"]), 0);
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(3));
}

#[test]
fn unimplemented_verbs_and_bad_sockets_fail_cleanly() {
    let vm = Vm::start("errors", &[]);
    let dir = vm.dir.join("snap");
    // A diff snapshot without a previous snapshot has nothing to build on.
    let o = vm.ctl(&["snapshot", "--diff", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("full snapshot first"), "{}", stderr(&o));
    assert!(!dir.join("state").exists());
    // Restoring or receiving belongs to a new process.
    let o = vm.ctl(&["restore", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("vessel serve"), "{}", stderr(&o));
    // The VM is undisturbed.
    let o = vm.ctl(&["--json", "info"]);
    assert_eq!(json_field(&stdout(&o), "state"), "running");
    let o = vessel(&["ctl", "--api-socket", "/nonexistent/api.sock", "info"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("vessel: error:"), "{}", stderr(&o));
}

#[test]
fn balloon_target_changes_at_run_time() {
    // The bundled guest has no balloon driver: the target moves, `actual` stays 0.
    let vm = Vm::start("balloon", &["--memory", "256M", "--balloon", "size=0"]);
    let o = vm.ctl(&["--json", "balloon"]);
    assert_code(&o, 0);
    assert_eq!(json_field(&stdout(&o), "target_bytes"), "0");
    let o = vm.ctl(&["balloon", "64M"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "balloon target set to 64.0 MiB\n");
    let o = vm.ctl(&["--json", "balloon"]);
    assert_code(&o, 0);
    let b = stdout(&o);
    assert_eq!(json_field(&b, "target_bytes"), "67108864", "{b}");
    assert_eq!(json_field(&b, "actual_bytes"), "0", "{b}");
    assert!(!b.contains("stats"), "no statistics queue: {b}");
    let o = vm.ctl(&["balloon"]);
    assert_code(&o, 0);
    assert_eq!(
        stdout(&o),
        "target:   64.0 MiB\nactual:   0 B\nstats:    none\n"
    );
    // All of memory, or more, is refused and changes nothing.
    for size in ["256M", "1G"] {
        let o = vm.ctl(&["balloon", size]);
        assert_eq!(o.status.code(), Some(1), "{size}");
        let e = stderr(&o);
        assert!(
            e.contains("is not below the guest memory of 256M") && e.contains("HTTP 400"),
            "{e}"
        );
    }
    let o = vm.ctl(&["balloon", "lots"]);
    assert_eq!(o.status.code(), Some(2), "a bad size is a usage error");
    let o = vm.ctl(&["--json", "balloon"]);
    assert_eq!(json_field(&stdout(&o), "target_bytes"), "67108864");
    // Back to 0; a size that is not a whole page is rounded down to one.
    assert_code(&vm.ctl(&["balloon", "0"]), 0);
    assert_code(&vm.ctl(&["balloon", "6K"]), 0);
    let o = vm.ctl(&["--json", "balloon"]);
    assert_eq!(json_field(&stdout(&o), "target_bytes"), "4096");
    // The balloon is listed, and the VM kept running.
    let o = vm.ctl(&["--json", "info"]);
    let info = stdout(&o);
    assert!(info.contains("virtio-balloon"), "{info}");
    assert_eq!(json_field(&info, "state"), "running");
}

#[test]
fn balloon_verbs_without_a_balloon_are_a_conflict() {
    let vm = Vm::start("no-balloon", &[]);
    for args in [
        &["balloon"][..],
        &["--json", "balloon"],
        &["balloon", "64M"],
    ] {
        let o = vm.ctl(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(
            e.contains("this VM has no balloon") && e.contains("HTTP 409"),
            "{args:?}: {e}"
        );
    }
    let o = vm.ctl(&["--json", "info"]);
    assert_eq!(json_field(&stdout(&o), "state"), "running");
}

#[test]
fn an_api_socket_path_that_is_a_file_is_refused() {
    let p = std::env::temp_dir().join(format!("vessel-api-file-{}", std::process::id()));
    std::fs::write(&p, b"keep me").unwrap();
    let o = vessel(&["run", "--api-socket", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
    std::fs::remove_file(&p).unwrap();
}
