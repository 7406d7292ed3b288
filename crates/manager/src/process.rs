//! VM processes: each VM is its own `vessel run` process, started in its own process group
//! (a signal to the daemon's terminal or group never reaches it) and not tied to the daemon's
//! life, so that the daemon can restart while its VMs run on. A process is watched through a
//! pidfd, which also works for a process the daemon did not start (one it adopts after a
//! restart): its end is noticed at once.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

/// Errors starting or signalling a VM process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the log {path}: {source}")]
    Log {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch process {pid}: {source}")]
    Pidfd {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A running VM process.
pub struct VmProcess {
    pub pid: u32,
    pidfd: OwnedFd,
    /// Ours to reap when the daemon started it; none for an adopted one.
    child: Mutex<Option<Child>>,
}

/// How a VM process ended, when the daemon can tell (it started it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
    /// An adopted process: its parent (not the daemon) had its status.
    Unknown,
}

impl Ended {
    /// Whether this end is a failure (for the restart policy): anything but exit code 0.
    pub fn failed(self) -> bool {
        !matches!(self, Ended::Code(0))
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Code(c) => write!(f, "exit code {c}"),
            Ended::Signal(s) => write!(f, "killed by signal {s}"),
            Ended::Unknown => f.write_str("ended (status unknown: started by an earlier daemon)"),
        }
    }
}

fn open_pidfd(pid: u32) -> Result<OwnedFd, ProcessError> {
    let err = |source: std::io::Error| ProcessError::Pidfd { pid, source };
    let p = Pid::from_raw(pid as i32)
        .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc_esrch())))?;
    pidfd_open(p, PidfdFlags::empty()).map_err(|e| err(e.into()))
}

fn libc_esrch() -> i32 {
    rustix::io::Errno::SRCH.raw_os_error()
}

impl VmProcess {
    /// Starts `program args`, its output appended to `log`.
    pub fn spawn(program: &Path, args: &[String], log: &Path) -> Result<VmProcess, ProcessError> {
        let log_err = |source| ProcessError::Log {
            path: log.display().to_string(),
            source,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let pid = child.id();
        Ok(VmProcess {
            pid,
            pidfd: open_pidfd(pid)?,
            child: Mutex::new(Some(child)),
        })
    }

    /// Watches process `pid` if it is alive and its command line contains `marker` (the VM's
    /// own configuration file: a recycled pid is someone else).
    pub fn adopt(pid: u32, marker: &str) -> Option<VmProcess> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(marker) {
            return None;
        }
        let pidfd = open_pidfd(pid).ok()?;
        Some(VmProcess {
            pid,
            pidfd,
            child: Mutex::new(None),
        })
    }

    /// Sends `signal` (through the pidfd: never to a recycled pid).
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        pidfd_send_signal(self.pidfd.as_fd(), signal).map_err(Into::into)
    }

    /// A handle that waits for this process to end.
    pub fn waiter(&self) -> std::io::Result<Waiter> {
        Ok(Waiter {
            pidfd: self.pidfd.try_clone()?,
        })
    }

    /// Reaps the process, which has ended: how it ended (once; later calls say unknown).
    pub fn reap(&self) -> Ended {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        match child.map(|mut c| c.wait()) {
            Some(Ok(s)) => match (s.code(), s.signal()) {
                (Some(c), _) => Ended::Code(c),
                (None, Some(sig)) => Ended::Signal(sig),
                _ => Ended::Unknown,
            },
            _ => Ended::Unknown,
        }
    }
}

/// The numeric fields of `/proc/PID/stat` from the 3rd on (after the command name, which may
/// hold spaces, in parentheses): `proc(5)`'s field N is `[N - 3]`.
pub fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    // The state (field 3) is a letter: 0 in its place.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// Clock ticks (`proc(5)`'s unit of CPU time and start time) in seconds.
pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// How long ago process `pid` started (from `/proc`), for a process the daemon adopts.
pub fn started_ago(pid: u32) -> Option<Duration> {
    // starttime is field 22.
    let ticks = *stat_fields(pid)?.get(22 - 3)?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64(
        (uptime - ticks_to_secs(ticks)).max(0.0),
    ))
}

/// Waits for a process to end.
pub struct Waiter {
    pidfd: OwnedFd,
}

impl Waiter {
    /// Whether the process ended within `limit` (none: wait as long as it takes).
    pub fn wait(&self, limit: Option<Duration>) -> bool {
        let deadline = limit.map(|l| std::time::Instant::now() + l);
        loop {
            let timeout = deadline.map(|d| {
                let left = d.saturating_duration_since(std::time::Instant::now());
                rustix::time::Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_nanos()),
                }
            });
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match poll(&mut fds, timeout.as_ref()) {
                Ok(n) if n > 0 => return true,
                Ok(_) => return false,
                Err(rustix::io::Errno::INTR) => continue,
                // A pidfd that cannot be polled: treat the process as gone rather than wait
                // forever.
                Err(_) => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_watched_signalled_reaped_and_adopted() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let p = VmProcess::spawn(
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "echo hello; while :; do sleep 1; done".into(),
                "marker-123".into(),
            ],
            &log,
        )
        .unwrap();
        let w = p.waiter().unwrap();
        assert!(!w.wait(Some(Duration::from_millis(200))));
        // Adopted by another watcher, checked by its command line.
        assert!(VmProcess::adopt(p.pid, "marker-123").is_some());
        assert!(VmProcess::adopt(p.pid, "someone-else").is_none());
        assert!(started_ago(p.pid).unwrap() < Duration::from_secs(10));
        assert!(started_ago(1).unwrap() > started_ago(p.pid).unwrap());
        p.signal(Signal::KILL).unwrap();
        assert!(w.wait(Some(Duration::from_secs(10))));
        assert_eq!(p.reap(), Ended::Signal(9));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
        let p =
            VmProcess::spawn(Path::new("/bin/sh"), &["-c".into(), "exit 3".into()], &log).unwrap();
        assert!(p.waiter().unwrap().wait(None));
        let e = p.reap();
        assert_eq!(e, Ended::Code(3));
        assert!(e.failed() && !Ended::Code(0).failed());
        assert!(VmProcess::spawn(Path::new("/nonexistent"), &[], &log).is_err());
    }
}
