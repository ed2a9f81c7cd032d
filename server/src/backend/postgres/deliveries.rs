//! A write set's deliveries on PostgreSQL: each message stored once, its
//! recipients' queue rows locked in client order and their heads moved
//! (sequence numbers in commit order, gap-free), full queues trimmed, the
//! send remembered, and the queues that grew announced to every node.

use std::collections::HashMap;

use deadpool_postgres::Transaction;
use futures_util::future::try_join_all;
use mls_ds_protocol::ClientId;

use super::rows::{big, bits, int};
use super::writes::{exec, query, query_one, Step, Written, CHANNEL, MAX_PAYLOAD};
use crate::backend::records::{SendKey, StoredMessage};
use crate::backend::write_set::{Applied, Delivery, DeliveryOutcome};
use crate::backend::StoreError;

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
///
/// Statements that do not need each other's results are sent together
/// (tokio-postgres pipelines what is awaited at once; the database still
/// runs them one after the other, in the order sent), so a delivery costs
/// three round trips however many messages and recipients it has: the
/// queue rows and the messages; the entries and the send receipts; the
/// trims of full queues, the new heads and the `NOTIFY` (unless the caller
/// sends one `NOTIFY` for several write sets).
pub(crate) async fn deliver(
    tx: &Transaction<'_>,
    deliveries: &[Delivery],
    max_depth: u64,
    when: Announce,
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
    let locked = async {
        Ok::<_, Step>(
            query(
                tx,
                "SELECT client, head, acked, closed FROM queues WHERE client = ANY($1) \
                     ORDER BY client FOR UPDATE",
                &[&ids],
            )
            .await?,
        )
    };
    let stored = try_join_all(deliveries.iter().map(|d| insert_message(tx, &d.message)));
    let (rows, message_ids) = tokio::try_join!(locked, stored)?;
    let mut queues: HashMap<Vec<u8>, QueueRow> = HashMap::with_capacity(rows.len());
    for row in rows {
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
    let mut entries: Vec<Entries> = Vec::with_capacity(deliveries.len());
    let mut receipts: Vec<(&SendKey, i64, u32)> = Vec::new();
    for (d, &message_id) in deliveries.iter().zip(&message_ids) {
        let mut to = Entries {
            clients: Vec::with_capacity(d.recipients.len()),
            seqs: Vec::with_capacity(d.recipients.len()),
            message_id,
        };
        for r in &d.recipients {
            if let Some(q) = queues.get_mut(r.as_bytes()).filter(|q| !q.closed) {
                q.head += 1;
                q.grown = true;
                to.clients.push(r.as_bytes());
                to.seqs.push(q.head);
            }
        }
        let recipients = u32::try_from(to.clients.len()).unwrap_or(u32::MAX);
        if to.clients.is_empty() {
            written.released.push(message_id);
        } else {
            entries.push(to);
        }
        if let Some(key) = &d.receipt {
            receipts.push((key, message_id, recipients));
        }
        written.value.deliveries.push(DeliveryOutcome {
            message_id: u64::try_from(message_id)
                .map_err(|_| StoreError::Corrupt(format!("message id {message_id} is negative")))?,
            recipients,
        });
    }
    let queued = try_join_all(entries.iter().map(|to| async move {
        exec(
            tx,
            "INSERT INTO queue_entries (client, seq, message_id) \
             SELECT c, s, $3 FROM unnest($1::bytea[], $2::bigint[]) AS t(c, s)",
            &[&to.clients, &to.seqs, &to.message_id],
        )
        .await
        .map_err(Step::from)
    }));
    let remembered = try_join_all(
        receipts
            .iter()
            .map(|(key, message_id, n)| insert_receipt(tx, key, *message_id, *n)),
    );
    tokio::try_join!(queued, remembered)?;

    let max_depth = big(max_depth);
    let (mut clients, mut heads, mut marks) = (Vec::new(), Vec::new(), Vec::new());
    let mut trims: Vec<(&[u8], i64)> = Vec::new();
    for (client, q) in queues.iter_mut().filter(|(_, q)| q.grown) {
        if max_depth > 0 && q.head - q.acked > max_depth {
            let mark = q.head - max_depth;
            written.dropped += u64::try_from(mark - q.acked).unwrap_or(0);
            trims.push((client, mark));
            q.acked = mark;
        }
        clients.push(&client[..]);
        heads.push(q.head);
        marks.push(q.acked);
        if let Ok(id) = ClientId::new(client) {
            written.grown.push((id, u64::try_from(q.head).unwrap_or(0)));
        }
    }
    let trimmed = try_join_all(trims.iter().map(|(client, mark)| async move {
        query(
            tx,
            "DELETE FROM queue_entries WHERE client = $1 AND seq <= $2 RETURNING message_id",
            &[client, mark],
        )
        .await
        .map_err(Step::from)
    }));
    let moved = async {
        exec(
            tx,
            "UPDATE queues SET head = t.h, acked = t.a \
             FROM unnest($1::bytea[], $2::bigint[], $3::bigint[]) AS t(c, h, a) \
             WHERE queues.client = t.c",
            &[&clients, &heads, &marks],
        )
        .await
        .map_err(Step::from)
    };
    let announced = async {
        match when {
            Announce::Now => announce(tx, &written.grown).await,
            Announce::ByCaller => Ok(()),
        }
    };
    let (trimmed, _, ()) = tokio::try_join!(trimmed, moved, announced)?;
    for row in trimmed.iter().flatten() {
        written.released.push(row.try_get(0)?);
    }
    Ok(written)
}

/// When the queues a delivery grew are announced.
#[derive(Clone, Copy)]
pub(crate) enum Announce {
    /// With the delivery's last statements.
    Now,
    /// By the caller, once for a transaction of several write sets.
    ByCaller,
}

/// One message's queue entries.
struct Entries<'a> {
    clients: Vec<&'a [u8]>,
    seqs: Vec<i64>,
    message_id: i64,
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
