//! The HTTP adapter: connections (HTTP/1.1 and h2, cleartext or TLS), and
//! per request the route, body, authentication and the one mapping from
//! errors to statuses. It knows the core's services and the `Backend` trait,
//! never a storage engine.
//!
//! - [`conn`]: admission of connections and the timeouts that close unused
//!   ones;
//! - [`route`]: the `Route` enum, parsed once per request;
//! - [`framing`]: the guard under hyper that marks ambiguous framing;
//! - [`body`]: framing, size, timeout and content type of bodies;
//! - [`budget`]: the memory held for request and response bodies;
//! - [`handler`]: admission, authentication, the call into the core;
//! - [`response`]: `ApiError`, statuses and error bodies;
//! - [`stream`]: `GET /v1/queue/stream`, the queue as server-sent events;
//! - [`metrics_listener`]: the separate listener serving `GET /metrics`.

pub(crate) mod body;
pub(crate) mod budget;
pub(crate) mod conn;
pub(crate) mod framing;
pub(crate) mod handler;
pub(crate) mod metrics_listener;
pub(crate) mod response;
pub(crate) mod route;
pub(crate) mod stream;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::backend::Backend;
use conn::{Activity, ConnLimits, Tracked, Verdict, Watched, CLOSE_GRACE};
use framing::FramingGuard;
pub(crate) use handler::{Front, HttpLimits};

/// How long in-flight requests may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Concurrent h2 streams per connection: a client's requests in flight
/// (the SDK has a few), with room to spare.
const H2_MAX_STREAMS: u32 = 32;
/// Streams an h2 peer may reset before the server has accepted them
/// (rapid reset, CVE-2023-44487).
const H2_MAX_PENDING_RESETS: usize = 16;
/// What hyper buffers of an HTTP/1 connection, to read and to write.
const H1_BUFFER: usize = 64 * 1024;
/// What h2 buffers per stream to send: with [`H2_MAX_STREAMS`], what a
/// connection whose peer stops reading can hold beyond the response budget.
const H2_SEND_BUFFER: usize = 16 * 1024;
/// Largest header block an h2 peer may send (heads are small here).
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// The connection settings both listeners share: HTTP/1.1 and h2, and
/// hyper's HTTP/1 head timeout if `hyper_head_timeout` is set.
///
/// The API listener leaves it unset: hyper allocates and arms a timer for
/// every request. There [`FramingGuard`] times a head that has started
/// arriving, and the connection watchdog (`conn`) closes connections idle
/// between requests.
fn connection_builder(hyper_head_timeout: Option<Duration>) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(hyper_head_timeout)
        .max_buf_size(H1_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(H2_MAX_HEADER_LIST);
    builder
}

/// What every connection's task shares.
struct Shared<B> {
    front: Arc<Front<B>>,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    head_timeout: Duration,
    limits: ConnLimits,
}

/// Accept connections on `listener` and serve them with `front` until
/// `shutdown` resolves; then stop accepting and let in-flight requests
/// finish (up to 30 s).
pub(crate) async fn serve<B: Backend>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    front: Arc<Front<B>>,
    head_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let connections = front.connections();
    let shared = Arc::new(Shared {
        front: front.clone(),
        tls,
        builder: connection_builder(None),
        head_timeout,
        limits: connections.limits(),
    });
    let (closing, closing_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let place = match connections.admit(peer.ip(), handler::limit_key(peer.ip())) {
            Ok(place) => place,
            Err(full) => {
                // Closed at once: a refused connection costs no descriptor
                // beyond this moment.
                front.connection_refused(full);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let closing = closing_rx.clone();
        tokio::spawn(async move {
            connection(&shared, stream, peer, closing).await;
            drop(place);
        });
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    front.end_streams();
    drop(listener);
    let _ = closing.send(true);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while connections.open_count() > 0 {
        if Instant::now() >= deadline {
            tracing::warn!("some connections did not finish within 30 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serve one connection until it ends, is closed by its watchdog, or the
/// server shuts down.
async fn connection<B: Backend>(
    shared: &Shared<B>,
    stream: TcpStream,
    peer: SocketAddr,
    closing: watch::Receiver<bool>,
) {
    let activity = Activity::new();
    let io = Watched::new(stream, activity.clone());
    match &shared.tls {
        None => {
            let io = FramingGuard::new(io, shared.head_timeout);
            drive(shared, io, peer.ip(), activity, closing).await;
        }
        Some(acceptor) => {
            // The handshake is part of the time the first request has.
            let accepted = tokio::time::timeout(shared.limits.first_request, acceptor.accept(io));
            let stream = match accepted.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            };
            let io = FramingGuard::new(stream, shared.head_timeout);
            drive(shared, io, peer.ip(), activity, closing).await;
        }
    }
}

/// Run hyper on `io`, with the watchdog of `activity` beside it.
async fn drive<B, I>(
    shared: &Shared<B>,
    io: I,
    peer: IpAddr,
    activity: Arc<Activity>,
    mut closing: watch::Receiver<bool>,
) where
    B: Backend,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let front = shared.front.clone();
    let requests = activity.clone();
    let service = service_fn(move |req| {
        let front = front.clone();
        let activity = requests.clone();
        async move {
            let _running = activity.request();
            let resp = front.handle(req, peer).await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, &activity)))
        }
    });
    let conn = shared
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // Set once the connection was told to close: by then it must be gone.
    let mut must_end_by: Option<Instant> = None;
    loop {
        let next = match must_end_by {
            Some(at) => at,
            None => match activity.verdict(&shared.limits) {
                Verdict::Wait(wait) => Instant::now() + wait,
                Verdict::Idle => {
                    conn.as_mut().graceful_shutdown();
                    must_end_by = Some(Instant::now() + CLOSE_GRACE);
                    continue;
                }
                Verdict::Drop(why) => {
                    tracing::debug!(%peer, why, "connection closed");
                    return;
                }
            },
        };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = closing.changed(), if must_end_by.is_none() => {
                conn.as_mut().graceful_shutdown();
                must_end_by = Some(Instant::now() + SHUTDOWN_GRACE);
            }
            _ = tokio::time::sleep_until(next) => {
                if must_end_by.is_some_and(|at| Instant::now() >= at) {
                    tracing::debug!(%peer, "connection did not close in time");
                    return;
                }
            }
        }
    }
}
