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
    /// The sender's id for this send: a retry with the same id within the
    /// DS's deduplication window gets the first send's answer and is not
    /// delivered again.
    pub send_id: Option<SendId>,
}

/// A sender's id for one message (unique per sender).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SendId {
    /// When the sender made it (Unix milliseconds, the sender's clock): the
    /// DS remembers the send from then for its deduplication window.
    pub created_ms: u64,
    /// Random, so that a sender's ids do not repeat.
    pub nonce: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The framings shown in docs/API.md.
    #[test]
    fn send_message_encodes_as_documented() {
        let dummy = vec![0x00, 0x01, 0x00, 0x02];
        let plain = SendMessage {
            message: dummy.clone().into(),
            send_id: None,
        };
        assert_eq!(hex::encode(crate::encode(&plain).unwrap()), "040001000200");
        let with_id = SendMessage {
            message: dummy.into(),
            send_id: Some(SendId {
                created_ms: 1_767_225_600_000,
                nonce: 7,
            }),
        };
        let bytes = crate::encode(&with_id).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            "0400010002010000019b76daa8000000000000000007"
        );
        assert_eq!(crate::decode::<SendMessage>(&bytes).unwrap(), with_id);
    }
}
