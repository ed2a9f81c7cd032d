//! Wire types of the mls-ds HTTP API, shared by the server and the client SDK
//! so that there is exactly one definition of every message format.
//!
//! Bodies are TLS-presentation-language encodings (RFC 8446 §3, with MLS's
//! variable-length vectors) of the structs in this crate, sent with content
//! type [`CONTENT_TYPE`]. MLS objects travel inside them as opaque
//! `MLSMessage` bytes. `docs/API.md` lists every endpoint with examples.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod clients;
pub mod codec;
pub mod errors;
pub mod groups;
pub mod key_packages;
pub mod queue;

pub use clients::ClientId;
pub use codec::{decode, encode, DecodeError};
pub use errors::{ErrorBody, ErrorCode};

/// Content type of every request and response body (except `/metrics`).
pub const CONTENT_TYPE: &str = "application/vnd.mls-ds.v1+tls";
/// Header carrying the hex-encoded [`auth::AuthToken`].
pub const AUTH_HEADER: &str = "authorization";
/// Scheme word in front of the token in [`AUTH_HEADER`].
pub(crate) const AUTH_SCHEME: &str = "MLS-DS";

/// The API's paths. Path parameters are hex-free: client ids are URL-safe by
/// construction ([`ClientId`]); group ids are hex-encoded.
pub mod paths {
    /// `POST`: register a client (signature-authenticated by the key it registers).
    pub const CLIENTS: &str = "/v1/clients";
    /// `POST`: open a session (signature auth); returns a MAC key.
    pub const SESSIONS: &str = "/v1/sessions";
    /// `POST`: publish key packages. `GET`: how many remain.
    pub const KEY_PACKAGES: &str = "/v1/key-packages";
    /// `POST`: create a group.
    pub const GROUPS: &str = "/v1/groups";
    /// `GET`: fetch the caller's queue. Query: `after`, `limit`, `max_bytes`, `wait_ms`.
    pub const QUEUE: &str = "/v1/queue";
    /// `POST`: acknowledge queue entries.
    pub const QUEUE_ACK: &str = "/v1/queue/ack";
    /// `GET`: the queue as server-sent events.
    pub const QUEUE_STREAM: &str = "/v1/queue/stream";
    /// `GET`: liveness.
    pub const HEALTHZ: &str = "/healthz";

    /// `DELETE`: remove a client; `/key-package` below it: `POST` claims one.
    pub fn client(id: &super::ClientId) -> String {
        format!("{CLIENTS}/{id}")
    }

    /// `POST`: take client id `id` back with a new key (recovery secret).
    pub fn recover(id: &super::ClientId) -> String {
        format!("{CLIENTS}/{id}/recover")
    }

    /// `POST`: claim one key package of `id`.
    pub fn claim_key_package(id: &super::ClientId) -> String {
        format!("{CLIENTS}/{id}/key-package")
    }

    /// `DELETE`: delete a group (its last member; see the API document).
    pub fn group(group_id: &[u8]) -> String {
        format!("{GROUPS}/{}", hex::encode(group_id))
    }

    /// `GET`: the group's latest GroupInfo and ratchet tree.
    pub fn group_info(group_id: &[u8]) -> String {
        format!("{GROUPS}/{}/info", hex::encode(group_id))
    }

    /// `POST`: submit a commit bundle.
    pub fn commits(group_id: &[u8]) -> String {
        format!("{GROUPS}/{}/commits", hex::encode(group_id))
    }

    /// `POST`: send an application message or a proposal.
    pub fn messages(group_id: &[u8]) -> String {
        format!("{GROUPS}/{}/messages", hex::encode(group_id))
    }

    /// `GET`: the caller's queue after `after`, as server-sent events.
    pub fn queue_stream(after: u64) -> String {
        format!("{QUEUE_STREAM}?after={after}")
    }

    /// `GET`: a page of the caller's queue after `after`, at most `limit`
    /// entries, waiting up to `wait_ms` for the first one; with `ack`, the
    /// entries up to it are acknowledged first.
    pub fn queue_page(ack: Option<u64>, after: u64, limit: u32, wait_ms: u64) -> String {
        let ack = ack.map(|a| format!("ack={a}&")).unwrap_or_default();
        format!("{QUEUE}?{ack}after={after}&limit={limit}&wait_ms={wait_ms}")
    }
}
