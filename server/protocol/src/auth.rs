//! Request authentication, in the spirit of the MIMI DS draft's DSAuthToken.
//!
//! Every authenticated request carries `Authorization: MLS-DS <hex(AuthToken)>`.
//! Both token kinds bind the request: method, path with query, SHA-256 of the
//! body, and a millisecond timestamp.
//!
//! * [`AuthToken::Signature`]: signed with the client's registered MLS
//!   signature key over [`signature_payload`]; a random nonce (remembered by
//!   the server for the validity window) prevents replay. Used to register, to
//!   open a session, and by clients that prefer not to hold a session.
//! * [`AuthToken::Session`]: an HMAC-SHA256 under a session key obtained from
//!   `POST /v1/sessions`, with a per-session counter checked against a sliding
//!   window (replay protection without a signature per request: a few
//!   microseconds instead of a signature verification).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use tls_codec::{Serialize as _, TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

use crate::clients::ClientId;

/// Domain-separation label in every signed or MAC'd payload.
const AUTH_LABEL: &[u8] = b"mls-ds auth v1";
/// Largest accepted clock difference between client and server, in ms.
pub const MAX_CLOCK_SKEW_MS: u64 = 120_000;
/// Size of session ids.
pub const SESSION_ID_LEN: usize = 16;
/// Size of session keys and MACs.
pub const SESSION_KEY_LEN: usize = 32;
/// Size of signature-token nonces.
pub const NONCE_LEN: usize = 16;
/// A session accepts each counter once, in any order, as long as at most
/// this many of its counters are overtaken at once: below the highest one
/// used and not arrived yet (requests still on their way). The SDK keeps at
/// most half as many requests in flight per session, so that however they
/// are reordered on the way (a slow connection, a paused server), none is
/// refused as a replay.
pub const SESSION_MAX_OVERTAKEN: usize = 1024;

/// Signature-based token.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SignatureAuth {
    /// Who signs.
    pub client_id: ClientId,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// Fresh random bytes.
    pub nonce: [u8; NONCE_LEN],
    /// Signature over [`signature_payload`] with the client's key.
    pub signature: VLBytes,
}

/// Session-MAC token.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SessionAuth {
    /// Session id from `POST /v1/sessions`.
    pub session_id: [u8; SESSION_ID_LEN],
    /// Strictly fresh per request (any order within the server's window).
    pub counter: u64,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// HMAC-SHA256 over [`session_payload`] under the session key.
    pub mac: [u8; SESSION_KEY_LEN],
}

/// The token in the `Authorization` header.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum AuthToken {
    /// Signed by the client's credential key.
    #[tls_codec(discriminant = 1)]
    Signature(SignatureAuth),
    /// MAC'd with a session key.
    #[tls_codec(discriminant = 2)]
    Session(SessionAuth),
}

/// Response of `POST /v1/sessions`.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SessionCreated {
    /// Identifies the session in [`SessionAuth`].
    pub session_id: [u8; SESSION_ID_LEN],
    /// MAC key; keep it secret.
    pub session_key: [u8; SESSION_KEY_LEN],
    /// Unix time (ms) after which the session is refused (401).
    pub expires_at_ms: u64,
}

#[derive(TlsSerialize, TlsSize)]
struct Payload<'a> {
    label: &'a [u8],
    kind: u8,
    method: &'a [u8],
    path: &'a [u8],
    body_hash: [u8; 32],
    timestamp_ms: u64,
    subject: &'a [u8],
    freshness: &'a [u8],
}

fn payload(
    kind: u8,
    method: &str,
    path_and_query: &str,
    body_hash: &[u8; 32],
    timestamp_ms: u64,
    subject: &[u8],
    freshness: &[u8],
) -> Vec<u8> {
    let p = Payload {
        label: AUTH_LABEL,
        kind,
        method: method.as_bytes(),
        path: path_and_query.as_bytes(),
        body_hash: *body_hash,
        timestamp_ms,
        subject,
        freshness,
    };
    // Slices of at most a few KiB always fit TLS length prefixes.
    p.tls_serialize_detached().unwrap_or_default()
}

/// SHA-256 of a request body.
pub fn body_hash(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// Bytes a [`SignatureAuth`] signs.
pub fn signature_payload(
    method: &str,
    path_and_query: &str,
    body_hash: &[u8; 32],
    timestamp_ms: u64,
    client_id: &ClientId,
    nonce: &[u8; NONCE_LEN],
) -> Vec<u8> {
    payload(
        1,
        method,
        path_and_query,
        body_hash,
        timestamp_ms,
        client_id.as_bytes(),
        nonce,
    )
}

/// Bytes a [`SessionAuth`] MACs.
pub fn session_payload(
    method: &str,
    path_and_query: &str,
    body_hash: &[u8; 32],
    timestamp_ms: u64,
    session_id: &[u8; SESSION_ID_LEN],
    counter: u64,
) -> Vec<u8> {
    payload(
        2,
        method,
        path_and_query,
        body_hash,
        timestamp_ms,
        session_id,
        &counter.to_be_bytes(),
    )
}

/// HMAC-SHA256 of `data` under `key`.
pub fn mac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Constant-time check of a MAC.
pub fn verify_mac(key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(data);
            m.verify_slice(tag).is_ok()
        }
        Err(_) => false,
    }
}

/// Format a token for the `Authorization` header.
pub fn header_value(token: &AuthToken) -> String {
    let bytes = token.tls_serialize_detached().unwrap_or_default();
    format!("{} {}", crate::AUTH_SCHEME, hex::encode(bytes))
}

/// Parse the `Authorization` header.
pub fn parse_header(value: &str) -> Result<AuthToken, crate::DecodeError> {
    let rest = value
        .strip_prefix(crate::AUTH_SCHEME)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| crate::DecodeError::Invalid("authorization scheme must be MLS-DS".into()))?;
    let hex = rest.trim();
    // Into a buffer of the right size: much cheaper than `hex::decode`,
    // and this runs for every request.
    let mut bytes = vec![0u8; hex.len() / 2];
    hex::decode_to_slice(hex, &mut bytes)
        .map_err(|e| crate::DecodeError::Invalid(format!("authorization token is not hex: {e}")))?;
    crate::decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_through_header() {
        let t = AuthToken::Session(SessionAuth {
            session_id: [1; 16],
            counter: 7,
            timestamp_ms: 42,
            mac: [9; 32],
        });
        assert_eq!(parse_header(&header_value(&t)).unwrap(), t);
        assert!(parse_header("Bearer abc").is_err());
        assert!(parse_header("MLS-DS zz").is_err());
        assert!(parse_header("MLS-DS 02").is_err());
    }

    #[test]
    fn mac_binds_every_field() {
        let key = [3u8; 32];
        let h = body_hash(b"body");
        let base = session_payload("POST", "/v1/x", &h, 1, &[0; 16], 1);
        let tag = mac(&key, &base);
        assert!(verify_mac(&key, &base, &tag));
        for other in [
            session_payload("GET", "/v1/x", &h, 1, &[0; 16], 1),
            session_payload("POST", "/v1/y", &h, 1, &[0; 16], 1),
            session_payload("POST", "/v1/x", &body_hash(b"other"), 1, &[0; 16], 1),
            session_payload("POST", "/v1/x", &h, 2, &[0; 16], 1),
            session_payload("POST", "/v1/x", &h, 1, &[1; 16], 1),
            session_payload("POST", "/v1/x", &h, 1, &[0; 16], 2),
        ] {
            assert!(!verify_mac(&key, &other, &tag));
        }
    }
}
