//! The SDK and `mls-chat` over HTTPS: the DS runs with `--tls-cert/--tls-key`
//! from a CA made at test time; clients that trust that CA chat through it,
//! clients that do not are refused with an error naming the certificate
//! problem, and an unreachable DS is reported as such.

use std::path::{Path, PathBuf};
use std::process::Command;

use mls_ds_client::{Client, ClientConfig, ClientError, Event, TlsConfig};
use mls_ds_tests::{binary, Server};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A CA and a DS certificate for 127.0.0.1 signed by it, as PEM files.
struct TestPki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path) -> TestPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let pki = TestPki {
        ca: dir.join("ca.pem"),
        cert: dir.join("ds-cert.pem"),
        key: dir.join("ds-key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, leaf.pem()).unwrap();
    std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
    pki
}

fn tls_server(dir: &Path, pki: &TestPki) -> (Server, String) {
    let server = Server::start(
        &dir.join("ds"),
        &[
            "--tls-cert",
            pki.cert.to_str().unwrap(),
            "--tls-key",
            pki.key.to_str().unwrap(),
        ],
    );
    let url = server.url().replacen("http://", "https://", 1);
    (server, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_chat_over_https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let (_server, url) = tls_server(dir.path(), &pki);
    let mut config = ClientConfig::default();
    config.tls.add_ca_pem_file(&pki.ca).unwrap();
    let open =
        |name: &str| Client::open(dir.path().join(name), &url, name, config.clone()).unwrap();
    let (alice, bob) = (open("alice"), open("bob"));
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();
    alice.send(&gid, b"over tls").await.unwrap();
    let events = bob.receive(0).await.unwrap();
    assert!(matches!(events[0], Event::Joined { .. }), "{events:?}");
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Message { data, sender, .. } if data == b"over tls" && sender == b"alice")
        ),
        "{events:?}"
    );
    assert_eq!(
        alice.export_secret(&gid, "t", 32).await.unwrap(),
        bob.export_secret(&gid, "t", 32).await.unwrap()
    );

    // A client that trusts only other CAs does not talk to this DS at all.
    let mut other_ca = TlsConfig::default();
    other_ca
        .add_ca_pem(
            rcgen::generate_simple_self_signed(vec!["elsewhere".into()])
                .unwrap()
                .cert
                .pem()
                .as_bytes(),
        )
        .unwrap();
    let stranger = Client::open(
        dir.path().join("mallory"),
        &url,
        "mallory",
        ClientConfig {
            tls: other_ca.only_added_roots(),
            ..ClientConfig::default()
        },
    )
    .unwrap();
    match stranger.register().await {
        Err(e @ ClientError::Unreachable { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("cannot reach the DS at {url}")),
                "{text}"
            );
            assert!(text.contains("certificate"), "{text}");
        }
        other => panic!("registration through an untrusted certificate: {other:?}"),
    }
    // Nor does one with the default roots (the test CA is in none of them).
    let default_roots =
        Client::open(dir.path().join("eve"), &url, "eve", ClientConfig::default()).unwrap();
    let err = default_roots.register().await.unwrap_err();
    assert!(
        err.is_network() && err.to_string().contains("certificate"),
        "{err}"
    );
}

fn chat(dir: &Path, url: &str, ca: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(binary("mls-ds-client", "mls-chat"));
    cmd.arg("--data-dir").arg(dir).args(["--server", url]);
    if let Some(ca) = ca {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.args(args).output().expect("run mls-chat")
}

fn chat_ok(dir: &Path, url: &str, ca: &Path, args: &[&str]) -> String {
    let out = chat(dir, url, Some(ca), args);
    assert!(
        out.status.success(),
        "mls-chat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn mls_chat_over_https_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let (server, url) = tls_server(dir.path(), &pki);
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    chat_ok(&alice, &url, &pki.ca, &["register", "--name", "alice"]);
    chat_ok(&bob, &url, &pki.ca, &["register", "--name", "bob"]);
    let group = chat_ok(&alice, &url, &pki.ca, &["create-group"])
        .trim()
        .to_owned();
    chat_ok(&alice, &url, &pki.ca, &["invite", &group, "bob"]);
    chat_ok(&alice, &url, &pki.ca, &["send", &group, "hello over tls"]);
    let got = chat_ok(&bob, &url, &pki.ca, &["recv"]);
    assert!(got.contains("alice: hello over tls"), "{got}");

    // Without the CA: refused, and the message says where and why.
    let out = chat(&bob, &url, None, &["recv"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach the DS at {url}")),
        "{err}"
    );
    assert!(err.contains("certificate"), "{err}");

    // Plain HTTP to a port where nothing listens any more.
    let plain = server.url();
    drop(server);
    let out = chat(&bob, &plain, None, &["recv"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach the DS at {plain}")) && err.contains("refused"),
        "{err}"
    );

    // A URL that is not one.
    let out = chat(&bob, "ftp://127.0.0.1:1", None, &["recv"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad DS URL"), "{err}");
}
