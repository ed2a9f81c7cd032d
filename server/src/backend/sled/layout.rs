//! The sled backend's on-disk layout: its trees (record trees of the storage
//! crate, namespace `ds`, so that any of them can join one atomic write),
//! their keys, the envelope a queued message is stored in, and the layout
//! version that refuses data of other builds.
//! Over 500 lines because it is the one place that spells out every key and
//! stored value of the backend (with their bounds, as read back from disk):
//! split, a key's writer and its reader would each carry half of a format.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `app.ds.meta` | `layout_version` | u32 BE, [`LAYOUT_VERSION`] |
//! | `app.ds.clients` | client id | `ClientRecord` |
//! | `app.ds.key_packages` | `client_key ++ 'k' ++ kp_ref` / `client_key ++ 'l'` | `KeyPackageRecord` (ordinary / last resort) |
//! | `app.ds.kp_owners` | kp_ref | client id that published the claimed key package (Welcome routing) |
//! | `app.ds.groups` | group id | `GroupRecord` |
//! | `app.ds.group_states` | group id | `GroupState` (GroupInfo and `PublicGroup` entities) |
//! | `app.ds.commits` | `group_key ++ epoch u64 BE` | `CommitRecord` (one accepted commit per epoch) |
//! | `app.ds.invites` | invitation code | `InviteRecord` |
//! | `app.ds.usage` | client id | `ClientUsage` (per-client quota counters) |
//! | `app.ds.sends` | `'p' ++ batch u64 BE` / `'h'`, `'c'`, `'f' ++ run u64 BE [++ part u32 BE]` | send receipts (`receipts.rs`): the pending record of one batch's receipts / a frozen run's header, chunks and Bloom filter; an entry names its send by `send_key` |
//! | `app.ds.delivery` | `'b' ++ batch u64 BE` | a delivery batch (`batch.rs`): the [`Envelope`]s of the messages one write-path cycle accepted (each message stored once, with each recipient and its sequence number there), or of one write set that changes more than queues |
//! | | `'a' ++ client_key` | acknowledgement mark ([`Mark`]): the highest acknowledged sequence number and the id of the message there, u64 BE each |
//! | | `'r' ++ roster u64 BE` | a roster (`rosters.rs`): a group's members in its record's order, which the fan-outs of its big groups' messages reference instead of listing every recipient |
//! | `app.ds.checkpoint` | `'s'` / `'c' ++ generation u32 BE ++ chunk u32 BE` | the queue index's checkpoint (`checkpoint.rs`): its seal (`Seal`: generation, length and SHA-256) / its encoding in chunks of 64 KiB; written every `--index-checkpoint-every-ops` jobs and at a graceful stop, a new generation each time |
//!
//! `client_key` and `group_key` are `[len u8] ++ bytes`. Records are bincode
//! 2 behind a version byte (the storage crate's record codec).

use std::path::Path;

use mls_ds_protocol::ClientId;
use mls_ds_storage::codec::{decode_record, encode_record};
use mls_ds_storage::{Durability, RecordTree, SledStorage, Store, StoreConfig};

use crate::backend::error::StoreError;
use crate::backend::records::{ClientRecord, GroupId, SendKey, StoredMessage};

/// Version of this layout. Databases without it (written before layout
/// versions existed) or with another one are refused, never converted.
pub(crate) const LAYOUT_VERSION: u32 = 12;
const LAYOUT_KEY: &[u8] = b"layout_version";
/// Namespace of all DS data in the store.
const NAMESPACE: &[u8] = b"ds";

/// A record tree and its full name (for error messages).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tree {
    /// Full sled tree name.
    pub(crate) name: &'static str,
    pub(crate) handle: RecordTree,
}

/// Every tree of the layout (see the module table).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Trees {
    pub(crate) meta: Tree,
    pub(crate) clients: Tree,
    pub(crate) key_packages: Tree,
    pub(crate) kp_owners: Tree,
    pub(crate) groups: Tree,
    pub(crate) group_states: Tree,
    pub(crate) commits: Tree,
    pub(crate) delivery: Tree,
    pub(crate) invites: Tree,
    pub(crate) usage: Tree,
    pub(crate) sends: Tree,
    pub(crate) checkpoint: Tree,
}

/// How the DS opens sled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StoreTuning {
    /// sled page cache in MiB.
    pub(crate) cache_mb: u64,
    /// Log writes between sled's page-table snapshots while running
    /// ([`StoreConfig::snapshot_after_ops`]).
    pub(crate) snapshot_every_ops: u64,
}

impl StoreTuning {
    /// For the admin commands that open a data directory no server holds.
    pub(crate) fn admin() -> StoreTuning {
        StoreTuning {
            cache_mb: 64,
            snapshot_every_ops: StoreConfig::default().snapshot_after_ops,
        }
    }
}

/// The opened store and its trees.
#[derive(Clone)]
pub(crate) struct Layout {
    pub(crate) store: Store,
    /// The `ds` namespace, where every record lives.
    pub(crate) storage: SledStorage,
    pub(crate) trees: Trees,
}

impl Layout {
    /// Open the database in `data_dir` the way the DS uses it: the storage
    /// crate's own per-operation flush is off (`Batched`), because the
    /// group commit makes every write set durable before it is answered.
    pub(crate) fn open(data_dir: &Path, tuning: StoreTuning) -> Result<Layout, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(mls_ds_storage::StorageError::Io)?;
        let store = Store::open(
            data_dir,
            StoreConfig {
                durability: Durability::Batched,
                cache_capacity: tuning.cache_mb.saturating_mul(1024 * 1024),
                flush_every_ms: Some(500),
                snapshot_after_ops: tuning.snapshot_every_ops,
                ..StoreConfig::default()
            },
        )?;
        Layout::on(store)
    }

    /// Use `store` (checking or claiming the layout version).
    pub(crate) fn on(store: Store) -> Result<Layout, StoreError> {
        let tree = |name: &'static str| -> Result<Tree, StoreError> {
            let short = name.strip_prefix("app.").unwrap_or(name);
            Ok(Tree {
                name,
                handle: store.record_tree(short)?,
            })
        };
        let trees = Trees {
            meta: tree("app.ds.meta")?,
            clients: tree("app.ds.clients")?,
            key_packages: tree("app.ds.key_packages")?,
            kp_owners: tree("app.ds.kp_owners")?,
            groups: tree("app.ds.groups")?,
            group_states: tree("app.ds.group_states")?,
            commits: tree("app.ds.commits")?,
            delivery: tree("app.ds.delivery")?,
            invites: tree("app.ds.invites")?,
            usage: tree("app.ds.usage")?,
            sends: tree("app.ds.sends")?,
            checkpoint: tree("app.ds.checkpoint")?,
        };
        let layout = Layout {
            storage: store.storage(NAMESPACE)?,
            store,
            trees,
        };
        layout.check_version()?;
        Ok(layout)
    }

    fn check_version(&self) -> Result<(), StoreError> {
        let s = &self.storage;
        match s.get_raw(self.trees.meta.handle, LAYOUT_KEY)? {
            Some(v) => {
                let found = be_u64_or_u32(&v).ok_or_else(|| {
                    StoreError::Layout(format!(
                        "the layout version record holds {} bytes; the data directory is damaged",
                        v.len()
                    ))
                })?;
                if found == u64::from(LAYOUT_VERSION) {
                    Ok(())
                } else if found > u64::from(LAYOUT_VERSION) {
                    Err(StoreError::Layout(format!(
                        "the data directory has DS layout version {found}, newer than this build's \
                         {LAYOUT_VERSION}; upgrade mls-ds (the data was left untouched)"
                    )))
                } else {
                    Err(StoreError::Layout(older_layout(&format!(
                        "version {found}"
                    ))))
                }
            }
            None => {
                let t = &self.trees;
                for tree in [
                    t.clients,
                    t.key_packages,
                    t.kp_owners,
                    t.groups,
                    t.group_states,
                    t.commits,
                    t.delivery,
                    t.invites,
                    t.usage,
                ] {
                    if s.last_raw(tree.handle, b"")?.is_some() {
                        return Err(StoreError::Layout(older_layout("no layout version")));
                    }
                }
                s.put_raw(t.meta.handle, LAYOUT_KEY, &LAYOUT_VERSION.to_be_bytes())?;
                self.store.flush()?;
                Ok(())
            }
        }
    }

    /// Read and decode a record.
    pub(crate) fn get<T: bincode::Decode<()>>(
        &self,
        tree: Tree,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.storage.get_raw(tree.handle, key)? {
            Some(bytes) => Ok(Some(decode_record(tree.name, key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Whether a key is stored.
    pub(crate) fn contains(&self, tree: Tree, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.storage.get_raw(tree.handle, key)?.is_some())
    }

    /// A client's record.
    pub(crate) fn client(&self, id: &ClientId) -> Result<Option<ClientRecord>, StoreError> {
        self.get(self.trees.clients, id.as_bytes())
    }
}

fn older_layout(what: &str) -> String {
    format!(
        "the data directory was written by an earlier development build of mls-ds ({what}; this \
         build reads layout version {LAYOUT_VERSION} only and converts nothing); start with an \
         empty data directory (the data was left untouched)"
    )
}

fn be_u64_or_u32(bytes: &[u8]) -> Option<u64> {
    let arr: [u8; 4] = bytes.try_into().ok()?;
    Some(u64::from(u32::from_be_bytes(arr)))
}

/// Encode a record for `tree`.
pub(crate) fn encode<T: bincode::Encode>(tree: Tree, value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(encode_record(tree.name, value)?)
}

/// `[len u8] ++ bytes` of a client id (at most 128 bytes, validated on decode).
pub(crate) fn client_key(id: &ClientId) -> Vec<u8> {
    len_prefixed(id.as_bytes())
}

fn len_prefixed(bytes: &[u8]) -> Vec<u8> {
    // Client ids are at most 128 and group ids at most 255 bytes.
    let len = u8::try_from(bytes.len()).unwrap_or(u8::MAX);
    let mut k = Vec::with_capacity(bytes.len() + 1);
    k.push(len);
    k.extend_from_slice(bytes);
    k
}

/// Key of an ordinary key package.
pub(crate) fn kp_key(owner: &ClientId, kp_ref: &[u8]) -> Vec<u8> {
    [kp_prefix(owner).as_slice(), kp_ref].concat()
}

/// Prefix of a client's ordinary key packages.
pub(crate) fn kp_prefix(owner: &ClientId) -> Vec<u8> {
    [client_key(owner).as_slice(), b"k"].concat()
}

/// Key of a client's last-resort key package.
pub(crate) fn last_resort_key(owner: &ClientId) -> Vec<u8> {
    [client_key(owner).as_slice(), b"l"].concat()
}

/// Prefix of every key of a group's accepted commits.
pub(crate) fn group_key(group: &GroupId) -> Vec<u8> {
    len_prefixed(group.as_bytes())
}

/// Key of the commit accepted for `epoch`.
pub(crate) fn commit_key(group: &GroupId, epoch: u64) -> Vec<u8> {
    [group_key(group).as_slice(), &epoch.to_be_bytes()].concat()
}

/// The group and epoch of a commit key.
pub(crate) fn split_commit_key(key: &[u8]) -> Option<(GroupId, u64)> {
    let (&len, rest) = key.split_first()?;
    let (group, epoch) = rest.split_at_checked(usize::from(len))?;
    let epoch: [u8; 8] = epoch.try_into().ok()?;
    Some((GroupId::new(group).ok()?, u64::from_be_bytes(epoch)))
}

/// Key of a remembered send: its creation time first, so that keys sort by
/// age.
pub(crate) fn send_key(key: &SendKey) -> Vec<u8> {
    SendKeyBytes::of(key).as_slice().to_vec()
}

/// A [`send_key`] on the stack, for lookups (one per send with a send id).
pub(crate) struct SendKeyBytes {
    bytes: [u8; 8 + 1 + u8::MAX as usize + 8],
    len: usize,
}

impl SendKeyBytes {
    /// Encode `key` (a client id has at most 128 bytes: one byte counts it).
    pub(crate) fn of(key: &SendKey) -> SendKeyBytes {
        let sender = key.sender.as_bytes();
        let sender = &sender[..sender.len().min(usize::from(u8::MAX))];
        let mut bytes = [0; 8 + 1 + u8::MAX as usize + 8];
        let len = 8 + 1 + sender.len() + 8;
        bytes[..8].copy_from_slice(&key.id.created_ms.to_be_bytes());
        bytes[8] = sender.len() as u8;
        bytes[9..9 + sender.len()].copy_from_slice(sender);
        bytes[9 + sender.len()..len].copy_from_slice(&key.id.nonce.to_be_bytes());
        SendKeyBytes { bytes, len }
    }

    /// The encoded key.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The send a [`send_key`] names.
pub(crate) fn split_send_key(key: &[u8]) -> Option<SendKey> {
    let (created, rest) = key.split_first_chunk::<8>()?;
    let (&len, rest) = rest.split_first()?;
    let (sender, nonce) = rest.split_at_checked(usize::from(len))?;
    let nonce: [u8; 8] = nonce.try_into().ok()?;
    Some(SendKey {
        sender: ClientId::new(sender).ok()?,
        id: mls_ds_protocol::groups::SendId {
            created_ms: u64::from_be_bytes(*created),
            nonce: u64::from_be_bytes(nonce),
        },
    })
}

/// Prefix of every delivery batch key.
pub(crate) const BATCH_PREFIX: u8 = b'b';
/// Prefix of every ack mark key.
pub(crate) const ACK_PREFIX: u8 = b'a';
/// Prefix of every roster key.
pub(crate) const ROSTER_PREFIX: u8 = b'r';
/// Bits of a message id that number the message within its batch.
const SLOT_BITS: u32 = 16;
/// Most messages in one batch.
pub(crate) const MAX_SLOTS: u32 = 1 << SLOT_BITS;

/// Key of a delivery batch.
pub(crate) fn batch_key(batch: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(BATCH_PREFIX);
    k.extend_from_slice(&batch.to_be_bytes());
    k
}

/// Key of a roster.
pub(crate) fn roster_key(roster: u64) -> [u8; 9] {
    let mut k = [ROSTER_PREFIX; 9];
    k[1..].copy_from_slice(&roster.to_be_bytes());
    k
}

/// The id of message `slot` of `batch`: ids grow with batches, which are
/// numbered in the order they are written.
pub(crate) fn message_id(batch: u64, slot: u32) -> u64 {
    (batch << SLOT_BITS) | u64::from(slot)
}

/// The batch a message id is stored in.
pub(crate) fn batch_of(id: u64) -> u64 {
    id >> SLOT_BITS
}

/// Batches are numbered below this (far beyond what a DS writes: a batch a
/// millisecond for four thousand years), so that a number read from disk
/// and the ones after it still make message ids.
const BATCH_LIMIT: u64 = 1 << 47;

/// `number`, a batch number read from disk (`what` names where), unless it
/// is past what the DS numbers.
pub(crate) fn stored_batch(number: u64, what: &str) -> Result<u64, StoreError> {
    if number < BATCH_LIMIT {
        Ok(number)
    } else {
        Err(StoreError::Corrupt(format!(
            "{what} names batch {number}, past any the DS numbers"
        )))
    }
}

/// The slot of a message id within its batch.
pub(crate) fn slot_of(id: u64) -> u32 {
    // Masked to SLOT_BITS: fits.
    (id & (u64::from(MAX_SLOTS) - 1)) as u32
}

/// A queue's acknowledgement mark as stored: its sequence number and the id
/// of the message at it (0 while nothing left the queue). Message ids grow
/// along a queue, so the id tells which stored entries lie at or below the
/// mark even where a fan-out stores no sequence number (a roster's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    /// Highest acknowledged sequence number.
    pub(crate) seq: u64,
    /// Id of the message at `seq`.
    pub(crate) id: u64,
}

impl Mark {
    /// The stored value.
    pub(crate) fn to_bytes(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..].copy_from_slice(&self.id.to_be_bytes());
        b
    }

    /// A stored value, `None` if it is not 16 bytes.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Mark> {
        let (seq, id) = bytes.split_first_chunk::<8>()?;
        let id: [u8; 8] = id.try_into().ok()?;
        Some(Mark {
            seq: u64::from_be_bytes(*seq),
            id: u64::from_be_bytes(id),
        })
    }
}

/// Key of a client's acknowledgement mark.
pub(crate) fn ack_key(client: &ClientId) -> Vec<u8> {
    [&[ACK_PREFIX][..], &client_key(client)].concat()
}

/// A big-endian u64 value.
pub(crate) fn be_u64(bytes: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

/// The u64 that ends a key (message id), or `None` for a key too short.
pub(crate) fn key_id(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// Where one stored message went: the in-memory queue index is rebuilt from
/// these at startup.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct Fanout {
    /// Acceptance time (unix ms), for retention.
    pub(crate) stored_ms: u64,
    /// Each recipient (client id) with the sequence number of the message in
    /// its queue (empty when `roster` says who).
    pub(crate) entries: Vec<(Vec<u8>, u64)>,
    /// The recipients as a roster's members but some.
    pub(crate) roster: Option<RosterRef>,
}

impl Fanout {
    /// Queue entries the message got.
    pub(crate) fn recipients(&self) -> u64 {
        self.roster
            .as_ref()
            .map_or(self.entries.len() as u64, |r| u64::from(r.recipients))
    }
}

/// A fan-out by roster: every member of the stored roster `id` but those at
/// the `skipped` positions (the sender, and clients that had deleted
/// themselves) got an entry, at the next sequence number of its queue.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct RosterRef {
    /// The roster (`rosters.rs`).
    pub(crate) id: u64,
    /// Positions in the roster that got no entry, ascending.
    pub(crate) skipped: Vec<u32>,
    /// Entries made: the roster's size minus `skipped`'s (checked when
    /// read).
    pub(crate) recipients: u32,
}

/// [`Fanout`] decoded in place from the start of an envelope record (the
/// startup scan reads nothing else of most messages).
#[derive(bincode::BorrowDecode)]
pub(crate) struct FanoutView<'a> {
    /// Acceptance time (unix ms).
    pub(crate) stored_ms: u64,
    /// Each recipient and the sequence number of the message in its queue.
    pub(crate) entries: Vec<(&'a [u8], u64)>,
    /// The recipients as a roster's members but some.
    pub(crate) roster: Option<RosterRef>,
}

/// A stored message with its fan-out, as one record of a delivery batch.
#[derive(bincode::Decode, Clone, Debug, PartialEq)]
pub(crate) struct Envelope {
    /// Where the message went.
    pub(crate) fanout: Fanout,
    /// The message.
    pub(crate) message: StoredMessage,
}

/// [`Fanout`] by reference to the queue index's entries (same encoding),
/// so that storing a message copies no client id.
pub(crate) struct FanoutRef<'a> {
    /// Acceptance time (unix ms).
    pub(crate) stored_ms: u64,
    /// Each recipient and the sequence number of the message in its queue.
    pub(crate) entries: &'a [(ClientId, u64)],
    /// The recipients as a roster's members but some (`entries` is then
    /// not written).
    pub(crate) roster: Option<&'a RosterRef>,
}

impl bincode::Encode for FanoutRef<'_> {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.stored_ms.encode(encoder)?;
        let entries = if self.roster.is_some() {
            &[]
        } else {
            self.entries
        };
        // A sequence is its length as a u64, then its items.
        (entries.len() as u64).encode(encoder)?;
        for (client, seq) in entries {
            client.as_bytes().encode(encoder)?;
            seq.encode(encoder)?;
        }
        self.roster.encode(encoder)
    }
}

/// [`Envelope`] by reference, to write one without copying the message
/// (same encoding).
#[derive(bincode::Encode)]
pub(crate) struct EnvelopeRef<'a> {
    /// Where the message went.
    pub(crate) fanout: FanoutRef<'a>,
    /// The message.
    pub(crate) message: &'a StoredMessage,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary() -> Store {
        Store::temporary(StoreConfig {
            durability: Durability::Batched,
            ..StoreConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_new_database_gets_the_layout_version_and_opens_again() {
        let store = temporary();
        let layout = Layout::on(store.clone()).unwrap();
        let v = layout
            .storage
            .get_raw(layout.trees.meta.handle, LAYOUT_KEY)
            .unwrap();
        assert_eq!(v, Some(LAYOUT_VERSION.to_be_bytes().to_vec()));
        Layout::on(store).unwrap();
    }

    #[test]
    fn data_without_a_layout_version_or_of_another_version_is_refused() {
        let store = temporary();
        let layout = Layout::on(store.clone()).unwrap();
        let s = &layout.storage;
        s.put_raw(layout.trees.clients.handle, b"alice", b"x")
            .unwrap();
        s.remove_raw(layout.trees.meta.handle, LAYOUT_KEY).unwrap();
        let e = Layout::on(store.clone()).err().expect("refused");
        assert!(e.to_string().contains("earlier development build"), "{e}");
        assert_eq!(
            s.get_raw(layout.trees.clients.handle, b"alice").unwrap(),
            Some(b"x".to_vec()),
            "left untouched"
        );
        for (version, says) in [
            (LAYOUT_VERSION - 1, "earlier development build"),
            (LAYOUT_VERSION + 1, "newer"),
        ] {
            s.put_raw(layout.trees.meta.handle, LAYOUT_KEY, &version.to_be_bytes())
                .unwrap();
            let e = Layout::on(store.clone()).err().expect("refused");
            assert!(e.to_string().contains(says), "{version}: {e}");
        }
    }

    #[test]
    fn a_fanout_by_reference_encodes_as_the_fanout() {
        let (a, b) = (ClientId::new("a").unwrap(), ClientId::new("bob").unwrap());
        let entries = vec![(a, 7), (b, 300)];
        let owned = Fanout {
            stored_ms: 99,
            entries: entries
                .iter()
                .map(|(c, s)| (c.as_bytes().to_vec(), *s))
                .collect(),
            roster: None,
        };
        let config = bincode::config::standard();
        let by_ref = FanoutRef {
            stored_ms: 99,
            entries: &entries,
            roster: None,
        };
        assert_eq!(
            bincode::encode_to_vec(&by_ref, config).unwrap(),
            bincode::encode_to_vec(&owned, config).unwrap()
        );
        // By roster, the entries are not written.
        let roster = RosterRef {
            id: 3,
            skipped: vec![0, 17],
            recipients: 40,
        };
        let by_roster = FanoutRef {
            stored_ms: 99,
            entries: &entries,
            roster: Some(&roster),
        };
        let owned = Fanout {
            stored_ms: 99,
            entries: Vec::new(),
            roster: Some(roster.clone()),
        };
        let bytes = bincode::encode_to_vec(&by_roster, config).unwrap();
        assert_eq!(bytes, bincode::encode_to_vec(&owned, config).unwrap());
        let (view, _): (FanoutView<'_>, _) =
            bincode::borrow_decode_from_slice(&bytes, config).unwrap();
        assert_eq!((view.entries.len(), view.roster), (0, Some(roster)));
        assert_eq!(owned.recipients(), 40);
        let mark = Mark {
            seq: 9,
            id: 1 << 20,
        };
        assert_eq!(Mark::from_bytes(&mark.to_bytes()), Some(mark));
        assert_eq!(Mark::from_bytes(&[0; 8]), None);
    }

    #[test]
    fn keys_end_in_their_id() {
        assert_eq!(key_id(&batch_key(7)), Some(7));
        let id = message_id(7, 3);
        assert_eq!((batch_of(id), slot_of(id)), (7, 3));
        assert!(message_id(8, 0) > message_id(7, MAX_SLOTS - 1));
        assert_eq!(key_id(b"short"), None);
        let c = ClientId::new("carol").unwrap();
        assert_eq!(ack_key(&c), b"a\x05carol".to_vec());
        assert_eq!(kp_key(&c, b"r"), b"\x05carolkr".to_vec());
        let g = GroupId::new(b"group").unwrap();
        assert_eq!(split_commit_key(&commit_key(&g, 9)), Some((g, 9)));
        assert_eq!(split_commit_key(b"\x09ab"), None, "length past the end");
        let send = SendKey {
            sender: c,
            id: mls_ds_protocol::groups::SendId {
                created_ms: 5,
                nonce: 6,
            },
        };
        assert_eq!(split_send_key(&send_key(&send)), Some(send));
        assert_eq!(split_send_key(b"\0\0\0\0\0\0\0\x05\x09ab"), None);
    }
}
