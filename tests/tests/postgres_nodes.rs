//! Several DS processes on one PostgreSQL database (the tests' own server,
//! `tests/src/postgres.rs`): clients spread over the nodes see one DS.
//! Registrations and key packages published on one node are claimed on the
//! other, each ordinary package once however the claims race; commits race
//! across nodes and exactly one per epoch is accepted; a long-poll on one
//! node wakes when the other queues for it; concurrent sends through both
//! nodes leave every queue gap-free with every message once, and sends
//! that arrive together on one node share transactions; one send id sent
//! through both nodes at once is delivered once; a node
//! SIGKILLed under load loses nothing it acknowledged while its clients go
//! on through the other; `mls-ds check` finds the database intact.
//!
//! Without PostgreSQL's server binaries these tests say so and do not run.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use mls_ds_client::AuthMode;
use mls_ds_tests::postgres::{cluster, Cluster};
use mls_ds_tests::raw::{converged, fresh_send_id, raw_request, RawMember};
use mls_ds_tests::Server;

/// The cluster, or `None` after saying why the test does not run.
fn cluster_or_skip(test: &str) -> Option<&'static Cluster> {
    let c = cluster();
    if c.is_none() {
        eprintln!("{test}: NOT RUN: no PostgreSQL server binaries on this machine");
    }
    c
}

/// `n` nodes on one new database, each with its own log directory.
fn nodes(dir: &Path, url: &str, n: usize) -> Vec<Server> {
    (0..n)
        .map(|i| Server::start_on_database(&dir.join(format!("node{i}")), url, &[]))
        .collect()
}

async fn add(adder: &mut RawMember, who: &str) {
    let kp = adder.claim(who).await;
    let (c, w, gi) = adder.stage_add(vec![kp]);
    adder.api.commit(&adder.gid(), c, w, gi).await.unwrap();
    adder.merge();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_on_one_database_are_one_ds() {
    let Some(pg) = cluster_or_skip("nodes_on_one_database_are_one_ds") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = pg.new_database();
    let mut servers = nodes(dir.path(), &url, 2);
    let (a, b) = (servers[0].url(), servers[1].url());

    // Registered and published on one node, claimed through the other.
    let mut alice = RawMember::new(&a, "alice");
    let mut bob = RawMember::new(&b, "bob");
    let mut carol = RawMember::new(&a, "carol");
    alice.register(2).await;
    bob.register(2).await;
    carol.register(2).await;
    alice.create_group(false).await;
    add(&mut alice, "bob").await;
    add(&mut alice, "carol").await;
    bob.sync().await;
    carol.sync().await;
    converged(&[&alice, &bob, &carol]);

    // A session opened on A is valid on B (no second signature): the same
    // token-minting transport, its request sent to B.
    let path = mls_ds_protocol::paths::GROUPS;
    let auth = alice
        .api
        .transport
        .authorization("GET", path, b"", AuthMode::Session)
        .await
        .unwrap()
        .expect("a session token");
    let (status, body) = raw_request(&b, "GET", path, &[("authorization", auth)], Vec::new()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // A long-poll on B wakes when A queues for it.
    let gid = alice.gid();
    let cursor = bob.cursor;
    let poll = {
        let api = bob.api_at(&b);
        tokio::spawn(async move {
            let started = Instant::now();
            let page = api.fetch(cursor, 10, 20_000).await.unwrap();
            (page, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = alice.encrypt(b"across nodes");
    alice.api.send_message(&gid, m).await.unwrap();
    let (page, waited) = poll.await.unwrap();
    assert_eq!(page.entries.len(), 1, "the long-poll on B got A's message");
    assert!(
        waited < Duration::from_secs(10),
        "woken by the notification, not the timeout: {waited:?}"
    );
    assert_eq!(bob.sync().await, vec![b"across nodes".to_vec()]);
    carol.sync().await;

    // Commits race across nodes: exactly one per epoch.
    for round in 0..6 {
        let epoch = alice.epoch();
        let (ca, wa, ga) = alice.stage_update();
        let (cb, wb, gb) = bob.stage_update();
        let (ra, rb) = tokio::join!(
            alice.api.commit(&gid, ca, wa, ga),
            bob.api.commit(&gid, cb, wb, gb)
        );
        match (ra.is_ok(), rb.is_ok()) {
            (true, false) => {
                assert_eq!(rb.unwrap_err().status(), Some(409), "round {round}");
                alice.merge();
                bob.clear();
            }
            (false, true) => {
                assert_eq!(ra.unwrap_err().status(), Some(409), "round {round}");
                bob.merge();
                alice.clear();
            }
            other => panic!("round {round}: exactly one commit accepted, got {other:?}"),
        }
        alice.sync().await;
        bob.sync().await;
        carol.sync().await;
        converged(&[&alice, &bob, &carol]);
        assert_eq!(alice.epoch(), epoch + 1, "round {round}");
    }

    // Key packages claimed once across nodes, however the claims race:
    // 12 claims through both nodes for 8 packages (and no last resort).
    let dave = RawMember::new(&a, "dave");
    dave.register(8).await;
    let claimers: Vec<RawMember> = (0..12)
        .map(|i| {
            let node = if i % 2 == 0 { &a } else { &b };
            RawMember::new(node, &format!("claimer{i}"))
        })
        .collect();
    for c in &claimers {
        c.register(0).await;
    }
    let mut racing = tokio::task::JoinSet::new();
    for c in claimers {
        racing.spawn(async move {
            let dave = mls_ds_protocol::ClientId::new("dave").unwrap();
            c.api.claim_key_package(&dave).await
        });
    }
    let mut handed_out = HashSet::new();
    let mut refused = 0;
    for claim in racing.join_all().await {
        match claim {
            Ok(kp) => assert!(
                handed_out.insert(kp.key_package.as_slice().to_vec()),
                "a key package handed out twice"
            ),
            Err(e) => {
                assert_eq!(e.status(), Some(404), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((handed_out.len(), refused), (8, 4));

    // Sends through both nodes at once: every queue gap-free, every
    // message once.
    let per_sender = 15;
    let sent = {
        let (mut pa, mut pb) = (Vec::new(), Vec::new());
        for i in 0..per_sender {
            pa.push(alice.encrypt(format!("a{i}").as_bytes()));
            pb.push(bob.encrypt(format!("b{i}").as_bytes()));
        }
        let (api_a, api_b) = (&alice.api, &bob.api);
        let gid = &gid;
        tokio::join!(
            async move {
                for m in pa {
                    api_a.send_message(gid, m).await.unwrap();
                }
            },
            async move {
                for m in pb {
                    api_b.send_message(gid, m).await.unwrap();
                }
            }
        );
        per_sender
    };
    let start = carol.cursor;
    let got = carol.sync().await;
    assert_eq!(got.len(), 2 * sent, "carol got every message once");
    assert_eq!(
        carol.cursor,
        start + 2 * sent as u64,
        "carol's queue is gap-free"
    );
    for who in ["a", "b"] {
        let order: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .filter(|m| m.starts_with(who))
            .collect();
        let expected: Vec<String> = (0..sent).map(|i| format!("{who}{i}")).collect();
        assert_eq!(order, expected, "each sender's messages in order");
    }
    assert_eq!(alice.sync().await.len(), sent);
    assert_eq!(bob.sync().await.len(), sent);

    // Sends that arrive together on one node are committed together (one
    // transaction, one WAL flush for several), each still stored once and
    // queued once, gap-free.
    let metrics = servers[0].metrics_url();
    let counter = |page: &str, name: &str| -> u64 {
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    let scrape = || async {
        let (status, page) = raw_request(&metrics, "GET", "/metrics", &[], vec![]).await;
        assert_eq!(status, 200);
        String::from_utf8(page).unwrap()
    };
    let before = scrape().await;
    let burst: Vec<Vec<u8>> = (0..48)
        .map(|i| alice.encrypt(format!("burst{i}").as_bytes()))
        .collect();
    let (api, gid) = (&alice.api, &gid);
    for sent in mls_ds_tests::join_all(burst.iter().map(|m| api.send_message(gid, m.clone()))).await
    {
        sent.unwrap();
    }
    let after = scrape().await;
    let commits = counter(&after, "mls_ds_fsync_batches_total")
        - counter(&before, "mls_ds_fsync_batches_total");
    let writes = counter(&after, "mls_ds_durable_requests_total")
        - counter(&before, "mls_ds_durable_requests_total");
    println!("48 concurrent sends on one node: {writes} writes in {commits} transactions");
    assert!(writes >= 48, "every send is a write: {writes}");
    // The database's latency and the pool are exported.
    for kind in ["transaction", "read"] {
        let name = format!("mls_ds_db_seconds_count{{kind=\"{kind}\"}}");
        assert!(counter(&after, &name) > 0, "{name} counts");
    }
    assert!(counter(&after, "mls_ds_db_pool_max") > 0);
    assert!(
        commits < writes,
        "sends in flight together share transactions: {writes} writes, {commits} commits"
    );
    let page = carol.api.fetch(carol.cursor, 100, 0).await.unwrap();
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (carol.cursor + 1..=carol.cursor + 48).collect();
    assert_eq!(seqs, expected, "carol's queue gap-free, each send once");
    let queued: HashSet<Vec<u8>> = page
        .entries
        .iter()
        .map(|e| e.message.as_slice().to_vec())
        .collect();
    let burst: HashSet<Vec<u8>> = burst.into_iter().collect();
    assert_eq!(queued, burst, "carol's entries are the burst's messages");
    carol.cursor += 48;

    // One send, under one send id, through both nodes at once (twice each):
    // delivered once, and every attempt answered with that delivery.
    let once = alice.encrypt(b"once");
    let id = fresh_send_id();
    let api_b = alice.api_at(&b);
    let attempts = [&alice.api, &api_b, &alice.api, &api_b];
    let answers = mls_ds_tests::join_all(
        attempts
            .iter()
            .map(|api| api.send_message_once(gid, once.clone(), id)),
    )
    .await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "one delivery for every attempt: {answers:?}"
    );
    let page = carol.api.fetch(carol.cursor, 100, 0).await.unwrap();
    assert_eq!(page.entries.len(), 1, "the send queued once");
    assert_eq!(page.entries[0].message.as_slice(), once.as_slice());

    assert!(servers[1].stop(), "graceful shutdown exits 0");
    servers[0].stop_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_under_load_loses_nothing_acknowledged() {
    let Some(pg) = cluster_or_skip("a_node_killed_under_load_loses_nothing_acknowledged") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = pg.new_database();
    let mut servers = nodes(dir.path(), &url, 2);
    let (a, b) = (servers[0].url(), servers[1].url());
    let mut alice = RawMember::new(&a, "k-alice");
    let mut bob = RawMember::new(&b, "k-bob");
    alice.register(1).await;
    bob.register(1).await;
    alice.create_group(false).await;
    add(&mut alice, "k-bob").await;
    bob.sync().await;
    let gid = alice.gid();

    // Alice sends through A, each message under a send id, retrying until
    // one node answers; A is killed half-way and she goes on through B.
    let total = 60u64;
    let mut acknowledged = Vec::new();
    let mut moved = false;
    for i in 0..total {
        if i == total / 2 {
            servers[0].kill();
        }
        let text = format!("k{i}");
        let m = alice.encrypt(text.as_bytes());
        let id = fresh_send_id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match alice.api.send_message_once(&gid, m.clone(), id).await {
                Ok(_) => {
                    acknowledged.push(text);
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "send {i} never answered: {e}");
                    if !moved {
                        alice.move_to(&b);
                        moved = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    assert!(moved, "the kill interrupted the sends");
    let got: Vec<String> = bob
        .sync()
        .await
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m).into_owned())
        .collect();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "no message twice: {got:?}");
    assert_eq!(got, acknowledged, "every acknowledged send, in order");

    // The killed node comes back on the same database.
    servers[0].restart();
    alice.move_to(&servers[0].url());
    let m = alice.encrypt(b"back");
    alice.api.send_message(&gid, m).await.unwrap();
    assert_eq!(bob.sync().await, vec![b"back".to_vec()]);
    assert!(servers[0].stop(), "graceful shutdown exits 0");
    servers[1].stop_and_check();
}
