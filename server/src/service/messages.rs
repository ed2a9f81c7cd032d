//! Application messages and proposals: the DS checks the group, the epoch
//! and the sender's membership, then fans the message out to every other
//! current member (recipients come from the DS's roster, never from the
//! client). A proposal is also validated and kept in the DS's `PublicGroup`,
//! so that a commit referencing it validates.

use mls_ds_protocol::groups::{MessageAccepted, SendMessage};
use mls_ds_protocol::queue::EntryKind;
use mls_ds_protocol::ClientId;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    ContentType, MlsMessageIn, PrivateMessageIn, ProcessedMessageContent, ProtocolMessage,
};

use super::auth::Caller;
use super::error::{DsError, Result};
use super::{mls, Ds};
use crate::backend::records::{now_ms, GroupId, GroupRecord, GroupState, StoredMessage};
use crate::backend::write_set::{Change, Condition, Delivery, WriteSet};
use crate::backend::{Backend, StoreError};

/// Every current member but the sender; 403 if the sender is not a member.
fn recipients(record: &GroupRecord, caller: &Caller) -> Result<Vec<ClientId>> {
    let me = caller.client.as_bytes();
    if !record.members.iter().any(|m| m == me) {
        return Err(DsError::Forbidden("not a member of the group".into()));
    }
    record
        .members
        .iter()
        .filter(|m| m.as_slice() != me)
        .map(|m| ClientId::new(m).map_err(DsError::from))
        .collect()
}

impl<B: Backend> Ds<B> {
    /// `POST /v1/groups/{id}/messages`.
    pub(crate) async fn send_message(
        &self,
        caller: &Caller,
        id: &GroupId,
        req: SendMessage,
    ) -> Result<MessageAccepted> {
        let bytes = req.message.as_slice();
        let max = self.policy.max_message_bytes;
        if bytes.len() > max {
            return Err(DsError::TooLarge(format!(
                "a message may have at most {max} bytes; this one has {}",
                bytes.len()
            )));
        }
        let msg = MlsMessageIn::tls_deserialize_exact(bytes)
            .map_err(|e| DsError::Invalid(format!("malformed message: {e}")))?;
        let pm = msg
            .try_into_protocol_message()
            .map_err(|_| DsError::Invalid("not a protocol message".into()))?;
        match pm {
            ProtocolMessage::PrivateMessage(private) => {
                self.send_application(caller, id, &private, bytes).await
            }
            ProtocolMessage::PublicMessage(_) => self.send_proposal(caller, id, bytes).await,
        }
    }

    /// An application message: no lock, nothing but its fan-out written.
    async fn send_application(
        &self,
        caller: &Caller,
        id: &GroupId,
        private: &PrivateMessageIn,
        bytes: &[u8],
    ) -> Result<MessageAccepted> {
        if private.group_id().as_slice() != id.as_bytes() {
            return Err(DsError::Invalid("message belongs to another group".into()));
        }
        if private.content_type() != ContentType::Application {
            return Err(DsError::Invalid(
                "handshake messages must be PublicMessages so the DS can validate them".into(),
            ));
        }
        let record = self.group_record(id).await?;
        let to = recipients(&record, caller)?;
        let epoch = private.epoch().as_u64();
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
        let set = WriteSet {
            conditions: vec![Condition::GroupPresent(id.clone())],
            deliveries: vec![self.delivery(caller, id, epoch, bytes, to)],
            ..WriteSet::default()
        };
        match self.backend.submit(set).wait().await {
            Ok(applied) => accepted(&applied),
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
        bytes: &[u8],
    ) -> Result<MessageAccepted> {
        let public = mls::parse_public(bytes, id, "message")?;
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
        let mut group = self.load_group(id).await?;
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
        let set = WriteSet {
            conditions: vec![Condition::GroupAt {
                group: id.clone(),
                revision: record.revision,
            }],
            changes: vec![
                Change::PutGroup {
                    id: id.clone(),
                    record: GroupRecord {
                        revision: record.revision + 1,
                        ..record.clone()
                    },
                },
                Change::PutGroupState {
                    id: id.clone(),
                    state: GroupState {
                        group_info: group.group_info,
                        public_group: group.store.into_entities(),
                    },
                },
            ],
            deliveries: vec![self.delivery(caller, id, epoch, bytes, to)],
        };
        match self.backend.submit(set).wait_holding(guard).await {
            Ok(applied) => accepted(&applied),
            Err(StoreError::ConditionFailed(Condition::GroupAt { .. })) => {
                let now = self.group_record(id).await?;
                Err(DsError::WrongEpoch {
                    current: now.epoch,
                    reason: "another handshake of the group was accepted meanwhile".into(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn delivery(
        &self,
        caller: &Caller,
        id: &GroupId,
        epoch: u64,
        bytes: &[u8],
        to: Vec<ClientId>,
    ) -> Delivery {
        Delivery {
            message: StoredMessage {
                kind: EntryKind::Message as u8,
                group_id: id.as_bytes().to_vec(),
                epoch,
                sender: caller.client.as_bytes().to_vec(),
                message: bytes.to_vec(),
                stored_ms: now_ms(),
            },
            recipients: to,
        }
    }
}

fn accepted(applied: &crate::backend::Applied) -> Result<MessageAccepted> {
    let outcome = applied
        .deliveries
        .first()
        .ok_or_else(|| DsError::Internal("a sent message was not delivered".into()))?;
    Ok(MessageAccepted {
        message_id: outcome.message_id,
        recipients: outcome.recipients,
    })
}
