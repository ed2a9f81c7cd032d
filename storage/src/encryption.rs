//! Encryption at rest: what [`crate::StoreConfig::encryption`] turns on.
//!
//! Every value is sealed with XChaCha20-Poly1305 under a random nonce, bound
//! to its tree and stored key (a value moved to another key fails to open).
//! Keys are replaced by keyed hashes (HMAC-SHA256), so that no group id,
//! client id or key material appears in a key; the logical key travels
//! inside the sealed value, so scans can give it back.
//!
//! Prefix scans need related keys to stay together: a stored key is the
//! tag of its *bucket* (8 bytes) followed by the tag of the whole key (16
//! bytes). A key's bucket is its namespace and the part of the key up to
//! and including its first `/` (the whole key if it has none), so a scan
//! for a prefix that contains a `/` reads one bucket; any other scan reads
//! the whole tree. Either way the rows are opened, filtered by logical
//! prefix and sorted, so callers see the same rows in the same order as
//! without encryption.
//!
//! What it hides and what it does not (also in `docs/ARCHITECTURE.md`):
//! contents, ids and keys are unreadable without the key, also in old
//! copies sled keeps in its files until it reuses the space (they were
//! written sealed). The number of rows per tree and bucket, their sizes,
//! the tree names and the times of writes stay visible.
//!
//! The store key is the app's 32 bytes (e.g. from a platform keychain) or
//! derived from a passphrase with Argon2id and a random salt kept in the
//! database's metadata. A check tag kept beside it tells a wrong key apart
//! before anything is read or written.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit as _, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use std::path::{Path, PathBuf};

use crate::error::StorageError;
use crate::store::{holds_data, ENCRYPTION_KEY, FORMAT_KEY, FORMAT_SEALED, FORMAT_VERSION};
use crate::trees::META_TREE;

/// Layout version of a sealed value (its first byte).
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const BUCKET_TAG: usize = 8;
const KEY_TAG: usize = 16;
/// Argon2id cost for passphrases: 64 MiB, 3 passes, one lane (the
/// parameters OWASP lists for Argon2id; about half a second on a phone).
const ARGON2_M_KIB: u32 = 64 * 1024;
const ARGON2_T: u32 = 3;
const ARGON2_P: u32 = 1;
const SALT_LEN: usize = 16;
/// Bounds on the Argon2id costs a store's record may ask for: the record is
/// read before anything can be authenticated, and a damaged one must not
/// make opening allocate terabytes or run for days.
const ARGON2_MAX_M_KIB: u32 = 1024 * 1024;
const ARGON2_MAX_T: u32 = 16;
const ARGON2_MAX_P: u32 = 8;

/// The key a store is encrypted with: 32 bytes the app keeps (a platform
/// keychain), or a passphrase stretched with Argon2id.
///
/// With it, values are sealed with XChaCha20-Poly1305 and keys replaced by
/// keyed hashes: group ids, client ids, keys and message contents are not
/// readable in the store's files, old copies that sled keeps until it
/// reuses the space included. Tree names, the number and sizes of rows and
/// when they were written stay visible. A store is encrypted or not from its
/// creation on; opening it with another key is [`StorageError::WrongKey`],
/// without one [`StorageError::KeyRequired`], and a key for an unencrypted
/// store [`StorageError::NotEncrypted`], none of which writes anything.
#[derive(Clone)]
pub struct StoreKey(KeySource);

#[derive(Clone)]
enum KeySource {
    Raw(Zeroizing<[u8; 32]>),
    Passphrase(Zeroizing<Vec<u8>>),
}

impl StoreKey {
    /// A key of 32 random bytes the app stores itself.
    pub fn from_bytes(key: [u8; 32]) -> StoreKey {
        StoreKey(KeySource::Raw(Zeroizing::new(key)))
    }

    /// A key derived from a passphrase (Argon2id, 64 MiB, 3 passes, with a
    /// random salt kept in the database). Opening derives it, which takes
    /// a noticeable fraction of a second on purpose. The passphrase's UTF-8
    /// bytes are used as given (no Unicode normalization); an empty one is
    /// refused when the store is opened.
    pub fn from_passphrase(passphrase: &str) -> StoreKey {
        StoreKey(KeySource::Passphrase(Zeroizing::new(
            passphrase.as_bytes().to_vec(),
        )))
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            KeySource::Raw(_) => "StoreKey(raw, redacted)",
            KeySource::Passphrase(_) => "StoreKey(passphrase, redacted)",
        })
    }
}

/// How a store's key is made, as kept in its metadata (not secret).
#[derive(Clone, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub(crate) enum KeyOrigin {
    Raw,
    Argon2id {
        m_kib: u32,
        t: u32,
        p: u32,
        salt: [u8; SALT_LEN],
    },
}

/// The metadata record of an encrypted store.
#[derive(Clone, Debug, bincode::Encode, bincode::Decode)]
pub(crate) struct EncryptionRecord {
    pub(crate) origin: KeyOrigin,
    /// Tag that tells the right key apart.
    pub(crate) check: [u8; 32],
}

/// A logical key and its value, opened from a stored row.
pub(crate) struct Opened {
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
}

/// The sealing keys of an open encrypted store.
pub(crate) struct Cipher {
    aead: XChaCha20Poly1305,
    key_tags: Hmac<Sha256>,
}

type Master = Zeroizing<[u8; 32]>;

fn prf(key: &[u8], label: &[u8]) -> Master {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(b"mls-ds-storage v1 ");
    m.update(label);
    Zeroizing::new(m.finalize().into_bytes().into())
}

fn master(key: &StoreKey, origin: &KeyOrigin) -> Result<Master, StorageError> {
    match (&key.0, origin) {
        (KeySource::Raw(k), KeyOrigin::Raw) => Ok(k.clone()),
        (
            KeySource::Passphrase(p),
            KeyOrigin::Argon2id {
                m_kib,
                t,
                p: lanes,
                salt,
            },
        ) => {
            if p.is_empty() {
                return Err(StorageError::Encryption(
                    "an empty passphrase protects nothing".into(),
                ));
            }
            if *m_kib > ARGON2_MAX_M_KIB || *t > ARGON2_MAX_T || *lanes > ARGON2_MAX_P {
                return Err(StorageError::BadFormatRecord(format!(
                    "encryption record asks for Argon2id costs beyond the bounds (m {m_kib} KiB, t {t}, p {lanes})"
                )));
            }
            let params = Params::new(*m_kib, *t, *lanes, Some(32))
                .map_err(|e| StorageError::Encryption(format!("argon2 parameters: {e}")))?;
            let mut out = Zeroizing::new([0u8; 32]);
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password_into(p, salt, out.as_mut())
                .map_err(|e| StorageError::Encryption(format!("argon2: {e}")))?;
            Ok(out)
        }
        (KeySource::Raw(_), KeyOrigin::Argon2id { .. }) => Err(StorageError::WrongKey(
            "the store was encrypted with a passphrase, not a raw key".into(),
        )),
        (KeySource::Passphrase(_), KeyOrigin::Raw) => Err(StorageError::WrongKey(
            "the store was encrypted with a raw key, not a passphrase".into(),
        )),
    }
}

fn check_tag(master: &Master) -> [u8; 32] {
    *prf(master.as_ref(), b"key check")
}

impl Cipher {
    /// The record for a new store encrypted with `key`, and its cipher.
    pub(crate) fn create(key: &StoreKey) -> Result<(EncryptionRecord, Cipher), StorageError> {
        let origin = match key.0 {
            KeySource::Raw(_) => KeyOrigin::Raw,
            KeySource::Passphrase(_) => {
                let mut salt = [0u8; SALT_LEN];
                salt.copy_from_slice(&XChaCha20Poly1305::generate_nonce(&mut OsRng)[..SALT_LEN]);
                KeyOrigin::Argon2id {
                    m_kib: ARGON2_M_KIB,
                    t: ARGON2_T,
                    p: ARGON2_P,
                    salt,
                }
            }
        };
        let master = master(key, &origin)?;
        let record = EncryptionRecord {
            origin,
            check: check_tag(&master),
        };
        Ok((record, Cipher::from_master(&master)))
    }

    /// The cipher of an existing store; [`StorageError::WrongKey`] if `key`
    /// is not its key.
    pub(crate) fn open(key: &StoreKey, record: &EncryptionRecord) -> Result<Cipher, StorageError> {
        let master = master(key, &record.origin)?;
        let expected = check_tag(&master);
        // Constant time: the comparison must not tell how much matched.
        let diff = expected
            .iter()
            .zip(record.check.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(StorageError::WrongKey(
                "the key does not open this store".into(),
            ));
        }
        Ok(Cipher::from_master(&master))
    }

    fn from_master(master: &Master) -> Cipher {
        let value_key = prf(master.as_ref(), b"values");
        let tag_key = prf(master.as_ref(), b"keys");
        Cipher {
            aead: XChaCha20Poly1305::new(value_key.as_ref().into()),
            key_tags: <Hmac<Sha256> as KeyInit>::new_from_slice(tag_key.as_ref())
                .unwrap_or_else(|_| unreachable!()),
        }
    }

    fn tag(&self, tree: &str, kind: u8, bytes: &[u8], len: usize) -> Vec<u8> {
        let mut m = self.key_tags.clone();
        m.update(&[kind]);
        m.update(&(tree.len() as u64).to_be_bytes());
        m.update(tree.as_bytes());
        m.update(bytes);
        m.finalize().into_bytes()[..len].to_vec()
    }

    /// The stored form of logical key `key` of `tree`.
    pub(crate) fn stored_key(&self, tree: &str, key: &[u8]) -> Vec<u8> {
        let bucket = bucket_len(key).unwrap_or(key.len());
        let mut k = self.tag(tree, 0, &key[..bucket], BUCKET_TAG);
        k.extend(self.tag(tree, 1, key, KEY_TAG));
        k
    }

    /// The stored prefix every key starting with `prefix` has, if `prefix`
    /// fixes the bucket; `None`: such keys may lie anywhere in the tree.
    pub(crate) fn stored_prefix(&self, tree: &str, prefix: &[u8]) -> Option<Vec<u8>> {
        bucket_len(prefix).map(|b| self.tag(tree, 0, &prefix[..b], BUCKET_TAG))
    }

    /// Seal `value` of logical `key`, stored under `stored_key`.
    pub(crate) fn seal(
        &self,
        tree: &str,
        stored_key: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> Result<Vec<u8>, StorageError> {
        let key_len = u32::try_from(key.len())
            .map_err(|_| StorageError::Encryption("key longer than 4 GiB".into()))?;
        let mut plain = Zeroizing::new(Vec::with_capacity(4 + key.len() + value.len()));
        plain.extend_from_slice(&key_len.to_be_bytes());
        plain.extend_from_slice(key);
        plain.extend_from_slice(value);
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = aad(tree, stored_key);
        let sealed = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| StorageError::Encryption("sealing a value failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend(sealed);
        Ok(out)
    }

    /// Open a stored row: its logical key and value.
    pub(crate) fn open_row(
        &self,
        tree: &str,
        stored_key: &[u8],
        stored: &[u8],
    ) -> Result<Opened, StorageError> {
        let corrupt = |reason: &str| StorageError::Corrupt {
            tree: tree.to_owned(),
            key_hex: hex::encode(stored_key),
            reason: reason.to_owned(),
        };
        let (&version, rest) = stored.split_first().ok_or_else(|| corrupt("empty value"))?;
        if version != SEALED_V1 {
            return Err(corrupt("not a sealed value of this format"));
        }
        if rest.len() < NONCE_LEN {
            return Err(corrupt("sealed value too short"));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let aad = aad(tree, stored_key);
        let plain = Zeroizing::new(
            self.aead
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
                .map_err(|_| corrupt("sealed value fails authentication"))?,
        );
        let len_bytes: [u8; 4] = plain
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt("sealed value too short"))?;
        let key_end = usize::try_from(u32::from_be_bytes(len_bytes))
            .ok()
            .and_then(|n| n.checked_add(4))
            .filter(|&end| end <= plain.len())
            .ok_or_else(|| corrupt("sealed value names a key longer than itself"))?;
        Ok(Opened {
            key: plain[4..key_end].to_vec(),
            value: plain[key_end..].to_vec(),
        })
    }
}

fn aad(tree: &str, stored_key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(8 + tree.len() + stored_key.len());
    a.extend_from_slice(&(tree.len() as u64).to_be_bytes());
    a.extend_from_slice(tree.as_bytes());
    a.extend_from_slice(stored_key);
    a
}

/// Length of the bucket of a namespaced key (`[len] ++ namespace ++ rest`):
/// through the first `/` of `rest`; `None` if `rest` has none.
fn bucket_len(key: &[u8]) -> Option<usize> {
    let ns_end = 1 + usize::from(*key.first()?);
    let rest = key.get(ns_end..)?;
    rest.iter().position(|&b| b == b'/').map(|i| ns_end + i + 1)
}

// ----- opening a store -----

/// The cipher of an encrypted store; `None` for an unencrypted one.
///
/// A store is encrypted or not from its first row on: opening one with data
/// without its key, with another key, or an unencrypted one with a key is
/// an error that writes nothing. A store without data takes whatever it is
/// opened with (a new key, or none), so that a first command that failed
/// after opening does not lock an empty store to its key.
pub(crate) fn open_store_cipher(
    db: &sled::Db,
    path: Option<&Path>,
    format: u32,
    key: Option<&StoreKey>,
) -> Result<Option<Cipher>, StorageError> {
    let path = || path.map_or_else(|| PathBuf::from("<temporary>"), Path::to_path_buf);
    let meta = db.open_tree(META_TREE)?;
    let record: Option<EncryptionRecord> = match meta.get(ENCRYPTION_KEY)? {
        Some(v) => Some(crate::codec::decode_record(META_TREE, ENCRYPTION_KEY, &v)?),
        None => None,
    };
    if !holds_data(db) {
        return set_up_encryption(db, &meta, format, record, key);
    }
    match (format, record, key) {
        (FORMAT_VERSION, None, None) => Ok(None),
        (FORMAT_VERSION, None, Some(_)) => Err(StorageError::NotEncrypted { path: path() }),
        (FORMAT_SEALED, Some(_), None) => Err(StorageError::KeyRequired { path: path() }),
        (FORMAT_SEALED, Some(record), Some(key)) => Cipher::open(key, &record).map(Some),
        (FORMAT_SEALED, None, _) => Err(StorageError::BadFormatRecord(
            "the store is encrypted, but its encryption record is missing".into(),
        )),
        _ => Err(StorageError::BadFormatRecord(
            "an encryption record in a store of the unencrypted format".into(),
        )),
    }
}

/// Make an empty store encrypted under `key` (keeping its record if `key`
/// already opens it), or unencrypted without one.
fn set_up_encryption(
    db: &sled::Db,
    meta: &sled::Tree,
    format: u32,
    record: Option<EncryptionRecord>,
    key: Option<&StoreKey>,
) -> Result<Option<Cipher>, StorageError> {
    let mut batch = sled::Batch::default();
    let cipher = match (key, record) {
        (Some(key), Some(record)) if format == FORMAT_SEALED => match Cipher::open(key, &record) {
            Ok(cipher) => return Ok(Some(cipher)),
            Err(StorageError::WrongKey(_)) => Some(seal_anew(&mut batch, key)?),
            Err(e) => return Err(e),
        },
        (Some(key), _) => Some(seal_anew(&mut batch, key)?),
        (None, record) => {
            if record.is_none() && format == FORMAT_VERSION {
                return Ok(None);
            }
            batch.remove(ENCRYPTION_KEY);
            batch.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes());
            None
        }
    };
    // Format and record change in one write: a crash leaves either.
    meta.apply_batch(batch)?;
    db.flush()?;
    Ok(cipher)
}

/// A new encryption record for `key`, added to `batch` with the sealed format.
fn seal_anew(batch: &mut sled::Batch, key: &StoreKey) -> Result<Cipher, StorageError> {
    let (record, cipher) = Cipher::create(key)?;
    batch.insert(
        ENCRYPTION_KEY,
        crate::codec::encode_record(META_TREE, &record)?,
    );
    batch.insert(FORMAT_KEY, &FORMAT_SEALED.to_be_bytes());
    Ok(cipher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> Cipher {
        Cipher::create(&StoreKey::from_bytes([7; 32])).unwrap().1
    }

    #[test]
    fn buckets_end_at_the_first_slash_after_the_namespace() {
        assert_eq!(bucket_len(b"\x02a/inbox/x/y"), Some(9));
        assert_eq!(bucket_len(b"\x02a/cursor"), None);
        assert_eq!(bucket_len(b""), None);
        assert_eq!(bucket_len(b"\x05ab"), None);
    }

    #[test]
    fn keys_of_one_bucket_share_the_scan_prefix() {
        let c = cipher();
        let p = c.stored_prefix("t", b"\x01ainbox/").unwrap();
        for k in [&b"\x01ainbox/1"[..], b"\x01ainbox/2/3"] {
            assert!(c.stored_key("t", k).starts_with(&p));
        }
        assert!(!c.stored_key("t", b"\x01aoutbox/1").starts_with(&p));
        assert_ne!(c.stored_key("t", b"\x01ak"), c.stored_key("u", b"\x01ak"));
    }

    #[test]
    fn values_open_only_under_their_tree_and_key() {
        let c = cipher();
        let sk = c.stored_key("t", b"\x00k");
        let sealed = c.seal("t", &sk, b"\x00k", b"secret").unwrap();
        let opened = c.open_row("t", &sk, &sealed).unwrap();
        assert_eq!(
            (opened.key.as_slice(), opened.value.as_slice()),
            (&b"\x00k"[..], &b"secret"[..])
        );
        assert!(c.open_row("u", &sk, &sealed).is_err());
        assert!(c
            .open_row("t", &c.stored_key("t", b"\x00j"), &sealed)
            .is_err());
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(c.open_row("t", &sk, &flipped).is_err());
    }

    #[test]
    fn argon2_costs_beyond_the_bounds_are_refused_before_any_work() {
        let record = EncryptionRecord {
            origin: KeyOrigin::Argon2id {
                m_kib: u32::MAX,
                t: 3,
                p: 1,
                salt: [0; SALT_LEN],
            },
            check: [0; 32],
        };
        assert!(matches!(
            Cipher::open(&StoreKey::from_passphrase("x"), &record),
            Err(StorageError::BadFormatRecord(_))
        ));
        assert!(matches!(
            Cipher::create(&StoreKey::from_passphrase("")),
            Err(StorageError::Encryption(_))
        ));
    }

    #[test]
    fn a_wrong_key_is_told_apart() {
        let (record, _) = Cipher::create(&StoreKey::from_bytes([1; 32])).unwrap();
        assert!(Cipher::open(&StoreKey::from_bytes([1; 32]), &record).is_ok());
        assert!(matches!(
            Cipher::open(&StoreKey::from_bytes([2; 32]), &record),
            Err(StorageError::WrongKey(_))
        ));
        assert!(matches!(
            Cipher::open(&StoreKey::from_passphrase("x"), &record),
            Err(StorageError::WrongKey(_))
        ));
    }
}
