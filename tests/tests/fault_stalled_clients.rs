//! Stalled clients: a request head that does not arrive within
//! `--read-timeout-ms` costs the client its connection, a body that does not
//! arrive in time gets 400, and either way the in-flight slot it held is
//! free again, so the server keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mls_ds_protocol::{paths, CONTENT_TYPE};
use mls_ds_tests::Server;

const TIMEOUT_MS: u64 = 1000;

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Everything the server sends until it closes the connection.
fn read_all(mut s: TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .expect("the server closes the connection");
    buf
}

fn health_status(addr: &str) -> String {
    let mut s = connect(addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: ds\r\nConnection: close\r\n\r\n")
        .unwrap();
    let reply = read_all(s);
    String::from_utf8_lossy(&reply)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn stalled_heads_and_bodies_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = TIMEOUT_MS.to_string();
    let server = Server::start(
        dir.path(),
        // One worker thread: the stalled requests must not block it.
        &[
            "--read-timeout-ms",
            &timeout,
            "--max-inflight",
            "1",
            "--workers",
            "1",
        ],
    );
    let url = server.url();
    let addr = url.trim_start_matches("http://");
    assert!(health_status(addr).starts_with("HTTP/1.1 200"));

    // A request head that never ends: the connection is closed.
    let mut head = connect(addr);
    head.write_all(b"GET /healthz HTTP/1.1\r\nHost: ds\r\n")
        .unwrap();
    let t = Instant::now();
    let reply = read_all(head);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(TIMEOUT_MS / 2) && waited < Duration::from_secs(10),
        "head cut off after {waited:?}"
    );
    assert!(
        !String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 2"),
        "no answer to a request that never arrived"
    );

    // A body that stops after 10 of its 100 bytes holds the only in-flight
    // slot until the timeout, then gets 400 and frees it.
    let mut body = connect(addr);
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: ds\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: 100\r\n\r\n0123456789",
        paths::CLIENTS
    );
    body.write_all(request.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(TIMEOUT_MS / 5));
    assert!(
        health_status(addr).starts_with("HTTP/1.1 503"),
        "the stalled body holds the only slot"
    );
    let expected = format!("request body not received within {TIMEOUT_MS} ms");
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    // Until the message is in (the connection may stay open).
    while !String::from_utf8_lossy(&reply).contains(&expected) {
        let n = body
            .read(&mut chunk)
            .expect("an answer to the stalled body");
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains(&expected), "{reply}");
    assert!(
        health_status(addr).starts_with("HTTP/1.1 200"),
        "slot freed"
    );

    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains("panicked"), "server log shows a panic");
}
