//! Hostile load at the default limits: each attack comes from its own
//! loopback addresses (127.0.0.2, 127.0.0.3, ...), while an honest pair of
//! clients on 127.0.0.1 keeps sending and fetching within its normal
//! latency, `/healthz` stays 200, and the server's memory stays within its
//! bound (docs/RELIABILITY.md, "Threat model and limits").
//!
//! - slow readers: a registered client asks for a large queue page on 100
//!   HTTP/1 connections and on an h2c connection whose flow-control window
//!   stays shut, opens its queue streams, and reads nothing;
//! - stalled uploads: 1,000 HTTP/1 connections and 4,400 h2c streams whose
//!   bodies stop after 10 of 100 bytes;
//! - silent connections: 1,500 connections that send nothing (or half an
//!   h2 preface) against a server under an open-file limit of 1,024;
//! - and with short timeouts, that the server closes each kind of
//!   connection that holds a place without using it.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use mls_ds_client::AuthMode;
use mls_ds_protocol::{paths, CONTENT_TYPE};
use mls_ds_tests::raw::{group_of_two, try_raw_request, RawMember};
use mls_ds_tests::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A queue page as large as the default page bound allows.
const PAGE_PATH: &str = "/v1/queue?after=0&limit=1000&wait_ms=0";
/// The honest clients' round trips must each finish within this (their
/// normal latency is milliseconds; this leaves room for a loaded machine).
const HONEST_LATENCY: Duration = Duration::from_secs(3);

fn socket_addr(server: &Server) -> SocketAddr {
    server
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("server address")
}

/// A TCP connection to `to` from the loopback address `source`.
async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse().expect("address"), 0))?;
    socket.connect(to).await
}

/// Whether the server has closed `stream` (end of stream or reset) within
/// `within`; what it sent before is skipped.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Whether `stream` is still open: no end of stream or reset is waiting
/// (what the server sent stays unread).
async fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(20), stream.peek(&mut byte)).await {
        Err(_) => true,
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
    }
}

/// The connections of `conns` that are still open.
async fn open_ones(conns: Vec<TcpStream>) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for conn in conns {
        if still_open(&conn).await {
            open.push(conn);
        }
    }
    open
}

/// The honest pair on 127.0.0.1.
struct Honest {
    sender: RawMember,
    receiver: RawMember,
    sent: usize,
    slowest: Duration,
}

impl Honest {
    async fn new(url: &str, tag: &str) -> Honest {
        let (sender, receiver) =
            group_of_two(url, &format!("{tag}-honest-a"), &format!("{tag}-honest-b")).await;
        Honest {
            sender,
            receiver,
            sent: 0,
            slowest: Duration::ZERO,
        }
    }

    /// One message sent and received, and `/healthz`, each in time.
    async fn round_trip(&mut self, url: &str) {
        let start = Instant::now();
        self.sent += 1;
        let text = format!("honest {}", self.sent);
        let msg = self.sender.encrypt(text.as_bytes());
        let gid = self.sender.gid();
        let sent = tokio::time::timeout(HONEST_LATENCY, self.sender.api.send_message(&gid, msg));
        sent.await
            .expect("the honest send is answered in time")
            .expect("the honest send is accepted");
        let received = tokio::time::timeout(HONEST_LATENCY, self.receiver.sync())
            .await
            .expect("the honest fetch is answered in time");
        assert_eq!(
            received,
            vec![text.into_bytes()],
            "the honest message arrives"
        );
        let health = tokio::time::timeout(HONEST_LATENCY, try_raw_request(url, "GET", "/healthz"));
        assert_eq!(health.await.expect("healthz in time"), Ok(200));
        self.slowest = self.slowest.max(start.elapsed());
    }

    /// Round trips for `during`.
    async fn keep_going(&mut self, url: &str, during: Duration) {
        let until = Instant::now() + during;
        while Instant::now() < until {
            self.round_trip(url).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `bob`'s queue filled with `n` application messages of `size` bytes.
async fn fill_queue(alice: &mut RawMember, n: usize, size: usize) {
    let gid = alice.gid();
    for i in 0..n {
        let text = vec![b'a' + (i % 26) as u8; size];
        let msg = alice.encrypt(&text);
        alice.api.send_message(&gid, msg).await.unwrap();
    }
}

/// An `Authorization` value signed by `who` for `GET path`.
async fn signed_get(who: &RawMember, path: &str) -> String {
    let auth = who
        .api
        .transport
        .authorization("GET", path, b"", AuthMode::Signature);
    auth.await.unwrap().expect("a signature token")
}

/// A request head for `bob`'s first queue page, signed.
async fn page_request(bob: &RawMember) -> Vec<u8> {
    let auth = signed_get(bob, PAGE_PATH).await;
    format!("GET {PAGE_PATH} HTTP/1.1\r\nhost: ds\r\nauthorization: {auth}\r\n\r\n").into_bytes()
}

/// An h2c client on one connection from `source` whose stream windows stay
/// shut: the server may send heads, never body bytes.
fn shut_window_h2c(source: &str) -> HyperClient<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(source.parse::<IpAddr>().unwrap()));
    HyperClient::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(0)
        .pool_max_idle_per_host(1)
        .build(connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_hold_bounded_memory_and_starve_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_at_defaults(dir.path(), &[]);
    let url = server.url();
    let to = socket_addr(&server);
    let mut honest = Honest::new(&url, "slow").await;
    let (mut alice, bob) = group_of_two(&url, "slow-alice", "slow-bob").await;
    // 8 messages of 200 KB: a first page of about 1 MiB (the default bound).
    fill_queue(&mut alice, 8, 200_000).await;
    honest.round_trip(&url).await;
    let before = server.rss_kib().unwrap();

    // 100 HTTP/1 connections from one address ask for the page and read
    // nothing; the address may hold 64 of them.
    let mut held = Vec::new();
    for _ in 0..100 {
        let request = page_request(&bob).await;
        let Ok(mut conn) = connect_from("127.0.0.2", to).await else {
            continue;
        };
        if conn.write_all(&request).await.is_ok() {
            held.push(conn);
        }
    }
    // Queue streams (as many as a client may open) from a third address,
    // never read: their events wait for the client's budget.
    for _ in 0..4 {
        let path = format!("{}?after=0", paths::QUEUE_STREAM);
        let auth = signed_get(&bob, &path).await;
        let mut conn = connect_from("127.0.0.4", to).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nhost: ds\r\nauthorization: {auth}\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        held.push(conn);
    }
    // One h2c connection from another address: 64 streams ask for the
    // page with their windows shut.
    let h2 = shut_window_h2c("127.0.0.3");
    let mut streams = Vec::new();
    let mut h2_statuses = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..64 {
        let auth = signed_get(&bob, PAGE_PATH).await;
        let req = hyper::Request::get(format!("{url}{PAGE_PATH}"))
            .header("authorization", auth)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let h2 = h2.clone();
        streams.push(tokio::spawn(async move { h2.request(req).await }));
    }
    // Past the server's limit of concurrent streams, a request is either
    // refused (sent before the client saw the limit) or waits in the
    // client for a stream that the unread ones never free: both are the
    // limit at work, so a request still waiting at the deadline is counted,
    // not a failure.
    let mut h2_responses = Vec::new();
    let mut h2_waiting = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for s in streams {
        match tokio::time::timeout_at(deadline, s).await {
            Ok(Ok(Ok(resp))) => {
                *h2_statuses.entry(resp.status().as_u16()).or_default() += 1;
                h2_responses.push(resp);
            }
            Ok(Ok(Err(_))) => *h2_statuses.entry(0).or_default() += 1,
            Ok(Err(e)) => panic!("an h2c request task failed: {e}"),
            Err(_) => h2_waiting += 1,
        }
    }

    honest.keep_going(&url, Duration::from_secs(4)).await;
    let peak = server.peak_rss_kib().unwrap();
    let grew_mib = peak.saturating_sub(before) as f64 / 1024.0;
    let attempted = held.len();
    let held = open_ones(held).await;
    println!(
        "slow readers: {} of {attempted} HTTP/1 connections held, h2c statuses {:?} \
         (0: refused), {h2_waiting} waiting for a stream; \
         RSS {:.1} MiB before, peak {:.1} MiB (+{:.1} MiB); honest round trips {}, slowest {:?}",
        held.len(),
        h2_statuses,
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        grew_mib,
        honest.sent,
        honest.slowest
    );
    // Without the budgets, each of these connections held its own copy of
    // the page (about 1 MiB each, 130 MiB here). With them, the client's
    // unread responses hold at most its 8 MiB share, and each connection
    // at most its buffers.
    assert!(
        grew_mib < 48.0,
        "memory grew by {grew_mib:.1} MiB for one client's unread pages"
    );
    assert!(
        held.len() <= 64 + 4,
        "one address holds at most 64 connections"
    );
    assert!(
        h2_statuses.get(&200).copied().unwrap_or(0) < 64,
        "the client's budget stops unread pages: {h2_statuses:?}"
    );
    drop(h2_responses);
    drop(held);
}

/// A request body that sends its first 10 bytes and then nothing.
struct StalledBody(Option<Bytes>);

impl Body for StalledBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
            None => Poll::Pending,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_from_one_address_starve_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_at_defaults(dir.path(), &[]);
    let url = server.url();
    let to = socket_addr(&server);
    let mut honest = Honest::new(&url, "upload").await;
    let before = server.rss_kib().unwrap();

    // HTTP/1: 1,000 connections from one address, each a registration
    // whose body stops after 10 of 100 bytes.
    let mut held = Vec::new();
    for _ in 0..1000 {
        let Ok(mut conn) = connect_from("127.0.0.2", to).await else {
            continue;
        };
        let head = format!(
            "POST {} HTTP/1.1\r\nhost: ds\r\ncontent-type: {CONTENT_TYPE}\r\ncontent-length: 100\r\n\r\n",
            paths::CLIENTS
        );
        if conn.write_all(head.as_bytes()).await.is_ok() && conn.write_all(&[0u8; 10]).await.is_ok()
        {
            held.push(conn);
        }
    }
    // h2c: 22 connections from another address, 200 such streams each:
    // more than `--max-inflight` (4,096) in all.
    let mut stalled = Vec::new();
    for _ in 0..22 {
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some("127.0.0.3".parse().unwrap()));
        let h2: HyperClient<HttpConnector, StalledBody> =
            HyperClient::builder(TokioExecutor::new())
                .http2_only(true)
                .pool_max_idle_per_host(1)
                .build(connector);
        for _ in 0..200 {
            let req = hyper::Request::post(format!("{url}{}", paths::CLIENTS))
                .header("content-type", CONTENT_TYPE)
                .header("content-length", "100")
                .body(StalledBody(Some(Bytes::from_static(&[0u8; 10]))))
                .unwrap();
            let h2 = h2.clone();
            stalled.push(tokio::spawn(async move { h2.request(req).await }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    honest.keep_going(&url, Duration::from_secs(5)).await;
    let peak = server.peak_rss_kib().unwrap();
    let attempted = held.len();
    let held = open_ones(held).await;
    println!(
        "stalled uploads: {} of {attempted} HTTP/1 connections held, {} h2c streams; RSS {:.1} \
         MiB before, peak {:.1} MiB; honest round trips {}, slowest {:?}",
        held.len(),
        stalled.len(),
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        honest.sent,
        honest.slowest
    );
    assert!(held.len() <= 64, "one address holds at most 64 connections");
    let grew_mib = peak.saturating_sub(before) as f64 / 1024.0;
    assert!(grew_mib < 48.0, "memory grew by {grew_mib:.1} MiB");
    for s in stalled {
        s.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cannot_exhaust_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    // The common default limit; the server keeps 256 descriptors for itself
    // and fits its connection limit under the rest.
    let server = Server::start_at_defaults_with_open_files(dir.path(), &[], Some(1024));
    let url = server.url();
    let to = socket_addr(&server);
    let mut honest = Honest::new(&url, "silent").await;

    // 1,500 connections from three addresses: silent, or stopped inside
    // the h2 preface.
    let mut held = Vec::new();
    let mut attempts = 0;
    for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        for i in 0..500 {
            attempts += 1;
            let Ok(mut conn) = connect_from(source, to).await else {
                continue;
            };
            if i % 2 == 1 {
                let _ = conn.write_all(b"PRI * HTTP/2.0\r\n").await;
            }
            held.push(conn);
        }
    }
    honest.keep_going(&url, Duration::from_secs(3)).await;
    // The ones past each address's 64 were closed at once.
    let mut open = open_ones(held).await;
    println!(
        "silent connections: {attempts} attempted, {} still open after 3 s; honest round trips \
         {}, slowest {:?}",
        open.len(),
        honest.sent,
        honest.slowest
    );
    assert!(open.len() <= 3 * 64, "{} open", open.len());
    // The rest are closed once the time for a first request (10 s) is up.
    let start = Instant::now();
    for conn in &mut open {
        assert!(
            closed_within(conn, Duration::from_secs(15)).await,
            "a silent connection is closed after the first-request timeout"
        );
    }
    println!("silent connections closed {:?} later", start.elapsed());
    honest.round_trip(&url).await;
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(
        log.contains("--max-connections lowered to fit the open-file limit"),
        "the server fitted its connection limit under 1,024 open files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_hold_a_place_without_using_it_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_at_defaults(
        dir.path(),
        &[
            "--first-request-timeout-ms",
            "1000",
            "--idle-timeout-secs",
            "1",
            "--write-timeout-ms",
            "1500",
        ],
    );
    let url = server.url();
    let to = socket_addr(&server);
    let limit = Duration::from_secs(8);

    // A request head trickled a byte at a time never becomes a request.
    let mut trickle = connect_from("127.0.0.2", to).await.unwrap();
    let start = Instant::now();
    let mut cut = false;
    for b in b"GET /healthz HTTP/1.1\r\nhost: ds\r\nx-slow: aaaaaaaaaaaaaaaaaaaa" {
        if trickle.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        cut || closed_within(&mut trickle, limit).await,
        "a trickled head is cut"
    );
    assert!(start.elapsed() < limit);

    // An HTTP/1 connection that has been answered and then sits idle.
    let mut idle = connect_from("127.0.0.2", to).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: ds\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut idle, limit).await,
        "an idle HTTP/1 connection is closed"
    );

    // An h2c connection, one request answered, then idle: GOAWAY, closed.
    let mut h2 = connect_from("127.0.0.2", to).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
                                                           // HEADERS on stream 1, END_STREAM | END_HEADERS: GET http://x/healthz
                                                           // (static-table method, scheme; literal path and authority).
    let mut block = vec![0x82, 0x86, 0x04, 8];
    block.extend_from_slice(b"/healthz");
    block.extend_from_slice(&[0x01, 1, b'x']);
    hello.extend_from_slice(&[0, 0, block.len() as u8, 1, 0x05, 0, 0, 0, 1]);
    hello.extend_from_slice(&block);
    h2.write_all(&hello).await.unwrap();
    assert!(
        closed_within(&mut h2, limit).await,
        "an idle h2c connection is closed"
    );

    // A registered client asks for pages on one connection and reads
    // nothing: the connection goes once a write has been stuck 1.5 s.
    let (mut alice, bob) = group_of_two(&url, "idle-alice", "idle-bob").await;
    fill_queue(&mut alice, 8, 200_000).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut reader = socket.connect(to).await.unwrap();
    let mut pipelined = Vec::new();
    for _ in 0..12 {
        pipelined.extend_from_slice(&page_request(&bob).await);
    }
    reader.write_all(&pipelined).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = try_metrics(&server).await;
    assert!(
        !metrics.contains("mls_ds_response_body_bytes 0\n"),
        "an unread page is held: {metrics}"
    );
    tokio::time::sleep(limit).await;
    let metrics = try_metrics(&server).await;
    for gauge in ["mls_ds_connections 0\n", "mls_ds_response_body_bytes 0\n"] {
        assert!(
            metrics.contains(gauge),
            "the stalled connection is gone and its pages freed: {metrics}"
        );
    }
    assert!(
        closed_within(&mut reader, limit).await,
        "the reader sees its connection end"
    );
}

async fn try_metrics(server: &Server) -> String {
    let url = format!("{}/metrics", server.metrics_url());
    let (_, body) = mls_ds_tests::raw::raw_request(&url, "GET", "", &[], Vec::new()).await;
    String::from_utf8(body).unwrap()
}
