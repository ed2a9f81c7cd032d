//! Per-client queues: gap-free sequence numbers, fan-out of one stored
//! message to many queues, fetch pages with long-poll, acknowledgements,
//! retention, and deletion of message bodies once every recipient has
//! acknowledged them.
//!
//! A message for G recipients is written once, whatever G: one envelope
//! (`'e' ++ id`) holding the body and the fan-out (each recipient with the
//! sequence number the message got in that recipient's queue). Which message
//! sits at which sequence number of a queue is an in-memory index, rebuilt
//! from the envelopes' fan-outs (and the stored acknowledgement marks,
//! `'a' ++ client`) at startup, so a send writes one key and a fetch reads no
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
//! [`load_index`] accepts. A plain send is a single key. Ack marks (`'a'`)
//! sort before the envelopes whose removal they allow, so a crash can leave
//! fully acknowledged messages behind; startup deletes them. A fan-out that
//! joins other writes (a commit with its group state) stays one atomic write.
//!
//! Builds before envelopes stored a message as two keys, its body (`'m'`)
//! and its fan-out record (`'r'`). Startup reads that layout too and
//! converts what is still queued ([`migrate_split_messages`]); the split
//! layout's crash leftover (the newest body without its record) is deleted
//! like the others.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mls_ds_protocol::queue::{EntryKind, QueueEntryRef, QueuePageRef};
use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::decode_record;
use mls_ds_storage::Transaction;
use tls_codec::VLByteSlice;
use tokio::sync::Notify;

use crate::db::{self, Db, Envelope, EnvelopeRef, Fanout, StoredMessage};
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
    /// Messages nobody will fetch: stored messages whose every entry is
    /// acknowledged (a crash between an ack and its removals) and, in the
    /// split layout, the newest body if it has no fan-out record (a crash
    /// between the two writes of an unacknowledged send). Safe to delete.
    orphans: Vec<u64>,
    /// Referenced messages still in the split layout (`'m'` + `'r'`).
    split: Vec<u64>,
    /// Envelopes read.
    envelopes: usize,
}

/// Envelopes read per range query at startup, so that the scan holds a
/// bounded number of message bodies in memory.
const ENVELOPE_PAGE: usize = 256;

/// Call `f` with every stored envelope, in id order.
fn for_each_envelope(db: &Db, mut f: impl FnMut(u64, Envelope) -> Result<()>) -> Result<()> {
    let mut from = db::envelope_key(0);
    let to = db::envelope_key(u64::MAX);
    loop {
        let page = db
            .storage
            .range_raw(db.delivery, &from, &to, ENVELOPE_PAGE)?;
        let full = page.len() == ENVELOPE_PAGE;
        let mut last = None;
        for (k, v) in page {
            let id = db::key_seq(DELIVERY, &k)?;
            f(id, decode_record(DELIVERY, &k, &v)?)?;
            last = Some(id);
        }
        match last.and_then(|id| id.checked_add(1)) {
            Some(next) if full => from = db::envelope_key(next),
            _ => return Ok(()),
        }
    }
}

/// Rebuild the index from the stored fan-outs and ack marks. Fails on a
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
    // Every fan-out, in id order (queues are checked in sequence order): the
    // envelopes and the split layout's records. A crash during the startup
    // conversion leaves both layouts, for different ids.
    let mut fanouts: BTreeMap<u64, (Fanout, bool)> = BTreeMap::new();
    let mut envelopes = 0;
    for_each_envelope(db, |id, envelope| {
        envelopes += 1;
        fanouts.insert(id, (envelope.fanout, false));
        Ok(())
    })?;
    for (k, v) in s.scan_raw(db.delivery, b"r")? {
        let id = db::key_seq(DELIVERY, &k)?;
        let fanout: Fanout = decode_record(DELIVERY, &k, &v)?;
        if fanouts.insert(id, (fanout, true)).is_some() {
            return Err(ServerError::Internal(format!(
                "message {id} is stored both as an envelope and as a fan-out record"
            )));
        }
    }
    let mut messages = BTreeMap::new();
    let mut orphans = Vec::new();
    let mut split = Vec::new();
    let newest_body = match s.last_raw(db.delivery, b"m")? {
        Some((k, _)) => Some(db::key_seq(DELIVERY, &k)?),
        None => None,
    };
    let mut next_message_id = newest_body.map_or(1, |id| id + 1);
    if let Some(id) = newest_body {
        if !fanouts.contains_key(&id) {
            orphans.push(id);
        }
    }
    for (id, (fanout, is_split)) in fanouts {
        next_message_id = next_message_id.max(id + 1);
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
            if is_split {
                split.push(id);
            }
            messages.insert(
                id,
                MessageMeta {
                    refs,
                    stored_ms: fanout.stored_ms,
                },
            );
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
        split,
        envelopes,
    })
}

/// Unacknowledged queue entries and stored messages (for `stats`; no
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
    /// Stored messages.
    pub messages: usize,
    /// Everything wrong.
    pub problems: Vec<String>,
}

/// Integrity check of the delivery tree (for `mls-ds check`): every queue is
/// gap-free and every stored message decodes; in the split layout of older
/// builds, every referenced body is stored and every body has its fan-out
/// record (but the one a crash may leave, which the next start deletes, see
/// [`Index::orphans`]).
pub fn verify(db: &Db) -> Result<QueueReport> {
    let s = &db.storage;
    let mut problems = Vec::new();
    let mut entries = 0;
    let mut envelopes = 0;
    let mut orphans = HashSet::new();
    let mut split = HashSet::new();
    match load_index(db) {
        Err(e) => problems.push(e.to_string()),
        Ok(index) => {
            orphans = index.orphans.into_iter().collect();
            entries = index.clients.values().map(|c| c.ids.len() as u64).sum();
            envelopes = index.envelopes;
            for id in &index.split {
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
            split = index.split.into_iter().collect();
        }
    }
    let bodies = s.scan_raw(db.delivery, b"m")?;
    for (k, _) in &bodies {
        let id = db::key_seq(DELIVERY, k)?;
        if !orphans.contains(&id)
            && !split.contains(&id)
            && s.get_raw(db.delivery, &db::fanout_key(id))?.is_none()
        {
            problems.push(format!("message {id} has no fan-out record"));
        }
    }
    Ok(QueueReport {
        entries,
        messages: envelopes + bodies.len(),
        problems,
    })
}

/// Messages converted per atomic write by [`migrate_split_messages`].
const MIGRATION_CHUNK: usize = 256;

/// Convert referenced messages of the split layout (a body `'m'` and a
/// fan-out record `'r'`, as builds before envelopes wrote them) into
/// envelopes. Each chunk of messages is one atomic write, so a crash
/// leaves every message whole in one layout or the other, and the next
/// start goes on where this one stopped.
pub fn migrate_split_messages(db: &Db, ids: &[u64]) -> Result<()> {
    let s = &db.storage;
    for chunk in ids.chunks(MIGRATION_CHUNK) {
        let tx = s.begin();
        for id in chunk {
            let (mk, rk) = (db::message_key(*id), db::fanout_key(*id));
            let (Some(body), Some(record)) =
                (s.get_raw(db.delivery, &mk)?, s.get_raw(db.delivery, &rk)?)
            else {
                return Err(ServerError::Internal(format!(
                    "queued message {id} has no stored body; run `mls-ds check`"
                )));
            };
            let message: StoredMessage = decode_record(DELIVERY, &mk, &body)?;
            let fanout: Fanout = decode_record(DELIVERY, &rk, &record)?;
            tx.put_record(
                db.delivery,
                &db::envelope_key(*id),
                &EnvelopeRef {
                    fanout: &fanout,
                    message: &message,
                },
            )?;
            tx.remove_raw(db.delivery, &mk)?;
            tx.remove_raw(db.delivery, &rk)?;
        }
        tx.commit()?;
    }
    db.store.flush()?;
    Ok(())
}

impl Queues {
    /// Rebuild the queue index from disk. Bodies nobody references any more
    /// are deleted.
    pub fn open(db: Db, flusher: Flusher) -> Result<Queues> {
        let index = load_index(&db)?;
        if !index.orphans.is_empty() {
            let tx = db.storage.begin();
            for id in &index.orphans {
                tx.remove_raw(db.delivery, &db::envelope_key(*id))?;
                tx.remove_raw(db.delivery, &db::message_key(*id))?;
                tx.remove_raw(db.delivery, &db::fanout_key(*id))?;
            }
            tx.commit()?;
            db.store.flush()?;
            tracing::info!(count = index.orphans.len(), "deleted unreferenced messages");
        }
        if !index.split.is_empty() {
            migrate_split_messages(&db, &index.split)?;
            tracing::info!(
                count = index.split.len(),
                "converted queued messages to envelopes"
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
            tx.put_record(
                self.db.delivery,
                &db::envelope_key(id),
                &EnvelopeRef {
                    fanout: &Fanout { stored_ms, entries },
                    message: &out.message,
                },
            )?;
            keys += 1;
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
    ) -> Result<Page> {
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
                return Ok(Page {
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
    ) -> Result<Vec<PageEntry>> {
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for (seq, id, cached) in rows {
            let m = match cached {
                Some(m) => m,
                None => {
                    let ek = db::envelope_key(id);
                    match self.db.storage.get_raw(self.db.delivery, &ek)? {
                        Some(raw) => {
                            let envelope: Envelope = decode_record(DELIVERY, &ek, &raw)?;
                            Arc::new(envelope.message)
                        }
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
            out.push(PageEntry {
                seq,
                kind: entry_kind(m.kind)?,
                stored: m,
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
            tx.remove_raw(self.db.delivery, &db::envelope_key(*id))?;
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

/// A page read from a client's queue: the stored messages themselves,
/// shared with the body cache, encoded for the wire by [`Page::wire`].
pub struct Page {
    /// Entries in sequence order.
    pub entries: Vec<PageEntry>,
    /// Highest visible sequence number.
    pub head: u64,
    /// Acknowledged up to here.
    pub acked: u64,
}

/// One entry of a [`Page`].
pub struct PageEntry {
    /// Sequence number in the client's queue.
    pub seq: u64,
    /// The stored message's kind, checked when the page was read.
    pub kind: EntryKind,
    /// The stored message.
    pub stored: Arc<StoredMessage>,
}

impl Page {
    /// The response body's value, borrowing every byte string from the
    /// stored messages (a fetch copies each body once, into the response).
    pub fn wire(&self) -> QueuePageRef<'_> {
        QueuePageRef {
            entries: self
                .entries
                .iter()
                .map(|e| QueueEntryRef {
                    seq: e.seq,
                    kind: e.kind,
                    group_id: VLByteSlice(&e.stored.group_id),
                    epoch: e.stored.epoch,
                    sender: VLByteSlice(&e.stored.sender),
                    message: VLByteSlice(&e.stored.message),
                })
                .collect(),
            head: self.head,
            acked: self.acked,
        }
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

    /// The startup scan reads envelopes a page at a time.
    #[tokio::test]
    async fn more_envelopes_than_one_scan_page_reload() {
        let dir = tempfile::tempdir().unwrap();
        let config = batched();
        let a = ClientId::new("a").unwrap();
        let n = 2 * ENVELOPE_PAGE as u64 + 3;
        {
            let q = queues_on(Store::open(dir.path(), config.clone()).unwrap());
            let tx = q.db.storage.begin();
            let outgoing = (0..n)
                .map(|i| Outgoing {
                    message: message(i),
                    recipients: vec![a.clone()],
                })
                .collect();
            let (_, durable) = q.enqueue(tx, outgoing).unwrap();
            durable.wait().await.unwrap();
        }
        let q = queues_on(Store::open(dir.path(), config).unwrap());
        assert_eq!(q.stored_messages() as u64, n);
        let page = q
            .fetch(&a, 0, 10_000, 1 << 30, Duration::ZERO)
            .await
            .unwrap();
        let got: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
        assert_eq!(got, (1..=n).collect::<Vec<_>>());
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
            // b's ack of message 1 cut after its mark: the message is fully
            // acknowledged but still stored.
            ack(&q, &a, 1).await.unwrap();
            q.db.storage
                .put_raw(q.db.delivery, &db::ack_key(&b), &1u64.to_be_bytes())
                .unwrap();
        }
        let q = reopen().await;
        assert_eq!(q.stored_messages(), 1, "only message 2 is still queued");
        assert_eq!(seqs(&q, &a, 1).await, vec![2]);
        assert_eq!(seqs(&q, &b, 1).await, vec![2]);
        let s = &q.db.storage;
        assert_eq!(
            s.get_raw(q.db.delivery, &db::envelope_key(1)).unwrap(),
            None
        );
        assert!(s
            .get_raw(q.db.delivery, &db::envelope_key(2))
            .unwrap()
            .is_some());
        // Numbering goes on after the cleaned-up message.
        send(&q, 3, &[&a]).await;
        assert_eq!(seqs(&q, &a, 2).await, vec![3]);
    }

    /// Store message `id` as builds before envelopes did: body and fan-out
    /// record as two keys.
    fn put_split(db: &Db, id: u64, to: &[(&ClientId, u64)]) {
        let s = &db.storage;
        s.put_record(db.delivery, &db::message_key(id), &message(id))
            .unwrap();
        let entries = to
            .iter()
            .map(|(c, seq)| (c.as_bytes().to_vec(), *seq))
            .collect();
        let fanout = Fanout {
            stored_ms: id,
            entries,
        };
        s.put_record(db.delivery, &db::fanout_key(id), &fanout)
            .unwrap();
    }

    /// A crash during the startup conversion leaves some messages converted
    /// and the rest split: `check` accepts that, and the next start finishes.
    #[tokio::test]
    async fn a_conversion_cut_by_a_crash_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let config = batched();
        let a = ClientId::new("a").unwrap();
        {
            let store = Store::open(dir.path(), config.clone()).unwrap();
            let db = Db::new(store.clone()).unwrap();
            for id in 1..=3 {
                put_split(&db, id, &[(&a, id)]);
            }
            migrate_split_messages(&db, &[1]).unwrap();
            let report = verify(&db).unwrap();
            assert!(report.problems.is_empty(), "{:?}", report.problems);
            assert_eq!((report.entries, report.messages), (3, 3));
        }
        let q = queues_on(Store::open(dir.path(), config).unwrap());
        let s = &q.db.storage;
        for id in 1..=3 {
            assert!(s
                .get_raw(q.db.delivery, &db::envelope_key(id))
                .unwrap()
                .is_some());
            assert_eq!(
                s.get_raw(q.db.delivery, &db::message_key(id)).unwrap(),
                None
            );
            assert_eq!(s.get_raw(q.db.delivery, &db::fanout_key(id)).unwrap(), None);
        }
        assert_eq!(seqs(&q, &a, 0).await, vec![1, 2, 3]);
        let report = verify(&q.db).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.entries, report.messages), (3, 3));
    }

    /// A queued split-layout message whose body is missing is reported by
    /// `check` and refused at startup, and the refused conversion writes
    /// nothing.
    #[tokio::test]
    async fn a_split_message_without_its_body_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = batched();
        let a = ClientId::new("a").unwrap();
        let store = Store::open(dir.path(), config).unwrap();
        let db = Db::new(store.clone()).unwrap();
        put_split(&db, 1, &[(&a, 1)]);
        put_split(&db, 2, &[(&a, 2)]);
        db.storage
            .remove_raw(db.delivery, &db::message_key(1))
            .unwrap();
        let report = verify(&db).unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("queued message 1 has no stored body")),
            "{:?}",
            report.problems
        );
        let flusher = Flusher::start(store).unwrap();
        let refused = Queues::open(db.clone(), flusher).err().expect("refused");
        assert!(
            refused.to_string().contains("has no stored body"),
            "{refused}"
        );
        let s = &db.storage;
        for id in [1, 2] {
            assert!(s
                .get_raw(db.delivery, &db::fanout_key(id))
                .unwrap()
                .is_some());
            assert_eq!(s.get_raw(db.delivery, &db::envelope_key(id)).unwrap(), None);
        }
        assert!(s
            .get_raw(db.delivery, &db::message_key(2))
            .unwrap()
            .is_some());
    }

    /// A message stored by an older build as a body and a fan-out record:
    /// `check` accepts the layout, and startup converts what is queued into
    /// envelopes and deletes that layout's crash leftovers.
    #[tokio::test]
    async fn split_layout_is_converted_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let config = batched();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        {
            let store = Store::open(dir.path(), config.clone()).unwrap();
            let db = Db::new(store.clone()).unwrap();
            let s = &db.storage;
            // 1: acknowledged by both, but its removals were cut by a crash.
            put_split(&db, 1, &[(&a, 1), (&b, 1)]);
            put_split(&db, 2, &[(&a, 2), (&b, 2)]);
            put_split(&db, 3, &[(&a, 3)]);
            // 4: a send cut after its body.
            s.put_record(db.delivery, &db::message_key(4), &message(4))
                .unwrap();
            for (c, mark) in [(&a, 1u64), (&b, 1)] {
                s.put_raw(db.delivery, &db::ack_key(c), &mark.to_be_bytes())
                    .unwrap();
            }
            store.flush().unwrap();
            let report = verify(&db).unwrap();
            assert!(report.problems.is_empty(), "{:?}", report.problems);
            assert_eq!((report.entries, report.messages), (3, 4));
        }
        let q = queues_on(Store::open(dir.path(), config.clone()).unwrap());
        assert_eq!(q.stored_messages(), 2);
        let s = &q.db.storage;
        for id in 1..=4 {
            assert_eq!(
                s.get_raw(q.db.delivery, &db::message_key(id)).unwrap(),
                None
            );
            assert_eq!(s.get_raw(q.db.delivery, &db::fanout_key(id)).unwrap(), None);
            let envelope = s.get_raw(q.db.delivery, &db::envelope_key(id)).unwrap();
            assert_eq!(envelope.is_some(), id == 2 || id == 3, "message {id}");
        }
        // Served from the envelopes (the body cache starts empty).
        let page = q.fetch(&a, 1, 10, 1 << 20, Duration::ZERO).await.unwrap();
        let got: Vec<(u64, u64)> = page
            .entries
            .iter()
            .map(|e| (e.seq, e.stored.epoch))
            .collect();
        assert_eq!(got, vec![(2, 0), (3, 0)]);
        assert_eq!(page.entries[0].stored.message.as_slice(), &[1, 2, 3]);
        assert_eq!(seqs(&q, &b, 1).await, vec![2]);
        let report = verify(&q.db).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.entries, report.messages), (3, 2));
        // New messages get ids after every id the old layout used.
        send(&q, 5, &[&b]).await;
        assert_eq!(seqs(&q, &b, 2).await, vec![3]);
        assert!(s
            .get_raw(q.db.delivery, &db::envelope_key(5))
            .unwrap()
            .is_some());
        ack(&q, &a, 3).await.unwrap();
        ack(&q, &b, 3).await.unwrap();
        assert_eq!(q.stored_messages(), 0);
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
            // Lose the middle message: a's queue jumps from 1 to 3.
            q.db.storage
                .remove_raw(q.db.delivery, &db::envelope_key(2))
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
