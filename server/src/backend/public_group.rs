//! A stored group's `PublicGroup` as OpenMLS sees it: an in-memory
//! `PublicStorageProvider` over the [`PublicGroupEntities`] of one group.
//!
//! The DS loads a group's entities from its backend, lets OpenMLS load,
//! validate against and merge into them here, and writes the result back as
//! part of a write set. So OpenMLS's storage calls never reach a database
//! directly, whatever the backend, and a validation that fails leaves
//! nothing behind. Every entity is the MessagePack encoding of the OpenMLS
//! value, byte strings as `bin` values (OpenMLS 0.9 entities need a
//! self-describing format; a ratchet tree takes about its TLS size, where
//! JSON took 2-4 bytes per byte).

use std::sync::{Mutex, MutexGuard};

use openmls_traits::public_storage::PublicStorageProvider;
use openmls_traits::storage::{traits, Key, CURRENT_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::records::{PublicGroupEntities, QueuedProposalEntity};

/// One group's `PublicGroup` storage, in memory.
pub(crate) struct PublicGroupStore {
    /// The encoded OpenMLS `GroupId` of the group: calls for any other
    /// group are refused.
    group: Vec<u8>,
    entities: Mutex<PublicGroupEntities>,
}

/// Why a `PublicGroup` entity could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublicGroupStoreError {
    /// An entity could not be encoded.
    #[error("PublicGroup entity: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// A stored entity this build cannot read.
    #[error("PublicGroup entity: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// OpenMLS asked for another group than the one loaded.
    #[error("the stored PublicGroup belongs to another group")]
    OtherGroup,
}

type Result<T> = std::result::Result<T, PublicGroupStoreError>;

impl PublicGroupStore {
    /// The storage of `group` holding `entities` (empty for a new group).
    pub(crate) fn new(
        group: &openmls::prelude::GroupId,
        entities: PublicGroupEntities,
    ) -> Result<PublicGroupStore> {
        Ok(PublicGroupStore {
            group: encode(group)?,
            entities: Mutex::new(entities),
        })
    }

    /// A copy of the entities as OpenMLS left them.
    pub(crate) fn entities(&self) -> PublicGroupEntities {
        self.lock().clone()
    }

    /// The size of the entities' encodings together.
    pub(crate) fn stored_bytes(&self) -> usize {
        let e = self.lock();
        [
            &e.tree,
            &e.context,
            &e.interim_transcript_hash,
            &e.confirmation_tag,
        ]
        .iter()
        .map(|v| v.as_ref().map_or(0, Vec::len))
        .sum::<usize>()
            + e.proposals
                .iter()
                .map(|p| p.reference.len() + p.proposal.len())
                .sum::<usize>()
    }

    /// The entities as OpenMLS left them.
    pub(crate) fn into_entities(self) -> PublicGroupEntities {
        self.entities
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The entities, once `group_id` is checked to be this store's group.
    fn of<G: Key<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<MutexGuard<'_, PublicGroupEntities>> {
        if encode(group_id)? != self.group {
            return Err(PublicGroupStoreError::OtherGroup);
        }
        Ok(self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, PublicGroupEntities> {
        self.entities.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The project's MessagePack form of OpenMLS values (byte strings as `bin`
/// values), shared with the client stores.
fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    mls_ds_storage::codec::write_msgpack(value, &mut out)?;
    Ok(out)
}

fn decode_one<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(rmp_serde::from_slice(bytes)?)
}

fn decode<T: DeserializeOwned>(bytes: Option<&Vec<u8>>) -> Result<Option<T>> {
    bytes.map(|b| decode_one(b)).transpose()
}

impl PublicStorageProvider<CURRENT_VERSION> for PublicGroupStore {
    type PublicError = PublicGroupStoreError;

    fn write_tree<G: traits::GroupId<CURRENT_VERSION>, T: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        group_id: &G,
        tree: &T,
    ) -> Result<()> {
        self.of(group_id)?.tree = Some(encode(tree)?);
        Ok(())
    }

    fn write_interim_transcript_hash<
        G: traits::GroupId<CURRENT_VERSION>,
        H: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        hash: &H,
    ) -> Result<()> {
        self.of(group_id)?.interim_transcript_hash = Some(encode(hash)?);
        Ok(())
    }

    fn write_context<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        context: &C,
    ) -> Result<()> {
        self.of(group_id)?.context = Some(encode(context)?);
        Ok(())
    }

    fn write_confirmation_tag<
        G: traits::GroupId<CURRENT_VERSION>,
        T: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        tag: &T,
    ) -> Result<()> {
        self.of(group_id)?.confirmation_tag = Some(encode(tag)?);
        Ok(())
    }

    fn queue_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        proposal_ref: &R,
        proposal: &P,
    ) -> Result<()> {
        let reference = encode(proposal_ref)?;
        let proposal = encode(proposal)?;
        let mut e = self.of(group_id)?;
        match e.proposals.iter_mut().find(|p| p.reference == reference) {
            Some(existing) => existing.proposal = proposal,
            None => e.proposals.push(QueuedProposalEntity {
                reference,
                proposal,
            }),
        }
        Ok(())
    }

    fn queued_proposals<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<Vec<(R, P)>> {
        self.of(group_id)?
            .proposals
            .iter()
            .map(|p| Ok((decode_one(&p.reference)?, decode_one(&p.proposal)?)))
            .collect()
    }

    fn tree<G: traits::GroupId<CURRENT_VERSION>, T: traits::TreeSync<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<Option<T>> {
        decode(self.of(group_id)?.tree.as_ref())
    }

    fn group_context<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<Option<C>> {
        decode(self.of(group_id)?.context.as_ref())
    }

    fn interim_transcript_hash<
        G: traits::GroupId<CURRENT_VERSION>,
        H: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<Option<H>> {
        decode(self.of(group_id)?.interim_transcript_hash.as_ref())
    }

    fn confirmation_tag<
        G: traits::GroupId<CURRENT_VERSION>,
        T: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<Option<T>> {
        decode(self.of(group_id)?.confirmation_tag.as_ref())
    }

    fn delete_tree<G: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &G) -> Result<()> {
        self.of(group_id)?.tree = None;
        Ok(())
    }

    fn delete_confirmation_tag<G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<()> {
        self.of(group_id)?.confirmation_tag = None;
        Ok(())
    }

    fn delete_context<G: traits::GroupId<CURRENT_VERSION>>(&self, group_id: &G) -> Result<()> {
        self.of(group_id)?.context = None;
        Ok(())
    }

    fn delete_interim_transcript_hash<G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<()> {
        self.of(group_id)?.interim_transcript_hash = None;
        Ok(())
    }

    fn remove_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        proposal_ref: &R,
    ) -> Result<()> {
        let reference = encode(proposal_ref)?;
        self.of(group_id)?
            .proposals
            .retain(|p| p.reference != reference);
        Ok(())
    }

    fn clear_proposal_queue<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<()> {
        self.of(group_id)?.proposals.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openmls::prelude::GroupId;

    #[test]
    fn byte_strings_are_stored_as_bytes_and_read_back() {
        // Bytes of 128 and more took two bytes each as integers.
        let id = GroupId::from_slice(&[0xC8; 64]);
        let bytes = encode(&id).unwrap();
        assert!(bytes.len() < 64 + 8, "{} bytes", bytes.len());
        let back: GroupId = decode_one(&bytes).unwrap();
        assert_eq!(back, id);
        // Sequences of other items are untouched.
        let numbers = vec![1u16, 300, 70];
        let back: Vec<u16> = decode_one(&encode(&numbers).unwrap()).unwrap();
        assert_eq!(back, numbers);
    }
}
