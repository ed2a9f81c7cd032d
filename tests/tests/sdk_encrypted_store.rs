//! The SDK's encrypted store against the real DS: alice (a 32-byte key) and
//! bob (a passphrase) chat with carol (no encryption); afterwards none of
//! the ids, the group id or the message texts can be found in alice's or
//! bob's files, while carol's hold them all (so the search finds what is
//! there). A wrong key, a missing key and a key for an unencrypted store
//! are refused without changing anything, and the right key reopens a
//! client that goes on chatting. `mls-chat --passphrase-file` does the same
//! from the command line.

use std::path::Path;
use std::process::Command;

use mls_ds_client::{Client, ClientConfig, ClientError, StorageError, StoreKey};
use mls_ds_tests::{binary, dir_bytes, message_texts, Server};

const ALICE: &str = "alice-sealed-7c1e";
const BOB: &str = "bob-sealed-93ad";
const CAROL: &str = "carol-plain-5f02";
const KEY: [u8; 32] = [0x42; 32];
const PASSPHRASE: &str = "correct horse battery staple";

fn config(key: Option<StoreKey>) -> ClientConfig {
    ClientConfig {
        store_key: key,
        ..ClientConfig::default()
    }
}

fn key_of(name: &str) -> Option<StoreKey> {
    match name {
        ALICE => Some(StoreKey::from_bytes(KEY)),
        BOB => Some(StoreKey::from_passphrase(PASSPHRASE)),
        _ => None,
    }
}

/// A byte string raw, as a JSON array of numbers (OpenMLS values) and hex.
fn forms(bytes: &[u8]) -> Vec<Vec<u8>> {
    let numbers: Vec<String> = bytes.iter().map(u8::to_string).collect();
    vec![
        bytes.to_vec(),
        numbers.join(",").into_bytes(),
        hex::encode(bytes).into_bytes(),
    ]
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    forms(needle)
        .iter()
        .any(|f| haystack.windows(f.len()).any(|w| w == f.as_slice()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_client_store_holds_no_known_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let open = |name: &str, key: Option<StoreKey>| {
        Client::open(dir.path().join(name), &url, name, config(key))
    };
    let names = [ALICE, BOB, CAROL];
    let clients: Vec<Client> = names.iter().map(|n| open(n, key_of(n)).unwrap()).collect();
    for c in &clients {
        c.register().await.unwrap();
    }
    let gid = clients[0].create_group(false).await.unwrap();
    clients[0].invite(&gid, &[BOB, CAROL]).await.unwrap();
    let message = |from: &str| format!("a secret from {from}: meet at the old mill at nine");
    for c in &clients {
        c.sync().await.unwrap();
        c.send(&gid, message(&c.id().to_string()).as_bytes())
            .await
            .unwrap();
    }
    for c in &clients {
        let got = message_texts(&c.receive(0).await.unwrap());
        assert_eq!(got.len(), 2, "{} got {got:?}", c.id());
    }
    drop(clients);

    let mut needles: Vec<(String, Vec<u8>)> = vec![("group id".into(), gid.clone())];
    for n in names {
        needles.push((format!("id {n}"), n.as_bytes().to_vec()));
        needles.push((format!("message of {n}"), message(n).into_bytes()));
    }
    let carol = dir_bytes(&dir.path().join(CAROL));
    for (what, needle) in &needles {
        assert!(
            holds(&carol, needle),
            "carol's plain store does not hold the {what}: the search would prove nothing"
        );
    }
    for n in [ALICE, BOB] {
        let sealed = dir_bytes(&dir.path().join(n));
        for (what, needle) in &needles {
            assert!(
                !holds(&sealed, needle),
                "{n}'s encrypted store holds the {what}"
            );
        }
    }

    // Wrong, missing and needless keys: refused; the right keys open the
    // stores afterwards, as they were.
    let refusals = [
        open(ALICE, Some(StoreKey::from_bytes([1; 32]))).err(),
        open(ALICE, Some(StoreKey::from_passphrase(PASSPHRASE))).err(),
        open(ALICE, None).err(),
        open(CAROL, Some(StoreKey::from_bytes(KEY))).err(),
    ];
    let storage = |e: &Option<ClientError>| match e {
        Some(ClientError::Storage(s)) => Some(s.to_string()),
        _ => None,
    };
    assert!(
        matches!(
            refusals[0],
            Some(ClientError::Storage(StorageError::WrongKey(_)))
        ),
        "{:?}",
        storage(&refusals[0])
    );
    assert!(
        matches!(
            refusals[1],
            Some(ClientError::Storage(StorageError::WrongKey(_)))
        ),
        "{:?}",
        storage(&refusals[1])
    );
    assert!(
        matches!(
            refusals[2],
            Some(ClientError::Storage(StorageError::KeyRequired { .. }))
        ),
        "{:?}",
        storage(&refusals[2])
    );
    assert!(
        matches!(
            refusals[3],
            Some(ClientError::Storage(StorageError::NotEncrypted { .. }))
        ),
        "{:?}",
        storage(&refusals[3])
    );

    // The right keys reopen them, and the group goes on.
    let clients: Vec<Client> = names.iter().map(|n| open(n, key_of(n)).unwrap()).collect();
    clients[1].send(&gid, b"still here").await.unwrap();
    for i in [0, 2] {
        assert_eq!(
            message_texts(&clients[i].receive(0).await.unwrap()),
            ["still here"]
        );
    }
}

fn chat(dir: &Path, url: &str, pass: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(binary("mls-ds-client", "mls-chat"));
    cmd.arg("--data-dir").arg(dir).args(["--server", url]);
    if let Some(p) = pass {
        cmd.arg("--passphrase-file").arg(p);
    }
    cmd.args(args).output().expect("run mls-chat")
}

#[test]
fn mls_chat_encrypts_with_a_passphrase_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let pass = dir.path().join("passphrase");
    std::fs::write(&pass, "tr0ub4dor &3\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "tr0ub4dor &4\n").unwrap();
    let alice = dir.path().join("alice");

    let out = chat(&alice, &url, Some(&pass), &["register", "--name", ALICE]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!holds(&dir_bytes(&alice), ALICE.as_bytes()));

    let out = chat(&alice, &url, None, &["groups"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("encrypted") && err.contains("--passphrase-file"),
        "{err}"
    );
    let out = chat(&alice, &url, Some(&wrong), &["groups"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("wrong store key"), "{err}");

    let out = chat(&alice, &url, Some(&pass), &["create-group"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
