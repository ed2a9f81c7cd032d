//! Key package upkeep: keeping enough of this client's key packages on the
//! DS, and a fresh last-resort one, so that others can always add it to
//! groups.
//!
//! The last resort is replaced once it was handed out (the DS counts its
//! claims) and before its lifetime ends. Its private key is not deleted at
//! once: a Welcome to it may still be on its way, so the replaced package is
//! listed as retired and its key deleted
//! [`ClientConfig::retired_last_resort_keep`](super::ClientConfig) later.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mls_ds_protocol::key_packages::KeyPackageCount;
use mls_ds_storage::SledProvider;
use openmls::prelude::*;
use openmls_traits::storage::StorageProvider as _;
use tls_codec::Deserialize as _;

use super::{wire, Client, CIPHERSUITE};
use crate::error::{mls, Result};
use crate::records::{self, LastResort, Retired};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether the last resort must be replaced: missing, handed out, or
/// expiring within `refresh_before` of `now` (Unix seconds).
fn last_resort_due(count: &KeyPackageCount, refresh_before: Duration, now: u64) -> bool {
    let refresh_at = count
        .last_resort_not_after
        .saturating_sub(refresh_before.as_secs());
    !count.has_last_resort.0 || count.last_resort_claims > 0 || now >= refresh_at
}

/// A new package and the reference its private key is stored under
/// (TLS-encoded `KeyPackageRef`).
struct Made {
    message: Vec<u8>,
    hash_ref: Vec<u8>,
}

impl Client {
    /// Top up the key packages on the DS to the configured minimum, and
    /// publish a new last-resort package if there is none, the current one
    /// was handed out, or it expires within
    /// [`ClientConfig::last_resort_refresh_before`](super::ClientConfig).
    /// [`Client::sync`] calls this by itself (after a Welcome, and at most
    /// every [`ClientConfig::key_package_check_interval`](super::ClientConfig)
    /// otherwise); call it directly to see its errors.
    pub async fn ensure_key_packages(&self) -> Result<()> {
        let count = self.api.key_package_count().await?;
        *self
            .key_packages_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let need = self
            .config
            .min_key_packages
            .saturating_sub(count.remaining as usize);
        let rotate = last_resort_due(&count, self.config.last_resort_refresh_before, now_secs());
        if need > 0 || rotate {
            self.publish(need, rotate).await?;
        }
        self.delete_retired_keys()
    }

    /// Whether [`Client::sync`] should check the key packages now.
    pub(super) fn key_packages_due(&self) -> bool {
        let checked = *self
            .key_packages_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        checked.is_none_or(|t| t.elapsed() >= self.config.key_package_check_interval)
    }

    /// A Welcome used one of the published packages: check on the next sync.
    pub(super) fn key_package_used(&self) {
        *self
            .key_packages_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Publish `need` ordinary packages and, if `rotate`, a new last resort.
    async fn publish(&self, need: usize, rotate: bool) -> Result<()> {
        // The private keys are stored before the packages are published, so
        // a Welcome to any published package can be opened after a crash.
        let tx = self.provider.begin();
        let fresh = (0..need)
            .map(|_| self.new_key_package(&tx, false).map(|m| m.message))
            .collect::<Result<Vec<_>>>()?;
        let last_resort = if rotate {
            Some(self.new_key_package(&tx, true)?)
        } else {
            None
        };
        tx.commit()?;
        self.api
            .publish_key_packages(fresh, last_resort.as_ref().map(|m| m.message.clone()))
            .await?;
        if let Some(new) = last_resort {
            // Only once the DS holds the new one is the old one retired: a
            // crash in between keeps the old key for good, which costs a few
            // hundred bytes, where retiring first could delete a key that the
            // DS still hands out.
            self.retire_last_resort(new.hash_ref)?;
        }
        Ok(())
    }

    /// Record `current` as the published last resort and the one it replaced
    /// as retired, in one write.
    fn retire_last_resort(&self, current: Vec<u8>) -> Result<()> {
        let tx = self.storage().begin();
        if let Some(old) = tx.get_record::<LastResort>(self.records, records::LAST_RESORT)? {
            tx.put_record(
                self.records,
                &records::retired_key(&old.hash_ref),
                &Retired {
                    retired_at: now_secs(),
                },
            )?;
        }
        tx.put_record(
            self.records,
            records::LAST_RESORT,
            &LastResort { hash_ref: current },
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Delete the private keys of last-resort packages retired long enough.
    fn delete_retired_keys(&self) -> Result<()> {
        let now = now_secs();
        let keep = self.config.retired_last_resort_keep.as_secs();
        let tx = self.storage().begin();
        for (key, _) in self
            .storage()
            .scan_raw(self.records, records::RETIRED_PREFIX)?
        {
            let Some(retired) = tx.get_record::<Retired>(self.records, &key)? else {
                continue;
            };
            if now < retired.retired_at.saturating_add(keep) {
                continue;
            }
            let hash_ref =
                KeyPackageRef::tls_deserialize_exact(&key[records::RETIRED_PREFIX.len()..])
                    .map_err(mls)?;
            tx.delete_key_package(&hash_ref)?;
            tx.remove_raw(self.records, &key)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A new key package (a last-resort one if `last_resort`), its private
    /// keys written through `tx`.
    fn new_key_package(&self, tx: &SledProvider, last_resort: bool) -> Result<Made> {
        let mut builder = KeyPackage::builder();
        if last_resort {
            builder = builder.mark_as_last_resort().leaf_node_capabilities(
                Capabilities::builder()
                    .extensions(vec![ExtensionType::LastResort])
                    .build(),
            );
        }
        let bundle = builder
            .build(CIPHERSUITE, tx, &self.signer, self.credential.clone())
            .map_err(mls)?;
        let hash_ref = wire(&bundle.key_package().hash_ref(tx.crypto()).map_err(mls)?)?;
        Ok(Made {
            message: wire(&MlsMessageOut::from(bundle.key_package().clone()))?,
            hash_ref,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_resort_is_replaced_when_missing_handed_out_or_expiring() {
        let day = 24 * 3600;
        let fortnight = Duration::from_secs(14 * day);
        let count = |has: bool, claims: u64, not_after: u64| KeyPackageCount {
            remaining: 5,
            has_last_resort: has.into(),
            last_resort_claims: claims,
            last_resort_not_after: not_after,
        };
        let now = 1_000 * day;
        assert!(last_resort_due(&count(false, 0, 0), fortnight, now));
        assert!(last_resort_due(
            &count(true, 1, now + 80 * day),
            fortnight,
            now
        ));
        assert!(!last_resort_due(
            &count(true, 0, now + 80 * day),
            fortnight,
            now
        ));
        assert!(!last_resort_due(
            &count(true, 0, now + 15 * day),
            fortnight,
            now
        ));
        assert!(last_resort_due(
            &count(true, 0, now + 14 * day),
            fortnight,
            now
        ));
        assert!(last_resort_due(&count(true, 0, now - 1), fortnight, now));
    }
}
