//! The server's one error type, and the one place that maps errors to HTTP
//! statuses and error bodies.

use mls_ds_protocol::{ErrorBody, ErrorCode};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Malformed or invalid input (400).
    #[error("{0}")]
    BadRequest(String),
    /// Authentication missing, stale, replayed or forged (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated but not allowed (403).
    #[error("{0}")]
    Forbidden(String),
    /// Unknown client, group or key package (404).
    #[error("{0}")]
    NotFound(String),
    /// A handshake for an epoch other than the current one (409).
    #[error("wrong epoch: {reason}; the group is at epoch {current}")]
    WrongEpoch {
        /// The group's current epoch.
        current: u64,
        /// What was wrong.
        reason: String,
    },
    /// Conflicting state (409).
    #[error("{0}")]
    Conflict(String),
    /// Body over the limit (413).
    #[error("body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// Wrong content type (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Method not allowed (405).
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(String),
    /// Rate limit (429).
    #[error("rate limit exceeded, retry later")]
    TooManyRequests,
    /// Overload or shutdown (503).
    #[error("{0}")]
    Unavailable(String),
    /// The storage layer failed; nothing was acknowledged (500).
    #[error("storage failure: {0}")]
    Storage(#[from] mls_ds_storage::StorageError),
    /// Anything else internal (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sled::Error> for ServerError {
    fn from(e: sled::Error) -> Self {
        ServerError::Storage(e.into())
    }
}

impl From<mls_ds_protocol::DecodeError> for ServerError {
    fn from(e: mls_ds_protocol::DecodeError) -> Self {
        ServerError::BadRequest(e.to_string())
    }
}

impl ServerError {
    /// The error class sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServerError::BadRequest(_) => ErrorCode::BadRequest,
            ServerError::Unauthorized(_) => ErrorCode::Unauthorized,
            ServerError::Forbidden(_) => ErrorCode::Forbidden,
            ServerError::NotFound(_) => ErrorCode::NotFound,
            ServerError::WrongEpoch { .. } => ErrorCode::WrongEpoch,
            ServerError::Conflict(_) => ErrorCode::Conflict,
            ServerError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            ServerError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ServerError::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            ServerError::TooManyRequests => ErrorCode::TooManyRequests,
            ServerError::Unavailable(_) => ErrorCode::Unavailable,
            ServerError::Storage(_) | ServerError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The body sent to the client.
    pub fn body(&self) -> ErrorBody {
        let mut body = ErrorBody::new(self.code(), self.to_string());
        if let ServerError::WrongEpoch { current, .. } = self {
            body.current_epoch = Some(*current);
        }
        body
    }
}

/// Shorthand used by every handler.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;
