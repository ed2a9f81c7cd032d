//! Groups: creation from a GroupInfo and ratchet tree (the DS builds its own
//! `PublicGroup`), the roster that decides recipients, and GroupInfo for
//! joiners and resyncing members.

use mls_ds_protocol::groups::{CreateGroup, GroupCreated, GroupInfoResponse};
use mls_ds_protocol::{decode, ClientId};
use mls_ds_storage::codec::decode_record;
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, GroupId, MlsMessageBodyIn, MlsMessageIn, ProposalStore, PublicGroup,
    RatchetTreeIn,
};

use crate::auth::Caller;
use crate::clients;
use crate::db::{self, GroupRecord, MAX_GROUP_ID_LEN};
use crate::error::{Result, ServerError};
use crate::http::Reply;
use crate::state::AppState;

const TREE: &str = "app.ds.groups";

/// Load a group's record.
pub fn load(state: &AppState, group_id: &[u8]) -> Result<GroupRecord> {
    let db = &state.db;
    let bytes = db
        .storage
        .get_raw(db.groups, group_id)?
        .ok_or_else(|| ServerError::NotFound(format!("unknown group {}", hex::encode(group_id))))?;
    Ok(decode_record(TREE, group_id, &bytes)?)
}

/// Parse an `MLSMessage` that must hold a GroupInfo.
pub fn parse_group_info(bytes: &[u8]) -> Result<VerifiableGroupInfo> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| ServerError::BadRequest(format!("malformed GroupInfo message: {e}")))?;
    match msg.extract() {
        MlsMessageBodyIn::GroupInfo(gi) => Ok(gi),
        _ => Err(ServerError::BadRequest("message is not a GroupInfo".into())),
    }
}

/// The client ids of a group's members, checking that every leaf is a
/// registered client whose registered key signs for it.
pub fn roster(state: &AppState, group: &PublicGroup) -> Result<Vec<ClientId>> {
    let mut out = Vec::new();
    for m in group.members() {
        let identity = BasicCredential::try_from(m.credential.clone()).map_err(|_| {
            ServerError::BadRequest(format!("leaf {}: credential must be basic", m.index))
        })?;
        let id = ClientId::new(identity.identity()).map_err(|e| {
            ServerError::BadRequest(format!(
                "leaf {}: identity is not a client id: {e}",
                m.index
            ))
        })?;
        let record = clients::load(state, &id)?.ok_or_else(|| {
            ServerError::BadRequest(format!("leaf {}: {id} is not a registered client", m.index))
        })?;
        if record.signature_key != m.signature_key {
            return Err(ServerError::Forbidden(format!(
                "leaf {}: signature key is not the one {id} registered",
                m.index
            )));
        }
        if out.contains(&id) {
            return Err(ServerError::BadRequest(format!(
                "leaf {}: {id} holds two leaves",
                m.index
            )));
        }
        out.push(id);
    }
    Ok(out)
}

/// `POST /v1/groups`.
pub async fn create(state: &AppState, caller: &Caller, body: &[u8]) -> Result<Reply> {
    let req: CreateGroup = decode(body)?;
    let group_info = parse_group_info(req.group_info.as_slice())?;
    let ratchet_tree = RatchetTreeIn::tls_deserialize_exact(req.ratchet_tree.as_slice())
        .map_err(|e| ServerError::BadRequest(format!("malformed ratchet tree: {e}")))?;
    let group_id = group_info.group_id().as_slice().to_vec();
    if group_id.is_empty() || group_id.len() > MAX_GROUP_ID_LEN {
        return Err(ServerError::BadRequest(format!(
            "group id must be 1 to {MAX_GROUP_ID_LEN} bytes"
        )));
    }
    let lock = state.group_lock(&group_id);
    let guard = lock.lock_owned().await;
    let db = &state.db;
    if db.storage.get_raw(db.groups, &group_id)?.is_some() {
        return Err(ServerError::Conflict(format!(
            "group {} exists",
            hex::encode(&group_id)
        )));
    }
    let tx = db.provider.begin();
    let (public_group, _) = PublicGroup::from_external(
        &state.crypto,
        tx.storage(),
        ratchet_tree,
        group_info,
        ProposalStore::new(),
    )
    .map_err(|e| ServerError::BadRequest(format!("invalid group: {e}")))?;
    let members = roster(state, &public_group)?;
    if !members.contains(&caller.client) {
        return Err(ServerError::Forbidden(
            "the creator must be a member of the group".into(),
        ));
    }
    let epoch = public_group.group_context().epoch().as_u64();
    let record = GroupRecord {
        epoch,
        open: req.open.0,
        members: members.iter().map(|m| m.as_bytes().to_vec()).collect(),
        former_members: Vec::new(),
        created_ms: db::now_ms(),
    };
    let s = tx.storage();
    s.put_record(db.groups, &group_id, &record)?;
    s.put_raw(db.group_infos, &group_id, req.group_info.as_slice())?;
    tx.commit()?;
    state
        .flusher
        .submit(Vec::new(), None)?
        .wait_holding(guard)
        .await?;
    tracing::info!(group = %hex::encode(&group_id), epoch, members = members.len(), "created group");
    Reply::created(&GroupCreated {
        group_id: group_id.into(),
        epoch,
    })
}

/// May `client` see the group's GroupInfo (to join or resync)?
pub fn may_read_info(record: &GroupRecord, client: &ClientId) -> bool {
    let id = client.as_bytes();
    record.open
        || record.members.iter().any(|m| m == id)
        || record.former_members.iter().any(|m| m == id)
}

/// `GET /v1/groups/{id}/info`. Read under the group lock, so the epoch,
/// GroupInfo and ratchet tree all belong to the same epoch.
pub async fn info(state: &AppState, caller: &Caller, group_id: &[u8]) -> Result<Reply> {
    load(state, group_id)?;
    let lock = state.group_lock(group_id);
    let _guard = lock.lock().await;
    let record = load(state, group_id)?;
    if !may_read_info(&record, &caller.client) {
        return Err(ServerError::Forbidden(
            "only members, former members, or anyone for an open group may read its GroupInfo"
                .into(),
        ));
    }
    let db = &state.db;
    let group_info = db
        .storage
        .get_raw(db.group_infos, group_id)?
        .ok_or_else(|| ServerError::Internal("group has no GroupInfo".into()))?;
    let public_group = PublicGroup::load(&db.storage, &GroupId::from_slice(group_id))?
        .ok_or_else(|| ServerError::Internal("group state missing".into()))?;
    let tree = public_group
        .export_ratchet_tree()
        .tls_serialize_detached()
        .map_err(|e| ServerError::Internal(format!("encode ratchet tree: {e}")))?;
    Reply::ok(&GroupInfoResponse {
        epoch: record.epoch,
        group_info: group_info.into(),
        ratchet_tree: tree.into(),
    })
}

/// The client a credential names (basic credentials only).
pub fn credential_client(credential: &openmls::prelude::Credential) -> Result<ClientId> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| ServerError::BadRequest("credential must be basic".into()))?;
    Ok(ClientId::new(basic.identity())?)
}

/// Parse a group id from its hex path segment.
pub fn parse_group_id(hex_id: &str) -> Result<Vec<u8>> {
    let id = hex::decode(hex_id)
        .map_err(|e| ServerError::BadRequest(format!("group id in path is not hex: {e}")))?;
    if id.is_empty() || id.len() > MAX_GROUP_ID_LEN {
        return Err(ServerError::BadRequest(format!(
            "group id must be 1 to {MAX_GROUP_ID_LEN} bytes"
        )));
    }
    Ok(id)
}
