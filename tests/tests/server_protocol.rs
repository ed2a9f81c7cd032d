//! Protocol tests against one real server: commit ordering (race, idempotent
//! retry, stale epoch), key packages claimed exactly once under concurrency,
//! and one test per bad-input class, each checking the status and that
//! nothing changed.

use mls_ds_protocol::auth::{self, AuthToken, SessionAuth};
use mls_ds_protocol::{decode, paths, ClientId, ErrorBody, ErrorCode, CONTENT_TYPE};
use mls_ds_tests::raw::{group_of_two, raw_request, wire, RawMember};
use mls_ds_tests::{join_all, Server};

fn error_of(body: &[u8]) -> ErrorBody {
    decode::<ErrorBody>(body).expect("error body decodes")
}

async fn commit_race(url: &str) {
    let (mut alice, mut bob) = group_of_two(url, "race-alice", "race-bob").await;
    let gid = alice.gid();
    let epoch = alice.epoch();
    let a = alice.stage_update();
    let b = bob.stage_update();
    let (ra, rb) = tokio::join!(
        alice
            .api
            .commit(&gid, a.0.clone(), a.1.clone(), a.2.clone()),
        bob.api.commit(&gid, b.0.clone(), b.1.clone(), b.2.clone()),
    );
    assert!(
        ra.is_ok() != rb.is_ok(),
        "exactly one commit wins: {ra:?} {rb:?}"
    );
    let (winner, loser, win_bundle, lose_bundle, loss) = match (ra, rb) {
        (Ok(_), Err(loss)) => (&mut alice, &mut bob, a, b, loss),
        (Err(loss), Ok(_)) => (&mut bob, &mut alice, b, a, loss),
        _ => unreachable!("checked above"),
    };
    assert!(loss.is_wrong_epoch(), "{loss}");
    let ClientError409 { current } = wrong_epoch(&loss);
    assert_eq!(current, epoch + 1);
    winner.merge();
    loser.clear();
    loser.sync().await;
    assert_eq!(winner.epoch(), epoch + 1);
    assert_eq!(loser.epoch(), epoch + 1);
    assert_eq!(winner.secret(), loser.secret());

    // A retry of the accepted commit gets the original success.
    let again = winner
        .api
        .commit(&gid, win_bundle.0, win_bundle.1, win_bundle.2)
        .await
        .unwrap();
    assert_eq!(again.epoch, epoch + 1);
    // The losing commit stays rejected, naming the current epoch.
    let err = loser
        .api
        .commit(&gid, lose_bundle.0, lose_bundle.1, lose_bundle.2)
        .await
        .unwrap_err();
    assert_eq!(wrong_epoch(&err).current, epoch + 1);
    // The loser recovers: its next commit is accepted.
    let c = loser.stage_update();
    loser.api.commit(&gid, c.0, c.1, c.2).await.unwrap();
    loser.merge();
    winner.sync().await;
    assert_eq!(winner.secret(), loser.secret());
}

struct ClientError409 {
    current: u64,
}

fn wrong_epoch(e: &mls_ds_client::ClientError) -> ClientError409 {
    match e {
        mls_ds_client::ClientError::Server {
            status: 409, body, ..
        } => {
            assert_eq!(body.code, ErrorCode::WrongEpoch);
            ClientError409 {
                current: body.current_epoch.expect("current epoch named"),
            }
        }
        other => panic!("expected 409 wrong epoch, got {other}"),
    }
}

async fn concurrent_claims(url: &str) {
    let owner = RawMember::new(url, "kp-owner");
    owner.api.register().await.unwrap();
    let kps: Vec<Vec<u8>> = (0..20).map(|_| owner.key_package()).collect();
    let last = owner.key_package();
    owner
        .api
        .publish_key_packages(kps, Some(last.clone()))
        .await
        .unwrap();
    let mut claimers = Vec::new();
    for i in 0..6 {
        let c = RawMember::new(url, &format!("claimer-{i}"));
        c.register(0).await;
        claimers.push(c);
    }
    let target = ClientId::new("kp-owner").unwrap();
    let mut tasks = Vec::new();
    for round in 0..5 {
        for c in &claimers {
            let _ = round;
            tasks.push(c.api.claim_key_package(&target));
        }
    }
    let results = join_all(tasks).await;
    let mut ordinary = std::collections::HashSet::new();
    let mut last_resort = 0;
    for r in results {
        let claimed = r.expect("claim succeeds");
        if claimed.last_resort.0 {
            last_resort += 1;
            assert_eq!(claimed.key_package.as_slice(), last.as_slice());
        } else {
            assert!(
                ordinary.insert(claimed.key_package.as_slice().to_vec()),
                "a key package was handed out twice"
            );
        }
    }
    assert_eq!(ordinary.len(), 20);
    assert_eq!(last_resort, 10);
    let count = owner.api.key_package_count().await.unwrap();
    assert_eq!(count.remaining, 0);
    assert!(count.has_last_resort.0, "the last resort is never consumed");
}

/// What the bad-input tests compare before and after.
async fn snapshot(m: &RawMember, observer: &RawMember, gid: &[u8]) -> (u64, u32, u64) {
    let info = m.api.group_info(gid).await.unwrap();
    let kps = m.api.key_package_count().await.unwrap().remaining;
    let head = observer.api.fetch(u64::MAX - 1, 1, 0).await.unwrap().head;
    (info.epoch, kps, head)
}

async fn bad_inputs(url: &str) {
    let (mut alice, mut bob) = group_of_two(url, "bad-alice", "bad-bob").await;
    alice
        .api
        .publish_key_packages(vec![alice.key_package()], None)
        .await
        .unwrap();
    let mallory = RawMember::new(url, "bad-mallory");
    mallory.register(1).await;
    let gid = alice.gid();
    let before = snapshot(&alice, &bob, &gid).await;

    // 400: malformed bodies and MLS bytes, with authentication right.
    let e = alice
        .api
        .commit(&gid, b"\x00\x01garbage".to_vec(), None, vec![1, 2])
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let mut msg = alice.encrypt(b"cut");
    msg.truncate(msg.len() / 2);
    let e = alice.api.send_message(&gid, msg).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let e = alice
        .api
        .publish_key_packages(vec![vec![0, 1, 0, 5, 9]], None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    // A valid commit whose GroupInfo belongs to the old epoch: rejected, nothing merged.
    let (c, w, _) = alice.stage_update();
    let old_gi = {
        let crypto = openmls_traits::OpenMlsProvider::crypto(&alice.provider);
        let g = alice.group.as_ref().unwrap();
        wire(&g.export_group_info(crypto, &alice.signer, false).unwrap())
    };
    let e = alice.api.commit(&gid, c, w, old_gi).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    alice.clear();
    // Query parameter that is not a number.
    let token = alice
        .api
        .transport
        .signature_token("GET", "/v1/queue?after=x", b"")
        .unwrap();
    let (s, _) = raw_request(
        url,
        "GET",
        "/v1/queue?after=x",
        &[("authorization", auth::header_value(&token))],
        vec![],
    )
    .await;
    assert_eq!(s, 400);

    // 401: missing, forged, stale, replayed authentication.
    let (s, b) = raw_request(url, "GET", paths::KEY_PACKAGES, &[], vec![]).await;
    assert_eq!((s, error_of(&b).code), (401, ErrorCode::Unauthorized));
    let good = alice
        .api
        .transport
        .signature_token("GET", paths::KEY_PACKAGES, b"")
        .unwrap();
    let hdr = auth::header_value(&good);
    assert_eq!(
        raw_request(
            url,
            "GET",
            paths::KEY_PACKAGES,
            &[("authorization", hdr.clone())],
            vec![]
        )
        .await
        .0,
        200
    );
    assert_eq!(
        raw_request(
            url,
            "GET",
            paths::KEY_PACKAGES,
            &[("authorization", hdr)],
            vec![]
        )
        .await
        .0,
        401,
        "replay"
    );
    let AuthToken::Signature(mut forged) = alice
        .api
        .transport
        .signature_token("GET", paths::KEY_PACKAGES, b"")
        .unwrap()
    else {
        unreachable!()
    };
    forged.client_id = ClientId::new("bad-bob").unwrap();
    assert_eq!(
        raw_request(
            url,
            "GET",
            paths::KEY_PACKAGES,
            &[(
                "authorization",
                auth::header_value(&AuthToken::Signature(forged))
            )],
            vec![]
        )
        .await
        .0,
        401,
        "forged"
    );
    let AuthToken::Signature(mut stale) = alice
        .api
        .transport
        .signature_token("GET", paths::KEY_PACKAGES, b"")
        .unwrap()
    else {
        unreachable!()
    };
    stale.timestamp_ms -= 10 * 60 * 1000;
    assert_eq!(
        raw_request(
            url,
            "GET",
            paths::KEY_PACKAGES,
            &[(
                "authorization",
                auth::header_value(&AuthToken::Signature(stale))
            )],
            vec![]
        )
        .await
        .0,
        401,
        "stale"
    );
    let session = alice.api.open_session().await.unwrap();
    let fake_mac = AuthToken::Session(SessionAuth {
        session_id: session.session_id,
        counter: 1,
        timestamp_ms: now_ms(),
        mac: [0; 32],
    });
    assert_eq!(
        raw_request(
            url,
            "GET",
            paths::KEY_PACKAGES,
            &[("authorization", auth::header_value(&fake_mac))],
            vec![]
        )
        .await
        .0,
        401,
        "forged MAC"
    );
    // A token for another path does not authorise this one.
    let other = alice
        .api
        .transport
        .signature_token("GET", "/v1/queue", b"")
        .unwrap();
    assert_eq!(
        raw_request(
            url,
            "GET",
            paths::KEY_PACKAGES,
            &[("authorization", auth::header_value(&other))],
            vec![]
        )
        .await
        .0,
        401
    );

    // 403: not a member; acting for someone else.
    let e = mallory
        .api
        .send_message(&gid, alice.encrypt(b"x"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = mallory.api.group_info(&gid).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = mallory
        .api
        .publish_key_packages(vec![alice.key_package()], None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = mallory
        .api
        .commit(&gid, alice.stage_update().0, None, vec![])
        .await
        .unwrap_err();
    assert!(matches!(e.status(), Some(400) | Some(403)), "{e}");
    alice.clear();
    let token = mallory
        .api
        .transport
        .signature_token(
            "DELETE",
            &paths::client(&ClientId::new("bad-alice").unwrap()),
            b"",
        )
        .unwrap();
    assert_eq!(
        raw_request(
            url,
            "DELETE",
            &paths::client(&ClientId::new("bad-alice").unwrap()),
            &[("authorization", auth::header_value(&token))],
            vec![]
        )
        .await
        .0,
        403
    );

    // 404: unknown client, unknown group, unknown route.
    let e = alice
        .api
        .claim_key_package(&ClientId::new("nobody").unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let e = alice.api.group_info(b"no-such-group").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert_eq!(
        raw_request(url, "GET", "/v1/nothing", &[], vec![]).await.0,
        404
    );
    // 405.
    assert_eq!(
        raw_request(url, "DELETE", paths::QUEUE, &[], vec![])
            .await
            .0,
        405
    );

    // 409: a commit for a stale epoch. Bob staged his at epoch e; Alice's
    // commit for e is accepted first.
    let stale = bob.stage_update();
    let (c, w, gi) = alice.stage_update();
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
    let e = bob
        .api
        .commit(&gid, stale.0, stale.1, stale.2)
        .await
        .unwrap_err();
    assert_eq!(wrong_epoch(&e).current, before.0 + 1);
    bob.clear();
    bob.sync().await;
    assert_eq!(bob.epoch(), alice.epoch());
    // Alice's accepted commit moved the epoch and added one entry to Bob's queue.
    let before = (before.0 + 1, before.1, before.2 + 1);

    // 413: body over the limit, refused from its Content-Length before it
    // is read. Only the head is sent: a client still writing the body when
    // the server answers and closes may see the connection reset before it
    // reads the answer.
    let (s, b) = head_only_request(url, paths::KEY_PACKAGES, 1024 * 1024 + 10).await;
    assert_eq!((s, error_of(&b).code), (413, ErrorCode::PayloadTooLarge));
    // 415: wrong content type.
    let token = alice
        .api
        .transport
        .signature_token("POST", paths::QUEUE_ACK, b"{}")
        .unwrap();
    let (s, _) = raw_request(
        url,
        "POST",
        paths::QUEUE_ACK,
        &[
            ("content-type", "application/json".into()),
            ("authorization", auth::header_value(&token)),
        ],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(s, 415);
    // Acknowledging beyond the head: 400, nothing deleted.
    let e = bob.api.ack(1_000_000).await.unwrap_err();
    assert_eq!(e.status(), Some(400));

    assert_eq!(
        snapshot(&alice, &bob, &gid).await,
        before,
        "rejected requests changed nothing"
    );
}

/// `GET /v1/queue?ack=N` acknowledges before it fetches; an ack beyond the
/// head is refused and changes nothing.
async fn ack_with_fetch(url: &str) {
    let (mut alice, bob) = group_of_two(url, "ackf-alice", "ackf-bob").await;
    let start = bob.api.fetch(0, 1, 0).await.unwrap().acked;
    for i in 0..3 {
        let m = alice.encrypt(format!("m{i}").as_bytes());
        alice.api.send_message(&alice.gid(), m).await.unwrap();
    }
    let page = bob.api.fetch(start, 10, 0).await.unwrap();
    assert_eq!(page.entries.len(), 3);
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    let page = bob
        .api
        .ack_and_fetch(seqs[1], seqs[1], 10, 0)
        .await
        .unwrap();
    assert_eq!(page.acked, seqs[1]);
    assert_eq!(
        page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![seqs[2]]
    );
    let e = bob
        .api
        .ack_and_fetch(1_000_000, seqs[1], 10, 0)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert_eq!(
        bob.api.fetch(0, 10, 0).await.unwrap().acked,
        seqs[1],
        "unchanged"
    );
    // Acknowledging the rest and long-polling on the empty queue.
    let page = bob
        .api
        .ack_and_fetch(seqs[2], seqs[2], 10, 50)
        .await
        .unwrap();
    assert_eq!((page.acked, page.entries.len()), (seqs[2], 0));
}

/// A deleted client's id stays reserved; nothing is queued for it; a session
/// cannot open another session; non-members learn nothing about the epoch.
async fn deletion_and_sessions(url: &str) {
    let (mut alice, bob) = group_of_two(url, "del-alice", "del-bob").await;
    let gid = alice.gid();
    // A session token cannot open a session (only the signature key can).
    let session = alice.api.open_session().await.unwrap();
    let payload = auth::session_payload(
        "POST",
        paths::SESSIONS,
        &auth::body_hash(b""),
        now_ms(),
        &session.session_id,
        1,
    );
    let token = AuthToken::Session(SessionAuth {
        session_id: session.session_id,
        counter: 1,
        timestamp_ms: now_ms(),
        mac: auth::mac(&session.session_key, &payload),
    });
    let (s, _) = raw_request(
        url,
        "POST",
        paths::SESSIONS,
        &[("authorization", auth::header_value(&token))],
        vec![],
    )
    .await;
    assert_eq!(s, 401, "session opened by a session token");

    // A non-member gets 403, not the group's epoch.
    let outsider = RawMember::new(url, "del-outsider");
    outsider.register(0).await;
    let msg = alice.encrypt(b"x");
    let e = outsider.api.send_message(&gid, msg).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // Bob deletes himself: his id cannot be taken over, and nothing more is
    // queued for him (alice's send reaches zero recipients).
    bob.api.delete_client().await.unwrap();
    let thief = RawMember::new(url, "del-bob");
    let e = thief.api.register().await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let msg = alice.encrypt(b"after delete");
    let sent = alice.api.send_message(&gid, msg).await.unwrap();
    assert_eq!(sent.recipients, 0);
    let e = bob.api.fetch(0, 10, 0).await.unwrap_err();
    assert_eq!(
        e.status(),
        Some(401),
        "deleted client cannot authenticate: {e}"
    );
    // Alice can still commit (bob's leaf is still there) and remove him.
    let (c, w, gi) = alice.stage_update();
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let url = server.url();
    commit_race(&url).await;
    concurrent_claims(&url).await;
    bad_inputs(&url).await;
    ack_with_fetch(&url).await;
    deletion_and_sessions(&url).await;
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains("panicked"), "server log shows a panic");
}

/// A POST whose head declares `length` bytes of body, none of which is sent;
/// returns the answer's status and body.
async fn head_only_request(url: &str, path: &str, length: usize) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {CONTENT_TYPE}\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer ends when the server closes the connection, or once its
    // declared body has arrived.
    loop {
        let n = stream.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_lowercase();
            let declared = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if declared.is_some_and(|d| answer.len() >= end + 4 + d) {
                break;
            }
        }
    }
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let status = String::from_utf8_lossy(&answer[..end])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, answer[end + 4..].to_vec())
}
