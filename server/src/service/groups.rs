//! Groups: creation from a GroupInfo and ratchet tree (the DS builds its own
//! `PublicGroup`), the roster that decides recipients, and the GroupInfo
//! given to joiners and resyncing members.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use mls_ds_protocol::groups::{CreateGroup, GroupCreated, GroupInfoResponse};
use mls_ds_protocol::queue::EntryKind;
use mls_ds_protocol::ClientId;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, GroupId as MlsGroupId, LeafNodeIndex, Member, ProposalStore, PublicGroup,
    RatchetTreeIn,
};

use super::auth::Caller;
use super::error::{DsError, Result};
use super::loaded_groups::{Kept, Version};
use super::{mls, Ds};
use crate::backend::public_group::PublicGroupStore;
use crate::backend::records::{
    now_ms, ClientUsage, GroupId, GroupRecord, GroupState, StoredMessage,
};
use crate::backend::write_set::{Change, Condition, Delivery, WriteSet};
use crate::backend::{Backend, StoreError};

/// A leaf as it was before a commit (see [`Ds::roster`]): all of it, so
/// that a leaf put in its place (a removal and an add that reuses the index
/// and an old key, with another credential) is not taken for it.
pub(crate) struct KeptLeaf(Member);

impl KeptLeaf {
    /// Every leaf of `group`, as it is now.
    pub(crate) fn all(group: &PublicGroup) -> Vec<KeptLeaf> {
        group.members().map(KeptLeaf).collect()
    }

    fn is(&self, m: &Member) -> bool {
        let k = &self.0;
        k.index == m.index
            && k.signature_key == m.signature_key
            && k.encryption_key == m.encryption_key
            && k.credential == m.credential
    }
}

/// A group's members as [`Ds::roster`] checked them.
pub(crate) struct Roster {
    /// One client id per member, in leaf order.
    pub(crate) members: Vec<ClientId>,
    /// Whether each member's client deleted itself (read for the check
    /// anyway, so that a commit's fan-out need not read it again).
    pub(crate) deleted: HashMap<ClientId, bool>,
}

/// Whether `client` is a current member of the group.
pub(crate) fn is_member(record: &GroupRecord, client: &ClientId) -> bool {
    record.members.iter().any(|m| m == client.as_bytes())
}

/// May `client` see the group's GroupInfo (to join an open group, or to
/// resync as a current member)? A removed member may not: it needs a new
/// invitation.
pub(crate) fn may_read_info(record: &GroupRecord, client: &ClientId) -> bool {
    record.open || is_member(record, client)
}

impl<B: Backend> Ds<B> {
    /// 507 if a group of `members` members is over the quota.
    pub(crate) fn check_group_size(&self, members: usize) -> Result<()> {
        let quota = self.policy.max_group_members;
        if members > quota {
            return Err(DsError::QuotaExceeded(format!(
                "a group may have at most {quota} members; this one would have {members}"
            )));
        }
        Ok(())
    }

    /// A group's record; 404 if there is none.
    pub(crate) async fn group_record(&self, id: &GroupId) -> Result<Arc<GroupRecord>> {
        self.backend
            .group(id)
            .await?
            .ok_or_else(|| DsError::NotFound(format!("unknown group {id}")))
    }

    /// A group's `PublicGroup` and GroupInfo as `record` describes them,
    /// kept from an earlier request or loaded from storage; under the
    /// group's lock, so that what storage holds is of `record`'s version.
    ///
    /// Several nodes on one database hold one lock each: another node's
    /// handshake can land between the reads of the record and of the
    /// state. A state of another epoch than `record`'s is then answered
    /// `WrongEpoch` (409, with the state's epoch), not validated against:
    /// the handshake would be refused as invalid (400) for having lost a
    /// race.
    pub(crate) async fn load_group(&self, id: &GroupId, record: &GroupRecord) -> Result<Kept> {
        if let Some(kept) = self.loaded.take(id, Version::of(record)) {
            return Ok(kept);
        }
        let group = self.stored_group(id).await?;
        let stored_epoch = group.public.group_context().epoch().as_u64();
        if stored_epoch != record.epoch {
            return Err(DsError::overtaken(stored_epoch));
        }
        Ok(Kept { group, tree: None })
    }

    /// A group's `PublicGroup` and GroupInfo, loaded from storage.
    async fn stored_group(&self, id: &GroupId) -> Result<mls::LoadedGroup> {
        let state = self
            .backend
            .group_state(id)
            .await?
            .ok_or_else(|| DsError::Internal(format!("group {id} has no stored state")))?;
        mls::load_group(id, state)
    }

    /// The group's members as client ids, checking every leaf: a basic
    /// credential naming a registered client, with the key that client
    /// registered, one leaf per client. The one exception is a *stale* leaf,
    /// left by a client that took its id back with a new key after losing
    /// its store (`client_recovery`): its old key no longer matches, and it
    /// stays allowed only as it was, i.e. if `kept` (the leaves before the
    /// commit being checked) has it unchanged (index, keys and credential),
    /// until the client's new leaf removes it. It counts as the same member.
    pub(crate) async fn roster(&self, group: &PublicGroup, kept: &[KeptLeaf]) -> Result<Roster> {
        let mut out = Vec::new();
        // Sets beside the list: a group of thousands of leaves must not cost
        // a comparison per pair of them.
        let mut deleted: HashMap<ClientId, bool> = HashMap::new();
        let mut fresh: HashSet<ClientId> = HashSet::new();
        let kept: HashMap<LeafNodeIndex, &KeptLeaf> = kept.iter().map(|k| (k.0.index, k)).collect();
        for m in group.members() {
            let identity = BasicCredential::try_from(m.credential.clone()).map_err(|_| {
                DsError::Invalid(format!("leaf {}: credential must be basic", m.index))
            })?;
            let id = ClientId::new(identity.identity()).map_err(|e| {
                DsError::Invalid(format!(
                    "leaf {}: identity is not a client id: {e}",
                    m.index
                ))
            })?;
            let record = self.backend.client(&id).await?.ok_or_else(|| {
                DsError::Invalid(format!("leaf {}: {id} is not a registered client", m.index))
            })?;
            if record.signature_key == m.signature_key {
                if !fresh.insert(id.clone()) {
                    return Err(DsError::Invalid(format!(
                        "leaf {}: {id} holds two leaves",
                        m.index
                    )));
                }
            } else if !kept.get(&m.index).is_some_and(|k| k.is(&m)) {
                return Err(DsError::Forbidden(format!(
                    "leaf {}: signature key is not the one {id} registered",
                    m.index
                )));
            }
            if deleted.insert(id.clone(), record.is_deleted()).is_none() {
                out.push(id);
            }
        }
        Ok(Roster {
            members: out,
            deleted,
        })
    }

    /// `POST /v1/groups`: the caller must be a member of the group it creates.
    pub(crate) async fn create_group(
        &self,
        caller: &Caller,
        req: CreateGroup,
    ) -> Result<GroupCreated> {
        let group_info = mls::parse_group_info(req.group_info.as_slice())?;
        let ratchet_tree = RatchetTreeIn::tls_deserialize_exact(req.ratchet_tree.as_slice())
            .map_err(|e| DsError::Invalid(format!("malformed ratchet tree: {e}")))?;
        let id = GroupId::new(group_info.group_id().as_slice())
            .map_err(|e| DsError::Invalid(e.to_string()))?;
        let mut guard = self.backend.lock_group(&id).await;
        if self.backend.group(&id).await?.is_some() {
            return Err(exists(&id));
        }
        let mls_id = MlsGroupId::from_slice(id.as_bytes());
        let store = PublicGroupStore::new(&mls_id, Default::default())
            .map_err(|e| DsError::Internal(e.to_string()))?;
        let (public_group, _) = PublicGroup::from_external(
            &self.crypto,
            &store,
            ratchet_tree,
            group_info,
            ProposalStore::new(),
        )
        .map_err(|e| DsError::Invalid(format!("invalid group: {e}")))?;
        let members = self.roster(&public_group, &[]).await?.members;
        if !members.contains(&caller.client) {
            return Err(DsError::Forbidden(
                "the creator must be a member of the group".into(),
            ));
        }
        self.check_group_size(members.len())?;
        let epoch = public_group.group_context().epoch().as_u64();
        let record = GroupRecord {
            epoch,
            revision: 0,
            open: req.open.0,
            members: members.iter().map(|m| m.as_bytes().to_vec()).collect(),
            creator: caller.client.as_bytes().to_vec(),
            created_ms: now_ms(),
        };
        let state = GroupState {
            group_info: req.group_info.as_slice().to_vec(),
            public_group: store.into_entities(),
        };
        let quota = self.policy.max_groups_per_client;
        loop {
            let usage = self.backend.usage(&caller.client).await?;
            if usage.groups_created >= quota {
                return Err(DsError::QuotaExceeded(format!(
                    "a client may have created at most {quota} groups that still exist"
                )));
            }
            let set = WriteSet {
                conditions: vec![
                    Condition::GroupAbsent(id.clone()),
                    // Counted exactly even when the client creates groups
                    // concurrently, or one of its groups is deleted.
                    Condition::UsageAt {
                        client: caller.client.clone(),
                        usage,
                    },
                ],
                changes: vec![
                    Change::PutUsage {
                        client: caller.client.clone(),
                        usage: ClientUsage {
                            groups_created: usage.groups_created.saturating_add(1),
                        },
                    },
                    Change::PutGroup {
                        id: id.clone(),
                        record: record.clone(),
                    },
                    Change::PutGroupState {
                        id: id.clone(),
                        state: state.clone(),
                    },
                ],
                deliveries: Vec::new(),
            };
            match self.backend.submit(set).wait_holding(guard).await {
                Ok(_) => break,
                Err(StoreError::ConditionFailed(Condition::GroupAbsent(_))) => {
                    return Err(exists(&id))
                }
                // The count moved under us: read it again, under the lock
                // again (nothing was written).
                Err(StoreError::ConditionFailed(Condition::UsageAt { .. })) => {
                    guard = self.backend.lock_group(&id).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.loaded.forget(&id);
        tracing::info!(group = %id, epoch, members = members.len(), "created group");
        Ok(GroupCreated {
            group_id: id.as_bytes().to_vec().into(),
            epoch,
        })
    }

    /// `GET /v1/groups/{id}/info`. The epoch, GroupInfo and ratchet tree all
    /// come from one stored state, so they belong to the same epoch.
    pub(crate) async fn group_info(
        &self,
        caller: &Caller,
        id: &GroupId,
    ) -> Result<GroupInfoResponse> {
        let record = self.group_record(id).await?;
        if !may_read_info(&record, &caller.client) {
            return Err(DsError::Forbidden(
                "only current members, or anyone for an open group, may read its GroupInfo".into(),
            ));
        }
        let version = Version::of(&record);
        let (group, tree, keep) = match self.loaded.take(id, version) {
            Some(Kept { group, tree }) => (group, tree, true),
            None => {
                // Without the group's lock, a state loaded from storage is
                // kept only if the record still names the version read
                // before it: a write set changes both at once.
                let group = self.stored_group(id).await?;
                let now = self.group_record(id).await?;
                (group, None, Version::of(&now) == version)
            }
        };
        let tree = match tree {
            Some(tree) => tree,
            None => mls::encode_tree(&group.public)?,
        };
        let response = GroupInfoResponse {
            epoch: group.public.group_context().epoch().as_u64(),
            group_info: group.group_info.clone().into(),
            ratchet_tree: tree.clone().into(),
        };
        if keep {
            let kept = Kept {
                group,
                tree: Some(tree),
            };
            let bytes = kept.bytes();
            self.loaded.put(id, version, kept, bytes);
        }
        Ok(response)
    }
}

/// Who deletes a group.
pub(crate) enum Deleter<'a> {
    /// The DS's operator: any group.
    Operator,
    /// A member: only a group where it is the last member left.
    Member(&'a Caller),
}

impl<B: Backend> Ds<B> {
    /// `DELETE /v1/groups/{id}` (a member: only as the last member left),
    /// and the operator's group deletion (any group). The group's record,
    /// state and commit records go; for the operator's, every member gets a
    /// `GroupDeleted` entry after everything queued for it of the group; the
    /// creator's group count goes down. Conditional on the revision read,
    /// so a handshake accepted meanwhile makes it look again.
    pub(crate) async fn delete_group(&self, id: &GroupId, by: Deleter<'_>) -> Result<()> {
        loop {
            self.group_record(id).await?;
            let guard = self.backend.lock_group(id).await;
            let record = self.group_record(id).await?;
            let corrupt = |e: mls_ds_protocol::DecodeError| {
                DsError::Internal(format!("group {id}'s stored record: {e}"))
            };
            let told: Vec<ClientId> = match by {
                Deleter::Operator => record
                    .members
                    .iter()
                    .map(ClientId::new)
                    .collect::<std::result::Result<_, _>>()
                    .map_err(corrupt)?,
                Deleter::Member(caller) => {
                    if !is_member(&record, &caller.client) || record.members.len() > 1 {
                        return Err(DsError::Forbidden(
                            "a member may delete a group only as its last member; the DS's \
                             operator may delete any group"
                                .into(),
                        ));
                    }
                    // The last member: nobody else to tell.
                    Vec::new()
                }
            };
            let creator = ClientId::new(&record.creator).map_err(corrupt)?;
            let usage = self.backend.usage(&creator).await?;
            let set = WriteSet {
                conditions: vec![
                    Condition::GroupAt {
                        group: id.clone(),
                        revision: record.revision,
                    },
                    Condition::UsageAt {
                        client: creator.clone(),
                        usage,
                    },
                ],
                changes: vec![
                    Change::DeleteGroup { id: id.clone() },
                    Change::PutUsage {
                        client: creator,
                        usage: ClientUsage {
                            groups_created: usage.groups_created.saturating_sub(1),
                        },
                    },
                ],
                deliveries: vec![Delivery {
                    message: StoredMessage {
                        kind: EntryKind::GroupDeleted as u8,
                        group_id: id.as_bytes().to_vec(),
                        epoch: record.epoch,
                        sender: Vec::new(),
                        message: Vec::new(),
                        stored_ms: now_ms(),
                        send: None,
                        ratchet_tree: Vec::new(),
                    },
                    recipients: told,
                    sender_at: None,
                    receipt: None,
                }],
            };
            match self.backend.submit(set).wait_holding(guard).await {
                Ok(_) => {
                    self.loaded.forget(id);
                    tracing::info!(group = %id, by_operator = matches!(by, Deleter::Operator), "deleted group");
                    return Ok(());
                }
                Err(StoreError::ConditionFailed(
                    Condition::GroupAt { .. } | Condition::UsageAt { .. },
                )) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn exists(id: &GroupId) -> DsError {
    DsError::Conflict(format!("group {id} exists"))
}
