//! One in-process lock per group that was locked lately: it spares
//! concurrent handshakes of one group on this process the validation work
//! that the write's revision condition would refuse anyway.

use std::collections::HashMap;
use std::sync::Arc;

use super::records::GroupId;

/// One lock per group that was locked lately. Locks nobody holds or waits
/// for are swept out whenever the table has doubled since the last sweep,
/// so groups that were deleted, or never created, do not stay in memory.
#[derive(Default)]
pub(crate) struct GroupLocks {
    pub(super) by_group: HashMap<GroupId, Arc<tokio::sync::Mutex<()>>>,
    sweep_at: usize,
}

impl GroupLocks {
    /// Below this many locks the table is never swept.
    const MIN_SWEEP: usize = 1024;

    /// The lock of `id`.
    pub(crate) fn get(&mut self, id: &GroupId) -> Arc<tokio::sync::Mutex<()>> {
        if self.by_group.len() >= self.sweep_at.max(Self::MIN_SWEEP) {
            // Only the table refers to an idle lock: a later locker of its
            // group makes a new one, and nobody holds the old one.
            self.by_group.retain(|_, lock| Arc::strong_count(lock) > 1);
            self.sweep_at = self.by_group.len() * 2;
        }
        self.by_group.entry(id.clone()).or_default().clone()
    }
}
