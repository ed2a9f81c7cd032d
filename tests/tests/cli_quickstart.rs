//! The README quickstart, run for real: a server, two `mls-chat` data
//! directories, and a message that crosses; then bob loses his data
//! directory and takes his name back with the recovery code `register`
//! printed.

use std::process::Command;

use mls_ds_tests::{binary, Server};

fn chat(dir: &std::path::Path, url: &str, args: &[&str]) -> String {
    let out = Command::new(binary("mls-ds-client", "mls-chat"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--server", url])
        .args(args)
        .output()
        .expect("run mls-chat");
    assert!(
        out.status.success(),
        "mls-chat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn alice_and_bob_chat_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds-data"), &[]);
    let url = server.url();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    chat(&alice, &url, &["register", "--name", "alice"]);
    let registered = chat(&bob, &url, &["register", "--name", "bob"]);
    // The last line is the recovery code.
    assert!(registered.contains("recovery code"), "{registered}");
    let bob_code = registered.lines().last().unwrap_or_default().to_owned();
    let group = chat(&alice, &url, &["create-group"]).trim().to_owned();
    chat(&alice, &url, &["invite", &group, "bob"]);
    chat(&alice, &url, &["send", &group, "hello bob"]);
    let got = chat(&bob, &url, &["recv"]);
    assert!(got.contains("joined"), "{got}");
    assert!(got.contains("alice: hello bob"), "{got}");
    chat(&bob, &url, &["send", &group, "hi alice"]);
    let got = chat(&alice, &url, &["recv"]);
    assert!(got.contains("bob: hi alice"), "{got}");
    let groups = chat(&alice, &url, &["groups"]);
    assert!(
        groups.contains(&group) && groups.contains("alice,bob"),
        "{groups}"
    );
    // Nothing is shown twice.
    let again = chat(&bob, &url, &["recv"]);
    assert!(!again.contains("hello bob"), "{again}");

    // Bob's data directory is lost; the code from `register` takes his name
    // back, with his group.
    let code = bob_code.trim().to_owned();
    std::fs::remove_dir_all(&bob).unwrap();
    let recovered = chat(&bob, &url, &["recover", "--name", "bob", "--code", &code]);
    assert!(recovered.contains("recovered bob"), "{recovered}");
    assert!(
        recovered.contains(&format!("rejoined {group}")),
        "{recovered}"
    );
    chat(&alice, &url, &["send", &group, "welcome back"]);
    let got = chat(&bob, &url, &["recv"]);
    assert!(got.contains("alice: welcome back"), "{got}");
}
