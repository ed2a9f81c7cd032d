//! The storage crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the storage crate.
///
/// Decode failures name the tree and key so that a corrupted database can be
/// diagnosed without a debugger; nothing in this crate panics on stored bytes.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// sled itself failed (I/O error, corruption detected by sled, ...).
    #[error("sled error: {0}")]
    Sled(#[from] sled::Error),

    /// The database is locked by another open handle: another process, or
    /// this one still holding it open. Nothing was changed.
    // The server's admin commands look for "lock" in this message to fall
    // back to the running server's admin socket.
    #[error("database at {path} is in use: locked by another process or handle")]
    InUse {
        /// Path that was being opened.
        path: PathBuf,
    },

    /// The database directory could not be opened. The directory is left as it was.
    #[error("cannot open database at {path}: {source}")]
    Open {
        /// Path that was being opened.
        path: PathBuf,
        /// Underlying sled error.
        source: sled::Error,
    },

    /// A file-level I/O operation (fsync of the log, backup copy) failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// Compaction rewrites a database in its directory; a temporary one has
    /// none.
    #[error("a temporary database has no directory to compact in")]
    NoDirectory,

    /// [`crate::Store::export_to`] was given a path that already exists; it
    /// only writes into a new directory, so nothing was written.
    #[error("export target {path} exists; choose a new directory")]
    ExportTargetExists {
        /// The existing path.
        path: PathBuf,
    },

    /// A value could not be encoded for storage.
    #[error("cannot encode value for tree {tree}: {reason}")]
    Encode {
        /// Tree the value was meant for.
        tree: String,
        /// What the encoder said.
        reason: String,
    },

    /// A stored value could not be decoded: the database holds bytes this
    /// version cannot read (corruption, truncation, or a foreign writer).
    #[error("corrupt value in tree {tree} at key {key_hex}: {reason}")]
    Corrupt {
        /// Tree holding the value.
        tree: String,
        /// Hex of the full stored key.
        key_hex: String,
        /// What the decoder said.
        reason: String,
    },

    /// The database was written by a newer format than this build knows.
    #[error(
        "database format version {found} is newer than the newest this build supports ({supported}); \
         upgrade the software, the data was left untouched"
    )]
    NewerFormat {
        /// Version recorded in the database.
        found: u32,
        /// Newest version this build can read.
        supported: u32,
    },

    /// The format-version record exists but is unreadable.
    #[error("format-version record is unreadable: {0}")]
    BadFormatRecord(String),

    /// The store is encrypted and was opened without a key
    /// ([`crate::StoreConfig::encryption`]). Nothing was changed.
    #[error("the store at {path} is encrypted; open it with its key")]
    KeyRequired {
        /// Path that was being opened.
        path: PathBuf,
    },

    /// A key was given for a store that holds unencrypted data; it is
    /// opened only as it was created. Nothing was changed.
    #[error("the store at {path} is not encrypted; open it without a key")]
    NotEncrypted {
        /// Path that was being opened.
        path: PathBuf,
    },

    /// The key given does not open this encrypted store. Nothing was
    /// changed.
    #[error("wrong store key: {0}")]
    WrongKey(String),

    /// Sealing a value or deriving the store key failed.
    #[error("store encryption: {0}")]
    Encryption(String),

    /// A namespace longer than 255 bytes was requested.
    #[error("namespace is {0} bytes long; at most 255 are allowed")]
    NamespaceTooLong(usize),

    /// A write failure injected by a test through
    /// [`crate::SledStorage::inject_failure_after`] (feature `test-hooks`).
    #[cfg(feature = "test-hooks")]
    #[error("injected failure after {0} writes")]
    Injected(usize),

    /// A transaction view was used after its transaction ended.
    #[error("transaction is no longer active")]
    TransactionClosed,
}

impl StorageError {
    pub(crate) fn corrupt(tree: &str, key: &[u8], reason: impl std::fmt::Display) -> Self {
        StorageError::Corrupt {
            tree: tree.to_owned(),
            key_hex: hex::encode(key),
            reason: reason.to_string(),
        }
    }
}
