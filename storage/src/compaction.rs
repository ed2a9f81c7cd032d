//! Compaction: a database rewritten into a fresh one that holds only its live
//! records, then put in the old one's place. sled 0.34 gives space back only
//! when the last segments of its log file empty out, so a database whose
//! records came and went (a drained backlog) keeps its size; a copy of what
//! is live does not.
//!
//! The steps, and what a crash at each leaves (every [`Store::open`] first
//! completes or discards a compaction it finds, in [`finish_pending`]):
//!
//! 1. [`Store::stage_compaction`] copies every tree into `<dir>/compact.tmp`,
//!    syncs each of its files and directories, renames it to
//!    `<dir>/compact.ready` and syncs `<dir>`. A crash before the rename
//!    leaves `compact.tmp`, which the next open deletes: the old database
//!    stays as it was.
//! 2. The next open (after the staging handle is closed) deletes the old
//!    database's files (`db`, `conf`, `snap.*`, `blobs`), syncs `<dir>` and
//!    renames `compact.ready` to `compact.move`. A crash in between leaves
//!    `compact.ready`, and the deletion is done again.
//! 3. It moves each entry of `compact.move` into `<dir>`, syncs `<dir>` and
//!    removes `compact.move`. A crash in between leaves the entries not yet
//!    moved in `compact.move`, and they are moved next time.
//!
//! From the rename to `compact.ready` on, the copy *is* the database: a write
//! the old handle takes after staging is lost at the next open. The caller
//! stops writing before it stages (the delivery service stages on its writer
//! thread and refuses every later write until it has reopened).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::StorageError;
use crate::store::{ExportReport, Store};

/// The copy while it is being written.
const STAGING: &str = "compact.tmp";
/// The complete, synced copy, not yet swapped in.
const READY: &str = "compact.ready";
/// The copy whose entries are being moved into place.
const MOVING: &str = "compact.move";

/// What a staged compaction wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedCompaction {
    /// Trees and entries copied.
    pub copied: ExportReport,
    /// Bytes the copy occupies on disk.
    pub bytes: u64,
}

/// What [`finish_pending`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// No compaction was under way.
    None,
    /// An unfinished copy was deleted; the old database stays.
    Discarded,
    /// A complete copy replaced the old database.
    SwappedIn,
}

impl Store {
    /// Copy every live record into a fresh database beside this one, which
    /// replaces this one when the directory is next opened (see the module
    /// documentation). Nothing may be written through this handle after it
    /// returns `Ok`: it should be closed and the directory reopened.
    pub fn stage_compaction(&self) -> Result<StagedCompaction, StorageError> {
        let dir = self.path().ok_or(StorageError::NoDirectory)?.to_owned();
        let staging = dir.join(STAGING);
        if staging.exists() {
            // Left by a staging that failed in this process (a crash leaves
            // it to the next open): it was never renamed, so it is garbage.
            fs::remove_dir_all(&staging)?;
        }
        let copied = match self.export_to(&staging) {
            Ok(copied) => copied,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let synced = sync_tree(&staging).and_then(|bytes| {
            fs::rename(&staging, dir.join(READY))?;
            sync_dir(&dir)?;
            Ok(bytes)
        });
        match synced {
            Ok(bytes) => Ok(StagedCompaction { copied, bytes }),
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                Err(e.into())
            }
        }
    }
}

/// Complete or discard a compaction found in `dir` (module documentation).
/// Runs before sled opens `dir`; refuses with [`StorageError::InUse`] if a
/// handle still holds the old database.
pub(crate) fn finish_pending(dir: &Path) -> Result<Pending, StorageError> {
    let (staging, ready, moving) = (dir.join(STAGING), dir.join(READY), dir.join(MOVING));
    let mut found = Pending::None;
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
        sync_dir(dir)?;
        found = Pending::Discarded;
    }
    if ready.exists() {
        crate::sled_files::refuse_if_open(dir)?;
        for old in sled_files(dir)? {
            if old.is_dir() {
                fs::remove_dir_all(&old)?;
            } else {
                fs::remove_file(&old)?;
            }
        }
        sync_dir(dir)?;
        fs::rename(&ready, &moving)?;
        sync_dir(dir)?;
    }
    if moving.exists() {
        for entry in fs::read_dir(&moving)? {
            let entry = entry?;
            fs::rename(entry.path(), dir.join(entry.file_name()))?;
        }
        sync_dir(dir)?;
        fs::remove_dir(&moving)?;
        sync_dir(dir)?;
        found = Pending::SwappedIn;
    }
    Ok(found)
}

/// The files sled 0.34 keeps in its directory: the log, its configuration,
/// snapshots, and the directory of large values.
fn sled_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "db" || name == "conf" || name == "blobs" || name.starts_with("snap.") {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// fsync every file and directory under `dir` (and `dir`); returns the bytes
/// the files occupy.
fn sync_tree(dir: &Path) -> io::Result<u64> {
    let mut bytes = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            bytes += sync_tree(&path)?;
        } else {
            let file = File::open(&path)?;
            file.sync_all()?;
            bytes += file.metadata()?.len();
        }
    }
    sync_dir(dir)?;
    Ok(bytes)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    fn filled(dir: &Path, n: u32) -> Store {
        let store = Store::open(dir, StoreConfig::default()).unwrap();
        let tree = store.record_tree("t").unwrap();
        let s = store.storage(b"ns").unwrap();
        for i in 0..n {
            s.put_raw(tree, &i.to_be_bytes(), &[7u8; 512]).unwrap();
        }
        store.flush().unwrap();
        store
    }

    fn values(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
        let store = Store::open(dir, StoreConfig::default()).unwrap();
        let tree = store.record_tree("t").unwrap();
        store.storage(b"ns").unwrap().scan_raw(tree, b"").unwrap()
    }

    #[test]
    fn a_staged_copy_replaces_the_database_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path(), 200);
        let tree = store.record_tree("t").unwrap();
        let s = store.storage(b"ns").unwrap();
        for i in 0..150u32 {
            s.remove_raw(tree, &i.to_be_bytes()).unwrap();
        }
        let staged = store.stage_compaction().unwrap();
        assert!(staged.bytes > 0);
        assert!(dir.path().join(READY).exists());
        // The staging handle still holds the old database: no swap yet.
        assert!(matches!(
            finish_pending(dir.path()),
            Err(StorageError::InUse { .. })
        ));
        drop((s, store));
        let kept = values(dir.path());
        assert_eq!(kept.len(), 50);
        assert_eq!(kept[0].0, 150u32.to_be_bytes());
        for name in [STAGING, READY, MOVING] {
            assert!(!dir.path().join(name).exists(), "{name} is gone");
        }
    }

    #[test]
    fn an_unfinished_copy_is_discarded_and_the_old_database_stays() {
        let dir = tempfile::tempdir().unwrap();
        drop(filled(dir.path(), 20));
        // What a crash during the copy leaves: a partial database.
        drop(filled(&dir.path().join(STAGING), 3));
        assert_eq!(finish_pending(dir.path()).unwrap(), Pending::Discarded);
        assert_eq!(values(dir.path()).len(), 20);
    }

    #[test]
    fn a_swap_cut_short_is_completed_at_every_step() {
        // A crash after the old files were deleted but before the rename to
        // `compact.move`, and one halfway through the moves.
        for moved_already in [None, Some("conf")] {
            let dir = tempfile::tempdir().unwrap();
            let store = filled(dir.path(), 30);
            let tree = store.record_tree("t").unwrap();
            store
                .storage(b"ns")
                .unwrap()
                .remove_raw(tree, &0u32.to_be_bytes())
                .unwrap();
            store.stage_compaction().unwrap();
            drop(store);
            for old in sled_files(dir.path()).unwrap() {
                if old.is_dir() {
                    fs::remove_dir_all(&old).unwrap();
                } else {
                    fs::remove_file(&old).unwrap();
                }
            }
            if let Some(name) = moved_already {
                fs::rename(dir.path().join(READY), dir.path().join(MOVING)).unwrap();
                fs::rename(dir.path().join(MOVING).join(name), dir.path().join(name)).unwrap();
            }
            assert_eq!(finish_pending(dir.path()).unwrap(), Pending::SwappedIn);
            assert_eq!(values(dir.path()).len(), 29);
        }
    }
}
