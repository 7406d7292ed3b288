//! Warnings a guest can trigger at will (a malformed queue, a bad register write) are
//! rate-limited per call site, so a guest cannot flood the host's log: [`warn_limited!`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines a call site may log per window.
pub const LINES_PER_WINDOW: u64 = 10;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 60_000;

/// One call site's budget.
pub struct LogLimit {
    /// Which window the count is for (milliseconds since the first use, / [`WINDOW_MS`]).
    window: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit {
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now; with it, how many were suppressed since the last
    /// one logged.
    pub fn allow(&self) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64;
        self.allow_at(now / WINDOW_MS)
    }

    fn allow_at(&self, window: u64) -> Option<u64> {
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < LINES_PER_WINDOW {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!` with a budget of [`LINES_PER_WINDOW`] lines a minute for this call site;
/// the first line after a quiet spell says how many were left out.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::log::LogLimit = $crate::log::LogLimit::new();
        if let Some(skipped) = LIMIT.allow() {
            if skipped > 0 {
                tracing::warn!("({skipped} more like the next line were not logged)");
            }
            tracing::warn!($($arg)*);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_logs_its_budget_per_window_and_counts_the_rest() {
        let l = LogLimit::new();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(l.allow_at(5), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.allow_at(5), None);
        }
        // The next window: the first line carries the count of those left out.
        assert_eq!(l.allow_at(6), Some(1000));
        assert_eq!(l.allow_at(6), Some(0));
    }
}
