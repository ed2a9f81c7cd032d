//! The core's one error type. It says what went wrong in the DS's terms;
//! which HTTP status that is, and what of it a client is shown, is decided in
//! one place of the HTTP adapter (`http::response`).

use crate::backend::{StorageFault, StoreError};

/// Everything a DS operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DsError {
    /// Malformed or invalid input; the reason is for the client.
    #[error("{0}")]
    Invalid(String),
    /// Authentication missing, stale, replayed or forged.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// Unknown client, group or key package.
    #[error("{0}")]
    NotFound(String),
    /// A handshake for an epoch other than the group's current one
    /// ([`DsError::overtaken`] when another handshake won the race).
    #[error("wrong epoch: {reason}; the group is at epoch {current}")]
    WrongEpoch {
        /// The group's current epoch.
        current: u64,
        /// What was wrong.
        reason: String,
    },
    /// The resource exists in a conflicting state.
    #[error("{0}")]
    Conflict(String),
    /// A rate limit of the DS (e.g. key package claims); retry later.
    #[error("{message}")]
    RateLimited {
        /// What was limited.
        message: String,
        /// Seconds until a retry can succeed.
        retry_after_secs: u64,
    },
    /// A quota of the DS is reached; nothing was changed.
    #[error("{0}")]
    QuotaExceeded(String),
    /// A message larger than the DS takes.
    #[error("{0}")]
    TooLarge(String),
    /// The DS cannot take the request now (storage broken or reopening,
    /// too many sessions); retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The disk failed while the request's writes were made durable;
    /// nothing of them is acknowledged.
    #[error("storage failed: {0}; nothing was acknowledged")]
    StorageFailed(StorageFault),
    /// A failure inside the DS. The detail is for the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl DsError {
    /// 409 for a handshake another one of the group was accepted before
    /// (the group is now at `current`).
    pub(crate) fn overtaken(current: u64) -> DsError {
        DsError::WrongEpoch {
            current,
            reason: "another handshake of the group was accepted meanwhile".into(),
        }
    }
}

impl From<StoreError> for DsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Failed(fault) => DsError::StorageFailed(fault),
            StoreError::Unavailable(reason) => DsError::Unavailable(reason),
            StoreError::AckBeyondHead { .. } => DsError::Invalid(e.to_string()),
            // The services handle the conditions they expect to fail; any
            // other means the request raced with a change it did not expect.
            StoreError::ConditionFailed(c) => DsError::Conflict(format!(
                "the request raced with another change ({c}); retry it"
            )),
            StoreError::Corrupt(_)
            | StoreError::Storage(_)
            | StoreError::Layout(_)
            | StoreError::Database(_) => DsError::Internal(e.to_string()),
        }
    }
}

impl From<mls_ds_protocol::DecodeError> for DsError {
    fn from(e: mls_ds_protocol::DecodeError) -> Self {
        DsError::Invalid(e.to_string())
    }
}

/// Shorthand for the services' results.
pub(crate) type Result<T, E = DsError> = std::result::Result<T, E>;
