//! Overload: a client over its rate limit gets 429; 300 concurrent
//! long-polls and 320 concurrent, stalled 1 MiB request bodies against
//! `--max-inflight 64` get 503 for the excess at once instead of queueing
//! without bound (exactly 64 bodies are admitted), so the server's peak RSS
//! (`VmHWM`, printed) stays under 300 MiB although the bodies alone offer
//! 320 MiB; and the server serves normally once the load drops. Thousands
//! of requests at once on one session, through a paused server, all pass:
//! none is taken for a replay however they are reordered.

use std::sync::atomic::{AtomicUsize, Ordering};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use mls_ds_client::{DsApi, Transport};
use mls_ds_protocol::{paths, ClientId, CONTENT_TYPE};
use mls_ds_tests::raw::RawMember;
use mls_ds_tests::{join_all, Server};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::types::SignatureScheme;

const MAX_INFLIGHT: usize = 64;
const POLLERS: usize = 300;
const BODIES: usize = 320;
/// The server's default `--max-body-bytes`.
const BODY_BYTES: usize = 1024 * 1024;
const RSS_BOUND_MIB: u64 = 300;

/// A registered client that signs every request (no session to open first,
/// so each call is exactly one request).
async fn signing_client(url: &str, name: &str) -> DsApi {
    let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    let mut transport = Transport::new(url, ClientId::new(name).unwrap(), signer).unwrap();
    transport.always_sign = true;
    let api = DsApi::new(transport);
    api.register().await.unwrap();
    api
}

/// A request body that sends `first` at once and `last` only once released.
struct Stalled {
    first: Option<Bytes>,
    last: Option<Bytes>,
    release: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if self.last.is_some() {
            if self.release.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(self.last.take().map(|b| Ok(Frame::data(b))));
        }
        Poll::Ready(None)
    }

    fn size_hint(&self) -> SizeHint {
        // Announced up front, so the request has a Content-Length.
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, |b| b.len() as u64);
        SizeHint::with_exact(len(&self.first) + len(&self.last))
    }
}

async fn wait_for(mut released: tokio::sync::watch::Receiver<bool>) {
    let _ = released.wait_for(|r| *r).await;
}

/// One connection per request (a pool would reuse few connections).
fn stalling_client() -> HyperClient<HttpConnector, Stalled> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    HyperClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_bounded_memory_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--max-inflight",
            &MAX_INFLIGHT.to_string(),
            "--rate-limit-per-sec",
            "20",
            "--rate-limit-burst",
            "20",
        ],
    );
    let url = server.url();
    let rss_at_start = server.peak_rss_kib().expect("VmHWM");

    // Rate limit: one client hammering gets 429 once its burst is spent.
    let hammer = RawMember::new(&url, "hammer");
    hammer.register(0).await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        match hammer.api.key_package_count().await {
            Ok(_) => statuses.push(200),
            Err(e) => statuses.push(e.status().unwrap_or(0)),
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );

    // In-flight limit: hundreds of long-polls at once. The excess is refused
    // with 503 at once: every refusal comes back before any long-poll
    // returns (they wait 2 s for messages that never come).
    let mut pollers = Vec::new();
    for chunk in (0..POLLERS).collect::<Vec<_>>().chunks(32) {
        let names: Vec<String> = chunk.iter().map(|i| format!("poller-{i}")).collect();
        pollers.extend(join_all(names.iter().map(|n| signing_client(&url, n))).await);
    }
    let done = AtomicUsize::new(0);
    let results = join_all(pollers.iter().map(|api| async {
        let r = api.fetch(0, 10, 2000).await;
        (r, done.fetch_add(1, Ordering::SeqCst))
    }))
    .await;
    let refused: Vec<usize> = results
        .iter()
        .filter(|(r, _)| r.as_ref().err().and_then(|e| e.status()) == Some(503))
        .map(|(_, order)| *order)
        .collect();
    let served: Vec<usize> = results
        .iter()
        .filter(|(r, _)| r.is_ok())
        .map(|(_, order)| *order)
        .collect();
    assert!(!refused.is_empty(), "some long-polls refused with 503");
    assert!(!served.is_empty(), "the rest served");
    assert_eq!(refused.len() + served.len(), POLLERS, "only 200 or 503");
    assert!(
        refused.iter().max() < served.iter().min(),
        "refusals answered before the admitted long-polls finished, not queued behind them"
    );

    // Memory: hundreds of maximal bodies held at once. Every request sends
    // all of its body but the last byte, then stalls until released, so the
    // server holds each admitted body (nearly 1 MiB) at the same time. Since
    // no admitted request can finish before the release, exactly
    // MAX_INFLIGHT are admitted; every other one is refused before its body
    // is read: 503, or, when the server closes the connection on the unread
    // body before the client has read the answer, a reset. Without the limit
    // the bodies alone would take 320 MiB.
    let (release, released) = tokio::sync::watch::channel(false);
    let chunk = Bytes::from(vec![0x5a; BODY_BYTES - 1]);
    let finished = AtomicUsize::new(0);
    let client = stalling_client();
    let requests = join_all((0..BODIES).map(|_| async {
        let body = Stalled {
            first: Some(chunk.clone()),
            last: Some(Bytes::from_static(b"z")),
            release: Box::pin(wait_for(released.clone())),
        };
        let req = hyper::Request::post(format!("{url}{}", paths::KEY_PACKAGES))
            .header("content-type", CONTENT_TYPE)
            .body(body)
            .unwrap();
        let answer = match client.request(req).await {
            Ok(r) => r.status().as_u16().to_string(),
            Err(_) => "reset before the answer was read".to_string(),
        };
        let early = !*released.borrow();
        finished.fetch_add(1, Ordering::SeqCst);
        (answer, early)
    }));
    let all_refused = async {
        // Wait (not a timing assertion: the counts are checked below) until
        // everything past the limit was refused, then let the rest finish.
        for _ in 0..3000 {
            if finished.load(Ordering::SeqCst) >= BODIES - MAX_INFLIGHT {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let held = server.peak_rss_kib().expect("VmHWM");
        release.send(true).unwrap();
        held
    };
    let (answers, rss_held) = tokio::join!(requests, all_refused);
    let mut by_status = std::collections::BTreeMap::new();
    for (answer, _) in &answers {
        *by_status.entry(answer.as_str()).or_insert(0) += 1;
    }
    let admitted: Vec<&str> = answers
        .iter()
        .filter(|(_, early)| !early)
        .map(|(a, _)| a.as_str())
        .collect();
    assert_eq!(
        admitted,
        vec!["401"; MAX_INFLIGHT],
        "exactly the limit admitted, each read whole and then refused for lack of authentication ({by_status:?})"
    );
    assert!(
        answers
            .iter()
            .filter(|(_, early)| *early)
            .all(|(a, _)| a != "401"),
        "no body past the limit was read: {by_status:?}"
    );
    assert!(by_status.get("503") > Some(&0), "{by_status:?}");
    let peak = server.peak_rss_kib().expect("VmHWM");
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "overload test: {} of {POLLERS} long-polls refused, {} served; {BODIES} stalled 1 MiB bodies: {by_status:?}; server peak RSS {:.1} MiB (at start {:.1}, with {MAX_INFLIGHT} bodies held {:.1}), bound {RSS_BOUND_MIB} MiB",
        refused.len(),
        served.len(),
        mib(peak),
        mib(rss_at_start),
        mib(rss_held),
    );
    assert!(
        peak < RSS_BOUND_MIB * 1024,
        "peak RSS {peak} KiB over {RSS_BOUND_MIB} MiB"
    );

    // Load gone: normal service.
    for api in &pollers {
        api.fetch(0, 10, 0)
            .await
            .expect("served after the load dropped");
    }
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains("panicked"));
}

/// The value of a Prometheus series, if the page has it.
fn series(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_session_reordered_by_a_paused_server_are_never_replays() {
    const REQUESTS: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    let transport = Transport::new(&server.url(), ClientId::new("busy").unwrap(), signer).unwrap();
    let api = std::sync::Arc::new(DsApi::new(transport));
    api.register().await.unwrap();
    api.key_package_count().await.unwrap();

    // Every request is on its way while the server stands still; when it
    // goes on, it reads them in whatever order its connections come up.
    server.pause();
    let calls = (0..REQUESTS).map(|_| {
        let api = api.clone();
        tokio::spawn(async move { api.key_package_count().await })
    });
    let calls: Vec<_> = calls.collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    server.resume();
    for call in calls {
        call.await.unwrap().expect("answered");
    }

    let page = metrics_page(&server).await;
    let count = |route: &str, status: u16| {
        series(
            &page,
            &format!("mls_ds_requests_total{{route=\"{route}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(count("count", 200), Some(REQUESTS as u64 + 1), "{page}");
    assert_eq!(count("count", 401), None, "no request was refused:\n{page}");
    assert_eq!(count("session", 200), Some(1), "one session throughout");
}

async fn metrics_page(server: &Server) -> String {
    let (status, page) =
        mls_ds_tests::raw::raw_request(&server.metrics_url(), "GET", "/metrics", &[], vec![]).await;
    assert_eq!(status, 200);
    String::from_utf8(page).unwrap()
}
