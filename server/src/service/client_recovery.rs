//! Taking a client id back after losing its store: `POST
//! /v1/clients/{id}/recover` binds the id to a new key if the request
//! carries the secret whose hash the client registered, and `GET
//! /v1/groups` tells it which groups to rejoin.

use mls_ds_protocol::auth::AuthToken;
use mls_ds_protocol::clients::{
    recovery_hash, GroupList, RecoverClient, Registered, RECOVERY_SECRET_LEN,
};
use mls_ds_protocol::ClientId;

use super::auth::{Caller, RequestView};
use super::clients::key_of;
use super::error::{DsError, Result};
use super::Ds;
use crate::backend::records::ClientRecord;
use crate::backend::write_set::{Change, Condition, WriteSet};
use crate::backend::{Backend, StoreError};

/// Compare two byte strings in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<B: Backend> Ds<B> {
    /// `POST /v1/clients/{id}/recover`, signed with the new key.
    pub(crate) async fn recover(
        &self,
        token: &AuthToken,
        view: &RequestView<'_>,
        id: ClientId,
        req: RecoverClient,
    ) -> Result<Registered> {
        let AuthToken::Signature(sig) = token else {
            return Err(DsError::Unauthenticated(
                "a recovery must be signed with the new key".into(),
            ));
        };
        if sig.client_id != id {
            return Err(DsError::Forbidden(
                "token client id differs from the client being recovered".into(),
            ));
        }
        let key = req.signature_key.as_slice();
        if key.is_empty() || key.len() > 1024 {
            return Err(DsError::Invalid(
                "signature key must be 1 to 1024 bytes".into(),
            ));
        }
        if req.new_recovery_hash.as_slice().len() != RECOVERY_SECRET_LEN {
            return Err(DsError::Invalid(format!(
                "a recovery hash has {RECOVERY_SECRET_LEN} bytes"
            )));
        }
        let old = self.require_client(&id).await?;
        let record = ClientRecord {
            signature_scheme: req.signature_scheme,
            signature_key: key.to_vec(),
            recovery_hash: Some(req.new_recovery_hash.as_slice().to_vec()),
            ..old.clone()
        };
        // Possession of the new key first: the secret is compared only for
        // a caller that holds the key it asks for.
        self.auth
            .verify_signature(sig, key_of(&record), view)
            .await?;
        if old.signature_key == key
            && old.recovery_hash.as_deref() == Some(req.new_recovery_hash.as_slice())
        {
            // A retry of a recovery that was done: the same answer, once
            // durable.
            self.backend.settled().wait().await?;
            return Ok(Registered {
                client_id: id,
                recovery_set: true.into(),
            });
        }
        let Some(stored) = &old.recovery_hash else {
            return Err(DsError::Forbidden(format!(
                "client {id} registered no recovery secret"
            )));
        };
        if !same_secret(&recovery_hash(req.recovery_secret.as_slice()), stored) {
            return Err(DsError::Forbidden("wrong recovery secret".into()));
        }
        // The old key packages' private keys went with the lost store: a
        // Welcome to one could never be opened. All of them as stored when
        // the write is applied, so that a publish racing this one (with the
        // old key) leaves none behind.
        let changes = vec![
            Change::RemoveKeyPackagesOf { owner: id.clone() },
            Change::PutClient {
                id: id.clone(),
                record,
            },
        ];
        let set = WriteSet {
            conditions: vec![Condition::ClientKeyIs {
                client: id.clone(),
                key: old.signature_key,
            }],
            changes,
            deliveries: Vec::new(),
        };
        match self.backend.submit(set).wait().await {
            Ok(_) => {}
            Err(StoreError::ConditionFailed(Condition::ClientKeyIs { .. })) => {
                return Err(DsError::Conflict(format!(
                    "client {id} was recovered or deleted meanwhile"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        self.auth.end_sessions(&id);
        tracing::info!(client = %id, "client recovered with a new key");
        Ok(Registered {
            client_id: id,
            recovery_set: true.into(),
        })
    }

    /// `GET /v1/groups`: the groups whose roster lists the caller. Reads
    /// every group's record (a client asks this once, after a recovery).
    pub(crate) async fn groups_of(&self, caller: &Caller) -> Result<GroupList> {
        let me = caller.client.as_bytes();
        let groups = self
            .backend
            .groups()
            .await?
            .into_iter()
            .filter(|g| g.record.members.iter().any(|m| m == me))
            .map(|g| g.id.as_bytes().to_vec().into())
            .collect();
        Ok(GroupList { groups })
    }
}
