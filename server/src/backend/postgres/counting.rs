//! What the backend counts in this process: the writes in flight (for
//! `settled`), the write path's counters and the gauges the sweeper reads,
//! for `/metrics`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::backend::DbLatency;

/// Writes submitted and not yet answered, by ticket, for `settled`.
#[derive(Default)]
pub(crate) struct InFlight {
    pub(crate) next: AtomicU64,
    pending: Mutex<BTreeSet<u64>>,
    done: Notify,
}

impl InFlight {
    pub(crate) fn start(&self) -> u64 {
        let ticket = self.next.fetch_add(1, Ordering::SeqCst);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ticket);
        ticket
    }

    pub(crate) fn finish(&self, ticket: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ticket);
        self.done.notify_waiters();
    }

    /// Resolves once every ticket below `before` is finished.
    pub(crate) async fn wait_below(&self, before: u64) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let oldest = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .copied();
            if oldest.is_none_or(|t| t >= before) {
                return;
            }
            done.await;
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) commits: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) overflow_drops: AtomicU64,
    pub(crate) apply_micros: AtomicU64,
    pub(crate) commit_micros: AtomicU64,
    pub(crate) latency: Mutex<DbLatency>,
}

impl Counters {
    /// A transaction of `writes` writes committed after `applied` of
    /// statements and `committing` of commit.
    pub(crate) fn committed(&self, applied: Duration, committing: Duration, writes: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes, Ordering::Relaxed);
        self.apply_micros
            .fetch_add(micros(applied), Ordering::Relaxed);
        self.commit_micros
            .fetch_add(micros(committing), Ordering::Relaxed);
        self.transaction(applied.saturating_add(committing));
    }

    /// A write (a transaction, or one statement committed on its own)
    /// answered after `took`.
    pub(crate) fn transaction(&self, took: Duration) {
        self.latency().transactions.record(took);
    }

    /// A read answered after `took`.
    pub(crate) fn read(&self, took: Duration) {
        self.latency().reads.record(took);
    }

    fn latency(&self) -> std::sync::MutexGuard<'_, DbLatency> {
        self.latency.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What the gauge task last read.
#[derive(Clone, Copy, Default)]
pub(crate) struct Gauges {
    pub(crate) queue_entries: u64,
    pub(crate) queue_depth_max: u64,
    pub(crate) stored_messages: u64,
    pub(crate) size_on_disk: u64,
}
