//! The embedded backend: everything in one sled database (through the
//! storage crate), one process per data directory.
//!
//! - [`layout`]: trees, keys, records' encoding, the layout version;
//! - [`group_commit`]: the write path (one writer thread: apply, flush, answer);
//! - [`apply`]: jobs turned into sled writes on the writer thread;
//! - [`queue_index`]: the in-memory queue index;
//! - [`queue_startup`]: rebuilding it at startup, and `check`;
//! - [`receipts`]: send receipts, in their batches' envelopes, then in sorted runs;
//! - [`checkpoint`]: the index saved every so many jobs and at a stop, for
//!   a start that need not read every batch;
//! - [`queues`]: reading pages;
//! - [`admin`]: `check`, `stats`, `backup`.
//!
//! Per-group serialisation is an in-process lock per group, held until the
//! handshake's write is durable; the condition in the write set (the group's
//! revision) is checked on the writer thread all the same.

pub(crate) mod admin;
mod apply;
mod batch;
mod checkpoint;
mod group_commit;
mod id_deque;
mod job;
pub(crate) mod layout;
mod queue_index;
mod queue_startup;
mod queues;
mod receipts;
mod record_cache;
mod rosters;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mls_ds_protocol::ClientId;
use tokio::sync::{Notify, OwnedMutexGuard};

use self::apply::Applier;
use self::group_commit::GroupCommit;
use self::job::Job;
use self::layout::Layout;
pub(crate) use self::layout::StoreTuning;
use self::queue_index::QueueIndex;
pub(crate) use self::queue_startup::Serving;
use self::receipts::Receipts;
use self::record_cache::Caches;
use super::committing::{committing, Committing};
use super::group_locks::GroupLocks;
use super::records::{
    ClientRecord, ClientUsage, CommitRecord, GroupId, GroupRecord, GroupState, InviteRecord,
    KeyPackageRecord, SendKey, SendReceipt, SharedSession,
};
use super::write_set::{AckOutcome, Applied, WriteSet};
use super::{
    AdminReport, Backend, BackendStats, CredentialChange, ExpiredKeyPackage, NewHeads, Page, Space,
    StaleCommit, StoreError, StoredClient, StoredGroup, StoredInvite,
};

/// How to open the sled backend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SledConfig {
    /// sled page cache and snapshots.
    pub(crate) store: StoreTuning,
    /// Most entries a client's queue holds; a full queue drops its oldest.
    pub(crate) max_queue_depth: u64,
    /// Write-path jobs between checkpoints of the queue index (0: only at
    /// a stop).
    pub(crate) index_checkpoint_every_ops: u64,
    /// Fresh send receipts frozen into one run.
    pub(crate) receipts_run_size: usize,
    /// Members from which a group's fan-outs reference its roster.
    pub(crate) roster_min_members: usize,
}

/// The sled backend of one data directory.
pub(crate) struct SledBackend {
    layout: Layout,
    index: Arc<QueueIndex>,
    commit: GroupCommit,
    group_locks: Mutex<GroupLocks>,
    new_heads: Arc<NewHeads>,
    caches: Arc<Caches>,
    receipts: Arc<Receipts>,
}

impl SledBackend {
    /// Every claimed key package's publisher (`mls-ds migrate`).
    pub(crate) fn key_package_owners(&self) -> Result<Vec<(Vec<u8>, ClientId)>, StoreError> {
        let tree = self.layout.trees.kp_owners;
        self.layout
            .storage
            .scan_raw(tree.handle, b"")?
            .into_iter()
            .map(|(kp_ref, owner)| {
                let owner = ClientId::new(&owner).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "owner of key package {}: {e}",
                        hex::encode(&kp_ref)
                    ))
                })?;
                Ok((kp_ref, owner))
            })
            .collect()
    }

    /// Open the data directory: check the layout, rebuild the queue index
    /// (deleting messages every recipient acknowledged before a crash could
    /// remove them), start the write path.
    pub(crate) fn open(data_dir: &Path, config: SledConfig) -> Result<SledBackend, StoreError> {
        let layout = Layout::open(data_dir, config.store)?;
        let started = std::time::Instant::now();
        let mut loaded = queue_startup::start(&layout)?;
        loaded
            .state
            .rosters
            .set_min_members(config.roster_min_members);
        let receipts = Arc::new(Receipts::open(&layout)?);
        loaded.state.next_batch = loaded.state.next_batch.max(receipts.watermark());
        receipts.remove_unfinished()?;
        receipts.freeze_at(config.receipts_run_size);
        tracing::info!(
            from = ?loaded.source,
            entries = loaded.state.entries(),
            ms = started.elapsed().as_millis() as u64,
            "queue index ready"
        );
        // Orphans holding fresh send receipts stay until they are frozen.
        let orphans: Vec<u64> = loaded
            .orphans
            .iter()
            .copied()
            .filter(|b| !receipts.keeps(*b))
            .collect();
        if !orphans.is_empty() {
            let tx = layout.storage.begin();
            for batch in &orphans {
                tx.remove_raw(layout.trees.delivery.handle, &layout::batch_key(*batch))?;
            }
            tx.commit()?;
            layout.store.flush()?;
            tracing::info!(count = orphans.len(), "deleted fully acknowledged messages");
        }
        let index = Arc::new(QueueIndex::new(loaded.state));
        let new_heads = Arc::new(NewHeads::default());
        let caches = Arc::new(Caches::default());
        let commit = GroupCommit::start(
            Applier::new(
                layout.clone(),
                index.clone(),
                caches.clone(),
                receipts.clone(),
                config.max_queue_depth,
            ),
            new_heads.clone(),
            config.index_checkpoint_every_ops,
        )?;
        Ok(SledBackend {
            layout,
            index,
            commit,
            group_locks: Mutex::new(GroupLocks::default()),
            new_heads,
            caches,
            receipts,
        })
    }

    /// The fault that broke storage, if any, or the compaction that
    /// retired it (the server reopens it then).
    pub(crate) fn broken(&self) -> Option<super::StorageFault> {
        self.commit.stats.broken().or_else(|| {
            self.commit
                .stats
                .retired()
                .then(|| super::StorageFault::retired(group_commit::COMPACTING))
        })
    }

    /// Flush everything.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        Ok(self.layout.store.flush()?)
    }

    /// Stop writing (at shutdown): what was submitted before is applied,
    /// the queue index's checkpoint is written and everything flushed;
    /// later writes are refused. A database a compaction retired is only
    /// flushed: the next open swaps in the copy (whose checkpoint is the
    /// one copied, brought up to date like any other).
    pub(crate) async fn shut_down(&self) -> Result<(), StoreError> {
        if self.commit.stats.retired() {
            return self.flush();
        }
        let (reply, handle) = committing();
        self.commit.submit(Job::Close { reply });
        let written = handle.wait().await?;
        tracing::info!(
            bytes = written.bytes,
            entries = written.entries,
            "queue index checkpoint written"
        );
        Ok(())
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Layout) -> Result<T, StoreError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static {
        let layout = self.layout.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&layout))
                .await
                .map_err(|e| StoreError::Unavailable(format!("storage task failed: {e}")))?
        }
    }
}

impl Backend for SledBackend {
    type GroupGuard = OwnedMutexGuard<()>;

    async fn client(&self, id: &ClientId) -> Result<Option<ClientRecord>, StoreError> {
        let start = match self.caches.clients.get(id) {
            Ok(record) => return Ok(Some(ClientRecord::clone(&record))),
            Err(start) => start,
        };
        let record = self.layout.client(id)?;
        if let Some(r) = &record {
            self.caches.clients.offer(id, &Arc::new(r.clone()), start);
        }
        Ok(record)
    }

    async fn key_packages(&self, owner: &ClientId) -> Result<Vec<KeyPackageRecord>, StoreError> {
        let tree = self.layout.trees.key_packages;
        let rows = self
            .layout
            .storage
            .scan_raw(tree.handle, &layout::kp_prefix(owner))?;
        rows.iter()
            .map(|(k, v)| Ok(mls_ds_storage::codec::decode_record(tree.name, k, v)?))
            .collect()
    }

    async fn last_resort(&self, owner: &ClientId) -> Result<Option<KeyPackageRecord>, StoreError> {
        self.layout.get(
            self.layout.trees.key_packages,
            &layout::last_resort_key(owner),
        )
    }

    async fn expired_key_packages(
        &self,
        now_secs: u64,
    ) -> Result<Vec<ExpiredKeyPackage>, StoreError> {
        self.run(move |layout| {
            let tree = layout.trees.key_packages;
            let mut expired = Vec::new();
            for (k, v) in layout.storage.scan_raw(tree.handle, b"")? {
                let record: KeyPackageRecord =
                    mls_ds_storage::codec::decode_record(tree.name, &k, &v)?;
                // Ordinary packages only: `[len] client 'k' ref`.
                let owner_len = usize::from(k.first().copied().unwrap_or(0));
                let is_ordinary = k.get(1 + owner_len) == Some(&b'k');
                if is_ordinary && record.not_after < now_secs {
                    let owner = ClientId::new(k.get(1..1 + owner_len).unwrap_or_default())
                        .map_err(|e| StoreError::Corrupt(format!("key package key: {e}")))?;
                    expired.push(ExpiredKeyPackage {
                        owner,
                        kp_ref: record.kp_ref,
                    });
                }
            }
            Ok(expired)
        })
        .await
    }

    async fn key_package_owner(&self, kp_ref: &[u8]) -> Result<Option<ClientId>, StoreError> {
        match self
            .layout
            .storage
            .get_raw(self.layout.trees.kp_owners.handle, kp_ref)?
        {
            Some(id) => ClientId::new(id)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("key package owner: {e}"))),
            None => Ok(None),
        }
    }

    async fn group(&self, id: &GroupId) -> Result<Option<Arc<GroupRecord>>, StoreError> {
        let start = match self.caches.groups.get(id) {
            Ok(record) => return Ok(Some(record)),
            Err(start) => start,
        };
        let record: Option<Arc<GroupRecord>> = self
            .layout
            .get(self.layout.trees.groups, id.as_bytes())?
            .map(Arc::new);
        if let Some(r) = &record {
            self.caches.groups.offer(id, r, start);
        }
        Ok(record)
    }

    async fn group_state(&self, id: &GroupId) -> Result<Option<GroupState>, StoreError> {
        self.layout
            .get(self.layout.trees.group_states, id.as_bytes())
    }

    async fn commit(
        &self,
        group: &GroupId,
        epoch: u64,
    ) -> Result<Option<CommitRecord>, StoreError> {
        self.layout
            .get(self.layout.trees.commits, &layout::commit_key(group, epoch))
    }

    async fn clients(&self) -> Result<Vec<StoredClient>, StoreError> {
        self.run(|layout| {
            let tree = layout.trees.clients;
            let mut out = Vec::new();
            for (k, v) in layout.storage.scan_raw(tree.handle, b"")? {
                let id = ClientId::new(&k)
                    .map_err(|e| StoreError::Corrupt(format!("client record key: {e}")))?;
                let record = mls_ds_storage::codec::decode_record(tree.name, &k, &v)?;
                out.push(StoredClient { id, record });
            }
            Ok(out)
        })
        .await
    }

    async fn groups(&self) -> Result<Vec<StoredGroup>, StoreError> {
        self.run(|layout| {
            let tree = layout.trees.groups;
            let mut out = Vec::new();
            for (k, v) in layout.storage.scan_raw(tree.handle, b"")? {
                let id = GroupId::new(&k)
                    .map_err(|e| StoreError::Corrupt(format!("group record key: {e}")))?;
                let record = mls_ds_storage::codec::decode_record(tree.name, &k, &v)?;
                out.push(StoredGroup { id, record });
            }
            Ok(out)
        })
        .await
    }

    async fn stale_commits(&self, cutoff_ms: u64) -> Result<Vec<StaleCommit>, StoreError> {
        self.run(move |layout| {
            let tree = layout.trees.commits;
            let mut stale = Vec::new();
            // Keys sort by group, then epoch: a record followed by one of
            // the same group is not its group's newest.
            let mut previous: Option<(StaleCommit, bool)> = None;
            for (k, v) in layout.storage.scan_raw(tree.handle, b"")? {
                let record: CommitRecord = mls_ds_storage::codec::decode_record(tree.name, &k, &v)?;
                let (group, epoch) = layout::split_commit_key(&k).ok_or_else(|| {
                    StoreError::Corrupt(format!("commit key {}", hex::encode(&k)))
                })?;
                if let Some((prev, old)) = previous.take() {
                    if old && prev.group == group {
                        stale.push(prev);
                    }
                }
                previous = Some((StaleCommit { group, epoch }, record.accepted_ms < cutoff_ms));
            }
            Ok(stale)
        })
        .await
    }

    async fn send_receipt(&self, key: &SendKey) -> Result<Option<SendReceipt>, StoreError> {
        self.receipts.get(key)
    }

    async fn sends_before(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<SendKey>, StoreError> {
        let receipts = self.receipts.clone();
        self.run(move |_| receipts.before(cutoff_ms, limit)).await
    }

    async fn forget_sends(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let (reply, handle) = committing();
        self.commit.submit(Job::ForgetSends { cutoff_ms, reply });
        handle.wait().await
    }

    async fn queue_depth(&self, client: &ClientId) -> Result<u64, StoreError> {
        Ok(self.index.lock().position(client).remaining)
    }

    async fn invite(&self, code: &str) -> Result<Option<InviteRecord>, StoreError> {
        self.layout.get(self.layout.trees.invites, code.as_bytes())
    }

    async fn invites(&self) -> Result<Vec<StoredInvite>, StoreError> {
        self.run(|layout| {
            let tree = layout.trees.invites;
            let rows = layout.storage.scan_raw(tree.handle, b"")?;
            rows.iter()
                .map(|(k, v)| {
                    Ok(StoredInvite {
                        code: String::from_utf8_lossy(k).into_owned(),
                        record: mls_ds_storage::codec::decode_record(tree.name, k, v)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn usage(&self, client: &ClientId) -> Result<ClientUsage, StoreError> {
        Ok(self
            .layout
            .get(self.layout.trees.usage, client.as_bytes())?
            .unwrap_or_default())
    }

    async fn share_session(&self, _: &SharedSession, _: &[u8]) -> Result<bool, StoreError> {
        // One process per data directory: its own table is every table.
        Ok(true)
    }

    async fn shared_session(
        &self,
        _: &[u8; mls_ds_protocol::auth::SESSION_ID_LEN],
    ) -> Result<Option<SharedSession>, StoreError> {
        Ok(None)
    }

    async fn lock_group(&self, id: &GroupId) -> OwnedMutexGuard<()> {
        let lock = self
            .group_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id);
        lock.lock_owned().await
    }

    fn submit(&self, set: WriteSet) -> Committing<Applied> {
        let (reply, handle) = committing();
        self.commit.submit(Job::Write { set, reply });
        handle
    }

    fn settled(&self) -> Committing<()> {
        let (reply, handle) = committing();
        self.commit.submit(Job::Settle { reply });
        handle
    }

    fn ack(&self, client: &ClientId, up_to: u64) -> Committing<AckOutcome> {
        let (reply, handle) = committing();
        self.commit.submit(Job::Ack {
            client: client.clone(),
            up_to,
            reply,
        });
        handle
    }

    fn expire(&self, cutoff_ms: u64) -> Committing<usize> {
        let (reply, handle) = committing();
        self.commit.submit(Job::Expire { cutoff_ms, reply });
        handle
    }

    async fn page(
        &self,
        client: &ClientId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        queues::page(&self.layout, &self.index, client, after, limit, max_bytes)
    }

    fn subscribe(&self, client: &ClientId) -> Result<Arc<Notify>, StoreError> {
        Ok(self.index.subscribe(client))
    }

    fn new_heads(&self) -> &NewHeads {
        &self.new_heads
    }

    fn credential_changes(&self) -> Option<tokio::sync::broadcast::Receiver<CredentialChange>> {
        // One process per data directory: its services see every change.
        None
    }

    fn health(&self) -> Result<(), StoreError> {
        match self.broken() {
            Some(fault) => Err(StoreError::Unavailable(format!(
                "storage failed ({fault}); nothing is accepted until the data directory is \
                 writable again and the server has reopened its storage"
            ))),
            None => Ok(()),
        }
    }

    fn close(&self) {
        self.index.close();
    }

    fn stats(&self) -> BackendStats {
        use std::sync::atomic::Ordering::Relaxed;
        let depths = self.index.depths();
        let s = &self.commit.stats;
        BackendStats {
            queue_entries: depths.entries,
            queue_depth_max: depths.deepest,
            stored_messages: depths.stored_messages,
            queue_overflow_drops: depths.overflow_drops,
            flushes: s.flushes.load(Relaxed),
            durable_writes: s.durable.load(Relaxed),
            flush_failures: s.failures.load(Relaxed),
            apply_seconds: s.apply_us.load(Relaxed) as f64 / 1e6,
            flush_seconds: s.flush_us.load(Relaxed) as f64 / 1e6,
            pool: None,
            database: None,
        }
    }

    async fn check(&self) -> Result<AdminReport, StoreError> {
        self.run(|layout| admin::check(layout, Serving::Running))
            .await
    }

    async fn report(&self) -> Result<AdminReport, StoreError> {
        self.run(admin::stats).await
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.layout.store.size_on_disk()?)
    }

    async fn space(&self) -> Result<Space, StoreError> {
        self.run(|layout| {
            Ok(Space {
                live: layout.store.live_bytes()?,
                on_disk: layout.store.size_on_disk()?,
            })
        })
        .await
    }

    async fn compact(&self) -> Result<AdminReport, StoreError> {
        let (reply, handle) = committing();
        self.commit.submit(Job::Compact { reply });
        handle.wait().await
    }

    async fn backup(&self, target: &Path) -> Result<AdminReport, StoreError> {
        let (reply, handle) = committing();
        self.commit.submit(Job::Backup {
            target: PathBuf::from(target),
            reply,
        });
        handle.wait().await
    }
}
