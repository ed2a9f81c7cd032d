//! Copying one sled tree into a tree of a fresh database (backups,
//! compaction) in an order that keeps the copy small.
//!
//! sled writes every insert into its log as a delta of the node it changes
//! and rewrites a node whole only every few deltas; the superseded deltas
//! and versions stay in the file. Inserted in key order, a copy sends every
//! key to the same rightmost node, which fills, consolidates and splits
//! over and over, and each node it leaves behind is half full: a copy of
//! small records took about 5 times their bytes. Inserted in interleaved
//! runs (the tree cut into [`STRIDES`] ranges, one key from each in turn),
//! the inserts spread over that many nodes, which fill before they split.
//! Measured on sled alone (one tree of records of 42-55 bytes): 100,000
//! records took 6.4 times their bytes in key order and 3.0-3.3 times
//! interleaved over 64 ranges; 1,000,000 took 5.0 and 2.2 times (32 ranges
//! did as well, 128 and more worse).
//!
//! The ranges are cut at keys sampled in a first pass (every
//! [`SAMPLE_EVERY`]th key: about 0.4% of the keys held in memory at once).

use crate::error::StorageError;

/// Ranges a tree is cut into.
const STRIDES: usize = 64;
/// One key in this many is kept as a possible range start.
const SAMPLE_EVERY: u64 = 256;
/// Entries per sled batch: large enough to make the per-batch log seal
/// negligible, small enough to bound the memory a copy holds at once.
const BATCH: usize = 4096;

/// Copy every entry of `from` into `to`, which is empty; returns the
/// entries copied. Nothing may write `from` meanwhile.
pub(crate) fn copy_tree(from: &sled::Tree, to: &sled::Tree) -> Result<u64, StorageError> {
    let mut samples = Vec::new();
    for (i, key) in from.iter().keys().enumerate() {
        let key = key?;
        if (i as u64).is_multiple_of(SAMPLE_EVERY) {
            samples.push(key);
        }
    }
    let strides = STRIDES.min(samples.len());
    // The first sample is the first key: the ranges cover the whole tree.
    let starts: Vec<sled::IVec> = (0..strides)
        .map(|i| samples[i * samples.len() / strides].clone())
        .collect();
    let mut runs: Vec<sled::Iter> = starts
        .iter()
        .enumerate()
        .map(|(i, start)| match starts.get(i + 1) {
            Some(end) => from.range(start.clone()..end.clone()),
            None => from.range(start.clone()..),
        })
        .collect();
    let mut copied = 0u64;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0usize;
    while !runs.is_empty() {
        let mut i = 0;
        while i < runs.len() {
            match runs[i].next() {
                Some(item) => {
                    let (k, v) = item?;
                    batch.insert(k, v);
                    in_batch += 1;
                    copied += 1;
                    i += 1;
                }
                None => {
                    runs.swap_remove(i);
                }
            }
            if in_batch == BATCH {
                to.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
    }
    if in_batch > 0 {
        to.apply_batch(batch)?;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(t: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        t.iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    #[test]
    fn every_entry_is_copied_whatever_the_tree_size() {
        for n in [0u32, 1, 2, 63, 64, 65, 300, 20_000] {
            let db = sled::Config::new().temporary(true).open().unwrap();
            let (from, to) = (db.open_tree("from").unwrap(), db.open_tree("to").unwrap());
            for i in 0..n {
                from.insert(i.to_be_bytes(), &i.to_le_bytes()[..(i % 4) as usize])
                    .unwrap();
            }
            assert_eq!(copy_tree(&from, &to).unwrap(), u64::from(n), "{n}");
            assert!(entries(&from) == entries(&to), "{n}");
        }
    }
}
