//! Client SDK for the mls-ds Delivery Service.
//!
//! * [`DsApi`]: one typed call per DS endpoint, authenticated with the
//!   client's MLS signature key (then a session MAC).
//! * [`Client`]: a durable MLS client whose identity, groups and queue cursor
//!   live in sled (through `mls-ds-storage`), so that reopening it after any
//!   crash continues every conversation.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
pub mod client;
mod error;
mod records;
mod sse;
mod tls;
mod transport;

pub use api::DsApi;
pub use client::{Client, ClientConfig, EventStream, QueuedSend, RecoveryCode};
pub use error::{ClientError, MlsErrorKind, Result};
pub use mls_ds_protocol::groups::SendId;
pub use mls_ds_storage::{StorageError, StoreKey};
pub use records::Event;
#[cfg(feature = "test-hooks")]
pub use sse::pages_of;
pub use sse::QueueStream;
pub use tls::TlsConfig;
pub use transport::{AuthMode, HttpPool, Transport};
