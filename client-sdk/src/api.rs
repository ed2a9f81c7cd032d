//! Typed calls of the DS API (one method per endpoint), over [`Transport`].

use std::time::Duration;

use hyper::Method;
use mls_ds_protocol::auth::SessionCreated;
use mls_ds_protocol::clients::{GroupList, RecoverClient, RegisterClient, Registered};
use mls_ds_protocol::groups::{
    CommitAccepted, CommitBundle, CreateGroup, GroupCreated, GroupInfoResponse, MessageAccepted,
    SendId, SendMessage,
};
use mls_ds_protocol::key_packages::{ClaimedKeyPackage, KeyPackageCount, PublishKeyPackages};
use mls_ds_protocol::queue::{Ack, Acked, QueuePage};
use mls_ds_protocol::{decode, encode, paths, ClientId};

use crate::error::{ClientError, Result};
use crate::sse::QueueStream;
use crate::transport::{AuthMode, Transport};

fn enc<T: tls_codec::Serialize>(v: &T) -> Result<Vec<u8>> {
    encode(v).map_err(|e| ClientError::Usage(format!("cannot encode request: {e:?}")))
}

fn dec<T: tls_codec::Deserialize>(bytes: &[u8]) -> Result<T> {
    decode(bytes).map_err(|e| ClientError::BadResponse(e.to_string()))
}

/// The DS API for one client.
pub struct DsApi {
    /// The transport (public so callers can tune it, e.g. `always_sign`).
    pub transport: Transport,
}

impl DsApi {
    /// Wrap a transport.
    pub fn new(transport: Transport) -> DsApi {
        DsApi { transport }
    }

    /// The client id.
    pub fn client_id(&self) -> &ClientId {
        self.transport.client_id()
    }

    /// The request body of [`DsApi::register`]: this client's id and the
    /// public half of its signature key (for callers with their own HTTP
    /// client, together with [`Transport::authorization`]).
    pub fn registration_body(&self, invite: Option<&str>) -> Result<Vec<u8>> {
        self.registration_with(invite, None)
    }

    fn registration_with(
        &self,
        invite: Option<&str>,
        recovery_hash: Option<[u8; 32]>,
    ) -> Result<Vec<u8>> {
        let signer = self.transport.signer();
        enc(&RegisterClient {
            client_id: self.client_id().clone(),
            signature_scheme: signer.signature_scheme() as u16,
            signature_key: signer.public().to_vec().into(),
            invite: invite.map(|code| code.as_bytes().to_vec().into()),
            recovery_hash: recovery_hash.map(|h| h.to_vec().into()),
        })
    }

    /// Register (idempotent) with the hash of a recovery secret, with which
    /// the client can take its id back after losing its store
    /// ([`DsApi::recover`]).
    pub async fn register_with_recovery(
        &self,
        invite: Option<&str>,
        recovery_hash: [u8; 32],
    ) -> Result<Registered> {
        let body = self.registration_with(invite, Some(recovery_hash))?;
        let bytes = self
            .transport
            .send(Method::POST, paths::CLIENTS, body, AuthMode::Signature)
            .await?;
        dec(&bytes)
    }

    /// Take this client's id back with the key of this transport (a new
    /// one), proving it with the recovery secret; `next_hash` is the hash of
    /// the next recovery secret.
    pub async fn recover(&self, secret: &[u8], next_hash: [u8; 32]) -> Result<Registered> {
        let signer = self.transport.signer();
        let body = enc(&RecoverClient {
            signature_scheme: signer.signature_scheme() as u16,
            signature_key: signer.public().to_vec().into(),
            recovery_secret: secret.to_vec().into(),
            new_recovery_hash: next_hash.to_vec().into(),
        })?;
        let bytes = self
            .transport
            .send(
                Method::POST,
                &paths::recover(self.client_id()),
                body,
                AuthMode::Signature,
            )
            .await?;
        dec(&bytes)
    }

    /// The groups whose roster on the DS lists this client.
    pub async fn groups(&self) -> Result<GroupList> {
        let bytes = self
            .transport
            .send(Method::GET, paths::GROUPS, Vec::new(), AuthMode::Session)
            .await?;
        dec(&bytes)
    }

    /// Register this client with its signature key (idempotent).
    pub async fn register(&self) -> Result<Registered> {
        self.register_with_invite(None).await
    }

    /// Register this client with its signature key (idempotent), with the
    /// operator's invitation code if the DS's registration policy asks for
    /// one.
    pub async fn register_with_invite(&self, invite: Option<&str>) -> Result<Registered> {
        let body = self.registration_body(invite)?;
        let bytes = self
            .transport
            .send(Method::POST, paths::CLIENTS, body, AuthMode::Signature)
            .await?;
        dec(&bytes)
    }

    /// Open a session explicitly (normally done on demand).
    pub async fn open_session(&self) -> Result<SessionCreated> {
        let bytes = self
            .transport
            .send(
                Method::POST,
                paths::SESSIONS,
                Vec::new(),
                AuthMode::Signature,
            )
            .await?;
        dec(&bytes)
    }

    /// Delete a group this client is the last member of.
    pub async fn delete_group(&self, group_id: &[u8]) -> Result<()> {
        self.transport
            .send(
                Method::DELETE,
                &paths::group(group_id),
                Vec::new(),
                AuthMode::Session,
            )
            .await?;
        Ok(())
    }

    /// Delete this client from the DS.
    pub async fn delete_client(&self) -> Result<()> {
        self.transport
            .send(
                Method::DELETE,
                &paths::client(self.client_id()),
                Vec::new(),
                AuthMode::Session,
            )
            .await?;
        Ok(())
    }

    /// Publish key packages (MLSMessage bytes) and optionally a last-resort one.
    pub async fn publish_key_packages(
        &self,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<KeyPackageCount> {
        let body = enc(&PublishKeyPackages {
            key_packages: key_packages.into_iter().map(Into::into).collect(),
            last_resort: last_resort.map(Into::into),
        })?;
        let bytes = self
            .transport
            .send(Method::POST, paths::KEY_PACKAGES, body, AuthMode::Session)
            .await?;
        dec(&bytes)
    }

    /// How many key packages this client has left on the DS.
    pub async fn key_package_count(&self) -> Result<KeyPackageCount> {
        let bytes = self
            .transport
            .send(
                Method::GET,
                paths::KEY_PACKAGES,
                Vec::new(),
                AuthMode::Session,
            )
            .await?;
        dec(&bytes)
    }

    /// Claim one key package of `client`.
    pub async fn claim_key_package(&self, client: &ClientId) -> Result<ClaimedKeyPackage> {
        let bytes = self
            .transport
            .send(
                Method::POST,
                &paths::claim_key_package(client),
                Vec::new(),
                AuthMode::Session,
            )
            .await?;
        dec(&bytes)
    }

    /// Register a group with the DS.
    pub async fn create_group(
        &self,
        group_info: Vec<u8>,
        ratchet_tree: Vec<u8>,
        open: bool,
    ) -> Result<GroupCreated> {
        let body = enc(&CreateGroup {
            group_info: group_info.into(),
            ratchet_tree: ratchet_tree.into(),
            open: open.into(),
        })?;
        let bytes = self
            .transport
            .send(Method::POST, paths::GROUPS, body, AuthMode::Session)
            .await?;
        dec(&bytes)
    }

    /// Submit a commit bundle.
    pub async fn commit(
        &self,
        group_id: &[u8],
        commit: Vec<u8>,
        welcome: Option<Vec<u8>>,
        group_info: Vec<u8>,
    ) -> Result<CommitAccepted> {
        let body = enc(&CommitBundle {
            commit: commit.into(),
            welcome: welcome.map(Into::into),
            group_info: group_info.into(),
        })?;
        let bytes = self
            .transport
            .send(
                Method::POST,
                &paths::commits(group_id),
                body,
                AuthMode::Session,
            )
            .await?;
        dec(&bytes)
    }

    /// Send an application message or a proposal.
    pub async fn send_message(&self, group_id: &[u8], message: Vec<u8>) -> Result<MessageAccepted> {
        self.post_message(group_id, message, None).await
    }

    /// Send an application message under a send id: a retry with the same
    /// id gets the first answer instead of a second delivery.
    pub async fn send_message_once(
        &self,
        group_id: &[u8],
        message: Vec<u8>,
        send_id: SendId,
    ) -> Result<MessageAccepted> {
        self.post_message(group_id, message, Some(send_id)).await
    }

    async fn post_message(
        &self,
        group_id: &[u8],
        message: Vec<u8>,
        send_id: Option<SendId>,
    ) -> Result<MessageAccepted> {
        let body = enc(&SendMessage {
            message: message.into(),
            send_id,
        })?;
        let bytes = self
            .transport
            .send(
                Method::POST,
                &paths::messages(group_id),
                body,
                AuthMode::Session,
            )
            .await?;
        dec(&bytes)
    }

    /// The group's latest GroupInfo and ratchet tree.
    pub async fn group_info(&self, group_id: &[u8]) -> Result<GroupInfoResponse> {
        let bytes = self
            .transport
            .send(
                Method::GET,
                &paths::group_info(group_id),
                Vec::new(),
                AuthMode::Session,
            )
            .await?;
        dec(&bytes)
    }

    /// Fetch queue entries after `after`, waiting up to `wait_ms` for the first.
    pub async fn fetch(&self, after: u64, limit: u32, wait_ms: u64) -> Result<QueuePage> {
        self.fetch_page(None, after, limit, wait_ms).await
    }

    /// Acknowledge every entry up to `ack` and fetch the next page in one
    /// request (see [`DsApi::fetch`] and [`DsApi::ack`]); the page comes back
    /// once the acknowledgement is durable.
    pub async fn ack_and_fetch(
        &self,
        ack: u64,
        after: u64,
        limit: u32,
        wait_ms: u64,
    ) -> Result<QueuePage> {
        self.fetch_page(Some(ack), after, limit, wait_ms).await
    }

    /// `GET /v1/queue`, acknowledging up to `ack` first if given.
    async fn fetch_page(
        &self,
        ack: Option<u64>,
        after: u64,
        limit: u32,
        wait_ms: u64,
    ) -> Result<QueuePage> {
        let path = paths::queue_page(ack, after, limit, wait_ms);
        let bytes = self
            .transport
            .send_waiting(
                Method::GET,
                &path,
                Vec::new(),
                AuthMode::Session,
                Duration::from_millis(wait_ms),
            )
            .await?;
        dec(&bytes)
    }

    /// The queue after `after` as a stream of pages, each sent by the DS as
    /// soon as its entries are durable (`GET /v1/queue/stream`).
    pub async fn queue_stream(&self, after: u64) -> Result<QueueStream> {
        let body = self
            .transport
            .open_stream(&paths::queue_stream(after))
            .await?;
        Ok(QueueStream::new(body, self.transport.base_url().to_owned()))
    }

    /// Acknowledge every entry up to `up_to`.
    pub async fn ack(&self, up_to: u64) -> Result<Acked> {
        let body = enc(&Ack { up_to })?;
        let bytes = self
            .transport
            .send(Method::POST, paths::QUEUE_ACK, body, AuthMode::Session)
            .await?;
        dec(&bytes)
    }
}
