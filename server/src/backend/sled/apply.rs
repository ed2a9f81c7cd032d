//! Turning jobs into sled writes, on the group commit's writer thread: the
//! conditions of a write set are checked against the database as every
//! earlier job left it, its changes become keys of the layout, its
//! deliveries get their sequence numbers from the queue index and join a
//! delivery batch (`batch.rs`), and queue operations (acknowledgements,
//! expiry) become ack marks and batch removals.
//!
//! A plain send (a write set that changes nothing but queues) joins the
//! open batch, which [`Applier::seal`] turns into one key, followed by the
//! drops of full queues it caused (its envelopes carry the send ids: they
//! are the sends' receipts, `receipts.rs`); a write set that changes more
//! stores its messages as a batch of its own inside its atomic write,
//! after the open batch was sealed. Because this runs on the one
//! writer thread, in submission order, and writes are applied in the order
//! they are prepared, sequence numbers follow the order in which writes
//! reach sled's log, and a crash keeps a gap-free prefix of every queue.

mod deliveries;

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use mls_ds_protocol::ClientId;
use mls_ds_storage::{PendingWrites, Transaction};

use self::deliveries::OpenBatch;
use super::job::{Finish, Job, Prepared};
use super::layout::{self, Layout};
use super::queue_index::{QueueIndex, Released};
use super::receipts::Receipts;
use super::record_cache::Caches;
use crate::backend::error::StoreError;
use crate::backend::records::{ClientUsage, GroupId, GroupRecord, InviteRecord, KeyPackageRecord};
use crate::backend::write_set::{AckOutcome, Applied, Change, Condition, WriteSet};

/// A group whose record a write set writes (creating or changing it) or
/// deletes.
enum GroupChange {
    Created(GroupId),
    Deleted(GroupId),
}

/// Records changed by writes prepared but not yet applied.
#[derive(Default)]
struct ChangedRecords {
    groups: Vec<GroupId>,
    clients: Vec<ClientId>,
}

/// A write set turned into sled writes.
struct StagedWrite {
    writes: Vec<PendingWrites>,
    publish: Vec<(ClientId, u64)>,
    applied: Applied,
}

/// What the writer thread prepares jobs with.
pub(crate) struct Applier {
    pub(crate) layout: Layout,
    pub(crate) index: Arc<QueueIndex>,
    /// Most entries a client's queue holds (see `IndexState::assign`).
    pub(crate) max_queue_depth: u64,
    /// Groups deleted since the start and not created again, in write
    /// order: what `GroupPresent` checks. A service reads a group's record
    /// before it submits a write conditional on it, so a group deleted
    /// before the start never meets the condition; and memory, unlike the
    /// database, already holds the deletions of the writes not yet applied.
    pub(crate) deleted_groups: Mutex<HashSet<GroupId>>,
    /// Every remembered send, staged ones included: what `SendNew`
    /// checks, in memory but for the rare run a filter points to.
    pub(crate) receipts: Arc<Receipts>,
    /// The open batch, if a plain send came since the last seal.
    open: Option<OpenBatch>,
    /// Decoded group and client records, for the readers.
    caches: Arc<Caches>,
    /// Records the writes prepared since the last apply change: dropped
    /// from `caches` once applied.
    changed: Mutex<ChangedRecords>,
    /// Why a job that had changed the queue index could not be prepared:
    /// the index no longer follows the database, so storage must be
    /// reopened (`take_diverged`).
    diverged: Cell<Option<String>>,
}

impl Applier {
    /// An applier with no batch open.
    pub(crate) fn new(
        layout: Layout,
        index: Arc<QueueIndex>,
        caches: Arc<Caches>,
        receipts: Arc<Receipts>,
        max_queue_depth: u64,
    ) -> Applier {
        Applier {
            layout,
            index,
            max_queue_depth,
            deleted_groups: Mutex::default(),
            receipts,
            open: None,
            caches,
            changed: Mutex::default(),
            diverged: Cell::new(None),
        }
    }

    /// The batch prepared so far was applied (or failed, which breaks
    /// storage): its group and client records are in the database now.
    pub(crate) fn batch_applied(&self) {
        let changed = std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()));
        self.caches.groups.changed(changed.groups);
        self.caches.clients.changed(changed.clients);
    }

    /// Why the last job that changed the queue index failed to be
    /// prepared, if one did: the writer then marks storage broken, so that
    /// the index is rebuilt from the database.
    pub(crate) fn take_diverged(&self) -> Option<String> {
        self.diverged.take()
    }

    /// `e` after the queue index changed: nothing undoes the change.
    fn diverge(&self, e: StoreError) -> StoreError {
        self.diverged.set(Some(e.to_string()));
        e
    }

    /// Turn `job` into writes, or answer it at once (a failed condition,
    /// an ack past the head, a backup, a write that cannot be encoded).
    pub(crate) fn prepare(&mut self, job: Job) -> Option<Prepared> {
        match job {
            Job::Write { set, reply } => match self.write(set) {
                Ok(staged) => Some(Prepared {
                    writes: staged.writes,
                    publish: staged.publish,
                    finish: Finish::Write(reply, staged.applied),
                }),
                Err(e) => {
                    reply.send(Err(e));
                    None
                }
            },
            Job::Ack {
                client,
                up_to,
                reply,
            } => match self.ack(&client, up_to) {
                Ok((writes, outcome)) => Some(Prepared {
                    writes,
                    publish: Vec::new(),
                    finish: Finish::Ack(reply, outcome),
                }),
                Err(e) => {
                    reply.send(Err(e));
                    None
                }
            },
            Job::Expire { cutoff_ms, reply } => {
                let released = self.index.lock().expire(cutoff_ms);
                match self.release_writes(&released) {
                    Ok(writes) => Some(Prepared {
                        writes,
                        publish: Vec::new(),
                        finish: Finish::Expire(reply, released.entries),
                    }),
                    Err(e) => {
                        reply.send(Err(self.diverge(e)));
                        None
                    }
                }
            }
            Job::Settle { reply } => Some(Prepared {
                writes: Vec::new(),
                publish: Vec::new(),
                finish: Finish::Settle(reply),
            }),
            Job::Backup { target, reply } => {
                reply.send(super::admin::backup(&self.layout, &target));
                None
            }
            // The writer runs it itself, once everything before is applied.
            Job::ForgetSends { reply, .. } => {
                reply.send(Err(StoreError::Unavailable(
                    "forgetting sends runs on the writer thread only".into(),
                )));
                None
            }
            // The writer runs it itself: it must retire once it is staged.
            Job::Compact { reply } => {
                reply.send(Err(StoreError::Unavailable(
                    "compaction runs on the writer thread only".into(),
                )));
                None
            }
            Job::Close { reply } => {
                reply.send(Err(StoreError::Unavailable(
                    "the checkpoint is written on the writer thread only".into(),
                )));
                None
            }
        }
    }

    fn write(&mut self, set: WriteSet) -> Result<StagedWrite, StoreError> {
        for c in &set.conditions {
            if !self.holds(c)? {
                return Err(StoreError::ConditionFailed(c.clone()));
            }
        }
        if set.changes.is_empty() {
            return self.write_plain(set.deliveries);
        }
        let tx = self.layout.storage.begin();
        let mut deleted = Vec::new();
        let mut staged_groups = Vec::new();
        let mut staged_clients = Vec::new();
        for change in set.changes {
            match &change {
                Change::PutGroup { id, .. } => staged_groups.push(GroupChange::Created(id.clone())),
                Change::DeleteGroup { id } => staged_groups.push(GroupChange::Deleted(id.clone())),
                Change::PutClient { id, .. } | Change::DeleteClient { id, .. } => {
                    staged_clients.push(id.clone())
                }
                _ => {}
            }
            if let Change::DeleteClient { id, tombstone } = change {
                self.stage_client_deletion(&tx, &id, &tombstone)?;
                deleted.push(id);
            } else {
                self.stage(&tx, change)?;
            }
        }
        // Index changes come last, once nothing else can fail. A failure
        // after one that is not undone breaks storage (`diverge`).
        let mut state = self.index.lock();
        for id in &deleted {
            let released = state.delete_client(id);
            stage_release(&self.layout, &self.receipts, &tx, &released)
                .map_err(|e| self.diverge(e))?;
        }
        // `deliver` undoes its own assignments when it fails.
        let queued = match self.deliver(&mut state, &tx, set.deliveries) {
            Ok(queued) => queued,
            Err(e) if deleted.is_empty() => return Err(e),
            Err(e) => return Err(self.diverge(e)),
        };
        let next_batch = state.next_batch;
        for change in &staged_groups {
            if let GroupChange::Deleted(id) = change {
                state.rosters.group_deleted(id.as_bytes(), next_batch);
            }
        }
        drop(state);
        #[cfg(test)]
        if deleted
            .iter()
            .any(|id| id.as_bytes() == FAIL_AFTER_DELETING)
        {
            return Err(self.diverge(StoreError::Corrupt("injected failure".into())));
        }
        let writes = vec![tx.into_pending().map_err(|e| self.diverge(e.into()))?];
        // Staged once nothing can fail: a write that was not made leaves no
        // receipt behind.
        queued.stage_receipts(&self.receipts);
        if !staged_clients.is_empty() {
            self.changed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clients
                .extend(staged_clients);
        }
        if !staged_groups.is_empty() {
            let mut deleted_groups = self
                .deleted_groups
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
            for change in staged_groups {
                match change {
                    GroupChange::Created(id) => {
                        deleted_groups.remove(&id);
                        changed.groups.push(id);
                    }
                    GroupChange::Deleted(id) => {
                        deleted_groups.insert(id.clone());
                        changed.groups.push(id);
                    }
                };
            }
        }
        Ok(self.delivered(writes, queued))
    }

    /// Whether a condition holds in the database as applied so far.
    fn holds(&self, c: &Condition) -> Result<bool, StoreError> {
        let l = &self.layout;
        let t = &l.trees;
        Ok(match c {
            Condition::ClientAbsent(id) => !l.contains(t.clients, id.as_bytes())?,
            Condition::ClientActive(id) => l.client(id)?.is_some_and(|r| !r.is_deleted()),
            Condition::ClientKeyIs { client, key } => l
                .client(client)?
                .is_some_and(|r| !r.is_deleted() && &r.signature_key == key),
            Condition::GroupAbsent(id) => !l.contains(t.groups, id.as_bytes())?,
            Condition::GroupPresent(id) => !self
                .deleted_groups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(id),
            Condition::SendNew(key) => self.receipts.get(key)?.is_none(),
            Condition::GroupAt { group, revision } => l
                .get::<GroupRecord>(t.groups, group.as_bytes())?
                .is_some_and(|r| r.revision == *revision),
            Condition::KeyPackageUnclaimed { owner, kp_ref } => {
                l.contains(t.key_packages, &layout::kp_key(owner, kp_ref))?
            }
            Condition::LastResortAt {
                owner,
                kp_ref,
                claims,
            } => l
                .get::<KeyPackageRecord>(t.key_packages, &layout::last_resort_key(owner))?
                .is_some_and(|r| &r.kp_ref == kp_ref && r.claims == *claims),
            Condition::InviteAt { code, uses_left } => l
                .get::<InviteRecord>(t.invites, code.as_bytes())?
                .is_some_and(|r| r.uses_left == *uses_left),
            Condition::UsageAt { client, usage } => {
                l.get::<ClientUsage>(t.usage, client.as_bytes())?
                    .unwrap_or_default()
                    == *usage
            }
        })
    }

    /// Add one change's keys to `tx`.
    fn stage(&self, tx: &Transaction, change: Change) -> Result<(), StoreError> {
        let t = &self.layout.trees;
        let put = |tree: layout::Tree, key: &[u8], bytes: Vec<u8>| -> Result<(), StoreError> {
            Ok(tx.put_raw(tree.handle, key, &bytes)?)
        };
        match change {
            Change::PutClient { id, record } => put(
                t.clients,
                id.as_bytes(),
                layout::encode(t.clients, &record)?,
            ),
            Change::DeleteClient { .. } => Err(StoreError::Corrupt(
                "client deletion is staged with the queue index".into(),
            )),
            Change::DeleteGroup { id } => {
                let storage = &self.layout.storage;
                for (k, _) in storage.scan_raw(t.commits.handle, &layout::group_key(&id))? {
                    tx.remove_raw(t.commits.handle, &k)?;
                }
                tx.remove_raw(t.groups.handle, id.as_bytes())?;
                Ok(tx.remove_raw(t.group_states.handle, id.as_bytes())?)
            }
            Change::RemoveCommit { group, epoch } => {
                Ok(tx.remove_raw(t.commits.handle, &layout::commit_key(&group, epoch))?)
            }
            Change::RemoveKeyPackagesOf { owner } => {
                for (k, _) in self
                    .layout
                    .storage
                    .scan_raw(t.key_packages.handle, &layout::client_key(&owner))?
                {
                    tx.remove_raw(t.key_packages.handle, &k)?;
                }
                Ok(())
            }
            Change::PutKeyPackage { owner, record } => put(
                t.key_packages,
                &layout::kp_key(&owner, &record.kp_ref),
                layout::encode(t.key_packages, &record)?,
            ),
            Change::PutLastResort { owner, record } => put(
                t.key_packages,
                &layout::last_resort_key(&owner),
                layout::encode(t.key_packages, &record)?,
            ),
            Change::RemoveKeyPackage { owner, kp_ref } => {
                Ok(tx.remove_raw(t.key_packages.handle, &layout::kp_key(&owner, &kp_ref))?)
            }
            Change::PutKeyPackageOwner { kp_ref, owner } => {
                put(t.kp_owners, &kp_ref, owner.as_bytes().to_vec())
            }
            Change::PutGroup { id, record } => {
                put(t.groups, id.as_bytes(), layout::encode(t.groups, &record)?)
            }
            Change::PutGroupState { id, state } => put(
                t.group_states,
                id.as_bytes(),
                layout::encode(t.group_states, &state)?,
            ),
            Change::PutCommit {
                group,
                epoch,
                record,
            } => put(
                t.commits,
                &layout::commit_key(&group, epoch),
                layout::encode(t.commits, &record)?,
            ),
            Change::PutInvite { code, record } => put(
                t.invites,
                code.as_bytes(),
                layout::encode(t.invites, &record)?,
            ),
            Change::RemoveInvite { code } => Ok(tx.remove_raw(t.invites.handle, code.as_bytes())?),
            Change::PutUsage { client, usage } => {
                put(t.usage, client.as_bytes(), layout::encode(t.usage, &usage)?)
            }
        }
    }

    /// The tombstone and the removal of every key package of a client that
    /// deletes itself (its queue goes with the index changes).
    fn stage_client_deletion(
        &self,
        tx: &Transaction,
        id: &ClientId,
        tombstone: &crate::backend::records::ClientRecord,
    ) -> Result<(), StoreError> {
        let t = &self.layout.trees;
        for (k, _) in self
            .layout
            .storage
            .scan_raw(t.key_packages.handle, &layout::client_key(id))?
        {
            tx.remove_raw(t.key_packages.handle, &k)?;
        }
        tx.put_raw(
            t.clients.handle,
            id.as_bytes(),
            &layout::encode(t.clients, tombstone)?,
        )?;
        Ok(())
    }

    fn ack(
        &self,
        client: &ClientId,
        up_to: u64,
    ) -> Result<(Vec<PendingWrites>, AckOutcome), StoreError> {
        let mut state = self.index.lock();
        let released = state
            .ack(client, up_to)
            .map_err(|head| StoreError::AckBeyondHead { up_to, head })?;
        let outcome = state.position(client);
        drop(state);
        let writes = self
            .release_writes(&released)
            .map_err(|e| self.diverge(e))?;
        Ok((writes, outcome))
    }

    /// Ack marks and removals of freed batches, applied key by key: every
    /// key-order prefix is a state startup accepts (marks sort before the
    /// batches whose removal they allow; a crash in between leaves fully
    /// acknowledged batches, which startup deletes).
    fn release_writes(&self, released: &Released) -> Result<Vec<PendingWrites>, StoreError> {
        let tx = self.layout.storage.begin();
        stage_release(&self.layout, &self.receipts, &tx, released)?;
        Ok(tx.into_pending()?.into_single_writes())
    }
}

/// Tests: a write set that deletes this client fails once the queue index
/// has changed.
#[cfg(test)]
pub(crate) const FAIL_AFTER_DELETING: &[u8] = b"fails-after-its-deletion";

/// Ack marks and the removal of freed batches; a batch holding the send ids
/// of fresh receipts stays until they are frozen into a run.
fn stage_release(
    layout: &Layout,
    receipts: &Receipts,
    tx: &Transaction,
    released: &Released,
) -> Result<(), StoreError> {
    let delivery = layout.trees.delivery.handle;
    for (client, mark) in &released.marks {
        tx.put_raw(delivery, &layout::ack_key(client), &mark.to_bytes())?;
    }
    for batch in &released.freed {
        if !receipts.keeps(*batch) {
            tx.remove_raw(delivery, &layout::batch_key(*batch))?;
        }
    }
    Ok(())
}
