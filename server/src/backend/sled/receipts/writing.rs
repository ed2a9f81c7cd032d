//! How the writer thread writes runs of send receipts: a freeze of the
//! fresh receipts, a merge of two runs, each built in pieces of
//! [`CHUNKS_PER_WRITE`] chunks under the mark of an unfinished run and
//! published by one last atomic write (its header, and the watermark or
//! the removal of the runs it replaces); and what a start removes of a run
//! a crash cut short.

use mls_ds_storage::Transaction;

use super::entry::{self, hash_of, OwnedEntry};
use super::run::{Run, RunBuilder};
use super::{Inner, Receipts, MAX_RUN, WATERMARK};
use crate::backend::error::StoreError;
use crate::backend::records::SendReceipt;
use crate::backend::sled::layout;
use crate::backend::sled::queue_index::IndexState;

/// The id of a run being written (its chunks go in several writes, so
/// that a big run is never held whole in memory; the header, written
/// last, publishes it). A start removes what a crash left of it.
const UNFINISHED: &[u8] = b"n";
/// Chunks of a run written per sled write while it is built.
const CHUNKS_PER_WRITE: usize = 64;

impl Receipts {
    /// Write the fresh receipts (but those to forget) as a run and move the
    /// watermark to the next batch, in one write; the batches kept for them
    /// are released. How many went into the run.
    pub(super) fn freeze(
        &self,
        inner: &mut Inner,
        index: &IndexState,
    ) -> Result<usize, StoreError> {
        let cutoff = inner.forget_before_ms;
        let tree = self.layout.trees.sends;
        let (builder, frozen) = {
            let mut sorted: Vec<(u64, &[u8], SendReceipt)> = inner
                .fresh
                .iter()
                .filter(|(k, _)| entry::created_ms(k) >= cutoff)
                .map(|(k, r)| (hash_of(k), &**k, *r))
                .collect();
            sorted.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            let mut builder = RunBuilder::new(inner.next_run, sorted.len(), tree);
            for (hash, key, receipt) in &sorted {
                builder.push(*hash, key, receipt);
                self.write_chunks(&mut builder, inner.next_run)?;
            }
            (builder, sorted.len())
        };
        let tx = self.layout.storage.begin();
        let run = self.finish_run(&tx, builder)?;
        let next = index.next_batch;
        tx.put_raw(tree.handle, WATERMARK, &next.to_be_bytes())?;
        tx.commit()?;
        inner.watermark = next;
        // Those the queues still reference stay; the others were kept for
        // their receipts only (some never had a queue entry: a send to
        // nobody else keeps its answer in its envelope all the same).
        let holding = std::mem::take(&mut inner.holding);
        inner.released.extend(
            holding
                .into_iter()
                .filter(|b| !index.batches.contains_key(b)),
        );
        inner.fresh.clear();
        let keep = inner.freeze_at;
        inner.fresh.shrink_to(keep);
        if let Some(run) = run {
            inner.runs.push(run);
            inner.next_run += 1;
        }
        Ok(frozen)
    }

    /// Write the chunks `builder` closed, once there are
    /// [`CHUNKS_PER_WRITE`], with the mark of run `id` as unfinished.
    pub(super) fn write_chunks(&self, builder: &mut RunBuilder, id: u64) -> Result<(), StoreError> {
        if builder.closed_chunks() < CHUNKS_PER_WRITE {
            return Ok(());
        }
        let tree = self.layout.trees.sends.handle;
        let tx = self.layout.storage.begin();
        tx.put_raw(tree, UNFINISHED, &id.to_be_bytes())?;
        for (k, v) in builder.take_chunks() {
            tx.put_raw(tree, &k, &v)?;
        }
        Ok(tx.commit()?)
    }

    /// Stage the rest of the run `builder` holds in `tx`, with its header
    /// and the end of its mark as unfinished.
    fn finish_run(&self, tx: &Transaction, builder: RunBuilder) -> Result<Option<Run>, StoreError> {
        let tree = self.layout.trees.sends.handle;
        tx.remove_raw(tree, UNFINISHED)?;
        let Some(built) = builder.finish()? else {
            return Ok(None);
        };
        for (k, v) in &built.writes {
            tx.put_raw(tree, k, v)?;
        }
        Ok(Some(built.run))
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

    /// Merge the two newest runs while the older is at most twice the
    /// newer (and the two within [`MAX_RUN`]), dropping the sends to
    /// forget.
    pub(super) fn merge_similar(&self, inner: &mut Inner) -> Result<(), StoreError> {
        while let [.., older, newer] = inner.runs.as_slice() {
            if older.entries > 2 * newer.entries || older.entries + newer.entries > MAX_RUN {
                break;
            }
            let cutoff = inner.forget_before_ms;
            let tree = self.layout.trees.sends;
            let id = inner.next_run;
            let capacity = usize::try_from(older.entries + newer.entries).unwrap_or(usize::MAX);
            let mut builder = RunBuilder::new(id, capacity, tree);
            merge(
                older.stream(&self.layout),
                newer.stream(&self.layout),
                |e| {
                    if e.created_ms() >= cutoff {
                        builder.push_stored(e);
                    }
                    self.write_chunks(&mut builder, id)
                },
            )?;
            let tx = self.layout.storage.begin();
            for k in older.keys().into_iter().chain(newer.keys()) {
                tx.remove_raw(tree.handle, &k)?;
            }
            let merged = self.finish_run(&tx, builder)?;
            tx.commit()?;
            inner.runs.truncate(inner.runs.len() - 2);
            if let Some(run) = merged {
                inner.runs.push(run);
                inner.next_run += 1;
            }
        }
        Ok(())
    }
}

/// Hand the entries of two runs, each in order, to `out` in order (a send
/// in both once).
fn merge(
    a: impl Iterator<Item = Result<OwnedEntry, StoreError>>,
    b: impl Iterator<Item = Result<OwnedEntry, StoreError>>,
    mut out: impl FnMut(&OwnedEntry) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
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
        };
        match next {
            Some(e) => out(&e?)?,
            None => return Ok(()),
        }
    }
}
