//! Token-bucket rate limiting keyed by client (IP address, tenant, …).
//!
//! A plain state machine: callers pass `now`, so tests drive time by hand.
//! The key map is bounded: when full, buckets that have refilled completely
//! (and so carry no state worth keeping) are dropped first.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A token bucket: `burst` tokens, refilled at `per_sec` tokens a second.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Rate limits many keys with one shared rate.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_sec: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `per_sec` sustained, `burst` at once, tracking at most `max_keys`.
    pub fn new(per_sec: f64, burst: u32, max_keys: usize) -> Self {
        Self {
            per_sec: per_sec.max(0.0),
            burst: f64::from(burst.max(1)),
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key`; `false` means over the limit.
    pub fn allow(&mut self, key: &K, now: Instant) -> bool {
        self.allow_n(key, 1.0, now)
    }

    /// Takes `n` tokens for `key`; `false` (and nothing taken) when short.
    pub fn allow_n(&mut self, key: &K, n: f64, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.evict(now);
            if self.buckets.len() >= self.max_keys {
                // Every tracked key is actively limited: refuse new keys
                // rather than forget a limited one.
                return false;
            }
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let bucket = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(burst);
        bucket.last = now;
        if bucket.tokens >= n {
            bucket.tokens -= n;
            true
        } else {
            false
        }
    }

    /// How long until `key` has a token again (zero if it has one now).
    pub fn retry_after(&self, key: &K, now: Instant) -> Duration {
        let Some(b) = self.buckets.get(key) else {
            return Duration::ZERO;
        };
        let have = b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * self.per_sec;
        if have >= 1.0 || self.per_sec <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - have) / self.per_sec)
    }

    /// Drops buckets that have refilled completely.
    pub fn evict(&mut self, now: Instant) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * per_sec < burst
        });
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(2.0, 3, 100);
        assert!(rl.allow(&"a", t0));
        assert!(rl.allow(&"a", t0));
        assert!(rl.allow(&"a", t0));
        assert!(!rl.allow(&"a", t0));
        assert!(rl.allow(&"b", t0), "keys are independent");
        assert_eq!(rl.retry_after(&"a", t0), Duration::from_millis(500));
        assert!(rl.allow(&"a", t0 + Duration::from_millis(500)));
        assert!(!rl.allow(&"a", t0 + Duration::from_millis(500)));
    }

    #[test]
    fn bounded_key_map_evicts_idle_buckets() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1.0, 1, 2);
        assert!(rl.allow(&1, t0));
        assert!(rl.allow(&2, t0));
        // Full of limited keys: a new key is refused.
        assert!(!rl.allow(&3, t0));
        // After both refill, they are evicted and the new key fits.
        assert!(rl.allow(&3, t0 + Duration::from_secs(2)));
        assert_eq!(rl.len(), 1);
    }
}
