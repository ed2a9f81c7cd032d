//! The queue index's checkpoint: written when the server stops, so that the
//! next start reads it instead of every stored delivery batch.
//!
//! Without it a start rebuilds the index from every envelope's fan-out
//! (`queue_startup::load`), which reads the whole delivery tree: about a
//! second per million queued messages from a warm page cache, and what the
//! disk takes to read gigabytes from a cold one. The checkpoint holds what
//! the index holds (each queue's mark, deletion and message ids, each
//! referenced batch's message count and age, the next batch number) in one
//! to two bytes per queued entry.
//!
//! It describes one state of the database, so:
//! - the writer thread writes it as its last job (`Job::Close`), after
//!   everything submitted before was applied; nothing is written after it;
//! - its chunks and its seal (their length and SHA-256) are one sled batch,
//!   flushed before the server exits: a crash leaves all of it or nothing;
//! - every start of the backend removes it, durably, before it writes
//!   anything else, so that no later write or crash can leave a checkpoint
//!   that describes an older state;
//! - before it is used, it must agree with what is cheap to read: every
//!   acknowledgement mark, every client's deletion, and no batch numbered at
//!   or past its next batch number. A checkpoint that is damaged or does not
//!   agree is logged and ignored, and the index is rebuilt from the batches.
//!
//! `mls-ds check` compares a checkpoint it finds with the full rebuild.

use std::collections::{BTreeMap, HashMap};

use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::decode_record;
use sha2::{Digest, Sha256};

use super::id_deque::{put_varint, read_varint, unzigzag, zigzag};
use super::layout::{self, Layout};
use super::queue_index::{BatchMeta, ClientQueue, IndexState};
use super::queue_startup;
use crate::backend::error::StoreError;

/// Version of the encoding, its first byte.
const FORMAT: u8 = 1;
/// Bytes per stored chunk: well below sled's blob size (a chunk stays in
/// its log) and few keys for a large index.
const CHUNK_BYTES: usize = 64 * 1024;
const SEAL_KEY: &[u8] = b"s";
const CHUNK_PREFIX: u8 = b'c';
/// Most bytes reserved up front for reading the chunks back (the seal
/// says how many there are, but it is read from disk).
const RESERVE_LIMIT: u64 = 64 * 1024 * 1024;

/// What says that the chunks are whole: written with them in one batch.
#[derive(bincode::Encode, bincode::Decode)]
struct Seal {
    bytes: u64,
    chunks: u32,
    sha256: [u8; 32],
}

/// A checkpoint as written.
pub(crate) struct Written {
    /// Bytes of its encoding.
    pub(crate) bytes: usize,
    /// Queue entries it holds.
    pub(crate) entries: u64,
}

/// What a start finds in the checkpoint tree.
pub(crate) enum Found {
    /// No checkpoint (the last stop was not clean, or this is a new
    /// database).
    Absent,
    /// One that cannot be used, and why.
    Unusable(String),
    /// The index it holds, checked against the ack marks and batches.
    Index(Box<IndexState>),
}

/// Encode `state` (taken under the index lock).
pub(crate) fn encode(state: &IndexState) -> Vec<u8> {
    let mut out = vec![FORMAT];
    put_varint(&mut out, state.next_batch);
    // A queue never used (no entry, no mark, not deleted) is what a start
    // assumes for a client it does not know.
    let kept: Vec<(&ClientId, &ClientQueue)> = state
        .clients
        .iter()
        .filter(|(_, q)| q.acked > 0 || q.deleted || q.ids.len() > 0)
        .collect();
    put_varint(&mut out, kept.len() as u64);
    for (id, q) in kept {
        put_varint(&mut out, id.as_bytes().len() as u64);
        out.extend_from_slice(id.as_bytes());
        put_varint(&mut out, q.acked);
        out.push(u8::from(q.deleted));
        put_varint(&mut out, q.ids.len() as u64);
        let mut previous = 0u64;
        for id in q.ids.iter_from(0) {
            put_varint(&mut out, zigzag(id.wrapping_sub(previous)));
            previous = id;
        }
    }
    put_varint(&mut out, state.batches.len() as u64);
    let mut previous = 0u64;
    for (number, meta) in &state.batches {
        put_varint(&mut out, number - previous);
        put_varint(&mut out, u64::from(meta.messages));
        put_varint(&mut out, meta.stored_ms);
        previous = *number;
    }
    out
}

/// Store `encoded` (of a state holding `entries` queue entries) as the
/// checkpoint, durably, in place of any other.
pub(crate) fn write(layout: &Layout, encoded: &[u8], entries: u64) -> Result<Written, StoreError> {
    let tree = layout.trees.checkpoint;
    let tx = layout.storage.begin();
    for (k, _) in layout.storage.scan_raw(tree.handle, b"")? {
        tx.remove_raw(tree.handle, &k)?;
    }
    let mut chunks = 0u32;
    for chunk in encoded.chunks(CHUNK_BYTES) {
        tx.put_raw(tree.handle, &chunk_key(chunks), chunk)?;
        chunks += 1;
    }
    let seal = Seal {
        bytes: encoded.len() as u64,
        chunks,
        sha256: Sha256::digest(encoded).into(),
    };
    tx.put_raw(tree.handle, SEAL_KEY, &layout::encode(tree, &seal)?)?;
    tx.commit()?;
    layout.store.flush()?;
    Ok(Written {
        bytes: encoded.len(),
        entries,
    })
}

/// Remove the checkpoint, durably; whether there was one.
pub(crate) fn discard(layout: &Layout) -> Result<bool, StoreError> {
    let tree = layout.trees.checkpoint;
    let keys = layout.storage.scan_raw(tree.handle, b"")?;
    if keys.is_empty() {
        return Ok(false);
    }
    let tx = layout.storage.begin();
    // The seal first in the batch, though the batch is atomic anyway.
    tx.remove_raw(tree.handle, SEAL_KEY)?;
    for (k, _) in keys {
        tx.remove_raw(tree.handle, &k)?;
    }
    tx.commit()?;
    layout.store.flush()?;
    Ok(true)
}

/// Read the checkpoint, if any, and check it against the database.
pub(crate) fn read(layout: &Layout) -> Result<Found, StoreError> {
    let tree = layout.trees.checkpoint;
    let Some(raw) = layout.storage.get_raw(tree.handle, SEAL_KEY)? else {
        return Ok(Found::Absent);
    };
    let seal: Seal = match decode_record(tree.name, SEAL_KEY, &raw) {
        Ok(seal) => seal,
        Err(e) => return Ok(Found::Unusable(format!("its seal: {e}"))),
    };
    let mut bytes = Vec::with_capacity(usize::try_from(seal.bytes.min(RESERVE_LIMIT)).unwrap_or(0));
    let mut chunks = 0u32;
    let mut out_of_order = false;
    layout.storage.for_each_raw(
        tree.handle,
        &[CHUNK_PREFIX],
        &chunk_key(u32::MAX),
        |k, v| {
            out_of_order |= k != chunk_key(chunks).as_slice();
            chunks = chunks.saturating_add(1);
            bytes.extend_from_slice(v);
            Ok::<(), StoreError>(())
        },
    )?;
    if out_of_order || chunks != seal.chunks || bytes.len() as u64 != seal.bytes {
        return Ok(Found::Unusable(format!(
            "{chunks} chunks of {} bytes where its seal says {} of {}",
            bytes.len(),
            seal.chunks,
            seal.bytes
        )));
    }
    if <[u8; 32]>::from(Sha256::digest(&bytes)) != seal.sha256 {
        return Ok(Found::Unusable("its checksum does not match".into()));
    }
    let state = match decode(&bytes) {
        Ok(state) => state,
        Err(why) => return Ok(Found::Unusable(why)),
    };
    drop(bytes);
    Ok(match disagreement(layout, &state)? {
        Some(why) => Found::Unusable(why),
        None => Found::Index(Box::new(state)),
    })
}

/// How `state` disagrees with the marks, deletions and batches on disk,
/// if it does.
fn disagreement(layout: &Layout, state: &IndexState) -> Result<Option<String>, StoreError> {
    let on_disk = queue_startup::queues_at_start(layout)?;
    let of = |q: Option<&ClientQueue>| q.map_or((0, false), |q| (q.acked, q.deleted));
    for id in on_disk.keys().chain(state.clients.keys()) {
        let (disk, held) = (of(on_disk.get(id)), of(state.clients.get(id)));
        if disk != held {
            return Ok(Some(format!(
                "client {id} is acknowledged up to {} (deleted: {}) on disk, up to {} (deleted: {}) in the checkpoint",
                disk.0, disk.1, held.0, held.1
            )));
        }
    }
    let delivery = layout.trees.delivery;
    if let Some((k, _)) = layout
        .storage
        .last_raw(delivery.handle, &[layout::BATCH_PREFIX])?
    {
        let newest = layout::key_id(&k).unwrap_or(u64::MAX);
        if newest >= state.next_batch {
            return Ok(Some(format!(
                "batch {newest} is stored, but the checkpoint numbers the next batch {}",
                state.next_batch
            )));
        }
    }
    Ok(None)
}

fn chunk_key(n: u32) -> Vec<u8> {
    let mut k = vec![CHUNK_PREFIX];
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Reads the encoding, every read checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, String> {
        let (v, used) = read_varint(self.bytes).ok_or("it ends inside a number")?;
        self.bytes = &self.bytes[used..];
        Ok(v)
    }

    fn byte(&mut self) -> Result<u8, String> {
        let (first, rest) = self.bytes.split_first().ok_or("it ends early")?;
        self.bytes = rest;
        Ok(*first)
    }

    fn take(&mut self, n: u64) -> Result<&[u8], String> {
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or("it ends early")?;
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
}

/// The index encoded in `bytes` (see [`encode`]), with each batch's
/// reference count recomputed from the queues.
fn decode(bytes: &[u8]) -> Result<IndexState, String> {
    let mut r = Reader { bytes };
    let format = r.byte()?;
    if format != FORMAT {
        return Err(format!("it has format {format}; this build reads {FORMAT}"));
    }
    let next_batch = r.varint()?;
    let count = r.varint()?;
    let mut clients = HashMap::new();
    let mut refs: HashMap<u64, u64> = HashMap::new();
    for _ in 0..count {
        let len = r.varint()?;
        let id = ClientId::new(r.take(len)?).map_err(|e| format!("a client id: {e}"))?;
        let acked = r.varint()?;
        let deleted = match r.byte()? {
            0 => false,
            1 => true,
            other => return Err(format!("client {id} has deletion flag {other}")),
        };
        let n = r.varint()?;
        if acked
            .checked_add(n)
            .and_then(|s| s.checked_add(1))
            .is_none()
        {
            return Err(format!("client {id}'s sequence numbers overflow"));
        }
        let mut q = ClientQueue::new(acked);
        q.deleted = deleted;
        let mut previous = 0u64;
        // Consecutive entries mostly share a batch: counted per run.
        let mut run: Option<(u64, u64)> = None;
        for _ in 0..n {
            let id = previous.wrapping_add(unzigzag(r.varint()?));
            previous = id;
            q.ids.push_back(id);
            let batch = layout::batch_of(id);
            run = match run {
                Some((b, k)) if b == batch => Some((b, k + 1)),
                Some((b, k)) => {
                    *refs.entry(b).or_default() += k;
                    Some((batch, 1))
                }
                None => Some((batch, 1)),
            };
        }
        if let Some((b, k)) = run {
            *refs.entry(b).or_default() += k;
        }
        q.visible = q.next_seq() - 1;
        if clients.insert(id.clone(), q).is_some() {
            return Err(format!("client {id} appears twice"));
        }
    }
    let count = r.varint()?;
    let mut batches = Vec::new();
    let mut number = 0u64;
    for i in 0..count {
        let step = r.varint()?;
        if i > 0 && step == 0 {
            return Err(format!("batch {number} appears twice"));
        }
        number = number
            .checked_add(step)
            .filter(|n| *n < next_batch)
            .ok_or("a batch is numbered past the next batch number")?;
        let messages = u32::try_from(r.varint()?).map_err(|_| "a batch's message count")?;
        let stored_ms = r.varint()?;
        let refs = refs.remove(&number).unwrap_or(0);
        if refs == 0 {
            return Err(format!(
                "batch {number} is listed but no queue entry refers to it"
            ));
        }
        batches.push((
            number,
            BatchMeta {
                refs,
                messages,
                stored_ms,
            },
        ));
    }
    if let Some(batch) = refs.keys().next() {
        return Err(format!(
            "queue entries refer to batch {batch}, which is not listed"
        ));
    }
    if !r.bytes.is_empty() {
        return Err(format!("{} bytes follow its end", r.bytes.len()));
    }
    let mut state = IndexState::new(clients, next_batch);
    state.batches = batches.into_iter().collect::<BTreeMap<_, _>>();
    Ok(state)
}

/// How the checkpoint in the database differs from `scanned` (the index
/// rebuilt from the batches), for `mls-ds check`; `None` if there is no
/// checkpoint or it matches.
pub(crate) fn compare(layout: &Layout, scanned: &IndexState) -> Result<Option<String>, StoreError> {
    let held = match read(layout)? {
        Found::Absent => return Ok(None),
        Found::Unusable(why) => {
            return Ok(Some(format!(
            "the queue index checkpoint cannot be used ({why}); the next start rebuilds the index"
        )))
        }
        Found::Index(state) => state,
    };
    let same = |a: Option<&ClientQueue>, b: Option<&ClientQueue>| match (a, b) {
        (Some(a), Some(b)) => {
            (a.acked, a.deleted) == (b.acked, b.deleted)
                && a.ids.len() == b.ids.len()
                && a.ids.iter_from(0).eq(b.ids.iter_from(0))
        }
        // A queue never used is not kept in the checkpoint.
        (Some(q), None) | (None, Some(q)) => q.acked == 0 && !q.deleted && q.ids.len() == 0,
        (None, None) => true,
    };
    for id in scanned.clients.keys().chain(held.clients.keys()) {
        if !same(scanned.clients.get(id), held.clients.get(id)) {
            return Ok(Some(format!(
                "the queue index checkpoint differs from the stored queue of {id}"
            )));
        }
    }
    if scanned.batches != held.batches {
        return Ok(Some(
            "the queue index checkpoint differs from the stored batches".into(),
        ));
    }
    if held.next_batch < scanned.next_batch {
        return Ok(Some(format!(
            "the queue index checkpoint numbers the next batch {}, but batch {} is stored",
            held.next_batch,
            scanned.next_batch - 1
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sled::queue_startup::{Decode, Source};
    use crate::backend::sled::tests::{
        delete, delivery, id, open, open_with_depth, register, send, seqs, TUNING,
    };
    use crate::backend::write_set::WriteSet;
    use crate::backend::Backend;

    /// One queue as an index holds it.
    #[derive(Debug, PartialEq, PartialOrd)]
    struct QueueSummary {
        client: String,
        acked: u64,
        visible: u64,
        deleted: bool,
        ids: Vec<u64>,
    }

    /// Every queue an index holds (but those never used), in client order.
    fn queues(s: &IndexState) -> Vec<QueueSummary> {
        let mut queues: Vec<QueueSummary> = s
            .clients
            .iter()
            .filter(|(_, q)| q.acked > 0 || q.deleted || q.ids.len() > 0)
            .map(|(id, q)| QueueSummary {
                client: id.to_string(),
                acked: q.acked,
                visible: q.visible,
                deleted: q.deleted,
                ids: q.ids.iter_from(0).collect(),
            })
            .collect();
        queues.sort_by(|a, b| a.client.cmp(&b.client));
        queues
    }

    /// Queues of every kind: shared batches, acknowledged, deleted, full.
    async fn fill(dir: &std::path::Path) {
        let (a, c, d, e) = (id("a"), id("c"), id("d"), id("e"));
        let b = open_with_depth(dir, 6);
        register(&b, &d).await;
        for i in 0..5 {
            send(&b, 100 + i, &[&a, &c]).await;
        }
        let together = WriteSet {
            deliveries: (0..3).map(|i| delivery(150 + i, &[&a, &e])).collect(),
            ..WriteSet::default()
        };
        b.submit(together).wait().await.unwrap();
        send(&b, 200, &[&d]).await;
        b.ack(&a, 2).wait().await.unwrap();
        b.ack(&c, 5).wait().await.unwrap();
        delete(&b, &d).await;
        for i in 0..8 {
            send(&b, 300 + i, &[&e]).await;
        }
        b.shut_down().await.unwrap();
        let refused = b
            .submit(WriteSet {
                deliveries: vec![delivery(400, &[&a])],
                ..WriteSet::default()
            })
            .wait()
            .await;
        assert!(refused.is_err(), "nothing is written after the checkpoint");
    }

    #[tokio::test]
    async fn a_clean_stop_leaves_the_index_the_next_start_reads_then_removes() {
        let dir = tempfile::tempdir().unwrap();
        fill(dir.path()).await;
        {
            let l = Layout::open(dir.path(), TUNING).unwrap();
            let scanned = queue_startup::load(&l, Decode::Fanout).unwrap();
            let started = queue_startup::start(&l).unwrap();
            assert_eq!(started.source, Source::Checkpoint);
            assert_eq!(queues(&started.state), queues(&scanned.state));
            assert_eq!(started.state.batches, scanned.state.batches);
            assert!(started.state.next_batch >= scanned.state.next_batch);
            let report = queue_startup::verify(&l);
            assert!(report.problems.is_empty(), "{:?}", report.problems);
        }
        let (a, e) = (id("a"), id("e"));
        {
            let b = open(dir.path());
            let tree = b.layout.trees.checkpoint.handle;
            assert!(
                b.layout.storage.scan_raw(tree, b"").unwrap().is_empty(),
                "the start removed it"
            );
            assert_eq!(seqs(&b, &a, 0).await, vec![3, 4, 5, 6, 7, 8]);
            assert_eq!(seqs(&b, &e, 0).await, (6..=11).collect::<Vec<_>>());
            send(&b, 500, &[&a]).await;
            assert_eq!(seqs(&b, &a, 8).await, vec![9]);
            // Dropped without a stop, as in a crash: no checkpoint, and the
            // next start reads the batches, the new message with them.
        }
        let l = Layout::open(dir.path(), TUNING).unwrap();
        let started = queue_startup::start(&l).unwrap();
        assert_eq!(started.source, Source::Batches);
        let a_queue = &started.state.clients[&a];
        assert_eq!((a_queue.acked, a_queue.ids.len()), (2, 7));
    }

    #[tokio::test]
    async fn a_checkpoint_that_disagrees_or_is_damaged_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        fill(dir.path()).await;
        let a = id("a");
        let l = Layout::open(dir.path(), TUNING).unwrap();
        // An acknowledgement written by other means than this server.
        let delivery_tree = l.trees.delivery.handle;
        let s = &l.storage;
        s.put_raw(delivery_tree, &layout::ack_key(&a), &4u64.to_be_bytes())
            .unwrap();
        let Found::Unusable(why) = read(&l).unwrap() else {
            panic!("a stale checkpoint was accepted");
        };
        assert!(why.contains("client a"), "{why}");
        let started = queue_startup::start(&l).unwrap();
        assert_eq!(started.source, Source::Batches);
        assert_eq!(started.state.clients[&a].acked, 4);
        let report = queue_startup::verify(&l);
        assert!(
            report.problems.iter().any(|p| p.contains("checkpoint")),
            "{:?}",
            report.problems
        );
        // A damaged chunk, with the marks back as they were.
        s.put_raw(delivery_tree, &layout::ack_key(&a), &2u64.to_be_bytes())
            .unwrap();
        assert!(matches!(read(&l).unwrap(), Found::Index(_)));
        s.put_raw(l.trees.checkpoint.handle, &chunk_key(0), b"\x01\x02")
            .unwrap();
        let Found::Unusable(why) = read(&l).unwrap() else {
            panic!("a damaged checkpoint was accepted");
        };
        assert!(why.contains("bytes"), "{why}");
        // Removed, it is gone.
        assert!(discard(&l).unwrap());
        assert!(matches!(read(&l).unwrap(), Found::Absent));
    }

    #[tokio::test]
    async fn a_batch_newer_than_the_checkpoint_makes_it_unusable() {
        let dir = tempfile::tempdir().unwrap();
        fill(dir.path()).await;
        let l = Layout::open(dir.path(), TUNING).unwrap();
        let Found::Index(state) = read(&l).unwrap() else {
            panic!("no checkpoint");
        };
        let newer = layout::batch_key(state.next_batch);
        let oldest = queue_startup::load(&l, Decode::Fanout).unwrap();
        let first = *oldest.state.batches.keys().next().unwrap();
        let value = l
            .storage
            .get_raw(l.trees.delivery.handle, &layout::batch_key(first))
            .unwrap()
            .unwrap();
        l.storage
            .put_raw(l.trees.delivery.handle, &newer, &value)
            .unwrap();
        let Found::Unusable(why) = read(&l).unwrap() else {
            panic!("a checkpoint older than a batch was accepted");
        };
        assert!(why.contains("next batch"), "{why}");
    }

    #[test]
    fn every_truncation_and_extension_of_an_encoding_is_refused() {
        let mut s = IndexState::new(HashMap::new(), 9);
        let a = ClientId::new("a").unwrap();
        for (n, slot) in [(3u64, 0u32), (3, 1), (5, 0), (8, 2)] {
            s.assign(
                layout::message_id(n, slot),
                vec![a.clone()],
                n * 10,
                u64::MAX,
            );
        }
        s.client(&a).ids.push_front(layout::message_id(2, 7));
        s.batches.insert(
            2,
            BatchMeta {
                refs: 1,
                messages: 1,
                stored_ms: 20,
            },
        );
        // A checkpoint is written once everything is durable.
        let q = s.client(&a);
        q.visible = q.next_seq() - 1;
        let bytes = encode(&s);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.batches, s.batches);
        assert_eq!(queues(&back), queues(&s));
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }
}
