//! Group commit for async handlers: a 2xx is only sent once everything the
//! request wrote is flushed and fsynced, and concurrent requests share one
//! flush.
//!
//! Handlers apply their writes to sled (unflushed), then await
//! [`Flusher::durable`]. A dedicated thread takes every waiter queued so far,
//! flushes once (sled flush + `fdatasync` of its log file, via the storage
//! crate), and wakes them all. A waiter queued after a flush started is served
//! by the next one, so every write applied before `durable()` was called is
//! covered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use mls_ds_storage::Store;
use tokio::sync::oneshot;

use crate::error::{Result, ServerError};

/// Work to run in the flusher thread once the flush covering it succeeded.
pub type AfterFlush = Box<dyn FnOnce() + Send>;

struct Waiter {
    reply: oneshot::Sender<std::result::Result<(), String>>,
    after: Option<AfterFlush>,
}

/// Counters exported on `/metrics`.
#[derive(Default, Debug)]
pub struct FlushStats {
    /// Physical flushes.
    pub flushes: AtomicU64,
    /// Requests made durable.
    pub requests: AtomicU64,
    /// Flushes that failed.
    pub failures: AtomicU64,
    /// Set by the first failed flush. sled 0.34 keeps failing after an I/O
    /// error (e.g. a full disk) even once the cause is gone, so the server
    /// refuses further requests and reports unhealthy until it is restarted;
    /// the restart recovers every acknowledged write.
    pub broken: std::sync::Mutex<Option<String>>,
}

impl FlushStats {
    /// The error that broke storage, if any.
    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Handle to the flusher thread.
#[derive(Clone)]
pub struct Flusher {
    queue: mpsc::Sender<Waiter>,
    /// Shared counters.
    pub stats: Arc<FlushStats>,
}

impl Flusher {
    /// Start the flusher thread for `store`. It stops when every handle is dropped.
    pub fn start(store: Store) -> Result<Flusher> {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let stats = Arc::new(FlushStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("mls-ds-flusher".into())
            .spawn(move || run(store, rx, thread_stats))
            .map_err(|e| ServerError::Internal(format!("cannot start flusher: {e}")))?;
        Ok(Flusher { queue: tx, stats })
    }

    /// Wait until every write applied before this call is on disk.
    pub async fn durable(&self) -> Result<()> {
        self.durable_then(None).await
    }

    /// Like [`Flusher::durable`], and run `after` in the flusher thread once
    /// the flush succeeded, even if the waiting request is cancelled (its
    /// client disconnected): what was made durable is always published.
    pub async fn durable_then(&self, after: Option<AfterFlush>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Waiter { reply: tx, after })
            .map_err(|_| ServerError::Unavailable("flusher stopped".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Internal(format!("flush failed: {e}"))),
            Err(_) => Err(ServerError::Unavailable("flusher stopped".into())),
        }
    }
}

/// How long the flusher lingers for more waiters after the first one, as long
/// as they keep arriving. A flush costs a few hundred microseconds of mostly
/// kernel time whatever it carries, so under load a short linger multiplies
/// the requests per flush; an idle server adds at most this to one request.
const LINGER: Duration = Duration::from_micros(150);
/// Most waiters served by one flush.
const MAX_BATCH: usize = 256;

fn run(store: Store, rx: mpsc::Receiver<Waiter>, stats: Arc<FlushStats>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        while batch.len() < MAX_BATCH {
            match rx.recv_timeout(LINGER) {
                Ok(w) => {
                    batch.push(w);
                    batch.extend(rx.try_iter());
                }
                Err(_) => break,
            }
        }
        let result = store.flush().map_err(|e| e.to_string());
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats
            .requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            stats
                .broken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| e.clone());
            tracing::error!(error = %e, waiters = batch.len(), "flush failed; requests answered 500");
        }
        for w in batch {
            if result.is_ok() {
                if let Some(after) = w.after {
                    after();
                }
            }
            // A waiter that gave up (client disconnected) is fine to skip.
            let _ = w.reply.send(result.clone());
        }
    }
}
