//! The opened database (`Store`), per-namespace handles on it (`SledStorage`),
//! and the transaction overlay that makes one MLS operation atomic.
//!
//! Reads inside a transaction see the transaction's own writes first and the
//! database second. Writes go to an in-memory overlay only; `commit` applies
//! the whole overlay as one sled batch (one tree) or one multi-tree sled
//! transaction, then waits for durability. The sled transaction closure only
//! replays the overlay, so sled's retries are harmless and no scan is needed
//! inside it. Dropping a transaction without committing discards the overlay.
//!
//! Over 500 lines on purpose: the store, its handles and the overlay share
//! private state (the overlay merges into every read and scan of a handle,
//! and `apply_all` applies overlays); apart, that state would have to be
//! made visible to other modules.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::durability::{Durability, GroupCommit};
use crate::encryption::{Cipher, StoreKey};
use crate::error::StorageError;
use crate::sled_conf;
use crate::trees::{namespace_prefix, Family, APP_TREE_PREFIX, META_TREE};

/// Format of the whole database (layout of trees, keys and value encodings).
/// 3: OpenMLS entities in MessagePack (1 and 2, with JSON, are refused).
pub(crate) const FORMAT_VERSION: u32 = 3;
/// The same format with every row sealed (`crate::encryption`): a build that
/// does not know encryption refuses it as newer instead of adding plain
/// rows beside sealed ones, and a store that lost its encryption record is
/// told apart from an unencrypted one.
pub(crate) const FORMAT_SEALED: u32 = 4;
pub(crate) const FORMAT_KEY: &[u8] = b"format_version";
const OPENMLS_VERSION_KEY: &[u8] = b"openmls_storage_version";
/// The [`EncryptionRecord`] of an encrypted store.
pub(crate) const ENCRYPTION_KEY: &[u8] = b"encryption";

/// How long [`Store::open`] waits for a database lock held by this process's
/// own closing handle.
pub(crate) const LOCK_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// How to open a [`Store`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Durability policy of every atomic operation.
    pub durability: Durability,
    /// sled page cache size in bytes.
    pub cache_capacity: u64,
    /// Period of sled's background flusher (`None` disables it).
    pub flush_every_ms: Option<u64>,
    /// Log writes between the snapshots of sled's page table that its
    /// background flusher writes while the database is open (at least as
    /// many as the database has pages; 0: none). Opening a database replays
    /// the log written since its newest snapshot, so this bounds the time an
    /// open takes after a long run. Honoured by the sled this workspace
    /// builds with (`storage/vendor/sled`, patch 7); published sled 0.34.7
    /// ignores it and snapshots only when it opens a database.
    pub snapshot_after_ops: u64,
    /// Encrypt everything the store keeps under this key (`crate::encryption`
    /// says what that hides). A store is encrypted or not from its creation
    /// on: opening an encrypted one without its key, or an unencrypted one
    /// with a key, is an error that changes nothing.
    pub encryption: Option<StoreKey>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::Sync,
            cache_capacity: 64 * 1024 * 1024,
            flush_every_ms: Some(500),
            snapshot_after_ops: 1_000_000,
            encryption: None,
        }
    }
}

struct Shared {
    db: sled::Db,
    path: Option<PathBuf>,
    /// Family trees first (indexed by `Family::index`), record trees after.
    trees: RwLock<Vec<(String, sled::Tree)>>,
    durability: GroupCommit,
    /// Set for an encrypted store: keys and values are stored sealed.
    cipher: Option<Cipher>,
}

/// An opened sled database holding OpenMLS state for any number of namespaces.
///
/// Cheap to clone; all clones share the same trees and group commit.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .field("durability", &self.shared.durability.mode())
            .finish()
    }
}

impl Store {
    /// Open (or create) the database in `path`.
    ///
    /// A database that fails to open, or whose format is newer than this
    /// build, is reported as an error and left untouched. One that another
    /// handle holds open (sled locks it) is [`StorageError::InUse`].
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Store, StorageError> {
        let path = path.as_ref();
        match crate::compaction::finish_pending(path)? {
            crate::compaction::Pending::None => {}
            crate::compaction::Pending::Discarded => {
                tracing::warn!(path = %path.display(), "deleted an unfinished compaction copy; the database is as it was")
            }
            crate::compaction::Pending::SwappedIn => {
                tracing::info!(path = %path.display(), "the compacted database replaced the old one")
            }
        }
        sled_conf::remove_if_torn(path)?;
        crate::sled_files::remove_unfinished_snapshots(path)?;
        let open = || {
            #[allow(deprecated)] // a no-op on published sled (see the field)
            sled::Config::new()
                .path(path)
                .cache_capacity(config.cache_capacity)
                .flush_every_ms(config.flush_every_ms)
                .snapshot_after_ops(config.snapshot_after_ops)
                .open()
        };
        // sled releases its file lock from a background thread after the last
        // handle is dropped, so a database this process closed a moment ago
        // can still look locked: retry briefly before reporting it as held.
        let deadline = std::time::Instant::now() + LOCK_RETRY;
        let mut attempt = open();
        while matches!(&attempt, Err(e) if is_lock_error(e)) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
            attempt = open();
        }
        let db = attempt.map_err(|source| {
            if is_lock_error(&source) {
                StorageError::InUse {
                    path: path.to_owned(),
                }
            } else {
                StorageError::Open {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        sled_conf::sync(path)?;
        // sled keeps its log in `<dir>/db`; fsync needs a handle on it, and
        // silently skipping the fsync would weaken the durability promise.
        let log_file = OpenOptions::new().read(true).open(path.join("db"))?;
        Self::from_db(db, Some(path.to_owned()), Some(log_file), config)
    }

    /// A throw-away database (sled `temporary` mode), for tests and benchmarks.
    pub fn temporary(config: StoreConfig) -> Result<Store, StorageError> {
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(config.cache_capacity)
            .flush_every_ms(config.flush_every_ms)
            .open()?;
        Self::from_db(db, None, None, config)
    }

    fn from_db(
        db: sled::Db,
        path: Option<PathBuf>,
        log_file: Option<File>,
        config: StoreConfig,
    ) -> Result<Store, StorageError> {
        let format = check_format(&db)?;
        let cipher = crate::encryption::open_store_cipher(
            &db,
            path.as_deref(),
            format,
            config.encryption.as_ref(),
        )?;
        let mut trees = Vec::with_capacity(Family::ALL.len() + 8);
        for f in Family::ALL {
            trees.push((f.tree_name().to_owned(), db.open_tree(f.tree_name())?));
        }
        let durability = GroupCommit::new(db.clone(), log_file, config.durability);
        Ok(Store {
            shared: Arc::new(Shared {
                db,
                path,
                trees: RwLock::new(trees),
                durability,
                cipher,
            }),
        })
    }

    /// A storage handle whose keys all live under `namespace` (at most 255 bytes).
    pub fn storage(&self, namespace: &[u8]) -> Result<SledStorage, StorageError> {
        if namespace.len() > u8::MAX as usize {
            return Err(StorageError::NamespaceTooLong(namespace.len()));
        }
        Ok(SledStorage {
            shared: self.shared.clone(),
            ns: namespace_prefix(namespace).into(),
            tx: None,
        })
    }

    /// The underlying sled database, for this crate's own tests only (they
    /// damage stored bytes on purpose).
    #[cfg(feature = "test-hooks")]
    pub fn raw_db(&self) -> &sled::Db {
        &self.shared.db
    }

    /// Flush and fsync now, whatever the durability policy.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.shared.durability.flush()
    }

    /// Bytes of every key and value stored, in every tree: what a
    /// compaction would copy (sled adds its node headers and log framing).
    /// Reads everything.
    pub fn live_bytes(&self) -> Result<u64, StorageError> {
        let mut bytes = 0u64;
        for name in self.shared.db.tree_names() {
            for item in self.shared.db.open_tree(&name)?.iter() {
                let (k, v) = item?;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        Ok(bytes)
    }

    /// The directory of a database opened with [`Store::open`].
    pub fn path(&self) -> Option<&Path> {
        self.shared.path.as_deref()
    }

    /// Bytes the database occupies on disk, as sled counts them.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.shared.db.size_on_disk()?)
    }

    /// Copy every tree into a new database created at `target`, flushed and
    /// fsynced before this returns; `target` must not exist yet.
    ///
    /// The copy is consistent only if no write runs meanwhile: the caller
    /// stops writers first (the delivery service runs it on its writer thread). This
    /// database is flushed first, so that nothing the copy holds is missing
    /// from this one's disk (writes under `Batched` or through
    /// [`Store::apply_all`] may not have been flushed yet).
    pub fn export_to(&self, target: &Path) -> Result<ExportReport, StorageError> {
        if target.exists() {
            return Err(StorageError::ExportTargetExists {
                path: target.to_owned(),
            });
        }
        self.flush()?;
        let open_error = |source| StorageError::Open {
            path: target.to_owned(),
            source,
        };
        // `create_new` turns a directory created by someone else between the
        // check above and this open into an error instead of a merge.
        let copy = sled::Config::new()
            .path(target)
            .create_new(true)
            .open()
            .map_err(open_error)?;
        // sled's own `export`/`import` panic on an I/O error; this copy reports
        // it instead, tree by tree.
        let mut report = ExportReport {
            trees: 0,
            entries: 0,
        };
        for name in self.shared.db.tree_names() {
            let from = self.shared.db.open_tree(&name)?;
            let to = copy.open_tree(&name)?;
            report.entries += crate::tree_copy::copy_tree(&from, &to)?;
            report.trees += 1;
        }
        copy.flush()?;
        OpenOptions::new()
            .read(true)
            .open(target.join("db"))?
            .sync_data()?;
        Ok(report)
    }

    /// Open (creating if needed) the record tree `app.<name>` for the
    /// caller's own records, which may join OpenMLS writes in one transaction.
    pub fn record_tree(&self, name: &str) -> Result<RecordTree, StorageError> {
        let full = format!("{APP_TREE_PREFIX}{name}");
        {
            let trees = read_lock(&self.shared.trees);
            if let Some(i) = trees.iter().position(|(n, _)| *n == full) {
                return Ok(RecordTree { index: i });
            }
        }
        let tree = self.shared.db.open_tree(&full)?;
        let mut trees = self.shared.trees.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = trees.iter().position(|(n, _)| *n == full) {
            return Ok(RecordTree { index: i });
        }
        trees.push((full, tree));
        Ok(RecordTree {
            index: trees.len() - 1,
        })
    }

    /// Apply the writes of several transactions in order (a later write of a
    /// key wins over an earlier one). Nothing is flushed: the caller makes
    /// the result durable with [`Store::flush`].
    ///
    /// Each [`PendingWrites`] is applied atomically. Consecutive ones that
    /// write several keys are merged into one atomic sled write; one that
    /// writes a single key is applied as a plain sled insert or remove, which
    /// is atomic by itself and, unlike a sled batch, does not seal the log
    /// buffer (each seal is a log write with `sync_file_range` on sled's I/O
    /// threads). sled recovers a prefix of its log, so after a crash the
    /// database holds a prefix of these writes, in this order.
    pub fn apply_all(
        &self,
        pending: impl IntoIterator<Item = PendingWrites>,
    ) -> Result<(), StorageError> {
        let mut merged = Overlay::new();
        for p in pending {
            if p.writes.len() == 1 {
                apply_overlay(&self.shared, std::mem::take(&mut merged))?;
                for ((tree, key), value) in p.writes {
                    let (key, value) = self.shared.stored(tree, key, value)?;
                    let tree = read_lock(&self.shared.trees)[tree].1.clone();
                    match value {
                        Some(v) => tree.insert(key, v)?,
                        None => tree.remove(key)?,
                    };
                }
            } else if merged.is_empty() {
                merged = p.writes;
            } else {
                merged.extend(p.writes);
            }
        }
        apply_overlay(&self.shared, merged)
    }
}

/// Apply an overlay as one sled batch (one tree) or one multi-tree sled
/// transaction.
fn apply_overlay(shared: &Shared, writes: Overlay) -> Result<(), StorageError> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut per_tree: BTreeMap<usize, Vec<KeyWrite>> = BTreeMap::new();
    for ((tree, key), value) in writes {
        let write = shared.stored(tree, key, value)?;
        per_tree.entry(tree).or_default().push(write);
    }
    let trees: Vec<sled::Tree> = {
        let all = read_lock(&shared.trees);
        per_tree.keys().map(|&i| all[i].1.clone()).collect()
    };
    if trees.len() == 1 {
        let mut batch = sled::Batch::default();
        for (_, ops) in per_tree.iter() {
            for (k, v) in ops {
                match v {
                    Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                    None => batch.remove(k.as_slice()),
                }
            }
        }
        trees[0].apply_batch(batch)?;
        return Ok(());
    }
    let ops: Vec<_> = per_tree.into_values().collect();
    trees
        .as_slice()
        .transaction(|views| {
            for (view, ops) in views.iter().zip(ops.iter()) {
                for (k, v) in ops {
                    match v {
                        Some(v) => view.insert(k.as_slice(), v.as_slice())?,
                        None => view.remove(k.as_slice())?,
                    };
                }
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        })
        .map_err(|e| match e {
            TransactionError::Storage(e) => StorageError::Sled(e),
            TransactionError::Abort(()) => {
                StorageError::Sled(sled::Error::Unsupported("transaction aborted".into()))
            }
        })
}

impl Shared {
    fn tree_name(&self, index: usize) -> String {
        read_lock(&self.trees)
            .get(index)
            .map_or_else(|| format!("#{index}"), |(n, _)| n.clone())
    }

    /// A write of logical `key` as sled gets it: sealed in an encrypted store.
    fn stored(
        &self,
        index: usize,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<KeyWrite, StorageError> {
        let Some(c) = &self.cipher else {
            return Ok((key, value));
        };
        let name = self.tree_name(index);
        let stored_key = c.stored_key(&name, &key);
        let value = match value {
            Some(v) => Some(c.seal(&name, &stored_key, &key, &v)?),
            None => None,
        };
        Ok((stored_key, value))
    }

    /// The database rows of tree `index` whose logical key starts with
    /// `prefix`, opened and in key order (encrypted stores only).
    fn opened_rows(&self, c: &Cipher, index: usize, prefix: &[u8]) -> Result<Pairs, StorageError> {
        let (name, tree) = read_lock(&self.trees)[index].clone();
        let rows = match c.stored_prefix(&name, prefix) {
            Some(p) => tree.scan_prefix(p),
            None => tree.iter(),
        };
        let mut out = Vec::new();
        for item in rows {
            let (k, v) = item?;
            let opened = c.open_row(&name, &k, &v)?;
            if opened.key.starts_with(prefix) {
                out.push((opened.key, opened.value));
            }
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Whether any tree but the metadata holds data.
pub(crate) fn holds_data(db: &sled::Db) -> bool {
    db.tree_names()
        .iter()
        .filter(|n| n.as_ref() != META_TREE.as_bytes())
        .any(|n| db.open_tree(n).map(|t| !t.is_empty()).unwrap_or(true))
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// The database's format version (a new, empty database is claimed as
/// [`FORMAT_VERSION`]).
fn check_format(db: &sled::Db) -> Result<u32, StorageError> {
    let meta = db.open_tree(META_TREE)?;
    match meta.get(FORMAT_KEY)? {
        Some(v) => {
            let bytes: [u8; 4] = v.as_ref().try_into().map_err(|_| {
                StorageError::BadFormatRecord(format!("expected 4 bytes, found {}", v.len()))
            })?;
            let found = u32::from_be_bytes(bytes);
            if found > FORMAT_SEALED {
                return Err(StorageError::NewerFormat {
                    found,
                    supported: FORMAT_SEALED,
                });
            }
            if found < FORMAT_VERSION {
                return Err(StorageError::BadFormatRecord(format!(
                    "format version {found} is not one this build can read"
                )));
            }
            Ok(found)
        }
        None => {
            // Only an empty database may be claimed; anything else is someone
            // else's data and must not be touched.
            if holds_data(db) {
                return Err(StorageError::BadFormatRecord(
                    "database holds data but no format-version record".into(),
                ));
            }
            meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())?;
            meta.insert(
                OPENMLS_VERSION_KEY,
                &openmls_traits::storage::CURRENT_VERSION.to_be_bytes(),
            )?;
            db.flush()?;
            Ok(FORMAT_VERSION)
        }
    }
}

/// What [`Store::export_to`] copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportReport {
    /// Trees copied (sled's default tree and the metadata tree included).
    pub trees: usize,
    /// Key/value pairs copied, over all trees.
    pub entries: u64,
}

/// Handle on a record tree opened with [`Store::record_tree`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordTree {
    index: usize,
}

type Overlay = BTreeMap<(usize, Vec<u8>), Option<Vec<u8>>>;
/// A key and its value (`None`: delete).
type KeyWrite = (Vec<u8>, Option<Vec<u8>>);
/// A key and its value, as returned by scans.
pub type Pair = (Vec<u8>, Vec<u8>);
/// Key/value pairs returned by scans.
pub type Pairs = Vec<Pair>;

struct TxInner {
    /// `None` once the transaction committed or rolled back.
    writes: Option<Overlay>,
    #[cfg(feature = "test-hooks")]
    write_count: usize,
    #[cfg(feature = "test-hooks")]
    fail_after: Option<usize>,
}

struct TxState {
    inner: Mutex<TxInner>,
}

/// OpenMLS storage for one namespace of a [`Store`]; implements
/// `StorageProvider<CURRENT_VERSION>` (and therefore `PublicStorageProvider`).
///
/// Outside a transaction every trait call is its own atomic, durable
/// operation. Inside [`SledStorage::transaction`] (or a [`Transaction`])
/// nothing reaches the disk until commit, and then everything does at once.
#[derive(Clone)]
pub struct SledStorage {
    shared: Arc<Shared>,
    ns: Arc<[u8]>,
    tx: Option<Arc<TxState>>,
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStorage")
            .field("namespace", &String::from_utf8_lossy(&self.ns[1..]))
            .field("in_transaction", &self.tx.is_some())
            .finish()
    }
}

/// An open transaction; derefs to the [`SledStorage`] view that reads its own
/// writes. Dropping it without [`Transaction::commit`] rolls back.
pub struct Transaction {
    view: SledStorage,
}

impl std::ops::Deref for Transaction {
    type Target = SledStorage;
    fn deref(&self) -> &SledStorage {
        &self.view
    }
}

impl Transaction {
    /// Apply every write of the transaction atomically, then wait for durability.
    pub fn commit(self) -> Result<(), StorageError> {
        self.view.commit_overlay()
    }

    /// Take the transaction's writes out without applying them, for a caller
    /// that runs its own group commit and applies the writes of many
    /// transactions as one atomic write ([`Store::apply_all`]).
    pub fn into_pending(self) -> Result<PendingWrites, StorageError> {
        let Some(tx) = &self.view.tx else {
            return Ok(PendingWrites::default());
        };
        let writes = lock(&tx.inner)
            .writes
            .take()
            .ok_or(StorageError::TransactionClosed)?;
        Ok(PendingWrites { writes })
    }
}

/// The writes of a [`Transaction`] taken out uncommitted
/// ([`Transaction::into_pending`]); nothing of them is on disk until
/// [`Store::apply_all`].
#[derive(Default)]
pub struct PendingWrites {
    writes: Overlay,
}

impl PendingWrites {
    /// Split into one set per key, in key order (tree by tree, keys in byte
    /// order). [`Store::apply_all`] applies each without a sled batch, so a
    /// crash can keep any prefix of them: only for writes whose every
    /// key-order prefix is a consistent state.
    pub fn into_single_writes(self) -> Vec<PendingWrites> {
        self.writes
            .into_iter()
            .map(|(k, v)| PendingWrites {
                writes: Overlay::from([(k, v)]),
            })
            .collect()
    }

    /// Number of keys written or deleted.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if let Some(tx) = &self.view.tx {
            lock(&tx.inner).writes = None;
        }
    }
}

fn plain_row(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<Pair, StorageError> {
    let (k, v) = item?;
    Ok((k.to_vec(), v.to_vec()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SledStorage {
    /// Open a database directory with the default policy and the empty namespace.
    pub fn open(path: impl AsRef<Path>) -> Result<SledStorage, StorageError> {
        Store::open(path, StoreConfig::default())?.storage(b"")
    }

    /// The store this handle belongs to.
    pub fn store(&self) -> Store {
        Store {
            shared: self.shared.clone(),
        }
    }

    /// Whether this handle is a transaction view.
    pub(crate) fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Start a transaction. Transactions that touch the same group must not
    /// run concurrently (the overlay is read-your-writes, not snapshot
    /// isolated); callers serialise per group, as an MLS client does anyway.
    /// Starting one on a transaction view joins the outer transaction.
    pub fn begin(&self) -> Transaction {
        let view = SledStorage {
            shared: self.shared.clone(),
            ns: self.ns.clone(),
            tx: Some(Arc::new(TxState {
                inner: Mutex::new(TxInner {
                    writes: Some(Overlay::new()),
                    #[cfg(feature = "test-hooks")]
                    write_count: 0,
                    #[cfg(feature = "test-hooks")]
                    fail_after: None,
                }),
            })),
        };
        Transaction { view }
    }

    /// Run `f` on a transaction view and commit if it returns `Ok`; an `Err`
    /// rolls everything back. On a transaction view, `f` joins the outer
    /// transaction. After a rolled-back MLS operation, reload the group
    /// (`MlsGroup::load`): the in-memory object may be ahead of storage.
    pub fn transaction<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&SledStorage) -> Result<T, E>,
        E: From<StorageError>,
    {
        if self.tx.is_some() {
            return f(self);
        }
        let tx = self.begin();
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Test hook (feature `test-hooks`): make the write number `k + 1` of this
    /// transaction fail (and every later one), so that the operation aborts
    /// after `k` writes.
    #[cfg(feature = "test-hooks")]
    pub fn inject_failure_after(&self, k: usize) {
        if let Some(tx) = &self.tx {
            lock(&tx.inner).fail_after = Some(k);
        }
    }

    /// Test hook (feature `test-hooks`): number of writes recorded in this
    /// transaction so far.
    #[cfg(feature = "test-hooks")]
    pub fn transaction_write_count(&self) -> usize {
        self.tx.as_ref().map_or(0, |tx| lock(&tx.inner).write_count)
    }

    fn commit_overlay(&self) -> Result<(), StorageError> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let writes = lock(&tx.inner)
            .writes
            .take()
            .ok_or(StorageError::TransactionClosed)?;
        apply_overlay(&self.shared, writes)?;
        self.shared.durability.make_durable()
    }

    pub(crate) fn tree_name(&self, index: usize) -> String {
        self.shared.tree_name(index)
    }

    /// Full sled key: namespace prefix followed by `suffix`.
    pub(crate) fn full_key(&self, suffix: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.ns.len() + suffix.len());
        k.extend_from_slice(&self.ns);
        k.extend_from_slice(suffix);
        k
    }

    fn tree(&self, index: usize) -> sled::Tree {
        read_lock(&self.shared.trees)[index].1.clone()
    }

    /// Read a raw value by full key, seeing this transaction's writes.
    pub(crate) fn raw_get(
        &self,
        index: usize,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(tx) = &self.tx {
            let inner = lock(&tx.inner);
            let writes = inner
                .writes
                .as_ref()
                .ok_or(StorageError::TransactionClosed)?;
            if let Some(v) = writes.get(&(index, key.to_vec())) {
                return Ok(v.clone());
            }
        }
        let Some(c) = &self.shared.cipher else {
            return Ok(self.tree(index).get(key)?.map(|v| v.to_vec()));
        };
        let name = self.tree_name(index);
        let stored_key = c.stored_key(&name, key);
        let Some(stored) = self.tree(index).get(&stored_key)? else {
            return Ok(None);
        };
        let opened = c.open_row(&name, &stored_key, &stored)?;
        if opened.key != key {
            // The stored key, not the logical one: errors are logged, and
            // the logical key may name a group or a client.
            return Err(StorageError::corrupt(
                &name,
                &stored_key,
                "sealed under another key",
            ));
        }
        Ok(Some(opened.value))
    }

    /// Write (`Some`) or delete (`None`) a raw value by full key.
    pub(crate) fn raw_set(
        &self,
        index: usize,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), StorageError> {
        match &self.tx {
            Some(tx) => {
                let mut inner = lock(&tx.inner);
                #[cfg(feature = "test-hooks")]
                {
                    if let Some(k) = inner.fail_after {
                        if inner.write_count >= k {
                            return Err(StorageError::Injected(k));
                        }
                    }
                    inner.write_count += 1;
                }
                let writes = inner
                    .writes
                    .as_mut()
                    .ok_or(StorageError::TransactionClosed)?;
                writes.insert((index, key), value);
                Ok(())
            }
            None => {
                let (key, value) = self.shared.stored(index, key, value)?;
                let tree = self.tree(index);
                match value {
                    Some(v) => tree.insert(key, v)?,
                    None => tree.remove(key)?,
                };
                self.shared.durability.make_durable()
            }
        }
    }

    /// All `(full key, value)` pairs whose full key starts with `prefix`, in
    /// key order, merging this transaction's writes over the database.
    pub(crate) fn raw_scan(&self, index: usize, prefix: &[u8]) -> Result<Pairs, StorageError> {
        let within = |k: &[u8]| k.starts_with(prefix);
        match &self.shared.cipher {
            None => self.merge_overlay(
                index,
                self.tree(index).scan_prefix(prefix).map(plain_row),
                prefix,
                within,
            ),
            Some(c) => {
                let rows = self.shared.opened_rows(c, index, prefix)?;
                self.merge_overlay(index, rows.into_iter().map(Ok), prefix, within)
            }
        }
    }

    /// Database `rows` of tree `index`, with this transaction's writes to keys
    /// from `start` on for which `within` holds laid over them (deletions hide
    /// rows), in key order.
    fn merge_overlay(
        &self,
        index: usize,
        rows: impl Iterator<Item = Result<Pair, StorageError>>,
        start: &[u8],
        within: impl Fn(&[u8]) -> bool,
    ) -> Result<Pairs, StorageError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for item in rows {
            let (k, v) = item?;
            merged.insert(k, Some(v));
        }
        if let Some(tx) = &self.tx {
            let inner = lock(&tx.inner);
            let writes = inner
                .writes
                .as_ref()
                .ok_or(StorageError::TransactionClosed)?;
            for ((_, k), v) in writes
                .range((index, start.to_vec())..)
                .take_while(|((i, k), _)| *i == index && within(k))
            {
                merged.insert(k.clone(), v.clone());
            }
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    // ----- the caller's own records -----

    /// Read a raw record (namespaced key) from a record tree.
    pub fn get_raw(&self, tree: RecordTree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.raw_get(tree.index, &self.full_key(key))
    }

    /// Write a raw record; inside a transaction it commits with the MLS writes.
    pub fn put_raw(&self, tree: RecordTree, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.raw_set(tree.index, self.full_key(key), Some(value.to_vec()))
    }

    /// Delete a raw record.
    pub fn remove_raw(&self, tree: RecordTree, key: &[u8]) -> Result<(), StorageError> {
        self.raw_set(tree.index, self.full_key(key), None)
    }

    /// Records of this namespace whose key starts with `prefix`, in key order
    /// (keys returned without the namespace).
    pub fn scan_raw(&self, tree: RecordTree, prefix: &[u8]) -> Result<Pairs, StorageError> {
        let ns_len = self.ns.len();
        Ok(self
            .raw_scan(tree.index, &self.full_key(prefix))?
            .into_iter()
            .map(|(k, v)| (k[ns_len..].to_vec(), v))
            .collect())
    }

    /// Records with `from <= key <= to_inclusive` (keys without the
    /// namespace), in key order, at most `limit` of them, merging this
    /// transaction's writes over the database.
    pub fn range_raw(
        &self,
        tree: RecordTree,
        from: &[u8],
        to_inclusive: &[u8],
        limit: usize,
    ) -> Result<Pairs, StorageError> {
        let (lo, hi) = (self.full_key(from), self.full_key(to_inclusive));
        let ns_len = self.ns.len();
        // Outside a transaction nothing can hide an entry, so the limit applies
        // to the database read directly.
        let db_limit = if self.tx.is_some() { usize::MAX } else { limit };
        let rows: Box<dyn Iterator<Item = Result<Pair, StorageError>>> = match &self.shared.cipher {
            None => Box::new(
                self.tree(tree.index)
                    .range(lo.clone()..=hi.clone())
                    .map(plain_row)
                    .take(db_limit),
            ),
            Some(c) => {
                let common = lo.iter().zip(&hi).take_while(|(a, b)| a == b).count();
                let rows = self.shared.opened_rows(c, tree.index, &lo[..common])?;
                Box::new(
                    rows.into_iter()
                        .filter(|(k, _)| *k >= lo && *k <= hi)
                        .take(db_limit)
                        .map(Ok),
                )
            }
        };
        Ok(self
            .merge_overlay(tree.index, rows, &lo, |k| k <= hi.as_slice())?
            .into_iter()
            .map(|(k, v)| (k[ns_len..].to_vec(), v))
            .take(limit)
            .collect())
    }

    /// Call `f` with every record whose key (without the namespace) lies
    /// in `from..=to_inclusive`, in key order, as stored in the database
    /// (ignores uncommitted writes), until `f` fails. Unlike
    /// [`SledStorage::range_raw`] nothing is copied or collected: a scan of
    /// the whole database holds one record at a time.
    pub fn for_each_raw<E: From<StorageError>>(
        &self,
        tree: RecordTree,
        from: &[u8],
        to_inclusive: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let (lo, hi) = (self.full_key(from), self.full_key(to_inclusive));
        let ns_len = self.ns.len();
        if let Some(c) = &self.shared.cipher {
            let common = lo.iter().zip(&hi).take_while(|(a, b)| a == b).count();
            for (k, v) in self.shared.opened_rows(c, tree.index, &lo[..common])? {
                if k >= lo && k <= hi {
                    f(&k[ns_len..], &v)?;
                }
            }
            return Ok(());
        }
        for item in self.tree(tree.index).range(lo..=hi) {
            let (k, v) = item.map_err(StorageError::from)?;
            f(&k[ns_len..], &v)?;
        }
        Ok(())
    }

    /// The last record whose key starts with `prefix` (key without the
    /// namespace), as stored in the database (ignores uncommitted writes).
    pub fn last_raw(&self, tree: RecordTree, prefix: &[u8]) -> Result<Option<Pair>, StorageError> {
        let ns_len = self.ns.len();
        if let Some(c) = &self.shared.cipher {
            let last = self
                .shared
                .opened_rows(c, tree.index, &self.full_key(prefix))?
                .pop();
            return Ok(last.map(|(k, v)| (k[ns_len..].to_vec(), v)));
        }
        match self
            .tree(tree.index)
            .scan_prefix(self.full_key(prefix))
            .next_back()
        {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some((k[ns_len..].to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Read a typed project record (as written by [`SledStorage::put_record`]).
    pub fn get_record<T: bincode::Decode<()>>(
        &self,
        tree: RecordTree,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let full = self.full_key(key);
        match self.raw_get(tree.index, &full)? {
            Some(bytes) => Ok(Some(crate::codec::decode_record(
                &self.tree_name(tree.index),
                &full,
                &bytes,
            )?)),
            None => Ok(None),
        }
    }

    /// Write a typed project record (bincode 2 behind a version byte; see
    /// [`crate::codec`]).
    pub fn put_record<T: bincode::Encode>(
        &self,
        tree: RecordTree,
        key: &[u8],
        value: &T,
    ) -> Result<(), StorageError> {
        let bytes = crate::codec::encode_record(&self.tree_name(tree.index), value)?;
        self.raw_set(tree.index, self.full_key(key), Some(bytes))
    }
}
