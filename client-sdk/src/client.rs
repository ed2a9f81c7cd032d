//! The durable client: identity, groups and the queue cursor live in sled, and
//! every MLS operation is one atomic write together with the SDK's records.
//!
//! Commit discipline: a commit is staged and stored (with the bundle in the
//! outbox) in one write, then sent. Only when the DS accepts it is it merged;
//! on 409 it is cleared, the queue is synced (which brings the winning
//! commit), and the intent is retried. A crash anywhere in between is resolved
//! on the next network operation by resending the outbox: the DS answers a
//! retry of an accepted commit with the original success.
//!
//! Receiving: each queue entry is processed, its effects (group state, the
//! event for the application, the cursor) written in one transaction, and
//! only then acknowledged to the DS. Events wait in a durable inbox until the
//! application takes them, so none is lost or repeated across crashes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use mls_ds_protocol::queue::{EntryKind, QueueEntry};
use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::decode_record;
use mls_ds_storage::{Durability, RecordTree, SledProvider, SledStorage, Store, StoreConfig};
use openmls::group::{CommitBuilder, Initial};
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;
use tokio::sync::Mutex;

use crate::api::DsApi;
use crate::error::{mls, ClientError, Result};
use crate::records::{self, Event, GroupMeta, Identity, Outbox, OutboxKind};
use crate::transport::Transport;

/// The ciphersuite of groups created by the SDK.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

const RECORDS: &str = "app.sdk";

/// Tunables.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Keep at least this many key packages on the DS (plus a last-resort one).
    pub min_key_packages: usize,
    /// Attempts of a commit that keeps losing its epoch to other members.
    pub max_commit_retries: u32,
    /// Durability of local state (default: flush + fdatasync per operation).
    pub durability: Durability,
    /// Test hook: abort the process after the DS accepted a commit and before
    /// it is merged locally (to test recovery of exactly that window).
    #[doc(hidden)]
    pub abort_after_commit_accepted: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            min_key_packages: 10,
            max_commit_retries: 8,
            durability: Durability::Sync,
            abort_after_commit_accepted: false,
        }
    }
}

/// Past epochs whose keys a member keeps. The DS accepts application messages
/// up to its window (default 3) of epochs old; a member can be one epoch
/// further ahead than the DS was when it accepted a message (its own commit,
/// made after syncing, merged before the message is processed), so the SDK
/// keeps that window plus a margin.
pub const MAX_PAST_EPOCHS: usize = 5;

/// Group configuration used by the SDK: handshakes as PublicMessage (so the
/// DS can validate them), application messages encrypted, the ratchet tree in
/// Welcomes, and [`MAX_PAST_EPOCHS`] past epochs kept for late application
/// messages.
pub fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}

/// Join configuration matching [`create_config`].
pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}

struct Inner {
    groups: HashMap<Vec<u8>, MlsGroup>,
}

/// A durable MLS client of one DS.
pub struct Client {
    id: ClientId,
    store: Store,
    provider: SledProvider,
    records: RecordTree,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    api: DsApi,
    config: ClientConfig,
    inner: Mutex<Inner>,
}

fn wire<T: openmls::prelude::tls_codec::Serialize>(v: &T) -> Result<Vec<u8>> {
    v.tls_serialize_detached().map_err(mls)
}

fn member_id(m: &Member) -> String {
    BasicCredential::try_from(m.credential.clone())
        .map(|c| String::from_utf8_lossy(c.identity()).into_owned())
        .unwrap_or_else(|_| "<non-basic credential>".into())
}

impl Client {
    /// Open (or create) the client in `data_dir`, talking to `ds_url`. On
    /// first open `client_id` becomes the identity; later opens must pass the
    /// same id. Nothing is sent to the DS here.
    pub fn open(
        data_dir: impl AsRef<Path>,
        ds_url: &str,
        client_id: &str,
        config: ClientConfig,
    ) -> Result<Client> {
        Self::open_inner(data_dir.as_ref(), ds_url, Some(client_id), config)
    }

    /// Reopen a client created earlier in `data_dir`, whatever its id.
    pub fn open_existing(
        data_dir: impl AsRef<Path>,
        ds_url: &str,
        config: ClientConfig,
    ) -> Result<Client> {
        Self::open_inner(data_dir.as_ref(), ds_url, None, config)
    }

    fn open_inner(
        data_dir: &Path,
        ds_url: &str,
        client_id: Option<&str>,
        config: ClientConfig,
    ) -> Result<Client> {
        let store = Store::open(
            data_dir,
            StoreConfig {
                durability: config.durability,
                ..StoreConfig::default()
            },
        )?;
        let storage = store.storage(b"client")?;
        let records = store.record_tree("sdk")?;
        let provider = SledProvider::new(storage.clone());
        let stored = storage.get_record::<Identity>(records, records::IDENTITY)?;
        let id = match (client_id, &stored) {
            (Some(c), _) => ClientId::new(c).map_err(|e| ClientError::Usage(e.to_string()))?,
            (None, Some(identity)) => ClientId::new(&identity.client_id)
                .map_err(|e| ClientError::Usage(format!("stored identity: {e}")))?,
            (None, None) => {
                return Err(ClientError::Usage(format!(
                    "no client in {}; register one first",
                    data_dir.display()
                )))
            }
        };
        let signer = match stored {
            Some(identity) => {
                if identity.client_id != id.as_bytes() {
                    return Err(ClientError::Usage(format!(
                        "this data directory belongs to client {}, not {id}",
                        String::from_utf8_lossy(&identity.client_id)
                    )));
                }
                let scheme =
                    SignatureScheme::try_from(identity.signature_scheme).map_err(|_| {
                        ClientError::Usage("stored identity has an unknown scheme".into())
                    })?;
                SignatureKeyPair::read(&storage, &identity.public_key, scheme).ok_or_else(|| {
                    ClientError::Usage("the identity's private key is missing from storage".into())
                })?
            }
            None => {
                let signer =
                    SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(mls)?;
                let tx = storage.begin();
                signer.store(&*tx)?;
                tx.put_record(
                    records,
                    records::IDENTITY,
                    &Identity {
                        client_id: id.as_bytes().to_vec(),
                        signature_scheme: signer.signature_scheme() as u16,
                        public_key: signer.public().to_vec(),
                    },
                )?;
                tx.commit()?;
                signer
            }
        };
        let credential = CredentialWithKey {
            credential: BasicCredential::new(id.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        let mut groups = HashMap::new();
        for (k, _) in storage.scan_raw(records, b"group/")? {
            let gid = k[b"group/".len()..].to_vec();
            if let Some(g) = MlsGroup::load(&storage, &GroupId::from_slice(&gid))? {
                groups.insert(gid, g);
            }
        }
        let api = DsApi::new(Transport::new(ds_url, id.clone(), signer.clone()));
        Ok(Client {
            id,
            store,
            provider,
            records,
            signer,
            credential,
            api,
            config,
            inner: Mutex::new(Inner { groups }),
        })
    }

    /// This client's id.
    pub fn id(&self) -> &ClientId {
        &self.id
    }

    /// The low-level API (for operations the SDK does not wrap).
    pub fn api(&self) -> &DsApi {
        &self.api
    }

    /// The local store (for the application's own records, which may join the
    /// SDK's transactions through [`Client::process_events`]).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn storage(&self) -> &SledStorage {
        self.provider.storage()
    }

    /// Register with the DS and publish key packages.
    pub async fn register(&self) -> Result<()> {
        self.api.register().await?;
        self.ensure_key_packages().await
    }

    /// Top up the key packages on the DS to the configured minimum, and make
    /// sure a last-resort package is there.
    pub async fn ensure_key_packages(&self) -> Result<()> {
        let count = self.api.key_package_count().await?;
        let need = self
            .config
            .min_key_packages
            .saturating_sub(count.remaining as usize);
        let need_last_resort = !count.has_last_resort.0;
        if need == 0 && !need_last_resort {
            return Ok(());
        }
        let tx = self.provider.begin();
        let mut fresh = Vec::with_capacity(need);
        for _ in 0..need {
            let bundle = KeyPackage::builder()
                .build(CIPHERSUITE, &*tx, &self.signer, self.credential.clone())
                .map_err(mls)?;
            fresh.push(wire(&MlsMessageOut::from(bundle.key_package().clone()))?);
        }
        let last_resort = if need_last_resort {
            let bundle = KeyPackage::builder()
                .mark_as_last_resort()
                .leaf_node_capabilities(
                    Capabilities::builder()
                        .extensions(vec![ExtensionType::LastResort])
                        .build(),
                )
                .build(CIPHERSUITE, &*tx, &self.signer, self.credential.clone())
                .map_err(mls)?;
            Some(wire(&MlsMessageOut::from(bundle.key_package().clone()))?)
        } else {
            None
        };
        tx.commit()?;
        self.api.publish_key_packages(fresh, last_resort).await?;
        Ok(())
    }

    /// Ids of the groups this client is in.
    pub async fn groups(&self) -> Vec<Vec<u8>> {
        let mut ids: Vec<Vec<u8>> = self.inner.lock().await.groups.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Client ids of a group's members, sorted.
    pub async fn members(&self, group_id: &[u8]) -> Result<Vec<String>> {
        let inner = self.inner.lock().await;
        let g = group(&inner, group_id)?;
        let mut m: Vec<String> = g.members().map(|m| member_id(&m)).collect();
        m.sort();
        Ok(m)
    }

    /// A group's epoch.
    pub async fn epoch(&self, group_id: &[u8]) -> Result<u64> {
        let inner = self.inner.lock().await;
        Ok(group(&inner, group_id)?.epoch().as_u64())
    }

    /// An exported secret of the group's current epoch (equal on all members).
    pub async fn export_secret(&self, group_id: &[u8], label: &str, len: usize) -> Result<Vec<u8>> {
        let inner = self.inner.lock().await;
        group(&inner, group_id)?
            .export_secret(self.provider.crypto(), label, b"", len)
            .map_err(mls)
    }

    /// Create a group (registered with the DS); returns its id.
    pub async fn create_group(&self, open: bool) -> Result<Vec<u8>> {
        let mut inner = self.inner.lock().await;
        let tx = self.provider.begin();
        let group = MlsGroup::new(
            &*tx,
            &self.signer,
            &create_config(),
            self.credential.clone(),
        )
        .map_err(mls)?;
        let gid = group.group_id().as_slice().to_vec();
        let group_info = wire(
            &group
                .export_group_info(self.provider.crypto(), &self.signer, false)
                .map_err(mls)?,
        )?;
        let tree = wire(&group.export_ratchet_tree())?;
        tx.storage()
            .put_record(self.records, &records::group_key(&gid), &GroupMeta { open })?;
        tx.commit()?;
        if let Err(e) = self.api.create_group(group_info, tree, open).await {
            // Not on the DS: forget it locally as well.
            let tx = self.provider.begin();
            let mut g = group;
            g.delete(tx.storage())?;
            tx.storage()
                .remove_raw(self.records, &records::group_key(&gid))?;
            tx.commit()?;
            return Err(e);
        }
        inner.groups.insert(gid.clone(), group);
        Ok(gid)
    }

    /// Add clients to a group: claim a key package of each, commit, welcome.
    pub async fn invite(&self, group_id: &[u8], clients: &[&str]) -> Result<u64> {
        let mut kps = Vec::with_capacity(clients.len());
        for c in clients {
            let id = ClientId::new(c).map_err(|e| ClientError::Usage(e.to_string()))?;
            let claimed = self.api.claim_key_package(&id).await?;
            let msg =
                MlsMessageIn::tls_deserialize_exact(claimed.key_package.as_slice()).map_err(mls)?;
            let MlsMessageBodyIn::KeyPackage(kp_in) = msg.extract() else {
                return Err(ClientError::BadResponse(
                    "claimed object is not a key package".into(),
                ));
            };
            kps.push(
                kp_in
                    .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                    .map_err(mls)?,
            );
        }
        self.commit_with_retry(group_id, |g, p, signer| {
            stage_commit(
                g.commit_builder().propose_adds(kps.iter().cloned()),
                p,
                signer,
            )
        })
        .await
    }

    /// Remove a member (by client id) from a group.
    pub async fn remove(&self, group_id: &[u8], client: &str) -> Result<u64> {
        self.commit_with_retry(group_id, |g, p, signer| {
            let leaf = g
                .members()
                .find(|m| member_id(m) == client)
                .ok_or_else(|| ClientError::Usage(format!("{client} is not a member")))?
                .index;
            stage_commit(g.commit_builder().propose_removals([leaf]), p, signer)
        })
        .await
    }

    /// Update this client's leaf (fresh keys: post-compromise security).
    pub async fn self_update(&self, group_id: &[u8]) -> Result<u64> {
        self.commit_with_retry(group_id, |g, p, signer| {
            stage_commit(g.commit_builder().force_self_update(true), p, signer)
        })
        .await
    }

    /// Commit every pending proposal (e.g. a member's request to leave).
    pub async fn commit_pending_proposals(&self, group_id: &[u8]) -> Result<u64> {
        self.commit_with_retry(group_id, |g, p, signer| {
            stage_commit(g.commit_builder(), p, signer)
        })
        .await
    }

    /// Ask to leave: sends a self-remove proposal; the next commit by any
    /// member removes this client (the SDK of other members commits pending
    /// proposals in [`Client::sync`]).
    pub async fn leave(&self, group_id: &[u8]) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let g = group_mut(&mut inner, group_id)?;
        let tx = self.provider.begin();
        let msg = g.leave_group(&*tx, &self.signer).map_err(mls)?;
        tx.commit()?;
        self.api.send_message(group_id, wire(&msg)?).await?;
        Ok(())
    }

    /// Encrypt and send an application message. A stale epoch (409) makes
    /// the client sync and re-encrypt.
    pub async fn send(&self, group_id: &[u8], data: &[u8]) -> Result<()> {
        for _ in 0..=self.config.max_commit_retries {
            let bytes = {
                let mut inner = self.inner.lock().await;
                let g = group_mut(&mut inner, group_id)?;
                let tx = self.provider.begin();
                let msg = g.create_message(&*tx, &self.signer, data).map_err(mls)?;
                tx.commit()?;
                wire(&msg)?
            };
            let result = self.api.send_message(group_id, bytes).await;
            tracing::debug!(client = %self.id, ok = result.is_ok(), "sent application message");
            match result {
                Ok(_) => return Ok(()),
                Err(e) if e.is_wrong_epoch() => {
                    self.sync().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::CommitRetriesExhausted(
            self.config.max_commit_retries,
        ))
    }

    /// Join a group by external commit from the DS's GroupInfo. Also the way
    /// back in after losing local state: the old leaf of this client is
    /// replaced.
    pub async fn join_external(&self, group_id: &[u8]) -> Result<u64> {
        for _ in 0..=self.config.max_commit_retries {
            self.resolve_outboxes().await?;
            let info = self.api.group_info(group_id).await?;
            let vgi = match MlsMessageIn::tls_deserialize_exact(info.group_info.as_slice())
                .map_err(mls)?
                .extract()
            {
                MlsMessageBodyIn::GroupInfo(gi) => gi,
                _ => return Err(ClientError::BadResponse("not a GroupInfo".into())),
            };
            let tree =
                RatchetTreeIn::tls_deserialize_exact(info.ratchet_tree.as_slice()).map_err(mls)?;
            let outbox = {
                let mut inner = self.inner.lock().await;
                let tx = self.provider.begin();
                if let Some(mut old) = inner.groups.remove(group_id) {
                    old.delete(tx.storage())?;
                }
                let (group, bundle) =
                    external_commit(&tx, &self.signer, vgi, tree, &self.credential)?;
                let (commit, _, gi) = bundle.into_messages();
                let gi =
                    gi.ok_or_else(|| ClientError::Mls("external commit without GroupInfo".into()))?;
                let outbox = Outbox {
                    kind: OutboxKind::ExternalJoin,
                    commit: wire(&commit)?,
                    welcome: None,
                    group_info: wire(&gi)?,
                };
                tx.storage()
                    .put_record(self.records, &records::outbox_key(group_id), &outbox)?;
                tx.storage().put_record(
                    self.records,
                    &records::group_key(group_id),
                    &GroupMeta { open: false },
                )?;
                tx.commit()?;
                inner.groups.insert(group_id.to_vec(), group);
                outbox
            };
            match self.resolve_one(group_id, &outbox).await? {
                Some(epoch) => return Ok(epoch),
                None => continue,
            }
        }
        Err(ClientError::CommitRetriesExhausted(
            self.config.max_commit_retries,
        ))
    }

    /// Stage a commit with `build`, store it with its bundle, send it, and
    /// merge it only when the DS accepts; on 409 clear, sync and retry.
    async fn commit_with_retry<F>(&self, group_id: &[u8], mut build: F) -> Result<u64>
    where
        F: FnMut(&mut MlsGroup, &SledProvider, &SignatureKeyPair) -> Result<CommitMessageBundle>,
    {
        for _ in 0..=self.config.max_commit_retries {
            // Process the queue first: a commit must not jump over entries
            // the DS accepted before it (they would then be processed an epoch
            // later than their sender intended), and it avoids a certain 409.
            self.sync_queue(0).await?;
            let outbox = {
                let mut inner = self.inner.lock().await;
                let g = group_mut(&mut inner, group_id)?;
                let tx = self.provider.begin();
                let bundle = match build(g, &tx, &self.signer) {
                    Ok(b) => b,
                    Err(e) => {
                        drop(tx);
                        self.reload(&mut inner, group_id)?;
                        return Err(e);
                    }
                };
                let (commit, welcome, gi) = bundle.into_messages();
                let gi = gi.ok_or_else(|| ClientError::Mls("commit without GroupInfo".into()))?;
                let outbox = Outbox {
                    kind: OutboxKind::Commit,
                    commit: wire(&commit)?,
                    welcome: welcome.map(|w| wire(&w)).transpose()?,
                    group_info: wire(&gi)?,
                };
                tx.storage()
                    .put_record(self.records, &records::outbox_key(group_id), &outbox)?;
                if let Err(e) = tx.commit() {
                    self.reload(&mut inner, group_id)?;
                    return Err(e.into());
                }
                outbox
            };
            // `None`: lost the race; the next round syncs (learning the
            // winning commit) and tries again.
            if let Some(epoch) = self.resolve_one(group_id, &outbox).await? {
                return Ok(epoch);
            }
        }
        Err(ClientError::CommitRetriesExhausted(
            self.config.max_commit_retries,
        ))
    }

    /// Send one stored bundle and apply the DS's verdict. `Some(epoch)`:
    /// accepted and merged; `None`: another commit won (state cleared).
    /// Transport errors leave the outbox for a later attempt.
    async fn resolve_one(&self, group_id: &[u8], outbox: &Outbox) -> Result<Option<u64>> {
        let verdict = self
            .api
            .commit(
                group_id,
                outbox.commit.clone(),
                outbox.welcome.clone(),
                outbox.group_info.clone(),
            )
            .await;
        let mut inner = self.inner.lock().await;
        let accepted = match verdict {
            Ok(a) => Some(a.epoch),
            Err(e) if e.is_wrong_epoch() => None,
            Err(e @ ClientError::Server { .. })
                if e.status()
                    .is_some_and(|s| (400..500).contains(&s) && s != 401 && s != 429) =>
            {
                // Rejected for good: drop the commit, then report.
                self.discard(&mut inner, group_id, outbox.kind)?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        match accepted {
            Some(epoch) => {
                if self.config.abort_after_commit_accepted {
                    std::process::abort();
                }
                let tx = self.provider.begin();
                if outbox.kind == OutboxKind::Commit {
                    let g = group_mut(&mut inner, group_id)?;
                    if g.pending_commit().is_some() {
                        g.merge_pending_commit(&*tx).map_err(mls)?;
                    }
                }
                tx.storage()
                    .remove_raw(self.records, &records::outbox_key(group_id))?;
                tx.commit()?;
                Ok(Some(epoch))
            }
            None => {
                self.discard(&mut inner, group_id, outbox.kind)?;
                Ok(None)
            }
        }
    }

    fn discard(&self, inner: &mut Inner, group_id: &[u8], kind: OutboxKind) -> Result<()> {
        let tx = self.provider.begin();
        match kind {
            OutboxKind::Commit => {
                if let Some(g) = inner.groups.get_mut(group_id) {
                    g.clear_pending_commit(tx.storage())?;
                }
            }
            OutboxKind::ExternalJoin => {
                if let Some(mut g) = inner.groups.remove(group_id) {
                    g.delete(tx.storage())?;
                }
                tx.storage()
                    .remove_raw(self.records, &records::group_key(group_id))?;
            }
        }
        tx.storage()
            .remove_raw(self.records, &records::outbox_key(group_id))?;
        tx.commit()?;
        Ok(())
    }

    fn reload(&self, inner: &mut Inner, group_id: &[u8]) -> Result<()> {
        match MlsGroup::load(self.storage(), &GroupId::from_slice(group_id))? {
            Some(g) => {
                inner.groups.insert(group_id.to_vec(), g);
            }
            None => {
                inner.groups.remove(group_id);
            }
        }
        Ok(())
    }

    /// Resolve commits left unresolved by a crash or a network failure.
    pub async fn resolve_outboxes(&self) -> Result<()> {
        let pending = self.storage().scan_raw(self.records, b"outbox/")?;
        for (k, v) in pending {
            let gid = k[b"outbox/".len()..].to_vec();
            let outbox: Outbox = decode_record(RECORDS, &k, &v)?;
            self.resolve_one(&gid, &outbox).await?;
        }
        Ok(())
    }

    /// The highest DS sequence number processed.
    pub fn cursor(&self) -> Result<u64> {
        Ok(self
            .storage()
            .get_raw(self.records, records::CURSOR)?
            .map(|v| v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0))
            .unwrap_or(0))
    }

    /// Fetch and process everything queued on the DS (waiting up to
    /// `wait_ms` for the first entry), then acknowledge it. Returns the number
    /// of entries processed; their events are in the inbox ([`Client::events`]).
    pub async fn sync_wait(&self, wait_ms: u64) -> Result<usize> {
        let processed = self.sync_queue(wait_ms).await?;
        self.commit_pending_removals().await?;
        Ok(processed)
    }

    /// Resolve outboxes, then fetch, process and acknowledge the queue.
    async fn sync_queue(&self, wait_ms: u64) -> Result<usize> {
        self.resolve_outboxes().await?;
        let mut processed = 0;
        let mut wait = wait_ms;
        // The ack of a processed page travels with the next fetch.
        let mut processed_up_to = None;
        loop {
            let cursor = self.cursor()?;
            let page = match processed_up_to.take() {
                Some(up_to) => self.api.ack_and_fetch(up_to, cursor, 256, wait).await?,
                None => self.api.fetch(cursor, 256, wait).await?,
            };
            wait = 0;
            if page.entries.is_empty() {
                if page.acked < cursor && cursor <= page.head {
                    self.api.ack(cursor).await?;
                }
                break;
            }
            let mut last = cursor;
            for entry in &page.entries {
                if entry.seq <= last {
                    continue;
                }
                self.process_entry(entry).await?;
                last = entry.seq;
                processed += 1;
            }
            processed_up_to = Some(last);
        }
        Ok(processed)
    }

    /// [`Client::sync_wait`] without waiting.
    pub async fn sync(&self) -> Result<usize> {
        Box::pin(self.sync_wait(0)).await
    }

    /// Groups with queued proposals (e.g. a member asked to leave) get them
    /// committed, so a leave completes without manual help.
    async fn commit_pending_removals(&self) -> Result<()> {
        let with_proposals: Vec<Vec<u8>> = {
            let inner = self.inner.lock().await;
            inner
                .groups
                .iter()
                .filter(|(_, g)| g.is_active() && g.pending_proposals().next().is_some())
                .map(|(id, _)| id.clone())
                .collect()
        };
        for gid in with_proposals {
            match Box::pin(self.commit_pending_proposals(&gid)).await {
                Ok(_) => {}
                // Somebody else committed them first, or we were removed.
                Err(ClientError::Usage(_)) | Err(ClientError::Mls(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn process_entry(&self, entry: &QueueEntry) -> Result<()> {
        tracing::debug!(
            client = %self.id,
            seq = entry.seq,
            kind = ?entry.kind,
            epoch = entry.epoch,
            sender = %String::from_utf8_lossy(entry.sender.as_slice()),
            "processing entry"
        );
        let mut inner = self.inner.lock().await;
        let gid = entry.group_id.as_slice().to_vec();
        let seq = entry.seq;
        let tx = self.provider.begin();
        let event = match self.apply_entry(&mut inner, &tx, entry) {
            Ok(ev) => ev,
            Err(e) => {
                // Nothing of the failed attempt may survive in memory.
                drop(tx);
                self.reload(&mut inner, &gid)?;
                let tx = self.provider.begin();
                let ev = Some(Event::Skipped {
                    seq,
                    group_id: gid.clone(),
                    reason: format!(
                        "{e} ({:?} from {} for epoch {})",
                        entry.kind,
                        String::from_utf8_lossy(entry.sender.as_slice()),
                        entry.epoch
                    ),
                });
                tracing::warn!(seq, error = %e, "skipped queue entry");
                self.finish_entry(&tx, seq, ev.as_ref())?;
                tx.commit()?;
                return Ok(());
            }
        };
        self.finish_entry(&tx, seq, event.as_ref())?;
        if let Err(e) = tx.commit() {
            self.reload(&mut inner, &gid)?;
            return Err(e.into());
        }
        Ok(())
    }

    fn finish_entry(&self, tx: &SledProvider, seq: u64, event: Option<&Event>) -> Result<()> {
        let s = tx.storage();
        if let Some(ev) = event {
            s.put_record(self.records, &records::inbox_key(seq), ev)?;
        }
        s.put_raw(self.records, records::CURSOR, &seq.to_be_bytes())?;
        Ok(())
    }

    fn apply_entry(
        &self,
        inner: &mut Inner,
        tx: &SledProvider,
        entry: &QueueEntry,
    ) -> Result<Option<Event>> {
        let seq = entry.seq;
        let gid = entry.group_id.as_slice().to_vec();
        let msg = MlsMessageIn::tls_deserialize_exact(entry.message.as_slice()).map_err(mls)?;
        if entry.kind == EntryKind::Welcome {
            let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
                return Err(ClientError::BadResponse(
                    "welcome entry holds no Welcome".into(),
                ));
            };
            let group = StagedWelcome::new_from_welcome(tx, &join_config(), welcome, None)
                .map_err(mls)?
                .into_group(tx)
                .map_err(mls)?;
            let gid = group.group_id().as_slice().to_vec();
            tx.storage().put_record(
                self.records,
                &records::group_key(&gid),
                &GroupMeta { open: false },
            )?;
            inner.groups.insert(gid.clone(), group);
            return Ok(Some(Event::Joined { seq, group_id: gid }));
        }
        let g = group_mut(inner, &gid)?;
        let protocol = msg.try_into_protocol_message().map_err(mls)?;
        if protocol.epoch() < g.epoch() && entry.kind == EntryKind::Commit {
            return Err(ClientError::Mls(format!(
                "commit for past epoch {} (group is at {})",
                protocol.epoch().as_u64(),
                g.epoch().as_u64()
            )));
        }
        if g.pending_commit().is_some() {
            // Our own commit for this epoch lost (the DS accepted this one).
            g.clear_pending_commit(tx.storage())?;
        }
        let processed = g.process_message(tx, protocol).map_err(mls)?;
        let sender = BasicCredential::try_from(processed.credential().clone())
            .map(|c| c.identity().to_vec())
            .unwrap_or_default();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(Some(Event::Message {
                seq,
                group_id: gid,
                sender,
                data: app.into_bytes(),
            })),
            ProcessedMessageContent::ProposalMessage(p) => {
                g.store_pending_proposal(tx.storage(), *p)?;
                Ok(None)
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                g.merge_staged_commit(tx, *staged).map_err(mls)?;
                if g.is_active() {
                    Ok(Some(Event::Commit {
                        seq,
                        group_id: gid,
                        epoch: g.epoch().as_u64(),
                    }))
                } else {
                    if let Some(mut g) = inner.groups.remove(&gid) {
                        g.delete(tx.storage())?;
                    }
                    tx.storage()
                        .remove_raw(self.records, &records::group_key(&gid))?;
                    Ok(Some(Event::Removed { seq, group_id: gid }))
                }
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(p) => {
                g.store_pending_proposal(tx.storage(), *p)?;
                Ok(None)
            }
            _ => Err(ClientError::Mls(
                "the DS delivered this client's own message back".into(),
            )),
        }
    }

    /// Events waiting in the inbox, in DS order.
    pub fn events(&self) -> Result<Vec<Event>> {
        let mut out = BTreeMap::new();
        for (k, v) in self.storage().scan_raw(self.records, b"inbox/")? {
            let ev: Event = decode_record(RECORDS, &k, &v)?;
            out.insert(ev.seq(), ev);
        }
        Ok(out.into_values().collect())
    }

    /// Remove events up to `seq` from the inbox (the application has them).
    pub fn ack_events(&self, up_to: u64) -> Result<()> {
        let tx = self.storage().begin();
        for ev in self.events()? {
            if ev.seq() <= up_to {
                tx.remove_raw(self.records, &records::inbox_key(ev.seq()))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Hand each inbox event to `f` inside a transaction that also removes it
    /// from the inbox: if `f` writes its effects through the given storage
    /// (e.g. `put_raw` into a record tree of [`Client::store`]), every event
    /// is applied exactly once, across crashes.
    pub fn process_events<F>(&self, mut f: F) -> Result<usize>
    where
        F: FnMut(&SledStorage, &Event) -> Result<()>,
    {
        let events = self.events()?;
        for ev in &events {
            let tx = self.storage().begin();
            f(&tx, ev)?;
            tx.remove_raw(self.records, &records::inbox_key(ev.seq()))?;
            tx.commit()?;
        }
        Ok(events.len())
    }

    /// Sync, then take every inbox event (removing it). Convenient, but an
    /// event taken just before a crash is not shown again: use
    /// [`Client::process_events`] for exactly-once handling.
    pub async fn receive(&self, wait_ms: u64) -> Result<Vec<Event>> {
        self.sync_wait(wait_ms).await?;
        let events = self.events()?;
        if let Some(last) = events.last() {
            self.ack_events(last.seq())?;
        }
        Ok(events)
    }
}

fn group<'a>(inner: &'a Inner, gid: &[u8]) -> Result<&'a MlsGroup> {
    inner
        .groups
        .get(gid)
        .ok_or_else(|| ClientError::Usage(format!("not in group {}", hex::encode(gid))))
}

fn group_mut<'a>(inner: &'a mut Inner, gid: &[u8]) -> Result<&'a mut MlsGroup> {
    inner
        .groups
        .get_mut(gid)
        .ok_or_else(|| ClientError::Usage(format!("not in group {}", hex::encode(gid))))
}

/// Finish a commit: load PSKs, sign, and stage it (pending until the DS
/// accepts it) together with the new epoch's GroupInfo.
fn stage_commit(
    builder: CommitBuilder<'_, Initial>,
    p: &SledProvider,
    signer: &SignatureKeyPair,
) -> Result<CommitMessageBundle> {
    builder
        .load_psks(p.storage())
        .map_err(mls)?
        .create_group_info(true)
        .build(p.rand(), p.crypto(), signer, |_| true)
        .map_err(mls)?
        .stage_commit(p)
        .map_err(mls)
}

fn external_commit(
    provider: &SledProvider,
    signer: &SignatureKeyPair,
    vgi: VerifiableGroupInfo,
    tree: RatchetTreeIn,
    credential: &CredentialWithKey,
) -> Result<(MlsGroup, CommitMessageBundle)> {
    MlsGroup::external_commit_builder()
        .with_ratchet_tree(tree)
        .with_config(join_config())
        .build_group(provider, vgi, credential.clone())
        .map_err(mls)?
        .load_psks(provider.storage())
        .map_err(mls)?
        .create_group_info(true)
        .build(provider.rand(), provider.crypto(), signer, |_| true)
        .map_err(mls)?
        .finalize(provider)
        .map_err(mls)
}
