//! One rate limiter for all of a block device's queues.
//!
//! The configured rates are the device's: a guest gets the same bandwidth and operations per
//! second whether it drives one queue or many (splitting the rate per queue would cap a guest
//! that uses a single queue at a fraction of it). The queues' workers share a
//! [`RateLimiter`] behind a mutex. A worker refused by the limiter puts the request back in the
//! ring, registers its wake-up eventfd and stops taking requests; the limiter's timerfd is in
//! every worker's epoll set, and whichever worker sees it fire calls [`SharedLimiter::on_timer`],
//! which unblocks the limiter and wakes every registered worker, so none is forgotten when
//! another one handles the timer.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};

struct State {
    limiter: RateLimiter,
    waiters: Vec<Arc<EventFd>>,
}

pub(crate) struct SharedLimiter {
    state: Mutex<State>,
    timer: RawFd,
}

impl SharedLimiter {
    /// A limiter for `cfg`, or `None` when it limits nothing.
    pub(crate) fn new(cfg: RateLimiterConfig) -> Result<Option<Arc<Self>>, RateLimiterError> {
        if cfg.is_unlimited() {
            return Ok(None);
        }
        let limiter = RateLimiter::new(cfg)?;
        let timer = limiter.as_raw_fd().ok_or(RateLimiterError::EmptyBucket)?;
        Ok(Some(Arc::new(SharedLimiter {
            state: Mutex::new(State {
                limiter,
                waiters: Vec::new(),
            }),
            timer,
        })))
    }

    /// Readable when a blocked limiter may be retried (valid as long as `self`).
    pub(crate) fn timer_fd(&self) -> RawFd {
        self.timer
    }

    /// Takes the tokens of a request, or, if they are not there, registers `waiter` to be
    /// written when it is worth trying again and returns false.
    pub(crate) fn consume(&self, ops: u64, bytes: u64, waiter: &Arc<EventFd>) -> bool {
        let mut s = lock(&self.state);
        if s.limiter.consume(ops, bytes) {
            return true;
        }
        if s.limiter.is_blocked() {
            if !s.waiters.iter().any(|w| Arc::ptr_eq(w, waiter)) {
                s.waiters.push(waiter.clone());
            }
        } else {
            // The timer could not be armed: nothing would wake the worker, so it retries.
            let _ = waiter.write(1);
        }
        false
    }

    /// The timer fired (or may have): unblock and wake every waiting worker.
    pub(crate) fn on_timer(&self) {
        let mut s = lock(&self.state);
        s.limiter.on_timer();
        for w in s.waiters.drain(..) {
            let _ = w.write(1);
        }
    }
}
