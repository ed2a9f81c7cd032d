//! A group big enough for the DS to keep its `PublicGroup` loaded between
//! handshakes (200 members: well over the 64 KiB of stored state from which
//! it does), against the real server. Commits, a proposal, GroupInfo reads
//! and an external join validated against the kept state must agree with
//! what the members compute; commits refused after the kept state was taken
//! (one before its merge, one after) must leave nothing half-merged behind;
//! and all of it goes on after a restart, with nothing kept. Joiners take
//! the ratchet tree from their Welcome entry, which must be the tree the
//! DS serves with the GroupInfo of that epoch. Messages to the group are
//! stored with a reference to its roster and survive a crash.

use mls_ds_client::HttpPool;
use mls_ds_protocol::queue::EntryKind;
use mls_ds_tests::postgres::{self, TestBackend};
use mls_ds_tests::raw::{converged, register_offline, RawMember};
use mls_ds_tests::Server;

const OFFLINE: usize = 198;

/// Commit a self-update of `member`'s and merge it.
async fn update(member: &mut RawMember) {
    let (c, w, gi) = member.stage_update();
    let gid = member.gid();
    member.api.commit(&gid, c, w, gi).await.unwrap();
    member.merge();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_group_stays_consistent_through_its_kept_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let url = server.url();
    let mut alice = RawMember::new(&url, "big-alice");
    let mut witness = RawMember::new(&url, "big-witness");
    alice.register(0).await;
    witness.register(1).await;
    alice.create_group(true).await;
    let gid = alice.gid();

    // 198 offline members and the witness, in two commits.
    let names: Vec<String> = (0..OFFLINE).map(|i| format!("big-m{i}")).collect();
    register_offline(&url, &HttpPool::new().unwrap(), &names).await;
    let mut waves = vec![names[..100].to_vec(), names[100..].to_vec()];
    waves[1].push("big-witness".into());
    for wave in waves {
        let mut kps = Vec::new();
        for name in &wave {
            kps.push(alice.claim(name).await);
        }
        let (c, w, gi) = alice.stage_add(kps);
        alice.api.commit(&gid, c, w, gi).await.unwrap();
        alice.merge();
    }
    assert_eq!(alice.group().members().count(), OFFLINE + 2);

    // The witness's Welcome comes with the tree of its epoch: the one the
    // GroupInfo serves now, since nothing was committed after it.
    let page = witness.api.fetch(0, 10, 0).await.unwrap();
    let welcome = &page.entries[0];
    assert_eq!(welcome.kind, EntryKind::Welcome);
    let info = alice.api.group_info(&gid).await.unwrap();
    assert_eq!(info.epoch, welcome.epoch);
    assert!(!welcome.ratchet_tree.as_slice().is_empty());
    assert_eq!(welcome.ratchet_tree, info.ratchet_tree);
    witness.sync().await;
    converged(&[&alice, &witness]);

    // Commits in a row, from both sides, each validated against the state
    // the previous one left.
    update(&mut alice).await;
    update(&mut alice).await;
    witness.sync().await;
    update(&mut witness).await;
    alice.sync().await;
    converged(&[&alice, &witness]);

    // A proposal, then a commit that includes it.
    let proposal = witness.propose_update();
    witness.api.send_message(&gid, proposal).await.unwrap();
    alice.sync().await;
    update(&mut alice).await;
    witness.sync().await;
    converged(&[&alice, &witness]);

    // The GroupInfo, read twice (the second time from the kept tree), lets
    // an outsider join the open group.
    let info = alice.api.group_info(&gid).await.unwrap();
    assert_eq!(alice.api.group_info(&gid).await.unwrap(), info);
    let mut outsider = RawMember::new(&url, "big-outsider");
    outsider.register(0).await;
    let (commit, group_info) = outsider.stage_external_join(&info);
    outsider
        .api
        .commit(&gid, commit, None, group_info)
        .await
        .unwrap();
    alice.sync().await;
    witness.sync().await;
    converged(&[&alice, &witness, &outsider]);

    // Refused before the merge: a GroupInfo signed by someone else.
    let (c, _, _) = alice.stage_update();
    let foreign = alice.api.group_info(&gid).await.unwrap().group_info;
    let e = alice
        .api
        .commit(&gid, c, None, foreign.as_slice().to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    alice.clear();
    // Refused after the merge: alice's own GroupInfo of another epoch.
    let (_, _, stale) = alice.stage_update();
    alice.clear();
    update(&mut alice).await;
    let (c, _, _) = alice.stage_update();
    let e = alice.api.commit(&gid, c, None, stale).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("does not describe"), "{e}");
    alice.clear();
    // Nothing of either stayed: the next commits build on the last one.
    update(&mut alice).await;
    witness.sync().await;
    outsider.sync().await;
    update(&mut outsider).await;
    alice.sync().await;
    witness.sync().await;
    converged(&[&alice, &witness, &outsider]);

    // After a restart nothing is kept, and nothing is missed.
    server.restart_on_same_port();
    update(&mut witness).await;
    alice.sync().await;
    outsider.sync().await;
    converged(&[&alice, &witness, &outsider]);
    assert_eq!(
        alice.api.group_info(&gid).await.unwrap().epoch,
        alice.epoch()
    );

    // Messages to everyone store a reference to the group's roster, not
    // its 200 recipients; after a crash the queues are rebuilt from it:
    // those that read them see nothing again, the others get them.
    let texts: Vec<Vec<u8>> = (0..3).map(|i| format!("to all {i}").into_bytes()).collect();
    for t in &texts {
        let m = witness.encrypt(t);
        witness.api.send_message(&gid, m).await.unwrap();
    }
    assert_eq!(alice.sync().await, texts);
    // Rosters are the sled backend's (PostgreSQL stores a row per entry).
    if postgres::backend() == TestBackend::Sled {
        let stats = server.admin_ok(&["stats"]);
        let rosters = stats
            .lines()
            .find_map(|l| l.strip_prefix("rosters"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok());
        // The current one, and those of earlier member sets and of before
        // the restart, still queued for the offline members.
        assert!(rosters.is_some_and(|n| n >= 1), "{stats}");
    }
    server.kill_and_restart_on_same_port();
    assert!(alice.sync().await.is_empty());
    assert_eq!(outsider.sync().await, texts);
    server.stop_and_check();
}
