//! Durability policy and group commit: when a write counts as "on disk".
//!
//! sled only guarantees what it flushed, and its `flush()` ends in
//! `sync_file_range`, which writes the data pages but neither the file's
//! metadata nor the drive's write cache. [`Durability::Sync`] therefore adds an
//! `fdatasync` of sled's log file after the flush.
//!
//! Flushing once per caller would cap throughput at the device's sync rate, so
//! [`GroupCommit`] batches: the first caller to arrive while no flush is running
//! becomes the leader and flushes for everybody whose write happened before the
//! flush started; callers arriving meanwhile wait for the next round, whose
//! leader is one of them.

use std::fs::File;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::StorageError;

/// What a caller may assume once an atomic operation has returned `Ok`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// sled flush plus `fdatasync` of the log file before returning: the
    /// operation survives a process crash and a power loss (on hardware that
    /// honours cache flushes). The default.
    #[default]
    Sync,
    /// sled flush only (`sync_file_range`): survives a process crash; after a
    /// power loss the most recent operations may be missing (never half
    /// applied).
    Flush,
    /// No flush per operation; sled's background flusher (every
    /// `flush_every_ms`) or an explicit [`crate::Store::flush`] makes data
    /// durable. A crash may lose the most recent operations, each as a whole.
    /// For bulk work and benchmarks.
    Batched,
}

#[derive(Default)]
struct Round {
    /// Tickets handed out: a ticket is taken after the caller's write was applied.
    requested: u64,
    /// Every ticket up to this one is durable.
    completed: u64,
    /// A leader is flushing right now.
    flushing: bool,
}

/// Shares flushes between concurrent writers (see the module docs).
pub(crate) struct GroupCommit {
    db: sled::Db,
    log_file: Option<File>,
    mode: Durability,
    round: Mutex<Round>,
    done: Condvar,
}

impl GroupCommit {
    pub(crate) fn new(db: sled::Db, log_file: Option<File>, mode: Durability) -> Self {
        GroupCommit {
            db,
            log_file,
            mode,
            round: Mutex::new(Round::default()),
            done: Condvar::new(),
        }
    }

    /// The policy this store was opened with.
    pub(crate) fn mode(&self) -> Durability {
        self.mode
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A panic while holding this lock cannot leave `Round` inconsistent
        // (every update is a single assignment), so poisoning is ignored.
        self.round.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make every write applied before this call durable according to the
    /// policy. Blocks; call it from a blocking context.
    pub(crate) fn make_durable(&self) -> Result<(), StorageError> {
        if self.mode == Durability::Batched {
            return Ok(());
        }
        self.wait_for_round()
    }

    /// Flush now, whatever the policy (used at shutdown and by `Batched` users).
    pub(crate) fn flush(&self) -> Result<(), StorageError> {
        self.wait_for_round()
    }

    fn wait_for_round(&self) -> Result<(), StorageError> {
        let mut round = self.lock();
        round.requested += 1;
        let ticket = round.requested;
        loop {
            if round.completed >= ticket {
                return Ok(());
            }
            if !round.flushing {
                round.flushing = true;
                let target = round.requested;
                drop(round);
                let result = self.flush_now();
                round = self.lock();
                round.flushing = false;
                if result.is_ok() {
                    round.completed = round.completed.max(target);
                }
                self.done.notify_all();
                result?;
            } else {
                round = self.done.wait(round).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn flush_now(&self) -> Result<(), StorageError> {
        self.db.flush()?;
        if self.mode != Durability::Flush {
            if let Some(f) = &self.log_file {
                f.sync_data()?;
            }
        }
        Ok(())
    }
}
