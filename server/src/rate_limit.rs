//! Per-client token-bucket rate limiting (429 when exceeded).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use mls_ds_protocol::ClientId;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets keyed by client.
pub(crate) struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<ClientId, Bucket>>,
}

impl RateLimiter {
    /// `per_sec == 0` disables limiting.
    pub(crate) fn new(per_sec: u32, burst: u32) -> Self {
        RateLimiter {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `client`; false means "over the limit".
    pub(crate) fn allow(&self, client: &ClientId) -> bool {
        if self.per_sec == 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(client.clone()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let refill = now.duration_since(b.last).as_secs_f64() * self.per_sec;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
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
        let r = RateLimiter::new(1, 3);
        let c = ClientId::new("c").unwrap();
        assert!(r.allow(&c) && r.allow(&c) && r.allow(&c));
        assert!(!r.allow(&c));
        assert!(RateLimiter::new(0, 0).allow(&c));
    }
}
