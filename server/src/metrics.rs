//! Prometheus text metrics: requests by route and status and a latency
//! histogram, connections and memory held (counted by the HTTP adapter),
//! and the backend's queue depths and group-commit (fsync) counters, and
//! on a database its pool and latency.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::backend::BackendStats;
use crate::histogram::Histogram;
use crate::service::auth::SignatureCounts;

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(&'static str, u16), u64>,
    latency: Histogram,
}

/// Request counters.
#[derive(Default)]
pub(crate) struct Metrics {
    inner: Mutex<Inner>,
    /// Connections closed at accept: their source held its most, or the
    /// server did.
    refused_per_source: AtomicU64,
    refused_in_total: AtomicU64,
}

/// What the HTTP front holds now.
pub(crate) struct FrontGauges {
    /// Authenticated sessions.
    pub(crate) sessions: usize,
    /// Queue streams.
    pub(crate) streams: usize,
    /// Connections.
    pub(crate) connections: usize,
    /// Bytes of request bodies being read.
    pub(crate) request_bytes: usize,
    /// Bytes of response bodies not yet sent.
    pub(crate) response_bytes: usize,
    /// How the Ed25519 signatures of requests were verified.
    pub(crate) signatures: SignatureCounts,
}

impl Metrics {
    /// Record one finished request.
    pub(crate) fn record(&self, route: &'static str, status: u16, elapsed: Duration) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *m.requests.entry((route, status)).or_default() += 1;
        m.latency.record(elapsed);
    }

    /// Count a connection closed at accept (`per_source`: its source
    /// address held its most; otherwise the server did).
    pub(crate) fn connection_refused(&self, per_source: bool) {
        let counter = if per_source {
            &self.refused_per_source
        } else {
            &self.refused_in_total
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Render everything in Prometheus text format: the request counters,
    /// then the backend's gauges and counters and the front's.
    pub(crate) fn render(&self, stats: &BackendStats, front: &FrontGauges) -> String {
        let mut out = String::new();
        self.render_requests(&mut out);
        out.push_str("# HELP mls_ds_connections_refused_total Connections closed at accept, by the limit they hit.\n");
        out.push_str("# TYPE mls_ds_connections_refused_total counter\n");
        for (limit, n) in [
            ("source", &self.refused_per_source),
            ("total", &self.refused_in_total),
        ] {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "mls_ds_connections_refused_total{{limit=\"{limit}\"}} {n}"
            );
        }
        render_backend(&mut out, stats, front);
        out
    }

    fn render_requests(&self, out: &mut String) {
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
        m.latency.render(out, "mls_ds_request_duration_seconds", "");
    }
}

/// The backend's gauges and counters, and what the front holds.
fn render_backend(out: &mut String, stats: &BackendStats, front: &FrontGauges) {
    let gauges = [
        (
            "mls_ds_queue_entries",
            "Unacknowledged visible queue entries.",
            "gauge",
            stats.queue_entries.to_string(),
        ),
        (
            "mls_ds_queue_depth_max",
            "Deepest queue.",
            "gauge",
            stats.queue_depth_max.to_string(),
        ),
        (
            "mls_ds_stored_messages",
            "Message bodies still referenced.",
            "gauge",
            stats.stored_messages.to_string(),
        ),
        (
            "mls_ds_queue_overflow_drops_total",
            "Queue entries dropped because their queue was full (oldest first).",
            "counter",
            stats.queue_overflow_drops.to_string(),
        ),
        (
            "mls_ds_fsync_batches_total",
            "Group-commit flushes (flush + fdatasync).",
            "counter",
            stats.flushes.to_string(),
        ),
        (
            "mls_ds_group_commit_apply_seconds_total",
            "Time the write path spent applying writes.",
            "counter",
            stats.apply_seconds.to_string(),
        ),
        (
            "mls_ds_group_commit_flush_seconds_total",
            "Time the write path spent in flush + fdatasync.",
            "counter",
            stats.flush_seconds.to_string(),
        ),
        (
            "mls_ds_durable_requests_total",
            "Writes made durable by those flushes.",
            "counter",
            stats.durable_writes.to_string(),
        ),
        (
            "mls_ds_fsync_failures_total",
            "Failed writes or flushes.",
            "counter",
            stats.flush_failures.to_string(),
        ),
        (
            "mls_ds_sessions",
            "Open authenticated sessions.",
            "gauge",
            front.sessions.to_string(),
        ),
        (
            "mls_ds_ed25519_signatures_total",
            "Ed25519 signatures of requests verified (registrations, session openings, signature tokens).",
            "counter",
            front.signatures.signatures.to_string(),
        ),
        (
            "mls_ds_ed25519_rounds_total",
            "Rounds those signatures were verified in: a round of several concurrent requests is one batch.",
            "counter",
            front.signatures.rounds.to_string(),
        ),
        (
            "mls_ds_ed25519_failed_batches_total",
            "Batches that failed (a bad signature among them) and were verified again one by one.",
            "counter",
            front.signatures.failed_batches.to_string(),
        ),
        (
            "mls_ds_streams",
            "Open queue streams (GET /v1/queue/stream).",
            "gauge",
            front.streams.to_string(),
        ),
        (
            "mls_ds_connections",
            "Open client connections.",
            "gauge",
            front.connections.to_string(),
        ),
        (
            "mls_ds_request_body_bytes",
            "Bytes of request bodies being read (--max-request-buffer-mb).",
            "gauge",
            front.request_bytes.to_string(),
        ),
        (
            "mls_ds_response_body_bytes",
            "Bytes of large response bodies not yet sent (--max-response-buffer-mb).",
            "gauge",
            front.response_bytes.to_string(),
        ),
    ];
    let pool = stats.pool.map(|p| {
        [
            (
                "mls_ds_db_pool_connections",
                "Database connections open (PostgreSQL backend).",
                "gauge",
                p.size.to_string(),
            ),
            (
                "mls_ds_db_pool_idle",
                "Open database connections not in use.",
                "gauge",
                p.available.to_string(),
            ),
            (
                "mls_ds_db_pool_waiting",
                "Requests waiting for a database connection.",
                "gauge",
                p.waiting.to_string(),
            ),
            (
                "mls_ds_db_pool_max",
                "Most database connections this process opens (--database-pool).",
                "gauge",
                p.max_size.to_string(),
            ),
        ]
    });
    for (name, help, kind, value) in gauges.into_iter().chain(pool.into_iter().flatten()) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    }
    if let Some(latency) = &stats.database {
        out.push_str(
            "# HELP mls_ds_db_seconds Database work as the DS waits for it, a pooled \
             connection included: each write transaction to its commit, and each read.\n",
        );
        out.push_str("# TYPE mls_ds_db_seconds histogram\n");
        latency
            .transactions
            .render(out, "mls_ds_db_seconds", "kind=\"transaction\"");
        latency
            .reads
            .render(out, "mls_ds_db_seconds", "kind=\"read\"");
    }
}
