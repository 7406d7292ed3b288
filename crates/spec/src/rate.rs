//! Rate limits as a VM's description states them: token buckets for bytes and operations.
//! The limiter that enforces them is the devices' (`devices::rate_limiter`).

use serde::{Deserialize, Serialize};

/// One bucket's settings: `size` tokens refill every `refill_time_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// `rate` tokens per second, with an initial extra `burst`.
    pub fn per_second(rate: u64, burst: u64) -> Self {
        TokenBucketConfig {
            size: rate,
            one_time_burst: burst,
            refill_time_ms: 1000,
        }
    }
}

/// A limiter's settings; a missing bucket means no limit on that quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RateLimiterConfig {
    /// Bytes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests, packets).
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}
