//! Receiving as a stream: [`Client::event_stream`] keeps a queue stream
//! open to the DS (`GET /v1/queue/stream`), processes each page as it
//! arrives exactly as [`Client::sync`] does (each entry with its event and
//! the cursor in one write, then acknowledged to the DS), and yields the
//! inbox's events. It reconnects by itself, from the cursor, after the DS
//! ends a stream or the network fails (with backoff), so no entry is missed
//! or processed twice; each event is yielded once per stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Client;
use crate::error::{ClientError, Result};
use crate::records::Event;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The events of a client as they arrive: a `futures` [`Stream`] of
/// `Result<Event>`.
///
/// Events stay in the client's inbox until the application calls
/// [`Client::ack_events`]; one not acknowledged is yielded again by the
/// next stream (e.g. after a restart), never twice by this one. Network
/// failures are not yielded: the stream reconnects until it is dropped.
/// Other failures (e.g. of local storage) are yielded, and it tries again.
///
/// [`Stream`]: futures_core::Stream
pub struct EventStream {
    rx: mpsc::Receiver<Result<Event>>,
    task: JoinHandle<()>,
}

impl futures_core::Stream for EventStream {
    type Item = Result<Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a failure is worth a quiet retry.
fn transient(e: &ClientError) -> bool {
    e.is_network() || e.status().is_some_and(|s| s >= 500 || s == 429)
}

impl Client {
    /// Receive as a stream of events, pushed by the DS as soon as they are
    /// durable (instead of polling [`Client::sync`]); see [`EventStream`].
    /// The client must not be opened twice meanwhile (sled's lock).
    pub fn event_stream(self: &Arc<Self>) -> EventStream {
        let (tx, rx) = mpsc::channel(64);
        let client = self.clone();
        let task = tokio::spawn(async move { client.run_stream(tx).await });
        EventStream { rx, task }
    }

    async fn run_stream(&self, tx: mpsc::Sender<Result<Event>>) {
        // The inbox key of the last event yielded (keys sort in DS order).
        let mut yielded = Vec::new();
        let mut backoff = MIN_BACKOFF;
        while !tx.is_closed() {
            let started = std::time::Instant::now();
            match self.stream_once(&tx, &mut yielded).await {
                // The DS ended the stream (its lifetime, a restart): again,
                // at once unless streams keep ending as soon as they start.
                Ok(()) if started.elapsed() >= Duration::from_secs(1) => backoff = MIN_BACKOFF,
                Ok(()) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    if transient(&e) {
                        tracing::debug!(client = %self.id, error = %e, "event stream: reconnecting");
                    } else if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Catch up, then follow one stream until the DS ends it.
    async fn stream_once(
        &self,
        tx: &mpsc::Sender<Result<Event>>,
        yielded: &mut Vec<u8>,
    ) -> Result<()> {
        self.sync().await?;
        self.hand_out(tx, yielded).await?;
        let mut stream = self.api.queue_stream(self.cursor()?).await?;
        while let Some(page) = stream.next_page().await? {
            self.note_lost_entries(page.acked).await?;
            if let Some(last) = self.process_entries(&page.entries).await? {
                self.api.ack(last).await?;
            }
            self.after_receiving().await?;
            self.hand_out(tx, yielded).await?;
            if tx.is_closed() {
                break;
            }
        }
        Ok(())
    }

    /// Yield the inbox's events not yielded yet. A slow reader holds the
    /// stream back (the channel holds a few events), not memory.
    async fn hand_out(
        &self,
        tx: &mpsc::Sender<Result<Event>>,
        yielded: &mut Vec<u8>,
    ) -> Result<()> {
        for (key, ev) in self.inbox()? {
            if key <= *yielded {
                continue;
            }
            if tx.send(Ok(ev)).await.is_err() {
                break;
            }
            *yielded = key;
        }
        Ok(())
    }
}
