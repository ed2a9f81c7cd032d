//! Server and clients crash in one run. Bob, carol and dave are SDK clients
//! in child processes (`crash-client`), SIGKILLed and restarted at seeded
//! random moments (every fourth incarnation also aborts exactly between the
//! DS accepting one of its commits and the local merge); the server is
//! SIGKILLed and restarted once per cycle, at a random moment; alice, in the
//! test process, sends, self-updates, and removes and re-invites dave. Every
//! client records what it sent and what its application received, exactly
//! once (`crashing::Log`).
//!
//! At the end: every message the DS acknowledged reached every member of its
//! epoch exactly once, and every message alice, bob or carol queued in the
//! SDK's send outbox reached the two others exactly once (killed or not,
//! answered or not), in its sender's order (alice, bob and carol are
//! always members; dave must have it when he was a member at every epoch
//! in which the DS could have accepted it); nobody received a message that
//! was never sent, or decrypted one from an epoch he was not a member of;
//! alice, bob and carol never skipped an entry; all four converge (same
//! epoch, members and exported secret, so no epoch had two commits); the
//! data directory passes `mls-ds check`. Cycles: 40 by default,
//! `MLS_DS_COMBINED_CYCLES` for more; seed `MLS_DS_COMBINED_SEED`.
//!
//! The same with power cuts: the server's data directory and all four
//! stores live on a `powercut-fs` disk; at the end of each cycle every
//! process on it is killed and everything written without a sync is lost
//! (all of it, or a random part in odd cycles) before all restart. Cycles:
//! 10 by default, `MLS_DS_COMBINED_CUTS`; it needs root (to mount) and says
//! so when it cannot run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mls_ds_client::{Client, ClientConfig};
use mls_ds_tests::crashing::{
    is_transport, open_client, retry, ChildSpec, Log, Records, LOCK_WAITS,
};
use mls_ds_tests::powercut::{Cut, PowerCutDisk};
use mls_ds_tests::{env_or, Server};
use rand::{Rng, SeedableRng};

/// The DS's default `--past-epochs`: it accepts an application message up
/// to this many epochs after the one it was encrypted for.
const WINDOW: u64 = 3;
const CHILDREN: [&str; 3] = ["bob", "carol", "dave"];
const EVERYONE: [&str; 4] = ["alice", "bob", "carol", "dave"];
const SIGKILL: i32 = 9;
const SIGABRT: i32 = 6;

/// Write the DS's URL where the children look for it (atomically: they
/// read it at any moment).
fn publish_url(file: &Path, url: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, url).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

struct Running {
    process: std::process::Child,
    kill_at: Option<Instant>,
    killed: bool,
    abort_after_commit: bool,
}

fn spawn(spec: &ChildSpec, log: &Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_crash-client"))
        .args(spec.to_args())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn crash-client")
}

/// Whether dave is a member at `epoch`, from the changes alice made:
/// (first epoch, member from then on).
fn dave_member(roster: &[(u64, bool)], epoch: u64) -> bool {
    roster
        .iter()
        .rev()
        .find(|(from, _)| *from <= epoch)
        .is_some_and(|(_, m)| *m)
}

/// Often enough that sled writes its page-table snapshot many times a run.
const SNAPSHOT_EVERY_OPS: &str = "200";

/// Often enough that most starts take the queue index from a checkpoint
/// written while the server ran, and bring it up to date.
const INDEX_CHECKPOINT_EVERY_OPS: &str = "50";

/// Send receipts frozen into a run: a few sends make one, so that runs
/// are built (on a thread of their own), published and merged all through
/// the run, and kills and cuts land in the middle of them.
const RECEIPTS_RUN_SIZE: &str = "8";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_clients_crash_together() {
    let cycles = env_or("MLS_DS_COMBINED_CYCLES", 40);
    let seed = env_or("MLS_DS_COMBINED_SEED", 5);
    println!("combined crash test: seed {seed}, {cycles} cycles");
    let dir = tempfile::tempdir().unwrap();
    let summary = crash_together(dir.path(), None, cycles, seed).await;
    println!("combined crash test: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_clients_lose_power_together() {
    let cycles = env_or("MLS_DS_COMBINED_CUTS", 10);
    let seed = env_or("MLS_DS_COMBINED_SEED", 5);
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = PowerCutDisk::mount_for(&dir.path().join("disk"), "combined power cut test")
    else {
        return;
    };
    println!("combined power cut test: seed {seed}, {cycles} cuts");
    let summary = crash_together(dir.path(), Some(disk), cycles, seed).await;
    println!("combined power cut test: {summary}");
}

/// The scenario in `dir` (stores and the server's data on `disk` if there
/// is one, cut at the end of every cycle); returns the figures.
async fn crash_together(
    dir: &Path,
    mut disk: Option<PowerCutDisk>,
    cycles: u64,
    seed: u64,
) -> String {
    let root = disk
        .as_ref()
        .map_or_else(|| dir.to_owned(), |d| d.path().to_owned());
    // Logs and the URL file stay off the disk: they must survive a cut.
    // sled snapshots its page table while running every few hundred log
    // writes, and the DS its queue index every few dozen jobs, so that
    // kills and cuts land before, during and after them.
    let mut server = Server::start_logging_to(
        &root.join("ds"),
        &dir.join("server.log"),
        &[
            "--snapshot-every-ops",
            SNAPSHOT_EVERY_OPS,
            "--index-checkpoint-every-ops",
            INDEX_CHECKPOINT_EVERY_OPS,
            "--receipts-run-size",
            RECEIPTS_RUN_SIZE,
        ],
    );
    let url_file = dir.join("url");
    publish_url(&url_file, &server.url());
    let open = |url: &str, n: &str| open_client(&root.join(n), url, n, ClientConfig::default());

    // alice's group of four; the children take over bob, carol and dave.
    let url = server.url();
    let mut alice = open(&url, "alice");
    alice.register().await.unwrap();
    let gid = {
        let others: Vec<Client> = CHILDREN.iter().map(|n| open(&url, n)).collect();
        for c in &others {
            c.register().await.unwrap();
        }
        let gid = alice.create_group(false).await.unwrap();
        alice.invite(&gid, &CHILDREN).await.unwrap();
        for c in &others {
            c.sync().await.unwrap();
        }
        gid
    };
    let mut roster = vec![(alice.epoch(&gid).await.unwrap(), true)];
    let mut alice_log = Log::open(&alice);

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut incarnations = 0u32;
    let mut next_spec = |name: &str, rng: &mut rand::rngs::StdRng| {
        incarnations += 1;
        ChildSpec {
            name: name.to_owned(),
            data_dir: root.join(name),
            url_file: url_file.clone(),
            seed: rng.gen(),
            incarnation: incarnations,
            abort_after_commit: incarnations % 4 == 3,
        }
    };
    let child_log = |name: &str| -> PathBuf { dir.join(format!("{name}.log")) };
    let mut children: Vec<(&str, Running)> = CHILDREN
        .iter()
        .map(|n| {
            let spec = next_spec(n, &mut rng);
            let process = spawn(&spec, &child_log(n));
            (
                *n,
                Running {
                    process,
                    kill_at: None,
                    killed: false,
                    abort_after_commit: spec.abort_after_commit,
                },
            )
        })
        .collect();

    let (mut child_kills, mut child_aborts, mut toggles, mut alice_commits) = (0, 0, 0, 0);
    // Unsynced pages lost and kept by the power cuts.
    let mut cut_pages = (0usize, 0usize);
    let mut alice_sends = 0u64;
    for cycle in 0..cycles {
        // The server dies at a random moment; each child may die before it.
        let server_at = Duration::from_millis(rng.gen_range(40..300));
        let start = Instant::now();
        for (_, c) in &mut children {
            c.kill_at = rng.gen_bool(0.7).then(|| {
                start + Duration::from_millis(rng.gen_range(5..server_at.as_millis() as u64))
            });
        }
        let pid = server.pid().expect("running");
        let killer = std::thread::spawn(move || {
            std::thread::sleep(server_at);
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
        // Alice stops after a failed request until the restart: it may have
        // left a commit of hers unresolved, whose epoch is found out below.
        let mut alice_ok = true;
        // A membership change in every cycle, so that every run has some.
        let mut toggle = true;
        while !killer.is_finished() {
            for (name, c) in &mut children {
                if c.kill_at.is_some_and(|t| Instant::now() >= t) {
                    c.kill_at = None;
                    c.killed = c.process.kill().is_ok();
                }
                if let Ok(Some(status)) = c.process.try_wait() {
                    // Killed by us, or aborted at its commit-accepted hook;
                    // anything else (a panic) is a failure.
                    match status.signal() {
                        Some(SIGKILL) if std::mem::take(&mut c.killed) => child_kills += 1,
                        Some(SIGABRT) if c.abort_after_commit => child_aborts += 1,
                        _ => panic!(
                            "cycle {cycle}: {name} exited with {status}:\n{}",
                            std::fs::read_to_string(child_log(name)).unwrap_or_default()
                        ),
                    }
                    let spec = next_spec(name, &mut rng);
                    c.process = spawn(&spec, &child_log(name));
                    c.abort_after_commit = spec.abort_after_commit;
                }
            }
            if !alice_ok {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            let op = if std::mem::take(&mut toggle) {
                0
            } else {
                rng.gen_range(0..20)
            };
            let result = match op {
                0 => {
                    let member = alice
                        .members(&gid)
                        .await
                        .unwrap()
                        .contains(&"dave".to_string());
                    let r = if member {
                        alice.remove(&gid, "dave").await
                    } else {
                        alice.invite(&gid, &["dave"]).await
                    };
                    r.map(|epoch| {
                        roster.push((epoch, !member));
                        toggles += 1;
                    })
                }
                1 => alice.self_update(&gid).await.map(|_| alice_commits += 1),
                2 | 3 => alice
                    .sync()
                    .await
                    .and_then(|_| alice_log.record_events(&alice).map(|_| ())),
                _ => {
                    alice_sends += 1;
                    let text = format!("alice 0.{alice_sends}");
                    alice_log.send(&alice, &gid, alice_sends, &text).await
                }
            };
            match result {
                Ok(()) => {}
                Err(e) if is_transport(&e) => alice_ok = false,
                Err(e) => panic!("cycle {cycle}: alice's operation {op} failed: {e}"),
            }
        }
        killer.join().unwrap();
        server.kill();
        // Release her store (the log holds it too) before reopening it.
        drop(alice_log);
        drop(alice);
        if let Some(disk) = disk.as_mut() {
            // Every process on the disk is down when the power goes.
            for (name, c) in &mut children {
                let _ = c.process.kill();
                let status = c.process.wait().unwrap();
                match status.signal() {
                    Some(SIGKILL) => child_kills += 1,
                    Some(SIGABRT) if c.abort_after_commit => child_aborts += 1,
                    _ => panic!(
                        "cycle {cycle}: {name} exited with {status}:\n{}",
                        std::fs::read_to_string(child_log(name)).unwrap_or_default()
                    ),
                }
            }
            let cut = if cycle % 2 == 0 {
                Cut::All
            } else {
                Cut::Random(seed ^ cycle)
            };
            let report = disk.cut(cut);
            cut_pages.0 += report.lost_pages;
            cut_pages.1 += report.kept_pages;
        }
        server.restart();
        let url = server.url();
        publish_url(&url_file, &url);
        if disk.is_some() {
            for (name, c) in &mut children {
                let spec = next_spec(name, &mut rng);
                c.process = spawn(&spec, &child_log(name));
                c.abort_after_commit = spec.abort_after_commit;
                c.kill_at = None;
                c.killed = false;
            }
        }
        alice = open(&url, "alice");
        alice_log = Log::open(&alice);
        if !alice_ok {
            // Resolve her pending commit before anything else moves her
            // epoch: if it is accepted now (or was before the crash), the
            // epoch after it is the one it created.
            let before = alice.epoch(&gid).await.unwrap();
            retry(|| alice.resolve_outboxes()).await;
            let after = alice.epoch(&gid).await.unwrap();
            if after != before {
                assert_eq!(after, before + 1, "cycle {cycle}: one commit resolved");
                let member = alice
                    .members(&gid)
                    .await
                    .unwrap()
                    .contains(&"dave".to_string());
                if member != dave_member(&roster, before) {
                    roster.push((after, member));
                    toggles += 1;
                }
            }
        }
        retry(|| alice.sync()).await;
        alice_log.record_events(&alice).unwrap();
    }

    // The children's last crash, then everyone finishes in this process.
    for (_, c) in &mut children {
        if c.process.kill().is_ok() {
            child_kills += 1;
        }
        let _ = c.process.wait();
    }
    let url = server.url();
    let mut epoch = alice.epoch(&gid).await.unwrap();
    if !dave_member(&roster, epoch) {
        epoch = alice.invite(&gid, &["dave"]).await.unwrap();
        roster.push((epoch, true));
    }
    let others: Vec<Client> = CHILDREN.iter().map(|n| open(&url, n)).collect();
    let mut clients: Vec<(&str, &Client)> = vec![("alice", &alice)];
    clients.extend(CHILDREN.iter().copied().zip(others.iter()));
    for _ in 0..3 {
        for (_, c) in &clients {
            retry(|| c.sync()).await;
            Log::open(c).record_events(c).unwrap();
        }
    }
    let epoch = alice.epoch(&gid).await.unwrap();
    let secret = alice.export_secret(&gid, "x", 32).await.unwrap();
    let members = alice.members(&gid).await.unwrap();
    assert_eq!(members, EVERYONE.to_vec(), "everyone is in the group");
    for (name, c) in &clients[1..] {
        assert_eq!(c.epoch(&gid).await.unwrap(), epoch, "{name} epoch");
        assert_eq!(c.members(&gid).await.unwrap(), members, "{name} members");
        let s = c.export_secret(&gid, "x", 32).await.unwrap();
        assert_eq!(s, secret, "{name} secret");
    }

    // What was sent and what arrived.
    let records: BTreeMap<&str, Records> = clients
        .iter()
        .map(|(name, c)| (*name, Log::open(c).read()))
        .collect();
    // Per sender: text -> position in send order, and epoch if acknowledged.
    let order: HashMap<&str, HashMap<&String, usize>> = records
        .iter()
        .map(|(s, r)| {
            (
                *s,
                r.attempted
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t, i))
                    .collect(),
            )
        })
        .collect();
    let acked_epoch: HashMap<&str, HashMap<&String, u64>> = records
        .iter()
        .map(|(s, r)| (*s, r.acked.iter().map(|(t, e)| (t, *e)).collect()))
        .collect();
    let mut dave_skips = 0;
    for (r, rec) in &records {
        let texts: HashSet<&String> = rec.received.iter().map(|(_, t)| t).collect();
        assert_eq!(
            texts.len(),
            rec.received.len(),
            "{r} received a message twice"
        );
        for (s, t) in &rec.received {
            assert!(
                order.get(s.as_str()).is_some_and(|o| o.contains_key(t)),
                "{r} received {t:?} from {s}, which {s} never sent"
            );
            if *r == "dave" {
                if let Some(e) = acked_epoch[s.as_str()].get(t) {
                    assert!(
                        dave_member(&roster, *e),
                        "dave decrypted {t:?} of epoch {e}, when he was not a member"
                    );
                }
            }
        }
        if *r == "dave" {
            dave_skips = rec.skipped.len();
        } else {
            assert!(rec.skipped.is_empty(), "{r} skipped {:?}", rec.skipped);
        }
        // In each sender's order.
        for s in EVERYONE {
            let positions: Vec<usize> = rec
                .received
                .iter()
                .filter(|(from, _)| from == s)
                .map(|(_, t)| order[s][t])
                .collect();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "{r}: messages of {s} out of order"
            );
        }
    }
    let mut checked = 0;
    let mut acknowledged = 0;
    for (s, rec) in &records {
        acknowledged += rec.acked.len();
        for (t, e) in &rec.acked {
            for r in EVERYONE.iter().filter(|r| *r != s) {
                let must = *r != "dave"
                    || (*e..=(*e + WINDOW).min(epoch)).all(|x| dave_member(&roster, x));
                if must {
                    assert!(
                        records[r].received.iter().any(|(_, got)| got == t),
                        "{r} never received {t:?} (acknowledged at epoch {e})"
                    );
                    checked += 1;
                }
            }
        }
    }
    // What alice, bob and carol (never removed) queued reached the two
    // others exactly once, acknowledged or not: the outbox of a killed
    // client delivered it after the restart, under its send id.
    let mut queued_checked = 0;
    for s in ["alice", "bob", "carol"] {
        for t in &records[s].queued {
            for r in ["alice", "bob", "carol"].iter().filter(|r| **r != s) {
                assert!(
                    records[r].received.iter().any(|(_, got)| got == t),
                    "{r} never received {t:?}, which {s} queued"
                );
                queued_checked += 1;
            }
        }
    }
    drop(others);
    server.stop_and_check();
    // Reopens that had to wait for a lock (see `open_client`), here and in
    // the children.
    let mut lock_waits = LOCK_WAITS.load(Ordering::Relaxed);
    for name in CHILDREN {
        let log = std::fs::read_to_string(child_log(name)).unwrap_or_default();
        for line in log.lines().filter(|l| l.starts_with("lock wait:")) {
            println!("{name}: {line}");
            lock_waits += 1;
        }
    }
    let sent: BTreeMap<&str, (usize, usize)> = records
        .iter()
        .map(|(n, r)| (*n, (r.attempted.len(), r.acked.len())))
        .collect();
    assert!(acknowledged > 0, "messages were acknowledged");
    assert!(child_kills > 0, "clients were killed");
    assert!(toggles > 0, "dave's membership changed");
    let mut summary = format!(
        "{cycles} server kills, {child_kills} client kills, {child_aborts} aborts after an accepted commit, {} client processes; {alice_commits} self-updates by alice, {toggles} membership changes of dave; sends (attempted, acknowledged) {sent:?}; {checked} deliveries checked ({queued_checked} of queued messages); dave skipped {dave_skips} entries from before his joins; final epoch {epoch}; {lock_waits} reopens waited for a lock",
        incarnations
    );
    if disk.is_some() {
        summary += &format!(
            "; unsynced pages lost {}, kept {}",
            cut_pages.0, cut_pages.1
        );
    }
    summary
}
