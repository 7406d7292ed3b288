//! The system calls each thread class may make. Everything else traps (mode `on`) or is
//! logged by the kernel (mode `log`).
//!
//! The lists were found by running the whole direct test suite with `VESSEL_SECCOMP=log`
//! and reading the kernel's seccomp log (thread name and system call of every call outside
//! the lists), then kept as narrow as that allows.

use super::ThreadClass;

/// A system call: its number and its name (for the report of a forbidden call).
pub type Syscall = (i64, &'static str);

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

/// What every thread does: memory, locks, time, signals, polling and closing what it has,
/// and ending.
const BASE: &[Syscall] = syscalls![
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_close,
    SYS_futex,
    SYS_exit,
    SYS_exit_group,
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_brk,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_sched_yield,
    SYS_getrandom,
    SYS_gettid,
    SYS_getpid,
    SYS_tgkill,
    SYS_restart_syscall,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_poll,
    SYS_ppoll,
    SYS_fcntl,
    SYS_fstat,
    SYS_statx,
    SYS_newfstatat,
    SYS_lseek,
];

/// Creating threads (the spawner, and runtimes that start their own: tokio's blocking pool).
const THREADS: &[Syscall] = syscalls![
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_sched_getaffinity,
];

/// A vCPU pins itself to the host CPUs of `--cpu-affinity`.
const PINNING: &[Syscall] = syscalls![SYS_sched_setaffinity];

/// Event and timer descriptors, epoll instances.
const EVENTS: &[Syscall] = syscalls![
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
];

/// Disk I/O on descriptors already open, and io_uring (whose rings are restricted to the
/// operations the engine uses).
const DISK_IO: &[Syscall] = syscalls![
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
    SYS_ftruncate,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
];

/// Sockets: connected streams, and listening ones (vsock's host side, consoles, the API).
const SOCKETS: &[Syscall] = syscalls![
    SYS_socket,
    SYS_connect,
    SYS_bind,
    SYS_listen,
    SYS_accept4,
    SYS_sendto,
    SYS_sendmsg,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
];

/// Files by name: snapshots, disk snapshots' overlays, socket files.
const FILES: &[Syscall] = syscalls![
    SYS_openat,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_unlinkat,
    SYS_unlink,
    SYS_getdents64,
    SYS_readlink,
    SYS_readlinkat,
    // glibc's realpath (std::fs::canonicalize) checks a path that ends in '/' this way (a
    // restored VM's disk snapshot canonicalizes such a directory: ended with exit 71 once).
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fstatfs,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_mincore,
    SYS_memfd_create,
    SYS_dup,
    SYS_dup3,
];

/// Opening a file by name (the pager opens a diff snapshot's files as it needs them).
const OPEN: &[Syscall] = syscalls![SYS_openat];

/// KVM, the tap device, the terminal, userfaultfd: device control through `ioctl`.
const IOCTL: &[Syscall] = syscalls![SYS_ioctl];

/// Signals to other threads and processes (kicking vCPUs).
const SIGNALS: &[Syscall] = syscalls![SYS_kill, SYS_rt_sigaction];

/// Installing a filter: the spawner's children put their own class's filter on top of the
/// spawner's.
const CONFINE: &[Syscall] = syscalls![SYS_seccomp, SYS_prctl];

/// A system call no class allows, made by the `VESSEL_TEST_SECCOMP` test hook.
pub const FORBIDDEN_PROBE: Syscall = (libc::SYS_personality, "SYS_personality");

/// The groups of system calls `class` may make.
pub fn groups(class: ThreadClass) -> &'static [&'static [Syscall]] {
    match class {
        // The vCPU runs KVM_RUN and the port and MMIO handlers: device registers, virtio
        // activation (eventfds, io_uring rings), console output, PCI BAR moves (KVM ioctls).
        ThreadClass::Vcpu => &[BASE, EVENTS, IOCTL, SIGNALS, SOCKETS, DISK_IO, PINNING],
        ThreadClass::Device => &[BASE, EVENTS, DISK_IO, SOCKETS, IOCTL],
        ThreadClass::BlockIo => &[BASE, EVENTS, DISK_IO],
        ThreadClass::Console => &[BASE, EVENTS, SOCKETS, IOCTL],
        ThreadClass::Pager => &[BASE, EVENTS, IOCTL, SOCKETS, DISK_IO, OPEN],
        ThreadClass::Migration => &[BASE, EVENTS, IOCTL, SOCKETS, DISK_IO, FILES, SIGNALS],
        // Snapshots and disk snapshots write files by name.
        ThreadClass::Api => &[
            BASE, THREADS, EVENTS, IOCTL, SOCKETS, DISK_IO, FILES, SIGNALS,
        ],
        // The main thread waits for the VM's end, restarts it on a reset (the kernel is
        // read again) and tears it down.
        ThreadClass::Main => &[
            BASE, THREADS, EVENTS, IOCTL, SOCKETS, DISK_IO, FILES, SIGNALS,
        ],
        ThreadClass::Spawner => &[
            BASE, THREADS, EVENTS, IOCTL, SOCKETS, DISK_IO, FILES, SIGNALS, CONFINE, PINNING,
        ],
    }
}

/// The name of system call `nr`, if any class knows it.
pub fn name(nr: i64) -> Option<&'static str> {
    [
        BASE, THREADS, EVENTS, DISK_IO, SOCKETS, FILES, OPEN, IOCTL, SIGNALS, CONFINE, PINNING,
    ]
    .iter()
    .flat_map(|g| g.iter())
    .chain(std::iter::once(&FORBIDDEN_PROBE))
    .find(|(n, _)| *n == nr)
    .map(|(_, name)| name.trim_start_matches("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_class_allows_the_probe_and_names_resolve() {
        for class in ThreadClass::ALL {
            let allowed = groups(class).iter().flat_map(|g| g.iter());
            assert!(
                allowed.clone().all(|(n, _)| *n != FORBIDDEN_PROBE.0),
                "{class:?}"
            );
            // The spawner's children get their own filter on top of its: it must allow
            // everything any of them may do.
            for s in allowed {
                assert!(
                    groups(ThreadClass::Spawner)
                        .iter()
                        .any(|g| g.iter().any(|t| t.0 == s.0)),
                    "{class:?}: {} not in the spawner's filter",
                    s.1
                );
            }
        }
        assert_eq!(name(libc::SYS_ioctl), Some("ioctl"));
        assert_eq!(name(libc::SYS_personality), Some("personality"));
        assert_eq!(name(100_000), None);
    }
}
