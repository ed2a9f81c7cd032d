//! The on-disk layout: one sled tree per OpenMLS entity family, and how keys
//! inside those trees are namespaced.
//!
//! Every key starts with the owning storage's namespace, length-prefixed
//! (`[len u8] ++ namespace`), so that several independent clients (or a
//! server and its test clients) can share one sled `Db` without seeing each
//! other's data. The rest of the key is the serde_json encoding of the OpenMLS
//! key value(s); see `docs/ARCHITECTURE.md` for the full table.

/// One OpenMLS entity family, stored in a sled tree of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Family {
    /// `KeyPackageBundle` by hash reference.
    KeyPackages,
    /// `PskBundle` by PSK id.
    Psks,
    /// Update-leaf HPKE key pairs by public key.
    EncryptionKeyPairs,
    /// Signature key pairs by public key.
    SignatureKeyPairs,
    /// Lists of epoch HPKE key pairs by (group id, epoch, leaf index).
    EpochKeyPairs,
    /// `MlsGroupJoinConfig` by group id.
    JoinConfigs,
    /// List of own leaf nodes by group id.
    OwnLeafNodes,
    /// `MlsGroupState` by group id.
    GroupStates,
    /// `QueuedProposal` by (group id, proposal ref).
    QueuedProposals,
    /// Ordered list of queued proposal refs by group id.
    ProposalQueues,
    /// Own leaf index by group id.
    OwnLeafIndices,
    /// `GroupEpochSecrets` by group id.
    EpochSecrets,
    /// `ResumptionPskStore` by group id.
    ResumptionPskStores,
    /// `MessageSecretsStore` by group id.
    MessageSecrets,
    /// `TreeSync` (ratchet tree) by group id.
    Trees,
    /// `GroupContext` by group id.
    GroupContexts,
    /// Interim transcript hash by group id.
    InterimTranscriptHashes,
    /// Confirmation tag by group id.
    ConfirmationTags,
    /// Application export tree by group id (`extensions-draft`).
    ApplicationExportTrees,
    /// Virtual-client emulation epoch state by epoch id (`virtual-clients-draft`).
    VcEmulationEpochStates,
    /// Virtual-client emulation bindings by group id (`virtual-clients-draft`).
    VcEmulationBindings,
    /// Registered emulation epoch by group id (`virtual-clients-draft`).
    VcRegisteredEpochs,
    /// Virtual-client operation secret tree by epoch id (`virtual-clients-draft`).
    VcOperationTrees,
    /// Retained KeyPackage material (with its epoch id) by hash reference.
    VcRetainedMaterial,
    /// Index `epoch id -> hash reference` of retained material, for liveness queries.
    VcRetainedByEpoch,
}

impl Family {
    /// All families, in tree-index order.
    pub(crate) const ALL: [Family; 25] = [
        Family::KeyPackages,
        Family::Psks,
        Family::EncryptionKeyPairs,
        Family::SignatureKeyPairs,
        Family::EpochKeyPairs,
        Family::JoinConfigs,
        Family::OwnLeafNodes,
        Family::GroupStates,
        Family::QueuedProposals,
        Family::ProposalQueues,
        Family::OwnLeafIndices,
        Family::EpochSecrets,
        Family::ResumptionPskStores,
        Family::MessageSecrets,
        Family::Trees,
        Family::GroupContexts,
        Family::InterimTranscriptHashes,
        Family::ConfirmationTags,
        Family::ApplicationExportTrees,
        Family::VcEmulationEpochStates,
        Family::VcEmulationBindings,
        Family::VcRegisteredEpochs,
        Family::VcOperationTrees,
        Family::VcRetainedMaterial,
        Family::VcRetainedByEpoch,
    ];

    /// Name of the sled tree holding this family.
    pub const fn tree_name(self) -> &'static str {
        match self {
            Family::KeyPackages => "mls.key_packages",
            Family::Psks => "mls.psks",
            Family::EncryptionKeyPairs => "mls.encryption_key_pairs",
            Family::SignatureKeyPairs => "mls.signature_key_pairs",
            Family::EpochKeyPairs => "mls.epoch_key_pairs",
            Family::JoinConfigs => "mls.join_configs",
            Family::OwnLeafNodes => "mls.own_leaf_nodes",
            Family::GroupStates => "mls.group_states",
            Family::QueuedProposals => "mls.queued_proposals",
            Family::ProposalQueues => "mls.proposal_queues",
            Family::OwnLeafIndices => "mls.own_leaf_indices",
            Family::EpochSecrets => "mls.epoch_secrets",
            Family::ResumptionPskStores => "mls.resumption_psk_stores",
            Family::MessageSecrets => "mls.message_secrets",
            Family::Trees => "mls.trees",
            Family::GroupContexts => "mls.group_contexts",
            Family::InterimTranscriptHashes => "mls.interim_transcript_hashes",
            Family::ConfirmationTags => "mls.confirmation_tags",
            Family::ApplicationExportTrees => "mls.application_export_trees",
            Family::VcEmulationEpochStates => "mls.vc_emulation_epoch_states",
            Family::VcEmulationBindings => "mls.vc_emulation_bindings",
            Family::VcRegisteredEpochs => "mls.vc_registered_epochs",
            Family::VcOperationTrees => "mls.vc_operation_trees",
            Family::VcRetainedMaterial => "mls.vc_retained_material",
            Family::VcRetainedByEpoch => "mls.vc_retained_by_epoch",
        }
    }

    /// Index of this family in the storage's tree table.
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

/// Name of the tree holding database-wide metadata (the format version).
pub const META_TREE: &str = "meta";
/// Prefix of trees opened by applications through [`crate::Store::record_tree`].
pub(crate) const APP_TREE_PREFIX: &str = "app.";

/// Build `[len u8] ++ namespace`, the prefix of every key of one storage.
pub(crate) fn namespace_prefix(namespace: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(namespace.len() + 1);
    // The caller has checked that the namespace fits in a u8 length.
    p.push(namespace.len() as u8);
    p.extend_from_slice(namespace);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_indexed_in_order_with_unique_names() {
        let mut names = std::collections::HashSet::new();
        for (i, f) in Family::ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
            assert!(names.insert(f.tree_name()));
        }
    }
}
