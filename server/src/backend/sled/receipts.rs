//! Send receipts: the answer each send with a send id got, what `SendNew`
//! checks on every such send and what a retry gets within the
//! deduplication window. A send costs no sled write of its own (one key
//! per send was a sixth of a send's CPU, in sled's page cache and node
//! splits): its envelope already carries its send id.
//!
//! - **Fresh receipts** are those of the batches numbered from the
//!   watermark (`'w'`: u64 BE) on, kept in memory, exact; on disk they are
//!   the batches' envelopes (message id from batch and slot, recipients
//!   from the fan-out). So a batch holding any stays on disk, after every
//!   entry of it is acknowledged, until they are frozen; a start reads
//!   them back from the batches ([`Receipts::open`]).
//! - **Frozen runs** (`run.rs`): between two cycles, once there are
//!   [`FREEZE_AT`] fresh receipts (or the watermark lags [`MAX_LAG`]
//!   batches, and before every checkpoint of the queue index), the writer
//!   thread writes them as a run sorted by hash (`writing.rs`: in pieces,
//!   published by its header in one atomic write that also moves the
//!   watermark to the next batch); then it removes the batches kept
//!   for them, [`REMOVALS_PER_CYCLE`] between two cycles (all before a
//!   checkpoint), and merges the two newest runs while the older holds at
//!   most twice the newer's entries (and both at most [`MAX_RUN`]). Memory
//!   per receipt in a run: its Bloom filter's 8 bits and the fences'
//!   share, about 1.1 bytes.
//! - **A lookup** reads memory, then each run's filter (newest first); a
//!   run whose filter says yes (about 3 in 100 when the receipt is not
//!   there) reads one chunk of about 6 KiB.
//! - **Forgetting** (`forget`, hourly): runs whose newest send id is past
//!   the window are removed whole; fresh receipts past it are dropped by
//!   freezing the rest; merges drop what is past it.
//!
//! Every change of the published runs and the watermark is one atomic
//! sled write, so a crash leaves the state before it or after it (and
//! perhaps part of an unpublished run, which the next start removes).

mod bloom;
mod entry;
mod run;
mod writing;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use mls_ds_protocol::groups::SendId;
use mls_ds_protocol::ClientId;

use self::entry::hash_of;
use self::run::{Run, HEADER};
use super::batch;
use super::layout::{self, Layout};
use super::queue_index::IndexState;
use super::queue_startup;
use crate::backend::error::StoreError;
use crate::backend::records::{SendKey, SendReceipt};

/// Fresh receipts that make a run.
const FREEZE_AT: usize = 65_536;
/// Batches the watermark may lag behind the next batch: a start decodes
/// every envelope of the batches from the watermark on.
const MAX_LAG: u64 = 16_384;
/// Batches kept for frozen receipts removed between two cycles: spread,
/// so that a freeze does not hold the writer for their removal too.
const REMOVALS_PER_CYCLE: usize = 64;
/// Entries of a run no merge goes beyond: a merge runs on the writer
/// thread, and one of this size takes about 0.1-0.2 s.
const MAX_RUN: u64 = 1 << 18;
const WATERMARK: &[u8] = b"w";

/// A send and the answer it got.
pub(crate) struct SendAnswer {
    pub(crate) key: SendKey,
    pub(crate) receipt: SendReceipt,
}

/// What `stats` reports.
pub(crate) struct ReceiptCounts {
    pub(crate) fresh: usize,
    pub(crate) frozen: u64,
    pub(crate) runs: usize,
    /// Bytes of memory the runs' filters and fences take.
    pub(crate) run_memory: usize,
}

impl ReceiptCounts {
    /// Every remembered send.
    pub(crate) fn total(&self) -> u64 {
        self.fresh as u64 + self.frozen
    }
}

struct Inner {
    /// Fresh receipts that make a run ([`FREEZE_AT`]; tests take fewer).
    freeze_at: usize,
    /// Receipts not in a run yet, by send key.
    fresh: HashMap<Box<[u8]>, SendReceipt>,
    /// Batches whose envelopes hold them: those no queue entry references
    /// any more stay until the next freeze.
    holding: BTreeSet<u64>,
    /// Batches kept for receipts since frozen: removed a few per cycle,
    /// and all before a checkpoint.
    released: Vec<u64>,
    /// First batch whose receipts are not in a run.
    watermark: u64,
    /// Oldest first.
    runs: Vec<Run>,
    next_run: u64,
    /// Sends made before this are forgotten when a merge meets them.
    forget_before_ms: u64,
}

/// Every remembered send of one database.
pub(crate) struct Receipts {
    layout: Layout,
    inner: Mutex<Inner>,
}

impl Receipts {
    /// Read the runs' headers and filters, and the fresh receipts from the
    /// envelopes of the batches from the watermark on.
    pub(crate) fn open(layout: &Layout) -> Result<Receipts, StoreError> {
        let tree = layout.trees.sends;
        let mut runs = Vec::new();
        for (k, v) in layout.storage.scan_raw(tree.handle, &[HEADER])? {
            runs.push(Run::load(layout, &k, &v)?);
        }
        let next_run = runs.last().map_or(0, |r| r.id + 1);
        let watermark = match layout.storage.get_raw(tree.handle, WATERMARK)? {
            Some(v) => layout::be_u64(&v).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the send receipts' watermark holds {} bytes",
                    v.len()
                ))
            })?,
            None => 0,
        };
        let receipts = Receipts {
            layout: layout.clone(),
            inner: Mutex::new(Inner {
                freeze_at: FREEZE_AT,
                fresh: HashMap::new(),
                holding: BTreeSet::new(),
                released: Vec::new(),
                watermark,
                runs,
                next_run,
                forget_before_ms: 0,
            }),
        };
        receipts.read_fresh()?;
        Ok(receipts)
    }

    /// Stage the receipts the envelopes of the batches from the watermark
    /// on hold.
    fn read_fresh(&self) -> Result<(), StoreError> {
        let layout = &self.layout;
        let tree = layout.trees.delivery;
        let first = self.lock().watermark;
        queue_startup::for_each_batch(layout, first, |number, v| {
            let mut sends = Vec::new();
            for record in batch::records(v) {
                let (slot, bytes) = record.map_err(|e| batch::corrupt(number, &e))?;
                let envelope = batch::decode_envelope(tree, number, bytes)?;
                let Some(send) = envelope.message.send else {
                    continue;
                };
                let id = layout::message_id(number, slot);
                let sender = ClientId::new(&envelope.message.sender).map_err(|e| {
                    StoreError::Corrupt(format!("message {id} names a bad sender: {e}"))
                })?;
                sends.push(SendAnswer {
                    key: SendKey {
                        sender,
                        id: SendId {
                            created_ms: send.created_ms,
                            nonce: send.nonce,
                        },
                    },
                    receipt: SendReceipt {
                        message_id: id,
                        recipients: u32::try_from(envelope.fanout.entries.len())
                            .unwrap_or(u32::MAX),
                    },
                });
            }
            self.stage(number, &sends);
            Ok(())
        })
    }

    /// Freeze after `n` fresh receipts instead of [`FREEZE_AT`].
    #[cfg(test)]
    pub(super) fn freeze_at(&self, n: usize) {
        self.lock().freeze_at = n;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The receipt of a send, if it is remembered (staged ones included:
    /// a reader waits for the writes before it to be durable).
    pub(crate) fn get(&self, key: &SendKey) -> Result<Option<SendReceipt>, StoreError> {
        let k = layout::send_key(key);
        let inner = self.lock();
        if let Some(r) = inner.fresh.get(k.as_slice()) {
            return Ok(Some(*r));
        }
        if inner.runs.is_empty() {
            return Ok(None);
        }
        let hash = hash_of(&k);
        for run in inner.runs.iter().rev() {
            if let Some(r) = run.find(&self.layout, &k, hash)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Remember the receipts of `batch`'s messages from now on (once every
    /// write of theirs is prepared).
    pub(crate) fn stage(&self, batch: u64, sends: &[SendAnswer]) {
        if sends.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for s in sends {
            inner
                .fresh
                .insert(layout::send_key(&s.key).into_boxed_slice(), s.receipt);
        }
        inner.holding.insert(batch);
    }

    /// Whether a batch no queue entry references any more must stay on
    /// disk for the fresh receipts it holds (the next freeze removes it).
    pub(crate) fn keeps(&self, batch: u64) -> bool {
        self.lock().holding.contains(&batch)
    }

    /// Between two cycles (no batch open, every batch applied): freeze the
    /// fresh receipts into a run once there are enough, or once the
    /// watermark lags too far, and merge; remove a few batches kept for
    /// receipts frozen before.
    pub(crate) fn between_cycles(&self, index: &IndexState) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let lag = index.next_batch.saturating_sub(inner.watermark);
        if inner.fresh.len() >= inner.freeze_at || lag >= MAX_LAG {
            self.freeze_and_merge(&mut inner, index)?;
        }
        self.remove_released(&mut inner, REMOVALS_PER_CYCLE)
    }

    /// Freeze now and remove every batch kept for receipts, before a
    /// checkpoint of the queue index: a start from it reads no batch
    /// before it for receipts, and finds none left over there.
    pub(crate) fn freeze_now(&self, index: &IndexState) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !inner.fresh.is_empty() || inner.watermark != index.next_batch {
            self.freeze_and_merge(&mut inner, index)?;
        }
        self.remove_released(&mut inner, usize::MAX)
    }

    /// Remove up to `max` batches kept for receipts since frozen (in one
    /// write: one left behind by a crash is an orphan the next start
    /// deletes).
    fn remove_released(&self, inner: &mut Inner, max: usize) -> Result<(), StoreError> {
        if inner.released.is_empty() {
            return Ok(());
        }
        let from = inner.released.len().saturating_sub(max);
        let tx = self.layout.storage.begin();
        let delivery = self.layout.trees.delivery.handle;
        for batch in &inner.released[from..] {
            tx.remove_raw(delivery, &layout::batch_key(*batch))?;
        }
        tx.commit()?;
        inner.released.truncate(from);
        Ok(())
    }

    fn freeze_and_merge(&self, inner: &mut Inner, index: &IndexState) -> Result<(), StoreError> {
        let t0 = std::time::Instant::now();
        let frozen = self.freeze(inner, index)?;
        let t1 = std::time::Instant::now();
        self.merge_similar(inner)?;
        tracing::debug!(
            frozen,
            freeze_ms = (t1 - t0).as_millis() as u64,
            merge_ms = t1.elapsed().as_millis() as u64,
            runs = inner.runs.len(),
            "send receipts frozen into a run"
        );
        Ok(())
    }

    /// Forget sends made before `cutoff_ms`; how many were forgotten.
    pub(crate) fn forget(&self, cutoff_ms: u64, index: &IndexState) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        inner.forget_before_ms = inner.forget_before_ms.max(cutoff_ms);
        let mut forgotten = 0;
        let old = |r: &Run| r.newest_created_ms < cutoff_ms;
        if inner.runs.iter().any(old) {
            let tx = self.layout.storage.begin();
            for run in inner.runs.iter().filter(|r| old(r)) {
                forgotten += run.entries;
                for k in run.keys() {
                    tx.remove_raw(self.layout.trees.sends.handle, &k)?;
                }
            }
            tx.commit()?;
            inner.runs.retain(|r| !old(r));
        }
        let before = inner.fresh.len();
        if inner.fresh.keys().any(|k| entry::created_ms(k) < cutoff_ms) {
            let kept = self.freeze(&mut inner, index)?;
            forgotten += (before - kept) as u64;
            self.merge_similar(&mut inner)?;
        }
        Ok(forgotten)
    }

    /// Remembered sends made before `cutoff_ms`, oldest first, at most
    /// `limit` (`mls-ds migrate`).
    pub(crate) fn before(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<SendKey>, StoreError> {
        let inner = self.lock();
        let mut keys: Vec<Box<[u8]>> = inner
            .fresh
            .keys()
            .filter(|k| entry::created_ms(k) < cutoff_ms)
            .cloned()
            .collect();
        for run in &inner.runs {
            for e in run.stream(&self.layout) {
                let e = e?;
                if e.created_ms() < cutoff_ms {
                    keys.push(e.order().1.into());
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        keys.truncate(limit);
        keys.iter()
            .map(|k| {
                layout::split_send_key(k)
                    .ok_or_else(|| StoreError::Corrupt(format!("send key {}", hex::encode(k))))
            })
            .collect()
    }

    /// What `check` finds wrong with the stored runs.
    pub(crate) fn problems(&self) -> Result<Vec<String>, StoreError> {
        let inner = self.lock();
        let mut problems = Vec::new();
        for run in &inner.runs {
            problems.extend(run.problems(&self.layout)?);
        }
        Ok(problems)
    }

    /// How many receipts are remembered, and where.
    pub(crate) fn counts(&self) -> ReceiptCounts {
        let inner = self.lock();
        ReceiptCounts {
            fresh: inner.fresh.len(),
            frozen: inner.runs.iter().map(|r| r.entries).sum(),
            runs: inner.runs.len(),
            run_memory: inner.runs.iter().map(Run::memory).sum(),
        }
    }
}

#[cfg(test)]
mod tests;
