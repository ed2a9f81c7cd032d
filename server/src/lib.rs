//! mls-ds: an MLS Delivery Service whose whole state lives in sled.
//!
//! Module map (see `docs/ARCHITECTURE.md` for data flow and trees):
//! `config` (flags), `db` (trees, keys, records), `flusher` (group commit),
//! `auth` (tokens, sessions, replay), `clients`, `key_packages`, `groups`,
//! `commit_ordering`, `messages`, `queues`, `rate_limit`, `metrics`, `http`
//! (routing and the error-to-status mapping), `admin` (check, stats, backup),
//! `recovery` (reopening storage after a disk failure).

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod clients;
pub mod commit_ordering;
pub mod config;
pub mod db;
pub mod error;
pub mod flusher;
pub mod groups;
pub mod http;
pub mod key_packages;
pub mod messages;
pub mod metrics;
pub mod queues;
pub mod rate_limit;
pub mod recovery;
pub mod state;
pub mod tls;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use mls_ds_storage::{Durability, Store, StoreConfig};
use tokio::net::TcpListener;

use crate::config::{Limits, ServeArgs};
use crate::db::Db;
use crate::error::{Result, ServerError};
use crate::flusher::Flusher;
use crate::queues::Queues;
use crate::state::AppState;

/// Open the database the way the server does: the storage crate's own
/// per-operation flush is off (`Batched`) because the server's flusher makes
/// every request durable before answering.
pub fn open_store(data_dir: &Path, cache_mb: u64) -> Result<Store> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| ServerError::Internal(format!("cannot create {}: {e}", data_dir.display())))?;
    Ok(Store::open(
        data_dir,
        StoreConfig {
            durability: Durability::Batched,
            cache_capacity: cache_mb * 1024 * 1024,
            flush_every_ms: Some(500),
        },
    )?)
}

/// Open everything and build the shared state.
pub fn build_state(data_dir: &Path, limits: Limits) -> Result<Arc<AppState>> {
    let store = open_store(data_dir, limits.cache_mb)?;
    let db = Db::new(store.clone())?;
    let flusher = Flusher::start(store)?;
    let queues = Arc::new(Queues::open(db.clone(), flusher.clone())?);
    let deleted = clients::deleted_clients(&db)?;
    Ok(AppState::new(db, queues, flusher, limits, deleted))
}

/// Run the server until SIGINT or SIGTERM, then shut down gracefully: stop
/// accepting, finish in-flight requests (up to 30 s), flush, return.
pub async fn serve(data_dir: &Path, args: ServeArgs) -> Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let state = build_state(data_dir, args.limits.clone())?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| ServerError::Internal(format!("cannot listen on {}: {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    if let Some(path) = &args.port_file {
        std::fs::write(path, local.to_string())
            .map_err(|e| ServerError::Internal(format!("cannot write port file: {e}")))?;
    }
    tracing::info!(
        listen = %local,
        data_dir = %data_dir.display(),
        tls = tls.is_some(),
        "mls-ds listening (HTTP/1.1 and h2, TLS if configured, else h2c)"
    );

    let cell = recovery::StateCell::new(state);
    let maintenance = tokio::spawn(maintenance(cell.clone()));
    let admin_socket = tokio::spawn(admin::serve_socket(cell.clone(), data_dir.to_owned()));
    let recovery = tokio::spawn(recovery::watch(
        cell.clone(),
        data_dir.to_owned(),
        args.limits.clone(),
    ));
    let inflight = Arc::new(http::Inflight::default());
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that stalls its request head gives up its connection after
    // this (bodies are bounded by the same limit in `http`).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(args.limits.read_timeout_ms));
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let cell = cell.clone();
                let inflight = inflight.clone();
                let service = service_fn(move |req| {
                    let state = cell.get();
                    let inflight = inflight.clone();
                    async move {
                        match state {
                            Some(state) => http::handle(state, inflight, req).await,
                            None => Ok(http::error_response(ServerError::Unavailable(
                                recovery::REOPENING.into(),
                            ))),
                        }
                    }
                });
                match &tls {
                    None => {
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        let conn = graceful.watch(conn.into_owned());
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                    Some(acceptor) => {
                        // The handshake runs in the connection's task, so a
                        // slow client cannot stall the accept loop.
                        let acceptor = acceptor.clone();
                        let builder = builder.clone();
                        let watcher = graceful.watcher();
                        tokio::spawn(async move {
                            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
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
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            if let Err(e) = watcher.watch(conn.into_owned()).await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                }
            }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 30 s");
    }
    maintenance.abort();
    admin_socket.abort();
    recovery.abort();
    let _ = std::fs::remove_file(data_dir.join(admin::SOCKET));
    if let Some(state) = cell.get() {
        state.db.store.flush()?;
    }
    tracing::info!("flushed; bye");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Periodic housekeeping: prune expired key packages and apply the queue
/// retention bound.
async fn maintenance(cell: Arc<recovery::StateCell>) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tick.tick().await;
        let Some(state) = cell.get() else { continue };
        let s = state.clone();
        match tokio::task::spawn_blocking(move || key_packages::prune_expired(&s)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(pruned = n, "pruned expired key packages"),
            Ok(Err(e)) => tracing::warn!(error = %e, "key package pruning failed"),
            _ => {}
        }
        let retention_ms = state.limits.retention_secs.saturating_mul(1000);
        if retention_ms > 0 {
            let cutoff = db::now_ms().saturating_sub(retention_ms);
            match state.queues.expire(cutoff) {
                Ok((n, Some(durable))) => {
                    if let Err(e) = durable.wait().await {
                        tracing::warn!(error = %e, "writing the retention cleanup failed");
                    }
                    tracing::warn!(
                        dropped = n,
                        "dropped queue entries older than the retention bound"
                    );
                }
                Ok((_, None)) => {}
                Err(e) => tracing::warn!(error = %e, "queue retention failed"),
            }
        }
    }
}
