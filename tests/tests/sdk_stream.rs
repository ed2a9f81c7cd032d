//! Receiving as a stream (`GET /v1/queue/stream`, `Client::event_stream`)
//! against the real DS: under load, with the DS ending every stream after a
//! second and being SIGKILLed and restarted twice, the receiving client
//! gets every message once, in order; the stream's framing, its limit per
//! client, and its end at shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use mls_ds_client::{Client, ClientConfig, ClientError, Event};
use mls_ds_tests::Server;

const MESSAGES: usize = 300;

fn transient(e: &ClientError) -> bool {
    e.is_network() || e.status().is_some_and(|s| s >= 500)
}

/// Alice's messages: each queued once; after a failure, the outbox is
/// flushed until it is empty (sending again would be a second message).
async fn send_all(alice: Arc<Client>, gid: Vec<u8>) {
    for i in 0..MESSAGES {
        match alice.send(&gid, format!("m{i}").as_bytes()).await {
            Ok(_) => {}
            Err(e) if transient(&e) => loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let flushed = alice.flush_sends().await;
                if flushed.is_ok() && alice.pending_sends().unwrap().is_empty() {
                    break;
                }
            },
            Err(e) => panic!("send {i}: {e}"),
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_once_across_reconnects_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("ds"), &["--stream-max-secs", "1"]);
    let url = server.url();
    let open = |name: &str| {
        Arc::new(Client::open(dir.path().join(name), &url, name, ClientConfig::default()).unwrap())
    };
    let (alice, bob) = (open("alice"), open("bob"));
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();

    let mut events = bob.event_stream();
    let sender = tokio::spawn(send_all(alice.clone(), gid.clone()));
    let mut got: Vec<String> = Vec::new();
    let mut joined = false;
    let mut restarts = 0;
    while got.len() < MESSAGES {
        let next = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} messages", got.len()))
            .expect("the stream goes on");
        let ev = next.unwrap_or_else(|e| panic!("stream error: {e}"));
        match &ev {
            Event::Joined { .. } => joined = true,
            Event::Message { data, .. } => got.push(String::from_utf8(data.clone()).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
        bob.ack_events(ev.seq()).unwrap();
        if got.len() == 100 * (restarts + 1) && restarts < 2 {
            server.kill_and_restart_on_same_port();
            restarts += 1;
        }
    }
    sender.await.unwrap();
    assert!(joined);
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message once, in order");
    assert_eq!(
        bob.export_secret(&gid, "t", 32).await.unwrap(),
        alice.export_secret(&gid, "t", 32).await.unwrap()
    );
    drop(events);
    server.stop_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_limits_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("ds"), &["--max-streams-per-client", "2"]);
    let url = server.url();
    let open = |name: &str| {
        Client::open(dir.path().join(name), &url, name, ClientConfig::default()).unwrap()
    };
    let (alice, bob) = (open("alice"), open("bob"));
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();
    alice.send(&gid, b"streamed").await.unwrap();

    // The raw stream: the Welcome and the message in pages, from `after`.
    let mut first = bob.api().queue_stream(0).await.unwrap();
    let page = first.next_page().await.unwrap().expect("a page");
    assert_eq!(page.entries.len(), 2, "{page:?}");
    let mut from_two = bob.api().queue_stream(1).await.unwrap();
    let page = from_two.next_page().await.unwrap().expect("a page");
    assert_eq!(page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);

    // A third stream of bob's is over his limit; alice's first is not.
    let err = bob.api().queue_stream(0).await.err().expect("refused");
    assert_eq!(err.status(), Some(429), "{err}");
    let mut alices = alice.api().queue_stream(0).await.unwrap();

    // A stream's end frees its place.
    drop(first);
    let mut again = None;
    for _ in 0..50 {
        match bob.api().queue_stream(2).await {
            Ok(s) => {
                again = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut again = again.expect("a place after a stream ended");

    // Shutdown ends the open streams, so the DS stops at once and cleanly.
    assert!(server.stop(), "graceful shutdown exits 0");
    for s in [&mut from_two, &mut again, &mut alices] {
        while let Ok(Some(_)) = s.next_page().await {}
    }
}
