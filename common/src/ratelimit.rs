//! Token-bucket rate limiting: one [`TokenBucket`] (a connection's message
//! rate), or a [`RateLimiter`] of buckets keyed by client (IP address,
//! tenant, …).
//!
//! Plain state machines: callers pass `now`, so tests drive time by hand.
//! The limiter's key map is bounded: when full, buckets that have refilled
//! completely (and so carry no state worth keeping) are dropped first.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// `burst` tokens, refilled at `per_sec` tokens a second.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_sec: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_sec: per_sec.max(0.0),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens; `false` (and nothing taken) when short.
    pub fn take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// How long until one token is available.
    pub fn wait(&self, now: Instant) -> Duration {
        let have =
            self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.per_sec;
        if have >= 1.0 || self.per_sec <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - have) / self.per_sec)
        }
    }

    /// Whether the bucket is full again at `now` (it holds no history).
    fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.per_sec
            >= self.burst
    }
}

/// Rate limits many keys with one shared rate.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_sec: f64,
    burst: u32,
    max_keys: usize,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `per_sec` sustained, `burst` at once, tracking at most `max_keys`.
    pub fn new(per_sec: f64, burst: u32, max_keys: usize) -> Self {
        Self {
            per_sec,
            burst,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key`; `false` means over the limit.
    pub fn allow(&mut self, key: &K, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.evict(now);
            if self.buckets.len() >= self.max_keys {
                // Every tracked key is actively limited: refuse new keys
                // rather than forget a limited one.
                return false;
            }
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(per_sec, burst, now))
            .take(1.0, now)
    }

    /// How long until `key` has a token again (zero if it has one now).
    pub fn retry_after(&self, key: &K, now: Instant) -> Duration {
        self.buckets
            .get(key)
            .map_or(Duration::ZERO, |b| b.wait(now))
    }

    /// Drops buckets that have refilled completely.
    pub fn evict(&mut self, now: Instant) {
        self.buckets.retain(|_, b| !b.is_full(now));
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
    fn bucket_bursts_then_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2, t0);
        assert!(b.take(1.0, t0) && b.take(1.0, t0));
        assert!(!b.take(1.0, t0));
        assert_eq!(b.wait(t0), Duration::from_millis(100));
        assert!(b.take(1.0, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn limiter_keys_are_independent() {
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
