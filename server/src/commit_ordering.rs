//! Commit ordering: for each epoch of a group exactly one commit is accepted,
//! the first valid one. It is validated with the DS's own `PublicGroup`,
//! merged, and fanned out together with its Welcome in one atomic write.
//! Later commits for that epoch get 409 naming the current epoch, except an
//! exact retry of the accepted one, which gets the original success.

use mls_ds_protocol::groups::{CommitAccepted, CommitBundle};
use mls_ds_protocol::queue::EntryKind;
use mls_ds_protocol::{decode, ClientId};
use mls_ds_storage::codec::decode_record;
use openmls::ciphersuite::signable::Verifiable;
use openmls::ciphersuite::signature::OpenMlsSignaturePublicKey;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    ContentType, GroupId, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, ProtocolMessage,
    PublicGroup, Sender,
};
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::db::{self, CommitRecord, GroupRecord, StoredMessage};
use crate::error::{Result, ServerError};
use crate::http::Reply;
use crate::queues::Outgoing;
use crate::state::AppState;
use crate::{clients, groups};

const COMMITS: &str = "app.ds.commits";

/// Parse an `MLSMessage` that must be a handshake `PublicMessage` of `group_id`.
pub fn parse_public(bytes: &[u8], group_id: &[u8], what: &str) -> Result<ProtocolMessage> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| ServerError::BadRequest(format!("malformed {what}: {e}")))?;
    let pm = msg
        .try_into_protocol_message()
        .map_err(|_| ServerError::BadRequest(format!("{what} is not a protocol message")))?;
    if matches!(pm, ProtocolMessage::PrivateMessage(_)) {
        return Err(ServerError::BadRequest(format!(
            "{what} must be a PublicMessage: the DS validates handshakes, so groups use a plaintext-handshake wire-format policy"
        )));
    }
    if pm.group_id().as_slice() != group_id {
        return Err(ServerError::BadRequest(format!(
            "{what} belongs to another group"
        )));
    }
    Ok(pm)
}

/// `POST /v1/groups/{id}/commits`.
pub async fn submit(
    state: &AppState,
    caller: &Caller,
    group_id: &[u8],
    body: &[u8],
) -> Result<Reply> {
    let bundle: CommitBundle = decode(body)?;
    let message = parse_public(bundle.commit.as_slice(), group_id, "commit")?;
    if message.content_type() != ContentType::Commit {
        return Err(ServerError::BadRequest(
            "not a commit; proposals and application messages go to /messages".into(),
        ));
    }
    let msg_epoch = message.epoch().as_u64();
    let commit_hash: [u8; 32] = Sha256::digest(bundle.commit.as_slice()).into();

    // 404 before a lock is created for an unknown group.
    groups::load(state, group_id)?;
    let lock = state.group_lock(group_id);
    let guard = lock.lock_owned().await;
    let db = &state.db;
    let record = groups::load(state, group_id)?;

    let ck = db::commit_key(group_id, msg_epoch)?;
    if let Some(bytes) = db.storage.get_raw(db.commits, &ck)? {
        let accepted: CommitRecord = decode_record(COMMITS, &ck, &bytes)?;
        if accepted.commit_hash == commit_hash && accepted.committer == caller.client.as_bytes() {
            // A retry of the accepted commit: same answer as the first time,
            // once the original write is durable (its first answer may have
            // been lost to a failed flush or a dropped connection).
            state.flusher.durable().await?;
            return Reply::ok(&CommitAccepted {
                epoch: accepted.new_epoch,
                recipients: accepted.recipients,
            });
        }
        return Err(ServerError::WrongEpoch {
            current: record.epoch,
            reason: format!("another commit was already accepted for epoch {msg_epoch}"),
        });
    }
    if msg_epoch != record.epoch {
        return Err(ServerError::WrongEpoch {
            current: record.epoch,
            reason: format!("commit is for epoch {msg_epoch}"),
        });
    }

    let gid = GroupId::from_slice(group_id);
    let mut public_group = PublicGroup::load(&db.storage, &gid)?
        .ok_or_else(|| ServerError::Internal("group state missing".into()))?;
    let processed = public_group
        .process_message(&state.crypto, message)
        .map_err(|e| ServerError::BadRequest(format!("invalid commit: {e}")))?;
    let sender_id = groups::credential_client(processed.credential())?;
    if sender_id != caller.client {
        return Err(ServerError::Forbidden(format!(
            "commit is signed by {sender_id}, not by the authenticated client"
        )));
    }
    let external = matches!(processed.sender(), Sender::NewMemberCommit);
    if external && !groups::may_read_info(&record, &caller.client) {
        return Err(ServerError::Forbidden(
            "external commits are only accepted from former members or into open groups".into(),
        ));
    }
    let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
        return Err(ServerError::BadRequest("not a commit".into()));
    };

    // Every member the commit adds must be welcomed, and the Welcome is routed
    // by the key package references recorded at claim time.
    let mut added_refs = Vec::new();
    for add in staged.add_proposals() {
        let kp_ref = add
            .add_proposal()
            .key_package()
            .hash_ref(&state.crypto)
            .map_err(|e| ServerError::Internal(format!("hash reference: {e}")))?;
        added_refs.push(kp_ref.as_slice().to_vec());
    }
    let mut welcome_to = Vec::new();
    match (&bundle.welcome, added_refs.is_empty()) {
        (None, false) => {
            return Err(ServerError::BadRequest(
                "the commit adds members but the bundle has no Welcome".into(),
            ))
        }
        (Some(_), true) => {
            return Err(ServerError::BadRequest(
                "the bundle has a Welcome but the commit adds nobody".into(),
            ))
        }
        (Some(w), false) => {
            let msg = MlsMessageIn::tls_deserialize_exact(w.as_slice())
                .map_err(|e| ServerError::BadRequest(format!("malformed Welcome: {e}")))?;
            let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
                return Err(ServerError::BadRequest(
                    "Welcome field holds no Welcome".into(),
                ));
            };
            let in_welcome: Vec<Vec<u8>> = welcome
                .secrets()
                .iter()
                .map(|s| s.new_member().as_slice().to_vec())
                .collect();
            for r in &added_refs {
                if !in_welcome.contains(r) {
                    return Err(ServerError::BadRequest(format!(
                        "the Welcome has no secrets for added key package {}",
                        hex::encode(r)
                    )));
                }
                let owner = db.storage.get_raw(db.kp_owners, r)?.ok_or_else(|| {
                    ServerError::BadRequest(format!(
                        "added key package {} was not claimed from this DS",
                        hex::encode(r)
                    ))
                })?;
                welcome_to.push(ClientId::new(owner)?);
            }
        }
        (None, true) => {}
    }

    // The GroupInfo is what joiners will trust: it must carry the committer's
    // signature (checked here) and describe the new epoch (checked after the
    // merge), or later external joins would fail on a corrupt copy.
    let committer = clients::require(state, &caller.client)?;
    let committer_key = OpenMlsSignaturePublicKey::new(
        committer.signature_key.into(),
        public_group.ciphersuite().signature_algorithm(),
    )
    .map_err(|e| ServerError::BadRequest(format!("committer key unusable: {e:?}")))?;
    let group_info = groups::parse_group_info(bundle.group_info.as_slice())?
        .verify(&state.crypto, &committer_key)
        .map_err(|_| {
            ServerError::BadRequest("the GroupInfo is not signed by the committer".into())
        })?;

    let tx = db.provider.begin();
    public_group
        .merge_commit(tx.storage(), *staged)
        .map_err(|e| ServerError::Internal(format!("merge commit: {e}")))?;
    let new_epoch = public_group.group_context().epoch().as_u64();
    if group_info.group_context() != public_group.group_context() {
        return Err(ServerError::BadRequest(
            "the GroupInfo does not describe the epoch this commit creates".into(),
        ));
    }
    let members = groups::roster(state, &public_group)?;
    let old_members: Vec<ClientId> = record
        .members
        .iter()
        .map(ClientId::new)
        .collect::<std::result::Result<_, _>>()?;
    let mut former = record.former_members.clone();
    for m in &old_members {
        if !members.contains(m) && !former.iter().any(|f| f == m.as_bytes()) {
            former.push(m.as_bytes().to_vec());
        }
    }
    let new_record = GroupRecord {
        epoch: new_epoch,
        open: record.open,
        members: members.iter().map(|m| m.as_bytes().to_vec()).collect(),
        former_members: former,
        created_ms: record.created_ms,
    };
    let commit_recipients: Vec<ClientId> = old_members
        .into_iter()
        .filter(|m| m != &caller.client && !state.is_deleted(m))
        .collect();
    let recipients = u32::try_from(commit_recipients.len() + welcome_to.len())
        .map_err(|_| ServerError::Internal("too many recipients".into()))?;
    let now = db::now_ms();
    let mut outgoing = vec![Outgoing {
        message: StoredMessage {
            kind: EntryKind::Commit as u8,
            group_id: group_id.to_vec(),
            epoch: msg_epoch,
            sender: caller.client.as_bytes().to_vec(),
            message: bundle.commit.as_slice().to_vec(),
            stored_ms: now,
        },
        recipients: commit_recipients,
    }];
    if let Some(w) = &bundle.welcome {
        outgoing.push(Outgoing {
            message: StoredMessage {
                kind: EntryKind::Welcome as u8,
                group_id: group_id.to_vec(),
                epoch: new_epoch,
                sender: caller.client.as_bytes().to_vec(),
                message: w.as_slice().to_vec(),
                stored_ms: now,
            },
            recipients: welcome_to,
        });
    }
    let s = tx.storage();
    s.put_record(db.groups, group_id, &new_record)?;
    s.put_raw(db.group_infos, group_id, bundle.group_info.as_slice())?;
    s.put_record(
        db.commits,
        &ck,
        &CommitRecord {
            commit_hash,
            committer: caller.client.as_bytes().to_vec(),
            new_epoch,
            recipients,
        },
    )?;
    // kp_owners entries stay: a last-resort key package can be added to
    // several groups, each needing the route to its owner.
    let tx_inner = tx.into_storage_transaction();
    let (_, durable) = state.queues.enqueue(tx_inner, outgoing)?;
    durable.wait_holding(guard).await?;
    tracing::info!(group = %hex::encode(group_id), epoch = new_epoch, committer = %caller.client, external, "accepted commit");
    Reply::ok(&CommitAccepted {
        epoch: new_epoch,
        recipients,
    })
}
