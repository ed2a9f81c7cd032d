//! The SDK's errors as an application meets them, each a variant it can
//! match on: a group this client is not in, a member that is not there, the
//! DS's refusal with its code, an unreachable DS.

use mls_ds_client::{Client, ClientConfig, ClientError};
use mls_ds_protocol::ErrorCode;
use mls_ds_tests::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let alice = Client::open(
        dir.path().join("alice"),
        &url,
        "alice",
        ClientConfig::default(),
    )
    .unwrap();
    alice.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();

    let unknown = vec![7u8; 16];
    match alice.send(&unknown, b"x").await {
        Err(ClientError::NotInGroup { group_id }) => assert_eq!(group_id, unknown),
        other => panic!("send to a group alice is not in: {other:?}"),
    }
    match alice.remove(&gid, "bob").await {
        Err(ClientError::NoSuchMember { group_id, client }) => {
            assert_eq!((group_id, client.as_str()), (gid.clone(), "bob"));
        }
        other => panic!("removing a non-member: {other:?}"),
    }
    // Inviting a client the DS does not know: the DS's 404, with its code.
    let err = alice.invite(&gid, &["nobody"]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert_eq!(err.status(), Some(404));
    assert!(!err.is_network() && err.mls_kind().is_none());

    // The DS gone: a network error naming the DS.
    let mut server = server;
    server.stop();
    let err = alice.sync().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Unreachable { url: u, .. } if *u == url),
        "{err:?}"
    );
    assert!(err.is_network());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_requests_wait_for_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("ds"),
        &["--rate-limit-per-sec", "1", "--rate-limit-burst", "2"],
    );
    let url = server.url();
    let alice = Client::open(
        dir.path().join("alice"),
        &url,
        "alice",
        ClientConfig::default(),
    )
    .unwrap();
    alice.register().await.unwrap();
    // Well over the burst: each 429 is waited out (Retry-After), none
    // reaches the application.
    for _ in 0..4 {
        alice.api().key_package_count().await.unwrap();
    }
    // Without waiting, the 429 comes back with how long to wait.
    let impatient = Client::open(
        dir.path().join("alice2"),
        &url,
        "alice2",
        ClientConfig {
            rate_limit_wait: std::time::Duration::ZERO,
            ..ClientConfig::default()
        },
    )
    .unwrap();
    let mut refused = None;
    for _ in 0..10 {
        match impatient.register().await {
            Err(e) if e.status() == Some(429) => {
                refused = Some(e);
                break;
            }
            _ => {}
        }
    }
    let e = refused.expect("a 429 once the burst is spent");
    assert!(e.retry_after().is_some_and(|s| s >= 1), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ds_that_stops_answering_times_out_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let timeout = std::time::Duration::from_millis(700);
    let open = |name: &str| {
        Client::open(
            dir.path().join(name),
            &url,
            name,
            ClientConfig {
                request_timeout: timeout,
                ..ClientConfig::default()
            },
        )
        .unwrap()
    };
    let (alice, bob) = (open("alice"), open("bob"));
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();
    bob.receive(0).await.unwrap();
    // A long poll longer than the timeout is not cut short by it.
    let started = std::time::Instant::now();
    let polled = bob.receive(1_500).await.unwrap();
    assert!(mls_ds_tests::message_texts(&polled).is_empty());
    assert!(started.elapsed() >= std::time::Duration::from_millis(1_400));

    // The process stops: its sockets still accept, nothing answers.
    server.pause();
    let started = std::time::Instant::now();
    let err = alice.send(&gid, b"while stopped").await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(&err, ClientError::ConnectionLost { url: u, detail } if *u == url && detail.contains("no answer within")),
        "{err:?}"
    );
    assert!(err.is_network());
    assert!(waited < 10 * timeout, "gave up after {waited:?}");

    // It goes on: the message left in the outbox goes out under its send
    // id, and arrives once even if the stopped DS had taken it.
    server.resume();
    alice.flush_sends().await.unwrap();
    let texts = mls_ds_tests::message_texts(&bob.receive(0).await.unwrap());
    assert_eq!(texts, vec!["while stopped".to_string()]);
}
