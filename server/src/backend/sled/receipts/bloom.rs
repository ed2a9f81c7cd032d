//! The blocked Bloom filter of a run of send receipts: 10 bits per entry,
//! every hash setting 7 bits in one block of 512 bits (one cache line per
//! lookup), about 1% false positives. A false positive costs a lookup one
//! chunk read, and a lookup probes every run's filter: at 8 bits (3%) and
//! 38 runs, a send read a chunk more often than not.

const BITS_PER_ENTRY: u64 = 10;
const BLOCK_WORDS: usize = 8;
const PROBES: usize = 7;

/// A blocked Bloom filter: every hash sets [`PROBES`] bits in one block of
/// 512 bits, chosen by the hash's upper half.
pub(crate) struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    /// An empty filter sized for `entries` entries.
    pub(crate) fn for_entries(entries: usize) -> Bloom {
        let bits = (entries as u64).saturating_mul(BITS_PER_ENTRY);
        let blocks = bits.div_ceil(64 * BLOCK_WORDS as u64).max(1);
        Bloom {
            words: vec![0; usize::try_from(blocks).unwrap_or(usize::MAX) * BLOCK_WORDS],
        }
    }

    /// Word and bit of each probe.
    fn probes(&self, hash: u64) -> [(usize, u64); PROBES] {
        let blocks = (self.words.len() / BLOCK_WORDS) as u64;
        let block = (((hash >> 32) * blocks) >> 32) as usize;
        // splitmix64's finaliser: 63 more bits for the positions.
        let mut x = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        std::array::from_fn(|i| {
            let bit = ((x >> (9 * i)) & 511) as usize;
            (block * BLOCK_WORDS + bit / 64, 1u64 << (bit % 64))
        })
    }

    /// Add a hash.
    pub(crate) fn insert(&mut self, hash: u64) {
        for (w, mask) in self.probes(hash) {
            if let Some(word) = self.words.get_mut(w) {
                *word |= mask;
            }
        }
    }

    /// Whether a hash may have been added (never `false` for one that was).
    pub(crate) fn may_contain(&self, hash: u64) -> bool {
        self.probes(hash)
            .iter()
            .all(|(w, mask)| self.words.get(*w).is_some_and(|v| v & mask != 0))
    }

    /// Its size in words.
    pub(crate) fn words(&self) -> usize {
        self.words.len()
    }

    /// Its words as stored (u64 LE each).
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The filter of `words` words stored as `bytes`; `None` if they do
    /// not match or make no whole block.
    pub(crate) fn from_bytes(bytes: &[u8], words: usize) -> Option<Bloom> {
        if words == 0
            || !words.is_multiple_of(BLOCK_WORDS)
            || bytes.len() != words.checked_mul(8)?
        {
            return None;
        }
        let words = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        Some(Bloom { words })
    }
}

#[cfg(test)]
mod tests {
    use super::Bloom;

    /// Hashes spread like SHA-256 prefixes.
    fn hash(n: u64) -> u64 {
        let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 29;
        x.wrapping_mul(0xbf58_476d_1ce4_e5b9)
    }

    #[test]
    fn every_added_hash_is_found_and_few_others_are() {
        let mut bloom = Bloom::for_entries(100_000);
        for n in 0..100_000 {
            bloom.insert(hash(n));
        }
        assert!((0..100_000).all(|n| bloom.may_contain(hash(n))));
        let false_positives = (100_000..200_000)
            .filter(|n| bloom.may_contain(hash(*n)))
            .count();
        assert!(false_positives < 2_000, "{false_positives} in 100,000");
        let stored = Bloom::from_bytes(&bloom.to_bytes(), bloom.words()).unwrap();
        assert!((0..100_000).all(|n| stored.may_contain(hash(n))));
        assert!(Bloom::from_bytes(&bloom.to_bytes()[1..], bloom.words()).is_none());
        assert!(Bloom::from_bytes(&[], 0).is_none());
    }
}
