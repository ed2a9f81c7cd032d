//! Receipts through freezes, merges, reopening, forgetting and `check`
//! (the fresh receipts' life in their batches: the sled backend's tests).

use std::collections::HashMap;

use mls_ds_protocol::groups::SendId;
use mls_ds_protocol::ClientId;

use super::{Receipts, SendAnswer};
use crate::backend::records::{SendKey, SendReceipt};
use crate::backend::sled::layout::{Layout, StoreTuning};
use crate::backend::sled::queue_index::IndexState;
use crate::backend::StoreError;

fn key(sender: &str, created_ms: u64, nonce: u64) -> SendKey {
    SendKey {
        sender: ClientId::new(sender.as_bytes()).unwrap(),
        id: SendId { created_ms, nonce },
    }
}

fn answer(n: u64) -> SendAnswer {
    SendAnswer {
        key: key(&format!("client-{}", n % 7), 1_000 + n, n),
        receipt: SendReceipt {
            message_id: n << 16,
            recipients: (n % 5) as u32,
        },
    }
}

/// A new database in a temporary directory and its receipts.
fn store() -> (tempfile::TempDir, Layout, Receipts) {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open(dir.path(), StoreTuning::admin()).unwrap();
    let receipts = Receipts::open(&layout).unwrap();
    (dir, layout, receipts)
}

/// An index whose next batch is `next`.
fn index(next: u64) -> IndexState {
    IndexState::new(HashMap::new(), next)
}

/// What the writer does for a batch: stage its receipts, then, between two
/// cycles, publish a run built meanwhile and start a freeze or merge if due.
fn record(receipts: &Receipts, batch: u64, sends: &[SendAnswer]) {
    receipts.stage(batch, sends);
    receipts.between_cycles(&index(batch + 1)).unwrap();
}

/// Publish the run being built and the merges due after it, one by one.
fn merge_all(receipts: &Receipts, next_batch: u64) {
    loop {
        receipts.settle(&index(next_batch)).unwrap();
        let mut inner = receipts.lock();
        if !receipts.start_merge(&mut inner) {
            return;
        }
    }
}

fn expect(receipts: &Receipts, found: std::ops::Range<u64>, absent: std::ops::Range<u64>) {
    for n in found {
        let a = answer(n);
        assert_eq!(receipts.get(&a.key).unwrap(), Some(a.receipt), "send {n}");
    }
    for n in absent {
        assert_eq!(receipts.get(&answer(n).key).unwrap(), None, "send {n}");
    }
}

#[test]
fn frozen_receipts_are_found_through_merges_and_reopening() {
    let (_dir, layout, receipts) = store();
    receipts.freeze_at(300);
    // 5,000 sends in batches of 10: 16 freezes, merged as they go.
    // Every one is found while runs are being built and published.
    for batch in 0..500u64 {
        let sends: Vec<SendAnswer> = (batch * 10..batch * 10 + 10).map(answer).collect();
        record(&receipts, batch, &sends);
        if batch % 50 == 49 {
            expect(
                &receipts,
                0..batch * 10 + 10,
                batch * 10 + 10..batch * 10 + 20,
            );
        }
    }
    merge_all(&receipts, 500);
    let counts = receipts.counts();
    assert_eq!(counts.total(), 5_000);
    assert!(counts.fresh < 5_000, "runs were frozen");
    assert!(counts.runs <= 5, "{} runs", counts.runs);
    expect(&receipts, 0..5_000, 5_000..7_000);
    assert!(receipts.problems().unwrap().is_empty());
    drop(receipts);
    // Reopened: the runs are read back; the fresh receipts (the newest)
    // would be read from their batches, which this test did not write.
    let frozen = 5_000 - counts.fresh as u64;
    let reopened = Receipts::open(&layout).unwrap();
    assert_eq!(reopened.counts().total(), frozen);
    assert_eq!(reopened.counts().runs, counts.runs);
    expect(&reopened, 0..frozen, frozen..7_000);
    assert_eq!(
        reopened.before(u64::MAX, usize::MAX).unwrap().len() as u64,
        frozen,
        "every send listed once (mls-ds migrate)"
    );
    assert!(layout
        .storage
        .scan_raw(layout.trees.sends.handle, b"n")
        .unwrap()
        .is_empty());
}

#[test]
fn old_sends_are_forgotten_in_runs_and_fresh() {
    let (_dir, layout, receipts) = store();
    // Sends 0..1,000 made at 1,000..2,000 ms, frozen into a run; then
    // 1,000 more, fresh.
    let old: Vec<SendAnswer> = (0..1_000).map(answer).collect();
    receipts.stage(0, &old);
    assert_eq!(receipts.forget(0, &index(1)).unwrap(), 0);
    assert_eq!(receipts.counts().fresh, 1_000, "nothing to forget, no run");
    receipts.freeze_now(&index(1)).unwrap();
    assert_eq!(receipts.counts().runs, 1);
    let newer: Vec<SendAnswer> = (1_000..2_000).map(answer).collect();
    receipts.stage(1, &newer);
    // Everything made before 2,500 ms: the whole run and half the fresh.
    assert_eq!(receipts.forget(2_500, &index(2)).unwrap(), 1_500);
    expect(&receipts, 1_500..2_000, 0..1_500);
    let reopened = Receipts::open(&layout).unwrap();
    assert_eq!(reopened.counts().total(), 500);
    assert!(reopened.problems().unwrap().is_empty());
}

#[test]
fn check_finds_a_missing_chunk() {
    let (_dir, layout, receipts) = store();
    let sends: Vec<SendAnswer> = (0..500).map(answer).collect();
    receipts.stage(0, &sends);
    receipts.freeze_now(&index(1)).unwrap();
    assert_eq!(receipts.counts().runs, 1);
    let tree = layout.trees.sends.handle;
    let chunks = layout.storage.scan_raw(tree, b"c").unwrap();
    assert!(chunks.len() >= 2, "500 receipts take several chunks");
    layout.storage.remove_raw(tree, &chunks[1].0).unwrap();
    let problems = Receipts::open(&layout).unwrap().problems().unwrap();
    assert!(
        problems.iter().any(|p| p.contains("missing")),
        "{problems:?}"
    );
}

/// A new database whose 20,000 receipts of batch 0 are being frozen
/// (nothing written of the run yet).
fn freezing_20_000() -> (tempfile::TempDir, Layout, Receipts) {
    let (dir, layout, receipts) = store();
    let sends: Vec<SendAnswer> = (0..20_000).map(answer).collect();
    receipts.stage(0, &sends);
    receipts.start_freeze(&mut receipts.lock(), &index(1));
    (dir, layout, receipts)
}

/// While a run is built, a piece per gap between two cycles, its receipts
/// are found in memory and their batches kept; its publication moves the
/// watermark to the batch that was next when it began.
#[test]
fn receipts_being_frozen_are_found_and_their_batches_kept_until_published() {
    let (_dir, layout, receipts) = freezing_20_000();
    // Sends accepted meanwhile are fresh.
    let newer: Vec<SendAnswer> = (20_000..20_100).map(answer).collect();
    receipts.stage(1, &newer);
    let mut gaps = 0;
    while receipts.lock().building.is_some() {
        expect(&receipts, 0..20_100, 20_100..20_200);
        assert!(receipts.keeps(0) && receipts.keeps(1));
        assert_eq!(receipts.counts().total(), 20_100);
        assert_eq!(receipts.counts().runs, 0);
        receipts.step(&mut receipts.lock(), &index(2)).unwrap();
        gaps += 1;
    }
    assert!(gaps >= 3, "20,000 receipts take several pieces, not {gaps}");
    assert_eq!(receipts.counts().runs, 1);
    assert_eq!(receipts.counts().fresh, 100);
    assert!(!receipts.keeps(0), "released with the run's publication");
    assert!(receipts.keeps(1));
    expect(&receipts, 0..20_100, 20_100..20_200);
    assert!(receipts.problems().unwrap().is_empty());
    // A start reads the newer ones back from batch 1 on (this test wrote
    // no batch).
    let reopened = Receipts::open(&layout).unwrap();
    assert_eq!(reopened.lock().watermark, 1);
    assert_eq!(reopened.counts().total(), 20_000);
}

/// A server that stops in the middle of a run leaves its pieces behind,
/// unpublished: the next start removes them, and reads the receipts from
/// their batches again.
#[test]
fn a_run_left_in_pieces_by_a_stop_is_removed_at_the_next_start() {
    let (_dir, layout, receipts) = freezing_20_000();
    for _ in 0..2 {
        receipts.step(&mut receipts.lock(), &index(1)).unwrap();
    }
    assert!(receipts.lock().building.is_some());
    drop(receipts);
    let tree = layout.trees.sends.handle;
    assert!(!layout.storage.scan_raw(tree, b"c").unwrap().is_empty());
    let reopened = Receipts::open(&layout).unwrap();
    assert_eq!(reopened.counts().runs, 0);
    assert_eq!(reopened.lock().watermark, 0);
    reopened.remove_unfinished().unwrap();
    assert!(layout.storage.scan_raw(tree, b"c").unwrap().is_empty());
    assert!(layout.storage.scan_raw(tree, b"n").unwrap().is_empty());
    // The next run is whole.
    let sends: Vec<SendAnswer> = (0..500).map(answer).collect();
    reopened.stage(0, &sends);
    reopened.freeze_now(&index(1)).unwrap();
    expect(&reopened, 0..500, 500..1_000);
    assert!(reopened.problems().unwrap().is_empty());
}

/// A run whose piece or publication fails to be written is dropped: its
/// receipts are fresh again, their batches kept, the error returned (the
/// writer then marks storage broken). The next start removes its pieces
/// and reads the receipts from their batches, as after a crash.
#[test]
fn a_run_that_fails_to_be_written_gives_its_receipts_back() {
    // Steps of a whole freeze: each writes a piece, the last publishes.
    let (_dir, _layout, receipts) = freezing_20_000();
    let mut steps = 0;
    while receipts.lock().building.is_some() {
        receipts.step(&mut receipts.lock(), &index(1)).unwrap();
        steps += 1;
    }
    assert!(steps >= 3);
    // Failing before the first piece, after two, and at the publication
    // (each step checks once before its piece, the last once more before
    // publishing).
    for fail_after in [0, 2, steps] {
        let (_dir, layout, receipts) = freezing_20_000();
        receipts.lock().fail_run_writes_after.set(Some(fail_after));
        let failed = loop {
            if let Err(e) = receipts.step(&mut receipts.lock(), &index(1)) {
                break e;
            }
            assert!(
                receipts.lock().building.is_some(),
                "published despite the failure"
            );
        };
        assert!(matches!(failed, StoreError::Failed(_)), "{failed:?}");
        assert!(receipts.lock().building.is_none());
        assert_eq!(receipts.counts().fresh, 20_000);
        assert_eq!(receipts.counts().runs, 0);
        assert!(receipts.keeps(0), "the batch stays for its receipts");
        expect(&receipts, 0..20_000, 20_000..20_100);
        drop(receipts);
        let tree = layout.trees.sends.handle;
        let left = layout.storage.scan_raw(tree, b"c").unwrap().len();
        assert_eq!(
            left > 0,
            fail_after > 0,
            "pieces written before the failure"
        );
        let reopened = Receipts::open(&layout).unwrap();
        reopened.remove_unfinished().unwrap();
        assert_eq!(reopened.lock().watermark, 0);
        assert_eq!(reopened.counts().runs, 0);
        assert!(layout.storage.scan_raw(tree, b"c").unwrap().is_empty());
        assert!(reopened.problems().unwrap().is_empty());
    }
}
