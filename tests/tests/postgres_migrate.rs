//! `mls-ds migrate --from DIR --to postgres://...`: a DS with a group,
//! queued messages and a Welcome nobody fetched yet, unclaimed and claimed
//! key packages, an invitation code and remembered sends, moved from its
//! data directory to PostgreSQL. On the database the members catch up with
//! exactly what was queued, a retried send gets its first answer, key
//! packages are claimed from where they were, the group goes on, and
//! `check` is clean; a second migration into the same database is refused,
//! and so is one from a directory a server holds.
//!
//! Without PostgreSQL's server binaries this test says so and does not run.

use mls_ds_tests::postgres::cluster;
use mls_ds_tests::raw::{converged, fresh_send_id, RawMember};
use mls_ds_tests::{server_binary, Server};

fn migrate(from: &std::path::Path, to: &str) -> std::process::Output {
    std::process::Command::new(server_binary())
        .args(["migrate", "--from"])
        .arg(from)
        .args(["--to", to])
        .output()
        .expect("run mls-ds migrate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_moves_to_postgres() {
    let Some(pg) = cluster() else {
        eprintln!("a_data_directory_moves_to_postgres: NOT RUN: no PostgreSQL server binaries");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    // The sled server, whatever MLS_DS_TEST_BACKEND says.
    let mut sled = Server::start(&data, &[]);
    let url = sled.url();
    let mut alice = RawMember::new(&url, "m-alice");
    let mut bob = RawMember::new(&url, "m-bob");
    let mut carol = RawMember::new(&url, "m-carol");
    alice.register(1).await;
    bob.register(1).await;
    carol.register(3).await;
    alice.create_group(false).await;
    let kp = alice.claim("m-bob").await;
    let (c, w, gi) = alice.stage_add(vec![kp]);
    alice.api.commit(&alice.gid(), c, w, gi).await.unwrap();
    alice.merge();
    let gid = alice.gid();
    // Bob has not fetched his Welcome; three messages wait behind it.
    let mut sent = Vec::new();
    for i in 0..3 {
        let m = alice.encrypt(format!("before {i}").as_bytes());
        let id = fresh_send_id();
        let answer = alice
            .api
            .send_message_once(&gid, m.clone(), id)
            .await
            .unwrap();
        sent.push((m, id, answer));
    }
    let invites = sled.admin_ok(&["invite", "create", "--uses", "2"]);
    let code = invites.split_whitespace().next().unwrap().to_owned();

    // A server holds the directory: refused.
    let database = pg.new_database();
    let held = migrate(&data, &database);
    assert!(!held.status.success());
    assert!(
        String::from_utf8_lossy(&held.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    assert!(sled.stop(), "graceful stop");

    let out = migrate(&data, &database);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("migrated") && text.contains("OK"), "{text}");
    let again = migrate(&data, &database);
    assert!(!again.status.success(), "a second migration is refused");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("empty one"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let mut node = Server::start_on_database(&dir.path().join("node"), &database, &[]);
    let url = node.url();
    for m in [&mut alice, &mut bob, &mut carol] {
        m.move_to(&url);
    }
    // Bob joins from the Welcome queued on sled and reads what waited.
    let got = bob.sync().await;
    let expected: Vec<Vec<u8>> = (0..3).map(|i| format!("before {i}").into_bytes()).collect();
    assert_eq!(got, expected);
    converged(&[&alice, &bob]);
    // A retry of a send made on sled gets the answer it got there.
    let (m, id, answer) = &sent[2];
    let retried = alice
        .api
        .send_message_once(&gid, m.clone(), *id)
        .await
        .unwrap();
    assert_eq!(&retried, answer);
    assert!(bob.sync().await.is_empty(), "the retry delivered nothing");
    // Carol's packages, the invitation, and the group going on.
    let kp = alice.claim("m-carol").await;
    let (c, w, gi) = alice.stage_add(vec![kp]);
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
    bob.sync().await;
    carol.sync().await;
    converged(&[&alice, &bob, &carol]);
    assert_eq!(
        carol.api.key_package_count().await.unwrap().remaining,
        2,
        "three published on sled, one claimed after"
    );
    let m = bob.encrypt(b"after");
    bob.api.send_message(&gid, m).await.unwrap();
    assert_eq!(alice.sync().await, vec![b"after".to_vec()]);
    assert_eq!(carol.sync().await, vec![b"after".to_vec()]);
    assert!(node.admin_ok(&["invite", "list"]).contains(&code));
    node.stop_and_check();
}
