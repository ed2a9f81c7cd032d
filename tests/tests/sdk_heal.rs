//! Self-healing against the real DS: a client that lost queue entries to
//! the DS's queue limit, or got a commit it cannot process (its tags
//! altered after signing, which the DS cannot check), notices it, rejoins
//! by itself with an external commit that replaces its own leaf, tells the
//! application, and ends converged with the others; messages flow again.

use mls_ds_client::{Client, ClientConfig, Event};
use mls_ds_tests::raw::RawMember;
use mls_ds_tests::{message_texts, Server};

fn open(dir: &std::path::Path, url: &str, name: &str) -> Client {
    Client::open(dir.join(name), url, name, ClientConfig::default()).unwrap()
}

async fn assert_converged(a: &Client, b: &Client, gid: &[u8]) {
    assert_eq!(a.epoch(gid).await.unwrap(), b.epoch(gid).await.unwrap());
    assert_eq!(
        a.export_secret(gid, "t", 32).await.unwrap(),
        b.export_secret(gid, "t", 32).await.unwrap()
    );
    assert_eq!(a.members(gid).await.unwrap(), b.members(gid).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_lost_to_the_queue_limit_are_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &["--max-queue-depth", "4"]);
    let url = server.url();
    let (alice, bob) = (
        open(dir.path(), &url, "alice"),
        open(dir.path(), &url, "bob"),
    );
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();
    bob.receive(0).await.unwrap();
    let before = bob.epoch(&gid).await.unwrap();

    // Bob away: a commit and ten messages; his queue keeps the last four.
    alice.self_update(&gid).await.unwrap();
    for i in 0..10 {
        alice.send(&gid, format!("m{i}").as_bytes()).await.unwrap();
    }
    let events = bob.receive(0).await.unwrap();
    let gap = events
        .iter()
        .find_map(|e| match e {
            Event::QueueGap { from, seq } => Some((*from, *seq)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no gap event: {events:?}"));
    assert_eq!(gap.0, 2, "{events:?}");
    let resynced = events
        .iter()
        .find_map(|e| match e {
            Event::Resynced {
                group_id,
                from_epoch,
                to_epoch,
                ..
            } => Some((group_id.clone(), *from_epoch, *to_epoch)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no resync event: {events:?}"));
    assert_eq!(resynced.0, gid);
    assert_eq!(resynced.1, before);
    assert!(resynced.2 > before + 1, "{resynced:?}");

    // Alice processes bob's rejoin; they agree, and talk again.
    alice.receive(0).await.unwrap();
    assert_converged(&alice, &bob, &gid).await;
    alice.send(&gid, b"after").await.unwrap();
    assert_eq!(message_texts(&bob.receive(0).await.unwrap()), ["after"]);
    bob.send(&gid, b"back").await.unwrap();
    assert_eq!(message_texts(&alice.receive(0).await.unwrap()), ["back"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_members_cannot_process_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let (bob, carol) = (
        open(dir.path(), &url, "bob"),
        open(dir.path(), &url, "carol"),
    );
    bob.register().await.unwrap();
    carol.register().await.unwrap();
    let mut alice = RawMember::new(&url, "alice");
    alice.register(0).await;
    alice.create_group(false).await;
    let gid = alice.gid();
    let kps = vec![alice.claim("bob").await, alice.claim("carol").await];
    let (c, w, gi) = alice.stage_add(kps);
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
    bob.receive(0).await.unwrap();
    carol.receive(0).await.unwrap();

    // A commit whose membership tag was altered after signing: the DS
    // cannot check the tag and accepts it; bob and carol cannot process it.
    let (mut c, w, gi) = alice.stage_update();
    let last = c.len() - 1;
    c[last] ^= 1;
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
    for member in [&bob, &carol] {
        let events = member.receive(0).await.unwrap();
        assert!(
            events.iter().any(|e| matches!(e, Event::Skipped { .. })),
            "{events:?}"
        );
        assert!(
            events.iter().any(|e| matches!(e, Event::Resynced { .. })),
            "{} did not rejoin: {events:?}",
            member.id()
        );
    }
    // Everyone ends in one epoch with one secret, alice included.
    bob.receive(0).await.unwrap();
    alice.sync().await;
    assert_converged(&bob, &carol, &gid).await;
    assert_eq!(bob.epoch(&gid).await.unwrap(), alice.epoch());
    assert_eq!(
        bob.export_secret(&gid, "t", 32).await.unwrap(),
        alice.secret()
    );
    bob.send(&gid, b"healed").await.unwrap();
    assert_eq!(message_texts(&carol.receive(0).await.unwrap()), ["healed"]);
    assert_eq!(alice.sync().await, vec![b"healed".to_vec()]);
}
