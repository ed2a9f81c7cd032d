//! One frozen run of send receipts, and how receipts are encoded: its
//! entries sorted by hash and stored in chunks of about 6 KiB, the first
//! hash of each chunk (its fences, kept in memory with the header) and a
//! blocked Bloom filter (10 bits per entry, one 64-byte block per lookup,
//! about 1% false positives), stored in parts of 64 KiB.
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
const BLOOM_BITS_PER_ENTRY: u64 = 10;
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

/// A receipt with the hash it is sorted and filtered by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) hash: u64,
    /// The send key (`layout::send_key`).
    pub(super) key: Box<[u8]>,
    pub(super) receipt: SendReceipt,
}

impl Entry {
    pub(super) fn new(key: Box<[u8]>, receipt: SendReceipt) -> Entry {
        Entry {
            hash: hash_of(&key),
            key,
            receipt,
        }
    }

    /// When its send id was made (the key starts with it).
    pub(super) fn created_ms(&self) -> u64 {
        created_ms(&self.key)
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
pub(super) fn take_entry(bytes: &[u8]) -> Option<(&[u8], SendReceipt, &[u8])> {
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

/// A chunk's entries, with their hashes.
fn chunk_entries(number: (u64, u32), value: &[u8]) -> Result<Vec<Entry>, StoreError> {
    let corrupt = || {
        StoreError::Corrupt(format!(
            "chunk {} of send receipt run {} does not decode",
            number.1, number.0
        ))
    };
    let mut rest = match value.split_first() {
        Some((&FORMAT, rest)) => rest,
        _ => return Err(corrupt()),
    };
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (hash, after) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
        let (key, receipt, after) = take_entry(after).ok_or_else(corrupt)?;
        out.push(Entry {
            hash: u64::from_be_bytes(*hash),
            key: key.into(),
            receipt,
        });
        rest = after;
    }
    Ok(out)
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
    /// The run of `sorted` (by hash, then key) and the records it is stored
    /// as.
    pub(super) fn build(id: u64, sorted: &[Entry], tree: Tree) -> Result<Built, StoreError> {
        let mut writes = Vec::new();
        let mut fences = Vec::new();
        let mut bloom = Bloom::for_entries(sorted.len());
        let mut chunk = Vec::new();
        let mut newest = 0;
        for e in sorted {
            if chunk.is_empty() {
                chunk.push(FORMAT);
                fences.push(e.hash);
            }
            chunk.extend_from_slice(&e.hash.to_be_bytes());
            put_entry(&mut chunk, &e.key, &e.receipt);
            bloom.insert(e.hash);
            newest = newest.max(e.created_ms());
            if chunk.len() >= CHUNK_BYTES {
                let n = u32::try_from(fences.len() - 1).unwrap_or(u32::MAX);
                writes.push((part_key(CHUNK, id, n), std::mem::take(&mut chunk)));
            }
        }
        if !chunk.is_empty() {
            let n = u32::try_from(fences.len() - 1).unwrap_or(u32::MAX);
            writes.push((part_key(CHUNK, id, n), chunk));
        }
        let bytes: Vec<u8> = bloom.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for (n, part) in bytes.chunks(PART_BYTES).enumerate() {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            writes.push((part_key(FILTER, id, n), part.to_vec()));
        }
        let header = RunHeader {
            entries: sorted.len() as u64,
            newest_created_ms: newest,
            bloom_words: bloom.words.len() as u64,
            fences,
        };
        writes.push((run_key(HEADER, id), layout::encode(tree, &header)?));
        let run = Run {
            id,
            entries: header.entries,
            newest_created_ms: newest,
            fences: header.fences,
            bloom,
        };
        Ok(Built { run, writes })
    }

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
            for e in self.chunk(layout, n)? {
                if e.hash == hash && *e.key == *key {
                    return Ok(Some(e.receipt));
                }
            }
            n += 1;
        }
        Ok(None)
    }

    fn chunk(&self, layout: &Layout, n: usize) -> Result<Vec<Entry>, StoreError> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let tree = layout.trees.sends;
        match layout
            .storage
            .get_raw(tree.handle, &part_key(CHUNK, self.id, n))?
        {
            Some(value) => chunk_entries((self.id, n), &value),
            None => Err(StoreError::Corrupt(format!(
                "chunk {n} of send receipt run {} is missing",
                self.id
            ))),
        }
    }

    /// Every entry, in order.
    pub(super) fn read_all(&self, layout: &Layout) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::with_capacity(usize::try_from(self.entries).unwrap_or(0));
        for n in 0..self.fences.len() {
            out.extend(self.chunk(layout, n)?);
        }
        Ok(out)
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
        let mut previous: Option<(u64, Box<[u8]>)> = None;
        for n in 0..self.fences.len() {
            let entries = match self.chunk(layout, n) {
                Ok(entries) => entries,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            if entries.first().map(|e| e.hash) != Some(self.fences[n]) {
                problems.push(format!(
                    "chunk {n} of send receipt run {} does not begin at its fence",
                    self.id
                ));
            }
            for e in entries {
                count += 1;
                if e.hash != hash_of(&e.key) || !self.bloom.may_contain(e.hash) {
                    problems.push(format!(
                        "send receipt run {}: an entry's hash or filter bits are wrong",
                        self.id
                    ));
                }
                if let Some(p) = &previous {
                    if (p.0, &p.1) >= (e.hash, &e.key) {
                        problems.push(format!("send receipt run {} is out of order", self.id));
                    }
                }
                previous = Some((e.hash, e.key));
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
