//! Restart tests: a graceful stop and restart mid-scenario keeps queues,
//! groups, key packages and registrations; after SIGKILL every message that
//! got a 2xx is delivered. The data directory then passes `mls-ds check`.
//! On sled, a start after a graceful stop, and after a crash that follows
//! it, takes the queue index from the checkpoint the stop wrote.

use mls_ds_client::{Client, ClientConfig, Event};
use mls_ds_tests::postgres::{self, TestBackend};
use mls_ds_tests::{message_texts, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_graceful_restart_and_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let open = |name: &str, url: &str| {
        Client::open(dir.path().join(name), url, name, ClientConfig::default()).unwrap()
    };
    let alice = open("alice", &url);
    let bob = open("bob", &url);
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();
    alice.send(&gid, b"before restart").await.unwrap();
    let kps_before = bob.api().key_package_count().await.unwrap();

    // Admin commands while the server runs go through its admin socket; the
    // live backup is consistent and passes `check` later.
    let stats = server.admin(&["stats"]);
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    assert!(String::from_utf8_lossy(&stats.stdout).contains("groups             1"));
    // On PostgreSQL, backups are the database's own (pg_dump, base
    // backups): the command says so.
    let live_backup = dir.path().join("live-backup");
    let out = server.admin(&["backup", "--out", live_backup.to_str().unwrap()]);
    if postgres::backend() == TestBackend::Postgres {
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("pg_dump"));
    } else {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let check = std::process::Command::new(mls_ds_tests::server_binary())
            .args(["--data-dir", live_backup.to_str().unwrap(), "check"])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "live backup passes check: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }

    // Graceful stop: exit status 0; everything is still there afterwards.
    server.stop_and_check();
    server.restart();
    if postgres::backend() == TestBackend::Sled {
        // A graceful stop left the queue index's checkpoint, and the start
        // read it instead of every stored message; after a crash right
        // after that start, so does the next one (the queues it finds are
        // checked below).
        assert_eq!(index_source(&server).as_deref(), Some("Checkpoint"));
        server.kill();
        server.restart();
        assert_eq!(index_source(&server).as_deref(), Some("Checkpoint"));
    }
    let url = server.url();
    drop((alice, bob));
    let (alice, bob) = (open("alice", &url), open("bob", &url));
    assert_eq!(
        bob.api().key_package_count().await.unwrap(),
        kps_before,
        "key packages survive"
    );
    let events = bob.receive(0).await.unwrap();
    assert!(matches!(events[0], Event::Joined { .. }));
    assert_eq!(message_texts(&events), vec!["before restart".to_string()]);
    bob.send(&gid, b"after restart").await.unwrap();
    assert_eq!(
        message_texts(&alice.receive(0).await.unwrap()),
        vec!["after restart".to_string()]
    );
    // Registration survived (sessions did not: the SDK re-authenticated).
    assert!(alice.api().key_package_count().await.is_ok());

    // SIGKILL right after a burst of acknowledged sends: all of them arrive.
    let mut sent = Vec::new();
    for i in 0..40 {
        let text = format!("burst {i}");
        alice.send(&gid, text.as_bytes()).await.unwrap();
        sent.push(text);
    }
    server.kill();
    server.restart();
    let url = server.url();
    drop((alice, bob));
    let (alice, bob) = (open("alice", &url), open("bob", &url));
    assert_eq!(message_texts(&bob.receive(0).await.unwrap()), sent);
    assert_eq!(
        alice.epoch(&gid).await.unwrap(),
        bob.epoch(&gid).await.unwrap()
    );
    assert_eq!(
        alice.export_secret(&gid, "x", 32).await.unwrap(),
        bob.export_secret(&gid, "x", 32).await.unwrap()
    );
    server.stop_and_check();
    let stats = server.admin(&["stats"]);
    assert!(String::from_utf8_lossy(&stats.stdout).contains("groups             1"));
    // An offline backup (on PostgreSQL: the database's own tools).
    if postgres::backend() == TestBackend::Sled {
        let backup = dir.path().join("backup");
        let out = server.admin(&["backup", "--out", backup.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let check = std::process::Command::new(mls_ds_tests::server_binary())
            .args(["--data-dir", backup.to_str().unwrap(), "check"])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "backup passes check: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}

/// Where the server's last start took its queue index from, as it logged.
fn index_source(server: &Server) -> Option<String> {
    let log = std::fs::read_to_string(server.log_path()).ok()?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("queue index ready"))?;
    let from = line.split("from=").nth(1)?;
    Some(from.split_whitespace().next()?.to_owned())
}
