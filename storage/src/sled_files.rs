//! sled's files that this crate looks at before sled opens a directory: the
//! lock on its log, and unfinished snapshots.
//!
//! sled writes a snapshot to `snap.<lsn>.generating`, syncs it and renames
//! it `snap.<lsn>`. When it opens a database, though, it reads the file with
//! the highest name among all `snap.*`, unfinished ones included. A process
//! killed, or a power cut, while a snapshot was being written leaves a
//! partial `.generating` file whose name sorts after the last complete
//! snapshot, and sled then refuses to open the database ("Read corrupted
//! data") although its log and that snapshot are intact. Such files are
//! deleted before sled opens a directory that no handle holds (published
//! sled 0.34.7 and the vendored copy alike).

use std::fs::{self, File};
use std::io;
use std::path::Path;

use crate::error::StorageError;
use crate::store::LOCK_RETRY;

/// Delete the unfinished snapshots in `dir`, if no handle holds it.
pub(crate) fn remove_unfinished_snapshots(dir: &Path) -> Result<(), StorageError> {
    let Ok(entries) = fs::read_dir(dir) else {
        // No directory yet: sled creates it.
        return Ok(());
    };
    let mut unfinished = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            unfinished.push(entry.path());
        }
    }
    if unfinished.is_empty() {
        return Ok(());
    }
    // A live handle may be writing one right now.
    refuse_if_open(dir)?;
    for path in &unfinished {
        tracing::warn!(path = %path.display(), "deleting an unfinished sled snapshot (a crash while it was written)");
        fs::remove_file(path)?;
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// sled locks its log file (`flock`) while a handle is open: refuse with
/// [`StorageError::InUse`] if one holds the database in `dir`, after waiting
/// briefly for a handle this process just closed.
pub(crate) fn refuse_if_open(dir: &Path) -> Result<(), StorageError> {
    let log = dir.join("db");
    let file = match File::open(&log) {
        Ok(file) => file,
        // Deleted by a swap that a crash interrupted: nothing holds it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // sled lets go of its lock from a background thread after its last
    // handle is dropped: a handle this process closed a moment ago may
    // still hold it (as in `Store::open`).
    let deadline = std::time::Instant::now() + LOCK_RETRY;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StorageError::InUse {
                    path: dir.to_owned(),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreConfig};

    #[test]
    fn an_unfinished_snapshot_does_not_keep_the_database_closed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
            let tree = store.record_tree("t").unwrap();
            store
                .storage(b"ns")
                .unwrap()
                .put_raw(tree, b"k", b"v")
                .unwrap();
            store.flush().unwrap();
        }
        // What a crash while sled wrote a snapshot leaves: an empty file
        // whose name sorts after every complete snapshot.
        fs::write(dir.path().join("snap.7FFFFFFFFFFFFFFF.generating"), b"").unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let tree = store.record_tree("t").unwrap();
        assert_eq!(
            store.storage(b"ns").unwrap().get_raw(tree, b"k").unwrap(),
            Some(b"v".to_vec())
        );
        assert!(!dir.path().join("snap.7FFFFFFFFFFFFFFF.generating").exists());
    }
}
