//! The `mls-ds` binary's command line: `--help` explains every flag, and a
//! bad flag is refused. (Being an integration test of this package also makes
//! `cargo test` build the binary the system tests in `tests/` start.)

use std::process::Command;

#[test]
fn help_lists_every_flag_and_bad_flags_are_refused() {
    let exe = env!("CARGO_BIN_EXE_mls-ds");
    let out = Command::new(exe)
        .arg("--help")
        .output()
        .expect("run mls-ds");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--data-dir",
        "--listen",
        "--max-body-bytes",
        "--rate-limit-per-sec",
        "--tls-cert",
        "--retention-secs",
        "--log",
        "check",
        "stats",
        "backup",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}:\n{help}");
    }
    let out = Command::new(exe).arg("--no-such-flag").output().unwrap();
    assert!(!out.status.success());
}
