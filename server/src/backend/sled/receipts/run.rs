//! One frozen run of send receipts, and how receipts are encoded: its
//! entries sorted by hash and stored in chunks of about 6 KiB, the first
//! hash of each chunk (its fences, kept in memory with the header) and a
//! blocked Bloom filter (8 bits per entry, one 64-byte block per lookup,
//! about 3% false positives), stored in parts of 64 KiB.
//!
//! | key in `app.ds.sends` | value |
//! | --- | --- |
//! | `'h' ++ run u64 BE` | [`RunHeader`] (bincode 2) |
//! | `'c' ++ run u64 BE ++ chunk u32 BE` | `0x01 ++ ([hash u64 BE] entry)*`, sorted by hash, then key |
//! | `'f' ++ run u64 BE ++ part u32 BE` | the Bloom filter's words (u64 LE), 64 KiB per part |
//!
//! An entry is `[len u8] ++ send key ++ message_id u64 BE ++ recipients u32
//! BE`, the send key as `layout::send_key` writes it (its creation time
//! first, so an entry knows when it may be forgotten).

use sha2::{Digest, Sha256};

use crate::backend::error::StoreError;
use crate::backend::records::SendReceipt;
use crate::backend::sled::layout::{self, Layout, Tree};

/// Format byte of a chunk and of a pending record.
pub(super) const FORMAT: u8 = 1;
/// A chunk is closed once it holds this many bytes: sled keeps a node's
/// keys in one log message, which should stay under its 128 KiB blob limit.
const CHUNK_BYTES: usize = 6 * 1024;
const BLOOM_BITS_PER_ENTRY: u64 = 8;
const BLOCK_WORDS: usize = 8;
const PROBES: usize = 6;
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

/// An entry of a chunk, borrowed from the chunk's bytes (a lookup or a
/// merge allocates nothing per entry).
#[derive(Clone, Copy, Debug)]
pub(super) struct RawEntry<'a> {
    pub(super) hash: u64,
    /// The send key (`layout::send_key`).
    pub(super) key: &'a [u8],
    pub(super) receipt: SendReceipt,
    /// Hash and entry as stored.
    encoded: &'a [u8],
}

impl RawEntry<'_> {
    /// When its send id was made (the key starts with it).
    pub(super) fn created_ms(&self) -> u64 {
        created_ms(self.key)
    }

    /// The order of a run: by hash, then key.
    pub(super) fn order(&self) -> (u64, &[u8]) {
        (self.hash, self.key)
    }
}

/// When the send id of a send key was made.
pub(super) fn created_ms(key: &[u8]) -> u64 {
    key.first_chunk::<8>().map_or(0, |b| u64::from_be_bytes(*b))
}

/// The hash receipts are sorted and filtered by: the first 8 bytes of the
/// send key's SHA-256, so that nobody can make their sends collide.
pub(super) fn hash_of(key: &[u8]) -> u64 {
    let digest = Sha256::digest(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Append an entry's encoding.
pub(super) fn put_entry(out: &mut Vec<u8>, key: &[u8], receipt: &SendReceipt) {
    out.push(u8::try_from(key.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(key);
    out.extend_from_slice(&receipt.message_id.to_be_bytes());
    out.extend_from_slice(&receipt.recipients.to_be_bytes());
}

/// Read an entry at the start of `bytes`: the key, the receipt and what
/// follows.
fn take_entry(bytes: &[u8]) -> Option<(&[u8], SendReceipt, &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let (key, rest) = rest.split_at_checked(usize::from(len))?;
    let (id, rest) = rest.split_first_chunk::<8>()?;
    let (recipients, rest) = rest.split_first_chunk::<4>()?;
    let receipt = SendReceipt {
        message_id: u64::from_be_bytes(*id),
        recipients: u32::from_be_bytes(*recipients),
    };
    Some((key, receipt, rest))
}

/// The entries of a chunk's value, in order.
pub(super) struct ChunkEntries<'a> {
    rest: &'a [u8],
    run: u64,
    chunk: u32,
}

impl<'a> ChunkEntries<'a> {
    fn new(run: u64, chunk: u32, value: &'a [u8]) -> ChunkEntries<'a> {
        ChunkEntries {
            // A wrong format byte leaves a rest that does not decode.
            rest: match value.split_first() {
                Some((&FORMAT, rest)) => rest,
                _ => value,
            },
            run,
            chunk,
        }
    }
}

impl<'a> Iterator for ChunkEntries<'a> {
    type Item = Result<RawEntry<'a>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let whole = self.rest;
        let entry = whole.split_first_chunk::<8>().and_then(|(hash, after)| {
            let (key, receipt, after) = take_entry(after)?;
            Some((u64::from_be_bytes(*hash), key, receipt, after))
        });
        match entry {
            Some((hash, key, receipt, after)) => {
                self.rest = after;
                Some(Ok(RawEntry {
                    hash,
                    key,
                    receipt,
                    encoded: &whole[..whole.len() - after.len()],
                }))
            }
            None => {
                self.rest = &[];
                Some(Err(StoreError::Corrupt(format!(
                    "chunk {} of send receipt run {} does not decode",
                    self.chunk, self.run
                ))))
            }
        }
    }
}

/// A blocked Bloom filter: every hash sets [`PROBES`] bits in one block of
/// 512 bits, chosen by the hash's upper half.
pub(super) struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    fn for_entries(entries: usize) -> Bloom {
        let bits = (entries as u64).saturating_mul(BLOOM_BITS_PER_ENTRY);
        let blocks = bits.div_ceil(64 * BLOCK_WORDS as u64).max(1);
        Bloom {
            words: vec![0; usize::try_from(blocks).unwrap_or(usize::MAX) * BLOCK_WORDS],
        }
    }

    /// Word and bit of each probe.
    fn probes(&self, hash: u64) -> [(usize, u64); PROBES] {
        let blocks = (self.words.len() / BLOCK_WORDS) as u64;
        let block = (((hash >> 32) * blocks) >> 32) as usize;
        // splitmix64's finaliser: 54 more bits for the positions.
        let mut x = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        std::array::from_fn(|i| {
            let bit = ((x >> (9 * i)) & 511) as usize;
            (block * BLOCK_WORDS + bit / 64, 1u64 << (bit % 64))
        })
    }

    fn insert(&mut self, hash: u64) {
        for (w, mask) in self.probes(hash) {
            if let Some(word) = self.words.get_mut(w) {
                *word |= mask;
            }
        }
    }

    pub(super) fn may_contain(&self, hash: u64) -> bool {
        self.probes(hash)
            .iter()
            .all(|(w, mask)| self.words.get(*w).is_some_and(|v| v & mask != 0))
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
    pub(super) fn push_raw(&mut self, e: &RawEntry<'_>) {
        self.start(e.hash, e.created_ms());
        self.chunk.extend_from_slice(e.encoded);
        self.end();
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
        let bytes: Vec<u8> = self
            .bloom
            .words
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        for (n, part) in bytes.chunks(PART_BYTES).enumerate() {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            self.writes
                .push((part_key(FILTER, self.id, n), part.to_vec()));
        }
        let header = RunHeader {
            entries: self.entries,
            newest_created_ms: self.newest,
            bloom_words: self.bloom.words.len() as u64,
            fences: self.fences,
        };
        self.writes.push((
            run_key(HEADER, self.id),
            layout::encode(self.tree, &header)?,
        ));
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
        }))
    }
}

/// A run built, and the records to write it as.
pub(super) struct Built {
    pub(super) run: Run,
    /// Keys and values: chunks, filter parts, the header.
    pub(super) writes: Vec<(Vec<u8>, Vec<u8>)>,
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
        let want = usize::try_from(header.bloom_words)
            .ok()
            .and_then(|w| w.checked_mul(8));
        if want != Some(bytes.len()) || bytes.is_empty() || bytes.len() % (8 * BLOCK_WORDS) != 0 {
            return Err(StoreError::Corrupt(format!(
                "the Bloom filter of send receipt run {id} holds {} bytes, its header says {} words",
                bytes.len(),
                header.bloom_words
            )));
        }
        let words = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        Ok(Run {
            id,
            entries: header.entries,
            newest_created_ms: header.newest_created_ms,
            fences: header.fences,
            bloom: Bloom { words },
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

    /// Every chunk's value, in order.
    pub(super) fn chunks(&self, layout: &Layout) -> Result<Vec<Vec<u8>>, StoreError> {
        (0..self.fences.len())
            .map(|n| self.chunk(layout, n))
            .collect()
    }

    /// The entries of `chunks` (this run's, from [`Run::chunks`]), in order.
    pub(super) fn entries<'a>(
        &self,
        chunks: &'a [Vec<u8>],
    ) -> impl Iterator<Item = Result<RawEntry<'a>, StoreError>> + 'a {
        let id = self.id;
        chunks
            .iter()
            .enumerate()
            .flat_map(move |(n, c)| ChunkEntries::new(id, n as u32, c))
    }

    /// Every key this run is stored under.
    pub(super) fn keys(&self) -> Vec<Vec<u8>> {
        let parts = (self.bloom.words.len() * 8).div_ceil(PART_BYTES);
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
        (self.bloom.words.len() + self.fences.len()) * 8
    }
}
