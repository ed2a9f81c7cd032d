//! How a client is configured: the application's tunables ([`ClientConfig`])
//! and the MLS group configuration that every SDK client uses, so that the
//! groups they create and join agree.

use std::time::Duration;

use mls_ds_storage::{Durability, StoreKey};

use crate::tls::TlsConfig;
use openmls::prelude::*;

/// The ciphersuite of groups created by the SDK.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Tunables.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Keep at least this many key packages on the DS (plus a last-resort one).
    pub min_key_packages: usize,
    /// How often [`Client::sync`](crate::Client::sync) checks the key
    /// packages on the DS (it also checks after every Welcome).
    pub key_package_check_interval: Duration,
    /// Replace the last-resort key package this long before it expires.
    pub last_resort_refresh_before: Duration,
    /// How long the private key of a replaced last-resort package is kept,
    /// for Welcomes made with it before it was replaced.
    pub retired_last_resort_keep: Duration,
    /// Attempts of a commit that keeps losing its epoch to other members.
    pub max_commit_retries: u32,
    /// Durability of local state (default: flush + fdatasync per operation).
    pub durability: Durability,
    /// Encrypt the local store (group secrets, keys, messages, ids) under
    /// this key: 32 bytes from the platform's keychain
    /// ([`StoreKey::from_bytes`]) or a passphrase
    /// ([`StoreKey::from_passphrase`], Argon2id). A store created with a key
    /// opens only with it ([`crate::ClientError::Storage`] with
    /// `StorageError::WrongKey` or `KeyRequired` otherwise, changing
    /// nothing); one created without stays unencrypted. Default: none.
    pub store_key: Option<StoreKey>,
    /// Which CAs to trust for an `https://` DS (default: the platform's).
    pub tls: TlsConfig,
    /// Longest a request waits in total for the DS's rate limit (429 with
    /// `Retry-After`) before the 429 is returned.
    pub rate_limit_wait: Duration,
    /// Longest one request may go without its whole answer, beyond the
    /// long-poll wait it asks the DS for; then it fails with
    /// [`crate::ClientError::ConnectionLost`] (a network error: a message
    /// stays in the outbox and goes out again under its send id).
    pub request_timeout: Duration,
    /// Test hook (feature `test-hooks`, which no release build enables): abort
    /// the process after the DS accepted a commit and before it is merged
    /// locally (to test recovery of exactly that window).
    #[cfg(feature = "test-hooks")]
    pub abort_after_commit_accepted: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            min_key_packages: 10,
            key_package_check_interval: Duration::from_secs(3600),
            last_resort_refresh_before: Duration::from_secs(14 * 24 * 3600),
            retired_last_resort_keep: Duration::from_secs(30 * 24 * 3600),
            max_commit_retries: 8,
            durability: Durability::Sync,
            store_key: None,
            tls: TlsConfig::default(),
            rate_limit_wait: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            #[cfg(feature = "test-hooks")]
            abort_after_commit_accepted: false,
        }
    }
}

/// Past epochs whose keys a member keeps. The DS accepts application messages
/// up to its window (default 3) of epochs old; a member can be one epoch
/// further ahead than the DS was when it accepted a message (its own commit,
/// made after syncing, merged before the message is processed), so the SDK
/// keeps that window plus a margin.
const MAX_PAST_EPOCHS: usize = 5;

/// Group configuration used by the SDK: handshakes as PublicMessage (so the
/// DS can validate them), application messages encrypted, and five past
/// epochs kept for late application messages. The ratchet tree is in
/// neither Welcomes nor GroupInfos: the DS exports it from its own copy of
/// the group and hands it to joiners with their Welcome (and with the
/// GroupInfo for external joins), so a commit's size does not grow with the
/// group twice over.
pub fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(false)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}

/// Join configuration matching [`create_config`].
pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(false)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}
