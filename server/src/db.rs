//! The server's on-disk layout: its sled trees (record trees of the storage
//! crate, so they can join one atomic write with OpenMLS's `PublicGroup`
//! state), their typed keys, and the records stored in them (bincode 2 behind
//! a version byte, through the storage crate's codec).
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `app.ds.clients` | client id | [`ClientRecord`] |
//! | `app.ds.key_packages` | `client_key ++ 'k' ++ kp_ref` / `client_key ++ 'l'` | [`KeyPackageRecord`] (ordinary / last resort) |
//! | `app.ds.kp_owners` | kp_ref | client id that published the key package (welcome routing) |
//! | `app.ds.groups` | group id | [`GroupRecord`] |
//! | `app.ds.group_infos` | group id | `MLSMessage(GroupInfo)` of the current epoch |
//! | `app.ds.commits` | `group_key ++ epoch u64 BE` | [`CommitRecord`] (one accepted commit per epoch) |
//! | `app.ds.delivery` | `'e' ++ id u64 BE` | [`Envelope`]: a message, stored once for all recipients, with each recipient and the seq it has in that queue |
//! | | `'m'` / `'r'` `++ id u64 BE` | the same split in two ([`StoredMessage`], [`Fanout`]), as written before envelopes; converted at startup (`queues::migrate_split_messages`) |
//! | | `'a' ++ client_key` | highest acknowledged seq u64 BE |
//! | `app.ds.server` | `secret` | 32-byte server secret |
//!
//! `client_key` and `group_key` are `[len u8] ++ bytes`. Every key also carries
//! the storage namespace prefix (`ds`), added by the storage crate.

use mls_ds_protocol::ClientId;
use mls_ds_storage::{RecordTree, SledProvider, SledStorage, Store};

use crate::error::{Result, ServerError};

/// Longest group id the DS accepts.
pub const MAX_GROUP_ID_LEN: usize = 255;
/// Namespace of all server data in the store.
pub const NAMESPACE: &[u8] = b"ds";

/// A registered client.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub struct ClientRecord {
    /// MLS signature scheme code point.
    pub signature_scheme: u16,
    /// Public signature key; authenticates the client.
    pub signature_key: Vec<u8>,
    /// Registration time (unix ms).
    pub registered_ms: u64,
    /// Set when the client deleted itself (unix ms). The id stays reserved so
    /// that nobody else can register it and inherit its groups or queue.
    pub deleted_ms: Option<u64>,
}

impl ClientRecord {
    /// Whether the client deleted itself.
    pub fn is_deleted(&self) -> bool {
        self.deleted_ms.is_some()
    }
}

/// A published key package.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub struct KeyPackageRecord {
    /// `MLSMessage(KeyPackage)` as published.
    pub message: Vec<u8>,
    /// Its hash reference.
    pub kp_ref: Vec<u8>,
    /// End of its lifetime (unix seconds).
    pub not_after: u64,
}

/// A group as the DS knows it.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub struct GroupRecord {
    /// Current epoch.
    pub epoch: u64,
    /// Whether any registered client may fetch the GroupInfo and join externally.
    pub open: bool,
    /// Client ids of the current members (from the DS's own `PublicGroup`).
    pub members: Vec<Vec<u8>>,
    /// Client ids that were members once (they may resync by external commit).
    pub former_members: Vec<Vec<u8>>,
    /// Creation time (unix ms).
    pub created_ms: u64,
}

/// The commit the DS accepted for one epoch.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub struct CommitRecord {
    /// SHA-256 of the commit message; a retry with the same hash succeeds again.
    pub commit_hash: [u8; 32],
    /// Client that committed.
    pub committer: Vec<u8>,
    /// Epoch the commit created.
    pub new_epoch: u64,
    /// Queue entries written.
    pub recipients: u32,
}

/// A message stored once and referenced from every recipient's queue.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub struct StoredMessage {
    /// `EntryKind` code.
    pub kind: u8,
    /// Group it belongs to.
    pub group_id: Vec<u8>,
    /// Epoch when accepted.
    pub epoch: u64,
    /// Authenticated sender.
    pub sender: Vec<u8>,
    /// The `MLSMessage`.
    pub message: Vec<u8>,
    /// Acceptance time (unix ms), for retention.
    pub stored_ms: u64,
}

/// Where one stored message went: the in-memory queue index is rebuilt from
/// these records at startup.
#[derive(bincode::Encode, bincode::Decode, Clone, Debug, PartialEq)]
pub struct Fanout {
    /// Acceptance time (unix ms), for retention.
    pub stored_ms: u64,
    /// Each recipient (client id) with the sequence number of the message in
    /// its queue.
    pub entries: Vec<(Vec<u8>, u64)>,
}

/// A stored message with its fan-out, as one value: a plain send is one key
/// to write and one to remove. Startup reads every envelope's fan-out to
/// rebuild the queue index.
#[derive(bincode::Decode, Clone, Debug, PartialEq)]
pub struct Envelope {
    /// Where the message went.
    pub fanout: Fanout,
    /// The message.
    pub message: StoredMessage,
}

/// [`Envelope`] by reference, for writing one without copying the message
/// (same encoding).
#[derive(bincode::Encode)]
pub struct EnvelopeRef<'a> {
    /// Where the message went.
    pub fanout: &'a Fanout,
    /// The message.
    pub message: &'a StoredMessage,
}

/// Handles on every tree of the server.
#[derive(Clone)]
pub struct Db {
    /// The opened store.
    pub store: Store,
    /// The server's namespace (records and `PublicGroup` state).
    pub storage: SledStorage,
    /// Crypto + storage for OpenMLS calls.
    pub provider: SledProvider,
    /// See the module table.
    pub clients: RecordTree,
    /// See the module table.
    pub key_packages: RecordTree,
    /// See the module table.
    pub kp_owners: RecordTree,
    /// See the module table.
    pub groups: RecordTree,
    /// See the module table.
    pub group_infos: RecordTree,
    /// See the module table.
    pub commits: RecordTree,
    /// See the module table.
    pub delivery: RecordTree,
    /// See the module table.
    pub server: RecordTree,
}

impl Db {
    /// Open every tree on `store`.
    pub fn new(store: Store) -> Result<Db> {
        let storage = store.storage(NAMESPACE)?;
        Ok(Db {
            provider: SledProvider::new(storage.clone()),
            storage,
            clients: store.record_tree("ds.clients")?,
            key_packages: store.record_tree("ds.key_packages")?,
            kp_owners: store.record_tree("ds.kp_owners")?,
            groups: store.record_tree("ds.groups")?,
            group_infos: store.record_tree("ds.group_infos")?,
            commits: store.record_tree("ds.commits")?,
            delivery: store.record_tree("ds.delivery")?,
            server: store.record_tree("ds.server")?,
            store,
        })
    }
}

/// `[len u8] ++ bytes` for ids of at most 255 bytes.
pub fn len_prefixed(bytes: &[u8]) -> Result<Vec<u8>> {
    let len = u8::try_from(bytes.len())
        .map_err(|_| ServerError::BadRequest(format!("id of {} bytes is too long", bytes.len())))?;
    let mut k = Vec::with_capacity(bytes.len() + 1);
    k.push(len);
    k.extend_from_slice(bytes);
    Ok(k)
}

/// Key prefix of everything stored per client.
pub fn client_key(id: &ClientId) -> Vec<u8> {
    // Client ids are at most 128 bytes, validated on decode.
    let mut k = Vec::with_capacity(id.as_bytes().len() + 1);
    k.push(id.as_bytes().len() as u8);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Key of an ordinary key package.
pub fn kp_key(client: &ClientId, kp_ref: &[u8]) -> Vec<u8> {
    [client_key(client).as_slice(), b"k", kp_ref].concat()
}

/// Prefix of a client's ordinary key packages.
pub fn kp_prefix(client: &ClientId) -> Vec<u8> {
    [client_key(client).as_slice(), b"k"].concat()
}

/// Key of a client's last-resort key package.
pub fn last_resort_key(client: &ClientId) -> Vec<u8> {
    [client_key(client).as_slice(), b"l"].concat()
}

/// Key of the commit accepted for `epoch`.
pub fn commit_key(group_id: &[u8], epoch: u64) -> Result<Vec<u8>> {
    Ok([len_prefixed(group_id)?.as_slice(), &epoch.to_be_bytes()].concat())
}

/// Key of a stored message and its fan-out ([`Envelope`]).
pub fn envelope_key(id: u64) -> Vec<u8> {
    [b"e".as_slice(), &id.to_be_bytes()].concat()
}

/// Key of a message body in the split layout written before envelopes.
pub fn message_key(id: u64) -> Vec<u8> {
    [b"m".as_slice(), &id.to_be_bytes()].concat()
}

/// Key of a fan-out record in the split layout written before envelopes.
pub fn fanout_key(id: u64) -> Vec<u8> {
    [b"r".as_slice(), &id.to_be_bytes()].concat()
}

/// Key of a client's acknowledgement mark.
pub fn ack_key(client: &ClientId) -> Vec<u8> {
    [b"a".as_slice(), &client_key(client)].concat()
}

/// Read a big-endian u64 stored raw (queue entries, ack marks).
pub fn be_u64(tree: &str, bytes: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        ServerError::Internal(format!("corrupt u64 in {tree}: {} bytes", bytes.len()))
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// The u64 that ends a key (message id, sequence number; an error, not a
/// panic, for a corrupt key that is too short).
pub fn key_seq(tree: &str, key: &[u8]) -> Result<u64> {
    be_u64(
        tree,
        key.get(key.len().saturating_sub(8)..).unwrap_or_default(),
    )
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
