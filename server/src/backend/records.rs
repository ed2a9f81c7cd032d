//! What the DS stores, as typed records: the values every backend keeps and
//! returns. How they become bytes or rows is the backend's business; the
//! sled backend encodes them with bincode 2 behind a version byte (the
//! storage crate's record codec), and OpenMLS values only ever appear inside
//! them as MessagePack bytes or as TLS-encoded `MLSMessage`s.

use std::fmt;

use mls_ds_protocol::groups::SendId;
use mls_ds_protocol::queue::EntryKind;
use mls_ds_protocol::ClientId;

/// Longest group id the DS accepts, in bytes.
pub(crate) const MAX_GROUP_ID_LEN: usize = 255;

/// A group id as the DS handles it: 1 to [`MAX_GROUP_ID_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct GroupId(Vec<u8>);

/// A group id of the wrong length.
#[derive(Debug, thiserror::Error)]
#[error("group id must be 1 to {MAX_GROUP_ID_LEN} bytes, got {0}")]
pub(crate) struct BadGroupId(usize);

/// A group id given in hex that is not one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadHexGroupId {
    /// Not hex.
    #[error("group id in path is not hex: {0}")]
    Hex(#[from] hex::FromHexError),
    /// Of the wrong length.
    #[error(transparent)]
    Length(BadGroupId),
}

impl GroupId {
    /// Check the length and wrap.
    pub(crate) fn new(bytes: &[u8]) -> Result<GroupId, BadGroupId> {
        if bytes.is_empty() || bytes.len() > MAX_GROUP_ID_LEN {
            return Err(BadGroupId(bytes.len()));
        }
        Ok(GroupId(bytes.to_vec()))
    }

    /// Check the length of an id given in hex and decode it (into exactly
    /// its size: a path's id is decoded for every request).
    pub(crate) fn from_hex(text: &str) -> Result<GroupId, BadHexGroupId> {
        let len = text.len() / 2;
        if len == 0 || len > MAX_GROUP_ID_LEN {
            return Err(BadHexGroupId::Length(BadGroupId(len)));
        }
        let mut bytes = vec![0; len];
        hex::decode_to_slice(text, &mut bytes)?;
        Ok(GroupId(bytes))
    }

    /// The id's bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({self})")
    }
}

/// A registered client.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct ClientRecord {
    /// MLS signature scheme code point.
    pub(crate) signature_scheme: u16,
    /// Public signature key; authenticates the client.
    pub(crate) signature_key: Vec<u8>,
    /// Registration time (unix ms).
    pub(crate) registered_ms: u64,
    /// Set when the client deleted itself (unix ms). The id stays reserved so
    /// that nobody else can register it and inherit its groups or queue.
    pub(crate) deleted_ms: Option<u64>,
    /// SHA-256 of the client's recovery secret, if it registered one.
    pub(crate) recovery_hash: Option<Vec<u8>>,
}

impl ClientRecord {
    /// Whether the client deleted itself.
    pub(crate) fn is_deleted(&self) -> bool {
        self.deleted_ms.is_some()
    }
}

/// A published key package.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct KeyPackageRecord {
    /// `MLSMessage(KeyPackage)` (or a bare `KeyPackage`) as published.
    pub(crate) message: Vec<u8>,
    /// Its hash reference.
    pub(crate) kp_ref: Vec<u8>,
    /// End of its lifetime (unix seconds).
    pub(crate) not_after: u64,
    /// How many times it was handed out (only a last-resort package is
    /// handed out more than once).
    pub(crate) claims: u64,
}

/// An invitation code the operator created: each registration with it uses
/// one of its uses.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct InviteRecord {
    /// Registrations it still allows.
    pub(crate) uses_left: u32,
    /// After this (unix ms) it is refused.
    pub(crate) expires_ms: Option<u64>,
    /// Creation time (unix ms).
    pub(crate) created_ms: u64,
}

/// What a client holds of the DS's per-client quotas (absent: nothing).
#[derive(bincode::Encode, bincode::Decode, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClientUsage {
    /// Groups it created that still exist.
    pub(crate) groups_created: u32,
}

/// A group as the DS knows it: what every request on the group reads, kept
/// small (the `PublicGroup` is in [`GroupState`]).
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct GroupRecord {
    /// Current epoch.
    pub(crate) epoch: u64,
    /// Bumped by every accepted handshake (commit or proposal). A handshake's
    /// write set is conditional on the revision it validated against, which
    /// is what makes "one commit per epoch" hold across processes.
    pub(crate) revision: u64,
    /// Whether any registered client may fetch the GroupInfo and join externally.
    pub(crate) open: bool,
    /// Client ids of the current members (from the DS's own `PublicGroup`).
    pub(crate) members: Vec<Vec<u8>>,
    /// The client that created it (its groups count against that client's
    /// quota until the group is deleted).
    pub(crate) creator: Vec<u8>,
    /// Creation time (unix ms).
    pub(crate) created_ms: u64,
}

/// The group state a handshake is validated against: the GroupInfo joiners
/// are given and the DS's own `PublicGroup`.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct GroupState {
    /// `MLSMessage(GroupInfo)` of the current epoch, as the committer sent it.
    pub(crate) group_info: Vec<u8>,
    /// What OpenMLS stores of the `PublicGroup`.
    pub(crate) public_group: PublicGroupEntities,
}

/// The entities of one `PublicGroup`, each the MessagePack encoding of the
/// OpenMLS value (OpenMLS entities are never bincode-encoded; the record
/// around them only frames their bytes).
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, Default, PartialEq)]
pub(crate) struct PublicGroupEntities {
    /// `TreeSync`.
    pub(crate) tree: Option<Vec<u8>>,
    /// `GroupContext`.
    pub(crate) context: Option<Vec<u8>>,
    /// `InterimTranscriptHash`.
    pub(crate) interim_transcript_hash: Option<Vec<u8>>,
    /// `ConfirmationTag`.
    pub(crate) confirmation_tag: Option<Vec<u8>>,
    /// Queued proposals in arrival order.
    pub(crate) proposals: Vec<QueuedProposalEntity>,
}

/// One queued proposal of a [`PublicGroupEntities`].
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct QueuedProposalEntity {
    /// `ProposalRef`.
    pub(crate) reference: Vec<u8>,
    /// `QueuedProposal`.
    pub(crate) proposal: Vec<u8>,
}

/// The commit the DS accepted for one epoch.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct CommitRecord {
    /// SHA-256 of the commit message; a retry with the same hash succeeds again.
    pub(crate) commit_hash: [u8; 32],
    /// Client that committed.
    pub(crate) committer: Vec<u8>,
    /// Epoch the commit created.
    pub(crate) new_epoch: u64,
    /// Queue entries written.
    pub(crate) recipients: u32,
    /// When it was accepted (unix ms): records older than the commit
    /// retention are pruned.
    pub(crate) accepted_ms: u64,
}

/// A message stored once and referenced from every recipient's queue.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct StoredMessage {
    /// [`EntryKind`] code.
    pub(crate) kind: u8,
    /// Group it belongs to.
    pub(crate) group_id: Vec<u8>,
    /// Epoch when accepted.
    pub(crate) epoch: u64,
    /// Authenticated sender.
    pub(crate) sender: Vec<u8>,
    /// The `MLSMessage`.
    pub(crate) message: Vec<u8>,
    /// Acceptance time (unix ms), for retention.
    pub(crate) stored_ms: u64,
    /// The sender's send id, if it sent one: the envelope restores the
    /// send's receipt at startup if a crash came between the two writes.
    pub(crate) send: Option<StoredSendId>,
    /// For a Welcome, the TLS-encoded ratchet tree of its epoch (stored
    /// once with the message, however many it welcomes); empty otherwise.
    pub(crate) ratchet_tree: Vec<u8>,
}

/// A send id as stored with its message.
#[derive(bincode::Encode, bincode::Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StoredSendId {
    /// [`SendId::created_ms`].
    pub(crate) created_ms: u64,
    /// [`SendId::nonce`].
    pub(crate) nonce: u64,
}

/// A stored message of an unknown kind.
#[derive(Debug, thiserror::Error)]
#[error("stored message has unknown kind {0}")]
pub(crate) struct UnknownKind(u8);

impl StoredMessage {
    /// The queue entry kind.
    pub(crate) fn entry_kind(&self) -> Result<EntryKind, UnknownKind> {
        match self.kind {
            1 => Ok(EntryKind::Message),
            2 => Ok(EntryKind::Commit),
            3 => Ok(EntryKind::Welcome),
            4 => Ok(EntryKind::GroupDeleted),
            other => Err(UnknownKind(other)),
        }
    }
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One send of one sender, as the DS remembers it to deduplicate retries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SendKey {
    /// Who sent.
    pub(crate) sender: ClientId,
    /// The sender's id for the send.
    pub(crate) id: SendId,
}

/// The answer a remembered send got.
#[derive(bincode::Encode, bincode::Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SendReceipt {
    /// Id of the stored message.
    pub(crate) message_id: u64,
    /// Queue entries written.
    pub(crate) recipients: u32,
}

/// A session as every process sharing the storage may verify it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SharedSession {
    /// The session id clients present.
    pub(crate) id: [u8; mls_ds_protocol::auth::SESSION_ID_LEN],
    /// Whose it is.
    pub(crate) client: ClientId,
    /// Its MAC key.
    pub(crate) key: [u8; mls_ds_protocol::auth::SESSION_KEY_LEN],
    /// When it ends (unix ms).
    pub(crate) expires_ms: u64,
}
