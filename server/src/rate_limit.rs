//! Token-bucket rate limiting by key (a client, a source address): each key
//! refills at a steady rate up to a burst. Buckets that are full again are
//! forgotten from time to time, so the table holds only keys that were busy
//! lately.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A steady rate with a burst.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rate {
    /// Tokens a minute (0: unlimited).
    pub(crate) per_min: u32,
    /// Most tokens at once.
    pub(crate) burst: u32,
}

impl Rate {
    /// `per_sec` a second.
    pub(crate) fn per_sec(per_sec: u32, burst: u32) -> Rate {
        Rate {
            per_min: per_sec.saturating_mul(60),
            burst,
        }
    }
}

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

    /// Take one token for `key`; `Err` is "over the limit" with the wait
    /// until the next token.
    pub(crate) fn check(&self, key: &K) -> Result<(), RetryAfter> {
        if self.per_sec == 0.0 {
            return Ok(());
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
        // Looked up before inserting: a busy key is not cloned per call.
        let bucket = match b.by_key.get_mut(key) {
            Some(bucket) => bucket,
            None => b.by_key.entry(key.clone()).or_insert(Bucket {
                tokens: self.burst,
                last: now,
            }),
        };
        let refill = now.duration_since(bucket.last).as_secs_f64() * self.per_sec;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.per_sec;
            Err(RetryAfter(Duration::from_secs_f64(wait.min(86_400.0))))
        }
    }
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// Give back the token a `check` of `key` took, when a later check of
    /// the same request refused it: a refused request spends nothing.
    pub(crate) fn refund(&self, key: &K) {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = b.by_key.get_mut(key) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
        }
    }
}

/// How long a refused caller should wait before its next try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RetryAfter(pub(crate) Duration);

impl RetryAfter {
    /// Whole seconds, rounded up and at least 1, as `Retry-After` takes them.
    pub(crate) fn secs(self) -> u64 {
        let d = self.0;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse() {
        let r = RateLimiter::new(Rate::per_sec(1, 3));
        for _ in 0..3 {
            assert_eq!(r.check(&"c"), Ok(()));
        }
        let wait = r.check(&"c").unwrap_err();
        assert!(
            wait.0 <= Duration::from_secs(1) && wait.secs() == 1,
            "{wait:?}"
        );
        assert_eq!(r.check(&"d"), Ok(()), "another key has its own bucket");
        assert_eq!(RateLimiter::new(Rate::per_sec(0, 0)).check(&"c"), Ok(()));
    }

    #[test]
    fn a_refund_gives_the_token_back() {
        let r = RateLimiter::new(Rate::per_sec(1, 1));
        assert_eq!(r.check(&"c"), Ok(()));
        assert!(r.check(&"c").is_err());
        r.refund(&"c");
        assert_eq!(r.check(&"c"), Ok(()));
    }

    #[test]
    fn wait_follows_the_rate() {
        let r = RateLimiter::new(Rate {
            per_min: 2,
            burst: 1,
        });
        assert_eq!(r.check(&"c"), Ok(()));
        let wait = r.check(&"c").unwrap_err();
        assert!((29..=30).contains(&wait.secs()), "{wait:?}");
    }

    #[test]
    fn full_buckets_are_swept() {
        let r = RateLimiter::new(Rate::per_sec(1_000_000, 1));
        for i in 0..SWEEP_EVERY {
            let _ = r.check(&i);
        }
        let held = r.buckets.lock().unwrap().by_key.len() as u64;
        assert!(held < SWEEP_EVERY, "{held} buckets kept");
    }
}
