//! The backend's background task: every second the messages that lost
//! entries are swept (those no entry refers to any more are deleted),
//! every hour and at startup all messages and the expired sessions, and
//! every ten seconds the gauges of `/metrics` are read.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Inner;

/// How often candidates for deletion are swept, and gauges refreshed.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// How often every message is checked for entries.
const FULL_SWEEP_PERIOD: Duration = Duration::from_secs(3600);
/// How often the gauges of `/metrics` are read from the database.
const GAUGE_PERIOD: Duration = Duration::from_secs(10);
/// Sweep released messages every second, all messages every hour, and
/// refresh the gauges.
pub(crate) async fn sweeper(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_PERIOD);
    let mut last_full: Option<tokio::time::Instant> = None;
    let mut last_gauges = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if last_full.is_none_or(|t| t.elapsed() >= FULL_SWEEP_PERIOD) {
            if let Err(e) = inner.forget_expired_sessions().await {
                tracing::warn!(error = %e, "deleting expired sessions failed");
            }
            match inner.sweep_all().await {
                Ok(n) => {
                    last_full = Some(tokio::time::Instant::now());
                    if n > 0 {
                        tracing::info!(deleted = n, "deleted messages no queue refers to");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "sweeping messages failed"),
            }
        }
        let candidates =
            std::mem::take(&mut *inner.released.lock().unwrap_or_else(|e| e.into_inner()));
        if !candidates.is_empty() {
            if let Err(e) = inner.sweep(candidates.clone()).await {
                tracing::warn!(error = %e, "sweeping acknowledged messages failed");
                inner
                    .released
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(candidates);
            }
        }
        if last_gauges.elapsed() >= GAUGE_PERIOD {
            last_gauges = tokio::time::Instant::now();
            if let Err(e) = inner.refresh_gauges().await {
                tracing::debug!(error = %e, "reading the gauges failed");
            }
        }
    }
}
