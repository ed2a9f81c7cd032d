//! Crash under load: three SDK clients chat and commit while the server is
//! SIGKILLed and restarted at seeded random moments. At the end: every
//! message handed to `send` (2xx or not: the SDK's outbox delivers the rest
//! later) reached every other member exactly once and in the sender's
//! order, nobody saw a message that was never sent, all members
//! converge (so no epoch had two commits), and the data directory passes
//! `mls-ds check`. Cycles: 20 by default, `MLS_DS_FAULT_CYCLES` for soak runs.
//! Every fourth cycle lasts 0.6-1.5 s instead of 5-80 ms, and the server
//! snapshots sled's page table every 200 log writes: those kills land after
//! snapshots written while it ran, which the next start recovers from (at
//! least one such kill is asserted, on the sled backend). The server
//! checkpoints its queue index every 50 jobs, so most starts take it from
//! a checkpoint and the messages stored since (at least one such start is
//! asserted, on sled). The group's messages and commits store their
//! fan-out as a reference to its roster (`--roster-min-members 3`), its
//! Welcomes as lists. Every fifth cycle ends with a SIGTERM under load
//! instead, which must exit 0; every second of those stops is cut short by
//! a SIGKILL 0-30 ms after the SIGTERM, while the server finishes requests
//! or writes its last checkpoint. Every third cycle, the next start is
//! SIGKILLed 0-20 ms after its launch, before it serves (while it opens the
//! database, takes the checkpoint and deletes what a crash left; a start
//! that served by then is tried again, killed sooner, up to three times;
//! at least one kill before serving is asserted); then a start that
//! serves.
//!
//! The same scenario with power cuts: the server's data directory and the
//! clients' stores live on a `powercut-fs` disk, and at the end of each
//! cycle the server is SIGKILLed, the clients are dropped, and everything
//! they wrote without syncing is lost (all of it in even cycles, a random
//! part in odd ones) before all restart. Cuts: 20 by default,
//! `MLS_DS_POWER_CUTS` for soak runs; it needs root (to mount) and says so
//! when it cannot run.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mls_ds_client::{Client, ClientConfig, Event};
use mls_ds_tests::crashing::{is_transport, open_client, retry};
use mls_ds_tests::postgres::{self, TestBackend};
use mls_ds_tests::powercut::{Cut, CutReport, PowerCutDisk};
use mls_ds_tests::{env_or, Server};
use rand::{Rng, SeedableRng};

const NAMES: [&str; 3] = ["alice", "bob", "carol"];

/// Often enough that sled writes its page-table snapshot many times a run.
const SNAPSHOT_EVERY_OPS: &str = "200";

/// Often enough that most starts take the queue index from a checkpoint
/// written while the server ran, and bring it up to date.
const INDEX_CHECKPOINT_EVERY_OPS: &str = "50";

/// Send receipts frozen into a run: a few sends make one, so that runs
/// are built (on a thread of their own), published and merged all through
/// the run, and kills and cuts land in the middle of them.
const RECEIPTS_RUN_SIZE: &str = "8";

/// The group's three members share a roster (`--roster-min-members`): its
/// messages and commits store a reference to it instead of their
/// recipients, while Welcomes list theirs, so that a start rebuilds queues
/// that mix both through every kind of kill and cut.
const ROSTER_MIN_MEMBERS: &str = "3";

/// Every this many cycles, one runs long enough for sled's flusher (every
/// 500 ms) to write page-table snapshots before the kill.
const LONG_CYCLE_EVERY: u64 = 4;

/// Every this many cycles, one ends with a graceful stop.
const CLEAN_STOP_EVERY: u64 = 5;

/// Every this many cycles, the next start is SIGKILLed 0-20 ms after its
/// launch, while it opens the database and brings the queue index up to
/// date (if it served by then, again 0-10 and 0-5 ms after a new launch),
/// before the start that serves.
const KILLED_START_EVERY: u64 = 3;

/// The newest page-table snapshot sled has in `dir` (`snap.<lsn>`).
fn newest_snapshot(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("snap.") && !n.ends_with(".generating"))
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sigkilled_under_load() {
    let cycles = env_or("MLS_DS_FAULT_CYCLES", 20);
    let seed = env_or("MLS_DS_FAULT_SEED", 11);
    println!("server crash test: seed {seed}, {cycles} cycles");
    let dir = tempfile::tempdir().unwrap();
    let summary = chat_through_crashes(dir.path(), None, cycles, seed).await;
    println!("server crash test: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_under_load() {
    let cuts = env_or("MLS_DS_POWER_CUTS", 20);
    let seed = env_or("MLS_DS_POWER_SEED", 7);
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = PowerCutDisk::mount_for(&dir.path().join("disk"), "power cut test") else {
        return;
    };
    println!("power cut test: seed {seed}, {cuts} cuts");
    let summary = chat_through_crashes(dir.path(), Some(disk), cuts, seed).await;
    println!("power cut test: {summary}");
}

/// Where the server and the clients keep their data: `dir`, or the power
/// cut disk.
fn data_root(dir: &Path, disk: &Option<PowerCutDisk>) -> PathBuf {
    match disk {
        Some(disk) => disk.path().to_owned(),
        None => dir.to_owned(),
    }
}

/// The scenario: `cycles` of load, each ended by a SIGKILL of the server
/// (every fifth by a SIGTERM) and, with a `disk`, a power cut under the
/// server and the clients.
/// Returns the figures.
async fn chat_through_crashes(
    dir: &Path,
    mut disk: Option<PowerCutDisk>,
    cycles: u64,
    seed: u64,
) -> String {
    if let Ok(f) = std::env::var("MLS_DS_FAULT_TRACE") {
        let file = std::fs::File::create(f).unwrap();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("mls_ds_client=debug")
            .with_writer(std::sync::Mutex::new(file))
            .try_init();
    }
    let root = data_root(dir, &disk);
    // The log stays off the power-cut disk: it must survive a cut whole.
    // sled snapshots its page table while running every few hundred log
    // writes, so that kills and cuts land before, during and after them.
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
            "--roster-min-members",
            ROSTER_MIN_MEMBERS,
        ],
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let open = |url: &str, n: &str| open_client(&root.join(n), url, n, ClientConfig::default());

    let url = server.url();
    let mut clients: Vec<Client> = NAMES.iter().map(|n| open(&url, n)).collect();
    for c in &clients {
        c.register().await.unwrap();
    }
    let gid = clients[0].create_group(false).await.unwrap();
    clients[0].invite(&gid, &["bob", "carol"]).await.unwrap();
    for c in &clients[1..] {
        c.sync().await.unwrap();
    }

    let mut cut_pages = CutReport::default();
    let mut acknowledged: Vec<(usize, String)> = Vec::new();
    let mut attempted: HashSet<String> = HashSet::new();
    let mut queued: Vec<(usize, String)> = Vec::new();
    let mut received: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();
    let mut commits = 0;
    let mut live_snapshots = 0;
    let mut clean_stops = 0;
    let mut stops_cut_short = 0;
    let mut starts_killed = 0;
    for cycle in 0..cycles {
        // Load until a SIGKILL lands at a random moment, mid-request or not.
        let pid = server.pid().expect("running");
        let long = cycle % LONG_CYCLE_EVERY == LONG_CYCLE_EVERY - 1;
        let delay = Duration::from_millis(if long {
            rng.gen_range(600..1500)
        } else {
            rng.gen_range(5..80)
        });
        // Cycle 1, 6, 11...: rarely one of the long cycles (3, 7, 11...),
        // whose kills must land after sled's snapshots.
        let clean = cycle % CLEAN_STOP_EVERY == 1;
        let cut_short = (clean && cycle % (2 * CLEAN_STOP_EVERY) >= CLEAN_STOP_EVERY)
            .then(|| Duration::from_millis(rng.gen_range(0..30)));
        // sled wrote this one when it opened the directory.
        let opened_with = newest_snapshot(server.data_dir());
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let kill = |signal: &str| {
                let _ = std::process::Command::new("kill")
                    .args([signal, &pid.to_string()])
                    .status();
            };
            if clean {
                kill("-TERM");
            }
            if let Some(after) = cut_short {
                std::thread::sleep(after);
            }
            if !clean || cut_short.is_some() {
                kill("-KILL");
            }
        });
        for op in 0.. {
            if killer.is_finished() {
                break;
            }
            let who = rng.gen_range(0..3);
            let c = &clients[who];
            if rng.gen_bool(0.15) {
                match c.self_update(&gid).await {
                    Ok(_) => commits += 1,
                    Err(e) if is_transport(&e) => {}
                    Err(e) => panic!("cycle {cycle}: self-update failed: {e}"),
                }
            } else {
                let text = format!("{} {cycle}.{op}", NAMES[who]);
                attempted.insert(text.clone());
                queued.push((who, text.clone()));
                match c.send(&gid, text.as_bytes()).await {
                    Ok(_) => acknowledged.push((who, text)),
                    Err(e) if is_transport(&e) => {}
                    Err(e) => panic!("cycle {cycle}: send failed: {e}"),
                }
            }
        }
        killer.join().unwrap();
        if clean && cut_short.is_none() {
            assert!(server.stop(), "cycle {cycle}: a stop under load exits 0");
            clean_stops += 1;
        } else if clean {
            server.kill();
            stops_cut_short += 1;
        } else {
            server.kill();
            if newest_snapshot(server.data_dir()) != opened_with {
                live_snapshots += 1;
            }
        }
        // Clients reopen from disk too (their transport must follow the new
        // port); with a disk, the power goes while they are down.
        drop(std::mem::take(&mut clients));
        if let Some(disk) = disk.as_mut() {
            let cut = if cycle % 2 == 0 {
                Cut::All
            } else {
                Cut::Random(seed ^ cycle)
            };
            let report = disk.cut(cut);
            cut_pages.lost_pages += report.lost_pages;
            cut_pages.kept_pages += report.kept_pages;
        }
        if cycle % KILLED_START_EVERY == 2 {
            // A start that served before its kill is one more kill under no
            // load; the next try comes sooner.
            for most_ms in [20, 10, 5] {
                let after = Duration::from_millis(rng.gen_range(0..most_ms));
                let before_serving = server.kill_while_starting(after);
                // What that start wrote without syncing is lost as well.
                if let Some(disk) = disk.as_mut() {
                    let report = disk.cut(Cut::All);
                    cut_pages.lost_pages += report.lost_pages;
                    cut_pages.kept_pages += report.kept_pages;
                }
                if before_serving {
                    starts_killed += 1;
                    break;
                }
            }
        }
        server.restart();
        let url = server.url();
        clients = NAMES.iter().map(|n| open(&url, n)).collect();
        for (i, c) in clients.iter().enumerate() {
            for e in retry(|| c.receive(0)).await {
                match e {
                    Event::Message { sender, data, .. } => received.entry(i).or_default().push((
                        String::from_utf8(sender).unwrap(),
                        String::from_utf8(data).unwrap(),
                    )),
                    Event::Skipped { reason, .. } => {
                        panic!("cycle {cycle}: {} skipped: {reason}", NAMES[i])
                    }
                    _ => {}
                }
            }
        }
    }
    // Drain: everyone processes everything (commits may still be in flight).
    for _ in 0..3 {
        for (i, c) in clients.iter().enumerate() {
            for e in retry(|| c.receive(0)).await {
                if let Event::Message { sender, data, .. } = e {
                    received.entry(i).or_default().push((
                        String::from_utf8(sender).unwrap(),
                        String::from_utf8(data).unwrap(),
                    ));
                }
            }
        }
    }
    let epoch = clients[0].epoch(&gid).await.unwrap();
    let secret = clients[0].export_secret(&gid, "x", 32).await.unwrap();
    for c in &clients[1..] {
        assert_eq!(c.epoch(&gid).await.unwrap(), epoch, "{} epoch", c.id());
        assert_eq!(
            c.export_secret(&gid, "x", 32).await.unwrap(),
            secret,
            "{} secret",
            c.id()
        );
    }
    let mut checked = 0;
    for (i, name) in NAMES.iter().enumerate() {
        let got = received.get(&i).cloned().unwrap_or_default();
        let texts: Vec<&String> = got.iter().map(|(_, t)| t).collect();
        let unique: HashSet<&String> = texts.iter().copied().collect();
        assert_eq!(unique.len(), texts.len(), "{name} received a message twice");
        for t in &texts {
            assert!(
                attempted.contains(*t),
                "{name} received {t}, which nobody sent"
            );
        }
        for (from, text) in &acknowledged {
            if *from != i {
                assert!(
                    unique.contains(text),
                    "{name} never received acknowledged {text:?}"
                );
                checked += 1;
            }
        }
        // `send` puts each message in the client's durable outbox before
        // it leaves: the ones whose answer the kill cut off went out later,
        // under the same send id, and arrived once, in order.
        for (j, sender) in NAMES.iter().enumerate() {
            if j == i {
                continue;
            }
            let want: Vec<&String> = queued
                .iter()
                .filter(|(f, _)| *f == j)
                .map(|(_, t)| t)
                .collect();
            let have: Vec<&String> = got
                .iter()
                .filter(|(s, _)| s == sender)
                .map(|(_, t)| t)
                .collect();
            assert_eq!(have, want, "{name}: what {sender} queued, in order");
        }
        // Per sender, DS order equals send order.
        for (j, sender) in NAMES.iter().enumerate() {
            if j == i {
                continue;
            }
            let from_sender: Vec<&String> = got
                .iter()
                .filter(|(s, _)| s == sender)
                .map(|(_, t)| t)
                .collect();
            let order: Vec<&String> = acknowledged
                .iter()
                .filter(|(f, _)| *f == j)
                .map(|(_, t)| t)
                .filter(|t| unique.contains(t))
                .collect();
            let from_sender_acked: Vec<&String> = from_sender
                .into_iter()
                .filter(|t| order.contains(t))
                .collect();
            assert_eq!(
                from_sender_acked, order,
                "{name}: messages of {sender} out of order"
            );
        }
    }
    server.stop_and_check();
    assert!(!acknowledged.is_empty());
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    let checkpoint_starts = log
        .lines()
        .filter(|l| l.contains("queue index ready") && l.contains("from=Checkpoint"))
        .count();
    // On PostgreSQL (`MLS_DS_TEST_BACKEND=postgres`) there is no sled.
    if cycles >= 2 * LONG_CYCLE_EVERY && postgres::backend() == TestBackend::Sled {
        assert!(
            live_snapshots > 0,
            "no kill landed after a snapshot written while running"
        );
        assert!(
            checkpoint_starts > 0,
            "no start took the queue index from a checkpoint"
        );
    }
    if cycles >= 3 * KILLED_START_EVERY {
        assert!(starts_killed > 0, "no start was killed before it served");
    }
    let mut summary = format!(
        "{cycles} cycles survived, {} messages acknowledged, {checked} deliveries checked, \
         {commits} commits, final epoch {epoch}, {live_snapshots} kills after a page-table \
         snapshot written while running, {clean_stops} stops under load, \
         {stops_cut_short} stops cut short, {starts_killed} starts killed before they served, \
         {checkpoint_starts} starts from the queue index checkpoint",
        acknowledged.len()
    );
    if disk.is_some() {
        summary += &format!(
            "; unsynced pages lost {}, kept {}",
            cut_pages.lost_pages, cut_pages.kept_pages
        );
    }
    summary
}
