//! Push wake-ups (`--push-url`) against the real DS and a local receiver:
//! an offline client's growing queue is announced with its id and position
//! only, the DS retries while the receiver fails, and a client that is
//! listening (a stream open) gets none.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mls_ds_client::{Client, ClientConfig};
use mls_ds_tests::Server;

/// What the receiver got: each request's authorization and body, and how
/// many requests it still fails.
#[derive(Default)]
struct Received {
    requests: Vec<(Option<String>, serde_json::Value)>,
    fail_next: usize,
}

/// A wake-up receiver on 127.0.0.1; its URL.
async fn receiver(state: Arc<Mutex<Received>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/wake", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let mut s = state.lock().unwrap();
                            s.requests.push((auth, json));
                            let status = if s.fail_next > 0 {
                                s.fail_next -= 1;
                                StatusCode::INTERNAL_SERVER_ERROR
                            } else {
                                StatusCode::OK
                            };
                            let mut resp = Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = status;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

/// The wake-ups for `client` among the received requests from `from` on.
fn wakeups_for(state: &Mutex<Received>, client: &str, from: usize) -> Vec<u64> {
    let s = state.lock().unwrap();
    s.requests[from.min(s.requests.len())..]
        .iter()
        .flat_map(|(_, body)| body["wakeups"].as_array().cloned().unwrap_or_default())
        .filter(|w| w["client"] == client)
        .map(|w| w["position"].as_u64().unwrap())
        .collect()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..400 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_clients_are_woken_and_listening_ones_are_not() {
    let state = Arc::new(Mutex::new(Received {
        fail_next: 2,
        ..Received::default()
    }));
    let url = receiver(state.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("ds"),
        &[
            "--push-url",
            &url,
            "--push-token",
            "s3cret",
            "--push-batch-ms",
            "100",
        ],
    );
    let ds = server.url();
    let open = |name: &str| {
        Arc::new(Client::open(dir.path().join(name), &ds, name, ClientConfig::default()).unwrap())
    };
    let (alice, bob) = (open("alice"), open("bob"));
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    // Bob is offline: his Welcome (queue position 1) is announced, after
    // two failed attempts.
    alice.invite(&gid, &["bob"]).await.unwrap();
    wait_for("bob's wake-up", || wakeups_for(&state, "bob", 0).len() >= 3).await;
    {
        let s = state.lock().unwrap();
        assert!(s.requests.len() >= 3, "two failures, then a success");
        for (auth, body) in &s.requests {
            assert_eq!(auth.as_deref(), Some("Bearer s3cret"));
            for w in body["wakeups"].as_array().unwrap() {
                let keys: Vec<&String> = w.as_object().unwrap().keys().collect();
                assert_eq!(keys, ["client", "position"], "nothing else: {w}");
            }
        }
    }
    assert_eq!(
        wakeups_for(&state, "bob", 0),
        [1, 1, 1],
        "retried as it was"
    );

    // Listening: bob follows a stream and gets no wake-up for what arrives.
    let mut events = bob.event_stream();
    let seen = state.lock().unwrap().requests.len();
    alice.send(&gid, b"while listening").await.unwrap();
    use futures_util::StreamExt;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an event")
            .expect("the stream goes on")
            .unwrap();
        bob.ack_events(ev.seq()).unwrap();
        if matches!(ev, mls_ds_client::Event::Message { .. }) {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        wakeups_for(&state, "bob", seen).is_empty(),
        "no wake-up while listening"
    );

    // Offline again: the next message is announced with its position.
    drop(events);
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice.send(&gid, b"while away").await.unwrap();
    wait_for("the second wake-up", || {
        !wakeups_for(&state, "bob", seen).is_empty()
    })
    .await;
    assert_eq!(wakeups_for(&state, "bob", seen), [3]);
    assert!(
        wakeups_for(&state, "alice", 0).is_empty(),
        "alice got nothing queued"
    );
}
