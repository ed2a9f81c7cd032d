//! What the DS's operator may do beyond what clients do: list clients and
//! groups, delete a client or a group, prune old commit records. (Adding
//! clients is in `clients`, invitation codes in `invites`.)

use mls_ds_protocol::ClientId;

use super::error::Result;
use super::groups::Deleter;
use super::Ds;
use crate::backend::records::{now_ms, GroupId};
use crate::backend::write_set::Change;
use crate::backend::Backend;

/// One line of `mls-ds client list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientSummary {
    pub(crate) id: ClientId,
    pub(crate) registered_ms: u64,
    pub(crate) deleted: bool,
    /// Visible unacknowledged queue entries.
    pub(crate) queue_depth: u64,
}

/// One line of `mls-ds group list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GroupSummary {
    pub(crate) id: GroupId,
    pub(crate) epoch: u64,
    pub(crate) members: usize,
    pub(crate) open: bool,
    pub(crate) creator: String,
    pub(crate) created_ms: u64,
}

impl<B: Backend> Ds<B> {
    /// Prune commit records past the configured retention (run
    /// periodically). Returns how many went.
    pub(crate) async fn apply_commit_retention(&self) -> Result<usize> {
        match self.policy.commit_retention_secs {
            0 => Ok(0),
            secs => self.prune_commits(secs.saturating_mul(1000)).await,
        }
    }

    /// Every client with its queue depth.
    pub(crate) async fn list_clients(&self) -> Result<Vec<ClientSummary>> {
        let clients = self.backend.clients().await?;
        let mut summaries = Vec::with_capacity(clients.len());
        for c in clients {
            summaries.push(ClientSummary {
                queue_depth: self.backend.queue_depth(&c.id).await?,
                registered_ms: c.record.registered_ms,
                deleted: c.record.is_deleted(),
                id: c.id,
            });
        }
        Ok(summaries)
    }

    /// Every group with its size.
    pub(crate) async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        Ok(self
            .backend
            .groups()
            .await?
            .into_iter()
            .map(|g| GroupSummary {
                epoch: g.record.epoch,
                members: g.record.members.len(),
                open: g.record.open,
                creator: String::from_utf8_lossy(&g.record.creator).into_owned(),
                created_ms: g.record.created_ms,
                id: g.id,
            })
            .collect())
    }

    /// Delete a client as the operator: as when it deletes itself (its key
    /// packages, queue and sessions go; the id stays reserved).
    pub(crate) async fn operator_delete_client(&self, id: &ClientId) -> Result<()> {
        self.delete_client_unchecked(id).await
    }

    /// Delete a group as the operator; its members are told.
    pub(crate) async fn operator_delete_group(&self, id: &GroupId) -> Result<()> {
        self.delete_group(id, Deleter::Operator).await
    }

    /// Remove accepted-commit records older than `older_than_ms` (each
    /// group's newest stays, so that a retry of the latest commit still gets
    /// its answer). Returns how many went.
    pub(crate) async fn prune_commits(&self, older_than_ms: u64) -> Result<usize> {
        let cutoff = now_ms().saturating_sub(older_than_ms);
        let stale = self.backend.stale_commits(cutoff).await?;
        let count = stale.len();
        let changes = stale
            .into_iter()
            .map(|c| Change::RemoveCommit {
                group: c.group,
                epoch: c.epoch,
            })
            .collect();
        self.write_in_chunks(changes).await?;
        Ok(count)
    }
}
