//! Application messages and proposals: the DS checks the group, the epoch
//! and the sender's membership, then fans the message out to every other
//! current member (recipients come from the DS's roster, never from the
//! client). A proposal is also validated and kept in the DS's `PublicGroup`,
//! so that a commit referencing it validates.
//!
//! A send with a send id is delivered at most once: its answer is stored
//! with its delivery, and a retry within the deduplication window gets that
//! answer (once durable) instead of any refusal, even if the group moved
//! on. A send that passes the checks is refused as a duplicate by its
//! write's `SendNew` condition; only one that fails them looks for a stored
//! answer, so that a first send (nearly every send) reads no receipt.

use mls_ds_protocol::groups::{MessageAccepted, SendId, SendMessage};
use mls_ds_protocol::queue::EntryKind;
use mls_ds_protocol::ClientId;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{ContentType, MlsMessageIn, ProcessedMessageContent, ProtocolMessage};

use super::auth::Caller;
use super::error::{DsError, Result};
use super::loaded_groups::{Kept, Version};
use super::{mls, private_header, Ds};
use crate::backend::records::{
    now_ms, GroupId, GroupRecord, GroupState, SendKey, SendReceipt, StoredMessage, StoredSendId,
};
use crate::backend::write_set::{Change, Condition, Delivery, WriteSet};
use crate::backend::{Backend, StoreError};

/// How far ahead of the DS's clock a send id may be dated (a client's clock
/// may be off; one far in the future would be remembered too long).
const MAX_SEND_ID_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// Every current member but the sender, and where the sender stands among
/// the members; 403 if the sender is not a member.
fn recipients(record: &GroupRecord, caller: &Caller) -> Result<Recipients> {
    let me = caller.client.as_bytes();
    let Some(sender_at) = record.members.iter().position(|m| m == me) else {
        return Err(DsError::Forbidden("not a member of the group".into()));
    };
    let mut to = Vec::with_capacity(record.members.len().saturating_sub(1));
    for m in record.members.iter().filter(|m| m.as_slice() != me) {
        to.push(ClientId::new(m)?);
    }
    Ok(Recipients {
        to,
        sender_at: u32::try_from(sender_at).ok(),
    })
}

/// Who a message to a group goes to.
struct Recipients {
    /// Every member but the sender, in the record's order.
    to: Vec<ClientId>,
    /// The sender's position among the members.
    sender_at: Option<u32>,
}

impl<B: Backend> Ds<B> {
    /// `POST /v1/groups/{id}/messages`.
    pub(crate) async fn send_message(
        &self,
        caller: &Caller,
        id: &GroupId,
        req: SendMessage,
    ) -> Result<MessageAccepted> {
        // The request's bytes become the stored message: not copied.
        let message = Vec::from(req.message);
        let max = self.policy.max_message_bytes;
        if message.len() > max {
            return Err(DsError::TooLarge(format!(
                "a message may have at most {max} bytes; this one has {}",
                message.len()
            )));
        }
        let send = match req.send_id {
            Some(send_id) => Some(self.send_key(caller, send_id)?),
            None => None,
        };
        let outcome = self.deliver_send(caller, id, message, send.clone()).await;
        let (Err(refusal), Some(key)) = (&outcome, &send) else {
            return outcome;
        };
        match self.backend.send_receipt(key).await? {
            Some(receipt) => {
                tracing::debug!(error = %refusal, "a retried send gets its stored answer");
                // Its write may still be on its way to the disk.
                self.backend.settled().wait().await?;
                Ok(answer(receipt))
            }
            None => outcome,
        }
    }

    /// Check a send and deliver it.
    async fn deliver_send(
        &self,
        caller: &Caller,
        id: &GroupId,
        message: Vec<u8>,
        send: Option<SendKey>,
    ) -> Result<MessageAccepted> {
        // Application messages, the common case, are read in place.
        let (group, epoch, content_type) = match private_header::read(&message) {
            Some(h) => (h.group_id == id.as_bytes(), h.epoch, h.content_type),
            None => {
                let msg = MlsMessageIn::tls_deserialize_exact(&message)
                    .map_err(|e| DsError::Invalid(format!("malformed message: {e}")))?;
                let pm = msg
                    .try_into_protocol_message()
                    .map_err(|_| DsError::Invalid("not a protocol message".into()))?;
                let ProtocolMessage::PrivateMessage(private) = pm else {
                    return self.send_proposal(caller, id, message, send).await;
                };
                (
                    private.group_id().as_slice() == id.as_bytes(),
                    private.epoch().as_u64(),
                    private.content_type(),
                )
            }
        };
        if !group {
            return Err(DsError::Invalid("message belongs to another group".into()));
        }
        if content_type != ContentType::Application {
            return Err(DsError::Invalid(
                "handshake messages must be PublicMessages so the DS can validate them".into(),
            ));
        }
        self.send_application(caller, id, epoch, message, send)
            .await
    }

    /// The answer of a concurrent attempt of the same send, which won the
    /// race, once durable.
    async fn duplicate_send(&self, key: &SendKey) -> Result<MessageAccepted> {
        self.backend.settled().wait().await?;
        match self.backend.send_receipt(key).await? {
            Some(receipt) => Ok(answer(receipt)),
            None => Err(DsError::Conflict(
                "this send id was used, but its answer is no longer known".into(),
            )),
        }
    }

    /// The send a send id names, if the id's time is within the window.
    fn send_key(&self, caller: &Caller, id: SendId) -> Result<SendKey> {
        let now = now_ms();
        let window = self.policy.send_dedup_window_ms;
        if id.created_ms.saturating_add(window) < now {
            return Err(DsError::Invalid(format!(
                "send id made {} s ago, before the deduplication window of {} hours",
                (now - id.created_ms) / 1000,
                window / 3_600_000
            )));
        }
        if id.created_ms > now.saturating_add(MAX_SEND_ID_AHEAD_MS) {
            return Err(DsError::Invalid(format!(
                "send id dated {} s ahead of the DS's clock",
                (id.created_ms - now) / 1000
            )));
        }
        Ok(SendKey {
            sender: caller.client.clone(),
            id,
        })
    }

    /// Forget sends made before the deduplication window; returns how many.
    pub(crate) async fn prune_sends(&self) -> Result<usize> {
        // An hour more than the window: the checks above use the DS's clock
        // at request time, the pruning its clock now.
        let cutoff = now_ms().saturating_sub(self.policy.send_dedup_window_ms + 3_600_000);
        Ok(self.backend.forget_sends(cutoff).await?)
    }

    /// An application message of `epoch` (of this group, checked): no
    /// lock, nothing but its fan-out written.
    async fn send_application(
        &self,
        caller: &Caller,
        id: &GroupId,
        epoch: u64,
        message: Vec<u8>,
        send: Option<SendKey>,
    ) -> Result<MessageAccepted> {
        let record = self.group_record(id).await?;
        let to = recipients(&record, caller)?;
        let window = self.policy.past_epoch_window;
        if epoch > record.epoch || epoch + window < record.epoch {
            return Err(DsError::WrongEpoch {
                current: record.epoch,
                reason: format!(
                    "application message for epoch {epoch} is outside the accepted window of {window} past epochs"
                ),
            });
        }
        // Without the group's lock: the condition keeps a message from
        // landing after a deletion's `GroupDeleted` entry.
        // A duplicate is answered as such whatever else changed.
        let mut conditions = Vec::with_capacity(2);
        conditions.extend(send.clone().map(Condition::SendNew));
        conditions.push(Condition::GroupPresent(id.clone()));
        let set = WriteSet {
            conditions,
            deliveries: vec![self.delivery(caller, id, epoch, message, to, send)],
            ..WriteSet::default()
        };
        match self.backend.submit(set).wait().await {
            Ok(applied) => accepted(&applied),
            Err(StoreError::ConditionFailed(Condition::SendNew(key))) => {
                self.duplicate_send(&key).await
            }
            Err(StoreError::ConditionFailed(Condition::GroupPresent(_))) => {
                Err(DsError::NotFound(format!("unknown group {id}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A proposal: validated against the group's `PublicGroup` under the
    /// group's lock, kept there, and fanned out in the same write.
    async fn send_proposal(
        &self,
        caller: &Caller,
        id: &GroupId,
        message: Vec<u8>,
        send: Option<SendKey>,
    ) -> Result<MessageAccepted> {
        let public = mls::parse_public(&message, id, "message")?;
        if public.content_type() != ContentType::Proposal {
            return Err(DsError::Invalid(
                "only application messages and proposals go to /messages; commits go to /commits"
                    .into(),
            ));
        }
        // 404 before a lock is created for an unknown group.
        self.group_record(id).await?;
        let guard = self.backend.lock_group(id).await;
        let record = self.group_record(id).await?;
        let to = recipients(&record, caller)?;
        let epoch = public.epoch().as_u64();
        if epoch != record.epoch {
            return Err(DsError::WrongEpoch {
                current: record.epoch,
                reason: format!("proposal is for epoch {epoch}"),
            });
        }
        let Kept { mut group, tree } = self.load_group(id, &record).await?;
        let processed = group
            .public
            .process_message(&self.crypto, public)
            .map_err(|e| DsError::Invalid(format!("invalid proposal: {e}")))?;
        if mls::credential_client(processed.credential())? != caller.client {
            return Err(DsError::Forbidden(
                "proposal is signed by another client".into(),
            ));
        }
        let ProcessedMessageContent::ProposalMessage(proposal) = processed.into_content() else {
            return Err(DsError::Invalid("not a proposal".into()));
        };
        group
            .public
            .add_proposal(&group.store, *proposal)
            .map_err(|e| DsError::Internal(format!("store proposal: {e}")))?;
        let mut conditions: Vec<Condition> =
            send.clone().map(Condition::SendNew).into_iter().collect();
        conditions.push(Condition::GroupAt {
            group: id.clone(),
            revision: record.revision,
        });
        let set = WriteSet {
            conditions,
            changes: vec![
                Change::PutGroup {
                    id: id.clone(),
                    record: GroupRecord {
                        revision: record.revision + 1,
                        ..(*record).clone()
                    },
                },
                Change::PutGroupState {
                    id: id.clone(),
                    state: GroupState {
                        group_info: group.group_info.clone(),
                        public_group: group.store.entities(),
                    },
                },
            ],
            deliveries: vec![self.delivery(caller, id, epoch, message, to, send)],
        };
        match self.backend.submit(set).wait_holding(guard).await {
            Ok(applied) => {
                // A proposal leaves the tree as it was.
                let kept = Kept { group, tree };
                let bytes = kept.bytes();
                self.loaded.put(id, Version::next(&record), kept, bytes);
                accepted(&applied)
            }
            Err(StoreError::ConditionFailed(Condition::SendNew(key))) => {
                self.duplicate_send(&key).await
            }
            Err(StoreError::ConditionFailed(Condition::GroupAt { .. })) => {
                let now = self.group_record(id).await?;
                Err(DsError::overtaken(now.epoch))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn delivery(
        &self,
        caller: &Caller,
        id: &GroupId,
        epoch: u64,
        message: Vec<u8>,
        to: Recipients,
        receipt: Option<SendKey>,
    ) -> Delivery {
        Delivery {
            message: StoredMessage {
                kind: EntryKind::Message as u8,
                group_id: id.as_bytes().to_vec(),
                epoch,
                sender: caller.client.as_bytes().to_vec(),
                message,
                stored_ms: now_ms(),
                send: receipt.as_ref().map(|k| StoredSendId {
                    created_ms: k.id.created_ms,
                    nonce: k.id.nonce,
                }),
                ratchet_tree: Vec::new(),
            },
            recipients: to.to,
            sender_at: to.sender_at,
            receipt,
        }
    }
}

fn answer(receipt: SendReceipt) -> MessageAccepted {
    MessageAccepted {
        message_id: receipt.message_id,
        recipients: receipt.recipients,
    }
}

fn accepted(applied: &crate::backend::Applied) -> Result<MessageAccepted> {
    let outcome = applied
        .deliveries
        .first()
        .ok_or_else(|| DsError::Internal("a sent message was not delivered".into()))?;
    Ok(answer(SendReceipt {
        message_id: outcome.message_id,
        recipients: outcome.recipients,
    }))
}
