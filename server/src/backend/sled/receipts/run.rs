//! One frozen run of send receipts: its entries (`entry.rs`) sorted by
//! hash and stored in chunks of about 6 KiB, the first hash of each chunk
//! (its fences, kept in memory with the header) and a Bloom filter
//! (`bloom.rs`) stored in parts of 64 KiB; building one, finding a receipt
//! in it, reading it in order, checking it.
//!
//! | key in `app.ds.sends` | value |
//! | --- | --- |
//! | `'h' ++ run u64 BE` | [`RunHeader`] (bincode 2) |
//! | `'c' ++ run u64 BE ++ chunk u32 BE` | `0x01 ++ ([hash u64 BE] entry)*`, sorted by hash, then key |
//! | `'f' ++ run u64 BE ++ part u32 BE` | the Bloom filter's words (u64 LE), 64 KiB per part |

use std::sync::Arc;

use super::bloom::Bloom;
use super::entry::{created_ms, hash_of, put_entry, ChunkEntries, OwnedEntry, FORMAT};

use crate::backend::error::StoreError;
use crate::backend::records::SendReceipt;
use crate::backend::sled::layout::{self, Layout, Tree};

/// A chunk is closed once it holds this many bytes: sled keeps a node's
/// keys in one log message, which should stay under its 128 KiB blob limit.
const CHUNK_BYTES: usize = 6 * 1024;
const PART_BYTES: usize = 64 * 1024;

pub(super) const HEADER: u8 = b'h';
const CHUNK: u8 = b'c';
const FILTER: u8 = b'f';

/// What a run's header stores.
#[derive(bincode::Encode, bincode::Decode)]
pub(super) struct RunHeader {
    entries: u64,
    /// Newest creation time of its send ids: the run is forgotten whole
    /// once that is past the window.
    newest_created_ms: u64,
    bloom_words: u64,
    /// First hash of each chunk.
    fences: Vec<u64>,
}

/// A run's entries in order, read one chunk at a time.
pub(super) struct Stream {
    layout: Layout,
    run: Arc<Run>,
    next_chunk: usize,
    chunk: Vec<u8>,
    pos: usize,
}

impl Stream {
    /// The entries of `run`, from its first.
    pub(super) fn of(run: &Arc<Run>, layout: &Layout) -> Stream {
        Stream {
            layout: layout.clone(),
            run: run.clone(),
            next_chunk: 0,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Iterator for Stream {
    type Item = Result<OwnedEntry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.pos >= self.chunk.len() {
            if self.next_chunk >= self.run.fences.len() {
                return None;
            }
            match self.run.chunk(&self.layout, self.next_chunk) {
                Ok(chunk) => self.chunk = chunk,
                Err(e) => {
                    self.next_chunk = self.run.fences.len();
                    return Some(Err(e));
                }
            }
            self.next_chunk += 1;
            // Past the format byte (checked by the entries' decoding).
            self.pos = usize::from(self.chunk.first() == Some(&FORMAT));
        }
        let chunk = (self.next_chunk - 1) as u32;
        let mut entries = ChunkEntries::rest_of(self.run.id, chunk, &self.chunk[self.pos..]);
        let entry = entries.next()?.map(|e| OwnedEntry::of(&e));
        self.pos = match &entry {
            Ok(_) => self.chunk.len() - entries.rest.len(),
            Err(_) => self.chunk.len(),
        };
        Some(entry)
    }
}

/// Builds a run from entries given in order (by hash, then key).
pub(super) struct RunBuilder {
    id: u64,
    tree: Tree,
    writes: Vec<(Vec<u8>, Vec<u8>)>,
    fences: Vec<u64>,
    bloom: Bloom,
    chunk: Vec<u8>,
    newest: u64,
    entries: u64,
}

impl RunBuilder {
    /// A builder for run `id` of at most `entries` entries (the filter's
    /// size).
    pub(super) fn new(id: u64, entries: usize, tree: Tree) -> RunBuilder {
        RunBuilder {
            id,
            tree,
            writes: Vec::new(),
            fences: Vec::new(),
            bloom: Bloom::for_entries(entries),
            chunk: Vec::new(),
            newest: 0,
            entries: 0,
        }
    }

    /// Add an entry.
    pub(super) fn push(&mut self, hash: u64, key: &[u8], receipt: &SendReceipt) {
        self.start(hash, created_ms(key));
        self.chunk.extend_from_slice(&hash.to_be_bytes());
        put_entry(&mut self.chunk, key, receipt);
        self.end();
    }

    /// Add an entry of another run as it is stored.
    pub(super) fn push_stored(&mut self, e: &OwnedEntry) {
        self.start(e.hash, e.created_ms());
        self.chunk.extend_from_slice(&e.encoded);
        self.end();
    }

    /// Chunks closed and not taken yet.
    pub(super) fn closed_chunks(&self) -> usize {
        self.writes.len()
    }

    /// The records of the chunks closed so far (taken: a caller writes
    /// them as the run grows, so that a big run is never held whole).
    pub(super) fn take_chunks(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        std::mem::take(&mut self.writes)
    }

    fn start(&mut self, hash: u64, created_ms: u64) {
        if self.chunk.is_empty() {
            self.chunk.push(FORMAT);
            self.fences.push(hash);
        }
        self.bloom.insert(hash);
        self.newest = self.newest.max(created_ms);
        self.entries += 1;
    }

    fn end(&mut self) {
        if self.chunk.len() >= CHUNK_BYTES {
            self.close_chunk();
        }
    }

    fn close_chunk(&mut self) {
        let n = u32::try_from(self.fences.len() - 1).unwrap_or(u32::MAX);
        let chunk = std::mem::take(&mut self.chunk);
        self.writes.push((part_key(CHUNK, self.id, n), chunk));
    }

    /// The run and the records it is stored as; none without entries.
    pub(super) fn finish(mut self) -> Result<Option<Built>, StoreError> {
        if self.entries == 0 {
            return Ok(None);
        }
        if !self.chunk.is_empty() {
            self.close_chunk();
        }
        let bytes = self.bloom.to_bytes();
        for (n, part) in bytes.chunks(PART_BYTES).enumerate() {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            self.writes
                .push((part_key(FILTER, self.id, n), part.to_vec()));
        }
        let header = RunHeader {
            entries: self.entries,
            newest_created_ms: self.newest,
            bloom_words: self.bloom.words() as u64,
            fences: self.fences,
        };
        let header_record = (
            run_key(HEADER, self.id),
            layout::encode(self.tree, &header)?,
        );
        let run = Run {
            id: self.id,
            entries: header.entries,
            newest_created_ms: header.newest_created_ms,
            fences: header.fences,
            bloom: self.bloom,
        };
        Ok(Some(Built {
            run,
            writes: self.writes,
            header: header_record,
        }))
    }
}

/// A run built, and the records to write it as.
pub(super) struct Built {
    pub(super) run: Run,
    /// Keys and values of the chunks not taken yet and the filter's parts.
    pub(super) writes: Vec<(Vec<u8>, Vec<u8>)>,
    /// Key and value of the header, which publishes the run.
    pub(super) header: (Vec<u8>, Vec<u8>),
}

/// A frozen run, as kept in memory.
pub(super) struct Run {
    pub(super) id: u64,
    pub(super) entries: u64,
    pub(super) newest_created_ms: u64,
    fences: Vec<u64>,
    bloom: Bloom,
}

fn run_key(kind: u8, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(kind);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn part_key(kind: u8, id: u64, part: u32) -> Vec<u8> {
    let mut k = run_key(kind, id);
    k.extend_from_slice(&part.to_be_bytes());
    k
}

impl Run {
    /// The run a header names, its Bloom filter read from its parts.
    pub(super) fn load(
        layout: &Layout,
        header_key: &[u8],
        value: &[u8],
    ) -> Result<Run, StoreError> {
        let tree = layout.trees.sends;
        let id = layout::key_id(header_key)
            .filter(|_| header_key.len() == 9)
            .ok_or_else(|| StoreError::Corrupt("a send receipt run's key".into()))?;
        let header: RunHeader = mls_ds_storage::codec::decode_record(tree.name, header_key, value)?;
        let mut bytes = Vec::new();
        for (_, part) in layout.storage.scan_raw(tree.handle, &run_key(FILTER, id))? {
            bytes.extend_from_slice(&part);
        }
        let bloom = usize::try_from(header.bloom_words)
            .ok()
            .and_then(|words| Bloom::from_bytes(&bytes, words))
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the Bloom filter of send receipt run {id} holds {} bytes, its header says {} words",
                    bytes.len(),
                    header.bloom_words
                ))
            })?;
        Ok(Run {
            id,
            entries: header.entries,
            newest_created_ms: header.newest_created_ms,
            fences: header.fences,
            bloom,
        })
    }

    /// The receipt stored for `key` (whose hash is `hash`) in this run.
    pub(super) fn find(
        &self,
        layout: &Layout,
        key: &[u8],
        hash: u64,
    ) -> Result<Option<SendReceipt>, StoreError> {
        if !self.bloom.may_contain(hash) {
            return Ok(None);
        }
        // Entries of this hash start in the last chunk that begins below
        // it (or the first chunk) and may go on in chunks that begin with it.
        let first_at_or_above = self.fences.partition_point(|f| *f < hash);
        let start = first_at_or_above.saturating_sub(1);
        let mut n = start;
        while n < self.fences.len() && (n == start || self.fences[n] == hash) {
            let value = self.chunk(layout, n)?;
            for e in ChunkEntries::new(self.id, n as u32, &value) {
                let e = e?;
                if e.hash == hash && e.key == key {
                    return Ok(Some(e.receipt));
                }
            }
            n += 1;
        }
        Ok(None)
    }

    /// Chunk `n`'s value.
    fn chunk(&self, layout: &Layout, n: usize) -> Result<Vec<u8>, StoreError> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let tree = layout.trees.sends;
        layout
            .storage
            .get_raw(tree.handle, &part_key(CHUNK, self.id, n))?
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "chunk {n} of send receipt run {} is missing",
                    self.id
                ))
            })
    }

    /// Every key of the chunks and filter parts of run `id`, as stored
    /// (those of a run a crash left unfinished, which has no header).
    pub(super) fn stored_parts(layout: &Layout, id: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let tree = layout.trees.sends;
        let mut keys = Vec::new();
        for kind in [CHUNK, FILTER] {
            let prefix = run_key(kind, id);
            layout.storage.for_each_raw(
                tree.handle,
                &prefix,
                &part_key(kind, id, u32::MAX),
                |k, _| {
                    keys.push(k.to_vec());
                    Ok::<(), StoreError>(())
                },
            )?;
        }
        Ok(keys)
    }

    /// Every key this run is stored under.
    pub(super) fn keys(&self) -> Vec<Vec<u8>> {
        let parts = (self.bloom.words() * 8).div_ceil(PART_BYTES);
        let mut keys = vec![run_key(HEADER, self.id)];
        keys.extend((0..self.fences.len()).map(|n| part_key(CHUNK, self.id, n as u32)));
        keys.extend((0..parts).map(|n| part_key(FILTER, self.id, n as u32)));
        keys
    }

    /// What is wrong with this run as stored: entries out of order, a hash
    /// that is not its key's, an entry the filter or the fences miss, a
    /// count that is not the header's.
    pub(super) fn problems(&self, layout: &Layout) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let mut count = 0u64;
        let mut previous: Option<(u64, Vec<u8>)> = None;
        for n in 0..self.fences.len() {
            let value = match self.chunk(layout, n) {
                Ok(value) => value,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            let mut first = true;
            for e in ChunkEntries::new(self.id, n as u32, &value) {
                let e = match e {
                    Ok(e) => e,
                    Err(e) => {
                        problems.push(e.to_string());
                        break;
                    }
                };
                if first && e.hash != self.fences[n] {
                    problems.push(format!(
                        "chunk {n} of send receipt run {} does not begin at its fence",
                        self.id
                    ));
                }
                first = false;
                count += 1;
                if e.hash != hash_of(e.key) || !self.bloom.may_contain(e.hash) {
                    problems.push(format!(
                        "send receipt run {}: an entry's hash or filter bits are wrong",
                        self.id
                    ));
                }
                if let Some((hash, key)) = &previous {
                    if (*hash, key.as_slice()) >= e.order() {
                        problems.push(format!("send receipt run {} is out of order", self.id));
                    }
                }
                previous = Some((e.hash, e.key.to_vec()));
            }
        }
        if count != self.entries {
            problems.push(format!(
                "send receipt run {} holds {count} entries, its header says {}",
                self.id, self.entries
            ));
        }
        Ok(problems)
    }

    /// Bytes of memory its filter and fences take.
    pub(super) fn memory(&self) -> usize {
        (self.bloom.words() + self.fences.len()) * 8
    }
}
