//! `mls-ds migrate --from DIR --to postgres://...`: moving a DS from its
//! sled data directory to PostgreSQL. The directory is read through the
//! backend seam (every client with its key packages, usage and whole
//! queue; every group with its state and commit records; invitations,
//! remembered sends, key package owners) while no server holds it, and the
//! snapshot is written into the empty database in one transaction; then
//! `check` runs on the database. The directory is left as it was.

use std::path::Path;

use crate::admin::{AdminError, AdminOutput};
use crate::backend::postgres::import::{ClientSnapshot, GroupSnapshot, Imported, Snapshot};
use crate::backend::postgres::{PgBackend, PgConfig};
use crate::backend::sled::SledBackend;
use crate::backend::{Backend, Page, StoreError};
use crate::config::Limits;
use crate::embedded;

/// Entries read from a queue at a time.
const PAGE: usize = 10_000;

/// Run the migration (module doc).
pub fn run(from: &Path, to: &str, limits: &Limits) -> Result<AdminOutput, AdminError> {
    if !from.join("db").exists() {
        return Err(AdminError::NoDatabase(from.to_owned()));
    }
    let failed = |e: StoreError| AdminError::Failed(e.to_string());
    let ds = embedded::open(from, limits).map_err(|e| match e {
        StoreError::Storage(mls_ds_storage::StorageError::InUse { .. }) => {
            AdminError::Failed(format!("a server holds {}: stop it first", from.display()))
        }
        other => failed(other),
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AdminError::Failed(format!("cannot start a runtime: {e}")))?;
    runtime.block_on(async {
        let snapshot = snapshot(ds.backend()).await.map_err(failed)?;
        let target = PgBackend::open(PgConfig {
            url: to.to_owned(),
            pool_size: 2,
            // Every entry comes along, whatever the target's limit.
            max_queue_depth: 0,
        })
        .await
        .map_err(failed)?;
        let imported = target.import(&snapshot).await.map_err(failed)?;
        let check = target.check().await.map_err(failed)?;
        target.close();
        Ok(AdminOutput {
            text: report(from, &imported, &check.text),
            failed: check.failed,
        })
    })
}

fn report(from: &Path, imported: &Imported, check: &str) -> String {
    format!(
        "migrated {}: {} clients, {} groups, {} queue entries of {} stored messages\n{check}",
        from.display(),
        imported.clients,
        imported.groups,
        imported.entries,
        imported.messages,
    )
}

/// Everything the directory holds.
async fn snapshot(b: &SledBackend) -> Result<Snapshot, StoreError> {
    let mut clients = Vec::new();
    for c in b.clients().await? {
        let queue = whole_queue(b, &c.id).await?;
        clients.push(ClientSnapshot {
            key_packages: b.key_packages(&c.id).await?,
            last_resort: b.last_resort(&c.id).await?,
            usage: b.usage(&c.id).await?,
            id: c.id,
            record: c.record,
            queue,
        });
    }
    let stale = b.stale_commits(u64::MAX).await?;
    let mut groups = Vec::new();
    for g in b.groups().await? {
        // Every commit record: the prunable ones and each group's newest,
        // which is for the epoch before the current one.
        let mut epochs: Vec<u64> = stale
            .iter()
            .filter(|s| s.group == g.id)
            .map(|s| s.epoch)
            .collect();
        epochs.extend(g.record.epoch.checked_sub(1));
        epochs.sort_unstable();
        epochs.dedup();
        let mut commits = Vec::new();
        for epoch in epochs {
            if let Some(record) = b.commit(&g.id, epoch).await? {
                commits.push((epoch, record));
            }
        }
        groups.push(GroupSnapshot {
            state: b.group_state(&g.id).await?,
            id: g.id,
            record: g.record,
            commits,
        });
    }
    let mut receipts = Vec::new();
    for key in b.sends_before(u64::MAX, usize::MAX).await? {
        if let Some(receipt) = b.send_receipt(&key).await? {
            receipts.push((key, receipt));
        }
    }
    Ok(Snapshot {
        clients,
        groups,
        invites: b.invites().await?,
        key_package_owners: b.key_package_owners()?,
        receipts,
    })
}

/// Every visible unacknowledged entry of `client`'s queue, with its head
/// and mark.
async fn whole_queue(
    b: &SledBackend,
    client: &mls_ds_protocol::ClientId,
) -> Result<Page, StoreError> {
    let mut whole = b.page(client, 0, PAGE, usize::MAX).await?;
    loop {
        let Some(last) = whole.entries.last().map(|e| e.seq) else {
            return Ok(whole);
        };
        let next = b.page(client, last, PAGE, usize::MAX).await?;
        if next.entries.is_empty() {
            return Ok(whole);
        }
        whole.entries.extend(next.entries);
    }
}
