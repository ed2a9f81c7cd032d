//! Per-client queues: fetching pages and acknowledging.

use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

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
