//! Application messages of a past epoch, processed across a reopen of the
//! receiver's storage: the receiver must keep decrypting later generations.

mod common;

use common::*;
use mls_ds_storage::{SledProvider, Store, StoreConfig};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{MlsGroup, MlsMessageIn};
use openmls_traits::OpenMlsProvider;

fn open(dir: &std::path::Path) -> SledProvider {
    SledProvider::new(
        Store::open(dir, StoreConfig::default())
            .unwrap()
            .storage(b"m")
            .unwrap(),
    )
}

#[test]
fn past_epoch_messages_survive_reopen() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut alice = Member::new("alice", open(dirs[0].path()));
    let mut bob = Member::new("bob", open(dirs[1].path()));
    alice.create_group();
    let kp = bob.key_package();
    let (_, welcome) = alice.add(&[kp]);
    bob.join(&welcome);
    // Alice lags: she encrypts six messages at epoch e while bob commits.
    let held: Vec<Vec<u8>> = (0..12)
        .map(|i| alice.send(format!("m{i}").as_bytes()))
        .collect();
    let _commit = bob.self_update();
    for (i, m) in held.iter().enumerate() {
        if i == 4 || i == 8 {
            // Bob moves on by another epoch between past-epoch messages: a
            // staged commit stored in one write, merged in another, then an
            // application message of his own.
            let (signer, provider) = (&bob.signer, &bob.provider);
            let g = bob.group.as_mut().unwrap();
            provider.atomic(|p| {
                g.commit_builder()
                    .force_self_update(true)
                    .load_psks(p.storage())
                    .unwrap()
                    .create_group_info(true)
                    .build(p.rand(), p.crypto(), signer, |_| true)
                    .unwrap()
                    .stage_commit(p)
                    .unwrap()
            });
            provider.atomic(|p| g.merge_pending_commit(p).unwrap());
            let _ = bob.send(b"mine");
        }
        if i % 2 == 0 {
            // Reopen bob between past-epoch messages.
            bob.group = None;
            bob.provider = SledProvider::new(
                Store::temporary(StoreConfig::default())
                    .unwrap()
                    .storage(b"")
                    .unwrap(),
            );
            bob.provider = open(dirs[1].path());
            bob.reload_signer();
            bob.group = MlsGroup::load(bob.provider.storage(), &group_id()).unwrap();
        }
        let msg = MlsMessageIn::tls_deserialize_exact(m).unwrap();
        let provider = &bob.provider;
        let processed = bob
            .group
            .as_mut()
            .unwrap()
            .process_message(provider, msg.try_into_protocol_message().unwrap());
        assert!(processed.is_ok(), "message {i}: {:?}", processed.err());
    }
}
