//! Everything a request handler needs, shared across connections.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use mls_ds_protocol::ClientId;
use openmls_rust_crypto::RustCrypto;

use crate::auth::Authenticator;
use crate::config::Limits;
use crate::db::Db;
use crate::flusher::Flusher;
use crate::metrics::Metrics;
use crate::queues::Queues;
use crate::rate_limit::RateLimiter;

/// Shared server state.
pub struct AppState {
    /// Trees.
    pub db: Db,
    /// Queue service.
    pub queues: Arc<Queues>,
    /// Authentication and sessions.
    pub auth: Authenticator,
    /// Group commit.
    pub flusher: Flusher,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Per-client request rate limit.
    pub rate_limiter: RateLimiter,
    /// Configured limits.
    pub limits: Limits,
    /// Crypto for OpenMLS validation.
    pub crypto: RustCrypto,
    /// One lock per group: handshakes of a group are validated one at a time.
    group_locks: Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialises key package claims (each package is handed out once).
    pub claim_lock: Mutex<()>,
    /// Registrations handed to the flusher and not yet applied; its lock
    /// serialises registrations (one key per client id).
    pub registering: Arc<Mutex<HashMap<ClientId, crate::db::ClientRecord>>>,
    /// Every mutating request holds it shared; a live backup holds it
    /// exclusively, so the copy is consistent across trees.
    pub write_gate: tokio::sync::RwLock<()>,
    /// Clients that deleted themselves (loaded at start, kept current): they
    /// stay in rosters until removed, but nothing is queued for them.
    deleted: std::sync::RwLock<HashSet<ClientId>>,
}

impl AppState {
    /// Assemble the state.
    pub fn new(
        db: Db,
        queues: Arc<Queues>,
        flusher: Flusher,
        limits: Limits,
        deleted: HashSet<ClientId>,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            auth: Authenticator::new(limits.session_ttl_secs * 1000, limits.max_sessions),
            rate_limiter: RateLimiter::new(limits.rate_limit_per_sec, limits.rate_limit_burst),
            db,
            queues,
            flusher,
            metrics: Metrics::default(),
            limits,
            crypto: RustCrypto::default(),
            group_locks: Mutex::new(HashMap::new()),
            claim_lock: Mutex::new(()),
            registering: Arc::default(),
            write_gate: tokio::sync::RwLock::new(()),
            deleted: std::sync::RwLock::new(deleted),
        })
    }

    /// Whether a client deleted itself.
    pub fn is_deleted(&self, client: &ClientId) -> bool {
        self.deleted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(client)
    }

    /// Record a deletion.
    pub fn mark_deleted(&self, client: &ClientId) {
        self.deleted
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client.clone());
    }

    /// The lock of one group.
    pub fn group_lock(&self, group_id: &[u8]) -> Arc<tokio::sync::Mutex<()>> {
        self.group_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(group_id.to_vec())
            .or_default()
            .clone()
    }
}
