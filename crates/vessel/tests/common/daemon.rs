//! `vessel daemon` for tests: a daemon on directories of its own, its clients, and helpers
//! to look at processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// A daemon on its own directories.
pub struct Daemon {
    pub child: Child,
    pub state: PathBuf,
    pub run: PathBuf,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_in(dir, None, extra)
    }

    /// A daemon in network namespace `netns` (`ip netns exec`, which execs it: the child is
    /// the daemon).
    pub fn start_in(dir: &Path, netns: Option<&str>, extra: &[&str]) -> Daemon {
        let (state, run) = (dir.join("state"), dir.join("run"));
        let socket = run.join("vessel.sock");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, VESSEL]);
                c
            }
            None => Command::new(VESSEL),
        };
        let child = cmd
            .args(["daemon", "--state-dir", state.to_str().unwrap()])
            .args(["--run-dir", run.to_str().unwrap()])
            .args(["--socket", socket.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the daemon");
        let d = Daemon {
            child,
            state,
            run,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.vessel(&["vm", "list"]).status.success() {
            assert!(Instant::now() < deadline, "the daemon did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn vessel(&self, args: &[&str]) -> std::process::Output {
        let mut all = args.to_vec();
        all.extend(["--socket", self.socket.to_str().unwrap()]);
        vessel(&all)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.vessel(args);
        assert_code(&o, 0);
        stdout(&o)
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// Template `t` of the idle bundled guest with a base disk of `size` bytes in `dir`.
    pub fn idle_template_with_disk(&self, dir: &TempDir, size: u64) -> PathBuf {
        let base = dir.file("base.raw");
        raw_disk(&base, size);
        self.ok(&[
            "template",
            "create",
            "t",
            "--cmdline",
            "console=ttyS0 action=idle",
            "--disk",
            base.to_str().unwrap(),
        ]);
        base
    }

    pub fn vm(&self, name: &str) -> Value {
        self.json(&["vm", "info", name])
    }

    /// The events' kinds and subjects, `kind subject message` each.
    pub fn events(&self) -> Vec<String> {
        self.json(&["events"])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| format!("{} {} {}", e["kind"], e["subject"], e["message"]).replace('"', ""))
            .collect()
    }

    /// SIGTERM, and its exit code.
    pub fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
}

/// Processes whose command line mentions `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(marker) && !c.contains("daemon") {
                found.push(c);
            }
        }
    }
    found
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}
