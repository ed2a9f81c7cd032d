//! Group records read lately, kept decoded in memory: every send reads its
//! group's record (membership, epoch), and reading and decoding it from
//! sled each time cost more than the rest of the check.
//!
//! The cache never holds what sled does not: the writer thread drops a
//! group's entry once a write that changes the group's record is applied
//! (not before, so that a reader cannot put the old record back after the
//! drop), and a reader offers what it read only if no entry was dropped
//! since it started reading.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::records::{GroupId, GroupRecord};

/// Most records kept; beyond it the cache starts again empty.
const MAX_GROUPS: usize = 16 * 1024;

/// See the module doc.
#[derive(Default)]
pub(crate) struct GroupCache {
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    records: HashMap<GroupId, Arc<GroupRecord>>,
    /// Bumped by every drop.
    generation: u64,
}

/// When a reader started reading sled, to offer what it read.
pub(crate) struct ReadStart(u64);

impl GroupCache {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached record of `id`, or where a read from sled starts.
    pub(crate) fn get(&self, id: &GroupId) -> Result<Arc<GroupRecord>, ReadStart> {
        let state = self.lock();
        match state.records.get(id) {
            Some(record) => Ok(record.clone()),
            None => Err(ReadStart(state.generation)),
        }
    }

    /// Keep `record`, read from sled since `start`, unless a write changed
    /// any group meanwhile.
    pub(crate) fn offer(&self, id: &GroupId, record: &Arc<GroupRecord>, start: ReadStart) {
        let mut state = self.lock();
        if state.generation != start.0 {
            return;
        }
        if state.records.len() >= MAX_GROUPS {
            state.records.clear();
        }
        state.records.insert(id.clone(), record.clone());
    }

    /// Writes changing these groups' records were applied.
    pub(crate) fn changed(&self, ids: impl IntoIterator<Item = GroupId>) {
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
        let cache = GroupCache::default();
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
}
