//! Load generator: starts the real server (release build) on 127.0.0.1,
//! registers clients, builds groups of 2, 10 and 100 members, sends
//! application messages with 32 requests in flight while the recipients
//! long-poll and acknowledge, and prints throughput, latency percentiles,
//! server CPU per request and peak RSS. Finally it queues 100,000 messages for
//! an offline client and reports the server's peak RSS.
//!
//! `cargo bench -p mls-ds-tests --bench load` (MLS_DS_LOAD_QUICK=1 for a
//! short run; MLS_DS_LOAD_GROUPS=2,10 and MLS_DS_LOAD_PHASES=reg,groups,sdk,backlog
//! select parts; MLS_DS_LOAD_MESSAGES=N sends N messages per group size).
//! Numbers go to BENCHMARKS.md by hand.
//!
//! The timed requests of the registration and group phases go over lean
//! HTTP/1.1 connections (`mls_ds_tests::lean_http`, one per request in
//! flight) carrying the SDK's own request bodies and `Authorization` values:
//! the load generator shares the two cores with the server, and the SDK's
//! hyper client costs it about twice as much per request.
//! `MLS_DS_LOAD_CLIENT=sdk` sends them through the SDK's transport instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mls_ds_client::{AuthMode, DsApi, HttpPool, Transport};
use mls_ds_protocol::clients::Registered;
use mls_ds_protocol::groups::{MessageAccepted, SendId, SendMessage};
use mls_ds_protocol::queue::QueuePage;
use mls_ds_protocol::{decode, encode, paths, ClientId, CONTENT_TYPE};
use mls_ds_tests::lean_http::LeanConn;
use mls_ds_tests::postgres::{self, TestBackend};
use mls_ds_tests::raw::RawMember;
use mls_ds_tests::{cpu_seconds, peak_rss_mib, Server, BENCH_SERVER_FLAGS};
use openmls_basic_credential::SignatureKeyPair;
use tokio::sync::Mutex;

const IN_FLIGHT: usize = 32;

fn quick() -> bool {
    std::env::var("MLS_DS_LOAD_QUICK").is_ok()
}

/// Messages per group phase instead of the default (`MLS_DS_LOAD_MESSAGES`):
/// a run long enough to include the freezes of send receipts into runs
/// (one per 65,536 sends) shows what they cost in CPU and latency.
fn messages() -> Option<usize> {
    std::env::var("MLS_DS_LOAD_MESSAGES").ok()?.parse().ok()
}

fn send_ids() -> bool {
    std::env::var("MLS_DS_LOAD_SEND_IDS").map_or(true, |v| v != "0")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// How the timed requests reach the server.
enum Wire {
    /// Through the SDK's transport (`MLS_DS_LOAD_CLIENT=sdk`).
    Sdk,
    /// Over a connection of this worker's own, with the SDK's bodies and
    /// authorization.
    Lean(LeanConn),
}

impl Wire {
    async fn open(url: &str) -> Wire {
        if std::env::var("MLS_DS_LOAD_CLIENT").is_ok_and(|v| v == "sdk") {
            return Wire::Sdk;
        }
        let addr = url.trim_start_matches("http://");
        Wire::Lean(LeanConn::connect(addr).await.expect("connect"))
    }

    /// `POST` `body` to `path` as `api`'s client; the 2xx response body.
    async fn post(&mut self, api: &DsApi, path: &str, body: Vec<u8>, mode: AuthMode) -> Vec<u8> {
        match self {
            Wire::Sdk => api
                .transport
                .send(hyper::Method::POST, path, body, mode)
                .await
                .expect("request")
                .to_vec(),
            Wire::Lean(conn) => {
                let auth = api
                    .transport
                    .authorization("POST", path, &body, mode)
                    .await
                    .expect("authorization");
                expect_2xx(
                    conn.request("POST", path, auth.as_deref(), CONTENT_TYPE, &body)
                        .await,
                )
            }
        }
    }

    /// Send an application message to the group.
    async fn send(&mut self, api: &DsApi, group_id: &[u8], message: &[u8]) {
        // With a send id, as the SDK sends: the DS remembers each send
        // (MLS_DS_LOAD_SEND_IDS=0: without, to measure what that costs).
        let send_id = send_ids().then(|| SendId {
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            nonce: rand::random(),
        });
        let body = encode(&SendMessage {
            message: message.to_vec().into(),
            send_id,
        })
        .expect("encode");
        let reply = self
            .post(api, &paths::messages(group_id), body, AuthMode::Session)
            .await;
        decode::<MessageAccepted>(&reply).expect("send reply");
    }

    /// A page of `api`'s queue after `after`, acknowledging up to `ack`.
    async fn fetch(&mut self, api: &DsApi, ack: Option<u64>, after: u64) -> QueuePage {
        let Wire::Lean(conn) = self else {
            return match ack {
                Some(up_to) => api.ack_and_fetch(up_to, after, 1000, 2000).await,
                None => api.fetch(after, 1000, 2000).await,
            }
            .expect("fetch");
        };
        let path = paths::queue_page(ack, after, 1000, 2000);
        let auth = api
            .transport
            .authorization("GET", &path, &[], AuthMode::Session)
            .await
            .expect("authorization");
        let body = expect_2xx(
            conn.request("GET", &path, auth.as_deref(), CONTENT_TYPE, &[])
                .await,
        );
        decode(&body).expect("queue page")
    }
}

fn expect_2xx(reply: std::io::Result<(u16, &[u8])>) -> Vec<u8> {
    let (status, body) = reply.expect("request");
    assert!(
        (200..300).contains(&status),
        "status {status}: {}",
        String::from_utf8_lossy(body)
    );
    body.to_vec()
}

/// Run `n` jobs with `IN_FLIGHT` at a time, each worker with a [`Wire`] of
/// its own (opened before the clock starts); returns per-job latencies and
/// wall time.
async fn run_concurrently<F, Fut>(url: &str, n: usize, job: F) -> (Vec<Duration>, Duration)
where
    F: Fn(Wire, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Wire> + Send + 'static,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut wires = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        wires.push(Wire::open(node_url(wires.len(), url)).await);
    }
    let start = Instant::now();
    let mut workers = Vec::new();
    for mut wire in wires {
        let (job, next, lat) = (job.clone(), next.clone(), lat.clone());
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                wire = job(wire, i).await;
                mine.push(t.elapsed());
            }
            lat.lock().await.extend(mine);
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let wall = start.elapsed();
    let mut v = std::mem::take(&mut *lat.lock().await);
    v.sort();
    (v, wall)
}

async fn registrations(url: &str, pid: u32) {
    let n = if quick() { 2000 } else { 20000 };
    // One pool of keep-alive connections for all of them, as an application
    // server registering its users would have; key generation is untimed.
    let pool = HttpPool::new().unwrap();
    let scheme = mls_ds_client::client::CIPHERSUITE.signature_algorithm();
    let members: Arc<Vec<DsApi>> = Arc::new(
        (0..n)
            .map(|i| {
                let id = ClientId::new(format!("reg-{i}")).unwrap();
                let signer = SignatureKeyPair::new(scheme).unwrap();
                DsApi::new(Transport::with_pool(url, id, signer, pool.clone()).unwrap())
            })
            .collect(),
    );
    let cpu0 = server_cpu(pid);
    let db0 = database_cpu();
    let m = members.clone();
    let (lat, wall) = run_concurrently(url, n, move |mut wire, i| {
        let m = m.clone();
        async move {
            let api = &m[i];
            let body = api.registration_body(None).expect("encode");
            let reply = wire
                .post(api, paths::CLIENTS, body, AuthMode::Signature)
                .await;
            decode::<Registered>(&reply).expect("register reply");
            wire
        }
    })
    .await;
    let cpu = server_cpu(pid) - cpu0;
    let db = database_cpu() - db0;
    println!(
        "registrations: {n} in {:.2}s = {:.0}/s; p50 {:.2} ms p99 {:.2} ms; server CPU {:.0} us/request{}",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        cpu / n as f64 * 1e6,
        of_which_database(db, n)
    );
}

async fn group_run(url: &str, pid: u32, size: usize, tag: &str) {
    let messages = match (messages(), quick(), size) {
        (Some(n), _, _) => n,
        (None, true, _) => 1000,
        (None, false, s) if s >= 100 => 5000,
        _ => 20000,
    };
    let mut sender = RawMember::new(url, &format!("{tag}-sender"));
    sender.register(0).await;
    let mut recipients = Vec::new();
    for i in 1..size {
        let r = RawMember::new(url, &format!("{tag}-r{i}"));
        r.register(1).await;
        recipients.push(r);
    }
    sender.create_group(false).await;
    let mut kps = Vec::new();
    for r in &recipients {
        kps.push(sender.claim(r.api.client_id().to_string().as_str()).await);
    }
    let gid = sender.gid();
    let (c, w, gi) = sender.stage_add(kps);
    sender
        .api
        .commit(&gid, c, w, gi)
        .await
        .expect("add members");
    sender.merge();
    // Recipients skip the Welcome and commit (they only drain, not decrypt).
    for r in &recipients {
        let page = r.api.fetch(0, 100, 0).await.unwrap();
        if let Some(last) = page.entries.last() {
            r.api.ack(last.seq).await.unwrap();
        }
    }
    // Pre-encrypt, so the timed phase measures the DS, not client crypto.
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..messages)
            .map(|i| sender.encrypt(format!("m{i}").as_bytes()))
            .collect(),
    );
    let sender = Arc::new(sender);
    let expected = messages * recipients.len();
    let delivered = Arc::new(AtomicUsize::new(0));
    let fetch_lat = Arc::new(Mutex::new(Vec::new()));
    let mut wires = Vec::with_capacity(recipients.len());
    for _ in &recipients {
        wires.push(Wire::open(node_url(wires.len(), url)).await);
    }
    let cpu0 = server_cpu(pid);
    let db0 = database_cpu();
    let own0 = cpu_seconds(std::process::id());
    let start = Instant::now();
    let mut drains = Vec::new();
    for r in recipients {
        let (delivered, fetch_lat) = (delivered.clone(), fetch_lat.clone());
        let mut wire = wires.pop().expect("one wire per recipient");
        drains.push(tokio::spawn(async move {
            let mut got = 0;
            let mut after = r.api.fetch(0, 1, 0).await.unwrap().acked;
            let mut lat = Vec::new();
            // Each fetch acknowledges the previous page (`ack` parameter).
            let mut unacked = None;
            while got < messages {
                let t = Instant::now();
                let page = wire.fetch(&r.api, unacked, after).await;
                lat.push(t.elapsed());
                if let Some(last) = page.entries.last() {
                    got += page.entries.len();
                    delivered.fetch_add(page.entries.len(), Ordering::Relaxed);
                    after = last.seq;
                    unacked = Some(after);
                }
            }
            r.api.ack(after).await.expect("ack");
            fetch_lat.lock().await.extend(lat);
        }));
    }
    let (b, s, g) = (bodies.clone(), sender.clone(), gid.clone());
    let (send_lat, send_wall) = run_concurrently(url, messages, move |mut wire, i| {
        let (b, s, g) = (b.clone(), s.clone(), g.clone());
        async move {
            wire.send(&s.api, &g, &b[i]).await;
            wire
        }
    })
    .await;
    for d in drains {
        d.await.unwrap();
    }
    let total = start.elapsed();
    let cpu = server_cpu(pid) - cpu0;
    let db = database_cpu() - db0;
    let own = cpu_seconds(std::process::id()) - own0;
    let mut flat = std::mem::take(&mut *fetch_lat.lock().await);
    flat.sort();
    // Sends, fetches (each acknowledging the page before) and a last ack each.
    let requests = messages + flat.len() + size - 1;
    println!(
        "G={size}: {messages} sends in {:.2}s = {:.0} sends/s (send p50 {:.2} ms, p99 {:.2} ms, \
         p99.9 {:.2} ms, max {:.2} ms); \
         {} deliveries in {:.2}s = {:.0} deliveries/s (fetch p50 {:.2} ms, p99 {:.2} ms); \
         server CPU {:.0} us/request{} over {requests} requests (load generator {:.0} us/request)",
        send_wall.as_secs_f64(),
        messages as f64 / send_wall.as_secs_f64(),
        percentile(&send_lat, 0.5),
        percentile(&send_lat, 0.99),
        percentile(&send_lat, 0.999),
        percentile(&send_lat, 1.0),
        delivered.load(Ordering::Relaxed),
        total.as_secs_f64(),
        expected as f64 / total.as_secs_f64(),
        percentile(&flat, 0.5),
        percentile(&flat, 0.99),
        cpu / requests as f64 * 1e6,
        of_which_database(db, requests),
        own / requests as f64 * 1e6,
    );
}

async fn queued_backlog(url: &str, pid: u32) {
    let n = if quick() { 5000 } else { 100_000 };
    let run = std::process::id();
    let mut sender = RawMember::new(url, &format!("backlog-sender-{run}"));
    sender.register(0).await;
    let offline_id = format!("backlog-offline-{run}");
    let offline = RawMember::new(url, &offline_id);
    offline.register(1).await;
    sender.create_group(false).await;
    let kp = sender.claim(&offline_id).await;
    let gid = sender.gid();
    let (c, w, gi) = sender.stage_add(vec![kp]);
    sender.api.commit(&gid, c, w, gi).await.unwrap();
    sender.merge();
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| sender.encrypt(format!("backlog {i}").as_bytes()))
            .collect(),
    );
    let sender = Arc::new(sender);
    let (b, s, g) = (bodies.clone(), sender.clone(), gid.clone());
    let (_, wall) = run_concurrently(url, n, move |mut wire, i| {
        let (b, s, g) = (b.clone(), s.clone(), g.clone());
        async move {
            wire.send(&s.api, &g, &b[i]).await;
            wire
        }
    })
    .await;
    let page = offline.api.fetch(0, 1, 0).await.unwrap();
    println!(
        "backlog: {n} messages queued for an offline client in {:.1}s (queue head {}); server peak RSS {:.0} MiB",
        wall.as_secs_f64(),
        page.head,
        peak_rss_mib(pid)
    );
}

/// SDK figures: end-to-end latency from `send` on one client to delivery on
/// another that long-polls, and messages/s one SDK client sustains to a
/// 10-member group (each send encrypted, persisted with fsync, acknowledged).
async fn sdk_phase(url: &str) {
    use mls_ds_client::{Client, ClientConfig, Event};
    let dir = tempfile::tempdir().unwrap();
    let run = std::process::id();
    let names: Vec<String> = (0..10).map(|i| format!("sdk-{run}-{i}")).collect();
    let clients: Vec<Arc<Client>> = names
        .iter()
        .map(|n| {
            Arc::new(Client::open(dir.path().join(n), url, n, ClientConfig::default()).unwrap())
        })
        .collect();
    for c in &clients {
        c.register().await.unwrap();
    }
    let gid = clients[0].create_group(false).await.unwrap();
    let others: Vec<&str> = names[1..].iter().map(String::as_str).collect();
    clients[0].invite(&gid, &others).await.unwrap();
    for c in &clients[1..] {
        c.receive(0).await.unwrap();
    }
    let n = if quick() { 50 } else { 300 };
    // Latency: bob long-polls while alice sends one message at a time.
    let mut lat = Vec::with_capacity(n);
    let (alice, bob) = (&clients[0], &clients[1]);
    for i in 0..n {
        let t = Instant::now();
        let text = format!("ping {i}");
        let send = alice.send(&gid, text.as_bytes());
        let recv = async {
            loop {
                let events = bob.receive(5_000).await.unwrap();
                if events.iter().any(|e| matches!(e, Event::Message { .. })) {
                    return;
                }
            }
        };
        let (sent, ()) = tokio::join!(send, recv);
        sent.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "SDK end-to-end (send -> long-poll delivery, 10-member group): p50 {:.2} ms, p99 {:.2} ms over {n} messages",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    // The same with bob following the DS's queue stream.
    let mut events = bob.event_stream();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let text = format!("streamed {i}");
        let send = alice.send(&gid, text.as_bytes());
        let recv = async {
            loop {
                let ev = std::future::poll_fn(|cx| {
                    futures_core::Stream::poll_next(std::pin::Pin::new(&mut events), cx)
                })
                .await
                .expect("stream open")
                .expect("event");
                bob.ack_events(ev.seq()).unwrap();
                if matches!(ev, Event::Message { .. }) {
                    return;
                }
            }
        };
        let (sent, ()) = tokio::join!(send, recv);
        sent.unwrap();
        lat.push(t.elapsed());
    }
    drop(events);
    lat.sort();
    println!(
        "SDK end-to-end (send -> stream delivery, 10-member group): p50 {:.2} ms, p99 {:.2} ms over {n} messages",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    // One client's sequential sends, from alice's plain store and from a
    // member whose store is encrypted, in alternating blocks (the machine's
    // speed drifts within minutes).
    let sealed_name = format!("sdk-{run}-sealed");
    let sealed_config = ClientConfig {
        store_key: Some(mls_ds_client::StoreKey::from_bytes([7; 32])),
        ..ClientConfig::default()
    };
    let sealed = Client::open(
        dir.path().join(&sealed_name),
        url,
        &sealed_name,
        sealed_config,
    )
    .unwrap();
    sealed.register().await.unwrap();
    alice.invite(&gid, &[sealed_name.as_str()]).await.unwrap();
    sealed.receive(0).await.unwrap();
    let block = if quick() { 50 } else { 250 };
    let mut plain = SendTimes::default();
    let mut encrypted = SendTimes::default();
    for round in 0..4 {
        plain
            .measure(alice, &gid, block, &format!("plain {round}"))
            .await;
        encrypted
            .measure(&sealed, &gid, block, &format!("sealed {round}"))
            .await;
    }
    for (label, times) in [("plain store", plain), ("encrypted store", encrypted)] {
        let (rate, p50, p99) = times.summary();
        println!(
            "SDK send, one client to an 11-member group (outbox write, DS answer, outbox removal), {label}: {rate:.0} messages/s ({} sequential sends in 4 blocks), latency p50 {p50:.2} ms, p99 {p99:.2} ms",
            4 * block
        );
    }
}

/// Latencies and wall time of one client's sequential SDK sends.
#[derive(Default)]
struct SendTimes {
    lat: Vec<Duration>,
    wall: Duration,
}

impl SendTimes {
    async fn measure(&mut self, client: &mls_ds_client::Client, gid: &[u8], n: usize, tag: &str) {
        let t = Instant::now();
        for i in 0..n {
            let s = Instant::now();
            client
                .send(gid, format!("burst {tag} {i}").as_bytes())
                .await
                .unwrap();
            self.lat.push(s.elapsed());
        }
        self.wall += t.elapsed();
    }

    /// Messages/s, p50 and p99 in ms.
    fn summary(mut self) -> (f64, f64, f64) {
        self.lat.sort();
        (
            self.lat.len() as f64 / self.wall.as_secs_f64(),
            percentile(&self.lat, 0.5),
            percentile(&self.lat, 0.99),
        )
    }
}

/// The server's flags for the bench: the shared ones, and a queue deep
/// enough for a 100,000-message backlog for one client.
fn server_flags() -> Vec<&'static str> {
    let mut flags = BENCH_SERVER_FLAGS.to_vec();
    flags.extend(["--max-queue-depth", "1000000"]);
    flags
}

/// The DS nodes under load, and whether a database's CPU counts too.
struct Target {
    urls: Vec<String>,
    pids: Vec<u32>,
    database: bool,
}

static TARGET: std::sync::OnceLock<Target> = std::sync::OnceLock::new();

/// The node the `n`th connection goes to (`fallback`: an external server).
fn node_url(n: usize, fallback: &str) -> &str {
    match TARGET.get() {
        Some(t) if !t.urls.is_empty() => &t.urls[n % t.urls.len()],
        _ => fallback,
    }
}

/// Server CPU seconds so far: every node's and the database's (`pid`: an
/// external server's).
fn server_cpu(pid: u32) -> f64 {
    match TARGET.get() {
        Some(t) if !t.pids.is_empty() => {
            t.pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() + database_cpu()
        }
        _ => cpu_seconds(pid),
    }
}

/// The database's part of [`server_cpu`] (0 on sled).
fn database_cpu() -> f64 {
    match (TARGET.get(), postgres::cluster_if_started()) {
        (Some(t), Some(c)) if t.database => c.cpu_seconds(),
        _ => 0.0,
    }
}

/// ", of which the database N us" when there is one.
fn of_which_database(seconds: f64, requests: usize) -> String {
    match TARGET.get() {
        Some(t) if t.database => format!(" (database {:.0} us)", seconds / requests as f64 * 1e6),
        _ => String::new(),
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    // MLS_DS_LOAD_URL + MLS_DS_LOAD_PID: drive an already running server
    // (e.g. one under a profiler) instead of starting one.
    let external = std::env::var("MLS_DS_LOAD_URL").ok().zip(
        std::env::var("MLS_DS_LOAD_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok()),
    );
    // MLS_DS_LOAD_NODES=N (with MLS_DS_TEST_BACKEND=postgres): N DS
    // processes on one database of the tests' own PostgreSQL server,
    // connections spread over them in turn; server CPU counts every node
    // and the database's processes.
    let nodes: usize = std::env::var("MLS_DS_LOAD_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let flags = server_flags();
    let servers: Vec<Server> = match (&external, postgres::backend()) {
        (Some(_), _) => Vec::new(),
        (None, TestBackend::Postgres) => {
            let database = postgres::cluster()
                .expect("PostgreSQL server binaries")
                .new_database();
            (0..nodes)
                .map(|i| {
                    Server::start_on_database(
                        &dir.path().join(format!("node{i}")),
                        &database,
                        &flags,
                    )
                })
                .collect()
        }
        (None, TestBackend::Sled) => {
            assert_eq!(nodes, 1, "several nodes need MLS_DS_TEST_BACKEND=postgres");
            vec![Server::start(dir.path(), &flags)]
        }
    };
    let (url, pid) = match (&external, servers.first()) {
        (Some((url, pid)), _) => (url.clone(), *pid),
        (None, Some(s)) => (s.url(), s.pid().expect("server pid")),
        (None, None) => unreachable!("a server was started"),
    };
    let _ = TARGET.set(Target {
        urls: servers.iter().map(Server::url).collect(),
        pids: servers.iter().filter_map(Server::pid).collect(),
        database: postgres::backend() == TestBackend::Postgres && external.is_none(),
    });
    println!(
        "load generator: {} on {}, {} node(s), first pid {pid} at {url}, {IN_FLIGHT} requests in flight, machine: {} cores",
        if external.is_some() { "external server" } else { "server" },
        match postgres::backend() {
            TestBackend::Postgres => "PostgreSQL",
            TestBackend::Sled => "sled",
        },
        servers.len().max(1),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // MLS_DS_LOAD_PHASES=reg,groups,sdk,backlog picks phases (default: all).
    let phases =
        std::env::var("MLS_DS_LOAD_PHASES").unwrap_or_else(|_| "reg,groups,sdk,backlog".into());
    let phase = |p: &str| phases.split(',').any(|x| x == p);
    rt.block_on(async {
        if phase("reg") {
            registrations(&url, pid).await;
        }
        let sizes: Vec<usize> = std::env::var("MLS_DS_LOAD_GROUPS")
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
            .unwrap_or_else(|| vec![2, 10, 100]);
        let run = std::process::id();
        if phase("groups") {
            for size in sizes {
                group_run(&url, pid, size, &format!("g{size}-{run}")).await;
            }
        }
        if phase("sdk") {
            sdk_phase(&url).await;
        }
        println!("server peak RSS so far {:.0} MiB", peak_rss_mib(pid));
        if phase("backlog") {
            queued_backlog(&url, pid).await;
        }
    });
}
