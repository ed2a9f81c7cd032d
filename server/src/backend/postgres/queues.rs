//! Queues on PostgreSQL: reading a page (one statement, so the head and
//! the entries come from one snapshot), acknowledging, the retention
//! bound, and the sweep that deletes messages no entry refers to any more.
//!
//! A message is not reference-counted: a count would make every recipient
//! of a group message wait on one row lock to acknowledge it. Instead,
//! whoever removes entries remembers their messages as candidates, and the
//! sweep deletes those without entries; a full sweep at startup and every
//! hour catches what a node that stopped in between did not sweep. An
//! entry is only ever inserted with its message, so a message without
//! entries never gets one.

use std::sync::Arc;

use mls_ds_protocol::ClientId;

use super::rows::{self, big, col, prefixed, u64_of};
use super::writes::{exec, query, query_one, query_opt, transact, Step, Written};
use super::{connect::db, Inner};
use crate::backend::page::PageEntry;
use crate::backend::write_set::AckOutcome;
use crate::backend::{Page, StoreError};

/// Move `client`'s mark to `mark` (its queue row locked by the caller) and
/// remove the entries up to it; their messages, as sweep candidates.
async fn acknowledge(
    tx: &deadpool_postgres::Transaction<'_>,
    client: &[u8],
    mark: i64,
) -> Result<Vec<i64>, Step> {
    // Sent together: one round trip (the database runs them in order).
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&client, &mark];
    let (removed, _) = tokio::try_join!(
        query(
            tx,
            "DELETE FROM queue_entries WHERE client = $1 AND seq <= $2 RETURNING message_id",
            &params,
        ),
        exec(
            tx,
            "UPDATE queues SET acked = $2 WHERE client = $1",
            &params,
        )
    )?;
    let mut released = Vec::with_capacity(removed.len());
    for row in removed {
        released.push(row.try_get(0)?);
    }
    Ok(released)
}

/// Messages a full sweep checks per statement.
const SWEEP_RANGE: i64 = 10_000;

impl Inner {
    /// Up to `limit` entries of `client`'s queue after `after`, fewer once
    /// `max_bytes` are reached (never none if one exists).
    pub(crate) async fn page(
        &self,
        client: &ClientId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let conn = self.connection().await?;
        let sql = format!(
            "SELECT q.head, q.acked, x.* FROM queues q LEFT JOIN LATERAL ( \
               SELECT * FROM ( \
                 SELECT e.seq, {columns}, \
                   row_number() OVER (ORDER BY e.seq) AS n, \
                   sum(length(m.message) + length(m.ratchet_tree) + length(m.group_id) \
                       + length(m.sender) + 64) OVER (ORDER BY e.seq) AS running \
                 FROM queue_entries e JOIN messages m ON m.id = e.message_id \
                 WHERE e.client = q.client AND e.seq > $2 ORDER BY e.seq LIMIT $3 \
               ) y WHERE y.n = 1 OR y.running <= $4 \
             ) x ON true WHERE q.client = $1 ORDER BY x.seq",
            columns = prefixed("m.", rows::MESSAGE_COLUMNS),
        );
        let stmt = conn.prepare_cached(&sql).await.map_err(db)?;
        let result = conn
            .query(
                &stmt,
                &[
                    &client.as_bytes(),
                    &big(after),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                    &as_bigint(max_bytes),
                ],
            )
            .await
            .map_err(db)?;
        let mut page = Page {
            entries: Vec::with_capacity(result.len()),
            head: 0,
            acked: 0,
        };
        for row in &result {
            page.head = u64_of(col(row, "head")?, "head")?;
            page.acked = u64_of(col(row, "acked")?, "acked")?;
            let Some(seq) = col::<Option<i64>>(row, "seq")? else {
                continue;
            };
            let stored = rows::message(row)?;
            let kind = stored
                .entry_kind()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            page.entries.push(PageEntry {
                seq: u64_of(seq, "seq")?,
                kind,
                stored: Arc::new(stored),
            });
        }
        Ok(page)
    }

    /// Acknowledge `client`'s queue up to `up_to`.
    pub(crate) async fn ack(
        &self,
        client: &ClientId,
        up_to: u64,
    ) -> Result<Written<AckOutcome>, StoreError> {
        transact!(self, |tx| {
            let id = client.as_bytes();
            let (head, acked) = match query_opt(
                tx,
                "SELECT head, acked FROM queues WHERE client = $1 FOR UPDATE",
                &[&id],
            )
            .await?
            {
                Some(row) => (row.try_get::<_, i64>(0)?, row.try_get::<_, i64>(1)?),
                None => (0, 0),
            };
            let head_u = u64_of(head, "head")?;
            if up_to > head_u {
                return Err(Step::Store(StoreError::AckBeyondHead {
                    up_to,
                    head: head_u,
                }));
            }
            let mut written = Written::answer(AckOutcome {
                acked: u64_of(acked, "acked")?,
                remaining: head_u.saturating_sub(u64_of(acked, "acked")?),
            });
            let mark = big(up_to);
            if mark > acked {
                written.released = acknowledge(tx, id, mark).await?;
                written.value = AckOutcome {
                    acked: up_to,
                    remaining: head_u - up_to,
                };
            }
            Ok(written)
        })
    }

    /// Drop the entries at the front of every queue whose messages were
    /// stored before `cutoff_ms`; returns how many.
    pub(crate) async fn expire(&self, cutoff_ms: u64) -> Result<Written<usize>, StoreError> {
        let cutoff = big(cutoff_ms);
        let clients: Vec<Vec<u8>> = {
            let conn = self.connection().await?;
            conn.query(
                "SELECT DISTINCT e.client FROM messages m \
                 JOIN queue_entries e ON e.message_id = m.id WHERE m.stored_ms < $1",
                &[&cutoff],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|row| col(row, "client"))
            .collect::<Result<_, _>>()?
        };
        let mut total = Written::answer(0usize);
        for client in clients {
            let written = transact!(self, |tx| {
                let Some(row) = query_opt(
                    tx,
                    "SELECT head, acked FROM queues WHERE client = $1 FOR UPDATE",
                    &[&client],
                )
                .await?
                else {
                    return Ok(Written::answer(0usize));
                };
                let (head, acked): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                let first_young: Option<i64> = query_one(
                    tx,
                    "SELECT min(e.seq) FROM queue_entries e \
                             JOIN messages m ON m.id = e.message_id \
                             WHERE e.client = $1 AND m.stored_ms >= $2",
                    &[&client, &cutoff],
                )
                .await?
                .try_get(0)?;
                let mark = first_young.map_or(head, |s| s - 1);
                let mut written = Written::answer(0usize);
                if mark > acked {
                    written.released = acknowledge(tx, &client, mark).await?;
                    written.value = written.released.len();
                }
                Ok(written)
            })?;
            total.value += written.value;
            total.released.extend(written.released);
        }
        Ok(total)
    }

    /// Delete the candidates that no entry refers to; returns how many.
    pub(crate) async fn sweep(&self, mut candidates: Vec<i64>) -> Result<u64, StoreError> {
        candidates.sort_unstable();
        candidates.dedup();
        let conn = self.connection().await?;
        let mut deleted = 0;
        for chunk in candidates.chunks(5_000) {
            deleted += conn
                .execute(
                    "DELETE FROM messages m WHERE m.id = ANY($1) AND NOT EXISTS \
                     (SELECT 1 FROM queue_entries e WHERE e.message_id = m.id)",
                    &[&chunk],
                )
                .await
                .map_err(db)?;
        }
        Ok(deleted)
    }

    /// Forget the sends created before `cutoff_ms`, a few thousand rows per
    /// statement; returns how many.
    pub(crate) async fn forget_sends(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let conn = self.connection().await?;
        let mut forgotten = 0u64;
        loop {
            let n = conn
                .execute(
                    "DELETE FROM send_receipts WHERE ctid IN (SELECT ctid FROM send_receipts \
                     WHERE created_ms < $1 LIMIT 5000)",
                    &[&big(cutoff_ms)],
                )
                .await
                .map_err(db)?;
            forgotten += n;
            if n == 0 {
                return Ok(usize::try_from(forgotten).unwrap_or(usize::MAX));
            }
        }
    }

    /// Delete every message that no entry refers to, range by range.
    pub(crate) async fn sweep_all(&self) -> Result<u64, StoreError> {
        let conn = self.connection().await?;
        let bounds = conn
            .query_one("SELECT min(id), max(id) FROM messages", &[])
            .await
            .map_err(db)?;
        let (Some(mut from), Some(last)) = (
            col::<Option<i64>>(&bounds, "min")?,
            col::<Option<i64>>(&bounds, "max")?,
        ) else {
            return Ok(0);
        };
        let mut deleted = 0;
        while from <= last {
            deleted += conn
                .execute(
                    "DELETE FROM messages m WHERE m.id >= $1 AND m.id < $2 AND NOT EXISTS \
                     (SELECT 1 FROM queue_entries e WHERE e.message_id = m.id)",
                    &[&from, &from.saturating_add(SWEEP_RANGE)],
                )
                .await
                .map_err(db)?;
            from = from.saturating_add(SWEEP_RANGE);
        }
        Ok(deleted)
    }
}

/// A byte bound as `bigint` (`sum` of `integer`s is one).
fn as_bigint(max_bytes: usize) -> i64 {
    i64::try_from(max_bytes).unwrap_or(i64::MAX)
}
