//! Transports: native TLS (the server started with `--tls-cert/--tls-key`
//! answers over HTTPS with rustls/ring and refuses plain HTTP on that port),
//! and cleartext HTTP/2 with prior knowledge (h2c) next to HTTP/1.1 on the
//! default port.

use std::sync::Arc;

use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mls_ds_tests::Server;
use rustls_pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

#[tokio::test]
async fn https_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let server = Server::start(
        &dir.path().join("ds"),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    let addr = server.url().trim_start_matches("http://").to_owned();

    let mut roots = RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("/healthz")
        .header("host", "localhost")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok\n");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = mls_ds_tests::raw::try_raw_request(&server.url(), "GET", "/healthz").await;
    assert!(plain.is_err() || plain.is_ok_and(|s| s != 200));
}

#[tokio::test]
async fn h2c_with_prior_knowledge_serves_concurrent_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let addr = server.url().trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    // Twenty streams at once on the one connection: health checks and an
    // unauthenticated registration, which must get the same 401 (with an
    // error body) as over HTTP/1.1.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = if i % 2 == 0 {
                hyper::Request::builder()
                    .uri("http://localhost/healthz")
                    .body(Full::new(bytes::Bytes::new()))
                    .unwrap()
            } else {
                hyper::Request::builder()
                    .method("POST")
                    .uri("http://localhost/v1/clients")
                    .header("content-type", mls_ds_protocol::CONTENT_TYPE)
                    .body(Full::new(bytes::Bytes::from_static(b"\x00\x01")))
                    .unwrap()
            };
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (i, status, body)
        }));
    }
    for t in tasks {
        let (i, status, body) = t.await.unwrap();
        if i % 2 == 0 {
            assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));
        } else {
            assert_eq!(status, 401);
            let err: mls_ds_protocol::ErrorBody = mls_ds_protocol::decode(&body).unwrap();
            assert!(err.text().contains("authorization"), "{}", err.text());
        }
    }
    // A known path with the wrong method: 405 naming the allowed ones.
    let mut send = send;
    let req = hyper::Request::builder()
        .method("DELETE")
        .uri("http://localhost/v1/key-packages")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, POST");
}
