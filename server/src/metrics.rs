//! Prometheus text metrics: requests by route and status, a latency
//! histogram, queue depths, and group-commit (fsync) batches.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use crate::state::AppState;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0,
];

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(&'static str, u16), u64>,
    latency_counts: [u64; BUCKETS.len()],
    latency_count: u64,
    latency_sum: f64,
}

/// Request counters.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// Record one finished request.
    pub fn record(&self, route: &'static str, status: u16, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *m.requests.entry((route, status)).or_default() += 1;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                m.latency_counts[i] += 1;
            }
        }
        m.latency_count += 1;
        m.latency_sum += secs;
    }

    /// Render everything in Prometheus text format.
    pub fn render(&self, state: &AppState) -> String {
        let mut out = String::new();
        {
            let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            out.push_str("# HELP mls_ds_requests_total Requests by route and status.\n");
            out.push_str("# TYPE mls_ds_requests_total counter\n");
            for ((route, status), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "mls_ds_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
            out.push_str("# HELP mls_ds_request_duration_seconds Request latency.\n");
            out.push_str("# TYPE mls_ds_request_duration_seconds histogram\n");
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "mls_ds_request_duration_seconds_bucket{{le=\"{b}\"}} {}",
                    m.latency_counts[i]
                );
            }
            let _ = writeln!(
                out,
                "mls_ds_request_duration_seconds_bucket{{le=\"+Inf\"}} {}",
                m.latency_count
            );
            let _ = writeln!(out, "mls_ds_request_duration_seconds_sum {}", m.latency_sum);
            let _ = writeln!(
                out,
                "mls_ds_request_duration_seconds_count {}",
                m.latency_count
            );
        }
        let depths = state.queues.depths();
        let total: u64 = depths.iter().map(|(_, d)| d).sum();
        let max = depths.iter().map(|(_, d)| *d).max().unwrap_or(0);
        out.push_str("# HELP mls_ds_queue_entries Unacknowledged queue entries (loaded queues).\n");
        out.push_str("# TYPE mls_ds_queue_entries gauge\n");
        let _ = writeln!(out, "mls_ds_queue_entries {total}");
        out.push_str("# HELP mls_ds_queue_depth_max Deepest loaded queue.\n");
        out.push_str("# TYPE mls_ds_queue_depth_max gauge\n");
        let _ = writeln!(out, "mls_ds_queue_depth_max {max}");
        out.push_str("# HELP mls_ds_stored_messages Message bodies still referenced.\n");
        out.push_str("# TYPE mls_ds_stored_messages gauge\n");
        let _ = writeln!(
            out,
            "mls_ds_stored_messages {}",
            state.queues.stored_messages()
        );
        let f = &state.flusher.stats;
        out.push_str(
            "# HELP mls_ds_fsync_batches_total Group-commit flushes (flush + fdatasync).\n",
        );
        out.push_str("# TYPE mls_ds_fsync_batches_total counter\n");
        let _ = writeln!(
            out,
            "mls_ds_fsync_batches_total {}",
            f.flushes.load(Ordering::Relaxed)
        );
        for (name, help, us) in [
            (
                "mls_ds_group_commit_apply_seconds_total",
                "Time the flusher spent applying writes to sled.",
                &f.apply_us,
            ),
            (
                "mls_ds_group_commit_flush_seconds_total",
                "Time the flusher spent in flush + fdatasync.",
                &f.flush_us,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", us.load(Ordering::Relaxed) as f64 / 1e6);
        }
        out.push_str(
            "# HELP mls_ds_durable_requests_total Requests made durable by those flushes.\n",
        );
        out.push_str("# TYPE mls_ds_durable_requests_total counter\n");
        let _ = writeln!(
            out,
            "mls_ds_durable_requests_total {}",
            f.requests.load(Ordering::Relaxed)
        );
        out.push_str("# HELP mls_ds_fsync_failures_total Failed flushes.\n");
        out.push_str("# TYPE mls_ds_fsync_failures_total counter\n");
        let _ = writeln!(
            out,
            "mls_ds_fsync_failures_total {}",
            f.failures.load(Ordering::Relaxed)
        );
        out.push_str("# HELP mls_ds_sessions Open authenticated sessions.\n");
        out.push_str("# TYPE mls_ds_sessions gauge\n");
        let _ = writeln!(out, "mls_ds_sessions {}", state.auth.session_count());
        out
    }
}
