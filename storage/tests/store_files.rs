//! What a `Store` does with its directory as a whole: the size it reports,
//! the copy `export_to` writes, and the lock that keeps a second handle out.

use mls_ds_storage::{StorageError, Store, StoreConfig};
use openmls_traits::storage::{traits, Entity, Key, StorageProvider, CURRENT_VERSION};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct T(Vec<u8>);

impl Key<CURRENT_VERSION> for T {}
impl Entity<CURRENT_VERSION> for T {}
impl traits::GroupId<CURRENT_VERSION> for T {}
impl traits::TreeSync<CURRENT_VERSION> for T {}

fn t(s: &str) -> T {
    T(s.as_bytes().to_vec())
}

#[test]
fn size_on_disk_grows_with_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let before = store.size_on_disk().unwrap();
    let s = store.storage(b"n").unwrap();
    let records = store.record_tree("bulk").unwrap();
    let tx = s.begin();
    for i in 0u32..256 {
        tx.put_raw(records, &i.to_be_bytes(), &[7u8; 4096]).unwrap();
    }
    tx.commit().unwrap();
    let after = store.size_on_disk().unwrap();
    assert!(after >= before + 256 * 4096, "{before} -> {after}");
}

#[test]
fn export_copies_every_tree_into_a_new_database() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let target = dir.path().join("copy");
    let store = Store::open(&source, StoreConfig::default()).unwrap();
    let alice = store.storage(b"alice").unwrap();
    let bob = store.storage(b"bob").unwrap();
    let records = store.record_tree("records").unwrap();
    alice.write_tree(&t("g"), &t("alice's tree")).unwrap();
    bob.write_tree(&t("g"), &t("bob's tree")).unwrap();
    let tx = alice.begin();
    for i in 0u32..10_000 {
        tx.put_raw(records, &i.to_be_bytes(), &i.to_le_bytes())
            .unwrap();
    }
    tx.commit().unwrap();

    let report = store.export_to(&target).unwrap();
    assert_eq!(report.trees, store.raw_db().tree_names().len());
    assert!(report.entries >= 10_002, "{report:?}");

    let copy = Store::open(&target, StoreConfig::default()).unwrap();
    let (alice2, bob2) = (
        copy.storage(b"alice").unwrap(),
        copy.storage(b"bob").unwrap(),
    );
    assert_eq!(
        alice2.tree::<T, T>(&t("g")).unwrap(),
        Some(t("alice's tree"))
    );
    assert_eq!(bob2.tree::<T, T>(&t("g")).unwrap(), Some(t("bob's tree")));
    let records2 = copy.record_tree("records").unwrap();
    assert_eq!(
        alice2.scan_raw(records2, b"").unwrap(),
        alice.scan_raw(records, b"").unwrap()
    );
    // Tree by tree, the copy holds exactly what the source holds.
    for name in store.raw_db().tree_names() {
        let a: Vec<_> = store.raw_db().open_tree(&name).unwrap().iter().collect();
        let b: Vec<_> = copy.raw_db().open_tree(&name).unwrap().iter().collect();
        assert_eq!(a.len(), b.len(), "{}", String::from_utf8_lossy(&name));
        for (x, y) in a.into_iter().zip(b) {
            assert_eq!(x.unwrap(), y.unwrap());
        }
    }
}

#[test]
fn export_refuses_an_existing_target_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("source"), StoreConfig::default()).unwrap();
    store
        .storage(b"n")
        .unwrap()
        .write_tree(&t("g"), &t("tree"))
        .unwrap();
    let target = dir.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("precious"), b"keep me").unwrap();
    let err = store.export_to(&target).unwrap_err();
    assert!(
        matches!(&err, StorageError::ExportTargetExists { path } if *path == target),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&target).unwrap().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(std::fs::read(target.join("precious")).unwrap(), b"keep me");
}

/// sled locks the database file with `flock`, which binds the lock to one
/// open of the file, so a second open in the same process conflicts exactly
/// as one from another process does.
#[test]
fn a_database_held_open_is_reported_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let started = std::time::Instant::now();
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    assert!(
        matches!(&err, StorageError::InUse { path } if path == dir.path()),
        "{err}"
    );
    assert!(err.to_string().contains("in use"), "{err}");
    // The server's admin commands find a running server by this word.
    assert!(err.to_string().contains("lock"), "{err}");
    // It was retried before being reported (the wait covers this process's
    // own handle that is still closing).
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    drop(first);
    // Once the holder is gone the database opens again, with its data.
    Store::open(dir.path(), StoreConfig::default()).unwrap();
}
