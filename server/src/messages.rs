//! Application messages and proposals: the DS checks the group, the epoch and
//! the sender's membership, then fans the message out to every other current
//! member (recipients come from the DS's roster, never from the client).

use mls_ds_protocol::groups::{MessageAccepted, SendMessage};
use mls_ds_protocol::queue::EntryKind;
use mls_ds_protocol::{decode, ClientId};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    ContentType, GroupId, MlsMessageIn, ProcessedMessageContent, ProtocolMessage, PublicGroup,
};

use crate::auth::Caller;
use crate::commit_ordering::parse_public;
use crate::db::{self, GroupRecord, StoredMessage};
use crate::error::{Result, ServerError};
use crate::groups;
use crate::http::Reply;
use crate::queues::Outgoing;
use crate::state::AppState;

/// Every current member but the sender (and but clients that deleted
/// themselves); 403 if the sender is not a member.
fn recipients(state: &AppState, record: &GroupRecord, caller: &Caller) -> Result<Vec<ClientId>> {
    if !record.members.iter().any(|m| m == caller.client.as_bytes()) {
        return Err(ServerError::Forbidden("not a member of the group".into()));
    }
    let mut out = Vec::with_capacity(record.members.len());
    for m in &record.members {
        if m.as_slice() != caller.client.as_bytes() {
            let id = ClientId::new(m)?;
            if !state.is_deleted(&id) {
                out.push(id);
            }
        }
    }
    Ok(out)
}

/// `POST /v1/groups/{id}/messages`.
pub async fn send(
    state: &AppState,
    caller: &Caller,
    group_id: &[u8],
    body: &[u8],
) -> Result<Reply> {
    let req: SendMessage = decode(body)?;
    let bytes = req.message.as_slice();
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| ServerError::BadRequest(format!("malformed message: {e}")))?;
    let pm = msg
        .try_into_protocol_message()
        .map_err(|_| ServerError::BadRequest("not a protocol message".into()))?;
    match pm {
        ProtocolMessage::PrivateMessage(private) => {
            if private.group_id().as_slice() != group_id {
                return Err(ServerError::BadRequest(
                    "message belongs to another group".into(),
                ));
            }
            if private.content_type() != ContentType::Application {
                return Err(ServerError::BadRequest(
                    "handshake messages must be PublicMessages so the DS can validate them".into(),
                ));
            }
            let record = groups::load(state, group_id)?;
            let to = recipients(state, &record, caller)?;
            let epoch = private.epoch().as_u64();
            let window = state.limits.past_epoch_window;
            if epoch > record.epoch || epoch + window < record.epoch {
                return Err(ServerError::WrongEpoch {
                    current: record.epoch,
                    reason: format!(
                        "application message for epoch {epoch} is outside the accepted window of {window} past epochs"
                    ),
                });
            }
            fan_out(state, caller, group_id, epoch, bytes, to, None).await
        }
        _ => {
            let public = parse_public(bytes, group_id, "message")?;
            if public.content_type() != ContentType::Proposal {
                return Err(ServerError::BadRequest(
                    "only application messages and proposals go to /messages; commits go to /commits"
                        .into(),
                ));
            }
            // 404 before a lock is created for an unknown group.
            groups::load(state, group_id)?;
            let lock = state.group_lock(group_id);
            let guard = lock.lock_owned().await;
            let record = groups::load(state, group_id)?;
            let to = recipients(state, &record, caller)?;
            let epoch = public.epoch().as_u64();
            if epoch != record.epoch {
                return Err(ServerError::WrongEpoch {
                    current: record.epoch,
                    reason: format!("proposal is for epoch {epoch}"),
                });
            }
            let db = &state.db;
            let mut public_group = PublicGroup::load(&db.storage, &GroupId::from_slice(group_id))?
                .ok_or_else(|| ServerError::Internal("group state missing".into()))?;
            let processed = public_group
                .process_message(&state.crypto, public)
                .map_err(|e| ServerError::BadRequest(format!("invalid proposal: {e}")))?;
            if groups::credential_client(processed.credential())? != caller.client {
                return Err(ServerError::Forbidden(
                    "proposal is signed by another client".into(),
                ));
            }
            let ProcessedMessageContent::ProposalMessage(proposal) = processed.into_content()
            else {
                return Err(ServerError::BadRequest("not a proposal".into()));
            };
            // The DS keeps the proposal so that a commit referencing it validates.
            let tx = db.provider.begin();
            public_group.add_proposal(tx.storage(), *proposal)?;
            fan_out(state, caller, group_id, epoch, bytes, to, Some((tx, guard))).await
        }
    }
}

async fn fan_out(
    state: &AppState,
    caller: &Caller,
    group_id: &[u8],
    epoch: u64,
    bytes: &[u8],
    to: Vec<ClientId>,
    proposal: Option<(
        mls_ds_storage::ProviderTransaction,
        tokio::sync::OwnedMutexGuard<()>,
    )>,
) -> Result<Reply> {
    let count = to.len() as u32;
    let (tx, guard) = match proposal {
        Some((t, g)) => (t.into_storage_transaction(), Some(g)),
        None => (state.db.storage.begin(), None),
    };
    let (ids, durable) = state.queues.enqueue(
        tx,
        vec![Outgoing {
            message: StoredMessage {
                kind: EntryKind::Message as u8,
                group_id: group_id.to_vec(),
                epoch,
                sender: caller.client.as_bytes().to_vec(),
                message: bytes.to_vec(),
                stored_ms: db::now_ms(),
            },
            recipients: to,
        }],
    )?;
    let message_id = ids.first().copied().unwrap_or(0);
    match guard {
        Some(g) => durable.wait_holding(g).await?,
        None => durable.wait().await?,
    }
    Reply::ok(&MessageAccepted {
        message_id,
        recipients: count,
    })
}
