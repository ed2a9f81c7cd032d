//! The queue index's checkpoint, so that a start need not read every
//! stored delivery batch. Over 500 lines because the encoding, its
//! chunked write under generations and the reading that checks each step
//! are one format: split, the key layout, the seal and the field order
//! would each be spelled out on both sides.
//!
//! Without it a start rebuilds the index from every envelope's fan-out
//! (`queue_startup::load`), which reads the whole delivery tree: about a
//! second per three million queued messages from a warm page cache, and
//! what the disk takes to read gigabytes from a cold one. The checkpoint
//! holds what the index holds (each queue's mark, deletion and message
//! ids, each referenced batch's message count and age, the next batch
//! number) in one to two bytes per queued entry. The writer thread writes
//! it between two cycles every `--index-checkpoint-every-ops` jobs, and as
//! its last job at a graceful stop (`Job::Close`).
//!
//! A start takes the checkpoint and brings it up to date from what is
//! cheap to read (`queue_startup::start`): each queue's acknowledgement
//! mark and deletion on disk, then the batches numbered from its next batch
//! number on. That is exact because every way an entry leaves a queue
//! (acknowledgement, expiry, overflow, the client's deletion) moves the
//! queue's mark, and a batch is removed only in a write after the marks
//! that freed it; every entry added is in a batch written after the
//! checkpoint, numbered at or past its next number. The checkpoint is
//! written after every write of the state it describes, so sled, which
//! recovers a prefix of its log, never recovers it without them. Its chunks
//! are written as they are encoded, under a new generation, then the seal
//! (their generation, length and SHA-256), then the previous generation's
//! chunks are removed: a crash leaves one whole checkpoint or the other,
//! and only one 64 KiB chunk of the encoding is ever held. A damaged
//! checkpoint, or one the database cannot have followed from, is logged,
//! removed and ignored: the index is rebuilt from every batch.
//!
//! `mls-ds check` on a stopped server compares the index from the
//! checkpoint with the full rebuild. The message id at each queue's mark
//! is not held: a start takes it from the mark on disk.

use std::collections::{BTreeMap, HashMap};

use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::decode_record;
use sha2::{Digest, Sha256};

use super::id_deque::{put_varint, read_varint, unzigzag, zigzag};
use super::layout::{self, Layout, Mark};
use super::queue_index::{BatchMeta, ClientQueue, IndexState};
use crate::backend::error::StoreError;

/// Version of the encoding, its first byte.
const FORMAT: u8 = 1;
/// Bytes per stored chunk: well below sled's blob size (a chunk stays in
/// its log) and few keys for a large index.
const CHUNK_BYTES: usize = 64 * 1024;
const SEAL_KEY: &[u8] = b"s";
const CHUNK_PREFIX: u8 = b'c';

/// What says that a generation's chunks are whole: written after them.
#[derive(bincode::Encode, bincode::Decode)]
struct Seal {
    generation: u32,
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
    /// No checkpoint (a new database, or one the server never ran long
    /// enough on to write one).
    Absent,
    /// One that cannot be used, and why.
    Unusable(String),
    /// The index it holds, as it was written.
    Index(Box<IndexState>),
}

/// Cuts the encoding into chunks and hands each to `sink` as soon as it is
/// full: only one chunk is ever held (the whole encoding is 17 MB at
/// 10,000,000 queued entries, which the allocator would keep afterwards).
/// The first error of the sink ends the writing and is returned by
/// [`ChunkWriter::finish`].
struct ChunkWriter<'s, E> {
    open: Vec<u8>,
    bytes: usize,
    scratch: Vec<u8>,
    sink: &'s mut dyn FnMut(&[u8]) -> Result<(), E>,
    failed: Option<E>,
}

impl<'s, E> ChunkWriter<'s, E> {
    fn new(sink: &'s mut dyn FnMut(&[u8]) -> Result<(), E>) -> Self {
        ChunkWriter {
            open: Vec::with_capacity(CHUNK_BYTES),
            bytes: 0,
            scratch: Vec::with_capacity(10),
            sink,
            failed: None,
        }
    }

    fn bytes(&mut self, mut b: &[u8]) {
        self.bytes += b.len();
        while !b.is_empty() {
            let room = CHUNK_BYTES - self.open.len();
            let (head, rest) = b.split_at(room.min(b.len()));
            self.open.extend_from_slice(head);
            b = rest;
            if self.open.len() == CHUNK_BYTES {
                self.hand_over();
            }
        }
    }

    fn varint(&mut self, v: u64) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        put_varint(&mut scratch, v);
        self.bytes(&scratch);
        self.scratch = scratch;
    }

    fn hand_over(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = (self.sink)(&self.open) {
                self.failed = Some(e);
            }
        }
        self.open.clear();
    }

    /// The encoding's length in bytes.
    fn finish(mut self) -> Result<usize, E> {
        if !self.open.is_empty() {
            self.hand_over();
        }
        match self.failed {
            Some(e) => Err(e),
            None => Ok(self.bytes),
        }
    }
}

/// Encode `state` into chunks of at most [`CHUNK_BYTES`], each handed to
/// `sink` in order; returns the encoding's length.
fn encode<E>(state: &IndexState, sink: &mut dyn FnMut(&[u8]) -> Result<(), E>) -> Result<usize, E> {
    let mut out = ChunkWriter::new(sink);
    out.bytes(&[FORMAT]);
    out.varint(state.next_batch);
    // A queue never used (no entry, no mark, not deleted) is what a start
    // assumes for a client it does not know.
    let kept = |q: &&ClientQueue| q.acked > 0 || q.deleted || q.ids.len() > 0;
    out.varint(state.clients.values().filter(kept).count() as u64);
    for (id, q) in state.clients.iter().filter(|(_, q)| kept(q)) {
        out.varint(id.as_bytes().len() as u64);
        out.bytes(id.as_bytes());
        out.varint(q.acked);
        out.bytes(&[u8::from(q.deleted)]);
        out.varint(q.ids.len() as u64);
        let mut previous = 0u64;
        for id in q.ids.iter_from(0) {
            out.varint(zigzag(id.wrapping_sub(previous)));
            previous = id;
        }
    }
    out.varint(state.batches.len() as u64);
    let mut previous = 0u64;
    for (number, meta) in &state.batches {
        out.varint(number - previous);
        out.varint(u64::from(meta.messages));
        out.varint(meta.stored_ms);
        previous = *number;
    }
    out.finish()
}

/// Encode `state` (taken under the index lock) and store it as the
/// checkpoint, in place of the previous one (not flushed: the caller's
/// flush makes it durable).
///
/// The chunks go under a new generation, each its own write as it is
/// encoded; then the seal naming that generation; then the previous
/// generation's chunks are removed. Sled recovers a prefix of these
/// writes, so a crash at any point leaves a seal whose chunks are whole:
/// the previous one before the new seal, the new one after it.
pub(crate) fn write(layout: &Layout, state: &IndexState) -> Result<Written, StoreError> {
    let tree = layout.trees.checkpoint;
    let storage = &layout.storage;
    let previous = match storage.get_raw(tree.handle, SEAL_KEY)? {
        Some(raw) => decode_record::<Seal>(tree.name, SEAL_KEY, &raw)
            .ok()
            .map(|seal| seal.generation),
        None => None,
    };
    // Chunks of no sealed generation (a write a crash cut short, or a
    // damaged seal's) go first: the new generation's keys must be free.
    remove_chunks(layout, |generation| Some(generation) != previous)?;
    let generation = previous.map_or(0, |g| g.wrapping_add(1));
    let mut chunks = 0u32;
    let mut hash = Sha256::new();
    let mut sink = |chunk: &[u8]| -> Result<(), StoreError> {
        hash.update(chunk);
        storage.put_raw(tree.handle, &chunk_key(generation, chunks), chunk)?;
        chunks += 1;
        Ok(())
    };
    let bytes = encode(state, &mut sink)?;
    let seal = Seal {
        generation,
        bytes: bytes as u64,
        chunks,
        sha256: hash.finalize().into(),
    };
    storage.put_raw(tree.handle, SEAL_KEY, &layout::encode(tree, &seal)?)?;
    remove_chunks(layout, |g| g != generation)?;
    Ok(Written {
        bytes,
        entries: state.entries(),
    })
}

/// Remove every chunk whose generation `gone` picks.
fn remove_chunks(layout: &Layout, gone: impl Fn(u32) -> bool) -> Result<(), StoreError> {
    let tree = layout.trees.checkpoint.handle;
    let mut keys = Vec::new();
    layout.storage.for_each_raw(
        tree,
        &[CHUNK_PREFIX],
        &chunk_key(u32::MAX, u32::MAX),
        |k, _| {
            if chunk_generation(k).is_none_or(&gone) {
                keys.push(k.to_vec());
            }
            Ok::<(), StoreError>(())
        },
    )?;
    for k in keys {
        layout.storage.remove_raw(tree, &k)?;
    }
    Ok(())
}

/// Remove the checkpoint, durably (a start that could not use it: the
/// index it then builds may number new batches below the checkpoint's next
/// one, which a later start would not replay).
pub(crate) fn discard(layout: &Layout) -> Result<(), StoreError> {
    let tree = layout.trees.checkpoint;
    let tx = layout.storage.begin();
    for (k, _) in layout.storage.scan_raw(tree.handle, b"")? {
        tx.remove_raw(tree.handle, &k)?;
    }
    tx.commit()?;
    layout.store.flush()?;
    Ok(())
}

/// Read the checkpoint, if any.
pub(crate) fn read(layout: &Layout) -> Result<Found, StoreError> {
    let tree = layout.trees.checkpoint;
    let Some(raw) = layout.storage.get_raw(tree.handle, SEAL_KEY)? else {
        return Ok(Found::Absent);
    };
    let seal: Seal = match decode_record(tree.name, SEAL_KEY, &raw) {
        Ok(seal) => seal,
        Err(e) => return Ok(Found::Unusable(format!("its seal: {e}"))),
    };
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0u64;
    let mut out_of_order = false;
    let generation = seal.generation;
    layout.storage.for_each_raw(
        tree.handle,
        &chunk_key(generation, 0),
        &chunk_key(generation, u32::MAX),
        |k, v| {
            let n = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
            out_of_order |= k != chunk_key(generation, n).as_slice();
            bytes += v.len() as u64;
            chunks.push(v.to_vec());
            Ok::<(), StoreError>(())
        },
    )?;
    if out_of_order || chunks.len() as u64 != u64::from(seal.chunks) || bytes != seal.bytes {
        return Ok(Found::Unusable(format!(
            "{} chunks of {bytes} bytes where its seal says {} of {}",
            chunks.len(),
            seal.chunks,
            seal.bytes
        )));
    }
    let mut hash = Sha256::new();
    for c in &chunks {
        hash.update(c);
    }
    if <[u8; 32]>::from(hash.finalize()) != seal.sha256 {
        return Ok(Found::Unusable("its checksum does not match".into()));
    }
    Ok(match decode(&chunks) {
        Ok(state) => Found::Index(Box::new(state)),
        Err(why) => Found::Unusable(why),
    })
}

/// A chunk's key: its generation, then its number, big-endian so that a
/// generation's chunks are one range in order.
fn chunk_key(generation: u32, n: u32) -> Vec<u8> {
    let mut k = vec![CHUNK_PREFIX];
    k.extend_from_slice(&generation.to_be_bytes());
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The generation in a chunk's key, if it is one.
fn chunk_generation(key: &[u8]) -> Option<u32> {
    match key {
        [CHUNK_PREFIX, g0, g1, g2, g3, _, _, _, _] => {
            Some(u32::from_be_bytes([*g0, *g1, *g2, *g3]))
        }
        _ => None,
    }
}

/// Reads the encoding across its chunks, every read checked.
struct Reader<'a> {
    chunks: &'a [Vec<u8>],
    chunk: usize,
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        loop {
            let chunk = self.chunks.get(self.chunk).ok_or("it ends early")?;
            if let Some(b) = chunk.get(self.at) {
                self.at += 1;
                return Ok(*b);
            }
            self.chunk += 1;
            self.at = 0;
        }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut bytes = [0u8; 10];
        for (i, slot) in bytes.iter_mut().enumerate() {
            *slot = self.byte()?;
            if *slot & 0x80 == 0 {
                let (v, _) = read_varint(&bytes[..=i]).ok_or("a number runs past 64 bits")?;
                return Ok(v);
            }
        }
        Err("a number runs past 64 bits".into())
    }

    fn take(&mut self, n: u64) -> Result<Vec<u8>, String> {
        // Client ids: at most a few hundred bytes; a larger length is
        // damage, refused before anything is reserved.
        if n > 1024 {
            return Err(format!("a client id of {n} bytes"));
        }
        (0..n).map(|_| self.byte()).collect()
    }

    /// Whether every byte was read.
    fn at_end(&self) -> bool {
        self.chunks
            .get(self.chunk)
            .is_none_or(|c| self.at >= c.len())
            && self
                .chunks
                .iter()
                .skip(self.chunk + 1)
                .all(|c| c.is_empty())
    }
}

/// The index encoded in `chunks` (see [`encode`]), with each batch's
/// reference count recomputed from the queues.
fn decode(chunks: &[Vec<u8>]) -> Result<IndexState, String> {
    let mut r = Reader {
        chunks,
        chunk: 0,
        at: 0,
    };
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
        let id = ClientId::new(&r.take(len)?).map_err(|e| format!("a client id: {e}"))?;
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
        // The message id at the mark is not kept: the start takes it
        // from the mark on disk (`IndexState::catch_up`).
        let mut q = ClientQueue::new(Mark { seq: acked, id: 0 });
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
    if !r.at_end() {
        return Err("bytes follow its end".into());
    }
    let mut state = IndexState::new(clients, next_batch);
    state.batches = batches.into_iter().collect::<BTreeMap<_, _>>();
    Ok(state)
}

/// How `from_checkpoint` (the index a start takes from the checkpoint)
/// differs from `scanned` (the index rebuilt from every batch), if it does.
pub(crate) fn differences(scanned: &IndexState, from_checkpoint: &IndexState) -> Option<String> {
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
    let clients = scanned.clients.keys().chain(from_checkpoint.clients.keys());
    for id in clients {
        if !same(scanned.clients.get(id), from_checkpoint.clients.get(id)) {
            return Some(format!(
                "the queue index from its checkpoint differs from the stored queue of {id}"
            ));
        }
    }
    // A batch's message count and age are kept for metrics and expiry;
    // the live index does not keep them exact in every case (a batch freed
    // and recreated within one cycle), so only the batches referenced and
    // their references must match.
    let referenced = |s: &IndexState| -> Vec<(u64, u64)> {
        s.batches.iter().map(|(n, b)| (*n, b.refs)).collect()
    };
    if referenced(scanned) != referenced(from_checkpoint) {
        return Some("the queue index from its checkpoint differs from the stored batches".into());
    }
    if from_checkpoint.next_batch < scanned.next_batch {
        return Some(format!(
            "the queue index from its checkpoint numbers the next batch {}, but batch {} is stored",
            from_checkpoint.next_batch,
            scanned.next_batch - 1
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sled::queue_startup::{self, Decode, Loaded, Serving, Source};
    use crate::backend::sled::tests::{
        client_record, delete, delivery, id, open_with, register, send, seqs, TUNING,
    };
    use crate::backend::sled::SledBackend;
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

    /// An index's encoding in its chunks, and its length.
    fn chunks_of(s: &IndexState) -> (Vec<Vec<u8>>, usize) {
        let mut chunks = Vec::new();
        let bytes = encode(s, &mut |c: &[u8]| {
            chunks.push(c.to_vec());
            Ok::<(), ()>(())
        })
        .unwrap();
        (chunks, bytes)
    }

    /// The generation the seal names.
    fn generation(l: &Layout) -> u32 {
        let tree = l.trees.checkpoint;
        let raw = l.storage.get_raw(tree.handle, SEAL_KEY).unwrap().unwrap();
        decode_record::<Seal>(tree.name, SEAL_KEY, &raw)
            .unwrap()
            .generation
    }

    /// The start's index equals the rebuild from every batch.
    fn assert_same(started: &Loaded, scanned: &Loaded) {
        assert_eq!(queues(&started.state), queues(&scanned.state));
        assert_eq!(started.state.batches, scanned.state.batches);
        assert!(started.state.next_batch >= scanned.state.next_batch);
        let sorted = |v: &[u64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v
        };
        assert_eq!(sorted(&started.orphans), sorted(&scanned.orphans));
    }

    /// Queues of every kind: shared batches, acknowledged, deleted, full.
    async fn fill(b: &SledBackend, round: u64) {
        let (a, c, d, e) = (id("a"), id("c"), id("d"), id("e"));
        let d = id(&format!("{d}{round}"));
        register(b, &d).await;
        for i in 0..5 {
            send(b, 100 + i, &[&a, &c]).await;
        }
        let together = WriteSet {
            deliveries: (0..3).map(|i| delivery(150 + i, &[&a, &e])).collect(),
            ..WriteSet::default()
        };
        b.submit(together).wait().await.unwrap();
        send(b, 200, &[&d]).await;
        let acked = b.page(&a, 0, 2, 1 << 20).await.unwrap().entries[1].seq;
        b.ack(&a, acked).wait().await.unwrap();
        let head = b.page(&c, 0, 100, 1 << 20).await.unwrap().head;
        b.ack(&c, head).wait().await.unwrap();
        delete(b, &d).await;
        for i in 0..8 {
            send(b, 300 + i, &[&e]).await;
        }
    }

    fn started(dir: &std::path::Path) -> (Loaded, Loaded) {
        let l = Layout::open(dir, TUNING).unwrap();
        let scanned = queue_startup::load(&l, Decode::Fanout).unwrap();
        let started = queue_startup::start(&l).unwrap();
        let report = queue_startup::verify(&l, Serving::Stopped);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        (started, scanned)
    }

    #[tokio::test]
    async fn a_stop_leaves_the_index_the_next_start_reads() {
        let dir = tempfile::tempdir().unwrap();
        let a = id("a");
        {
            let b = open_with(dir.path(), 6, 0);
            fill(&b, 0).await;
            b.shut_down().await.unwrap();
            let refused = b
                .submit(WriteSet {
                    deliveries: vec![delivery(400, &[&a])],
                    ..WriteSet::default()
                })
                .wait()
                .await;
            assert!(refused.is_err(), "nothing is written after the stop");
        }
        let (started, scanned) = started(dir.path());
        assert_eq!(started.source, Source::Checkpoint);
        assert_eq!(started.envelopes, 0, "no batch was read");
        assert_same(&started, &scanned);
        let b = open_with(dir.path(), 6, 0);
        // a: 8 entries in a queue of 6 (2 dropped), 2 acknowledged.
        assert_eq!(seqs(&b, &a, 0).await, vec![5, 6, 7, 8]);
        assert_eq!(seqs(&b, &id("e"), 0).await, (6..=11).collect::<Vec<_>>());
        send(&b, 500, &[&a]).await;
        assert_eq!(seqs(&b, &a, 8).await, vec![9]);
    }

    /// Checkpoints written while running, then more of everything, then a
    /// crash (the backend dropped without a stop): the start from the
    /// newest checkpoint and the batches after it is the full rebuild.
    #[tokio::test]
    async fn a_start_after_a_crash_brings_the_checkpoint_up_to_date() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..3 {
            {
                let b = open_with(dir.path(), 6, 7);
                fill(&b, round).await;
            }
            let (started, scanned) = started(dir.path());
            assert_eq!(started.source, Source::Checkpoint, "round {round}");
            assert!(started.envelopes > 0, "the newest batches were read");
            assert!(started.envelopes < scanned.envelopes);
            assert_same(&started, &scanned);
        }
        // A mark moved after the checkpoint without the batch removal it
        // allows (a crash between the two): the batch is an orphan.
        let l = Layout::open(dir.path(), TUNING).unwrap();
        let scanned = queue_startup::load(&l, Decode::Fanout).unwrap();
        let e = id("e");
        let queue = &scanned.state.clients[&e];
        let last = queue.ids.iter_from(0).last().unwrap();
        let mark = Mark {
            seq: queue.acked + queue.ids.len() as u64,
            id: last,
        };
        let delivery_tree = l.trees.delivery.handle;
        l.storage
            .put_raw(delivery_tree, &layout::ack_key(&e), &mark.to_bytes())
            .unwrap();
        let started = queue_startup::start(&l).unwrap();
        assert_eq!(started.source, Source::Checkpoint);
        assert!(started.orphans.contains(&layout::batch_of(last)));
        assert_eq!(started.state.clients[&e].ids.len(), 0);
        assert_same(&started, &queue_startup::load(&l, Decode::Fanout).unwrap());
    }

    #[tokio::test]
    async fn a_checkpoint_the_database_cannot_follow_from_or_a_damaged_one_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = open_with(dir.path(), 6, 0);
            fill(&b, 0).await;
            b.shut_down().await.unwrap();
        }
        let l = Layout::open(dir.path(), TUNING).unwrap();
        let s = &l.storage;
        // A client the checkpoint has deleted, registered on disk.
        let d = id("d0");
        let clients = l.trees.clients;
        let deleted = s.get_raw(clients.handle, d.as_bytes()).unwrap().unwrap();
        let active = layout::encode(clients, &client_record()).unwrap();
        s.put_raw(clients.handle, d.as_bytes(), &active).unwrap();
        let report = queue_startup::verify(&l, Serving::Stopped);
        assert!(
            report.problems.iter().any(|p| p.contains("client d0")),
            "{:?}",
            report.problems
        );
        let started = queue_startup::start(&l).unwrap();
        assert_eq!(started.source, Source::Batches);
        assert!(!started.state.clients[&d].deleted);
        // The start removed it: the index it built may number new batches
        // below the checkpoint's next one, which a later start would skip.
        assert!(matches!(read(&l).unwrap(), Found::Absent));
        s.put_raw(clients.handle, d.as_bytes(), &deleted).unwrap();
        // A damaged chunk.
        let tree = l.trees.checkpoint.handle;
        let loaded = queue_startup::load(&l, Decode::Fanout).unwrap();
        write(&l, &loaded.state).unwrap();
        assert_eq!(queue_startup::start(&l).unwrap().source, Source::Checkpoint);
        s.put_raw(tree, &chunk_key(generation(&l), 0), b"\x01\x02")
            .unwrap();
        let Found::Unusable(why) = read(&l).unwrap() else {
            panic!("a damaged checkpoint was accepted");
        };
        assert!(why.contains("bytes"), "{why}");
        assert_eq!(queue_startup::start(&l).unwrap().source, Source::Batches);
        // A write a crash cut short before its seal: the sealed
        // checkpoint is whole, and the next write replaces the strays.
        write(&l, &loaded.state).unwrap();
        let sealed = generation(&l);
        s.put_raw(tree, &chunk_key(sealed + 1, 0), b"cut").unwrap();
        assert!(matches!(read(&l).unwrap(), Found::Index(_)));
        write(&l, &loaded.state).unwrap();
        assert_eq!(generation(&l), sealed + 1);
        assert_only_sealed_chunks(&l);
        // A damaged seal, strays of the generation the next write takes
        // and of others, and a key of no chunk: that checkpoint still
        // consists of its own chunks only.
        s.put_raw(tree, SEAL_KEY, b"junk").unwrap();
        s.put_raw(tree, &chunk_key(0, 7), b"old").unwrap();
        s.put_raw(tree, &chunk_key(5, 0), b"old").unwrap();
        s.put_raw(tree, b"c\x00", b"old").unwrap();
        write(&l, &loaded.state).unwrap();
        assert_eq!(generation(&l), 0);
        assert!(matches!(read(&l).unwrap(), Found::Index(_)));
        assert_only_sealed_chunks(&l);
    }

    /// The tree holds the seal and its generation's chunks, nothing else.
    fn assert_only_sealed_chunks(l: &Layout) {
        let tree = l.trees.checkpoint;
        let raw = l.storage.get_raw(tree.handle, SEAL_KEY).unwrap().unwrap();
        let seal: Seal = decode_record(tree.name, SEAL_KEY, &raw).unwrap();
        let mut expected: Vec<Vec<u8>> = (0..seal.chunks)
            .map(|n| chunk_key(seal.generation, n))
            .collect();
        expected.push(SEAL_KEY.to_vec());
        let keys: Vec<Vec<u8>> = l
            .storage
            .scan_raw(tree.handle, b"")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn a_large_index_spans_chunks_and_reads_back_whole() {
        let mut s = IndexState::new(HashMap::new(), 1);
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        for n in 0..60_000u64 {
            let batch = s.new_batch();
            let to = if n % 3 == 0 {
                vec![a.clone(), b.clone()]
            } else {
                vec![a.clone()]
            };
            s.assign(layout::message_id(batch, 0), to, n, u64::MAX);
        }
        for q in s.clients.values_mut() {
            q.visible = q.next_seq() - 1;
        }
        let (chunks, bytes) = chunks_of(&s);
        assert!(chunks.len() > 1, "{bytes} bytes");
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_BYTES));
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), bytes);
        let back = decode(&chunks).unwrap();
        assert_eq!(queues(&back), queues(&s));
        assert_eq!(back.batches, s.batches);
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
        // Entries are read back as durable.
        let q = s.client(&a);
        q.visible = q.next_seq() - 1;
        let bytes = chunks_of(&s).0.concat();
        let back = decode(std::slice::from_ref(&bytes)).unwrap();
        assert_eq!(back.batches, s.batches);
        assert_eq!(queues(&back), queues(&s));
        // Numbers and ids read across chunk boundaries.
        for size in [1, 2, 3, 7] {
            let pieces: Vec<Vec<u8>> = bytes.chunks(size).map(<[u8]>::to_vec).collect();
            assert_eq!(
                queues(&decode(&pieces).unwrap()),
                queues(&s),
                "chunks of {size}"
            );
        }
        for len in 0..bytes.len() {
            assert!(decode(&[bytes[..len].to_vec()]).is_err(), "cut at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&[longer]).is_err());
        assert!(decode(&[bytes, vec![0]]).is_err());
    }
}
