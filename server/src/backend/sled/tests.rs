//! Tests of the sled backend through the `Backend` trait: queues (fan-out,
//! acknowledgements, retention, deletion, the index rebuilt from disk, the
//! crash prefixes of key-by-key writes), conditions, send receipts, and live
//! backups. Over 500 lines because it is only tests, each of one backend
//! behaviour, sharing the helpers at the top; splitting them would repeat
//! those helpers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mls_ds_protocol::ClientId;

use super::layout;
use super::{SledBackend, SledConfig, StoreTuning};
use crate::backend::records::{
    ClientRecord, GroupId, GroupRecord, KeyPackageRecord, StoredMessage,
};
use crate::backend::write_set::{Change, Condition, Delivery, WriteSet};
use crate::backend::{Backend, StoreError};

/// A small page cache; sled's snapshot schedule at its default.
pub(super) const TUNING: StoreTuning = StoreTuning {
    cache_mb: 16,
    snapshot_every_ops: 1_000_000,
};

pub(super) fn open(dir: &Path) -> SledBackend {
    open_with_depth(dir, u64::MAX)
}

pub(super) fn open_with_depth(dir: &Path, max_queue_depth: u64) -> SledBackend {
    open_with(dir, max_queue_depth, 0)
}

/// With a queue bound and a checkpoint of the queue index every
/// `checkpoint_every` jobs (0: at a stop only).
pub(super) fn open_with(dir: &Path, max_queue_depth: u64, checkpoint_every: u64) -> SledBackend {
    try_open(dir, max_queue_depth, checkpoint_every).unwrap()
}

/// [`open_with`], its error returned.
fn try_open(
    dir: &Path,
    max_queue_depth: u64,
    checkpoint_every: u64,
) -> Result<SledBackend, StoreError> {
    SledBackend::open(
        dir,
        SledConfig {
            store: TUNING,
            max_queue_depth,
            index_checkpoint_every_ops: checkpoint_every,
            receipts_run_size: 65_536,
            roster_min_members: super::rosters::MIN_MEMBERS,
        },
    )
}

pub(super) fn id(s: &str) -> ClientId {
    ClientId::new(s).unwrap()
}

/// A small message accepted at `stored_ms` (the index's tests use it too).
pub(super) fn message(stored_ms: u64) -> StoredMessage {
    StoredMessage {
        kind: 1,
        group_id: b"g".to_vec(),
        epoch: 0,
        sender: b"s".to_vec(),
        message: vec![1, 2, 3],
        stored_ms,
        send: None,
        ratchet_tree: Vec::new(),
    }
}

pub(super) fn delivery(stored_ms: u64, to: &[&ClientId]) -> Delivery {
    Delivery {
        message: message(stored_ms),
        recipients: to.iter().map(|c| (*c).clone()).collect(),
        sender_at: None,
        receipt: None,
    }
}

pub(super) async fn send(b: &SledBackend, stored_ms: u64, to: &[&ClientId]) -> u64 {
    let set = WriteSet {
        deliveries: vec![delivery(stored_ms, to)],
        ..WriteSet::default()
    };
    b.submit(set).wait().await.unwrap().deliveries[0].message_id
}

pub(super) async fn seqs(b: &SledBackend, c: &ClientId, after: u64) -> Vec<u64> {
    let page = b.page(c, after, 100, 1 << 20).await.unwrap();
    page.entries.iter().map(|e| e.seq).collect()
}

fn stored(b: &SledBackend) -> u64 {
    b.stats().stored_messages
}

#[tokio::test]
async fn fan_out_ack_and_body_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let (a, c) = (id("a"), id("c"));
    for _ in 0..3 {
        send(&b, 1, &[&a, &c]).await;
    }
    assert_eq!(stored(&b), 3);
    assert_eq!(seqs(&b, &a, 0).await, vec![1, 2, 3]);
    // Pages are bounded by count, and any queue drains page by page.
    let page = b.page(&a, 1, 1, 1 << 20).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].seq, 2);
    assert!(matches!(
        b.ack(&a, 9).wait().await,
        Err(StoreError::AckBeyondHead { up_to: 9, head: 3 })
    ));
    let acked = b.ack(&a, 3).wait().await.unwrap();
    assert_eq!((acked.acked, acked.remaining), (3, 0));
    assert_eq!(stored(&b), 3, "c still needs them");
    b.ack(&c, 2).wait().await.unwrap();
    assert_eq!(stored(&b), 1);
    b.ack(&c, 3).wait().await.unwrap();
    assert_eq!(stored(&b), 0);
    // Sequence numbers continue after everything was acknowledged.
    send(&b, 1, &[&a]).await;
    assert_eq!(seqs(&b, &a, 3).await, vec![4]);
}

#[tokio::test]
async fn retention_drops_old_entries_and_moves_the_ack_mark() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let (a, c) = (id("a"), id("c"));
    send(&b, 100, &[&a, &c]).await;
    send(&b, 200, &[&a]).await;
    send(&b, 5_000, &[&a, &c]).await;
    b.ack(&c, 1).wait().await.unwrap();
    let dropped = b.expire(1_000).wait().await.unwrap();
    assert_eq!(dropped, 2, "a's two old entries");
    let page = b.page(&a, 0, 10, 1 << 20).await.unwrap();
    assert_eq!(page.acked, 2);
    assert_eq!(seqs(&b, &a, 0).await, vec![3]);
    assert_eq!(stored(&b), 1);
    assert_eq!(seqs(&b, &c, 1).await, vec![2]);
    assert_eq!(
        b.expire(1_000).wait().await.unwrap(),
        0,
        "nothing left to expire"
    );
}

pub(super) fn client_record() -> ClientRecord {
    ClientRecord {
        signature_scheme: 0x0807,
        signature_key: vec![7; 32],
        registered_ms: 1,
        deleted_ms: None,
        recovery_hash: None,
    }
}

pub(super) async fn register(b: &SledBackend, c: &ClientId) {
    let set = WriteSet {
        conditions: vec![Condition::ClientAbsent(c.clone())],
        changes: vec![Change::PutClient {
            id: c.clone(),
            record: client_record(),
        }],
        deliveries: Vec::new(),
    };
    b.submit(set).wait().await.unwrap();
}

pub(super) async fn delete(b: &SledBackend, c: &ClientId) {
    b.submit(deletion(c)).wait().await.unwrap();
}

/// `c`'s deletion of itself.
fn deletion(c: &ClientId) -> WriteSet {
    WriteSet {
        conditions: vec![Condition::ClientActive(c.clone())],
        changes: vec![Change::DeleteClient {
            id: c.clone(),
            tombstone: ClientRecord {
                deleted_ms: Some(2),
                ..client_record()
            },
        }],
        deliveries: Vec::new(),
    }
}

#[tokio::test]
async fn the_index_is_rebuilt_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c, d) = (id("a"), id("c"), id("d"));
    {
        let b = open(dir.path());
        register(&b, &d).await;
        for i in 0..5 {
            send(&b, 100 + i, &[&a, &c]).await;
        }
        send(&b, 200, &[&d]).await;
        b.ack(&a, 2).wait().await.unwrap();
        b.ack(&c, 5).wait().await.unwrap();
        delete(&b, &d).await;
        assert_eq!(stored(&b), 3);
    }
    let b = open(dir.path());
    assert_eq!(seqs(&b, &a, 0).await, vec![3, 4, 5]);
    assert!(seqs(&b, &c, 0).await.is_empty());
    assert!(seqs(&b, &d, 0).await.is_empty());
    assert_eq!(stored(&b), 3);
    let report = super::queue_startup::verify(&b.layout, super::Serving::Stopped);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.entries, report.messages), (3, 3));
    // New entries continue each queue's numbering; the deleted client gets
    // none, after a restart too.
    let sent = b
        .submit(WriteSet {
            deliveries: vec![delivery(300, &[&a, &c, &d])],
            ..WriteSet::default()
        })
        .wait()
        .await
        .unwrap();
    assert_eq!(sent.deliveries[0].recipients, 2);
    assert_eq!(seqs(&b, &a, 5).await, vec![6]);
    assert_eq!(seqs(&b, &c, 5).await, vec![6]);
    assert!(seqs(&b, &d, 0).await.is_empty());
}

/// A write that fails to be prepared after it changed the queue index (a
/// client's deletion here) breaks storage: nothing of it is applied, and
/// the index is rebuilt from the database at the reopen.
#[tokio::test]
async fn a_write_failing_after_the_index_changed_breaks_storage() {
    let dir = tempfile::tempdir().unwrap();
    let c = ClientId::new(super::apply::FAIL_AFTER_DELETING).unwrap();
    let a = id("a");
    {
        let b = open(dir.path());
        register(&b, &c).await;
        send(&b, 1, &[&c, &a]).await;
        let e = b.submit(deletion(&c)).wait().await.unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
        // Refused: the writer marked storage broken before its next job.
        assert!(b
            .submit(WriteSet {
                deliveries: vec![delivery(3, &[&a])],
                ..WriteSet::default()
            })
            .wait()
            .await
            .is_err());
        assert!(b.health().is_err(), "storage is broken");
    }
    let b = open(dir.path());
    assert_eq!(seqs(&b, &c, 0).await, vec![1], "not deleted");
    assert_eq!(seqs(&b, &a, 0).await, vec![1]);
    assert!(!b.layout.client(&c).unwrap().unwrap().is_deleted());
}

/// Many messages in one batch, and more batches than the startup scan
/// reads at a time, reload in order.
#[tokio::test]
async fn more_batches_than_one_scan_page_reload() {
    let dir = tempfile::tempdir().unwrap();
    let a = id("a");
    let in_one = 300;
    let alone = 2 * 64 + 3;
    let n = in_one + alone;
    {
        let b = open(dir.path());
        let set = WriteSet {
            deliveries: (0..in_one).map(|i| delivery(i, &[&a])).collect(),
            ..WriteSet::default()
        };
        b.submit(set).wait().await.unwrap();
        for i in in_one..n {
            send(&b, i, &[&a]).await;
        }
        let batches = b
            .layout
            .storage
            .scan_raw(b.layout.trees.delivery.handle, &[layout::BATCH_PREFIX])
            .unwrap()
            .len() as u64;
        assert_eq!(batches, alone + 1);
    }
    let b = open(dir.path());
    assert_eq!(stored(&b), n);
    let page = b.page(&a, 0, 10_000, 1 << 30).await.unwrap();
    let got: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(got, (1..=n).collect::<Vec<_>>());
}

/// Plain sends submitted together share batches, a new one started when
/// the open one is full; they reload in order, each body intact.
#[tokio::test]
async fn sends_of_one_cycle_fill_batches_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let a = id("a");
    let n = 40u64;
    {
        let b = open(dir.path());
        let pending: Vec<_> = (0..n)
            .map(|i| {
                let mut d = delivery(i, &[&a]);
                d.message.message = vec![u8::try_from(i).unwrap(); 1000];
                b.submit(WriteSet {
                    deliveries: vec![d],
                    ..WriteSet::default()
                })
            })
            .collect();
        for p in pending {
            p.wait().await.unwrap();
        }
        let batches = b
            .layout
            .storage
            .scan_raw(b.layout.trees.delivery.handle, &[layout::BATCH_PREFIX])
            .unwrap();
        // 40 KB of bodies, at most about 6 KiB a batch, and batches shared.
        assert!(
            (6..n as usize).contains(&batches.len()),
            "{} batches",
            batches.len()
        );
        assert!(batches.iter().all(|(_, v)| v.len() < 8 * 1024));
    }
    let b = open(dir.path());
    let page = b.page(&a, 0, 10_000, 1 << 30).await.unwrap();
    let got: Vec<(u64, u8)> = page
        .entries
        .iter()
        .map(|e| (e.seq, e.stored.message[0]))
        .collect();
    let want: Vec<(u64, u8)> = (1..=n).map(|s| (s, u8::try_from(s - 1).unwrap())).collect();
    assert_eq!(got, want);
}

/// Acknowledgements are applied key by key: every prefix a crash can keep
/// must reopen to a consistent state (module doc of `apply`).
#[tokio::test]
async fn crash_prefixes_of_key_by_key_writes_reopen_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (id("a"), id("c"));
    {
        let b = open(dir.path());
        send(&b, 1, &[&a, &c]).await;
        send(&b, 2, &[&a, &c]).await;
        // c's ack of message 1 cut after its mark: the message is fully
        // acknowledged but still stored.
        b.ack(&a, 1).wait().await.unwrap();
        let delivery = b.layout.trees.delivery.handle;
        let mark = layout::Mark {
            seq: 1,
            id: layout::message_id(1, 0),
        };
        b.layout
            .storage
            .put_raw(delivery, &layout::ack_key(&c), &mark.to_bytes())
            .unwrap();
        b.flush().unwrap();
    }
    // `check` on the crashed database finds nothing wrong, and startup
    // deletes the leftover.
    {
        let l = layout::Layout::open(dir.path(), TUNING).unwrap();
        let report = super::queue_startup::verify(&l, super::Serving::Stopped);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
    let b = open(dir.path());
    assert_eq!(stored(&b), 1, "only message 2 is still queued");
    assert_eq!(seqs(&b, &a, 1).await, vec![2]);
    assert_eq!(seqs(&b, &c, 1).await, vec![2]);
    let delivery = b.layout.trees.delivery.handle;
    let s = &b.layout.storage;
    assert_eq!(s.get_raw(delivery, &layout::batch_key(1)).unwrap(), None);
    assert!(s
        .get_raw(delivery, &layout::batch_key(2))
        .unwrap()
        .is_some());
    // Numbering goes on after the cleaned-up message.
    send(&b, 3, &[&a]).await;
    assert_eq!(seqs(&b, &a, 2).await, vec![3]);
}

/// A queue with a gap is refused at startup (and reported by `check`)
/// instead of being served wrongly.
#[tokio::test]
async fn a_gap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = id("a");
    {
        let b = open(dir.path());
        for i in 0..3 {
            send(&b, i, &[&a]).await;
        }
        // Lose the middle message: a's queue jumps from 1 to 3.
        let delivery = b.layout.trees.delivery.handle;
        b.layout
            .storage
            .remove_raw(delivery, &layout::batch_key(2))
            .unwrap();
        b.flush().unwrap();
    }
    {
        let l = layout::Layout::open(dir.path(), TUNING).unwrap();
        let report = super::queue_startup::verify(&l, super::Serving::Stopped);
        assert!(
            report.problems.iter().any(|p| p.contains("has a gap")),
            "{:?}",
            report.problems
        );
    }
    let refused = try_open(dir.path(), u64::MAX, 0).err().expect("refused");
    assert!(refused.to_string().contains("has a gap"), "{refused}");
}

#[tokio::test]
async fn a_fetcher_is_woken_when_its_entry_becomes_visible() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(open(dir.path()));
    let a = id("a");
    let wakeup = b.subscribe(&a).unwrap();
    let notified = wakeup.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    assert!(seqs(&b, &a, 0).await.is_empty());
    let sender = {
        let b = b.clone();
        let a = a.clone();
        tokio::spawn(async move { send(&b, 1, &[&a]).await })
    };
    tokio::time::timeout(Duration::from_secs(5), notified)
        .await
        .expect("woken");
    sender.await.unwrap();
    assert_eq!(seqs(&b, &a, 0).await, vec![1]);
}

#[tokio::test]
async fn a_failed_condition_writes_nothing_of_its_write_set() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let (a, c) = (id("a"), id("c"));
    register(&b, &a).await;
    let set = WriteSet {
        conditions: vec![Condition::ClientAbsent(a.clone())],
        changes: vec![Change::PutClient {
            id: c.clone(),
            record: client_record(),
        }],
        deliveries: vec![delivery(1, &[&c])],
    };
    match b.submit(set).wait().await {
        Err(StoreError::ConditionFailed(Condition::ClientAbsent(who))) => assert_eq!(who, a),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.client(&c).await.unwrap(), None);
    assert!(seqs(&b, &c, 0).await.is_empty());
    // The next message to c still starts its queue at 1.
    send(&b, 1, &[&c]).await;
    assert_eq!(seqs(&b, &c, 0).await, vec![1]);
}

#[tokio::test]
async fn concurrent_write_sets_on_one_revision_accept_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let g = GroupId::new(b"group").unwrap();
    let record = |revision| GroupRecord {
        epoch: revision,
        revision,
        open: false,
        members: vec![b"a".to_vec()],
        creator: b"a".to_vec(),
        created_ms: 0,
    };
    let create = WriteSet {
        conditions: vec![Condition::GroupAbsent(g.clone())],
        changes: vec![Change::PutGroup {
            id: g.clone(),
            record: record(0),
        }],
        deliveries: Vec::new(),
    };
    b.submit(create).wait().await.unwrap();
    // Ten handshakes validated against revision 0, submitted at once.
    let handles: Vec<_> = (0..10)
        .map(|_| {
            b.submit(WriteSet {
                conditions: vec![Condition::GroupAt {
                    group: g.clone(),
                    revision: 0,
                }],
                changes: vec![Change::PutGroup {
                    id: g.clone(),
                    record: record(1),
                }],
                deliveries: vec![delivery(1, &[&id("a")])],
            })
        })
        .collect();
    let mut accepted = 0;
    for h in handles {
        match h.wait().await {
            Ok(_) => accepted += 1,
            Err(StoreError::ConditionFailed(Condition::GroupAt { .. })) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(accepted, 1);
    assert_eq!(b.group(&g).await.unwrap().map(|r| r.revision), Some(1));
    assert_eq!(seqs(&b, &id("a"), 0).await, vec![1], "one fan-out, no gap");
}

#[tokio::test]
async fn a_key_package_is_claimed_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let owner = id("owner");
    let kp = KeyPackageRecord {
        message: vec![1],
        kp_ref: vec![9; 16],
        not_after: u64::MAX,
        claims: 0,
    };
    b.submit(WriteSet {
        changes: vec![Change::PutKeyPackage {
            owner: owner.clone(),
            record: kp.clone(),
        }],
        ..WriteSet::default()
    })
    .wait()
    .await
    .unwrap();
    let claim = || WriteSet {
        conditions: vec![Condition::KeyPackageUnclaimed {
            owner: owner.clone(),
            kp_ref: kp.kp_ref.clone(),
        }],
        changes: vec![Change::RemoveKeyPackage {
            owner: owner.clone(),
            kp_ref: kp.kp_ref.clone(),
        }],
        deliveries: Vec::new(),
    };
    let (first, second) = (b.submit(claim()), b.submit(claim()));
    assert!(first.wait().await.is_ok());
    assert!(matches!(
        second.wait().await,
        Err(StoreError::ConditionFailed(
            Condition::KeyPackageUnclaimed { .. }
        ))
    ));
    assert!(b.key_packages(&owner).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_live_backup_is_a_consistent_copy() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let a = id("a");
    register(&b, &a).await;
    send(&b, 1, &[&a]).await;
    let target = dir.path().join("backup");
    let report = b.backup(&target).await.unwrap();
    assert!(!report.failed, "{}", report.text);
    assert!(
        b.backup(&target).await.is_err(),
        "an existing target is refused"
    );
    drop(b);
    let copy = open(&target);
    assert!(copy.client(&a).await.unwrap().is_some());
    assert_eq!(seqs(&copy, &a, 0).await, vec![1]);
}

/// An acknowledgement prepared in the cycle of a send that drops entries
/// of the same full queue, after it: the acknowledgement's mark is written
/// before the send's batch, the drop's after it. The mark on disk must not
/// go back, or a start finds a gap where the acknowledged batches were.
#[tokio::test]
async fn a_drop_mark_never_takes_an_acknowledgement_back() {
    let dir = tempfile::tempdir().unwrap();
    let x = id("x");
    {
        let b = open_with_depth(dir.path(), 2);
        send(&b, 0, &[&x]).await;
        send(&b, 0, &[&x]).await;
        for _ in 0..20 {
            let head = b.page(&x, 0, 10, 1 << 20).await.unwrap().head;
            // Submitted together, so that the writer mostly takes both
            // into one cycle.
            let sent = b.submit(WriteSet {
                deliveries: vec![delivery(1, &[&x])],
                ..WriteSet::default()
            });
            let acked = b.ack(&x, head);
            sent.wait().await.unwrap();
            acked.wait().await.unwrap();
            send(&b, 1, &[&x]).await;
        }
    }
    let l = layout::Layout::open(dir.path(), TUNING).unwrap();
    let loaded = super::queue_startup::load(&l, super::queue_startup::Decode::Fanout).unwrap();
    let q = &loaded.state.clients[&x];
    assert_eq!((q.acked, q.ids.len()), (40, 2));
}

/// A full queue drops its oldest entries to make room, durably: the
/// acknowledgement mark moves past what was dropped, as with retention.
#[tokio::test]
async fn a_full_queue_drops_its_oldest_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (id("a"), id("c"));
    {
        let b = open_with_depth(dir.path(), 2);
        for i in 0..4 {
            send(&b, i, &[&a, &c]).await;
        }
        let page = b.page(&a, 0, 10, 1 << 20).await.unwrap();
        assert_eq!(page.acked, 2, "two dropped");
        assert_eq!(seqs(&b, &a, 0).await, vec![3, 4]);
        assert_eq!(b.stats().queue_overflow_drops, 4, "two of a's, two of c's");
        assert_eq!(stored(&b), 2, "the messages dropped everywhere were freed");
        b.ack(&c, 4).wait().await.unwrap();
        assert_eq!(stored(&b), 2, "a still holds 3 and 4");
    }
    let b = open_with_depth(dir.path(), 2);
    assert_eq!(seqs(&b, &a, 0).await, vec![3, 4], "the drops are durable");
    let report = super::queue_startup::verify(&b.layout, super::Serving::Stopped);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test]
async fn stale_commits_leave_each_groups_newest() {
    use crate::backend::records::CommitRecord;
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let (g1, g2) = (GroupId::new(b"g1").unwrap(), GroupId::new(b"g2").unwrap());
    let commit = |group: &GroupId, epoch: u64, accepted_ms: u64| Change::PutCommit {
        group: group.clone(),
        epoch,
        record: CommitRecord {
            commit_hash: [0; 32],
            committer: b"a".to_vec(),
            new_epoch: epoch + 1,
            recipients: 0,
            accepted_ms,
        },
    };
    let changes = vec![
        commit(&g1, 0, 10),
        commit(&g1, 1, 20),
        commit(&g1, 2, 30),
        commit(&g2, 0, 10),
        commit(&g2, 1, 500),
    ];
    b.submit(WriteSet {
        changes,
        ..WriteSet::default()
    })
    .wait()
    .await
    .unwrap();
    let stale = b.stale_commits(100).await.unwrap();
    let got: Vec<(Vec<u8>, u64)> = stale
        .iter()
        .map(|s| (s.group.as_bytes().to_vec(), s.epoch))
        .collect();
    assert_eq!(
        got,
        vec![
            (b"g1".to_vec(), 0),
            (b"g1".to_vec(), 1),
            (b"g2".to_vec(), 0)
        ],
        "g1's newest (epoch 2) stays although old"
    );
}

#[tokio::test]
async fn idle_group_locks_are_swept_and_held_ones_kept() {
    let mut locks = super::GroupLocks::default();
    let held_id = GroupId::new(b"held").unwrap();
    let held = locks.get(&held_id).lock_owned().await;
    for i in 0..3000u32 {
        locks.get(&GroupId::new(format!("g{i}").as_bytes()).unwrap());
    }
    assert!(
        locks.by_group.len() < 3000,
        "{} locks kept",
        locks.by_group.len()
    );
    assert!(locks.by_group.contains_key(&held_id), "a held lock stays");
    // The lock still excludes: a second locker of the group waits.
    let again = locks.get(&held_id);
    assert!(again.try_lock().is_err());
    drop(held);
    assert!(again.try_lock().is_ok());
}

#[tokio::test]
async fn a_message_submitted_with_its_group_deletion_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let g = GroupId::new(b"doomed").unwrap();
    let create = || WriteSet {
        changes: vec![Change::PutGroup {
            id: g.clone(),
            record: GroupRecord {
                epoch: 0,
                revision: 0,
                open: false,
                members: vec![b"a".to_vec()],
                creator: b"a".to_vec(),
                created_ms: 0,
            },
        }],
        ..WriteSet::default()
    };
    let send = || WriteSet {
        conditions: vec![Condition::GroupPresent(g.clone())],
        deliveries: vec![delivery(1, &[&id("a")])],
        ..WriteSet::default()
    };
    b.submit(create()).wait().await.unwrap();
    b.submit(send()).wait().await.unwrap();
    // Deletion and a message read before it, in one batch: the message is
    // refused although the deletion is not yet in the database.
    let deletion = b.submit(WriteSet {
        changes: vec![Change::DeleteGroup { id: g.clone() }],
        ..WriteSet::default()
    });
    let late = b.submit(send());
    deletion.wait().await.unwrap();
    assert!(matches!(
        late.wait().await,
        Err(StoreError::ConditionFailed(Condition::GroupPresent(_)))
    ));
    // Created again, the group takes messages again.
    b.submit(create()).wait().await.unwrap();
    b.submit(send()).wait().await.unwrap();
}

/// Send `n` of `a`'s, with a send id: to `to`, or to nobody else from 100
/// on (its envelope is kept all the same).
fn send_with_id(a: &ClientId, to: &ClientId, n: u64) -> WriteSet {
    use crate::backend::records::StoredSendId;
    let one = [to];
    let mut d = delivery(1, if n >= 100 { &[] } else { &one });
    d.message.sender = a.as_bytes().to_vec();
    d.message.send = Some(StoredSendId {
        created_ms: 7,
        nonce: n,
    });
    d.receipt = Some(send_key(a, n));
    WriteSet {
        conditions: vec![Condition::SendNew(send_key(a, n))],
        deliveries: vec![d],
        ..WriteSet::default()
    }
}

/// The key of `a`'s send `n`.
fn send_key(a: &ClientId, n: u64) -> crate::backend::records::SendKey {
    crate::backend::records::SendKey {
        sender: a.clone(),
        id: mls_ds_protocol::groups::SendId {
            created_ms: 7,
            nonce: n,
        },
    }
}

/// Whether send `n` of `a`'s to `to` is refused as a duplicate.
async fn is_duplicate(b: &SledBackend, a: &ClientId, to: &ClientId, n: u64) -> bool {
    matches!(
        b.submit(send_with_id(a, to, n)).wait().await,
        Err(StoreError::ConditionFailed(Condition::SendNew(_)))
    )
}

/// Delivery batches stored.
fn batches(b: &SledBackend) -> usize {
    b.layout
        .storage
        .scan_raw(b.layout.trees.delivery.handle, &[layout::BATCH_PREFIX])
        .unwrap()
        .len()
}

/// A send's receipt lives in its batch's envelope until it is frozen into
/// a run: the batch stays on disk after every entry of it is acknowledged,
/// a start (after a crash: no checkpoint) reads the receipts back from it,
/// and the freeze removes it; a retry gets the first answer throughout.
#[tokio::test]
async fn receipts_outlive_their_acknowledged_batches_through_freezes_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (id("a"), id("c"));
    let key = |n: u64| send_key(&a, n);
    let set = |n: u64| send_with_id(&a, &c, n);
    let mut ids = Vec::new();
    let to_nobody = {
        let b = open(dir.path());
        for n in 0..20 {
            ids.push(b.submit(set(n)).wait().await.unwrap().deliveries[0].message_id);
        }
        let to_nobody = b.submit(set(100)).wait().await.unwrap().deliveries[0];
        assert_eq!(to_nobody.recipients, 0);
        b.ack(&c, 20).wait().await.unwrap();
        assert_eq!(stored(&b), 0, "every entry acknowledged");
        assert_eq!(batches(&b), 21, "kept for their receipts");
        assert!(is_duplicate(&b, &a, &c, 3).await);
        b.flush().unwrap();
        to_nobody
    };
    // A start without a checkpoint reads the receipts from the batches.
    let b = open(dir.path());
    for (n, id) in ids.iter().enumerate() {
        let receipt = b.send_receipt(&key(n as u64)).await.unwrap().expect("kept");
        assert_eq!((receipt.message_id, receipt.recipients), (*id, 1));
    }
    let receipt = b.send_receipt(&key(100)).await.unwrap().expect("kept");
    assert_eq!(
        (receipt.message_id, receipt.recipients),
        (to_nobody.message_id, 0)
    );
    assert!(is_duplicate(&b, &a, &c, 4).await);
    assert!(is_duplicate(&b, &a, &c, 100).await);
    // The next send, once a run is due, starts freezing them; once the
    // run is published, the batches go.
    b.receipts.freeze_at(1);
    b.submit(set(20)).wait().await.unwrap();
    b.settled().wait().await.unwrap();
    b.receipts.freeze_now(&b.index.lock()).unwrap();
    assert_eq!(batches(&b), 1, "the live batch of send 20 is left");
    assert_eq!(b.receipts.counts().frozen, 22);
    b.flush().unwrap();
    drop(b);
    let b = open(dir.path());
    for (n, id) in ids.iter().enumerate() {
        let receipt = b
            .send_receipt(&key(n as u64))
            .await
            .unwrap()
            .expect("frozen");
        assert_eq!(receipt.message_id, *id);
    }
    assert!(is_duplicate(&b, &a, &c, 5).await);
    assert!(is_duplicate(&b, &a, &c, 20).await);
    assert!(is_duplicate(&b, &a, &c, 100).await);
    assert!(b.check().await.unwrap().text.contains("22 send receipts"));
}

/// A start without a usable checkpoint numbers batches from the receipts'
/// watermark on at least, even with no batch stored and no mark naming
/// one (sends to nobody else): otherwise the sends after it would be
/// stored below the watermark, and the next start would not read their
/// receipts back.
#[tokio::test]
async fn batches_are_numbered_from_the_receipts_watermark_on() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (id("a"), id("c"));
    {
        let b = open(dir.path());
        for n in 100..103 {
            b.submit(send_with_id(&a, &c, n)).wait().await.unwrap();
        }
        b.settled().wait().await.unwrap();
        b.receipts.freeze_now(&b.index.lock()).unwrap();
        assert_eq!(batches(&b), 0, "frozen, then removed");
        b.flush().unwrap();
    }
    let b = open(dir.path());
    let watermark = b.receipts.watermark();
    assert!(watermark > 1);
    assert!(b.index.lock().next_batch >= watermark);
    let sent = b.submit(send_with_id(&a, &c, 110)).wait().await.unwrap();
    b.flush().unwrap();
    drop(b);
    let b = open(dir.path());
    let receipt = b.send_receipt(&send_key(&a, 110)).await.unwrap();
    assert_eq!(
        receipt.map(|r| r.message_id),
        Some(sent.deliveries[0].message_id)
    );
    assert!(is_duplicate(&b, &a, &c, 110).await);
}

/// A mark naming a batch past any the DS numbers is damage: the start
/// refuses it (new batches would be numbered from there, and their message
/// ids would wrap around), and `check` reports it.
#[tokio::test]
async fn a_mark_past_any_batch_number_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = id("a");
    {
        let b = open(dir.path());
        send(&b, 1, &[&a]).await;
        let mark = layout::Mark {
            seq: 1,
            id: u64::MAX,
        };
        b.layout
            .storage
            .put_raw(
                b.layout.trees.delivery.handle,
                &layout::ack_key(&a),
                &mark.to_bytes(),
            )
            .unwrap();
        b.flush().unwrap();
        let report = super::queue_startup::verify(&b.layout, super::Serving::Running);
        assert!(
            report.problems.iter().any(|p| p.contains("past any")),
            "{:?}",
            report.problems
        );
    }
    let refused = try_open(dir.path(), u64::MAX, 0);
    assert!(matches!(refused, Err(StoreError::Corrupt(_))));
}
