//! The HTTP adapter: connections (HTTP/1.1 and h2, cleartext or TLS), and
//! per request the route, body, authentication and the one mapping from
//! errors to statuses. It knows the core's services and the `Backend` trait,
//! never a storage engine.
//!
//! - [`route`]: the `Route` enum, parsed once per request;
//! - [`framing`]: the guard under hyper that marks ambiguous framing;
//! - [`body`]: framing, size, timeout and content type of bodies;
//! - [`handler`]: admission, authentication, the call into the core;
//! - [`response`]: `ApiError`, statuses and error bodies;
//! - [`stream`]: `GET /v1/queue/stream`, the queue as server-sent events;
//! - [`metrics_listener`]: the separate listener serving `GET /metrics`.

pub(crate) mod body;
pub(crate) mod framing;
pub(crate) mod handler;
pub(crate) mod metrics_listener;
pub(crate) mod response;
pub(crate) mod route;
pub(crate) mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::backend::Backend;
use framing::FramingGuard;
pub(crate) use handler::{Front, HttpLimits};

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The connection settings both listeners share: HTTP/1.1 and h2, and a
/// client that stalls its request head gives up its connection after
/// `head_timeout` (bodies are bounded by the same limit in `body`).
fn connection_builder(head_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    builder
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
    let graceful = GracefulShutdown::new();
    let builder = connection_builder(head_timeout);
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
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let peer = peer.ip();
        let service = service_fn(move |req| {
            let front = front.clone();
            async move { Ok::<_, std::convert::Infallible>(front.handle(req, peer).await) }
        });
        match &tls {
            None => {
                let io = TokioIo::new(FramingGuard::new(stream, head_timeout));
                let conn = builder.serve_connection_with_upgrades(io, service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                // The handshake runs in the connection's task, so a slow
                // client cannot stall the accept loop.
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
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
                    let io = TokioIo::new(FramingGuard::new(stream, head_timeout));
                    let conn = builder.serve_connection_with_upgrades(io, service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    front.end_streams();
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 30 s");
    }
}
