//! The SDK's one error type, with kinds an application can match on: the DS
//! unreachable or the connection lost, the DS's refusal with its code, a
//! group this client is not in, local storage, and MLS failures by kind.

use mls_ds_protocol::{ErrorBody, ErrorCode};
use mls_ds_storage::StorageError;
use openmls::prelude::{ProcessMessageError, ValidationError, WelcomeError};

/// Everything the SDK can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The DS refused the request: `body.code` says why (e.g.
    /// [`ErrorCode::WrongEpoch`]).
    #[error("server error {status}: {}", body.text())]
    Server {
        /// HTTP status.
        status: u16,
        /// The DS's error body.
        body: ErrorBody,
        /// The DS's `Retry-After`, in seconds (rate limits).
        retry_after: Option<u64>,
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
    Storage(#[from] StorageError),
    /// An MLS operation failed.
    #[error("MLS error: {message}")]
    Mls {
        /// What kind of failure.
        kind: MlsErrorKind,
        /// OpenMLS's description.
        message: String,
    },
    /// This client is not in the group (never was, left, or was removed).
    #[error("not in group {}", hex::encode(group_id))]
    NotInGroup {
        /// The group.
        group_id: Vec<u8>,
    },
    /// The client named is not a member of the group.
    #[error("{client} is not a member of group {}", hex::encode(group_id))]
    NoSuchMember {
        /// The group.
        group_id: Vec<u8>,
        /// The client id asked for.
        client: String,
    },
    /// Invalid use of the SDK (bad client id, bad URL, not registered, ...).
    #[error("{0}")]
    Usage(String),
    /// A commit lost the race for its epoch too many times.
    #[error("commit rejected {0} times because other members committed first")]
    CommitRetriesExhausted(u32),
}

/// The kinds of MLS failure ([`ClientError::Mls`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MlsErrorKind {
    /// A message is for an epoch this client is not at and has no keys for
    /// (this client is behind, or the message is too old).
    WrongEpoch,
    /// The sender is not a member of the group as this client knows it.
    UnknownSender,
    /// A signature, membership or confirmation tag did not verify, or a
    /// message could not be decrypted.
    Authentication,
    /// A commit cannot be applied to this client's group state.
    InvalidCommit,
    /// A Welcome cannot be opened (e.g. the key package it was made for is
    /// not in this client's store).
    Welcome,
    /// Bytes that do not decode as the MLS structure expected.
    Malformed,
    /// The operation is impossible in the group's state (e.g. the group is
    /// inactive after a removal).
    GroupState,
    /// Any other failure (creating a commit or message, crypto, OpenMLS).
    Other,
}

impl ClientError {
    /// True if the DS refused the request because the group moved to
    /// another epoch (409 `wrong_epoch`).
    pub fn is_wrong_epoch(&self) -> bool {
        self.code() == Some(ErrorCode::WrongEpoch)
    }

    /// The DS's error code, if the DS refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { body, .. } => Some(body.code),
            _ => None,
        }
    }

    /// The kind of an MLS failure.
    pub fn mls_kind(&self) -> Option<MlsErrorKind> {
        match self {
            ClientError::Mls { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// True if the DS could not be reached or the connection broke: the
    /// operation may be retried later.
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. } | ClientError::ConnectionLost { .. }
        )
    }

    /// How long the DS asked to wait before a retry (a 429's
    /// `Retry-After`, in seconds).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ClientError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// HTTP status of a server error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An MLS failure of `kind`.
pub(crate) fn mls_error(kind: MlsErrorKind, e: impl std::fmt::Display) -> ClientError {
    ClientError::Mls {
        kind,
        message: e.to_string(),
    }
}

/// An MLS failure of no particular kind.
pub(crate) fn mls(e: impl std::fmt::Display) -> ClientError {
    mls_error(MlsErrorKind::Other, e)
}

/// MLS bytes that do not decode.
pub(crate) fn malformed(e: impl std::fmt::Display) -> ClientError {
    mls_error(MlsErrorKind::Malformed, e)
}

/// A message or commit that could not be processed, by why.
pub(crate) fn processing(e: ProcessMessageError<StorageError>) -> ClientError {
    use ValidationError as V;
    let kind = match &e {
        ProcessMessageError::ValidationError(v) => match v {
            V::WrongEpoch | V::NoPastEpochData => MlsErrorKind::WrongEpoch,
            V::UnknownMember | V::NonMemberApplicationMessage => MlsErrorKind::UnknownSender,
            V::InvalidSignature
            | V::InvalidMembershipTag
            | V::MissingMembershipTag
            | V::MissingConfirmationTag
            | V::UnableToDecrypt(_) => MlsErrorKind::Authentication,
            _ => MlsErrorKind::Other,
        },
        ProcessMessageError::InvalidCommit(_) => MlsErrorKind::InvalidCommit,
        ProcessMessageError::GroupStateError(_) => MlsErrorKind::GroupState,
        _ => MlsErrorKind::Other,
    };
    match e {
        ProcessMessageError::StorageError(s) => ClientError::Storage(s),
        other => mls_error(kind, other),
    }
}

/// A Welcome that could not be opened.
pub(crate) fn welcome(e: WelcomeError<StorageError>) -> ClientError {
    match e {
        WelcomeError::StorageError(s) => ClientError::Storage(s),
        other => mls_error(MlsErrorKind::Welcome, other),
    }
}

/// Shorthand.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use openmls::prelude::StageCommitError;

    #[test]
    fn processing_failures_are_classified() {
        let kind = |e: ProcessMessageError<StorageError>| processing(e).mls_kind();
        let v = ProcessMessageError::ValidationError;
        assert_eq!(
            kind(v(ValidationError::WrongEpoch)),
            Some(MlsErrorKind::WrongEpoch)
        );
        assert_eq!(
            kind(v(ValidationError::NoPastEpochData)),
            Some(MlsErrorKind::WrongEpoch)
        );
        assert_eq!(
            kind(v(ValidationError::UnknownMember)),
            Some(MlsErrorKind::UnknownSender)
        );
        assert_eq!(
            kind(v(ValidationError::InvalidSignature)),
            Some(MlsErrorKind::Authentication)
        );
        assert_eq!(
            kind(ProcessMessageError::InvalidCommit(
                StageCommitError::EpochMismatch
            )),
            Some(MlsErrorKind::InvalidCommit)
        );
        assert!(matches!(
            processing(ProcessMessageError::StorageError(StorageError::Io(
                std::io::Error::other("disk")
            ))),
            ClientError::Storage(_)
        ));
    }

    #[test]
    fn welcome_failures_are_classified() {
        assert_eq!(
            welcome(WelcomeError::NoMatchingKeyPackage).mls_kind(),
            Some(MlsErrorKind::Welcome)
        );
    }
}
