//! The error body every non-2xx response carries.

use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// Machine-readable error class; the HTTP status follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u16)]
pub enum ErrorCode {
    /// 400: the body, a query parameter or an MLS object is malformed or invalid.
    BadRequest = 1,
    /// 401: missing, malformed, stale, replayed or forged authentication.
    Unauthorized = 2,
    /// 403: authenticated, but not allowed (not a member, acting for someone else).
    Forbidden = 3,
    /// 404: unknown client, group or key package.
    NotFound = 4,
    /// 409: a handshake for an epoch other than the group's current one.
    WrongEpoch = 5,
    /// 409: the resource exists in a conflicting state (e.g. client id taken).
    Conflict = 6,
    /// 413: body larger than the server's limit.
    PayloadTooLarge = 7,
    /// 415: wrong content type.
    UnsupportedMediaType = 8,
    /// 429: rate limit hit; retry later.
    TooManyRequests = 9,
    /// 503: overloaded or shutting down; retry later.
    Unavailable = 10,
    /// 500: the server failed (e.g. the disk); nothing was acknowledged.
    Internal = 11,
    /// 405: method not allowed on this path.
    MethodNotAllowed = 12,
    /// 507: a quota of the DS is reached (stored key packages, groups per
    /// client, members per group); nothing was changed.
    QuotaExceeded = 13,
}

impl ErrorCode {
    /// HTTP status for this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::WrongEpoch | ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
            ErrorCode::QuotaExceeded => 507,
        }
    }
}

/// Body of every error response.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ErrorBody {
    /// Error class.
    pub code: ErrorCode,
    /// Human-readable reason (UTF-8).
    pub message: VLBytes,
    /// For [`ErrorCode::WrongEpoch`]: the group's current epoch.
    pub current_epoch: Option<u64>,
}

impl ErrorBody {
    /// Build an error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into().into_bytes().into(),
            current_epoch: None,
        }
    }

    /// The message as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.message.as_slice()).into_owned()
    }
}
