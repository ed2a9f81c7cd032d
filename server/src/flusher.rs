//! Group commit for async handlers: a 2xx is only sent once everything the
//! request wrote is flushed and fsynced, and concurrent requests share one
//! write and one flush.
//!
//! Hot-path handlers do not write to sled themselves: they hand the writes of
//! their transaction to [`Flusher::submit`]. A writer thread takes every job
//! queued so far and applies all their writes, in submission order (multi-key
//! sets merged into one atomic sled write, single keys as plain inserts, see
//! [`Store::apply_all`]); a syncer thread then flushes once for everything
//! applied meanwhile (sled flush + `fdatasync` of its log file, via the
//! storage crate), runs the jobs' after-flush work and wakes them all. The
//! two stages overlap: the next batch is applied while the last one is
//! flushed.
//! sled seals its log buffer twice per atomic write whatever its size, and
//! each seal is a log write + `sync_file_range` on its I/O threads, so one
//! write per cycle instead of one per request (and none at all for cycles of
//! single-key sets) is what lets durability keep up with load. Handlers that
//! applied writes directly call [`Flusher::durable`]: a job queued after a
//! flush started is served by the next one, so every write applied before
//! the call is covered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use mls_ds_storage::{PendingWrites, Store};
use tokio::sync::oneshot;

use crate::error::{Result, ServerError};

/// Work to run in the flusher thread once the flush covering it succeeded.
pub type AfterFlush = Box<dyn FnOnce() + Send>;

struct Waiter {
    writes: Vec<PendingWrites>,
    reply: oneshot::Sender<std::result::Result<(), String>>,
    after: Option<AfterFlush>,
}

/// Resolves once a submitted job is durable (see [`Flusher::submit`]).
#[must_use = "a request must not be answered before its writes are durable"]
pub struct Durable(oneshot::Receiver<std::result::Result<(), String>>);

impl Durable {
    /// Wait until the job's writes are applied and on disk.
    pub async fn wait(self) -> Result<()> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Internal(format!("write failed: {e}"))),
            Err(_) => Err(ServerError::Unavailable("flusher stopped".into())),
        }
    }

    /// Like [`Durable::wait`], and keep `hold` (a group's lock) until the
    /// write is durable or failed, even if the waiting request is cancelled
    /// meanwhile: whoever takes the lock next sees only durable state.
    pub async fn wait_holding<H: Send + 'static>(self, hold: H) -> Result<()> {
        let task = tokio::spawn(async move {
            let result = self.wait().await;
            drop(hold);
            result
        });
        task.await
            .map_err(|e| ServerError::Internal(format!("waiting for durability failed: {e}")))?
    }
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
    /// Time spent applying the cycles' writes to sled, in microseconds.
    pub apply_us: AtomicU64,
    /// Time spent in sled flush + `fdatasync`, in microseconds.
    pub flush_us: AtomicU64,
    /// Set by the first failed flush. sled 0.34 keeps failing after an I/O
    /// error (e.g. a full disk) even once the cause is gone, so the server
    /// refuses further requests and reports unhealthy until `recovery`
    /// reopens the database, which recovers every acknowledged write.
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
        self.submit(Vec::new(), None)?.wait().await
    }

    /// Queue `writes` for the next cycle of the flusher thread, which applies
    /// them (after everything submitted before, each set atomically, see
    /// [`Store::apply_all`]), flushes, and then runs `after`, even if the
    /// request that submitted it was cancelled meanwhile: what was made
    /// durable is always published. Submission order is application order,
    /// so callers that need an order (queue sequence numbers) submit under
    /// the lock that decides it. Does not block.
    pub fn submit(&self, writes: Vec<PendingWrites>, after: Option<AfterFlush>) -> Result<Durable> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Waiter {
                writes,
                reply: tx,
                after,
            })
            .map_err(|_| ServerError::Unavailable("flusher stopped".into()))?;
        Ok(Durable(rx))
    }
}

/// Most jobs applied as one write.
const MAX_BATCH: usize = 4096;

/// Jobs whose writes are applied, waiting for a flush.
type Applied = (Vec<Waiter>, std::result::Result<(), String>);

fn mark_broken(stats: &FlushStats, e: &str) {
    stats.failures.fetch_add(1, Ordering::Relaxed);
    stats
        .broken
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(|| e.to_owned());
}

/// Stage one: apply each batch of jobs (see [`Store::apply_all`]), in
/// submission order, and pass it on to the syncer. The hand-over holds one
/// batch, so while the syncer flushes, one batch is applied ahead and
/// everything else accumulates for the next: under load there is about one
/// apply per flush (each atomic sled write costs log-buffer seals and
/// I/O-thread hand-offs whatever its size), and an idle server adds no
/// waiting to a lone request.
/// After a failed write nothing later is applied: later jobs may depend on it
/// (sequence numbers), so they all fail and storage stays broken.
fn run(store: Store, rx: mpsc::Receiver<Waiter>, stats: Arc<FlushStats>) {
    let (to_syncer, from_writer) = mpsc::sync_channel::<Applied>(1);
    let sync_store = store.clone();
    let sync_stats = stats.clone();
    let syncer = std::thread::Builder::new()
        .name("mls-ds-syncer".into())
        .spawn(move || sync(sync_store, from_writer, sync_stats));
    if let Err(e) = syncer {
        tracing::error!(error = %e, "cannot start the syncer thread");
        mark_broken(&stats, &format!("cannot start the syncer thread: {e}"));
        return;
    }
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(MAX_BATCH));
        let writes: Vec<PendingWrites> = batch
            .iter_mut()
            .flat_map(|w| std::mem::take(&mut w.writes))
            .collect();
        // A failed flush breaks storage as much as a failed write.
        let failed_before = failed.clone().or_else(|| stats.broken());
        let result = match &failed_before {
            Some(e) => Err(format!("an earlier write failed: {e}")),
            None => {
                let t0 = std::time::Instant::now();
                let r = store.apply_all(writes).map_err(|e| e.to_string());
                stats
                    .apply_us
                    .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Err(e) = &r {
                    mark_broken(&stats, e);
                    tracing::error!(error = %e, jobs = batch.len(), "applying writes failed; storage marked broken");
                    failed = Some(e.clone());
                }
                r
            }
        };
        if to_syncer.send((batch, result)).is_err() {
            return;
        }
    }
}

/// Stage two: flush once for everything applied so far (sled flush +
/// `fdatasync`), then run the jobs' after-flush work and answer them, in
/// order.
fn sync(store: Store, rx: mpsc::Receiver<Applied>, stats: Arc<FlushStats>) {
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        batches.extend(rx.try_iter());
        let t0 = std::time::Instant::now();
        let flushed = store.flush().map_err(|e| e.to_string());
        stats
            .flush_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &flushed {
            mark_broken(&stats, e);
            tracing::error!(error = %e, "flush failed; requests answered 500 and storage marked broken");
        }
        for (jobs, applied) in batches {
            let result = applied.and_then(|()| flushed.clone());
            stats
                .requests
                .fetch_add(jobs.len() as u64, Ordering::Relaxed);
            for w in jobs {
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
}
