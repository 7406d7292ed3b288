//! The bundled guest's soak mode (`action=soak`, guests/README.md): its report lines, and a
//! running VM whose console is read line by line.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One `soak cpu=N iter=I t=MS sum=0xHEX ok` line.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakLine {
    pub cpu: usize,
    pub iter: u64,
    pub t: u64,
    pub sum: u64,
}

pub fn parse_soak(line: &str) -> Option<SoakLine> {
    let rest = line.strip_prefix("soak cpu=")?;
    let mut f = rest.split(' ');
    let cpu = f.next()?.parse().ok()?;
    let iter = f.next()?.strip_prefix("iter=")?.parse().ok()?;
    let t = f.next()?.strip_prefix("t=")?.parse().ok()?;
    let sum = u64::from_str_radix(f.next()?.strip_prefix("sum=0x")?, 16).ok()?;
    (f.next()? == "ok" && f.next().is_none()).then_some(SoakLine { cpu, iter, t, sum })
}

/// A `vessel` process whose stdout (the guest's console) is read by a thread; killed on drop.
pub struct Console {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Everything read so far.
    pub seen: String,
}

impl Console {
    pub fn spawn(args: &[&str]) -> Console {
        let mut all = vec![super::VESSEL];
        all.extend_from_slice(args);
        Console::spawn_command(&all)
    }

    /// Runs `args[0]` with the rest (a wrapper such as `ip netns exec NS vessel ...`).
    pub fn spawn_command(args: &[&str]) -> Console {
        let mut child = Command::new(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vessel");
        let out: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Console {
            child,
            lines,
            seen: String::new(),
        }
    }

    /// The next line, or a panic with the output so far after `limit`.
    pub fn line(&mut self, limit: Duration) -> String {
        match self.lines.recv_timeout(limit) {
            Ok(l) => {
                self.seen.push_str(&l);
                self.seen.push('\n');
                l
            }
            Err(e) => panic!("{e:?} waiting for the console; so far:\n{}", self.seen),
        }
    }

    /// Reads until every one of `cpus` CPUs printed `n` more soak lines; returns them. Fails
    /// on a line that is not `ok`.
    pub fn soak_lines(&mut self, cpus: usize, n: usize) -> Vec<SoakLine> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        let mut per_cpu = vec![0usize; cpus];
        while per_cpu.iter().any(|&c| c < n) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.line(left.max(Duration::from_millis(1)));
            assert!(!line.contains("MISMATCH"), "{}", self.seen);
            if line.starts_with("soak cpu=") {
                let s = parse_soak(&line).unwrap_or_else(|| panic!("bad soak line '{line}'"));
                per_cpu[s.cpu] += 1;
                got.push(s);
            }
        }
        got
    }

    /// SIGTERM, then the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that each of `cpus` CPUs went on past the iteration it had reported (`before`):
/// its first line in `lines` is a later one. `what` starts the message.
pub fn assert_went_on(lines: &[SoakLine], cpus: usize, before: &[u64], what: &str) {
    for cpu in 0..cpus {
        let first = lines.iter().find(|l| l.cpu == cpu).unwrap();
        assert!(
            first.iter > before[cpu],
            "{what}cpu {cpu}: {first:?} after {before:?}"
        );
    }
}

/// The last iteration each of `cpus` CPUs reported in `lines`.
pub fn last_iters(lines: &[SoakLine], cpus: usize) -> Vec<u64> {
    (0..cpus)
        .map(|c| {
            lines
                .iter()
                .filter(|l| l.cpu == c)
                .map(|l| l.iter)
                .max()
                .unwrap_or_else(|| panic!("no soak line of cpu {c}"))
        })
        .collect()
}
