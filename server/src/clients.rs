//! Client registration, sessions, and deletion.

use mls_ds_protocol::auth::{AuthToken, SessionCreated};
use mls_ds_protocol::clients::{RegisterClient, Registered};
use mls_ds_protocol::{decode, ClientId};
use mls_ds_storage::codec::decode_record;

use crate::auth::{Caller, RequestView};
use crate::db::{now_ms, ClientRecord};
use crate::error::{Result, ServerError};
use crate::http::Reply;
use crate::state::AppState;

/// Look up a registered client.
pub fn load(state: &AppState, id: &ClientId) -> Result<Option<ClientRecord>> {
    let db = &state.db;
    match db.storage.get_raw(db.clients, id.as_bytes())? {
        Some(bytes) => Ok(Some(decode_record(
            "app.ds.clients",
            id.as_bytes(),
            &bytes,
        )?)),
        None => Ok(None),
    }
}

/// Ids of every client that deleted itself.
pub fn deleted_clients(db: &crate::db::Db) -> Result<std::collections::HashSet<ClientId>> {
    let mut out = std::collections::HashSet::new();
    for (k, v) in db.storage.scan_raw(db.clients, b"")? {
        let r: ClientRecord = decode_record("app.ds.clients", &k, &v)?;
        if r.is_deleted() {
            out.insert(ClientId::new(&k)?);
        }
    }
    Ok(out)
}

/// Look up a client that must exist and not be deleted.
pub fn require(state: &AppState, id: &ClientId) -> Result<ClientRecord> {
    match load(state, id)? {
        Some(r) if !r.is_deleted() => Ok(r),
        Some(_) => Err(ServerError::NotFound(format!("client {id} was deleted"))),
        None => Err(ServerError::NotFound(format!("unknown client {id}"))),
    }
}

/// `POST /v1/clients`. The request must be signed (signature token) by the
/// key it registers, which proves possession.
pub async fn register(state: &AppState, token: &AuthToken, req: &RequestView<'_>) -> Result<Reply> {
    let body: RegisterClient = decode(req.body)?;
    body.client_id.validate()?;
    let AuthToken::Signature(sig) = token else {
        return Err(ServerError::Unauthorized(
            "registration must be signed with the key being registered".into(),
        ));
    };
    if sig.client_id != body.client_id {
        return Err(ServerError::Forbidden(
            "token client id differs from the client being registered".into(),
        ));
    }
    if body.signature_key.as_slice().is_empty() || body.signature_key.as_slice().len() > 1024 {
        return Err(ServerError::BadRequest(
            "signature key must be 1 to 1024 bytes".into(),
        ));
    }
    let record = ClientRecord {
        signature_scheme: body.signature_scheme,
        signature_key: body.signature_key.as_slice().to_vec(),
        registered_ms: now_ms(),
        deleted_ms: None,
    };
    state.auth.verify_signature(sig, &record, req)?;
    let reply = Registered {
        client_id: body.client_id.clone(),
    };
    let durable = {
        // Check and submit under one lock, so two registrations of one id
        // cannot both succeed. The write is applied by the flusher, so ids
        // submitted but not yet applied are looked up in `registering`.
        let mut registering = state.registering.lock().unwrap_or_else(|e| e.into_inner());
        let known = match registering.get(&body.client_id) {
            Some(r) => Some(r.clone()),
            None => load(state, &body.client_id)?,
        };
        if let Some(existing) = known {
            if existing.is_deleted() {
                return Err(ServerError::Conflict(format!(
                    "client id {} was deleted and cannot be registered again",
                    body.client_id
                )));
            }
            if existing.signature_key != record.signature_key
                || existing.signature_scheme != record.signature_scheme
            {
                return Err(ServerError::Conflict(format!(
                    "client id {} is registered with another key",
                    body.client_id
                )));
            }
            // Same key: idempotent, once the original registration is durable.
            None
        } else {
            let db = &state.db;
            let tx = db.storage.begin();
            tx.put_record(db.clients, body.client_id.as_bytes(), &record)?;
            registering.insert(body.client_id.clone(), record);
            let pending = state.registering.clone();
            let id = body.client_id.clone();
            // Once applied and flushed, sled answers for it.
            let after = Box::new(move || {
                pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
            match state.flusher.submit(vec![tx.into_pending()?], Some(after)) {
                Ok(d) => Some(d),
                Err(e) => {
                    registering.remove(&body.client_id);
                    return Err(e);
                }
            }
        }
    };
    let Some(durable) = durable else {
        state.flusher.durable().await?;
        return Reply::ok(&reply);
    };
    durable.wait().await?;
    tracing::debug!(client = %body.client_id, "registered client");
    Reply::created(&reply)
}

/// `POST /v1/sessions`: only a signature token may open a session, so a
/// session cannot extend itself without the client's key.
pub fn open_session(state: &AppState, token: &AuthToken, caller: &Caller) -> Result<Reply> {
    if !matches!(token, AuthToken::Signature(_)) {
        return Err(ServerError::Unauthorized(
            "a session must be opened with a signature token".into(),
        ));
    }
    let created: SessionCreated = state.auth.open_session(&caller.client)?;
    Reply::ok(&created)
}

/// `DELETE /v1/clients/{id}`: the client itself removes its key packages,
/// queue and sessions. The id stays reserved (a tombstone), so nobody can
/// register it again and inherit its groups. Its leaves in groups stay until a
/// member commits their removal; nothing is queued for it meanwhile.
pub async fn delete(state: &AppState, caller: &Caller, id: &ClientId) -> Result<Reply> {
    if &caller.client != id {
        return Err(ServerError::Forbidden(
            "a client can only delete itself".into(),
        ));
    }
    let mut record = require(state, id)?;
    record.deleted_ms = Some(now_ms());
    let db = &state.db;
    let tx = db.storage.begin();
    for (k, _) in db
        .storage
        .scan_raw(db.key_packages, &crate::db::client_key(id))?
    {
        tx.remove_raw(db.key_packages, &k)?;
    }
    tx.put_record(db.clients, id.as_bytes(), &record)?;
    // Marked first, so that nothing new is queued for it meanwhile.
    state.mark_deleted(id);
    state.queues.delete_client(tx, id)?.wait().await?;
    state.auth.end_sessions(id);
    tracing::info!(client = %id, "deleted client");
    Ok(Reply::no_content())
}
