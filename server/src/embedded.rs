//! The DS on its embedded backend: a data directory opened with the
//! configured limits. The server, the admin commands, recovery and the test
//! support all open it the same way.

use std::path::Path;

use crate::backend::sled::{SledBackend, SledConfig, StoreTuning};
use crate::backend::StoreError;
use crate::config::{Limits, Registration};
use crate::rate_limit::Rate;
use crate::service::{Ds, Policy, RegistrationPolicy};

/// The DS on sled.
pub(crate) type SledDs = Ds<SledBackend>;

/// The services' limits from the command line's. `auto` registration is
/// open here: a server on a public address resolves it before (see
/// `Registration::resolve`).
pub(crate) fn policy(limits: &Limits) -> Policy {
    Policy {
        registration: match limits.registration {
            Registration::Auto | Registration::Open => RegistrationPolicy::Open,
            Registration::Invite => RegistrationPolicy::Invite,
            Registration::Closed => RegistrationPolicy::Closed,
        },
        max_key_packages: limits.max_key_packages,
        max_groups_per_client: limits.max_groups_per_client,
        max_group_members: limits.max_group_members,
        max_message_bytes: limits.max_message_bytes,
        claims_by_claimer: Rate {
            per_min: limits.claim_rate_per_min,
            burst: limits.claim_burst,
        },
        claims_by_target: Rate {
            per_min: limits.target_claim_rate_per_min,
            burst: limits.target_claim_burst,
        },
        max_key_package_batch: limits.max_key_package_batch,
        past_epoch_window: limits.past_epoch_window,
        max_page_entries: limits.max_page_entries,
        max_page_bytes: limits.max_page_bytes,
        max_wait_ms: limits.max_wait_ms,
        retention_secs: limits.retention_secs,
        commit_retention_secs: limits.commit_retention_secs,
        send_dedup_window_ms: limits.send_dedup_window_hours.saturating_mul(3_600_000),
        session_ttl_secs: limits.session_ttl_secs,
        max_sessions: limits.max_sessions,
    }
}

/// Open the data directory and build the DS on it.
pub(crate) fn open(data_dir: &Path, limits: &Limits) -> Result<SledDs, StoreError> {
    let config = SledConfig {
        store: StoreTuning {
            cache_mb: limits.cache_mb,
            snapshot_every_ops: limits.snapshot_every_ops,
        },
        max_queue_depth: limits.max_queue_depth,
        index_checkpoint_every_ops: limits.index_checkpoint_every_ops,
        receipts_run_size: usize::try_from(limits.receipts_run_size).unwrap_or(usize::MAX),
        roster_min_members: limits.roster_min_members as usize,
    };
    let backend = SledBackend::open(data_dir, config)?;
    Ok(Ds::new(backend, policy(limits)))
}
