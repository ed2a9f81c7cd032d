//! The one way anything is written: a [`WriteSet`] that a backend applies
//! atomically and durably (the caller awaits its `Committing` handle before
//! answering).
//!
//! A write set holds conditions, changes and deliveries. The backend checks
//! the conditions against the stored state as it is when the write set is
//! applied (after every write set applied before it, on any DS process
//! sharing the storage); if one fails, nothing of the write set is written
//! and the caller gets [`StoreError::ConditionFailed`]. Otherwise the changes
//! and the deliveries (messages fanned out to client queues, whose sequence
//! numbers the backend assigns at that moment) are written as one atomic
//! unit, and the handle resolves once that unit is durable.

use std::fmt;

use mls_ds_protocol::ClientId;

use super::records::{
    ClientRecord, ClientUsage, CommitRecord, GroupId, GroupRecord, GroupState, InviteRecord,
    KeyPackageRecord, SendKey, StoredMessage,
};

/// Everything one request writes, applied all or nothing.
#[derive(Default)]
pub(crate) struct WriteSet {
    /// Checked when applied; any failure writes nothing.
    pub(crate) conditions: Vec<Condition>,
    /// Records written or removed.
    pub(crate) changes: Vec<Change>,
    /// Messages to fan out, in order.
    pub(crate) deliveries: Vec<Delivery>,
}

/// A precondition of a [`WriteSet`]: the stored state it was computed from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Condition {
    /// No client with this id is registered (not even a deleted one).
    ClientAbsent(ClientId),
    /// The client is registered and has not deleted itself.
    ClientActive(ClientId),
    /// The client is active with this signature key (it was not recovered
    /// meanwhile).
    ClientKeyIs {
        /// The client.
        client: ClientId,
        /// Its signature key when read.
        key: Vec<u8>,
    },
    /// No group with this id exists.
    GroupAbsent(GroupId),
    /// The group exists (it was not deleted since it was read).
    GroupPresent(GroupId),
    /// The group's record is still at this revision: no handshake was
    /// accepted since it was read (a compare-and-set).
    GroupAt {
        /// The group.
        group: GroupId,
        /// Its revision when the handshake was validated.
        revision: u64,
    },
    /// This ordinary key package of `owner` is still stored (unclaimed).
    KeyPackageUnclaimed {
        /// Who published it.
        owner: ClientId,
        /// Its hash reference.
        kp_ref: Vec<u8>,
    },
    /// `owner`'s last-resort key package is this one, handed out this many
    /// times so far.
    LastResortAt {
        /// Who published it.
        owner: ClientId,
        /// Its hash reference.
        kp_ref: Vec<u8>,
        /// Its claim count when read.
        claims: u64,
    },
    /// The invitation `code` exists with this many uses left.
    InviteAt {
        /// The code.
        code: String,
        /// Its uses left when read.
        uses_left: u32,
    },
    /// No send of this sender with this id was delivered (within the
    /// deduplication window: older sends are forgotten).
    SendNew(SendKey),
    /// The client's usage is still this (absent counts as the default).
    UsageAt {
        /// The client.
        client: ClientId,
        /// Its usage when read.
        usage: ClientUsage,
    },
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::ClientAbsent(c) => write!(f, "client {c} is not registered"),
            Condition::ClientActive(c) => write!(f, "client {c} is registered and active"),
            Condition::ClientKeyIs { client, .. } => write!(f, "client {client} has its key"),
            Condition::GroupAbsent(g) => write!(f, "group {g} does not exist"),
            Condition::GroupPresent(g) => write!(f, "group {g} exists"),
            Condition::GroupAt { group, revision } => {
                write!(f, "group {group} is at revision {revision}")
            }
            Condition::KeyPackageUnclaimed { owner, kp_ref } => write!(
                f,
                "key package {} of {owner} is unclaimed",
                hex::encode(kp_ref)
            ),
            Condition::LastResortAt {
                owner,
                kp_ref,
                claims,
            } => write!(
                f,
                "the last-resort key package of {owner} is {} with {claims} claims",
                hex::encode(kp_ref)
            ),
            Condition::InviteAt { uses_left, .. } => {
                write!(f, "the invitation has {uses_left} uses left")
            }
            Condition::UsageAt { client, usage } => {
                write!(f, "{client} has created {} groups", usage.groups_created)
            }
            Condition::SendNew(key) => write!(
                f,
                "{} made no send with id {}.{}",
                key.sender, key.id.created_ms, key.id.nonce
            ),
        }
    }
}

/// A record written or removed by a [`WriteSet`].
#[derive(Debug)]
pub(crate) enum Change {
    /// Register a client.
    PutClient {
        /// Its id.
        id: ClientId,
        /// Its record.
        record: ClientRecord,
    },
    /// A client deletes itself: its record becomes `tombstone` (the id stays
    /// reserved), its key packages go, its queue is acknowledged to its end,
    /// and nothing is queued for it any more.
    DeleteClient {
        /// Its id.
        id: ClientId,
        /// Its record with `deleted_ms` set.
        tombstone: ClientRecord,
    },
    /// Store an ordinary key package.
    PutKeyPackage {
        /// Who published it.
        owner: ClientId,
        /// The package.
        record: KeyPackageRecord,
    },
    /// Store (replace) the last-resort key package.
    PutLastResort {
        /// Who published it.
        owner: ClientId,
        /// The package.
        record: KeyPackageRecord,
    },
    /// Remove an ordinary key package (claimed or expired).
    RemoveKeyPackage {
        /// Who published it.
        owner: ClientId,
        /// Its hash reference.
        kp_ref: Vec<u8>,
    },
    /// Remember who published a claimed key package, to route its Welcome.
    PutKeyPackageOwner {
        /// The package's hash reference.
        kp_ref: Vec<u8>,
        /// Its publisher.
        owner: ClientId,
    },
    /// Delete a group: its record, state and commit records.
    DeleteGroup {
        /// The group.
        id: GroupId,
    },
    /// Remove one accepted-commit record (pruning).
    RemoveCommit {
        /// The group.
        group: GroupId,
        /// The epoch it was for.
        epoch: u64,
    },
    /// Write a group's record.
    PutGroup {
        /// The group.
        id: GroupId,
        /// Its record.
        record: GroupRecord,
    },
    /// Write a group's GroupInfo and `PublicGroup`.
    PutGroupState {
        /// The group.
        id: GroupId,
        /// Its state.
        state: GroupState,
    },
    /// Record the commit accepted for `epoch`.
    PutCommit {
        /// The group.
        group: GroupId,
        /// The epoch the commit was for.
        epoch: u64,
        /// The accepted commit.
        record: CommitRecord,
    },
    /// Store (replace) an invitation code.
    PutInvite {
        /// The code.
        code: String,
        /// Its record.
        record: InviteRecord,
    },
    /// Remove an invitation code (used up or revoked).
    RemoveInvite {
        /// The code.
        code: String,
    },
    /// Write a client's usage.
    PutUsage {
        /// The client.
        client: ClientId,
        /// Its usage.
        usage: ClientUsage,
    },
    /// Remove every key package of a client, ordinary and last resort, as
    /// stored when the write is applied (so that none published meanwhile
    /// escapes; the write set must carry a condition, which makes it read
    /// the database as applied so far).
    RemoveKeyPackagesOf {
        /// Who published them.
        owner: ClientId,
    },
}

/// A message to store once and queue for each of `recipients` (clients that
/// deleted themselves are skipped when the write set is applied).
#[derive(Debug)]
pub(crate) struct Delivery {
    /// The message.
    pub(crate) message: StoredMessage,
    /// Who gets a queue entry.
    pub(crate) recipients: Vec<ClientId>,
    /// Where the sender stands among the group's members when
    /// `recipients` are the others in the group record's order: the
    /// backend may then store the fan-out as a reference to the members
    /// (the sled backend's rosters) instead of a list.
    pub(crate) sender_at: Option<u32>,
    /// Remember the outcome under this send (durable with the delivery), so
    /// that a retry of the send gets it instead of a second delivery.
    pub(crate) receipt: Option<SendKey>,
}

/// What applying a [`WriteSet`] produced.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// One per [`Delivery`], in order.
    pub(crate) deliveries: Vec<DeliveryOutcome>,
}

/// Where one [`Delivery`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeliveryOutcome {
    /// Id of the stored message.
    pub(crate) message_id: u64,
    /// Queue entries written (recipients that had not deleted themselves).
    pub(crate) recipients: u32,
}

/// The result of an acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AckOutcome {
    /// The queue's acknowledgement mark afterwards.
    pub(crate) acked: u64,
    /// Visible entries left after the mark.
    pub(crate) remaining: u64,
}
