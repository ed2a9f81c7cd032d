//! How many of something each client holds (open streams, listening
//! requests), counted by guards: a count goes down when its guard drops,
//! however the holder ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use mls_ds_protocol::ClientId;

/// Counts per client, and their total.
#[derive(Default)]
pub(crate) struct ClientCounts(Mutex<Counts>);

#[derive(Default)]
struct Counts {
    by_client: HashMap<ClientId, usize>,
    total: usize,
}

/// One unit of a client's count, given back on drop.
pub(crate) struct Counted {
    counts: Arc<ClientCounts>,
    client: ClientId,
}

/// Why [`ClientCounts::try_acquire`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// The client holds its most.
    Client,
    /// All clients together hold the most.
    Total,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.by_client.remove(&self.client);
            }
        }
    }
}

impl ClientCounts {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count one more for `client`.
    pub(crate) fn acquire(self: &Arc<Self>, client: &ClientId) -> Counted {
        let mut c = self.lock();
        *c.by_client.entry(client.clone()).or_insert(0) += 1;
        c.total += 1;
        drop(c);
        self.counted(client)
    }

    /// Count one more for `client` if it holds fewer than `per_client` and
    /// all hold fewer than `total`.
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        client: &ClientId,
        per_client: usize,
        total: usize,
    ) -> Result<Counted, Full> {
        let mut c = self.lock();
        if c.total >= total {
            return Err(Full::Total);
        }
        let mine = c.by_client.entry(client.clone()).or_insert(0);
        if *mine >= per_client {
            return Err(Full::Client);
        }
        *mine += 1;
        c.total += 1;
        drop(c);
        Ok(self.counted(client))
    }

    fn counted(self: &Arc<Self>, client: &ClientId) -> Counted {
        Counted {
            counts: self.clone(),
            client: client.clone(),
        }
    }

    /// Whether `client` holds any.
    pub(crate) fn holds(&self, client: &ClientId) -> bool {
        self.lock().by_client.contains_key(client)
    }

    /// What all clients hold together.
    pub(crate) fn total(&self) -> usize {
        self.lock().total
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
        assert_eq!(counts.try_acquire(&a, 2, 3).err(), Some(Full::Client));
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
}
