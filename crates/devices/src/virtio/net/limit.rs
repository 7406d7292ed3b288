//! One direction's rate limiter, shared by every queue pair of a device (so that the limit is
//! per device, as in Firecracker's `rx_rate_limiter` / `tx_rate_limiter`).
//!
//! A queue pair that finds the limiter out of tokens registers its wake-up eventfd and stops
//! that direction. Every pair's worker polls the limiter's timer fd; whichever worker sees it
//! fire first clears it and wakes every registered pair, itself included. Registration and
//! wake-up happen under the limiter's lock, so no pair can miss the timer: either it registered
//! before the wake-up (and is woken), or its own refusal armed the timer again.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};

struct Inner {
    limiter: RateLimiter,
    /// The wake-up eventfds of the queue pairs waiting for tokens.
    waiters: Vec<Arc<EventFd>>,
}

/// A rate limiter for one direction of a device, with the pairs waiting for it.
pub struct SharedLimiter {
    inner: Mutex<Inner>,
    timer: RawFd,
}

impl SharedLimiter {
    /// The limiter for `cfg`; `None` when `cfg` limits nothing (no lock, no timer).
    pub fn new(cfg: RateLimiterConfig) -> Result<Option<Arc<SharedLimiter>>, RateLimiterError> {
        let limiter = RateLimiter::new(cfg)?;
        let Some(timer) = limiter.as_raw_fd() else {
            return Ok(None);
        };
        Ok(Some(Arc::new(SharedLimiter {
            inner: Mutex::new(Inner {
                limiter,
                waiters: Vec::new(),
            }),
            timer,
        })))
    }

    /// Takes one packet and `bytes` bytes, or registers `waker` to be written when the timer
    /// fires and returns false.
    pub fn consume(&self, bytes: u64, waker: &Arc<EventFd>) -> bool {
        let mut g = lock(&self.inner);
        // A limiter whose timer could not be armed does not block (nothing would wake us).
        if g.limiter.consume(1, bytes) || !g.limiter.is_blocked() {
            return true;
        }
        if !g.waiters.iter().any(|w| Arc::ptr_eq(w, waker)) {
            g.waiters.push(waker.clone());
        }
        false
    }

    /// The timer fd, readable once the waiting pairs may try again.
    pub fn timer_fd(&self) -> RawFd {
        self.timer
    }

    /// Call when the timer fd polls readable: clears it and wakes every waiting pair.
    pub fn on_timer(&self) {
        let mut g = lock(&self.inner);
        g.limiter.on_timer();
        for w in g.waiters.drain(..) {
            if let Err(e) = w.write(1) {
                tracing::warn!("virtio-net: cannot wake a rate-limited queue: {e}");
            }
        }
    }

    /// Forget the waiting pairs (their workers are gone).
    pub fn clear_waiters(&self) {
        lock(&self.inner).waiters.clear();
    }
}
