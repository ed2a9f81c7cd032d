//! `GET /v1/queue/stream`: a client's queue pushed as server-sent events.
//!
//! Server-sent events rather than WebSocket: the stream only goes one way
//! (acknowledgements stay `POST /v1/queue/ack`), it is a plain HTTP
//! response, so it runs over HTTP/1.1 and h2 alike, through the TLS and
//! proxies the rest of the API uses, with no upgrade and no second
//! protocol stack; and resuming is built in (`Last-Event-ID`).
//!
//! Each event is one queue page (`event: page`, `id:` its last sequence
//! number, `data:` the TLS-encoded `QueuePage` in base64), sent as soon as
//! its entries are durable; the stream resumes after `after` (or a larger
//! `Last-Event-ID`), so a client reconnecting from its cursor misses and
//! repeats nothing. A comment every 20 s keeps idle connections open. A
//! stream ends after `--stream-max-secs` (the client reconnects, which also
//! re-checks its authentication), on an error (the reconnect shows it as a
//! status), when the client is deleted or recovered with a new key (its
//! sessions end then), and at shutdown. Streams hold no in-flight slot; they have
//! limits of their own, in total and per client.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hyper::body::{Body, Frame};
use mls_ds_protocol::ClientId;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::budget::{Budgets, Pieces};
use super::response::ApiError;
use crate::backend::{Backend, Page};
use crate::counts::{ClientCounts, Counted, Full};
use crate::service::auth::Caller;
use crate::service::Ds;
use crate::state_cell::StateCell;

/// Idle time after which a comment is sent, below common proxy timeouts
/// (and below half the write timeout, see [`StreamLimits::keepalive`]).
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(20);
/// The first event: how long a client waits before reconnecting.
const RETRY_HINT: &[u8] = b"retry: 1000\n\n";
const KEEPALIVE_COMMENT: &[u8] = b": keep-alive\n\n";
/// How long an event waits before asking the budget again.
const BUDGET_RETRY: Duration = Duration::from_millis(200);

/// Stream limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamLimits {
    /// Streams open at once, in total.
    pub(crate) max_total: usize,
    /// Streams open at once per client.
    pub(crate) max_per_client: usize,
    /// Longest life of one stream.
    pub(crate) max_lifetime: Duration,
    /// Idle time after which a comment is sent: a stream that writes
    /// nothing for the write timeout is taken for a peer that stopped
    /// reading (`conn`).
    pub(crate) keepalive: Duration,
}

/// The open streams.
pub(crate) struct Streams {
    limits: StreamLimits,
    open: Arc<ClientCounts>,
    closing: watch::Sender<bool>,
}

/// One open stream's place in [`Streams`], given back when it ends.
pub(crate) struct Ticket {
    _place: Counted,
    limits: StreamLimits,
    closing: watch::Receiver<bool>,
}

impl Streams {
    /// No stream open yet.
    pub(crate) fn new(limits: StreamLimits) -> Arc<Streams> {
        Arc::new(Streams {
            limits,
            open: Arc::default(),
            closing: watch::Sender::new(false),
        })
    }

    /// A place for a stream of `client`, within the limits.
    pub(crate) fn admit(&self, client: &ClientId) -> Result<Ticket, ApiError> {
        if *self.closing.borrow() {
            return Err(ApiError::Overloaded);
        }
        let place = self
            .open
            .try_acquire(client, self.limits.max_per_client, self.limits.max_total)
            .map_err(|full| match full {
                Full::Key => ApiError::TooManyStreams(self.limits.max_per_client),
                Full::Total => ApiError::Overloaded,
            })?;
        Ok(Ticket {
            _place: place,
            limits: self.limits,
            closing: self.closing.subscribe(),
        })
    }

    /// Streams open now.
    pub(crate) fn open_count(&self) -> usize {
        self.open.total()
    }

    /// End every stream (shutdown), and admit no more.
    pub(crate) fn close_all(&self) {
        self.closing.send_replace(true);
    }
}

/// The response body of a stream: what its producer task sends, each
/// event in [`Pieces`] holding its budget share until its last piece.
pub(crate) struct SseBody {
    rx: mpsc::Receiver<Pieces>,
    current: Option<Pieces>,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(piece) = this.current.as_mut().and_then(Pieces::next_piece) {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(event)) => this.current = Some(event),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Start `caller`'s stream after sequence number `after`; its events are
/// held in `budgets`.
pub(crate) fn start<B: Backend>(
    cell: Arc<StateCell<Ds<B>>>,
    budgets: Arc<Budgets>,
    caller: Caller,
    after: u64,
    ticket: Ticket,
) -> SseBody {
    // One event ahead of a slow reader, no more: the queue is the buffer.
    let (tx, rx) = mpsc::channel(1);
    let out = Events { tx, budgets };
    tokio::spawn(produce(cell, caller, after, ticket, out));
    SseBody { rx, current: None }
}

/// Where a stream's producer sends its events.
struct Events {
    tx: mpsc::Sender<Pieces>,
    budgets: Arc<Budgets>,
}

impl Events {
    /// Send `event` once the client's budget has room for it (a client
    /// that does not read its stream waits here, holding nothing more);
    /// `false` once the stream has ended.
    async fn send(&self, client: &ClientId, event: Bytes) -> bool {
        let mut event = Pieces::new(event);
        while self.budgets.hold(client, &mut event).is_err() {
            tokio::select! {
                _ = tokio::time::sleep(BUDGET_RETRY) => {}
                _ = self.tx.closed() => return false,
            }
        }
        self.tx.send(event).await.is_ok()
    }
}

async fn produce<B: Backend>(
    cell: Arc<StateCell<Ds<B>>>,
    caller: Caller,
    mut after: u64,
    ticket: Ticket,
    out: Events,
) {
    let tx = &out.tx;
    let mut closing = ticket.closing.clone();
    // Listening between its long-polls too, for the push wake-ups; and
    // authenticated once, so ended when the client is deleted or recovered
    // with a new key (its sessions end then, and so does this).
    let (_listening, authenticated, mut sessions_ended) = match cell.get() {
        Some(ds) => {
            let (authenticated, ended) = ds.stream_authentication(&caller.client);
            (ds.listen(&caller.client), authenticated, ended)
        }
        None => return,
    };
    let deadline = Instant::now() + ticket.limits.max_lifetime;
    if !out
        .send(&caller.client, Bytes::from_static(RETRY_HINT))
        .await
    {
        return;
    }
    loop {
        let now = Instant::now();
        if now >= deadline || *closing.borrow() {
            break;
        }
        let Some(ds) = cell.get() else { break };
        let wait = ticket.limits.keepalive.min(deadline - now);
        let fetched = tokio::select! {
            fetched = ds.next_page(&caller.client, after, None, None, wait) => fetched,
            _ = closing.changed() => break,
            _ = tx.closed() => break,
            _ = sessions_ended.changed() => {
                if ds.still_authenticated(&caller.client, authenticated) {
                    continue;
                }
                tracing::debug!(client = %caller.client, "stream ended: the client was deleted or recovered");
                break;
            }
        };
        drop(ds);
        let frame = match fetched {
            Ok(page) => match page.entries.last() {
                None => Bytes::from_static(KEEPALIVE_COMMENT),
                Some(last) => {
                    after = last.seq;
                    match page_event(&page, last.seq) {
                        Ok(frame) => frame,
                        Err(e) => {
                            tracing::error!(client = %caller.client, error = %e, "stream: cannot encode a page");
                            break;
                        }
                    }
                }
            },
            Err(e) => {
                // The reconnect gets the error as a status.
                tracing::debug!(client = %caller.client, error = %e, "stream ended by an error");
                break;
            }
        };
        if !out.send(&caller.client, frame).await {
            break;
        }
    }
}

/// One page as an event.
fn page_event(page: &Page, last: u64) -> Result<Bytes, tls_codec::Error> {
    let encoded = mls_ds_protocol::encode(&page.wire())?;
    let data = base64::engine::general_purpose::STANDARD.encode(encoded);
    Ok(Bytes::from(format!(
        "id: {last}\nevent: page\ndata: {data}\n\n"
    )))
}
