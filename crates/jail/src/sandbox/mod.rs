//! The jail: a VMM process confined the way Firecracker's jailer confines it, in-process.
//!
//! [`enter`] is called by a privileged `vessel` before any thread starts. It forks:
//! - the **keeper** (the original process) creates the VM's cgroup, waits for the VMM, passes
//!   SIGINT/SIGTERM/SIGHUP on to it, and once it has ended removes the cgroup and the jail's
//!   directory and ends with the VMM's exit code;
//! - the **VMM** is PID 1 of a new PID namespace, in new mount, IPC and UTS namespaces (and a
//!   new or given network namespace). It joins the cgroup, runs the privileged set-up steps
//!   it was given (taps), builds a new root on a tmpfs that holds exactly the files the VM
//!   needs, bound at their own paths (read-only where the VM only reads), its own `/dev/kvm`
//!   and `/dev/net/tun` nodes owned by the jail's user and a `/proc` of its namespace
//!   (nothing else: no /tmp, no /etc), pivots into it, drops every capability (bounding set included), takes the
//!   jail's uid and gid with no supplementary groups, sets `no_new_privs`, stops being
//!   dumpable, and adds a landlock ruleset over the same files. Then it goes on to build and
//!   run the VM, opening everything by its usual path.
//!
//! Paths given to the VMM must be absolute (the caller canonicalises them) since the jail's
//! root holds them at the same place.

mod cgroup;
mod creds;
mod keeper;
mod root;

use std::path::{Path, PathBuf};

pub use cgroup::Limits;

/// Errors setting a jail up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("jail: {0}")]
    Invalid(String),
    #[error("jail: {what}: {source}")]
    Os {
        what: String,
        source: std::io::Error,
    },
    #[error("jail: uid {uid} gid {gid} cannot {access} {path} (owner {owner}:{group}, mode {mode:04o}): give the jail's user access to it, or choose another uid=/gid=")]
    Access {
        uid: u32,
        gid: u32,
        access: &'static str,
        path: PathBuf,
        owner: u32,
        group: u32,
        mode: u32,
    },
    #[error("jail: cgroup: {0}")]
    Cgroup(#[from] cgroup::Error),
    #[error("jail: {0}")]
    Setup(String),
}

impl Error {
    /// Whether the error is the caller's configuration (exit code 2) rather than the host's.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Invalid(_) | Error::Access { .. })
            || matches!(self, Error::Cgroup(e) if e.is_config())
    }
}

pub(crate) fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Os { what, source }
}

/// The last OS error as an [`Error`] about `what`.
pub(crate) fn last_os(what: impl Into<String>) -> Error {
    os(what)(std::io::Error::last_os_error())
}

/// Where the VMM's network namespace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetNs {
    /// A new, empty one (only loopback, down): taps made in it are the VM's alone.
    New,
    /// An existing one, e.g. `/run/netns/NAME` (`ip netns add NAME`).
    Path(PathBuf),
}

/// How a VMM is jailed: who it runs as, and what it may use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JailSpec {
    /// The unprivileged user and group the VMM runs as (never 0).
    pub uid: u32,
    pub gid: u32,
    /// Network namespace; `None` keeps the host's.
    pub netns: Option<NetNs>,
    /// The cgroup (a path below the cgroup v2 root) the VMM runs in; `None` with limits
    /// picks `vessel/<pid of the keeper>`.
    pub cgroup: Option<String>,
    /// cgroup v2 limits.
    pub limits: Limits,
}

impl JailSpec {
    /// Parses `uid=N,gid=N[,netns=new|PATH][,cgroup=PATH][,memory-max=SIZE]
    /// [,cpu-max=PERCENT%|QUOTA/PERIOD][,pids-max=N]`; sizes through `size`.
    pub fn parse(s: &str, size: impl Fn(&str) -> Result<u64, String>) -> Result<JailSpec, Error> {
        let bad = |m: String| Error::Invalid(format!("--jail {s}: {m}"));
        let num = |k: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|_| bad(format!("{k}={v}: expected a number")))
        };
        let (mut uid, mut gid) = (None, None);
        let mut spec = JailSpec::default();
        for kv in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("'{kv}': expected key=value")))?;
            match k {
                "uid" => uid = Some(num(k, v)?),
                "gid" => gid = Some(num(k, v)?),
                "netns" => {
                    spec.netns = Some(match v {
                        "new" => NetNs::New,
                        p if p.starts_with('/') => NetNs::Path(p.into()),
                        _ => return Err(bad(format!("netns={v}: expected new or a path"))),
                    })
                }
                "cgroup" => {
                    let p = v.trim_matches('/');
                    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                        return Err(bad(format!("cgroup={v}: expected a path like vessel/vm1")));
                    }
                    spec.cgroup = Some(p.to_string())
                }
                "memory-max" => {
                    spec.limits.memory_max = Some(size(v).map_err(|e| bad(format!("{k}: {e}")))?)
                }
                "cpu-max" => spec.limits.cpu_max = Some(cgroup::parse_cpu_max(v).map_err(bad)?),
                "pids-max" => spec.limits.pids_max = Some(u64::from(num(k, v)?)),
                _ => {
                    return Err(bad(format!(
                        "unknown key '{k}' (uid, gid, netns, cgroup, memory-max, cpu-max, pids-max)"
                    )))
                }
            }
        }
        match (uid, gid) {
            (Some(0), _) | (_, Some(0)) => Err(bad(
                "uid and gid must not be 0: the jail runs the VMM unprivileged".into(),
            )),
            (Some(u), Some(g)) => {
                spec.uid = u;
                spec.gid = g;
                Ok(spec)
            }
            _ => Err(bad(
                "uid=N and gid=N are required (the VMM's own unprivileged user: give each VM its own)"
                    .into(),
            )),
        }
    }
}

/// How the VMM may use a host path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read it (a kernel, a read-only disk, a backing file, a snapshot to restore).
    Read,
    /// Read and write it (a disk, a directory snapshots are written to).
    ReadWrite,
    /// A file the VMM appends to, created (owned by the jail's user) if absent: a console log.
    Output,
    /// A directory the VMM creates sockets in (the API socket, a socket console, vsock).
    SocketDir,
    /// A listening Unix socket the VMM connects to (a network device's stream socket, such as
    /// passt's): the socket itself is bound into the jail, and needs write permission.
    Connect,
}

/// A host path the jailed VMM needs, at the same path inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    pub path: PathBuf,
    pub access: Access,
}

/// A step that needs privileges the VMM gives up (making its taps).
pub trait Privileged {
    /// What it is, for error messages.
    fn name(&self) -> String;
    /// In the keeper, before the fork (in the VMM's network namespace when it is an existing
    /// one): whether there is anything to do.
    fn needed(&mut self, spec: &JailSpec) -> bool;
    /// In the VMM, in its namespaces, before it drops its privileges.
    fn setup(&mut self, spec: &JailSpec) -> Result<(), String>;
    /// In the keeper once the VMM has ended, when it was needed and its network namespace
    /// outlives it (not a new one, which goes with the VMM and everything in it).
    fn undo(&mut self);
}

/// Everything [`enter`] needs.
pub struct Plan {
    pub spec: JailSpec,
    pub exposures: Vec<Exposure>,
    /// Device nodes to give the VMM (`/dev/kvm` always).
    pub devices: Vec<PathBuf>,
    pub privileged: Vec<Box<dyn Privileged>>,
}

/// What the caller of [`enter`] is afterwards.
#[derive(Debug)]
pub enum Role {
    /// The keeper, once the VMM has ended: this is the exit code to end with.
    Keeper(i32),
    /// The jailed VMM: go on.
    Vmm,
}

/// Jails the process (see the module's documentation). Call before any other thread starts.
pub fn enter(mut plan: Plan) -> Result<Role, Error> {
    if euid() != 0 {
        return Err(Error::Invalid(
            "needs root to set up (namespaces, a new root, cgroups); it then runs the VMM as uid=/gid="
                .into(),
        ));
    }
    if threads() > 1 {
        return Err(Error::Setup(
            "entered after other threads started (a bug in Vessel)".into(),
        ));
    }
    let spec = plan.spec.clone();
    for e in &plan.exposures {
        root::check_access(e, spec.uid, spec.gid)?;
    }
    if !plan.devices.iter().any(|d| d == Path::new("/dev/kvm")) {
        plan.devices.insert(0, "/dev/kvm".into());
    }
    keeper::fork_into_jail(plan)
}

/// This process's effective uid.
fn euid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// The number of threads of this process (from /proc), 0 if unknown.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Unblocks `signals` on the calling thread, once their handlers are in place: a jailed VMM
/// starts with SIGINT and SIGTERM blocked, since as PID 1 of its PID namespace it would drop
/// a signal that has no handler yet, where a blocked one waits.
pub fn let_in(signals: &[libc::c_int]) {
    let set = keeper::sigset(signals);
    // SAFETY: pthread_sigmask reads the set, ours, and changes only this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// A fault-injection point for tests: with `VESSEL_TEST_JAIL_OPEN=PATH` the jailed VMM tries
/// to open PATH (as a compromised VMM would) and reports the outcome on stderr.
pub(crate) fn test_hook() {
    if let Ok(p) = std::env::var("VESSEL_TEST_JAIL_OPEN") {
        match std::fs::File::open(&p) {
            Ok(_) => eprintln!("vessel: test: jailed VMM opened {p}"),
            Err(e) => eprintln!("vessel: test: jailed VMM cannot open {p}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(s: &str) -> Result<u64, String> {
        s.strip_suffix('M')
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n << 20)
            .ok_or_else(|| format!("bad size {s}"))
    }

    #[test]
    fn specs_parse() {
        let s = JailSpec::parse(
            "uid=1000,gid=1001,netns=new,cgroup=/vessel/vm1/,memory-max=512M,cpu-max=150%,pids-max=64",
            size,
        )
        .unwrap();
        assert_eq!((s.uid, s.gid), (1000, 1001));
        assert_eq!(s.netns, Some(NetNs::New));
        assert_eq!(s.cgroup.as_deref(), Some("vessel/vm1"));
        assert_eq!(s.limits.memory_max, Some(512 << 20));
        assert_eq!(s.limits.cpu_max, Some((150_000, 100_000)));
        assert_eq!(s.limits.pids_max, Some(64));
        let s =
            JailSpec::parse("uid=5,gid=6,netns=/run/netns/a,cpu-max=20000/50000", size).unwrap();
        assert_eq!(s.netns, Some(NetNs::Path("/run/netns/a".into())));
        assert_eq!(s.limits.cpu_max, Some((20_000, 50_000)));
        for bad in [
            "",
            "uid=1000",
            "uid=0,gid=1",
            "uid=1,gid=0",
            "uid=x,gid=1",
            "uid=1,gid=1,netns=foo",
            "uid=1,gid=1,cgroup=../x",
            "uid=1,gid=1,memory-max=lots",
            "uid=1,gid=1,cpu-max=0%",
            "uid=1,gid=1,colour=blue",
            "uid=1,gid=1,nokey",
        ] {
            let e = JailSpec::parse(bad, size).unwrap_err();
            assert!(e.is_config(), "{bad}: {e}");
        }
    }
}
