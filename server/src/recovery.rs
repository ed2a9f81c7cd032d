//! Coming back from a storage failure without a restart. The DS the HTTP
//! front serves sits in a [`StateCell`]; once the embedded backend is broken
//! (a failed write or flush, e.g. a full or read-only disk) and the data
//! directory accepts writes again, the watcher closes the old DS, waits for
//! every request still holding it, and opens the data directory again, which
//! recovers exactly what was flushed (sled 0.34 stays broken after an I/O
//! error, so reopening is the only way back). Meanwhile requests get 503.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::embedded::SledDs;
use crate::state_cell::StateCell;

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

/// Watch for broken storage and reopen it with `open` once the disk is
/// usable again. Runs until the task is dropped.
pub(crate) async fn watch<F>(cell: Arc<StateCell<SledDs>>, data_dir: PathBuf, open: F)
where
    F: Fn() -> Result<SledDs, String> + Clone + Send + 'static,
{
    let mut logged_wait = false;
    loop {
        tokio::time::sleep(PERIOD).await;
        let broken = match cell.get() {
            Some(ds) => ds.backend().broken().map(|f| f.to_string()),
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
            old.backend().close();
            let deadline = Instant::now() + DRAIN;
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if Arc::strong_count(&old) > 1 {
                tracing::warn!("requests still hold the failed storage; trying again later");
                cell.replace(Some(old));
                continue;
            }
            // Dropping it stops the write path's threads and closes sled.
            drop(old);
        }
        match tokio::task::spawn_blocking(open.clone()).await {
            Ok(Ok(ds)) => {
                cell.replace(Some(Arc::new(ds)));
                logged_wait = false;
                tracing::warn!("storage reopened; serving again");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "reopening storage failed; retrying"),
            Err(e) => tracing::error!(error = %e, "reopening storage panicked; retrying"),
        }
    }
}
