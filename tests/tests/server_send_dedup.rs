//! Sends with a send id against the real DS: a retry gets the first answer
//! and is not delivered again, also when many copies race, also after the
//! group moved past the message's epoch and after a restart; ids outside
//! the deduplication window are refused; an SDK client's outbox marks what
//! the DS refuses for good and drops it on request.

use std::time::{SystemTime, UNIX_EPOCH};

use mls_ds_client::{Client, ClientConfig, ClientError, DsApi, SendId, Transport};
use mls_ds_protocol::ClientId;
use mls_ds_tests::raw::RawMember;
use mls_ds_tests::{message_texts, Server};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    match r {
        Err(e) => e.status().unwrap_or_else(|| panic!("no status: {e}")),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

/// Alice and bob in one group, bob's queue empty.
async fn pair(url: &str) -> (RawMember, RawMember) {
    let mut alice = RawMember::new(url, "alice");
    let mut bob = RawMember::new(url, "bob");
    alice.register(0).await;
    bob.register(1).await;
    alice.create_group(false).await;
    let kp = alice.claim("bob").await;
    let (c, w, gi) = alice.stage_add(vec![kp]);
    alice.api.commit(&alice.gid(), c, w, gi).await.unwrap();
    alice.merge();
    bob.sync().await;
    (alice, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_id_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let (mut alice, mut bob) = pair(&url).await;
    let gid = alice.gid();

    // A retry gets the first answer; bob gets one entry.
    let id = SendId {
        created_ms: now_ms(),
        nonce: 1,
    };
    let message = alice.encrypt(b"once");
    let first = alice
        .api
        .send_message_once(&gid, message.clone(), id)
        .await
        .unwrap();
    let again = alice
        .api
        .send_message_once(&gid, message.clone(), id)
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(bob.sync().await, vec![b"once".to_vec()]);

    // Twenty copies at once: one delivery, one answer for all.
    let racing = SendId {
        created_ms: now_ms(),
        nonce: 2,
    };
    let message = alice.encrypt(b"raced");
    let answers = futures_all(&alice, &gid, &message, racing).await;
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(bob.sync().await, vec![b"raced".to_vec()]);

    // The group moves four epochs on: the message's epoch is outside the
    // DS's window, and still a retry of the accepted send gets its answer.
    for _ in 0..4 {
        let (c, w, gi) = alice.stage_update();
        alice.api.commit(&gid, c, w, gi).await.unwrap();
        alice.merge();
    }
    bob.sync().await;
    let late = alice
        .api
        .send_message_once(&gid, message.clone(), racing)
        .await
        .unwrap();
    assert_eq!(late, answers[0]);
    // A new id with that old message: refused for its epoch.
    let fresh = SendId {
        created_ms: now_ms(),
        nonce: 3,
    };
    assert_eq!(
        status(
            alice
                .api
                .send_message_once(&gid, message.clone(), fresh)
                .await
        ),
        409
    );

    // After a SIGKILL and restart the DS still knows the send.
    server.kill();
    server.restart();
    let url = server.url();
    let alice_api = DsApi::new(
        Transport::new(&url, ClientId::new("alice").unwrap(), alice.signer.clone()).unwrap(),
    );
    assert_eq!(
        alice_api
            .send_message_once(&gid, message.clone(), racing)
            .await
            .unwrap(),
        answers[0]
    );

    // Ids outside the window (7 days by default) or far ahead are refused.
    let old = SendId {
        created_ms: now_ms() - 8 * 24 * 3600 * 1000,
        nonce: 4,
    };
    let ahead = SendId {
        created_ms: now_ms() + 2 * 24 * 3600 * 1000,
        nonce: 5,
    };
    let m = alice.encrypt(b"x");
    assert_eq!(
        status(alice_api.send_message_once(&gid, m.clone(), old).await),
        400
    );
    assert_eq!(
        status(alice_api.send_message_once(&gid, m, ahead).await),
        400
    );
    server.stop_and_check();
}

/// Send `message` under `id` twenty times at once; every answer.
async fn futures_all(
    alice: &RawMember,
    gid: &[u8],
    message: &[u8],
    id: SendId,
) -> Vec<mls_ds_protocol::groups::MessageAccepted> {
    let sends = (0..20).map(|_| alice.api.send_message_once(gid, message.to_vec(), id));
    mls_ds_tests::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_keeps_what_the_ds_refuses_until_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &["--max-message-bytes", "256"]);
    let url = server.url();
    let open = |name: &str| {
        Client::open(dir.path().join(name), &url, name, ClientConfig::default()).unwrap()
    };
    let (alice, bob) = (open("alice"), open("bob"));
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();
    bob.sync().await.unwrap();

    // Too large for this DS: refused for good, kept and marked.
    let err = alice.send(&gid, &[b'x'; 400]).await.unwrap_err();
    assert_eq!(err.status(), Some(413), "{err}");
    let pending = alice.pending_sends().unwrap();
    assert_eq!(pending.len(), 1);
    assert!(pending[0]
        .failed
        .as_deref()
        .is_some_and(|w| w.contains("413")));
    // It does not hold up the messages after it.
    alice.send(&gid, b"small").await.unwrap();
    assert!(alice.discard_send(pending[0].send_id).await.unwrap());
    assert!(alice.pending_sends().unwrap().is_empty());

    // A message queued while the DS is unreachable goes out with the next
    // sync, once.
    let queued = alice.queue_message(&gid, b"later").await.unwrap();
    assert_eq!(alice.pending_sends().unwrap()[0].send_id, queued);
    alice.sync().await.unwrap();
    assert!(alice.pending_sends().unwrap().is_empty());
    let texts = message_texts(&bob.receive(0).await.unwrap());
    assert_eq!(texts, ["small", "later"]);

    // Removed from the group: what bob still had queued is marked failed,
    // never sent to a later membership.
    bob.queue_message(&gid, b"too late").await.unwrap();
    alice.remove(&gid, "bob").await.unwrap();
    bob.sync().await.unwrap();
    let pending = bob.pending_sends().unwrap();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].failed.is_some(), "{pending:?}");

    // Invited again: what bob sends now goes out, the old message stays
    // failed; dropped, it leaves an empty outbox, and what comes after it
    // still goes out (outbox numbers keep growing past the mark).
    alice.invite(&gid, &["bob"]).await.unwrap();
    bob.sync().await.unwrap();
    bob.send(&gid, b"back again").await.unwrap();
    assert_eq!(bob.pending_sends().unwrap(), pending);
    assert!(bob.discard_send(pending[0].send_id).await.unwrap());
    assert!(bob.pending_sends().unwrap().is_empty());
    bob.send(&gid, b"and once more").await.unwrap();
    assert!(bob.pending_sends().unwrap().is_empty());
    let texts = message_texts(&alice.receive(0).await.unwrap());
    assert_eq!(texts, ["back again", "and once more"]);
}

/// Messages queued before and after the group moved past the window of the
/// first ones: the stale ones are encrypted again for the current epoch,
/// and so are the ones queued after them, so that bob gets alice's
/// generations in order. (Encrypting only the stale ones put them at
/// generations after the newer messages; bob, receiving in outbox order,
/// then refused the newer ones as further in the past than OpenMLS's
/// out-of-order tolerance of 5.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_messages_are_encrypted_again_in_outbox_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let open = |name: &str| {
        Client::open(dir.path().join(name), &url, name, ClientConfig::default()).unwrap()
    };
    let (alice, bob) = (open("alice"), open("bob"));
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();
    bob.sync().await.unwrap();

    let mut texts = Vec::new();
    for i in 0..4 {
        let t = format!("old {i}").into_bytes();
        alice.queue_message(&gid, &t).await.unwrap();
        texts.push(t);
    }
    // Four epochs on: one more than the DS's window of past epochs.
    for _ in 0..4 {
        alice.self_update(&gid).await.unwrap();
    }
    for i in 0..6 {
        let t = format!("new {i}").into_bytes();
        alice.queue_message(&gid, &t).await.unwrap();
        texts.push(t);
    }
    assert_eq!(alice.flush_sends().await.unwrap(), 10);
    assert!(alice.pending_sends().unwrap().is_empty());

    let events = bob.receive(0).await.unwrap();
    let skipped: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, mls_ds_client::Event::Skipped { .. }))
        .collect();
    assert!(skipped.is_empty(), "bob skipped {skipped:?}");
    let texts: Vec<String> = texts
        .iter()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect();
    assert_eq!(message_texts(&events), texts);
}
