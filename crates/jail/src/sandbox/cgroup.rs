//! The VMM's cgroup v2: created by the keeper with the limits asked for, joined by the VMM,
//! removed by the keeper once the VMM has ended.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors with a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup v2 hierarchy is mounted (cgroup2 in /proc/self/mountinfo)")]
    NoHierarchy,
    #[error("controller '{controller}' is not available in {dir} (it offers: {offered}); on a host with cgroup v1 controllers, boot with systemd.unified_cgroup_hierarchy=1")]
    Controller {
        controller: &'static str,
        dir: PathBuf,
        offered: String,
    },
    #[error("{0} already holds processes")]
    InUse(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the caller's configuration is at fault rather than the host.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::InUse(_))
    }
}

/// Limits written to the cgroup's interface files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// `memory.max`, bytes.
    pub memory_max: Option<u64>,
    /// `cpu.max`: quota and period, microseconds.
    pub cpu_max: Option<(u64, u64)>,
    /// `pids.max`: threads and processes.
    pub pids_max: Option<u64>,
}

impl Limits {
    fn controllers(&self) -> Vec<&'static str> {
        let mut c = Vec::new();
        if self.memory_max.is_some() {
            c.push("memory");
        }
        if self.cpu_max.is_some() {
            c.push("cpu");
        }
        if self.pids_max.is_some() {
            c.push("pids");
        }
        c
    }

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        !self.controllers().is_empty()
    }
}

/// The default period of `cpu.max`, microseconds.
const CPU_PERIOD: u64 = 100_000;

/// Parses `cpu-max=`: `150%` (of one CPU) or `QUOTA/PERIOD` in microseconds.
pub fn parse_cpu_max(v: &str) -> Result<(u64, u64), String> {
    let bad = || {
        format!("cpu-max={v}: expected PERCENT% (of one CPU, e.g. 150%) or QUOTA/PERIOD in microseconds")
    };
    let (quota, period) = if let Some(p) = v.strip_suffix('%') {
        let pct: u64 = p.parse().map_err(|_| bad())?;
        (pct * CPU_PERIOD / 100, CPU_PERIOD)
    } else {
        let (q, p) = v.split_once('/').ok_or_else(bad)?;
        (q.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?)
    };
    // The kernel's bounds: a period of 1 ms to 1 s, a quota of at least 1 ms.
    if !(1_000..=1_000_000).contains(&period) || quota < 1_000 {
        return Err(bad());
    }
    Ok((quota, period))
}

/// A cgroup made for a VMM.
#[derive(Debug)]
pub struct Cgroup {
    pub dir: PathBuf,
    /// Whether it was made here (and so is removed here).
    created: bool,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// The mount point of the cgroup v2 hierarchy, from a mountinfo text.
fn hierarchy(mountinfo: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        // The unified hierarchy's usual place first.
        .min_by_key(|p| p != Path::new("/sys/fs/cgroup"))
}

impl Cgroup {
    /// Creates (or takes, when empty) `name` below the cgroup v2 root, enables the
    /// controllers the limits need on the way down, and writes the limits.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, Error> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
        let root = hierarchy(&info).ok_or(Error::NoHierarchy)?;
        let dir = root.join(name);
        let controllers = limits.controllers();
        // Each level down from the root must offer the controllers and hand them on.
        let mut at = root.clone();
        for part in Path::new(name).components() {
            let offered =
                std::fs::read_to_string(at.join("cgroup.controllers")).map_err(io("read", &at))?;
            for c in &controllers {
                if !offered.split_whitespace().any(|o| o == *c) {
                    return Err(Error::Controller {
                        controller: c,
                        dir: at.clone(),
                        offered: offered.trim().to_string(),
                    });
                }
            }
            if !controllers.is_empty() {
                let enable: Vec<String> = controllers.iter().map(|c| format!("+{c}")).collect();
                let control = at.join("cgroup.subtree_control");
                std::fs::write(&control, enable.join(" ")).map_err(io("write", &control))?;
            }
            at.push(part);
            if !at.exists() && at != dir {
                std::fs::create_dir(&at).map_err(io("create", &at))?;
            }
        }
        let created = match std::fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let procs =
                    std::fs::read_to_string(dir.join("cgroup.procs")).map_err(io("read", &dir))?;
                if !procs.trim().is_empty() {
                    return Err(Error::InUse(dir));
                }
                false
            }
            Err(e) => return Err(io("create", &dir)(e)),
        };
        let cg = Cgroup { dir, created };
        let mut writes = Vec::new();
        if let Some(m) = limits.memory_max {
            writes.push(("memory.max", m.to_string()));
        }
        if let Some((q, p)) = limits.cpu_max {
            writes.push(("cpu.max", format!("{q} {p}")));
        }
        if let Some(n) = limits.pids_max {
            writes.push(("pids.max", n.to_string()));
        }
        for (file, value) in writes {
            let path = cg.dir.join(file);
            std::fs::write(&path, value).map_err(io("write", &path))?;
        }
        Ok(cg)
    }

    /// Moves the calling process into the cgroup.
    pub fn join(&self) -> Result<(), Error> {
        let procs = self.dir.join("cgroup.procs");
        // "0" is the writing process, whatever its PID namespace calls it.
        std::fs::write(&procs, "0").map_err(io("join", &procs))
    }

    /// Removes the cgroup once its processes are gone (they leave it as they are reaped).
    pub fn remove(self) {
        if !self.created {
            return;
        }
        let events = self.dir.join("cgroup.events");
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    // Exiting tasks leave the cgroup a moment after their parent reaped
                    // them; `cgroup.events` says when it is empty.
                    let populated = std::fs::read_to_string(&events)
                        .map(|s| s.contains("populated 1"))
                        .unwrap_or(false);
                    std::thread::sleep(Duration::from_millis(if populated { 5 } else { 1 }));
                }
                Err(e) => {
                    eprintln!(
                        "vessel: warning: jail: cannot remove cgroup {}: {e}",
                        self.dir.display()
                    );
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_parses_percent_and_quota() {
        assert_eq!(parse_cpu_max("50%").unwrap(), (50_000, 100_000));
        assert_eq!(parse_cpu_max("250%").unwrap(), (250_000, 100_000));
        assert_eq!(parse_cpu_max("20000/50000").unwrap(), (20_000, 50_000));
        for bad in ["0%", "x%", "100", "1/1", "5000/2000000", "-1/100000"] {
            assert!(parse_cpu_max(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_unified_hierarchy_is_found_in_mountinfo() {
        let hybrid = "\
35 25 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory";
        assert_eq!(
            hierarchy(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "\
30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw
31 25 0:27 / /mnt/other rw - cgroup2 cgroup2 rw";
        assert_eq!(hierarchy(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(hierarchy("1 2 0:1 / / rw - ext4 /dev/sda rw"), None);
    }

    #[test]
    fn limits_name_their_controllers() {
        let l = Limits {
            memory_max: Some(1 << 30),
            cpu_max: None,
            pids_max: Some(10),
        };
        assert_eq!(l.controllers(), ["memory", "pids"]);
        assert!(!Limits::default().any());
    }
}
