//! passt started by `vessel run` for a `--net passt` device (binding
//! [`spec::bindings::NetBinding::Passt`]): rootless networking, as podman and libvirt's session
//! mode have it. passt translates the guest's frames into the host's own sockets, as the
//! user it runs as: outbound connections, and the host ports forwarded in.
//!
//! Each passt is a child process in a private directory (mode 0700, in `$XDG_RUNTIME_DIR` for
//! a user, the temporary directory for root): its socket `passt.sock`, its pid file (written
//! once it listens: the sign it is ready) and its output `passt.log` (shown if it fails to
//! start). It runs `--foreground --one-off`: it quits when the VMM's connection closes, however
//! the VMM ends, and [`Passt`]'s drop kills it too (and removes the directory), for a VMM that
//! never connected or that is still there when its VM has ended. Its own process group keeps a terminal's Ctrl-C for Vessel, which shuts
//! the VM down first.
//!
//! The user: the caller's own; as root, the jail's user under `--jail` (so the jailed VMM may
//! connect; its socket is then bound into the jail), else `nobody` (passt does not run as
//! root). The program: `passt` from `PATH`, or `VESSEL_PASST`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spec::bindings::{PortForward, Protocol};

/// How long passt may take to listen.
const START_WAIT: Duration = Duration::from_secs(10);

/// Errors starting passt.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("passt: cannot make its directory {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start passt ({program}): {source} (is passt installed? VESSEL_PASST names another program)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("passt exited ({status}) before it listened: {log}")]
    Exited { status: String, log: String },
    #[error("passt did not listen within {} s: {log}", START_WAIT.as_secs())]
    Timeout { log: String },
}

/// A passt started for one network device; killed, and its directory removed, on drop.
#[derive(Debug)]
pub struct Passt {
    /// None once disowned.
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

/// The effective uid of this process (from /proc: no unsafe call for it here).
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `nobody`'s uid and gid (65534 where /etc/passwd does not say).
fn nobody() -> (u32, u32) {
    let from_passwd = || {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let line = passwd.lines().find(|l| l.starts_with("nobody:"))?;
        let mut f = line.split(':').skip(2);
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    };
    from_passwd().unwrap_or((65534, 65534))
}

/// The directory passt's directory goes in.
fn runtime_dir(root: bool) -> PathBuf {
    if !root {
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            if d.is_absolute() && d.is_dir() {
                return d;
            }
        }
    }
    std::env::temp_dir()
}

/// A new private directory in `parent`.
fn private_dir(parent: &Path, index: usize) -> Result<PathBuf, PasstError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut last = None;
    for _ in 0..8 {
        let mut r = [0u8; 6];
        jail::random::fill(&mut r).map_err(|source| PasstError::Dir {
            path: parent.display().to_string(),
            source,
        })?;
        let tag: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let dir = parent.join(format!("vessel-passt-{}-{index}-{tag}", std::process::id()));
        // mkdir fails on anything already there, a link included.
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(source) => {
                return Err(PasstError::Dir {
                    path: dir.display().to_string(),
                    source,
                })
            }
        }
    }
    Err(PasstError::Dir {
        path: parent.display().to_string(),
        source: last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()),
    })
}

/// The end of passt's output, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Failed to send"))
        .collect();
    match lines.len() {
        0 => "it said nothing".to_string(),
        n => lines[n.saturating_sub(4)..].join(" / "),
    }
}

/// passt's arguments for a socket at `socket`, a pid file, the user to run as (`None`: this
/// process's) and the forwards.
fn arguments(
    socket: &Path,
    pid: &Path,
    run_as: Option<(u32, u32)>,
    forwards: &[PortForward],
) -> Vec<String> {
    let mut args = vec![
        "--foreground".to_string(),
        "--one-off".to_string(),
        "--quiet".to_string(),
        "--socket".to_string(),
        socket.display().to_string(),
        "--pid".to_string(),
        pid.display().to_string(),
    ];
    if let Some((uid, gid)) = run_as {
        args.push("--runas".to_string());
        args.push(format!("{uid}:{gid}"));
    }
    for f in forwards {
        args.push(
            match f.protocol {
                Protocol::Tcp => "--tcp-ports",
                Protocol::Udp => "--udp-ports",
            }
            .to_string(),
        );
        args.push(format!("{}:{}", f.host, f.guest));
    }
    args
}

impl Passt {
    /// Starts passt for network device `index` with `forwards`, and waits until it listens.
    /// `jail_user`: the jail's uid and gid, when the VMM is to be jailed.
    pub fn start(
        index: usize,
        forwards: &[PortForward],
        jail_user: Option<(u32, u32)>,
    ) -> Result<Passt, PasstError> {
        let root = euid() == Some(0);
        let run_as = root.then(|| jail_user.unwrap_or_else(nobody));
        let dir = private_dir(&runtime_dir(root), index)?;
        let mut p = Passt {
            child: None,
            socket: dir.join("passt.sock"),
            dir,
        };
        let dir_name = p.dir.display().to_string();
        let dir_err = |source| PasstError::Dir {
            path: dir_name.clone(),
            source,
        };
        if let Some((uid, gid)) = run_as {
            // passt makes its socket as that user.
            std::os::unix::fs::chown(&p.dir, Some(uid), Some(gid)).map_err(dir_err)?;
        }
        let (pid, log) = (p.dir.join("passt.pid"), p.dir.join("passt.log"));
        let out = File::create(&log).map_err(dir_err)?;
        let err = out.try_clone().map_err(dir_err)?;
        let program = std::env::var("VESSEL_PASST").unwrap_or_else(|_| "passt".to_string());
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&program)
                .args(arguments(&p.socket, &pid, run_as, forwards))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .process_group(0)
                .spawn()
                .map_err(|source| PasstError::Spawn {
                    program: program.clone(),
                    source,
                })?
        };
        let pid_of = child.id();
        p.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(Ok(Some(status))) = p.child.as_mut().map(Child::try_wait) {
                return Err(PasstError::Exited {
                    status: status.to_string(),
                    log: log_tail(&log),
                });
            }
            // The pid file comes after the socket listens and the forwards are bound.
            let ready = std::fs::metadata(&pid).is_ok_and(|m| m.len() > 0) && p.socket.exists();
            if ready {
                tracing::info!(
                    "passt for network device {index}: pid {pid_of}, socket {}{}",
                    p.socket.display(),
                    forwards
                        .iter()
                        .map(|f| format!(", forward {f}"))
                        .collect::<String>()
                );
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(PasstError::Timeout {
                    log: log_tail(&log),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where passt listens.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Leaves passt and its directory alone (in the jailed VMM: the keeper, which started it,
    /// ends it).
    pub fn disown(mut self) {
        self.child = None;
        self.dir = PathBuf::new();
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Killed through its handle and never reaped here, so never another process that
            // got its pid: the VMM's main thread may not wait (seccomp), and the process
            // exits right after; whoever inherits the child reaps it.
            let _ = c.kill();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_the_socket_user_and_forwards() {
        let f = ["tcp:8080:80".parse().unwrap(), "udp:5353".parse().unwrap()];
        let a = arguments(Path::new("/d/passt.sock"), Path::new("/d/p.pid"), None, &f);
        assert_eq!(
            a.join(" "),
            "--foreground --one-off --quiet --socket /d/passt.sock --pid /d/p.pid \
             --tcp-ports 8080:80 --udp-ports 5353:5353"
        );
        let a = arguments(Path::new("/s"), Path::new("/p"), Some((1000, 100)), &[]);
        assert!(a.join(" ").ends_with("--runas 1000:100"), "{a:?}");
    }

    #[test]
    fn private_dirs_and_log_tails() {
        let dir = private_dir(&std::env::temp_dir(), 9).unwrap();
        assert!(dir.is_dir());
        std::fs::remove_dir(&dir).unwrap();
        assert!(log_tail(Path::new("/nonexistent")).contains("said nothing"));
        let tail = {
            let p = std::env::temp_dir().join(format!("passt-log-{}", std::process::id()));
            std::fs::write(&p, "Failed to send 3 bytes to syslog\nfirst\n\nsecond\n").unwrap();
            let t = log_tail(&p);
            std::fs::remove_file(&p).unwrap();
            t
        };
        assert_eq!(tail, "first / second");
        assert!(nobody().0 > 0);
    }
}
