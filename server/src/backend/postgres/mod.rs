//! The PostgreSQL backend: the DS's state in one database that any number
//! of DS processes share (`--database postgres://...`).
//!
//! - [`connect`]: connection settings, TLS, the pool, migrations;
//! - [`rows`]: records as rows;
//! - [`writes`]: write sets as transactions, retried when they lose a race;
//!   their [`conditions`], [`changes`] and [`deliveries`]; [`lanes`]: the
//!   write sets that arrive together committed together;
//! - [`queues`]: pages, acknowledgements, retention, the message sweep;
//! - [`notify`]: wake-ups across nodes (`LISTEN`/`NOTIFY`);
//! - [`admin`]: `check`, `stats`, space, `VACUUM`; [`import`]: `mls-ds
//!   migrate`'s writing half;
//! - [`counting`], [`sweeper`]: what this process counts, and its
//!   background task.
//!
//! Nothing a guarantee depends on lives in this process: the one commit
//! per epoch, the single claim of a key package, gap-free queues and sends
//! delivered once are all kept by the database's row locks (see
//! [`writes`]). What is in memory is a convenience: the group locks that
//! spare concurrent handshakes of one group on this node their validation
//! work, the wake-up handles, and the counters for `/metrics`.

mod admin;
mod changes;
mod conditions;
mod connect;
mod counting;
mod deliveries;
pub(crate) mod import;
mod lanes;
mod notify;
mod queues;
mod reads;
mod rows;
mod sweeper;
mod writes;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use mls_ds_protocol::ClientId;
use tokio::sync::{Notify, OwnedMutexGuard};

use self::connect::Connector;
use self::counting::{Counters, Gauges, InFlight};
use self::lanes::Lanes;
use self::notify::Wakeups;
use self::writes::Written;
use super::committing::{committing, CommitReply, Committing};
use super::group_locks::GroupLocks;
use super::records::{
    ClientRecord, ClientUsage, CommitRecord, GroupId, GroupRecord, GroupState, InviteRecord,
    KeyPackageRecord, SendKey, SendReceipt, SharedSession,
};
use super::write_set::{AckOutcome, Applied, WriteSet};
use super::{
    AdminReport, Backend, BackendStats, CredentialChange, ExpiredKeyPackage, NewHeads, Page,
    PoolStats, Space, StaleCommit, StoreError, StoredClient, StoredGroup, StoredInvite,
};

/// How to reach the database (no `Debug`: the URL may hold a password).
#[derive(Clone)]
pub(crate) struct PgConfig {
    /// `postgres://...` or key=value connection string.
    pub(crate) url: String,
    /// Connections in the pool.
    pub(crate) pool_size: usize,
    /// Most entries a client's queue holds; a full queue drops its oldest
    /// (0: no bound, for `mls-ds migrate`, which copies every entry).
    pub(crate) max_queue_depth: u64,
}

/// One write lane per this many pooled connections (the rest serve reads,
/// acknowledgements and the sweeper).
const LANE_SHARE: usize = 4;

/// The backend on one database.
pub(crate) struct PgBackend {
    inner: Arc<Inner>,
    lanes: Arc<Lanes>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the backend's tasks share.
pub(crate) struct Inner {
    pool: Pool,
    max_queue_depth: u64,
    wakeups: Arc<Wakeups>,
    new_heads: NewHeads,
    group_locks: Mutex<GroupLocks>,
    in_flight: InFlight,
    counters: Counters,
    released: Mutex<Vec<i64>>,
    gauges: Mutex<Gauges>,
    closed: AtomicBool,
}

impl PgBackend {
    /// Connect, bring the schema up to date, start listening and sweeping.
    pub(crate) async fn open(config: PgConfig) -> Result<PgBackend, StoreError> {
        let connector = Connector::new(&config.url)?;
        connector.migrate().await?;
        let pool = connector.pool(config.pool_size)?;
        let inner = Arc::new(Inner {
            pool,
            max_queue_depth: config.max_queue_depth,
            wakeups: Arc::new(Wakeups::default()),
            new_heads: NewHeads::default(),
            group_locks: Mutex::new(GroupLocks::default()),
            in_flight: InFlight::default(),
            counters: Counters::default(),
            released: Mutex::new(Vec::new()),
            gauges: Mutex::new(Gauges::default()),
            closed: AtomicBool::new(false),
        });
        inner.refresh_gauges().await?;
        tracing::info!(database = %connector.describe(), "PostgreSQL backend ready");
        let tasks = vec![
            tokio::spawn(notify::listen(connector, inner.wakeups.clone())),
            tokio::spawn(sweeper::sweeper(inner.clone())),
        ];
        let lanes = Arc::new(Lanes::start(&inner, config.pool_size / LANE_SHARE));
        Ok(PgBackend {
            inner,
            lanes,
            tasks,
        })
    }

    /// Run `work` as a write: counted for `settled`, answered through the
    /// handle, its queues woken and announced once committed.
    fn spawn_write<T, F>(&self, work: F) -> Committing<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<Written<T>, StoreError>> + Send + 'static,
    {
        let (reply, handle) = committing();
        if let Err(e) = self.health() {
            reply.send(Err(e));
            return handle;
        }
        let inner = self.inner.clone();
        let ticket = inner.in_flight.start();
        tokio::spawn(async move {
            let result = work.await;
            finish(&inner, result, reply);
            inner.in_flight.finish(ticket);
        });
        handle
    }
}

/// Answer a write and do what its commit implies locally.
fn finish<T>(inner: &Inner, result: Result<Written<T>, StoreError>, reply: CommitReply<T>) {
    match result {
        Ok(written) => {
            for (client, _) in &written.grown {
                inner.wakeups.wake(client);
            }
            inner.new_heads.record(&written.grown);
            if written.dropped > 0 {
                inner
                    .counters
                    .overflow_drops
                    .fetch_add(written.dropped, Ordering::Relaxed);
            }
            if !written.released.is_empty() {
                inner
                    .released
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(written.released);
            }
            reply.send(Ok(written.value));
        }
        Err(e) => {
            if matches!(e, StoreError::Unavailable(_) | StoreError::Database(_)) {
                inner.counters.failures.fetch_add(1, Ordering::Relaxed);
            }
            reply.send(Err(e));
        }
    }
}

impl Inner {
    /// Run a read, timed for `mls_ds_db_seconds`.
    async fn timed<T>(
        &self,
        read: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = read.await;
        self.counters.read(started.elapsed());
        result
    }

    /// A pooled connection.
    pub(crate) async fn connection(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => connect::db(e),
            other => {
                tracing::warn!(error = %other, "no database connection");
                StoreError::Unavailable("the database is unreachable; retry shortly".into())
            }
        })
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wakeups.close();
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Backend for PgBackend {
    type GroupGuard = OwnedMutexGuard<()>;

    async fn client(&self, id: &ClientId) -> Result<Option<ClientRecord>, StoreError> {
        self.inner.timed(self.inner.client(id)).await
    }

    async fn key_packages(&self, owner: &ClientId) -> Result<Vec<KeyPackageRecord>, StoreError> {
        self.inner.timed(self.inner.key_packages(owner)).await
    }

    async fn last_resort(&self, owner: &ClientId) -> Result<Option<KeyPackageRecord>, StoreError> {
        self.inner.timed(self.inner.last_resort(owner)).await
    }

    async fn expired_key_packages(
        &self,
        now_secs: u64,
    ) -> Result<Vec<ExpiredKeyPackage>, StoreError> {
        self.inner
            .timed(self.inner.expired_key_packages(now_secs))
            .await
    }

    async fn key_package_owner(&self, kp_ref: &[u8]) -> Result<Option<ClientId>, StoreError> {
        self.inner.timed(self.inner.key_package_owner(kp_ref)).await
    }

    async fn group(&self, id: &GroupId) -> Result<Option<Arc<GroupRecord>>, StoreError> {
        Ok(self.inner.timed(self.inner.group(id)).await?.map(Arc::new))
    }

    async fn group_state(&self, id: &GroupId) -> Result<Option<GroupState>, StoreError> {
        self.inner.timed(self.inner.group_state(id)).await
    }

    async fn commit(
        &self,
        group: &GroupId,
        epoch: u64,
    ) -> Result<Option<CommitRecord>, StoreError> {
        self.inner.timed(self.inner.commit(group, epoch)).await
    }

    async fn clients(&self) -> Result<Vec<StoredClient>, StoreError> {
        self.inner.timed(self.inner.clients()).await
    }

    async fn groups(&self) -> Result<Vec<StoredGroup>, StoreError> {
        self.inner.timed(self.inner.groups()).await
    }

    async fn stale_commits(&self, cutoff_ms: u64) -> Result<Vec<StaleCommit>, StoreError> {
        self.inner.timed(self.inner.stale_commits(cutoff_ms)).await
    }

    async fn send_receipt(&self, key: &SendKey) -> Result<Option<SendReceipt>, StoreError> {
        self.inner.timed(self.inner.send_receipt(key)).await
    }

    async fn sends_before(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<SendKey>, StoreError> {
        self.inner
            .timed(self.inner.sends_before(cutoff_ms, limit))
            .await
    }

    async fn forget_sends(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        self.inner.timed(self.inner.forget_sends(cutoff_ms)).await
    }

    async fn queue_depth(&self, client: &ClientId) -> Result<u64, StoreError> {
        self.inner.timed(self.inner.queue_depth(client)).await
    }

    async fn invite(&self, code: &str) -> Result<Option<InviteRecord>, StoreError> {
        self.inner.timed(self.inner.invite(code)).await
    }

    async fn invites(&self) -> Result<Vec<StoredInvite>, StoreError> {
        self.inner.timed(self.inner.invites()).await
    }

    async fn usage(&self, client: &ClientId) -> Result<ClientUsage, StoreError> {
        self.inner.timed(self.inner.usage(client)).await
    }

    async fn share_session(&self, session: &SharedSession, key: &[u8]) -> Result<bool, StoreError> {
        let started = std::time::Instant::now();
        let stored = self.inner.share_session(session, key).await;
        self.inner.counters.transaction(started.elapsed());
        stored
    }

    async fn shared_session(
        &self,
        id: &[u8; mls_ds_protocol::auth::SESSION_ID_LEN],
    ) -> Result<Option<SharedSession>, StoreError> {
        self.inner.timed(self.inner.shared_session(id)).await
    }

    async fn lock_group(&self, id: &GroupId) -> OwnedMutexGuard<()> {
        let lock = self
            .inner
            .group_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id);
        lock.lock_owned().await
    }

    fn submit(&self, set: WriteSet) -> Committing<Applied> {
        let lanes = self.lanes.clone();
        self.spawn_write(async move { lanes.apply(set).await })
    }

    fn settled(&self) -> Committing<()> {
        let (reply, handle) = committing();
        let inner = self.inner.clone();
        let before = inner.in_flight.next.load(Ordering::SeqCst);
        tokio::spawn(async move {
            inner.in_flight.wait_below(before).await;
            reply.send(Ok(()));
        });
        handle
    }

    fn ack(&self, client: &ClientId, up_to: u64) -> Committing<AckOutcome> {
        let (inner, client) = (self.inner.clone(), client.clone());
        self.spawn_write(async move { inner.ack(&client, up_to).await })
    }

    fn expire(&self, cutoff_ms: u64) -> Committing<usize> {
        let inner = self.inner.clone();
        self.spawn_write(async move { inner.expire(cutoff_ms).await })
    }

    async fn page(
        &self,
        client: &ClientId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        self.inner
            .timed(self.inner.page(client, after, limit, max_bytes))
            .await
    }

    fn subscribe(&self, client: &ClientId) -> Result<Arc<Notify>, StoreError> {
        self.health()?;
        Ok(self.inner.wakeups.subscribe(client))
    }

    fn new_heads(&self) -> &NewHeads {
        &self.inner.new_heads
    }

    fn credential_changes(&self) -> Option<tokio::sync::broadcast::Receiver<CredentialChange>> {
        Some(self.inner.wakeups.credentials.subscribe())
    }

    fn health(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        if !self.inner.wakeups.is_listening() {
            return Err(StoreError::Unavailable(
                "the database is unreachable; retry shortly".into(),
            ));
        }
        Ok(())
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wakeups.close();
    }

    fn stats(&self) -> BackendStats {
        let c = &self.inner.counters;
        let g = *self.inner.gauges.lock().unwrap_or_else(|e| e.into_inner());
        let status = self.inner.pool.status();
        BackendStats {
            queue_entries: g.queue_entries,
            queue_depth_max: g.queue_depth_max,
            stored_messages: g.stored_messages,
            queue_overflow_drops: c.overflow_drops.load(Ordering::Relaxed),
            flushes: c.commits.load(Ordering::Relaxed),
            durable_writes: c.writes.load(Ordering::Relaxed),
            flush_failures: c.failures.load(Ordering::Relaxed),
            apply_seconds: c.apply_micros.load(Ordering::Relaxed) as f64 / 1e6,
            flush_seconds: c.commit_micros.load(Ordering::Relaxed) as f64 / 1e6,
            database: Some(c.latency.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            pool: Some(PoolStats {
                size: status.size,
                available: status.available,
                waiting: status.waiting,
                max_size: status.max_size,
            }),
        }
    }

    async fn check(&self) -> Result<AdminReport, StoreError> {
        self.inner.check().await
    }

    async fn report(&self) -> Result<AdminReport, StoreError> {
        self.inner.report().await
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .gauges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .size_on_disk)
    }

    async fn space(&self) -> Result<Space, StoreError> {
        self.inner.space().await
    }

    async fn compact(&self) -> Result<AdminReport, StoreError> {
        self.inner.vacuum().await
    }

    async fn backup(&self, target: &Path) -> Result<AdminReport, StoreError> {
        Ok(AdminReport {
            text: format!(
                "not written to {}: on PostgreSQL, back up the database with its own tools: \
                 pg_dump (a consistent logical copy of one database) or pg_basebackup with WAL \
                 archiving (physical, point-in-time recovery); see the README, \"Scaling out\"\n",
                target.display()
            ),
            failed: true,
        })
    }
}
