//! The DS's core, apart from HTTP and from any storage engine: [`Ds`] and
//! its services, which take the protocol's request types and an
//! authenticated [`auth::Caller`], and return the protocol's response types
//! or a [`DsError`].
//!
//! One module per service: [`clients`] (registration, sessions, deletion),
//! [`key_packages`], [`groups`] (creation, GroupInfo), [`commits`] (one
//! commit per epoch), [`messages`] (application messages and proposals),
//! [`delivery`] (fetch with long-poll, acknowledgements, retention), with
//! [`mls`] holding the MLS parsing and roster rules they share. Every
//! mutation is one [`WriteSet`](crate::backend::WriteSet) submitted to the
//! backend, answered once durable.

pub(crate) mod auth;
pub(crate) mod client_recovery;
pub(crate) mod clients;
pub(crate) mod commits;
pub(crate) mod delivery;
pub(crate) mod error;
pub(crate) mod groups;
pub(crate) mod invites;
pub(crate) mod key_packages;
pub(crate) mod loaded_groups;
pub(crate) mod messages;
mod mls;
pub(crate) mod operator;
mod private_header;
mod signatures;

use mls_ds_protocol::ClientId;
use openmls_rust_crypto::RustCrypto;

pub(crate) use self::error::DsError;
use self::error::Result;
use crate::backend::write_set::{Change, WriteSet};
use crate::backend::{Backend, CredentialChange};
use crate::rate_limit::{Rate, RateLimiter};
use crate::service::auth::Authenticator;

/// Who may register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RegistrationPolicy {
    /// Anyone.
    Open,
    /// Whoever presents a valid invitation code from the operator.
    Invite,
    /// Nobody through the API: the operator adds clients.
    Closed,
}

/// The limits and policies the services apply.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    /// Who may register.
    pub(crate) registration: RegistrationPolicy,
    /// Most ordinary key packages a client keeps stored.
    pub(crate) max_key_packages: usize,
    /// Most groups a client may have created (and not deleted).
    pub(crate) max_groups_per_client: u32,
    /// Most members in a group.
    pub(crate) max_group_members: usize,
    /// Largest application message or proposal, in bytes.
    pub(crate) max_message_bytes: usize,
    /// Key package claims a client may make.
    pub(crate) claims_by_claimer: Rate,
    /// Claims of one client's key packages, by anyone.
    pub(crate) claims_by_target: Rate,
    /// Most key packages in one publish request.
    pub(crate) max_key_package_batch: usize,
    /// Application messages are accepted for the current epoch and this many before it.
    pub(crate) past_epoch_window: u64,
    /// Most entries in one queue page.
    pub(crate) max_page_entries: usize,
    /// Approximate byte bound of one queue page.
    pub(crate) max_page_bytes: usize,
    /// Longest long-poll, in milliseconds.
    pub(crate) max_wait_ms: u64,
    /// Unacknowledged messages older than this are dropped (0: never), in seconds.
    pub(crate) retention_secs: u64,
    /// Accepted-commit records older than this are pruned (0: never), in seconds.
    pub(crate) commit_retention_secs: u64,
    /// How long a send with a send id is remembered, from the id's time, in
    /// milliseconds.
    pub(crate) send_dedup_window_ms: u64,
    /// Lifetime of a session, in seconds.
    pub(crate) session_ttl_secs: u64,
    /// Most sessions held at once.
    pub(crate) max_sessions: usize,
}

/// The delivery service: its backend, authentication and policy.
pub(crate) struct Ds<B> {
    backend: B,
    auth: Authenticator,
    crypto: RustCrypto,
    policy: Policy,
    claims_by_claimer: RateLimiter<ClientId>,
    claims_by_target: RateLimiter<ClientId>,
    /// Clients with a long-poll or a stream open (push wake-ups skip them).
    listeners: std::sync::Arc<crate::counts::ClientCounts>,
    /// Large groups kept loaded between handshakes.
    loaded: loaded_groups::LoadedGroups,
}

impl<B: Backend> Ds<B> {
    /// A DS on `backend`.
    pub(crate) fn new(backend: B, policy: Policy) -> Ds<B> {
        Ds {
            auth: Authenticator::new(
                policy.session_ttl_secs.saturating_mul(1000),
                policy.max_sessions,
            ),
            backend,
            crypto: RustCrypto::default(),
            claims_by_claimer: RateLimiter::new(policy.claims_by_claimer),
            claims_by_target: RateLimiter::new(policy.claims_by_target),
            listeners: Default::default(),
            loaded: Default::default(),
            policy,
        }
    }

    /// The storage behind the services.
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    /// Sessions and tokens.
    pub(crate) fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    /// End the sessions (and queue streams) that another process's change
    /// of credentials invalidated.
    pub(crate) fn credentials_changed(&self, change: &CredentialChange) {
        match change {
            CredentialChange::Client(id) => self.auth.end_sessions(id),
            CredentialChange::Unknown => self.auth.end_all_sessions(),
        }
    }

    /// Write `changes` (housekeeping: removals nobody races for) in write
    /// sets of at most [`PRUNE_CHUNK`], each durable before the next.
    pub(crate) async fn write_in_chunks(&self, mut changes: Vec<Change>) -> Result<()> {
        while !changes.is_empty() {
            let rest = changes.split_off(changes.len().min(PRUNE_CHUNK));
            self.backend
                .submit(WriteSet {
                    changes,
                    ..WriteSet::default()
                })
                .wait()
                .await?;
            changes = rest;
        }
        Ok(())
    }
}

/// Changes per write set when pruning, so that one write stays small.
pub(crate) const PRUNE_CHUNK: usize = 1024;
