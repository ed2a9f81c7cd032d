//! Compaction: the space of a drained backlog is given back, by the running
//! server (`mls-ds compact` through its admin socket, then storage reopens on
//! the copy) and offline, and nothing queued, no group state and no
//! acknowledgement is lost, including when the server is killed right
//! after a compaction was staged.

use std::time::{Duration, Instant};

use mls_ds_tests::raw::{group_of_two, try_raw_request, RawMember};
use mls_ds_tests::{disk_bytes, Server};

/// Send `n` application messages of about 4 KiB, one after the other (the
/// receiver's ratchet accepts only a few out of order).
async fn send_many(sender: &mut RawMember, tag: &str, n: usize) -> Vec<Vec<u8>> {
    let gid = sender.gid();
    let texts: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("{tag} {i} {}", "x".repeat(4000)).into_bytes())
        .collect();
    for text in &texts {
        let body = sender.encrypt(text);
        sender
            .api
            .send_message(&gid, body)
            .await
            .expect("send accepted");
    }
    texts
}

async fn wait_until_serving(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while try_raw_request(url, "GET", "/healthz").await != Ok(200) {
        assert!(
            Instant::now() < deadline,
            "the server serves again after compaction"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_back_the_space_of_a_drained_backlog_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    let mut server = Server::start_logging_to(&data, &dir.path().join("log"), &[]);
    let url = server.url();
    let (mut alice, mut bob) = group_of_two(&url, "alice", "bob").await;

    // A backlog of about 12 MiB, delivered and acknowledged.
    let sent = send_many(&mut alice, "old", 3000).await;
    assert_eq!(bob.sync().await, sent);
    // Still queued when the database is compacted: it must survive.
    let pending = send_many(&mut alice, "pending", 3).await;
    let before = disk_bytes(&data);
    let stats = server.admin_ok(&["stats"]);
    assert!(stats.contains("live records"), "{stats}");

    let report = server.admin_ok(&["compact"]);
    assert!(report.contains("compacted"), "{report}");
    wait_until_serving(&url).await;
    let after = disk_bytes(&data);
    assert!(
        after * 3 < before,
        "compaction gave the space back: {before} bytes before, {after} after"
    );
    assert_eq!(bob.sync().await, pending);
    // The group goes on: a commit and a message after it.
    let (c, w, gi) = alice.stage_update();
    alice.api.commit(&alice.gid(), c, w, gi).await.unwrap();
    alice.merge();
    let later = send_many(&mut alice, "later", 2).await;
    assert_eq!(bob.sync().await, later);
    assert_eq!(alice.secret(), bob.secret());

    // Killed right after a compaction is staged (before, during or after
    // the reopen that swaps the copy in): the next start completes it.
    let queued = send_many(&mut alice, "queued", 3).await;
    server.admin_ok(&["compact"]);
    server.kill_and_restart_on_same_port();
    assert_eq!(bob.sync().await, queued);

    // Offline, on the stopped server's directory.
    let last = send_many(&mut alice, "last", 2).await;
    server.stop_and_check();
    let report = server.admin_ok(&["compact"]);
    assert!(report.contains("compacted"), "{report}");
    for leftover in ["compact.tmp", "compact.ready", "compact.move"] {
        assert!(!data.join(leftover).exists(), "{leftover} is gone");
    }
    server.restart_on_same_port();
    assert_eq!(bob.sync().await, last);
    server.stop_and_check();
}
