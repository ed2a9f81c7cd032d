//! The records as table rows: which columns each one has (the `SELECT`
//! lists live beside the decoders that read them) and the integer
//! conversions. Quantities are stored as `bigint`/`integer` and read back
//! checked: a negative or oversized value is corrupt data, not a panic. A
//! send id's nonce is random over 64 bits, so it is stored bit for bit.

use tokio_postgres::Row;

use crate::backend::records::{
    ClientRecord, CommitRecord, GroupRecord, GroupState, InviteRecord, KeyPackageRecord,
    PublicGroupEntities, QueuedProposalEntity, StoredMessage, StoredSendId,
};
use crate::backend::StoreError;

/// A quantity as `bigint` (times and counters stay far below 2^63; a
/// larger one, e.g. a key package valid "forever", is kept as the largest).
pub(crate) fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A count as `integer`.
pub(crate) fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// A nonce's 64 bits as `bigint`.
pub(crate) fn bits(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// [`bits`] back.
pub(crate) fn unbits(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// A stored `bigint` quantity.
pub(crate) fn u64_of(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {v}")))
}

/// A stored `integer` count.
pub(crate) fn u32_of(v: i32, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {v}")))
}

/// A column that must decode (`try_get` instead of `get`, which panics).
pub(crate) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    name: &str,
) -> Result<T, StoreError> {
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}

pub(crate) const CLIENT_COLUMNS: &str =
    "signature_scheme, signature_key, registered_ms, deleted_ms, recovery_hash";

pub(crate) fn client(row: &Row) -> Result<ClientRecord, StoreError> {
    let scheme: i32 = col(row, "signature_scheme")?;
    Ok(ClientRecord {
        signature_scheme: u16::try_from(scheme)
            .map_err(|_| StoreError::Corrupt(format!("signature scheme {scheme}")))?,
        signature_key: col(row, "signature_key")?,
        registered_ms: u64_of(col(row, "registered_ms")?, "registered_ms")?,
        deleted_ms: col::<Option<i64>>(row, "deleted_ms")?
            .map(|v| u64_of(v, "deleted_ms"))
            .transpose()?,
        recovery_hash: col(row, "recovery_hash")?,
    })
}

pub(crate) const KEY_PACKAGE_COLUMNS: &str = "kp_ref, message, not_after, claims";

pub(crate) fn key_package(row: &Row) -> Result<KeyPackageRecord, StoreError> {
    Ok(KeyPackageRecord {
        message: col(row, "message")?,
        kp_ref: col(row, "kp_ref")?,
        not_after: u64_of(col(row, "not_after")?, "not_after")?,
        claims: u64_of(col(row, "claims")?, "claims")?,
    })
}

pub(crate) const GROUP_COLUMNS: &str = "epoch, revision, open, members, creator, created_ms";

pub(crate) fn group(row: &Row) -> Result<GroupRecord, StoreError> {
    Ok(GroupRecord {
        epoch: u64_of(col(row, "epoch")?, "epoch")?,
        revision: u64_of(col(row, "revision")?, "revision")?,
        open: col(row, "open")?,
        members: col(row, "members")?,
        creator: col(row, "creator")?,
        created_ms: u64_of(col(row, "created_ms")?, "created_ms")?,
    })
}

pub(crate) const GROUP_STATE_COLUMNS: &str = "group_info, tree, context, \
     interim_transcript_hash, confirmation_tag, proposal_refs, proposals";

pub(crate) fn group_state(row: &Row) -> Result<GroupState, StoreError> {
    let refs: Vec<Vec<u8>> = col(row, "proposal_refs")?;
    let proposals: Vec<Vec<u8>> = col(row, "proposals")?;
    if refs.len() != proposals.len() {
        return Err(StoreError::Corrupt(format!(
            "{} proposal references for {} proposals",
            refs.len(),
            proposals.len()
        )));
    }
    Ok(GroupState {
        group_info: col(row, "group_info")?,
        public_group: PublicGroupEntities {
            tree: col(row, "tree")?,
            context: col(row, "context")?,
            interim_transcript_hash: col(row, "interim_transcript_hash")?,
            confirmation_tag: col(row, "confirmation_tag")?,
            proposals: refs
                .into_iter()
                .zip(proposals)
                .map(|(reference, proposal)| QueuedProposalEntity {
                    reference,
                    proposal,
                })
                .collect(),
        },
    })
}

pub(crate) const COMMIT_COLUMNS: &str =
    "commit_hash, committer, new_epoch, recipients, accepted_ms";

pub(crate) fn commit(row: &Row) -> Result<CommitRecord, StoreError> {
    let hash: Vec<u8> = col(row, "commit_hash")?;
    Ok(CommitRecord {
        commit_hash: hash
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("commit hash of {} bytes", hash.len())))?,
        committer: col(row, "committer")?,
        new_epoch: u64_of(col(row, "new_epoch")?, "new_epoch")?,
        recipients: u32_of(col(row, "recipients")?, "recipients")?,
        accepted_ms: u64_of(col(row, "accepted_ms")?, "accepted_ms")?,
    })
}

pub(crate) const INVITE_COLUMNS: &str = "uses_left, expires_ms, created_ms";

pub(crate) fn invite(row: &Row) -> Result<InviteRecord, StoreError> {
    Ok(InviteRecord {
        uses_left: u32_of(col(row, "uses_left")?, "uses_left")?,
        expires_ms: col::<Option<i64>>(row, "expires_ms")?
            .map(|v| u64_of(v, "expires_ms"))
            .transpose()?,
        created_ms: u64_of(col(row, "created_ms")?, "created_ms")?,
    })
}

pub(crate) const MESSAGE_COLUMNS: &str = "kind, group_id, epoch, sender, message, stored_ms, \
     send_created_ms, send_nonce, ratchet_tree";

pub(crate) fn message(row: &Row) -> Result<StoredMessage, StoreError> {
    let kind: i16 = col(row, "kind")?;
    let send = match (
        col::<Option<i64>>(row, "send_created_ms")?,
        col::<Option<i64>>(row, "send_nonce")?,
    ) {
        (Some(created_ms), Some(nonce)) => Some(StoredSendId {
            created_ms: u64_of(created_ms, "send_created_ms")?,
            nonce: unbits(nonce),
        }),
        _ => None,
    };
    Ok(StoredMessage {
        kind: u8::try_from(kind)
            .map_err(|_| StoreError::Corrupt(format!("message kind {kind}")))?,
        group_id: col(row, "group_id")?,
        epoch: u64_of(col(row, "epoch")?, "epoch")?,
        sender: col(row, "sender")?,
        message: col(row, "message")?,
        stored_ms: u64_of(col(row, "stored_ms")?, "stored_ms")?,
        send,
        ratchet_tree: col(row, "ratchet_tree")?,
    })
}

/// `a, b` as `p.a, p.b`.
pub(crate) fn prefixed(prefix: &str, columns: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{prefix}{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}
