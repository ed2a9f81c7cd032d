//! Coming back from a storage failure without a restart: the state the
//! handlers use sits in a [`StateCell`]; once storage is broken (a failed
//! write or flush, e.g. a full or read-only disk) and the data directory
//! accepts writes again, the watcher closes the old state, waits for every
//! request still holding it, and reopens the database from disk, which
//! recovers exactly what was flushed (sled 0.34 stays broken after an I/O
//! error, so reopening is the only way back). Meanwhile requests get 503.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::Limits;
use crate::state::AppState;

/// The current server state, or none while storage is being reopened.
pub struct StateCell {
    current: RwLock<Option<Arc<AppState>>>,
}

impl StateCell {
    /// A cell holding `state`.
    pub fn new(state: Arc<AppState>) -> Arc<StateCell> {
        Arc::new(StateCell {
            current: RwLock::new(Some(state)),
        })
    }

    /// The state to serve a request with; `None` while reopening.
    pub fn get(&self) -> Option<Arc<AppState>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn replace(&self, state: Option<Arc<AppState>>) -> Option<Arc<AppState>> {
        std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            state,
        )
    }
}

/// What requests are told while storage is being reopened.
pub const REOPENING: &str = "storage is being reopened after a failure; retry shortly";

/// How often the watcher looks at storage health.
const PERIOD: Duration = Duration::from_millis(500);
/// How long requests still using the broken state may take to finish.
const DRAIN: Duration = Duration::from_secs(30);

/// Whether the data directory takes a synced write again (enough free space,
/// not read-only).
fn writable(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(".write-probe");
    let result = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&[0u8; 64 * 1024])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Watch for broken storage and reopen it once the disk is usable again.
/// Runs until the task is dropped.
pub async fn watch(cell: Arc<StateCell>, data_dir: PathBuf, limits: Limits) {
    let mut logged_wait = false;
    loop {
        tokio::time::sleep(PERIOD).await;
        let broken = match cell.get() {
            Some(state) => state.flusher.stats.broken(),
            // A previous reopen failed: keep trying.
            None => Some("reopening failed".into()),
        };
        let Some(reason) = broken else {
            logged_wait = false;
            continue;
        };
        let dir = data_dir.clone();
        match tokio::task::spawn_blocking(move || writable(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if !logged_wait {
                    tracing::warn!(error = %e, %reason, "storage failed and the data directory is still not writable; waiting");
                    logged_wait = true;
                }
                continue;
            }
            Err(_) => continue,
        }
        tracing::warn!(%reason, "the data directory is writable again; reopening storage");
        if let Some(old) = cell.replace(None) {
            // Wake long-polls so that they let go of the old state.
            old.queues.close();
            let deadline = Instant::now() + DRAIN;
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if Arc::strong_count(&old) > 1 {
                tracing::warn!("requests still hold the failed storage; trying again later");
                cell.replace(Some(old));
                continue;
            }
            // Dropping it stops the flusher threads and closes sled.
            drop(old);
        }
        let (dir, l) = (data_dir.clone(), limits.clone());
        match tokio::task::spawn_blocking(move || crate::build_state(&dir, l)).await {
            Ok(Ok(state)) => {
                cell.replace(Some(state));
                logged_wait = false;
                tracing::warn!("storage reopened; serving again");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "reopening storage failed; retrying"),
            Err(e) => tracing::error!(error = %e, "reopening storage panicked; retrying"),
        }
    }
}
