//! Dropping privileges: capabilities (bounding set, ambient, then all), groups, gid, uid,
//! `no_new_privs`, dumpability.

use super::{last_os, Error};

/// The highest capability number to drop from the bounding set (the kernel reports its own
/// in /proc/sys/kernel/cap_last_cap; numbers above it are refused with EINVAL and skipped).
const CAP_LAST_GUESS: libc::c_ulong = 63;

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Becomes `uid`:`gid` with no supplementary groups and no capabilities at all, for good.
pub(crate) fn drop_to(uid: u32, gid: u32) -> Result<(), Error> {
    for cap in 0..=CAP_LAST_GUESS {
        // SAFETY: PR_CAPBSET_DROP takes the capability number by value.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(last_os(format!(
                "drop capability {cap} from the bounding set"
            )));
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(last_os("clear the ambient capabilities"));
    }
    // SAFETY: setgroups with a count of 0 reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(last_os("drop the supplementary groups"));
    }
    // SAFETY: setresgid/setresuid take plain ids. These are the raw system calls, for this
    // thread only: the process has no other thread yet (checked by `enter`).
    if unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } != 0 {
        return Err(last_os(format!("become gid {gid}")));
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } != 0 {
        return Err(last_os(format!("become uid {uid}")));
    }
    // Leaving uid 0 cleared the permitted and effective sets; make sure of all three.
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, which live through the call.
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    } != 0
    {
        return Err(last_os("clear the capability sets"));
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS and PR_SET_DUMPABLE take values, no pointers.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(last_os("set no_new_privs"));
        }
        // Not dumpable: no process of the same uid may ptrace it or read its memory.
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(last_os("clear dumpable"));
        }
    }
    // A uid that could become root again would undo all this.
    // SAFETY: setuid(0) with a plain id; it must fail now.
    if unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) } == 0 {
        return Err(Error::Setup(
            "could become root again after dropping".into(),
        ));
    }
    Ok(())
}
