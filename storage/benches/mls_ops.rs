//! Storage benchmark: real OpenMLS operations on `SledProvider` (on disk,
//! under `Durability::Batched` and `Durability::Sync`) against OpenMLS's own
//! in-memory provider (`OpenMlsRustCrypto`, whose storage is
//! `openmls_memory_storage::MemoryStorage`).
//!
//! Operations (each member's step is one atomic storage operation: one sled
//! transaction, i.e. at most one flush + fdatasync under `Sync`):
//!
//! 1. `app msg, 2 members`: Alice creates one application message, Bob
//!    processes it.
//! 2. `app msg, 50 members`: the same in a 50-member group.
//! 3. `add cycle, 2 members`: in a 2-member group (Alice, Bob) Alice adds a
//!    fresh member (add_members + merge_pending_commit), Bob processes and
//!    merges the commit, the new member joins from the Welcome. Only these
//!    three steps are timed; before them the new member's key package is
//!    made, after them Alice removes the new member again and Bob processes
//!    that commit (both untimed), so every timed add starts from the same
//!    2-member group.
//!
//! Every sled member has its own database directory (like a real client);
//! new members of operation 3 share one database, one namespace each. The
//! memory provider and sled `Batched` run interleaved in blocks of 50
//! iterations, so background load on the machine hits both alike; sled `Sync`
//! runs on its own afterwards (interleaved, its fsyncs share the disk and
//! the CPUs with the `Batched` store and skewed the `Batched` figures).
//!
//! Run: `cargo bench -p mls-ds-storage --bench mls_ops`. Quick smoke run:
//! `MLS_BENCH_QUICK=1` or pass `--quick`. `MLS_BENCH_DIR` picks the parent
//! directory of the temporary databases (default: the system temp dir). For
//! profiling one case: `MLS_BENCH_OPS=2` (1, 2, 3) and
//! `MLS_BENCH_PROVIDERS=batched` (memory, batched, sync), comma-separated;
//! `MLS_BENCH_RAW=file.csv` appends every sample to a CSV file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mls_ds_storage::{Durability, SledProvider, Store, StoreConfig};
use openmls::prelude::{tls_codec::*, *};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;

const CS: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
const GROUP_ID: &[u8] = b"bench-group";

// ----- providers -----

/// A provider that runs a closure as one atomic storage operation.
trait Atomic: OpenMlsProvider + Sized + 'static {
    fn atomic<T>(&self, f: impl FnOnce(&Self) -> T) -> T;
}

impl Atomic for SledProvider {
    fn atomic<T>(&self, f: impl FnOnce(&Self) -> T) -> T {
        let tx = self.begin();
        let out = f(&tx);
        tx.commit().expect("commit transaction");
        out
    }
}

impl Atomic for OpenMlsRustCrypto {
    fn atomic<T>(&self, f: impl FnOnce(&Self) -> T) -> T {
        f(self)
    }
}

// ----- a group member -----

struct Client<P> {
    name: String,
    provider: P,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    group: Option<MlsGroup>,
}

fn credential(name: &str, signer: &SignatureKeyPair) -> CredentialWithKey {
    CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    }
}

impl<P: Atomic> Client<P> {
    fn new(name: &str, provider: P) -> Self {
        let signer = SignatureKeyPair::new(CS.signature_algorithm()).unwrap();
        provider.atomic(|p| signer.store(p.storage())).unwrap();
        Client {
            credential: credential(name, &signer),
            name: name.to_owned(),
            provider,
            signer,
            group: None,
        }
    }

    fn key_package(&self) -> KeyPackage {
        self.provider.atomic(|p| {
            KeyPackage::builder()
                .build(CS, p, &self.signer, self.credential.clone())
                .unwrap()
                .key_package()
                .clone()
        })
    }

    fn create_group(&mut self) {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CS)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .build();
        let group = self.provider.atomic(|p| {
            MlsGroup::new_with_group_id(
                p,
                &self.signer,
                &config,
                GroupId::from_slice(GROUP_ID),
                self.credential.clone(),
            )
            .unwrap()
        });
        self.group = Some(group);
    }

    /// Add members and merge; returns (commit, welcome) as wire bytes.
    fn add(&mut self, kps: &[KeyPackage]) -> (Vec<u8>, Vec<u8>) {
        let (signer, group) = (&self.signer, self.group.as_mut().unwrap());
        self.provider.atomic(|p| {
            let (commit, welcome, _) = group.add_members(p, signer, kps).unwrap();
            group.merge_pending_commit(p).unwrap();
            (
                commit.tls_serialize_detached().unwrap(),
                welcome.tls_serialize_detached().unwrap(),
            )
        })
    }

    fn remove(&mut self, victim: &str) -> Vec<u8> {
        let (signer, group) = (&self.signer, self.group.as_mut().unwrap());
        let index = group
            .members()
            .find(|m| m.credential.serialized_content() == victim.as_bytes())
            .expect("victim is a member")
            .index;
        self.provider.atomic(|p| {
            let (commit, _, _) = group.remove_members(p, signer, &[index]).unwrap();
            group.merge_pending_commit(p).unwrap();
            commit.tls_serialize_detached().unwrap()
        })
    }

    fn join(&mut self, welcome: &[u8]) {
        let config = MlsGroupJoinConfig::builder()
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .build();
        let MlsMessageBodyIn::Welcome(welcome) = MlsMessageIn::tls_deserialize_exact(welcome)
            .unwrap()
            .extract()
        else {
            panic!("not a welcome")
        };
        let group = self.provider.atomic(|p| {
            StagedWelcome::new_from_welcome(p, &config, welcome, None)
                .unwrap()
                .into_group(p)
                .unwrap()
        });
        self.group = Some(group);
    }

    fn send(&mut self, text: &[u8]) -> Vec<u8> {
        let (signer, group) = (&self.signer, self.group.as_mut().unwrap());
        self.provider.atomic(|p| {
            group
                .create_message(p, signer, text)
                .unwrap()
                .tls_serialize_detached()
                .unwrap()
        })
    }

    /// Process one message (merging a commit); returns an application message's text.
    fn receive(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let group = self.group.as_mut().unwrap();
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).unwrap();
        let protocol = msg.try_into_protocol_message().unwrap();
        self.provider.atomic(
            |p| match group.process_message(p, protocol).unwrap().into_content() {
                ProcessedMessageContent::ApplicationMessage(app) => Some(app.into_bytes()),
                ProcessedMessageContent::StagedCommitMessage(staged) => {
                    group.merge_staged_commit(p, *staged).unwrap();
                    None
                }
                other => panic!("unexpected message content {other:?}"),
            },
        )
    }

    fn epoch(&self) -> u64 {
        self.group.as_ref().unwrap().epoch().as_u64()
    }
}

/// Alice creates the group with Bob and `extra` more members (whose key
/// packages come from throw-away memory providers; they never join). Bob joins.
fn base_group<P: Atomic>(make: &mut dyn FnMut(&str) -> P, extra: usize) -> (Client<P>, Client<P>) {
    let mut alice = Client::new("alice", make("alice"));
    let mut bob = Client::new("bob", make("bob"));
    alice.create_group();
    let mut kps = vec![bob.key_package()];
    for i in 0..extra {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(CS.signature_algorithm()).unwrap();
        signer.store(provider.storage()).unwrap();
        let kp = KeyPackage::builder()
            .build(
                CS,
                &provider,
                &signer,
                credential(&format!("extra-{i}"), &signer),
            )
            .unwrap();
        kps.push(kp.key_package().clone());
    }
    let (_commit, welcome) = alice.add(&kps);
    bob.join(&welcome);
    assert_eq!(alice.epoch(), bob.epoch());
    (alice, bob)
}

// ----- fixtures: one timed iteration each -----

/// Up to three timed phases of one iteration.
type Phases = [Duration; 3];

trait Fixture {
    fn step(&mut self) -> Phases;
}

/// Operations 1 and 2: Alice sends, Bob processes.
struct AppMessage<P> {
    alice: Client<P>,
    bob: Client<P>,
    counter: u64,
}

impl<P: Atomic> Fixture for AppMessage<P> {
    fn step(&mut self) -> Phases {
        self.counter += 1;
        let text = format!("message number {}", self.counter).into_bytes();
        let t0 = Instant::now();
        let wire = self.alice.send(&text);
        let t1 = Instant::now();
        let got = self.bob.receive(&wire);
        let t2 = Instant::now();
        assert_eq!(got.as_deref(), Some(text.as_slice()));
        [t1 - t0, t2 - t1, Duration::ZERO]
    }
}

/// Operation 3: add a fresh member (timed), then remove it again (untimed).
struct AddCycle<P> {
    alice: Client<P>,
    bob: Client<P>,
    new_provider: Box<dyn FnMut(usize) -> P>,
    counter: usize,
}

impl<P: Atomic> Fixture for AddCycle<P> {
    fn step(&mut self) -> Phases {
        self.counter += 1;
        let name = format!("joiner-{}", self.counter);
        let mut joiner = Client::new(&name, (self.new_provider)(self.counter));
        let kp = joiner.key_package();

        let t0 = Instant::now();
        let (commit, welcome) = self.alice.add(&[kp]);
        let t1 = Instant::now();
        assert!(self.bob.receive(&commit).is_none());
        let t2 = Instant::now();
        joiner.join(&welcome);
        let t3 = Instant::now();

        assert_eq!(joiner.epoch(), self.alice.epoch());
        assert_eq!(self.bob.epoch(), self.alice.epoch());
        let commit = self.alice.remove(&joiner.name);
        assert!(self.bob.receive(&commit).is_none());
        assert_eq!(self.alice.group.as_ref().unwrap().members().count(), 2);
        [t1 - t0, t2 - t1, t3 - t2]
    }
}

// ----- provider kinds -----

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Memory,
    Sled(Durability),
}

impl Kind {
    const ALL: [Kind; 3] = [
        Kind::Memory,
        Kind::Sled(Durability::Batched),
        Kind::Sled(Durability::Sync),
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Memory => "memory",
            Kind::Sled(Durability::Batched) => "sled Batched",
            Kind::Sled(Durability::Sync) => "sled Sync",
            Kind::Sled(Durability::Flush) => "sled Flush",
        }
    }
}

fn open_sled(dir: &Path, durability: Durability) -> Store {
    std::fs::create_dir_all(dir).unwrap();
    let config = StoreConfig {
        durability,
        ..StoreConfig::default()
    };
    Store::open(dir, config).expect("open store")
}

/// One operation's setup for one provider kind; `dir` is unique to it.
fn build(op: Op, kind: Kind, dir: &Path) -> Box<dyn Fixture> {
    match kind {
        Kind::Memory => build_with(op, &mut |_| OpenMlsRustCrypto::default(), || {
            Box::new(|_| OpenMlsRustCrypto::default())
        }),
        Kind::Sled(durability) => {
            let members_dir = dir.to_owned();
            let mut make = move |name: &str| {
                let store = open_sled(&members_dir.join(name), durability);
                SledProvider::new(store.storage(name.as_bytes()).unwrap())
            };
            let joiners_dir = dir.join("joiners");
            build_with(op, &mut make, move || {
                let store = open_sled(&joiners_dir, durability);
                Box::new(move |i| {
                    let ns = format!("joiner-{i}");
                    SledProvider::new(store.storage(ns.as_bytes()).unwrap())
                })
            })
        }
    }
}

fn build_with<P: Atomic>(
    op: Op,
    make: &mut dyn FnMut(&str) -> P,
    joiners: impl FnOnce() -> Box<dyn FnMut(usize) -> P>,
) -> Box<dyn Fixture> {
    match op {
        Op::AppMessage2 | Op::AppMessage50 => {
            let extra = if op == Op::AppMessage2 { 0 } else { 48 };
            let (alice, bob) = base_group(make, extra);
            Box::new(AppMessage {
                alice,
                bob,
                counter: 0,
            })
        }
        Op::AddCycle => {
            let (alice, bob) = base_group(make, 0);
            Box::new(AddCycle {
                alice,
                bob,
                new_provider: joiners(),
                counter: 0,
            })
        }
    }
}

// ----- operations and iteration plan -----

#[derive(Clone, Copy, PartialEq)]
enum Op {
    AppMessage2,
    AppMessage50,
    AddCycle,
}

struct Plan {
    warmup: usize,
    min: usize,
    max: usize,
    block: usize,
    budget: Duration,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AppMessage2 => "app msg, 2 members",
            Op::AppMessage50 => "app msg, 50 members",
            Op::AddCycle => "add cycle, 2 members",
        }
    }

    fn phases(self) -> &'static [&'static str] {
        match self {
            Op::AppMessage2 | Op::AppMessage50 => &["create_message", "process_message"],
            Op::AddCycle => &["add+merge", "process+merge", "join (Welcome)"],
        }
    }

    fn plan(self, quick: bool) -> Plan {
        if quick {
            return Plan {
                warmup: 3,
                min: 20,
                max: 20,
                block: 10,
                budget: Duration::ZERO,
            };
        }
        let (max, budget) = match self {
            Op::AppMessage2 => (2000, 40),
            Op::AppMessage50 => (2000, 40),
            Op::AddCycle => (1000, 60),
        };
        Plan {
            warmup: 50,
            min: 200,
            max,
            block: 50,
            budget: Duration::from_secs(budget),
        }
    }
}

struct Case {
    kind: Kind,
    fixture: Box<dyn Fixture>,
    samples: Vec<Phases>,
}

/// Run the cases interleaved, block by block, rotating the order each round,
/// until every case has `max` samples, or the budget is spent and every case
/// has at least `min`.
fn run(cases: &mut [Case], plan: &Plan) {
    for case in cases.iter_mut() {
        for _ in 0..plan.warmup {
            case.fixture.step();
        }
    }
    let start = Instant::now();
    let n = cases.len();
    for round in 0.. {
        let all_max = cases.iter().all(|c| c.samples.len() >= plan.max);
        let all_min = cases.iter().all(|c| c.samples.len() >= plan.min);
        if all_max || (all_min && start.elapsed() >= plan.budget) {
            break;
        }
        for k in 0..n {
            let case = &mut cases[(k + round) % n];
            let todo = plan.block.min(plan.max.saturating_sub(case.samples.len()));
            for _ in 0..todo {
                let s = case.fixture.step();
                case.samples.push(s);
            }
        }
    }
}

// ----- statistics and output -----

/// Nearest-rank percentile of `v` (sorted in place), in microseconds.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Row {
    op: &'static str,
    kind: Kind,
    iters: usize,
    median: f64,
    p90: f64,
    phase_medians: Vec<f64>,
}

fn summarize(op: Op, cases: &[Case]) -> Vec<Row> {
    let phases = op.phases().len();
    cases
        .iter()
        .map(|c| {
            let mut total: Vec<f64> = c
                .samples
                .iter()
                .map(|s| micros(s.iter().sum::<Duration>()))
                .collect();
            let phase_medians = (0..phases)
                .map(|i| {
                    let mut v: Vec<f64> = c.samples.iter().map(|s| micros(s[i])).collect();
                    percentile(&mut v, 0.5)
                })
                .collect();
            Row {
                op: op.name(),
                kind: c.kind,
                iters: c.samples.len(),
                median: percentile(&mut total, 0.5),
                p90: percentile(&mut total, 0.9),
                phase_medians,
            }
        })
        .collect()
}

/// Append every sample as CSV (`op,provider,iteration,phase µs...`), for
/// looking at the distribution or the time series.
fn dump_raw(path: &Path, op: Op, cases: &[Case]) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open MLS_BENCH_RAW file");
    for c in cases {
        for (i, s) in c.samples.iter().enumerate() {
            let phases: Vec<String> = s.iter().map(|d| format!("{:.1}", micros(*d))).collect();
            writeln!(
                f,
                "{},{},{i},{}",
                op as u8 + 1,
                c.kind.label(),
                phases.join(",")
            )
            .unwrap();
        }
    }
}

fn ratio(value: f64, memory: Option<f64>) -> String {
    memory.map_or_else(|| "n/a".to_owned(), |m| format!("{:.2}x", value / m))
}

fn print_tables(results: &[(Op, Vec<Row>)]) {
    println!("\n## Per operation (wall time per iteration, microseconds)\n");
    println!("| operation | provider | iters | median µs | p90 µs | median / memory |");
    println!("|---|---|---:|---:|---:|---:|");
    for (_, rows) in results {
        let memory = rows
            .iter()
            .find(|r| r.kind == Kind::Memory)
            .map(|r| r.median);
        for r in rows {
            println!(
                "| {} | {} | {} | {:.0} | {:.0} | {} |",
                r.op,
                r.kind.label(),
                r.iters,
                r.median,
                r.p90,
                ratio(r.median, memory)
            );
        }
    }
    println!("\n## Phase medians (microseconds; each phase is one atomic storage operation)\n");
    println!("| operation | phase | provider | median µs | median / memory |");
    println!("|---|---|---|---:|---:|");
    for (op, rows) in results {
        let memory = rows.iter().find(|r| r.kind == Kind::Memory);
        for (i, phase) in op.phases().iter().enumerate() {
            for r in rows {
                println!(
                    "| {} | {} | {} | {:.0} | {} |",
                    op.name(),
                    phase,
                    r.kind.label(),
                    r.phase_medians[i],
                    ratio(r.phase_medians[i], memory.map(|m| m.phase_medians[i]))
                );
            }
        }
    }
}

/// Comma-separated filter from the environment; `None` when unset (keep all).
fn env_list(var: &str) -> Option<Vec<String>> {
    let v = std::env::var(var).ok()?;
    Some(v.split(',').map(|s| s.trim().to_lowercase()).collect())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("MLS_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let parent: PathBuf = std::env::var_os("MLS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    // Optional filters, for profiling one case: MLS_BENCH_OPS=1,3 and
    // MLS_BENCH_PROVIDERS=memory,batched,sync.
    let ops_filter = env_list("MLS_BENCH_OPS");
    let kinds_filter = env_list("MLS_BENCH_PROVIDERS");
    let ops: Vec<Op> = [Op::AppMessage2, Op::AppMessage50, Op::AddCycle]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| {
            ops_filter
                .as_ref()
                .is_none_or(|f| f.contains(&(i + 1).to_string()))
        })
        .map(|(_, op)| op)
        .collect();
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| {
            let short = k.label().rsplit(' ').next().unwrap().to_lowercase();
            kinds_filter.as_ref().is_none_or(|f| f.contains(&short))
        })
        .collect();
    let root = tempfile::Builder::new()
        .prefix("mls-bench-")
        .tempdir_in(&parent)
        .expect("temporary directory");
    println!(
        "mls_ops: sled vs memory provider; ciphersuite {CS:?}; databases under {}{}",
        root.path().display(),
        if quick {
            "; QUICK run (few iterations)"
        } else {
            ""
        }
    );

    let started = Instant::now();
    let mut results = Vec::new();
    for op in ops {
        let plan = op.plan(quick);
        let op_start = Instant::now();
        // memory and sled Batched run interleaved with each other; sled Sync
        // runs on its own afterwards, so that its fsyncs do not disturb the
        // Batched figures.
        let mut rows = Vec::new();
        for sync_group in [false, true] {
            let mut cases: Vec<Case> = kinds
                .iter()
                .enumerate()
                .filter(|(_, &k)| (k == Kind::Sled(Durability::Sync)) == sync_group)
                .map(|(i, &kind)| Case {
                    kind,
                    fixture: build(op, kind, &root.path().join(format!("op{}-{i}", op as u8))),
                    samples: Vec::new(),
                })
                .collect();
            run(&mut cases, &plan);
            rows.extend(summarize(op, &cases));
            if let Some(path) = std::env::var_os("MLS_BENCH_RAW") {
                dump_raw(Path::new(&path), op, &cases);
            }
            // Drop the fixtures (and close their databases) before going on.
            drop(cases);
        }
        eprintln!(
            "{}: {} iterations per provider in {:.1} s",
            op.name(),
            rows.first().map_or(0, |r| r.iters),
            op_start.elapsed().as_secs_f64()
        );
        results.push((op, rows));
    }
    print_tables(&results);
    println!("\ntotal {:.1} s", started.elapsed().as_secs_f64());
}
