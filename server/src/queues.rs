//! Per-client queues: gap-free sequence numbers, fan-out of one stored
//! message to many queues, fetch pages with long-poll, acknowledgements, and
//! deletion of message bodies once every recipient has acknowledged them.
//!
//! All enqueues and acks run under one lock that assigns sequence numbers and
//! applies the write, so sequence numbers reach sled in order. An entry only
//! becomes visible to fetches after the flush covering it completed
//! ([`Queues::publish`]), so a client never sees (or acknowledges) a message
//! the DS could still lose. In-memory state (next sequence numbers, reference
//! counts) is derived from disk at startup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mls_ds_protocol::queue::{EntryKind, QueueEntry, QueuePage};
use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::decode_record;
use mls_ds_storage::Transaction;
use tokio::sync::Notify;

use crate::db::{self, Db, StoredMessage};
use crate::error::{Result, ServerError};

const DELIVERY: &str = "app.ds.delivery";

struct ClientQueue {
    /// Next sequence number to assign.
    next_seq: u64,
    /// Highest sequence number known durable (visible to fetch).
    visible: u64,
    /// Highest acknowledged sequence number.
    acked: u64,
    notify: Arc<Notify>,
}

#[derive(Default)]
struct State {
    clients: HashMap<ClientId, ClientQueue>,
    next_message_id: u64,
    /// Unacknowledged references per stored message.
    refs: HashMap<u64, u32>,
}

/// A message to fan out.
pub struct Outgoing {
    /// The message, stored once.
    pub message: StoredMessage,
    /// Who gets a queue entry.
    pub recipients: Vec<ClientId>,
}

/// What a committed enqueue produced; pass it to [`Queues::publish`] once durable.
#[derive(Debug, Default)]
pub struct Ticket {
    entries: Vec<(ClientId, u64)>,
    /// Ids of the stored messages, in input order.
    pub message_ids: Vec<u64>,
}

impl Ticket {
    /// Number of queue entries written.
    pub fn recipients(&self) -> usize {
        self.entries.len()
    }
}

/// The queue service.
pub struct Queues {
    db: Db,
    state: Mutex<State>,
}

impl Queues {
    /// Rebuild in-memory state from disk: the next message id and the
    /// reference count of every stored message. Bodies nobody references any
    /// more (left by a crash between ack and cleanup) are deleted.
    pub fn open(db: Db) -> Result<Queues> {
        let s = &db.storage;
        let next_message_id = match s.last_raw(db.delivery, b"m")? {
            Some((k, _)) => db::be_u64(DELIVERY, &k[1..])? + 1,
            None => 1,
        };
        let mut refs: HashMap<u64, u32> = HashMap::new();
        for (_, v) in s.scan_raw(db.delivery, b"q")? {
            *refs.entry(db::be_u64(DELIVERY, &v)?).or_default() += 1;
        }
        let orphans: Vec<Vec<u8>> = s
            .scan_raw(db.delivery, b"m")?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| {
                db::be_u64(DELIVERY, &k[1..])
                    .map(|id| !refs.contains_key(&id))
                    .unwrap_or(false)
            })
            .collect();
        if !orphans.is_empty() {
            let tx = s.begin();
            for k in &orphans {
                tx.remove_raw(db.delivery, k)?;
            }
            tx.commit()?;
            db.store.flush()?;
            tracing::info!(count = orphans.len(), "deleted unreferenced message bodies");
        }
        Ok(Queues {
            db,
            state: Mutex::new(State {
                clients: HashMap::new(),
                next_message_id,
                refs,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn client<'a>(&self, state: &'a mut State, id: &ClientId) -> Result<&'a mut ClientQueue> {
        if !state.clients.contains_key(id) {
            let s = &self.db.storage;
            let acked = match s.get_raw(self.db.delivery, &db::ack_key(id))? {
                Some(v) => db::be_u64(DELIVERY, &v)?,
                None => 0,
            };
            let last = match s.last_raw(self.db.delivery, &db::queue_prefix(id))? {
                Some((k, _)) => db::key_seq(DELIVERY, &k)?,
                None => 0,
            };
            let head = last.max(acked);
            state.clients.insert(
                id.clone(),
                ClientQueue {
                    next_seq: head + 1,
                    visible: head,
                    acked,
                    notify: Arc::new(Notify::new()),
                },
            );
        }
        state
            .clients
            .get_mut(id)
            .ok_or_else(|| ServerError::Internal("queue state vanished".into()))
    }

    /// Add `outgoing` to `tx` (assigning ids and sequence numbers) and commit
    /// it. Nothing is visible until [`Queues::publish`] after the flush.
    pub fn commit(&self, tx: Transaction, outgoing: Vec<Outgoing>) -> Result<Ticket> {
        let mut state = self.lock();
        let saved_next_id = state.next_message_id;
        let mut ticket = Ticket::default();
        let staged = self.stage(&mut state, &tx, outgoing, &mut ticket);
        let result = staged.and_then(|()| tx.commit().map_err(ServerError::from));
        if let Err(e) = result {
            // Undo the in-memory allocation so sequence numbers stay gap-free.
            state.next_message_id = saved_next_id;
            for (client, _) in &ticket.entries {
                if let Some(cq) = state.clients.get_mut(client) {
                    cq.next_seq -= 1;
                }
            }
            for id in &ticket.message_ids {
                state.refs.remove(id);
            }
            return Err(e);
        }
        Ok(ticket)
    }

    fn stage(
        &self,
        state: &mut State,
        tx: &Transaction,
        outgoing: Vec<Outgoing>,
        ticket: &mut Ticket,
    ) -> Result<()> {
        for out in outgoing {
            let id = state.next_message_id;
            state.next_message_id += 1;
            ticket.message_ids.push(id);
            let count = u32::try_from(out.recipients.len())
                .map_err(|_| ServerError::Internal("too many recipients".into()))?;
            if count == 0 {
                continue;
            }
            state.refs.insert(id, count);
            tx.put_record(self.db.delivery, &db::message_key(id), &out.message)?;
            for r in out.recipients {
                let cq = self.client(state, &r)?;
                let seq = cq.next_seq;
                cq.next_seq += 1;
                tx.put_raw(self.db.delivery, &db::queue_key(&r, seq), &id.to_be_bytes())?;
                ticket.entries.push((r, seq));
            }
        }
        Ok(())
    }

    /// Make a committed, now durable, enqueue visible and wake long-polls.
    pub fn publish(&self, ticket: &Ticket) {
        let mut state = self.lock();
        for (client, seq) in &ticket.entries {
            if let Some(cq) = state.clients.get_mut(client) {
                cq.visible = cq.visible.max(*seq);
                cq.notify.notify_waiters();
            }
        }
    }

    /// A page of `client`'s queue after `after`; waits up to `wait` for the
    /// first entry if none is available.
    pub async fn fetch(
        &self,
        client: &ClientId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<QueuePage> {
        let deadline = Instant::now() + wait;
        loop {
            let notify = {
                let mut state = self.lock();
                self.client(&mut state, client)?.notify.clone()
            };
            // Register for wake-ups before reading, so a publish in between
            // is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (visible, acked) = {
                let mut state = self.lock();
                let cq = self.client(&mut state, client)?;
                (cq.visible, cq.acked)
            };
            let page = self.read_page(client, after.max(acked), visible, limit, max_bytes)?;
            let now = Instant::now();
            if !page.is_empty() || now >= deadline {
                return Ok(QueuePage {
                    entries: page,
                    head: visible,
                    acked,
                });
            }
            let _ = tokio::time::timeout(deadline - now, notified).await;
        }
    }

    fn read_page(
        &self,
        client: &ClientId,
        after: u64,
        visible: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<QueueEntry>> {
        if after >= visible || limit == 0 {
            return Ok(Vec::new());
        }
        let s = &self.db.storage;
        let rows = s.range_raw(
            self.db.delivery,
            &db::queue_key(client, after + 1),
            &db::queue_key(client, visible),
            limit,
        )?;
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for (k, v) in rows {
            let seq = db::key_seq(DELIVERY, &k)?;
            let id = db::be_u64(DELIVERY, &v)?;
            let mk = db::message_key(id);
            let raw = s.get_raw(self.db.delivery, &mk)?.ok_or_else(|| {
                ServerError::Internal(format!("queue entry {seq} points to missing message {id}"))
            })?;
            let m: StoredMessage = decode_record(DELIVERY, &mk, &raw)?;
            bytes += m.message.len() + 64;
            out.push(QueueEntry {
                seq,
                kind: entry_kind(m.kind)?,
                group_id: m.group_id.into(),
                epoch: m.epoch,
                sender: m.sender.into(),
                message: m.message.into(),
            });
            // Always return at least one entry, so any queue drains.
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Acknowledge (delete) every entry with `seq <= up_to`; message bodies
    /// whose last reference goes are deleted in the same write. Returns the
    /// new ack mark and the entries left; the caller awaits durability.
    pub fn ack(&self, client: &ClientId, up_to: u64) -> Result<(u64, u64)> {
        let mut state = self.lock();
        let cq = self.client(&mut state, client)?;
        if up_to > cq.visible {
            return Err(ServerError::BadRequest(format!(
                "cannot acknowledge {up_to}: the queue's head is {}",
                cq.visible
            )));
        }
        let (acked, head) = (cq.acked, cq.visible);
        if up_to <= acked {
            return Ok((acked, head - acked));
        }
        let s = &self.db.storage;
        let rows = s.range_raw(
            self.db.delivery,
            &db::queue_key(client, acked + 1),
            &db::queue_key(client, up_to),
            usize::MAX,
        )?;
        let tx = s.begin();
        let mut freed = Vec::new();
        let mut decrements: HashMap<u64, u32> = HashMap::new();
        for (k, v) in &rows {
            tx.remove_raw(self.db.delivery, k)?;
            *decrements.entry(db::be_u64(DELIVERY, v)?).or_default() += 1;
        }
        for (id, n) in &decrements {
            if state.refs.get(id).copied().unwrap_or(0) <= *n {
                tx.remove_raw(self.db.delivery, &db::message_key(*id))?;
                freed.push(*id);
            }
        }
        tx.put_raw(self.db.delivery, &db::ack_key(client), &up_to.to_be_bytes())?;
        tx.commit()?;
        for (id, n) in decrements {
            if let Some(r) = state.refs.get_mut(&id) {
                *r = r.saturating_sub(n);
            }
        }
        for id in freed {
            state.refs.remove(&id);
        }
        let cq = self.client(&mut state, client)?;
        cq.acked = up_to;
        Ok((up_to, head - up_to))
    }

    /// Drop messages stored before `cutoff_ms` that some recipient still has
    /// not acknowledged (the retention bound for offline clients): their queue
    /// entries and bodies are deleted and each affected client's ack mark moves
    /// past them, so its next page starts after the gap (`acked` tells it how
    /// far). Returns the number of queue entries dropped; the caller flushes.
    pub fn expire(&self, cutoff_ms: u64) -> Result<usize> {
        let mut state = self.lock();
        let s = &self.db.storage;
        let mut expired = std::collections::HashSet::new();
        // Message ids grow with time, so the scan stops at the first young one.
        for (k, v) in s.scan_raw(self.db.delivery, b"m")? {
            let m: StoredMessage = decode_record(DELIVERY, &k, &v)?;
            if m.stored_ms >= cutoff_ms {
                break;
            }
            expired.insert(db::be_u64(DELIVERY, &k[1..])?);
        }
        if expired.is_empty() {
            return Ok(0);
        }
        let tx = s.begin();
        let mut marks: HashMap<ClientId, u64> = HashMap::new();
        let mut dropped = 0;
        for (k, v) in s.scan_raw(self.db.delivery, b"q")? {
            if !expired.contains(&db::be_u64(DELIVERY, &v)?) {
                continue;
            }
            // Key: 'q' ++ [len] ++ client ++ seq u64.
            let len = usize::from(*k.get(1).unwrap_or(&0));
            let client = ClientId::new(k.get(2..2 + len).unwrap_or_default())?;
            let seq = db::key_seq(DELIVERY, &k)?;
            let mark = marks.entry(client).or_default();
            *mark = (*mark).max(seq);
            tx.remove_raw(self.db.delivery, &k)?;
            dropped += 1;
        }
        for id in &expired {
            tx.remove_raw(self.db.delivery, &db::message_key(*id))?;
        }
        let mut new_marks = Vec::new();
        for (client, seq) in marks {
            let cq = self.client(&mut state, &client)?;
            let mark = cq.acked.max(seq);
            tx.put_raw(self.db.delivery, &db::ack_key(&client), &mark.to_be_bytes())?;
            new_marks.push((client, mark));
        }
        tx.commit()?;
        for id in &expired {
            state.refs.remove(id);
        }
        for (client, mark) in new_marks {
            if let Some(cq) = state.clients.get_mut(&client) {
                cq.acked = mark;
            }
        }
        Ok(dropped)
    }

    /// Delete a client's whole queue (when the client is deleted), inside `tx`.
    pub fn stage_delete_client(&self, tx: &Transaction, client: &ClientId) -> Result<()> {
        let s = &self.db.storage;
        for (k, _) in s.scan_raw(self.db.delivery, &db::queue_prefix(client))? {
            tx.remove_raw(self.db.delivery, &k)?;
        }
        tx.remove_raw(self.db.delivery, &db::ack_key(client))?;
        Ok(())
    }

    /// Forget in-memory state of a deleted client (after its deletion committed).
    /// Message bodies it referenced are reclaimed at the next start.
    pub fn forget_client(&self, client: &ClientId) {
        self.lock().clients.remove(client);
    }

    /// Depth (unacknowledged entries) of every client queue loaded in memory.
    pub fn depths(&self) -> Vec<(ClientId, u64)> {
        self.lock()
            .clients
            .iter()
            .map(|(c, q)| (c.clone(), q.visible.saturating_sub(q.acked)))
            .collect()
    }

    /// Number of stored message bodies still referenced.
    pub fn stored_messages(&self) -> usize {
        self.lock().refs.len()
    }
}

fn entry_kind(code: u8) -> Result<EntryKind> {
    match code {
        1 => Ok(EntryKind::Message),
        2 => Ok(EntryKind::Commit),
        3 => Ok(EntryKind::Welcome),
        other => Err(ServerError::Internal(format!(
            "stored message has unknown kind {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mls_ds_storage::{Durability, Store, StoreConfig};

    fn queues() -> Queues {
        let store = Store::temporary(StoreConfig {
            durability: Durability::Batched,
            ..StoreConfig::default()
        })
        .unwrap();
        Queues::open(Db::new(store).unwrap()).unwrap()
    }

    fn message(stored_ms: u64) -> StoredMessage {
        StoredMessage {
            kind: EntryKind::Message as u8,
            group_id: b"g".to_vec(),
            epoch: 0,
            sender: b"s".to_vec(),
            message: vec![1, 2, 3],
            stored_ms,
        }
    }

    fn send(q: &Queues, stored_ms: u64, to: &[&ClientId]) {
        let tx = q.db.storage.begin();
        let t = q
            .commit(
                tx,
                vec![Outgoing {
                    message: message(stored_ms),
                    recipients: to.iter().map(|c| (*c).clone()).collect(),
                }],
            )
            .unwrap();
        q.publish(&t);
    }

    #[tokio::test]
    async fn fan_out_ack_and_body_deletion() {
        let q = queues();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        for _ in 0..3 {
            send(&q, 1, &[&a, &b]);
        }
        assert_eq!(q.stored_messages(), 3);
        let page = q.fetch(&a, 0, 10, 1 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(
            page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        // Pages are bounded by count, and any queue drains page by page.
        let page = q.fetch(&a, 1, 1, 1 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(page.entries.len(), 1);
        assert_eq!(page.entries[0].seq, 2);
        assert!(q.ack(&a, 9).is_err(), "cannot ack past the head");
        q.ack(&a, 3).unwrap();
        assert_eq!(q.stored_messages(), 3, "b still needs them");
        q.ack(&b, 2).unwrap();
        assert_eq!(q.stored_messages(), 1);
        q.ack(&b, 3).unwrap();
        assert_eq!(q.stored_messages(), 0);
        // Sequence numbers continue after everything was acknowledged.
        send(&q, 1, &[&a]);
        let page = q.fetch(&a, 3, 10, 1 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(page.entries[0].seq, 4);
    }

    #[tokio::test]
    async fn retention_drops_old_entries_and_moves_the_ack_mark() {
        let q = queues();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        send(&q, 100, &[&a, &b]);
        send(&q, 200, &[&a]);
        send(&q, 5_000, &[&a, &b]);
        q.ack(&b, 1).unwrap();
        assert_eq!(q.expire(1_000).unwrap(), 2, "a's two old entries");
        let page = q.fetch(&a, 0, 10, 1 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(page.acked, 2);
        assert_eq!(
            page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(q.stored_messages(), 1);
        let page = q.fetch(&b, 1, 10, 1 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(
            page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(q.expire(1_000).unwrap(), 0, "nothing left to expire");
    }

    #[tokio::test]
    async fn long_poll_wakes_on_publish() {
        let q = std::sync::Arc::new(queues());
        let a = ClientId::new("a").unwrap();
        let waiter = {
            let (q, a) = (q.clone(), a.clone());
            tokio::spawn(async move { q.fetch(&a, 0, 10, 1 << 20, Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&q, 1, &[&a]);
        let page = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken before its 10 s wait")
            .unwrap()
            .unwrap();
        assert_eq!(page.entries.len(), 1);
    }
}
