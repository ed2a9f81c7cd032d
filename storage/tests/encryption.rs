//! Encryption at rest: an MLS group run on encrypted stores leaves none of
//! its known plaintexts (group id, member names, signature keys, a record's
//! text) anywhere in the store's files, in any of the forms the plain store
//! holds them in; the same run on plain stores finds every one (so the
//! search is meaningful). A wrong key, a missing key, or a key for a plain
//! store is refused and changes nothing. Scans, ranges and lookups give the
//! same answers with and without encryption, in and outside transactions.

mod common;

use std::path::Path;

use common::*;
use mls_ds_storage::{SledProvider, StorageError, Store, StoreConfig, StoreKey};
use rand::{Rng, SeedableRng};

const KEY: [u8; 32] = [0x5a; 32];
const SECRET_TEXT: &[u8] = b"the launch code is swordfish-7781";

fn config(key: Option<StoreKey>) -> StoreConfig {
    StoreConfig {
        encryption: key,
        ..StoreConfig::default()
    }
}

fn open(dir: &Path, key: Option<StoreKey>, ns: &[u8]) -> Result<SledProvider, StorageError> {
    let store = Store::open(dir, config(key))?;
    Ok(SledProvider::new(store.storage(ns)?))
}

/// Every file under `dir`, concatenated (sled's log, snapshots, blobs).
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

/// The forms a byte string takes in a plain store: raw (OpenMLS values, in
/// MessagePack), as serde_json's array of numbers (OpenMLS keys), and as hex.
fn forms(bytes: &[u8]) -> Vec<Vec<u8>> {
    let numbers: Vec<String> = bytes.iter().map(u8::to_string).collect();
    vec![
        bytes.to_vec(),
        numbers.join(",").into_bytes(),
        hex::encode(bytes).into_bytes(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

struct Run {
    /// What must not be readable, by name.
    needles: Vec<(String, Vec<u8>)>,
}

/// Two members in their own stores: a group, a message each way, a record
/// holding a secret text; then the stores are closed.
fn run_group(dirs: &[&Path; 2], key: Option<[u8; 32]>) -> Run {
    let names = ["alice-at-rest-4711", "bob-at-rest-0815"];
    let namespace = b"namespace-of-the-client";
    let mut members: Vec<Member<SledProvider>> = names
        .iter()
        .zip(dirs)
        .map(|(n, d)| {
            Member::new(
                n,
                open(d, key.map(StoreKey::from_bytes), namespace).unwrap(),
            )
        })
        .collect();
    members[0].create_group();
    let kp = members[1].key_package();
    let (_, welcome) = members[0].add(&[kp]);
    members[1].join(&welcome);
    chat(&mut members, 0, b"hello bob");
    chat(&mut members, 1, b"hello alice");
    let records = members[0]
        .provider
        .storage()
        .store()
        .record_tree("notes")
        .unwrap();
    members[0]
        .provider
        .storage()
        .put_raw(records, b"group/storage-test-group", SECRET_TEXT)
        .unwrap();
    assert_eq!(members[0].epoch(), members[1].epoch());

    let mut needles = vec![
        ("group id".to_owned(), group_id().as_slice().to_vec()),
        ("namespace".to_owned(), namespace.to_vec()),
        ("record text".to_owned(), SECRET_TEXT.to_vec()),
    ];
    for m in &members {
        needles.push((format!("{} name", m.name), m.name.as_bytes().to_vec()));
        needles.push((
            format!("{} signature public key", m.name),
            m.signer.public().to_vec(),
        ));
    }
    for m in &mut members {
        m.provider.storage().store().flush().unwrap();
    }
    drop(members);
    Run { needles }
}

#[test]
fn an_encrypted_store_holds_no_known_plaintext() {
    let plain: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let sealed: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let plain_run = run_group(&[plain[0].path(), plain[1].path()], None);
    let sealed_run = run_group(&[sealed[0].path(), sealed[1].path()], Some(KEY));

    // The search finds each plaintext in the plain stores...
    let plain_bytes: Vec<Vec<u8>> = plain.iter().map(|d| all_bytes(d.path())).collect();
    for (what, needle) in &plain_run.needles {
        assert!(
            forms(needle)
                .iter()
                .any(|f| plain_bytes.iter().any(|b| contains(b, f))),
            "the plain store does not hold the {what}: the search would prove nothing"
        );
    }
    // ...and none of them in the encrypted ones.
    let sealed_bytes: Vec<Vec<u8>> = sealed.iter().map(|d| all_bytes(d.path())).collect();
    for (what, needle) in &sealed_run.needles {
        for f in forms(needle) {
            assert!(
                !sealed_bytes.iter().any(|b| contains(b, &f)),
                "the encrypted store holds the {what}"
            );
        }
    }

    // Reopened with its key, the group is all there.
    let p = open(
        sealed[0].path(),
        Some(StoreKey::from_bytes(KEY)),
        b"namespace-of-the-client",
    )
    .unwrap();
    let group = openmls::prelude::MlsGroup::load(p.storage(), &group_id())
        .unwrap()
        .expect("group survives reopening");
    assert_eq!(group.members().count(), 2);
    let records = p.storage().store().record_tree("notes").unwrap();
    assert_eq!(
        p.storage()
            .get_raw(records, b"group/storage-test-group")
            .unwrap()
            .as_deref(),
        Some(SECRET_TEXT)
    );
}

#[test]
fn wrong_or_missing_keys_are_refused_and_change_nothing() {
    let sealed = tempfile::tempdir().unwrap();
    let plain = tempfile::tempdir().unwrap();
    for (dir, key) in [(sealed.path(), Some(KEY)), (plain.path(), None)] {
        let p = open(dir, key.map(StoreKey::from_bytes), b"ns").unwrap();
        let records = p.storage().store().record_tree("r").unwrap();
        p.storage().put_raw(records, b"k", b"v").unwrap();
    }
    let refused = [
        open(sealed.path(), Some(StoreKey::from_bytes([1; 32])), b"ns").err(),
        open(
            sealed.path(),
            Some(StoreKey::from_passphrase("guess")),
            b"ns",
        )
        .err(),
        open(sealed.path(), None, b"ns").err(),
        open(plain.path(), Some(StoreKey::from_bytes(KEY)), b"ns").err(),
    ];
    assert!(
        matches!(refused[0], Some(StorageError::WrongKey(_))),
        "{refused:?}"
    );
    assert!(
        matches!(refused[1], Some(StorageError::WrongKey(_))),
        "{refused:?}"
    );
    assert!(
        matches!(refused[2], Some(StorageError::KeyRequired { .. })),
        "{refused:?}"
    );
    assert!(
        matches!(refused[3], Some(StorageError::NotEncrypted { .. })),
        "{refused:?}"
    );

    // Nothing changed: the right keys (and no key for the plain store)
    // still open both, with their contents. (sled rewrites parts of its
    // files at every open, so the files themselves are not compared.)
    for (dir, key) in [(sealed.path(), Some(KEY)), (plain.path(), None)] {
        let p = open(dir, key.map(StoreKey::from_bytes), b"ns").unwrap();
        let records = p.storage().store().record_tree("r").unwrap();
        assert_eq!(
            p.storage().scan_raw(records, b"").unwrap(),
            vec![(b"k".to_vec(), b"v".to_vec())]
        );
    }
}

#[test]
fn a_passphrase_opens_its_store_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = open(
            dir.path(),
            Some(StoreKey::from_passphrase("correct horse")),
            b"ns",
        )
        .unwrap();
        let records = p.storage().store().record_tree("r").unwrap();
        p.storage().put_raw(records, b"k", b"v").unwrap();
    }
    assert!(matches!(
        open(
            dir.path(),
            Some(StoreKey::from_passphrase("correct hors")),
            b"ns"
        )
        .err(),
        Some(StorageError::WrongKey(_))
    ));
    let p = open(
        dir.path(),
        Some(StoreKey::from_passphrase("correct horse")),
        b"ns",
    )
    .unwrap();
    let records = p.storage().store().record_tree("r").unwrap();
    assert_eq!(
        p.storage().get_raw(records, b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

/// Random writes, some in transactions, to a plain and an encrypted store;
/// every read API answers the same on both, and a scan in place
/// (`for_each_raw`) reads what the copying range read does.
#[test]
fn reads_answer_the_same_with_and_without_encryption() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let stores = [
        Store::temporary(config(None)).unwrap(),
        Store::temporary(config(Some(StoreKey::from_bytes(KEY)))).unwrap(),
    ];
    let handles: Vec<_> = stores
        .iter()
        .map(|s| {
            (
                s.storage(b"ns/with/slashes").unwrap(),
                s.record_tree("r").unwrap(),
            )
        })
        .collect();
    let prefixes: [&[u8]; 5] = [b"inbox/", b"inbox/a/", b"send/", b"cursor", b""];
    let key = |rng: &mut rand::rngs::StdRng| -> Vec<u8> {
        let mut k = prefixes[rng.gen_range(0..prefixes.len())].to_vec();
        for _ in 0..rng.gen_range(0..4) {
            k.push(*b"ab/\x00\xff".get(rng.gen_range(0..5)).unwrap());
        }
        k
    };
    for round in 0..300 {
        let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..rng.gen_range(1..5))
            .map(|_| {
                let k = key(&mut rng);
                let v = rng
                    .gen_bool(0.8)
                    .then(|| vec![rng.gen(); rng.gen_range(0..20)]);
                (k, v)
            })
            .collect();
        let in_tx = rng.gen_bool(0.5);
        let probe = key(&mut rng);
        let (lo, hi) = {
            let (a, b) = (key(&mut rng), key(&mut rng));
            if a <= b {
                (a, b)
            } else {
                (b, a)
            }
        };
        let mut answers = Vec::new();
        for (storage, tree) in &handles {
            let tx = storage.begin();
            let view = if in_tx { &*tx } else { storage };
            for (k, v) in &writes {
                match v {
                    Some(v) => view.put_raw(*tree, k, v).unwrap(),
                    None => view.remove_raw(*tree, k).unwrap(),
                }
            }
            let mut scanned = Vec::new();
            storage
                .for_each_raw::<StorageError>(*tree, &lo, &hi, |k, v| {
                    scanned.push((k.to_vec(), v.to_vec()));
                    Ok(())
                })
                .unwrap();
            if !in_tx {
                assert_eq!(
                    scanned,
                    view.range_raw(*tree, &lo, &hi, usize::MAX).unwrap()
                );
            }
            answers.push((
                scanned,
                prefixes
                    .iter()
                    .map(|p| view.scan_raw(*tree, p).unwrap())
                    .collect::<Vec<_>>(),
                view.get_raw(*tree, &probe).unwrap(),
                view.range_raw(*tree, &lo, &hi, 3).unwrap(),
                view.range_raw(*tree, &lo, &hi, usize::MAX).unwrap(),
                prefixes
                    .iter()
                    .map(|p| storage.last_raw(*tree, p).unwrap())
                    .collect::<Vec<_>>(),
            ));
            if in_tx {
                tx.commit().unwrap();
            }
        }
        assert!(answers[0] == answers[1], "round {round}: answers differ");
    }
}

/// A store without data takes whatever it is opened with, so a first
/// command that failed after opening does not lock it to its key; once it
/// holds data, only its key opens it.
#[test]
fn an_empty_store_takes_the_key_it_is_opened_with() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), Some(StoreKey::from_bytes([1; 32])), b"ns").unwrap());
    drop(open(dir.path(), Some(StoreKey::from_bytes([2; 32])), b"ns").unwrap());
    drop(open(dir.path(), None, b"ns").unwrap());
    let p = open(dir.path(), Some(StoreKey::from_bytes([3; 32])), b"ns").unwrap();
    let records = p.storage().store().record_tree("r").unwrap();
    p.storage().put_raw(records, b"k", b"v").unwrap();
    drop(p);
    assert!(matches!(
        open(dir.path(), Some(StoreKey::from_bytes([2; 32])), b"ns").err(),
        Some(StorageError::WrongKey(_))
    ));
    assert!(matches!(
        open(dir.path(), None, b"ns").err(),
        Some(StorageError::KeyRequired { .. })
    ));
    assert!(open(dir.path(), Some(StoreKey::from_bytes([3; 32])), b"ns").is_ok());
}

/// An encrypted store whose encryption record is gone is not taken for an
/// unencrypted one (which would add plain rows beside the sealed ones).
#[test]
fn a_lost_encryption_record_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), config(Some(StoreKey::from_bytes(KEY)))).unwrap();
        let s = store.storage(b"ns").unwrap();
        let records = store.record_tree("r").unwrap();
        s.put_raw(records, b"k", b"v").unwrap();
        let meta = store.raw_db().open_tree("meta").unwrap();
        meta.remove("encryption").unwrap();
        store.flush().unwrap();
    }
    for key in [None, Some(StoreKey::from_bytes(KEY))] {
        let err = open(dir.path(), key, b"ns").err();
        assert!(
            matches!(err, Some(StorageError::BadFormatRecord(_))),
            "{err:?}"
        );
    }
}
