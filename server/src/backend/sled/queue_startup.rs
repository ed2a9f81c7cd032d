//! Rebuilding the queue index from disk at startup, and the same pass as an
//! integrity check for `mls-ds check`. A start after a clean stop reads the
//! index's checkpoint instead (`checkpoint.rs`), if it agrees with the
//! database.
//!
//! Every envelope's fan-out (in the delivery batches) says which queues
//! hold the message at which sequence number; the ack marks say how far
//! each queue is acknowledged; the client records say who deleted itself.
//! A queue must be gap-free after its mark; a batch that no queue entry
//! references any more (a crash between an acknowledgement's mark and the
//! removal it allowed) is an orphan, deleted at startup. A message sent
//! with a send id whose receipt a crash lost (receipts are written right
//! after their batch) gets it back from its envelope.
//!
//! Startup decodes only each envelope's fan-out, in place; `check` decodes
//! every envelope whole. Lost receipts are looked for only in the last
//! [`RECEIPT_TAIL`] batches: sled recovers a prefix of its log, and a
//! batch's receipts are written right after it and before any later batch,
//! so a crash can have lost only receipts of the last batches written.
//! (Older messages' receipts may be gone for a reason: the deduplication
//! window prunes them.)

use std::collections::HashMap;

use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::decode_record;

use super::batch;
use super::checkpoint;
use super::layout::{self, Layout, ACK_PREFIX};
use super::queue_index::{BatchMeta, ClientQueue, IndexState};
use crate::backend::error::StoreError;
use crate::backend::records::{ClientRecord, SendKey, SendReceipt};
use mls_ds_protocol::groups::SendId;

/// The newest batches whose messages' receipts are checked at startup: one
/// would do (see the module documentation); more cost nothing.
const RECEIPT_TAIL: u64 = 256;

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
    /// Receipts of stored messages sent with a send id that a crash lost
    /// (a receipt is written right after its envelope), to restore.
    pub(crate) lost_receipts: Vec<StartupReceipt>,
}

/// Call `f` with every stored batch numbered `first` or more, in number
/// order, reading each in place (a scan holds one batch at a time).
fn for_each_batch(
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
        let mark = layout::be_u64(&v).ok_or_else(|| {
            StoreError::Corrupt(format!("ack mark of {id} holds {} bytes", v.len()))
        })?;
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
                .or_insert_with(|| ClientQueue::new(0))
                .deleted = true;
        }
    }
    Ok(clients)
}

/// A send's receipt as its envelope tells it.
pub(crate) struct StartupReceipt {
    pub(crate) key: SendKey,
    pub(crate) receipt: SendReceipt,
}

/// Rebuild the index from the stored fan-outs, ack marks and client
/// records. Fails on a queue with a gap, or with [`Decode::Whole`] on any
/// envelope that does not decode.
pub(crate) fn load(layout: &Layout, decode: Decode) -> Result<Loaded, StoreError> {
    let mut state = IndexState::new(queues_at_start(layout)?, 1);
    let mut orphans = Vec::new();
    let mut envelopes = 0;
    // Collected, then built at once: a map built from sorted entries fills
    // its nodes, where one insert after another leaves them half full.
    let mut batches = Vec::new();
    let tree = layout.trees.delivery;
    for_each_batch(layout, 0, |number, value| {
        state.next_batch = state.next_batch.max(number.saturating_add(1));
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
            envelopes += 1;
            if meta.messages == 0 {
                meta.stored_ms = fanout.stored_ms;
            }
            meta.messages += 1;
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
            orphans.push(number);
        } else {
            batches.push((number, meta));
        }
        Ok(())
    })?;
    state.batches = batches.into_iter().collect();
    for cq in state.clients.values_mut() {
        cq.visible = cq.next_seq() - 1;
    }
    let lost_receipts = lost_receipts(layout, state.next_batch.saturating_sub(RECEIPT_TAIL))?;
    Ok(Loaded {
        state,
        source: Source::Batches,
        orphans,
        envelopes,
        lost_receipts,
    })
}

/// The index for a start: the checkpoint if there is a usable one, else
/// rebuilt from the batches ([`load`]). The caller removes the checkpoint
/// before it writes anything.
pub(crate) fn start(layout: &Layout) -> Result<Loaded, StoreError> {
    match checkpoint::read(layout)? {
        checkpoint::Found::Index(state) => {
            // A clean stop lost no receipt, but the tail costs little to
            // look at and keeps one rule for every start.
            let lost_receipts =
                lost_receipts(layout, state.next_batch.saturating_sub(RECEIPT_TAIL))?;
            Ok(Loaded {
                state: *state,
                source: Source::Checkpoint,
                orphans: Vec::new(),
                envelopes: 0,
                lost_receipts,
            })
        }
        checkpoint::Found::Unusable(why) => {
            tracing::warn!(
                reason = %why,
                "the queue index checkpoint is not used; rebuilding the index from the stored messages"
            );
            load(layout, Decode::Fanout)
        }
        checkpoint::Found::Absent => load(layout, Decode::Fanout),
    }
}

/// The receipts missing for messages of batches numbered `first` or more
/// that were sent with a send id.
fn lost_receipts(layout: &Layout, first: u64) -> Result<Vec<StartupReceipt>, StoreError> {
    let tree = layout.trees.delivery;
    let mut lost = Vec::new();
    for_each_batch(layout, first, |number, value| {
        for record in batch::records(value) {
            let (slot, bytes) = record.map_err(|e| batch::corrupt(number, &e))?;
            let envelope = batch::decode_envelope(tree, number, bytes)?;
            let Some(send) = envelope.message.send else {
                continue;
            };
            let id = layout::message_id(number, slot);
            let sender = ClientId::new(&envelope.message.sender).map_err(|e| {
                StoreError::Corrupt(format!("message {id} names a bad sender: {e}"))
            })?;
            let key = SendKey {
                sender,
                id: SendId {
                    created_ms: send.created_ms,
                    nonce: send.nonce,
                },
            };
            if !layout.contains(layout.trees.sends, &layout::send_key(&key))? {
                lost.push(StartupReceipt {
                    key,
                    receipt: SendReceipt {
                        message_id: id,
                        recipients: u32::try_from(envelope.fanout.entries.len())
                            .unwrap_or(u32::MAX),
                    },
                });
            }
        }
        Ok(())
    })?;
    Ok(lost)
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

/// Integrity check of the delivery tree: every envelope and ack mark
/// decodes, every queue is gap-free, and a checkpoint of the index, if
/// there is one, holds what the batches say. Leftovers a crash can cause
/// (orphans, which the next start deletes) are not problems.
pub(crate) fn verify(layout: &Layout) -> QueueReport {
    match load(layout, Decode::Whole) {
        Ok(loaded) => QueueReport {
            entries: loaded
                .state
                .clients
                .values()
                .map(|c| c.ids.len() as u64)
                .sum(),
            messages: loaded.envelopes,
            problems: match checkpoint::compare(layout, &loaded.state) {
                Ok(found) => found.into_iter().collect(),
                Err(e) => vec![format!("reading the queue index checkpoint: {e}")],
            },
        },
        Err(e) => QueueReport {
            entries: 0,
            messages: 0,
            problems: vec![e.to_string()],
        },
    }
}
