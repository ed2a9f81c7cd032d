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
//!   batches), the writer thread starts freezing them into a run sorted by
//!   hash, written a piece per gap between two cycles (`writing.rs`) and
//!   published by its last piece, in one atomic write that also moves the
//!   watermark to the batch that was next when the freeze began. Then the
//!   writer removes the batches kept for them, [`REMOVALS_PER_CYCLE`]
//!   between two cycles, and (one run being built at a time) merges the
//!   two newest runs the same way while the older holds at most twice the
//!   newer's entries (and both at most [`MAX_RUN`]). Before a checkpoint
//!   of the queue index it finishes the run being built, and freezes and
//!   removes the rest at once. Memory per receipt in a run:
//!   its Bloom filter's 10 bits and the fences' share, about 1.4 bytes.
//! - **A lookup** reads memory (the fresh receipts, then those being
//!   frozen), then each run's filter (newest first); a run whose filter
//!   says yes (about 1 in 100 when the receipt is not there) reads one
//!   chunk of about 6 KiB.
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
use std::sync::{Arc, Mutex, MutexGuard};

use mls_ds_protocol::groups::SendId;
use mls_ds_protocol::ClientId;

use self::entry::hash_of;
use self::run::{Run, Stream, HEADER};
use self::writing::{Building, Freezing, Fresh, Source};
use super::batch;
use super::layout::{self, Layout};
use super::queue_index::IndexState;
use super::queue_startup;
use crate::backend::error::StoreError;
use crate::backend::records::{SendKey, SendReceipt};

/// Fresh receipts that make a run unless configured otherwise (the
/// default of `--receipts-run-size`).
const FREEZE_AT: usize = 65_536;
/// Batches the watermark may lag behind the next batch: a start decodes
/// every envelope of the batches from the watermark on.
const MAX_LAG: u64 = 16_384;
/// Batches kept for frozen receipts removed between two cycles: spread,
/// so that a freeze does not hold the writer for their removal too.
const REMOVALS_PER_CYCLE: usize = 64;
/// Entries of a run no merge goes beyond. A lookup probes every run's
/// filter (and reads a chunk for about 1 in 100 runs where the receipt is
/// not), so runs should be few; a receipt is rewritten once per merge it
/// goes through, and big merges cost memory and disk in sled (merging up
/// to 1,048,576, a fill of 1,000,000 queued messages ended at 294 MiB of
/// RSS and 616 MiB on disk, against 184 and 517 MiB at this size).
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
    /// Fresh receipts that make a run (`--receipts-run-size`).
    freeze_at: usize,
    /// Receipts not in a run yet (nor being frozen), by send key.
    fresh: HashMap<Box<[u8]>, Fresh>,
    /// Batches whose envelopes hold them: those no queue entry references
    /// any more stay until the next freeze.
    holding: BTreeSet<u64>,
    /// Batches kept for receipts since frozen: removed a few per cycle,
    /// and all before a checkpoint.
    released: Vec<u64>,
    /// First batch whose receipts are not in a run.
    watermark: u64,
    /// Oldest first (shared with the streams of a merge).
    runs: Vec<Arc<Run>>,
    /// The run being built, if any.
    building: Option<Building>,
    next_run: u64,
    /// Sends made before this are forgotten when a merge meets them.
    forget_before_ms: u64,
    /// Tests: how many more of a run's writes succeed before they fail, as
    /// on a full disk.
    #[cfg(test)]
    fail_run_writes_after: std::cell::Cell<Option<usize>>,
}

impl Inner {
    /// The receipts being frozen (none unless a freeze is under way).
    fn freezing(&self) -> &[Freezing] {
        match self.building.as_ref().map(|b| &b.source) {
            Some(Source::Freeze { receipts, .. }) => receipts,
            _ => &[],
        }
    }

    /// How many sends are remembered.
    fn remembered(&self) -> u64 {
        let unfrozen = self.fresh.len() + self.freezing().len();
        unfrozen as u64 + self.runs.iter().map(|r| r.entries).sum::<u64>()
    }
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
            runs.push(Arc::new(Run::load(layout, &k, &v)?));
        }
        let next_run = runs.last().map_or(0, |r| r.id + 1);
        let watermark = match layout.storage.get_raw(tree.handle, WATERMARK)? {
            Some(v) => layout::be_u64(&v)
                .ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "the send receipts' watermark holds {} bytes",
                        v.len()
                    ))
                })
                .and_then(|w| layout::stored_batch(w, "the send receipts' watermark"))?,
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
                building: None,
                next_run,
                forget_before_ms: 0,
                #[cfg(test)]
                fail_run_writes_after: std::cell::Cell::new(None),
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
                        recipients: u32::try_from(envelope.fanout.recipients()).unwrap_or(u32::MAX),
                    },
                });
            }
            self.stage(number, &sends);
            Ok(())
        })
    }

    /// The first batch whose receipts are read back from its envelopes at
    /// a start: batches are numbered from it on at least, or a start would
    /// not read theirs.
    pub(crate) fn watermark(&self) -> u64 {
        self.lock().watermark
    }

    /// Freeze after `n` fresh receipts instead of [`FREEZE_AT`]
    /// (`--receipts-run-size`).
    pub(crate) fn freeze_at(&self, n: usize) {
        self.lock().freeze_at = n.max(1);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The receipt of a send, if it is remembered (staged ones included:
    /// a reader waits for the writes before it to be durable).
    pub(crate) fn get(&self, key: &SendKey) -> Result<Option<SendReceipt>, StoreError> {
        let k = layout::SendKeyBytes::of(key);
        let k = k.as_slice();
        let inner = self.lock();
        if let Some(f) = inner.fresh.get(k) {
            return Ok(Some(f.receipt));
        }
        if inner.runs.is_empty() && inner.building.is_none() {
            return Ok(None);
        }
        let hash = hash_of(k);
        let building = inner.building.as_ref();
        if let Some(r) = building.and_then(|b| b.source.frozen_receipt(hash, k)) {
            return Ok(Some(r));
        }
        for run in inner.runs.iter().rev() {
            if let Some(r) = run.find(&self.layout, k, hash)? {
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
        // Hashed outside the lock, and before a freeze needs it.
        let staged: Vec<(Box<[u8]>, Fresh)> = sends
            .iter()
            .map(|s| {
                let key = layout::send_key(&s.key);
                let fresh = Fresh {
                    hash: hash_of(&key),
                    receipt: s.receipt,
                };
                (key.into_boxed_slice(), fresh)
            })
            .collect();
        let mut inner = self.lock();
        inner.fresh.extend(staged);
        inner.holding.insert(batch);
    }

    /// Whether a batch no queue entry references any more must stay on
    /// disk for the fresh receipts it holds (the next freeze removes it).
    pub(crate) fn keeps(&self, batch: u64) -> bool {
        let inner = self.lock();
        match inner.building.as_ref().map(|b| &b.source) {
            Some(Source::Freeze { holding, .. }) if holding.contains(&batch) => true,
            _ => inner.holding.contains(&batch),
        }
    }

    /// Between two cycles (no batch open, every batch applied): write the
    /// next piece of the run being built (publishing it after its last);
    /// if none is being built, start merging the newest runs if due, or
    /// else freezing the fresh receipts once there are enough (or once the
    /// watermark lags too far); remove a few batches kept for receipts
    /// frozen before.
    pub(crate) fn between_cycles(&self, index: &IndexState) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.building.is_some() {
            self.step(&mut inner, index)?;
        } else {
            // A due merge goes first (so that runs stay few however small
            // they are made), unless the fresh receipts have grown to twice
            // a run or the watermark lags too far.
            let lag = index.next_batch.saturating_sub(inner.watermark);
            let fresh = inner.fresh.len();
            let urgent = fresh >= inner.freeze_at.saturating_mul(2) || lag >= MAX_LAG;
            if urgent || (!self.start_merge(&mut inner) && fresh >= inner.freeze_at) {
                self.start_freeze(&mut inner, index);
            }
        }
        self.remove_released(&mut inner, REMOVALS_PER_CYCLE)
    }

    /// Freeze now and remove every batch kept for receipts, before a
    /// checkpoint of the queue index (between two cycles): a start from it
    /// reads no batch before it for receipts, and finds none left over
    /// there.
    pub(crate) fn freeze_now(&self, index: &IndexState) -> Result<(), StoreError> {
        let mut inner = self.lock();
        self.finish_building(&mut inner, index)?;
        if !inner.fresh.is_empty() || inner.watermark != index.next_batch {
            self.start_freeze(&mut inner, index);
            self.finish_building(&mut inner, index)?;
        }
        self.remove_released(&mut inner, usize::MAX)
    }

    /// Finish the run being built and publish it (before a compaction
    /// copies the database).
    pub(crate) fn settle(&self, index: &IndexState) -> Result<(), StoreError> {
        self.finish_building(&mut self.lock(), index)
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

    /// Forget sends made before `cutoff_ms`; how many were forgotten.
    pub(crate) fn forget(&self, cutoff_ms: u64, index: &IndexState) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        self.finish_building(&mut inner, index)?;
        let before = inner.remembered();
        inner.forget_before_ms = inner.forget_before_ms.max(cutoff_ms);
        let old = |r: &Run| r.newest_created_ms < cutoff_ms;
        if inner.runs.iter().any(|r| old(r)) {
            let tx = self.layout.storage.begin();
            for run in inner.runs.iter().filter(|r| old(r)) {
                for k in run.keys() {
                    tx.remove_raw(self.layout.trees.sends.handle, &k)?;
                }
            }
            tx.commit()?;
            inner.runs.retain(|r| !old(r));
        }
        if inner.fresh.keys().any(|k| entry::created_ms(k) < cutoff_ms) {
            self.start_freeze(&mut inner, index);
            self.finish_building(&mut inner, index)?;
        }
        Ok(before.saturating_sub(inner.remembered()))
    }

    /// Remembered sends made before `cutoff_ms`, oldest first, at most
    /// `limit` (`mls-ds migrate`).
    pub(crate) fn before(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<SendKey>, StoreError> {
        let inner = self.lock();
        let mut keys: Vec<Box<[u8]>> = inner
            .fresh
            .keys()
            .chain(inner.freezing().iter().map(|f| &f.key))
            .filter(|k| entry::created_ms(k) < cutoff_ms)
            .cloned()
            .collect();
        for run in &inner.runs {
            for e in Stream::of(run, &self.layout) {
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
            fresh: inner.fresh.len() + inner.freezing().len(),
            frozen: inner.runs.iter().map(|r| r.entries).sum(),
            runs: inner.runs.len(),
            run_memory: inner.runs.iter().map(|r| r.memory()).sum(),
        }
    }
}

#[cfg(test)]
mod tests;
