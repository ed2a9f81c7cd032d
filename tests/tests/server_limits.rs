//! The controls of a DS on a public address, against the real binary:
//! registration policies and invitation codes, limits per source address,
//! per client and per claim, quotas, the full-queue rule with the member
//! recovering, operator deletion of clients and groups, group deletion by
//! its last member, commit pruning, and restoring a backup. Every refusal
//! has its documented status and changes nothing. A full session table
//! gives up its oldest session instead of refusing new ones.

use mls_ds_client::{Client, ClientConfig, ClientError, DsApi, Event, Transport};
use mls_ds_protocol::ClientId;
use mls_ds_tests::postgres::{self, TestBackend};
use mls_ds_tests::raw::RawMember;
use mls_ds_tests::Server;

fn status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    match r {
        Err(e) => e.status().unwrap_or_else(|| panic!("no status: {e}")),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

/// The status line and headers of an empty POST, over a plain socket.
fn raw_post_head(url: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    answer
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn open(dir: &std::path::Path, url: &str, name: &str) -> Client {
    Client::open(dir.join(name), url, name, ClientConfig::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_policies_and_invitation_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &["--registration", "invite"]);
    let url = server.url();

    // No code, or a code nobody created: refused, nothing registered.
    let alice = RawMember::new(&url, "inv-alice");
    assert_eq!(status(alice.api.register().await), 403);
    assert_eq!(
        status(alice.api.register_with_invite(Some("00ff")).await),
        403
    );
    assert_eq!(
        status(alice.api.key_package_count().await),
        401,
        "not registered"
    );

    // A single-use code registers one client, then no other.
    let created = server.admin_ok(&["invite", "create", "--uses", "1"]);
    let code = created.lines().next().unwrap().trim().to_owned();
    assert_eq!(code.len(), 32, "{created}");
    alice.api.register_with_invite(Some(&code)).await.unwrap();
    alice.api.key_package_count().await.unwrap();
    // Registering again with the same key is the same answer, without a code.
    alice.api.register().await.unwrap();
    let bob = RawMember::new(&url, "inv-bob");
    assert_eq!(status(bob.api.register_with_invite(Some(&code)).await), 403);
    assert!(
        !server.admin_ok(&["invite", "list"]).contains(&code),
        "used up"
    );

    // Two uses; an expired code; a revoked one.
    let two = server.admin_ok(&["invite", "create", "--uses", "2"]);
    let two = two.lines().next().unwrap().trim().to_owned();
    bob.api.register_with_invite(Some(&two)).await.unwrap();
    assert!(server
        .admin_ok(&["invite", "list"])
        .contains(&format!("{two} uses_left=1")));
    let expired = server.admin_ok(&["invite", "create", "--valid-for-hours", "0"]);
    let expired = expired.lines().next().unwrap().trim().to_owned();
    let carol = RawMember::new(&url, "inv-carol");
    assert_eq!(
        status(carol.api.register_with_invite(Some(&expired)).await),
        403
    );
    server.admin_ok(&["invite", "revoke", &two]);
    assert_eq!(
        status(carol.api.register_with_invite(Some(&two)).await),
        403
    );
    drop(server);

    // Closed: only clients the operator added, with the key they gave.
    let closed = Server::start(&dir.path().join("closed"), &["--registration", "closed"]);
    let url = closed.url();
    let dave = RawMember::new(&url, "closed-dave");
    assert_eq!(status(dave.api.register().await), 403);
    let key = hex::encode(dave.signer.public());
    let added = closed.admin_ok(&["client", "add", "closed-dave", "--key", &key]);
    assert!(added.contains("added client closed-dave"), "{added}");
    dave.register(1).await;
    assert_eq!(dave.api.key_package_count().await.unwrap().remaining, 1);

    // Open (the default on a loopback address): anyone.
    let open_ds = Server::start(&dir.path().join("open"), &[]);
    RawMember::new(&open_ds.url(), "open-erin")
        .register(0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_limited_per_source_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--ip-rate-limit-per-min", "1", "--ip-rate-limit-burst", "4"],
    );
    let url = server.url();
    // Registrations from one address: the burst, then 429 (nothing stored).
    let members: Vec<RawMember> = (0..5)
        .map(|i| RawMember::new(&url, &format!("ip-{i}")))
        .collect();
    for m in &members[..4] {
        m.api.register().await.unwrap();
    }
    assert_eq!(status(members[4].api.register().await), 429);
    // Opening a session verifies a signature too: limited the same way.
    assert_eq!(status(members[0].api.open_session().await), 429);
    // So does any request authenticated by a signature instead of a session.
    let mut signing = Transport::new(
        &url,
        ClientId::new("ip-1").unwrap(),
        members[1].signer.clone(),
    )
    .unwrap();
    signing.always_sign = true;
    assert_eq!(status(DsApi::new(signing).key_package_count().await), 429);
    // The refusal says when to come back: one token a minute.
    let head = raw_post_head(&url, "/v1/clients");
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let wait: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .unwrap_or_else(|| panic!("no retry-after: {head}"))
        .trim()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "retry-after {wait}");
    let listed = server.admin_ok(&["client", "list"]);
    assert!(
        listed.contains("ip-3 ") && !listed.contains("ip-4 "),
        "the refused registration stored nothing: {listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_requests_are_limited_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--rate-limit-per-sec",
            "1",
            "--rate-limit-burst",
            "30",
            "--claim-rate-per-min",
            "1",
            "--claim-burst",
            "3",
            "--target-claim-rate-per-min",
            "1",
            "--target-claim-burst",
            "4",
        ],
    );
    let url = server.url();
    let members: Vec<RawMember> = (0..4)
        .map(|i| RawMember::new(&url, &format!("lim-{i}")))
        .collect();
    for m in &members {
        m.api.register().await.unwrap();
    }

    // Key packages: the target publishes four ordinary ones and a last
    // resort. Claims by one claimer: its burst of three, then 429.
    let target = &members[0];
    let kps = (0..4).map(|_| target.key_package()).collect();
    target
        .api
        .publish_key_packages(kps, Some(target.key_package()))
        .await
        .unwrap();
    let who = ClientId::new("lim-0").unwrap();
    for _ in 0..3 {
        members[1].api.claim_key_package(&who).await.unwrap();
    }
    assert_eq!(status(members[1].api.claim_key_package(&who).await), 429);
    assert_eq!(
        target.api.key_package_count().await.unwrap().remaining,
        1,
        "the refused claim took nothing"
    );
    // Another claimer takes the last ordinary one; then the target's own
    // burst of four claims is spent: 429 for anyone.
    let last = members[2].api.claim_key_package(&who).await.unwrap();
    assert!(!last.last_resort.0);
    assert_eq!(status(members[3].api.claim_key_package(&who).await), 429);
    assert_eq!(target.api.key_package_count().await.unwrap().remaining, 0);

    // Per-client request rate: a burst of 30, then 429.
    let hammer = &members[3];
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(match hammer.api.key_package_count().await {
            Ok(_) => 200,
            Err(e) => e.status().unwrap_or(0),
        });
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_resort_is_handed_out_and_its_owner_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let url = server.url();
    let owner = RawMember::new(&url, "lr-owner");
    let claimer = RawMember::new(&url, "lr-claimer");
    owner.api.register().await.unwrap();
    claimer.register(0).await;
    owner
        .api
        .publish_key_packages(vec![owner.key_package()], Some(owner.key_package()))
        .await
        .unwrap();
    let who = ClientId::new("lr-owner").unwrap();
    assert!(
        !claimer
            .api
            .claim_key_package(&who)
            .await
            .unwrap()
            .last_resort
            .0
    );
    for _ in 0..2 {
        assert!(
            claimer
                .api
                .claim_key_package(&who)
                .await
                .unwrap()
                .last_resort
                .0
        );
    }
    let count = owner.api.key_package_count().await.unwrap();
    assert_eq!(
        (
            count.remaining,
            count.has_last_resort.0,
            count.last_resort_claims
        ),
        (0, true, 2)
    );
    // A new last resort starts counting afresh.
    owner
        .api
        .publish_key_packages(vec![], Some(owner.key_package()))
        .await
        .unwrap();
    assert_eq!(
        owner
            .api
            .key_package_count()
            .await
            .unwrap()
            .last_resort_claims,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_with_507_or_413_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--max-key-packages",
            "3",
            "--max-groups-per-client",
            "1",
            "--max-group-members",
            "2",
            "--max-message-bytes",
            "300",
        ],
    );
    let url = server.url();
    let mut alice = RawMember::new(&url, "q-alice");
    let bob = RawMember::new(&url, "q-bob");
    let carol = RawMember::new(&url, "q-carol");
    alice.register(2).await;
    bob.register(1).await;
    carol.register(1).await;

    // Key packages: two stored, two more would be four.
    let kps = vec![alice.key_package(), alice.key_package()];
    assert_eq!(status(alice.api.publish_key_packages(kps, None).await), 507);
    assert_eq!(alice.api.key_package_count().await.unwrap().remaining, 2);

    // Groups per client: one.
    alice.create_group(false).await;
    let gid = alice.gid();
    let second = {
        let g = openmls::prelude::MlsGroup::new(
            &alice.provider,
            &alice.signer,
            &mls_ds_client::client::create_config(),
            alice.credential.clone(),
        )
        .unwrap();
        let gi = mls_ds_tests::raw::wire(
            &g.export_group_info(
                openmls_traits::OpenMlsProvider::crypto(&alice.provider),
                &alice.signer,
                false,
            )
            .unwrap(),
        );
        let tree = mls_ds_tests::raw::wire(&g.export_ratchet_tree());
        alice.api.create_group(gi, tree, false).await
    };
    assert_eq!(status(second), 507);

    // Members per group: two; adding a third is refused and nothing merges.
    let kp = alice.claim("q-bob").await;
    let (c, w, gi) = alice.stage_add(vec![kp]);
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
    let epoch = alice.epoch();
    let kp = alice.claim("q-carol").await;
    let (c, w, gi) = alice.stage_add(vec![kp]);
    assert_eq!(status(alice.api.commit(&gid, c, w, gi).await), 507);
    alice.clear();
    assert_eq!(alice.api.group_info(&gid).await.unwrap().epoch, epoch);

    // Message size.
    let big = alice.encrypt(&[7u8; 600]);
    assert_eq!(status(alice.api.send_message(&gid, big).await), 413);
    let small = alice.encrypt(b"fits");
    alice.api.send_message(&gid, small).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_the_oldest_and_the_member_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &["--max-queue-depth", "3"]);
    let url = server.url();
    let alice = open(dir.path(), &url, "fq-alice");
    let bob = open(dir.path(), &url, "fq-bob");
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["fq-bob"]).await.unwrap();
    bob.receive(0).await.unwrap();

    // While bob is away alice commits and sends five messages: his queue
    // holds three, so the commit and the first messages are dropped.
    alice.self_update(&gid).await.unwrap();
    for i in 0..5 {
        alice.send(&gid, format!("m{i}").as_bytes()).await.unwrap();
    }
    // Bob had acknowledged his Welcome (1); of the six entries 2..=7 his
    // queue kept the newest three, and its mark moved past the others.
    let page = bob.api().fetch(0, 100, 0).await.unwrap();
    assert_eq!(page.acked, 4, "three entries dropped: the mark jumped");
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![5, 6, 7]);

    // Bob cannot read them (the commit is gone), and recovers as
    // documented: he resyncs by external commit, as a current member.
    bob.receive(0).await.unwrap();
    bob.join_external(&gid).await.unwrap();
    alice.receive(0).await.unwrap();
    assert_eq!(
        alice.epoch(&gid).await.unwrap(),
        bob.epoch(&gid).await.unwrap()
    );
    alice.send(&gid, b"after").await.unwrap();
    let got: Vec<Vec<u8>> = bob
        .receive(0)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Event::Message { data, .. } => Some(data),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![b"after".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_delete_clients_and_groups_and_the_last_member_deletes_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let alice = open(dir.path(), &url, "op-alice");
    let bob = open(dir.path(), &url, "op-bob");
    let carol = open(dir.path(), &url, "op-carol");
    for c in [&alice, &bob, &carol] {
        c.register().await.unwrap();
    }
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["op-bob", "op-carol"]).await.unwrap();
    alice.send(&gid, b"queued for carol").await.unwrap();
    bob.receive(0).await.unwrap();

    // The operator deletes carol: her key packages and queue go, she can no
    // longer authenticate, and her id stays reserved.
    let listed = server.admin_ok(&["client", "list"]);
    assert!(listed.contains("op-carol registered_ms="), "{listed}");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("op-carol") && l.ends_with("queue=2")),
        "{listed}"
    );
    server.admin_ok(&["client", "delete", "op-carol"]);
    let listed = server.admin_ok(&["client", "list"]);
    assert!(
        listed.lines().any(|l| l.starts_with("op-carol")
            && l.contains("deleted=true")
            && l.ends_with("queue=0")),
        "{listed}"
    );
    assert_eq!(status(carol.api().key_package_count().await), 401);

    // A member may not delete a group others are still in.
    assert_eq!(status(bob.api().delete_group(&gid).await), 403);

    // The operator deletes the group: bob and alice are told.
    let groups = server.admin_ok(&["group", "list"]);
    assert!(groups.contains(&hex::encode(&gid)), "{groups}");
    server.admin_ok(&["group", "delete", &hex::encode(&gid)]);
    for c in [&alice, &bob] {
        let events = c.receive(0).await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::GroupDeleted { group_id, .. } if *group_id == gid)),
            "{events:?}"
        );
        assert!(c.groups().await.is_empty());
    }
    assert_eq!(status(alice.api().group_info(&gid).await), 404);
    assert!(!server
        .admin_ok(&["group", "list"])
        .contains(&hex::encode(&gid)));

    // The last member of a group deletes it, on the DS and in its store.
    let solo = alice.create_group(false).await.unwrap();
    alice.delete_group(&solo).await.unwrap();
    assert_eq!(status(alice.api().group_info(&solo).await), 404);
    assert!(!alice.groups().await.contains(&solo));
    assert!(alice.delete_group(&solo).await.is_err(), "unknown here now");
    // Deleted on the DS, still here (a crash in between): finished here.
    let half = alice.create_group(false).await.unwrap();
    alice.api().delete_group(&half).await.unwrap();
    alice.delete_group(&half).await.unwrap();
    assert!(!alice.groups().await.contains(&half));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_pruned_and_a_backup_restores() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let alice = open(dir.path(), &url, "bk-alice");
    let bob = open(dir.path(), &url, "bk-bob");
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bk-bob"]).await.unwrap();
    for _ in 0..3 {
        alice.self_update(&gid).await.unwrap();
    }
    alice.send(&gid, b"kept").await.unwrap();
    let commits = |s: &Server| -> String {
        s.admin_ok(&["stats"])
            .lines()
            .find(|l| l.starts_with("accepted commits"))
            .unwrap()
            .to_owned()
    };
    assert!(commits(&server).ends_with(" 4"), "{}", commits(&server));
    server.admin_ok(&["prune-commits", "--older-than-days", "0"]);
    assert!(
        commits(&server).ends_with(" 1"),
        "the newest stays: {}",
        commits(&server)
    );

    // Backup of the running server, restored into a new directory: it
    // passes check and serves the same state. On PostgreSQL, backups are
    // the database's own (pg_dump, base backups): the command says so.
    let backup = dir.path().join("backup");
    if postgres::backend() == TestBackend::Postgres {
        let out = server.admin(&["backup", "--out", backup.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("pg_dump"));
        return;
    }
    server.admin_ok(&["backup", "--out", backup.to_str().unwrap()]);
    assert!(server.stop(), "graceful stop");
    let restored = dir.path().join("restored");
    let out = std::process::Command::new(mls_ds_tests::server_binary())
        .args([
            "--data-dir",
            restored.to_str().unwrap(),
            "restore",
            "--from",
        ])
        .arg(&backup)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("OK"), "{text}");
    // Restoring over a directory that holds data is refused.
    let again = std::process::Command::new(mls_ds_tests::server_binary())
        .args([
            "--data-dir",
            restored.to_str().unwrap(),
            "restore",
            "--from",
        ])
        .arg(&backup)
        .output()
        .unwrap();
    assert!(!again.status.success());
    drop((alice, bob));
    let server = Server::start(&restored, &[]);
    let bob = open(dir.path(), &server.url(), "bk-bob");
    let got: Vec<Vec<u8>> = bob
        .receive(0)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Event::Message { data, .. } => Some(data),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![b"kept".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_session_table_makes_room_and_locks_nobody_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-sessions", "2"]);
    let mut apis = Vec::new();
    for name in ["first", "second", "third"] {
        let signer = openmls_basic_credential::SignatureKeyPair::new(
            openmls_traits::types::SignatureScheme::ED25519,
        )
        .unwrap();
        let api = DsApi::new(
            Transport::new(&server.url(), ClientId::new(name).unwrap(), signer).unwrap(),
        );
        api.register().await.unwrap();
        // Opens this client's session (the third's gives the first's up).
        api.key_package_count().await.unwrap();
        apis.push(api);
    }
    // The first client's session is gone: its request gets 401, and the
    // SDK opens a new session (giving up the second's) and retries. On
    // PostgreSQL the server's table only holds sessions kept in the
    // database, where the first's still is: it is taken back, no 401.
    apis[0].key_package_count().await.unwrap();
    let shared = postgres::backend() == TestBackend::Postgres;
    let (status, page) =
        mls_ds_tests::raw::raw_request(&server.metrics_url(), "GET", "/metrics", &[], vec![]).await;
    assert_eq!(status, 200);
    let page = String::from_utf8(page).unwrap();
    let count = |series: &str| {
        page.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<u64>()
                .ok()
        })
    };
    assert_eq!(
        count(r#"mls_ds_requests_total{route="session",status="200"}"#),
        Some(if shared { 3 } else { 4 })
    );
    assert_eq!(
        count(r#"mls_ds_requests_total{route="session",status="503"}"#),
        None
    );
    assert_eq!(
        count(r#"mls_ds_requests_total{route="count",status="401"}"#),
        (!shared).then_some(1)
    );
    assert_eq!(
        count(r#"mls_ds_requests_total{route="count",status="200"}"#),
        Some(4)
    );
}
