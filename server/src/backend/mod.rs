//! The seam between the DS's core and its storage: the [`Backend`] trait,
//! the records and write sets that cross it, and its two implementations,
//! [`sled`] (the embedded default) and [`postgres`] (one database that any
//! number of DS processes share).
//!
//! The core never names a storage engine. It reads typed records, submits
//! [`WriteSet`]s and awaits their durability, reads queue pages and waits on
//! a client's wake-up handle. A backend owns everything that depends on
//! where the data lives:
//!
//! - **Atomicity and durability**: a write set is applied all or nothing and
//!   its [`Committing`] handle resolves only once it is durable.
//! - **Ordering**: write sets are applied in one order; a write set's
//!   conditions are checked against the state all earlier ones left, so two
//!   DS processes on one database cannot both accept a commit for an epoch
//!   (the group's revision is compared and set inside the write), nor both
//!   claim one key package, nor both register one id.
//! - **Queues**: a delivery's message is stored once; each recipient's
//!   sequence number is assigned when the write set is applied, so every
//!   queue is gap-free in apply order. An entry becomes visible to fetches
//!   only once durable, and then the recipient's wake-up handle fires,
//!   whichever process wrote it.
//! - **Per-group serialisation**: [`Backend::lock_group`] spares concurrent
//!   handshakes of one group the validation work that the condition would
//!   refuse anyway; correctness never rests on it alone.

pub(crate) mod committing;
pub(crate) mod error;
pub(crate) mod group_check;
pub(crate) mod group_locks;
pub(crate) mod new_heads;
pub(crate) mod page;
pub(crate) mod postgres;
pub(crate) mod public_group;
pub(crate) mod records;
pub(crate) mod sled;
pub(crate) mod write_set;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use mls_ds_protocol::ClientId;
use tokio::sync::Notify;

use crate::histogram::Histogram;

pub(crate) use committing::Committing;
pub(crate) use error::{StorageFault, StoreError};
pub(crate) use new_heads::NewHeads;
pub(crate) use page::Page;
use records::{
    ClientRecord, ClientUsage, CommitRecord, GroupId, GroupRecord, GroupState, InviteRecord,
    KeyPackageRecord, SendKey, SendReceipt, SharedSession,
};
pub(crate) use write_set::{AckOutcome, Applied, WriteSet};

/// Storage of the DS: reads, the one write path, queues and wake-ups.
pub(crate) trait Backend: Send + Sync + 'static {
    /// Held while one handshake of a group is validated and written.
    type GroupGuard: Send + 'static;

    /// A client's record, deleted or not.
    fn client(
        &self,
        id: &ClientId,
    ) -> impl Future<Output = Result<Option<ClientRecord>, StoreError>> + Send;

    /// A client's ordinary key packages, in key order.
    fn key_packages(
        &self,
        owner: &ClientId,
    ) -> impl Future<Output = Result<Vec<KeyPackageRecord>, StoreError>> + Send;

    /// A client's last-resort key package.
    fn last_resort(
        &self,
        owner: &ClientId,
    ) -> impl Future<Output = Result<Option<KeyPackageRecord>, StoreError>> + Send;

    /// Ordinary key packages of every client whose lifetime ended before
    /// `now_secs`.
    fn expired_key_packages(
        &self,
        now_secs: u64,
    ) -> impl Future<Output = Result<Vec<ExpiredKeyPackage>, StoreError>> + Send;

    /// Who published the claimed key package `kp_ref`.
    fn key_package_owner(
        &self,
        kp_ref: &[u8],
    ) -> impl Future<Output = Result<Option<ClientId>, StoreError>> + Send;

    /// A group's record (shared: a backend may keep it in memory).
    fn group(
        &self,
        id: &GroupId,
    ) -> impl Future<Output = Result<Option<Arc<GroupRecord>>, StoreError>> + Send;

    /// A group's GroupInfo and `PublicGroup`.
    fn group_state(
        &self,
        id: &GroupId,
    ) -> impl Future<Output = Result<Option<GroupState>, StoreError>> + Send;

    /// The commit accepted for `epoch` of a group.
    fn commit(
        &self,
        group: &GroupId,
        epoch: u64,
    ) -> impl Future<Output = Result<Option<CommitRecord>, StoreError>> + Send;

    /// Every client, deleted ones included, in id order.
    fn clients(&self) -> impl Future<Output = Result<Vec<StoredClient>, StoreError>> + Send;

    /// Every group, in id order.
    fn groups(&self) -> impl Future<Output = Result<Vec<StoredGroup>, StoreError>> + Send;

    /// Accepted-commit records of before `cutoff_ms`, except each group's
    /// newest (an exact retry of the latest commit still gets its answer).
    fn stale_commits(
        &self,
        cutoff_ms: u64,
    ) -> impl Future<Output = Result<Vec<StaleCommit>, StoreError>> + Send;

    /// The answer a send got, while it is remembered (written with its
    /// delivery, see [`write_set::Delivery::receipt`]).
    fn send_receipt(
        &self,
        key: &SendKey,
    ) -> impl Future<Output = Result<Option<SendReceipt>, StoreError>> + Send;

    /// Remembered sends created before `cutoff_ms`, oldest first, at most
    /// `limit`.
    fn sends_before(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SendKey>, StoreError>> + Send;

    /// Forget the sends created before `cutoff_ms` (their deduplication
    /// window is over); resolves to how many were forgotten.
    fn forget_sends(
        &self,
        cutoff_ms: u64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Visible unacknowledged entries in `client`'s queue.
    fn queue_depth(
        &self,
        client: &ClientId,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// An invitation code's record.
    fn invite(
        &self,
        code: &str,
    ) -> impl Future<Output = Result<Option<InviteRecord>, StoreError>> + Send;

    /// Every invitation code, in code order.
    fn invites(&self) -> impl Future<Output = Result<Vec<StoredInvite>, StoreError>> + Send;

    /// What a client holds of the per-client quotas.
    fn usage(
        &self,
        client: &ClientId,
    ) -> impl Future<Output = Result<ClientUsage, StoreError>> + Send;

    /// Make a new session valid in every process on this storage, if the
    /// client is still registered with `key` (the key its opening was
    /// signed with); `false` if it is not. A backend only one process uses
    /// stores nothing.
    fn share_session(
        &self,
        session: &SharedSession,
        key: &[u8],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A session another process opened, while valid.
    fn shared_session(
        &self,
        id: &[u8; mls_ds_protocol::auth::SESSION_ID_LEN],
    ) -> impl Future<Output = Result<Option<SharedSession>, StoreError>> + Send;

    /// Wait for the group's handshake lock (see the module doc).
    fn lock_group(&self, id: &GroupId) -> impl Future<Output = Self::GroupGuard> + Send;

    /// Apply a write set (module doc of [`write_set`]). Never waits: the
    /// write happens even if the handle is dropped.
    fn submit(&self, set: WriteSet) -> Committing<Applied>;

    /// Resolves once everything submitted before is durable (a retried
    /// request is answered only once its first attempt's writes are).
    fn settled(&self) -> Committing<()>;

    /// Acknowledge every entry of `client`'s queue up to `up_to`; message
    /// bodies whose last reference goes are deleted.
    fn ack(&self, client: &ClientId, up_to: u64) -> Committing<AckOutcome>;

    /// Drop queue entries of messages stored before `cutoff_ms` (the
    /// retention bound): they leave the queues, and each affected queue's
    /// acknowledgement mark moves past them. Resolves to the number dropped.
    fn expire(&self, cutoff_ms: u64) -> Committing<usize>;

    /// The visible entries of `client`'s queue after `after`: at most
    /// `limit`, and fewer once `max_bytes` are reached (never none if any is
    /// visible).
    fn page(
        &self,
        client: &ClientId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// The handle that is notified (`notify_waiters`) whenever entries of
    /// `client`'s queue become visible, and when the backend closes.
    fn subscribe(&self, client: &ClientId) -> Result<Arc<Notify>, StoreError>;

    /// Queues that got new visible entries (recorded once enabled), for
    /// wake-ups of clients that are not listening.
    fn new_heads(&self) -> &NewHeads;

    /// Clients deleted or recovered by another process on the same storage,
    /// whose sessions in this process must end; `None` where no other
    /// process can write (the services end sessions themselves).
    fn credential_changes(&self) -> Option<tokio::sync::broadcast::Receiver<CredentialChange>>;

    /// `Err` while the backend cannot serve (broken storage, closed).
    fn health(&self) -> Result<(), StoreError>;

    /// Stop serving: pending long-polls end, new requests are refused.
    fn close(&self);

    /// Gauges and counters for `/metrics`.
    fn stats(&self) -> BackendStats;

    /// Integrity check of everything stored (`mls-ds check`).
    fn check(&self) -> impl Future<Output = Result<AdminReport, StoreError>> + Send;

    /// Counts of what is stored (`mls-ds stats`).
    fn report(&self) -> impl Future<Output = Result<AdminReport, StoreError>> + Send;

    /// Bytes the database's files occupy (cheap).
    fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// Bytes of live records against bytes on disk (reads every record).
    fn space(&self) -> impl Future<Output = Result<Space, StoreError>> + Send;

    /// Rewrite the database into one that holds only the live records
    /// (`mls-ds compact`); the backend answers nothing more until the server
    /// has reopened storage on the copy.
    fn compact(&self) -> impl Future<Output = Result<AdminReport, StoreError>> + Send;

    /// A consistent copy of everything into the new directory `target`
    /// (`mls-ds backup`).
    fn backup(&self, target: &Path)
        -> impl Future<Output = Result<AdminReport, StoreError>> + Send;
}

/// A change of a client's credentials made by another process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CredentialChange {
    /// This client was deleted or recovered with a new key.
    Client(ClientId),
    /// Changes may have been missed (the notifications were interrupted):
    /// any client's.
    Unknown,
}

/// What the database holds against what it occupies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Space {
    /// Bytes of every stored key and value.
    pub(crate) live: u64,
    /// Bytes of the database's files.
    pub(crate) on_disk: u64,
}

/// A client and its record.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredClient {
    /// Its id.
    pub(crate) id: ClientId,
    /// Its record.
    pub(crate) record: ClientRecord,
}

/// A group and its record.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredGroup {
    /// Its id.
    pub(crate) id: GroupId,
    /// Its record.
    pub(crate) record: GroupRecord,
}

/// An accepted-commit record old enough to prune.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StaleCommit {
    /// The group.
    pub(crate) group: GroupId,
    /// The epoch the commit was for.
    pub(crate) epoch: u64,
}

/// An invitation code and its record.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredInvite {
    /// The code.
    pub(crate) code: String,
    /// Its record.
    pub(crate) record: InviteRecord,
}

/// An expired ordinary key package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExpiredKeyPackage {
    /// Who published it.
    pub(crate) owner: ClientId,
    /// Its hash reference.
    pub(crate) kp_ref: Vec<u8>,
}

/// What an operator command found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AdminReport {
    /// Text for the operator.
    pub(crate) text: String,
    /// Whether the command found a problem (non-zero exit).
    pub(crate) failed: bool,
}

impl AdminReport {
    /// `check`'s report: what was checked, each problem, OK or FAILED.
    pub(crate) fn of_check(checked: String, problems: &[String]) -> AdminReport {
        use std::fmt::Write as _;
        let mut text = checked;
        for p in problems {
            let _ = writeln!(text, "PROBLEM: {p}");
        }
        let _ = writeln!(
            text,
            "{}",
            if problems.is_empty() { "OK" } else { "FAILED" }
        );
        AdminReport {
            text,
            failed: !problems.is_empty(),
        }
    }
}

/// Gauges and counters a backend exports.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct BackendStats {
    /// Unacknowledged visible queue entries.
    pub(crate) queue_entries: u64,
    /// Deepest queue.
    pub(crate) queue_depth_max: u64,
    /// Stored messages still referenced by a queue.
    pub(crate) stored_messages: u64,
    /// Queue entries dropped because their queue was full.
    pub(crate) queue_overflow_drops: u64,
    /// Durability rounds (flush + fdatasync, or database commits).
    pub(crate) flushes: u64,
    /// Write sets made durable.
    pub(crate) durable_writes: u64,
    /// Failed durability rounds.
    pub(crate) flush_failures: u64,
    /// Time spent applying writes, in seconds.
    pub(crate) apply_seconds: f64,
    /// Time spent making them durable, in seconds.
    pub(crate) flush_seconds: f64,
    /// The database connection pool, for a backend that has one.
    pub(crate) pool: Option<PoolStats>,
    /// The database's latency, for a backend on a database server.
    pub(crate) database: Option<DbLatency>,
}

/// How long the database's work took, as the DS waited for it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct DbLatency {
    /// Write transactions, from taking a connection to their commit.
    pub(crate) transactions: Histogram,
    /// Reads, from taking a connection to their answer.
    pub(crate) reads: Histogram,
}

/// A connection pool's gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PoolStats {
    /// Connections open.
    pub(crate) size: usize,
    /// Open connections not in use.
    pub(crate) available: usize,
    /// Requests waiting for a connection.
    pub(crate) waiting: usize,
    /// Most connections the pool opens.
    pub(crate) max_size: usize,
}
