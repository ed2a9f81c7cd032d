//! The database restarted under load: two DS nodes on the tests' own
//! PostgreSQL server (its own process, so that the restart disturbs no
//! other test), members sending through both under send ids and retrying
//! what failed, the server stopped (`pg_ctl restart -m fast`: sessions
//! ended, in-flight transactions rolled back) mid-way. Every send that got
//! a 2xx arrives once, in order; the nodes serve again without a restart
//! of their own; `mls-ds check` finds the database intact.
//!
//! Without PostgreSQL's server binaries this test says so and does not run.

use std::time::{Duration, Instant};

use mls_ds_tests::postgres::cluster;
use mls_ds_tests::raw::{fresh_send_id, try_raw_request, RawMember};
use mls_ds_tests::Server;

/// Send `texts` under send ids, retrying each until it is answered;
/// returns how many attempts failed.
async fn send_all(member: &mut RawMember, gid: &[u8], texts: &[String]) -> usize {
    let mut failures = 0;
    for text in texts {
        let m = member.encrypt(text.as_bytes());
        let id = fresh_send_id();
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = member.api.send_message_once(gid, m.clone(), id).await {
            assert!(Instant::now() < deadline, "{text} never answered: {e}");
            failures += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_restarted_under_load_loses_nothing_acknowledged() {
    let Some(pg) = cluster() else {
        eprintln!("the_database_restarted_under_load: NOT RUN: no PostgreSQL server binaries");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = pg.new_database();
    let mut a = Server::start_on_database(&dir.path().join("a"), &url, &[]);
    let b = Server::start_on_database(&dir.path().join("b"), &url, &[]);
    let mut alice = RawMember::new(&a.url(), "r-alice");
    let mut bob = RawMember::new(&b.url(), "r-bob");
    let mut carol = RawMember::new(&a.url(), "r-carol");
    alice.register(1).await;
    bob.register(1).await;
    carol.register(1).await;
    alice.create_group(false).await;
    for who in ["r-bob", "r-carol"] {
        let kp = alice.claim(who).await;
        let (c, w, gi) = alice.stage_add(vec![kp]);
        alice.api.commit(&alice.gid(), c, w, gi).await.unwrap();
        alice.merge();
    }
    bob.sync().await;
    carol.sync().await;
    let gid = alice.gid();

    let texts_a: Vec<String> = (0..80).map(|i| format!("a{i}")).collect();
    let texts_b: Vec<String> = (0..80).map(|i| format!("b{i}")).collect();
    let restart = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::spawn_blocking(|| pg.restart()).await.unwrap();
    };
    let ((failed_a, failed_b), ()) = tokio::join!(
        async {
            tokio::join!(
                send_all(&mut alice, &gid, &texts_a),
                send_all(&mut bob, &gid, &texts_b)
            )
        },
        restart
    );
    eprintln!("attempts refused while the database restarted: {failed_a} + {failed_b}");
    // Both nodes report themselves healthy again on their own.
    for node in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while try_raw_request(&node.url(), "GET", "/healthz").await != Ok(200) {
            assert!(Instant::now() < deadline, "a node stayed unhealthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let got: Vec<String> = carol
        .sync()
        .await
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m).into_owned())
        .collect();
    for (who, texts) in [("a", &texts_a), ("b", &texts_b)] {
        let mine: Vec<&String> = got.iter().filter(|t| t.starts_with(who)).collect();
        assert_eq!(
            mine,
            texts.iter().collect::<Vec<_>>(),
            "every acknowledged send of {who} once, in order"
        );
    }
    assert_eq!(got.len(), texts_a.len() + texts_b.len());
    assert_eq!(alice.sync().await.len(), texts_b.len());
    assert_eq!(bob.sync().await.len(), texts_a.len());
    drop(b);
    a.stop_and_check();
}
