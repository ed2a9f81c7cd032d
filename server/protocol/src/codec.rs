//! Encoding and strict decoding of API bodies.

use tls_codec::{Deserialize, Serialize};

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid encoding (truncated, bad length, bad enum value).
    #[error("malformed body: {0}")]
    Malformed(String),
    /// The encoding was valid but followed by extra bytes.
    #[error("{0} trailing bytes after the body")]
    Trailing(usize),
    /// A field violates a rule of the API (e.g. a client id with bad characters).
    #[error("invalid field: {0}")]
    Invalid(String),
}

/// Encode a value. Encoding only fails for values that exceed TLS length
/// limits, which the API's own limits rule out; callers surface it as an error.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, tls_codec::Error> {
    value.tls_serialize_detached()
}

/// Decode exactly one value from `bytes` (no trailing data allowed).
pub fn decode<T: Deserialize>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut rest = bytes;
    let value =
        T::tls_deserialize(&mut rest).map_err(|e| DecodeError::Malformed(format!("{e:?}")))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(value)
}

/// A boolean on the wire: one byte, 0 or 1 (anything else is malformed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bool(pub bool);

impl tls_codec::Size for Bool {
    fn tls_serialized_len(&self) -> usize {
        1
    }
}

impl tls_codec::Serialize for Bool {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        u8::from(self.0).tls_serialize(writer)
    }
}

impl tls_codec::Deserialize for Bool {
    fn tls_deserialize<R: std::io::Read>(bytes: &mut R) -> Result<Self, tls_codec::Error> {
        match u8::tls_deserialize(bytes)? {
            0 => Ok(Bool(false)),
            1 => Ok(Bool(true)),
            v => Err(tls_codec::Error::DecodingError(format!(
                "boolean must be 0 or 1, got {v}"
            ))),
        }
    }
}

impl From<bool> for Bool {
    fn from(b: bool) -> Self {
        Bool(b)
    }
}
