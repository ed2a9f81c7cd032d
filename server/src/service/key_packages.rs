//! Key packages: publish (validated by OpenMLS), claim exactly once, the
//! last resort, count, and expiry pruning.

use mls_ds_protocol::key_packages::{ClaimedKeyPackage, KeyPackageCount, PublishKeyPackages};
use mls_ds_protocol::ClientId;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, KeyPackageIn, MlsMessageBodyIn, MlsMessageIn, ProtocolVersion,
};

use super::auth::Caller;
use super::error::{DsError, Result};
use super::Ds;
use crate::backend::records::{now_ms, KeyPackageRecord};
use crate::backend::write_set::{Change, Condition, WriteSet};
use crate::backend::{Backend, StoreError};

fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Prefix a validation error with which package it concerns.
fn about(e: DsError, which: &str) -> DsError {
    match e {
        DsError::Invalid(m) => DsError::Invalid(format!("{which}: {m}")),
        DsError::Forbidden(m) => DsError::Forbidden(format!("{which}: {m}")),
        other => other,
    }
}

impl<B: Backend> Ds<B> {
    /// Parse and validate one key package published by `owner` (whose
    /// registered key is `owner_key`).
    fn validate_key_package(
        &self,
        owner: &ClientId,
        owner_key: &[u8],
        bytes: &[u8],
    ) -> Result<KeyPackageRecord> {
        // Accept an MLSMessage(KeyPackage) or a bare KeyPackage.
        let kp_in = match MlsMessageIn::tls_deserialize_exact(bytes) {
            Ok(msg) => match msg.extract() {
                MlsMessageBodyIn::KeyPackage(kp) => kp,
                _ => return Err(DsError::Invalid("message is not a key package".into())),
            },
            Err(_) => KeyPackageIn::tls_deserialize_exact(bytes)
                .map_err(|e| DsError::Invalid(format!("malformed key package: {e}")))?,
        };
        let kp = kp_in
            .validate(&self.crypto, ProtocolVersion::Mls10)
            .map_err(|e| DsError::Invalid(format!("invalid key package: {e}")))?;
        let leaf = kp.leaf_node();
        let identity = BasicCredential::try_from(leaf.credential().clone())
            .map_err(|_| DsError::Invalid("key package credential must be basic".into()))?;
        if identity.identity() != owner.as_bytes() {
            return Err(DsError::Forbidden(
                "key package credential names another client".into(),
            ));
        }
        if leaf.signature_key().as_slice() != owner_key {
            return Err(DsError::Forbidden(
                "key package signature key is not the client's registered key".into(),
            ));
        }
        let kp_ref = kp
            .hash_ref(&self.crypto)
            .map_err(|e| DsError::Internal(format!("hash reference: {e}")))?;
        Ok(KeyPackageRecord {
            message: bytes.to_vec(),
            kp_ref: kp_ref.as_slice().to_vec(),
            not_after: kp.life_time().not_after(),
            claims: 0,
        })
    }

    /// `POST /v1/key-packages`: answers with the new count.
    pub(crate) async fn publish_key_packages(
        &self,
        caller: &Caller,
        req: PublishKeyPackages,
    ) -> Result<KeyPackageCount> {
        let max = self.policy.max_key_package_batch;
        if req.key_packages.len() > max {
            return Err(DsError::Invalid(format!(
                "at most {max} key packages per request"
            )));
        }
        let owner = self.require_client(&caller.client).await?;
        // Expired packages wait for the pruning task: they do not count.
        // Concurrent publishes of one client may each pass this check; the
        // per-client request limit bounds by how much.
        let stored = self.unexpired_key_packages(&caller.client).await?;
        let quota = self.policy.max_key_packages;
        if stored + req.key_packages.len() > quota {
            return Err(DsError::QuotaExceeded(format!(
                "at most {quota} key packages are kept per client; {stored} are stored"
            )));
        }
        let mut changes = Vec::with_capacity(req.key_packages.len() + 1);
        for (i, bytes) in req.key_packages.iter().enumerate() {
            let record = self
                .validate_key_package(&caller.client, &owner.signature_key, bytes.as_slice())
                .map_err(|e| about(e, &format!("key package {i}")))?;
            changes.push(Change::PutKeyPackage {
                owner: caller.client.clone(),
                record,
            });
        }
        if let Some(bytes) = &req.last_resort {
            let record = self
                .validate_key_package(&caller.client, &owner.signature_key, bytes.as_slice())
                .map_err(|e| about(e, "last-resort key package"))?;
            changes.push(Change::PutLastResort {
                owner: caller.client.clone(),
                record,
            });
        }
        let set = WriteSet {
            // A client deleting itself meanwhile takes its packages with it,
            // and one recovered meanwhile (a new key) takes none signed by
            // the old one.
            conditions: vec![Condition::ClientKeyIs {
                client: caller.client.clone(),
                key: owner.signature_key.clone(),
            }],
            changes,
            deliveries: Vec::new(),
        };
        match self.backend.submit(set).wait().await {
            Ok(_) => {}
            Err(StoreError::ConditionFailed(Condition::ClientKeyIs { .. })) => {
                return Err(DsError::Conflict(format!(
                    "client {} was deleted or recovered with a new key meanwhile",
                    caller.client
                )))
            }
            Err(e) => return Err(e.into()),
        }
        self.key_package_count(caller).await
    }

    /// How many of `client`'s ordinary key packages have not expired.
    async fn unexpired_key_packages(&self, client: &ClientId) -> Result<usize> {
        let now = now_secs();
        Ok(self
            .backend
            .key_packages(client)
            .await?
            .iter()
            .filter(|r| r.not_after >= now)
            .count())
    }

    /// `GET /v1/key-packages`: how many of the caller's packages are left.
    pub(crate) async fn key_package_count(&self, caller: &Caller) -> Result<KeyPackageCount> {
        let remaining = self.unexpired_key_packages(&caller.client).await?;
        let last_resort = self.backend.last_resort(&caller.client).await?;
        Ok(KeyPackageCount {
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            has_last_resort: last_resort.is_some().into(),
            last_resort_claims: last_resort.as_ref().map_or(0, |r| r.claims),
            last_resort_not_after: last_resort.as_ref().map_or(0, |r| r.not_after),
        })
    }

    /// `POST /v1/clients/{id}/key-package`: hand out one key package of
    /// `target` exactly once (the last-resort one, never consumed, when none
    /// is left; its claim count tells the owner). The claim is conditional
    /// on the package still being there (or, for the last resort, on its
    /// count), so concurrent claimers (on any DS process) never get the same
    /// one; a claimer that lost the race tries the next. The package's
    /// reference is recorded so that the Welcome for it can be routed.
    /// Claims are rate limited per claimer and per target, so that nobody
    /// drains another client's packages.
    pub(crate) async fn claim_key_package(
        &self,
        caller: &Caller,
        target: &ClientId,
    ) -> Result<ClaimedKeyPackage> {
        self.require_client(target).await?;
        if let Err(wait) = self.claims_by_claimer.check(&caller.client) {
            return Err(DsError::RateLimited {
                message: "too many key package claims by this client, retry later".into(),
                retry_after_secs: wait.secs(),
            });
        }
        if let Err(wait) = self.claims_by_target.check(target) {
            self.claims_by_claimer.refund(&caller.client);
            return Err(DsError::RateLimited {
                message: format!("too many claims of {target}'s key packages, retry later"),
                retry_after_secs: wait.secs(),
            });
        }
        loop {
            let now = now_secs();
            let stored = self.backend.key_packages(target).await?;
            // Expired packages passed over are removed in the same write.
            let expired = stored.iter().take_while(|r| r.not_after < now);
            let mut changes: Vec<Change> = expired
                .map(|r| Change::RemoveKeyPackage {
                    owner: target.clone(),
                    kp_ref: r.kp_ref.clone(),
                })
                .collect();
            let (chosen, last_resort) = match stored.iter().find(|r| r.not_after >= now) {
                Some(r) => (r.clone(), false),
                None => match self.backend.last_resort(target).await? {
                    Some(r) => (r, true),
                    None => {
                        if !changes.is_empty() {
                            self.backend
                                .submit(WriteSet {
                                    changes,
                                    ..WriteSet::default()
                                })
                                .wait()
                                .await?;
                        }
                        return Err(DsError::NotFound(format!(
                            "client {target} has no key package left"
                        )));
                    }
                },
            };
            let mut conditions = Vec::new();
            if last_resort {
                conditions.push(Condition::LastResortAt {
                    owner: target.clone(),
                    kp_ref: chosen.kp_ref.clone(),
                    claims: chosen.claims,
                });
                changes.push(Change::PutLastResort {
                    owner: target.clone(),
                    record: KeyPackageRecord {
                        claims: chosen.claims.saturating_add(1),
                        ..chosen.clone()
                    },
                });
            } else {
                conditions.push(Condition::KeyPackageUnclaimed {
                    owner: target.clone(),
                    kp_ref: chosen.kp_ref.clone(),
                });
                changes.push(Change::RemoveKeyPackage {
                    owner: target.clone(),
                    kp_ref: chosen.kp_ref.clone(),
                });
            }
            // Owner routes stay after the Welcome: a last-resort package can
            // be added to several groups, each needing the route.
            changes.push(Change::PutKeyPackageOwner {
                kp_ref: chosen.kp_ref.clone(),
                owner: target.clone(),
            });
            let set = WriteSet {
                conditions,
                changes,
                deliveries: Vec::new(),
            };
            match self.backend.submit(set).wait().await {
                Ok(_) => {
                    return Ok(ClaimedKeyPackage {
                        key_package: chosen.message.into(),
                        last_resort: last_resort.into(),
                    })
                }
                // Another claimer took it (or counted the last resort, or
                // replaced it): every retry follows another claim or a
                // publication, so the loop ends.
                Err(StoreError::ConditionFailed(
                    Condition::KeyPackageUnclaimed { .. } | Condition::LastResortAt { .. },
                )) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Remove expired ordinary key packages of every client (run
    /// periodically). Returns how many were removed.
    pub(crate) async fn prune_key_packages(&self) -> Result<usize> {
        let expired = self.backend.expired_key_packages(now_secs()).await?;
        let count = expired.len();
        let changes = expired
            .into_iter()
            .map(|e| Change::RemoveKeyPackage {
                owner: e.owner,
                kp_ref: e.kp_ref,
            })
            .collect();
        self.write_in_chunks(changes).await?;
        Ok(count)
    }
}
