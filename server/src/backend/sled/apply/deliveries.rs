//! A write set's deliveries on the writer thread: sequence numbers from the
//! queue index, each message stored in a delivery batch (`batch.rs`). A
//! plain send joins the open batch, which [`Applier::seal`] turns into
//! writes; a write set that changes more gets a batch of its own inside
//! its atomic write. The fan-out of a big group's message references the
//! group's roster (`rosters.rs`), stored first when it is new.

use std::sync::Arc;

use mls_ds_storage::{PendingWrites, StorageError, Transaction};

use super::{stage_release, Applier, StagedWrite};
use crate::backend::error::StoreError;
use crate::backend::records::SendReceipt;
use crate::backend::sled::batch::BatchBuilder;
use crate::backend::sled::layout::{self, FanoutRef, Layout, RosterRef};
use crate::backend::sled::queue_index::{Assignment, CreatedRoster, IndexState, Released};
use crate::backend::sled::receipts::{Receipts, SendAnswer};
use crate::backend::sled::rosters::{Created, Members};
use crate::backend::write_set::{Applied, Delivery, DeliveryOutcome};

/// What queueing a write set's deliveries produced.
#[derive(Default)]
pub(super) struct Queued {
    applied: Applied,
    assignments: Vec<Assignment>,
    /// Receipts of the deliveries sent with a send id.
    receipts: Vec<SendAnswer>,
    /// The batch a write set's own deliveries are stored in.
    batch: u64,
    /// Rosters to store before the batch.
    rosters: Vec<Created>,
}

impl Queued {
    /// Remember the receipts from now on (once their writes are prepared).
    pub(super) fn stage_receipts(&self, receipts: &Receipts) {
        receipts.stage(self.batch, &self.receipts);
    }
}

/// The batch plain sends join until it is sealed, and what is written after
/// it.
pub(super) struct OpenBatch {
    builder: BatchBuilder,
    /// Entries of full queues dropped to make room for its messages.
    dropped: Released,
}

impl Applier {
    /// The open batch as writes, in the order they must be applied: the
    /// batch (which holds its messages' send ids, so their receipts), the
    /// marks and removals of the drops it caused (each a single key: marks
    /// sort before batches). Nothing if no batch is open.
    pub(crate) fn seal(&mut self) -> Result<Vec<PendingWrites>, StorageError> {
        let Some(open) = self.open.take() else {
            return Ok(Vec::new());
        };
        let tree = self.layout.trees.delivery;
        let mut writes = Vec::new();
        let number = open.builder.number();
        if !open.builder.is_empty() {
            let tx = self.layout.storage.begin();
            tx.put_raw(
                tree.handle,
                &layout::batch_key(number),
                &open.builder.into_value(),
            )?;
            writes.push(tx.into_pending()?);
        }
        let after = self.layout.storage.begin();
        let state = self.index.lock();
        for (client, mark) in &open.dropped.marks {
            // An acknowledgement prepared after the drop, whose mark went
            // before this batch, may have taken the queue past it: a mark
            // on disk never goes back.
            let mark = state.clients.get(client).map_or(*mark, |q| {
                if q.acked >= mark.seq {
                    q.mark()
                } else {
                    *mark
                }
            });
            after.put_raw(tree.handle, &layout::ack_key(client), &mark.to_bytes())?;
        }
        for batch in &open.dropped.freed {
            // A batch freed by a drop may be this one, which messages
            // joined after the drop: it stays while referenced.
            if !state.batches.contains_key(batch) && !self.receipts.keeps(*batch) {
                after.remove_raw(tree.handle, &layout::batch_key(*batch))?;
            }
        }
        drop(state);
        writes.extend(after.into_pending()?.into_single_writes());
        Ok(writes)
    }

    /// Whether the open batch takes no more messages: the writer seals it
    /// before the next plain send.
    pub(crate) fn open_batch_is_full(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.builder.is_full())
    }

    /// A plain send's deliveries join the open batch (opened if none is).
    pub(super) fn write_plain(
        &mut self,
        deliveries: Vec<Delivery>,
    ) -> Result<StagedWrite, StoreError> {
        let mut state = self.index.lock();
        let open = self.open.get_or_insert_with(|| OpenBatch {
            builder: BatchBuilder::new(state.new_batch()),
            dropped: Released::default(),
        });
        let start = open.builder.mark();
        let queued = queue_into(
            &self.layout,
            &mut state,
            &mut open.builder,
            deliveries,
            self.max_queue_depth,
        )?;
        // A new roster is written before the batch that references it.
        let mut writes = Vec::new();
        if !queued.rosters.is_empty() {
            let tx = self.layout.storage.begin();
            let staged = stage_rosters(&self.layout, &tx, &queued.rosters)
                .and_then(|()| Ok(tx.into_pending()?));
            match staged {
                Ok(w) => writes.push(w),
                Err(e) => {
                    state.unassign(&queued.assignments);
                    open.builder.rollback(start);
                    return Err(e);
                }
            }
        }
        drop(state);
        self.receipts.stage(open.builder.number(), &queued.receipts);
        for a in &queued.assignments {
            open.dropped.marks.extend(a.dropped.marks.iter().cloned());
            open.dropped.freed.extend(a.dropped.freed.iter().copied());
        }
        Ok(self.delivered(writes, queued))
    }

    /// Assign sequence numbers to `deliveries` and stage them as a batch of
    /// their own in `tx` (and the oldest entries of full queues dropped to
    /// make room). Their send receipts are not staged yet: [`Queued::stage`]
    /// does, once the writes are prepared.
    pub(super) fn deliver(
        &self,
        state: &mut IndexState,
        tx: &Transaction,
        deliveries: Vec<Delivery>,
    ) -> Result<Queued, StoreError> {
        if deliveries.is_empty() {
            return Ok(Queued::default());
        }
        let mut builder = BatchBuilder::new(state.new_batch());
        let number = builder.number();
        let mut queued = queue_into(
            &self.layout,
            state,
            &mut builder,
            deliveries,
            self.max_queue_depth,
        )?;
        let staged = queued
            .assignments
            .iter()
            .try_for_each(|a| stage_release(&self.layout, &self.receipts, tx, &a.dropped))
            .and_then(|()| stage_rosters(&self.layout, tx, &queued.rosters))
            .and_then(|()| {
                if builder.is_empty() {
                    return Ok(());
                }
                let key = layout::batch_key(builder.number());
                Ok(tx.put_raw(
                    self.layout.trees.delivery.handle,
                    &key,
                    &builder.into_value(),
                )?)
            });
        if let Err(e) = staged {
            state.unassign(&queued.assignments);
            return Err(e);
        }
        queued.batch = number;
        Ok(queued)
    }

    /// What a write set's deliveries produced: its answer, the entries to
    /// publish.
    pub(super) fn delivered(&self, writes: Vec<PendingWrites>, queued: Queued) -> StagedWrite {
        let mut publish = Vec::new();
        for a in queued.assignments {
            publish.extend(a.entries);
        }
        StagedWrite {
            writes,
            publish,
            applied: queued.applied,
        }
    }
}

/// Stage the new rosters a batch references.
fn stage_rosters(layout: &Layout, tx: &Transaction, rosters: &[Created]) -> Result<(), StoreError> {
    for r in rosters {
        tx.put_raw(layout.trees.delivery.handle, &r.key, &r.value)?;
    }
    Ok(())
}

/// Assign sequence numbers to `deliveries`, store each in `builder` and
/// note its send's answer (and the new rosters to store before the batch).
/// Undone in the index, and in `builder`, if one cannot be stored, so that
/// no queue keeps a gap.
fn queue_into(
    layout: &Layout,
    state: &mut IndexState,
    builder: &mut BatchBuilder,
    deliveries: Vec<Delivery>,
    max_queue_depth: u64,
) -> Result<Queued, StoreError> {
    let n = deliveries.len();
    let mut queued = Queued {
        applied: Applied {
            deliveries: Vec::with_capacity(n),
        },
        assignments: Vec::with_capacity(n),
        receipts: Vec::with_capacity(n),
        batch: 0,
        rosters: Vec::new(),
    };
    let start = builder.mark();
    let tree = layout.trees.delivery;
    for d in deliveries {
        let roster = d.sender_at.and_then(|at| {
            let to = Members {
                group: &d.message.group_id,
                recipients: &d.recipients,
                sender: &d.message.sender,
                sender_at: at as usize,
            };
            state.rosters.reference(&to, builder.number())
        });
        let mut a = state.assign(
            builder.next_id(),
            d.recipients,
            d.message.stored_ms,
            max_queue_depth,
        );
        let recipients = u32::try_from(a.entries.len()).unwrap_or(u32::MAX);
        let by_roster = roster.zip(d.sender_at).map(|(r, at)| {
            if let Some(created) = r.created {
                // Forgotten with the assignment if the write is not made.
                a.created_roster = Some(CreatedRoster {
                    group: d.message.group_id.clone(),
                    id: r.id,
                });
                queued.rosters.push(created);
            }
            RosterRef {
                id: r.id,
                skipped: member_positions(&a.skipped, at),
                recipients,
            }
        });
        // A message for nobody is not stored, unless it answers a send id:
        // its envelope is that send's receipt.
        let fanout = (!a.entries.is_empty() || d.receipt.is_some()).then_some(FanoutRef {
            stored_ms: d.message.stored_ms,
            entries: &a.entries,
            roster: by_roster.as_ref(),
        });
        let stored = builder.push(tree, fanout, &d.message);
        queued.applied.deliveries.push(DeliveryOutcome {
            message_id: a.message_id,
            recipients,
        });
        let (message_id, had_entries) = (a.message_id, !a.entries.is_empty());
        queued.assignments.push(a);
        if let Err(e) = stored {
            state.unassign(&queued.assignments);
            builder.rollback(start);
            return Err(e);
        }
        if had_entries {
            state.cache(message_id, Arc::new(d.message), recipients as usize);
        }
        queued.receipts.extend(d.receipt.map(|key| SendAnswer {
            key,
            receipt: SendReceipt {
                message_id,
                recipients,
            },
        }));
    }
    Ok(queued)
}

/// The roster positions of the members that got no entry: the sender's
/// (`sender_at`), and those of the recipients at `skipped`, which count
/// the members but the sender.
fn member_positions(skipped: &[u32], sender_at: u32) -> Vec<u32> {
    let mut positions = Vec::with_capacity(skipped.len() + 1);
    let mut sender = Some(sender_at);
    for &r in skipped {
        let member = if r < sender_at { r } else { r + 1 };
        if let Some(at) = sender.filter(|at| *at < member) {
            positions.push(at);
            sender = None;
        }
        positions.push(member);
    }
    positions.extend(sender);
    positions
}

#[cfg(test)]
mod tests {
    use super::member_positions;

    #[test]
    fn skipped_members_are_placed_around_the_sender() {
        assert_eq!(member_positions(&[], 0), vec![0]);
        assert_eq!(member_positions(&[], 5), vec![5]);
        // Recipients 0 and 4 of members [r0 r1 S r2 r3 r4 ...].
        assert_eq!(member_positions(&[0, 4], 2), vec![0, 2, 5]);
        assert_eq!(member_positions(&[2, 3], 2), vec![2, 3, 4]);
        assert_eq!(member_positions(&[0, 1], 2), vec![0, 1, 2]);
    }
}
