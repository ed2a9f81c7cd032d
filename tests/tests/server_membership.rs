//! Membership rules for external commits, against the real server: into a
//! closed group only a current member may commit externally, and only to
//! resync (replacing its own leaf); a removed member is refused, even with
//! a current GroupInfo handed to it by a member, and nothing changes; an
//! open group takes external joins from anyone registered.

use mls_ds_tests::raw::{converged, RawMember};
use mls_ds_tests::Server;

async fn add(adder: &mut RawMember, who: &str) {
    let kp = adder.claim(who).await;
    let (c, w, gi) = adder.stage_add(vec![kp]);
    adder.api.commit(&adder.gid(), c, w, gi).await.unwrap();
    adder.merge();
}

async fn closed_group(url: &str) {
    let mut alice = RawMember::new(url, "closed-alice");
    let mut bob = RawMember::new(url, "closed-bob");
    let mut carol = RawMember::new(url, "closed-carol");
    alice.register(1).await;
    bob.register(1).await;
    carol.register(1).await;
    alice.create_group(false).await;
    let gid = alice.gid();
    add(&mut alice, "closed-bob").await;
    add(&mut alice, "closed-carol").await;
    bob.sync().await;
    carol.sync().await;
    converged(&[&alice, &bob, &carol]);

    // Resync: bob, a current member, replaces his own leaf from the DS's
    // GroupInfo (as after losing his group state).
    let info = bob.api.group_info(&gid).await.unwrap();
    let (commit, group_info) = bob.stage_external_join(&info);
    let accepted = bob
        .api
        .commit(&gid, commit, None, group_info)
        .await
        .expect("a current member resyncs");
    assert_eq!(accepted.epoch, info.epoch + 1);
    alice.sync().await;
    carol.sync().await;
    converged(&[&alice, &bob, &carol]);
    assert_eq!(alice.group().members().count(), 3, "bob's old leaf went");

    // Alice removes carol.
    let (c, w, gi) = alice.stage_remove("closed-carol");
    alice.api.commit(&gid, c, w, gi).await.unwrap();
    alice.merge();
    bob.sync().await;
    carol.sync().await;
    converged(&[&alice, &bob]);

    // Carol may not read the GroupInfo any more.
    let e = carol.api.group_info(&gid).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // Bob hands her the current GroupInfo: her external commit is refused,
    // and nothing changes.
    let info = bob.api.group_info(&gid).await.unwrap();
    let (commit, group_info) = carol.stage_external_join(&info);
    let e = carol
        .api
        .commit(&gid, commit, None, group_info)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("new invitation"), "{e}");
    assert_eq!(bob.api.group_info(&gid).await.unwrap().epoch, info.epoch);
    assert!(alice.sync().await.is_empty());
    assert!(bob.sync().await.is_empty());
    converged(&[&alice, &bob]);
    assert_eq!(alice.epoch(), info.epoch, "no commit was accepted");
}

async fn open_group(url: &str) {
    let mut alice = RawMember::new(url, "open-alice");
    let mut dave = RawMember::new(url, "open-dave");
    alice.register(0).await;
    dave.register(0).await;
    alice.create_group(true).await;
    let gid = alice.gid();
    // Dave was never invited: an open group takes his external join.
    let info = dave.api.group_info(&gid).await.unwrap();
    let (commit, group_info) = dave.stage_external_join(&info);
    dave.api
        .commit(&gid, commit, None, group_info)
        .await
        .expect("anyone registered joins an open group");
    alice.sync().await;
    converged(&[&alice, &dave]);
    assert_eq!(alice.group().members().count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_commits_follow_membership() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let url = server.url();
    closed_group(&url).await;
    open_group(&url).await;
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains("panicked"), "server log shows a panic");
}
