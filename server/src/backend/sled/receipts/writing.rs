//! How runs of send receipts are written: a freeze of the fresh receipts
//! or a merge of the two newest runs, at most one at a time, a piece per
//! gap between two cycles of the writer thread. Done at once, a freeze of
//! 65,536 receipts held every write and fetch for about 60 ms, and a merge
//! of the largest runs for 0.1-0.2 s; a piece is [`CHUNKS_PER_WRITE`]
//! chunks (a few thousand receipts), written under the mark of an
//! unfinished run. (Built on a thread of their own instead, runs took the
//! server's memory at 1,000,000 queued messages from 184 to 261 MiB: that
//! thread's sled reads and writes, and its own allocator arena.)
//!
//! The last piece publishes the run by one atomic write: the rest of its
//! chunks, its Bloom filter and its header, with the watermark or the
//! removal of the two runs it replaces. Until then lookups find the
//! receipts being frozen in memory and read the runs being merged as they
//! were. A start removes what a crash left of a run never published.

use std::collections::BTreeSet;
use std::iter::Peekable;
use std::sync::Arc;

use super::entry::{self, OwnedEntry};
use super::run::{Built, Run, RunBuilder, Stream};
use super::{Inner, Receipts, MAX_RUN, WATERMARK};
use crate::backend::error::StoreError;
use crate::backend::records::SendReceipt;
use crate::backend::sled::layout::{self, Layout};
use crate::backend::sled::queue_index::IndexState;

/// The id of a run being written (its chunks go in several writes, so
/// that a big run is never held whole in memory; the header, written
/// last, publishes it). A start removes what a crash left of it.
const UNFINISHED: &[u8] = b"n";
/// Chunks of a run written per sled write while it is built: one piece,
/// about 1-2 ms of the writer's time.
const CHUNKS_PER_WRITE: usize = 64;

/// A fresh receipt and its send key's hash (taken when it is staged, so
/// that a freeze only sorts).
#[derive(Clone, Copy)]
pub(super) struct Fresh {
    pub(super) hash: u64,
    pub(super) receipt: SendReceipt,
}

/// A receipt being frozen.
pub(super) struct Freezing {
    pub(super) hash: u64,
    pub(super) key: Box<[u8]>,
    pub(super) receipt: SendReceipt,
}

/// The run being built.
pub(super) struct Building {
    id: u64,
    builder: RunBuilder,
    /// Sends made before this are left out.
    cutoff: u64,
    pub(super) source: Source,
}

/// What a run being built is made of.
pub(super) enum Source {
    /// Fresh receipts being frozen, sorted by hash and key (lookups still
    /// find them here until the run is published).
    Freeze {
        receipts: Vec<Freezing>,
        /// Those pushed into the run so far.
        pushed: usize,
        /// Batches whose envelopes hold them: kept on disk until then.
        holding: BTreeSet<u64>,
        /// Where the watermark moves: the next batch when the freeze began.
        watermark: u64,
    },
    /// The two newest runs being merged (each stream holds a chunk).
    Merge {
        older: Box<Peekable<Stream>>,
        newer: Box<Peekable<Stream>>,
        ids: [u64; 2],
    },
}

impl Source {
    /// The receipt of send key `key` (hash `hash`) among those being
    /// frozen.
    pub(super) fn frozen_receipt(&self, hash: u64, key: &[u8]) -> Option<SendReceipt> {
        let Source::Freeze { receipts, .. } = self else {
            return None;
        };
        receipts
            .binary_search_by(|f| (f.hash, &*f.key).cmp(&(hash, key)))
            .ok()
            .and_then(|i| receipts.get(i))
            .map(|f| f.receipt)
    }
}

impl Receipts {
    /// Start freezing the fresh receipts; new ones are fresh meanwhile.
    pub(super) fn start_freeze(&self, inner: &mut Inner, index: &IndexState) {
        let mut receipts: Vec<Freezing> = inner
            .fresh
            .drain()
            .map(|(key, f)| Freezing {
                hash: f.hash,
                key,
                receipt: f.receipt,
            })
            .collect();
        receipts.sort_unstable_by(|a, b| (a.hash, &a.key).cmp(&(b.hash, &b.key)));
        let entries = receipts.len();
        let source = Source::Freeze {
            receipts,
            pushed: 0,
            holding: std::mem::take(&mut inner.holding),
            watermark: index.next_batch,
        };
        self.start(inner, source, entries);
    }

    /// Start merging the two newest runs if the older is at most twice the
    /// newer (and the two within [`MAX_RUN`]), dropping the sends to
    /// forget. Whether a merge began.
    pub(super) fn start_merge(&self, inner: &mut Inner) -> bool {
        let [.., older, newer] = inner.runs.as_slice() else {
            return false;
        };
        if older.entries > 2 * newer.entries || older.entries + newer.entries > MAX_RUN {
            return false;
        }
        let entries = usize::try_from(older.entries + newer.entries).unwrap_or(usize::MAX);
        let source = Source::Merge {
            ids: [older.id, newer.id],
            older: Box::new(Stream::of(older, &self.layout).peekable()),
            newer: Box::new(Stream::of(newer, &self.layout).peekable()),
        };
        self.start(inner, source, entries);
        true
    }

    fn start(&self, inner: &mut Inner, source: Source, entries: usize) {
        let id = inner.next_run;
        inner.next_run += 1;
        inner.building = Some(Building {
            id,
            builder: RunBuilder::new(id, entries, self.layout.trees.sends),
            cutoff: inner.forget_before_ms,
            source,
        });
    }

    /// Write the next piece of the run being built, and publish it after
    /// its last. If that fails, the run is dropped (its receipts fresh
    /// again) and the error returned.
    pub(super) fn step(&self, inner: &mut Inner, index: &IndexState) -> Result<(), StoreError> {
        let Some(mut building) = inner.building.take() else {
            return Ok(());
        };
        match injected_failure(inner).and_then(|()| self.advance(&mut building)) {
            Ok(false) => {
                inner.building = Some(building);
                Ok(())
            }
            Ok(true) => self.publish(inner, index, building),
            Err(e) => {
                restore(inner, building.source);
                Err(e)
            }
        }
    }

    /// Build the run being built to its end and publish it.
    pub(super) fn finish_building(
        &self,
        inner: &mut Inner,
        index: &IndexState,
    ) -> Result<(), StoreError> {
        while inner.building.is_some() {
            self.step(inner, index)?;
        }
        Ok(())
    }

    /// Push entries until a piece is written (`false`) or the source is
    /// exhausted (`true`).
    fn advance(&self, b: &mut Building) -> Result<bool, StoreError> {
        loop {
            if b.builder.closed_chunks() >= CHUNKS_PER_WRITE {
                write(&self.layout, b.id, b.builder.take_chunks())?;
                return Ok(false);
            }
            match &mut b.source {
                Source::Freeze {
                    receipts, pushed, ..
                } => {
                    let Some(f) = receipts.get(*pushed) else {
                        return Ok(true);
                    };
                    *pushed += 1;
                    if entry::created_ms(&f.key) >= b.cutoff {
                        b.builder.push(f.hash, &f.key, &f.receipt);
                    }
                }
                Source::Merge { older, newer, .. } => {
                    let Some(e) = next_merged(older, newer) else {
                        return Ok(true);
                    };
                    let e = e?;
                    if e.created_ms() >= b.cutoff {
                        b.builder.push_stored(&e);
                    }
                }
            }
        }
    }

    /// Publish a run built to its end, by one atomic write.
    fn publish(
        &self,
        inner: &mut Inner,
        index: &IndexState,
        building: Building,
    ) -> Result<(), StoreError> {
        let Building {
            builder, source, ..
        } = building;
        let built = match builder.finish() {
            Ok(built) => built,
            Err(e) => {
                restore(inner, source);
                return Err(e);
            }
        };
        if let Err(e) = self.write_published(inner, &source, built.as_ref()) {
            restore(inner, source);
            return Err(e);
        }
        match source {
            Source::Freeze {
                holding, watermark, ..
            } => {
                inner.watermark = watermark;
                // Those the queues still reference stay; the others were
                // kept for their receipts only (some never had a queue
                // entry: a send to nobody else keeps its answer in its
                // envelope all the same).
                inner.released.extend(
                    holding
                        .into_iter()
                        .filter(|b| !index.batches.contains_key(b)),
                );
            }
            Source::Merge { ids, .. } => inner.runs.retain(|r| !ids.contains(&r.id)),
        }
        if let Some(built) = built {
            inner.runs.push(Arc::new(built.run));
        }
        tracing::debug!(
            runs = inner.runs.len(),
            frozen = inner.runs.iter().map(|r| r.entries).sum::<u64>(),
            "a run of send receipts published"
        );
        Ok(())
    }

    /// The one write that publishes a built run.
    fn write_published(
        &self,
        inner: &Inner,
        source: &Source,
        built: Option<&Built>,
    ) -> Result<(), StoreError> {
        injected_failure(inner)?;
        let tree = self.layout.trees.sends.handle;
        let tx = self.layout.storage.begin();
        tx.remove_raw(tree, UNFINISHED)?;
        if let Some(built) = built {
            for (k, v) in &built.writes {
                tx.put_raw(tree, k, v)?;
            }
            tx.put_raw(tree, &built.header.0, &built.header.1)?;
        }
        match source {
            Source::Freeze { watermark, .. } => {
                tx.put_raw(tree, WATERMARK, &watermark.to_be_bytes())?;
            }
            Source::Merge { ids, .. } => {
                for run in inner.runs.iter().filter(|r| ids.contains(&r.id)) {
                    for k in run.keys() {
                        tx.remove_raw(tree, &k)?;
                    }
                }
            }
        }
        Ok(tx.commit()?)
    }

    /// Remove what a crash left of a run being written (at a start, before
    /// any write).
    pub(crate) fn remove_unfinished(&self) -> Result<(), StoreError> {
        let tree = self.layout.trees.sends.handle;
        let Some(id) = self.layout.storage.get_raw(tree, UNFINISHED)? else {
            return Ok(());
        };
        let id = layout::be_u64(&id)
            .ok_or_else(|| StoreError::Corrupt("the unfinished send receipt run's id".into()))?;
        let tx = self.layout.storage.begin();
        for k in Run::stored_parts(&self.layout, id)? {
            tx.remove_raw(tree, &k)?;
        }
        tx.remove_raw(tree, UNFINISHED)?;
        tx.commit()?;
        let mut inner = self.lock();
        inner.next_run = inner.next_run.max(id + 1);
        Ok(())
    }
}

/// The failure tests inject into a run's writes (a full disk); nothing
/// outside tests.
fn injected_failure(inner: &Inner) -> Result<(), StoreError> {
    #[cfg(test)]
    match inner.fail_run_writes_after.get() {
        Some(0) => {
            return Err(StoreError::Failed(
                crate::backend::StorageFault::from_os_error(Some(28)),
            ))
        }
        Some(n) => inner.fail_run_writes_after.set(Some(n - 1)),
        None => {}
    }
    let _ = inner;
    Ok(())
}

/// Undo what starting a run from `source` changed: the receipts being
/// frozen and their batches are fresh again.
fn restore(inner: &mut Inner, source: Source) {
    if let Source::Freeze {
        receipts, holding, ..
    } = source
    {
        inner.fresh.extend(receipts.into_iter().map(|f| {
            let fresh = Fresh {
                hash: f.hash,
                receipt: f.receipt,
            };
            (f.key, fresh)
        }));
        inner.holding.extend(holding);
    }
}

/// Write the closed chunks of run `id`, with its mark as unfinished.
fn write(layout: &Layout, id: u64, records: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let tree = layout.trees.sends.handle;
    let tx = layout.storage.begin();
    tx.put_raw(tree, UNFINISHED, &id.to_be_bytes())?;
    for (k, v) in records {
        tx.put_raw(tree, &k, &v)?;
    }
    Ok(tx.commit()?)
}

/// The next entry of two runs' in order (a send in both once).
fn next_merged(
    a: &mut Peekable<Stream>,
    b: &mut Peekable<Stream>,
) -> Option<Result<OwnedEntry, StoreError>> {
    match (a.peek(), b.peek()) {
        (Some(Ok(x)), Some(Ok(y))) => match x.order().cmp(&y.order()) {
            std::cmp::Ordering::Less => a.next(),
            std::cmp::Ordering::Greater => b.next(),
            std::cmp::Ordering::Equal => {
                b.next();
                a.next()
            }
        },
        (Some(Err(_)), _) | (Some(_), None) => a.next(),
        (None, _) | (Some(Ok(_)), Some(Err(_))) => b.next(),
    }
}
