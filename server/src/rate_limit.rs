//! Token-bucket rate limiting by key (a client, a source address): each key
//! refills at a steady rate up to a burst. Buckets that are full again are
//! forgotten from time to time, so the table holds only keys that were busy
//! lately.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use crate::service::Rate;

/// How often (in calls) full buckets are swept out of the table.
const SWEEP_EVERY: u64 = 4096;

struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Buckets<K> {
    by_key: HashMap<K, Bucket>,
    calls: u64,
}

/// Token buckets keyed by `K`.
pub(crate) struct RateLimiter<K> {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<Buckets<K>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// Tokens at `rate` up to its burst; a rate of 0 disables limiting.
    pub(crate) fn new(rate: Rate) -> Self {
        RateLimiter {
            per_sec: f64::from(rate.per_min) / 60.0,
            burst: f64::from(rate.burst.max(1)),
            buckets: Mutex::new(Buckets {
                by_key: HashMap::new(),
                calls: 0,
            }),
        }
    }

    /// Take one token for `key`; false means "over the limit".
    pub(crate) fn allow(&self, key: &K) -> bool {
        if self.per_sec == 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        b.calls += 1;
        if b.calls.is_multiple_of(SWEEP_EVERY) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            b.by_key.retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * per_sec < burst
            });
        }
        let bucket = b.by_key.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() * self.per_sec;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse() {
        let r = RateLimiter::new(Rate::per_sec(1, 3));
        assert!(r.allow(&"c") && r.allow(&"c") && r.allow(&"c"));
        assert!(!r.allow(&"c"));
        assert!(r.allow(&"d"), "another key has its own bucket");
        assert!(RateLimiter::new(Rate::per_sec(0, 0)).allow(&"c"));
    }

    #[test]
    fn full_buckets_are_swept() {
        let r = RateLimiter::new(Rate::per_sec(1_000_000, 1));
        for i in 0..SWEEP_EVERY {
            r.allow(&i);
        }
        let held = r.buckets.lock().unwrap().by_key.len() as u64;
        assert!(held < SWEEP_EVERY, "{held} buckets kept");
    }
}
