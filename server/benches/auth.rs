//! Per-request cost of authentication on the server, without HTTP: parsing
//! the `Authorization` header and verifying a session token (HMAC-SHA256 over
//! the request digest, plus the replay window), which every request after the
//! first of a session pays; and, for comparison, verifying a signature token
//! (Ed25519), which registration and opening a session pay.
//!
//! `cargo bench -p mls-ds-server --features test-support --bench auth`
//! (MLS_DS_AUTH_QUICK=1: fewer iterations). Tokens are built before the
//! timer starts.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mls_ds_protocol::auth::{self, AuthToken, SessionAuth, SignatureAuth};
use mls_ds_protocol::ClientId;
use mls_ds_server::test_support::{Authenticator, RegisteredKey, RequestView};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::SignatureScheme;

const METHOD: &str = "POST";
const PATH: &str = "/v1/groups/67726f75702d31/messages";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn main() {
    let quick = std::env::var("MLS_DS_AUTH_QUICK").is_ok();
    let (sessions_n, signatures_n) = if quick {
        (20_000, 500)
    } else {
        (200_000, 5_000)
    };
    // A typical application message body.
    let body = vec![0x5a; 300];
    let view = RequestView {
        method: METHOD,
        path_and_query: PATH,
        body: &body,
    };
    let client = ClientId::new("bench-client").expect("client id");
    let authn = Authenticator::new(3_600_000, 10);

    let session = authn.open_session(&client).expect("session");
    let ts = now_ms();
    let headers: Vec<String> = (1..=sessions_n as u64)
        .map(|counter| {
            let payload = auth::session_payload(
                METHOD,
                PATH,
                &auth::body_hash(&body),
                ts,
                &session.session_id,
                counter,
            );
            auth::header_value(&AuthToken::Session(SessionAuth {
                session_id: session.session_id,
                counter,
                timestamp_ms: ts,
                mac: auth::mac(&session.session_key, &payload),
            }))
        })
        .collect();
    let t = Instant::now();
    for h in &headers {
        let AuthToken::Session(token) = Authenticator::parse(Some(h)).expect("parses") else {
            panic!("not a session token");
        };
        authn.verify_session(&token, &view).expect("verifies");
    }
    let per = t.elapsed().as_secs_f64() / sessions_n as f64 * 1e6;
    println!(
        "session token (parse header + HMAC-SHA256 over a {}-byte body's request digest + replay window): {per:.2} us/request over {sessions_n}",
        body.len()
    );

    let crypto = RustCrypto::default();
    let scheme = SignatureScheme::ED25519;
    let (private, public) = crypto.signature_key_gen(scheme).expect("key pair");
    let key = RegisteredKey {
        scheme: scheme as u16,
        public_key: &public,
    };
    let ts = now_ms();
    let headers: Vec<String> = (0..signatures_n as u64)
        .map(|i| {
            let mut nonce = [0u8; auth::NONCE_LEN];
            nonce[..8].copy_from_slice(&i.to_be_bytes());
            let payload =
                auth::signature_payload(METHOD, PATH, &auth::body_hash(&body), ts, &client, &nonce);
            let signature = crypto.sign(scheme, &payload, &private).expect("signs");
            auth::header_value(&AuthToken::Signature(SignatureAuth {
                client_id: client.clone(),
                timestamp_ms: ts,
                nonce,
                signature: signature.into(),
            }))
        })
        .collect();
    let (alone, together) = headers.split_at(signatures_n / 2);
    // One thread: wall time is CPU time.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let verify = |h: &String| {
        let AuthToken::Signature(token) = Authenticator::parse(Some(h)).expect("parses") else {
            panic!("not a signature token");
        };
        let (authn, view) = (&authn, &view);
        async move {
            authn
                .verify_signature(&token, key, view)
                .await
                .expect("verifies");
        }
    };
    let t = Instant::now();
    rt.block_on(async {
        for h in alone {
            verify(h).await;
        }
    });
    let per = t.elapsed().as_secs_f64() / alone.len() as f64 * 1e6;
    println!(
        "signature token, one at a time (parse header + Ed25519 verification + nonce cache): {per:.2} us/request over {}",
        alone.len()
    );
    // 32 requests in flight, as the load generator sends them: their
    // signatures are verified in batches.
    let t = Instant::now();
    rt.block_on(async {
        let mut rest = together.iter();
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        for h in rest.by_ref().take(32) {
            in_flight.push(verify(h));
        }
        while futures_util::StreamExt::next(&mut in_flight)
            .await
            .is_some()
        {
            if let Some(h) = rest.next() {
                in_flight.push(verify(h));
            }
        }
    });
    let per = t.elapsed().as_secs_f64() / together.len() as f64 * 1e6;
    println!(
        "signature token, 32 in flight (verified in batches): {per:.2} us/request over {}",
        together.len()
    );
}
