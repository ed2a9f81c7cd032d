//! Patch 7 (PATCHES.md): snapshots of the page table written while the
//! database runs.
//!
//! Published sled 0.34 writes its snapshot (where each page's base and deltas
//! lie in the log) only when it opens a database, after replaying the whole
//! log written since the previous snapshot. A database that stays open for
//! weeks therefore replays everything written in those weeks at its next
//! start. Here the periodic flusher writes one from memory, in the same file
//! format, once enough was logged since the last one.
//!
//! Why a snapshot taken while writers run is a correct starting point:
//! 1. `stable` is read first. Every message below it sits in a log buffer
//!    that was written, and a buffer is written only after each of its
//!    messages was installed in the page table (`cas_page` swaps the page
//!    before it completes its reservation). So every page read afterwards
//!    already reflects every message below `stable`, or something newer.
//! 2. Recovery replays every message from `stable` on. Replaying one the
//!    walk already saw changes nothing: a delta is pushed only if it is newer
//!    than the page's last one, a base or a free replaces the page, and the
//!    newer messages the walk saw come later in the log and are replayed
//!    after it.
//! 3. The walk may have seen messages that were not on disk yet. The log is
//!    flushed and synced before the snapshot file is renamed into place, so
//!    a snapshot never names a location a crash could lose.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::{u32_to_arr, u64_to_arr, Lsn, PageCache, PageId, PageState, Snapshot};
use crate::*;

/// How often the walk retries a page another thread is still installing.
const INSTALL_RETRIES: usize = 10_000;

/// Pages walked under one epoch guard, so that a long walk does not hold
/// back memory reclamation for everyone else.
const PAGES_PER_GUARD: PageId = 1024;

/// Where the newest snapshot stands.
#[derive(Debug)]
pub(crate) struct Mark {
    /// Its `stable_lsn` (-1: none yet).
    lsn: AtomicI64,
    /// `Log::reservations` when it was taken.
    ops: AtomicU64,
}

impl Mark {
    pub(crate) fn new(stable_lsn: Option<Lsn>) -> Mark {
        Mark { lsn: AtomicI64::new(stable_lsn.unwrap_or(-1)), ops: AtomicU64::new(0) }
    }
}

impl PageCache {
    /// Called by the periodic flusher after each of its cycles: write a
    /// snapshot if at least `snapshot_after_ops` log messages, and at least
    /// as many as there are pages, were reserved since the last one. The
    /// second bound keeps a snapshot's cost (one entry per page) within one
    /// entry per logged message.
    pub(crate) fn maybe_write_live_snapshot(&self) -> Result<()> {
        let every = self.config.snapshot_after_ops;
        if every == 0 || self.config.temporary || self.config.use_compression {
            return Ok(());
        }
        let ops = self.log.reservations();
        let pages = *self.next_pid_to_allocate.lock();
        let since = ops.saturating_sub(self.live_snapshot.ops.load(Ordering::Acquire));
        if since < every.max(pages) {
            return Ok(());
        }
        let stable = self.log.stable_offset();
        if stable <= self.live_snapshot.lsn.load(Ordering::Acquire) {
            return Ok(());
        }
        // Counted as taken even if writing it fails, so that a failing disk
        // is not walked again at every cycle.
        self.live_snapshot.ops.store(ops, Ordering::Release);
        let dir = self.config.get_path();
        let generating = dir.join(format!("snap.{:016X}.generating", stable));
        let done = dir.join(format!("snap.{:016X}", stable));
        if let Err(e) = self.write_live_snapshot(stable, &generating, &done) {
            let _ = fs::remove_file(&generating);
            return Err(e);
        }
        self.live_snapshot.lsn.store(stable, Ordering::Release);
        debug!("wrote a live snapshot at lsn {}", stable);
        remove_older_snapshots(&self.config, &done);
        Ok(())
    }

    fn write_live_snapshot(
        &self,
        stable: Lsn,
        generating: &std::path::Path,
        done: &std::path::Path,
    ) -> Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(generating)?;
        let mut out = Checksummed {
            file: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            len: 0,
        };
        let head =
            Snapshot { stable_lsn: Some(stable), active_segment: None, pt: vec![] };
        out.put(&head.serialize())?;

        // Taking the allocation lock waits for any first-time allocation in
        // progress, which installs its page while holding it.
        let pid_bound = *self.next_pid_to_allocate.lock();
        let mut buf = Vec::new();
        let mut guard = pin();
        for pid in 0..pid_bound {
            if pid % PAGES_PER_GUARD == 0 {
                guard = pin();
            }
            let state = self.page_state_for_snapshot(pid, &guard)?;
            buf.clear();
            buf.resize(usize::try_from(state.serialized_size()).unwrap(), 0);
            state.serialize_into(&mut buf.as_mut_slice());
            out.put(&buf)?;
        }
        drop(guard);

        // Make durable every message the walk saw (point 3 at the top).
        self.log.flush()?;
        self.config.file.sync_all()?;

        let Checksummed { file, crc, len } = out;
        let mut file = file.into_inner().map_err(|e| e.into_error())?;
        file.write_all(&u64_to_arr(len))?;
        file.write_all(&u32_to_arr(crc.finalize()))?;
        file.sync_all()?;
        drop(file);
        fs::rename(generating, done)?;
        if let Some(parent) = done.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    /// The state of `pid` as a snapshot stores it. A page that another
    /// thread has reserved but not yet installed is waited for, briefly.
    fn page_state_for_snapshot(
        &self,
        pid: PageId,
        guard: &Guard,
    ) -> Result<PageState> {
        for _ in 0..INSTALL_RETRIES {
            if let Some(view) = self.inner.get(pid, guard) {
                if view.cache_infos.len() > 255 {
                    return Err(Error::ReportableBug(format!(
                        "page {} has {} log locations, more than a snapshot stores",
                        pid,
                        view.cache_infos.len()
                    )));
                }
                if !view.cache_infos.is_empty() {
                    return Ok(view.to_page_state());
                }
            }
            std::thread::yield_now();
        }
        Err(Error::ReportableBug(format!(
            "page {} was not installed while a snapshot was written",
            pid
        )))
    }
}

/// The snapshot file's body, with the checksum and length that
/// `read_snapshot` expects after it.
struct Checksummed {
    file: BufWriter<File>,
    crc: crc32fast::Hasher,
    len: u64,
}

impl Checksummed {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        self.file.write_all(bytes)?;
        Ok(())
    }
}

/// Delete every snapshot but `keep`; a failure only leaves an older file
/// behind, which opening ignores (it reads the newest).
fn remove_older_snapshots(config: &RunningConfig, keep: &std::path::Path) {
    let candidates = match config.get_snapshot_files() {
        Ok(candidates) => candidates,
        Err(e) => {
            warn!("failed to list old snapshots: {}", e);
            return;
        }
    };
    for path in candidates {
        if path.file_name() != keep.file_name() {
            if let Err(e) = fs::remove_file(&path) {
                warn!("failed to remove old snapshot file {:?}: {}", path, e);
            }
        }
    }
}
