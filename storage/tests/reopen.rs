//! Reopen test: after every step of the scenario each member's provider is
//! dropped, the store reopened from disk and the group loaded again; the
//! group keeps working with its peers.

mod common;

use common::*;
use mls_ds_storage::{SledProvider, Store, StoreConfig};
use openmls::prelude::MlsGroup;

fn open(dir: &std::path::Path) -> SledProvider {
    let store = Store::open(dir, StoreConfig::default()).expect("open store");
    SledProvider::new(store.storage(b"member").expect("namespace"))
}

#[test]
fn every_member_survives_reopen_after_every_step() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let names = ["alice", "bob", "charlie"];
    let members: Vec<Member<SledProvider>> = names
        .iter()
        .zip(&dirs)
        .map(|(n, d)| Member::new(n, open(d.path())))
        .collect();
    let mut reopened = 0;
    let members = run_scenario(members, |step, members| {
        for (m, dir) in members.iter_mut().zip(&dirs) {
            let before = m
                .group
                .as_ref()
                .map(|g| (g.epoch(), g.pending_proposals().count()));
            // Drop the old handle first so sled releases its file lock.
            m.group = None;
            m.provider = SledProvider::new(
                Store::temporary(StoreConfig::default())
                    .and_then(|s| s.storage(b""))
                    .unwrap(),
            );
            m.provider = open(dir.path());
            m.reload_signer();
            let loaded = MlsGroup::load(m.provider.storage(), &group_id()).expect("load");
            if before.is_none() {
                // Not yet joined, or removed (its stored group is inactive).
                continue;
            }
            m.group = loaded;
            let after = m
                .group
                .as_ref()
                .map(|g| (g.epoch(), g.pending_proposals().count()));
            assert_eq!(before, after, "{} after {step}", m.name);
            reopened += 1;
        }
    });
    assert!(reopened > 50, "reopened {reopened} times");
    assert_converged(&members);
}
