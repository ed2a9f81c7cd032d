//! Large groups kept loaded between handshakes.
//!
//! Decoding a group's stored `PublicGroup` costs time in proportion to its
//! tree (about 4 ms at 2,000 members), and a busy group validates handshake
//! after handshake against it. So the `PublicGroup` a successful write left
//! behind is kept, with the ratchet tree as the GroupInfo endpoint serves it
//! once it has been encoded, for groups whose stored state is large enough
//! for decoding to matter.
//!
//! An entry is only used for the group version it was kept at: callers read
//! the group's record first and ask for its creation time and revision, so
//! a group that anyone else changed (another process on a shared database,
//! a write that failed after an entry was taken) is loaded from storage
//! again. An entry is taken out while it is used, so two requests never
//! share one `PublicGroup`, and it is put back only by a request that knows
//! the state to be stored.

use std::collections::HashMap;
use std::sync::Mutex;

use super::mls::LoadedGroup;
use crate::backend::records::{GroupId, GroupRecord};

/// Smallest stored state worth keeping loaded: below it, decoding takes
/// well under a millisecond.
const MIN_BYTES: usize = 64 * 1024;
/// Stored bytes of all kept groups together (with their encoded trees):
/// about 25 groups of 2,000 members, or 5 of 10,000. A decoded
/// `PublicGroup` takes a small multiple of its stored size in memory.
const BUDGET_BYTES: usize = 32 * 1024 * 1024;

/// The version of a group an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Version {
    /// The group's creation time: a group deleted and created again under
    /// the same id starts its revisions anew.
    created_ms: u64,
    /// The group's revision.
    revision: u64,
}

impl Version {
    /// The version `record` describes.
    pub(crate) fn of(record: &GroupRecord) -> Version {
        Version {
            created_ms: record.created_ms,
            revision: record.revision,
        }
    }

    /// The version a write set made from `record` leaves behind.
    pub(crate) fn next(record: &GroupRecord) -> Version {
        Version {
            created_ms: record.created_ms,
            revision: record.revision + 1,
        }
    }
}

/// A kept group, taken out of the cache.
pub(crate) struct Kept {
    /// The group as stored at the version it was asked for.
    pub(crate) group: LoadedGroup,
    /// The TLS-encoded ratchet tree of that version, once encoded.
    pub(crate) tree: Option<Vec<u8>>,
}

impl Kept {
    /// What the cache counts against its budget: the stored size.
    pub(crate) fn bytes(&self) -> usize {
        self.group.store.stored_bytes()
            + self.group.group_info.len()
            + self.tree.as_ref().map_or(0, Vec::len)
    }
}

struct Entry<T> {
    version: Version,
    kept: T,
    bytes: usize,
    used: u64,
}

struct Entries<T> {
    by_group: HashMap<GroupId, Entry<T>>,
    bytes: usize,
    clock: u64,
}

/// The cache (one per DS) of [`Kept`] groups; generic so that its rules
/// can be tested without building groups.
pub(crate) struct LoadedGroups<T = Kept> {
    entries: Mutex<Entries<T>>,
}

impl<T> Default for LoadedGroups<T> {
    fn default() -> Self {
        LoadedGroups {
            entries: Mutex::new(Entries {
                by_group: HashMap::new(),
                bytes: 0,
                clock: 0,
            }),
        }
    }
}

impl<T> LoadedGroups<T> {
    /// The kept state of `id` at `version`, taken out; `None` if it is not
    /// kept at that version (an entry of an older version is dropped, one
    /// of a newer version stays for those who read the newer record).
    pub(crate) fn take(&self, id: &GroupId, version: Version) -> Option<T> {
        let mut e = self.lock();
        if e.by_group.get(id)?.version > version {
            return None;
        }
        let entry = e.by_group.remove(id)?;
        e.bytes -= entry.bytes;
        (entry.version == version).then_some(entry.kept)
    }

    /// Keep `kept` (`bytes` stored bytes) as the state of `id` at
    /// `version`, if it is large enough to be worth it, replacing an entry
    /// of an older version (never a newer one) and dropping the least
    /// recently kept groups over the budget.
    pub(crate) fn put(&self, id: &GroupId, version: Version, kept: T, bytes: usize) {
        if !(MIN_BYTES..=BUDGET_BYTES).contains(&bytes) {
            return;
        }
        let mut e = self.lock();
        if let Some(old) = e.by_group.get(id) {
            if old.version > version {
                return;
            }
            let old_bytes = old.bytes;
            e.by_group.remove(id);
            e.bytes -= old_bytes;
        }
        // At most BUDGET_BYTES / MIN_BYTES (512) entries, so finding the
        // oldest by a scan is cheap next to what an entry saves.
        while e.bytes + bytes > BUDGET_BYTES {
            let Some(oldest) = e
                .by_group
                .iter()
                .min_by_key(|(_, entry)| entry.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(gone) = e.by_group.remove(&oldest) {
                e.bytes -= gone.bytes;
            }
        }
        e.clock += 1;
        let used = e.clock;
        e.bytes += bytes;
        e.by_group.insert(
            id.clone(),
            Entry {
                version,
                kept,
                bytes,
                used,
            },
        );
    }

    /// Drop whatever is kept of `id` (the group is deleted or created).
    pub(crate) fn forget(&self, id: &GroupId) {
        let mut e = self.lock();
        if let Some(gone) = e.by_group.remove(id) {
            e.bytes -= gone.bytes;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries<T>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(revision: u64) -> Version {
        Version {
            created_ms: 7,
            revision,
        }
    }

    fn id(n: u8) -> GroupId {
        GroupId::new(&[n; 8]).unwrap()
    }

    #[test]
    fn an_entry_serves_only_its_version_and_is_taken_out() {
        let cache = LoadedGroups::default();
        cache.put(&id(1), version(3), "r3", MIN_BYTES);
        assert_eq!(cache.take(&id(1), version(3)), Some("r3"));
        assert_eq!(cache.take(&id(1), version(3)), None, "taken out");
        cache.put(&id(1), version(3), "r3", MIN_BYTES);
        assert_eq!(cache.take(&id(1), version(2)), None, "a newer entry stays");
        assert_eq!(cache.take(&id(1), version(4)), None);
        assert_eq!(
            cache.take(&id(1), version(3)),
            None,
            "a stale entry is dropped"
        );
        let recreated = Version {
            created_ms: 8,
            revision: 3,
        };
        cache.put(&id(1), version(3), "old group", MIN_BYTES);
        assert_eq!(cache.take(&id(1), recreated), None);
    }

    #[test]
    fn a_newer_entry_is_never_replaced_by_an_older_one() {
        let cache = LoadedGroups::default();
        cache.put(&id(1), version(5), "r5", MIN_BYTES);
        cache.put(&id(1), version(4), "r4", MIN_BYTES);
        assert_eq!(cache.take(&id(1), version(5)), Some("r5"));
        cache.put(&id(1), version(5), "r5", MIN_BYTES);
        cache.put(&id(1), version(6), "r6", MIN_BYTES);
        assert_eq!(cache.take(&id(1), version(6)), Some("r6"));
    }

    #[test]
    fn small_groups_are_not_kept_and_the_budget_drops_the_least_recent() {
        let cache = LoadedGroups::default();
        cache.put(&id(1), version(1), "small", MIN_BYTES - 1);
        assert_eq!(cache.take(&id(1), version(1)), None);
        let quarter = BUDGET_BYTES / 4;
        for n in 1..=4 {
            cache.put(&id(n), version(1), "big", quarter);
        }
        // Group 1 is used again (taken and put back), so 2 is the oldest.
        let one = cache.take(&id(1), version(1)).unwrap();
        cache.put(&id(1), version(1), one, quarter);
        cache.put(&id(5), version(1), "new", quarter);
        assert_eq!(
            cache.take(&id(2), version(1)),
            None,
            "the least recent went"
        );
        for n in [1, 3, 4, 5] {
            assert!(cache.take(&id(n), version(1)).is_some(), "group {n} kept");
        }
        cache.put(&id(6), version(1), "too big", BUDGET_BYTES + 1);
        assert_eq!(cache.take(&id(6), version(1)), None);
        cache.put(&id(7), version(1), "gone", MIN_BYTES);
        cache.forget(&id(7));
        assert_eq!(cache.take(&id(7), version(1)), None);
    }
}
