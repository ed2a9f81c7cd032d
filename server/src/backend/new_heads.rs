//! [`NewHeads`]: which queues got new visible entries, for wake-ups of
//! clients that are not listening (the push gateway). A backend records
//! every queue whose entries become visible, with its new head, once
//! recording is on; the reader takes what gathered and waits for more.
//! Repeated growth of one queue between two reads is one entry, so memory
//! is bounded by the number of queues, whatever the traffic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use mls_ds_protocol::ClientId;
use tokio::sync::Notify;

/// Queues with new visible entries since the last [`NewHeads::take`].
#[derive(Default)]
pub(crate) struct NewHeads {
    enabled: AtomicBool,
    heads: Mutex<HashMap<ClientId, u64>>,
    changed: Notify,
}

impl NewHeads {
    /// Start recording (nothing is recorded before: without a reader it
    /// would only grow).
    pub(crate) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Entries up to `seq` of `client`'s queue became visible.
    pub(crate) fn record<'a>(&self, visible: impl IntoIterator<Item = &'a (ClientId, u64)>) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        let mut grew = false;
        for (client, seq) in visible {
            grew = true;
            heads
                .entry(client.clone())
                .and_modify(|h| *h = (*h).max(*seq))
                .or_insert(*seq);
        }
        drop(heads);
        if grew {
            self.changed.notify_one();
        }
    }

    /// Everything recorded since the last call.
    pub(crate) fn take(&self) -> HashMap<ClientId, u64> {
        std::mem::take(&mut *self.heads.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves after something was recorded (or was, since the last wait).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_recorded_once_enabled_and_merged() {
        let heads = NewHeads::default();
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("b").unwrap());
        heads.record(&[(a.clone(), 1)]);
        assert!(heads.take().is_empty(), "off until enabled");
        heads.enable();
        heads.record(&[(a.clone(), 3), (b.clone(), 2)]);
        heads.record(&[(a.clone(), 5)]);
        let taken = heads.take();
        assert_eq!(taken.get(&a), Some(&5));
        assert_eq!(taken.get(&b), Some(&2));
        assert!(heads.take().is_empty());
    }
}
