//! `StorageProvider<CURRENT_VERSION>` for [`SledStorage`]: every method of the
//! trait, including those behind the `extensions-draft` and
//! `virtual-clients-draft` features, each mapped onto one entity family (see
//! [`crate::trees::Family`]). The logic lives in `entities.rs`; this file only
//! routes. It is over 500 lines because the trait has that many methods,
//! each a few lines of routing; split, the one impl block would have to be
//! cut in pieces that mean nothing apart.

use openmls_traits::storage::{traits, StorageProvider, CURRENT_VERSION};

use crate::error::StorageError;
use crate::store::SledStorage;
use crate::trees::Family;

impl StorageProvider<CURRENT_VERSION> for SledStorage {
    type Error = StorageError;
    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::JoinConfigs, group_id, value)
    }
    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.get_entity(Family::JoinConfigs, group_id)
    }
    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::JoinConfigs, group_id)
    }
    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::Trees, group_id, value)
    }
    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.get_entity(Family::Trees, group_id)
    }
    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::Trees, group_id)
    }
    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::InterimTranscriptHashes, group_id, value)
    }
    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.get_entity(Family::InterimTranscriptHashes, group_id)
    }
    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::InterimTranscriptHashes, group_id)
    }
    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::GroupContexts, group_id, value)
    }
    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.get_entity(Family::GroupContexts, group_id)
    }
    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::GroupContexts, group_id)
    }
    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::ConfirmationTags, group_id, value)
    }
    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.get_entity(Family::ConfirmationTags, group_id)
    }
    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::ConfirmationTags, group_id)
    }
    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &GroupState,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::GroupStates, group_id, value)
    }
    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.get_entity(Family::GroupStates, group_id)
    }
    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::GroupStates, group_id)
    }
    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::MessageSecrets, group_id, value)
    }
    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        self.get_entity(Family::MessageSecrets, group_id)
    }
    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::MessageSecrets, group_id)
    }
    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::ResumptionPskStores, group_id, value)
    }
    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.get_entity(Family::ResumptionPskStores, group_id)
    }
    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::ResumptionPskStores, group_id)
    }
    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::OwnLeafIndices, group_id, value)
    }
    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.get_entity(Family::OwnLeafIndices, group_id)
    }
    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::OwnLeafIndices, group_id)
    }
    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::EpochSecrets, group_id, value)
    }
    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.get_entity(Family::EpochSecrets, group_id)
    }
    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::EpochSecrets, group_id)
    }
    #[cfg(feature = "extensions-draft")]
    fn write_application_export_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ApplicationExportTree: traits::ApplicationExportTree<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &ApplicationExportTree,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::ApplicationExportTrees, group_id, value)
    }
    #[cfg(feature = "extensions-draft")]
    fn application_export_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ApplicationExportTree: traits::ApplicationExportTree<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ApplicationExportTree>, Self::Error> {
        self.get_entity(Family::ApplicationExportTrees, group_id)
    }
    #[cfg(feature = "extensions-draft")]
    fn delete_application_export_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ApplicationExportTree: traits::ApplicationExportTree<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::ApplicationExportTrees, group_id)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn write_vc_emulation_bindings<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        VcEmulationBindings: traits::VcEmulationBindings<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &VcEmulationBindings,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::VcEmulationBindings, group_id, value)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn vc_emulation_bindings<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        VcEmulationBindings: traits::VcEmulationBindings<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<VcEmulationBindings>, Self::Error> {
        self.get_entity(Family::VcEmulationBindings, group_id)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn delete_vc_emulation_bindings<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::VcEmulationBindings, group_id)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn write_registered_vc_emulation_epoch<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        RegisteredVcEmulationEpoch: traits::RegisteredVcEmulationEpoch<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        value: &RegisteredVcEmulationEpoch,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::VcRegisteredEpochs, group_id, value)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn registered_vc_emulation_epoch<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        RegisteredVcEmulationEpoch: traits::RegisteredVcEmulationEpoch<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<RegisteredVcEmulationEpoch>, Self::Error> {
        self.get_entity(Family::VcRegisteredEpochs, group_id)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn delete_registered_vc_emulation_epoch<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::VcRegisteredEpochs, group_id)
    }
    fn write_signature_key_pair<
        KeyId: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
        value: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::SignatureKeyPairs, key, value)
    }
    fn signature_key_pair<
        KeyId: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.get_entity(Family::SignatureKeyPairs, key)
    }
    fn delete_signature_key_pair<KeyId: traits::SignaturePublicKey<CURRENT_VERSION>>(
        &self,
        key: &KeyId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::SignatureKeyPairs, key)
    }
    fn write_encryption_key_pair<
        KeyId: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
        value: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::EncryptionKeyPairs, key, value)
    }
    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        KeyId: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.get_entity(Family::EncryptionKeyPairs, key)
    }
    fn delete_encryption_key_pair<KeyId: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        key: &KeyId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::EncryptionKeyPairs, key)
    }
    fn write_key_package<
        KeyId: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
        value: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::KeyPackages, key, value)
    }
    fn key_package<
        KeyId: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.get_entity(Family::KeyPackages, key)
    }
    fn write_psk<
        KeyId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
        value: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::Psks, key, value)
    }
    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, KeyId: traits::PskId<CURRENT_VERSION>>(
        &self,
        key: &KeyId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.get_entity(Family::Psks, key)
    }
    fn delete_psk<KeyId: traits::PskId<CURRENT_VERSION>>(
        &self,
        key: &KeyId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::Psks, key)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn write_vc_emulation_epoch_state<
        KeyId: traits::VcEpochId<CURRENT_VERSION>,
        VcEmulationEpochState: traits::VcEmulationEpochState<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
        value: &VcEmulationEpochState,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::VcEmulationEpochStates, key, value)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn vc_emulation_epoch_state<
        KeyId: traits::VcEpochId<CURRENT_VERSION>,
        VcEmulationEpochState: traits::VcEmulationEpochState<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
    ) -> Result<Option<VcEmulationEpochState>, Self::Error> {
        self.get_entity(Family::VcEmulationEpochStates, key)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn write_vc_operation_tree<
        KeyId: traits::VcEpochId<CURRENT_VERSION>,
        VcOperationTree: traits::VcOperationTree<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
        value: &VcOperationTree,
    ) -> Result<(), Self::Error> {
        self.put_entity(Family::VcOperationTrees, key, value)
    }
    #[cfg(feature = "virtual-clients-draft")]
    fn vc_operation_tree<
        KeyId: traits::VcEpochId<CURRENT_VERSION>,
        VcOperationTree: traits::VcOperationTree<CURRENT_VERSION>,
    >(
        &self,
        key: &KeyId,
    ) -> Result<Option<VcOperationTree>, Self::Error> {
        self.get_entity(Family::VcOperationTrees, key)
    }
    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.delete_key_package_impl(hash_ref)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.push_list(Family::OwnLeafNodes, group_id, leaf_node)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.get_list(Family::OwnLeafNodes, group_id)
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::OwnLeafNodes, group_id)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.queue_proposal_impl(group_id, proposal_ref, proposal)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.get_list(Family::ProposalQueues, group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        self.queued_proposals_impl(group_id)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.remove_proposal_impl(group_id, proposal_ref)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.clear_proposal_queue_impl::<GroupId, ProposalRef>(group_id)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.put_entity(
            Family::EpochKeyPairs,
            &(group_id, epoch, leaf_index),
            key_pairs,
        )
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        Ok(self
            .get_entity(Family::EpochKeyPairs, &(group_id, epoch, leaf_index))?
            .unwrap_or_default())
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.delete_entity(Family::EpochKeyPairs, &(group_id, epoch, leaf_index))
    }

    #[cfg(feature = "virtual-clients-draft")]
    fn write_retained_key_package_material_batch<
        EpochId: traits::VcEpochId<CURRENT_VERSION>,
        VcOperationTree: traits::VcOperationTree<CURRENT_VERSION>,
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        RetainedKeyPackageMaterial: traits::RetainedKeyPackageMaterial<CURRENT_VERSION>,
    >(
        &self,
        epoch_id: &EpochId,
        operation_tree: &VcOperationTree,
        materials: &[(KeyPackageRef, RetainedKeyPackageMaterial)],
    ) -> Result<(), Self::Error> {
        self.write_retained_batch_impl(epoch_id, operation_tree, materials)
    }

    #[cfg(feature = "virtual-clients-draft")]
    fn retained_key_package_material<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        RetainedKeyPackageMaterial: traits::RetainedKeyPackageMaterial<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<RetainedKeyPackageMaterial>, Self::Error> {
        self.retained_material_impl(hash_ref)
    }

    #[cfg(feature = "virtual-clients-draft")]
    fn has_retained_key_package_material_for_epoch<EpochId: traits::VcEpochId<CURRENT_VERSION>>(
        &self,
        epoch_id: &EpochId,
    ) -> Result<bool, Self::Error> {
        self.epoch_referenced_impl(epoch_id)
    }

    #[cfg(feature = "virtual-clients-draft")]
    fn delete_vc_emulation_state_if_unreferenced<EpochId: traits::VcEpochId<CURRENT_VERSION>>(
        &self,
        epoch_id: &EpochId,
    ) -> Result<bool, Self::Error> {
        self.delete_emulation_state_if_unreferenced_impl(epoch_id)
    }

    #[cfg(feature = "virtual-clients-draft")]
    fn delete_retained_key_package_material<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.delete_retained_material_impl(hash_ref)
    }
}
