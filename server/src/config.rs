//! Command line and environment configuration (clap, with `MLS_DS_*` env fallbacks).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// mls-ds: a self-hostable MLS Delivery Service that keeps all its state in sled.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Directory of the sled database (created if missing).
    #[arg(
        long,
        env = "MLS_DS_DATA_DIR",
        default_value = "./ds-data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `mls_ds_server=debug`).
    #[arg(long, env = "MLS_DS_LOG", default_value = "info", global = true)]
    pub log: String,

    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Server options (used when no subcommand is given).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the delivery service (the default).
    Serve(ServeArgs),
    /// Check integrity: every queue entry points to a stored message, every
    /// group loads, every record decodes. Exits non-zero on a problem.
    Check,
    /// Print counts of clients, key packages, groups, queued entries, messages.
    Stats,
    /// Write a consistent copy of the database to `--out` (a new directory).
    Backup {
        /// Target directory; must not exist yet.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Options of `serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (HTTP/1.1 and h2c).
    #[arg(long, env = "MLS_DS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Write the actually bound address to this file once listening (useful
    /// with port 0).
    #[arg(long, env = "MLS_DS_PORT_FILE")]
    pub port_file: Option<PathBuf>,

    /// PEM certificate chain: serve HTTPS (h2 and HTTP/1.1 by ALPN) instead of
    /// plain HTTP. Needs `--tls-key`.
    #[arg(long, env = "MLS_DS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching `--tls-cert`.
    #[arg(long, env = "MLS_DS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Threads handling requests (default: one per CPU core); the flusher's
    /// two threads and sled's I/O threads come on top. On a machine shared
    /// with other busy processes, fewer can be faster (BENCHMARKS.md).
    #[arg(long, env = "MLS_DS_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,

    #[command(flatten)]
    pub limits: Limits,
}

/// Limits and tunables.
#[derive(Args, Debug, Clone)]
pub struct Limits {
    /// Largest request body in bytes (larger: 413).
    #[arg(long, env = "MLS_DS_MAX_BODY", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most key packages in one publish request.
    #[arg(long, env = "MLS_DS_MAX_KP_BATCH", default_value_t = 500)]
    pub max_key_package_batch: usize,

    /// Longest long-poll wait a fetch may ask for, in milliseconds.
    #[arg(long, env = "MLS_DS_MAX_WAIT_MS", default_value_t = 30_000)]
    pub max_wait_ms: u64,

    /// Most entries in one queue page.
    #[arg(long, env = "MLS_DS_MAX_PAGE_ENTRIES", default_value_t = 1000)]
    pub max_page_entries: usize,

    /// Approximate byte bound of one queue page (at least one entry is always returned).
    #[arg(long, env = "MLS_DS_MAX_PAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_page_bytes: usize,

    /// Application messages are accepted for the current epoch and this many before it.
    #[arg(long, env = "MLS_DS_PAST_EPOCHS", default_value_t = 3)]
    pub past_epoch_window: u64,

    /// Requests per second allowed per client (0: unlimited).
    #[arg(long, env = "MLS_DS_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit_per_sec: u32,

    /// Burst size of the per-client rate limit.
    #[arg(long, env = "MLS_DS_RATE_BURST", default_value_t = 1000)]
    pub rate_limit_burst: u32,

    /// Lifetime of an authenticated session, in seconds.
    #[arg(long, env = "MLS_DS_SESSION_TTL", default_value_t = 3600)]
    pub session_ttl_secs: u64,

    /// Most sessions held at once (further session requests: 503).
    #[arg(long, env = "MLS_DS_MAX_SESSIONS", default_value_t = 100_000)]
    pub max_sessions: usize,

    /// Most requests handled at once (further ones: 503).
    #[arg(long, env = "MLS_DS_MAX_INFLIGHT", default_value_t = 4096)]
    pub max_inflight: usize,

    /// Unacknowledged messages older than this are dropped (retention bound for
    /// offline clients), in seconds; 0 keeps them forever.
    #[arg(long, env = "MLS_DS_RETENTION_SECS", default_value_t = 30 * 24 * 3600)]
    pub retention_secs: u64,

    /// sled page cache in MiB.
    #[arg(long, env = "MLS_DS_CACHE_MB", default_value_t = 64)]
    pub cache_mb: u64,

    /// How long a client may take to send a request head (HTTP/1) or a
    /// request body, in milliseconds; a stalled client loses its connection
    /// or gets 400 then, and gives up its in-flight slot.
    #[arg(
        long,
        env = "MLS_DS_READ_TIMEOUT_MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub read_timeout_ms: u64,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mls-ds").chain(args.iter().copied()))
    }

    #[test]
    fn zero_workers_or_read_timeout_is_refused() {
        for flag in ["--workers", "--read-timeout-ms"] {
            let err = match parse(&[flag, "0"]) {
                Ok(cli) => panic!("{flag} 0 was accepted: {cli:?}"),
                Err(e) => e,
            };
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
            assert!(err.to_string().contains(flag), "{err}");
        }
        let cli = match parse(&["--workers", "1", "--read-timeout-ms", "1"]) {
            Ok(cli) => cli,
            Err(e) => panic!("smallest valid values refused: {e}"),
        };
        assert_eq!(cli.serve.workers, Some(1));
        assert_eq!(cli.serve.limits.read_timeout_ms, 1);
    }
}
