//! `mls-ds migrate`: a snapshot of another backend's state written into an
//! empty database in one transaction, so that a failed migration leaves the
//! database empty. Queues keep their sequence numbers and marks; a message
//! queued for several clients is stored once (the snapshot's entries carry
//! copies, told apart by content); a remembered send keeps the answer it
//! was given.

use std::collections::HashMap;

use mls_ds_protocol::ClientId;
use sha2::{Digest, Sha256};

use super::changes::stage;
use super::deliveries::{insert_message, insert_receipt};
use super::rows::big;
use super::writes::{exec, query_one, transact, Step, Written};
use super::{Inner, PgBackend};
use crate::backend::records::{
    ClientRecord, ClientUsage, CommitRecord, GroupId, GroupRecord, GroupState, KeyPackageRecord,
    SendKey, SendReceipt, StoredMessage,
};
use crate::backend::write_set::Change;
use crate::backend::{Page, StoreError, StoredInvite};

/// Everything a DS stores, read from one backend.
pub(crate) struct Snapshot {
    /// Every client with what it owns.
    pub(crate) clients: Vec<ClientSnapshot>,
    /// Every group with its state and commit records.
    pub(crate) groups: Vec<GroupSnapshot>,
    /// Invitation codes.
    pub(crate) invites: Vec<StoredInvite>,
    /// Who published each claimed key package.
    pub(crate) key_package_owners: Vec<(Vec<u8>, ClientId)>,
    /// Remembered sends.
    pub(crate) receipts: Vec<(SendKey, SendReceipt)>,
}

/// One client.
pub(crate) struct ClientSnapshot {
    pub(crate) id: ClientId,
    pub(crate) record: ClientRecord,
    pub(crate) key_packages: Vec<KeyPackageRecord>,
    pub(crate) last_resort: Option<KeyPackageRecord>,
    pub(crate) usage: ClientUsage,
    /// Its whole queue: every unacknowledged entry, the head and the mark.
    pub(crate) queue: Page,
}

/// One group.
pub(crate) struct GroupSnapshot {
    pub(crate) id: GroupId,
    pub(crate) record: GroupRecord,
    pub(crate) state: Option<GroupState>,
    /// Accepted commits by the epoch they were for.
    pub(crate) commits: Vec<(u64, CommitRecord)>,
}

/// What an import wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Imported {
    pub(crate) clients: usize,
    pub(crate) groups: usize,
    pub(crate) messages: usize,
    pub(crate) entries: usize,
}

/// A message's identity for storing it once: its content.
fn content_key(m: &StoredMessage) -> Result<[u8; 32], StoreError> {
    let bytes = bincode::encode_to_vec(m, bincode::config::standard())
        .map_err(|e| StoreError::Corrupt(format!("message does not encode: {e}")))?;
    Ok(Sha256::digest(bytes).into())
}

impl PgBackend {
    /// Write `snapshot` into this (empty) database.
    pub(crate) async fn import(&self, snapshot: &Snapshot) -> Result<Imported, StoreError> {
        Ok(self.inner.import(snapshot).await?.value)
    }
}

impl Inner {
    async fn import(&self, snap: &Snapshot) -> Result<Written<Imported>, StoreError> {
        transact!(self, |tx| {
            let occupied: bool = query_one(
                tx,
                "SELECT EXISTS (SELECT 1 FROM clients) OR EXISTS (SELECT 1 FROM groups)",
                &[],
            )
            .await?
            .try_get(0)?;
            if occupied {
                return Err(Step::Store(StoreError::Layout(
                    "the database already holds a DS's state; migrate only into an empty one"
                        .into(),
                )));
            }
            let mut imported = Imported::default();
            let mut changes = Vec::new();
            for c in &snap.clients {
                changes.push(Change::PutClient {
                    id: c.id.clone(),
                    record: c.record.clone(),
                });
                for kp in &c.key_packages {
                    changes.push(Change::PutKeyPackage {
                        owner: c.id.clone(),
                        record: kp.clone(),
                    });
                }
                if let Some(kp) = &c.last_resort {
                    changes.push(Change::PutLastResort {
                        owner: c.id.clone(),
                        record: kp.clone(),
                    });
                }
                if c.usage != ClientUsage::default() {
                    changes.push(Change::PutUsage {
                        client: c.id.clone(),
                        usage: c.usage,
                    });
                }
            }
            for g in &snap.groups {
                changes.push(Change::PutGroup {
                    id: g.id.clone(),
                    record: g.record.clone(),
                });
                if let Some(state) = &g.state {
                    changes.push(Change::PutGroupState {
                        id: g.id.clone(),
                        state: state.clone(),
                    });
                }
                for (epoch, record) in &g.commits {
                    changes.push(Change::PutCommit {
                        group: g.id.clone(),
                        epoch: *epoch,
                        record: record.clone(),
                    });
                }
            }
            for i in &snap.invites {
                changes.push(Change::PutInvite {
                    code: i.code.clone(),
                    record: i.record.clone(),
                });
            }
            for (kp_ref, owner) in &snap.key_package_owners {
                changes.push(Change::PutKeyPackageOwner {
                    kp_ref: kp_ref.clone(),
                    owner: owner.clone(),
                });
            }
            for change in &changes {
                stage(tx, change).await?;
            }
            // Queues: each message once, then every entry.
            let mut ids: HashMap<[u8; 32], i64> = HashMap::new();
            for c in &snap.clients {
                exec(
                    tx,
                    "UPDATE queues SET head = $2, acked = $3, closed = $4 WHERE client = $1",
                    &[
                        &c.id.as_bytes(),
                        &big(c.queue.head),
                        &big(c.queue.acked),
                        &c.record.is_deleted(),
                    ],
                )
                .await?;
                let (mut seqs, mut messages) = (Vec::new(), Vec::new());
                for e in &c.queue.entries {
                    let key = content_key(&e.stored)?;
                    let id = match ids.get(&key) {
                        Some(id) => *id,
                        None => {
                            let id = insert_message(tx, &e.stored).await?;
                            ids.insert(key, id);
                            id
                        }
                    };
                    seqs.push(big(e.seq));
                    messages.push(id);
                }
                exec(
                    tx,
                    "INSERT INTO queue_entries (client, seq, message_id) \
                     SELECT $1, s, m FROM unnest($2::bigint[], $3::bigint[]) AS t(s, m)",
                    &[&c.id.as_bytes(), &seqs, &messages],
                )
                .await?;
                imported.entries += seqs.len();
            }
            for (key, receipt) in &snap.receipts {
                // The receipt is the answer a retry gets: kept as it was
                // given, message id included.
                insert_receipt(tx, key, big(receipt.message_id), receipt.recipients).await?;
            }
            imported.clients = snap.clients.len();
            imported.groups = snap.groups.len();
            imported.messages = ids.len();
            Ok(Written::answer(imported))
        })
    }
}
