//! How the daemon jails its VMs (`vessel daemon [--vm-jail SPEC] [--vm-uids FIRST-LAST]`):
//! every VM's `vessel` process runs in the jail of the trust issue, as one user for all VMs
//! (the spec's `uid`/`gid`) or, with a range, as a user of its own (uid = gid, the lowest
//! free in the range, kept in its record), so that one VMM taken over by its guest cannot
//! touch another VM's files, as Firecracker's jailer advises.

use std::path::Path;

use crate::store::VmRecord;

/// Errors of the jail settings.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--vm-jail: {0}")]
    Spec(String),
    #[error("--vm-uids {0}: expected FIRST-LAST, two user ids above 0 in order")]
    Range(String),
    #[error("no free user id left in --vm-uids {0}-{1}")]
    Exhausted(u32, u32),
}

/// The daemon's jail for its VMs.
#[derive(Debug, Clone)]
pub struct VmJail {
    /// The spec without its `uid` and `gid`.
    rest: String,
    /// One user and group for every VM.
    fixed: Option<(u32, u32)>,
    /// A user of its own for each VM, from this range.
    range: Option<(u32, u32)>,
}

/// Parses `--vm-uids FIRST-LAST`.
pub fn parse_range(s: &str) -> Result<(u32, u32), JailError> {
    let bad = || JailError::Range(s.to_string());
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

fn check(spec: &str) -> Result<jail::sandbox::JailSpec, JailError> {
    jail::sandbox::JailSpec::parse(spec, |s| spec::cli::memory(s).map_err(|e| e.to_string()))
        .map_err(|e| JailError::Spec(e.to_string()))
}

impl VmJail {
    /// The jail from the daemon's options (none without `--vm-jail`).
    pub fn new(
        spec: Option<String>,
        uids: Option<(u32, u32)>,
    ) -> Result<Option<VmJail>, JailError> {
        let spec = match (spec, uids) {
            (None, None) => return Ok(None),
            (None, Some(_)) => String::new(),
            (Some(s), _) => s,
        };
        let rest: Vec<&str> = spec
            .split(',')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("uid=") && !kv.starts_with("gid="))
            .collect();
        let rest = rest.join(",");
        let fixed = match uids {
            Some((first, _)) => {
                check(&format!("uid={first},gid={first},{rest}"))?;
                None
            }
            None => {
                let s = check(&spec)?;
                Some((s.uid, s.gid))
            }
        };
        Ok(Some(VmJail {
            rest,
            fixed,
            range: uids,
        }))
    }

    /// Gives `vm` a user of its own if the range says so and it has none: the lowest not
    /// taken by `others`.
    pub fn allocate<'a>(
        &self,
        vm: &mut VmRecord,
        others: impl Iterator<Item = &'a VmRecord>,
    ) -> Result<(), JailError> {
        let Some((first, last)) = self.range else {
            return Ok(());
        };
        if vm.jail_uid.is_some_and(|u| (first..=last).contains(&u)) {
            return Ok(());
        }
        let taken: std::collections::HashSet<u32> = others
            .filter(|o| o.name != vm.name)
            .filter_map(|o| o.jail_uid)
            .collect();
        let free = (first..=last)
            .find(|u| !taken.contains(u))
            .ok_or(JailError::Exhausted(first, last))?;
        vm.jail_uid = Some(free);
        Ok(())
    }

    /// The user and group `vm`'s VMM runs as ([`Self::allocate`] first).
    pub fn ids(&self, vm: &VmRecord) -> Option<(u32, u32)> {
        self.fixed.or_else(|| vm.jail_uid.map(|u| (u, u)))
    }

    /// `--jail SPEC` for `vm`'s process.
    pub fn args(&self, vm: &VmRecord) -> Vec<String> {
        let Some((u, g)) = self.ids(vm) else {
            return Vec::new();
        };
        let spec = if self.rest.is_empty() {
            format!("uid={u},gid={g}")
        } else {
            format!("uid={u},gid={g},{}", self.rest)
        };
        vec!["--jail".into(), spec]
    }
}

/// Gives `path` and everything below it to `uid`:`gid` (symbolic links themselves).
pub fn give(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use rustix::fs::{chownat, AtFlags, CWD};
    use rustix::process::{Gid, Uid};
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    chownat(CWD, path, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for e in std::fs::read_dir(path)? {
            give(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, uid: Option<u32>) -> VmRecord {
        let mut v: VmRecord = serde_json::from_value(serde_json::json!({
            "name": name, "template": "t", "spec": {}, "disks": [], "desired": "stopped",
            "restart": "never", "autostart": false, "autostart_order": 0, "pid": null,
            "created": 0
        }))
        .unwrap();
        v.jail_uid = uid;
        v
    }

    #[test]
    fn one_user_for_all_or_one_each() {
        let all = VmJail::new(Some("uid=900,gid=901,pids-max=64".into()), None)
            .unwrap()
            .unwrap();
        let mut a = vm("a", None);
        all.allocate(&mut a, [].iter()).unwrap();
        assert_eq!(a.jail_uid, None);
        assert_eq!(all.args(&a), ["--jail", "uid=900,gid=901,pids-max=64"]);

        let each = VmJail::new(Some("pids-max=64".into()), Some((5000, 5002)))
            .unwrap()
            .unwrap();
        let others = [vm("x", Some(5000)), vm("y", Some(5002))];
        all.allocate(&mut a, others.iter()).unwrap();
        each.allocate(&mut a, others.iter()).unwrap();
        assert_eq!(a.jail_uid, Some(5001));
        assert_eq!(each.args(&a), ["--jail", "uid=5001,gid=5001,pids-max=64"]);
        // Kept once given; none left for another.
        each.allocate(&mut a, others.iter()).unwrap();
        assert_eq!(a.jail_uid, Some(5001));
        let mut b = vm("b", None);
        let all3 = [vm("x", Some(5000)), vm("y", Some(5002)), a.clone()];
        assert!(matches!(
            each.allocate(&mut b, all3.iter()),
            Err(JailError::Exhausted(5000, 5002))
        ));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert_eq!(
            VmJail::new(None, Some((7, 8)))
                .unwrap()
                .unwrap()
                .args(&vm("a", Some(7))),
            ["--jail", "uid=7,gid=7"]
        );
        assert!(
            VmJail::new(Some("pids-max=64".into()), None).is_err(),
            "no uid"
        );
        assert!(VmJail::new(Some("uid=1,gid=1,bogus=1".into()), None).is_err());
        for r in ["", "5", "0-9", "9-5", "a-b"] {
            assert!(parse_range(r).is_err(), "{r}");
        }
        assert_eq!(parse_range("100000-165535").unwrap(), (100000, 165535));
    }
}
