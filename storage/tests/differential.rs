//! Differential test: `SledStorage` against OpenMLS's reference
//! `MemoryStorage`. A tee storage forwards every trait call to both; writes
//! must succeed or fail together and every read must return the same value
//! (compared as `serde_json` bytes). The multi-member scenario of
//! `common::run_scenario` runs on the tee, and after every step the group
//! loaded from each backend must equal the member's in-memory group.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use mls_ds_storage::{SledStorage, StorageError, Store, StoreConfig};
use openmls::prelude::MlsGroup;
use openmls_memory_storage::{MemoryStorage, MemoryStorageError};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::storage::{traits, Entity, Key, StorageProvider, CURRENT_VERSION};
use openmls_traits::OpenMlsProvider;
use serde::Serialize;

/// Error of the tee: only returned when both backends failed.
#[derive(Debug, thiserror::Error)]
#[error("both backends failed: sled: {sled}; memory: {mem}")]
struct TeeError {
    sled: StorageError,
    mem: MemoryStorageError,
}

/// Number of compared reads and writes, shared by a storage and its
/// transaction views.
#[derive(Debug, Default)]
struct Counts {
    reads: AtomicUsize,
    writes: AtomicUsize,
}

/// Storage that forwards every call to sled and to memory and compares.
#[derive(Debug, Clone)]
struct TeeStorage {
    sled: SledStorage,
    mem: Arc<MemoryStorage>,
    counts: Arc<Counts>,
}

/// At most this many characters of a differing value go into a panic message.
const SHOW: usize = 4000;

fn show(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    if s.len() > SHOW {
        let cut = (0..=SHOW)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}... ({} bytes)", &s[..cut], bytes.len())
    } else {
        s.into_owned()
    }
}

impl TeeStorage {
    fn new(sled: SledStorage) -> Self {
        TeeStorage {
            sled,
            mem: Arc::new(MemoryStorage::default()),
            counts: Arc::default(),
        }
    }

    fn reads(&self) -> usize {
        self.counts.reads.load(Ordering::Relaxed)
    }

    fn writes(&self) -> usize {
        self.counts.writes.load(Ordering::Relaxed)
    }

    /// Compare the two outcomes of one call: both `Ok` with equal values, or
    /// both `Err`. Returns sled's value.
    fn compare<T: Serialize>(
        &self,
        is_read: bool,
        method: &str,
        sled: Result<T, StorageError>,
        mem: Result<T, MemoryStorageError>,
    ) -> Result<T, TeeError> {
        let counter = if is_read {
            &self.counts.reads
        } else {
            &self.counts.writes
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match (sled, mem) {
            (Ok(s), Ok(m)) => {
                let sb = serde_json::to_vec(&s).expect("serialize sled value");
                let mb = serde_json::to_vec(&m).expect("serialize memory value");
                if sb != mb {
                    panic!(
                        "{method}: sled and memory disagree\n  sled:   {}\n  memory: {}",
                        show(&sb),
                        show(&mb)
                    );
                }
                Ok(s)
            }
            (Err(sled), Err(mem)) => Err(TeeError { sled, mem }),
            (Ok(s), Err(e)) => panic!(
                "{method}: sled succeeded ({}) but memory failed: {e}",
                show(&serde_json::to_vec(&s).unwrap_or_default())
            ),
            (Err(e), Ok(m)) => panic!(
                "{method}: memory succeeded ({}) but sled failed: {e}",
                show(&serde_json::to_vec(&m).unwrap_or_default())
            ),
        }
    }

    fn read<T: Serialize>(
        &self,
        method: &str,
        sled: Result<T, StorageError>,
        mem: Result<T, MemoryStorageError>,
    ) -> Result<T, TeeError> {
        self.compare(true, method, sled, mem)
    }

    fn write<T: Serialize>(
        &self,
        method: &str,
        sled: Result<T, StorageError>,
        mem: Result<T, MemoryStorageError>,
    ) -> Result<T, TeeError> {
        self.compare(false, method, sled, mem)
    }
}

/// Implements trait methods by calling both backends (fully qualified:
/// `MemoryStorage` also implements the test version of the trait) and handing
/// both outcomes to `TeeStorage::read` or `TeeStorage::write`. Generic
/// parameters must be listed in the trait's order (they are passed by
/// turbofish, since some appear in no argument).
macro_rules! tee {
    ($(
        $(#[$attr:meta])*
        $kind:ident $name:ident<$($g:ident: $bound:ident),*>($($arg:ident: $ty:ty),*) -> $ret:ty;
    )*) => {$(
        $(#[$attr])*
        fn $name<$($g: traits::$bound<CURRENT_VERSION>),*>(
            &self,
            $($arg: $ty),*
        ) -> Result<$ret, TeeError> {
            self.$kind(
                stringify!($name),
                StorageProvider::<CURRENT_VERSION>::$name::<$($g),*>(&self.sled, $($arg),*),
                StorageProvider::<CURRENT_VERSION>::$name::<$($g),*>(&*self.mem, $($arg),*),
            )
        }
    )*};
}

impl StorageProvider<CURRENT_VERSION> for TeeStorage {
    type Error = TeeError;

    tee! {
        // Group state: writers.
        write write_mls_join_config<G: GroupId, C: MlsGroupJoinConfig>(group_id: &G, config: &C) -> ();
        write append_own_leaf_node<G: GroupId, L: LeafNode>(group_id: &G, leaf_node: &L) -> ();
        write queue_proposal<G: GroupId, R: ProposalRef, P: QueuedProposal>(group_id: &G, proposal_ref: &R, proposal: &P) -> ();
        write write_tree<G: GroupId, T: TreeSync>(group_id: &G, tree: &T) -> ();
        write write_interim_transcript_hash<G: GroupId, H: InterimTranscriptHash>(group_id: &G, hash: &H) -> ();
        write write_context<G: GroupId, C: GroupContext>(group_id: &G, context: &C) -> ();
        write write_confirmation_tag<G: GroupId, T: ConfirmationTag>(group_id: &G, tag: &T) -> ();
        write write_group_state<S: GroupState, G: GroupId>(group_id: &G, state: &S) -> ();
        write write_message_secrets<G: GroupId, M: MessageSecrets>(group_id: &G, secrets: &M) -> ();
        write write_resumption_psk_store<G: GroupId, R: ResumptionPskStore>(group_id: &G, store: &R) -> ();
        write write_own_leaf_index<G: GroupId, I: LeafNodeIndex>(group_id: &G, index: &I) -> ();
        write write_group_epoch_secrets<G: GroupId, S: GroupEpochSecrets>(group_id: &G, secrets: &S) -> ();
        #[cfg(feature = "extensions-draft")]
        write write_application_export_tree<G: GroupId, T: ApplicationExportTree>(group_id: &G, tree: &T) -> ();
        #[cfg(feature = "virtual-clients-draft")]
        write write_vc_emulation_epoch_state<E: VcEpochId, S: VcEmulationEpochState>(epoch_id: &E, state: &S) -> ();
        #[cfg(feature = "virtual-clients-draft")]
        write write_vc_emulation_bindings<G: GroupId, B: VcEmulationBindings>(group_id: &G, bindings: &B) -> ();
        #[cfg(feature = "virtual-clients-draft")]
        write write_registered_vc_emulation_epoch<G: GroupId, R: RegisteredVcEmulationEpoch>(group_id: &G, registered: &R) -> ();
        #[cfg(feature = "virtual-clients-draft")]
        write write_vc_operation_tree<E: VcEpochId, T: VcOperationTree>(epoch_id: &E, tree: &T) -> ();
        #[cfg(feature = "virtual-clients-draft")]
        write write_retained_key_package_material_batch<E: VcEpochId, T: VcOperationTree, K: HashReference, M: RetainedKeyPackageMaterial>(epoch_id: &E, tree: &T, materials: &[(K, M)]) -> ();

        // Crypto objects: writers.
        write write_signature_key_pair<K: SignaturePublicKey, P: SignatureKeyPair>(public_key: &K, pair: &P) -> ();
        write write_encryption_key_pair<K: EncryptionKey, P: HpkeKeyPair>(public_key: &K, pair: &P) -> ();
        write write_encryption_epoch_key_pairs<G: GroupId, E: EpochKey, P: HpkeKeyPair>(group_id: &G, epoch: &E, leaf_index: u32, pairs: &[P]) -> ();
        write write_key_package<R: HashReference, K: KeyPackage>(hash_ref: &R, key_package: &K) -> ();
        write write_psk<I: PskId, B: PskBundle>(psk_id: &I, psk: &B) -> ();

        // Group state: readers.
        read mls_group_join_config<G: GroupId, C: MlsGroupJoinConfig>(group_id: &G) -> Option<C>;
        read own_leaf_nodes<G: GroupId, L: LeafNode>(group_id: &G) -> Vec<L>;
        read queued_proposal_refs<G: GroupId, R: ProposalRef>(group_id: &G) -> Vec<R>;
        read queued_proposals<G: GroupId, R: ProposalRef, P: QueuedProposal>(group_id: &G) -> Vec<(R, P)>;
        read tree<G: GroupId, T: TreeSync>(group_id: &G) -> Option<T>;
        read group_context<G: GroupId, C: GroupContext>(group_id: &G) -> Option<C>;
        read interim_transcript_hash<G: GroupId, H: InterimTranscriptHash>(group_id: &G) -> Option<H>;
        read confirmation_tag<G: GroupId, T: ConfirmationTag>(group_id: &G) -> Option<T>;
        read group_state<S: GroupState, G: GroupId>(group_id: &G) -> Option<S>;
        read message_secrets<G: GroupId, M: MessageSecrets>(group_id: &G) -> Option<M>;
        read resumption_psk_store<G: GroupId, R: ResumptionPskStore>(group_id: &G) -> Option<R>;
        read own_leaf_index<G: GroupId, I: LeafNodeIndex>(group_id: &G) -> Option<I>;
        read group_epoch_secrets<G: GroupId, S: GroupEpochSecrets>(group_id: &G) -> Option<S>;

        // Crypto objects: readers.
        read signature_key_pair<K: SignaturePublicKey, P: SignatureKeyPair>(public_key: &K) -> Option<P>;
        read encryption_key_pair<P: HpkeKeyPair, K: EncryptionKey>(public_key: &K) -> Option<P>;
        read encryption_epoch_key_pairs<G: GroupId, E: EpochKey, P: HpkeKeyPair>(group_id: &G, epoch: &E, leaf_index: u32) -> Vec<P>;
        read key_package<R: HashReference, K: KeyPackage>(hash_ref: &R) -> Option<K>;
        read psk<B: PskBundle, I: PskId>(psk_id: &I) -> Option<B>;
        #[cfg(feature = "extensions-draft")]
        read application_export_tree<G: GroupId, T: ApplicationExportTree>(group_id: &G) -> Option<T>;
        #[cfg(feature = "virtual-clients-draft")]
        read vc_emulation_epoch_state<E: VcEpochId, S: VcEmulationEpochState>(epoch_id: &E) -> Option<S>;
        #[cfg(feature = "virtual-clients-draft")]
        read vc_emulation_bindings<G: GroupId, B: VcEmulationBindings>(group_id: &G) -> Option<B>;
        #[cfg(feature = "virtual-clients-draft")]
        read registered_vc_emulation_epoch<G: GroupId, R: RegisteredVcEmulationEpoch>(group_id: &G) -> Option<R>;
        #[cfg(feature = "virtual-clients-draft")]
        read vc_operation_tree<E: VcEpochId, T: VcOperationTree>(epoch_id: &E) -> Option<T>;
        #[cfg(feature = "virtual-clients-draft")]
        read retained_key_package_material<R: HashReference, M: RetainedKeyPackageMaterial>(hash_ref: &R) -> Option<M>;
        #[cfg(feature = "virtual-clients-draft")]
        read has_retained_key_package_material_for_epoch<E: VcEpochId>(epoch_id: &E) -> bool;

        // Group state: deleters.
        write remove_proposal<G: GroupId, R: ProposalRef>(group_id: &G, proposal_ref: &R) -> ();
        write delete_own_leaf_nodes<G: GroupId>(group_id: &G) -> ();
        write delete_group_config<G: GroupId>(group_id: &G) -> ();
        write delete_tree<G: GroupId>(group_id: &G) -> ();
        write delete_confirmation_tag<G: GroupId>(group_id: &G) -> ();
        write delete_group_state<G: GroupId>(group_id: &G) -> ();
        write delete_context<G: GroupId>(group_id: &G) -> ();
        write delete_interim_transcript_hash<G: GroupId>(group_id: &G) -> ();
        write delete_message_secrets<G: GroupId>(group_id: &G) -> ();
        write delete_all_resumption_psk_secrets<G: GroupId>(group_id: &G) -> ();
        write delete_own_leaf_index<G: GroupId>(group_id: &G) -> ();
        write delete_group_epoch_secrets<G: GroupId>(group_id: &G) -> ();
        write clear_proposal_queue<G: GroupId, R: ProposalRef>(group_id: &G) -> ();

        // Crypto objects: deleters.
        write delete_signature_key_pair<K: SignaturePublicKey>(public_key: &K) -> ();
        write delete_encryption_key_pair<K: EncryptionKey>(public_key: &K) -> ();
        write delete_encryption_epoch_key_pairs<G: GroupId, E: EpochKey>(group_id: &G, epoch: &E, leaf_index: u32) -> ();
        write delete_key_package<R: HashReference>(hash_ref: &R) -> ();
        write delete_psk<I: PskId>(psk_id: &I) -> ();
        #[cfg(feature = "extensions-draft")]
        write delete_application_export_tree<G: GroupId, T: ApplicationExportTree>(group_id: &G) -> ();
        #[cfg(feature = "virtual-clients-draft")]
        write delete_vc_emulation_state_if_unreferenced<E: VcEpochId>(epoch_id: &E) -> bool;
        #[cfg(feature = "virtual-clients-draft")]
        write delete_vc_emulation_bindings<G: GroupId>(group_id: &G) -> ();
        #[cfg(feature = "virtual-clients-draft")]
        write delete_registered_vc_emulation_epoch<G: GroupId>(group_id: &G) -> ();
        #[cfg(feature = "virtual-clients-draft")]
        write delete_retained_key_package_material<R: HashReference>(hash_ref: &R) -> ();
    }
}

/// RustCrypto for crypto and randomness, the tee for storage.
struct TeeProvider {
    crypto: Arc<RustCrypto>,
    storage: TeeStorage,
}

impl OpenMlsProvider for TeeProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = TeeStorage;

    fn storage(&self) -> &TeeStorage {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

impl Atomic for TeeProvider {
    /// `f` runs on a sled transaction view (which reads its own writes) and
    /// the same memory storage; sled commits when `f` returns.
    fn atomic<T>(&self, f: impl FnOnce(&Self) -> T) -> T {
        let tx = self.storage.sled.begin();
        let inner = TeeProvider {
            crypto: self.crypto.clone(),
            storage: TeeStorage {
                sled: (*tx).clone(),
                ..self.storage.clone()
            },
        };
        let out = f(&inner);
        tx.commit().expect("commit sled transaction");
        out
    }
}

fn tee_provider() -> TeeProvider {
    let store = Store::temporary(StoreConfig::default()).expect("temporary store");
    TeeProvider {
        crypto: Arc::new(RustCrypto::default()),
        storage: TeeStorage::new(store.storage(b"ns").expect("namespace")),
    }
}

#[test]
fn sled_matches_memory_through_the_scenario() {
    let members: Vec<Member<TeeProvider>> = ["alice", "bob", "charlie"]
        .iter()
        .map(|name| Member::new(name, tee_provider()))
        .collect();
    let mut loads = 0;
    let mut steps = 0;
    let members = run_scenario(members, |step, members| {
        steps += 1;
        for m in members.iter() {
            let storage = &m.provider.storage;
            // Through the tee: every read of the load is compared.
            let teed = MlsGroup::load(storage, &group_id()).expect("load through tee");
            let sled = MlsGroup::load(&storage.sled, &group_id()).expect("load from sled");
            let mem = MlsGroup::load(&*storage.mem, &group_id()).expect("load from memory");
            assert!(
                sled == mem,
                "{} after {step}: sled and memory groups differ",
                m.name
            );
            assert!(
                teed == sled,
                "{} after {step}: tee and sled groups differ",
                m.name
            );
            if m.group.is_some() {
                assert!(
                    sled == m.group,
                    "{} after {step}: stored group differs from the live one",
                    m.name
                );
                loads += 1;
            }
        }
    });
    assert_converged(&members);
    let reads: usize = members.iter().map(|m| m.provider.storage.reads()).sum();
    let writes: usize = members.iter().map(|m| m.provider.storage.writes()).sum();
    println!(
        "{steps} steps, {loads} group comparisons, {reads} reads and {writes} writes compared"
    );
    assert!(loads > 40, "only {loads} group comparisons");
    assert!(reads > 500, "only {reads} reads compared");
    assert!(writes > 200, "only {writes} writes compared");
}

/// A stand-in for every storage type in the proposal-queue test.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct TestVal(Vec<u8>);

impl Key<CURRENT_VERSION> for TestVal {}
impl Entity<CURRENT_VERSION> for TestVal {}
impl traits::GroupId<CURRENT_VERSION> for TestVal {}
impl traits::ProposalRef<CURRENT_VERSION> for TestVal {}
impl traits::QueuedProposal<CURRENT_VERSION> for TestVal {}

fn val(s: &str) -> TestVal {
    TestVal(s.as_bytes().to_vec())
}

#[test]
fn proposal_queue_keeps_order_on_both() {
    let tee = tee_provider().storage;
    let group = val("group");
    let other = val("other group");
    let refs: Vec<TestVal> = ["ref-a", "ref-b", "ref-c"].map(val).into();
    let props: Vec<TestVal> = ["proposal a", "proposal b", "proposal c"].map(val).into();

    // Reads of a group that never had a queue.
    let empty: Vec<TestVal> = tee.queued_proposal_refs(&group).unwrap();
    assert!(empty.is_empty());
    let empty: Vec<(TestVal, TestVal)> = tee.queued_proposals(&group).unwrap();
    assert!(empty.is_empty());

    for (r, p) in refs.iter().zip(&props) {
        tee.queue_proposal(&group, r, p).unwrap();
    }
    // A proposal of another group must not show up in this one.
    tee.queue_proposal(&other, &val("ref-x"), &val("proposal x"))
        .unwrap();

    // Removing a reference that is not queued is a no-op on both.
    tee.remove_proposal(&group, &val("not queued")).unwrap();
    let got: Vec<TestVal> = tee.queued_proposal_refs(&group).unwrap();
    assert_eq!(got, refs);

    tee.remove_proposal(&group, &refs[1]).unwrap();
    let got: Vec<TestVal> = tee.queued_proposal_refs(&group).unwrap();
    assert_eq!(got, vec![refs[0].clone(), refs[2].clone()]);
    let got: Vec<(TestVal, TestVal)> = tee.queued_proposals(&group).unwrap();
    assert_eq!(
        got,
        vec![
            (refs[0].clone(), props[0].clone()),
            (refs[2].clone(), props[2].clone())
        ]
    );

    // Inside a transaction: the view reads its own writes.
    let tx = tee.sled.begin();
    let view = TeeStorage {
        sled: (*tx).clone(),
        ..tee.clone()
    };
    view.queue_proposal(&group, &refs[1], &props[1]).unwrap();
    let got: Vec<TestVal> = view.queued_proposal_refs(&group).unwrap();
    assert_eq!(got, vec![refs[0].clone(), refs[2].clone(), refs[1].clone()]);
    tx.commit().unwrap();
    let got: Vec<(TestVal, TestVal)> = tee.queued_proposals(&group).unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2], (refs[1].clone(), props[1].clone()));

    tee.clear_proposal_queue::<TestVal, TestVal>(&group)
        .unwrap();
    let got: Vec<TestVal> = tee.queued_proposal_refs(&group).unwrap();
    assert!(got.is_empty());
    let got: Vec<(TestVal, TestVal)> = tee.queued_proposals(&group).unwrap();
    assert!(got.is_empty());
    // Clearing an empty queue is fine; the other group is untouched.
    tee.clear_proposal_queue::<TestVal, TestVal>(&group)
        .unwrap();
    let got: Vec<(TestVal, TestVal)> = tee.queued_proposals(&other).unwrap();
    assert_eq!(got, vec![(val("ref-x"), val("proposal x"))]);

    assert_eq!(tee.reads(), 10, "every read above was compared");
}

/// The tee is not vacuous: a value only one backend holds is caught.
#[test]
#[should_panic(expected = "queued_proposal_refs: sled and memory disagree")]
fn tee_catches_a_disagreement() {
    let tee = tee_provider().storage;
    let group = val("group");
    tee.sled
        .queue_proposal(&group, &val("ref"), &val("proposal"))
        .unwrap();
    let _: Vec<TestVal> = tee.queued_proposal_refs(&group).unwrap();
}
