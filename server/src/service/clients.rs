//! Clients: request authentication, registration (proof of possession of
//! the key registered), sessions (opened by signature only), and deletion
//! (a tombstone keeps the id reserved).

use mls_ds_protocol::auth::{AuthToken, SessionCreated};
use mls_ds_protocol::clients::{RegisterClient, Registered, RECOVERY_SECRET_LEN};
use mls_ds_protocol::ClientId;

use super::auth::{Caller, RegisteredKey, RequestView};
use super::error::{DsError, Result};
use super::{Ds, RegistrationPolicy};
use crate::backend::records::{now_ms, ClientRecord, SharedSession};
use crate::backend::write_set::{Change, Condition, WriteSet};
use crate::backend::{Backend, StoreError};

/// How a registration ended.
pub(crate) enum Registration {
    /// The client is new.
    Created(Registered),
    /// The same id was already registered with the same key.
    Existing(Registered),
}

pub(super) fn key_of(record: &ClientRecord) -> RegisteredKey<'_> {
    RegisteredKey {
        scheme: record.signature_scheme,
        public_key: &record.signature_key,
    }
}

impl<B: Backend> Ds<B> {
    /// Verify a request's token: a signature by a registered client's key,
    /// or a session's MAC.
    pub(crate) async fn authenticate(
        &self,
        token: &AuthToken,
        view: &RequestView<'_>,
    ) -> Result<Caller> {
        match token {
            AuthToken::Signature(sig) => {
                let record = self
                    .backend
                    .client(&sig.client_id)
                    .await?
                    .filter(|r| !r.is_deleted())
                    .ok_or_else(|| {
                        DsError::Unauthenticated(format!("unknown client {}", sig.client_id))
                    })?;
                self.auth.verify_signature(sig, key_of(&record), view).await
            }
            AuthToken::Session(s) => match self.auth.verify_session(s, view) {
                // A session another process on the same storage opened.
                Err(e) if !self.auth.knows_session(&s.session_id) => {
                    match self.backend.shared_session(&s.session_id).await? {
                        Some(shared) => {
                            self.auth.adopt_session(
                                s.session_id,
                                shared.client,
                                shared.key,
                                shared.expires_ms,
                            );
                            self.auth.verify_session(s, view)
                        }
                        None => Err(e),
                    }
                }
                verified => verified,
            },
        }
    }

    /// A client that must exist and not be deleted.
    pub(crate) async fn require_client(&self, id: &ClientId) -> Result<ClientRecord> {
        match self.backend.client(id).await? {
            Some(r) if !r.is_deleted() => Ok(r),
            Some(_) => Err(DsError::NotFound(format!("client {id} was deleted"))),
            None => Err(DsError::NotFound(format!("unknown client {id}"))),
        }
    }

    /// `POST /v1/clients`. The request must be signed (signature token) by
    /// the key it registers, which proves possession. Registering an id
    /// again with the same key succeeds again.
    pub(crate) async fn register(
        &self,
        token: &AuthToken,
        view: &RequestView<'_>,
        req: RegisterClient,
    ) -> Result<Registration> {
        req.client_id.validate()?;
        let AuthToken::Signature(sig) = token else {
            return Err(DsError::Unauthenticated(
                "registration must be signed with the key being registered".into(),
            ));
        };
        if sig.client_id != req.client_id {
            return Err(DsError::Forbidden(
                "token client id differs from the client being registered".into(),
            ));
        }
        let key = req.signature_key.as_slice();
        if key.is_empty() || key.len() > 1024 {
            return Err(DsError::Invalid(
                "signature key must be 1 to 1024 bytes".into(),
            ));
        }
        let record = ClientRecord {
            signature_scheme: req.signature_scheme,
            signature_key: key.to_vec(),
            registered_ms: now_ms(),
            deleted_ms: None,
            recovery_hash: match &req.recovery_hash {
                Some(h) if h.as_slice().len() != RECOVERY_SECRET_LEN => {
                    return Err(DsError::Invalid(format!(
                        "a recovery hash has {RECOVERY_SECRET_LEN} bytes"
                    )))
                }
                Some(h) => Some(h.as_slice().to_vec()),
                None => None,
            },
        };
        self.auth
            .verify_signature(sig, key_of(&record), view)
            .await?;
        let invite = match &req.invite {
            Some(code) => Some(
                std::str::from_utf8(code.as_slice())
                    .map_err(|_| DsError::Invalid("invitation code is not UTF-8".into()))?
                    .to_owned(),
            ),
            None => None,
        };
        let id = req.client_id;
        if let Some(existing) = self.backend.client(&id).await? {
            return self.registered_before(id, &existing, &record).await;
        }
        let invite = match (self.policy.registration, invite) {
            (RegistrationPolicy::Open, _) => None,
            (RegistrationPolicy::Closed, _) => {
                return Err(DsError::Forbidden(
                    "registration is closed on this DS: its operator adds clients".into(),
                ))
            }
            (RegistrationPolicy::Invite, None) => {
                return Err(DsError::Forbidden(
                    "registration on this DS needs an invitation code from its operator".into(),
                ))
            }
            (RegistrationPolicy::Invite, Some(code)) => Some(code),
        };
        self.add_client(id, record, invite.as_deref()).await
    }

    /// Store a new client, using up one use of `invite` if given. A
    /// registration that raced with another of the same id gets the answer
    /// for an id registered before; one that raced for the last use of the
    /// invitation tries again.
    async fn add_client(
        &self,
        id: ClientId,
        record: ClientRecord,
        invite: Option<&str>,
    ) -> Result<Registration> {
        loop {
            let mut set = WriteSet {
                conditions: vec![Condition::ClientAbsent(id.clone())],
                changes: vec![Change::PutClient {
                    id: id.clone(),
                    record: record.clone(),
                }],
                deliveries: Vec::new(),
            };
            if let Some(code) = invite {
                self.use_invite(code, &mut set).await?;
            }
            match self.backend.submit(set).wait().await {
                Ok(_) => {
                    tracing::debug!(client = %id, invited = invite.is_some(), "registered client");
                    return Ok(Registration::Created(Registered {
                        client_id: id,
                        recovery_set: record.recovery_hash.is_some().into(),
                    }));
                }
                // Registered concurrently (by this request's twin, or by another).
                Err(StoreError::ConditionFailed(Condition::ClientAbsent(_))) => {
                    let existing = self.backend.client(&id).await?.ok_or_else(|| {
                        DsError::Internal(format!("client {id} vanished after a registration"))
                    })?;
                    return self.registered_before(id, &existing, &record).await;
                }
                Err(StoreError::ConditionFailed(Condition::InviteAt { .. })) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Operator: register `id` with a public key the client gave the
    /// operator (how clients join a DS whose registration is closed).
    pub(crate) async fn operator_add_client(
        &self,
        id: ClientId,
        signature_scheme: u16,
        signature_key: Vec<u8>,
    ) -> Result<Registration> {
        let record = ClientRecord {
            signature_scheme,
            signature_key,
            registered_ms: now_ms(),
            deleted_ms: None,
            recovery_hash: None,
        };
        if let Some(existing) = self.backend.client(&id).await? {
            return self.registered_before(id, &existing, &record).await;
        }
        self.add_client(id, record, None).await
    }

    /// The answer to a registration of an id that is already registered.
    async fn registered_before(
        &self,
        id: ClientId,
        existing: &ClientRecord,
        requested: &ClientRecord,
    ) -> Result<Registration> {
        if existing.is_deleted() {
            return Err(DsError::Conflict(format!(
                "client id {id} was deleted and cannot be registered again"
            )));
        }
        if existing.signature_key != requested.signature_key
            || existing.signature_scheme != requested.signature_scheme
        {
            return Err(DsError::Conflict(format!(
                "client id {id} is registered with another key"
            )));
        }
        // Same key, proven by the token. A recovery hash is taken if the id
        // has none yet (e.g. the operator added the client), on the
        // condition that no recovery changed the key meanwhile; one it has
        // is replaced only by a recovery.
        if requested.recovery_hash.is_some() && existing.recovery_hash.is_none() {
            let set = WriteSet {
                conditions: vec![Condition::ClientKeyIs {
                    client: id.clone(),
                    key: existing.signature_key.clone(),
                }],
                changes: vec![Change::PutClient {
                    id: id.clone(),
                    record: ClientRecord {
                        recovery_hash: requested.recovery_hash.clone(),
                        ..existing.clone()
                    },
                }],
                deliveries: Vec::new(),
            };
            return match self.backend.submit(set).wait().await {
                Ok(_) => Ok(Registration::Existing(Registered {
                    client_id: id,
                    recovery_set: true.into(),
                })),
                Err(StoreError::ConditionFailed(_)) => Err(DsError::Conflict(format!(
                    "client {id} was recovered or deleted meanwhile"
                ))),
                Err(e) => Err(e.into()),
            };
        }
        // Same key: the same answer, once the original registration is durable.
        self.backend.settled().wait().await?;
        Ok(Registration::Existing(Registered {
            client_id: id,
            recovery_set: (requested.recovery_hash.is_some()
                && requested.recovery_hash == existing.recovery_hash)
                .into(),
        }))
    }

    /// `POST /v1/sessions`: only a signature token may open a session, so a
    /// session cannot extend itself without the client's key.
    pub(crate) async fn open_session(&self, caller: &Caller) -> Result<SessionCreated> {
        if !caller.by_signature {
            return Err(DsError::Unauthenticated(
                "a session must be opened with a signature token".into(),
            ));
        }
        let created = self.auth.open_session(&caller.client)?;
        // A recovery may have bound the id to a new key after the token was
        // checked, and ended the id's sessions before this one existed:
        // look again, now that it does.
        let current = self.backend.client(&caller.client).await?;
        if current.is_none_or(|r| r.is_deleted() || r.signature_key != caller.signed_with) {
            self.auth.end_sessions(&caller.client);
            return Err(DsError::Unauthenticated(format!(
                "client {} was deleted or recovered with a new key meanwhile",
                caller.client
            )));
        }
        let shared = SharedSession {
            id: created.session_id,
            client: caller.client.clone(),
            key: created.session_key,
            expires_ms: created.expires_at_ms,
        };
        if !self
            .backend
            .share_session(&shared, &caller.signed_with)
            .await?
        {
            self.auth.end_sessions(&caller.client);
            return Err(DsError::Unauthenticated(format!(
                "client {} was deleted or recovered with a new key meanwhile",
                caller.client
            )));
        }
        Ok(created)
    }

    /// `DELETE /v1/clients/{id}`: the client itself removes its key
    /// packages, queue and sessions. The id stays reserved (a tombstone), so
    /// nobody can register it again and inherit its groups. Its leaves in
    /// groups stay until a member commits their removal; nothing is queued
    /// for it meanwhile.
    pub(crate) async fn delete_client(&self, caller: &Caller, id: &ClientId) -> Result<()> {
        if &caller.client != id {
            return Err(DsError::Forbidden("a client can only delete itself".into()));
        }
        self.delete_client_unchecked(id).await
    }

    /// Delete `id` (by itself or by the operator): see [`Ds::delete_client`].
    pub(crate) async fn delete_client_unchecked(&self, id: &ClientId) -> Result<()> {
        let mut tombstone = self.require_client(id).await?;
        tombstone.deleted_ms = Some(now_ms());
        let set = WriteSet {
            conditions: vec![Condition::ClientActive(id.clone())],
            changes: vec![Change::DeleteClient {
                id: id.clone(),
                tombstone,
            }],
            deliveries: Vec::new(),
        };
        match self.backend.submit(set).wait().await {
            Ok(_) => {}
            Err(StoreError::ConditionFailed(Condition::ClientActive(_))) => {
                return Err(DsError::NotFound(format!("client {id} was deleted")))
            }
            Err(e) => return Err(e.into()),
        }
        self.auth.end_sessions(id);
        tracing::info!(client = %id, "deleted client");
        Ok(())
    }
}
