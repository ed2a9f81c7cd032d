//! Round-trip, delete, isolation, corruption, format-version and transaction
//! tests of every entity family, driven through the `StorageProvider` trait
//! with small test types (so each method is exercised on its own).

use mls_ds_storage::trees::{Family, META_TREE};
use mls_ds_storage::{SledStorage, StorageError, Store, StoreConfig};
use openmls_traits::storage::{traits, Entity, Key, StorageProvider, CURRENT_VERSION};
use serde::{Deserialize, Serialize};

/// One test type that can stand for every key and entity type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct T(Vec<u8>);

impl Key<CURRENT_VERSION> for T {}
impl Entity<CURRENT_VERSION> for T {}

macro_rules! impl_traits {
    ($($t:ident),* $(,)?) => { $(impl traits::$t<CURRENT_VERSION> for T {})* };
}
impl_traits!(
    GroupId,
    SignaturePublicKey,
    HashReference,
    PskId,
    EncryptionKey,
    EpochKey,
    QueuedProposal,
    TreeSync,
    GroupContext,
    InterimTranscriptHash,
    ConfirmationTag,
    SignatureKeyPair,
    PskBundle,
    HpkeKeyPair,
    GroupState,
    GroupEpochSecrets,
    LeafNodeIndex,
    MessageSecrets,
    ResumptionPskStore,
    KeyPackage,
    MlsGroupJoinConfig,
    LeafNode,
    ApplicationExportTree,
    ProposalRef,
);
#[cfg(feature = "virtual-clients-draft")]
impl_traits!(
    VcEpochId,
    VcEmulationEpochState,
    VcEmulationBindings,
    RegisteredVcEmulationEpoch,
    VcOperationTree,
    RetainedKeyPackageMaterial,
);

fn t(s: &str) -> T {
    T(s.as_bytes().to_vec())
}

fn temp_storage() -> SledStorage {
    Store::temporary(StoreConfig::default())
        .unwrap()
        .storage(b"test")
        .unwrap()
}

type S = SledStorage;

/// Write, read back, check another key is unaffected, delete, read nothing.
macro_rules! group_value_round_trip {
    ($s:expr, $write:ident, $read:ident, $delete:ident $(, $extra:ty)?) => {{
        let s: &S = $s;
        let (g, other, v) = (t("group"), t("other"), t(stringify!($write)));
        s.$write(&g, &v).unwrap();
        assert_eq!(s.$read::<T, T>(&g).unwrap(), Some(v.clone()), stringify!($read));
        assert_eq!(s.$read::<T, T>(&other).unwrap(), None);
        s.$delete::<T $(, $extra)?>(&g).unwrap();
        assert_eq!(s.$read::<T, T>(&g).unwrap(), None, stringify!($delete));
    }};
}

#[test]
fn every_group_scoped_value_round_trips_and_deletes() {
    let s = &temp_storage();
    group_value_round_trip!(
        s,
        write_mls_join_config,
        mls_group_join_config,
        delete_group_config
    );
    group_value_round_trip!(s, write_tree, tree, delete_tree);
    group_value_round_trip!(
        s,
        write_interim_transcript_hash,
        interim_transcript_hash,
        delete_interim_transcript_hash
    );
    group_value_round_trip!(s, write_context, group_context, delete_context);
    group_value_round_trip!(
        s,
        write_confirmation_tag,
        confirmation_tag,
        delete_confirmation_tag
    );
    group_value_round_trip!(s, write_group_state, group_state, delete_group_state);
    group_value_round_trip!(
        s,
        write_message_secrets,
        message_secrets,
        delete_message_secrets
    );
    group_value_round_trip!(
        s,
        write_resumption_psk_store,
        resumption_psk_store,
        delete_all_resumption_psk_secrets
    );
    group_value_round_trip!(
        s,
        write_own_leaf_index,
        own_leaf_index,
        delete_own_leaf_index
    );
    group_value_round_trip!(
        s,
        write_group_epoch_secrets,
        group_epoch_secrets,
        delete_group_epoch_secrets
    );
    #[cfg(feature = "extensions-draft")]
    group_value_round_trip!(
        s,
        write_application_export_tree,
        application_export_tree,
        delete_application_export_tree,
        T
    );
    #[cfg(feature = "virtual-clients-draft")]
    {
        group_value_round_trip!(
            s,
            write_vc_emulation_bindings,
            vc_emulation_bindings,
            delete_vc_emulation_bindings
        );
        group_value_round_trip!(
            s,
            write_registered_vc_emulation_epoch,
            registered_vc_emulation_epoch,
            delete_registered_vc_emulation_epoch
        );
    }
}

#[test]
fn every_key_addressed_value_round_trips_and_deletes() {
    let s = &temp_storage();
    let (k, other) = (t("key"), t("other"));

    s.write_signature_key_pair(&k, &t("sig")).unwrap();
    assert_eq!(s.signature_key_pair::<T, T>(&k).unwrap(), Some(t("sig")));
    assert_eq!(s.signature_key_pair::<T, T>(&other).unwrap(), None);
    s.delete_signature_key_pair(&k).unwrap();
    assert_eq!(s.signature_key_pair::<T, T>(&k).unwrap(), None);

    s.write_encryption_key_pair(&k, &t("hpke")).unwrap();
    assert_eq!(s.encryption_key_pair::<T, T>(&k).unwrap(), Some(t("hpke")));
    s.delete_encryption_key_pair(&k).unwrap();
    assert_eq!(s.encryption_key_pair::<T, T>(&k).unwrap(), None);

    s.write_key_package(&k, &t("kp")).unwrap();
    assert_eq!(s.key_package::<T, T>(&k).unwrap(), Some(t("kp")));
    assert_eq!(s.key_package::<T, T>(&other).unwrap(), None);
    s.delete_key_package(&k).unwrap();
    assert_eq!(s.key_package::<T, T>(&k).unwrap(), None);

    s.write_psk(&k, &t("psk")).unwrap();
    assert_eq!(s.psk::<T, T>(&k).unwrap(), Some(t("psk")));
    s.delete_psk(&k).unwrap();
    assert_eq!(s.psk::<T, T>(&k).unwrap(), None);

    // Epoch key pairs are addressed by (group, epoch, leaf index).
    let (g, e) = (t("group"), t("epoch"));
    let pairs = vec![t("a"), t("b")];
    s.write_encryption_epoch_key_pairs(&g, &e, 3, &pairs)
        .unwrap();
    assert_eq!(
        s.encryption_epoch_key_pairs::<T, T, T>(&g, &e, 3).unwrap(),
        pairs
    );
    assert!(s
        .encryption_epoch_key_pairs::<T, T, T>(&g, &e, 4)
        .unwrap()
        .is_empty());
    assert!(s
        .encryption_epoch_key_pairs::<T, T, T>(&g, &other, 3)
        .unwrap()
        .is_empty());
    s.delete_encryption_epoch_key_pairs(&g, &e, 3).unwrap();
    assert!(s
        .encryption_epoch_key_pairs::<T, T, T>(&g, &e, 3)
        .unwrap()
        .is_empty());
}

#[test]
fn own_leaf_nodes_keep_their_order() {
    let s = temp_storage();
    let g = t("g");
    assert!(s.own_leaf_nodes::<T, T>(&g).unwrap().is_empty());
    for n in ["one", "two", "three"] {
        s.append_own_leaf_node(&g, &t(n)).unwrap();
    }
    assert_eq!(
        s.own_leaf_nodes::<T, T>(&g).unwrap(),
        vec![t("one"), t("two"), t("three")]
    );
    s.delete_own_leaf_nodes(&g).unwrap();
    assert!(s.own_leaf_nodes::<T, T>(&g).unwrap().is_empty());
}

#[test]
fn proposal_queue_keeps_order_and_removes_one_among_several() {
    let s = temp_storage();
    let (g, other) = (t("g"), t("other-group"));
    for n in ["p1", "p2", "p3"] {
        s.queue_proposal(&g, &t(n), &t(&format!("proposal {n}")))
            .unwrap();
    }
    s.queue_proposal(&other, &t("p1"), &t("other p1")).unwrap();
    assert_eq!(
        s.queued_proposal_refs::<T, T>(&g).unwrap(),
        vec![t("p1"), t("p2"), t("p3")]
    );
    s.remove_proposal(&g, &t("p2")).unwrap();
    let left: Vec<(T, T)> = s.queued_proposals(&g).unwrap();
    assert_eq!(
        left,
        vec![(t("p1"), t("proposal p1")), (t("p3"), t("proposal p3"))]
    );
    s.clear_proposal_queue::<T, T>(&g).unwrap();
    assert!(s.queued_proposals::<T, T, T>(&g).unwrap().is_empty());
    assert!(s.queued_proposal_refs::<T, T>(&g).unwrap().is_empty());
    // The other group's queue is untouched, and the same ref there survives.
    assert_eq!(
        s.queued_proposals::<T, T, T>(&other).unwrap(),
        vec![(t("p1"), t("other p1"))]
    );
    // The cleared proposals' values are gone from the tree, not just unlisted.
    let tree = s
        .store()
        .raw_db()
        .open_tree(Family::QueuedProposals.tree_name())
        .unwrap();
    assert_eq!(tree.len(), 1);
}

#[test]
fn namespaces_do_not_see_each_other() {
    let store = Store::temporary(StoreConfig::default()).unwrap();
    let a = store.storage(b"alice").unwrap();
    let b = store.storage(b"bob").unwrap();
    let g = t("same-group-id");
    a.write_tree(&g, &t("alice's tree")).unwrap();
    a.queue_proposal(&g, &t("r"), &t("p")).unwrap();
    assert_eq!(b.tree::<T, T>(&g).unwrap(), None);
    assert!(b.queued_proposals::<T, T, T>(&g).unwrap().is_empty());
    b.write_tree(&g, &t("bob's tree")).unwrap();
    b.delete_tree(&g).unwrap();
    assert_eq!(a.tree::<T, T>(&g).unwrap(), Some(t("alice's tree")));
    // A namespace that is a prefix of another cannot collide either.
    let ab = store.storage(b"alic").unwrap();
    assert_eq!(ab.tree::<T, T>(&g).unwrap(), None);
    assert!(matches!(
        store.storage(&[0u8; 256]),
        Err(StorageError::NamespaceTooLong(256))
    ));
}

/// Overwrite the stored bytes of one entity through sled directly.
fn corrupt(s: &SledStorage, family: Family, f: impl Fn(&[u8]) -> Vec<u8>) {
    let tree = s.store().raw_db().open_tree(family.tree_name()).unwrap();
    let keys: Vec<_> = tree.iter().keys().map(|k| k.unwrap()).collect();
    assert!(!keys.is_empty());
    for k in keys {
        let v = tree.get(&k).unwrap().unwrap();
        tree.insert(k, f(&v)).unwrap();
    }
}

#[test]
fn corrupt_or_truncated_values_are_errors_naming_tree_and_key() {
    type Damage = fn(&[u8]) -> Vec<u8>;
    let damages: [(&str, Damage); 4] = [
        ("truncated", |v| v[..v.len() / 2].to_vec()),
        ("empty", |_| Vec::new()),
        ("unknown version", |v| {
            let mut v = v.to_vec();
            v[0] = 200;
            v
        }),
        ("garbage", |_| b"\x01{not json".to_vec()),
    ];
    for (what, damage) in damages {
        let s = temp_storage();
        let g = t("g");
        s.write_tree(&g, &t("tree")).unwrap();
        s.append_own_leaf_node(&g, &t("leaf")).unwrap();
        s.queue_proposal(&g, &t("r"), &t("p")).unwrap();
        corrupt(&s, Family::Trees, damage);
        corrupt(&s, Family::OwnLeafNodes, damage);
        corrupt(&s, Family::QueuedProposals, damage);

        let err = s.tree::<T, T>(&g).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{what}: {msg}");
        assert!(msg.contains("mls.trees"), "{what}: {msg}");
        assert!(s.own_leaf_nodes::<T, T>(&g).is_err(), "{what}");
        assert!(s.queued_proposals::<T, T, T>(&g).is_err(), "{what}");
        // Appending to a corrupt list fails instead of silently resetting it.
        assert!(s.append_own_leaf_node(&g, &t("more")).is_err(), "{what}");
    }
}

#[test]
fn dangling_proposal_reference_is_reported() {
    let s = temp_storage();
    let g = t("g");
    s.queue_proposal(&g, &t("r"), &t("p")).unwrap();
    let tree = s
        .store()
        .raw_db()
        .open_tree(Family::QueuedProposals.tree_name())
        .unwrap();
    tree.clear().unwrap();
    let err = s.queued_proposals::<T, T, T>(&g).unwrap_err();
    assert!(err.to_string().contains("not stored"), "{err}");
}

#[test]
fn newer_format_is_refused_and_data_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), StoreConfig::default())
            .unwrap()
            .storage(b"")
            .unwrap();
        s.write_tree(&t("g"), &t("tree")).unwrap();
        let meta = s.store().raw_db().open_tree(META_TREE).unwrap();
        meta.insert("format_version", &99u32.to_be_bytes()).unwrap();
        s.store().flush().unwrap();
    }
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    assert!(
        matches!(err, StorageError::NewerFormat { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer"));
    // The data is still there for a newer build.
    let db = sled_after_refusal(dir.path());
    assert_eq!(db.open_tree(Family::Trees.tree_name()).unwrap().len(), 1);
}

/// Open the raw sled database that `Store::open` just refused. sled releases
/// its file lock from a background thread after the refused handle is
/// dropped, so under load the lock can still be held for a moment (as
/// `Store::open` itself allows for).
fn sled_after_refusal(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("cannot reopen {}: {e}", path.display()),
        }
    }
}

#[test]
fn foreign_database_is_not_claimed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("somebody-else")
            .unwrap()
            .insert("k", "v")
            .unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::BadFormatRecord(_)), "{err}");
    let db = sled_after_refusal(dir.path());
    assert!(!db
        .open_tree(META_TREE)
        .unwrap()
        .contains_key("format_version")
        .unwrap());
}

#[test]
fn unopenable_path_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"precious").unwrap();
    let err = Store::open(&file, StoreConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::Open { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStorage::open(dir.path()).unwrap();
        s.write_group_state(&t("g"), &t("state")).unwrap();
        s.queue_proposal(&t("g"), &t("r"), &t("p")).unwrap();
    }
    let s = SledStorage::open(dir.path()).unwrap();
    assert_eq!(s.group_state::<T, T>(&t("g")).unwrap(), Some(t("state")));
    assert_eq!(
        s.queued_proposal_refs::<T, T>(&t("g")).unwrap(),
        vec![t("r")]
    );
}

#[test]
fn transaction_reads_its_own_writes_and_commits_all_at_once() {
    let s = temp_storage();
    let records = s.store().record_tree("cursor").unwrap();
    let g = t("g");
    s.write_tree(&g, &t("old")).unwrap();

    let tx = s.begin();
    tx.write_tree(&g, &t("new")).unwrap();
    tx.queue_proposal(&g, &t("r1"), &t("p1")).unwrap();
    tx.queue_proposal(&g, &t("r2"), &t("p2")).unwrap();
    tx.remove_proposal(&g, &t("r1")).unwrap();
    tx.put_raw(records, b"seq", b"42").unwrap();
    // Inside: own writes visible, including list edits and records.
    assert_eq!(tx.tree::<T, T>(&g).unwrap(), Some(t("new")));
    assert_eq!(tx.queued_proposal_refs::<T, T>(&g).unwrap(), vec![t("r2")]);
    assert_eq!(
        tx.get_raw(records, b"seq").unwrap().as_deref(),
        Some(&b"42"[..])
    );
    // Outside: nothing yet.
    assert_eq!(s.tree::<T, T>(&g).unwrap(), Some(t("old")));
    assert!(s.queued_proposal_refs::<T, T>(&g).unwrap().is_empty());
    assert_eq!(s.get_raw(records, b"seq").unwrap(), None);
    tx.commit().unwrap();

    assert_eq!(s.tree::<T, T>(&g).unwrap(), Some(t("new")));
    assert_eq!(
        s.queued_proposals::<T, T, T>(&g).unwrap(),
        vec![(t("r2"), t("p2"))]
    );
    assert_eq!(
        s.get_raw(records, b"seq").unwrap().as_deref(),
        Some(&b"42"[..])
    );
}

#[test]
fn dropped_or_failed_transaction_changes_nothing() {
    let s = temp_storage();
    let g = t("g");
    s.write_tree(&g, &t("old")).unwrap();
    {
        let tx = s.begin();
        tx.write_tree(&g, &t("new")).unwrap();
        tx.delete_tree(&g).unwrap();
        tx.write_group_state(&g, &t("state")).unwrap();
    } // dropped: rolled back
    assert_eq!(s.tree::<T, T>(&g).unwrap(), Some(t("old")));
    assert_eq!(s.group_state::<T, T>(&g).unwrap(), None);

    let res: Result<(), StorageError> = s.transaction(|tx| {
        tx.write_tree(&g, &t("new"))?;
        Err(StorageError::TransactionClosed)
    });
    assert!(res.is_err());
    assert_eq!(s.tree::<T, T>(&g).unwrap(), Some(t("old")));

    // A view kept past its transaction refuses further use.
    let mut leaked = None;
    s.transaction(|tx| {
        leaked = Some(tx.clone());
        Ok::<_, StorageError>(())
    })
    .unwrap();
    let leaked = leaked.unwrap();
    assert!(matches!(
        leaked.write_tree(&g, &t("late")),
        Err(StorageError::TransactionClosed)
    ));
}

#[test]
fn injected_failure_after_k_writes_leaves_nothing() {
    for k in 0..4 {
        let s = temp_storage();
        let g = t("g");
        let tx = s.begin();
        tx.inject_failure_after(k);
        let results = [
            tx.write_tree(&g, &t("tree")),
            tx.write_context(&g, &t("ctx")),
            tx.write_group_state(&g, &t("state")),
            tx.write_confirmation_tag(&g, &t("tag")),
        ];
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), k);
        assert!(matches!(results[k], Err(StorageError::Injected(_))));
        drop(tx);
        assert_eq!(s.tree::<T, T>(&g).unwrap(), None);
        assert_eq!(s.group_context::<T, T>(&g).unwrap(), None);
    }
}

#[test]
fn record_scan_merges_transaction_writes() {
    let s = temp_storage();
    let q = s.store().record_tree("queue").unwrap();
    s.put_raw(q, b"q/1", b"a").unwrap();
    s.put_raw(q, b"q/2", b"b").unwrap();
    s.put_raw(q, b"r/1", b"x").unwrap();
    let tx = s.begin();
    tx.remove_raw(q, b"q/1").unwrap();
    tx.put_raw(q, b"q/3", b"c").unwrap();
    let seen: Vec<_> = tx.scan_raw(q, b"q/").unwrap();
    assert_eq!(
        seen,
        vec![
            (b"q/2".to_vec(), b"b".to_vec()),
            (b"q/3".to_vec(), b"c".to_vec())
        ]
    );
    tx.commit().unwrap();
    assert_eq!(s.scan_raw(q, b"q/").unwrap().len(), 2);

    #[derive(bincode::Encode, bincode::Decode, Debug, PartialEq)]
    struct Cursor {
        seq: u64,
    }
    s.put_record(q, b"cursor", &Cursor { seq: 9 }).unwrap();
    assert_eq!(
        s.get_record::<Cursor>(q, b"cursor").unwrap(),
        Some(Cursor { seq: 9 })
    );
    s.put_raw(q, b"cursor", b"\x01").unwrap();
    assert!(s.get_record::<Cursor>(q, b"cursor").is_err());
}

#[cfg(feature = "virtual-clients-draft")]
#[test]
fn virtual_client_state_and_retained_material() {
    let s = temp_storage();
    let (e1, e2) = (t("epoch-1"), t("epoch-2"));
    s.write_vc_emulation_epoch_state(&e1, &t("state")).unwrap();
    assert_eq!(
        s.vc_emulation_epoch_state::<T, T>(&e1).unwrap(),
        Some(t("state"))
    );
    s.write_vc_operation_tree(&e1, &t("tree")).unwrap();
    assert_eq!(s.vc_operation_tree::<T, T>(&e1).unwrap(), Some(t("tree")));

    s.write_retained_key_package_material_batch(
        &e1,
        &t("tree-2"),
        &[(t("kp1"), t("m1")), (t("kp2"), t("m2"))],
    )
    .unwrap();
    assert_eq!(s.vc_operation_tree::<T, T>(&e1).unwrap(), Some(t("tree-2")));
    assert_eq!(
        s.retained_key_package_material::<T, T>(&t("kp1")).unwrap(),
        Some(t("m1"))
    );
    assert!(s.has_retained_key_package_material_for_epoch(&e1).unwrap());
    assert!(!s.has_retained_key_package_material_for_epoch(&e2).unwrap());
    // Referenced: kept.
    assert!(!s.delete_vc_emulation_state_if_unreferenced(&e1).unwrap());
    assert!(s.vc_emulation_epoch_state::<T, T>(&e1).unwrap().is_some());
    // Deleting the key packages removes their material too.
    s.delete_key_package(&t("kp1")).unwrap();
    assert_eq!(
        s.retained_key_package_material::<T, T>(&t("kp1")).unwrap(),
        None
    );
    assert!(s.has_retained_key_package_material_for_epoch(&e1).unwrap());
    s.delete_retained_key_package_material(&t("kp2")).unwrap();
    assert!(!s.has_retained_key_package_material_for_epoch(&e1).unwrap());
    // Unreferenced: deleted, state and tree both.
    assert!(s.delete_vc_emulation_state_if_unreferenced(&e1).unwrap());
    assert_eq!(s.vc_emulation_epoch_state::<T, T>(&e1).unwrap(), None);
    assert_eq!(s.vc_operation_tree::<T, T>(&e1).unwrap(), None);
    // Re-tagging a material with another epoch moves it in the index.
    s.write_retained_key_package_material_batch(&e1, &t("t"), &[(t("kp3"), t("m"))])
        .unwrap();
    s.write_retained_key_package_material_batch(&e2, &t("t"), &[(t("kp3"), t("m'"))])
        .unwrap();
    assert!(!s.has_retained_key_package_material_for_epoch(&e1).unwrap());
    assert!(s.has_retained_key_package_material_for_epoch(&e2).unwrap());
}

#[test]
fn pending_writes_of_many_transactions_apply_as_one_in_order() {
    let s = temp_storage();
    let store = s.store();
    let records = store.record_tree("pending").unwrap();
    let first = s.begin();
    first.put_raw(records, b"a", b"1").unwrap();
    first.put_raw(records, b"b", b"1").unwrap();
    // Writes of a second transaction touch two trees (records and a family).
    let second = s.begin();
    second.put_raw(records, b"a", b"2").unwrap();
    second.remove_raw(records, b"b").unwrap();
    second
        .write_key_package(&T(b"kp".to_vec()), &T(b"v".to_vec()))
        .unwrap();
    let pending = vec![
        first.into_pending().unwrap(),
        second.into_pending().unwrap(),
    ];
    assert_eq!(pending[0].len(), 2);
    assert!(!pending[1].is_empty());
    // Nothing is visible before the apply.
    assert_eq!(s.get_raw(records, b"a").unwrap(), None);
    store.apply_all(pending).unwrap();
    assert_eq!(s.get_raw(records, b"a").unwrap(), Some(b"2".to_vec()));
    assert_eq!(s.get_raw(records, b"b").unwrap(), None, "later delete wins");
    let kp: Option<T> = s.key_package(&T(b"kp".to_vec())).unwrap();
    assert_eq!(kp, Some(T(b"v".to_vec())));
    // Taken-out writes leave nothing for a later commit to apply twice.
    let third = s.begin();
    third.put_raw(records, b"c", b"3").unwrap();
    let taken = third.into_pending().unwrap();
    drop(taken);
    assert_eq!(
        s.get_raw(records, b"c").unwrap(),
        None,
        "dropped, never applied"
    );
}

#[test]
fn single_key_writes_apply_in_order_between_atomic_sets() {
    let s = temp_storage();
    let store = s.store();
    let records = store.record_tree("single").unwrap();
    let fan_out = s.begin();
    fan_out.put_raw(records, b"m1", b"body").unwrap();
    fan_out.put_raw(records, b"r1", b"record").unwrap();
    let singles = fan_out.into_pending().unwrap().into_single_writes();
    assert_eq!(singles.len(), 2);
    assert!(singles.iter().all(|p| p.len() == 1));
    let atomic = s.begin();
    atomic.put_raw(records, b"m1", b"replaced").unwrap();
    atomic.put_raw(records, b"g", b"state").unwrap();
    let after = s.begin();
    after.remove_raw(records, b"r1").unwrap();
    let mut pending = singles;
    pending.push(atomic.into_pending().unwrap());
    pending.push(after.into_pending().unwrap());
    store.apply_all(pending).unwrap();
    assert_eq!(
        s.get_raw(records, b"m1").unwrap(),
        Some(b"replaced".to_vec())
    );
    assert_eq!(s.get_raw(records, b"g").unwrap(), Some(b"state".to_vec()));
    assert_eq!(
        s.get_raw(records, b"r1").unwrap(),
        None,
        "the later removal wins"
    );
}
