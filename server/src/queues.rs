//! Per-client queues: gap-free sequence numbers, fan-out of one stored
//! message to many queues, fetch pages with long-poll, acknowledgements,
//! retention, and deletion of message bodies once every recipient has
//! acknowledged them.
//!
//! A message for G recipients is written once, whatever G: its body
//! (`'m' ++ id`) and one fan-out record (`'r' ++ id`) naming each recipient
//! and the sequence number the message got in that recipient's queue. Which
//! message sits at which sequence number of a queue is an in-memory index,
//! rebuilt from the fan-out records (and the stored acknowledgement marks,
//! `'a' ++ client`) at startup, so a send costs two keys and a fetch reads no
//! index from disk. Bodies of unacknowledged messages are also kept in a
//! bounded in-memory cache.
//!
//! Enqueues, acks, expiry and queue deletion run under one lock that assigns
//! sequence numbers and hands the writes to the flusher in that order, so
//! they reach sled in sequence order and a crash keeps a gap-free prefix. An
//! entry becomes visible to fetches only after the flush covering it
//! completed ([`Queues::publish`], run by the flusher thread), so a client
//! never sees (or acknowledges) a message the DS could still lose.
//!
//! The writes of a plain fan-out, an ack and an expiry are applied key by
//! key, without a sled batch (which costs two log writes): sled recovers a
//! prefix of its log, and every key-order prefix of these writes is a state
//! [`load_index`] accepts. Bodies (`'m'`) sort before fan-out records
//! (`'r'`), so a crash can leave at most the newest body without its record
//! (an unacknowledged send), and ack marks (`'a'`) sort before the removals
//! they allow, so a crash can leave fully acknowledged messages behind;
//! startup deletes both. A fan-out that joins other writes (a commit with
//! its group state) stays one atomic write.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mls_ds_protocol::queue::{EntryKind, QueueEntry, QueuePage};
use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::decode_record;
use mls_ds_storage::Transaction;
use tokio::sync::Notify;

use crate::db::{self, Db, Fanout, StoredMessage};
use crate::error::{Result, ServerError};
use crate::flusher::{Durable, Flusher};

const DELIVERY: &str = "app.ds.delivery";
/// Bytes of message bodies kept in memory for fetches; beyond it bodies are
/// read from sled.
const BODY_CACHE_BYTES: usize = 32 * 1024 * 1024;

struct ClientQueue {
    /// Highest acknowledged sequence number.
    acked: u64,
    /// Highest sequence number known durable (visible to fetch).
    visible: u64,
    /// Message ids at sequence numbers `acked + 1 ..= acked + ids.len()`,
    /// including entries not yet visible.
    ids: VecDeque<u64>,
    notify: Arc<Notify>,
}

impl ClientQueue {
    fn new(acked: u64) -> ClientQueue {
        ClientQueue {
            acked,
            visible: acked,
            ids: VecDeque::new(),
            notify: Arc::new(Notify::new()),
        }
    }

    fn next_seq(&self) -> u64 {
        self.acked + self.ids.len() as u64 + 1
    }

    /// Acknowledge up to `up_to`, returning the ids that leave the queue.
    fn advance(&mut self, up_to: u64) -> Vec<u64> {
        let n = usize::try_from(up_to.saturating_sub(self.acked))
            .unwrap_or(usize::MAX)
            .min(self.ids.len());
        self.acked = self.acked.max(up_to);
        self.ids.drain(..n).collect()
    }
}

/// What the index keeps per stored message.
struct MessageMeta {
    /// Unacknowledged queue entries referencing it.
    refs: u32,
    /// Acceptance time (unix ms), for retention.
    stored_ms: u64,
}

struct State {
    clients: HashMap<ClientId, ClientQueue>,
    next_message_id: u64,
    /// Every stored message still referenced, by id (ids grow with time).
    messages: BTreeMap<u64, MessageMeta>,
    cache: HashMap<u64, Arc<StoredMessage>>,
    cache_bytes: usize,
}

impl State {
    fn client(&mut self, id: &ClientId) -> &mut ClientQueue {
        self.clients
            .entry(id.clone())
            .or_insert_with(|| ClientQueue::new(0))
    }

    /// Drop one reference from each of `ids`; returns those left unreferenced
    /// (their body and fan-out record are to be deleted).
    fn release(&mut self, ids: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut freed = Vec::new();
        for id in ids {
            if let Some(meta) = self.messages.get_mut(&id) {
                meta.refs = meta.refs.saturating_sub(1);
                if meta.refs == 0 {
                    self.messages.remove(&id);
                    if let Some(m) = self.cache.remove(&id) {
                        self.cache_bytes -= cached_size(&m);
                    }
                    freed.push(id);
                }
            }
        }
        freed
    }
}

fn cached_size(m: &StoredMessage) -> usize {
    m.message.len() + m.group_id.len() + m.sender.len() + 64
}

/// A message to fan out.
pub struct Outgoing {
    /// The message, stored once.
    pub message: StoredMessage,
    /// Who gets a queue entry.
    pub recipients: Vec<ClientId>,
}

/// The queue service.
pub struct Queues {
    db: Db,
    flusher: Flusher,
    state: Mutex<State>,
    /// Set when the server lets go of this storage (see `recovery`).
    closed: std::sync::atomic::AtomicBool,
}

/// The queue index as rebuilt from disk.
struct Index {
    clients: HashMap<ClientId, ClientQueue>,
    messages: BTreeMap<u64, MessageMeta>,
    next_message_id: u64,
    /// Messages nobody will fetch: fan-out records whose every entry is
    /// acknowledged (a crash between an ack and its removals) and the newest
    /// body if it has no fan-out record (a crash between the two writes of
    /// an unacknowledged send). Safe to delete.
    orphans: Vec<u64>,
}

/// Rebuild the index from the fan-out records and ack marks. Fails on a
/// queue with a gap or on data in a layout this build does not know.
fn load_index(db: &Db) -> Result<Index> {
    let s = &db.storage;
    if s.last_raw(db.delivery, b"q")?.is_some() {
        return Err(ServerError::Internal(
            "the delivery tree holds per-entry queue keys of an earlier development build; \
             this build cannot read them (start with an empty data directory)"
                .into(),
        ));
    }
    let mut clients: HashMap<ClientId, ClientQueue> = HashMap::new();
    for (k, v) in s.scan_raw(db.delivery, b"a")? {
        let client = ClientId::new(k.get(2..).unwrap_or_default())?;
        clients.insert(client, ClientQueue::new(db::be_u64(DELIVERY, &v)?));
    }
    let mut messages = BTreeMap::new();
    let mut orphans = Vec::new();
    let newest_body = match s.last_raw(db.delivery, b"m")? {
        Some((k, _)) => Some(db::key_seq(DELIVERY, &k)?),
        None => None,
    };
    let mut next_message_id = newest_body.map_or(1, |id| id + 1);
    for (k, v) in s.scan_raw(db.delivery, b"r")? {
        let id = db::key_seq(DELIVERY, &k)?;
        next_message_id = next_message_id.max(id + 1);
        let fanout: Fanout = decode_record(DELIVERY, &k, &v)?;
        let mut refs = 0u32;
        for (client, seq) in fanout.entries {
            let client = ClientId::new(client)?;
            let cq = clients
                .entry(client.clone())
                .or_insert_with(|| ClientQueue::new(0));
            if seq <= cq.acked {
                continue;
            }
            if seq != cq.next_seq() {
                return Err(ServerError::Internal(format!(
                    "queue of {client} has a gap: message {id} is at sequence number {seq}, expected {}",
                    cq.next_seq()
                )));
            }
            cq.ids.push_back(id);
            refs += 1;
        }
        if refs == 0 {
            orphans.push(id);
        } else {
            messages.insert(
                id,
                MessageMeta {
                    refs,
                    stored_ms: fanout.stored_ms,
                },
            );
        }
    }
    if let Some(id) = newest_body {
        if s.get_raw(db.delivery, &db::fanout_key(id))?.is_none() {
            orphans.push(id);
        }
    }
    for cq in clients.values_mut() {
        cq.visible = cq.next_seq() - 1;
    }
    Ok(Index {
        clients,
        messages,
        next_message_id,
        orphans,
    })
}

/// Unacknowledged queue entries and stored message bodies (for `stats`; no
/// integrity checks, see [`verify`]).
pub fn counts(db: &Db) -> Result<(u64, usize)> {
    let index = load_index(db)?;
    let entries = index.clients.values().map(|c| c.ids.len() as u64).sum();
    Ok((entries, index.messages.len() + index.orphans.len()))
}

/// What [`verify`] found in the delivery tree.
pub struct QueueReport {
    /// Unacknowledged queue entries.
    pub entries: u64,
    /// Stored message bodies.
    pub messages: usize,
    /// Everything wrong.
    pub problems: Vec<String>,
}

/// Integrity check of the delivery tree (for `mls-ds check`): every queue is
/// gap-free, every referenced body is stored and decodes, and every body has
/// its fan-out record (but the one a crash may leave, which the next start
/// deletes, see [`Index::orphans`]).
pub fn verify(db: &Db) -> Result<QueueReport> {
    let s = &db.storage;
    let mut problems = Vec::new();
    let mut entries = 0;
    let mut orphans = HashSet::new();
    match load_index(db) {
        Err(e) => problems.push(e.to_string()),
        Ok(index) => {
            orphans = index.orphans.into_iter().collect();
            entries = index.clients.values().map(|c| c.ids.len() as u64).sum();
            for id in index.messages.keys() {
                let mk = db::message_key(*id);
                match s.get_raw(db.delivery, &mk)? {
                    None => problems.push(format!("queued message {id} has no stored body")),
                    Some(raw) => {
                        if let Err(e) = decode_record::<StoredMessage>(DELIVERY, &mk, &raw) {
                            problems.push(format!("message {id}: {e}"));
                        }
                    }
                }
            }
        }
    }
    let bodies = s.scan_raw(db.delivery, b"m")?;
    for (k, _) in &bodies {
        let id = db::key_seq(DELIVERY, k)?;
        if !orphans.contains(&id) && s.get_raw(db.delivery, &db::fanout_key(id))?.is_none() {
            problems.push(format!("message {id} has no fan-out record"));
        }
    }
    Ok(QueueReport {
        entries,
        messages: bodies.len(),
        problems,
    })
}

impl Queues {
    /// Rebuild the queue index from disk. Bodies nobody references any more
    /// are deleted.
    pub fn open(db: Db, flusher: Flusher) -> Result<Queues> {
        let index = load_index(&db)?;
        if !index.orphans.is_empty() {
            let tx = db.storage.begin();
            for id in &index.orphans {
                tx.remove_raw(db.delivery, &db::message_key(*id))?;
                tx.remove_raw(db.delivery, &db::fanout_key(*id))?;
            }
            tx.commit()?;
            db.store.flush()?;
            tracing::info!(
                count = index.orphans.len(),
                "deleted unreferenced message bodies"
            );
        }
        Ok(Queues {
            db,
            flusher,
            state: Mutex::new(State {
                clients: index.clients,
                next_message_id: index.next_message_id,
                messages: index.messages,
                cache: HashMap::new(),
                cache_bytes: 0,
            }),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// End every long-poll (they answer 503) and refuse new ones: the
    /// storage behind this queue service is being closed.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        for cq in self.lock().clients.values() {
            cq.notify.notify_waiters();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add `outgoing` to `tx` (assigning ids and sequence numbers) and hand
    /// the whole transaction to the flusher. Returns the ids of the stored
    /// messages (in input order) and a handle that resolves once everything
    /// is durable; the entries are visible to fetches from then on.
    pub fn enqueue(
        self: &Arc<Self>,
        tx: Transaction,
        outgoing: Vec<Outgoing>,
    ) -> Result<(Vec<u64>, Durable)> {
        let mut state = self.lock();
        let mut message_ids = Vec::with_capacity(outgoing.len());
        let mut published: Vec<(ClientId, u64)> = Vec::new();
        let saved_next_id = state.next_message_id;
        let staged = self.stage(&mut state, &tx, outgoing, &mut message_ids, &mut published);
        let submitted = staged.and_then(|queue_keys| {
            let queues = self.clone();
            let after = Box::new(move || queues.publish(&published));
            let pending = tx.into_pending()?;
            // Nothing but this fan-out: key by key is safe (module doc).
            let writes = if pending.len() == queue_keys {
                pending.into_single_writes()
            } else {
                vec![pending]
            };
            self.flusher.submit(writes, Some(after))
        });
        match submitted {
            Ok(durable) => Ok((message_ids, durable)),
            Err(e) => {
                // Undo the allocation so that sequence numbers stay gap-free.
                state.next_message_id = saved_next_id;
                for id in &message_ids {
                    state.messages.remove(id);
                    if let Some(m) = state.cache.remove(id) {
                        state.cache_bytes -= cached_size(&m);
                    }
                }
                for cq in state.clients.values_mut() {
                    while cq.ids.back().is_some_and(|id| *id >= saved_next_id) {
                        cq.ids.pop_back();
                    }
                }
                Err(e)
            }
        }
    }

    fn stage(
        &self,
        state: &mut State,
        tx: &Transaction,
        outgoing: Vec<Outgoing>,
        message_ids: &mut Vec<u64>,
        published: &mut Vec<(ClientId, u64)>,
    ) -> Result<usize> {
        let mut keys = 0;
        for out in outgoing {
            let id = state.next_message_id;
            state.next_message_id += 1;
            message_ids.push(id);
            let refs = u32::try_from(out.recipients.len())
                .map_err(|_| ServerError::Internal("too many recipients".into()))?;
            if refs == 0 {
                continue;
            }
            let mut entries = Vec::with_capacity(out.recipients.len());
            for r in out.recipients {
                let cq = state.client(&r);
                let seq = cq.next_seq();
                cq.ids.push_back(id);
                entries.push((r.as_bytes().to_vec(), seq));
                published.push((r, seq));
            }
            let stored_ms = out.message.stored_ms;
            tx.put_record(self.db.delivery, &db::message_key(id), &out.message)?;
            tx.put_record(
                self.db.delivery,
                &db::fanout_key(id),
                &Fanout { stored_ms, entries },
            )?;
            keys += 2;
            state.messages.insert(id, MessageMeta { refs, stored_ms });
            let size = cached_size(&out.message);
            if state.cache_bytes + size <= BODY_CACHE_BYTES {
                state.cache_bytes += size;
                state.cache.insert(id, Arc::new(out.message));
            }
        }
        Ok(keys)
    }

    /// Make durable entries visible and wake long-polls.
    fn publish(&self, entries: &[(ClientId, u64)]) {
        let mut state = self.lock();
        for (client, seq) in entries {
            if let Some(cq) = state.clients.get_mut(client) {
                if *seq > cq.visible {
                    cq.visible = *seq;
                    cq.notify.notify_waiters();
                }
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
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(ServerError::Unavailable(crate::recovery::REOPENING.into()));
            }
            let notify = self.lock().client(client).notify.clone();
            // Register for wake-ups before reading, so a publish in between
            // is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (rows, visible, acked) = {
                let mut state = self.lock();
                let State { clients, cache, .. } = &mut *state;
                let cq = clients
                    .entry(client.clone())
                    .or_insert_with(|| ClientQueue::new(0));
                let start = after.max(cq.acked);
                let end = cq.visible.min(start.saturating_add(limit as u64));
                let mut rows = Vec::new();
                for seq in start + 1..=end {
                    let Some(id) = usize::try_from(seq - cq.acked - 1)
                        .ok()
                        .and_then(|i| cq.ids.get(i))
                    else {
                        break;
                    };
                    rows.push((seq, *id, cache.get(id).cloned()));
                }
                (rows, cq.visible, cq.acked)
            };
            let now = Instant::now();
            if !rows.is_empty() || now >= deadline {
                return Ok(QueuePage {
                    entries: self.read_page(client, rows, max_bytes)?,
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
        rows: Vec<(u64, u64, Option<Arc<StoredMessage>>)>,
        max_bytes: usize,
    ) -> Result<Vec<QueueEntry>> {
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for (seq, id, cached) in rows {
            let m = match cached {
                Some(m) => m,
                None => {
                    let mk = db::message_key(id);
                    match self.db.storage.get_raw(self.db.delivery, &mk)? {
                        Some(raw) => Arc::new(decode_record(DELIVERY, &mk, &raw)?),
                        // The client acknowledged (or retention dropped) the
                        // entry while this page was read: end the page here.
                        None if self.lock().client(client).acked >= seq => break,
                        None => {
                            return Err(ServerError::Internal(format!(
                                "queue entry {seq} points to missing message {id}"
                            )))
                        }
                    }
                }
            };
            bytes += cached_size(&m);
            out.push(QueueEntry {
                seq,
                kind: entry_kind(m.kind)?,
                group_id: m.group_id.clone().into(),
                epoch: m.epoch,
                sender: m.sender.clone().into(),
                message: m.message.clone().into(),
            });
            // Always return at least one entry, so any queue drains.
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Acknowledge every entry with `seq <= up_to`; message bodies whose last
    /// reference goes are deleted in the same write. Returns the new ack
    /// mark, the entries left and the handle to await before answering.
    pub fn ack(&self, client: &ClientId, up_to: u64) -> Result<(u64, u64, Durable)> {
        let mut state = self.lock();
        let cq = state.client(client);
        if up_to > cq.visible {
            return Err(ServerError::BadRequest(format!(
                "cannot acknowledge {up_to}: the queue's head is {}",
                cq.visible
            )));
        }
        let (acked, head) = (cq.acked, cq.visible);
        if up_to <= acked {
            // Answer only once the ack that got there is durable.
            return Ok((
                acked,
                head.saturating_sub(acked),
                self.flusher.submit(Vec::new(), None)?,
            ));
        }
        let popped = cq.advance(up_to);
        let freed = state.release(popped);
        let tx = self.db.storage.begin();
        tx.put_raw(self.db.delivery, &db::ack_key(client), &up_to.to_be_bytes())?;
        self.stage_removals(&tx, &freed)?;
        // Submitted under the lock: the removals follow the writes of the
        // bodies they delete. Key by key is safe (module doc).
        let durable = self
            .flusher
            .submit(tx.into_pending()?.into_single_writes(), None)?;
        Ok((up_to, head - up_to, durable))
    }

    fn stage_removals(&self, tx: &Transaction, freed: &[u64]) -> Result<()> {
        for id in freed {
            tx.remove_raw(self.db.delivery, &db::message_key(*id))?;
            tx.remove_raw(self.db.delivery, &db::fanout_key(*id))?;
        }
        Ok(())
    }

    /// Drop messages stored before `cutoff_ms` that some recipient still has
    /// not acknowledged (the retention bound for offline clients): their
    /// entries leave the queues and each affected client's ack mark moves
    /// past them, so its next page starts after the gap (`acked` tells it how
    /// far). Returns the number of queue entries dropped and, if any, the
    /// handle to await for durability.
    pub fn expire(&self, cutoff_ms: u64) -> Result<(usize, Option<Durable>)> {
        let mut state = self.lock();
        // Message ids grow with time: everything before the first young one
        // expires.
        let boundary = state
            .messages
            .iter()
            .find(|(_, m)| m.stored_ms >= cutoff_ms)
            .map_or(state.next_message_id, |(id, _)| *id);
        if state
            .messages
            .keys()
            .next()
            .is_none_or(|id| *id >= boundary)
        {
            return Ok((0, None));
        }
        let tx = self.db.storage.begin();
        let mut released = Vec::new();
        for (client, cq) in state.clients.iter_mut() {
            let mut n = 0u64;
            // Only visible entries: one not yet durable is never old.
            while cq.ids.get(n as usize).is_some_and(|id| *id < boundary)
                && cq.acked + n < cq.visible
            {
                n += 1;
            }
            if n > 0 {
                let mark = cq.acked + n;
                released.extend(cq.advance(mark));
                tx.put_raw(self.db.delivery, &db::ack_key(client), &mark.to_be_bytes())?;
            }
        }
        let dropped = released.len();
        let freed = state.release(released);
        self.stage_removals(&tx, &freed)?;
        let durable = self
            .flusher
            .submit(tx.into_pending()?.into_single_writes(), None)?;
        Ok((dropped, Some(durable)))
    }

    /// Delete a client's whole queue (when the client is deleted) in the same
    /// atomic write as `tx`, which this submits; returns the handle to await.
    pub fn delete_client(&self, tx: Transaction, client: &ClientId) -> Result<Durable> {
        let mut state = self.lock();
        let cq = state.client(client);
        // Everything, including entries not yet durable: nothing of it is
        // delivered any more.
        let mark = cq.next_seq() - 1;
        let popped = cq.advance(mark);
        let freed = state.release(popped);
        tx.put_raw(self.db.delivery, &db::ack_key(client), &mark.to_be_bytes())?;
        self.stage_removals(&tx, &freed)?;
        self.flusher.submit(vec![tx.into_pending()?], None)
    }

    /// Depth (unacknowledged entries) of every client queue.
    pub fn depths(&self) -> Vec<(ClientId, u64)> {
        self.lock()
            .clients
            .iter()
            .map(|(c, q)| (c.clone(), q.visible.saturating_sub(q.acked)))
            .collect()
    }

    /// Number of stored message bodies still referenced.
    pub fn stored_messages(&self) -> usize {
        self.lock().messages.len()
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

    fn queues_on(store: Store) -> Arc<Queues> {
        let flusher = Flusher::start(store.clone()).unwrap();
        Arc::new(Queues::open(Db::new(store).unwrap(), flusher).unwrap())
    }

    /// Tests make durability explicit through the flusher.
    fn batched() -> StoreConfig {
        StoreConfig {
            durability: Durability::Batched,
            ..StoreConfig::default()
        }
    }

    fn queues() -> Arc<Queues> {
        queues_on(Store::temporary(batched()).unwrap())
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

    async fn send(q: &Arc<Queues>, stored_ms: u64, to: &[&ClientId]) {
        let tx = q.db.storage.begin();
        let (_, durable) = q
            .enqueue(
                tx,
                vec![Outgoing {
                    message: message(stored_ms),
                    recipients: to.iter().map(|c| (*c).clone()).collect(),
                }],
            )
            .unwrap();
        durable.wait().await.unwrap();
    }

    async fn ack(q: &Queues, c: &ClientId, up_to: u64) -> Result<(u64, u64)> {
        let (acked, left, durable) = q.ack(c, up_to)?;
        durable.wait().await?;
        Ok((acked, left))
    }

    async fn seqs(q: &Queues, c: &ClientId, after: u64) -> Vec<u64> {
        let page = q
            .fetch(c, after, 100, 1 << 20, Duration::ZERO)
            .await
            .unwrap();
        page.entries.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn fan_out_ack_and_body_deletion() {
        let q = queues();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        for _ in 0..3 {
            send(&q, 1, &[&a, &b]).await;
        }
        assert_eq!(q.stored_messages(), 3);
        assert_eq!(seqs(&q, &a, 0).await, vec![1, 2, 3]);
        // Pages are bounded by count, and any queue drains page by page.
        let page = q.fetch(&a, 1, 1, 1 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(page.entries.len(), 1);
        assert_eq!(page.entries[0].seq, 2);
        assert!(q.ack(&a, 9).is_err(), "cannot ack past the head");
        ack(&q, &a, 3).await.unwrap();
        assert_eq!(q.stored_messages(), 3, "b still needs them");
        ack(&q, &b, 2).await.unwrap();
        assert_eq!(q.stored_messages(), 1);
        ack(&q, &b, 3).await.unwrap();
        assert_eq!(q.stored_messages(), 0);
        // Sequence numbers continue after everything was acknowledged.
        send(&q, 1, &[&a]).await;
        assert_eq!(seqs(&q, &a, 3).await, vec![4]);
    }

    #[tokio::test]
    async fn retention_drops_old_entries_and_moves_the_ack_mark() {
        let q = queues();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        send(&q, 100, &[&a, &b]).await;
        send(&q, 200, &[&a]).await;
        send(&q, 5_000, &[&a, &b]).await;
        ack(&q, &b, 1).await.unwrap();
        let (dropped, durable) = q.expire(1_000).unwrap();
        durable.unwrap().wait().await.unwrap();
        assert_eq!(dropped, 2, "a's two old entries");
        let page = q.fetch(&a, 0, 10, 1 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(page.acked, 2);
        assert_eq!(seqs(&q, &a, 0).await, vec![3]);
        assert_eq!(q.stored_messages(), 1);
        assert_eq!(seqs(&q, &b, 1).await, vec![2]);
        assert_eq!(q.expire(1_000).unwrap().0, 0, "nothing left to expire");
    }

    #[tokio::test]
    async fn the_index_is_rebuilt_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let config = batched();
        let (a, b, c) = (
            ClientId::new("a").unwrap(),
            ClientId::new("b").unwrap(),
            ClientId::new("c").unwrap(),
        );
        {
            let q = queues_on(Store::open(dir.path(), config.clone()).unwrap());
            for i in 0..5 {
                send(&q, 100 + i, &[&a, &b]).await;
            }
            send(&q, 200, &[&c]).await;
            ack(&q, &a, 2).await.unwrap();
            ack(&q, &b, 5).await.unwrap();
            let tx = q.db.storage.begin();
            q.delete_client(tx, &c).unwrap().wait().await.unwrap();
            assert_eq!(q.stored_messages(), 3);
        }
        let q = queues_on(Store::open(dir.path(), config).unwrap());
        assert_eq!(seqs(&q, &a, 0).await, vec![3, 4, 5]);
        assert!(seqs(&q, &b, 0).await.is_empty());
        assert!(seqs(&q, &c, 0).await.is_empty());
        assert_eq!(q.stored_messages(), 3);
        let report = verify(&q.db).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.entries, report.messages), (3, 3));
        // New entries continue each queue's numbering.
        send(&q, 300, &[&a, &b, &c]).await;
        assert_eq!(seqs(&q, &a, 5).await, vec![6]);
        assert_eq!(seqs(&q, &b, 5).await, vec![6]);
        assert_eq!(seqs(&q, &c, 1).await, vec![2]);
    }

    /// Fan-outs and acks are applied key by key: every prefix a crash can
    /// keep must reopen to a consistent state (module doc).
    #[tokio::test]
    async fn crash_prefixes_of_key_by_key_writes_reopen_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let config = batched();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        // `check` on the crashed database finds nothing wrong, and startup
        // deletes the leftovers.
        let reopen = || async {
            let store = Store::open(dir.path(), config.clone()).unwrap();
            let report = verify(&Db::new(store.clone()).unwrap()).unwrap();
            assert!(report.problems.is_empty(), "{:?}", report.problems);
            queues_on(store)
        };
        {
            let q = queues_on(Store::open(dir.path(), config.clone()).unwrap());
            send(&q, 1, &[&a, &b]).await;
            send(&q, 2, &[&a, &b]).await;
            // A send cut after its body: the body has no fan-out record.
            let s = &q.db.storage;
            s.put_record(q.db.delivery, &db::message_key(3), &message(3))
                .unwrap();
            // b's ack of message 1 cut after its mark: the message is fully
            // acknowledged but still stored.
            ack(&q, &a, 1).await.unwrap();
            s.put_raw(q.db.delivery, &db::ack_key(&b), &1u64.to_be_bytes())
                .unwrap();
        }
        {
            let q = reopen().await;
            assert_eq!(q.stored_messages(), 1, "only message 2 is still queued");
            assert_eq!(seqs(&q, &a, 1).await, vec![2]);
            assert_eq!(seqs(&q, &b, 1).await, vec![2]);
            let s = &q.db.storage;
            for id in [1, 3] {
                assert_eq!(
                    s.get_raw(q.db.delivery, &db::message_key(id)).unwrap(),
                    None
                );
                assert_eq!(s.get_raw(q.db.delivery, &db::fanout_key(id)).unwrap(), None);
            }
            // An ack cut after removing the body but before the record.
            ack(&q, &a, 2).await.unwrap();
            s.put_raw(q.db.delivery, &db::ack_key(&b), &2u64.to_be_bytes())
                .unwrap();
            s.remove_raw(q.db.delivery, &db::message_key(2)).unwrap();
        }
        let q = reopen().await;
        assert_eq!(q.stored_messages(), 0);
        assert_eq!(
            q.db.storage
                .get_raw(q.db.delivery, &db::fanout_key(2))
                .unwrap(),
            None
        );
        // Numbering goes on after the cleaned-up messages.
        send(&q, 4, &[&a]).await;
        assert_eq!(seqs(&q, &a, 2).await, vec![3]);
    }

    /// A queue with a gap, or keys of an older layout, is refused at startup
    /// (and reported by `check`) instead of being served wrongly.
    #[tokio::test]
    async fn a_gap_or_an_old_layout_is_refused() {
        let config = batched();
        let a = ClientId::new("a").unwrap();
        let gap = tempfile::tempdir().unwrap();
        {
            let q = queues_on(Store::open(gap.path(), config.clone()).unwrap());
            for i in 0..3 {
                send(&q, i, &[&a]).await;
            }
            // Lose the middle message's record: a's queue jumps from 1 to 3.
            q.db.storage
                .remove_raw(q.db.delivery, &db::fanout_key(2))
                .unwrap();
        }
        let store = Store::open(gap.path(), config.clone()).unwrap();
        let db = Db::new(store.clone()).unwrap();
        let report = verify(&db).unwrap();
        assert!(
            report.problems.iter().any(|p| p.contains("has a gap")),
            "{:?}",
            report.problems
        );
        let flusher = Flusher::start(store).unwrap();
        let refused = Queues::open(db, flusher).err().expect("refused");
        assert!(refused.to_string().contains("has a gap"), "{refused}");

        let old = tempfile::tempdir().unwrap();
        {
            let q = queues_on(Store::open(old.path(), config.clone()).unwrap());
            q.db.storage
                .put_raw(q.db.delivery, b"q\x01a", &1u64.to_be_bytes())
                .unwrap();
        }
        let store = Store::open(old.path(), config).unwrap();
        let db = Db::new(store.clone()).unwrap();
        let flusher = Flusher::start(store).unwrap();
        let refused = Queues::open(db, flusher).err().expect("refused");
        assert!(
            refused.to_string().contains("earlier development build"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn long_poll_wakes_on_publish() {
        let q = queues();
        let a = ClientId::new("a").unwrap();
        let waiter = {
            let (q, a) = (q.clone(), a.clone());
            tokio::spawn(async move { q.fetch(&a, 0, 10, 1 << 20, Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&q, 1, &[&a]).await;
        let page = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken before its 10 s wait")
            .unwrap()
            .unwrap();
        assert_eq!(page.entries.len(), 1);
    }
}
