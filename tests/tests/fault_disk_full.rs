//! Disk trouble: the data directory sits on a small tmpfs that fills up
//! mid-run. The server answers 5xx saying why, acknowledges nothing it could
//! not write, reports unhealthy, and once space returns it reopens its
//! storage by itself: every acknowledged message is delivered, then the
//! sends it refused (kept in the SDK's outbox) once each, in order; service
//! resumes, and the data directory passes `check`.
//! Needs root (to mount the tmpfs), as CI runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use mls_ds_client::ClientConfig;
use mls_ds_tests::crashing::open_client;
use mls_ds_tests::raw::raw_request;
use mls_ds_tests::{message_texts, Server};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_is_refused_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&dir.path().join("mnt"), "24m");
    let data = mnt.0.join("ds");
    // Page-table snapshots, queue index checkpoints and runs of send
    // receipts are due often, so some fail on the full disk too.
    let mut server = Server::start(
        &data,
        &[
            "--snapshot-every-ops",
            "200",
            "--index-checkpoint-every-ops",
            "20",
            "--receipts-run-size",
            "8",
        ],
    );
    let url = server.url();
    let open =
        |url: &str, n: &str| open_client(&dir.path().join(n), url, n, ClientConfig::default());
    let (alice, bob) = (open(&url, "alice"), open(&url, "bob"));
    alice.register().await.unwrap();
    bob.register().await.unwrap();
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob"]).await.unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let t = format!("before {i}");
        alice.send(&gid, t.as_bytes()).await.unwrap();
        acknowledged.push(t);
    }

    // Fill the file system.
    let filler = mnt.0.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);

    // Keep sending: some may still fit in sled's buffers, then failures.
    let mut failures = 0;
    let mut queued = acknowledged.clone();
    for i in 0..200 {
        let t = format!("during {i}");
        queued.push(t.clone());
        match alice.send(&gid, t.as_bytes()).await {
            Ok(_) => acknowledged.push(t),
            Err(e) => {
                let status = e
                    .status()
                    .expect("a server answer, not a dropped connection");
                assert!(status == 500 || status == 503, "{e}");
                failures += 1;
                if failures > 3 {
                    break;
                }
            }
        }
    }
    assert!(failures > 0, "the full disk was noticed");
    // Unhealthy, and it says why (the log file itself is on the full disk).
    let (status, body) = raw_request(&url, "GET", "/healthz", &[], vec![]).await;
    assert_eq!(status, 503, "reports unhealthy");
    let reason = mls_ds_protocol::decode::<mls_ds_protocol::ErrorBody>(&body)
        .unwrap()
        .text();
    assert!(reason.contains("No space left on device"), "{reason}");

    // Space returns: the server notices, reopens its storage by itself (no
    // restart) and serves again; everything acknowledged is there.
    std::fs::remove_file(&filler).unwrap();
    let mut healthy = false;
    for _ in 0..200 {
        if raw_request(&url, "GET", "/healthz", &[], vec![]).await.0 == 200 {
            healthy = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(healthy, "the server came back once space returned");
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(
        log.contains("storage reopened; serving again"),
        "{} bytes of log: {log}",
        log.len()
    );
    let got = message_texts(&bob.receive(0).await.unwrap());
    for t in &acknowledged {
        assert!(got.contains(t), "acknowledged {t:?} lost");
    }
    let unique: std::collections::HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "no duplicates");
    // The next send delivers first what the full disk refused: every
    // message alice queued arrives, each once, in order.
    alice.send(&gid, b"after").await.unwrap();
    queued.push("after".into());
    let after = message_texts(&bob.receive(0).await.unwrap());
    let all: Vec<&String> = got.iter().chain(&after).collect();
    assert_eq!(
        all,
        queued.iter().collect::<Vec<_>>(),
        "every queued message once, in order"
    );
    // A SIGKILL and restart on top still finds everything.
    server.kill();
    server.restart();
    server.stop_and_check();
    println!(
        "disk-full test: {} messages acknowledged, {failures} refused while full, all delivered after the server reopened its storage",
        acknowledged.len()
    );
}
