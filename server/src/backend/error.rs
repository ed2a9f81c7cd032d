//! The storage layer's one error type, and the public face of a disk fault.

use std::fmt;

use super::write_set::Condition;

/// Everything a backend can fail with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// A condition of a write set did not hold when it was applied; nothing
    /// of the write set was written.
    #[error("condition no longer holds: {0}")]
    ConditionFailed(Condition),
    /// An acknowledgement past the queue's visible head; nothing was written.
    #[error("cannot acknowledge {up_to}: the queue's head is {head}")]
    AckBeyondHead {
        /// What the client asked to acknowledge.
        up_to: u64,
        /// The highest visible sequence number.
        head: u64,
    },
    /// Writing or flushing failed on disk: nothing of the write is
    /// acknowledged, and storage takes no more writes until it is reopened.
    #[error("storage failed: {0}")]
    Failed(StorageFault),
    /// Storage takes no requests now (broken after a failure, being
    /// reopened, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// Stored data that contradicts itself.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The storage crate failed.
    #[error(transparent)]
    Storage(#[from] mls_ds_storage::StorageError),
    /// The database refused a statement for a reason other than being
    /// unreachable (the detail is for the log).
    #[error("database: {0}")]
    Database(String),
    /// The data directory holds a layout this build does not serve.
    #[error("{0}")]
    Layout(String),
}

/// What went wrong with the disk, in words a client may be shown: the
/// operating system's description of the error (e.g. "No space left on
/// device (os error 28)"), and nothing else of the storage layer's detail
/// (no paths, keys or values). Operators and clients both need to know that
/// the disk is full or read-only; the full error goes to the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageFault(String);

/// `ENOSPC` and `EROFS`: the faults a disk most often has, named by their
/// OS description even when the storage engine kept only their kind.
const NO_SPACE: i32 = 28;
const READ_ONLY: i32 = 30;

impl StorageFault {
    /// A fault described by an OS error code, or a generic one.
    pub(crate) fn from_os_error(code: Option<i32>) -> StorageFault {
        match code {
            Some(code) => StorageFault(std::io::Error::from_raw_os_error(code).to_string()),
            None => StorageFault("storage engine error (see the server log)".into()),
        }
    }

    /// Not a fault: storage was retired on purpose (`why`) and reopens.
    pub(crate) fn retired(why: &str) -> StorageFault {
        StorageFault(why.to_owned())
    }

    /// The fault an I/O error stands for. sled re-creates the I/O errors it
    /// keeps (losing the OS code), so the kind is the fallback.
    pub(crate) fn from_io(e: &std::io::Error) -> StorageFault {
        use std::io::ErrorKind;
        let code = e.raw_os_error().or(match e.kind() {
            ErrorKind::StorageFull => Some(NO_SPACE),
            ErrorKind::ReadOnlyFilesystem => Some(READ_ONLY),
            _ => None,
        });
        match code {
            Some(code) => StorageFault::from_os_error(Some(code)),
            None => StorageFault(format!("I/O error: {}", e.kind())),
        }
    }
}

impl fmt::Display for StorageFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
