//! The DS on its embedded backend: a data directory opened with the
//! configured limits. The server, the admin commands, recovery and the test
//! support all open it the same way.

use std::path::Path;

use crate::backend::sled::SledBackend;
use crate::config::Limits;
use crate::service::{Ds, Policy};

/// The DS on sled.
pub(crate) type SledDs = Ds<SledBackend>;

/// The services' limits from the command line's.
fn policy(limits: &Limits) -> Policy {
    Policy {
        max_key_package_batch: limits.max_key_package_batch,
        past_epoch_window: limits.past_epoch_window,
        max_page_entries: limits.max_page_entries,
        max_page_bytes: limits.max_page_bytes,
        max_wait_ms: limits.max_wait_ms,
        retention_secs: limits.retention_secs,
        session_ttl_secs: limits.session_ttl_secs,
        max_sessions: limits.max_sessions,
    }
}

/// Open the data directory and build the DS on it.
pub(crate) fn open(data_dir: &Path, limits: &Limits) -> Result<SledDs, String> {
    let backend = SledBackend::open(data_dir, limits.cache_mb).map_err(|e| e.to_string())?;
    Ok(Ds::new(backend, policy(limits)))
}
