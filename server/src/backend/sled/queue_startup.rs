//! Rebuilding the queue index from disk at startup, and the same pass as an
//! integrity check for `mls-ds check`. A start reads the index's checkpoint
//! instead (`checkpoint.rs`) if there is one, and brings it up to date from
//! the marks and the batches written since.
//!
//! Every envelope's fan-out (in the delivery batches) says which queues
//! hold the message at which sequence number, or (a big group's) which
//! roster's members hold it at the next sequence number of their queues;
//! the ack marks say how far each queue is acknowledged, and the id of the
//! message there, so that a fan-out by roster skips the entries at or
//! below it; the client records say who deleted itself.
//! A queue must be gap-free after its mark; a batch that no queue entry
//! references any more (a crash between an acknowledgement's mark and the
//! removal it allowed), or one kept for the send receipts it holds
//! (`receipts.rs`), is an orphan: the caller deletes it or leaves it to
//! the next freeze of the receipts.
//!
//! Startup decodes only each envelope's fan-out, in place; `check` decodes
//! every envelope whole.

use std::collections::HashMap;

use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::decode_record;

use super::batch;
use super::checkpoint;
use super::layout::{self, Layout, Mark, ACK_PREFIX};
use super::queue_index::{BatchMeta, ClientQueue, IndexState};
use super::rosters::{RosterReader, Rosters};
use crate::backend::error::StoreError;
use crate::backend::records::ClientRecord;

/// How much of each envelope the scan decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decode {
    /// The fan-out only (startup).
    Fanout,
    /// Everything, so that a damaged message is found (`check`).
    Whole,
}

/// Where a start took the index from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The checkpoint of the last clean stop.
    Checkpoint,
    /// Every stored batch.
    Batches,
}

/// The index as rebuilt from disk.
pub(crate) struct Loaded {
    pub(crate) state: IndexState,
    pub(crate) source: Source,
    /// Batches whose every queue entry is acknowledged: safe to delete.
    pub(crate) orphans: Vec<u64>,
    /// Envelopes read.
    pub(crate) envelopes: usize,
}

/// Call `f` with every stored batch numbered `first` or more, in number
/// order, reading each in place (a scan holds one batch at a time).
pub(crate) fn for_each_batch(
    layout: &Layout,
    first: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    layout.storage.for_each_raw(
        layout.trees.delivery.handle,
        &layout::batch_key(first),
        &layout::batch_key(u64::MAX),
        |k, v| {
            let number = layout::key_id(k).ok_or_else(|| {
                StoreError::Corrupt(format!("batch key {} is too short", hex::encode(k)))
            })?;
            f(number, v)
        },
    )
}

/// The queues' acknowledgement marks, and every client that deleted itself.
pub(crate) fn queues_at_start(
    layout: &Layout,
) -> Result<HashMap<ClientId, ClientQueue>, StoreError> {
    let s = &layout.storage;
    let delivery = layout.trees.delivery;
    let mut clients = HashMap::new();
    for (k, v) in s.scan_raw(delivery.handle, &[ACK_PREFIX])? {
        let id = ClientId::new(k.get(2..).unwrap_or_default())
            .map_err(|e| StoreError::Corrupt(format!("ack mark key {}: {e}", hex::encode(&k))))?;
        let mark = Mark::from_bytes(&v).ok_or_else(|| {
            StoreError::Corrupt(format!("ack mark of {id} holds {} bytes", v.len()))
        })?;
        layout::stored_batch(layout::batch_of(mark.id), &format!("the ack mark of {id}"))?;
        clients.insert(id, ClientQueue::new(mark));
    }
    let tree = layout.trees.clients;
    for (k, v) in s.scan_raw(tree.handle, b"")? {
        let record: ClientRecord = decode_record(tree.name, &k, &v)?;
        if record.is_deleted() {
            let id = ClientId::new(&k)
                .map_err(|e| StoreError::Corrupt(format!("client record key: {e}")))?;
            clients
                .entry(id)
                .or_insert_with(|| ClientQueue::new(Mark::default()))
                .deleted = true;
        }
    }
    Ok(clients)
}

/// What [`replay`] found in the batches it read.
struct Replayed {
    /// Batches that queue entries reference, in number order.
    batches: Vec<(u64, BatchMeta)>,
    /// Batches no queue entry references.
    orphans: Vec<u64>,
    envelopes: usize,
}

/// Add the entries of every batch numbered `first` or more to `state`'s
/// queues (each queue's mark set already): an entry at or below its
/// queue's mark is skipped, any other must be the queue's next. Fails on
/// a gap, or with [`Decode::Whole`] on any envelope that does not decode.
fn replay(
    layout: &Layout,
    state: &mut IndexState,
    first: u64,
    decode: Decode,
) -> Result<Replayed, StoreError> {
    let mut replayed = Replayed {
        batches: Vec::new(),
        orphans: Vec::new(),
        envelopes: 0,
    };
    let tree = layout.trees.delivery;
    let mut rosters = RosterReader::default();
    for_each_batch(layout, first, |number, value| {
        let number = layout::stored_batch(number, "a batch key")?;
        state.next_batch = state.next_batch.max(number + 1);
        let mut meta = BatchMeta {
            refs: 0,
            messages: 0,
            stored_ms: 0,
        };
        for record in batch::records(value) {
            let (slot, bytes) = record.map_err(|e| batch::corrupt(number, &e))?;
            if decode == Decode::Whole {
                batch::decode_envelope(tree, number, bytes)?;
            }
            let fanout = batch::decode_fanout(tree, number, bytes)?;
            let id = layout::message_id(number, slot);
            replayed.envelopes += 1;
            if meta.messages == 0 {
                meta.stored_ms = fanout.stored_ms;
            }
            meta.messages += 1;
            if let Some(roster) = &fanout.roster {
                for client in rosters.recipients(layout, roster)? {
                    let cq = match state.clients.get_mut(client) {
                        Some(cq) => cq,
                        None => state.client(client),
                    };
                    if id <= cq.acked_id {
                        continue;
                    }
                    cq.ids.push_back(id);
                    meta.refs += 1;
                }
            }
            for (client, seq) in fanout.entries {
                // Looked up by its bytes: an id is built (and checked) only
                // for a queue not seen yet, not for each of its entries.
                let cq = match state.clients.get_mut(client) {
                    Some(cq) => cq,
                    None => state.client(&ClientId::new(client).map_err(|e| {
                        StoreError::Corrupt(format!("message {id} names a bad client: {e}"))
                    })?),
                };
                if seq <= cq.acked {
                    continue;
                }
                if seq != cq.next_seq() {
                    let client = String::from_utf8_lossy(client);
                    return Err(StoreError::Corrupt(format!(
                        "queue of {client} has a gap: message {id} is at sequence number {seq}, expected {}",
                        cq.next_seq()
                    )));
                }
                cq.ids.push_back(id);
                meta.refs += 1;
            }
        }
        if meta.refs == 0 {
            replayed.orphans.push(number);
        } else {
            replayed.batches.push((number, meta));
        }
        Ok(())
    })?;
    Ok(replayed)
}

/// Rebuild the index from the stored fan-outs, ack marks and client
/// records. Fails on a queue with a gap, or with [`Decode::Whole`] on any
/// envelope that does not decode.
pub(crate) fn load(layout: &Layout, decode: Decode) -> Result<Loaded, StoreError> {
    let mut state = IndexState::new(queues_at_start(layout)?, 1);
    let replayed = replay(layout, &mut state, 0, decode)?;
    // Built at once: a map built from sorted entries fills its nodes,
    // where one insert after another leaves them half full.
    state.batches = replayed.batches.into_iter().collect();
    finish(
        layout,
        state,
        Source::Batches,
        replayed.orphans,
        replayed.envelopes,
    )
}

/// Every entry of a loaded index is durable; every stored roster is
/// retired. Batches are numbered on past every one a mark or a roster
/// names, stored or not: a message id never goes back below a queue's
/// mark, which a fan-out by roster relies on.
fn finish(
    layout: &Layout,
    mut state: IndexState,
    source: Source,
    orphans: Vec<u64>,
    envelopes: usize,
) -> Result<Loaded, StoreError> {
    let mut floor = state.next_batch;
    for cq in state.clients.values_mut() {
        cq.visible = cq.next_seq() - 1;
        floor = floor.max(layout::batch_of(cq.acked_id).saturating_add(1));
    }
    state.next_batch = floor;
    state.rosters = Rosters::at_start(layout, state.next_batch)?;
    state.next_batch = state.next_batch.max(state.rosters.batch_floor());
    Ok(Loaded {
        state,
        source,
        orphans,
        envelopes,
    })
}

/// The index from the checkpoint (`state`) brought up to date: every queue
/// acknowledged up to its mark on disk (which frees the batches whose
/// last entry that takes), deletions applied, then the batches written
/// since it replayed. `Ok(Err(why))` if the database cannot have followed
/// from it (a mark below the checkpoint's, a deletion undone, a gap).
fn from_checkpoint(
    layout: &Layout,
    mut state: IndexState,
) -> Result<Result<Loaded, String>, StoreError> {
    let on_disk = queues_at_start(layout)?;
    for (id, held) in &state.clients {
        let (mark, deleted) = on_disk.get(id).map_or((0, false), |q| (q.acked, q.deleted));
        if mark < held.acked || (held.deleted && !deleted) {
            return Ok(Err(format!(
                "client {id} is acknowledged up to {mark} (deleted: {deleted}) on disk, up to {} \
                 (deleted: {}) in the checkpoint",
                held.acked, held.deleted
            )));
        }
    }
    let mut freed = Vec::new();
    for (id, q) in &on_disk {
        freed.extend(state.catch_up(id, q.mark(), q.deleted));
    }
    let first = state.next_batch;
    let replayed = match replay(layout, &mut state, first, Decode::Fanout) {
        Ok(replayed) => replayed,
        Err(StoreError::Corrupt(why)) => return Ok(Err(why)),
        Err(e) => return Err(e),
    };
    state.batches.extend(replayed.batches);
    // Most batches the marks freed were removed after them; one whose
    // removal a crash lost is still stored, an orphan.
    let mut orphans = replayed.orphans;
    let delivery = layout.trees.delivery;
    for batch in freed {
        if layout.contains(delivery, &layout::batch_key(batch))? {
            orphans.push(batch);
        }
    }
    finish(
        layout,
        state,
        Source::Checkpoint,
        orphans,
        replayed.envelopes,
    )
    .map(Ok)
}

/// The index for a start: the checkpoint brought up to date if there is a
/// usable one, else rebuilt from every batch ([`load`]), the unusable
/// checkpoint removed first.
pub(crate) fn start(layout: &Layout) -> Result<Loaded, StoreError> {
    let why = match checkpoint::read(layout)? {
        checkpoint::Found::Absent => return load(layout, Decode::Fanout),
        checkpoint::Found::Unusable(why) => why,
        checkpoint::Found::Index(state) => match from_checkpoint(layout, *state)? {
            Ok(loaded) => return Ok(loaded),
            Err(why) => why,
        },
    };
    tracing::warn!(
        reason = %why,
        "the queue index checkpoint is not used; rebuilding the index from every stored message"
    );
    checkpoint::discard(layout)?;
    load(layout, Decode::Fanout)
}

/// What is wrong with the index a start would take from the checkpoint,
/// against `scanned`, the index rebuilt from every batch.
fn checkpoint_problem(layout: &Layout, scanned: &IndexState) -> Option<String> {
    let unusable = |why: &str| {
        Some(format!(
            "the queue index checkpoint cannot be used ({why}); the next start reads every \
             stored message"
        ))
    };
    match checkpoint::read(layout) {
        Err(e) => unusable(&e.to_string()),
        Ok(checkpoint::Found::Absent) => None,
        Ok(checkpoint::Found::Unusable(why)) => unusable(&why),
        Ok(checkpoint::Found::Index(state)) => match from_checkpoint(layout, *state) {
            Err(e) => unusable(&e.to_string()),
            Ok(Err(why)) => unusable(&why),
            Ok(Ok(loaded)) => checkpoint::differences(scanned, &loaded.state),
        },
    }
}

/// What [`verify`] found in the delivery tree.
pub(crate) struct QueueReport {
    /// Unacknowledged queue entries.
    pub(crate) entries: u64,
    /// Stored messages.
    pub(crate) messages: usize,
    /// Everything wrong.
    pub(crate) problems: Vec<String>,
}

/// Whether [`verify`] compares the index a start would take from the
/// checkpoint with the full rebuild: only with the server stopped, where
/// both reads see one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Serving {
    Stopped,
    Running,
}

/// Integrity check of the delivery tree: every envelope and ack mark
/// decodes, every queue is gap-free, and (with the server stopped) the
/// index a start would take from the checkpoint is what the batches say.
/// Leftovers a crash can cause (orphans, which the next start deletes) are
/// not problems.
pub(crate) fn verify(layout: &Layout, serving: Serving) -> QueueReport {
    match load(layout, Decode::Whole) {
        Ok(loaded) => QueueReport {
            entries: loaded.state.entries(),
            messages: loaded.envelopes,
            problems: match serving {
                Serving::Stopped => checkpoint_problem(layout, &loaded.state)
                    .into_iter()
                    .collect(),
                Serving::Running => Vec::new(),
            },
        },
        Err(e) => QueueReport {
            entries: 0,
            messages: 0,
            problems: vec![e.to_string()],
        },
    }
}
