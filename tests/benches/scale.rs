//! Scale benchmark: grows one dimension at a time against the real server
//! (release build, 127.0.0.1, a fresh data directory per point) and prints
//! how restart, memory and disk follow it.
//!
//! - `queued`: a sender queues N messages for offline members of its group
//!   (MLS_DS_SCALE_QUEUED=10000,100000,1000000 by default; each send is one
//!   queue entry per offline member, MLS_DS_SCALE_OFFLINE=1 of them). For each
//!   N: the fill rate and server CPU per send, resident memory and disk per
//!   entry, the time a restart takes to listen and the memory after it, then
//!   a drain by one offline member (pages of 1,000 acknowledged as it goes)
//!   with its rate and server CPU per entry in each tenth, and the disk once
//!   everything is acknowledged and again after `mls-ds compact`.
//! - `members`: one group grown to each size of
//!   MLS_DS_SCALE_MEMBERS=100,1000,2000,5000,10000 (commits adding up to 100 members,
//!   the joiners registered with one key package each and offline). At each
//!   size: the last add commit's bundle and server CPU, then 20 self-update
//!   commits (bundle bytes, server CPU, disk per epoch, and the committer's
//!   own time to stage and merge each, with its store) and 20 GroupInfo
//!   fetches (response bytes, server CPU), and the server's resident memory.
//!   The member added last is a real client: at the end it joins from its
//!   Welcome, catches up and sends messages to everyone, which the creator
//!   reads (server CPU per message, and the live records the first message
//!   and each later one add while queued for the offline members).
//! - `epochs`: one group of two through MLS_DS_SCALE_EPOCHS=10000 commits
//!   (the other member offline, then drained): disk per epoch and server CPU
//!   per commit, by fifths.
//!
//! - `sessions`: MLS_DS_SCALE_SESSIONS=200000 session openings (each a
//!   signature-verified request) by one client per 20 of them, in turn, in
//!   ten rounds: openings per second and server CPU per opening by round,
//!   the server's memory at the end. The server holds `--max-sessions`
//!   (100,000 by default); past it each opening ends the oldest session.
//!   Any refusal fails the phase.
//! - `groups`: for each count of MLS_DS_SCALE_GROUPS=10000,100000, that many
//!   clients registered with a key package each, then that many groups of
//!   two, each created by one of a few creators (500 groups each) who adds
//!   one of those clients (offline; its Welcome stays queued): rate and
//!   server CPU per registration and per group (creation, claim, commit),
//!   disk per client and per group, memory, and a restart.
//!
//! `cargo bench -p mls-ds-tests --bench scale` (MLS_DS_SCALE_PHASES=queued,members,epochs,sessions,groups
//! selects parts; MLS_DS_SCALE_KEEP=1 stops each `queued` point after the
//! fill and keeps its data directory, e.g. to time restarts of two builds on
//! it). Numbers go to BENCHMARKS.md by hand.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use mls_ds_client::client::CIPHERSUITE;
use mls_ds_client::{AuthMode, DsApi, HttpPool, Transport};
use mls_ds_protocol::groups::{MessageAccepted, SendId, SendMessage};
use mls_ds_protocol::{decode, encode, paths, ClientId, CONTENT_TYPE};
use mls_ds_tests::lean_http::LeanConn;
use mls_ds_tests::raw::{register_offline, register_offline_one, RawMember};
use mls_ds_tests::{cpu_seconds, disk_bytes, env_or, Server, BENCH_SERVER_FLAGS};
use openmls_basic_credential::SignatureKeyPair;

const IN_FLIGHT: usize = 32;
/// Messages encrypted ahead of sending them (the generator's memory bound).
const CHUNK: usize = 20_000;
const MIB: f64 = 1024.0 * 1024.0;

fn list(var: &str, default: &str) -> Vec<u64> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Start a server whose queues hold `depth` entries, logging outside its
/// data directory so that the disk figures are the database's alone.
fn start(root: &std::path::Path, depth: u64) -> Server {
    let depth = depth.max(1).to_string();
    let mut flags = BENCH_SERVER_FLAGS.to_vec();
    flags.extend(["--max-queue-depth", &depth]);
    Server::start_logging_to(&root.join("data"), &root.join("server.log"), &flags)
}

fn rss_mib(server: &Server) -> f64 {
    server.rss_kib().unwrap_or(0) as f64 / 1024.0
}

/// Send every body in `bodies` to the group as `sender`, `IN_FLIGHT` at a
/// time over lean connections.
async fn send_all(url: &str, sender: &Arc<RawMember>, gid: &[u8], bodies: Vec<Vec<u8>>) {
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let path = paths::messages(gid);
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (bodies, next, sender, path) =
            (bodies.clone(), next.clone(), sender.clone(), path.clone());
        let mut conn = LeanConn::connect(url.trim_start_matches("http://"))
            .await
            .expect("connect");
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(message) = bodies.get(i) else {
                    break;
                };
                let body = encode(&SendMessage {
                    message: message.clone().into(),
                    send_id: Some(SendId {
                        created_ms: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64),
                        nonce: rand::random(),
                    }),
                })
                .expect("encode");
                let auth = sender
                    .api
                    .transport
                    .authorization("POST", &path, &body, AuthMode::Session)
                    .await
                    .expect("authorization");
                let (status, reply) = conn
                    .request("POST", &path, auth.as_deref(), CONTENT_TYPE, &body)
                    .await
                    .expect("send");
                assert!(
                    (200..300).contains(&status),
                    "send: {status} {}",
                    String::from_utf8_lossy(reply)
                );
                decode::<MessageAccepted>(reply).expect("send reply");
            }
        }));
    }
    for w in workers {
        w.await.expect("sender task");
    }
}

/// Per tenth of a drain: entries per second and server CPU per entry.
struct Tenth {
    rate: f64,
    cpu_us: f64,
}

/// Fetch and acknowledge `member`'s whole queue (`total` entries), pages of
/// 1,000; the figures of each tenth.
async fn drain(member: &RawMember, pid: u32, total: u64) -> Vec<Tenth> {
    let mut tenths = Vec::new();
    let (mut after, mut seen) = (0u64, 0u64);
    let (mut t0, mut cpu0, mut mark) = (Instant::now(), cpu_seconds(pid), 0u64);
    while seen < total {
        let page = member
            .api
            .ack_and_fetch(after, after, 1000, 0)
            .await
            .expect("fetch");
        if page.entries.is_empty() {
            break;
        }
        seen += page.entries.len() as u64;
        after = page.entries.last().map_or(after, |e| e.seq);
        let boundary = total * (tenths.len() as u64 + 1) / 10;
        if seen >= boundary || seen >= total {
            let n = (seen - mark) as f64;
            tenths.push(Tenth {
                rate: n / t0.elapsed().as_secs_f64(),
                cpu_us: (cpu_seconds(pid) - cpu0) / n * 1e6,
            });
            (t0, cpu0, mark) = (Instant::now(), cpu_seconds(pid), seen);
        }
    }
    member.api.ack(after).await.expect("last ack");
    assert_eq!(seen, total, "every queued entry was delivered");
    tenths
}

fn join(values: impl Iterator<Item = String>) -> String {
    values.collect::<Vec<_>>().join(" ")
}

async fn queued_point(n: u64, offline_members: usize) {
    let root = tempfile::tempdir().expect("temp dir");
    let mut server = start(root.path(), n + 1);
    let url = server.url();
    let pid = server.pid().expect("pid");
    let mut sender = RawMember::new(&url, "scale-sender");
    sender.register(0).await;
    sender.create_group(false).await;
    let mut offline = Vec::new();
    for i in 0..offline_members {
        let name = format!("scale-offline-{i}");
        let member = RawMember::new(&url, &name);
        member.register(1).await;
        offline.push(member);
    }
    let mut kps = Vec::new();
    for i in 0..offline_members {
        kps.push(sender.claim(&format!("scale-offline-{i}")).await);
    }
    let gid = sender.gid();
    let (c, w, gi) = sender.stage_add(kps);
    sender.api.commit(&gid, c, w, gi).await.expect("add");
    sender.merge();
    // The Welcome (or the commit) is the first entry of every offline queue.
    let entries = n * offline_members as u64 + offline_members as u64;
    let rss0 = rss_mib(&server);
    let disk0 = disk_bytes(&root.path().join("data"));

    let mut sender = Some(sender);
    let (mut sent, mut fill_wall, mut fill_cpu) = (0u64, Duration::ZERO, 0.0);
    while sent < n {
        let k = CHUNK.min((n - sent) as usize);
        let mut member = sender.take().expect("sender");
        let bodies: Vec<Vec<u8>> = (0..k)
            .map(|i| member.encrypt(format!("scale {}", sent + i as u64).as_bytes()))
            .collect();
        let shared = Arc::new(member);
        let (t, cpu) = (Instant::now(), cpu_seconds(pid));
        send_all(&url, &shared, &gid, bodies).await;
        fill_wall += t.elapsed();
        fill_cpu += cpu_seconds(pid) - cpu;
        sender = Some(Arc::into_inner(shared).expect("no sender task left"));
        sent += k as u64;
    }
    let rss_full = rss_mib(&server);
    let disk_full = disk_bytes(&root.path().join("data"));
    let per_entry = |a: f64, b: f64| (a - b) / entries as f64;
    println!(
        "queued {n} sends x {offline_members} offline = {entries} entries: fill {:.0} sends/s, \
         {:.0} us server CPU/send; RSS {:.0} -> {:.0} MiB ({:.0} B/entry); disk {:.1} -> {:.1} MiB \
         ({:.0} B/entry)",
        n as f64 / fill_wall.as_secs_f64(),
        fill_cpu / n as f64 * 1e6,
        rss0,
        rss_full,
        per_entry(rss_full, rss0) * MIB,
        disk0 as f64 / MIB,
        disk_full as f64 / MIB,
        per_entry(disk_full as f64, disk0 as f64),
    );

    assert!(server.stop(), "graceful stop");
    if std::env::var("MLS_DS_SCALE_KEEP").is_ok() {
        println!(
            "queued {n}: filled data directory kept at {}",
            root.keep().join("data").display()
        );
        return;
    }
    let t = Instant::now();
    server.restart_on_same_port();
    let restart = t.elapsed();
    let pid = server.pid().expect("pid");
    println!(
        "queued {n}: restart {:.2} s, RSS after {:.0} MiB",
        restart.as_secs_f64(),
        rss_mib(&server)
    );

    let first = offline.first().expect("an offline member");
    let tenths = drain(first, pid, n + 1).await;
    for member in &offline[1..] {
        drain(member, pid, n + 1).await;
    }
    println!(
        "queued {n}: drain entries/s by tenth [{}], us CPU/entry [{}]",
        join(tenths.iter().map(|t| format!("{:.0}", t.rate))),
        join(tenths.iter().map(|t| format!("{:.1}", t.cpu_us))),
    );
    // Measured right after the last acknowledgement, then after `mls-ds
    // compact` (the running server stages the copy and reopens on it).
    let disk_drained = disk_bytes(&root.path().join("data"));
    // The copy's time grows with the live records: 9.7 s for 39 MiB at
    // 1,000,000 queued; at 10,000,000 the send receipts of the
    // deduplication window alone are about 390 MiB.
    let patience = Duration::from_secs(120 + n / 20_000);
    let t = Instant::now();
    let compact = server.admin(&["compact"]);
    assert!(compact.status.success(), "mls-ds compact failed");
    while mls_ds_tests::raw::try_raw_request(&url, "GET", "/healthz").await != Ok(200) {
        assert!(t.elapsed() < patience, "serving after compaction");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let compacted = t.elapsed();
    let disk_compacted = disk_bytes(&root.path().join("data"));
    let live = live_bytes(&server);
    println!(
        "queued {n}: disk after drain {:.1} MiB, after compaction {:.1} MiB, live records {:.1} MiB \
         (serving again {:.2} s after the command)",
        disk_drained as f64 / MIB,
        disk_compacted as f64 / MIB,
        live / MIB,
        compacted.as_secs_f64(),
    );
    server.stop_and_check();
}

/// Commit `stage`'s bundle as `creator` and merge it: its size in bytes and
/// the server CPU it took.
/// What one commit cost.
#[derive(Clone, Copy, Default)]
struct Committed {
    /// The bundle's bytes.
    bytes: usize,
    /// The server's CPU seconds for it.
    server_cpu: f64,
    /// The committer's own time (staging and merging, with its store's
    /// writes), in seconds.
    client: f64,
}

async fn commit(
    creator: &mut RawMember,
    pid: u32,
    stage: impl FnOnce(&mut RawMember) -> (Vec<u8>, Option<Vec<u8>>, Vec<u8>),
) -> Committed {
    let gid = creator.gid();
    let t0 = Instant::now();
    let (c, w, gi) = stage(creator);
    let mut client = t0.elapsed();
    let bytes = c.len() + w.as_ref().map_or(0, Vec::len) + gi.len();
    let cpu0 = cpu_seconds(pid);
    creator.api.commit(&gid, c, w, gi).await.expect("commit");
    let server_cpu = cpu_seconds(pid) - cpu0;
    let t1 = Instant::now();
    creator.merge();
    client += t1.elapsed();
    Committed {
        bytes,
        server_cpu,
        client: client.as_secs_f64(),
    }
}

async fn members(sizes: Vec<u64>) {
    const ADD_CHUNK: u64 = 100;
    const ROUNDS: usize = 20;
    const KIB: f64 = 1024.0;
    let root = tempfile::tempdir().expect("temp dir");
    let mut server = start(root.path(), 1000);
    let (url, pid) = (server.url(), server.pid().expect("pid"));
    let data = root.path().join("data");
    let pool = HttpPool::new().expect("pool");
    let mut creator = RawMember::new(&url, "members-creator");
    creator.register(0).await;
    creator.create_group(false).await;
    let gid = creator.gid();
    // The last member added is a real client, which joins at the end.
    let mut witness = RawMember::new(&url, WITNESS);
    witness.register(1).await;
    let last = sizes.iter().copied().max().unwrap_or(0);
    let mut size = 1u64;
    for target in sizes {
        let mut last_add = Committed::default();
        while size < target {
            let n = ADD_CHUNK.min(target - size);
            let mut names: Vec<String> = (size..size + n).map(|i| format!("member-{i}")).collect();
            let witness_added = size + n == last;
            if witness_added {
                names.pop();
            }
            register_offline(&url, &pool, &names).await;
            if witness_added {
                names.push(WITNESS.into());
            }
            let mut kps = Vec::new();
            for name in &names {
                kps.push(creator.claim(name).await);
            }
            last_add = commit(&mut creator, pid, |c| c.stage_add(kps)).await;
            size += n;
        }
        let disk0 = disk_bytes(&data);
        let (mut bundle, mut cpu, mut client) = (0, 0.0, 0.0);
        for _ in 0..ROUNDS {
            let c = commit(&mut creator, pid, RawMember::stage_update).await;
            (bundle, cpu, client) = (bundle + c.bytes, cpu + c.server_cpu, client + c.client);
        }
        let per_epoch = (disk_bytes(&data) as f64 - disk0 as f64) / ROUNDS as f64;
        let (mut info_bytes, cpu0) = (0, cpu_seconds(pid));
        for _ in 0..ROUNDS {
            let info = creator.api.group_info(&gid).await.expect("group info");
            info_bytes += info.group_info.as_slice().len() + info.ratchet_tree.as_slice().len();
        }
        let info_cpu = cpu_seconds(pid) - cpu0;
        let r = ROUNDS as f64;
        println!(
            "members {size}: add of {ADD_CHUNK}: bundle {:.0} KiB, {:.1} ms CPU; \
             self-update commit: bundle {:.0} KiB, {:.1} ms CPU, {:.0} KiB disk/epoch, \
             committer {:.1} ms; \
             GroupInfo fetch: {:.0} KiB, {:.1} ms CPU; server RSS {:.0} MiB",
            last_add.bytes as f64 / KIB,
            last_add.server_cpu * 1e3,
            bundle as f64 / r / KIB,
            cpu / r * 1e3,
            per_epoch / KIB,
            client / r * 1e3,
            info_bytes as f64 / r / KIB,
            info_cpu / r * 1e3,
            rss_mib(&server),
        );
    }
    if size > 1 {
        witness_joins(&server, &mut creator, &mut witness, pid).await;
    }
    server.stop_and_check();
}

/// The client the members phase adds last.
const WITNESS: &str = "members-witness";

/// Bytes of live records, as `mls-ds stats` counts them.
fn live_bytes(server: &Server) -> f64 {
    let stats = server.admin(&["stats"]);
    String::from_utf8_lossy(&stats.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("live records"))
        .and_then(|v| {
            v.trim()
                .trim_end_matches("bytes")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The member added last joins as a real client: it joins from its Welcome
/// (with the tree the DS hands out beside it) and processes every commit
/// since, then sends messages to everyone, which the creator reads; the
/// live records the first message added, and each later one (while they
/// are queued for the offline members).
async fn witness_joins(
    server: &Server,
    creator: &mut RawMember,
    witness: &mut RawMember,
    pid: u32,
) {
    let t0 = Instant::now();
    witness.sync().await;
    let joined = t0.elapsed();
    assert_eq!(witness.epoch(), creator.epoch(), "the witness joined");
    let gid = witness.gid();
    const MESSAGES: usize = 50;
    let bodies: Vec<Vec<u8>> = (0..MESSAGES)
        .map(|i| witness.encrypt(format!("hello, everyone {i}").as_bytes()))
        .collect();
    let mut live = vec![live_bytes(server)];
    let cpu0 = cpu_seconds(pid);
    for body in bodies {
        witness
            .api
            .send_message(&gid, body)
            .await
            .expect("send to the group");
        if live.len() == 1 {
            live.push(live_bytes(server));
        }
    }
    let send_cpu = (cpu_seconds(pid) - cpu0) / MESSAGES as f64;
    live.push(live_bytes(server));
    let first = live[1] - live[0];
    let later = (live[2] - live[1]) / (MESSAGES - 1) as f64;
    let read = creator.sync().await;
    assert_eq!(read.len(), MESSAGES, "the creator read every message");
    println!(
        "members {}: the last member added joined from its Welcome and caught up in {:.0} ms \
         (client side), then sent messages to all ({:.1} ms server CPU per message, {MESSAGES} \
         messages; live records: {:.0} bytes for the first, {:.0} for each later one); the \
         creator read them",
        creator.group().members().count(),
        joined.as_secs_f64() * 1e3,
        send_cpu * 1e3,
        first,
        later,
    );
}

async fn epochs(total: u64) {
    let root = tempfile::tempdir().expect("temp dir");
    let mut server = start(root.path(), total + 10);
    let url = server.url();
    let pid = server.pid().expect("pid");
    let (mut a, b) = mls_ds_tests::raw::group_of_two(&url, "epochs-a", "epochs-b").await;
    let gid = a.gid();
    let data = root.path().join("data");
    let mut fifths = Vec::new();
    let (mut disk, mut cpu0, mut t0) = (disk_bytes(&data), cpu_seconds(pid), Instant::now());
    let disk_start = disk;
    for epoch in 1..=total {
        let (c, w, gi) = a.stage_update();
        a.api.commit(&gid, c, w, gi).await.expect("commit");
        a.merge();
        if epoch % (total / 5).max(1) == 0 {
            let now = disk_bytes(&data);
            let n = (total / 5).max(1) as f64;
            fifths.push(format!(
                "{epoch}: {:.0} B/epoch, {:.0} us CPU/commit, {:.0} commits/s",
                (now as f64 - disk as f64) / n,
                (cpu_seconds(pid) - cpu0) / n * 1e6,
                n / t0.elapsed().as_secs_f64()
            ));
            (disk, cpu0, t0) = (now, cpu_seconds(pid), Instant::now());
        }
    }
    let drained = drain(&b, pid, total).await;
    let rate = drained.iter().map(|t| t.rate).sum::<f64>() / drained.len().max(1) as f64;
    println!(
        "epochs {total} (group of two, one member offline): disk {:.1} -> {:.1} MiB; by fifths [{}]; \
         drained at {rate:.0} entries/s, disk after {:.1} MiB",
        disk_start as f64 / MIB,
        disk as f64 / MIB,
        fifths.join("; "),
        disk_bytes(&data) as f64 / MIB,
    );
    server.stop_and_check();
}

/// Run `job(i)` for each `i` in `range`, `IN_FLIGHT` at a time: the
/// errors, if any.
async fn each_concurrently<F, Fut>(range: std::ops::Range<u64>, job: F) -> Vec<String>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicU64::new(range.start));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (job, next, end) = (job.clone(), next.clone(), range.end);
        tasks.spawn(async move {
            let mut errors = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                if let Err(e) = job(i).await {
                    errors.push(e);
                }
            }
            errors
        });
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

/// Sessions each client of the `sessions` phase opens: fewer than a client
/// holds at once (32), so that every ending is the table's oldest giving
/// way.
const SESSIONS_PER_CLIENT: u64 = 20;

async fn sessions(n: u64) {
    let root = tempfile::tempdir().expect("temp dir");
    let mut server = start(root.path(), 1);
    let url = server.url();
    let pid = server.pid().expect("pid");
    let pool = HttpPool::new().expect("pool");
    let clients = n.div_ceil(SESSIONS_PER_CLIENT).max(1);
    let apis: Arc<Vec<DsApi>> = Arc::new(
        (0..clients)
            .map(|i| {
                let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).expect("key");
                let id = ClientId::new(format!("session-client-{i}")).expect("id");
                DsApi::new(Transport::with_pool(&url, id, signer, pool.clone()).expect("transport"))
            })
            .collect(),
    );
    let a = apis.clone();
    let failed = each_concurrently(0..clients, move |i| {
        let a = a.clone();
        async move {
            a[i as usize]
                .register()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert!(
        failed.is_empty(),
        "registrations failed: {:?}",
        failed.first()
    );
    let (mut rates, mut cpu, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    for tenth in 0..10 {
        let range = n * tenth / 10..n * (tenth + 1) / 10;
        let count = (range.end - range.start) as f64;
        let (t, cpu0) = (Instant::now(), cpu_seconds(pid));
        let a = apis.clone();
        refused.extend(
            each_concurrently(range, move |i| {
                let a = a.clone();
                async move {
                    a[(i % clients) as usize]
                        .open_session()
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            })
            .await,
        );
        rates.push(format!("{:.0}", count / t.elapsed().as_secs_f64()));
        cpu.push(format!("{:.0}", (cpu_seconds(pid) - cpu0) / count * 1e6));
    }
    println!(
        "sessions {n} opened by {clients} clients: openings/s by tenth [{}], us CPU/opening [{}]; \
         refused {}; RSS {:.0} MiB",
        rates.join(" "),
        cpu.join(" "),
        refused.len(),
        rss_mib(&server)
    );
    assert!(
        refused.is_empty(),
        "openings refused, first: {:?}",
        refused.first()
    );
    server.stop_and_check();
}

/// Groups one creator of the `groups` phase creates (below the default
/// 1,000 groups per client).
const GROUPS_PER_CREATOR: u64 = 500;

async fn groups_point(n: u64) {
    let root = tempfile::tempdir().expect("temp dir");
    let mut server = start(root.path(), 1);
    let url = server.url();
    let pid = server.pid().expect("pid");
    let data = root.path().join("data");
    let pool = HttpPool::new().expect("pool");
    let (disk0, t, cpu0) = (disk_bytes(&data), Instant::now(), cpu_seconds(pid));
    let (u, p) = (url.clone(), pool.clone());
    let failed = each_concurrently(0..n, move |i| {
        let name = format!("offline-{i}");
        register_offline_one(u.clone(), p.clone(), name).map(Ok)
    })
    .await;
    assert!(failed.is_empty());
    let (reg_wall, reg_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds(pid) - cpu0);
    let disk1 = disk_bytes(&data);
    println!(
        "groups {n}: {n} clients registered with a key package each: {:.0}/s, {:.0} us server CPU each; \
         disk {:.0} bytes per client",
        n as f64 / reg_wall,
        reg_cpu / n as f64 * 1e6,
        disk1.saturating_sub(disk0) as f64 / n as f64
    );
    let (t, cpu0) = (Instant::now(), cpu_seconds(pid));
    let mut creators = tokio::task::JoinSet::new();
    for c in 0..n.div_ceil(GROUPS_PER_CREATOR) {
        let mut creator = RawMember::with_pool(&url, &format!("creator-{c}"), pool.clone());
        let mine = c * GROUPS_PER_CREATOR..((c + 1) * GROUPS_PER_CREATOR).min(n);
        creators.spawn(async move {
            creator.register(0).await;
            for i in mine {
                creator.create_group(false).await;
                let kp = creator.claim(&format!("offline-{i}")).await;
                let (commit, welcome, info) = creator.stage_add(vec![kp]);
                creator
                    .api
                    .commit(&creator.gid(), commit, welcome, info)
                    .await
                    .expect("add");
                creator.merge();
            }
        });
    }
    creators.join_all().await;
    let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds(pid) - cpu0);
    let disk2 = disk_bytes(&data);
    let rss = rss_mib(&server);
    let t = Instant::now();
    server.restart_on_same_port();
    let restart = t.elapsed().as_secs_f64();
    println!(
        "groups {n}: {n} groups of two created: {:.0}/s, {:.0} us server CPU each (creation, claim, commit); \
         disk {:.0} bytes per group, {:.1} MiB in all; RSS {rss:.0} MiB; restart {restart:.2} s, RSS after {:.0} MiB",
        n as f64 / wall,
        cpu / n as f64 * 1e6,
        disk2.saturating_sub(disk1) as f64 / n as f64,
        disk2 as f64 / MIB,
        rss_mib(&server)
    );
    server.stop_and_check();
}

fn main() {
    let phases = std::env::var("MLS_DS_SCALE_PHASES")
        .unwrap_or_else(|_| "queued,members,epochs,sessions,groups".into());
    let phase = |p: &str| phases.split(',').any(|x| x == p);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "scale benchmark: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    rt.block_on(async {
        if phase("queued") {
            let offline = env_or("MLS_DS_SCALE_OFFLINE", 1).max(1) as usize;
            for n in list("MLS_DS_SCALE_QUEUED", "10000,100000,1000000") {
                queued_point(n, offline).await;
            }
        }
        if phase("members") {
            members(list("MLS_DS_SCALE_MEMBERS", "100,1000,2000,5000,10000")).await;
        }
        if phase("epochs") {
            epochs(env_or("MLS_DS_SCALE_EPOCHS", 10_000)).await;
        }
        if phase("sessions") {
            sessions(env_or("MLS_DS_SCALE_SESSIONS", 200_000)).await;
        }
        if phase("groups") {
            for n in list("MLS_DS_SCALE_GROUPS", "10000,100000") {
                groups_point(n).await;
            }
        }
    });
}
