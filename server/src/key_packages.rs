//! Key packages: publish (validated by OpenMLS), claim exactly once, last
//! resort, count, and expiry pruning.

use mls_ds_protocol::key_packages::{ClaimedKeyPackage, KeyPackageCount, PublishKeyPackages};
use mls_ds_protocol::{decode, ClientId};
use mls_ds_storage::codec::decode_record;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, KeyPackage, KeyPackageIn, MlsMessageBodyIn, MlsMessageIn, ProtocolVersion,
};

use crate::auth::Caller;
use crate::clients;
use crate::db::{self, KeyPackageRecord};
use crate::error::{Result, ServerError};
use crate::http::Reply;
use crate::state::AppState;

const TREE: &str = "app.ds.key_packages";

fn now_secs() -> u64 {
    db::now_ms() / 1000
}

/// Parse and validate one key package published by `owner`.
fn validate(
    state: &AppState,
    owner: &ClientId,
    owner_key: &[u8],
    bytes: &[u8],
) -> Result<(KeyPackage, Vec<u8>)> {
    // Accept an MLSMessage(KeyPackage) or a bare KeyPackage.
    let kp_in = match MlsMessageIn::tls_deserialize_exact(bytes) {
        Ok(msg) => match msg.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => kp,
            _ => {
                return Err(ServerError::BadRequest(
                    "message is not a key package".into(),
                ))
            }
        },
        Err(_) => KeyPackageIn::tls_deserialize_exact(bytes)
            .map_err(|e| ServerError::BadRequest(format!("malformed key package: {e}")))?,
    };
    let kp = kp_in
        .validate(&state.crypto, ProtocolVersion::Mls10)
        .map_err(|e| ServerError::BadRequest(format!("invalid key package: {e}")))?;
    let leaf = kp.leaf_node();
    let identity = BasicCredential::try_from(leaf.credential().clone())
        .map_err(|_| ServerError::BadRequest("key package credential must be basic".into()))?;
    if identity.identity() != owner.as_bytes() {
        return Err(ServerError::Forbidden(
            "key package credential names another client".into(),
        ));
    }
    if leaf.signature_key().as_slice() != owner_key {
        return Err(ServerError::Forbidden(
            "key package signature key is not the client's registered key".into(),
        ));
    }
    let kp_ref = kp
        .hash_ref(&state.crypto)
        .map_err(|e| ServerError::Internal(format!("hash reference: {e}")))?;
    Ok((kp, kp_ref.as_slice().to_vec()))
}

/// `POST /v1/key-packages`.
pub async fn publish(state: &AppState, caller: &Caller, body: &[u8]) -> Result<Reply> {
    let req: PublishKeyPackages = decode(body)?;
    if req.key_packages.len() > state.limits.max_key_package_batch {
        return Err(ServerError::BadRequest(format!(
            "at most {} key packages per request",
            state.limits.max_key_package_batch
        )));
    }
    let owner = clients::require(state, &caller.client)?;
    let db = &state.db;
    let tx = db.storage.begin();
    for (i, bytes) in req.key_packages.iter().enumerate() {
        let (kp, kp_ref) = validate(
            state,
            &caller.client,
            &owner.signature_key,
            bytes.as_slice(),
        )
        .map_err(|e| prefix(e, &format!("key package {i}: ")))?;
        let record = KeyPackageRecord {
            message: bytes.as_slice().to_vec(),
            kp_ref: kp_ref.clone(),
            not_after: kp.life_time().not_after(),
        };
        tx.put_record(
            db.key_packages,
            &db::kp_key(&caller.client, &kp_ref),
            &record,
        )?;
    }
    if let Some(bytes) = &req.last_resort {
        let (kp, kp_ref) = validate(
            state,
            &caller.client,
            &owner.signature_key,
            bytes.as_slice(),
        )
        .map_err(|e| prefix(e, "last-resort key package: "))?;
        let record = KeyPackageRecord {
            message: bytes.as_slice().to_vec(),
            kp_ref,
            not_after: kp.life_time().not_after(),
        };
        tx.put_record(
            db.key_packages,
            &db::last_resort_key(&caller.client),
            &record,
        )?;
    }
    tx.commit()?;
    state.flusher.durable().await?;
    Reply::ok(&count_for(state, &caller.client)?)
}

fn prefix(e: ServerError, p: &str) -> ServerError {
    match e {
        ServerError::BadRequest(m) => ServerError::BadRequest(format!("{p}{m}")),
        ServerError::Forbidden(m) => ServerError::Forbidden(format!("{p}{m}")),
        other => other,
    }
}

fn count_for(state: &AppState, client: &ClientId) -> Result<KeyPackageCount> {
    let db = &state.db;
    let now = now_secs();
    let mut remaining = 0u32;
    for (k, v) in db
        .storage
        .scan_raw(db.key_packages, &db::kp_prefix(client))?
    {
        let r: KeyPackageRecord = decode_record(TREE, &k, &v)?;
        if r.not_after >= now {
            remaining += 1;
        }
    }
    let has_last_resort = db
        .storage
        .get_raw(db.key_packages, &db::last_resort_key(client))?
        .is_some();
    Ok(KeyPackageCount {
        remaining,
        has_last_resort: has_last_resort.into(),
    })
}

/// `GET /v1/key-packages`.
pub fn count(state: &AppState, caller: &Caller) -> Result<Reply> {
    Reply::ok(&count_for(state, &caller.client)?)
}

/// `POST /v1/clients/{id}/key-package`: hand out one key package of `target`
/// exactly once (the last-resort one, never consumed, when none is left).
/// The package's reference is recorded so the Welcome for it can be routed.
pub async fn claim(state: &AppState, _caller: &Caller, target: &ClientId) -> Result<Reply> {
    clients::require(state, target)?;
    let db = &state.db;
    let (message, last_resort) = {
        // Claims are serialised so that two claimers never see the same package.
        let _guard = state.claim_lock.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_secs();
        let tx = db.storage.begin();
        let mut chosen = None;
        for (k, v) in db
            .storage
            .scan_raw(db.key_packages, &db::kp_prefix(target))?
        {
            let r: KeyPackageRecord = decode_record(TREE, &k, &v)?;
            tx.remove_raw(db.key_packages, &k)?;
            if r.not_after >= now {
                chosen = Some((r, false));
                break;
            }
            // Expired: pruned in the same write.
        }
        if chosen.is_none() {
            if let Some(v) = db
                .storage
                .get_raw(db.key_packages, &db::last_resort_key(target))?
            {
                let r: KeyPackageRecord = decode_record(TREE, &db::last_resort_key(target), &v)?;
                chosen = Some((r, true));
            }
        }
        let (record, last_resort) = match chosen {
            Some(c) => c,
            None => {
                tx.commit()?;
                return Err(ServerError::NotFound(format!(
                    "client {target} has no key package left"
                )));
            }
        };
        tx.put_raw(db.kp_owners, &record.kp_ref, target.as_bytes())?;
        tx.commit()?;
        (record.message, last_resort)
    };
    state.flusher.durable().await?;
    Reply::ok(&ClaimedKeyPackage {
        key_package: message.into(),
        last_resort: last_resort.into(),
    })
}

/// Delete expired key packages of every client (run periodically).
pub fn prune_expired(state: &AppState) -> Result<usize> {
    let db = &state.db;
    let now = now_secs();
    let _guard = state.claim_lock.lock().unwrap_or_else(|e| e.into_inner());
    let tx = db.storage.begin();
    let mut pruned = 0;
    for (k, v) in db.storage.scan_raw(db.key_packages, b"")? {
        let r: KeyPackageRecord = decode_record(TREE, &k, &v)?;
        if r.not_after < now {
            tx.remove_raw(db.key_packages, &k)?;
            pruned += 1;
        }
    }
    tx.commit()?;
    Ok(pruned)
}
