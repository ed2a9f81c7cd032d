//! Rosters: a big group's members stored once, so that the fan-out of each
//! of its messages names the roster (and the few members that got no
//! entry) instead of listing every recipient with its sequence number
//! ([`RosterRef`]). At 2,000 members that is a few bytes per message
//! instead of about 28 KB.
//!
//! A delivery whose recipients are a group's members but the sender, in
//! the group record's order (the service says where the sender stands:
//! a message, or a commit none of whose members deleted themselves), in a
//! group of at least [`MIN_MEMBERS`] (`--roster-min-members`), references
//! the group's current roster. When the members differ from it (a commit
//! changed them), the writer stores a new roster, before the batch whose
//! envelopes reference it, in the same write or an earlier one. The roster
//! it replaces is retired, and so is a deleted group's: no later message
//! references it, and it is removed between two cycles once no batch
//! numbered in its range is stored (read on disk; a batch of any group in
//! the range keeps it, so a roster lives at most until the messages of its
//! time are acknowledged or expire). A start retires every stored roster
//! (the current ones are stored anew when next needed), with the range up
//! to the batch number it starts at. The writer keeps each current roster's
//! value in memory, to compare a delivery's members with it.
//!
//! A start reads a roster when it replays an envelope that references it
//! (`queue_startup.rs`): each member but the skipped ones holds the message
//! at the next sequence number of its queue, unless the message's id is at
//! or below the queue's mark ([`layout::Mark`]).
//!
//! Value: `[ROSTER_FORMAT] ++ (first batch u64 BE) ++ ([len u8] ++ client id)*`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use mls_ds_protocol::ClientId;

use super::layout::{self, Layout, RosterRef, ROSTER_PREFIX};
use crate::backend::error::StoreError;

/// Groups with fewer members keep listing each recipient (the default of
/// `--roster-min-members`): a roster pays for itself only when its
/// messages share it.
pub(crate) const MIN_MEMBERS: usize = 16;
/// Version byte of a roster value.
const ROSTER_FORMAT: u8 = 1;
/// Bytes before the members.
const HEADER: usize = 1 + 8;

/// The rosters the writer references and the ones it retired.
pub(crate) struct Rosters {
    /// Each group's roster, by group id.
    current: HashMap<Vec<u8>, Current>,
    /// Retired rosters, with the batch numbers that may reference them.
    retired: BTreeMap<u64, Range<u64>>,
    /// The id the next roster gets.
    next_id: u64,
    /// Members from which a group's fan-outs reference its roster.
    min_members: usize,
}

impl Default for Rosters {
    fn default() -> Rosters {
        Rosters {
            current: HashMap::new(),
            retired: BTreeMap::new(),
            next_id: 0,
            min_members: MIN_MEMBERS,
        }
    }
}

/// A group's current roster.
struct Current {
    id: u64,
    /// Its value as stored.
    value: Vec<u8>,
}

/// The roster a delivery references, and the write it needs first.
pub(crate) struct Use {
    /// The roster.
    pub(crate) id: u64,
    /// A new roster to store: key and value.
    pub(crate) created: Option<Created>,
}

/// A roster to store.
pub(crate) struct Created {
    /// Its key.
    pub(crate) key: [u8; 9],
    /// Its value.
    pub(crate) value: Vec<u8>,
}

/// A delivery to a group's members but its sender.
pub(crate) struct Members<'a> {
    /// The group's id.
    pub(crate) group: &'a [u8],
    /// The members but the sender, in the group record's order.
    pub(crate) recipients: &'a [ClientId],
    /// The sender's id.
    pub(crate) sender: &'a [u8],
    /// Where the sender stands among the members.
    pub(crate) sender_at: usize,
}

impl Members<'_> {
    /// The members in order, the sender in its place.
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let (before, after) = self.recipients.split_at(self.sender_at);
        before
            .iter()
            .map(ClientId::as_bytes)
            .chain(std::iter::once(self.sender))
            .chain(after.iter().map(ClientId::as_bytes))
    }

    /// Whether `value` is a roster of exactly these members.
    fn are(&self, value: &[u8]) -> bool {
        let mut rest = value.get(HEADER..).unwrap_or_default();
        for member in self.iter() {
            let Some((&len, tail)) = rest.split_first() else {
                return false;
            };
            let Some((stored, tail)) = tail.split_at_checked(usize::from(len)) else {
                return false;
            };
            if stored != member {
                return false;
            }
            rest = tail;
        }
        rest.is_empty()
    }
}

impl Rosters {
    /// The stored rosters at a start, each retired with the batches before
    /// `next_batch`; the next roster is numbered past them.
    pub(crate) fn at_start(layout: &Layout, next_batch: u64) -> Result<Rosters, StoreError> {
        let mut rosters = Rosters::default();
        let tree = layout.trees.delivery;
        let prefix = [ROSTER_PREFIX];
        for (key, value) in layout.storage.scan_raw(tree.handle, &prefix)? {
            let id = layout::key_id(&key)
                .filter(|_| key.len() == 9)
                .ok_or_else(|| StoreError::Corrupt(format!("roster key {}", hex::encode(&key))))?;
            let first =
                first_batch(&value).ok_or_else(|| damaged(id, "its header is cut short"))?;
            layout::stored_batch(first, &format!("roster {id}"))?;
            let end = next_batch.max(first.saturating_add(1));
            rosters.retired.insert(id, first..end);
            rosters.next_id = rosters.next_id.max(id.saturating_add(1));
        }
        Ok(rosters)
    }

    /// The roster `to` references, stored anew if the group's current one
    /// has other members; `None` if `to` is not a big group's members
    /// (the fan-out lists its recipients). `batch` is the batch the
    /// message goes into.
    pub(crate) fn reference(&mut self, to: &Members<'_>, batch: u64) -> Option<Use> {
        let members = to.recipients.len() + 1;
        if members < self.min_members.max(2)
            || to.sender_at > to.recipients.len()
            || to.sender.len() > 255
        {
            return None;
        }
        if let Some(current) = self.current.get(to.group) {
            if to.are(&current.value) {
                return Some(Use {
                    id: current.id,
                    created: None,
                });
            }
        }
        let mut value = Vec::with_capacity(HEADER + members * 16);
        value.push(ROSTER_FORMAT);
        value.extend_from_slice(&batch.to_be_bytes());
        for member in to.iter() {
            // Client ids have at most 128 bytes, the sender at most 255.
            value.push(member.len() as u8);
            value.extend_from_slice(member);
        }
        let id = self.next_id;
        self.next_id += 1;
        let created = Created {
            key: layout::roster_key(id),
            value: value.clone(),
        };
        if let Some(old) = self
            .current
            .insert(to.group.to_vec(), Current { id, value })
        {
            self.retire(old, batch + 1);
        }
        Some(Use {
            id,
            created: Some(created),
        })
    }

    /// Reference rosters from groups of `n` members on.
    pub(crate) fn set_min_members(&mut self, n: usize) {
        self.min_members = n;
    }

    /// Forget roster `id`, created for a write that was not made: the
    /// group's next delivery stores a roster again.
    pub(crate) fn unmade(&mut self, group: &[u8], id: u64) {
        if self.current.get(group).is_some_and(|c| c.id == id) {
            self.current.remove(group);
        }
    }

    /// The group was deleted: its roster is referenced no more
    /// (`next_batch`: the number the next batch gets).
    pub(crate) fn group_deleted(&mut self, group: &[u8], next_batch: u64) {
        if let Some(old) = self.current.remove(group) {
            self.retire(old, next_batch);
        }
    }

    fn retire(&mut self, old: Current, before: u64) {
        let first = first_batch(&old.value).unwrap_or(0);
        self.retired
            .insert(old.id, first..before.max(first.saturating_add(1)));
    }

    /// The number past every batch a stored roster was first used in.
    pub(crate) fn batch_floor(&self) -> u64 {
        self.retired
            .values()
            .map(|r| r.start.saturating_add(1))
            .max()
            .unwrap_or(0)
    }

    /// The retired rosters and the batches that may reference them.
    pub(crate) fn retired(&self) -> Vec<Retired> {
        self.retired
            .iter()
            .map(|(id, batches)| Retired {
                id: *id,
                batches: batches.clone(),
            })
            .collect()
    }

    /// Forget retired rosters that were removed.
    pub(crate) fn removed(&mut self, ids: &[u64]) {
        for id in ids {
            self.retired.remove(id);
        }
    }
}

/// A retired roster.
pub(crate) struct Retired {
    /// The roster.
    pub(crate) id: u64,
    /// The batches that may reference it.
    pub(crate) batches: Range<u64>,
}

/// Remove the rosters of `retired` that no stored batch can reference
/// (between two cycles, when every batch is written, on the writer thread,
/// the only one that changes rosters); returns their ids.
pub(crate) fn sweep(layout: &Layout, retired: &[Retired]) -> Result<Vec<u64>, StoreError> {
    let tree = layout.trees.delivery;
    let mut gone = Vec::new();
    for r in retired {
        let any = layout.storage.range_raw(
            tree.handle,
            &layout::batch_key(r.batches.start),
            &layout::batch_key(r.batches.end.saturating_sub(1)),
            1,
        )?;
        if any.is_empty() {
            layout
                .storage
                .remove_raw(tree.handle, &layout::roster_key(r.id))?;
            gone.push(r.id);
        }
    }
    Ok(gone)
}

/// What the stored rosters take (`mls-ds stats`).
pub(crate) struct Stored {
    /// Rosters.
    pub(crate) rosters: usize,
    /// Members, summed over the rosters.
    pub(crate) members: usize,
    /// Bytes of their values.
    pub(crate) bytes: usize,
}

/// The stored rosters.
pub(crate) fn stored(layout: &Layout) -> Result<Stored, StoreError> {
    let mut stored = Stored {
        rosters: 0,
        members: 0,
        bytes: 0,
    };
    let tree = layout.trees.delivery;
    for (_, value) in layout.storage.scan_raw(tree.handle, &[ROSTER_PREFIX])? {
        stored.rosters += 1;
        stored.bytes += value.len();
        let mut rest = value.get(HEADER..).unwrap_or_default();
        while let Some((&len, tail)) = rest.split_first() {
            stored.members += 1;
            rest = tail.get(usize::from(len)..).unwrap_or_default();
        }
    }
    Ok(stored)
}

/// The batch a roster value was first used in.
fn first_batch(value: &[u8]) -> Option<u64> {
    let header: [u8; 8] = value.get(1..HEADER)?.try_into().ok()?;
    (value.first() == Some(&ROSTER_FORMAT)).then_some(u64::from_be_bytes(header))
}

fn damaged(id: u64, why: &str) -> StoreError {
    StoreError::Corrupt(format!("roster {id}: {why}"))
}

/// Rosters read at a start, each decoded once.
#[derive(Default)]
pub(crate) struct RosterReader {
    read: HashMap<u64, Vec<ClientId>>,
}

impl RosterReader {
    /// The recipients `r` names: the roster's members but the skipped
    /// positions. Fails if the roster is missing or damaged, or does not
    /// fit `r`.
    pub(crate) fn recipients<'a>(
        &'a mut self,
        layout: &Layout,
        r: &'a RosterRef,
    ) -> Result<impl Iterator<Item = &'a ClientId> + 'a, StoreError> {
        let members = match self.read.entry(r.id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(read_members(layout, r.id)?),
        };
        let fits = r.skipped.windows(2).all(|w| w[0] < w[1])
            && r.skipped
                .last()
                .is_none_or(|s| (*s as usize) < members.len())
            && members.len() - r.skipped.len() == r.recipients as usize;
        if !fits {
            return Err(damaged(
                r.id,
                &format!(
                    "a fan-out of {} recipients skips {:?} of its {} members",
                    r.recipients,
                    r.skipped,
                    members.len()
                ),
            ));
        }
        let mut skipped = r.skipped.iter().peekable();
        Ok(members.iter().enumerate().filter_map(move |(i, m)| {
            if skipped.peek().is_some_and(|s| **s as usize == i) {
                skipped.next();
                None
            } else {
                Some(m)
            }
        }))
    }
}

/// The members of the stored roster `id`.
fn read_members(layout: &Layout, id: u64) -> Result<Vec<ClientId>, StoreError> {
    let tree = layout.trees.delivery;
    let value = layout
        .storage
        .get_raw(tree.handle, &layout::roster_key(id))?
        .ok_or_else(|| damaged(id, "a fan-out references it and it is not stored"))?;
    first_batch(&value).ok_or_else(|| damaged(id, "its header is cut short"))?;
    let mut members = Vec::new();
    let mut rest = &value[HEADER..];
    while let Some((&len, tail)) = rest.split_first() {
        let (member, tail) = tail
            .split_at_checked(usize::from(len))
            .ok_or_else(|| damaged(id, "a member is cut short"))?;
        members.push(ClientId::new(member).map_err(|e| damaged(id, &e.to_string()))?);
        rest = tail;
    }
    Ok(members)
}

#[cfg(test)]
mod tests;
