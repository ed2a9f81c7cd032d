//! A compact double-ended queue of message ids: what the queue index keeps
//! per queued entry.
//!
//! A queue's ids mostly grow by small steps (messages of one delivery batch
//! differ by one, of the next batch by a few tens of thousands), so ids are
//! stored in chunks of [`CHUNK`]: each chunk's first id in full, every
//! further one as the varint of its zigzagged difference to the one before.
//! That is one to three bytes per entry, where a `VecDeque<u64>` takes 8 and
//! up to twice that with its growth slack. The newest entries stay plain in
//! `open` until a chunk is full, so a short queue pays for no chunk at all.
//!
//! Only the first chunk may hold fewer than [`CHUNK`] ids (entries leave
//! from the front by skipping, and one put back in front may not fit), so
//! the chunk holding the `i`th entry is found by arithmetic.

use std::collections::VecDeque;

/// Ids per sealed chunk.
const CHUNK: usize = 128;

/// Sealed ids: `first`, then `len - 1` encoded differences.
struct Chunk {
    first: u64,
    len: u8,
    rest: Box<[u8]>,
}

impl Chunk {
    fn seal(ids: &[u64]) -> Chunk {
        let mut rest = Vec::with_capacity(ids.len().saturating_sub(1) * 2);
        for pair in ids.windows(2) {
            put_varint(&mut rest, zigzag(pair[1].wrapping_sub(pair[0])));
        }
        Chunk {
            first: ids.first().copied().unwrap_or(0),
            // At most CHUNK ids are sealed together.
            len: u8::try_from(ids.len()).unwrap_or(u8::MAX),
            rest: rest.into_boxed_slice(),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.len)
    }

    fn iter(&self) -> ChunkIter<'_> {
        ChunkIter {
            next: Some(self.first),
            left: self.len(),
            rest: &self.rest,
        }
    }
}

/// The ids of one chunk in order.
struct ChunkIter<'a> {
    next: Option<u64>,
    left: usize,
    rest: &'a [u8],
}

impl Iterator for ChunkIter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let current = self.next?;
        self.next = (self.left > 0).then(|| {
            let (delta, used) = get_varint(self.rest);
            self.rest = &self.rest[used..];
            current.wrapping_add(unzigzag(delta))
        });
        Some(current)
    }
}

/// A queue's message ids, oldest first.
#[derive(Default)]
pub(crate) struct IdDeque {
    sealed: VecDeque<Chunk>,
    /// Ids already taken from the front of `sealed[0]`.
    skip: usize,
    /// The newest ids, after every sealed one.
    open: Vec<u64>,
}

impl IdDeque {
    pub(crate) fn len(&self) -> usize {
        self.sealed_len() + self.open.len()
    }

    /// Ids left in `sealed[0]`.
    fn first_live(&self) -> usize {
        self.sealed.front().map_or(0, |c| c.len() - self.skip)
    }

    /// Ids in sealed chunks: only the first may hold fewer than CHUNK.
    fn sealed_len(&self) -> usize {
        self.first_live() + self.sealed.len().saturating_sub(1) * CHUNK
    }

    pub(crate) fn push_back(&mut self, id: u64) {
        if self.open.len() >= CHUNK {
            let chunk = Chunk::seal(&self.open[..CHUNK]);
            self.open.drain(..CHUNK);
            self.sealed.push_back(chunk);
        }
        if self.open.capacity() == 0 {
            // A queue that empties often gets a small buffer; one that
            // grows will fill whole chunks.
            self.open.reserve_exact(4);
        }
        self.open.push(id);
    }

    /// Put `id` back in front (an undone acknowledgement or drop).
    pub(crate) fn push_front(&mut self, id: u64) {
        let Some(front) = self.sealed.front() else {
            self.open.insert(0, id);
            return;
        };
        if self.skip > 0 && front.iter().nth(self.skip - 1) == Some(id) {
            self.skip -= 1;
            return;
        }
        let mut ids = Vec::with_capacity(front.len() - self.skip + 1);
        ids.push(id);
        ids.extend(front.iter().skip(self.skip));
        self.sealed.pop_front();
        self.skip = 0;
        // Every chunk but the first holds exactly CHUNK ids.
        let (head, tail) = ids.split_at(ids.len().saturating_sub(CHUNK));
        self.sealed.push_front(Chunk::seal(tail));
        if !head.is_empty() {
            self.sealed.push_front(Chunk::seal(head));
        }
    }

    pub(crate) fn back(&self) -> Option<u64> {
        match self.open.last() {
            Some(id) => Some(*id),
            None => self.sealed.back().and_then(|c| c.iter().last()),
        }
    }

    /// Remove the newest id (an undone assignment).
    pub(crate) fn pop_back(&mut self) -> Option<u64> {
        if self.open.is_empty() {
            let last = self.sealed.pop_back()?;
            let skip = if self.sealed.is_empty() {
                std::mem::take(&mut self.skip)
            } else {
                0
            };
            self.open = last.iter().skip(skip).collect();
        }
        self.open.pop()
    }

    /// Remove the `n` oldest ids (all if fewer), returning them.
    pub(crate) fn drain_front(&mut self, n: usize) -> Vec<u64> {
        let n = n.min(self.len());
        let taken: Vec<u64> = self.iter_from(0).take(n).collect();
        let mut left = n;
        while let Some(front) = self.sealed.front() {
            let live = front.len() - self.skip;
            if left < live {
                self.skip += left;
                left = 0;
                break;
            }
            left -= live;
            self.sealed.pop_front();
            self.skip = 0;
        }
        self.open.drain(..left);
        if self.open.is_empty() && self.open.capacity() > 4 {
            self.open = Vec::new();
        }
        taken
    }

    /// The ids from the `start`th (0 is the oldest) to the newest.
    pub(crate) fn iter_from(&self, start: usize) -> impl Iterator<Item = u64> + '_ {
        // Find the chunk holding `start`: only the first may be short.
        let first_live = self.first_live();
        let (chunk, offset) = if start < first_live {
            (0, start + self.skip)
        } else {
            let past = start - first_live;
            (1 + past / CHUNK, past % CHUNK)
        };
        let open_start = start.saturating_sub(self.sealed_len()).min(self.open.len());
        self.sealed
            .range(chunk.min(self.sealed.len())..)
            .enumerate()
            .flat_map(move |(i, c)| c.iter().skip(if i == 0 { offset } else { 0 }))
            .chain(self.open[open_start..].iter().copied())
    }

    /// Every id, oldest first, in a plain vector.
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::with_capacity(self.len());
        for (i, c) in self.sealed.iter().enumerate() {
            out.extend(c.iter().skip(if i == 0 { self.skip } else { 0 }));
        }
        out.extend_from_slice(&self.open);
        out
    }
}

/// A signed difference (as wrapped `u64`) mapped so that small ones of
/// either sign take few varint bytes.
pub(crate) fn zigzag(delta: u64) -> u64 {
    let d = delta as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

/// The difference [`zigzag`] mapped.
pub(crate) fn unzigzag(v: u64) -> u64 {
    ((v >> 1) as i64 ^ -((v & 1) as i64)) as u64
}

/// Append `v` in 7-bit groups, low first (LEB128).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The varint at the start of `bytes` and its length. Only this module
/// writes chunks, so the bytes are always complete.
fn get_varint(bytes: &[u8]) -> (u64, usize) {
    read_varint(bytes).unwrap_or((0, bytes.len().min(10)))
}

/// The varint at the start of `bytes` and its length, or `None` if the
/// bytes end inside it or it runs past 64 bits (bytes read from disk).
pub(crate) fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        let group = u64::from(b & 0x7f);
        if i == 9 && group > 1 {
            return None;
        }
        v |= group << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `q` against the plain model after each step.
    fn check(q: &IdDeque, model: &VecDeque<u64>) {
        assert_eq!(q.len(), model.len());
        let all: Vec<u64> = model.iter().copied().collect();
        assert_eq!(q.to_vec(), all);
        for start in [
            0,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            model.len() / 2,
            model.len(),
        ] {
            let got: Vec<u64> = q.iter_from(start).collect();
            assert_eq!(got, all[start.min(all.len())..], "from {start}");
        }
        assert_eq!(q.back(), model.back().copied());
    }

    #[test]
    fn behaves_as_a_deque_of_any_ids() {
        let mut q = IdDeque::default();
        let mut model = VecDeque::new();
        // Ids as a queue sees them (small steps, jumps to later batches),
        // and some that go backwards or far.
        let mut next = 5u64 << 16;
        let mut step = 0u64;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..4000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            match rng % 10 {
                0..=4 => {
                    step += 1;
                    next = match step % 7 {
                        0 => next.wrapping_add(1 << 16),
                        3 => next.wrapping_sub(3),
                        5 if round % 50 == 0 => u64::MAX - step,
                        _ => next + 1,
                    };
                    q.push_back(next);
                    model.push_back(next);
                }
                5 | 6 => {
                    let n = (rng >> 8) as usize % (2 * CHUNK);
                    let got = q.drain_front(n);
                    let want: Vec<u64> = model.drain(..n.min(model.len())).collect();
                    assert_eq!(got, want);
                }
                7 => {
                    // Put back what was just taken, newest first.
                    let got = q.drain_front(3);
                    for id in got.iter().rev() {
                        q.push_front(*id);
                    }
                }
                8 => {
                    let id = rng >> 3;
                    q.push_front(id);
                    model.push_front(id);
                }
                _ => {
                    assert_eq!(q.pop_back(), model.pop_back());
                }
            }
            check(&q, &model);
        }
        while let Some(id) = model.pop_front() {
            assert_eq!(q.drain_front(1), vec![id]);
        }
        assert_eq!(q.len(), 0);
        assert_eq!(q.pop_back(), None);
    }

    #[test]
    fn a_growing_queue_takes_few_bytes_per_id() {
        let mut q = IdDeque::default();
        for batch in 0..10_000u64 {
            for slot in 0..10 {
                q.push_back((batch << 16) | slot);
            }
        }
        let bytes: usize = q
            .sealed
            .iter()
            .map(|c| std::mem::size_of::<Chunk>() + c.rest.len())
            .sum();
        assert!(bytes < q.len() * 2, "{bytes} bytes for {} ids", q.len());
    }
}
