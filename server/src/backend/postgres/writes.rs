//! The write path on PostgreSQL: one database transaction per write set,
//! committed with `synchronous_commit = on`, so a request is answered only
//! once its writes are durable in the database, whichever DS node ran it.
//!
//! Conditions are checked inside the transaction against the latest
//! committed state and stay true until it commits, because they lock what
//! they read: a row that exists is locked (`FOR UPDATE`, `FOR NO KEY
//! UPDATE` for a group's revision, `FOR SHARE` for a client, `FOR KEY SHARE`
//! for a group that must keep existing); a row that must not exist is
//! guarded by a transaction-scoped advisory lock on its key, so two nodes
//! inserting it wait for each other and the second sees the first's row
//! (a send's receipt by its primary key instead). A transaction locks the
//! queue rows it delivers to first, all at once and in client order,
//! before any condition's lock and before any sequence number is
//! assigned. A serialisation failure, a deadlock or a unique violation (a
//! racing insert) rolls the attempt back and runs it again from the start.
//! The statements of each part: `conditions.rs`, `changes.rs`,
//! `deliveries.rs`.

use std::time::Duration;

use deadpool_postgres::Transaction;
use futures_util::future::try_join_all;
use mls_ds_protocol::ClientId;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::changes::stage;
use super::conditions::holds;
use super::deliveries::{deliver, Announce};
use super::{connect::db, Inner};
use crate::backend::write_set::{Applied, WriteSet};
use crate::backend::StoreError;

/// Attempts of one transaction before its conflict is reported.
const MAX_ATTEMPTS: u32 = 12;

/// The `NOTIFY` channel on which queues that grew are announced.
pub(crate) const CHANNEL: &str = "mls_ds_queues";

/// The `NOTIFY` channel on which clients deleted or recovered are announced
/// (payload: the client id in hex), so that every node ends their sessions.
pub(crate) const CREDENTIALS: &str = "mls_ds_credentials";

/// `NOTIFY` payloads stay under PostgreSQL's 8000-byte limit.
pub(crate) const MAX_PAYLOAD: usize = 7000;

/// Why one attempt stopped.
pub(crate) enum Step {
    /// A database error (retried if it is a conflict).
    Db(tokio_postgres::Error),
    /// An answer: a condition that failed, corrupt data, an ack too far.
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Step {
    fn from(e: tokio_postgres::Error) -> Self {
        Step::Db(e)
    }
}

impl From<StoreError> for Step {
    fn from(e: StoreError) -> Self {
        Step::Store(e)
    }
}

/// Whether an attempt lost a race that a new attempt resolves.
pub(crate) fn conflict(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::UNIQUE_VIOLATION
    )
}

/// What a committed write produced, and which queues it grew.
pub(crate) struct Written<T> {
    /// The answer.
    pub(crate) value: T,
    /// Queues that got entries, with their new heads.
    pub(crate) grown: Vec<(ClientId, u64)>,
    /// Entries dropped from full queues.
    pub(crate) dropped: u64,
    /// Messages that may have lost their last queue entry.
    pub(crate) released: Vec<i64>,
}

impl<T> Written<T> {
    /// Just an answer.
    pub(crate) fn answer(value: T) -> Written<T> {
        Written {
            value,
            grown: Vec::new(),
            dropped: 0,
            released: Vec::new(),
        }
    }
}

/// Run `$body` (with `$tx` the open transaction; it evaluates to
/// `Result<Written<T>, Step>`) until it commits, fails with an answer, or
/// keeps conflicting; evaluates to `Result<Written<T>, StoreError>`. A
/// macro, not a function taking a closure: the body borrows its inputs
/// across awaits, which closures returning futures cannot express while
/// staying `Send`.
macro_rules! transact {
    ($inner:expr, |$tx:ident| $body:block) => {{
        let inner: &$crate::backend::postgres::Inner = $inner;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let started = std::time::Instant::now();
            let mut conn = match inner.connection().await {
                Ok(conn) => conn,
                Err(e) => break Err(e),
            };
            let tx = match conn.transaction().await {
                Ok(tx) => tx,
                Err(e) => break Err($crate::backend::postgres::connect::db(e)),
            };
            let result: Result<_, $crate::backend::postgres::writes::Step> = {
                let $tx = &tx;
                async { $body }.await
            };
            let step = match result {
                Ok(written) => {
                    let applied = started.elapsed();
                    match tx.commit().await {
                        Ok(()) => {
                            inner.counters.committed(
                                applied,
                                started.elapsed().saturating_sub(applied),
                                1,
                            );
                            break Ok(written);
                        }
                        Err(e) => $crate::backend::postgres::writes::Step::Db(e),
                    }
                }
                Err(step) => step,
            };
            match $crate::backend::postgres::writes::retry(step, attempt).await {
                Some(e) => break Err(e),
                None => continue,
            }
        }
    }};
}
pub(crate) use transact;

/// After a failed attempt: `None` to run it again (after a pause), or the
/// error to answer with.
pub(crate) async fn retry(step: Step, attempt: u32) -> Option<StoreError> {
    match step {
        Step::Db(e) if conflict(&e) && attempt < MAX_ATTEMPTS => {
            tracing::debug!(error = %e, attempt, "write conflicted; running it again");
            let jitter = u64::from(rand::random::<u8>() % 8);
            tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 2 + jitter)).await;
            None
        }
        Step::Db(e) => Some(db(e)),
        Step::Store(e) => Some(e),
    }
}

impl Inner {
    /// Apply a write set alone (module doc).
    pub(crate) async fn apply(&self, set: &WriteSet) -> Result<Written<Applied>, StoreError> {
        let max_depth = self.max_queue_depth;
        let alone = [set];
        transact!(self, |tx| {
            tokio::try_join!(lock_queues(tx, &alone), check(tx, set))?;
            write(tx, set, max_depth, Announce::Now).await
        })
    }
}

/// Lock the queue rows that `sets` deliver to, in client order, before
/// anything else: every transaction takes its queue rows first and all at
/// once, so transactions of several write sets (`lanes.rs`) cannot
/// deadlock over them with each other or with single ones.
pub(crate) async fn lock_queues(tx: &Transaction<'_>, sets: &[&WriteSet]) -> Result<(), Step> {
    let mut ids: Vec<&[u8]> = sets
        .iter()
        .flat_map(|s| &s.deliveries)
        .flat_map(|d| d.recipients.iter().map(|c| c.as_bytes()))
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    ids.sort_unstable();
    ids.dedup();
    exec(
        tx,
        "SELECT 1 FROM queues WHERE client = ANY($1) ORDER BY client FOR UPDATE",
        &[&ids],
    )
    .await?;
    Ok(())
}

/// One write set inside an open transaction whose queue rows are locked:
/// its conditions (a failed one is answered before any change is staged),
/// its changes, its deliveries (the queues they grew for the caller to
/// announce).
pub(crate) async fn apply_one(
    tx: &Transaction<'_>,
    set: &WriteSet,
    max_depth: u64,
) -> Result<Written<Applied>, Step> {
    check(tx, set).await?;
    write(tx, set, max_depth, Announce::ByCaller).await
}

/// A write set's conditions, sent together (each condition's own
/// statements stay in order); the first that fails, in the set's order, is
/// the answer.
async fn check(tx: &Transaction<'_>, set: &WriteSet) -> Result<(), Step> {
    let held = try_join_all(set.conditions.iter().map(|c| holds(tx, c))).await?;
    match set.conditions.iter().zip(held).find(|(_, held)| !held) {
        Some((c, _)) => Err(Step::Store(StoreError::ConditionFailed(c.clone()))),
        None => Ok(()),
    }
}

/// A write set's changes, one after the other, then its deliveries.
async fn write(
    tx: &Transaction<'_>,
    set: &WriteSet,
    max_depth: u64,
    when: Announce,
) -> Result<Written<Applied>, Step> {
    for change in &set.changes {
        stage(tx, change).await?;
    }
    deliver(tx, &set.deliveries, max_depth, when).await
}

/// `execute` with the statement prepared once per connection (parsing and
/// planning each statement anew cost more than running it).
pub(crate) async fn exec(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.execute(&stmt, params).await
}

/// `query` with a cached statement (see [`exec`]).
pub(crate) async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.query(&stmt, params).await
}

/// `query_opt` with a cached statement (see [`exec`]).
pub(crate) async fn query_opt(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.query_opt(&stmt, params).await
}

/// `query_one` with a cached statement (see [`exec`]).
pub(crate) async fn query_one(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.query_one(&stmt, params).await
}
