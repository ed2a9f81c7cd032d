//! A device that lost its whole store takes its client id back with the
//! recovery code from its registration: a wrong code changes nothing; the
//! right one binds the id to a new key (the old key's sessions end, its key
//! packages go), the client rejoins its groups by itself, everyone
//! converges, and messages flow again; the spent code no longer works.
//! Between the recovery on the DS and the rejoin, the old leaf is *stale*
//! (its key is no longer the registered one): the other members' commits
//! keep it, and the rejoin removes it.

use mls_ds_client::{Client, ClientConfig, Event, RecoveryCode};
use mls_ds_protocol::clients::recovery_hash;
use mls_ds_tests::raw::RawMember;
use mls_ds_tests::{dir_bytes, message_texts, Server};

fn open(dir: &std::path::Path, url: &str, name: &str) -> Client {
    Client::open(dir.join(name), url, name, ClientConfig::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_store_is_recovered_with_the_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let (alice, bob) = (
        open(dir.path(), &url, "alice"),
        open(dir.path(), &url, "bob"),
    );
    alice.register().await.unwrap();
    let code = bob
        .register()
        .await
        .unwrap()
        .expect("a first registration has a code");
    assert!(
        bob.register().await.unwrap().is_none(),
        "registering again keeps the first code (a key holder cannot replace it)"
    );
    // The store does not keep the code: a thief of the store could lock
    // bob out with it.
    let secret = hex::decode(code.to_string()).unwrap();
    bob.store().flush().unwrap();
    assert!(
        !dir_bytes(&dir.path().join("bob"))
            .windows(secret.len())
            .any(|w| w == secret.as_slice()),
        "the recovery secret is in bob's store"
    );
    let (g1, g2) = (
        alice.create_group(false).await.unwrap(),
        alice.create_group(false).await.unwrap(),
    );
    alice.invite(&g1, &["bob"]).await.unwrap();
    alice.invite(&g2, &["bob"]).await.unwrap();
    bob.receive(0).await.unwrap();
    let old_api = bob.api();
    old_api.key_package_count().await.unwrap();
    // The old device follows its queue on the stream.
    let mut old_stream = old_api.queue_stream(bob.cursor().unwrap()).await.unwrap();

    // The store is gone (bob keeps only his code). A wrong code changes
    // nothing.
    let wrong: RecoveryCode = "00".repeat(32).parse().unwrap();
    let err = Client::recover(
        dir.path().join("bob-wrong"),
        &url,
        "bob",
        &wrong,
        &RecoveryCode::generate(),
        ClientConfig::default(),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.status(), Some(403), "{err}");
    old_api.key_package_count().await.unwrap();

    let next = RecoveryCode::generate();
    let new_bob = Client::recover(
        dir.path().join("bob-new"),
        &url,
        "bob",
        &code,
        &next,
        ClientConfig::default(),
    )
    .await
    .unwrap();
    let mut rejoined: Vec<Vec<u8>> = new_bob
        .events()
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Event::Resynced { group_id, .. } => Some(group_id),
            _ => None,
        })
        .collect();
    rejoined.sort();
    let mut both = vec![g1.clone(), g2.clone()];
    both.sort();
    assert_eq!(rejoined, both);

    // The old key is out: its session ends, and it cannot open another;
    // its open stream ends too.
    let err = old_api.key_package_count().await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Ok(Some(_)) = old_stream.next_page().await {}
    })
    .await;
    assert!(ended.is_ok(), "the old device's stream still runs");

    // Alice processes bob's rejoins (and the commits that removed his old
    // leaves); they agree and talk.
    alice.receive(0).await.unwrap();
    for gid in [&g1, &g2] {
        let mut members = alice.members(gid).await.unwrap();
        members.sort();
        assert_eq!(members, ["alice", "bob"], "one leaf for bob");
        assert_eq!(
            alice.epoch(gid).await.unwrap(),
            new_bob.epoch(gid).await.unwrap()
        );
        assert_eq!(
            alice.export_secret(gid, "t", 32).await.unwrap(),
            new_bob.export_secret(gid, "t", 32).await.unwrap()
        );
    }
    alice.send(&g1, b"welcome back").await.unwrap();
    assert_eq!(
        message_texts(&new_bob.receive(0).await.unwrap()),
        ["welcome back"]
    );
    new_bob.send(&g2, b"thanks").await.unwrap();
    assert_eq!(message_texts(&alice.receive(0).await.unwrap()), ["thanks"]);

    // Bob's new key packages work: alice adds him to a new group.
    let g3 = alice.create_group(false).await.unwrap();
    alice.invite(&g3, &["bob"]).await.unwrap();
    assert!(new_bob
        .receive(0)
        .await
        .unwrap()
        .iter()
        .any(|e| matches!(e, Event::Joined { .. })));

    // The spent code takes nothing back...
    let err = Client::recover(
        dir.path().join("bob-again"),
        &url,
        "bob",
        &code,
        &RecoveryCode::generate(),
        ClientConfig::default(),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.status(), Some(403), "{err}");
    // ...but the same call again, in the same directory, is a retry (of a
    // recovery that failed midway) and goes through.
    drop(new_bob);
    let again = Client::recover(
        dir.path().join("bob-new"),
        &url,
        "bob",
        &code,
        &next,
        ClientConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        again.epoch(&g1).await.unwrap(),
        alice.epoch(&g1).await.unwrap()
    );
    drop(bob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_commit_while_a_stale_leaf_waits_for_its_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let (alice, bob, carol) = (
        open(dir.path(), &url, "alice"),
        open(dir.path(), &url, "bob"),
        open(dir.path(), &url, "carol"),
    );
    alice.register().await.unwrap();
    carol.register().await.unwrap();
    let code = bob.register().await.unwrap().expect("a first registration");
    let g = alice.create_group(false).await.unwrap();
    alice.invite(&g, &["bob", "carol"]).await.unwrap();
    bob.receive(0).await.unwrap();
    carol.receive(0).await.unwrap();
    drop(bob);

    // The DS binds bob's id to a new key (a device that took it back and
    // has not rejoined yet); the next secret is one this test knows.
    let next_secret = [9u8; 32];
    let midway = RawMember::new(&url, "bob");
    midway
        .api
        .recover(
            &hex::decode(code.to_string()).unwrap(),
            recovery_hash(&next_secret),
        )
        .await
        .unwrap();

    // Bob's old leaf is stale now; alice and carol go on committing.
    alice.self_update(&g).await.unwrap();
    carol.sync().await.unwrap();
    carol.self_update(&g).await.unwrap();
    alice.receive(0).await.unwrap();
    assert_eq!(
        alice.epoch(&g).await.unwrap(),
        carol.epoch(&g).await.unwrap()
    );

    // Bob takes his id back once more, for real: he rejoins and his old
    // leaf goes.
    let code: RecoveryCode = hex::encode(next_secret).parse().unwrap();
    let bob = Client::recover(
        dir.path().join("bob-new"),
        &url,
        "bob",
        &code,
        &RecoveryCode::generate(),
        ClientConfig::default(),
    )
    .await
    .unwrap();
    alice.receive(0).await.unwrap();
    carol.receive(0).await.unwrap();
    let secret = bob.export_secret(&g, "t", 32).await.unwrap();
    for c in [&alice, &carol] {
        assert_eq!(c.members(&g).await.unwrap(), ["alice", "bob", "carol"]);
        assert_eq!(c.epoch(&g).await.unwrap(), bob.epoch(&g).await.unwrap());
        assert_eq!(c.export_secret(&g, "t", 32).await.unwrap(), secret);
    }
    bob.send(&g, b"back").await.unwrap();
    assert_eq!(message_texts(&alice.receive(0).await.unwrap()), ["back"]);
}
