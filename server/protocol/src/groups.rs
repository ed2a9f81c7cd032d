//! Groups: creation, commits, messages, and GroupInfo for joiners.

use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `POST /v1/groups`: register a new group with the DS.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct CreateGroup {
    /// `MLSMessage` holding the group's `GroupInfo` (signed by the creator).
    pub group_info: VLBytes,
    /// TLS-encoded `RatchetTree` of the group.
    pub ratchet_tree: VLBytes,
    /// Whether any registered client may fetch the GroupInfo and join by
    /// external commit. If false, only members and former members may (resync).
    pub open: crate::codec::Bool,
}

/// Response of group creation.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct GroupCreated {
    /// The group's id.
    pub group_id: VLBytes,
    /// Its epoch on the DS.
    pub epoch: u64,
}

/// `POST /v1/groups/{id}/commits`: a commit travels with its Welcome (if it
/// adds members) and the GroupInfo of the epoch it creates.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct CommitBundle {
    /// `MLSMessage` holding the commit as a `PublicMessage`.
    pub commit: VLBytes,
    /// `MLSMessage` holding the `Welcome` for every member the commit adds.
    pub welcome: Option<VLBytes>,
    /// `MLSMessage` holding the new epoch's `GroupInfo`.
    pub group_info: VLBytes,
}

/// Success of a commit (also returned, unchanged, for a retry of the same commit).
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct CommitAccepted {
    /// The epoch the commit created.
    pub epoch: u64,
    /// Queue entries written for recipients (members and welcomed clients).
    pub recipients: u32,
}

/// `POST /v1/groups/{id}/messages`: an application message (`PrivateMessage`)
/// or a proposal (`PublicMessage`), fanned out to every other member.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SendMessage {
    /// The `MLSMessage`.
    pub message: VLBytes,
}

/// Success of a send.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct MessageAccepted {
    /// DS-wide id of the stored message.
    pub message_id: u64,
    /// Number of recipients.
    pub recipients: u32,
}

/// `GET /v1/groups/{id}/info`: what a joiner or resyncing member needs.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct GroupInfoResponse {
    /// Current epoch.
    pub epoch: u64,
    /// `MLSMessage` holding the latest `GroupInfo`.
    pub group_info: VLBytes,
    /// TLS-encoded `RatchetTree`, exported from the DS's own `PublicGroup`.
    pub ratchet_tree: VLBytes,
}
