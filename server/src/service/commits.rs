//! Commit ordering: for each epoch of a group exactly one commit is
//! accepted, the first valid one. It is validated against the DS's own
//! `PublicGroup`, merged, and written together with its fan-out and Welcome
//! as one write set, conditional on the group's revision it was validated
//! against (so that no other process can have accepted a commit meanwhile).
//! Later commits for that epoch get 409 naming the current epoch, except an
//! exact retry of the accepted one, which gets the original success.

use mls_ds_protocol::groups::{CommitAccepted, CommitBundle};
use mls_ds_protocol::queue::EntryKind;
use mls_ds_protocol::ClientId;
use openmls::ciphersuite::signable::Verifiable;
use openmls::ciphersuite::signature::OpenMlsSignaturePublicKey;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    ContentType, LeafNodeIndex, Member, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent,
    ProtocolMessage, PublicGroup, Sender, StagedCommit,
};
use sha2::{Digest, Sha256};

use super::auth::Caller;
use super::error::{DsError, Result};
use super::groups::{is_member, KeptLeaf, Roster};
use super::loaded_groups::{Kept, Version};
use super::mls::{self, LoadedGroup};
use super::Ds;
use crate::backend::records::{
    now_ms, CommitRecord, GroupId, GroupRecord, GroupState, StoredMessage,
};
use crate::backend::write_set::{Change, Condition, Delivery, WriteSet};
use crate::backend::{Backend, StoreError};

/// A commit as submitted, parsed.
struct Submitted {
    message: ProtocolMessage,
    /// The epoch the commit is for.
    epoch: u64,
    /// SHA-256 of the commit message (what a retry is recognised by).
    hash: [u8; 32],
    bundle: CommitBundle,
}

/// What an accepted commit writes.
struct CommitWrite {
    set: WriteSet,
    /// Queue entries the commit and its Welcome make.
    recipients: u32,
    /// The new epoch's ratchet tree, if it was encoded for a Welcome.
    tree: Option<Vec<u8>>,
}

/// A commit that validated and was merged into the loaded `PublicGroup`.
struct Merged {
    /// A new member joining by external commit.
    external: bool,
    /// Owners of the key packages the commit adds, in the Welcome's order.
    welcome_to: Vec<ClientId>,
    /// The members after the commit.
    roster: Roster,
    new_epoch: u64,
}

impl<B: Backend> Ds<B> {
    /// `POST /v1/groups/{id}/commits`.
    pub(crate) async fn commit(
        &self,
        caller: &Caller,
        id: &GroupId,
        bundle: CommitBundle,
    ) -> Result<CommitAccepted> {
        let submitted = parse_commit(id, bundle)?;
        // 404 before a lock is created for an unknown group.
        self.group_record(id).await?;
        let guard = self.backend.lock_group(id).await;
        let record = self.group_record(id).await?;
        if let Some(accepted) = self.earlier_commit(caller, id, &record, &submitted).await? {
            return Ok(accepted);
        }
        if submitted.epoch != record.epoch {
            return Err(DsError::WrongEpoch {
                current: record.epoch,
                reason: format!("commit is for epoch {}", submitted.epoch),
            });
        }
        // The tree of the epoch before is of no use any more.
        let mut group = match self.load_group(id, &record).await {
            Ok(kept) => kept.group,
            // Another node accepted a handshake after the record was read:
            // this may be an exact retry of it.
            Err(DsError::WrongEpoch { .. }) => return self.overtaken(caller, id, &submitted).await,
            Err(e) => return Err(e),
        };
        let merged = self
            .validate_and_merge(caller, &record, &mut group, &submitted)
            .await?;
        let write = self
            .commit_write_set(caller, id, &record, &submitted, &merged, &group)
            .await?;
        match self.backend.submit(write.set).wait_holding(guard).await {
            Ok(_) => {
                group.group_info = submitted.bundle.group_info.as_slice().to_vec();
                let kept = Kept {
                    group,
                    tree: write.tree,
                };
                let bytes = kept.bytes();
                self.loaded.put(id, Version::next(&record), kept, bytes);
            }
            Err(StoreError::ConditionFailed(Condition::GroupAt { .. })) => {
                // Another process accepted a handshake first.
                return self.overtaken(caller, id, &submitted).await;
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(group = %id, epoch = merged.new_epoch, committer = %caller.client, external = merged.external, "accepted commit");
        Ok(CommitAccepted {
            epoch: merged.new_epoch,
            recipients: write.recipients,
        })
    }

    /// The answer for a commit another handshake of the group overtook:
    /// the original success for an exact retry of an accepted commit, 409
    /// otherwise.
    async fn overtaken(
        &self,
        caller: &Caller,
        id: &GroupId,
        submitted: &Submitted,
    ) -> Result<CommitAccepted> {
        let record = self.group_record(id).await?;
        match self.earlier_commit(caller, id, &record, submitted).await? {
            Some(accepted) => Ok(accepted),
            None => Err(DsError::overtaken(record.epoch)),
        }
    }

    /// The answer for a commit whose epoch already has an accepted commit:
    /// the original success for an exact retry (once the original write is
    /// durable: its first answer may have been lost), 409 otherwise.
    /// `None` if the epoch has no accepted commit.
    async fn earlier_commit(
        &self,
        caller: &Caller,
        id: &GroupId,
        record: &GroupRecord,
        submitted: &Submitted,
    ) -> Result<Option<CommitAccepted>> {
        let Some(accepted) = self.backend.commit(id, submitted.epoch).await? else {
            return Ok(None);
        };
        if accepted.commit_hash == submitted.hash && accepted.committer == caller.client.as_bytes()
        {
            self.backend.settled().wait().await?;
            return Ok(Some(CommitAccepted {
                epoch: accepted.new_epoch,
                recipients: accepted.recipients,
            }));
        }
        Err(DsError::WrongEpoch {
            current: record.epoch,
            reason: format!(
                "another commit was already accepted for epoch {}",
                submitted.epoch
            ),
        })
    }

    /// Validate the commit against the group, check its Welcome and
    /// GroupInfo, and merge it into `group` (in memory).
    async fn validate_and_merge(
        &self,
        caller: &Caller,
        record: &GroupRecord,
        group: &mut LoadedGroup,
        submitted: &Submitted,
    ) -> Result<Merged> {
        let processed = group
            .public
            .process_message(&self.crypto, submitted.message.clone())
            .map_err(|e| DsError::Invalid(format!("invalid commit: {e}")))?;
        let sender = mls::credential_client(processed.credential())?;
        if sender != caller.client {
            return Err(DsError::Forbidden(format!(
                "commit is signed by {sender}, not by the authenticated client"
            )));
        }
        let external = matches!(processed.sender(), Sender::NewMemberCommit);
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(DsError::Invalid("not a commit".into()));
        };
        // The committer's key, as registered (after a recovery, a key its
        // old leaves do not have).
        let committer = self.require_client(&caller.client).await?;
        if external && !record.open {
            check_resync(
                caller,
                &committer.signature_key,
                record,
                &group.public,
                &staged,
            )?;
        }
        let welcome_to = self.welcome_routes(&staged, &submitted.bundle).await?;
        // The GroupInfo is what joiners will trust: it must carry the
        // committer's signature (checked here) and describe the new epoch
        // (checked after the merge), or later external joins would fail on a
        // corrupt copy.
        let committer_key = OpenMlsSignaturePublicKey::new(
            committer.signature_key.into(),
            group.public.ciphersuite().signature_algorithm(),
        )
        .map_err(|e| DsError::Invalid(format!("committer key unusable: {e:?}")))?;
        let group_info = mls::parse_group_info(submitted.bundle.group_info.as_slice())?
            .verify(&self.crypto, &committer_key)
            .map_err(|_| DsError::Invalid("the GroupInfo is not signed by the committer".into()))?;
        let before = KeptLeaf::all(&group.public);
        group
            .public
            .merge_commit(&group.store, *staged)
            .map_err(|e| DsError::Internal(format!("merge commit: {e}")))?;
        if group_info.group_context() != group.public.group_context() {
            return Err(DsError::Invalid(
                "the GroupInfo does not describe the epoch this commit creates".into(),
            ));
        }
        let roster = self.roster(&group.public, &before).await?;
        self.check_group_size(roster.members.len())?;
        Ok(Merged {
            external,
            welcome_to,
            roster,
            new_epoch: group.public.group_context().epoch().as_u64(),
        })
    }

    /// Every member the commit adds must be welcomed, and the Welcome is
    /// routed by the key package references recorded at claim time.
    async fn welcome_routes(
        &self,
        staged: &StagedCommit,
        bundle: &CommitBundle,
    ) -> Result<Vec<ClientId>> {
        let mut added = Vec::new();
        for add in staged.add_proposals() {
            let kp_ref = add
                .add_proposal()
                .key_package()
                .hash_ref(&self.crypto)
                .map_err(|e| DsError::Internal(format!("hash reference: {e}")))?;
            added.push(kp_ref.as_slice().to_vec());
        }
        let welcome = match (&bundle.welcome, added.is_empty()) {
            (None, true) => return Ok(Vec::new()),
            (None, false) => {
                return Err(DsError::Invalid(
                    "the commit adds members but the bundle has no Welcome".into(),
                ))
            }
            (Some(_), true) => {
                return Err(DsError::Invalid(
                    "the bundle has a Welcome but the commit adds nobody".into(),
                ))
            }
            (Some(w), false) => w,
        };
        let msg = MlsMessageIn::tls_deserialize_exact(welcome.as_slice())
            .map_err(|e| DsError::Invalid(format!("malformed Welcome: {e}")))?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(DsError::Invalid("Welcome field holds no Welcome".into()));
        };
        let in_welcome: Vec<Vec<u8>> = welcome
            .secrets()
            .iter()
            .map(|s| s.new_member().as_slice().to_vec())
            .collect();
        let mut owners = Vec::with_capacity(added.len());
        for r in &added {
            if !in_welcome.contains(r) {
                return Err(DsError::Invalid(format!(
                    "the Welcome has no secrets for added key package {}",
                    hex::encode(r)
                )));
            }
            let owner = self.backend.key_package_owner(r).await?.ok_or_else(|| {
                DsError::Invalid(format!(
                    "added key package {} was not claimed from this DS",
                    hex::encode(r)
                ))
            })?;
            owners.push(owner);
        }
        Ok(owners)
    }

    /// The write set of an accepted commit: the new group record and state,
    /// the commit record, the commit for every old member but the committer
    /// and the Welcome for the new ones.
    async fn commit_write_set(
        &self,
        caller: &Caller,
        id: &GroupId,
        record: &GroupRecord,
        submitted: &Submitted,
        merged: &Merged,
        group: &LoadedGroup,
    ) -> Result<CommitWrite> {
        let mut commit_to = Vec::with_capacity(record.members.len());
        let mut sender_at = None;
        let mut skipped = false;
        for (at, m) in record.members.iter().enumerate() {
            let m = ClientId::new(m)?;
            if m == caller.client {
                sender_at = sender_at.or(u32::try_from(at).ok());
                continue;
            }
            // Clients that deleted themselves get nothing (counted as such);
            // only members the commit removed are not in the roster.
            let deleted = match merged.roster.deleted.get(&m) {
                Some(&deleted) => deleted,
                None => self
                    .backend
                    .client(&m)
                    .await?
                    .is_none_or(|r| r.is_deleted()),
            };
            if deleted {
                skipped = true;
            } else {
                commit_to.push(m);
            }
        }
        // Every member but the committer, in the record's order: the
        // backend may store the fan-out as the epoch's roster, which the
        // epoch's messages share.
        let sender_at = sender_at.filter(|_| !skipped);
        let recipients = u32::try_from(commit_to.len() + merged.welcome_to.len())
            .map_err(|_| DsError::Internal("too many recipients".into()))?;
        let now = now_ms();
        let stored = |kind: EntryKind, epoch: u64, message: &[u8]| StoredMessage {
            kind: kind as u8,
            group_id: id.as_bytes().to_vec(),
            epoch,
            sender: caller.client.as_bytes().to_vec(),
            message: message.to_vec(),
            stored_ms: now,
            send: None,
            ratchet_tree: Vec::new(),
        };
        let bundle = &submitted.bundle;
        let mut tree = None;
        let mut deliveries = vec![Delivery {
            message: stored(EntryKind::Commit, submitted.epoch, bundle.commit.as_slice()),
            recipients: commit_to,
            sender_at,
            receipt: None,
        }];
        if let Some(w) = &bundle.welcome {
            // Joiners get the tree from the DS, with the Welcome: the
            // committer need not send it (twice, in the Welcome and the
            // GroupInfo), and a group can grow past what one request carries.
            let encoded = mls::encode_tree(&group.public)?;
            tree = Some(encoded.clone());
            deliveries.push(Delivery {
                message: StoredMessage {
                    ratchet_tree: encoded,
                    ..stored(EntryKind::Welcome, merged.new_epoch, w.as_slice())
                },
                recipients: merged.welcome_to.clone(),
                sender_at: None,
                receipt: None,
            });
        }
        let new_record = GroupRecord {
            epoch: merged.new_epoch,
            revision: record.revision + 1,
            open: record.open,
            members: merged
                .roster
                .members
                .iter()
                .map(|m| m.as_bytes().to_vec())
                .collect(),
            creator: record.creator.clone(),
            created_ms: record.created_ms,
        };
        let set = WriteSet {
            conditions: vec![Condition::GroupAt {
                group: id.clone(),
                revision: record.revision,
            }],
            changes: vec![
                Change::PutGroup {
                    id: id.clone(),
                    record: new_record,
                },
                Change::PutGroupState {
                    id: id.clone(),
                    state: GroupState {
                        group_info: bundle.group_info.as_slice().to_vec(),
                        public_group: group.store.entities(),
                    },
                },
                Change::PutCommit {
                    group: id.clone(),
                    epoch: submitted.epoch,
                    record: CommitRecord {
                        commit_hash: submitted.hash,
                        committer: caller.client.as_bytes().to_vec(),
                        new_epoch: merged.new_epoch,
                        recipients,
                        accepted_ms: now,
                    },
                },
            ],
            deliveries,
        };
        Ok(CommitWrite {
            set,
            recipients,
            tree,
        })
    }
}

/// The rule for external commits into a closed group: only a current
/// member may send one, and only to resync, i.e. it removes the member's own
/// old leaf (and no other). A removed member needs a new invitation.
///
/// One exception: a member that took its id back with a new key after
/// losing its store (`client_recovery`) joins beside its stale leaves
/// without removing them (OpenMLS's external commit removes only a leaf with
/// the joiner's own key, which they do not have); its first commit as a
/// member then removes them.
fn check_resync(
    caller: &Caller,
    registered_key: &[u8],
    record: &GroupRecord,
    group: &PublicGroup,
    staged: &StagedCommit,
) -> Result<()> {
    if !is_member(record, &caller.client) {
        return Err(DsError::Forbidden(
            "external commits into a closed group are only accepted from its current members, \
             to resync; a removed member needs a new invitation"
                .into(),
        ));
    }
    let own: Vec<Member> = group
        .members()
        .filter(|m| mls::credential_client(&m.credential).is_ok_and(|c| c == caller.client))
        .collect();
    let own_leaves: Vec<LeafNodeIndex> = own.iter().map(|m| m.index).collect();
    let removed: Vec<LeafNodeIndex> = staged
        .remove_proposals()
        .map(|r| r.remove_proposal().removed())
        .collect();
    let recovered = !own.is_empty() && own.iter().all(|m| m.signature_key != registered_key);
    if recovered && removed.is_empty() {
        return Ok(());
    }
    if removed.is_empty() || removed.iter().any(|leaf| !own_leaves.contains(leaf)) {
        return Err(DsError::Forbidden(
            "an external commit into a closed group must resync: remove the sender's own old \
             leaf and no other"
                .into(),
        ));
    }
    Ok(())
}

/// Parse a commit bundle: the commit must be a `PublicMessage` commit of
/// `id`.
fn parse_commit(id: &GroupId, bundle: CommitBundle) -> Result<Submitted> {
    let message = mls::parse_public(bundle.commit.as_slice(), id, "commit")?;
    if message.content_type() != ContentType::Commit {
        return Err(DsError::Invalid(
            "not a commit; proposals and application messages go to /messages".into(),
        ));
    }
    Ok(Submitted {
        epoch: message.epoch().as_u64(),
        hash: Sha256::digest(bundle.commit.as_slice()).into(),
        message,
        bundle,
    })
}
