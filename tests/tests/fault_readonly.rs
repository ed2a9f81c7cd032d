//! Read-only data directory: the file system under a running server turns
//! read-only mid-run. Reads keep working until the first write; that write
//! gets 500 naming the cause (EROFS), the log says so, and from then on the
//! server refuses every API request with 503 and reports unhealthy (sled
//! 0.34 stays broken after an I/O error, and its memory holds the failed
//! request's writes, so even a read could show something never
//! acknowledged), while its metrics listener still serves `/metrics`. The
//! server checks every 500 ms whether the directory takes
//! writes again (it would then reopen its storage by itself, as the
//! full-disk test shows), but ext4's emergency read-only state only ends with
//! an unmount, so here the server is stopped. Nothing unwritten is
//! acknowledged: after the file system is writable again and the server
//! restarted, exactly the acknowledged messages are delivered, once, and
//! then the sends refused while read-only, which the SDK kept in its send
//! outbox, once each; a commit refused while read-only is resent by the SDK
//! and accepted once; everyone converges; `check` passes.
//!
//! Why ext4 on a loop device and not a tmpfs with `mount -o remount,ro`:
//! Linux refuses a read-only remount (EBUSY, "mount point is busy") while any
//! file on it is open for writing, and the server holds sled's files open, so
//! nobody can remount a live server's file system read-only. What does turn
//! it read-only under a running process is the kernel after an error:
//! ext4 with `errors=remount-ro`, here made to fail through its
//! `trigger_fs_error` knob. Writes, fsyncs and file creation then fail with
//! EROFS, reads work. Making it writable again takes an unmount (a `remount,rw`
//! does not clear ext4's emergency read-only state), so the server is stopped
//! first. Needs root, loop devices and `mkfs.ext4` (CI has them).

use std::path::{Path, PathBuf};
use std::process::Command;

use mls_ds_client::{Client, ClientConfig, ClientError, Event};
use mls_ds_protocol::{decode, ErrorBody};
use mls_ds_tests::crashing::open_client;
use mls_ds_tests::raw::raw_request;
use mls_ds_tests::{join_all, Server};

/// An ext4 file system in an image file, loop-mounted with `errors=remount-ro`.
struct LoopExt4 {
    image: PathBuf,
    mnt: PathBuf,
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

impl LoopExt4 {
    fn create(image: &Path, mnt: &Path, bytes: u64) -> LoopExt4 {
        std::fs::File::create(image)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let out = run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        assert!(out.status.success(), "mkfs.ext4: {out:?}");
        std::fs::create_dir_all(mnt).unwrap();
        let fs = LoopExt4 {
            image: image.to_owned(),
            mnt: mnt.to_owned(),
        };
        fs.mount();
        fs
    }

    fn mount(&self) {
        let out = run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                self.image.to_str().unwrap(),
                self.mnt.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "mounting an ext4 image needs root and loop devices: {out:?}"
        );
    }

    /// The loop device's name (`loopN`), as ext4 names it in /sys/fs/ext4.
    fn device(&self) -> String {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let mnt = self.mnt.to_str().unwrap();
        mounts
            .lines()
            .find_map(|l| {
                let mut fields = l.split(' ');
                let dev = fields.next()?;
                (fields.next()? == mnt).then(|| dev.trim_start_matches("/dev/").to_owned())
            })
            .expect("the image is mounted")
    }

    /// Make ext4 report an error: with `errors=remount-ro` it turns read-only.
    fn fail(&self) {
        std::fs::write(
            format!("/sys/fs/ext4/{}/trigger_fs_error", self.device()),
            "mls-ds read-only test\n",
        )
        .unwrap();
    }

    /// Unmount, repair (the error left the file system marked as needing a
    /// check) and mount again, writable.
    fn remount_writable(&self) {
        let out = run("umount", &[self.mnt.to_str().unwrap()]);
        assert!(out.status.success(), "umount: {out:?}");
        let out = run("e2fsck", &["-fy", self.image.to_str().unwrap()]);
        // 0: clean, 1: errors corrected (the free counts ext4 had not written).
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "e2fsck: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        self.mount();
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

const EROFS: &str = "Read-only file system";

/// Status and reason of a request the server refused.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Server { status, body, .. }) => (status, body.text()),
        other => panic!("expected a refusal from the server, got {other:?}"),
    }
}

fn messages(events: Vec<Event>) -> Vec<String> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Message { data, .. } => Some(String::from_utf8(data).unwrap()),
            Event::Skipped { reason, .. } => panic!("skipped an entry: {reason}"),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_file_system_is_refused_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopExt4::create(
        &dir.path().join("ext4.img"),
        &dir.path().join("mnt"),
        32 << 20,
    );
    let data = fs.mnt.join("ds");
    // The log stays writable, off the file system that breaks.
    let mut server = Server::start_logging_to(&data, &dir.path().join("server.log"), &[]);
    let url = server.url();
    let open =
        |url: &str, n: &str| open_client(&dir.path().join(n), url, n, ClientConfig::default());
    let names = ["alice", "bob", "carol"];
    let clients: Vec<Client> = names.iter().map(|n| open(&url, n)).collect();
    let [alice, bob, carol] = &clients[..] else {
        unreachable!()
    };
    for c in &clients {
        c.register().await.unwrap();
    }
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob", "carol"]).await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let t = format!("alice before {i}");
        alice.send(&gid, t.as_bytes()).await.unwrap();
        acknowledged.push(t);
    }
    bob.send(&gid, b"bob before").await.unwrap();
    acknowledged.push("bob before".into());
    // Alice has nothing left to fetch or acknowledge, so her next commit's
    // first write is the commit itself.
    alice.sync().await.unwrap();
    let epoch = alice.epoch(&gid).await.unwrap();

    fs.fail();
    let probe = std::fs::write(fs.mnt.join("probe"), b"x").unwrap_err();
    assert_eq!(probe.raw_os_error(), Some(30), "EROFS: {probe}");

    // Until something is written, the server does not know: it answers
    // reads from what it has, and says it is healthy.
    let (status, _) = raw_request(&url, "GET", "/healthz", &[], vec![]).await;
    assert_eq!(status, 200, "healthy until a write fails");
    assert_eq!(bob.api().group_info(&gid).await.unwrap().epoch, epoch);
    let page = carol
        .api()
        .fetch(carol.cursor().unwrap(), 100, 0)
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 6, "carol's queue is readable");

    // The first write fails at its flush: 500 with the reason, and the SDK
    // keeps the commit in its outbox.
    let (status, reason) = refusal(alice.self_update(&gid).await);
    assert_eq!(status, 500, "{reason}");
    assert!(reason.contains(EROFS), "{reason}");

    // From then on: unhealthy, saying why, and every API request refused
    // with 503 (reads included); /metrics (on its own listener) still served.
    let (status, body) = raw_request(&url, "GET", "/healthz", &[], vec![]).await;
    assert_eq!(status, 503, "reports unhealthy");
    let unhealthy = decode::<ErrorBody>(&body).unwrap().text();
    assert!(
        unhealthy.contains(EROFS)
            && unhealthy.contains("until the data directory is writable again"),
        "{unhealthy}"
    );
    let sends = join_all([
        bob.send(&gid, b"bob during 0"),
        carol.send(&gid, b"carol during 0"),
        bob.send(&gid, b"bob during 1"),
        carol.send(&gid, b"carol during 1"),
    ])
    .await;
    let mut refused = vec![("self-update".to_string(), 500)];
    for (i, r) in sends.into_iter().enumerate() {
        refused.push((format!("send {i}"), refusal(r).0));
    }
    let probes = [
        ("ack", refusal(bob.api().ack(1).await)),
        ("fetch", refusal(bob.api().fetch(0, 10, 0).await)),
        ("group info", refusal(carol.api().group_info(&gid).await)),
        (
            "key package count",
            refusal(bob.api().key_package_count().await),
        ),
        (
            "claim",
            refusal(bob.api().claim_key_package(carol.id()).await),
        ),
        ("publish", refusal(carol.ensure_key_packages().await)),
        ("register", refusal(open(&url, "dave").register().await)),
    ];
    for (what, (status, reason)) in probes {
        assert_eq!(status, 503, "{what}: {reason}");
        assert_eq!(reason, unhealthy, "{what}");
        refused.push((what.to_string(), status));
    }
    assert!(
        refused[1..5].iter().all(|(_, s)| *s == 503),
        "sends after the failed flush: {refused:?}"
    );
    let (status, metrics) =
        raw_request(&server.metrics_url(), "GET", "/metrics", &[], vec![]).await;
    assert_eq!(status, 200, "metrics still served");
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "mls_ds_fsync_failures_total 1"),
        "exactly one flush failed (then nothing else was attempted):\n{metrics}"
    );

    // The log names the cause at the failed flush.
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("flush failed; requests answered 500"))
        .unwrap_or_else(|| panic!("no flush failure in the log:\n{log}"));
    assert!(line.contains("ERROR") && line.contains(EROFS), "{line}");
    println!("read-only test: the server logged: {line}");
    // A graceful stop cannot flush either: it exits non-zero, saying why.
    assert!(!server.stop(), "a stop that could not flush exits non-zero");
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with("mls-ds: storage failure") && l.contains(EROFS)),
        "the exit reason is logged:\n{log}"
    );

    // Writable again, restarted: exactly what was acknowledged is there.
    fs.remount_writable();
    server.restart();
    let url = server.url();
    drop(clients);
    let clients: Vec<Client> = names.iter().map(|n| open(&url, n)).collect();
    let [alice, bob, carol] = &clients[..] else {
        unreachable!()
    };
    let (status, _) = raw_request(&url, "GET", "/healthz", &[], vec![]).await;
    assert_eq!(status, 200, "healthy after the restart");
    // Alice's refused commit is still in her outbox: the DS accepts it now.
    alice.sync().await.unwrap();
    assert_eq!(alice.epoch(&gid).await.unwrap(), epoch + 1);
    // Bob's, then carol's, refused sends leave their outboxes now.
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let bob_got = messages(bob.receive(0).await.unwrap());
    let carol_got = messages(carol.receive(0).await.unwrap());
    let alice_got = messages(alice.receive(0).await.unwrap());
    let resent = [
        "bob during 0",
        "bob during 1",
        "carol during 0",
        "carol during 1",
    ];
    let others = |who: &str| -> Vec<String> {
        acknowledged
            .iter()
            .map(String::as_str)
            .chain(resent)
            .filter(|t| !t.starts_with(who))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(bob_got, others("bob"), "bob: exactly the acknowledged");
    assert_eq!(
        carol_got,
        others("carol"),
        "carol: exactly the acknowledged"
    );
    assert_eq!(
        alice_got,
        others("alice"),
        "alice: exactly the acknowledged"
    );
    for c in [bob, carol] {
        assert_eq!(c.epoch(&gid).await.unwrap(), epoch + 1, "{}", c.id());
        assert_eq!(
            c.export_secret(&gid, "t", 32).await.unwrap(),
            alice.export_secret(&gid, "t", 32).await.unwrap(),
            "{}",
            c.id()
        );
    }
    alice.send(&gid, b"after").await.unwrap();
    assert_eq!(messages(bob.receive(0).await.unwrap()), vec!["after"]);
    server.stop_and_check();
    println!(
        "read-only test: {} acknowledged before the switch, all delivered once; refused while read-only: {refused:?}",
        acknowledged.len()
    );
}
