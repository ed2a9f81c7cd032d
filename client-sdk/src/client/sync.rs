//! Receiving: the DS queue is fetched page by page, each entry processed and
//! its effects (group state, the event for the application, the cursor)
//! written in one transaction, and only then acknowledged to the DS. An entry
//! that cannot be processed is recorded as skipped, so the queue never stalls.

use mls_ds_protocol::queue::{EntryKind, QueueEntry};
use mls_ds_storage::SledProvider;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;

use super::{group_mut, join_config, Client, Inner};
use crate::error::{
    malformed, mls, mls_error, processing, welcome as welcome_error, ClientError, MlsErrorKind,
    Result,
};
use crate::records::{self, Event, GroupMeta};

impl Client {
    /// The highest DS sequence number processed.
    pub fn cursor(&self) -> Result<u64> {
        Ok(self
            .storage()
            .get_raw(self.records, records::CURSOR)?
            .map(|v| v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0))
            .unwrap_or(0))
    }

    /// Fetch and process everything queued on the DS (waiting up to
    /// `wait_ms` for the first entry), then acknowledge it, and deliver the
    /// send outbox ([`Client::flush_sends`]). Returns the number of entries
    /// processed; their events are in the inbox ([`Client::events`]).
    pub async fn sync_wait(&self, wait_ms: u64) -> Result<usize> {
        let processed = self.sync_queue(wait_ms).await?;
        self.after_receiving().await?;
        Ok(processed)
    }

    /// [`Client::sync_wait`] without waiting.
    pub async fn sync(&self) -> Result<usize> {
        Box::pin(self.sync_wait(0)).await
    }

    /// What follows receiving: pending proposals committed, queued messages
    /// sent for the epoch just caught up with, key packages kept up.
    pub(super) async fn after_receiving(&self) -> Result<()> {
        self.heal().await?;
        self.commit_pending_removals().await?;
        self.flush_sends().await?;
        if self.key_packages_due() {
            // Receiving goes on if the upkeep fails (e.g. the DS's quota);
            // it is tried again at the next check.
            if let Err(e) = self.ensure_key_packages().await {
                tracing::warn!(client = %self.id, error = %e, "key package upkeep failed");
            }
        }
        Ok(())
    }

    /// Process the entries after the cursor, in order, each in its own
    /// write with the cursor; the last one processed, if any.
    pub(super) async fn process_entries(&self, entries: &[QueueEntry]) -> Result<Option<u64>> {
        let mut last = self.cursor()?;
        let mut processed = None;
        for entry in entries {
            if entry.seq <= last {
                continue;
            }
            self.process_entry(entry).await?;
            last = entry.seq;
            processed = Some(last);
        }
        Ok(processed)
    }

    /// Resolve outboxes, then fetch, process and acknowledge the queue.
    pub(super) async fn sync_queue(&self, wait_ms: u64) -> Result<usize> {
        self.resolve_outboxes().await?;
        let mut processed = 0;
        let mut wait = wait_ms;
        // The ack of a processed page travels with the next fetch.
        let mut processed_up_to = None;
        loop {
            let cursor = self.cursor()?;
            let page = match processed_up_to.take() {
                Some(up_to) => self.api.ack_and_fetch(up_to, cursor, 256, wait).await?,
                None => self.api.fetch(cursor, 256, wait).await?,
            };
            wait = 0;
            self.note_lost_entries(page.acked).await?;
            let cursor = self.cursor()?;
            if page.entries.is_empty() {
                if page.acked < cursor && cursor <= page.head {
                    self.api.ack(cursor).await?;
                }
                break;
            }
            processed += page.entries.iter().filter(|e| e.seq > cursor).count();
            processed_up_to = Some(self.process_entries(&page.entries).await?.unwrap_or(cursor));
        }
        Ok(processed)
    }

    /// Groups with queued proposals (e.g. a member asked to leave) get them
    /// committed, so a leave completes without manual help.
    async fn commit_pending_removals(&self) -> Result<()> {
        let with_proposals: Vec<Vec<u8>> = {
            let inner = self.inner.lock().await;
            inner
                .groups
                .iter()
                .filter(|(_, g)| g.is_active() && g.pending_proposals().next().is_some())
                .map(|(id, _)| id.clone())
                .collect()
        };
        for gid in with_proposals {
            match Box::pin(self.commit_pending_proposals(&gid)).await {
                Ok(_) => {}
                // Somebody else committed them first, or we were removed.
                Err(ClientError::NotInGroup { .. } | ClientError::Mls { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn process_entry(&self, entry: &QueueEntry) -> Result<()> {
        tracing::debug!(
            client = %self.id,
            seq = entry.seq,
            kind = ?entry.kind,
            epoch = entry.epoch,
            sender = %String::from_utf8_lossy(entry.sender.as_slice()),
            "processing entry"
        );
        let mut inner = self.inner.lock().await;
        // Another task (a stream, a send's resync) may have processed it
        // since this one read the cursor: the cursor moves under this lock.
        if entry.seq <= self.cursor()? {
            return Ok(());
        }
        let gid = entry.group_id.as_slice().to_vec();
        let seq = entry.seq;
        let tx = self.provider.begin();
        let event = match self.apply_entry(&mut inner, &tx, entry) {
            Ok(ev) => ev,
            Err(e) => {
                // Nothing of the failed attempt may survive in memory.
                drop(tx);
                self.reload(&mut inner, &gid)?;
                let local_epoch = inner.groups.get(&gid).map(|g| g.epoch().as_u64());
                return self.skip_entry(entry, &e, local_epoch);
            }
        };
        self.finish_entry(&tx, seq, event.as_ref())?;
        if let Err(e) = tx.commit() {
            self.reload(&mut inner, &gid)?;
            return Err(e.into());
        }
        Ok(())
    }

    /// Move the cursor past an entry that could not be applied, telling the
    /// application why in a [`Event::Skipped`], and noting its group as
    /// suspect if the failure can mean this client fell behind, in one
    /// write.
    fn skip_entry(
        &self,
        entry: &QueueEntry,
        error: &ClientError,
        local_epoch: Option<u64>,
    ) -> Result<()> {
        let seq = entry.seq;
        let tx = self.provider.begin();
        self.suspect_after_failure(tx.storage(), entry, error, local_epoch)?;
        let ev = Event::Skipped {
            seq,
            group_id: entry.group_id.as_slice().to_vec(),
            reason: format!(
                "{error} ({:?} from {} for epoch {})",
                entry.kind,
                String::from_utf8_lossy(entry.sender.as_slice()),
                entry.epoch
            ),
        };
        tracing::warn!(seq, error = %error, "skipped queue entry");
        self.finish_entry(&tx, seq, Some(&ev))?;
        tx.commit()?;
        Ok(())
    }

    fn finish_entry(&self, tx: &SledProvider, seq: u64, event: Option<&Event>) -> Result<()> {
        let s = tx.storage();
        if let Some(ev) = event {
            s.put_record(self.records, &records::inbox_key(seq), ev)?;
        }
        s.put_raw(self.records, records::CURSOR, &seq.to_be_bytes())?;
        Ok(())
    }

    fn apply_entry(
        &self,
        inner: &mut Inner,
        tx: &SledProvider,
        entry: &QueueEntry,
    ) -> Result<Option<Event>> {
        if entry.kind == EntryKind::GroupDeleted {
            let gid = entry.group_id.as_slice();
            self.forget_removed_group(inner, tx, gid)?;
            return Ok(Some(Event::GroupDeleted {
                seq: entry.seq,
                group_id: gid.to_vec(),
            }));
        }
        let msg =
            MlsMessageIn::tls_deserialize_exact(entry.message.as_slice()).map_err(malformed)?;
        if entry.kind == EntryKind::Welcome {
            self.key_package_used();
            return self.apply_welcome(inner, tx, entry, msg).map(Some);
        }
        self.apply_group_message(inner, tx, entry, msg)
    }

    /// Join the group a Welcome is for.
    fn apply_welcome(
        &self,
        inner: &mut Inner,
        tx: &SledProvider,
        entry: &QueueEntry,
        msg: MlsMessageIn,
    ) -> Result<Event> {
        let seq = entry.seq;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(ClientError::BadResponse(
                "welcome entry holds no Welcome".into(),
            ));
        };
        // The tree comes from the DS beside the Welcome; one sent by another
        // client's ratchet-tree extension is used when the DS sent none.
        let tree = match entry.ratchet_tree.as_slice() {
            [] => None,
            bytes => Some(RatchetTreeIn::tls_deserialize_exact(bytes).map_err(malformed)?),
        };
        let group = StagedWelcome::new_from_welcome(tx, &join_config(), welcome, tree)
            .map_err(welcome_error)?
            .into_group(tx)
            .map_err(mls)?;
        let gid = group.group_id().as_slice().to_vec();
        tx.storage().put_record(
            self.records,
            &records::group_key(&gid),
            &GroupMeta { open: false },
        )?;
        inner.groups.insert(gid.clone(), group);
        Ok(Event::Joined {
            seq,
            group_id: gid,
            by: entry.sender.as_slice().to_vec(),
        })
    }

    /// Process a message, proposal or commit of a group this client is in.
    fn apply_group_message(
        &self,
        inner: &mut Inner,
        tx: &SledProvider,
        entry: &QueueEntry,
        msg: MlsMessageIn,
    ) -> Result<Option<Event>> {
        let seq = entry.seq;
        let gid = entry.group_id.as_slice().to_vec();
        let g = group_mut(inner, &gid)?;
        let protocol = msg.try_into_protocol_message().map_err(malformed)?;
        if protocol.epoch() < g.epoch() && entry.kind == EntryKind::Commit {
            return Err(mls_error(
                MlsErrorKind::WrongEpoch,
                format!(
                    "commit for past epoch {} (group is at {})",
                    protocol.epoch().as_u64(),
                    g.epoch().as_u64()
                ),
            ));
        }
        if g.pending_commit().is_some() {
            // Our own commit for this epoch lost (the DS accepted this one).
            g.clear_pending_commit(tx.storage())?;
        }
        let processed = g.process_message(tx, protocol).map_err(processing)?;
        let sender = identity(processed.credential());
        let by_external_commit = matches!(processed.sender(), Sender::NewMemberCommit);
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(Some(Event::Message {
                seq,
                group_id: gid,
                sender,
                data: app.into_bytes(),
            })),
            ProcessedMessageContent::ProposalMessage(p) => {
                g.store_pending_proposal(tx.storage(), *p)?;
                Ok(None)
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let mut added: Vec<Vec<u8>> = staged
                    .add_proposals()
                    .map(|p| identity(p.add_proposal().key_package().leaf_node().credential()))
                    .collect();
                if by_external_commit {
                    added.push(sender.clone());
                }
                // Read before the merge, while the removed leaves are there.
                let removed: Vec<Vec<u8>> = staged
                    .remove_proposals()
                    .filter_map(|p| g.member(p.remove_proposal().removed()).map(identity))
                    .collect();
                g.merge_staged_commit(tx, *staged).map_err(mls)?;
                if g.is_active() {
                    Ok(Some(Event::Commit {
                        seq,
                        group_id: gid,
                        epoch: g.epoch().as_u64(),
                        committer: sender,
                        added,
                        removed,
                    }))
                } else {
                    self.forget_removed_group(inner, tx, &gid)?;
                    Ok(Some(Event::Removed { seq, group_id: gid }))
                }
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(p) => {
                g.store_pending_proposal(tx.storage(), *p)?;
                Ok(None)
            }
            _ => Err(ClientError::BadResponse(
                "the DS delivered this client's own message back".into(),
            )),
        }
    }

    /// Delete a group this client was removed from (or that was deleted),
    /// with its record.
    pub(super) fn forget_removed_group(
        &self,
        inner: &mut Inner,
        tx: &SledProvider,
        gid: &[u8],
    ) -> Result<()> {
        if let Some(mut g) = inner.groups.remove(gid) {
            g.delete(tx.storage())?;
        }
        tx.storage()
            .remove_raw(self.records, &records::group_key(gid))?;
        // Messages still queued for it never go out, not even to a later
        // membership of the same group.
        self.fail_queued_sends(tx.storage(), gid, "this client left the group")
    }
}

/// The client id in a (basic) credential; empty for another kind.
fn identity(credential: &Credential) -> Vec<u8> {
    BasicCredential::try_from(credential.clone())
        .map(|c| c.identity().to_vec())
        .unwrap_or_default()
}
