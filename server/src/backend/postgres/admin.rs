//! Operator commands on PostgreSQL: `check` (every queue gap-free between
//! its mark and its head, every entry's message stored, every group's
//! state loading at its recorded epoch, every creator's group count
//! right), `stats` (counts, bytes of live rows against the tables' size),
//! and `compact`, which is a plain `VACUUM` here: PostgreSQL reuses the
//! space of deleted rows by itself (autovacuum), and `VACUUM FULL`, which
//! gives it back to the file system, locks each table; an operator runs it
//! in a maintenance window.

use std::fmt::Write as _;

use super::rows::{self, col, prefixed, u64_of};
use super::{connect::db, Inner};
use crate::backend::{group_check, AdminReport, Space, StoreError};

/// The DS's tables (the migration history is PostgreSQL's business).
const TABLES: [&str; 14] = [
    "clients",
    "queues",
    "key_packages",
    "last_resorts",
    "key_package_owners",
    "groups",
    "group_states",
    "commits",
    "invites",
    "usage",
    "messages",
    "queue_entries",
    "send_receipts",
    "sessions",
];

/// Consistency queries: each returns one row per problem, as text.
const PROBLEM_QUERIES: [&str; 6] = [
    // Gap-free: exactly the entries acked + 1 ..= head.
    "SELECT 'queue ' || encode(q.client, 'hex') || ': head ' || q.head || ', mark ' || q.acked \
       || ', but ' || count(e.seq) || ' entries from ' || COALESCE(min(e.seq), 0) || ' to ' \
       || COALESCE(max(e.seq), 0) \
     FROM queues q LEFT JOIN queue_entries e ON e.client = q.client \
     GROUP BY q.client, q.head, q.acked \
     HAVING count(e.seq) <> q.head - q.acked \
       OR (count(e.seq) > 0 AND (min(e.seq) <> q.acked + 1 OR max(e.seq) <> q.head)) \
       OR q.acked > q.head",
    "SELECT 'queue entry ' || encode(e.client, 'hex') || '/' || e.seq || ': message ' \
       || e.message_id || ' is not stored' \
     FROM queue_entries e WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = e.message_id)",
    "SELECT 'queue entry ' || encode(e.client, 'hex') || '/' || e.seq || ' has no queue' \
     FROM queue_entries e WHERE NOT EXISTS (SELECT 1 FROM queues q WHERE q.client = e.client)",
    "SELECT 'client ' || encode(c.id, 'hex') || ' has no queue' \
     FROM clients c WHERE NOT EXISTS (SELECT 1 FROM queues q WHERE q.client = c.id)",
    "SELECT 'message ' || id || ' has unknown kind ' || kind FROM messages \
     WHERE kind NOT BETWEEN 1 AND 4",
    // The group quota's counts: one per existing group, by its creator.
    "SELECT 'client ' || encode(COALESCE(u.client, g.creator), 'hex') || ' is counted as the \
       creator of ' || COALESCE(u.groups_created, 0) || ' groups, but ' || COALESCE(g.n, 0) \
       || ' exist' \
     FROM usage u FULL JOIN (SELECT creator, count(*) AS n FROM groups GROUP BY creator) g \
       ON g.creator = u.client \
     WHERE COALESCE(u.groups_created, 0) <> COALESCE(g.n, 0)",
];

impl Inner {
    /// `mls-ds check`.
    pub(crate) async fn check(&self) -> Result<AdminReport, StoreError> {
        let conn = self.connection().await?;
        let mut problems: Vec<String> = Vec::new();
        for sql in PROBLEM_QUERIES {
            let sql = format!("SELECT problem FROM ({sql}) AS p(problem)");
            for row in conn.query(&sql, &[]).await.map_err(db)? {
                problems.push(col(&row, "problem")?);
            }
        }
        let sql = format!(
            "SELECT g.id, {}, s.group_info IS NOT NULL AS has_state, {} \
             FROM groups g LEFT JOIN group_states s ON s.id = g.id ORDER BY g.id",
            prefixed("g.", rows::GROUP_COLUMNS),
            prefixed("s.", rows::GROUP_STATE_COLUMNS),
        );
        let groups = conn.query(&sql, &[]).await.map_err(db)?;
        for row in &groups {
            let id: Vec<u8> = col(row, "id")?;
            let record = match rows::group(row) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("group {}: {e}", hex::encode(&id)));
                    continue;
                }
            };
            let state = if col::<bool>(row, "has_state")? {
                match rows::group_state(row) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        problems.push(format!("group {}: {e}", hex::encode(&id)));
                        continue;
                    }
                }
            } else {
                None
            };
            problems.extend(group_check::problems(&id, &record, state));
        }
        let counts = self.counts().await?;
        let checked = format!(
            "checked {} clients, {} key packages, {} groups, {} queue entries, {} stored messages\n",
            counts.clients, counts.key_packages, counts.groups, counts.entries, counts.messages
        );
        Ok(AdminReport::of_check(checked, &problems))
    }

    /// `mls-ds stats`.
    pub(crate) async fn report(&self) -> Result<AdminReport, StoreError> {
        let c = self.counts().await?;
        let space = self.space().await?;
        let mut text = String::new();
        let _ = writeln!(text, "clients            {}", c.clients);
        let _ = writeln!(text, "key packages       {}", c.key_packages);
        let _ = writeln!(text, "groups             {}", c.groups);
        let _ = writeln!(text, "accepted commits   {}", c.commits);
        let _ = writeln!(text, "queue entries      {}", c.entries);
        let _ = writeln!(text, "stored messages    {}", c.messages);
        let _ = writeln!(text, "live records       {} bytes", space.live);
        let _ = writeln!(text, "size on disk       {} bytes", space.on_disk);
        Ok(AdminReport {
            text,
            failed: false,
        })
    }

    /// Bytes of every row of the DS's tables against the tables' size
    /// (with their indexes and TOAST).
    pub(crate) async fn space(&self) -> Result<Space, StoreError> {
        let conn = self.connection().await?;
        let mut space = Space {
            live: 0,
            on_disk: 0,
        };
        for table in TABLES {
            let row = conn
                .query_one(
                    &format!(
                        "SELECT COALESCE(sum(pg_column_size(t.*)), 0)::bigint AS live, \
                         pg_total_relation_size('{table}') AS disk FROM {table} t"
                    ),
                    &[],
                )
                .await
                .map_err(db)?;
            space.live += u64_of(col(&row, "live")?, "live bytes")?;
            space.on_disk += u64_of(col(&row, "disk")?, "table size")?;
        }
        Ok(space)
    }

    /// `mls-ds compact`: `VACUUM` every table (module doc).
    pub(crate) async fn vacuum(&self) -> Result<AdminReport, StoreError> {
        let before = self.space().await?;
        let conn = self.connection().await?;
        for table in TABLES {
            conn.batch_execute(&format!("VACUUM (ANALYZE) {table}"))
                .await
                .map_err(db)?;
        }
        drop(conn);
        let after = self.space().await?;
        Ok(AdminReport {
            text: format!(
                "vacuumed {} tables: {} bytes of tables before, {} after ({} bytes live); the \
                 space of deleted rows is reused by new ones, and VACUUM FULL gives it back to \
                 the file system under an exclusive lock\n",
                TABLES.len(),
                before.on_disk,
                after.on_disk,
                after.live
            ),
            failed: false,
        })
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let conn = self.connection().await?;
        let row = conn
            .query_one(
                "SELECT (SELECT count(*) FROM clients) AS clients, \
                 (SELECT count(*) FROM key_packages) + (SELECT count(*) FROM last_resorts) \
                   AS key_packages, \
                 (SELECT count(*) FROM groups) AS groups, \
                 (SELECT count(*) FROM commits) AS commits, \
                 (SELECT count(*) FROM queue_entries) AS entries, \
                 (SELECT count(*) FROM messages) AS messages",
                &[],
            )
            .await
            .map_err(db)?;
        let n = |name: &str| -> Result<u64, StoreError> { u64_of(col(&row, name)?, name) };
        Ok(Counts {
            clients: n("clients")?,
            key_packages: n("key_packages")?,
            groups: n("groups")?,
            commits: n("commits")?,
            entries: n("entries")?,
            messages: n("messages")?,
        })
    }
}

/// Row counts of the main tables.
struct Counts {
    clients: u64,
    key_packages: u64,
    groups: u64,
    commits: u64,
    entries: u64,
    messages: u64,
}
