//! The full lifecycle through the SDK against the real server: register,
//! publish, claim, create, add, welcome, messages, update, remove (a removed
//! member cannot come back by itself), a new invitation, resync by external
//! commit, leave; three clients converge.

use mls_ds_client::{Client, ClientConfig, Event};
use mls_ds_tests::Server;

fn messages(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { sender, data, .. } => Some((
                String::from_utf8_lossy(sender).into_owned(),
                String::from_utf8_lossy(data).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

async fn converged(clients: &[&Client], gid: &[u8]) {
    let epoch = clients[0].epoch(gid).await.unwrap();
    let secret = clients[0].export_secret(gid, "test", 32).await.unwrap();
    let members = clients[0].members(gid).await.unwrap();
    for c in &clients[1..] {
        assert_eq!(c.epoch(gid).await.unwrap(), epoch, "{} epoch", c.id());
        assert_eq!(
            c.export_secret(gid, "test", 32).await.unwrap(),
            secret,
            "{} secret",
            c.id()
        );
        assert_eq!(c.members(gid).await.unwrap(), members, "{} members", c.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_full_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("ds"), &[]);
    let url = server.url();
    let open = |name: &str| {
        Client::open(dir.path().join(name), &url, name, ClientConfig::default()).unwrap()
    };
    let (alice, bob, carol) = (open("alice"), open("bob"), open("carol"));
    for c in [&alice, &bob, &carol] {
        c.register().await.unwrap();
    }
    let gid = alice.create_group(false).await.unwrap();
    alice.invite(&gid, &["bob", "carol"]).await.unwrap();
    for c in [&bob, &carol] {
        let events = c.receive(0).await.unwrap();
        assert!(matches!(events[0], Event::Joined { .. }), "{events:?}");
    }
    converged(&[&alice, &bob, &carol], &gid).await;

    alice.send(&gid, b"hi all").await.unwrap();
    bob.send(&gid, b"hi alice").await.unwrap();
    assert_eq!(
        messages(&carol.receive(0).await.unwrap()),
        vec![
            ("alice".into(), "hi all".into()),
            ("bob".into(), "hi alice".into())
        ]
    );
    assert_eq!(
        messages(&alice.receive(0).await.unwrap()),
        vec![("bob".into(), "hi alice".into())]
    );

    bob.self_update(&gid).await.unwrap();
    for c in [&alice, &carol] {
        c.receive(0).await.unwrap();
    }
    converged(&[&alice, &bob, &carol], &gid).await;

    alice.remove(&gid, "carol").await.unwrap();
    bob.receive(0).await.unwrap();
    let events = carol.receive(0).await.unwrap();
    assert!(
        events.iter().any(|e| matches!(e, Event::Removed { .. })),
        "{events:?}"
    );
    assert!(carol.groups().await.is_empty());
    converged(&[&alice, &bob], &gid).await;

    // Removed from a closed group, carol cannot come back by herself...
    let refused = carol.join_external(&gid).await.unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    assert!(carol.groups().await.is_empty());
    // ... only with a new invitation.
    alice.invite(&gid, &["carol"]).await.unwrap();
    bob.receive(0).await.unwrap();
    carol.receive(0).await.unwrap();
    converged(&[&alice, &bob, &carol], &gid).await;
    // As a member again, she may resync by external commit (replacing her
    // own leaf, as after losing her group state).
    carol.join_external(&gid).await.unwrap();
    for c in [&alice, &bob] {
        c.receive(0).await.unwrap();
    }
    converged(&[&alice, &bob, &carol], &gid).await;
    carol.send(&gid, b"back").await.unwrap();
    assert_eq!(
        messages(&bob.receive(0).await.unwrap()),
        vec![("carol".into(), "back".into())]
    );
    assert_eq!(
        alice.members(&gid).await.unwrap(),
        vec!["alice".to_string(), "bob".into(), "carol".into()]
    );

    // Carol leaves: her self-remove proposal is committed by the next member
    // that syncs, without anyone asking for it.
    carol.leave(&gid).await.unwrap();
    alice.receive(0).await.unwrap();
    bob.receive(0).await.unwrap();
    let events = carol.receive(0).await.unwrap();
    assert!(
        events.iter().any(|e| matches!(e, Event::Removed { .. })),
        "{events:?}"
    );
    assert!(carol.groups().await.is_empty());
    converged(&[&alice, &bob], &gid).await;
    assert_eq!(
        alice.members(&gid).await.unwrap(),
        vec!["alice".to_string(), "bob".into()]
    );
}
