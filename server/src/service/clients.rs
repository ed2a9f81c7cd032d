//! Clients: request authentication, registration (proof of possession of
//! the key registered), sessions (opened by signature only), and deletion
//! (a tombstone keeps the id reserved).

use mls_ds_protocol::auth::{AuthToken, SessionCreated};
use mls_ds_protocol::clients::{RegisterClient, Registered};
use mls_ds_protocol::ClientId;

use super::auth::{Caller, RegisteredKey, RequestView};
use super::error::{DsError, Result};
use super::Ds;
use crate::backend::records::{now_ms, ClientRecord};
use crate::backend::write_set::{Change, Condition, WriteSet};
use crate::backend::{Backend, StoreError};

/// How a registration ended.
pub(crate) enum Registration {
    /// The client is new.
    Created(Registered),
    /// The same id was already registered with the same key.
    Existing(Registered),
}

fn key_of(record: &ClientRecord) -> RegisteredKey<'_> {
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
                self.auth.verify_signature(sig, key_of(&record), view)
            }
            AuthToken::Session(s) => self.auth.verify_session(s, view),
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
        };
        self.auth.verify_signature(sig, key_of(&record), view)?;
        let id = req.client_id;
        if let Some(existing) = self.backend.client(&id).await? {
            return self.registered_before(id, &existing, &record).await;
        }
        let set = WriteSet {
            conditions: vec![Condition::ClientAbsent(id.clone())],
            changes: vec![Change::PutClient {
                id: id.clone(),
                record: record.clone(),
            }],
            deliveries: Vec::new(),
        };
        match self.backend.submit(set).wait().await {
            Ok(_) => {
                tracing::debug!(client = %id, "registered client");
                Ok(Registration::Created(Registered { client_id: id }))
            }
            // Registered concurrently (by this request's twin, or by another).
            Err(StoreError::ConditionFailed(Condition::ClientAbsent(_))) => {
                let existing = self.backend.client(&id).await?.ok_or_else(|| {
                    DsError::Internal(format!("client {id} vanished after a registration"))
                })?;
                self.registered_before(id, &existing, &record).await
            }
            Err(e) => Err(e.into()),
        }
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
        // Same key: the same answer, once the original registration is durable.
        self.backend.settled().wait().await?;
        Ok(Registration::Existing(Registered { client_id: id }))
    }

    /// `POST /v1/sessions`: only a signature token may open a session, so a
    /// session cannot extend itself without the client's key.
    pub(crate) fn open_session(&self, caller: &Caller) -> Result<SessionCreated> {
        if !caller.by_signature {
            return Err(DsError::Unauthenticated(
                "a session must be opened with a signature token".into(),
            ));
        }
        self.auth.open_session(&caller.client)
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
