//! The sled backend's one write path: group commit on one thread.
//!
//! Every job (a write set, an acknowledgement, expiry, a barrier, a live
//! backup, the checkpoint at a stop) goes through one channel, so
//! submission order is apply order. The
//! writer thread takes every job queued so far, turns each into writes
//! (`apply`: conditions checked, sequence numbers assigned) and applies them
//! in that order: multi-key sets merged into one atomic sled write, single
//! keys as plain inserts (`Store::apply_all`); before a job that reads the
//! database to decide (a condition, a deletion, a backup), what is queued is
//! applied first. The plain sends of a cycle share a delivery batch, one
//! key, written at the end of the cycle, before the first job that must
//! come after it, or once it is full (about 6 KiB). The same thread then flushes once for the cycle (sled
//! flush + `fdatasync` of its log file), makes the new queue entries
//! visible and answers; jobs that came meanwhile make the next cycle.
//!
//! Applying and flushing used to overlap on two threads. On the two cores
//! the DS is measured on, the hand-off between them per cycle (a wake-up
//! and a context switch each way) cost more than the overlap gained: one
//! thread serves more sends per second at less CPU per request
//! (BENCHMARKS.md). A cycle's apply is short next to its flush.
//!
//! sled seals its log buffer for every atomic write whatever its size, so one
//! write per cycle instead of one per request (and none for cycles of single
//! keys) is what lets durability keep up with load. After a failed write or
//! flush, nothing more is applied (sled 0.34 stays broken after an I/O
//! error, and later jobs may depend on the failed one): storage is marked
//! broken until the server reopens it. A staged compaction retires the
//! database the same way: every later job is refused until the server has
//! reopened the data directory on the compacted copy.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use mls_ds_protocol::ClientId;
use mls_ds_storage::{PendingWrites, StorageError, Store};

use super::apply::Applier;
use super::checkpoint::{self, Written};
use super::job::{Finish, Job};
use super::rosters;
use crate::backend::error::{StorageFault, StoreError};
use crate::backend::{AdminReport, NewHeads};

/// What requests are told between a staged compaction and the reopen.
pub(crate) const COMPACTING: &str =
    "the database is being compacted; storage reopens in a moment, retry shortly";

/// Most jobs taken into one batch.
const MAX_BATCH: usize = 4096;
/// Cycles between two looks at the retired rosters (a range read each):
/// a roster outlives its last batch by at most this many cycles.
pub(crate) const SWEEP_EVERY_CYCLES: u32 = 256;

/// Counters exported on `/metrics`, and the broken state.
#[derive(Default, Debug)]
pub(crate) struct CommitStats {
    /// Physical flushes.
    pub(crate) flushes: AtomicU64,
    /// Jobs made durable.
    pub(crate) durable: AtomicU64,
    /// Flushes or writes that failed.
    pub(crate) failures: AtomicU64,
    /// Time spent applying writes to sled, in microseconds.
    pub(crate) apply_us: AtomicU64,
    /// Time spent in sled flush + `fdatasync`, in microseconds.
    pub(crate) flush_us: AtomicU64,
    /// Set by the first failure; the server reopens the database to recover.
    broken: Mutex<Option<StorageFault>>,
    /// Set once a compaction is staged: nothing more is written to this
    /// database, and the server reopens the data directory, which swaps the
    /// compacted copy in.
    retired: AtomicBool,
    /// Set by the checkpoint of a stop: nothing more is written.
    closed: AtomicBool,
}

impl CommitStats {
    /// The fault that broke storage, if any.
    pub(crate) fn broken(&self) -> Option<StorageFault> {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a staged compaction retired this database.
    pub(crate) fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn mark_broken(&self, e: &StorageError) -> StorageFault {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let fault = fault_of(e);
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(fault)
            .clone()
    }
}

/// The words a client may see for a storage error: the OS error only.
fn fault_of(e: &StorageError) -> StorageFault {
    let io = match e {
        StorageError::Io(io) => Some(io),
        StorageError::Sled(sled::Error::Io(io)) => Some(io),
        _ => None,
    };
    io.map_or_else(|| StorageFault::from_os_error(None), StorageFault::from_io)
}

/// Handle to the writer thread; the threads stop when every handle is gone.
pub(crate) struct GroupCommit {
    queue: mpsc::Sender<Job>,
    pub(crate) stats: Arc<CommitStats>,
}

impl GroupCommit {
    /// Start the writer thread; it writes the queue index's checkpoint
    /// every `checkpoint_every` jobs (0: only at a stop).
    pub(crate) fn start(
        applier: Applier,
        new_heads: Arc<NewHeads>,
        checkpoint_every: u64,
    ) -> Result<GroupCommit, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(CommitStats::default());
        let writer = Writer {
            store: applier.layout.store.clone(),
            index: applier.index.clone(),
            applier,
            stats: stats.clone(),
            new_heads,
            checkpoint_every,
            since_checkpoint: 0,
            since_sweep: 0,
        };
        std::thread::Builder::new()
            .name("mls-ds-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start mls-ds-writer: {e}")))?;
        Ok(GroupCommit { queue: tx, stats })
    }

    /// Queue a job; it is refused at once if the threads stopped.
    pub(crate) fn submit(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.queue.send(job) {
            job.refuse(StoreError::Unavailable(
                "the storage write pipeline stopped".into(),
            ));
        }
    }
}

/// A batch's prepared jobs and whether applying them succeeded.
struct Cycle {
    done: Vec<Done>,
    applied: Result<(), StoreError>,
}

/// A prepared job waiting for the flush.
struct Done {
    publish: Vec<(ClientId, u64)>,
    finish: Finish,
}

struct Writer {
    store: Store,
    index: Arc<super::queue_index::QueueIndex>,
    applier: Applier,
    stats: Arc<CommitStats>,
    new_heads: Arc<NewHeads>,
    /// Jobs between checkpoints of the queue index (0: only at a stop).
    checkpoint_every: u64,
    /// Jobs made durable since the last checkpoint.
    since_checkpoint: u64,
    /// Cycles since retired rosters were last looked at.
    since_sweep: u32,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            batch.extend(rx.try_iter().take(MAX_BATCH));
            let cycle = self.cycle(batch);
            if !cycle.done.is_empty() {
                self.since_checkpoint += cycle.done.len() as u64;
                self.finish(cycle);
            }
            // Between two cycles no batch is open and every one is applied.
            if self.refusal(&Ok(())).is_none() {
                if let Err(e) = self.applier.receipts.between_cycles(&self.index.lock()) {
                    self.storage_failed(&e, "freezing send receipts into a run failed");
                }
                self.since_sweep += 1;
                if self.since_sweep >= SWEEP_EVERY_CYCLES {
                    self.since_sweep = 0;
                    // Read without the index's lock, which fetches take.
                    let retired = self.index.lock().rosters.retired();
                    match rosters::sweep(&self.applier.layout, &retired) {
                        Ok(gone) => self.index.lock().rosters.removed(&gone),
                        Err(e) => self.storage_failed(&e, "removing retired rosters failed"),
                    }
                }
            }
            if self.checkpoint_every > 0 && self.since_checkpoint >= self.checkpoint_every {
                self.since_checkpoint = 0;
                // Between two cycles every write of the index's state is
                // applied, and no delivery batch is open.
                if self.refusal(&Ok(())).is_none() {
                    let _ = self.checkpoint();
                }
            }
        }
    }

    /// Write the queue index's checkpoint of everything applied so far (made
    /// durable by the next flush).
    ///
    /// The index stays locked while the checkpoint is written, chunk by
    /// chunk (fetches wait that long: 0.1-0.3 s at 10,000,000 queued
    /// entries); a copy of the whole encoding taken under the lock would
    /// cost its size in memory, which the allocator keeps.
    fn checkpoint(&self) -> Result<Written, StoreError> {
        let t0 = Instant::now();
        let index = self.index.lock();
        // Frozen first: a start from this checkpoint then reads no earlier
        // batch for send receipts.
        if let Err(e) = self.applier.receipts.freeze_now(&index) {
            self.storage_failed(&e, "freezing send receipts into a run failed");
            return Err(e);
        }
        let written = checkpoint::write(&self.applier.layout, &index);
        match &written {
            Ok(w) => tracing::debug!(
                bytes = w.bytes,
                entries = w.entries,
                ms = t0.elapsed().as_millis() as u64,
                "queue index checkpoint written"
            ),
            Err(e) => self.storage_failed(e, "writing the queue index checkpoint failed"),
        }
        written
    }

    /// A write outside the cycles failed: a storage error breaks storage.
    fn storage_failed(&self, e: &StoreError, what: &str) {
        if let StoreError::Storage(se) = e {
            self.stats.mark_broken(se);
        }
        tracing::error!(error = %e, "{what}");
    }

    /// Prepare and apply one batch, in order.
    fn cycle(&mut self, batch: Vec<Job>) -> Cycle {
        let mut pending: Vec<PendingWrites> = Vec::new();
        let mut done = Vec::with_capacity(batch.len());
        let mut applied = Ok(());
        for job in batch {
            if let Some(e) = self.refusal(&applied) {
                job.refuse(e);
                continue;
            }
            // The open batch is sealed before a job that must follow it
            // (`Job::may_pass_open_batch`), before one that reads the
            // database (the receipts `SendNew` checks in memory stay there
            // only until what is pending is applied), and when it is full.
            if !job.may_pass_open_batch() || job.reads_first() || self.applier.open_batch_is_full()
            {
                applied = self.seal(&mut pending);
                if let Some(e) = self.refusal(&applied) {
                    job.refuse(e);
                    continue;
                }
            }
            if job.reads_first() && !pending.is_empty() {
                applied = self.apply(std::mem::take(&mut pending));
                if let Some(e) = self.refusal(&applied) {
                    job.refuse(e);
                    continue;
                }
            }
            if let Job::Compact { reply } = job {
                reply.send(self.compact());
                continue;
            }
            if let Job::ForgetSends { cutoff_ms, reply } = job {
                let forgotten = self.applier.receipts.forget(cutoff_ms, &self.index.lock());
                if let Err(e) = &forgotten {
                    self.storage_failed(e, "forgetting old send receipts failed");
                }
                reply.send(forgotten.map(|n| usize::try_from(n).unwrap_or(usize::MAX)));
                continue;
            }
            if let Job::Close { reply } = job {
                reply.send(self.close());
                continue;
            }
            if let Some(p) = self.applier.prepare(job) {
                pending.extend(p.writes);
                done.push(Done {
                    publish: p.publish,
                    finish: p.finish,
                });
            }
            if let Some(why) = self.applier.take_diverged() {
                // The queue index changed for a write that will not be
                // made: nothing more of the cycle is applied, and the
                // reopen rebuilds the index from the database.
                let e = StorageError::Io(std::io::Error::other(why));
                let fault = self.stats.mark_broken(&e);
                tracing::error!(error = %e, "a write that changed the queue index could not be prepared; storage marked broken");
                applied = Err(StoreError::Failed(fault));
            }
        }
        // After a failure the open batch is dropped with the rest: its
        // jobs get the failure, and storage is reopened.
        let sealed = self.seal(&mut pending);
        if applied.is_ok() {
            applied = sealed.and_then(|()| self.apply(pending));
        }
        Cycle { done, applied }
    }

    /// Add the open delivery batch's writes to `pending`.
    fn seal(&mut self, pending: &mut Vec<PendingWrites>) -> Result<(), StoreError> {
        match self.applier.seal() {
            Ok(writes) => {
                pending.extend(writes);
                Ok(())
            }
            Err(e) => {
                let fault = self.stats.mark_broken(&e);
                tracing::error!(error = %e, "sealing a delivery batch failed; storage marked broken");
                Err(StoreError::Failed(fault))
            }
        }
    }

    /// Stage a compaction of everything applied so far; once it is staged,
    /// retire: every later job is refused, so that the copy holds every
    /// write this database acknowledged.
    fn compact(&mut self) -> Result<AdminReport, StoreError> {
        // The copy holds no unfinished run of send receipts.
        self.applier.receipts.settle(&self.index.lock())?;
        let report = super::admin::compact(&self.applier.layout)?;
        self.stats.retired.store(true, Ordering::Release);
        tracing::info!("compaction staged; storage reopens on the compacted database");
        Ok(report)
    }

    /// Write the queue index's checkpoint of everything applied so far,
    /// durably, and close: every later job is refused (the server is
    /// stopping).
    fn close(&mut self) -> Result<Written, StoreError> {
        self.stats.closed.store(true, Ordering::Release);
        let written = self.checkpoint()?;
        self.flush()?;
        Ok(written)
    }

    /// Why nothing more may be applied, if so.
    fn refusal(&self, applied: &Result<(), StoreError>) -> Option<StoreError> {
        if self.stats.closed.load(Ordering::Acquire) {
            return Some(StoreError::Unavailable(
                "the server is stopping; retry once it is back".into(),
            ));
        }
        if self.stats.retired() {
            return Some(StoreError::Unavailable(COMPACTING.into()));
        }
        if let Err(e) = applied {
            return Some(StoreError::Unavailable(format!(
                "an earlier write failed: {e}"
            )));
        }
        self.stats.broken().map(|fault| {
            StoreError::Unavailable(format!("an earlier write or flush failed: {fault}"))
        })
    }

    fn apply(&self, writes: Vec<PendingWrites>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let result = self.store.apply_all(writes);
        self.applier.batch_applied();
        self.stats
            .apply_us
            .fetch_add(elapsed_us(t0), Ordering::Relaxed);
        result.map_err(|e| {
            let fault = self.stats.mark_broken(&e);
            tracing::error!(error = %e, "applying writes failed; storage marked broken");
            StoreError::Failed(fault)
        })
    }
}

impl Writer {
    /// Flush + `fdatasync`, unless storage already broke (a broken sled
    /// fails every flush, and one failure is the one to report).
    fn flush(&self) -> Result<(), StoreError> {
        if let Some(fault) = self.stats.broken() {
            return Err(StoreError::Failed(fault));
        }
        let t0 = Instant::now();
        let flushed = self.store.flush().map_err(|e| {
            let fault = self.stats.mark_broken(&e);
            tracing::error!(error = %e, "flush failed; requests answered 500 and storage marked broken");
            StoreError::Failed(fault)
        });
        self.stats
            .flush_us
            .fetch_add(elapsed_us(t0), Ordering::Relaxed);
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        flushed
    }

    /// Flush once for what the cycle applied, then publish the new queue
    /// entries and answer, in order.
    fn finish(&self, cycle: Cycle) {
        let flushed = match &cycle.applied {
            Ok(()) => self.flush(),
            Err(_) => Ok(()),
        };
        if cycle.applied.is_ok() && flushed.is_ok() {
            let mut index = self.index.lock();
            for d in &cycle.done {
                index.publish(&d.publish);
            }
            drop(index);
            self.new_heads
                .record(cycle.done.iter().flat_map(|d| &d.publish));
        }
        self.stats
            .durable
            .fetch_add(cycle.done.len() as u64, Ordering::Relaxed);
        for d in cycle.done {
            let result = match (&cycle.applied, &flushed) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(e), _) | (_, Err(e)) => Err(copy(e)),
            };
            d.finish.answer(result);
        }
    }
}

/// The error each waiter of a failed cycle gets.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Failed(fault) => StoreError::Failed(fault.clone()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn elapsed_us(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)
}
