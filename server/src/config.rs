//! Command line and environment configuration (clap, with `MLS_DS_*` env fallbacks).
//!
//! Over 500 lines because each option's doc comment is its `--help` text:
//! the file is mostly that text, one field per option.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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

    /// PostgreSQL database to keep the state in instead of `--data-dir`
    /// (`postgres://user:password@host:port/db?sslmode=require`), shared by
    /// any number of DS processes; unset: the embedded sled database.
    #[arg(long, env = "MLS_DS_DATABASE", global = true, hide_env_values = true)]
    pub database: Option<String>,

    /// Connections each DS process keeps to `--database`.
    #[arg(long, env = "MLS_DS_DATABASE_POOL", default_value_t = 16, global = true,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub database_pool: u16,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `mls_ds_server=debug`).
    #[arg(long, env = "MLS_DS_LOG", default_value = "info", global = true)]
    pub log: String,

    // Read by `config_file` before clap parses the rest.
    /// TOML file setting any of these options by its long name, e.g.
    /// `listen = "0.0.0.0:8443"` (docs/CONFIG.md); flags and environment
    /// variables override it.
    #[arg(long, env = "MLS_DS_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Server options (used when no subcommand is given).
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    /// Where the state lives: `--database` if given, else `--data-dir`.
    pub fn storage(&self) -> Storage {
        match &self.database {
            Some(url) => Storage::Database {
                url: url.clone(),
                pool_size: usize::from(self.database_pool),
            },
            None => Storage::Directory(self.data_dir.clone()),
        }
    }
}

/// Where the DS keeps its state (its `Debug` leaves the database URL out:
/// it may hold a password).
#[derive(Clone)]
pub enum Storage {
    /// The embedded sled database in this directory.
    Directory(PathBuf),
    /// A PostgreSQL database, shared by any number of DS processes.
    Database {
        /// Its connection URL (holds the password: never logged).
        url: String,
        /// Connections per process.
        pool_size: usize,
    },
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Directory(dir) => f.debug_tuple("Directory").field(dir).finish(),
            Storage::Database { pool_size, .. } => f
                .debug_struct("Database")
                .field("url", &"<hidden>")
                .field("pool_size", pool_size)
                .finish(),
        }
    }
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the delivery service (the default).
    Serve(Box<ServeArgs>),
    /// Check integrity: every queue entry points to a stored message, every
    /// group loads, every record decodes. Exits non-zero on a problem.
    Check,
    /// Print counts of clients, key packages, groups, queued entries,
    /// messages, and the bytes of live records against the bytes on disk.
    Stats,
    /// Give disk space back: rewrite the database into one that holds only
    /// the live records. A running server does it under its write path and
    /// reopens storage on the copy (requests get 503 for that moment).
    Compact,
    /// Write a consistent copy of the database to `--out` (a new directory).
    Backup {
        /// Target directory; must not exist yet.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into `--data-dir`, which must not exist yet (or be
    /// empty), and check the result. Start the server on it afterwards.
    Restore {
        /// A directory written by `mls-ds backup`.
        #[arg(long)]
        from: PathBuf,
    },
    /// Invitation codes, for `--registration invite`.
    #[command(subcommand)]
    Invite(InviteCommand),
    /// Clients: add one (for `--registration closed`), list, delete.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Groups: list, delete.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Remove accepted-commit records older than the given age (each
    /// group's newest stays). The server also does this by itself, see
    /// `--commit-retention-secs`.
    PruneCommits {
        /// Age in days.
        #[arg(long, default_value_t = 30)]
        older_than_days: u64,
    },
    /// Copy everything in the (stopped) data directory `--from` into the
    /// empty PostgreSQL database `--to`, in one transaction: queues keep
    /// their sequence numbers and acknowledgement marks, key packages,
    /// groups, commits, invitations and remembered sends come along.
    Migrate {
        /// The sled data directory (no server may hold it).
        #[arg(long)]
        from: PathBuf,
        /// The database's URL (`postgres://...`); its schema is created.
        #[arg(long)]
        to: String,
    },
}

/// `mls-ds invite ...`
#[derive(Subcommand, Debug)]
pub enum InviteCommand {
    /// Create a code; prints it.
    Create {
        /// Registrations it allows.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// Hours it stays valid (default: until used up or revoked).
        #[arg(long)]
        valid_for_hours: Option<u64>,
    },
    /// List the codes with their uses left and expiry.
    List,
    /// Revoke a code.
    Revoke {
        /// The code.
        code: String,
    },
}

/// `mls-ds client ...`
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Register a client with the public key it gave the operator.
    Add {
        /// Its client id.
        id: String,
        /// Its public signature key, hex.
        #[arg(long)]
        key: String,
        /// MLS signature scheme code point (default Ed25519, 0x0807).
        #[arg(long, default_value_t = 0x0807)]
        scheme: u16,
    },
    /// List clients with their queue depth.
    List,
    /// Delete a client (its key packages, queue and sessions go; the id
    /// stays reserved).
    Delete {
        /// Its client id.
        id: String,
    },
}

/// `mls-ds group ...`
#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List groups with their epoch and size.
    List,
    /// Delete a group; its members get a `GroupDeleted` queue entry.
    Delete {
        /// Group id, hex.
        id: String,
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

    // The TLS pair is checked by `serve`, not by clap's `requires`: a value
    // from the config file is a clap default, which `requires` ignores.
    /// PEM certificate chain: serve HTTPS (h2 and HTTP/1.1 by ALPN) instead of
    /// plain HTTP. Needs `--tls-key`.
    #[arg(long, env = "MLS_DS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching `--tls-cert`.
    #[arg(long, env = "MLS_DS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Address of a second, plain-HTTP listener answering only `GET
    /// /metrics` (Prometheus text); unset: no metrics endpoint.
    #[arg(long, env = "MLS_DS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Write the metrics listener's bound address to this file (written
    /// before `--port-file`). Needs `--metrics-listen`.
    #[arg(long, env = "MLS_DS_METRICS_PORT_FILE")]
    pub metrics_port_file: Option<PathBuf>,

    /// URL (`http://` or `https://`) the DS POSTs content-free wake-ups to
    /// when the queue of a client that is not listening grows (for the
    /// application's push service); unset: no wake-ups.
    #[arg(long, env = "MLS_DS_PUSH_URL", value_parser = push_url)]
    pub push_url: Option<hyper::Uri>,

    /// Sent with every wake-up request as `Authorization: Bearer <token>`.
    #[arg(long, env = "MLS_DS_PUSH_TOKEN", hide_env_values = true)]
    pub push_token: Option<String>,

    /// How long wake-ups are gathered into one request, in milliseconds.
    #[arg(long, env = "MLS_DS_PUSH_BATCH_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub push_batch_ms: u64,

    /// Threads handling requests (default: one per CPU core); the flusher's
    /// two threads and sled's I/O threads come on top. On a machine shared
    /// with other busy processes, fewer can be faster (BENCHMARKS.md).
    #[arg(long, env = "MLS_DS_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,

    /// Compact the database (as `mls-ds compact` does) when, at its hourly
    /// look, its size on disk exceeds this many times the bytes of its live
    /// records (and `--compact-min-mb` more than them); 0 never compacts on
    /// its own.
    #[arg(long, env = "MLS_DS_COMPACT_FACTOR", default_value_t = 3)]
    pub compact_factor: u64,

    /// Space that is never worth a compaction, in MiB: the database is
    /// compacted only when this much or more would be given back.
    #[arg(long, env = "MLS_DS_COMPACT_MIN_MB", default_value_t = 256)]
    pub compact_min_mb: u64,

    #[command(flatten)]
    pub limits: Limits,
}

/// A push gateway URL: absolute, `http` or `https`.
fn push_url(s: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() => Ok(uri),
        _ => Err("expected an http:// or https:// URL with a host".into()),
    }
}

/// The `--registration` policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Registration {
    /// Open on a loopback listen address without a reverse proxy in front
    /// (`--trust-forwarded-for` unset), invite otherwise.
    Auto,
    /// Anyone may register.
    Open,
    /// Registration needs an invitation code.
    Invite,
    /// Only the operator adds clients.
    Closed,
}

impl Registration {
    /// `auto` decided for a server listening on `listen`, behind a reverse
    /// proxy on the same machine if `behind_proxy`: that one serves the
    /// world on a loopback address.
    pub fn resolve(self, listen: std::net::SocketAddr, behind_proxy: bool) -> Registration {
        match self {
            Registration::Auto if listen.ip().is_loopback() && !behind_proxy => Registration::Open,
            Registration::Auto => Registration::Invite,
            other => other,
        }
    }
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
    #[arg(long, env = "MLS_DS_MAX_PAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_page_bytes: usize,

    /// Application messages are accepted for the current epoch and this many before it.
    #[arg(long, env = "MLS_DS_PAST_EPOCHS", default_value_t = 3)]
    pub past_epoch_window: u64,

    /// Requests per second allowed per client (0: unlimited; over it: 429).
    #[arg(long, env = "MLS_DS_RATE_LIMIT", default_value_t = 100)]
    pub rate_limit_per_sec: u32,

    /// Burst size of the per-client rate limit.
    #[arg(long, env = "MLS_DS_RATE_BURST", default_value_t = 1000)]
    pub rate_limit_burst: u32,

    /// Who may register: `open` (anyone), `invite` (with an operator's
    /// invitation code, `mls-ds invite create`), `closed` (only clients the
    /// operator adds, `mls-ds client add`), or `auto`: open when listening
    /// on a loopback address (only this machine can reach it) and not
    /// behind a proxy (`--trust-forwarded-for`), invite otherwise. A proxy
    /// that forwards to a loopback address without that flag makes `auto`
    /// open to the world: set the policy explicitly there.
    #[arg(long, env = "MLS_DS_REGISTRATION", value_enum, default_value_t = Registration::Auto)]
    pub registration: Registration,

    /// Registrations and session openings per minute allowed per source
    /// address (0: unlimited; over it: 429).
    #[arg(long, env = "MLS_DS_IP_RATE_LIMIT", default_value_t = 1200)]
    pub ip_rate_limit_per_min: u32,

    /// Burst size of the per-address limit.
    #[arg(long, env = "MLS_DS_IP_RATE_BURST", default_value_t = 200)]
    pub ip_rate_limit_burst: u32,

    /// Behind a reverse proxy on this machine: for connections from a
    /// loopback address, take the client's address from the last entry of
    /// `X-Forwarded-For` (the one the proxy added).
    #[arg(long, env = "MLS_DS_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,

    /// Key package claims per minute allowed per claiming client (0:
    /// unlimited; over it: 429).
    #[arg(long, env = "MLS_DS_CLAIM_RATE", default_value_t = 300)]
    pub claim_rate_per_min: u32,

    /// Burst size of the per-claimer limit (enough to invite that many
    /// members at once).
    #[arg(long, env = "MLS_DS_CLAIM_BURST", default_value_t = 200)]
    pub claim_burst: u32,

    /// Claims per minute of one client's key packages, by anyone (0:
    /// unlimited; over it: 429), so that nobody drains another client's
    /// packages.
    #[arg(long, env = "MLS_DS_TARGET_CLAIM_RATE", default_value_t = 60)]
    pub target_claim_rate_per_min: u32,

    /// Burst size of the per-target limit.
    #[arg(long, env = "MLS_DS_TARGET_CLAIM_BURST", default_value_t = 50)]
    pub target_claim_burst: u32,

    /// Most ordinary key packages kept per client (more: 507).
    #[arg(long, env = "MLS_DS_MAX_KEY_PACKAGES", default_value_t = 1000)]
    pub max_key_packages: usize,

    /// Most groups a client may have created that still exist (more: 507).
    #[arg(long, env = "MLS_DS_MAX_GROUPS_PER_CLIENT", default_value_t = 1000)]
    pub max_groups_per_client: u32,

    /// Most members in a group (more: 507).
    #[arg(long, env = "MLS_DS_MAX_GROUP_MEMBERS", default_value_t = 10_000)]
    pub max_group_members: usize,

    /// Largest application message or proposal, in bytes (larger: 413).
    #[arg(long, env = "MLS_DS_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024)]
    pub max_message_bytes: usize,

    /// Most entries a client's queue holds; a full queue drops its oldest
    /// entries to make room for each new one (the client sees its acknowledgement mark
    /// jump, as with the retention bound, and resyncs).
    #[arg(long, env = "MLS_DS_MAX_QUEUE_DEPTH", default_value_t = 25_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queue_depth: u64,

    /// Lifetime of an authenticated session, in seconds.
    #[arg(long, env = "MLS_DS_SESSION_TTL", default_value_t = 3600)]
    pub session_ttl_secs: u64,

    /// Most sessions held at once; beyond it the oldest session gives way
    /// to a new one (its client gets 401 and opens another).
    #[arg(long, env = "MLS_DS_MAX_SESSIONS", default_value_t = 100_000)]
    pub max_sessions: usize,

    /// Most requests handled at once (further ones: 503).
    #[arg(long, env = "MLS_DS_MAX_INFLIGHT", default_value_t = 4096)]
    pub max_inflight: usize,

    /// Most requests handled at once from one source address (further
    /// ones: 429); behind a proxy, see `--trust-forwarded-for`.
    #[arg(long, env = "MLS_DS_MAX_INFLIGHT_PER_SOURCE", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_inflight_per_source: usize,

    /// Most fetches (`GET /v1/queue`, long-polls included) one client runs
    /// at once (further ones: 429).
    #[arg(long, env = "MLS_DS_MAX_FETCHES_PER_CLIENT", default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_fetches_per_client: usize,

    /// Most client connections open at once; further ones are closed at
    /// once. Lowered at startup to fit the process's open-file limit.
    #[arg(long, env = "MLS_DS_MAX_CONNECTIONS", default_value_t = 8192,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,

    /// Most connections open at once from one source address (not counted
    /// for a local proxy with `--trust-forwarded-for`).
    #[arg(long, env = "MLS_DS_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 64,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections_per_source: usize,

    /// How soon a new connection must start its first request (TLS
    /// handshake included), in milliseconds; otherwise it is closed.
    #[arg(long, env = "MLS_DS_FIRST_REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub first_request_timeout_ms: u64,

    /// How long a connection may stay idle (no request running, no response
    /// being sent), in seconds; then it is closed gracefully.
    #[arg(long, env = "MLS_DS_IDLE_TIMEOUT_SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,

    /// How long a response may go without a byte reaching the connection
    /// (the peer does not read), in milliseconds; then the connection is
    /// closed. Queue streams send a keep-alive at least twice this often.
    #[arg(long, env = "MLS_DS_WRITE_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout_ms: u64,

    /// Bytes of request bodies being read at once, in MiB (further
    /// requests: 503).
    #[arg(long, env = "MLS_DS_MAX_REQUEST_BUFFER_MB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_buffer_mb: u64,

    /// Bytes of request bodies being read at once from one source address,
    /// in MiB (further requests: 429).
    #[arg(long, env = "MLS_DS_MAX_REQUEST_BUFFER_PER_SOURCE_MB", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_buffer_per_source_mb: u64,

    /// Bytes of large responses (over 16 KiB) not yet sent, in MiB
    /// (further ones: 503).
    #[arg(long, env = "MLS_DS_MAX_RESPONSE_BUFFER_MB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_response_buffer_mb: u64,

    /// Bytes of large responses not yet sent to one client, in MiB
    /// (further ones: 429); at least two pages of `--max-page-bytes`.
    #[arg(long, env = "MLS_DS_MAX_RESPONSE_BUFFER_PER_CLIENT_MB", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_response_buffer_per_client_mb: u64,

    /// Queue streams (`GET /v1/queue/stream`) open at once; they hold no
    /// in-flight slot.
    #[arg(long, env = "MLS_DS_MAX_STREAMS", default_value_t = 10_000)]
    pub max_streams: usize,

    /// Queue streams one client may have open at once (its devices share
    /// one id only if the application does so).
    #[arg(long, env = "MLS_DS_MAX_STREAMS_PER_CLIENT", default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_streams_per_client: usize,

    /// Longest life of one queue stream, in seconds (the client reconnects,
    /// which re-checks its authentication).
    #[arg(long, env = "MLS_DS_STREAM_MAX_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_max_secs: u64,

    /// Accepted-commit records older than this are pruned (each group's
    /// newest stays), in seconds; 0 keeps them forever.
    #[arg(long, env = "MLS_DS_COMMIT_RETENTION_SECS", default_value_t = 30 * 24 * 3600)]
    pub commit_retention_secs: u64,

    /// A send with a send id is remembered this long (counted from the id's
    /// time), so that a retry is answered instead of delivered again; in
    /// hours, at least 1.
    #[arg(long, env = "MLS_DS_SEND_DEDUP_WINDOW_HOURS", default_value_t = 7 * 24,
          value_parser = clap::value_parser!(u64).range(1..=24 * 365))]
    pub send_dedup_window_hours: u64,

    /// Unacknowledged messages older than this are dropped (retention bound for
    /// offline clients), in seconds; 0 keeps them forever.
    #[arg(long, env = "MLS_DS_RETENTION_SECS", default_value_t = 30 * 24 * 3600)]
    pub retention_secs: u64,

    /// sled page cache in MiB.
    #[arg(long, env = "MLS_DS_CACHE_MB", default_value_t = 64)]
    pub cache_mb: u64,

    /// sled log writes between the snapshots of its page table written while
    /// the server runs (at least one per database page; 0: only at start).
    /// A restart replays the log written since the newest snapshot, so this
    /// bounds the time a restart takes after a long run.
    #[arg(long, env = "MLS_DS_SNAPSHOT_EVERY_OPS", default_value_t = 1_000_000)]
    pub snapshot_every_ops: u64,

    /// Jobs of the write path (sends, acknowledgements, other writes)
    /// between the checkpoints of the queue index written while the server
    /// runs (one is written at every graceful stop too; 0: only then). A
    /// start reads the newest and the messages stored since, so this bounds
    /// the time a start after a crash takes with a long backlog.
    #[arg(
        long,
        env = "MLS_DS_INDEX_CHECKPOINT_EVERY_OPS",
        default_value_t = 1_000_000
    )]
    pub index_checkpoint_every_ops: u64,

    /// Send receipts (of sends with a send id) kept in memory, exact,
    /// before they are frozen into a sorted run on disk. Fewer cost less
    /// memory and make more runs, each one more Bloom filter probe per
    /// lookup.
    #[arg(
        long,
        env = "MLS_DS_RECEIPTS_RUN_SIZE",
        default_value_t = 65_536,
        value_parser = clap::value_parser!(u64).range(1..=16_777_216)
    )]
    pub receipts_run_size: u64,

    /// Members from which a group's messages store their fan-out as a
    /// reference to the group's roster, stored once per change of its
    /// members, instead of a list of every recipient with its sequence
    /// number. Lower values share rosters in smaller groups too.
    #[arg(
        long,
        env = "MLS_DS_ROSTER_MIN_MEMBERS",
        default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(2..=1_000_000)
    )]
    pub roster_min_members: u32,

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

    use super::{Cli, Registration};

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

    #[test]
    fn auto_registration_is_open_only_on_loopback_without_a_proxy() {
        let at = |a: &str| a.parse().unwrap();
        let auto = Registration::Auto;
        assert_eq!(
            auto.resolve(at("127.0.0.1:8080"), false),
            Registration::Open
        );
        assert_eq!(auto.resolve(at("[::1]:8080"), false), Registration::Open);
        assert_eq!(
            auto.resolve(at("127.0.0.1:8080"), true),
            Registration::Invite
        );
        assert_eq!(
            auto.resolve(at("0.0.0.0:8080"), false),
            Registration::Invite
        );
        assert_eq!(
            Registration::Closed.resolve(at("127.0.0.1:8080"), false),
            Registration::Closed
        );
    }
}
