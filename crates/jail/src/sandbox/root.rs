//! The jail's root: a tmpfs holding exactly the VM's files (bound at their own paths), device
//! nodes owned by the jail's user, and /proc; then pivot_root into it and a
//! landlock ruleset over the same files.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use landlock::{
    Access as _, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, ABI,
};

use super::{last_os, os, Access, Error, Exposure, JailSpec};

fn cstr(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path with a NUL byte: {}", p.display())))
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Error> {
    let what = || {
        format!(
            "mount {} on {}",
            src.or(fstype.map(Path::new))
                .unwrap_or(Path::new("-"))
                .display(),
            target.display()
        )
    };
    let src = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).expect("no NUL"));
    let data = data.map(|d| CString::new(d).expect("no NUL"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a NUL-terminated string that lives through the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc != 0 {
        return Err(last_os(what()));
    }
    Ok(())
}

/// Whether `uid`:`gid` (with no supplementary groups) may use the path as `access` asks, by
/// its mode bits, checked before the jail is entered for a clear message.
pub(crate) fn check_access(e: &Exposure, uid: u32, gid: u32) -> Result<(), Error> {
    let (path, need, what) = match e.access {
        Access::Read => (e.path.clone(), 0o4, "read"),
        Access::ReadWrite => (e.path.clone(), 0o6, "read and write"),
        Access::Output if !e.path.exists() => return Ok(()),
        Access::Output => (e.path.clone(), 0o2, "write"),
        Access::SocketDir => (e.path.clone(), 0o3, "create sockets in"),
        Access::Connect => (e.path.clone(), 0o2, "connect to"),
    };
    let m = std::fs::metadata(&path).map_err(os(format!("{}", path.display())))?;
    let need = if m.is_dir() && e.access != Access::SocketDir {
        need | 0o1
    } else {
        need
    };
    let mode = m.permissions().mode() & 0o7777;
    let bits = if m.uid() == uid {
        mode >> 6
    } else if m.gid() == gid {
        mode >> 3
    } else {
        mode
    } & 0o7;
    if bits & need != need {
        return Err(Error::Access {
            uid,
            gid,
            access: what,
            path,
            owner: m.uid(),
            group: m.gid(),
            mode,
        });
    }
    Ok(())
}

/// Creates `p` and the missing directories above it inside the jail's root (root-owned, 0755).
fn make_parents(p: &Path) -> Result<(), Error> {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(os(format!("create {}", parent.display())))?;
    }
    Ok(())
}

/// Builds the jail's root at `base` (an empty directory) and pivots into it.
pub(crate) fn build_and_pivot(
    base: &Path,
    spec: &JailSpec,
    exposures: &[Exposure],
    devices: &[PathBuf],
) -> Result<(), Error> {
    // Nothing done here may reach the host's mount table.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        None,
        base,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )?;
    // /proc of the VMM's PID namespace (its own threads, maps and limits).
    let proc = base.join("proc");
    std::fs::create_dir_all(&proc).map_err(os("create /proc"))?;
    mount(
        None,
        &proc,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    let inside = |p: &Path| base.join(p.strip_prefix("/").unwrap_or(p));
    // Outer paths first: a directory bound later would hide what was bound inside it.
    let mut ordered: Vec<&Exposure> = exposures.iter().collect();
    ordered.sort_by_key(|e| e.path.components().count());
    for e in ordered {
        if e.access == Access::Output && !e.path.exists() {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&e.path)
                .map_err(os(format!("create {}", e.path.display())))?;
            std::os::unix::fs::fchown(&f, Some(spec.uid), Some(spec.gid))
                .map_err(os(format!("chown {}", e.path.display())))?;
        }
        let target = inside(&e.path);
        make_parents(&target)?;
        // The mount point: in the tmpfs, or (inside a directory bound before) the host's own
        // file, which is never written.
        if !target.exists() {
            if e.path.is_dir() {
                std::fs::create_dir(&target)
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map(drop)
            }
            .map_err(os(format!("create {}", target.display())))?;
        }
        mount(
            Some(&e.path),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        let mut flags =
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if e.access == Access::Read {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &target, None, flags, None)?;
    }
    for dev in devices {
        let m = std::fs::metadata(dev).map_err(os(format!("{}", dev.display())))?;
        let target = inside(dev);
        make_parents(&target)?;
        let c = cstr(&target)?;
        // SAFETY: mknod reads a NUL-terminated path that lives through the call.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, m.rdev()) } != 0 {
            return Err(last_os(format!("create device node {}", target.display())));
        }
        std::os::unix::fs::chown(&target, Some(spec.uid), Some(spec.gid))
            .map_err(os(format!("chown {}", target.display())))?;
    }
    // The root itself is read-only from here on (what is bound in keeps its own flags).
    mount(
        None,
        base,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    )?;
    std::env::set_current_dir(base).map_err(os("enter the new root"))?;
    let dot = c".";
    // SAFETY: pivot_root reads two NUL-terminated paths (both "."), which are static.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(os("pivot_root")(e));
        }
        // The host runs from its initramfs (rootfs), which cannot be pivoted away: move the
        // new root over "/" and chroot into it, as switch_root does. With no capabilities
        // left (no CAP_SYS_CHROOT) and no descriptor to the old root, there is no way out.
        let slash = c"/";
        // SAFETY: mount reads the static paths "." and "/"; MS_MOVE takes no data.
        if unsafe {
            libc::mount(
                dot.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(last_os(
                "move the new root over / (the host's root is rootfs)",
            ));
        }
        // SAFETY: chroot reads a static NUL-terminated path.
        if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
            return Err(last_os("chroot into the new root"));
        }
        std::env::set_current_dir("/").map_err(os("chdir /"))?;
        return Ok(());
    }
    // The old root is stacked on the new one at "/": detach it.
    // SAFETY: umount2 reads a static NUL-terminated path.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_os("detach the host's root"));
    }
    std::env::set_current_dir("/").map_err(os("chdir /"))?;
    Ok(())
}

/// Restricts the process, for good, to the exposed files, the device nodes and /proc
/// with landlock (as far as the kernel supports it; nothing on a kernel without it).
pub(crate) fn landlock(exposures: &[Exposure], devices: &[PathBuf]) -> Result<(), Error> {
    let abi = ABI::V5;
    let err = |e: &dyn std::fmt::Display| Error::Setup(format!("landlock: {e}"));
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = Vec::new();
    let read = AccessFs::from_read(abi);
    let all = AccessFs::from_all(abi);
    for e in exposures {
        let access = match e.access {
            Access::Read => read,
            Access::ReadWrite | Access::SocketDir => all,
            Access::Output | Access::Connect => AccessFs::from_file(abi) & !AccessFs::Execute,
        };
        rules.push((e.path.clone(), access));
    }
    for d in devices {
        rules.push((d.clone(), AccessFs::from_file(abi) & !AccessFs::Execute));
    }
    rules.push(("/proc".into(), read));
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    for (path, access) in rules {
        let fd = PathFd::new(&path).map_err(|e| err(&e))?;
        let access = if path.is_dir() {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| err(&e))?;
    }
    ruleset.restrict_self().map_err(|e| err(&e))?;
    Ok(())
}
