//! The VM's run state, shared by the main thread, the vCPU threads and the devices.
//!
//! The first [`ExitReason`] reported wins; reporting wakes the main thread, which stops the
//! vCPUs. Pause parks every vCPU thread between two runs (at an instruction boundary).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex};

use devices::bus::lock;

use crate::exit::ExitReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Shared run control.
pub struct Control {
    state: Mutex<RunState>,
    changed: Condvar,
    parked: Mutex<u32>,
    parked_changed: Condvar,
    exit: Mutex<Option<ExitReason>>,
    wake_tx: UnixStream,
    wake_rx: Mutex<UnixStream>,
}

impl Control {
    pub fn new() -> std::io::Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        Ok(Control {
            state: Mutex::new(RunState::Running),
            changed: Condvar::new(),
            parked: Mutex::new(0),
            parked_changed: Condvar::new(),
            exit: Mutex::new(None),
            wake_tx,
            wake_rx: Mutex::new(wake_rx),
        })
    }

    /// A handle to the wake-up channel, for signal handlers.
    pub fn wake_handle(&self) -> std::io::Result<UnixStream> {
        self.wake_tx.try_clone()
    }

    /// Wakes the main thread.
    pub fn wake(&self) {
        // A full socket buffer already means a pending wake-up.
        let _ = (&self.wake_tx).write(&[1]);
    }

    /// Records why the VM should stop (the first reason wins) and wakes the main thread.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut e = lock(&self.exit);
        if e.is_none() {
            tracing::debug!("exit requested: {reason}");
            *e = Some(reason);
        }
        drop(e);
        self.wake();
    }

    /// Forgets the exit reason (a reset VM starts again).
    pub fn clear_exit(&self) {
        *lock(&self.exit) = None;
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.exit).clone()
    }

    /// Blocks until something wakes the main thread.
    pub fn wait_wake(&self) {
        let mut buf = [0u8; 64];
        let _ = lock(&self.wake_rx).read(&mut buf);
    }

    pub fn state(&self) -> RunState {
        *lock(&self.state)
    }

    pub fn set_state(&self, s: RunState) {
        *lock(&self.state) = s;
        self.changed.notify_all();
    }

    /// Called by a vCPU thread between runs: parks while paused; returns false when stopping.
    pub fn vcpu_checkpoint(&self) -> bool {
        let mut s = lock(&self.state);
        if *s == RunState::Paused {
            *lock(&self.parked) += 1;
            self.parked_changed.notify_all();
            while *s == RunState::Paused {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            *lock(&self.parked) -= 1;
            self.parked_changed.notify_all();
        }
        *s != RunState::Stopping
    }

    /// Waits until `n` vCPU threads are parked (after [`RunState::Paused`] and a kick).
    pub fn wait_parked(&self, n: u32) {
        let mut p = lock(&self.parked);
        while *p < n {
            p = self
                .parked_changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Like [`Control::wait_parked`], giving up after `limit`; returns whether they parked.
    pub fn wait_parked_timeout(&self, n: u32, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut p = lock(&self.parked);
        while *p < n {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            p = self
                .parked_changed
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// How many vCPU threads are parked now.
    pub fn parked(&self) -> u32 {
        *lock(&self.parked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_exit_reason_wins_and_wakes() {
        let c = Control::new().unwrap();
        c.request_exit(ExitReason::PowerOff);
        c.request_exit(ExitReason::Reset);
        c.wait_wake();
        assert_eq!(c.exit_reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn pause_parks_and_resume_releases() {
        let c = Arc::new(Control::new().unwrap());
        c.set_state(RunState::Paused);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.vcpu_checkpoint());
        c.wait_parked(1);
        assert!(c.wait_parked_timeout(1, std::time::Duration::from_millis(1)));
        assert!(!c.wait_parked_timeout(2, std::time::Duration::from_millis(10)));
        assert_eq!(c.parked(), 1);
        c.set_state(RunState::Stopping);
        assert!(!t.join().unwrap());
    }
}
