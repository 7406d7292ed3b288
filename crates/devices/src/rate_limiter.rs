//! Token-bucket rate limiters for device I/O (bandwidth in bytes and operations).
//!
//! A [`RateLimiter`] holds up to two [`TokenBucket`]s. A device asks it before serving a request
//! ([`RateLimiter::consume`]); when a bucket lacks tokens the limiter takes nothing, arms a
//! timer for the moment enough tokens will have refilled, and the device stops serving that
//! queue until the timer's fd is readable ([`RateLimiter::as_raw_fd`],
//! [`RateLimiter::on_timer`]).
//!
//! A request larger than a bucket's whole size passes once the bucket is full and drives the
//! bucket into debt, so that big requests are slowed rather than refused forever. Buckets refill
//! continuously: `size` tokens every `refill_time_ms`. `one_time_burst` tokens are an extra
//! budget spent first and never refilled (a fast start, as in Firecracker).

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// Errors of a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(#[source] std::io::Error),
    #[error("a token bucket needs a size and a refill time above zero")]
    EmptyBucket,
}

pub use spec::rate::{RateLimiterConfig, TokenBucketConfig};

/// A bucket of tokens refilled continuously.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill: Duration,
    /// May be negative after a request larger than the whole bucket.
    budget: i128,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(cfg: TokenBucketConfig) -> Result<Self, RateLimiterError> {
        if cfg.size == 0 || cfg.refill_time_ms == 0 {
            return Err(RateLimiterError::EmptyBucket);
        }
        Ok(TokenBucket {
            size: cfg.size,
            refill: Duration::from_millis(cfg.refill_time_ms),
            budget: i128::from(cfg.size),
            burst: cfg.one_time_burst,
            last: Instant::now(),
        })
    }

    fn refill_to(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let refill = self.refill.as_nanos();
        let tokens = elapsed * u128::from(self.size) / refill;
        if tokens == 0 {
            return;
        }
        // Advance `last` by exactly the time those tokens took, so no fraction is lost.
        let used = tokens * refill / u128::from(self.size);
        self.last += Duration::from_nanos(used.min(u128::from(u64::MAX)) as u64);
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.budget = self
            .budget
            .saturating_add(tokens)
            .min(i128::from(self.size));
        if self.budget == i128::from(self.size) {
            self.last = now;
        }
    }

    /// Takes `n` tokens if there are enough (a full bucket is enough for any `n`).
    #[cfg(test)]
    fn try_take(&mut self, n: u64, now: Instant) -> bool {
        if !self.available(n, now) {
            return false;
        }
        self.take(n);
        true
    }

    fn available(&mut self, n: u64, now: Instant) -> bool {
        self.refill_to(now);
        let need = i128::from(n.saturating_sub(self.burst).min(self.size));
        need == 0 || self.budget >= need
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(n - from_burst);
    }

    /// How long until `n` tokens are available.
    fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill_to(now);
        let need = i128::from(n.saturating_sub(self.burst).min(self.size));
        let missing = need - self.budget;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let nanos = (missing as u128 * self.refill.as_nanos()).div_ceil(u128::from(self.size));
        let since = now.saturating_duration_since(self.last).as_nanos();
        Duration::from_nanos(nanos.saturating_sub(since).clamp(1, u128::from(u64::MAX)) as u64)
    }

    /// Tokens in the bucket now (negative while in debt), burst excluded.
    pub fn budget(&self) -> i128 {
        self.budget
    }
}

/// Up to two buckets and the timer that wakes a blocked device.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Option<TimerFd>,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with `cfg`'s buckets; an unlimited one has no timer and never blocks.
    pub fn new(cfg: RateLimiterConfig) -> Result<Self, RateLimiterError> {
        let bandwidth = cfg.bandwidth.map(TokenBucket::new).transpose()?;
        let ops = cfg.ops.map(TokenBucket::new).transpose()?;
        let timer = if cfg.is_unlimited() {
            None
        } else {
            // Nonblocking, so that a spurious `on_timer` never stalls a device thread.
            let t = TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )
            .map_err(|e| RateLimiterError::Timer(e.into()))?;
            Some(t)
        };
        Ok(RateLimiter {
            bandwidth,
            ops,
            timer,
            blocked: false,
        })
    }

    /// A limiter that lets everything through.
    pub fn unlimited() -> Self {
        RateLimiter {
            bandwidth: None,
            ops: None,
            timer: None,
            blocked: false,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Takes `ops` operation tokens and `bytes` bandwidth tokens, all or nothing. When either
    /// bucket lacks them, takes nothing, arms the timer and returns false; the caller retries
    /// after [`RateLimiter::on_timer`].
    pub fn consume(&mut self, ops: u64, bytes: u64) -> bool {
        if self.is_unlimited() {
            return true;
        }
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.available(ops, now));
        let bw_ok = self
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.available(bytes, now));
        if ops_ok && bw_ok {
            if let Some(b) = self.ops.as_mut() {
                b.take(ops);
            }
            if let Some(b) = self.bandwidth.as_mut() {
                b.take(bytes);
            }
            return true;
        }
        let wait = [
            self.ops.as_mut().map(|b| b.wait_for(ops, now)),
            self.bandwidth.as_mut().map(|b| b.wait_for(bytes, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::from_millis(1))
        .max(Duration::from_micros(100));
        self.arm(wait);
        false
    }

    /// Takes tokens for I/O that already happened (a received packet cannot be refused);
    /// buckets may go into debt. Never blocks by itself.
    pub fn consume_unchecked(&mut self, ops: u64, bytes: u64) {
        let now = Instant::now();
        if let Some(b) = self.ops.as_mut() {
            b.refill_to(now);
            b.take(ops);
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.refill_to(now);
            b.take(bytes);
        }
    }

    /// Whether the device must wait for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    fn arm(&mut self, wait: Duration) {
        if let Some(t) = &self.timer {
            match t.set(
                Expiration::OneShot(TimeSpec::from_duration(wait)),
                TimerSetTimeFlags::empty(),
            ) {
                Ok(()) => self.blocked = true,
                // Without a timer nothing would wake the device: let it retry at once.
                Err(e) => tracing::warn!("rate limiter timer: {e}; not limiting"),
            }
        }
    }

    /// The fd that becomes readable when a blocked limiter may be retried (none if unlimited).
    pub fn as_raw_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(|t| t.as_fd().as_raw_fd())
    }

    /// Call when the timer fd is readable: clears it and unblocks.
    pub fn on_timer(&mut self) {
        if let Some(t) = &self.timer {
            // Nonblocking: reads the expiry count, or fails harmlessly when there is none.
            let _ = t.wait();
        }
        self.blocked = false;
    }
}

/// A [`RateLimiter`] shared by the workers of a device's queues, so that the limit is the
/// device's whatever number of queues the guest drives (as Firecracker's per-device limiters).
///
/// A worker refused by the limiter stops serving (its request waits in the ring, or its frame
/// in the backend) and is registered with its wake-up eventfd. The limiter's timer fd is in
/// every worker's epoll set; whichever worker sees it fire calls [`SharedLimiter::on_timer`],
/// which unblocks the limiter and wakes every registered worker, so that none is forgotten
/// when another one handles the timer. Registration and wake-up happen under one lock: a
/// worker either registered before the wake-up (and is woken), or its own refusal armed the
/// timer again.
pub struct SharedLimiter {
    state: std::sync::Mutex<SharedState>,
    timer: RawFd,
}

struct SharedState {
    limiter: RateLimiter,
    waiters: Vec<std::sync::Arc<vmm_sys_util::eventfd::EventFd>>,
}

impl SharedLimiter {
    /// A limiter for `cfg`, or `None` when it limits nothing (no lock, no timer).
    pub fn new(
        cfg: RateLimiterConfig,
    ) -> Result<Option<std::sync::Arc<SharedLimiter>>, RateLimiterError> {
        if cfg.is_unlimited() {
            return Ok(None);
        }
        let limiter = RateLimiter::new(cfg)?;
        let timer = limiter.as_raw_fd().ok_or(RateLimiterError::EmptyBucket)?;
        Ok(Some(std::sync::Arc::new(SharedLimiter {
            state: std::sync::Mutex::new(SharedState {
                limiter,
                waiters: Vec::new(),
            }),
            timer,
        })))
    }

    /// Readable when a blocked limiter may be retried (valid as long as `self`).
    pub fn timer_fd(&self) -> RawFd {
        self.timer
    }

    /// Takes the tokens of a request, or, if they are not there, registers `waiter` to be
    /// written when it is worth trying again and returns false.
    pub fn consume(
        &self,
        ops: u64,
        bytes: u64,
        waiter: &std::sync::Arc<vmm_sys_util::eventfd::EventFd>,
    ) -> bool {
        let mut s = crate::bus::lock(&self.state);
        if s.limiter.consume(ops, bytes) {
            return true;
        }
        if s.limiter.is_blocked() {
            if !s.waiters.iter().any(|w| std::sync::Arc::ptr_eq(w, waiter)) {
                s.waiters.push(waiter.clone());
            }
        } else {
            // The timer could not be armed: nothing would wake the worker, so it retries.
            let _ = waiter.write(1);
        }
        false
    }

    /// The timer fired (or may have): unblock and wake every waiting worker.
    pub fn on_timer(&self) {
        let mut s = crate::bus::lock(&self.state);
        s.limiter.on_timer();
        for w in s.waiters.drain(..) {
            let _ = w.write(1);
        }
    }

    /// Forget the waiting workers (they are gone: a reset).
    pub fn clear_waiters(&self) {
        crate::bus::lock(&self.state).waiters.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, ms: u64) -> TokenBucket {
        TokenBucket::new(TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: ms,
        })
        .unwrap()
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let mut b = bucket(1000, 0, 1000);
        let t0 = b.last;
        assert!(b.try_take(1000, t0));
        assert!(!b.try_take(1, t0));
        assert!(!b.try_take(200, t0 + Duration::from_millis(100)));
        assert!(b.try_take(100, t0 + Duration::from_millis(100)));
        assert_eq!(
            b.wait_for(500, t0 + Duration::from_millis(100)).as_millis(),
            500
        );
        assert!(b.try_take(500, t0 + Duration::from_millis(600)));
        // Never beyond the size.
        assert!(b.try_take(1000, t0 + Duration::from_secs(100)));
        assert!(!b.try_take(1, t0 + Duration::from_secs(100)));
    }

    #[test]
    fn no_fraction_of_a_token_is_lost() {
        let mut b = bucket(3, 0, 1000);
        let t0 = b.last;
        assert!(b.try_take(3, t0));
        for i in 1..=30u64 {
            // Every 100 ms, 0.3 tokens: three tokens after each full second.
            let now = t0 + Duration::from_millis(100 * i);
            if i % 10 == 0 {
                assert!(b.try_take(3, now), "second {}", i / 10);
            }
        }
    }

    #[test]
    fn oversized_request_passes_when_full_and_leaves_debt() {
        let mut b = bucket(100, 0, 1000);
        let t0 = b.last;
        assert!(b.try_take(250, t0));
        assert_eq!(b.budget(), -150);
        assert!(!b.try_take(1, t0 + Duration::from_millis(1000)));
        assert!(b.try_take(250, t0 + Duration::from_millis(2500)));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_not_refilled() {
        let mut b = bucket(10, 100, 1000);
        let t0 = b.last;
        assert!(b.try_take(105, t0));
        assert_eq!(b.budget(), 5);
        assert!(b.try_take(5, t0));
        assert!(!b.try_take(5, t0));
    }

    #[test]
    fn zero_sized_bucket_is_refused() {
        assert!(matches!(
            TokenBucket::new(TokenBucketConfig::default()),
            Err(RateLimiterError::EmptyBucket)
        ));
    }

    #[test]
    fn unlimited_never_blocks() {
        let mut r = RateLimiter::unlimited();
        for _ in 0..1000 {
            assert!(r.consume(1, 1 << 30));
        }
        assert!(r.as_raw_fd().is_none());
        assert!(RateLimiter::new(RateLimiterConfig::default())
            .unwrap()
            .is_unlimited());
    }

    #[test]
    fn blocked_limiter_takes_nothing_and_wakes_through_its_timer() {
        let mut r = RateLimiter::new(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::per_second(1 << 20, 0)),
            ops: Some(TokenBucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 20,
            }),
        })
        .unwrap();
        assert!(r.consume(1, 4096));
        assert!(r.consume(1, 4096));
        let start = Instant::now();
        assert!(!r.consume(1, 4096));
        assert!(r.is_blocked());
        // Blocked: no retry succeeds before the timer fires.
        assert!(!r.consume(1, 0));
        let fd = r.as_raw_fd().unwrap();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(n, 1);
        r.on_timer();
        assert!(start.elapsed() >= Duration::from_millis(5));
        assert!(r.consume(1, 4096));
        // The refused request took no bandwidth: the bucket refilled past 3 requests' worth.
        let bw = r.bandwidth.as_ref().unwrap().budget();
        assert!(
            ((1 << 20) - 3 * 4096..=(1 << 20) - 4096).contains(&bw),
            "{bw}"
        );
    }

    #[test]
    fn limiter_paces_to_its_rate() {
        // 50 ops per 100 ms: 200 ops take about 300 ms after the first full bucket.
        let mut r = RateLimiter::new(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 50,
                one_time_burst: 0,
                refill_time_ms: 100,
            }),
        })
        .unwrap();
        let start = Instant::now();
        let mut done = 0;
        while done < 200 {
            if r.consume(1, 0) {
                done += 1;
            } else {
                let fd = r.as_raw_fd().unwrap();
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 2000) };
                r.on_timer();
            }
        }
        let t = start.elapsed();
        assert!(t >= Duration::from_millis(290), "{t:?}");
    }
}
