//! Wake-ups across nodes: each node keeps one connection outside the pool
//! that `LISTEN`s on the channel every delivery `NOTIFY`s at commit, and
//! wakes the local long-polls and streams of the queues named. While that
//! connection is down, nothing is missed for long: at every (re)connection
//! every local waiter is woken to read its queue again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mls_ds_protocol::ClientId;
use tokio::sync::Notify;

use super::connect::{Connector, Incoming};
use super::writes::CHANNEL;

/// The wake-up handles of the queues someone waits on in this process.
#[derive(Default)]
pub(crate) struct Wakeups {
    handles: Mutex<Handles>,
    closed: AtomicBool,
}

#[derive(Default)]
struct Handles {
    by_client: HashMap<ClientId, Weak<Notify>>,
    sweep_at: usize,
}

impl Wakeups {
    /// Below this many handles the table is never swept.
    const MIN_SWEEP: usize = 1024;

    /// `client`'s handle (shared by everyone waiting on it).
    pub(crate) fn subscribe(&self, client: &ClientId) -> Arc<Notify> {
        let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = h.by_client.get(client).and_then(Weak::upgrade) {
            return notify;
        }
        if h.by_client.len() >= h.sweep_at.max(Self::MIN_SWEEP) {
            h.by_client.retain(|_, w| w.strong_count() > 0);
            h.sweep_at = h.by_client.len() * 2;
        }
        let notify = Arc::new(Notify::new());
        h.by_client.insert(client.clone(), Arc::downgrade(&notify));
        notify
    }

    /// Wake whoever waits on `client`'s queue.
    pub(crate) fn wake(&self, client: &ClientId) {
        let h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(notify) = h.by_client.get(client).and_then(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Wake every waiter (they read their queues again).
    pub(crate) fn wake_all(&self) {
        let h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        for notify in h.by_client.values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Wake every waiter for the last time.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// Whether [`Wakeups::close`] ran.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Wake the queues a `NOTIFY` payload names (`hex(client):head,...`);
    /// what does not parse is skipped (only DS nodes write the channel).
    fn wake_payload(&self, payload: &str) {
        for item in payload.split(',') {
            let Some((client, _head)) = item.split_once(':') else {
                continue;
            };
            if let Some(id) = hex::decode(client)
                .ok()
                .and_then(|bytes| ClientId::new(&bytes).ok())
            {
                self.wake(&id);
            }
        }
    }
}

/// Listen until `wakeups` is closed, reconnecting with a growing pause.
pub(crate) async fn listen(connector: Connector, wakeups: Arc<Wakeups>) {
    let mut pause = Duration::from_millis(100);
    while !wakeups.is_closed() {
        match connector.connect().await {
            Ok((client, mut incoming)) => {
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        pause = Duration::from_millis(100);
                        // Whatever was queued while not listening.
                        wakeups.wake_all();
                        while let Some(message) = incoming.recv().await {
                            match message {
                                Incoming::Notification(payload) => wakeups.wake_payload(&payload),
                                Incoming::Closed(why) => {
                                    if !wakeups.is_closed() {
                                        tracing::warn!(
                                            reason = %why,
                                            "the database's notification connection ended; \
                                             reconnecting"
                                        );
                                    }
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the notification connection"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
