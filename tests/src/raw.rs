//! Low-level test clients: OpenMLS groups driven by hand (on the storage
//! crate's provider) over the SDK's typed API, so tests can stage competing
//! commits, replay requests and send malformed ones.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use mls_ds_client::client::{create_config, join_config, CIPHERSUITE};
use mls_ds_client::{DsApi, HttpPool, Transport};
use mls_ds_protocol::groups::GroupInfoResponse;
use mls_ds_protocol::queue::QueueEntry;
use mls_ds_protocol::ClientId;
use mls_ds_storage::{SledProvider, Store, StoreConfig};
use openmls::group::{CommitBuilder, Initial};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;

/// One hand-driven member.
pub struct RawMember {
    /// Typed API with this member's credentials.
    pub api: DsApi,
    /// Local OpenMLS state (temporary store).
    pub provider: SledProvider,
    /// Signature key.
    pub signer: SignatureKeyPair,
    /// Credential.
    pub credential: CredentialWithKey,
    /// The group, once in one.
    pub group: Option<MlsGroup>,
    /// Highest queue sequence number processed.
    pub cursor: u64,
}

/// A send id that no earlier send used: now, and a random nonce.
pub fn fresh_send_id() -> mls_ds_client::SendId {
    mls_ds_client::SendId {
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_millis() as u64,
        nonce: rand::random(),
    }
}

/// Assert that every member is at the same epoch with the same exported
/// secret.
pub fn converged(members: &[&RawMember]) {
    let (epoch, secret) = (members[0].epoch(), members[0].secret());
    for m in members {
        assert_eq!((m.epoch(), m.secret()), (epoch, secret.clone()));
    }
}

/// Register each of `names` with one key package, 16 at a time, on
/// in-memory providers that are dropped at once: members that are added to
/// a group and stay offline, for tests and benchmarks of big groups.
pub async fn register_offline(url: &str, pool: &HttpPool, names: &[String]) {
    for chunk in names.chunks(16) {
        let mut tasks = tokio::task::JoinSet::new();
        for name in chunk {
            tasks.spawn(register_offline_one(
                url.to_owned(),
                pool.clone(),
                name.clone(),
            ));
        }
        tasks.join_all().await;
    }
}

/// Register one offline client `name` with one key package.
pub async fn register_offline_one(url: String, pool: HttpPool, name: String) {
    let provider = OpenMlsRustCrypto::default();
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    let kp = KeyPackage::builder()
        .build(CIPHERSUITE, &provider, &signer, credential)
        .unwrap();
    let kp = wire(&MlsMessageOut::from(kp.key_package().clone()));
    let transport =
        Transport::with_pool(&url, ClientId::new(&name).unwrap(), signer, pool).unwrap();
    let api = DsApi::new(transport);
    api.register().await.unwrap();
    api.publish_key_packages(vec![kp], None).await.unwrap();
}

/// Serialize an MLS object.
pub fn wire<T: tls_codec::Serialize>(v: &T) -> Vec<u8> {
    v.tls_serialize_detached().expect("serialize")
}

impl RawMember {
    /// A new identity (not yet registered), with connections of its own.
    pub fn new(url: &str, name: &str) -> RawMember {
        Self::with_pool(url, name, HttpPool::new().unwrap())
    }

    /// A new identity whose requests share the connections of `pool`.
    pub fn with_pool(url: &str, name: &str, pool: HttpPool) -> RawMember {
        let store = Store::temporary(StoreConfig::default()).unwrap();
        let provider = SledProvider::new(store.storage(name.as_bytes()).unwrap());
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
        signer.store(provider.storage()).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        let api = DsApi::new(
            Transport::with_pool(url, ClientId::new(name).unwrap(), signer.clone(), pool).unwrap(),
        );
        RawMember {
            api,
            provider,
            signer,
            credential,
            group: None,
            cursor: 0,
        }
    }

    /// This client's API at the DS at `url` (e.g. another node on the same
    /// database), with connections and a session of its own.
    pub fn api_at(&self, url: &str) -> DsApi {
        let id = ClientId::new(self.credential.credential.serialized_content()).unwrap();
        DsApi::new(Transport::new(url, id, self.signer.clone()).unwrap())
    }

    /// Send every later request to the DS at `url`, as the same client.
    pub fn move_to(&mut self, url: &str) {
        self.api = self.api_at(url);
    }

    /// Register and publish `n` key packages.
    pub async fn register(&self, n: usize) {
        self.api.register().await.unwrap();
        if n > 0 {
            let kps = (0..n).map(|_| self.key_package()).collect();
            self.api.publish_key_packages(kps, None).await.unwrap();
        }
    }

    /// A fresh key package as MLSMessage bytes.
    pub fn key_package(&self) -> Vec<u8> {
        let kp = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .unwrap();
        wire(&MlsMessageOut::from(kp.key_package().clone()))
    }

    /// The group (panics if none).
    pub fn group(&mut self) -> &mut MlsGroup {
        self.group.as_mut().expect("in a group")
    }

    /// Group id bytes.
    pub fn gid(&self) -> Vec<u8> {
        self.group.as_ref().unwrap().group_id().as_slice().to_vec()
    }

    /// Create a group and register it with the DS.
    pub async fn create_group(&mut self, open: bool) {
        let g = MlsGroup::new(
            &self.provider,
            &self.signer,
            &create_config(),
            self.credential.clone(),
        )
        .unwrap();
        let gi = wire(
            &g.export_group_info(self.provider.crypto(), &self.signer, false)
                .unwrap(),
        );
        let tree = wire(&g.export_ratchet_tree());
        self.group = Some(g);
        self.api.create_group(gi, tree, open).await.unwrap();
    }

    /// Stage a commit adding the given claimed key packages (not merged).
    /// Returns (commit, welcome, group_info) bytes.
    pub fn stage_add(&mut self, kps: Vec<KeyPackage>) -> (Vec<u8>, Option<Vec<u8>>, Vec<u8>) {
        self.stage(|b| b.propose_adds(kps))
    }

    /// Stage a self-update commit (not merged).
    pub fn stage_update(&mut self) -> (Vec<u8>, Option<Vec<u8>>, Vec<u8>) {
        self.stage(|b| b.force_self_update(true))
    }

    /// A proposal to update this member's own leaf, as `MLSMessage` bytes
    /// (sent like a message; the next commit of any member includes it).
    pub fn propose_update(&mut self) -> Vec<u8> {
        let (p, s) = (&self.provider, &self.signer);
        let (message, _) = self
            .group
            .as_mut()
            .unwrap()
            .propose_self_update(p, s, LeafNodeParameters::default())
            .unwrap();
        wire(&message)
    }

    /// Stage a commit removing the member `who` (not merged).
    pub fn stage_remove(&mut self, who: &str) -> (Vec<u8>, Option<Vec<u8>>, Vec<u8>) {
        let leaf = self
            .group()
            .members()
            .find(|m| m.credential.serialized_content() == who.as_bytes())
            .expect("a member")
            .index;
        self.stage(|b| b.propose_removals([leaf]))
    }

    /// Join (or resync into) a group by external commit from the DS's
    /// GroupInfo and ratchet tree, dropping any local state of the group
    /// first. The new group replaces `self.group`; returns the commit and
    /// the new epoch's GroupInfo to submit.
    pub fn stage_external_join(&mut self, info: &GroupInfoResponse) -> (Vec<u8>, Vec<u8>) {
        if let Some(mut old) = self.group.take() {
            old.delete(self.provider.storage()).unwrap();
        }
        let msg = MlsMessageIn::tls_deserialize_exact(info.group_info.as_slice()).unwrap();
        let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
            panic!("not a GroupInfo")
        };
        let tree = RatchetTreeIn::tls_deserialize_exact(info.ratchet_tree.as_slice()).unwrap();
        let p = &self.provider;
        let (group, bundle) = MlsGroup::external_commit_builder()
            .with_ratchet_tree(tree)
            .with_config(join_config())
            .build_group(p, vgi, self.credential.clone())
            .unwrap()
            .load_psks(p.storage())
            .unwrap()
            .create_group_info(true)
            .build(p.rand(), p.crypto(), &self.signer, |_| true)
            .unwrap()
            .finalize(p)
            .unwrap();
        self.group = Some(group);
        let (commit, _, group_info) = bundle.into_messages();
        (wire(&commit), wire(&group_info.expect("a GroupInfo")))
    }

    fn stage(
        &mut self,
        shape: impl FnOnce(CommitBuilder<'_, Initial>) -> CommitBuilder<'_, Initial>,
    ) -> (Vec<u8>, Option<Vec<u8>>, Vec<u8>) {
        let (provider, signer) = (&self.provider, &self.signer);
        let bundle = shape(self.group.as_mut().unwrap().commit_builder())
            .load_psks(provider.storage())
            .unwrap()
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .unwrap()
            .stage_commit(provider)
            .unwrap();
        let (c, w, gi) = bundle.into_messages();
        (wire(&c), w.map(|w| wire(&w)), wire(&gi.unwrap()))
    }

    /// Claim a key package of `who` and validate it.
    pub async fn claim(&self, who: &str) -> KeyPackage {
        let claimed = self
            .api
            .claim_key_package(&ClientId::new(who).unwrap())
            .await
            .unwrap();
        let msg = MlsMessageIn::tls_deserialize_exact(claimed.key_package.as_slice()).unwrap();
        let MlsMessageBodyIn::KeyPackage(kp) = msg.extract() else {
            panic!("not a key package")
        };
        kp.validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .unwrap()
    }

    /// Merge the pending commit after the DS accepted it.
    pub fn merge(&mut self) {
        let p = &self.provider;
        self.group
            .as_mut()
            .unwrap()
            .merge_pending_commit(p)
            .unwrap();
    }

    /// Drop the pending commit after the DS rejected it.
    pub fn clear(&mut self) {
        let p = &self.provider;
        self.group
            .as_mut()
            .unwrap()
            .clear_pending_commit(p.storage())
            .unwrap();
    }

    /// Encrypt an application message.
    pub fn encrypt(&mut self, text: &[u8]) -> Vec<u8> {
        let (p, s) = (&self.provider, &self.signer);
        wire(
            &self
                .group
                .as_mut()
                .unwrap()
                .create_message(p, s, text)
                .unwrap(),
        )
    }

    /// Fetch and process every queued entry; returns application plaintexts.
    pub async fn sync(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let page = self.api.fetch(self.cursor, 100, 0).await.unwrap();
            if page.entries.is_empty() {
                return out;
            }
            for e in &page.entries {
                if let Some(t) = self.process(e) {
                    out.push(t);
                }
                self.cursor = e.seq;
            }
            self.api.ack(self.cursor).await.unwrap();
        }
    }

    /// Process one queue entry.
    pub fn process(&mut self, e: &QueueEntry) -> Option<Vec<u8>> {
        let msg = MlsMessageIn::tls_deserialize_exact(e.message.as_slice()).unwrap();
        let p = &self.provider;
        match msg.extract() {
            MlsMessageBodyIn::Welcome(w) => {
                let tree = (!e.ratchet_tree.as_slice().is_empty()).then(|| {
                    RatchetTreeIn::tls_deserialize_exact(e.ratchet_tree.as_slice()).unwrap()
                });
                let g = StagedWelcome::new_from_welcome(p, &join_config(), w, tree)
                    .unwrap()
                    .into_group(p)
                    .unwrap();
                self.group = Some(g);
                None
            }
            body => {
                let pm: ProtocolMessage = match body {
                    MlsMessageBodyIn::PublicMessage(m) => m.into(),
                    MlsMessageBodyIn::PrivateMessage(m) => m.into(),
                    _ => panic!("unexpected entry"),
                };
                let g = self.group.as_mut().unwrap();
                match g.process_message(p, pm).unwrap().into_content() {
                    ProcessedMessageContent::ApplicationMessage(a) => Some(a.into_bytes()),
                    ProcessedMessageContent::StagedCommitMessage(s) => {
                        g.merge_staged_commit(p, *s).unwrap();
                        None
                    }
                    ProcessedMessageContent::ProposalMessage(q) => {
                        g.store_pending_proposal(p.storage(), *q).unwrap();
                        None
                    }
                    _ => None,
                }
            }
        }
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.as_ref().unwrap().epoch().as_u64()
    }

    /// An exported secret.
    pub fn secret(&self) -> Vec<u8> {
        self.group
            .as_ref()
            .unwrap()
            .export_secret(self.provider.crypto(), "t", b"", 32)
            .unwrap()
    }
}

/// Two registered members of one group that `a` created and invited `b`
/// into (`b` has processed the Welcome).
pub async fn group_of_two(url: &str, a: &str, b: &str) -> (RawMember, RawMember) {
    let mut alice = RawMember::new(url, a);
    let mut bob = RawMember::new(url, b);
    alice.register(1).await;
    bob.register(2).await;
    alice.create_group(false).await;
    let kp = alice.claim(b).await;
    let (c, w, gi) = alice.stage_add(vec![kp]);
    alice.api.commit(&alice.gid(), c, w, gi).await.unwrap();
    alice.merge();
    bob.sync().await;
    assert_eq!(alice.epoch(), bob.epoch());
    (alice, bob)
}

/// A plain HTTP client with TCP_NODELAY (without it, a request written in two
/// segments waits for the peer's delayed ACK).
fn http_client() -> HyperClient<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    HyperClient::builder(TokioExecutor::new()).build(connector)
}

/// Send a raw HTTP request; returns status and body.
pub async fn raw_request(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    raw_request_bytes(url, method, path, headers, Bytes::from(body)).await
}

/// [`raw_request`] with a shared body (many large requests without a copy
/// of the body each), on a connection of its own.
pub async fn raw_request_bytes(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> (u16, Vec<u8>) {
    let client = http_client();
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"));
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    let resp = client
        .request(b.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body)
}

/// A plain GET that reports failure instead of panicking (for probing).
pub async fn try_raw_request(url: &str, method: &str, path: &str) -> Result<u16, String> {
    let client = http_client();
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}
