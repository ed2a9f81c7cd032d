//! Group and client records read lately, kept decoded in memory: every send
//! reads its group's record (membership, epoch), every commit reads the
//! record of each member's client (the roster check), and reading and
//! decoding them from sled each time cost more than the rest of the check
//! (at 2,000 members, a commit's 2,000 client lookups were a tenth of its
//! CPU).
//!
//! A cache never holds what sled does not: the writer thread drops a
//! record's entry once a write that changes it is applied (not before, so
//! that a reader cannot put the old record back after the drop), and a
//! reader offers what it read only if no entry was dropped since it started
//! reading.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use mls_ds_protocol::ClientId;

use crate::backend::records::{ClientRecord, GroupId, GroupRecord};

/// Most group records kept.
const MAX_GROUPS: usize = 16 * 1024;

/// Most client records kept: a commit in a group of 10,000 members reads
/// 10,000 (a few MiB).
const MAX_CLIENTS: usize = 32 * 1024;

/// The backend's record caches.
pub(crate) struct Caches {
    pub(crate) groups: RecordCache<GroupId, GroupRecord>,
    pub(crate) clients: RecordCache<ClientId, ClientRecord>,
}

impl Default for Caches {
    fn default() -> Caches {
        Caches {
            groups: RecordCache::new(MAX_GROUPS),
            clients: RecordCache::new(MAX_CLIENTS),
        }
    }
}

/// See the module doc. Beyond `max` records the cache starts again empty.
pub(crate) struct RecordCache<K, V> {
    state: Mutex<CacheState<K, V>>,
    max: usize,
}

struct CacheState<K, V> {
    records: HashMap<K, Arc<V>>,
    /// Bumped by every drop.
    generation: u64,
}

/// When a reader started reading sled, to offer what it read.
pub(crate) struct ReadStart(u64);

impl<K: Hash + Eq + Clone, V> RecordCache<K, V> {
    /// An empty cache of at most `max` records.
    pub(crate) fn new(max: usize) -> RecordCache<K, V> {
        RecordCache {
            state: Mutex::new(CacheState {
                records: HashMap::new(),
                generation: 0,
            }),
            max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState<K, V>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached record of `id`, or where a read from sled starts.
    pub(crate) fn get(&self, id: &K) -> Result<Arc<V>, ReadStart> {
        let state = self.lock();
        match state.records.get(id) {
            Some(record) => Ok(record.clone()),
            None => Err(ReadStart(state.generation)),
        }
    }

    /// Keep `record`, read from sled since `start`, unless a write changed
    /// any record of this cache meanwhile.
    pub(crate) fn offer(&self, id: &K, record: &Arc<V>, start: ReadStart) {
        let mut state = self.lock();
        if state.generation != start.0 {
            return;
        }
        if state.records.len() >= self.max {
            state.records.clear();
        }
        state.records.insert(id.clone(), record.clone());
    }

    /// Writes changing these records were applied.
    pub(crate) fn changed(&self, ids: impl IntoIterator<Item = K>) {
        let mut state = self.lock();
        let mut any = false;
        for id in ids {
            state.records.remove(&id);
            any = true;
        }
        if any {
            state.generation += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: u64) -> Arc<GroupRecord> {
        Arc::new(GroupRecord {
            epoch,
            revision: epoch,
            open: false,
            members: vec![b"a".to_vec()],
            creator: b"a".to_vec(),
            created_ms: 1,
        })
    }

    #[test]
    fn a_read_older_than_a_change_is_not_kept() {
        let cache = RecordCache::new(4);
        let g = GroupId::new(b"g").unwrap();
        let Err(start) = cache.get(&g) else {
            panic!("empty")
        };
        // The writer applies a change while the reader is in sled.
        cache.changed([g.clone()]);
        cache.offer(&g, &record(0), start);
        assert!(cache.get(&g).is_err(), "the old record stays out");
        let Err(start) = cache.get(&g) else {
            panic!("empty")
        };
        cache.offer(&g, &record(1), start);
        assert_eq!(cache.get(&g).ok().map(|r| r.epoch), Some(1));
        cache.changed([g.clone()]);
        assert!(cache.get(&g).is_err());
    }

    #[test]
    fn a_full_cache_starts_again_empty() {
        let cache = RecordCache::new(2);
        for (i, name) in [b"a", b"b", b"c"].into_iter().enumerate() {
            let g = GroupId::new(name).unwrap();
            let Err(start) = cache.get(&g) else {
                panic!("empty")
            };
            cache.offer(&g, &record(i as u64), start);
        }
        assert!(cache.get(&GroupId::new(b"a").unwrap()).is_err());
        assert!(cache.get(&GroupId::new(b"b").unwrap()).is_err());
        assert_eq!(
            cache
                .get(&GroupId::new(b"c").unwrap())
                .ok()
                .map(|r| r.epoch),
            Some(2)
        );
    }
}
