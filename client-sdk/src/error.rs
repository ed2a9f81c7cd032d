//! The SDK's one error type.

use mls_ds_protocol::ErrorBody;

/// Everything the SDK can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The DS answered with an error.
    #[error("server error {status}: {}", body.text())]
    Server {
        /// HTTP status.
        status: u16,
        /// The DS's error body.
        body: ErrorBody,
    },
    /// No connection to the DS could be made (refused, no route, name not
    /// resolved, TLS handshake or certificate refused).
    #[error("cannot reach the DS at {url}: {detail}")]
    Unreachable {
        /// The DS's base URL.
        url: String,
        /// What went wrong, most specific cause last.
        detail: String,
    },
    /// A connection to the DS broke during a request: whether the DS
    /// received it is unknown.
    #[error("lost the connection to the DS at {url}: {detail}")]
    ConnectionLost {
        /// The DS's base URL.
        url: String,
        /// What went wrong, most specific cause last.
        detail: String,
    },
    /// The DS sent something the SDK cannot decode.
    #[error("bad response from server: {0}")]
    BadResponse(String),
    /// Local storage failed.
    #[error("storage error: {0}")]
    Storage(#[from] mls_ds_storage::StorageError),
    /// An MLS operation failed.
    #[error("MLS error: {0}")]
    Mls(String),
    /// Invalid use of the SDK (unknown group, not registered, ...).
    #[error("{0}")]
    Usage(String),
    /// A commit lost the race for its epoch too many times.
    #[error("commit rejected {0} times because other members committed first")]
    CommitRetriesExhausted(u32),
}

impl ClientError {
    /// True if the DS said 409 wrong epoch.
    pub fn is_wrong_epoch(&self) -> bool {
        matches!(self, ClientError::Server { body, .. } if body.code == mls_ds_protocol::ErrorCode::WrongEpoch)
    }

    /// True if the DS could not be reached or the connection broke: the
    /// operation may be retried later.
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. } | ClientError::ConnectionLost { .. }
        )
    }

    /// HTTP status of a server error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub(crate) fn mls(e: impl std::fmt::Display) -> ClientError {
    ClientError::Mls(e.to_string())
}

/// Shorthand.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
