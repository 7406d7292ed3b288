//! The fork into the jail: the keeper's side (cgroup, signals, waiting, clean-up) and the
//! VMM's side (namespaces, set-up steps, the new root, the drop).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::cgroup::Cgroup;
use super::{creds, last_os, os, root, Error, JailSpec, NetNs, Plan, Privileged, Role};

/// Signals the keeper passes on to the VMM (and SIGCHLD, which tells it the VMM ended).
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

pub(crate) fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// The directory the jail's root is built on: `/run/vessel/jail/<keeper pid>`.
fn base_dir() -> Result<PathBuf, Error> {
    let parent = if Path::new("/run").is_dir() {
        PathBuf::from("/run/vessel/jail")
    } else {
        std::env::temp_dir().join("vessel-jail")
    };
    std::fs::create_dir_all(&parent).map_err(os(format!("create {}", parent.display())))?;
    let base = parent.join(std::process::id().to_string());
    // A keeper with this PID that died before cleaning up left an empty directory.
    let _ = std::fs::remove_dir(&base);
    std::fs::create_dir(&base).map_err(os(format!("create {}", base.display())))?;
    Ok(base)
}

/// What the keeper made for the VMM, removed once the VMM has ended (or could not start).
struct Made {
    cgroup: Option<Cgroup>,
    base: Option<PathBuf>,
}

impl Made {
    fn remove(self) {
        if let Some(base) = &self.base {
            let _ = std::fs::remove_dir(base);
        }
        if let Some(cg) = self.cgroup {
            cg.remove();
        }
    }
}

/// The life pipe: the keeper holds the write end until it ends, so the VMM's read end hangs
/// up once the keeper is gone.
fn life_pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let mut life = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into `life`.
    if unsafe { libc::pipe2(life.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_os("pipe"));
    }
    // SAFETY: both descriptors are new and owned here alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(life[0]), OwnedFd::from_raw_fd(life[1])) })
}

pub(crate) fn fork_into_jail(plan: Plan) -> Result<Role, Error> {
    let Plan {
        spec,
        exposures,
        devices,
        privileged,
    } = plan;
    let (life_r, life_w) = life_pipe()?;
    let mut made = Made {
        cgroup: None,
        base: None,
    };
    if spec.cgroup.is_some() || spec.limits.any() {
        let name = spec
            .cgroup
            .clone()
            .unwrap_or_else(|| format!("vessel/{}", std::process::id()));
        made.cgroup = Some(Cgroup::create(&name, &spec.limits)?);
    }
    // The keeper joins an existing network namespace too: the set-up steps look there, and
    // their undoing runs there.
    if let Some(NetNs::Path(p)) = &spec.netns {
        if let Err(e) = enter_netns(p) {
            made.remove();
            return Err(e);
        }
    }
    let mut steps = privileged;
    let needed: Vec<bool> = steps.iter_mut().map(|s| s.needed(&spec)).collect();
    match base_dir() {
        Ok(b) => made.base = Some(b),
        Err(e) => {
            made.remove();
            return Err(e);
        }
    }
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    // SAFETY: a zeroed sigset is a valid out-parameter for the old mask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigprocmask reads `set` and writes `old`, both ours. From here the keeper takes
    // these signals with sigwaitinfo; the VMM restores the old mask.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) };
    // SAFETY: unshare takes flags only; CLONE_NEWPID puts the children made from now on in a
    // new PID namespace, the keeper itself stays where it is.
    let forked = if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        Err(last_os("new PID namespace"))
    } else {
        // SAFETY: the process has one thread (checked by `enter`), so the child is a whole copy.
        match unsafe { libc::fork() } {
            -1 => Err(last_os("fork")),
            pid => Ok(pid),
        }
    };
    let pid = match forked {
        Ok(0) => {
            // The old mask, but SIGINT and SIGTERM stay blocked until the VMM has its handlers
            // (it lets them in then, `super::let_in`): as PID 1 of its namespace it would drop
            // them before.
            let mut mask = old;
            // SAFETY: sigaddset adds to the set we own; sigprocmask reads it.
            unsafe {
                libc::sigaddset(&mut mask, libc::SIGINT);
                libc::sigaddset(&mut mask, libc::SIGTERM);
                libc::sigprocmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
            }
            let setups = steps
                .iter_mut()
                .zip(&needed)
                .filter(|(_, n)| **n)
                .map(|(s, _)| s);
            drop(life_w);
            let base = made.base.as_deref().expect("made above");
            become_vmm(
                &spec,
                base,
                made.cgroup.as_ref(),
                setups,
                &exposures,
                &devices,
                &life_r,
            )?;
            return Ok(Role::Vmm);
        }
        Ok(pid) => pid,
        Err(e) => {
            // SAFETY: restores the mask saved above.
            unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
            made.remove();
            return Err(e);
        }
    };
    drop(life_r);
    tracing::debug!(
        "jail: VMM is process {pid} (uid {}, gid {})",
        spec.uid,
        spec.gid
    );
    let code = wait_for(pid, &set);
    if spec.netns != Some(NetNs::New) {
        for (step, _) in steps.iter_mut().zip(&needed).filter(|(_, n)| **n) {
            step.undo();
        }
    }
    made.remove();
    drop(life_w);
    Ok(Role::Keeper(code))
}

/// Sets the parent-death signal (SIGKILL) and checks the keeper did not die before: the VMM
/// is PID 1 of its namespace, where getppid says 0 whatever happened.
fn die_with_keeper(keeper: &OwnedFd) -> Result<(), Error> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if !keeper_alive(keeper) {
        return Err(Error::Setup(
            "the keeper died while the jail was set up".into(),
        ));
    }
    Ok(())
}

/// Whether the keeper still holds its end of the life pipe (`keeper`: the read end).
fn keeper_alive(keeper: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: keeper.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, ours, and does not wait (timeout 0).
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

/// Waits for the VMM, passing the forwarded signals on; its exit code (128 + the signal
/// when a signal ended it).
fn wait_for(pid: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        // SAFETY: a zeroed siginfo is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: sigwaitinfo reads the set and writes `info`, both ours.
        let sig = unsafe { libc::sigwaitinfo(set, &mut info) };
        if FORWARDED.contains(&sig) {
            // SAFETY: kill takes plain values; `pid` is our child, not yet reaped.
            unsafe { libc::kill(pid, sig) };
            continue;
        }
        if sig != libc::SIGCHLD {
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status into `status`.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => continue,
            -1 => return 1,
            _ if libc::WIFEXITED(status) => return libc::WEXITSTATUS(status),
            _ if libc::WIFSIGNALED(status) => return 128 + libc::WTERMSIG(status),
            _ => continue,
        }
    }
}

fn enter_netns(path: &Path) -> Result<(), Error> {
    let f =
        std::fs::File::open(path).map_err(os(format!("network namespace {}", path.display())))?;
    // SAFETY: setns takes the descriptor (ours, open) and a flag.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(last_os(format!(
            "enter network namespace {}",
            path.display()
        )));
    }
    Ok(())
}

/// The VMM's side: namespaces, cgroup, set-up steps, the new root, the drop.
fn become_vmm<'a>(
    spec: &JailSpec,
    base: &Path,
    cgroup: Option<&Cgroup>,
    setups: impl Iterator<Item = &'a mut Box<dyn Privileged>>,
    exposures: &[super::Exposure],
    devices: &[PathBuf],
    keeper: &OwnedFd,
) -> Result<(), Error> {
    die_with_keeper(keeper)?;
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // (An existing network namespace was joined by the keeper before the fork.)
    if spec.netns == Some(NetNs::New) {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(last_os("new mount, IPC, UTS namespaces"));
    }
    if let Some(cg) = cgroup {
        cg.join()?;
    }
    for step in setups {
        step.setup(spec)
            .map_err(|e| Error::Setup(format!("{}: {e}", step.name())))?;
    }
    root::build_and_pivot(base, spec, exposures, devices)?;
    creds::drop_to(spec.uid, spec.gid)?;
    // A change of credentials clears the parent-death signal: set it again.
    die_with_keeper(keeper)?;
    root::landlock(exposures, devices)?;
    super::test_hook();
    Ok(())
}
