//! Crash tests.
//!
//! 1. A child process (this test binary, re-executed) runs MLS operations in a
//!    loop against a data directory, two members sharing one sled store. The
//!    parent SIGKILLs it at seeded random moments, reopens the store and checks
//!    that both groups load, that the interrupted member is at the epoch before
//!    or after the interrupted operation, that every committed message is
//!    delivered exactly once, and that the members still converge and talk.
//! 2. Injected failures: each atomic MLS operation is aborted after k of its n
//!    writes, for every k; storage must be exactly as before, and the group
//!    must then complete the same operation.
//!
//! Messages travel through a log kept in the members' own record trees, in the
//! same transaction as the MLS operation that produced or consumed them, the
//! way the SDK pairs its queue cursor with group state.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{create_config, group_id, join_config, CS};
use mls_ds_storage::{RecordTree, SledProvider, SledStorage, Store, StoreConfig};
use openmls::prelude::{tls_codec::*, *};
use openmls_basic_credential::SignatureKeyPair;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "MLS_DS_STORAGE_CRASH_CHILD";
const NAMES: [&str; 2] = ["alice", "bob"];

/// One member, opened from the shared store.
struct Peer {
    name: &'static str,
    provider: SledProvider,
    records: RecordTree,
    signer: SignatureKeyPair,
    group: MlsGroup,
}

fn u64_at(s: &SledStorage, tree: RecordTree, key: &[u8]) -> u64 {
    s.get_raw(tree, key)
        .unwrap()
        .map(|v| u64::from_be_bytes(v.as_slice().try_into().expect("8-byte counter")))
        .unwrap_or(0)
}

fn out_key(seq: u64) -> Vec<u8> {
    [b"out/".as_slice(), &seq.to_be_bytes()].concat()
}

fn recv_key(seq: u64) -> Vec<u8> {
    [b"recv/".as_slice(), &seq.to_be_bytes()].concat()
}

impl Peer {
    fn open(store: &Store, name: &'static str) -> Peer {
        let storage = store.storage(name.as_bytes()).unwrap();
        let records = store.record_tree("crash").unwrap();
        let public = storage
            .get_raw(records, b"identity")
            .unwrap()
            .expect("identity");
        let signer = SignatureKeyPair::read(&storage, &public, CS.signature_algorithm())
            .expect("signer loads");
        let group = MlsGroup::load(&storage, &group_id())
            .expect("group loads without error")
            .expect("group exists");
        Peer {
            name,
            provider: SledProvider::new(storage),
            records,
            signer,
            group,
        }
    }

    fn cursor(&self) -> u64 {
        u64_at(self.provider.storage(), self.records, b"cursor")
    }

    /// The next log entry this member has to process, if the peer wrote it.
    fn pending(&self, peer: &SledStorage) -> Option<Vec<u8>> {
        peer.get_raw(self.records, &out_key(self.cursor() + 1))
            .unwrap()
    }

    fn reload(&mut self) {
        self.group = MlsGroup::load(self.provider.storage(), &group_id())
            .unwrap()
            .unwrap();
    }

    /// Send an application message (`commit == false`) or a self-update commit.
    fn send(&mut self, commit: bool, text: &[u8]) {
        let seq = self.cursor() + 1;
        let tx = self.provider.begin();
        let bytes = if commit {
            let bundle = self
                .group
                .self_update(&*tx, &self.signer, LeafNodeParameters::default())
                .unwrap();
            self.group.merge_pending_commit(&*tx).unwrap();
            bundle.commit().tls_serialize_detached().unwrap()
        } else {
            self.group
                .create_message(&*tx, &self.signer, text)
                .unwrap()
                .tls_serialize_detached()
                .unwrap()
        };
        let s = tx.storage();
        s.put_raw(self.records, &out_key(seq), &bytes).unwrap();
        s.put_raw(self.records, b"cursor", &seq.to_be_bytes())
            .unwrap();
        tx.commit().unwrap();
    }

    /// Process the next entry of the peer's log; returns its plaintext if it
    /// was an application message.
    fn process_next(&mut self, peer: &SledStorage) -> Option<Vec<u8>> {
        let seq = self.cursor() + 1;
        let bytes = self.pending(peer).expect("an entry is pending");
        let msg = MlsMessageIn::tls_deserialize_exact(&bytes).unwrap();
        let tx = self.provider.begin();
        let processed = self
            .group
            .process_message(&*tx, msg.try_into_protocol_message().unwrap())
            .unwrap_or_else(|e| panic!("{} processes entry {seq}: {e:?}", self.name));
        let text = match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Some(app.into_bytes()),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                self.group.merge_staged_commit(&*tx, *staged).unwrap();
                None
            }
            other => panic!("unexpected content {other:?}"),
        };
        let s = tx.storage();
        if let Some(text) = &text {
            assert!(
                s.get_raw(self.records, &recv_key(seq)).unwrap().is_none(),
                "{} would receive entry {seq} twice",
                self.name
            );
            s.put_raw(self.records, &recv_key(seq), text).unwrap();
        }
        s.put_raw(self.records, b"cursor", &seq.to_be_bytes())
            .unwrap();
        tx.commit().unwrap();
        text
    }

    fn secret(&self) -> Vec<u8> {
        self.group
            .export_secret(self.provider.crypto(), "crash", b"", 32)
            .unwrap()
    }
}

/// Open both members and bring each up to date with the other's log.
fn open_and_catch_up(store: &Store) -> [Peer; 2] {
    let mut peers = NAMES.map(|n| Peer::open(store, n));
    loop {
        let mut progressed = false;
        for i in 0..2 {
            let other = peers[1 - i].provider.storage().clone();
            if peers[i].pending(&other).is_some() {
                peers[i].process_next(&other);
                progressed = true;
            }
        }
        if !progressed {
            return peers;
        }
    }
}

/// Create both identities and the two-member group (run once, in the parent).
fn setup(dir: &Path) {
    let store = Store::open(dir, StoreConfig::default()).unwrap();
    let records = store.record_tree("crash").unwrap();
    let mut ids = Vec::new();
    for name in NAMES {
        let storage = store.storage(name.as_bytes()).unwrap();
        let signer = SignatureKeyPair::new(CS.signature_algorithm()).unwrap();
        signer.store(&storage).unwrap();
        storage
            .put_raw(records, b"identity", signer.public())
            .unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        ids.push((SledProvider::new(storage), signer, credential));
    }
    let (bob_p, bob_s, bob_c) = &ids[1];
    let bob_kp = bob_p
        .transaction(|p| {
            KeyPackage::builder()
                .build(CS, p, bob_s, bob_c.clone())
                .map_err(|e| mls_ds_storage::StorageError::Injected(e.to_string().len()))
        })
        .unwrap()
        .key_package()
        .clone();
    let (alice_p, alice_s, alice_c) = &ids[0];
    let tx = alice_p.begin();
    let mut group =
        MlsGroup::new_with_group_id(&*tx, alice_s, &create_config(), group_id(), alice_c.clone())
            .unwrap();
    let (_, welcome, _) = group.add_members(&*tx, alice_s, &[bob_kp]).unwrap();
    group.merge_pending_commit(&*tx).unwrap();
    tx.commit().unwrap();
    let MlsMessageBodyOut::Welcome(welcome) = welcome.body() else {
        panic!("not a welcome")
    };
    let tx = bob_p.begin();
    StagedWelcome::new_from_welcome(&*tx, &join_config(), welcome.clone(), None)
        .unwrap()
        .into_group(&*tx)
        .unwrap();
    tx.commit().unwrap();
}

/// The child: run operations forever, announcing each before and after.
fn child_loop(dir: &Path, seed: u64) -> ! {
    let store = Store::open(dir, StoreConfig::default()).unwrap();
    let mut peers = open_and_catch_up(&store);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut n = 0u64;
    loop {
        n += 1;
        let i = rng.gen_range(0..2);
        let other = peers[1 - i].provider.storage().clone();
        let p = &mut peers[i];
        let before = p.group.epoch().as_u64();
        let kind = if p.pending(&other).is_some() {
            "deliver"
        } else if rng.gen_bool(0.4) {
            "commit"
        } else {
            "message"
        };
        println!("BEGIN {} {kind} {before}", p.name);
        match kind {
            "deliver" => {
                p.process_next(&other);
            }
            "commit" => p.send(true, b""),
            _ => p.send(false, format!("{} #{n}", p.name).as_bytes()),
        }
        println!("END {} {}", p.name, p.group.epoch().as_u64());
    }
}

#[test]
fn crash_child_entry() {
    // Only does something when re-executed by `sigkill_at_random_moments`.
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (seed, dir) = spec.split_once(':').expect("seed:dir");
        child_loop(Path::new(dir), seed.parse().unwrap());
    }
}

#[test]
fn sigkill_at_random_moments() {
    let kills: u64 = std::env::var("MLS_DS_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("MLS_DS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    println!("crash test seed {seed} kills {kills}");
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exe = std::env::current_exe().unwrap();
    let mut interrupted_ops = 0;
    let mut total_ops = 0;
    for cycle in 0..kills {
        let child_seed: u64 = rng.gen();
        let mut child = Command::new(&exe)
            .args([
                "crash_child_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{child_seed}:{}", dir.path().display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it get going (opening and catching up takes a few ms), then kill.
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..160)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let lines: Vec<String> = out.lines().map_while(Result::ok).collect();
        let ops = lines.iter().filter(|l| l.starts_with("BEGIN")).count();
        total_ops += ops;

        let store = Store::open(dir.path(), StoreConfig::default())
            .unwrap_or_else(|e| panic!("cycle {cycle} (seed {seed}): reopen failed: {e}"));
        // Loading must work before any catch-up, and the interrupted member
        // must be at the epoch before or after its operation.
        let raw = NAMES.map(|n| Peer::open(&store, n));
        if let Some(last) = lines.iter().rev().find(|l| l.starts_with("BEGIN")) {
            let parts: Vec<&str> = last.split_whitespace().collect();
            let (who, kind, before): (&str, &str, u64) =
                (parts[1], parts[2], parts[3].parse().unwrap());
            let peer = raw.iter().find(|p| p.name == who).unwrap();
            let now = peer.group.epoch().as_u64();
            let allowed = if kind == "message" {
                vec![before]
            } else {
                vec![before, before + 1]
            };
            assert!(
                allowed.contains(&now),
                "cycle {cycle} (seed {seed}): {who} interrupted in {kind} at epoch {before} is at {now}"
            );
            if lines.last().is_some_and(|l| l.starts_with("BEGIN")) {
                interrupted_ops += 1;
            }
        }
        drop(raw);
        let mut peers = open_and_catch_up(&store);
        assert_eq!(peers[0].cursor(), peers[1].cursor(), "cycle {cycle}: logs");
        assert_eq!(
            peers[0].group.epoch(),
            peers[1].group.epoch(),
            "cycle {cycle}"
        );
        assert_eq!(
            peers[0].secret(),
            peers[1].secret(),
            "cycle {cycle}: secrets"
        );
        // They still talk, both ways.
        for i in 0..2 {
            let text = format!("after crash {cycle} from {i}");
            peers[i].send(false, text.as_bytes());
            let other = peers[i].provider.storage().clone();
            let got = peers[1 - i].process_next(&other);
            assert_eq!(got.as_deref(), Some(text.as_bytes()));
        }
        peers.iter_mut().for_each(Peer::reload);
    }
    // Exactly-once delivery: every application message in one member's log
    // was received by the other exactly once (a duplicate would have failed
    // in `process_next`), and nothing committed was lost.
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let peers = open_and_catch_up(&store);
    let mut delivered = 0;
    for i in 0..2 {
        let me = peers[i].provider.storage();
        let other = peers[1 - i].provider.storage();
        for (key, _) in me.scan_raw(peers[i].records, b"out/").unwrap() {
            let seq = u64::from_be_bytes(key[4..].try_into().unwrap());
            let bytes = me.get_raw(peers[i].records, &key).unwrap().unwrap();
            let is_app = matches!(
                MlsMessageIn::tls_deserialize_exact(&bytes)
                    .unwrap()
                    .extract(),
                MlsMessageBodyIn::PrivateMessage(_)
            );
            let got = other.get_raw(peers[i].records, &recv_key(seq)).unwrap();
            assert_eq!(got.is_some(), is_app, "entry {seq} of {}", peers[i].name);
            delivered += usize::from(is_app);
        }
    }
    println!(
        "crash test: {kills} kills, {total_ops} operations started, {interrupted_ops} killed mid-operation, {delivered} application messages delivered exactly once"
    );
    assert!(total_ops > kills as usize, "children made progress");
    assert!(delivered > 0);
}

/// Run `op` with a failure injected after k writes for k = 0, 1, ... until it
/// succeeds; after each failure storage must be unchanged (checked by
/// reloading the group and comparing with the state before).
fn for_every_k<T>(
    provider: &SledProvider,
    group: &mut MlsGroup,
    mut op: impl FnMut(&SledProvider, &mut MlsGroup) -> Option<T>,
) -> (usize, T) {
    let before = MlsGroup::load(provider.storage(), group.group_id()).unwrap();
    for k in 0.. {
        let tx = provider.begin();
        tx.storage().inject_failure_after(k);
        match op(&tx, group) {
            Some(out) => {
                assert_eq!(tx.storage().transaction_write_count(), k);
                tx.commit().unwrap();
                return (k, out);
            }
            None => {
                drop(tx);
                let reloaded = MlsGroup::load(provider.storage(), group.group_id()).unwrap();
                assert!(
                    reloaded == before,
                    "state changed after failure at write {k}"
                );
                *group = reloaded.unwrap();
            }
        }
        assert!(k < 1000, "operation never completed");
    }
    unreachable!()
}

#[test]
fn operations_aborted_after_every_k_writes_leave_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let [mut alice, mut bob] = NAMES.map(|n| Peer::open(&store, n));

    // Commit (self-update + merge) on alice.
    let signer = &alice.signer;
    let (n_commit, commit) = for_every_k(&alice.provider, &mut alice.group, |p, g| {
        let bundle = g
            .self_update(p, signer, LeafNodeParameters::default())
            .ok()?;
        g.merge_pending_commit(p).ok()?;
        Some(bundle.commit().tls_serialize_detached().unwrap())
    });
    // Processing and merging that commit on bob.
    let (n_process, ()) = for_every_k(&bob.provider, &mut bob.group, |p, g| {
        let msg = MlsMessageIn::tls_deserialize_exact(&commit).unwrap();
        let processed = g
            .process_message(p, msg.try_into_protocol_message().unwrap())
            .ok()?;
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("expected a commit")
        };
        g.merge_staged_commit(p, *staged).ok()
    });
    // An application message each way.
    let signer = &bob.signer;
    let (n_send, msg) = for_every_k(&bob.provider, &mut bob.group, |p, g| {
        Some(
            g.create_message(p, signer, b"hi")
                .ok()?
                .tls_serialize_detached()
                .unwrap(),
        )
    });
    let (n_recv, text) = for_every_k(&alice.provider, &mut alice.group, |p, g| {
        let m = MlsMessageIn::tls_deserialize_exact(&msg).unwrap();
        let processed = g
            .process_message(p, m.try_into_protocol_message().unwrap())
            .ok()?;
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Some(app.into_bytes()),
            _ => panic!("expected an application message"),
        }
    });
    assert_eq!(text, b"hi");
    assert_eq!(alice.group.epoch(), bob.group.epoch());
    assert_eq!(alice.secret(), bob.secret());
    println!(
        "writes per operation: commit+merge {n_commit}, process+merge {n_process}, send {n_send}, receive {n_recv}"
    );
    assert!(
        n_commit > 5 && n_process > 5,
        "operations write several keys"
    );
}
