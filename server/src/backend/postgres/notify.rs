//! Wake-ups across nodes: each node keeps one connection outside the pool
//! that `LISTEN`s on the channel every delivery `NOTIFY`s at commit, and
//! wakes the local long-polls and streams of the queues named; and on the
//! channel of credential changes (a client deleted or recovered), whose
//! sessions on this node must end. While that connection is down, nothing
//! is missed for long: at every (re)connection every local waiter is woken
//! to read its queue again, and, if it was a reconnection, every session
//! is ended (clients open new ones transparently).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mls_ds_protocol::ClientId;
use tokio::sync::Notify;

use super::connect::{Connector, Incoming};
use super::writes::{CHANNEL, CREDENTIALS};
use crate::backend::CredentialChange;

/// The wake-up handles of the queues someone waits on in this process,
/// and where credential changes are announced.
pub(crate) struct Wakeups {
    handles: Mutex<Handles>,
    closed: AtomicBool,
    /// Whether the notification connection is up (the node's health).
    listening: AtomicBool,
    /// Credential changes announced by any process.
    pub(crate) credentials: tokio::sync::broadcast::Sender<CredentialChange>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Wakeups {
            handles: Mutex::default(),
            closed: AtomicBool::default(),
            // The database answered the migration just before.
            listening: AtomicBool::new(true),
            credentials: tokio::sync::broadcast::Sender::new(1024),
        }
    }
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

    /// Whether the database's notification connection is up: while it is
    /// not, this node misses wake-ups and the database is likely out of
    /// reach, so it reports itself unhealthy.
    pub(crate) fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// Whether [`Wakeups::close`] ran.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// A credential change payload: the client's id in hex.
    fn credentials_changed(&self, payload: &str) {
        if let Some(id) = hex::decode(payload)
            .ok()
            .and_then(|bytes| ClientId::new(&bytes).ok())
        {
            // Nobody subscribed yet is fine: nobody has a session to end.
            let _ = self.credentials.send(CredentialChange::Client(id));
        }
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
    let pause = Duration::from_millis(100);
    let mut listened = false;
    while !wakeups.is_closed() {
        match connector.connect().await {
            Ok((client, mut incoming)) => {
                match client
                    .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {CREDENTIALS}"))
                    .await
                {
                    Ok(()) => {
                        // Whatever was queued while not listening.
                        wakeups.wake_all();
                        if listened {
                            let _ = wakeups.credentials.send(CredentialChange::Unknown);
                        }
                        listened = true;
                        wakeups.listening.store(true, Ordering::SeqCst);
                        while let Some(message) = incoming.recv().await {
                            match message {
                                Incoming::Notification { channel, payload }
                                    if channel == CREDENTIALS =>
                                {
                                    wakeups.credentials_changed(&payload)
                                }
                                Incoming::Notification { payload, .. } => {
                                    wakeups.wake_payload(&payload)
                                }
                                Incoming::Closed(why) => {
                                    wakeups.listening.store(false, Ordering::SeqCst);
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
            Err(e) => {
                wakeups.listening.store(false, Ordering::SeqCst);
                tracing::warn!(error = %e, "cannot open the notification connection");
            }
        }
        // A short fixed pause: this node reports itself unhealthy until the
        // connection is back, so it should not wait long after the
        // database is.
        tokio::time::sleep(pause).await;
    }
}
