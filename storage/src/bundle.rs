//! The provider bundle application code hands to OpenMLS: RustCrypto for
//! crypto and randomness, [`SledStorage`] for state.

use std::sync::Arc;

use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;

use crate::error::StorageError;
use crate::store::{SledStorage, Transaction};

/// An `OpenMlsProvider` whose storage is sled.
///
/// Pass `&provider` to `MlsGroup` calls. Wrap every MLS operation in
/// [`SledProvider::transaction`] so that it reaches the disk all or nothing.
#[derive(Clone, Debug)]
pub struct SledProvider {
    crypto: Arc<RustCrypto>,
    storage: SledStorage,
}

impl SledProvider {
    /// Bundle `storage` with a fresh RustCrypto instance.
    pub fn new(storage: SledStorage) -> Self {
        SledProvider {
            crypto: Arc::new(RustCrypto::default()),
            storage,
        }
    }

    /// The sled storage (also reachable through `OpenMlsProvider::storage`).
    pub fn storage(&self) -> &SledStorage {
        &self.storage
    }

    /// Run one MLS operation atomically: `f` gets a provider whose storage is
    /// a transaction view; its writes commit together when `f` returns `Ok`
    /// and are discarded when it returns `Err`.
    pub fn transaction<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&SledProvider) -> Result<T, E>,
        E: From<StorageError>,
    {
        if self.storage.in_transaction() {
            return f(self);
        }
        let tx = self.begin();
        let out = f(&tx.provider)?;
        tx.commit()?;
        Ok(out)
    }

    /// Start a transaction explicitly (for code that cannot use a closure).
    pub fn begin(&self) -> ProviderTransaction {
        let tx = self.storage.begin();
        ProviderTransaction {
            provider: SledProvider {
                crypto: self.crypto.clone(),
                storage: (*tx).clone(),
            },
            tx,
        }
    }
}

impl OpenMlsProvider for SledProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SledStorage;

    fn storage(&self) -> &SledStorage {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

/// A transaction on a [`SledProvider`]; derefs to the provider to pass to
/// OpenMLS. Dropping it without [`ProviderTransaction::commit`] rolls back.
pub struct ProviderTransaction {
    provider: SledProvider,
    tx: Transaction,
}

impl std::ops::Deref for ProviderTransaction {
    type Target = SledProvider;
    fn deref(&self) -> &SledProvider {
        &self.provider
    }
}

impl ProviderTransaction {
    /// Commit atomically and wait for durability.
    pub fn commit(self) -> Result<(), StorageError> {
        self.tx.commit()
    }

    /// The underlying storage transaction, for callers that add their own
    /// records and commit it themselves.
    pub fn into_storage_transaction(self) -> Transaction {
        self.tx
    }
}
