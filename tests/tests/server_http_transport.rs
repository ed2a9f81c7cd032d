//! HTTP transport rules the server must keep whatever serves its connections:
//!
//! - `HEAD` of a route that has `GET` answers like `GET` (status and headers)
//!   without a body, over HTTP/1.1 and over h2c; `HEAD` of a route without
//!   `GET` gets 405 with `Allow` and no body. Over HTTP/2 a body on a `HEAD`
//!   response is a protocol error (RFC 9113 §8.1.1): the stream must end
//!   cleanly, with no DATA and no reset.
//! - A request with both `Content-Length` and `Transfer-Encoding` (a request
//!   smuggling vector behind a proxy, RFC 9112 §6.1), or with two different
//!   `Content-Length` values, gets 400 and the connection is closed after the
//!   answer: a request pipelined behind it is not answered.
//! - A plain chunked request (no `Content-Length`) is not refused by the
//!   transport: it reaches the application, and the connection stays open.
//!
//! HTTP/1.1 is written and read by hand on a `TcpStream` so that what the
//! server puts on the wire (a body after a `HEAD` answer, a closed
//! connection) is seen as it is; h2c goes through hyper's HTTP/2 client with
//! prior knowledge, whose h2 layer resets a `HEAD` stream that carries DATA.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mls_ds_protocol::{paths, CONTENT_TYPE};
use mls_ds_tests::Server;

/// Which of the server's listeners serves a route.
#[derive(Clone, Copy, Debug)]
enum On {
    Api,
    Metrics,
}

/// Routes that have `GET`, where they are served, and whether their `GET`
/// body is the same on every request (the metrics page changes between two
/// requests).
const GET_ROUTES: [(On, &str, bool); 3] = [
    (On::Api, "/healthz", true),
    (On::Metrics, "/metrics", false),
    (On::Api, paths::QUEUE, true),
];

fn start() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    (dir, server)
}

fn addr(server: &Server) -> String {
    addr_of(server, On::Api)
}

fn addr_of(server: &Server, on: On) -> String {
    let url = match on {
        On::Api => server.url(),
        On::Metrics => server.metrics_url(),
    };
    url.trim_start_matches("http://").to_owned()
}

// ---------------------------------------------------------------------------
// HTTP/1.1 by hand
// ---------------------------------------------------------------------------

/// One HTTP/1.1 response as read off the wire.
#[derive(Debug)]
struct Http1Response {
    status: u16,
    /// Names lower-cased, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Http1Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Write `requests` on one connection in a single write (pipelined), then
/// read everything the server sends until it closes the connection. The
/// read timeout only keeps a broken server from hanging the test.
fn exchange(addr: &str, requests: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(requests).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // The server closed while the rest of what we wrote was unread:
            // everything it sent before is already in `buf`.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "reading until the server closes: {e}; read so far: {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    buf
}

/// Parse consecutive responses from `wire`. `no_body[i]` says that the i-th
/// response answers a `HEAD` (it has no body whatever its headers say);
/// responses past the end of `no_body` have a body framed by
/// `Content-Length`. Panics on bytes that are not a response.
fn parse_responses(mut wire: &[u8], no_body: &[bool]) -> Vec<Http1Response> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let end = wire
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| {
                panic!(
                    "incomplete response head: {:?}",
                    String::from_utf8_lossy(wire)
                )
            });
        let head = std::str::from_utf8(&wire[..end]).expect("ASCII head");
        wire = &wire[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "not a status line: {status_line:?} (bytes after a previous response?)"
        );
        let status: u16 = status_line[9..12].parse().expect("status code");
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line");
                (n.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let mut resp = Http1Response {
            status,
            headers,
            body: Vec::new(),
        };
        let bodiless = no_body.get(out.len()).copied().unwrap_or(false);
        if !bodiless {
            assert!(
                resp.header("transfer-encoding").is_none(),
                "the server answers with Content-Length: {resp:?}"
            );
            let len: usize = resp
                .header("content-length")
                .map_or(0, |v| v.parse().expect("content-length"));
            assert!(wire.len() >= len, "truncated body in {resp:?}");
            resp.body = wire[..len].to_vec();
            wire = &wire[len..];
        }
        out.push(resp);
    }
    out
}

fn request(method: &str, path: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: ds\r\n{extra}\r\n")
}

/// `HEAD` then `GET` of `path` pipelined on one connection (the `GET` last,
/// with `Connection: close`): a body sent after the `HEAD` answer would be
/// read as the start of the next response and fail to parse.
fn head_then_get_http1(addr: &str, path: &str) -> (Http1Response, Http1Response) {
    let wire = exchange(
        addr,
        format!(
            "{}{}",
            request("HEAD", path, ""),
            request("GET", path, "Connection: close\r\n")
        )
        .as_bytes(),
    );
    let mut responses = parse_responses(&wire, &[true]);
    assert_eq!(
        responses.len(),
        2,
        "HEAD and GET of {path} each get one answer: {responses:?}"
    );
    let get = responses.pop().unwrap();
    let head = responses.pop().unwrap();
    (head, get)
}

#[test]
fn head_over_http1_answers_like_get_without_a_body() {
    let (_dir, server) = start();
    for (on, path, same_body) in GET_ROUTES {
        let (head, get) = head_then_get_http1(&addr_of(&server, on), path);
        assert_eq!(
            head.status, get.status,
            "HEAD {path} has GET's status; HEAD: {head:?}, GET: {get:?}"
        );
        assert_eq!(
            head.header("content-type"),
            get.header("content-type"),
            "HEAD {path} has GET's content type"
        );
        assert_eq!(head.header("allow"), None, "HEAD {path} is allowed");
        if same_body {
            if let Some(len) = head.header("content-length") {
                assert_eq!(
                    len,
                    get.body.len().to_string(),
                    "a Content-Length on HEAD {path} is the length GET sends"
                );
            }
        }
    }
}

#[test]
fn head_of_a_route_without_get_over_http1_is_405_with_allow_and_no_body() {
    let (_dir, server) = start();
    let addr = addr(&server);
    // The GET behind it answers from the first byte after the HEAD head.
    let wire = exchange(
        &addr,
        format!(
            "{}{}",
            request("HEAD", paths::CLIENTS, ""),
            request("GET", "/healthz", "Connection: close\r\n")
        )
        .as_bytes(),
    );
    let responses = parse_responses(&wire, &[true]);
    assert_eq!(responses.len(), 2, "{responses:?}");
    let head = &responses[0];
    assert_eq!(head.status, 405, "{head:?}");
    let allow = head.header("allow").expect("405 names the allowed methods");
    assert_eq!(methods(allow), ["POST"], "Allow: {allow}");
    assert_eq!(
        (responses[1].status, &responses[1].body[..]),
        (200, &b"ok\n"[..])
    );
}

fn methods(allow: &str) -> Vec<String> {
    let mut m: Vec<String> = allow.split(',').map(|s| s.trim().to_owned()).collect();
    m.sort();
    m
}

// ---------------------------------------------------------------------------
// h2c with prior knowledge
// ---------------------------------------------------------------------------

/// What an h2 exchange gave: status, headers, and the body or the error
/// reading it failed with (a stream reset shows here).
#[derive(Debug)]
struct H2Response {
    status: u16,
    headers: hyper::HeaderMap,
    body: Result<Bytes, String>,
}

async fn h2c(
    addr: &str,
) -> (
    SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    let conn = tokio::spawn(async move { conn.await.map_err(|e| format!("{e:?}")) });
    (send, conn)
}

async fn h2_request(send: &mut SendRequest<Empty<Bytes>>, method: &str, path: &str) -> H2Response {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"))
        .body(Empty::new())
        .unwrap();
    send.ready().await.expect("h2 connection usable");
    let resp = send
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} over h2c: no response: {e:?}"));
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("{e:?}"));
    H2Response {
        status,
        headers: parts.headers,
        body,
    }
}

/// The connection is still usable (no GOAWAY) and closes cleanly once the
/// client is done with it.
async fn h2_finish(
    mut send: SendRequest<Empty<Bytes>>,
    conn: tokio::task::JoinHandle<Result<(), String>>,
) {
    let health = h2_request(&mut send, "GET", "/healthz").await;
    assert_eq!(
        (health.status, health.body.as_deref().ok()),
        (200, Some(&b"ok\n"[..])),
        "the h2 connection still serves: {health:?}"
    );
    drop(send);
    conn.await
        .unwrap()
        .expect("the h2 connection ends without a connection error");
}

#[tokio::test]
async fn head_over_h2c_answers_like_get_without_a_body() {
    let (_dir, server) = start();
    let (mut api, api_conn) = h2c(&addr_of(&server, On::Api)).await;
    let (mut metrics, metrics_conn) = h2c(&addr_of(&server, On::Metrics)).await;
    for (on, path, same_body) in GET_ROUTES {
        let send = match on {
            On::Api => &mut api,
            On::Metrics => &mut metrics,
        };
        let get = h2_request(send, "GET", path).await;
        let get_body = get.body.clone().expect("GET body");
        let head = h2_request(send, "HEAD", path).await;
        assert_eq!(
            head.body.as_deref().map(<[u8]>::len),
            Ok(0),
            "HEAD {path} over h2c ends without DATA and without a reset: {head:?}"
        );
        assert_eq!(
            head.status, get.status,
            "HEAD {path} has GET's status; HEAD: {head:?}, GET: {get:?}"
        );
        assert_eq!(
            head.headers.get("content-type"),
            get.headers.get("content-type"),
            "HEAD {path} has GET's content type"
        );
        assert_eq!(head.headers.get("allow"), None, "HEAD {path} is allowed");
        if same_body {
            if let Some(len) = head.headers.get("content-length") {
                assert_eq!(
                    len.to_str().unwrap(),
                    get_body.len().to_string(),
                    "a Content-Length on HEAD {path} is the length GET sends"
                );
            }
        }
    }
    h2_finish(api, api_conn).await;
    let page = h2_request(&mut metrics, "GET", "/metrics").await;
    assert_eq!(
        page.status, 200,
        "the metrics h2 connection still serves: {page:?}"
    );
    drop(metrics);
    metrics_conn
        .await
        .unwrap()
        .expect("the metrics h2 connection ends without a connection error");
}

#[tokio::test]
async fn head_of_a_route_without_get_over_h2c_is_405_with_allow_and_no_body() {
    let (_dir, server) = start();
    let (mut send, conn) = h2c(&addr(&server)).await;
    let head = h2_request(&mut send, "HEAD", paths::CLIENTS).await;
    assert_eq!(
        head.body.as_deref().map(<[u8]>::len),
        Ok(0),
        "HEAD {} over h2c ends without DATA and without a reset: {head:?}",
        paths::CLIENTS
    );
    assert_eq!(head.status, 405, "{head:?}");
    let allow = head
        .headers
        .get("allow")
        .expect("405 names the allowed methods")
        .to_str()
        .unwrap();
    assert_eq!(methods(allow), ["POST"], "Allow: {allow}");
    h2_finish(send, conn).await;
}

// ---------------------------------------------------------------------------
// Message framing (HTTP/1.1)
// ---------------------------------------------------------------------------

/// `POST /v1/clients` with `framing` header lines and a chunked body that
/// carries five bytes, followed on the same connection by `GET /healthz`.
fn post_then_health(framing: &str) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nHost: ds\r\nContent-Type: {CONTENT_TYPE}\r\n{framing}\r\n5\r\nhello\r\n0\r\n\r\n{}",
        paths::CLIENTS,
        request("GET", "/healthz", "Connection: close\r\n"),
    )
    .into_bytes()
}

/// The request is refused with 400 and the connection closed after that
/// answer: the request pipelined behind it gets nothing.
fn assert_refused_and_closed(addr: &str, wire: &[u8], what: &str) {
    let reply = exchange(addr, wire);
    let responses = parse_responses(&reply, &[]);
    assert!(!responses.is_empty(), "{what}: no answer at all");
    assert_eq!(
        responses[0].status,
        400,
        "{what} is refused with 400; got {:?} (body {:?})",
        responses[0],
        String::from_utf8_lossy(&responses[0].body)
    );
    assert_eq!(
        responses.len(),
        1,
        "{what}: the connection is closed after the 400, the pipelined GET is not answered; got {responses:?}"
    );
}

#[test]
fn content_length_with_transfer_encoding_is_refused_and_the_connection_closed() {
    let (_dir, server) = start();
    let addr = addr(&server);
    // Both orders: hyper handles them on different paths.
    assert_refused_and_closed(
        &addr,
        &post_then_health("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
        "Content-Length then Transfer-Encoding: chunked",
    );
    assert_refused_and_closed(
        &addr,
        &post_then_health("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
        "Transfer-Encoding: chunked then Content-Length",
    );
}

#[test]
fn conflicting_content_lengths_are_refused_and_the_connection_closed() {
    let (_dir, server) = start();
    let addr = addr(&server);
    for (framing, what) in [
        (
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "two Content-Length lines 5 and 6",
        ),
        ("Content-Length: 5, 6\r\n", "Content-Length: 5, 6"),
    ] {
        let wire = format!(
            "POST {} HTTP/1.1\r\nHost: ds\r\nContent-Type: {CONTENT_TYPE}\r\n{framing}\r\nhello!{}",
            paths::CLIENTS,
            request("GET", "/healthz", "Connection: close\r\n"),
        );
        assert_refused_and_closed(&addr, wire.as_bytes(), what);
    }
}

#[test]
fn chunked_without_content_length_reaches_the_application() {
    let (_dir, server) = start();
    let reply = exchange(
        &addr(&server),
        &post_then_health("Transfer-Encoding: chunked\r\n"),
    );
    let responses = parse_responses(&reply, &[]);
    assert_eq!(
        responses.len(),
        2,
        "the chunked POST and the GET behind it are both answered: {responses:?}"
    );
    // Today's answer: the body arrived whole and the registration was
    // refused for what it is (no authorization), not for its framing.
    let post = &responses[0];
    assert_eq!(post.status, 401, "{post:?}");
    assert_eq!(post.header("content-type"), Some(CONTENT_TYPE));
    let err: mls_ds_protocol::ErrorBody =
        mls_ds_protocol::decode(&post.body).expect("an application error body");
    assert!(err.text().contains("authorization"), "{}", err.text());
    assert_eq!(
        (responses[1].status, &responses[1].body[..]),
        (200, &b"ok\n"[..]),
        "the connection stays open after a well-framed chunked request"
    );
}
