//! The sled backend's in-memory queue index: which stored message sits at
//! which sequence number of each client's queue, how far each queue is
//! acknowledged and visible, how many queue entries still reference each
//! delivery batch (the message id says its batch: nothing is kept per
//! message but its queue entries), and a bounded cache of message bodies.
//! Over 500 lines because every change of the index (assign, undo, ack,
//! expire, drop, delete) keeps the same invariants over the same state
//! under one lock; split, each part would reach into the others' fields.
//!
//! At startup it is taken from its checkpoint and brought up to date, or
//! rebuilt from the stored batches (`queue_startup::start`). Only the
//! group commit's writer thread changes which entries exist (assigning
//! sequence numbers as write sets are applied, acknowledging, expiring,
//! deleting queues) and makes entries visible once they are durable;
//! fetches only read. One mutex guards it all, each holder keeping it for
//! a few map operations.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mls_ds_protocol::ClientId;
use tokio::sync::Notify;

use super::id_deque::IdDeque;
use super::layout::{self, Mark};
use super::rosters::Rosters;
use crate::backend::page::entry_size;
use crate::backend::records::StoredMessage;
use crate::backend::write_set::AckOutcome;

/// Bytes of message bodies kept in memory for fetches; beyond it bodies are
/// read from sled.
const BODY_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// One client's queue.
pub(crate) struct ClientQueue {
    /// Highest acknowledged sequence number.
    pub(crate) acked: u64,
    /// Id of the message at `acked` (0 while nothing left the queue): a
    /// start skips the stored entries up to it ([`Mark`]).
    pub(crate) acked_id: u64,
    /// Highest sequence number known durable (visible to fetches).
    pub(crate) visible: u64,
    /// Message ids at sequence numbers `acked + 1 ..= acked + ids.len()`,
    /// including entries not yet visible.
    pub(crate) ids: IdDeque,
    /// The client deleted itself: nothing is queued for it any more.
    pub(crate) deleted: bool,
    notify: Arc<Notify>,
}

impl ClientQueue {
    pub(crate) fn new(mark: Mark) -> ClientQueue {
        ClientQueue {
            acked: mark.seq,
            acked_id: mark.id,
            visible: mark.seq,
            ids: IdDeque::default(),
            deleted: false,
            notify: Arc::new(Notify::new()),
        }
    }

    /// The sequence number the next entry gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.acked + self.ids.len() as u64 + 1
    }

    /// Acknowledge up to `up_to`, returning the ids that leave the queue.
    fn advance(&mut self, up_to: u64) -> Vec<u64> {
        let n = usize::try_from(up_to.saturating_sub(self.acked))
            .unwrap_or(usize::MAX)
            .min(self.ids.len());
        self.acked = self.acked.max(up_to);
        let popped = self.ids.drain_front(n);
        if let Some(last) = popped.last() {
            self.acked_id = *last;
        }
        popped
    }

    /// The mark as stored.
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            seq: self.acked,
            id: self.acked_id,
        }
    }
}

/// What the index keeps per stored delivery batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BatchMeta {
    /// Unacknowledged queue entries referencing its messages.
    pub(crate) refs: u64,
    /// Messages stored in it.
    pub(crate) messages: u32,
    /// Acceptance time of its first message (unix ms), for retention.
    pub(crate) stored_ms: u64,
}

/// A cached body and the queue entries still referencing it (dropped from
/// the cache with the last).
struct CachedBody {
    message: Arc<StoredMessage>,
    refs: u32,
}

/// The index's contents (see the module doc).
#[derive(Default)]
pub(crate) struct IndexState {
    pub(crate) clients: HashMap<ClientId, ClientQueue>,
    /// The number the next delivery batch gets.
    pub(crate) next_batch: u64,
    /// Every stored batch still referenced, by number (numbers grow with
    /// time).
    pub(crate) batches: BTreeMap<u64, BatchMeta>,
    cache: HashMap<u64, CachedBody>,
    cache_bytes: usize,
    /// Entries dropped from full queues since start.
    pub(crate) overflow_drops: u64,
    /// The rosters that big groups' fan-outs reference.
    pub(crate) rosters: Rosters,
}

/// Sequence numbers a delivery got.
pub(crate) struct Assignment {
    /// Id of the stored message.
    pub(crate) message_id: u64,
    /// Each recipient (those that had not deleted themselves) and its
    /// sequence number.
    pub(crate) entries: Vec<(ClientId, u64)>,
    /// Positions in the recipients given that got no entry (they had
    /// deleted themselves), ascending.
    pub(crate) skipped: Vec<u32>,
    /// The oldest entries of full queues, dropped to make room.
    pub(crate) dropped: Released,
    /// What the drops changed, to put back if the write is not made.
    overflow: Vec<Overflow>,
    /// The roster stored for this delivery, forgotten if the write is not
    /// made.
    pub(crate) created_roster: Option<CreatedRoster>,
}

/// A roster stored for a delivery (`rosters.rs`).
pub(crate) struct CreatedRoster {
    /// The group's id.
    pub(crate) group: Vec<u8>,
    /// The roster's.
    pub(crate) id: u64,
}

/// One full queue's drop: its mark and entries before.
struct Overflow {
    client: ClientId,
    mark: Mark,
    ids: Vec<u64>,
    /// Acceptance time of each dropped message's batch, to restore its
    /// record if the drop freed it.
    stored_ms: Vec<u64>,
}

/// Entries that left queues, and the delivery batches they freed.
#[derive(Default)]
pub(crate) struct Released {
    /// New acknowledgement marks to store.
    pub(crate) marks: Vec<(ClientId, Mark)>,
    /// Batches no queue entry references any more (to delete).
    pub(crate) freed: Vec<u64>,
    /// Queue entries that left.
    pub(crate) entries: usize,
}

/// The part of a queue a fetch reads, taken under the lock.
pub(crate) struct Rows {
    /// Sequence number, message id and the cached body if there is one.
    pub(crate) rows: Vec<Row>,
    /// Highest visible sequence number.
    pub(crate) head: u64,
    /// Acknowledgement mark.
    pub(crate) acked: u64,
}

/// One entry of [`Rows`].
pub(crate) struct Row {
    pub(crate) seq: u64,
    pub(crate) message_id: u64,
    pub(crate) cached: Option<Arc<StoredMessage>>,
}

impl IndexState {
    /// An index of `clients`' queues, the next batch numbered `next_batch`.
    pub(crate) fn new(clients: HashMap<ClientId, ClientQueue>, next_batch: u64) -> IndexState {
        IndexState {
            clients,
            next_batch,
            ..IndexState::default()
        }
    }

    /// Queue entries held (visible or not).
    pub(crate) fn entries(&self) -> u64 {
        self.clients.values().map(|c| c.ids.len() as u64).sum()
    }

    /// Number a new delivery batch.
    pub(crate) fn new_batch(&mut self) -> u64 {
        let n = self.next_batch;
        self.next_batch += 1;
        n
    }

    /// The queue of `id`, created empty if unknown.
    pub(crate) fn client(&mut self, id: &ClientId) -> &mut ClientQueue {
        self.clients
            .entry(id.clone())
            .or_insert_with(|| ClientQueue::new(Mark::default()))
    }

    /// `f` on the queue of `id`, created empty if unknown: the id is
    /// cloned only then (this runs for every recipient of every message).
    fn with_queue<T>(&mut self, id: &ClientId, f: impl FnOnce(&mut ClientQueue) -> T) -> T {
        match self.clients.get_mut(id) {
            Some(cq) => f(cq),
            None => f(self
                .clients
                .entry(id.clone())
                .or_insert_with(|| ClientQueue::new(Mark::default()))),
        }
    }

    /// Queue `message` for each of `recipients` that has not deleted itself.
    /// A queue already holding `max_depth` entries first drops its oldest
    /// ones, down to room for this one, as the retention bound does: its
    /// acknowledgement mark moves past them, which is how the client learns
    /// that it missed entries (and, for a missed commit, that it must
    /// resync).
    /// The message is stored as `message_id` (of a batch numbered by
    /// [`IndexState::new_batch`]).
    pub(crate) fn assign(
        &mut self,
        message_id: u64,
        recipients: Vec<ClientId>,
        stored_ms: u64,
        max_depth: u64,
    ) -> Assignment {
        let mut entries = Vec::with_capacity(recipients.len());
        let mut skipped = Vec::new();
        let mut popped = Vec::new();
        let mut marks = Vec::new();
        let mut overflow = Vec::new();
        for (position, r) in recipients.into_iter().enumerate() {
            let placed = self.with_queue(&r, |cq| {
                if cq.deleted {
                    return None;
                }
                // Above the bound after it was lowered, too: back to it.
                let excess = (cq.ids.len() as u64 + 1).saturating_sub(max_depth.max(1));
                let dropped = (excess > 0).then(|| {
                    let before = cq.mark();
                    let ids = cq.advance(before.seq + excess);
                    (before, cq.mark(), ids)
                });
                let seq = cq.next_seq();
                cq.ids.push_back(message_id);
                Some((seq, dropped))
            });
            let Some((seq, dropped)) = placed else {
                skipped.push(u32::try_from(position).unwrap_or(u32::MAX));
                continue;
            };
            if let Some((before, mark, ids)) = dropped {
                popped.extend_from_slice(&ids);
                marks.push((r.clone(), mark));
                overflow.push(Overflow {
                    client: r.clone(),
                    mark: before,
                    ids,
                    stored_ms: Vec::new(),
                });
            }
            entries.push((r, seq));
        }
        for o in &mut overflow {
            o.stored_ms = o
                .ids
                .iter()
                .map(|id| {
                    self.batches
                        .get(&layout::batch_of(*id))
                        .map_or(0, |b| b.stored_ms)
                })
                .collect();
        }
        self.overflow_drops += popped.len() as u64;
        let dropped = Released {
            entries: popped.len(),
            freed: self.release(popped),
            marks,
        };
        if !entries.is_empty() {
            let batch = self
                .batches
                .entry(layout::batch_of(message_id))
                .or_insert(BatchMeta {
                    refs: 0,
                    messages: 0,
                    stored_ms,
                });
            batch.refs += entries.len() as u64;
            batch.messages += 1;
        }
        Assignment {
            message_id,
            entries,
            skipped,
            dropped,
            overflow,
            created_roster: None,
        }
    }

    /// Undo the last assignments, newest first (their write could not be
    /// prepared), so that no queue keeps a gap.
    pub(crate) fn unassign(&mut self, assignments: &[Assignment]) {
        for a in assignments.iter().rev() {
            if let Some(r) = &a.created_roster {
                self.rosters.unmade(&r.group, r.id);
            }
            for (client, _) in &a.entries {
                if let Some(cq) = self.clients.get_mut(client) {
                    if cq.ids.back() == Some(a.message_id) {
                        cq.ids.pop_back();
                    }
                }
            }
            for o in a.overflow.iter().rev() {
                if let Some(cq) = self.clients.get_mut(&o.client) {
                    for id in o.ids.iter().rev() {
                        cq.ids.push_front(*id);
                    }
                    cq.acked = o.mark.seq;
                    cq.acked_id = o.mark.id;
                }
                for (id, stored_ms) in o.ids.iter().zip(&o.stored_ms) {
                    let meta = self
                        .batches
                        .entry(layout::batch_of(*id))
                        .or_insert(BatchMeta {
                            refs: 0,
                            messages: 0,
                            stored_ms: *stored_ms,
                        });
                    meta.refs += 1;
                }
                self.overflow_drops -= o.ids.len() as u64;
            }
            let batch = layout::batch_of(a.message_id);
            if let Some(meta) = self.batches.get_mut(&batch) {
                if !a.entries.is_empty() {
                    meta.refs = meta.refs.saturating_sub(a.entries.len() as u64);
                    meta.messages = meta.messages.saturating_sub(1);
                }
                if meta.messages == 0 && meta.refs == 0 {
                    self.batches.remove(&batch);
                }
            }
            if let Some(c) = self.cache.remove(&a.message_id) {
                self.cache_bytes -= entry_size(&c.message);
            }
        }
    }

    /// Keep a body in memory for fetches, within the cache bound, as long
    /// as `refs` queue entries reference it.
    pub(crate) fn cache(&mut self, id: u64, message: Arc<StoredMessage>, refs: usize) {
        let size = entry_size(&message);
        if self.cache_bytes + size <= BODY_CACHE_BYTES {
            self.cache_bytes += size;
            let refs = u32::try_from(refs).unwrap_or(u32::MAX);
            self.cache.insert(id, CachedBody { message, refs });
        }
    }

    /// Drop one reference from each of `ids` (their batches' and cached
    /// bodies'); returns the batches left unreferenced.
    fn release(&mut self, ids: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut freed = Vec::new();
        for id in ids {
            if let Some(cached) = self.cache.get_mut(&id) {
                cached.refs = cached.refs.saturating_sub(1);
                if cached.refs == 0 {
                    let size = entry_size(&cached.message);
                    self.cache.remove(&id);
                    self.cache_bytes -= size;
                }
            }
            let batch = layout::batch_of(id);
            if let Some(meta) = self.batches.get_mut(&batch) {
                meta.refs = meta.refs.saturating_sub(1);
                if meta.refs == 0 {
                    self.batches.remove(&batch);
                    freed.push(batch);
                }
            }
        }
        freed
    }

    /// Acknowledge `client`'s visible entries up to `up_to`. `Err(head)` if
    /// `up_to` is past the visible head. An ack at or below the mark
    /// releases nothing.
    pub(crate) fn ack(&mut self, client: &ClientId, up_to: u64) -> Result<Released, u64> {
        let popped = self.with_queue(client, |cq| {
            if up_to > cq.visible {
                return Err(cq.visible);
            }
            Ok((up_to > cq.acked).then(|| (cq.advance(up_to), cq.mark())))
        })?;
        let Some((popped, mark)) = popped else {
            return Ok(Released::default());
        };
        let entries = popped.len();
        let freed = self.release(popped);
        Ok(Released {
            marks: vec![(client.clone(), mark)],
            freed,
            entries,
        })
    }

    /// The acknowledgement mark of `client` and its visible entries after it.
    pub(crate) fn position(&mut self, client: &ClientId) -> AckOutcome {
        self.with_queue(client, |cq| AckOutcome {
            acked: cq.acked,
            remaining: cq.visible.saturating_sub(cq.acked),
        })
    }

    /// Drop visible entries of messages stored before `cutoff_ms`.
    pub(crate) fn expire(&mut self, cutoff_ms: u64) -> Released {
        // Batch numbers, and so message ids, grow with time: everything
        // before the first young batch expires.
        let first_young = self
            .batches
            .iter()
            .find(|(_, b)| b.stored_ms >= cutoff_ms)
            .map_or(self.next_batch, |(n, _)| *n);
        if self.batches.keys().next().is_none_or(|n| *n >= first_young) {
            return Released::default();
        }
        let boundary = layout::message_id(first_young, 0);
        let mut marks = Vec::new();
        let mut popped = Vec::new();
        for (client, cq) in self.clients.iter_mut() {
            // Only visible entries: one not yet durable is never old.
            let visible =
                usize::try_from(cq.visible.saturating_sub(cq.acked)).unwrap_or(usize::MAX);
            let n = cq
                .ids
                .iter_from(0)
                .take(visible)
                .take_while(|id| *id < boundary)
                .count() as u64;
            if n > 0 {
                popped.extend(cq.advance(cq.acked + n));
                marks.push((client.clone(), cq.mark()));
            }
        }
        let entries = popped.len();
        let freed = self.release(popped);
        Released {
            marks,
            freed,
            entries,
        }
    }

    /// A client deleted itself: its whole queue (entries not yet visible
    /// included) is acknowledged, and nothing more is queued for it.
    pub(crate) fn delete_client(&mut self, client: &ClientId) -> Released {
        let cq = self.client(client);
        cq.deleted = true;
        let popped = cq.advance(cq.next_seq() - 1);
        let mark = cq.mark();
        let entries = popped.len();
        let freed = self.release(popped);
        Released {
            marks: vec![(client.clone(), mark)],
            freed,
            entries,
        }
    }

    /// Bring a queue taken from the index's checkpoint up to its mark and
    /// deletion on disk (at startup): the entries up to the mark leave.
    /// Returns the batches they leave unreferenced.
    pub(crate) fn catch_up(&mut self, client: &ClientId, mark: Mark, deleted: bool) -> Vec<u64> {
        let popped = self.with_queue(client, |cq| {
            cq.deleted |= deleted;
            let popped = if mark.seq > cq.acked {
                cq.advance(mark.seq)
            } else {
                Vec::new()
            };
            // The checkpoint does not hold the message id at the mark.
            cq.acked_id = mark.id;
            popped
        });
        self.release(popped)
    }

    /// Make durable entries visible and wake their long-polls.
    pub(crate) fn publish(&mut self, entries: &[(ClientId, u64)]) {
        for (client, seq) in entries {
            if let Some(cq) = self.clients.get_mut(client) {
                if *seq > cq.visible {
                    cq.visible = *seq;
                    cq.notify.notify_waiters();
                }
            }
        }
    }

    /// Up to `limit` visible entries of `client` after `after`.
    pub(crate) fn rows(&self, client: &ClientId, after: u64, limit: usize) -> Rows {
        let IndexState { clients, cache, .. } = self;
        // A client without a queue has nothing, acknowledged up to 0.
        let Some(cq) = clients.get(client) else {
            return Rows {
                rows: Vec::new(),
                head: 0,
                acked: 0,
            };
        };
        let start = after.max(cq.acked);
        let end = cq.visible.min(start.saturating_add(limit as u64));
        let mut rows = Vec::with_capacity(usize::try_from(end.saturating_sub(start)).unwrap_or(0));
        let first = usize::try_from(start - cq.acked).unwrap_or(usize::MAX);
        for (seq, id) in (start + 1..=end).zip(cq.ids.iter_from(first)) {
            rows.push(Row {
                seq,
                message_id: id,
                cached: cache.get(&id).map(|c| c.message.clone()),
            });
        }
        Rows {
            rows,
            head: cq.visible,
            acked: cq.acked,
        }
    }
}

/// The index behind its lock, and whether the backend closed.
#[derive(Default)]
pub(crate) struct QueueIndex {
    state: Mutex<IndexState>,
    closed: AtomicBool,
}

impl QueueIndex {
    /// An index holding `state`.
    pub(crate) fn new(state: IndexState) -> QueueIndex {
        QueueIndex {
            state: Mutex::new(state),
            closed: AtomicBool::new(false),
        }
    }

    /// Take the lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, IndexState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The wake-up handle of `client`'s queue.
    pub(crate) fn subscribe(&self, client: &ClientId) -> Arc<Notify> {
        self.lock().client(client).notify.clone()
    }

    /// End every long-poll and refuse new ones.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for cq in self.lock().clients.values() {
            cq.notify.notify_waiters();
        }
    }

    /// Whether [`QueueIndex::close`] ran.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Visible unacknowledged entries (all queues, and the deepest one) and
    /// the messages of referenced batches.
    pub(crate) fn depths(&self) -> QueueDepths {
        let state = self.lock();
        let mut depths = QueueDepths {
            stored_messages: state.batches.values().map(|b| u64::from(b.messages)).sum(),
            overflow_drops: state.overflow_drops,
            ..QueueDepths::default()
        };
        for q in state.clients.values() {
            let d = q.visible.saturating_sub(q.acked);
            depths.entries += d;
            depths.deepest = depths.deepest.max(d);
        }
        depths
    }
}

/// Sizes of the queues (for metrics).
#[derive(Default)]
pub(crate) struct QueueDepths {
    pub(crate) entries: u64,
    pub(crate) deepest: u64,
    pub(crate) stored_messages: u64,
    pub(crate) overflow_drops: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sled::tests::message;

    /// Queue a message alone in a new batch.
    fn put(s: &mut IndexState, to: &[ClientId], stored_ms: u64, max: u64) -> Assignment {
        let batch = s.new_batch();
        s.assign(layout::message_id(batch, 0), to.to_vec(), stored_ms, max)
    }

    fn id(batch: u64) -> u64 {
        layout::message_id(batch, 0)
    }

    fn visible(state: &mut IndexState, a: &Assignment) {
        state.publish(&a.entries);
    }

    fn fresh() -> IndexState {
        IndexState::new(HashMap::new(), 1)
    }

    #[test]
    fn assignment_skips_deleted_clients_and_undo_leaves_no_gap() {
        let mut s = fresh();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        let first = put(&mut s, &[a.clone(), b.clone()], 1, u64::MAX);
        assert_eq!(first.entries, vec![(a.clone(), 1), (b.clone(), 1)]);
        let second = put(&mut s, std::slice::from_ref(&a), 1, u64::MAX);
        s.unassign(&[second]);
        assert_eq!(s.client(&a).next_seq(), 2);
        assert_eq!(s.batches.len(), 1, "the undone message's batch went");
        s.delete_client(&b);
        let third = put(&mut s, &[a.clone(), b.clone()], 1, u64::MAX);
        assert_eq!(third.entries, vec![(a.clone(), 2)], "b deleted itself");
        assert_eq!(third.skipped, vec![1], "b is at position 1");
    }

    #[test]
    fn messages_of_one_batch_free_it_together() {
        let mut s = fresh();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        let batch = s.new_batch();
        let one = s.assign(layout::message_id(batch, 0), vec![a.clone()], 1, u64::MAX);
        let two = s.assign(layout::message_id(batch, 1), vec![b.clone()], 1, u64::MAX);
        s.cache(one.message_id, Arc::new(message(1)), 1);
        visible(&mut s, &one);
        visible(&mut s, &two);
        assert_eq!((s.batches[&batch].refs, s.batches[&batch].messages), (2, 2));
        let r = s.ack(&a, 1).unwrap();
        assert!(r.freed.is_empty(), "b's message keeps the batch");
        assert!(s.cache.is_empty(), "a's body left the cache with its entry");
        assert_eq!(s.cache_bytes, 0);
        assert_eq!(s.ack(&b, 1).unwrap().freed, vec![batch]);
        assert!(s.batches.is_empty());
    }

    #[test]
    fn a_full_queue_drops_down_to_its_bound_and_undo_restores_it() {
        let mut s = fresh();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        for _ in 0..3 {
            let m = put(&mut s, std::slice::from_ref(&a), 5, u64::MAX);
            visible(&mut s, &m);
        }
        let shared = put(&mut s, &[a.clone(), b.clone()], 7, u64::MAX);
        visible(&mut s, &shared);
        // The bound was lowered to 2: a holds 4, so 3 go for the new one.
        let full = put(&mut s, std::slice::from_ref(&a), 9, 2);
        let mark = Mark { seq: 3, id: id(3) };
        assert_eq!(full.dropped.marks, vec![(a.clone(), mark)]);
        assert_eq!(full.dropped.entries, 3);
        assert_eq!(full.dropped.freed, vec![1, 2, 3], "batch 4 is b's too");
        assert_eq!(s.client(&a).ids.len(), 2);
        assert_eq!(s.overflow_drops, 3);
        s.unassign(&[full]);
        let q = s.client(&a);
        assert_eq!(
            (q.mark(), q.ids.to_vec()),
            (Mark::default(), vec![id(1), id(2), id(3), id(4)])
        );
        assert_eq!(s.overflow_drops, 0);
        assert_eq!(s.batches.len(), 4);
        assert_eq!((s.batches[&1].refs, s.batches[&1].stored_ms), (1, 5));
        assert_eq!(s.batches[&4].refs, 2);
    }

    #[test]
    fn acks_release_batches_and_refuse_past_the_head() {
        let mut s = fresh();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        let m = put(&mut s, &[a.clone(), b.clone()], 1, u64::MAX);
        assert_eq!(s.ack(&a, 1).err(), Some(0), "not visible yet");
        visible(&mut s, &m);
        let r = s.ack(&a, 1).unwrap();
        assert_eq!((r.entries, r.freed.len()), (1, 0), "b still needs it");
        assert!(
            s.ack(&a, 1).unwrap().marks.is_empty(),
            "already acknowledged"
        );
        let r = s.ack(&b, 1).unwrap();
        assert_eq!(r.freed, vec![layout::batch_of(m.message_id)]);
        assert!(s.batches.is_empty());
    }

    #[test]
    fn expiry_takes_only_visible_old_entries() {
        let mut s = fresh();
        let a = ClientId::new("a").unwrap();
        let old = put(&mut s, std::slice::from_ref(&a), 100, u64::MAX);
        visible(&mut s, &old);
        let _pending_old = put(&mut s, std::slice::from_ref(&a), 200, u64::MAX);
        let r = s.expire(1_000);
        let mark = Mark {
            seq: 1,
            id: old.message_id,
        };
        assert_eq!((r.entries, r.marks), (1, vec![(a.clone(), mark)]));
        assert_eq!(s.client(&a).ids.len(), 1, "the entry not yet durable stays");
    }

    #[test]
    fn expiry_passes_a_deleted_client_acknowledged_past_its_visible_head() {
        let mut s = fresh();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        let old = put(&mut s, std::slice::from_ref(&a), 100, u64::MAX);
        visible(&mut s, &old);
        let _pending = put(&mut s, &[a.clone(), b.clone()], 100, u64::MAX);
        s.delete_client(&b);
        let q = s.client(&b);
        assert!(
            q.acked > q.visible,
            "deletion acknowledged an entry not yet visible"
        );
        let r = s.expire(1_000);
        let mark = Mark {
            seq: 1,
            id: old.message_id,
        };
        assert_eq!((r.entries, r.marks), (1, vec![(a.clone(), mark)]));
        assert_eq!(
            s.client(&b).acked_id,
            _pending.message_id,
            "b's mark names it"
        );
    }
}
