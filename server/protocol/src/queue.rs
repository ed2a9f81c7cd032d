//! Per-client queues: fetching pages and acknowledging.

use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLByteSlice, VLBytes};

/// What a queue entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum EntryKind {
    /// An application message or proposal of a group.
    Message = 1,
    /// A commit of a group (accepted by the DS for its epoch).
    Commit = 2,
    /// A Welcome addressed to this client.
    Welcome = 3,
    /// The group was deleted (by its last member or by the DS's operator);
    /// `message` is empty. Nothing of the group follows it.
    GroupDeleted = 4,
}

/// One entry of a client's queue.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct QueueEntry {
    /// Per-client sequence number: strictly increasing, without gaps.
    pub seq: u64,
    /// What the entry is.
    pub kind: EntryKind,
    /// Group the message belongs to.
    pub group_id: VLBytes,
    /// Epoch the message belongs to: the epoch of its framing for messages
    /// and commits, the new epoch for Welcomes.
    pub epoch: u64,
    /// Sender's client id (as the DS authenticated it).
    pub sender: VLBytes,
    /// The `MLSMessage`.
    pub message: VLBytes,
    /// For a Welcome: the TLS-encoded `RatchetTree` of the epoch it welcomes
    /// to, exported by the DS from its own `PublicGroup`, so that neither the
    /// Welcome nor the GroupInfo of a commit has to carry the tree (groups
    /// keep OpenMLS's ratchet-tree extension off). Empty for other entries.
    pub ratchet_tree: VLBytes,
}

/// Response of `GET /v1/queue`: a page of entries in sequence order.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct QueuePage {
    /// Entries with `seq > after`, at most `limit` of them and about `max_bytes`.
    pub entries: Vec<QueueEntry>,
    /// Highest sequence number that is durable and visible for this client
    /// (0: none yet).
    pub head: u64,
    /// Entries below this were acknowledged (and deleted) already.
    pub acked: u64,
}

/// [`QueueEntry`] borrowing its byte strings, for encoding only: the same
/// fields in the same order, so the same bytes on the wire. A server encodes
/// pages from the messages it holds without copying each body first.
#[derive(Debug, TlsSerialize, TlsSize)]
pub struct QueueEntryRef<'a> {
    /// As [`QueueEntry::seq`].
    pub seq: u64,
    /// As [`QueueEntry::kind`].
    pub kind: EntryKind,
    /// As [`QueueEntry::group_id`].
    pub group_id: VLByteSlice<'a>,
    /// As [`QueueEntry::epoch`].
    pub epoch: u64,
    /// As [`QueueEntry::sender`].
    pub sender: VLByteSlice<'a>,
    /// As [`QueueEntry::message`].
    pub message: VLByteSlice<'a>,
    /// As [`QueueEntry::ratchet_tree`].
    pub ratchet_tree: VLByteSlice<'a>,
}

/// [`QueuePage`] of [`QueueEntryRef`]s: encodes to the bytes of the
/// `QueuePage` with the same contents, and decodes as a `QueuePage`.
#[derive(Debug, TlsSerialize, TlsSize)]
pub struct QueuePageRef<'a> {
    /// As [`QueuePage::entries`].
    pub entries: Vec<QueueEntryRef<'a>>,
    /// As [`QueuePage::head`].
    pub head: u64,
    /// As [`QueuePage::acked`].
    pub acked: u64,
}

/// `POST /v1/queue/ack`: delete every entry with `seq <= up_to`.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct Ack {
    /// Highest sequence number processed.
    pub up_to: u64,
}

/// Response of an acknowledgement.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct Acked {
    /// Highest acknowledged sequence number now.
    pub acked: u64,
    /// Entries still in the queue.
    pub remaining: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    /// The borrowing page must stay byte-for-byte the owned one.
    #[test]
    fn borrowed_page_encodes_as_the_owned_page() {
        let owned = QueuePage {
            entries: vec![
                QueueEntry {
                    seq: 7,
                    kind: EntryKind::Commit,
                    group_id: b"group".to_vec().into(),
                    epoch: 3,
                    sender: b"alice".to_vec().into(),
                    message: vec![0xab; 300].into(),
                    ratchet_tree: Vec::new().into(),
                },
                QueueEntry {
                    seq: 8,
                    kind: EntryKind::Welcome,
                    group_id: Vec::new().into(),
                    epoch: u64::MAX,
                    sender: b"b".to_vec().into(),
                    message: vec![1, 2, 3].into(),
                    ratchet_tree: vec![4; 70].into(),
                },
            ],
            head: 9,
            acked: 6,
        };
        let borrowed = QueuePageRef {
            entries: owned
                .entries
                .iter()
                .map(|e| QueueEntryRef {
                    seq: e.seq,
                    kind: e.kind,
                    group_id: VLByteSlice(e.group_id.as_slice()),
                    epoch: e.epoch,
                    sender: VLByteSlice(e.sender.as_slice()),
                    message: VLByteSlice(e.message.as_slice()),
                    ratchet_tree: VLByteSlice(e.ratchet_tree.as_slice()),
                })
                .collect(),
            head: owned.head,
            acked: owned.acked,
        };
        let bytes = encode(&borrowed).unwrap();
        assert_eq!(bytes, encode(&owned).unwrap());
        assert_eq!(decode::<QueuePage>(&bytes).unwrap(), owned);
        let empty = QueuePageRef {
            entries: Vec::new(),
            head: 0,
            acked: 0,
        };
        assert_eq!(
            encode(&empty).unwrap(),
            encode(&QueuePage {
                entries: Vec::new(),
                head: 0,
                acked: 0
            })
            .unwrap()
        );
    }
}
