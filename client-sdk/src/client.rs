//! The durable client: identity, groups and the queue cursor live in sled, and
//! every MLS operation is one atomic write together with the SDK's records.
//!
//! This module owns [`Client`] itself (its state and the few helpers every
//! operation shares); the operations are in submodules by concern:
//!
//! * `config`: [`ClientConfig`] and the MLS group configuration;
//! * `identity`: opening the store, the identity, registering;
//! * `key_packages`: keeping key packages on the DS;
//! * `recovery`: the recovery code, and taking the id back after a lost store;
//! * `groups`: what the application does with a group;
//! * `commit`: the commit discipline and its outbox;
//! * `sends`: the send outbox, exactly-once application messages;
//! * `sync`: receiving the DS queue;
//! * `heal`: noticing that this client fell out of a group, and rejoining;
//! * `stream`: receiving as a stream the DS pushes;
//! * `inbox`: handing received events to the application.

mod commit;
mod config;
mod groups;
mod heal;
mod identity;
mod inbox;
mod key_packages;
mod recovery;
mod sends;
mod stream;
mod sync;

pub use config::{create_config, join_config, ClientConfig, CIPHERSUITE};
pub use recovery::RecoveryCode;
pub use sends::QueuedSend;
pub use stream::EventStream;

use std::collections::HashMap;

use mls_ds_protocol::ClientId;
use mls_ds_storage::{RecordTree, SledProvider, SledStorage, Store};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use tokio::sync::Mutex;

use crate::api::DsApi;
use crate::error::{mls, ClientError, Result};

/// The SDK's record tree, as named in errors about its records.
const RECORDS: &str = "app.sdk";

/// State that MLS operations change, behind one lock so that an operation
/// and the durable write of its result are not interleaved with another.
struct Inner {
    groups: HashMap<Vec<u8>, MlsGroup>,
}

/// A durable MLS client of one DS.
pub struct Client {
    id: ClientId,
    store: Store,
    provider: SledProvider,
    records: RecordTree,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    api: DsApi,
    config: ClientConfig,
    inner: Mutex<Inner>,
    /// Held while the send outbox is delivered, so that its order holds.
    sending: Mutex<()>,
    /// Held while suspect groups are checked and rejoined.
    healing: Mutex<()>,
    /// When the key packages on the DS were last checked (`None`: due).
    key_packages_checked: std::sync::Mutex<Option<std::time::Instant>>,
}

fn wire<T: openmls::prelude::tls_codec::Serialize>(v: &T) -> Result<Vec<u8>> {
    v.tls_serialize_detached().map_err(mls)
}

fn member_id(m: &Member) -> String {
    BasicCredential::try_from(m.credential.clone())
        .map(|c| String::from_utf8_lossy(c.identity()).into_owned())
        .unwrap_or_else(|_| "<non-basic credential>".into())
}

fn group<'a>(inner: &'a Inner, gid: &[u8]) -> Result<&'a MlsGroup> {
    inner
        .groups
        .get(gid)
        .ok_or_else(|| ClientError::NotInGroup {
            group_id: gid.to_vec(),
        })
}

fn group_mut<'a>(inner: &'a mut Inner, gid: &[u8]) -> Result<&'a mut MlsGroup> {
    inner
        .groups
        .get_mut(gid)
        .ok_or_else(|| ClientError::NotInGroup {
            group_id: gid.to_vec(),
        })
}

impl Client {
    /// This client's id.
    pub fn id(&self) -> &ClientId {
        &self.id
    }

    /// The low-level API (for operations the SDK does not wrap).
    pub fn api(&self) -> &DsApi {
        &self.api
    }

    /// The local store (for the application's own records, which may join the
    /// SDK's transactions through [`Client::process_events`]).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn storage(&self) -> &SledStorage {
        self.provider.storage()
    }

    /// Replace a group in memory by what is on disk, after a failed operation
    /// may have changed it without its write reaching the store.
    fn reload(&self, inner: &mut Inner, group_id: &[u8]) -> Result<()> {
        match MlsGroup::load(self.storage(), &GroupId::from_slice(group_id))? {
            Some(g) => {
                inner.groups.insert(group_id.to_vec(), g);
            }
            None => {
                inner.groups.remove(group_id);
            }
        }
        Ok(())
    }
}
