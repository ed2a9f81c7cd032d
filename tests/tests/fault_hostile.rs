//! Hostile input, as a bounded property test against the real server: valid
//! requests of every kind, mutated (bit flips, truncation, extension, random
//! bytes, length fields blown up), sent with valid authentication over the
//! mutated body. The server must never answer 5xx, never crash, and a
//! rejected request must change nothing. Inputs: 1,500 by default,
//! `MLS_DS_HOSTILE_INPUTS` for more; seed `MLS_DS_HOSTILE_SEED`. And forged
//! signatures among concurrent registrations, whose signatures the server
//! verifies in batches: each forged one fails alone.

use mls_ds_protocol::queue::EntryKind;
use mls_ds_protocol::{auth, paths, CONTENT_TYPE};
use mls_ds_tests::raw::{raw_request, RawMember};
use mls_ds_tests::Server;
use rand::{Rng, SeedableRng};

/// Whether `mutated` differs from `original` only at positions in `range`.
fn only_in(mutated: &[u8], original: &[u8], range: &std::ops::Range<usize>) -> bool {
    mutated.len() == original.len()
        && mutated
            .iter()
            .zip(original)
            .enumerate()
            .all(|(i, (a, b))| a == b || range.contains(&i))
}

fn mutate(rng: &mut impl Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    match rng.gen_range(0..6) {
        0 if !v.is_empty() => {
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..v.len());
                v[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        1 if !v.is_empty() => v.truncate(rng.gen_range(0..v.len())),
        2 => v.extend((0..rng.gen_range(1..64)).map(|_| rng.gen::<u8>())),
        3 => {
            // Blow up a length prefix: MLS varints start with 0b01/0b10 prefixes.
            if !v.is_empty() {
                let i = rng.gen_range(0..v.len());
                v[i] = 0xbf;
                if i + 1 < v.len() {
                    v[i + 1] = 0xff;
                }
            }
        }
        4 => {
            v = (0..rng.gen_range(0..300))
                .map(|_| rng.gen::<u8>())
                .collect()
        }
        _ => {
            if !v.is_empty() {
                let i = rng.gen_range(0..v.len());
                v.insert(i, rng.gen());
            }
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_break_the_server() {
    let inputs: usize = std::env::var("MLS_DS_HOSTILE_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed: u64 = std::env::var("MLS_DS_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!("hostile input test: seed {seed}, {inputs} inputs");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let url = server.url();
    let mut alice = RawMember::new(&url, "h-alice");
    let mut bob = RawMember::new(&url, "h-bob");
    alice.register(2).await;
    bob.register(3).await;
    alice.create_group(false).await;
    let kp = alice.claim("h-bob").await;
    let gid = alice.gid();
    let (c, w, gi) = alice.stage_add(vec![kp]);
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
    bob.sync().await;

    // Valid bodies of every kind, as seeds for mutation.
    let (c2, w2, gi2) = alice.stage_update();
    alice.clear();
    // The commit's confirmation and membership tags (each a 1-byte length
    // and 32 bytes, at its end) are MACs under secrets the DS does not
    // have: a commit altered only there is accepted, and its members must
    // recover from it. Mutations confined to them are not sent.
    let tags_len = 2 * 33;
    let commit_body = mls_ds_protocol::encode(&mls_ds_protocol::groups::CommitBundle {
        commit: c2.clone().into(),
        welcome: w2.map(Into::into),
        group_info: gi2.into(),
    })
    .unwrap();
    let send_body = mls_ds_protocol::encode(&mls_ds_protocol::groups::SendMessage {
        message: alice.encrypt(b"seed").into(),
        send_id: Some(mls_ds_protocol::groups::SendId {
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
            nonce: 7,
        }),
    })
    .unwrap();
    let publish_body =
        mls_ds_protocol::encode(&mls_ds_protocol::key_packages::PublishKeyPackages {
            key_packages: vec![alice.key_package().into()],
            last_resort: None,
        })
        .unwrap();
    let ack_body = mls_ds_protocol::encode(&mls_ds_protocol::queue::Ack { up_to: 1 }).unwrap();
    let commit_end = commit_body
        .windows(c2.len())
        .position(|w| w == c2.as_slice())
        .expect("the commit is in its bundle")
        + c2.len();
    let unverifiable = commit_end - tags_len..commit_end;
    let commit_path = paths::commits(&gid);
    let targets: Vec<(&str, String, Vec<u8>)> = vec![
        ("POST", commit_path.clone(), commit_body),
        ("POST", paths::messages(&gid), send_body),
        ("POST", paths::KEY_PACKAGES.to_string(), publish_body),
        ("POST", paths::QUEUE_ACK.to_string(), ack_body),
        ("POST", paths::GROUPS.to_string(), vec![0, 0, 0]),
        (
            "POST",
            paths::CLIENTS.to_string(),
            vec![5, b'h', b'-', b'a', b'l', b'i'],
        ),
    ];
    let epoch_before = alice.api.group_info(&gid).await.unwrap().epoch;
    let kps_before = bob.api.key_package_count().await.unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut by_status = std::collections::BTreeMap::new();
    let started = std::time::Instant::now();
    let mut slowest = (std::time::Duration::ZERO, String::new());
    for _ in 0..inputs {
        let t = std::time::Instant::now();
        let (method, path, body) = &targets[rng.gen_range(0..targets.len())];
        let mutated = mutate(&mut rng, body);
        if *path == commit_path && only_in(&mutated, body, &unverifiable) {
            continue;
        }
        let token = alice
            .api
            .transport
            .signature_token(method, path, &mutated)
            .unwrap();
        let (status, _) = raw_request(
            &url,
            method,
            path,
            &[
                ("authorization", auth::header_value(&token)),
                ("content-type", CONTENT_TYPE.to_string()),
            ],
            mutated,
        )
        .await;
        assert!(
            status < 500,
            "server error {status} for a mutated request to {path} (seed {seed})"
        );
        *by_status.entry(status).or_insert(0) += 1;

        if t.elapsed() > slowest.0 {
            slowest = (t.elapsed(), path.clone());
        }
    }
    println!(
        "hostile input test: statuses {by_status:?} in {:.1}s (slowest {:?} on {})",
        started.elapsed().as_secs_f64(),
        slowest.0,
        slowest.1
    );
    // Nothing a mutated request could do changed the group or bob's packages
    // (an ack of entry 1 or a fresh key package of alice's may succeed: both
    // are legitimate requests of hers).
    assert_eq!(
        alice.api.group_info(&gid).await.unwrap().epoch,
        epoch_before
    );
    assert_eq!(bob.api.key_package_count().await.unwrap(), kps_before);
    // The server still works. Mutated application messages were accepted
    // and queued (the DS cannot see inside ciphertext): bob skips what he
    // cannot decrypt, and applies alice's next commit.
    let (c, w, gi) = alice.stage_update();
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
    loop {
        let page = bob.api.fetch(bob.cursor, 500, 0).await.unwrap();
        let Some(last) = page.entries.last().map(|e| e.seq) else {
            break;
        };
        for e in &page.entries {
            if e.kind == EntryKind::Commit {
                bob.process(e);
            }
        }
        bob.cursor = last;
        bob.api.ack(last).await.unwrap();
    }
    assert_eq!(alice.epoch(), bob.epoch());
    assert_eq!(alice.secret(), bob.secret());
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains("panicked"), "server log shows a panic");
}

/// Concurrent registrations, a quarter of them with a forged signature (one
/// bit flipped): the server verifies concurrent Ed25519 signatures in
/// batches, and a forged one must fail its own request only, register
/// nothing, and leave the honest ones in its batch registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_signatures_among_concurrent_registrations_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let url = server.url();
    let run = std::process::id();
    let members: Vec<RawMember> = (0..64)
        .map(|i| RawMember::new(&url, &format!("batch-{run}-{i}")))
        .collect();
    let forged = |i: usize| i % 4 == 1;
    // Every registration at once, then every one again honestly.
    for round in 0..2 {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, m) in members.iter().enumerate() {
            let body = m.api.registration_body(None).unwrap();
            let auth::AuthToken::Signature(mut token) = m
                .api
                .transport
                .signature_token("POST", paths::CLIENTS, &body)
                .unwrap()
            else {
                panic!("a registration is signed");
            };
            if round == 0 && forged(i) {
                let mut signature = token.signature.as_slice().to_vec();
                signature[i % 64] ^= 0x10;
                token.signature = signature.into();
            }
            let header = auth::header_value(&auth::AuthToken::Signature(token));
            let url = url.clone();
            tasks.spawn(async move {
                let (status, _) = raw_request(
                    &url,
                    "POST",
                    paths::CLIENTS,
                    &[
                        ("authorization", header),
                        ("content-type", CONTENT_TYPE.to_string()),
                    ],
                    body,
                )
                .await;
                (i, status)
            });
        }
        for (i, status) in tasks.join_all().await {
            // 201: registered now; 200: registered before.
            let expected = match (round == 0, forged(i)) {
                (true, true) => 401,
                (true, false) | (false, true) => 201,
                (false, false) => 200,
            };
            assert_eq!(status, expected, "round {round}, registration {i}");
        }
        let (_, page) = raw_request(&server.metrics_url(), "GET", "/metrics", &[], vec![]).await;
        let page = String::from_utf8(page).unwrap();
        let count = |series: &str| {
            page.lines()
                .find_map(|l| {
                    l.strip_prefix(series)?
                        .strip_prefix(' ')?
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("{series} in:\n{page}"))
        };
        let signatures = count("mls_ds_ed25519_signatures_total");
        assert_eq!(
            signatures,
            64 * (round + 1) as u64,
            "every signature verified once"
        );
        println!(
            "round {round}: {signatures} signatures in {} rounds, {} failed batches",
            count("mls_ds_ed25519_rounds_total"),
            count("mls_ds_ed25519_failed_batches_total")
        );
    }
    server.stop_and_check();
}
