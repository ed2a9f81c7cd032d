//! Delivery batches: the envelopes of many messages stored as one sled
//! value, so that the storage work of a write-path cycle does not grow with
//! the messages it carries.
//!
//! Every plain send a cycle accepts (a write set that changes nothing but
//! queues) joins the cycle's open batch, which is written as one key when
//! the cycle ends, or earlier when a job must see it applied first. A write
//! set that also changes other records (a commit, a proposal, a group's
//! deletion) stores its own messages as a batch inside its atomic write.
//! A batch is removed when no queue entry references any of its messages
//! (the queue index counts references per batch).
//!
//! Value: `[BATCH_FORMAT] ++ ([slot u32 BE] [len u32 BE] [envelope])*`, the
//! envelope being an [`Envelope`] record (the record codec's version byte
//! and bincode). Slots ascend but may skip (a message whose recipients all
//! deleted themselves is not stored). Reading one message walks the
//! lengths and decodes only its record.

use mls_ds_storage::codec::{decode_record, decode_record_head, encode_record_into};

use super::layout::{self, Envelope, EnvelopeRef, FanoutRef, Tree, MAX_SLOTS};
use crate::backend::error::StoreError;
use crate::backend::records::StoredMessage;

/// Version byte of a batch value.
const BATCH_FORMAT: u8 = 1;
/// A batch is written once it holds this many bytes, and the next plain
/// send starts a new one: no value grows past about this size plus one
/// write set's messages (one, for a plain send).
/// sled keeps values in its tree nodes, which split only beyond 16 keys,
/// and writes a node (or value) over 128 KiB as a separate blob file, with
/// a sync of its own: 16 batches of this size stay below that.
const MAX_BATCH_BYTES: usize = 6 * 1024;
/// Room a new batch starts with.
const INITIAL_BATCH_BYTES: usize = 8 * 1024;

/// A batch being filled.
pub(crate) struct BatchBuilder {
    number: u64,
    value: Vec<u8>,
    next_slot: u32,
}

impl BatchBuilder {
    /// An empty batch numbered `number`.
    pub(crate) fn new(number: u64) -> BatchBuilder {
        BatchBuilder {
            number,
            value: {
                let mut v = Vec::with_capacity(INITIAL_BATCH_BYTES);
                v.push(BATCH_FORMAT);
                v
            },
            next_slot: 0,
        }
    }

    /// The batch's number.
    pub(crate) fn number(&self) -> u64 {
        self.number
    }

    /// The id the next message gets.
    pub(crate) fn next_id(&self) -> u64 {
        layout::message_id(self.number, self.next_slot)
    }

    /// Whether the batch takes no more messages.
    pub(crate) fn is_full(&self) -> bool {
        self.value.len() >= MAX_BATCH_BYTES || self.next_slot >= MAX_SLOTS
    }

    /// Whether no message was stored in it.
    pub(crate) fn is_empty(&self) -> bool {
        self.value.len() == 1
    }

    /// Store the message that got [`BatchBuilder::next_id`] with its
    /// fan-out (`None`: nobody to deliver it to, nothing stored); the next
    /// message gets the next slot either way.
    pub(crate) fn push(
        &mut self,
        tree: Tree,
        fanout: Option<FanoutRef<'_>>,
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        let slot = self.next_slot;
        if let Some(fanout) = fanout {
            // Encoded in place; the length goes in front once known.
            let start = self.value.len();
            self.value.extend_from_slice(&slot.to_be_bytes());
            self.value.extend_from_slice(&[0; 4]);
            let body = self.value.len();
            let encoded =
                encode_record_into(tree.name, &EnvelopeRef { fanout, message }, &mut self.value);
            let len = self.value.len() - body;
            match (encoded, u32::try_from(len)) {
                (Ok(()), Ok(len)) => {
                    self.value[body - 4..body].copy_from_slice(&len.to_be_bytes());
                }
                (Err(e), _) => {
                    self.value.truncate(start);
                    return Err(e.into());
                }
                (_, Err(_)) => {
                    self.value.truncate(start);
                    return Err(StoreError::Corrupt(format!("a message of {len} bytes")));
                }
            }
        }
        self.next_slot += 1;
        Ok(())
    }

    /// Where the batch stands, to go back to with [`BatchBuilder::rollback`].
    pub(crate) fn mark(&self) -> BatchMark {
        BatchMark {
            len: self.value.len(),
            next_slot: self.next_slot,
        }
    }

    /// Forget the messages stored since `mark`.
    pub(crate) fn rollback(&mut self, mark: BatchMark) {
        self.value.truncate(mark.len);
        self.next_slot = mark.next_slot;
    }

    /// The value to store under [`layout::batch_key`].
    pub(crate) fn into_value(self) -> Vec<u8> {
        self.value
    }
}

/// A point to roll a [`BatchBuilder`] back to.
#[derive(Clone, Copy)]
pub(crate) struct BatchMark {
    len: usize,
    next_slot: u32,
}

/// The records of a batch value, in slot order.
pub(crate) fn records(value: &[u8]) -> Records<'_> {
    Records {
        rest: value,
        started: false,
    }
}

/// Iterator of [`records`]: `(slot, envelope record)`, or what is wrong
/// with the value.
pub(crate) struct Records<'a> {
    rest: &'a [u8],
    started: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(u32, &'a [u8]), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.started {
            self.started = true;
            match self.rest.split_first() {
                Some((&BATCH_FORMAT, rest)) => self.rest = rest,
                Some((v, _)) => {
                    self.rest = &[];
                    return Some(Err(format!("unknown batch format {v}")));
                }
                None => return Some(Err("empty batch value".into())),
            }
        }
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let (slot, rest) = self.rest.split_first_chunk::<4>()?;
            let (len, rest) = rest.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
            let (record, rest) = rest.split_at_checked(len)?;
            Some((u32::from_be_bytes(*slot), record, rest))
        })();
        match parsed {
            Some((slot, record, rest)) => {
                self.rest = rest;
                Some(Ok((slot, record)))
            }
            None => {
                self.rest = &[];
                Some(Err("batch value cut short".into()))
            }
        }
    }
}

/// Decode the envelope in `record` of batch `batch` (for error messages).
pub(crate) fn decode_envelope(
    tree: Tree,
    batch: u64,
    record: &[u8],
) -> Result<Envelope, StoreError> {
    Ok(decode_record(tree.name, &layout::batch_key(batch), record)?)
}

/// Decode only the fan-out at the start of the envelope in `record`.
pub(crate) fn decode_fanout<'a>(
    tree: Tree,
    batch: u64,
    record: &'a [u8],
) -> Result<layout::FanoutView<'a>, StoreError> {
    Ok(decode_record_head(
        tree.name,
        &layout::batch_key(batch),
        record,
    )?)
}

/// The message of `slot` in a batch value, if it is there.
pub(crate) fn find(
    tree: Tree,
    batch: u64,
    value: &[u8],
    slot: u32,
) -> Result<Option<StoredMessage>, StoreError> {
    for record in records(value) {
        let (s, bytes) = record.map_err(|e| corrupt(batch, &e))?;
        if s == slot {
            return Ok(Some(decode_envelope(tree, batch, bytes)?.message));
        }
        if s > slot {
            break;
        }
    }
    Ok(None)
}

/// The error for a batch value that does not parse.
pub(crate) fn corrupt(batch: u64, what: &str) -> StoreError {
    StoreError::Corrupt(format!("delivery batch {batch}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mls_ds_storage::{Durability, Store, StoreConfig};

    fn message(body: &[u8]) -> StoredMessage {
        StoredMessage {
            kind: 1,
            group_id: b"g".to_vec(),
            epoch: 0,
            sender: b"s".to_vec(),
            message: body.to_vec(),
            stored_ms: 5,
            send: None,
            ratchet_tree: Vec::new(),
        }
    }

    #[test]
    fn messages_are_found_by_slot_and_skipped_slots_are_absent() {
        let store = Store::temporary(StoreConfig {
            durability: Durability::Batched,
            ..StoreConfig::default()
        })
        .unwrap();
        let tree = layout::Layout::on(store).unwrap().trees.delivery;
        let entries = [(mls_ds_protocol::ClientId::new("a").unwrap(), 1)];
        let fanout = FanoutRef {
            stored_ms: 5,
            entries: &entries,
            roster: None,
        };
        let mut b = BatchBuilder::new(9);
        assert!(b.is_empty());
        assert_eq!(b.next_id(), layout::message_id(9, 0));
        b.push(tree, Some(fanout), &message(b"zero")).unwrap();
        b.push(tree, None, &message(b"nobody")).unwrap();
        let fanout = FanoutRef {
            stored_ms: 5,
            entries: &entries,
            roster: None,
        };
        b.push(tree, Some(fanout), &message(b"two")).unwrap();
        assert_eq!(b.next_id(), layout::message_id(9, 3));
        let value = b.into_value();
        let slots: Vec<u32> = records(&value).map(|r| r.unwrap().0).collect();
        assert_eq!(slots, vec![0, 2]);
        assert_eq!(
            find(tree, 9, &value, 2).unwrap().unwrap().message,
            b"two".to_vec()
        );
        assert_eq!(find(tree, 9, &value, 1).unwrap(), None);
        assert!(find(tree, 9, &value[..value.len() - 1], 2).is_err());
        assert!(records(&[7]).next().unwrap().is_err());
    }
}
