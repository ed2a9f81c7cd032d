//! How many of something each key holds (a client's open streams,
//! listening requests and fetches; a source address's connections and
//! requests in flight), counted by guards: a count goes down when its guard
//! drops, however the holder ends.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use mls_ds_protocol::ClientId;

/// Counts per key, and their total.
pub(crate) struct KeyedCounts<K>(Mutex<Counts<K>>);

/// Counts per client.
pub(crate) type ClientCounts = KeyedCounts<ClientId>;
/// Counts per source address.
pub(crate) type SourceCounts = KeyedCounts<IpAddr>;

struct Counts<K> {
    by_key: HashMap<K, usize>,
    total: usize,
}

impl<K> Default for KeyedCounts<K> {
    fn default() -> Self {
        KeyedCounts(Mutex::new(Counts {
            by_key: HashMap::new(),
            total: 0,
        }))
    }
}

/// One unit of a key's count, given back on drop.
pub(crate) struct Counted<K: Hash + Eq + Clone = ClientId> {
    counts: Arc<KeyedCounts<K>>,
    key: K,
    /// How much it holds (1 for things, a byte count for memory budgets).
    n: usize,
}

/// Why [`KeyedCounts::try_acquire`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// The key holds its most.
    Key,
    /// All keys together hold the most.
    Total,
}

impl<K: Hash + Eq + Clone> Drop for Counted<K> {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total = c.total.saturating_sub(self.n);
        if let Some(n) = c.by_key.get_mut(&self.key) {
            *n = n.saturating_sub(self.n);
            if *n == 0 {
                c.by_key.remove(&self.key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> Counted<K> {
    /// Hold `more` on top, within the same limits as
    /// [`KeyedCounts::try_acquire_n`]; on refusal it holds what it held.
    pub(crate) fn try_grow(
        &mut self,
        more: usize,
        per_key: usize,
        total: usize,
    ) -> Result<(), Full> {
        self.counts.add(&self.key, more, per_key, total)?;
        self.n += more;
        Ok(())
    }
}

impl<K: Hash + Eq + Clone> KeyedCounts<K> {
    fn lock(&self) -> MutexGuard<'_, Counts<K>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count one more for `client`.
    pub(crate) fn acquire(self: &Arc<Self>, client: &K) -> Counted<K> {
        self.acquire_n(client, 1)
    }

    /// Count `n` more for `key`, whatever the limits (what is counted
    /// must be held anyway, e.g. the answer to a write already made).
    pub(crate) fn acquire_n(self: &Arc<Self>, key: &K, n: usize) -> Counted<K> {
        let mut c = self.lock();
        add_to(&mut c.by_key, key, n);
        c.total += n;
        drop(c);
        self.counted(key, n)
    }

    /// Count one more for `client` if it holds fewer than `per_client` and
    /// all hold fewer than `total`.
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        client: &K,
        per_client: usize,
        total: usize,
    ) -> Result<Counted<K>, Full> {
        self.try_acquire_n(client, 1, per_client, total)
    }

    /// Count `n` more for `key` if its count stays within `per_key` and the
    /// total within `total` (a memory budget: `n` bytes).
    pub(crate) fn try_acquire_n(
        self: &Arc<Self>,
        key: &K,
        n: usize,
        per_key: usize,
        total: usize,
    ) -> Result<Counted<K>, Full> {
        self.add(key, n, per_key, total)?;
        Ok(self.counted(key, n))
    }

    fn add(&self, key: &K, n: usize, per_key: usize, total: usize) -> Result<(), Full> {
        let mut c = self.lock();
        // The key's own limit first: then a refusal names its holder.
        let mine = c.by_key.get(key).copied().unwrap_or(0);
        if mine.saturating_add(n) > per_key || (n == 0 && mine >= per_key) {
            return Err(Full::Key);
        }
        if c.total.saturating_add(n) > total || (n == 0 && c.total >= total) {
            return Err(Full::Total);
        }
        add_to(&mut c.by_key, key, n);
        c.total += n;
        Ok(())
    }

    fn counted(self: &Arc<Self>, key: &K, n: usize) -> Counted<K> {
        Counted {
            counts: self.clone(),
            key: key.clone(),
            n,
        }
    }

    /// Whether `client` holds any.
    pub(crate) fn holds(&self, client: &K) -> bool {
        self.lock().by_key.contains_key(client)
    }

    /// What all clients hold together.
    pub(crate) fn total(&self) -> usize {
        self.lock().total
    }
}

/// Add `n` to `key`'s count, cloning the key only for a new entry (this
/// runs for every request).
fn add_to<K: Clone + Eq + Hash>(by_key: &mut HashMap<K, usize>, key: &K, n: usize) {
    match by_key.get_mut(key) {
        Some(count) => *count += n,
        None => {
            by_key.insert(key.clone(), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_their_guards_and_limits() {
        let counts = Arc::new(ClientCounts::default());
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        let first = counts.try_acquire(&a, 2, 3).unwrap();
        let second = counts.try_acquire(&a, 2, 3).unwrap();
        assert_eq!(counts.try_acquire(&a, 2, 3).err(), Some(Full::Key));
        let third = counts.try_acquire(&b, 2, 3).unwrap();
        assert_eq!(counts.try_acquire(&b, 2, 3).err(), Some(Full::Total));
        assert!(counts.holds(&a) && counts.total() == 3);
        drop((first, second));
        assert!(!counts.holds(&a));
        assert_eq!(counts.total(), 1);
        drop(third);
        let _any = counts.acquire(&a);
        assert!(counts.holds(&a));
    }

    #[test]
    fn byte_budgets_take_grow_and_give_back_amounts() {
        let budget = Arc::new(SourceCounts::default());
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "::1".parse().unwrap());
        let mut first = budget.try_acquire_n(&a, 600, 1000, 1500).unwrap();
        assert_eq!(
            budget.try_acquire_n(&a, 401, 1000, 1500).err(),
            Some(Full::Key)
        );
        assert_eq!(first.try_grow(401, 1000, 1500), Err(Full::Key));
        first.try_grow(400, 1000, 1500).unwrap();
        assert_eq!(
            budget.try_acquire_n(&b, 501, 1000, 1500).err(),
            Some(Full::Total)
        );
        let second = budget.try_acquire_n(&b, 500, 1000, 1500).unwrap();
        assert_eq!(budget.total(), 1500);
        drop(first);
        assert!(!budget.holds(&a));
        assert_eq!(budget.total(), 500);
        drop(second);
        assert_eq!(budget.total(), 0);
    }
}
