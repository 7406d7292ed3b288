//! Where the daemon keeps things.
//!
//! ```text
//! STATE/vessel.db                  templates, VMs, events (SQLite)
//! STATE/vms/NAME/disk-N.qcow2      the VM's disks (thin overlays on its template's bases)
//! STATE/vms/NAME/vm.json           the document its process boots (spec and bindings)
//! STATE/vms/NAME/vm.log            its process's output (rotated at 4 MiB)
//! STATE/vms/NAME/seed.img          its cloud-init seed (CIDATA), if it has one
//! STATE/vms/NAME/snapshots/SNAP/   a snapshot: state, memory, the disks frozen then
//! STATE/templates/NAME/disk-N.qcow2  the bases of a template made from a VM
//! STATE/images/                    the `default` storage pool
//! STATE/networks/NAME/             a network's dnsmasq files: conf, hosts, leases, log
//! RUN/vessel.sock                  the daemon's API
//! RUN/vms/NAME/api.sock            the VM's own API
//! RUN/vms/NAME/console.sock        its serial console (with scrollback)
//! ```
//!
//! STATE is `/var/lib/vessel` for root, else `$XDG_STATE_HOME/vessel` (or
//! `~/.local/state/vessel`); RUN is `/run/vessel` for root, else `$XDG_RUNTIME_DIR/vessel`.

use std::path::{Path, PathBuf};

/// The daemon's directories.
#[derive(Debug, Clone)]
pub struct Layout {
    pub state: PathBuf,
    pub run: PathBuf,
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The default state directory.
pub fn default_state() -> PathBuf {
    if is_root() {
        return "/var/lib/vessel".into();
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vessel"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/state/vessel"),
    }
}

/// The default runtime directory.
pub fn default_run() -> PathBuf {
    if is_root() {
        return "/run/vessel".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vessel"),
        _ => std::env::temp_dir().join(format!("vessel-{}", rustix::process::geteuid().as_raw())),
    }
}

/// The daemon's socket by default: `$VESSEL_SOCKET`, else RUN/vessel.sock.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("VESSEL_SOCKET") {
        Some(s) if !s.is_empty() => s.into(),
        _ => default_run().join("vessel.sock"),
    }
}

impl Layout {
    pub fn db(&self) -> PathBuf {
        self.state.join("vessel.db")
    }
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state.join("vms").join(name)
    }
    pub fn template_dir(&self, name: &str) -> PathBuf {
        self.state.join("templates").join(name)
    }
    pub fn vm_run(&self, name: &str) -> PathBuf {
        self.run.join("vms").join(name)
    }
    pub fn vm_config(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vm.json")
    }
    pub fn vm_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vm.log")
    }
    /// The log as it was before its last rotation.
    pub fn vm_log_rotated(&self, name: &str) -> PathBuf {
        self.vm_log(name).with_extension("log.1")
    }
    /// The files the daemon writes for a VM beside its disks: its document and its logs.
    pub fn vm_files(&self, name: &str) -> [PathBuf; 3] {
        [
            self.vm_config(name),
            self.vm_log(name),
            self.vm_log_rotated(name),
        ]
    }
    pub fn api_socket(&self, name: &str) -> PathBuf {
        self.vm_run(name).join("api.sock")
    }
    pub fn console_socket(&self, name: &str) -> PathBuf {
        self.vm_run(name).join("console.sock")
    }
    pub fn disk(&self, name: &str, index: usize) -> PathBuf {
        self.vm_dir(name).join(format!("disk-{index}.qcow2"))
    }

    /// Creates the directories (private to the daemon's user).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [
            &self.state,
            &self.state.join("vms"),
            &self.run,
            &self.run.join("vms"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
        }
        Ok(())
    }
}

/// Makes `dir` readable by other users (0755), and its parent and grandparent traversable:
/// a network's dnsmasq, which drops to `nobody`, reads its files there (STATE/networks/NAME).
pub fn readable_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode: u32| -> std::io::Result<()> {
        let now = std::fs::metadata(p)?.permissions().mode() & 0o7777;
        if now | mode != now {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(now | mode))?;
        }
        Ok(())
    };
    set(dir, 0o755)?;
    if let Some(parent) = dir.parent() {
        set(parent, 0o711)?;
        if let Some(gp) = parent.parent() {
            set(gp, 0o711)?;
        }
    }
    Ok(())
}

/// Checks a VM or template name: 1 to 63 of `a-z A-Z 0-9 - _ .`, not starting with `.` or
/// `-` (it names files and directories).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a name: 1 to 63 letters, digits, '-', '_' or '.', not starting \
             with '.' or '-'"
        ))
    }
}

/// Moves `log` to `log.1` when it has grown past 4 MiB.
pub fn rotate_log(log: &Path) {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > 4 << 20) {
        let _ = std::fs::rename(log, log.with_extension("log.1"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["web1", "a", "db-2.prod_x"] {
            check_name(good).unwrap();
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "..", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
