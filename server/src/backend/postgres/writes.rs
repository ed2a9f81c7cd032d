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
//! inserting it wait for each other and the second sees the first's row.
//! Queue rows are locked in client order before any sequence number is
//! assigned. A serialisation failure, a deadlock or a unique violation (a
//! racing insert) rolls the attempt back and runs it again from the start.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::Transaction;
use mls_ds_protocol::ClientId;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::rows::{big, bits, int};
use super::{connect::db, Inner};
use crate::backend::records::{SendKey, StoredMessage};
use crate::backend::write_set::{Applied, Change, Condition, Delivery, DeliveryOutcome, WriteSet};
use crate::backend::StoreError;

/// Attempts of one transaction before its conflict is reported.
const MAX_ATTEMPTS: u32 = 12;

/// The `NOTIFY` channel on which queues that grew are announced.
pub(crate) const CHANNEL: &str = "mls_ds_queues";

/// The `NOTIFY` channel on which clients deleted or recovered are announced
/// (payload: the client id in hex), so that every node ends their sessions.
pub(crate) const CREDENTIALS: &str = "mls_ds_credentials";

/// `NOTIFY` payloads stay under PostgreSQL's 8000-byte limit.
const MAX_PAYLOAD: usize = 7000;

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
fn conflict(e: &tokio_postgres::Error) -> bool {
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
                            inner
                                .counters
                                .committed(applied, started.elapsed().saturating_sub(applied));
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
    /// Apply a write set (module doc).
    pub(crate) async fn apply(&self, set: &WriteSet) -> Result<Written<Applied>, StoreError> {
        let max_depth = self.max_queue_depth;
        transact!(self, |tx| {
            for c in &set.conditions {
                if !holds(tx, c).await? {
                    return Err(Step::Store(StoreError::ConditionFailed(c.clone())));
                }
            }
            for change in &set.changes {
                stage(tx, change).await?;
            }
            deliver(tx, &set.deliveries, max_depth).await
        })
    }
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

/// Transaction-scoped advisory lock on a key that must not exist yet.
async fn guard_absent(tx: &Transaction<'_>, domain: &str, key: &[&[u8]]) -> Result<(), Step> {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    for part in key {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    exec(
        tx,
        "SELECT pg_advisory_xact_lock($1)",
        &[&i64::from_be_bytes(first)],
    )
    .await?;
    Ok(())
}

/// Whether a condition holds, locking what it read (module doc).
async fn holds(tx: &Transaction<'_>, c: &Condition) -> Result<bool, Step> {
    Ok(match c {
        Condition::ClientAbsent(id) => {
            guard_absent(tx, "client", &[id.as_bytes()]).await?;
            query_opt(tx, "SELECT 1 FROM clients WHERE id = $1", &[&id.as_bytes()])
                .await?
                .is_none()
        }
        Condition::ClientActive(id) => query_opt(
            tx,
            "SELECT 1 FROM clients WHERE id = $1 AND deleted_ms IS NULL FOR SHARE",
            &[&id.as_bytes()],
        )
        .await?
        .is_some(),
        Condition::ClientKeyIs { client, key } => query_opt(
            tx,
            "SELECT 1 FROM clients WHERE id = $1 AND deleted_ms IS NULL \
                 AND signature_key = $2 FOR SHARE",
            &[&client.as_bytes(), key],
        )
        .await?
        .is_some(),
        Condition::GroupAbsent(id) => {
            guard_absent(tx, "group", &[id.as_bytes()]).await?;
            query_opt(tx, "SELECT 1 FROM groups WHERE id = $1", &[&id.as_bytes()])
                .await?
                .is_none()
        }
        Condition::GroupPresent(id) => query_opt(
            tx,
            "SELECT 1 FROM groups WHERE id = $1 FOR KEY SHARE",
            &[&id.as_bytes()],
        )
        .await?
        .is_some(),
        Condition::GroupAt { group, revision } => query_opt(
            tx,
            "SELECT revision FROM groups WHERE id = $1 FOR NO KEY UPDATE",
            &[&group.as_bytes()],
        )
        .await?
        .is_some_and(|row| row.try_get::<_, i64>(0).ok() == Some(big(*revision))),
        Condition::KeyPackageUnclaimed { owner, kp_ref } => query_opt(
            tx,
            "SELECT 1 FROM key_packages WHERE owner = $1 AND kp_ref = $2 FOR UPDATE",
            &[&owner.as_bytes(), kp_ref],
        )
        .await?
        .is_some(),
        Condition::LastResortAt {
            owner,
            kp_ref,
            claims,
        } => query_opt(
            tx,
            "SELECT 1 FROM last_resorts WHERE owner = $1 AND kp_ref = $2 AND claims = $3 \
                 FOR UPDATE",
            &[&owner.as_bytes(), kp_ref, &big(*claims)],
        )
        .await?
        .is_some(),
        Condition::InviteAt { code, uses_left } => query_opt(
            tx,
            "SELECT 1 FROM invites WHERE code = $1 AND uses_left = $2 FOR UPDATE",
            &[code, &int(*uses_left)],
        )
        .await?
        .is_some(),
        Condition::SendNew(key) => {
            let parts = send_parts(key);
            guard_absent(tx, "send", &[&parts[0], &parts[1], &parts[2]]).await?;
            query_opt(
                tx,
                "SELECT 1 FROM send_receipts WHERE sender = $1 AND created_ms = $2 AND nonce = $3",
                &[
                    &key.sender.as_bytes(),
                    &big(key.id.created_ms),
                    &bits(key.id.nonce),
                ],
            )
            .await?
            .is_none()
        }
        Condition::UsageAt { client, usage } => {
            // Absent counts as the default: make the row exist to lock it.
            exec(
                tx,
                "INSERT INTO usage (client, groups_created) VALUES ($1, 0) \
                 ON CONFLICT (client) DO NOTHING",
                &[&client.as_bytes()],
            )
            .await?;
            query_opt(
                tx,
                "SELECT 1 FROM usage WHERE client = $1 AND groups_created = $2 FOR UPDATE",
                &[&client.as_bytes(), &int(usage.groups_created)],
            )
            .await?
            .is_some()
        }
    })
}

/// The parts of a send's advisory lock key.
fn send_parts(key: &SendKey) -> [Vec<u8>; 3] {
    [
        key.sender.as_bytes().to_vec(),
        key.id.created_ms.to_be_bytes().to_vec(),
        key.id.nonce.to_be_bytes().to_vec(),
    ]
}

/// One change's statements.
pub(crate) async fn stage(tx: &Transaction<'_>, change: &Change) -> Result<(), Step> {
    match change {
        Change::PutClient { id, record } => {
            let replaced: bool = query_one(
                tx,
                "INSERT INTO clients (id, signature_scheme, signature_key, registered_ms, \
                 deleted_ms, recovery_hash) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (id) DO UPDATE SET signature_scheme = EXCLUDED.signature_scheme, \
                 signature_key = EXCLUDED.signature_key, registered_ms = EXCLUDED.registered_ms, \
                 deleted_ms = EXCLUDED.deleted_ms, recovery_hash = EXCLUDED.recovery_hash \
                 RETURNING xmax::text <> '0' AS replaced",
                &[
                    &id.as_bytes(),
                    &i32::from(record.signature_scheme),
                    &record.signature_key,
                    &big(record.registered_ms),
                    &record.deleted_ms.map(big),
                    &record.recovery_hash,
                ],
            )
            .await?
            .try_get("replaced")?;
            if replaced {
                // A recovery: sessions opened with the old key end everywhere.
                announce_credentials(tx, id).await?;
            }
            exec(
                tx,
                "INSERT INTO queues (client) VALUES ($1) ON CONFLICT (client) DO NOTHING",
                &[&id.as_bytes()],
            )
            .await?;
        }
        Change::DeleteClient { id, tombstone } => {
            announce_credentials(tx, id).await?;
            let id = id.as_bytes();
            exec(
                tx,
                "UPDATE clients SET deleted_ms = $2, recovery_hash = $3 WHERE id = $1",
                &[
                    &id,
                    &tombstone.deleted_ms.map(big),
                    &tombstone.recovery_hash,
                ],
            )
            .await?;
            exec(tx, "DELETE FROM key_packages WHERE owner = $1", &[&id]).await?;
            exec(tx, "DELETE FROM last_resorts WHERE owner = $1", &[&id]).await?;
            exec(
                tx,
                "UPDATE queues SET closed = true, acked = head WHERE client = $1",
                &[&id],
            )
            .await?;
            // The messages this leaves without entries go at the next full
            // sweep (a client's deletion is rare).
            exec(tx, "DELETE FROM queue_entries WHERE client = $1", &[&id]).await?;
        }
        Change::PutKeyPackage { owner, record } => {
            exec(
                tx,
                "INSERT INTO key_packages (owner, kp_ref, message, not_after, claims) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, kp_ref) DO UPDATE SET \
                 message = EXCLUDED.message, not_after = EXCLUDED.not_after, \
                 claims = EXCLUDED.claims",
                &[
                    &owner.as_bytes(),
                    &record.kp_ref,
                    &record.message,
                    &big(record.not_after),
                    &big(record.claims),
                ],
            )
            .await?;
        }
        Change::PutLastResort { owner, record } => {
            exec(
                tx,
                "INSERT INTO last_resorts (owner, kp_ref, message, not_after, claims) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner) DO UPDATE SET \
                 kp_ref = EXCLUDED.kp_ref, message = EXCLUDED.message, \
                 not_after = EXCLUDED.not_after, claims = EXCLUDED.claims",
                &[
                    &owner.as_bytes(),
                    &record.kp_ref,
                    &record.message,
                    &big(record.not_after),
                    &big(record.claims),
                ],
            )
            .await?;
        }
        Change::RemoveKeyPackage { owner, kp_ref } => {
            exec(
                tx,
                "DELETE FROM key_packages WHERE owner = $1 AND kp_ref = $2",
                &[&owner.as_bytes(), kp_ref],
            )
            .await?;
        }
        Change::PutKeyPackageOwner { kp_ref, owner } => {
            exec(
                tx,
                "INSERT INTO key_package_owners (kp_ref, owner) VALUES ($1, $2) \
                 ON CONFLICT (kp_ref) DO UPDATE SET owner = EXCLUDED.owner",
                &[kp_ref, &owner.as_bytes()],
            )
            .await?;
        }
        Change::DeleteGroup { id } => {
            // Its state and commit records go with it (ON DELETE CASCADE).
            exec(tx, "DELETE FROM groups WHERE id = $1", &[&id.as_bytes()]).await?;
        }
        Change::RemoveCommit { group, epoch } => {
            exec(
                tx,
                "DELETE FROM commits WHERE group_id = $1 AND epoch = $2",
                &[&group.as_bytes(), &big(*epoch)],
            )
            .await?;
        }
        Change::PutGroup { id, record } => {
            exec(
                tx,
                "INSERT INTO groups (id, epoch, revision, open, members, creator, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET \
                 epoch = EXCLUDED.epoch, revision = EXCLUDED.revision, open = EXCLUDED.open, \
                 members = EXCLUDED.members, creator = EXCLUDED.creator, \
                 created_ms = EXCLUDED.created_ms",
                &[
                    &id.as_bytes(),
                    &big(record.epoch),
                    &big(record.revision),
                    &record.open,
                    &record.members,
                    &record.creator,
                    &big(record.created_ms),
                ],
            )
            .await?;
        }
        Change::PutGroupState { id, state } => {
            let pg = &state.public_group;
            let refs: Vec<&[u8]> = pg.proposals.iter().map(|p| &p.reference[..]).collect();
            let proposals: Vec<&[u8]> = pg.proposals.iter().map(|p| &p.proposal[..]).collect();
            exec(
                tx,
                "INSERT INTO group_states (id, group_info, tree, context, \
                 interim_transcript_hash, confirmation_tag, proposal_refs, proposals) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET \
                 group_info = EXCLUDED.group_info, tree = EXCLUDED.tree, \
                 context = EXCLUDED.context, \
                 interim_transcript_hash = EXCLUDED.interim_transcript_hash, \
                 confirmation_tag = EXCLUDED.confirmation_tag, \
                 proposal_refs = EXCLUDED.proposal_refs, proposals = EXCLUDED.proposals",
                &[
                    &id.as_bytes(),
                    &state.group_info,
                    &pg.tree,
                    &pg.context,
                    &pg.interim_transcript_hash,
                    &pg.confirmation_tag,
                    &refs,
                    &proposals,
                ],
            )
            .await?;
        }
        Change::PutCommit {
            group,
            epoch,
            record,
        } => {
            exec(
                tx,
                "INSERT INTO commits (group_id, epoch, commit_hash, committer, new_epoch, \
                 recipients, accepted_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (group_id, epoch) DO UPDATE SET commit_hash = EXCLUDED.commit_hash, \
                 committer = EXCLUDED.committer, new_epoch = EXCLUDED.new_epoch, \
                 recipients = EXCLUDED.recipients, accepted_ms = EXCLUDED.accepted_ms",
                &[
                    &group.as_bytes(),
                    &big(*epoch),
                    &&record.commit_hash[..],
                    &record.committer,
                    &big(record.new_epoch),
                    &int(record.recipients),
                    &big(record.accepted_ms),
                ],
            )
            .await?;
        }
        Change::PutInvite { code, record } => {
            exec(
                tx,
                "INSERT INTO invites (code, uses_left, expires_ms, created_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (code) DO UPDATE SET \
                 uses_left = EXCLUDED.uses_left, expires_ms = EXCLUDED.expires_ms, \
                 created_ms = EXCLUDED.created_ms",
                &[
                    code,
                    &int(record.uses_left),
                    &record.expires_ms.map(big),
                    &big(record.created_ms),
                ],
            )
            .await?;
        }
        Change::RemoveInvite { code } => {
            exec(tx, "DELETE FROM invites WHERE code = $1", &[code]).await?;
        }
        Change::PutUsage { client, usage } => {
            exec(
                tx,
                "INSERT INTO usage (client, groups_created) VALUES ($1, $2) \
                 ON CONFLICT (client) DO UPDATE SET groups_created = EXCLUDED.groups_created",
                &[&client.as_bytes(), &int(usage.groups_created)],
            )
            .await?;
        }
        Change::RemoveSendReceipt(key) => {
            exec(
                tx,
                "DELETE FROM send_receipts WHERE sender = $1 AND created_ms = $2 AND nonce = $3",
                &[
                    &key.sender.as_bytes(),
                    &big(key.id.created_ms),
                    &bits(key.id.nonce),
                ],
            )
            .await?;
        }
        Change::RemoveKeyPackagesOf { owner } => {
            exec(
                tx,
                "DELETE FROM key_packages WHERE owner = $1",
                &[&owner.as_bytes()],
            )
            .await?;
            exec(
                tx,
                "DELETE FROM last_resorts WHERE owner = $1",
                &[&owner.as_bytes()],
            )
            .await?;
        }
    }
    Ok(())
}

/// A queue row as locked by a delivery.
struct QueueRow {
    head: i64,
    acked: i64,
    closed: bool,
    grown: bool,
}

/// Store each message once, queue it for its recipients (sequence numbers
/// from the locked queue rows), remember its send, drop the oldest entries
/// of queues past `max_depth`, and announce the queues that grew.
async fn deliver(
    tx: &Transaction<'_>,
    deliveries: &[Delivery],
    max_depth: u64,
) -> Result<Written<Applied>, Step> {
    let mut written = Written::answer(Applied::default());
    if deliveries.is_empty() {
        return Ok(written);
    }
    let mut ids: Vec<&[u8]> = deliveries
        .iter()
        .flat_map(|d| d.recipients.iter().map(|c| c.as_bytes()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut queues: HashMap<Vec<u8>, QueueRow> = HashMap::with_capacity(ids.len());
    for row in query(
        tx,
        "SELECT client, head, acked, closed FROM queues WHERE client = ANY($1) \
             ORDER BY client FOR UPDATE",
        &[&ids],
    )
    .await?
    {
        queues.insert(
            row.try_get("client")?,
            QueueRow {
                head: row.try_get("head")?,
                acked: row.try_get("acked")?,
                closed: row.try_get("closed")?,
                grown: false,
            },
        );
    }
    for d in deliveries {
        let m = &d.message;
        let message_id = insert_message(tx, m).await?;
        let mut clients: Vec<&[u8]> = Vec::with_capacity(d.recipients.len());
        let mut seqs: Vec<i64> = Vec::with_capacity(d.recipients.len());
        for r in &d.recipients {
            if let Some(q) = queues.get_mut(r.as_bytes()).filter(|q| !q.closed) {
                q.head += 1;
                q.grown = true;
                clients.push(r.as_bytes());
                seqs.push(q.head);
            }
        }
        if !clients.is_empty() {
            exec(
                tx,
                "INSERT INTO queue_entries (client, seq, message_id) \
                 SELECT c, s, $3 FROM unnest($1::bytea[], $2::bigint[]) AS t(c, s)",
                &[&clients, &seqs, &message_id],
            )
            .await?;
        }
        if clients.is_empty() {
            written.released.push(message_id);
        }
        let recipients = u32::try_from(clients.len()).unwrap_or(u32::MAX);
        if let Some(key) = &d.receipt {
            insert_receipt(tx, key, message_id, recipients).await?;
        }
        written.value.deliveries.push(DeliveryOutcome {
            message_id: u64::try_from(message_id)
                .map_err(|_| StoreError::Corrupt(format!("message id {message_id} is negative")))?,
            recipients,
        });
    }
    let max_depth = big(max_depth);
    let (mut clients, mut heads, mut marks) = (Vec::new(), Vec::new(), Vec::new());
    for (client, q) in queues.iter_mut().filter(|(_, q)| q.grown) {
        if max_depth > 0 && q.head - q.acked > max_depth {
            let mark = q.head - max_depth;
            written.dropped += u64::try_from(mark - q.acked).unwrap_or(0);
            for row in query(
                tx,
                "DELETE FROM queue_entries WHERE client = $1 AND seq <= $2 \
                     RETURNING message_id",
                &[client, &mark],
            )
            .await?
            {
                written.released.push(row.try_get(0)?);
            }
            q.acked = mark;
        }
        clients.push(&client[..]);
        heads.push(q.head);
        marks.push(q.acked);
        if let Ok(id) = ClientId::new(client) {
            written.grown.push((id, u64::try_from(q.head).unwrap_or(0)));
        }
    }
    exec(
        tx,
        "UPDATE queues SET head = t.h, acked = t.a \
         FROM unnest($1::bytea[], $2::bigint[], $3::bigint[]) AS t(c, h, a) \
         WHERE queues.client = t.c",
        &[&clients, &heads, &marks],
    )
    .await?;
    announce(tx, &written.grown).await?;
    Ok(written)
}

/// `NOTIFY` every node's listeners of the queues that grew (delivered at
/// commit, not before): payloads of `hex(client):head` separated by commas.
pub(crate) async fn announce(tx: &Transaction<'_>, grown: &[(ClientId, u64)]) -> Result<(), Step> {
    let mut payload = String::new();
    for (client, head) in grown {
        if !payload.is_empty() {
            payload.push(',');
        }
        payload.push_str(&hex::encode(client.as_bytes()));
        payload.push(':');
        payload.push_str(&head.to_string());
        if payload.len() >= MAX_PAYLOAD {
            exec(tx, "SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await?;
            payload.clear();
        }
    }
    if !payload.is_empty() {
        exec(tx, "SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await?;
    }
    Ok(())
}

/// End `client`'s sessions: deleted from the table, and every node told
/// (`NOTIFY`, delivered at commit) to drop what it holds.
async fn announce_credentials(tx: &Transaction<'_>, client: &ClientId) -> Result<(), Step> {
    exec(
        tx,
        "DELETE FROM sessions WHERE client = $1",
        &[&client.as_bytes()],
    )
    .await?;
    exec(
        tx,
        "SELECT pg_notify($1, $2)",
        &[&CREDENTIALS, &hex::encode(client.as_bytes())],
    )
    .await?;
    Ok(())
}

/// Store a message once; its new id.
pub(crate) async fn insert_message(tx: &Transaction<'_>, m: &StoredMessage) -> Result<i64, Step> {
    Ok(query_one(
        tx,
        "INSERT INTO messages (kind, group_id, epoch, sender, message, stored_ms, \
         send_created_ms, send_nonce, ratchet_tree) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        &[
            &i16::from(m.kind),
            &m.group_id,
            &big(m.epoch),
            &m.sender,
            &m.message,
            &big(m.stored_ms),
            &m.send.map(|s| big(s.created_ms)),
            &m.send.map(|s| bits(s.nonce)),
            &m.ratchet_tree,
        ],
    )
    .await?
    .try_get(0)?)
}

/// Remember the answer a send got.
pub(crate) async fn insert_receipt(
    tx: &Transaction<'_>,
    key: &SendKey,
    message_id: i64,
    recipients: u32,
) -> Result<(), Step> {
    exec(
        tx,
        "INSERT INTO send_receipts (sender, created_ms, nonce, message_id, recipients) \
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &key.sender.as_bytes(),
            &big(key.id.created_ms),
            &bits(key.id.nonce),
            &message_id,
            &int(recipients),
        ],
    )
    .await?;
    Ok(())
}
