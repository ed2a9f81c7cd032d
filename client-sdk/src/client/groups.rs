//! What the application does with its groups: looking at them, creating
//! one, changing membership and keys (each change a commit, made under the
//! commit discipline of `commit`), leaving, sending, and joining by external
//! commit.

use mls_ds_protocol::ClientId;
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_traits::OpenMlsProvider;

use super::commit::stage_commit;
use super::{create_config, group, group_mut, member_id, wire, Client};
use crate::error::{malformed, mls, ClientError, Result};
use crate::records::{self, GroupMeta};

/// A group created locally, stored but not yet registered with the DS.
struct LocalGroup {
    group: MlsGroup,
    group_id: Vec<u8>,
    /// `MLSMessage` of its GroupInfo.
    group_info: Vec<u8>,
    /// TLS encoding of its ratchet tree.
    ratchet_tree: Vec<u8>,
}

/// What the DS publishes of a group for joiners.
struct PublishedGroup {
    group_info: VerifiableGroupInfo,
    ratchet_tree: RatchetTreeIn,
}

impl Client {
    /// Ids of the groups this client is in.
    pub async fn groups(&self) -> Vec<Vec<u8>> {
        let mut ids: Vec<Vec<u8>> = self.inner.lock().await.groups.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Client ids of a group's members, sorted.
    pub async fn members(&self, group_id: &[u8]) -> Result<Vec<String>> {
        let inner = self.inner.lock().await;
        let g = group(&inner, group_id)?;
        let mut m: Vec<String> = g.members().map(|m| member_id(&m)).collect();
        m.sort();
        Ok(m)
    }

    /// A group's epoch.
    pub async fn epoch(&self, group_id: &[u8]) -> Result<u64> {
        let inner = self.inner.lock().await;
        Ok(group(&inner, group_id)?.epoch().as_u64())
    }

    /// An exported secret of the group's current epoch (equal on all members).
    pub async fn export_secret(&self, group_id: &[u8], label: &str, len: usize) -> Result<Vec<u8>> {
        let inner = self.inner.lock().await;
        group(&inner, group_id)?
            .export_secret(self.provider.crypto(), label, b"", len)
            .map_err(mls)
    }

    /// Create a group (registered with the DS); returns its id.
    pub async fn create_group(&self, open: bool) -> Result<Vec<u8>> {
        let mut inner = self.inner.lock().await;
        let LocalGroup {
            group,
            group_id,
            group_info,
            ratchet_tree,
        } = self.create_local_group(open)?;
        if let Err(e) = self.api.create_group(group_info, ratchet_tree, open).await {
            // Not on the DS: forget it locally as well.
            self.forget_local_group(group, &group_id)?;
            return Err(e);
        }
        inner.groups.insert(group_id.clone(), group);
        Ok(group_id)
    }

    /// A new group and its record, stored in one write.
    fn create_local_group(&self, open: bool) -> Result<LocalGroup> {
        let tx = self.provider.begin();
        let group = MlsGroup::new(
            &*tx,
            &self.signer,
            &create_config(),
            self.credential.clone(),
        )
        .map_err(mls)?;
        let group_id = group.group_id().as_slice().to_vec();
        let group_info = wire(
            &group
                .export_group_info(self.provider.crypto(), &self.signer, false)
                .map_err(mls)?,
        )?;
        let ratchet_tree = wire(&group.export_ratchet_tree())?;
        tx.storage().put_record(
            self.records,
            &records::group_key(&group_id),
            &GroupMeta { open },
        )?;
        tx.commit()?;
        Ok(LocalGroup {
            group,
            group_id,
            group_info,
            ratchet_tree,
        })
    }

    /// Delete a group that the DS did not register, with its record, in one
    /// write.
    fn forget_local_group(&self, mut group: MlsGroup, group_id: &[u8]) -> Result<()> {
        let tx = self.provider.begin();
        group.delete(tx.storage())?;
        tx.storage()
            .remove_raw(self.records, &records::group_key(group_id))?;
        tx.commit()?;
        Ok(())
    }

    /// Add clients to a group: claim a key package of each, commit, welcome.
    pub async fn invite(&self, group_id: &[u8], clients: &[&str]) -> Result<u64> {
        let kps = self.claim_key_packages(clients).await?;
        self.commit_with_retry(group_id, |g, p, signer| {
            stage_commit(
                g.commit_builder().propose_adds(kps.iter().cloned()),
                p,
                signer,
            )
        })
        .await
    }

    /// One validated key package of each client, claimed from the DS.
    async fn claim_key_packages(&self, clients: &[&str]) -> Result<Vec<KeyPackage>> {
        let mut kps = Vec::with_capacity(clients.len());
        for c in clients {
            let id = ClientId::new(c).map_err(|e| ClientError::Usage(e.to_string()))?;
            let claimed = self.api.claim_key_package(&id).await?;
            let msg = MlsMessageIn::tls_deserialize_exact(claimed.key_package.as_slice())
                .map_err(malformed)?;
            let MlsMessageBodyIn::KeyPackage(kp_in) = msg.extract() else {
                return Err(ClientError::BadResponse(
                    "claimed object is not a key package".into(),
                ));
            };
            kps.push(
                kp_in
                    .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                    .map_err(mls)?,
            );
        }
        Ok(kps)
    }

    /// Remove a member (by client id) from a group: every leaf with its id
    /// (a client that took its id back after losing its store may still
    /// have a stale one beside its own).
    pub async fn remove(&self, group_id: &[u8], client: &str) -> Result<u64> {
        self.commit_with_retry(group_id, |g, p, signer| {
            let leaves: Vec<LeafNodeIndex> = g
                .members()
                .filter(|m| member_id(m) == client)
                .map(|m| m.index)
                .collect();
            if leaves.is_empty() {
                return Err(ClientError::NoSuchMember {
                    group_id: group_id.to_vec(),
                    client: client.to_owned(),
                });
            }
            stage_commit(g.commit_builder().propose_removals(leaves), p, signer)
        })
        .await
    }

    /// Update this client's leaf (fresh keys: post-compromise security).
    pub async fn self_update(&self, group_id: &[u8]) -> Result<u64> {
        self.commit_with_retry(group_id, |g, p, signer| {
            stage_commit(g.commit_builder().force_self_update(true), p, signer)
        })
        .await
    }

    /// Commit every pending proposal (e.g. a member's request to leave).
    pub(super) async fn commit_pending_proposals(&self, group_id: &[u8]) -> Result<u64> {
        self.commit_with_retry(group_id, |g, p, signer| {
            stage_commit(g.commit_builder(), p, signer)
        })
        .await
    }

    /// Delete a group of which this client is the last member: on the DS
    /// (which refuses while others are in it, 403), then here. After a
    /// crash in between, calling it again finds the group gone on the DS
    /// and finishes here.
    pub async fn delete_group(&self, group_id: &[u8]) -> Result<()> {
        let mut inner = self.inner.lock().await;
        group_mut(&mut inner, group_id)?;
        match self.api.delete_group(group_id).await {
            Ok(()) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e),
        }
        let tx = self.provider.begin();
        self.forget_removed_group(&mut inner, &tx, group_id)?;
        tx.commit()?;
        Ok(())
    }

    /// Ask to leave: sends a self-remove proposal; the next commit by any
    /// member removes this client (the SDK of other members commits pending
    /// proposals in [`Client::sync`]).
    pub async fn leave(&self, group_id: &[u8]) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let g = group_mut(&mut inner, group_id)?;
        let tx = self.provider.begin();
        let msg = g.leave_group(&*tx, &self.signer).map_err(mls)?;
        tx.commit()?;
        self.api.send_message(group_id, wire(&msg)?).await?;
        Ok(())
    }

    /// Join a group by external commit from the DS's GroupInfo. Also the way
    /// back in after losing local state: the old leaf of this client is
    /// replaced.
    pub async fn join_external(&self, group_id: &[u8]) -> Result<u64> {
        for _ in 0..=self.config.max_commit_retries {
            self.resolve_outboxes().await?;
            let published = self.published_group(group_id).await?;
            let outbox = self
                .stage_external_join(group_id, published.group_info, published.ratchet_tree)
                .await?;
            match self.resolve_one(group_id, &outbox).await? {
                Some(epoch) => return Ok(epoch),
                None => continue,
            }
        }
        Err(ClientError::CommitRetriesExhausted(
            self.config.max_commit_retries,
        ))
    }

    /// The group's latest GroupInfo and ratchet tree, from the DS.
    async fn published_group(&self, group_id: &[u8]) -> Result<PublishedGroup> {
        let info = self.api.group_info(group_id).await?;
        let group_info = match MlsMessageIn::tls_deserialize_exact(info.group_info.as_slice())
            .map_err(malformed)?
            .extract()
        {
            MlsMessageBodyIn::GroupInfo(gi) => gi,
            _ => return Err(ClientError::BadResponse("not a GroupInfo".into())),
        };
        let ratchet_tree = RatchetTreeIn::tls_deserialize_exact(info.ratchet_tree.as_slice())
            .map_err(malformed)?;
        Ok(PublishedGroup {
            group_info,
            ratchet_tree,
        })
    }
}
