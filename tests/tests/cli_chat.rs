//! `mls-chat chat`, driven as a person would: two people each in one
//! terminal (stdin and stdout of one process), typing lines and commands,
//! seeing each other's messages and who did what; a second process on a
//! data directory in use gets told what to do instead.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mls_ds_tests::{binary, Server};

fn chat(dir: &Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary("mls-ds-client", "mls-chat"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--server", url])
        .args(args)
        .output()
        .expect("run mls-chat")
}

fn ok(dir: &Path, url: &str, args: &[&str]) -> String {
    let out = chat(dir, url, args);
    assert!(
        out.status.success(),
        "mls-chat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A person at a terminal running `mls-chat chat`.
struct Terminal {
    child: Child,
    keyboard: ChildStdin,
    screen: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Terminal {
    fn open(dir: &Path, url: &str, group: &str) -> Terminal {
        let mut child = Command::new(binary("mls-ds-client", "mls-chat"))
            .arg("--data-dir")
            .arg(dir)
            .args(["--server", url, "chat", group])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mls-chat chat");
        let keyboard = child.stdin.take().unwrap();
        let (tx, screen) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Terminal {
            child,
            keyboard,
            screen,
            seen: Vec::new(),
        }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.keyboard, "{line}").unwrap();
        self.keyboard.flush().unwrap();
    }

    /// Wait until a line containing `text` shows.
    fn expect(&mut self, text: &str) -> String {
        loop {
            match self.screen.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!("{text:?} never showed; the screen: {:#?}", self.seen),
            }
        }
    }

    fn quit(mut self) {
        self.type_line("/quit");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{:#?}", self.seen);
    }
}

#[test]
fn two_people_chat_each_in_one_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let (alice, bob, carol) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("carol"),
    );
    for (d, n) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        ok(d, &url, &["register", "--name", n]);
    }
    let group = ok(&alice, &url, &["create-group"]).trim().to_owned();
    ok(&alice, &url, &["invite", &group, "bob"]);

    let mut a = Terminal::open(&alice, &url, &group);
    a.expect("chatting in");
    let mut b = Terminal::open(&bob, &url, &group);
    b.expect("chatting in");
    a.type_line("hello bob");
    assert_eq!(b.expect("hello bob"), "alice: hello bob");
    b.type_line("hi alice");
    assert_eq!(a.expect("hi alice"), "bob: hi alice");

    // Commands, and events that say who did what.
    a.type_line("/invite carol");
    a.expect("you added carol");
    b.expect("alice added carol");
    b.type_line("/members");
    b.expect("alice, bob, carol");
    b.type_line("/frobnicate");
    b.expect("unknown command /frobnicate");

    // Bob's data directory is in use: a second process says what to do.
    let out = chat(&bob, &url, &["send", &group, "from elsewhere"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("one process per data directory") && err.contains("mls-chat chat"),
        "{err}"
    );

    a.quit();
    b.quit();
    // Carol, joining later, sees who added her.
    let got = ok(&carol, &url, &["recv"]);
    assert!(got.contains("joined (added by alice)"), "{got}");
}
