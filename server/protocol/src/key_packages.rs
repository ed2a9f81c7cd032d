//! Publishing and claiming key packages.

use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `POST /v1/key-packages`: publish a batch. Each entry is an `MLSMessage`
/// holding a `KeyPackage` (or a bare TLS-encoded `KeyPackage`). The batch is
/// all or nothing: one invalid package rejects the request.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct PublishKeyPackages {
    /// Ordinary key packages, each handed out at most once.
    pub key_packages: Vec<VLBytes>,
    /// Replaces the client's last-resort package: handed out when no other
    /// is left, and never consumed.
    pub last_resort: Option<VLBytes>,
}

/// Response to a publish, and to `GET /v1/key-packages`.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyPackageCount {
    /// Unclaimed, unexpired ordinary packages.
    pub remaining: u32,
    /// Whether a last-resort package is stored.
    pub has_last_resort: crate::codec::Bool,
    /// How many times the last-resort package was handed out since it was
    /// published: a client sees here that its ordinary packages ran out
    /// (and that it should publish more, and rotate the last resort).
    pub last_resort_claims: u64,
    /// End of the last-resort package's lifetime (Unix seconds; 0 without
    /// one): its owner replaces it before then.
    pub last_resort_not_after: u64,
}

/// Response of `POST /v1/clients/{id}/key-package`.
#[derive(Clone, Debug, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ClaimedKeyPackage {
    /// The key package exactly as its owner published it (an `MLSMessage`
    /// holding a `KeyPackage`, or a bare `KeyPackage`).
    pub key_package: VLBytes,
    /// True if this is the client's last-resort package (not consumed).
    pub last_resort: crate::codec::Bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framing shown in docs/API.md.
    #[test]
    fn key_package_count_encodes_as_documented() {
        let count = KeyPackageCount {
            remaining: 10,
            has_last_resort: true.into(),
            last_resort_claims: 0,
            last_resort_not_after: 1_767_225_600,
        };
        let bytes = crate::encode(&count).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            "0000000a010000000000000000000000006955b900"
        );
        assert_eq!(crate::decode::<KeyPackageCount>(&bytes).unwrap(), count);
    }
}
