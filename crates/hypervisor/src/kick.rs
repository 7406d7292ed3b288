//! Kicking a vCPU out of `KVM_RUN` from another thread.
//!
//! A vCPU thread registers its `kvm_run` page in a thread-local. Another thread sends it the kick
//! signal; the handler, running on the vCPU thread, sets `immediate_exit` in that page, so the
//! vCPU leaves `KVM_RUN` now (EINTR) or, if it was between two runs, at its next entry. No kick is
//! lost whatever the timing.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{compiler_fence, Ordering};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{Error, Result};

thread_local! {
    static KVM_RUN_PAGE: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` never panics, even during thread teardown.
    let _ = KVM_RUN_PAGE.try_with(|p| {
        let page = p.get();
        if !page.is_null() {
            // SAFETY: the pointer was registered by this very thread from its live `VcpuFd`'s
            // mmap'ed `kvm_run` page and is cleared before that mapping goes away
            // (`Vcpu::unbind_thread`). A volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*page).immediate_exit).write_volatile(1) };
            compiler_fence(Ordering::SeqCst);
        }
    });
}

/// Installs the process-wide kick signal handler. Call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<()> {
    register_signal_handler(kick_signal(), handle_kick).map_err(Error::Signal)
}

pub(crate) fn bind(page: *mut kvm_run) {
    KVM_RUN_PAGE.with(|p| p.set(page));
}

/// A handle that kicks one vCPU thread.
#[derive(Clone, Copy, Debug)]
pub struct KickHandle {
    thread: libc::pthread_t,
}

impl KickHandle {
    /// A handle for a thread started with `std::thread`.
    pub fn for_thread<T>(h: &std::thread::JoinHandle<T>) -> Self {
        KickHandle {
            thread: h.as_pthread_t() as libc::pthread_t,
        }
    }

    /// Sends the kick signal. A thread that already exited is not an error.
    pub fn kick(&self) {
        // SAFETY: pthread_kill with a valid signal number on a pthread_t obtained from a
        // JoinHandle the caller still holds (so the thread has not been joined and its id is not
        // reused). It only queues a signal.
        unsafe {
            libc::pthread_kill(self.thread, kick_signal());
        }
    }
}
