//! Shared MLS scenario for the storage crate's integration tests: members,
//! the helpers that move messages between them, and a multi-member scenario
//! that calls back after every step (to compare, reopen or crash).
#![allow(dead_code)]

use openmls::prelude::{tls_codec::*, *};
use openmls::schedule::PreSharedKeyId;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;

pub const CS: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// A provider that can run a closure as one atomic storage operation.
pub trait Atomic: OpenMlsProvider + Sized {
    fn atomic<T>(&self, f: impl FnOnce(&Self) -> T) -> T;
}

impl Atomic for mls_ds_storage::SledProvider {
    fn atomic<T>(&self, f: impl FnOnce(&Self) -> T) -> T {
        let tx = self.begin();
        let out = f(&tx);
        tx.commit().expect("commit transaction");
        out
    }
}

/// One group member and its MLS state.
pub struct Member<P: OpenMlsProvider> {
    pub name: String,
    pub provider: P,
    pub signer: SignatureKeyPair,
    pub credential: CredentialWithKey,
    pub group: Option<MlsGroup>,
}

pub fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CS)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(3)
        .build()
}

pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(3)
        .build()
}

pub fn group_id() -> GroupId {
    GroupId::from_slice(b"storage-test-group")
}

impl<P: Atomic> Member<P> {
    /// A new identity whose signature key is stored in the provider.
    pub fn new(name: &str, provider: P) -> Self {
        let signer = SignatureKeyPair::new(CS.signature_algorithm()).unwrap();
        signer.store(provider.storage()).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        Member {
            name: name.to_owned(),
            provider,
            signer,
            credential,
            group: None,
        }
    }

    /// Reload the signer from storage (after the provider was reopened).
    pub fn reload_signer(&mut self) {
        self.signer = SignatureKeyPair::read(
            self.provider.storage(),
            self.credential.signature_key.as_slice(),
            CS.signature_algorithm(),
        )
        .expect("signature key pair survives reopen");
    }

    pub fn group(&mut self) -> &mut MlsGroup {
        self.group.as_mut().expect("member is in the group")
    }

    pub fn key_package(&self) -> KeyPackage {
        self.provider.atomic(|p| {
            KeyPackage::builder()
                .build(CS, p, &self.signer, self.credential.clone())
                .unwrap()
                .key_package()
                .clone()
        })
    }

    pub fn create_group(&mut self) {
        let group = self.provider.atomic(|p| {
            MlsGroup::new_with_group_id(
                p,
                &self.signer,
                &create_config(),
                group_id(),
                self.credential.clone(),
            )
            .unwrap()
        });
        self.group = Some(group);
    }

    /// Add members by key package; returns (commit, welcome) as wire bytes.
    pub fn add(&mut self, kps: &[KeyPackage]) -> (Vec<u8>, Vec<u8>) {
        let (signer, provider) = (&self.signer, &self.provider);
        let group = self.group.as_mut().unwrap();
        provider.atomic(|p| {
            let (commit, welcome, _) = group.add_members(p, signer, kps).unwrap();
            group.merge_pending_commit(p).unwrap();
            (
                commit.tls_serialize_detached().unwrap(),
                welcome.tls_serialize_detached().unwrap(),
            )
        })
    }

    pub fn join(&mut self, welcome: &[u8]) {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome).unwrap();
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            panic!("not a welcome")
        };
        let group = self.provider.atomic(|p| {
            StagedWelcome::new_from_welcome(p, &join_config(), welcome, None)
                .unwrap()
                .into_group(p)
                .unwrap()
        });
        self.group = Some(group);
    }

    pub fn send(&mut self, text: &[u8]) -> Vec<u8> {
        let (signer, provider) = (&self.signer, &self.provider);
        let group = self.group.as_mut().unwrap();
        provider.atomic(|p| {
            group
                .create_message(p, signer, text)
                .unwrap()
                .tls_serialize_detached()
                .unwrap()
        })
    }

    pub fn self_update(&mut self) -> Vec<u8> {
        let (signer, provider) = (&self.signer, &self.provider);
        let group = self.group.as_mut().unwrap();
        provider.atomic(|p| {
            let bundle = group
                .self_update(p, signer, LeafNodeParameters::default())
                .unwrap();
            group.merge_pending_commit(p).unwrap();
            bundle.commit().tls_serialize_detached().unwrap()
        })
    }

    pub fn propose_self_update(&mut self) -> Vec<u8> {
        let (signer, provider) = (&self.signer, &self.provider);
        let group = self.group.as_mut().unwrap();
        provider.atomic(|p| {
            let (msg, _) = group
                .propose_self_update(p, signer, LeafNodeParameters::default())
                .unwrap();
            msg.tls_serialize_detached().unwrap()
        })
    }

    pub fn propose_external_psk(&mut self, psk_id: &[u8]) -> Vec<u8> {
        let (signer, provider) = (&self.signer, &self.provider);
        let group = self.group.as_mut().unwrap();
        provider.atomic(|p| {
            let id = PreSharedKeyId::external(psk_id.to_vec(), vec![7; CS.hash_length()]);
            let (msg, _) = group.propose_pre_shared_key(p, signer, id).unwrap();
            msg.tls_serialize_detached().unwrap()
        })
    }

    pub fn store_external_psk(&self, psk_id: &[u8], secret: &[u8]) {
        self.provider.atomic(|p| {
            PreSharedKeyId::external(psk_id.to_vec(), vec![7; CS.hash_length()])
                .store(p, secret)
                .unwrap()
        })
    }

    pub fn commit_pending(&mut self) -> Vec<u8> {
        let (signer, provider) = (&self.signer, &self.provider);
        let group = self.group.as_mut().unwrap();
        provider.atomic(|p| {
            let (commit, _, _) = group.commit_to_pending_proposals(p, signer).unwrap();
            group.merge_pending_commit(p).unwrap();
            commit.tls_serialize_detached().unwrap()
        })
    }

    pub fn remove(&mut self, victim: &str) -> Vec<u8> {
        let (signer, provider) = (&self.signer, &self.provider);
        let group = self.group.as_mut().unwrap();
        let idx = group
            .members()
            .find(|m| m.credential.serialized_content() == victim.as_bytes())
            .expect("victim is a member")
            .index;
        provider.atomic(|p| {
            let (commit, _, _) = group.remove_members(p, signer, &[idx]).unwrap();
            group.merge_pending_commit(p).unwrap();
            commit.tls_serialize_detached().unwrap()
        })
    }

    /// Process one message; returns the plaintext of an application message.
    pub fn receive(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let provider = &self.provider;
        let group = self.group.as_mut().unwrap();
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).unwrap();
        let protocol = msg.try_into_protocol_message().unwrap();
        provider.atomic(|p| {
            let processed = group.process_message(p, protocol).unwrap();
            match processed.into_content() {
                ProcessedMessageContent::ApplicationMessage(app) => Some(app.into_bytes()),
                ProcessedMessageContent::StagedCommitMessage(staged) => {
                    group.merge_staged_commit(p, *staged).unwrap();
                    None
                }
                ProcessedMessageContent::ProposalMessage(proposal) => {
                    group
                        .store_pending_proposal(p.storage(), *proposal)
                        .unwrap();
                    None
                }
                other => panic!("unexpected message content {other:?}"),
            }
        })
    }

    pub fn epoch(&self) -> u64 {
        self.group.as_ref().unwrap().epoch().as_u64()
    }

    pub fn exported_secret(&self) -> Vec<u8> {
        self.group
            .as_ref()
            .unwrap()
            .export_secret(self.provider.crypto(), "storage-test", b"", 32)
            .unwrap()
    }

    pub fn member_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .group
            .as_ref()
            .unwrap()
            .members()
            .map(|m| String::from_utf8_lossy(m.credential.serialized_content()).into_owned())
            .collect();
        v.sort();
        v
    }
}

/// Deliver `bytes` from `from` to every other member that has a group.
pub fn broadcast<P: Atomic>(members: &mut [Member<P>], from: usize, bytes: &[u8]) {
    for (i, m) in members.iter_mut().enumerate() {
        if i != from && m.group.is_some() {
            let got = m.receive(bytes);
            if let Some(text) = got {
                assert!(!text.is_empty());
            }
        }
    }
}

/// Send an application message from `from` and check every member reads it.
pub fn chat<P: Atomic>(members: &mut [Member<P>], from: usize, text: &[u8]) {
    let bytes = members[from].send(text);
    for (i, m) in members.iter_mut().enumerate() {
        if i != from && m.group.is_some() {
            assert_eq!(m.receive(&bytes).as_deref(), Some(text), "{} reads", m.name);
        }
    }
}

/// All members with a group agree on epoch, exported secret and roster.
pub fn assert_converged<P: Atomic>(members: &[Member<P>]) {
    let active: Vec<&Member<P>> = members.iter().filter(|m| m.group.is_some()).collect();
    let first = active[0];
    for m in &active[1..] {
        assert_eq!(m.epoch(), first.epoch(), "{} epoch", m.name);
        assert_eq!(
            m.exported_secret(),
            first.exported_secret(),
            "{} secret",
            m.name
        );
        assert_eq!(m.member_names(), first.member_names(), "{} roster", m.name);
    }
}

/// The multi-member scenario: create, add two members, messages every way,
/// self-update, queued proposals (with one withdrawn) then commit, external
/// PSK, remove. `after` runs after every step with the step's name.
pub fn run_scenario<P: Atomic>(
    mut members: Vec<Member<P>>,
    mut after: impl FnMut(&str, &mut Vec<Member<P>>),
) -> Vec<Member<P>> {
    assert!(members.len() >= 3);
    members[0].create_group();
    after("create", &mut members);

    let kps = vec![members[1].key_package(), members[2].key_package()];
    after("key packages", &mut members);
    let (commit, welcome) = members[0].add(&kps);
    // No other member exists yet to process the commit.
    drop(commit);
    after("add", &mut members);
    members[1].join(&welcome);
    after("join bob", &mut members);
    members[2].join(&welcome);
    after("join charlie", &mut members);
    assert_converged(&members);

    for from in 0..3 {
        chat(&mut members, from, format!("hello from {from}").as_bytes());
        after("chat", &mut members);
    }

    let commit = members[1].self_update();
    after("self-update", &mut members);
    broadcast(&mut members, 1, &commit);
    after("process self-update", &mut members);
    assert_converged(&members);

    // Two queued proposals, one of them withdrawn before the commit.
    let p0 = members[0].propose_self_update();
    broadcast(&mut members, 0, &p0);
    after("proposal 1", &mut members);
    let p2 = members[2].propose_self_update();
    broadcast(&mut members, 2, &p2);
    after("proposal 2", &mut members);
    for m in members.iter_mut() {
        let group = m.group.as_mut().unwrap();
        assert_eq!(group.pending_proposals().count(), 2, "{} queue", m.name);
    }
    // The committer withdraws the first proposal: removal of one proposal
    // among several must keep the other, in order.
    {
        let bob = &mut members[1];
        let group = bob.group.as_mut().unwrap();
        let first = group
            .pending_proposals()
            .next()
            .unwrap()
            .proposal_reference_ref()
            .clone();
        bob.provider
            .atomic(|p| group.remove_pending_proposal(p.storage(), &first))
            .unwrap();
        assert_eq!(group.pending_proposals().count(), 1);
    }
    after("withdraw proposal", &mut members);
    let commit = members[1].commit_pending();
    after("commit proposals", &mut members);
    broadcast(&mut members, 1, &commit);
    after("process proposal commit", &mut members);
    assert_converged(&members);

    for m in members.iter() {
        m.store_external_psk(b"shared-psk", b"thirty-two bytes of shared secret");
    }
    let psk = members[0].propose_external_psk(b"shared-psk");
    broadcast(&mut members, 0, &psk);
    after("psk proposal", &mut members);
    let commit = members[0].commit_pending();
    broadcast(&mut members, 0, &commit);
    after("psk commit", &mut members);
    assert_converged(&members);

    let commit = members[0].remove("charlie");
    after("remove", &mut members);
    broadcast(&mut members, 0, &commit);
    members[2].group = None;
    after("process remove", &mut members);
    chat(&mut members, 0, b"bye charlie");
    chat(&mut members, 1, b"bye");
    after("final chat", &mut members);
    assert_converged(&members);
    members
}
