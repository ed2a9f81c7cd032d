//! Key package upkeep by the SDK against the real DS: ordinary packages are
//! topped up after Welcomes used them, the last resort is replaced once it
//! was handed out, a Welcome made with the replaced last resort still opens
//! while its key is kept, and not after the key was deleted.

use std::time::Duration;

use mls_ds_client::{Client, ClientConfig, Event};
use mls_ds_tests::raw::RawMember;
use mls_ds_tests::Server;

/// A raw member with a group of its own.
async fn adder(url: &str, name: &str) -> RawMember {
    let mut m = RawMember::new(url, name);
    m.register(0).await;
    m.create_group(false).await;
    m
}

/// Add the holder of `kp` to `m`'s group.
async fn add(m: &mut RawMember, kp: openmls::prelude::KeyPackage) {
    let (c, w, gi) = m.stage_add(vec![kp]);
    m.api.commit(&m.gid(), c, w, gi).await.unwrap();
    m.merge();
}

fn joined(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Joined { .. }))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_are_topped_up_and_the_last_resort_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let config = ClientConfig {
        min_key_packages: 2,
        ..ClientConfig::default()
    };
    let alice = Client::open(dir.path().join("alice"), &url, "alice", config).unwrap();
    alice.register().await.unwrap();
    let first = alice.api().key_package_count().await.unwrap();
    assert_eq!(first.remaining, 2);
    assert!(first.has_last_resort.0);
    assert_eq!(first.last_resort_claims, 0);
    assert!(first.last_resort_not_after > 0);

    // Four claims: two ordinary packages, then the last resort twice. Erin
    // keeps hers for later.
    let mut adders = Vec::new();
    for name in ["bob", "carol", "dave", "erin"] {
        adders.push(adder(&url, name).await);
    }
    let mut claimed = Vec::new();
    for m in &adders {
        claimed.push(m.claim("alice").await);
    }
    assert!(!claimed[0].last_resort() && !claimed[1].last_resort());
    assert!(claimed[2].last_resort() && claimed[3].last_resort());
    let drained = alice.api().key_package_count().await.unwrap();
    assert_eq!((drained.remaining, drained.last_resort_claims), (0, 2));
    let erin_kp = claimed.pop().unwrap();
    for (m, kp) in adders.iter_mut().zip(claimed) {
        add(m, kp).await;
    }

    // Receiving the Welcomes triggers the upkeep: two fresh packages and a
    // new last resort, never handed out.
    let events = alice.receive(0).await.unwrap();
    assert_eq!(joined(&events), 3, "{events:?}");
    let after = alice.api().key_package_count().await.unwrap();
    assert_eq!(after.remaining, 2);
    assert!(after.has_last_resort.0);
    assert_eq!(after.last_resort_claims, 0, "the last resort was replaced");
    let fresh = adders[0].claim("alice").await;
    assert!(!fresh.last_resort());

    // Erin's Welcome, made with the replaced last resort, still opens: its
    // key is kept for Welcomes on their way.
    add(&mut adders[3], erin_kp).await;
    let events = alice.receive(0).await.unwrap();
    assert_eq!(joined(&events), 1, "{events:?}");
    assert_eq!(
        alice
            .export_secret(&adders[3].gid(), "t", 32)
            .await
            .unwrap(),
        adders[3].secret()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_of_a_replaced_last_resort_is_deleted_after_its_keep_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    // Only a last resort, and its key deleted as soon as it is replaced.
    let config = ClientConfig {
        min_key_packages: 0,
        retired_last_resort_keep: Duration::ZERO,
        ..ClientConfig::default()
    };
    let frank = Client::open(dir.path().join("frank"), &url, "frank", config).unwrap();
    frank.register().await.unwrap();
    let mut george = adder(&url, "george").await;
    let mut hannah = adder(&url, "hannah").await;
    let (kp1, kp2) = (george.claim("frank").await, hannah.claim("frank").await);
    assert!(kp1.last_resort() && kp2.last_resort());
    add(&mut george, kp1).await;
    let events = frank.receive(0).await.unwrap();
    assert_eq!(joined(&events), 1, "{events:?}");
    assert_eq!(
        frank
            .api()
            .key_package_count()
            .await
            .unwrap()
            .last_resort_claims,
        0
    );
    // Hannah's Welcome is to the deleted key: frank cannot open it, and says so.
    add(&mut hannah, kp2).await;
    let events = frank.receive(0).await.unwrap();
    assert_eq!(joined(&events), 0, "{events:?}");
    assert!(
        events.iter().any(|e| matches!(e, Event::Skipped { .. })),
        "{events:?}"
    );
}
