//! OpenMLS storage on sled.
//!
//! [`SledStorage`] implements every method of OpenMLS's
//! `StorageProvider<CURRENT_VERSION>` (and so `PublicStorageProvider`), with one
//! sled tree per entity family and keys namespaced so that several clients can
//! share one database. [`SledProvider`] bundles it with RustCrypto.
//!
//! OpenMLS issues many independent storage calls per operation (merging a
//! commit alone is a dozen), so the crate adds the transaction boundary the
//! trait lacks: [`SledProvider::transaction`] makes one MLS operation reach the
//! disk all or nothing, and lets the caller's own records join the same write.
//! What "on disk" means is set by [`Durability`]; see `docs/ARCHITECTURE.md`.
//!
//! With [`StoreConfig::encryption`] set (a [`StoreKey`]), every value is
//! sealed and every key replaced by a keyed hash before it reaches sled; the
//! API and what it returns stay the same ([`StoreKey`] says what it hides
//! and what not).
//!
//! The raw sled database stays inside the crate: callers keep records of their
//! own in record trees ([`Store::record_tree`]), and reach the whole database
//! only through [`Store::size_on_disk`] and [`Store::export_to`] (a backup).
//!
//! The feature `test-hooks` adds what this crate's own tests need (failure
//! injection with [`StorageError`]`::Injected`, write counting, the raw sled
//! database); its integration tests turn it on through a dev-dependency on the
//! crate itself, so `cargo test` needs no flag. Product code leaves it off.
//!
//! ```no_run
//! use mls_ds_storage::{SledProvider, Store, StoreConfig};
//! let store = Store::open("client-data", StoreConfig::default())?;
//! let provider = SledProvider::new(store.storage(b"alice")?);
//! provider.transaction(|p| {
//!     // e.g. group.merge_pending_commit(p)?;
//!     # let _ = p;
//!     Ok::<_, mls_ds_storage::StorageError>(())
//! })?;
//! # Ok::<(), mls_ds_storage::StorageError>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bundle;
pub mod codec;
mod compaction;
mod durability;
mod encryption;
mod entities;
mod error;
mod provider;
mod sled_conf;
mod sled_files;
mod store;
mod tree_copy;
pub mod trees;

pub use bundle::{ProviderTransaction, SledProvider};
pub use compaction::StagedCompaction;
pub use durability::Durability;
pub use encryption::StoreKey;
pub use error::StorageError;
pub use store::{
    ExportReport, Pair, Pairs, PendingWrites, RecordTree, SledStorage, Store, StoreConfig,
    Transaction,
};

/// Re-exported so that users name the same versions this crate was built with.
pub use openmls_rust_crypto;
pub use openmls_traits;
