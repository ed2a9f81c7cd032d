//! MLS rules the services share: which bytes are accepted as a handshake, a
//! GroupInfo or a credential, and how a group's stored `PublicGroup` is
//! loaded for validation.

use mls_ds_protocol::ClientId;
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, Credential, GroupId as MlsGroupId, MlsMessageBodyIn, MlsMessageIn,
    ProtocolMessage, PublicGroup,
};

use super::error::{DsError, Result};
use crate::backend::public_group::PublicGroupStore;
use crate::backend::records::{GroupId, GroupState};

/// Parse an `MLSMessage` that must be a handshake `PublicMessage` of `group`.
pub(crate) fn parse_public(bytes: &[u8], group: &GroupId, what: &str) -> Result<ProtocolMessage> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| DsError::Invalid(format!("malformed {what}: {e}")))?;
    let pm = msg
        .try_into_protocol_message()
        .map_err(|_| DsError::Invalid(format!("{what} is not a protocol message")))?;
    if matches!(pm, ProtocolMessage::PrivateMessage(_)) {
        return Err(DsError::Invalid(format!(
            "{what} must be a PublicMessage: the DS validates handshakes, so groups use a plaintext-handshake wire-format policy"
        )));
    }
    if pm.group_id().as_slice() != group.as_bytes() {
        return Err(DsError::Invalid(format!("{what} belongs to another group")));
    }
    Ok(pm)
}

/// Parse an `MLSMessage` that must hold a GroupInfo.
pub(crate) fn parse_group_info(bytes: &[u8]) -> Result<VerifiableGroupInfo> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| DsError::Invalid(format!("malformed GroupInfo message: {e}")))?;
    match msg.extract() {
        MlsMessageBodyIn::GroupInfo(gi) => Ok(gi),
        _ => Err(DsError::Invalid("message is not a GroupInfo".into())),
    }
}

/// The client a credential names (basic credentials only).
pub(crate) fn credential_client(credential: &Credential) -> Result<ClientId> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| DsError::Invalid("credential must be basic".into()))?;
    Ok(ClientId::new(basic.identity())?)
}

/// The TLS encoding of `group`'s ratchet tree, as joiners are given it.
pub(crate) fn encode_tree(group: &PublicGroup) -> Result<Vec<u8>> {
    group
        .export_ratchet_tree()
        .tls_serialize_detached()
        .map_err(|e| DsError::Internal(format!("encode ratchet tree: {e}")))
}

/// A group's `PublicGroup`, loaded into memory from its stored state.
pub(crate) struct LoadedGroup {
    /// The `PublicGroup` itself.
    pub(crate) public: PublicGroup,
    /// Its storage; OpenMLS writes merges and proposals here.
    pub(crate) store: PublicGroupStore,
    /// The stored GroupInfo.
    pub(crate) group_info: Vec<u8>,
}

/// Load the `PublicGroup` of `group` from its stored state.
pub(crate) fn load_group(group: &GroupId, state: GroupState) -> Result<LoadedGroup> {
    let mls_id = MlsGroupId::from_slice(group.as_bytes());
    let store = PublicGroupStore::new(&mls_id, state.public_group)
        .map_err(|e| DsError::Internal(format!("group {group}: {e}")))?;
    let public = PublicGroup::load(&store, &mls_id)
        .map_err(|e| DsError::Internal(format!("group {group}: {e}")))?
        .ok_or_else(|| DsError::Internal(format!("group {group}: PublicGroup state missing")))?;
    Ok(LoadedGroup {
        public,
        store,
        group_info: state.group_info,
    })
}
