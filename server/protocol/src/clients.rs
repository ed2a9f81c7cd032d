//! Client identity and registration.

use std::fmt;

use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

use crate::codec::DecodeError;

/// Longest client id, in bytes.
const MAX_CLIENT_ID_LEN: usize = 128;

/// A client's id: 1 to 128 bytes of `[A-Za-z0-9._~@-]`, so that it can appear
/// in a URL path unescaped. It is also the identity of the client's MLS
/// `BasicCredential`, which is how the DS maps a group's leaves to clients.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ClientId {
    id: VLBytes,
}

// Hashed as its bytes, so that maps keyed by ids can be searched with the
// bytes (`Borrow<[u8]>`) without building an id first.
impl std::hash::Hash for ClientId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for ClientId {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl ClientId {
    /// Validate and wrap.
    pub fn new(id: impl AsRef<[u8]>) -> Result<ClientId, DecodeError> {
        let id = id.as_ref();
        if id.is_empty() || id.len() > MAX_CLIENT_ID_LEN {
            return Err(DecodeError::Invalid(format!(
                "client id must be 1 to {MAX_CLIENT_ID_LEN} bytes, got {}",
                id.len()
            )));
        }
        if let Some(bad) = id
            .iter()
            .find(|b| !(b.is_ascii_alphanumeric() || b"._~@-".contains(b)))
        {
            return Err(DecodeError::Invalid(format!(
                "client id may only contain A-Z a-z 0-9 . _ ~ @ -, found byte {bad:#04x}"
            )));
        }
        Ok(ClientId { id: id.into() })
    }

    /// Check an id that arrived inside a decoded body.
    pub fn validate(&self) -> Result<(), DecodeError> {
        ClientId::new(self.as_bytes()).map(|_| ())
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.id.as_slice()
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Validated ids are ASCII; anything else is shown escaped.
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({self})")
    }
}

impl std::str::FromStr for ClientId {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClientId::new(s.as_bytes())
    }
}

/// `POST /v1/clients`: register the client named in the request's
/// signature-authenticated token, with the key that signed it.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct RegisterClient {
    /// Must equal the token's client id.
    pub client_id: ClientId,
    /// MLS `SignatureScheme` code point of `signature_key`.
    pub signature_scheme: u16,
    /// Public key of the client's MLS credential; it authenticates every later request.
    pub signature_key: VLBytes,
    /// An invitation code from the DS's operator (UTF-8), for a DS whose
    /// registration policy asks for one.
    pub invite: Option<VLBytes>,
    /// [`recovery_hash`] of a secret the client keeps apart from its
    /// device (e.g. as a backup code): with it, the client can take its id
    /// back with a new key after losing its store ([`RecoverClient`]).
    pub recovery_hash: Option<VLBytes>,
}

/// Length of a recovery secret, and of its hash.
pub const RECOVERY_SECRET_LEN: usize = 32;

/// What the DS keeps of a recovery secret: its SHA-256.
pub fn recovery_hash(secret: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret).into()
}

/// `POST /v1/clients/{id}/recover`: a client that lost its store takes its
/// id back. The request is signed with the new key (like a registration);
/// the DS binds the id to it if the secret matches the stored hash, ends
/// the old key's sessions and drops its key packages (their private keys
/// are gone with the store). The client then rejoins its groups (`GET
/// /v1/groups` lists them) by external commit, replacing its old leaves.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct RecoverClient {
    /// MLS `SignatureScheme` code point of `signature_key`.
    pub signature_scheme: u16,
    /// The new public key; the request's signature token is made with it.
    pub signature_key: VLBytes,
    /// The secret whose [`recovery_hash`] the DS holds.
    pub recovery_secret: VLBytes,
    /// The hash of the next recovery secret (the one just used is spent).
    pub new_recovery_hash: VLBytes,
}

/// Response of `GET /v1/groups`: the groups whose roster lists the caller.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct GroupList {
    /// Group ids.
    pub groups: Vec<VLBytes>,
}

/// Response to a registration (201 when new, 200 when already registered with the same key).
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct Registered {
    /// The registered id.
    pub client_id: ClientId,
    /// Whether the DS holds the recovery hash this request sent. False when
    /// none was sent, or when the id already had another one: that one is
    /// replaced only by a recovery, which needs its secret, so that whoever
    /// holds the key (a thief of the device) cannot lock the owner out.
    pub recovery_set: crate::codec::Bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_url_safe() {
        assert!(ClientId::new("alice@example.org").is_ok());
        assert!(ClientId::new("").is_err());
        assert!(ClientId::new("a/b").is_err());
        assert!(ClientId::new("a b").is_err());
        assert!(ClientId::new([b'a'; 129]).is_err());
        assert!(ClientId::new([b'a'; 128]).is_ok());
    }

    #[test]
    fn maps_of_ids_are_searched_by_their_bytes() {
        let mut map = std::collections::HashMap::new();
        map.insert(ClientId::new("alice").unwrap(), 1);
        map.insert(ClientId::new("bob").unwrap(), 2);
        assert_eq!(map.get(&b"alice"[..]), Some(&1));
        assert_eq!(map.get(&b"bob"[..]), Some(&2));
        assert_eq!(map.get(&b"carol"[..]), None);
        assert_eq!(map.get(&ClientId::new("bob").unwrap()), Some(&2));
    }
}
