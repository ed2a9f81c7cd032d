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

/// Look up a client that must exist.
pub fn require(state: &AppState, id: &ClientId) -> Result<ClientRecord> {
    load(state, id)?.ok_or_else(|| ServerError::NotFound(format!("unknown client {id}")))
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
    };
    state.auth.verify_signature(sig, &record, req)?;
    let reply = Registered {
        client_id: body.client_id.clone(),
    };
    if let Some(existing) = load(state, &body.client_id)? {
        if existing.signature_key == record.signature_key
            && existing.signature_scheme == record.signature_scheme
        {
            return Reply::ok(&reply);
        }
        return Err(ServerError::Conflict(format!(
            "client id {} is registered with another key",
            body.client_id
        )));
    }
    let db = &state.db;
    let tx = db.storage.begin();
    tx.put_record(db.clients, body.client_id.as_bytes(), &record)?;
    tx.commit()?;
    state.flusher.durable().await?;
    tracing::info!(client = %body.client_id, "registered client");
    Reply::created(&reply)
}

/// `POST /v1/sessions`.
pub fn open_session(state: &AppState, caller: &Caller) -> Result<Reply> {
    let created: SessionCreated = state.auth.open_session(&caller.client)?;
    Reply::ok(&created)
}

/// `DELETE /v1/clients/{id}`: the client itself removes its registration, key
/// packages, queue and sessions. Its leaves in groups stay until a member
/// commits their removal.
pub async fn delete(state: &AppState, caller: &Caller, id: &ClientId) -> Result<Reply> {
    if &caller.client != id {
        return Err(ServerError::Forbidden(
            "a client can only delete itself".into(),
        ));
    }
    require(state, id)?;
    let db = &state.db;
    let tx = db.storage.begin();
    for (k, _) in db
        .storage
        .scan_raw(db.key_packages, &crate::db::client_key(id))?
    {
        tx.remove_raw(db.key_packages, &k)?;
    }
    state.queues.stage_delete_client(&tx, id)?;
    tx.remove_raw(db.clients, id.as_bytes())?;
    tx.commit()?;
    state.flusher.durable().await?;
    state.queues.forget_client(id);
    state.auth.end_sessions(id);
    tracing::info!(client = %id, "deleted client");
    Ok(Reply::no_content())
}
