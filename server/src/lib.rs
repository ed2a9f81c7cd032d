//! mls-ds: an MLS Delivery Service whose whole state lives in sled, or in
//! a PostgreSQL database that several DS processes share.
//!
//! Layers (`docs/ARCHITECTURE.md` has the picture):
//! - [`http`]: connections, routes, bodies, authentication, and the one
//!   mapping from errors to statuses;
//! - [`service`]: the DS's core, HTTP-free and storage-free;
//! - [`backend`]: the seam to storage (`Backend`) and its two
//!   implementations: embedded on sled, shared on PostgreSQL;
//! - around them: [`config`] (flags), [`config_file`] (`--config`, the
//!   TOML file under them), [`admin`] (check, stats, backup),
//!   [`recovery`] (reopening storage after a disk failure), [`metrics`],
//!   [`push`] (wake-ups for an application's push service),
//!   [`rate_limit`], [`tls`].

#![forbid(unsafe_code)]

pub mod admin;
mod backend;
mod compaction;
pub mod config;
pub mod config_file;
mod counts;
mod database;
mod embedded;
mod fd_limit;
mod histogram;
mod http;
mod metrics;
pub mod migrate;
mod push;
mod rate_limit;
mod recovery;
mod service;
mod state_cell;
#[cfg(feature = "test-support")]
pub mod test_support;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::backend::{Backend, CredentialChange};
use crate::compaction::CompactionPolicy;
use crate::config::{Limits, Registration, ServeArgs, Storage};
use crate::http::budget::MemoryLimits;
use crate::http::conn::ConnLimits;
use crate::http::stream::{StreamLimits, KEEPALIVE};
use crate::http::{Front, HttpLimits};
use crate::rate_limit::Rate;
use crate::service::Ds;
use crate::state_cell::StateCell;

/// How often expired key packages are pruned and the retention bound applied.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(600);

/// Why the server could not start, or not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory or the database could not be opened.
    #[error("cannot open {dir}: {reason}")]
    Open {
        /// The data directory, or "the database".
        dir: String,
        /// Why.
        reason: String,
    },
    /// The TLS certificate or key is unusable, or only one of them is given.
    #[error("{0}")]
    Tls(String),
    /// Options that only work together were given apart.
    #[error("{0}")]
    Options(String),
    /// The listen address is unusable.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The port file could not be written.
    #[error("cannot write the port file {path}: {source}")]
    PortFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The last flush at shutdown failed.
    #[error("storage failure at shutdown: {0}")]
    Flush(String),
}

/// The HTTP front of the DS in `cell`.
fn front<B: Backend>(cell: Arc<StateCell<Ds<B>>>, limits: &Limits) -> Front<B> {
    let write_timeout = Duration::from_millis(limits.write_timeout_ms);
    Front::new(
        cell,
        HttpLimits {
            max_body_bytes: limits.max_body_bytes,
            read_timeout: Duration::from_millis(limits.read_timeout_ms),
            max_inflight: limits.max_inflight,
            max_inflight_per_source: limits.max_inflight_per_source,
            max_fetches_per_client: limits.max_fetches_per_client,
            memory: MemoryLimits {
                requests_total: mib(limits.max_request_buffer_mb),
                requests_per_source: mib(limits.max_request_buffer_per_source_mb),
                responses_total: mib(limits.max_response_buffer_mb),
                responses_per_client: mib(limits.max_response_buffer_per_client_mb),
            },
            per_client: Rate::per_sec(limits.rate_limit_per_sec, limits.rate_limit_burst),
            per_address: Rate {
                per_min: limits.ip_rate_limit_per_min,
                burst: limits.ip_rate_limit_burst,
            },
            trust_forwarded_for: limits.trust_forwarded_for,
            streams: StreamLimits {
                max_total: limits.max_streams,
                max_per_client: limits.max_streams_per_client,
                max_lifetime: Duration::from_secs(limits.stream_max_secs),
                keepalive: KEEPALIVE.min(write_timeout / 2),
            },
            connections: ConnLimits {
                max_total: limits.max_connections,
                max_per_source: limits.max_connections_per_source,
                first_request: Duration::from_millis(limits.first_request_timeout_ms),
                idle: Duration::from_secs(limits.idle_timeout_secs),
                write_stall: write_timeout,
            },
        },
    )
}

fn mib(n: u64) -> usize {
    usize::try_from(n.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
}

/// Run the server (and its metrics listener, if `--metrics-listen` is set)
/// on `storage` until SIGINT or SIGTERM, then shut down gracefully: stop
/// accepting, finish in-flight requests (up to 30 s), flush, return.
pub async fn serve(storage: &Storage, args: ServeArgs) -> Result<(), ServeError> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key).map_err(ServeError::Tls)?),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(ServeError::Tls(
                "--tls-cert and --tls-key must be given together".into(),
            ))
        }
    };
    if args.metrics_port_file.is_some() && args.metrics_listen.is_none() {
        return Err(ServeError::Options(
            "--metrics-port-file needs --metrics-listen".into(),
        ));
    }
    let mut limits = args.limits.clone();
    limits.max_connections = fd_limit::fit_connections(limits.max_connections);
    limits.registration = limits
        .registration
        .resolve(args.listen, limits.trust_forwarded_for);
    if limits.registration == Registration::Open && args.limits.registration == Registration::Auto {
        tracing::info!(
            "registration is open to anyone who reaches {} (--registration auto on a loopback \
             address); behind a reverse proxy, set --registration invite or closed",
            args.listen
        );
    }
    let serving = Serving { args, limits, tls };
    match storage {
        Storage::Directory(dir) => serve_embedded(dir, serving).await,
        Storage::Database { url, pool_size } => serve_database(url, *pool_size, serving).await,
    }
}

/// What every backend is served with.
struct Serving {
    args: ServeArgs,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The DS on its data directory, with the admin socket and recovery after
/// disk failures.
async fn serve_embedded(data_dir: &Path, serving: Serving) -> Result<(), ServeError> {
    let ds = embedded::open(data_dir, &serving.limits).map_err(|e| ServeError::Open {
        dir: format!("the data directory {}", data_dir.display()),
        reason: e.to_string(),
    })?;
    let cell = StateCell::new(Arc::new(ds));
    let admin_socket = tokio::spawn(admin::serve_socket(cell.clone(), data_dir.to_owned()));
    let reopen = {
        let (dir, limits) = (data_dir.to_owned(), serving.limits.clone());
        move || embedded::open(&dir, &limits).map_err(|e| e.to_string())
    };
    let recovery = tokio::spawn(recovery::watch(cell.clone(), data_dir.to_owned(), reopen));
    let served = run(cell.clone(), &data_dir.display().to_string(), serving).await;
    admin_socket.abort();
    recovery.abort();
    let _ = std::fs::remove_file(data_dir.join(admin::SOCKET));
    served?;
    if let Some(ds) = cell.get() {
        ds.backend()
            .shut_down()
            .await
            .map_err(|e| ServeError::Flush(e.to_string()))?;
    }
    tracing::info!("flushed; bye");
    Ok(())
}

/// The DS on PostgreSQL: every write is committed before it is answered,
/// so there is nothing to flush at the end.
async fn serve_database(url: &str, pool_size: usize, serving: Serving) -> Result<(), ServeError> {
    let ds = database::open(url, pool_size, &serving.limits)
        .await
        .map_err(|e| ServeError::Open {
            dir: "the database".into(),
            reason: e.to_string(),
        })?;
    let cell = StateCell::new(Arc::new(ds));
    run(cell.clone(), "PostgreSQL", serving).await?;
    if let Some(ds) = cell.get() {
        ds.backend().close();
    }
    tracing::info!("bye");
    Ok(())
}

/// Listen, serve until a shutdown signal, stop the background tasks.
async fn run<B: Backend>(
    cell: Arc<StateCell<Ds<B>>>,
    storage: &str,
    serving: Serving,
) -> Result<(), ServeError> {
    let Serving { args, limits, tls } = serving;
    let (listener, local) = bind(args.listen).await?;
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    // The metrics port file first: whoever waits for `--port-file` finds
    // both.
    if let (Some((_, addr)), Some(path)) = (&metrics_listener, &args.metrics_port_file) {
        write_port_file(path, *addr)?;
    }
    if let Some(path) = &args.port_file {
        write_port_file(path, local)?;
    }
    tracing::info!(
        listen = %local,
        storage,
        tls = tls.is_some(),
        registration = ?limits.registration,
        "mls-ds listening (HTTP/1.1 and h2, TLS if configured, else h2c)"
    );
    if let Some((_, addr)) = &metrics_listener {
        tracing::info!(metrics_listen = %addr, "metrics listening (plain HTTP, GET /metrics)");
    }
    let compaction = CompactionPolicy {
        factor: args.compact_factor,
        min_bytes: args.compact_min_mb.saturating_mul(1024 * 1024),
    };
    let maintenance = tokio::spawn(maintenance(cell.clone(), compaction));
    let credentials = tokio::spawn(follow_credential_changes(cell.clone()));
    let push = args.push_url.clone().map(|url| {
        tracing::info!(push_url = %url, "push wake-ups on");
        tokio::spawn(push::run(
            cell.clone(),
            push::PushConfig {
                url,
                token: args.push_token.clone(),
                batch: Duration::from_millis(args.push_batch_ms),
            },
        ))
    });
    let front = Arc::new(front(cell.clone(), &limits));
    let head_timeout = Duration::from_millis(limits.read_timeout_ms);
    // One signal stops both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let metrics = metrics_listener.map(|(listener, _)| {
        let mut stopped = stopped.clone();
        tokio::spawn(http::metrics_listener::serve(
            listener,
            front.clone(),
            head_timeout,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        ))
    });
    http::serve(listener, tls, front, head_timeout, async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    })
    .await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    maintenance.abort();
    credentials.abort();
    if let Some(push) = push {
        push.abort();
    }
    Ok(())
}

/// End the sessions that other processes on the same storage invalidated
/// (a client deleted or recovered there).
async fn follow_credential_changes<B: Backend>(cell: Arc<StateCell<Ds<B>>>) {
    use tokio::sync::broadcast::error::RecvError;
    let Some(mut changes) = cell.get().and_then(|ds| ds.backend().credential_changes()) else {
        return;
    };
    loop {
        let change = match changes.recv().await {
            Ok(change) => change,
            Err(RecvError::Lagged(_)) => CredentialChange::Unknown,
            Err(RecvError::Closed) => return,
        };
        if let Some(ds) = cell.get() {
            ds.credentials_changed(&change);
        }
    }
}

/// A listener on `addr`, and the address it actually bound.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr, source })?;
    Ok((listener, local))
}

fn write_port_file(path: &Path, addr: SocketAddr) -> Result<(), ServeError> {
    std::fs::write(path, addr.to_string()).map_err(|source| ServeError::PortFile {
        path: path.to_owned(),
        source,
    })
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

/// Periodic housekeeping: prune expired key packages, apply the queue
/// retention bound, forget old sends and commits, compact when due.
async fn maintenance<B: Backend>(cell: Arc<StateCell<Ds<B>>>, compaction: CompactionPolicy) {
    let mut tick = tokio::time::interval(MAINTENANCE_PERIOD);
    let mut passes = 0u64;
    loop {
        tick.tick().await;
        passes += 1;
        let Some(ds) = cell.get() else { continue };
        if ds.backend().health().is_err() {
            continue;
        }
        match ds.prune_key_packages().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "pruned expired key packages"),
            Err(e) => tracing::warn!(error = %e, "key package pruning failed"),
        }
        match ds.apply_retention().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                dropped = n,
                "dropped queue entries older than the retention bound"
            ),
            Err(e) => tracing::warn!(error = %e, "queue retention failed"),
        }
        match ds.prune_sends().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "forgot sends past the deduplication window"),
            Err(e) => tracing::warn!(error = %e, "send record pruning failed"),
        }
        match ds.apply_commit_retention().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "pruned old commit records"),
            Err(e) => tracing::warn!(error = %e, "commit record pruning failed"),
        }
        if passes.is_multiple_of(compaction::CHECK_EVERY_PASSES) {
            compact_if_due(ds.backend(), compaction).await;
        }
    }
}

/// Compact the database if `policy` says its dead space is worth it.
async fn compact_if_due<B: Backend>(backend: &B, policy: CompactionPolicy) {
    match backend.size_on_disk() {
        Ok(disk) if policy.worth_measuring(disk) => {}
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(error = %e, "measuring the database's size failed");
            return;
        }
    }
    let space = match backend.space().await {
        Ok(space) => space,
        Err(e) => {
            tracing::warn!(error = %e, "measuring the database's live records failed");
            return;
        }
    };
    if !policy.due(space.on_disk, space.live) {
        return;
    }
    tracing::info!(
        on_disk = space.on_disk,
        live = space.live,
        "compacting the database (size on disk past --compact-factor times its live records)"
    );
    match backend.compact().await {
        Ok(report) => tracing::info!(report = %report.text.trim_end(), "compaction staged"),
        Err(e) => tracing::warn!(error = %e, "compaction failed; the database is unchanged"),
    }
}
