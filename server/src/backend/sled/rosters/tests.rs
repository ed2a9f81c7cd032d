//! Fan-outs by roster through the backend: what a big group's message
//! stores, the queues a start rebuilds from rosters (from the checkpoint and
//! from every batch), and rosters removed once no batch references them.

use mls_ds_protocol::ClientId;

use super::super::batch;
use super::super::group_commit::SWEEP_EVERY_CYCLES;
use super::super::layout;
use super::super::queue_startup::{self, Decode, Serving};
use super::super::tests::{delete, id, open, register, seqs};
use super::super::SledBackend;
use super::{stored, MIN_MEMBERS};
use crate::backend::records::StoredMessage;
use crate::backend::write_set::{Delivery, WriteSet};
use crate::backend::Backend;

/// `members[sender_at]` sends message number `n` to the others.
async fn send(b: &SledBackend, members: &[ClientId], sender_at: usize, n: u32) -> u32 {
    let mut recipients = members.to_vec();
    let sender = recipients.remove(sender_at);
    let set = WriteSet {
        deliveries: vec![Delivery {
            message: StoredMessage {
                kind: 1,
                group_id: b"big".to_vec(),
                epoch: 0,
                sender: sender.as_bytes().to_vec(),
                message: n.to_be_bytes().to_vec(),
                stored_ms: 1,
                send: None,
                ratchet_tree: Vec::new(),
            },
            recipients,
            sender_at: Some(sender_at as u32),
            receipt: None,
        }],
        ..WriteSet::default()
    };
    b.submit(set).wait().await.unwrap().deliveries[0].recipients
}

/// Each queue as (sequence number, message number), after its mark.
async fn queues(b: &SledBackend, members: &[ClientId]) -> Vec<(u64, Vec<(u64, u32)>)> {
    let mut all = Vec::new();
    for m in members {
        let page = b.page(m, 0, 1000, 1 << 20).await.unwrap();
        let entries = page
            .entries
            .iter()
            .map(|e| {
                let n: [u8; 4] = e.stored.message.as_slice().try_into().unwrap();
                (e.seq, u32::from_be_bytes(n))
            })
            .collect();
        all.push((page.acked, entries));
    }
    all
}

fn members(n: usize) -> Vec<ClientId> {
    (0..n).map(|i| id(&format!("member-{i:02}"))).collect()
}

/// Every envelope on disk: (fan-out by roster, entries listed).
fn fanouts(b: &SledBackend) -> Vec<(bool, usize)> {
    let l = &b.layout;
    let mut found = Vec::new();
    queue_startup::for_each_batch(l, 0, |number, value| {
        for record in batch::records(value) {
            let (_, bytes) = record.unwrap();
            let f = batch::decode_fanout(l.trees.delivery, number, bytes)?;
            found.push((f.roster.is_some(), f.entries.len()));
        }
        Ok(())
    })
    .unwrap();
    found
}

#[tokio::test]
async fn a_big_groups_messages_reference_its_roster_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let group = members(MIN_MEMBERS + 4);
    let gone = group[7].clone();
    let expected;
    {
        let b = open(dir.path());
        register(&b, &gone).await;
        for n in 0..3 {
            assert_eq!(send(&b, &group, 0, n).await, group.len() as u32 - 1);
        }
        send(&b, &group, 5, 3).await;
        send(&b, &group, group.len() - 1, 4).await;
        delete(&b, &gone).await;
        assert_eq!(send(&b, &group, 3, 5).await, group.len() as u32 - 2);
        b.ack(&group[1], 2).wait().await.unwrap();
        b.ack(&group[2], 6).wait().await.unwrap();
        // One roster, and no envelope lists its recipients.
        let f = fanouts(&b);
        assert_eq!(f.len(), 6);
        assert!(f
            .iter()
            .all(|(by_roster, listed)| *by_roster && *listed == 0));
        let on_disk = stored(&b.layout).unwrap();
        assert_eq!((on_disk.rosters, on_disk.members), (1, group.len()));
        expected = queues(&b, &group).await;
        assert_eq!(expected[1].1.first(), Some(&(3, 2)), "acknowledged up to 2");
        assert_eq!(expected[3].1.len(), 5, "not its own message");
        assert_eq!(expected[7].1.len(), 0, "deleted");
        b.shut_down().await.unwrap();
    }
    // From the checkpoint, then a message, then from every batch.
    let b = open(dir.path());
    assert_eq!(queues(&b, &group).await, expected);
    send(&b, &group, 0, 6).await;
    let after = queues(&b, &group).await;
    assert_eq!(after[2].1, vec![(7, 6)], "numbering goes on");
    assert_eq!(after[7].1, Vec::new(), "the deleted member gets nothing");
    let report = queue_startup::verify(&b.layout, Serving::Stopped);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let rebuilt = queue_startup::load(&b.layout, Decode::Whole).unwrap();
    for (m, (acked, entries)) in group.iter().zip(&after) {
        let q = &rebuilt.state.clients[m];
        let ids = q.ids.to_vec();
        assert_eq!((q.acked, ids.len()), (*acked, entries.len()), "{m}");
    }
    drop(b);
    let b = open(dir.path());
    assert_eq!(queues(&b, &group).await, after);
    assert_eq!(
        stored(&b.layout).unwrap().rosters,
        2,
        "retired, still referenced"
    );
}

/// Enough write cycles that a sweep of the retired rosters ran before the
/// last one ended.
async fn cycles(b: &SledBackend, c: &ClientId) {
    for _ in 0..=SWEEP_EVERY_CYCLES {
        b.ack(c, 0).wait().await.unwrap();
    }
}

#[tokio::test]
async fn a_new_roster_for_new_members_and_old_ones_go_with_their_batches() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let before = members(MIN_MEMBERS);
    let mut after = before.clone();
    after.push(id("newcomer"));
    send(&b, &before, 0, 0).await;
    send(&b, &before, 1, 1).await;
    send(&b, &after, 0, 2).await;
    assert_eq!(stored(&b.layout).unwrap().rosters, 2);
    // A smaller group lists its recipients.
    send(&b, &before[..MIN_MEMBERS - 1], 0, 3).await;
    let f = fanouts(&b);
    assert_eq!(f.last(), Some(&(false, MIN_MEMBERS - 2)));
    // Everything acknowledged: the old roster goes within the sweep's
    // period, the group's current one stays.
    for m in &after {
        let head = b.page(m, 0, 1000, 1 << 20).await.unwrap().head;
        b.ack(m, head).wait().await.unwrap();
    }
    cycles(&b, &after[1]).await;
    assert_eq!(stored(&b.layout).unwrap().rosters, 1);
    assert!(b
        .layout
        .contains(b.layout.trees.delivery, &layout::roster_key(1))
        .unwrap());
    // After a restart every roster is retired: none is left once the
    // sweep ran, and the next message stores its roster anew.
    drop(b);
    let b = open(dir.path());
    cycles(&b, &after[1]).await;
    assert_eq!(stored(&b.layout).unwrap().rosters, 0);
    send(&b, &after, 2, 4).await;
    assert!(b
        .layout
        .contains(b.layout.trees.delivery, &layout::roster_key(2))
        .unwrap());
    let report = queue_startup::verify(&b.layout, Serving::Stopped);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test]
async fn a_missing_roster_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path());
    let group = members(MIN_MEMBERS);
    send(&b, &group, 0, 0).await;
    b.layout
        .storage
        .remove_raw(b.layout.trees.delivery.handle, &layout::roster_key(0))
        .unwrap();
    let report = queue_startup::verify(&b.layout, Serving::Running);
    assert!(
        report.problems.iter().any(|p| p.contains("roster 0")),
        "{:?}",
        report.problems
    );
}

/// After a start without a checkpoint, with every batch acknowledged and
/// removed, new messages are still numbered past the queues' marks: a
/// fan-out by roster is replayed at the next start, and a listed entry
/// after it keeps its sequence number.
#[tokio::test]
async fn numbering_stays_past_the_marks_across_unclean_stops() {
    let dir = tempfile::tempdir().unwrap();
    let group = members(MIN_MEMBERS);
    {
        let b = open(dir.path());
        for n in 0..5 {
            send(&b, &group, 0, n).await;
        }
        for m in &group[1..] {
            b.ack(m, 5).wait().await.unwrap();
        }
        assert_eq!(fanouts(&b).len(), 0, "every batch removed");
    }
    let expected = {
        let b = open(dir.path());
        send(&b, &group, 0, 5).await;
        super::super::tests::send(&b, 1, &[&group[1]]).await;
        assert_eq!(seqs(&b, &group[1], 5).await, vec![6, 7]);
        queues(&b, &group[2..]).await
    };
    let b = open(dir.path());
    assert_eq!(seqs(&b, &group[1], 5).await, vec![6, 7]);
    assert_eq!(queues(&b, &group[2..]).await, expected);
    assert_eq!(expected[0].1, vec![(6, 5)]);
    let report = queue_startup::verify(&b.layout, Serving::Stopped);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
