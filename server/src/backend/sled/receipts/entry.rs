//! How one send receipt is stored: `[len u8] ++ send key ++ message_id u64
//! BE ++ recipients u32 BE` (in a run's chunk after its hash, u64 BE), the
//! send key as `layout::send_key` writes it (its creation time first, so
//! an entry knows when it may be forgotten); and reading the entries of a
//! chunk in place.

use sha2::{Digest, Sha256};

use crate::backend::error::StoreError;
use crate::backend::records::SendReceipt;

/// Format byte of a chunk.
pub(super) const FORMAT: u8 = 1;

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
    /// The order of a run: by hash, then key.
    pub(super) fn order(&self) -> (u64, &[u8]) {
        (self.hash, self.key)
    }
}

/// An entry copied out of its chunk (a merge holds one per run).
pub(super) struct OwnedEntry {
    pub(super) hash: u64,
    key_len: usize,
    /// Hash and entry as stored.
    pub(super) encoded: Vec<u8>,
}

impl OwnedEntry {
    pub(super) fn of(e: &RawEntry<'_>) -> OwnedEntry {
        OwnedEntry {
            hash: e.hash,
            key_len: e.key.len(),
            encoded: e.encoded.to_vec(),
        }
    }

    fn key(&self) -> &[u8] {
        self.encoded.get(9..9 + self.key_len).unwrap_or_default()
    }

    /// When its send id was made.
    pub(super) fn created_ms(&self) -> u64 {
        created_ms(self.key())
    }

    /// The order of a run: by hash, then key.
    pub(super) fn order(&self) -> (u64, &[u8]) {
        (self.hash, self.key())
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
    /// What is left to read.
    pub(super) rest: &'a [u8],
    run: u64,
    chunk: u32,
}

impl<'a> ChunkEntries<'a> {
    /// The entries of chunk `chunk` of run `run`, whose value is `value`.
    pub(super) fn new(run: u64, chunk: u32, value: &'a [u8]) -> ChunkEntries<'a> {
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

impl<'a> ChunkEntries<'a> {
    /// The entries of what is left of a chunk past its format byte.
    pub(super) fn rest_of(run: u64, chunk: u32, rest: &'a [u8]) -> ChunkEntries<'a> {
        ChunkEntries { rest, run, chunk }
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
