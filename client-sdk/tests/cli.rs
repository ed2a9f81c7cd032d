//! The `mls-chat` command line: `--help` lists the commands, and commands on
//! a data directory without a client fail with a clear message. (Being an
//! integration test of this package also makes `cargo test` build the binary
//! the quickstart test in `tests/` runs.)

use std::process::Command;

#[test]
fn help_lists_commands_and_an_empty_data_dir_is_reported() {
    let exe = env!("CARGO_BIN_EXE_mls-chat");
    let out = Command::new(exe)
        .arg("--help")
        .output()
        .expect("run mls-chat");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "register",
        "groups",
        "create-group",
        "invite",
        "remove",
        "send",
        "recv",
    ] {
        assert!(help.contains(cmd), "--help mentions {cmd}:\n{help}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(exe)
        .arg("--data-dir")
        .arg(dir.path().join("nobody"))
        .args(["--server", "http://127.0.0.1:9", "groups"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("register one first"), "{err}");
}
