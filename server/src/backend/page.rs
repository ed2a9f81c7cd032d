//! A page of a client's queue as a backend reads it, and its encoding for
//! the wire: the entries borrow the stored messages, so a fetch copies each
//! body once, into the response.

use std::sync::Arc;

use mls_ds_protocol::queue::{EntryKind, QueueEntryRef, QueuePageRef};
use tls_codec::VLByteSlice;

use super::records::StoredMessage;

/// A page read from a client's queue.
pub(crate) struct Page {
    /// Entries in sequence order.
    pub(crate) entries: Vec<PageEntry>,
    /// Highest visible sequence number.
    pub(crate) head: u64,
    /// Acknowledged up to here.
    pub(crate) acked: u64,
}

/// One entry of a [`Page`].
pub(crate) struct PageEntry {
    /// Sequence number in the client's queue.
    pub(crate) seq: u64,
    /// The stored message's kind, checked when the page was read.
    pub(crate) kind: EntryKind,
    /// The stored message (shared with the backend's cache, if it has one).
    pub(crate) stored: Arc<StoredMessage>,
}

impl Page {
    /// The response body's value, borrowing every byte string from the
    /// stored messages.
    pub(crate) fn wire(&self) -> QueuePageRef<'_> {
        QueuePageRef {
            entries: self
                .entries
                .iter()
                .map(|e| QueueEntryRef {
                    seq: e.seq,
                    kind: e.kind,
                    group_id: VLByteSlice(&e.stored.group_id),
                    epoch: e.stored.epoch,
                    sender: VLByteSlice(&e.stored.sender),
                    message: VLByteSlice(&e.stored.message),
                    ratchet_tree: VLByteSlice(&e.stored.ratchet_tree),
                })
                .collect(),
            head: self.head,
            acked: self.acked,
        }
    }
}

/// Bytes an entry counts against a page's byte bound.
pub(crate) fn entry_size(m: &StoredMessage) -> usize {
    m.message.len() + m.ratchet_tree.len() + m.group_id.len() + m.sender.len() + 64
}
