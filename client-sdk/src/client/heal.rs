//! Self-healing: noticing that this client fell out of a group, and
//! rejoining it by itself.
//!
//! What makes a group suspect (recorded durably, in the write that noticed
//! it): queue entries gone before they were read (the DS acknowledged past
//! the cursor: its retention bound, its queue limit, another device of the
//! same client), a commit that could not be processed, a message for an
//! epoch ahead of this client's, a group state that fails to load. A
//! suspect group is checked against the DS's epoch; if this client is
//! behind, it rejoins by external commit, replacing its own leaf (the DS
//! takes that from a current member of a closed group), and the
//! application gets [`Event::Resynced`]. A member's failure alone never
//! triggers a rejoin: only the DS's epoch does, so a member sending garbage
//! cannot make the others rejoin. A client the DS no longer lists is told
//! [`Event::Removed`]; a group that is gone, [`Event::GroupDeleted`].

use mls_ds_protocol::queue::{EntryKind, QueueEntry};
use mls_ds_storage::codec::decode_record;
use mls_ds_storage::SledStorage;

use super::{Client, RECORDS};
use crate::error::{ClientError, MlsErrorKind, Result};
use crate::records::{self, Event, Suspect};

impl Client {
    /// The DS acknowledged this client's queue up to `acked`: entries after
    /// the cursor up to there were dropped unread. Moves the cursor past
    /// them, tells the application, and makes every group suspect, in one
    /// write.
    pub(super) async fn note_lost_entries(&self, acked: u64) -> Result<()> {
        if acked <= self.cursor()? {
            return Ok(());
        }
        // The cursor moves under this lock (entries are processed under it).
        let inner = self.inner.lock().await;
        let cursor = self.cursor()?;
        if acked <= cursor {
            return Ok(());
        }
        tracing::warn!(client = %self.id, from = cursor + 1, to = acked, "queue entries lost before they were read");
        let groups: Vec<Vec<u8>> = inner.groups.keys().cloned().collect();
        let tx = self.storage().begin();
        tx.put_raw(self.records, records::CURSOR, &acked.to_be_bytes())?;
        self.put_local_event(
            &tx,
            acked,
            &Event::QueueGap {
                seq: acked,
                from: cursor + 1,
            },
        )?;
        let reason = format!("queue entries {}..={acked} were lost", cursor + 1);
        for gid in groups {
            self.suspect(&tx, &gid, &reason)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Make the group of `entry` suspect if `error` (processing it failed,
    /// this client being at `local_epoch`) can mean this client fell behind.
    pub(super) fn suspect_after_failure(
        &self,
        tx: &SledStorage,
        entry: &QueueEntry,
        error: &ClientError,
        local_epoch: Option<u64>,
    ) -> Result<()> {
        let ahead = local_epoch.is_some_and(|l| entry.epoch > l);
        let past_commit = error.mls_kind() == Some(MlsErrorKind::WrongEpoch) && !ahead;
        let why = match entry.kind {
            EntryKind::Commit if !past_commit => "a commit could not be processed",
            EntryKind::Message if ahead => "a message for a later epoch arrived",
            _ if local_epoch.is_none() && self.has_group_record(entry.group_id.as_slice())? => {
                "the group's state is missing"
            }
            _ => return Ok(()),
        };
        self.suspect(tx, entry.group_id.as_slice(), &format!("{why}: {error}"))
    }

    /// Record `gid` as suspect, through `tx`.
    pub(super) fn suspect(&self, tx: &SledStorage, gid: &[u8], reason: &str) -> Result<()> {
        tx.put_record(
            self.records,
            &records::suspect_key(gid),
            &Suspect {
                reason: reason.to_owned(),
            },
        )?;
        Ok(())
    }

    fn has_group_record(&self, gid: &[u8]) -> Result<bool> {
        Ok(self
            .storage()
            .get_raw(self.records, &records::group_key(gid))?
            .is_some())
    }

    /// Check every suspect group against the DS and rejoin the ones this
    /// client is behind in. A group that cannot be repaired now stays
    /// suspect for the next sync and holds up nothing else; one task heals
    /// at a time (another that comes meanwhile leaves it to the first).
    pub(super) async fn heal(&self) -> Result<()> {
        let Ok(_one_at_a_time) = self.healing.try_lock() else {
            return Ok(());
        };
        for (key, value) in self
            .storage()
            .scan_raw(self.records, records::SUSPECT_PREFIX)?
        {
            let gid = key[records::SUSPECT_PREFIX.len()..].to_vec();
            let suspect: Suspect = decode_record(RECORDS, &key, &value)?;
            if let Err(e) = Box::pin(self.heal_group(&gid, &suspect)).await {
                tracing::warn!(
                    client = %self.id,
                    group = %hex::encode(&gid),
                    error = %e,
                    "could not rejoin the group yet; trying again at the next sync"
                );
                if e.is_network() {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn heal_group(&self, gid: &[u8], suspect: &Suspect) -> Result<()> {
        let local = self
            .inner
            .lock()
            .await
            .groups
            .get(gid)
            .map(|g| g.epoch().as_u64());
        let ds_epoch = match self.api.group_info(gid).await {
            Ok(info) => info.epoch,
            Err(e) => return self.left_group(gid, e).await,
        };
        if local.is_some_and(|l| l >= ds_epoch) {
            // Not behind: what was lost were messages, told by the gap (or a
            // crash came between a recovery's rejoin and its clean-up).
            self.remove_stale_leaves(gid).await?;
            let tx = self.storage().begin();
            tx.remove_raw(self.records, &records::suspect_key(gid))?;
            tx.commit()?;
            return Ok(());
        }
        tracing::warn!(
            client = %self.id,
            group = %hex::encode(gid),
            local = ?local,
            ds = ds_epoch,
            reason = %suspect.reason,
            "behind the group: rejoining by external commit"
        );
        let mut to_epoch = match self.join_external(gid).await {
            Ok(epoch) => epoch,
            Err(e) => return self.left_group(gid, e).await,
        };
        if let Some(epoch) = self.remove_stale_leaves(gid).await? {
            to_epoch = epoch;
        }
        let seq = self.cursor()?;
        let tx = self.storage().begin();
        tx.remove_raw(self.records, &records::suspect_key(gid))?;
        self.put_local_event(
            &tx,
            seq,
            &Event::Resynced {
                seq,
                group_id: gid.to_vec(),
                from_epoch: local.unwrap_or(0),
                to_epoch,
                reason: suspect.reason.clone(),
            },
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Remove this client's *stale* leaves from the group: leaves with its
    /// id and another key, left behind when it took its id back with a new
    /// key after losing its store ([`Client::recover`]). Its external
    /// commit could not remove them (OpenMLS removes only a leaf with the
    /// joiner's own key), so its first commit as a member does. Returns the
    /// new epoch if it committed.
    async fn remove_stale_leaves(&self, gid: &[u8]) -> Result<Option<u64>> {
        let me = self.id.to_string();
        let own_key = self.signer.public().to_vec();
        let stale = |g: &openmls::prelude::MlsGroup| -> Vec<openmls::prelude::LeafNodeIndex> {
            g.members()
                .filter(|m| super::member_id(m) == me && m.signature_key != own_key)
                .map(|m| m.index)
                .collect()
        };
        let any = match self.inner.lock().await.groups.get(gid) {
            Some(g) => !stale(g).is_empty(),
            None => false,
        };
        if !any {
            return Ok(None);
        }
        let epoch = self
            .commit_with_retry(gid, |g, p, signer| {
                let leaves = stale(g);
                super::commit::stage_commit(g.commit_builder().propose_removals(leaves), p, signer)
            })
            .await?;
        Ok(Some(epoch))
    }

    /// The DS refused to show or rejoin the group: 404, it is gone; 403,
    /// this client is no longer a member. Either way the local state goes,
    /// and the application is told. Other errors are returned.
    async fn left_group(&self, gid: &[u8], e: ClientError) -> Result<()> {
        let seq = self.cursor()?;
        let event = match e.status() {
            Some(404) => Event::GroupDeleted {
                seq,
                group_id: gid.to_vec(),
            },
            Some(403) => Event::Removed {
                seq,
                group_id: gid.to_vec(),
            },
            _ => return Err(e),
        };
        let mut inner = self.inner.lock().await;
        let tx = self.provider.begin();
        self.forget_removed_group(&mut inner, &tx, gid)?;
        tx.storage()
            .remove_raw(self.records, &records::suspect_key(gid))?;
        self.put_local_event(tx.storage(), seq, &event)?;
        tx.commit()?;
        Ok(())
    }

    /// File an event of the SDK's own after DS entry `seq`, through `tx`.
    fn put_local_event(&self, tx: &SledStorage, seq: u64, event: &Event) -> Result<()> {
        let n = tx
            .get_raw(self.records, records::LOCAL_EVENTS)?
            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        tx.put_raw(self.records, records::LOCAL_EVENTS, &(n + 1).to_be_bytes())?;
        tx.put_record(self.records, &records::local_inbox_key(seq, n), event)?;
        Ok(())
    }
}
