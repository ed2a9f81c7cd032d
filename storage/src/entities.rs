//! Typed access to the OpenMLS entity families: single values, ordered lists,
//! the proposal queue, and the virtual-client retained-material index.
//!
//! Every helper builds the full key as `namespace ++ json(key)` and stores
//! values through [`crate::codec`]. Multi-key updates run inside
//! [`SledStorage::transaction`], so each trait call is atomic on its own and
//! joins the caller's transaction when there is one.

use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{
    decode_entity, decode_item, decode_list_items, encode_entity, encode_item, encode_key,
};
use crate::error::StorageError;
use crate::store::SledStorage;
use crate::trees::Family;

impl SledStorage {
    pub(crate) fn entity_key<K: Serialize + ?Sized>(
        &self,
        family: Family,
        key: &K,
    ) -> Result<Vec<u8>, StorageError> {
        Ok(self.full_key(&encode_key(family.tree_name(), key)?))
    }

    pub(crate) fn put_entity<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &self,
        family: Family,
        key: &K,
        value: &V,
    ) -> Result<(), StorageError> {
        let k = self.entity_key(family, key)?;
        let v = encode_entity(family.tree_name(), value)?;
        self.raw_set(family.index(), k, Some(v))
    }

    pub(crate) fn get_entity<K: Serialize + ?Sized, V: DeserializeOwned>(
        &self,
        family: Family,
        key: &K,
    ) -> Result<Option<V>, StorageError> {
        let k = self.entity_key(family, key)?;
        match self.raw_get(family.index(), &k)? {
            Some(bytes) => Ok(Some(decode_entity(family.tree_name(), &k, &bytes)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn delete_entity<K: Serialize + ?Sized>(
        &self,
        family: Family,
        key: &K,
    ) -> Result<(), StorageError> {
        let k = self.entity_key(family, key)?;
        self.raw_set(family.index(), k, None)
    }

    /// Read a list stored under one key; a missing key is an empty list.
    pub(crate) fn get_list<K: Serialize + ?Sized, V: DeserializeOwned>(
        &self,
        family: Family,
        key: &K,
    ) -> Result<Vec<V>, StorageError> {
        let tree = family.tree_name();
        let k = self.entity_key(family, key)?;
        let bytes = self.raw_get(family.index(), &k)?;
        decode_list_items(tree, &k, bytes.as_deref())?
            .iter()
            .map(|item| decode_item(tree, &k, item))
            .collect()
    }

    /// Append one item to a list.
    pub(crate) fn push_list<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &self,
        family: Family,
        key: &K,
        item: &V,
    ) -> Result<(), StorageError> {
        let tree = family.tree_name();
        let k = self.entity_key(family, key)?;
        let item = encode_item(tree, item)?;
        self.transaction(|s| {
            let current = s.raw_get(family.index(), &k)?;
            let mut list = decode_list_items(tree, &k, current.as_deref())?;
            list.push(item);
            s.raw_set(family.index(), k, Some(encode_entity(tree, &list)?))
        })
    }

    /// Remove the first occurrence of `item` from a list.
    pub(crate) fn remove_from_list<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &self,
        family: Family,
        key: &K,
        item: &V,
    ) -> Result<(), StorageError> {
        let tree = family.tree_name();
        let k = self.entity_key(family, key)?;
        let item = encode_item(tree, item)?;
        self.transaction(|s| {
            let current = s.raw_get(family.index(), &k)?;
            if current.is_none() {
                return Ok(());
            }
            let mut list = decode_list_items(tree, &k, current.as_deref())?;
            if let Some(pos) = list.iter().position(|v| *v == item) {
                list.remove(pos);
            }
            s.raw_set(family.index(), k, Some(encode_entity(tree, &list)?))
        })
    }

    // ----- proposal queue -----

    pub(crate) fn queue_proposal_impl<G: Serialize, R: Serialize, P: Serialize>(
        &self,
        group_id: &G,
        proposal_ref: &R,
        proposal: &P,
    ) -> Result<(), StorageError> {
        self.transaction(|s| {
            s.put_entity(Family::QueuedProposals, &(group_id, proposal_ref), proposal)?;
            s.push_list(Family::ProposalQueues, group_id, proposal_ref)
        })
    }

    pub(crate) fn queued_proposals_impl<G: Serialize, R: Serialize + DeserializeOwned, P>(
        &self,
        group_id: &G,
    ) -> Result<Vec<(R, P)>, StorageError>
    where
        P: DeserializeOwned,
    {
        let refs: Vec<R> = self.get_list(Family::ProposalQueues, group_id)?;
        refs.into_iter()
            .map(|r| {
                let key = (group_id, &r);
                match self.get_entity(Family::QueuedProposals, &key)? {
                    Some(p) => Ok((r, p)),
                    None => Err(StorageError::corrupt(
                        Family::QueuedProposals.tree_name(),
                        &self.entity_key(Family::QueuedProposals, &key)?,
                        "proposal is listed in the group's queue but not stored",
                    )),
                }
            })
            .collect()
    }

    pub(crate) fn remove_proposal_impl<G: Serialize, R: Serialize>(
        &self,
        group_id: &G,
        proposal_ref: &R,
    ) -> Result<(), StorageError> {
        self.transaction(|s| {
            s.remove_from_list(Family::ProposalQueues, group_id, proposal_ref)?;
            s.delete_entity(Family::QueuedProposals, &(group_id, proposal_ref))
        })
    }

    pub(crate) fn clear_proposal_queue_impl<G: Serialize, R: Serialize + DeserializeOwned>(
        &self,
        group_id: &G,
    ) -> Result<(), StorageError> {
        self.transaction(|s| {
            let refs: Vec<R> = s.get_list(Family::ProposalQueues, group_id)?;
            for r in &refs {
                s.delete_entity(Family::QueuedProposals, &(group_id, r))?;
            }
            s.delete_entity(Family::ProposalQueues, group_id)
        })
    }

    // ----- delete everything stored under one key, used by several families -----

    pub(crate) fn delete_key_package_impl<R: Serialize>(
        &self,
        hash_ref: &R,
    ) -> Result<(), StorageError> {
        self.transaction(|s| {
            #[cfg(feature = "virtual-clients-draft")]
            s.delete_retained_material_impl(hash_ref)?;
            s.delete_entity(Family::KeyPackages, hash_ref)
        })
    }
}

#[cfg(feature = "virtual-clients-draft")]
mod virtual_clients {
    //! Retained KeyPackage material is stored with its epoch id, and indexed
    //! by `[len u32] ++ json(epoch) ++ json(ref)` so that the liveness query is
    //! a prefix scan instead of a scan of every value.

    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Retained<M> {
        /// The epoch id exactly as it appears in the index key.
        epoch_json: String,
        material: M,
    }

    fn epoch_prefix(epoch_json: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(epoch_json.len() + 4);
        p.extend_from_slice(&(epoch_json.len() as u32).to_be_bytes());
        p.extend_from_slice(epoch_json);
        p
    }

    impl SledStorage {
        fn epoch_index_key(&self, epoch_json: &[u8], ref_json: &[u8]) -> Vec<u8> {
            let mut suffix = epoch_prefix(epoch_json);
            suffix.extend_from_slice(ref_json);
            self.full_key(&suffix)
        }

        pub(crate) fn write_retained_batch_impl<E: Serialize, T: Serialize, R: Serialize, M>(
            &self,
            epoch_id: &E,
            operation_tree: &T,
            materials: &[(R, M)],
        ) -> Result<(), StorageError>
        where
            M: Serialize,
        {
            let tree = Family::VcRetainedMaterial.tree_name();
            let epoch_json = encode_key(tree, epoch_id)?;
            let epoch_string =
                String::from_utf8(epoch_json.clone()).map_err(|e| StorageError::Encode {
                    tree: tree.to_owned(),
                    reason: e.to_string(),
                })?;
            self.transaction(|s| {
                s.put_entity(Family::VcOperationTrees, epoch_id, operation_tree)?;
                for (r, material) in materials {
                    s.delete_retained_material_impl(r)?;
                    let record = Retained {
                        epoch_json: epoch_string.clone(),
                        material,
                    };
                    s.put_entity(Family::VcRetainedMaterial, r, &record)?;
                    let idx = s.epoch_index_key(&epoch_json, &encode_key(tree, r)?);
                    s.raw_set(
                        Family::VcRetainedByEpoch.index(),
                        idx,
                        Some(encode_entity(tree, &())?),
                    )?;
                }
                Ok(())
            })
        }

        pub(crate) fn retained_material_impl<R: Serialize, M: DeserializeOwned>(
            &self,
            hash_ref: &R,
        ) -> Result<Option<M>, StorageError> {
            let record: Option<Retained<M>> =
                self.get_entity(Family::VcRetainedMaterial, hash_ref)?;
            Ok(record.map(|r| r.material))
        }

        pub(crate) fn delete_retained_material_impl<R: Serialize>(
            &self,
            hash_ref: &R,
        ) -> Result<(), StorageError> {
            let tree = Family::VcRetainedMaterial.tree_name();
            self.transaction(|s| {
                let old: Option<Retained<serde::de::IgnoredAny>> =
                    s.get_entity(Family::VcRetainedMaterial, hash_ref)?;
                if let Some(old) = old {
                    let idx =
                        s.epoch_index_key(old.epoch_json.as_bytes(), &encode_key(tree, hash_ref)?);
                    s.raw_set(Family::VcRetainedByEpoch.index(), idx, None)?;
                    s.delete_entity(Family::VcRetainedMaterial, hash_ref)?;
                }
                Ok(())
            })
        }

        pub(crate) fn epoch_referenced_impl<E: Serialize>(
            &self,
            epoch_id: &E,
        ) -> Result<bool, StorageError> {
            let epoch_json = encode_key(Family::VcRetainedByEpoch.tree_name(), epoch_id)?;
            let prefix = self.full_key(&epoch_prefix(&epoch_json));
            Ok(!self
                .raw_scan(Family::VcRetainedByEpoch.index(), &prefix)?
                .is_empty())
        }

        pub(crate) fn delete_emulation_state_if_unreferenced_impl<E: Serialize>(
            &self,
            epoch_id: &E,
        ) -> Result<bool, StorageError> {
            self.transaction(|s| {
                if s.epoch_referenced_impl(epoch_id)? {
                    return Ok(false);
                }
                s.delete_entity(Family::VcEmulationEpochStates, epoch_id)?;
                s.delete_entity(Family::VcOperationTrees, epoch_id)?;
                Ok(true)
            })
        }
    }
}
