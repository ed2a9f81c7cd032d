//! The SDK's own records, stored next to the OpenMLS state in the same sled
//! database so that they join its atomic writes.
//!
//! | key (tree `app.sdk`) | value |
//! | --- | --- |
//! | `identity` | [`Identity`] |
//! | `cursor` | highest DS queue sequence number processed (u64 BE) |
//! | `group/<gid>` | [`GroupMeta`] (the list of groups) |
//! | `outbox/<gid>` | [`Outbox`]: a commit sent (or about to be sent) but not yet resolved |
//! | `inbox/<seq u64 BE>` | [`Event`] of a DS entry, not yet taken by the application |
//! | `inbox/<seq u64 BE> 01 <n u64 BE>` | [`Event`] of the SDK's own (a gap, a resync) noticed after entry `seq`, the `n`-th ever filed |
//! | `local-events` | how many events of the SDK's own were filed (u64 BE) |
//! | `suspect/<gid>` | [`Suspect`]: a group this client may have fallen out of, to check and repair |
//! | `last-resort` | [`LastResort`]: the last-resort key package on the DS |
//! | `retired/<KeyPackageRef>` | [`Retired`]: a replaced last resort whose private key is still kept |
//! | `send/<n u64 BE>` | [`PendingSend`]: an application message in the send outbox, in queue order |

/// Who this client is.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct Identity {
    /// Client id (also the MLS BasicCredential identity).
    pub(crate) client_id: Vec<u8>,
    /// Signature scheme code point.
    pub(crate) signature_scheme: u16,
    /// Public signature key (the private key is in OpenMLS storage).
    pub(crate) public_key: Vec<u8>,
}

/// A group this client is in.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct GroupMeta {
    /// Whether the group was created open (external joins allowed).
    pub(crate) open: bool,
}

/// The last-resort key package this client published last.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct LastResort {
    /// Its `KeyPackageRef`, TLS-encoded (where OpenMLS keeps its private
    /// keys).
    pub(crate) hash_ref: Vec<u8>,
}

/// A replaced last-resort key package, whose private key is deleted some
/// time after `retired_at` (Unix seconds).
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct Retired {
    pub(crate) retired_at: u64,
}

/// An application message in the send outbox: encrypted (in the write that
/// used up its ratchet state), with its send id, until the DS accepts it.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct PendingSend {
    pub(crate) group_id: Vec<u8>,
    /// Send id: creation time (Unix ms).
    pub(crate) created_ms: u64,
    /// Send id: random part.
    pub(crate) nonce: u64,
    /// The plaintext, to encrypt again if the DS no longer takes the epoch.
    pub(crate) data: Vec<u8>,
    /// `MLSMessage` bytes as sent.
    pub(crate) message: Vec<u8>,
    /// Why the DS refused it for good, if it did.
    pub(crate) failed: Option<String>,
}

impl PendingSend {
    pub(crate) fn send_id(&self) -> mls_ds_protocol::groups::SendId {
        mls_ds_protocol::groups::SendId {
            created_ms: self.created_ms,
            nonce: self.nonce,
        }
    }
}

/// What an unresolved commit was for.
#[derive(bincode::Encode, bincode::Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutboxKind {
    /// A commit on an existing group (pending in OpenMLS until resolved).
    Commit,
    /// An external commit: the group was created locally already.
    ExternalJoin,
}

/// A commit bundle stored before it is sent, so that a crash between sending
/// and merging is resolved on reopen by resending it (the DS answers a retry
/// of an accepted commit with the original success).
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct Outbox {
    /// Kind of commit.
    pub(crate) kind: OutboxKind,
    /// `MLSMessage` of the commit.
    pub(crate) commit: Vec<u8>,
    /// `MLSMessage` of the Welcome, if any.
    pub(crate) welcome: Option<Vec<u8>>,
    /// `MLSMessage` of the new epoch's GroupInfo.
    pub(crate) group_info: Vec<u8>,
}

/// Something the application should learn about, in DS order.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub enum Event {
    /// An application message.
    Message {
        /// DS queue sequence number (unique, increasing).
        seq: u64,
        /// Group id.
        group_id: Vec<u8>,
        /// Sender's client id.
        sender: Vec<u8>,
        /// Plaintext.
        data: Vec<u8>,
    },
    /// This client joined a group from a Welcome.
    Joined {
        /// DS queue sequence number.
        seq: u64,
        /// Group id.
        group_id: Vec<u8>,
        /// Who added it (client id).
        by: Vec<u8>,
    },
    /// A commit by another member was merged.
    Commit {
        /// DS queue sequence number.
        seq: u64,
        /// Group id.
        group_id: Vec<u8>,
        /// New epoch.
        epoch: u64,
        /// Who committed (client id); for a join by external commit, the
        /// client that joined.
        committer: Vec<u8>,
        /// Clients it added (or that joined by it).
        added: Vec<Vec<u8>>,
        /// Clients it removed (a client rejoining replaces its own leaf:
        /// then it is in both lists).
        removed: Vec<Vec<u8>>,
    },
    /// This client was removed from a group.
    Removed {
        /// DS queue sequence number.
        seq: u64,
        /// Group id.
        group_id: Vec<u8>,
    },
    /// The group was deleted (by its last member or by the DS's operator);
    /// its local state is gone.
    GroupDeleted {
        /// DS queue sequence number.
        seq: u64,
        /// Group id.
        group_id: Vec<u8>,
    },
    /// Entries of this client's queue were gone before it read them (the
    /// DS's retention bound or queue limit, or another device of the same
    /// client acknowledging them): their messages are lost to it. Groups it
    /// fell behind in are repaired ([`Event::Resynced`]).
    QueueGap {
        /// DS queue sequence number of the last entry lost.
        seq: u64,
        /// The first entry lost.
        from: u64,
    },
    /// This client had fallen out of the group (a lost commit, a commit it
    /// could not process, a state it could not load) and rejoined it by
    /// external commit, replacing its own leaf. Messages of the epochs in
    /// between are lost to it.
    Resynced {
        /// DS queue sequence number after which it was noticed.
        seq: u64,
        /// Group id.
        group_id: Vec<u8>,
        /// The epoch this client was at (0: unknown).
        from_epoch: u64,
        /// The epoch it rejoined at.
        to_epoch: u64,
        /// What made it rejoin.
        reason: String,
    },
    /// A queue entry could not be processed (e.g. a duplicate or a message
    /// for an epoch this client no longer has keys for); it was skipped.
    Skipped {
        /// DS queue sequence number.
        seq: u64,
        /// Group id.
        group_id: Vec<u8>,
        /// Why.
        reason: String,
    },
}

impl Event {
    /// The DS sequence number of the entry that produced the event.
    pub fn seq(&self) -> u64 {
        match self {
            Event::Message { seq, .. }
            | Event::Joined { seq, .. }
            | Event::Commit { seq, .. }
            | Event::Removed { seq, .. }
            | Event::GroupDeleted { seq, .. }
            | Event::QueueGap { seq, .. }
            | Event::Resynced { seq, .. }
            | Event::Skipped { seq, .. } => *seq,
        }
    }
}

pub(crate) const IDENTITY: &[u8] = b"identity";
pub(crate) const CURSOR: &[u8] = b"cursor";
pub(crate) const LAST_RESORT: &[u8] = b"last-resort";
pub(crate) const RETIRED_PREFIX: &[u8] = b"retired/";

pub(crate) fn retired_key(hash_ref: &[u8]) -> Vec<u8> {
    [RETIRED_PREFIX, hash_ref].concat()
}

pub(crate) const SEND_PREFIX: &[u8] = b"send/";

pub(crate) fn send_key(number: u64) -> Vec<u8> {
    [SEND_PREFIX, &number.to_be_bytes()].concat()
}

/// The next outbox number (u64 BE): numbers only grow, so that a
/// [`GroupLeft`] mark covers exactly the messages queued before it.
pub(crate) const SEND_COUNTER: &[u8] = b"send-counter";

pub(crate) const LEFT_PREFIX: &[u8] = b"left/";

pub(crate) fn left_key(gid: &[u8]) -> Vec<u8> {
    [LEFT_PREFIX, gid].concat()
}

/// This client left a group (removed, or the group was deleted): its
/// outbox messages for the group numbered below `below` never go out, not
/// even to a later membership. A mark of its own instead of a rewrite of
/// those messages, which could race with a send that just delivered one
/// and bring it back.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct GroupLeft {
    pub(crate) below: u64,
    pub(crate) why: String,
}

/// The number of a [`send_key`].
pub(crate) fn send_number(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.strip_prefix(SEND_PREFIX)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

pub(crate) fn group_key(gid: &[u8]) -> Vec<u8> {
    [b"group/".as_slice(), gid].concat()
}

pub(crate) fn outbox_key(gid: &[u8]) -> Vec<u8> {
    [b"outbox/".as_slice(), gid].concat()
}

pub(crate) const INBOX_PREFIX: &[u8] = b"inbox/";

/// Key of the event of DS entry `seq`.
pub(crate) fn inbox_key(seq: u64) -> Vec<u8> {
    [INBOX_PREFIX, &seq.to_be_bytes()].concat()
}

/// Key of an event of the SDK's own noticed after DS entry `seq`; `n`
/// counts every such event ever filed, so keys never repeat and sort in
/// the order the events were noticed.
pub(crate) fn local_inbox_key(seq: u64, n: u64) -> Vec<u8> {
    [INBOX_PREFIX, &seq.to_be_bytes(), &[1], &n.to_be_bytes()].concat()
}

/// How many events of the SDK's own were filed (u64 BE).
pub(crate) const LOCAL_EVENTS: &[u8] = b"local-events";

/// The DS sequence number an inbox key is filed under.
pub(crate) fn inbox_seq(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(INBOX_PREFIX)?;
    Some(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?))
}

/// A group to check against the DS, and to rejoin if this client is
/// behind it.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct Suspect {
    /// Why.
    pub(crate) reason: String,
}

pub(crate) const SUSPECT_PREFIX: &[u8] = b"suspect/";

pub(crate) fn suspect_key(gid: &[u8]) -> Vec<u8> {
    [SUSPECT_PREFIX, gid].concat()
}
