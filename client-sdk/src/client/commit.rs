//! The commit discipline and its outbox. A commit is staged and stored (with
//! the bundle in the outbox) in one write, then sent. Only when the DS accepts
//! it is it merged; on 409 it is cleared, the queue is synced (which brings
//! the winning commit), and the intent is retried. A crash anywhere in
//! between is resolved on the next network operation by resending the
//! outbox: the DS answers a retry of an accepted commit with the original
//! success.

use mls_ds_storage::codec::decode_record;
use mls_ds_storage::SledProvider;
use openmls::group::{CommitBuilder, Initial};
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;

use super::{group_mut, join_config, wire, Client, Inner, RECORDS};
use crate::error::{mls, ClientError, Result};
use crate::records::{self, GroupMeta, Outbox, OutboxKind};

/// A group joined by external commit, with the commit that joins it.
struct ExternalJoin {
    group: MlsGroup,
    bundle: CommitMessageBundle,
}

impl Client {
    /// Stage a commit with `build`, store it with its bundle, send it, and
    /// merge it only when the DS accepts; on 409 clear, sync and retry.
    pub(super) async fn commit_with_retry<F>(&self, group_id: &[u8], mut build: F) -> Result<u64>
    where
        F: FnMut(&mut MlsGroup, &SledProvider, &SignatureKeyPair) -> Result<CommitMessageBundle>,
    {
        for _ in 0..=self.config.max_commit_retries {
            // Process the queue first: a commit must not jump over entries
            // the DS accepted before it (they would then be processed an epoch
            // later than their sender intended), and it avoids a certain 409.
            self.sync_queue(0).await?;
            // Behind for good (a commit lost or unprocessable): rejoin first.
            self.heal().await?;
            let outbox = self.stage_in_outbox(group_id, &mut build).await?;
            // `None`: lost the race; the next round syncs (learning the
            // winning commit) and tries again.
            if let Some(epoch) = self.resolve_one(group_id, &outbox).await? {
                return Ok(epoch);
            }
        }
        Err(ClientError::CommitRetriesExhausted(
            self.config.max_commit_retries,
        ))
    }

    /// Stage a commit with `build` and store its bundle in the outbox, in one
    /// write. If that fails, the group in memory is put back as stored.
    async fn stage_in_outbox<F>(&self, group_id: &[u8], build: &mut F) -> Result<Outbox>
    where
        F: FnMut(&mut MlsGroup, &SledProvider, &SignatureKeyPair) -> Result<CommitMessageBundle>,
    {
        let mut inner = self.inner.lock().await;
        let g = group_mut(&mut inner, group_id)?;
        let tx = self.provider.begin();
        let bundle = match build(g, &tx, &self.signer) {
            Ok(b) => b,
            Err(e) => {
                drop(tx);
                self.reload(&mut inner, group_id)?;
                return Err(e);
            }
        };
        let (commit, welcome, gi) = bundle.into_messages();
        let gi = gi.ok_or_else(|| mls("commit without GroupInfo"))?;
        let outbox = Outbox {
            kind: OutboxKind::Commit,
            commit: wire(&commit)?,
            welcome: welcome.map(|w| wire(&w)).transpose()?,
            group_info: wire(&gi)?,
        };
        tx.storage()
            .put_record(self.records, &records::outbox_key(group_id), &outbox)?;
        if let Err(e) = tx.commit() {
            self.reload(&mut inner, group_id)?;
            return Err(e.into());
        }
        Ok(outbox)
    }

    /// Replace this client's copy of the group (if any) by one joined by
    /// external commit, and store that commit in the outbox, in one write.
    pub(super) async fn stage_external_join(
        &self,
        group_id: &[u8],
        group_info: VerifiableGroupInfo,
        ratchet_tree: RatchetTreeIn,
    ) -> Result<Outbox> {
        let mut inner = self.inner.lock().await;
        let tx = self.provider.begin();
        if let Some(mut old) = inner.groups.remove(group_id) {
            old.delete(tx.storage())?;
        }
        let ExternalJoin { group, bundle } = external_commit(
            &tx,
            &self.signer,
            group_info,
            ratchet_tree,
            &self.credential,
        )?;
        let (commit, _, gi) = bundle.into_messages();
        let gi = gi.ok_or_else(|| mls("external commit without GroupInfo"))?;
        let outbox = Outbox {
            kind: OutboxKind::ExternalJoin,
            commit: wire(&commit)?,
            welcome: None,
            group_info: wire(&gi)?,
        };
        tx.storage()
            .put_record(self.records, &records::outbox_key(group_id), &outbox)?;
        tx.storage().put_record(
            self.records,
            &records::group_key(group_id),
            &GroupMeta { open: false },
        )?;
        tx.commit()?;
        inner.groups.insert(group_id.to_vec(), group);
        Ok(outbox)
    }

    /// Resolve commits left unresolved by a crash or a network failure.
    pub async fn resolve_outboxes(&self) -> Result<()> {
        let pending = self.storage().scan_raw(self.records, b"outbox/")?;
        for (k, v) in pending {
            let gid = k[b"outbox/".len()..].to_vec();
            let outbox: Outbox = decode_record(RECORDS, &k, &v)?;
            self.resolve_one(&gid, &outbox).await?;
        }
        Ok(())
    }

    /// Send one stored bundle and apply the DS's verdict. `Some(epoch)`:
    /// accepted and merged; `None`: another commit won (state cleared).
    /// Transport errors leave the outbox for a later attempt.
    pub(super) async fn resolve_one(
        &self,
        group_id: &[u8],
        outbox: &Outbox,
    ) -> Result<Option<u64>> {
        let verdict = self
            .api
            .commit(
                group_id,
                outbox.commit.clone(),
                outbox.welcome.clone(),
                outbox.group_info.clone(),
            )
            .await;
        let mut inner = self.inner.lock().await;
        let accepted = match verdict {
            Ok(a) => Some(a.epoch),
            Err(e) if e.is_wrong_epoch() => None,
            Err(e @ ClientError::Server { .. })
                if e.status()
                    .is_some_and(|s| (400..500).contains(&s) && s != 401 && s != 429) =>
            {
                // Rejected for good: drop the commit, then report.
                self.discard(&mut inner, group_id, outbox.kind)?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        match accepted {
            Some(epoch) => {
                self.merge_accepted(&mut inner, group_id, outbox.kind)?;
                Ok(Some(epoch))
            }
            None => {
                self.discard(&mut inner, group_id, outbox.kind)?;
                Ok(None)
            }
        }
    }

    /// Merge a commit the DS accepted and clear its outbox, in one write.
    fn merge_accepted(&self, inner: &mut Inner, group_id: &[u8], kind: OutboxKind) -> Result<()> {
        #[cfg(feature = "test-hooks")]
        if self.config.abort_after_commit_accepted {
            std::process::abort();
        }
        let tx = self.provider.begin();
        if kind == OutboxKind::Commit {
            let g = group_mut(inner, group_id)?;
            if g.pending_commit().is_some() {
                g.merge_pending_commit(&*tx).map_err(mls)?;
            }
        }
        tx.storage()
            .remove_raw(self.records, &records::outbox_key(group_id))?;
        tx.commit()?;
        Ok(())
    }

    /// Drop a commit the DS will not take, and clear its outbox, in one write.
    fn discard(&self, inner: &mut Inner, group_id: &[u8], kind: OutboxKind) -> Result<()> {
        let tx = self.provider.begin();
        match kind {
            OutboxKind::Commit => {
                if let Some(g) = inner.groups.get_mut(group_id) {
                    g.clear_pending_commit(tx.storage())?;
                }
            }
            OutboxKind::ExternalJoin => {
                if let Some(mut g) = inner.groups.remove(group_id) {
                    g.delete(tx.storage())?;
                }
                tx.storage()
                    .remove_raw(self.records, &records::group_key(group_id))?;
            }
        }
        tx.storage()
            .remove_raw(self.records, &records::outbox_key(group_id))?;
        tx.commit()?;
        Ok(())
    }
}

/// Finish a commit: load PSKs, sign, and stage it (pending until the DS
/// accepts it) together with the new epoch's GroupInfo.
pub(super) fn stage_commit(
    builder: CommitBuilder<'_, Initial>,
    p: &SledProvider,
    signer: &SignatureKeyPair,
) -> Result<CommitMessageBundle> {
    builder
        .load_psks(p.storage())
        .map_err(mls)?
        .create_group_info(true)
        .build(p.rand(), p.crypto(), signer, |_| true)
        .map_err(mls)?
        .stage_commit(p)
        .map_err(mls)
}

fn external_commit(
    provider: &SledProvider,
    signer: &SignatureKeyPair,
    vgi: VerifiableGroupInfo,
    tree: RatchetTreeIn,
    credential: &CredentialWithKey,
) -> Result<ExternalJoin> {
    let (group, bundle) = MlsGroup::external_commit_builder()
        .with_ratchet_tree(tree)
        .with_config(join_config())
        .build_group(provider, vgi, credential.clone())
        .map_err(mls)?
        .load_psks(provider.storage())
        .map_err(mls)?
        .create_group_info(true)
        .build(provider.rand(), provider.crypto(), signer, |_| true)
        .map_err(mls)?
        .finalize(provider)
        .map_err(mls)?;
    Ok(ExternalJoin { group, bundle })
}
