//! Who the client is: opening its store, loading or creating its identity
//! (the signature key and the credential built on it) together with the
//! groups it is in, and registering that identity with the DS.

use std::collections::HashMap;
use std::path::Path;

use mls_ds_protocol::ClientId;
use mls_ds_storage::{RecordTree, SledProvider, SledStorage, Store, StoreConfig};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use tokio::sync::Mutex;

use super::recovery::RecoveryCode;
use super::{Client, ClientConfig, Inner, CIPHERSUITE};
use crate::api::DsApi;
use crate::error::{mls, ClientError, Result};
use crate::records::{self, Identity};
use crate::transport::{HttpPool, Transport};
use mls_ds_protocol::clients::recovery_hash;

impl Client {
    /// Open (or create) the client in `data_dir`, talking to `ds_url`. On
    /// first open `client_id` becomes the identity; later opens must pass the
    /// same id. Nothing is sent to the DS here.
    pub fn open(
        data_dir: impl AsRef<Path>,
        ds_url: &str,
        client_id: &str,
        config: ClientConfig,
    ) -> Result<Client> {
        Self::open_inner(data_dir.as_ref(), ds_url, Some(client_id), config)
    }

    /// Reopen a client created earlier in `data_dir`, whatever its id.
    pub fn open_existing(
        data_dir: impl AsRef<Path>,
        ds_url: &str,
        config: ClientConfig,
    ) -> Result<Client> {
        Self::open_inner(data_dir.as_ref(), ds_url, None, config)
    }

    fn open_inner(
        data_dir: &Path,
        ds_url: &str,
        client_id: Option<&str>,
        config: ClientConfig,
    ) -> Result<Client> {
        let store = open_store(data_dir, &config)?;
        let storage = store.storage(b"client")?;
        let records = store.record_tree("sdk")?;
        let provider = SledProvider::new(storage.clone());
        let stored = storage.get_record::<Identity>(records, records::IDENTITY)?;
        let id = id_to_open(data_dir, client_id, stored.as_ref())?;
        let signer = match stored {
            Some(identity) => stored_signer(&storage, &identity, &id)?,
            None => create_identity(&storage, records, &id)?,
        };
        let credential = CredentialWithKey {
            credential: BasicCredential::new(id.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        let groups = load_groups(&storage, records)?;
        let pool = HttpPool::with_tls(&config.tls)?;
        let mut transport = Transport::with_pool(ds_url, id.clone(), signer.clone(), pool)?;
        transport.rate_limit_wait = config.rate_limit_wait;
        transport.request_timeout = config.request_timeout;
        let api = DsApi::new(transport);
        Ok(Client {
            id,
            store,
            provider,
            records,
            signer,
            credential,
            api,
            config,
            inner: Mutex::new(Inner { groups }),
            sending: Mutex::new(()),
            healing: Mutex::new(()),
            key_packages_checked: std::sync::Mutex::new(None),
        })
    }

    /// Register with the DS and publish key packages. The first time, the
    /// answer is a recovery code, for the application to show once and the
    /// user to keep apart from the device: it takes the client id back
    /// after a lost store ([`Client::recover`]). The store never holds it
    /// (a thief of the store could lock the user out with it). `None`: the
    /// id already has a code, from an earlier registration. An application
    /// that must not lose the code to a crash between the DS's answer and
    /// the user seeing it makes it first ([`RecoveryCode::generate`]) and
    /// registers with [`Client::register_with_code`].
    pub async fn register(&self) -> Result<Option<RecoveryCode>> {
        self.register_with_invite(None).await
    }

    /// [`Client::register`], presenting the operator's invitation code if
    /// the DS asks for one.
    pub async fn register_with_invite(&self, invite: Option<&str>) -> Result<Option<RecoveryCode>> {
        let code = RecoveryCode::generate();
        Ok(self
            .register_with_code(invite, &code)
            .await?
            .then_some(code))
    }

    /// Register (idempotent) with a recovery code the application made and
    /// showed first. Returns whether the DS holds that code: true the first
    /// time and on every retry with the same code; false if the id already
    /// had another one.
    pub async fn register_with_code(
        &self,
        invite: Option<&str>,
        code: &RecoveryCode,
    ) -> Result<bool> {
        let registered = self
            .api
            .register_with_recovery(invite, recovery_hash(code.secret()))
            .await?;
        self.ensure_key_packages().await?;
        Ok(registered.recovery_set.0)
    }
}

fn open_store(data_dir: &Path, config: &ClientConfig) -> Result<Store> {
    Ok(Store::open(
        data_dir,
        StoreConfig {
            durability: config.durability,
            encryption: config.store_key.clone(),
            ..StoreConfig::default()
        },
    )?)
}

/// The id the client is opened as: the caller's if given (a stored identity
/// must then match it), else the stored one.
fn id_to_open(
    data_dir: &Path,
    requested: Option<&str>,
    stored: Option<&Identity>,
) -> Result<ClientId> {
    match (requested, stored) {
        (Some(c), _) => ClientId::new(c).map_err(|e| ClientError::Usage(e.to_string())),
        (None, Some(identity)) => ClientId::new(&identity.client_id)
            .map_err(|e| ClientError::Usage(format!("stored identity: {e}"))),
        (None, None) => Err(ClientError::Usage(format!(
            "no client in {}; register one first",
            data_dir.display()
        ))),
    }
}

/// The signature key of the stored identity, refusing a data directory that
/// belongs to another client.
fn stored_signer(
    storage: &SledStorage,
    identity: &Identity,
    id: &ClientId,
) -> Result<SignatureKeyPair> {
    if identity.client_id != id.as_bytes() {
        return Err(ClientError::Usage(format!(
            "this data directory belongs to client {}, not {id}",
            String::from_utf8_lossy(&identity.client_id)
        )));
    }
    let scheme = SignatureScheme::try_from(identity.signature_scheme)
        .map_err(|_| ClientError::Usage("stored identity has an unknown scheme".into()))?;
    SignatureKeyPair::read(storage, &identity.public_key, scheme).ok_or_else(|| {
        ClientError::Usage("the identity's private key is missing from storage".into())
    })
}

/// A fresh signature key, stored with the identity record in one write so
/// that a crash cannot leave one without the other.
fn create_identity(
    storage: &SledStorage,
    records: RecordTree,
    id: &ClientId,
) -> Result<SignatureKeyPair> {
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(mls)?;
    let tx = storage.begin();
    signer.store(&*tx)?;
    tx.put_record(
        records,
        records::IDENTITY,
        &Identity {
            client_id: id.as_bytes().to_vec(),
            signature_scheme: signer.signature_scheme() as u16,
            public_key: signer.public().to_vec(),
        },
    )?;
    tx.commit()?;
    Ok(signer)
}

/// The groups listed in the SDK's records, with their MLS state. A group
/// whose state does not load is left out and noted as suspect: the next
/// sync rejoins it.
fn load_groups(storage: &SledStorage, records: RecordTree) -> Result<HashMap<Vec<u8>, MlsGroup>> {
    let mut groups = HashMap::new();
    for (k, _) in storage.scan_raw(records, b"group/")? {
        let gid = k[b"group/".len()..].to_vec();
        match MlsGroup::load(storage, &GroupId::from_slice(&gid)) {
            Ok(Some(g)) => {
                groups.insert(gid, g);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(group = %hex::encode(&gid), error = %e, "group state does not load; it will be rejoined");
                storage.put_record(
                    records,
                    &records::suspect_key(&gid),
                    &records::Suspect {
                        reason: format!("the group's state did not load: {e}"),
                    },
                )?;
            }
        }
    }
    Ok(groups)
}
