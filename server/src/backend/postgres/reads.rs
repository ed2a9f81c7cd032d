//! Typed reads on PostgreSQL: one statement each, on a pooled connection,
//! seeing what committed before it started.

use mls_ds_protocol::auth::SESSION_ID_LEN;
use mls_ds_protocol::groups::SendId;
use mls_ds_protocol::ClientId;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::rows::{self, big, bits, col, u32_of, u64_of, unbits};
use super::{connect::db, Gauges, Inner};
use crate::backend::records::{
    now_ms, ClientRecord, ClientUsage, CommitRecord, GroupId, GroupRecord, GroupState,
    InviteRecord, KeyPackageRecord, SendKey, SendReceipt, SharedSession,
};
use crate::backend::{
    ExpiredKeyPackage, StaleCommit, StoreError, StoredClient, StoredGroup, StoredInvite,
};

fn client_id(bytes: &[u8]) -> Result<ClientId, StoreError> {
    ClientId::new(bytes).map_err(|e| StoreError::Corrupt(format!("stored client id: {e}")))
}

fn group_id(bytes: &[u8]) -> Result<GroupId, StoreError> {
    GroupId::new(bytes).map_err(|e| StoreError::Corrupt(format!("stored group id: {e}")))
}

impl Inner {
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let conn = self.connection().await?;
        let stmt = conn.prepare_cached(sql).await.map_err(db)?;
        conn.query(&stmt, params).await.map_err(db)
    }

    async fn row(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let conn = self.connection().await?;
        let stmt = conn.prepare_cached(sql).await.map_err(db)?;
        conn.query_opt(&stmt, params).await.map_err(db)
    }

    pub(crate) async fn client(&self, id: &ClientId) -> Result<Option<ClientRecord>, StoreError> {
        let sql = format!("SELECT {} FROM clients WHERE id = $1", rows::CLIENT_COLUMNS);
        self.row(&sql, &[&id.as_bytes()])
            .await?
            .map(|r| rows::client(&r))
            .transpose()
    }

    pub(crate) async fn key_packages(
        &self,
        owner: &ClientId,
    ) -> Result<Vec<KeyPackageRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM key_packages WHERE owner = $1 ORDER BY kp_ref",
            rows::KEY_PACKAGE_COLUMNS
        );
        self.rows(&sql, &[&owner.as_bytes()])
            .await?
            .iter()
            .map(rows::key_package)
            .collect()
    }

    pub(crate) async fn last_resort(
        &self,
        owner: &ClientId,
    ) -> Result<Option<KeyPackageRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM last_resorts WHERE owner = $1",
            rows::KEY_PACKAGE_COLUMNS
        );
        self.row(&sql, &[&owner.as_bytes()])
            .await?
            .map(|r| rows::key_package(&r))
            .transpose()
    }

    pub(crate) async fn expired_key_packages(
        &self,
        now_secs: u64,
    ) -> Result<Vec<ExpiredKeyPackage>, StoreError> {
        self.rows(
            "SELECT owner, kp_ref FROM key_packages WHERE not_after < $1 ORDER BY owner, kp_ref",
            &[&big(now_secs)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(ExpiredKeyPackage {
                owner: client_id(&col::<Vec<u8>>(r, "owner")?)?,
                kp_ref: col(r, "kp_ref")?,
            })
        })
        .collect()
    }

    pub(crate) async fn key_package_owner(
        &self,
        kp_ref: &[u8],
    ) -> Result<Option<ClientId>, StoreError> {
        self.row(
            "SELECT owner FROM key_package_owners WHERE kp_ref = $1",
            &[&kp_ref],
        )
        .await?
        .map(|r| client_id(&col::<Vec<u8>>(&r, "owner")?))
        .transpose()
    }

    pub(crate) async fn group(&self, id: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        let sql = format!("SELECT {} FROM groups WHERE id = $1", rows::GROUP_COLUMNS);
        self.row(&sql, &[&id.as_bytes()])
            .await?
            .map(|r| rows::group(&r))
            .transpose()
    }

    pub(crate) async fn group_state(&self, id: &GroupId) -> Result<Option<GroupState>, StoreError> {
        let sql = format!(
            "SELECT {} FROM group_states WHERE id = $1",
            rows::GROUP_STATE_COLUMNS
        );
        self.row(&sql, &[&id.as_bytes()])
            .await?
            .map(|r| rows::group_state(&r))
            .transpose()
    }

    pub(crate) async fn commit(
        &self,
        group: &GroupId,
        epoch: u64,
    ) -> Result<Option<CommitRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM commits WHERE group_id = $1 AND epoch = $2",
            rows::COMMIT_COLUMNS
        );
        self.row(&sql, &[&group.as_bytes(), &big(epoch)])
            .await?
            .map(|r| rows::commit(&r))
            .transpose()
    }

    pub(crate) async fn clients(&self) -> Result<Vec<StoredClient>, StoreError> {
        let sql = format!(
            "SELECT id, {} FROM clients ORDER BY id",
            rows::CLIENT_COLUMNS
        );
        self.rows(&sql, &[])
            .await?
            .iter()
            .map(|r| {
                Ok(StoredClient {
                    id: client_id(&col::<Vec<u8>>(r, "id")?)?,
                    record: rows::client(r)?,
                })
            })
            .collect()
    }

    pub(crate) async fn groups(&self) -> Result<Vec<StoredGroup>, StoreError> {
        let sql = format!("SELECT id, {} FROM groups ORDER BY id", rows::GROUP_COLUMNS);
        self.rows(&sql, &[])
            .await?
            .iter()
            .map(|r| {
                Ok(StoredGroup {
                    id: group_id(&col::<Vec<u8>>(r, "id")?)?,
                    record: rows::group(r)?,
                })
            })
            .collect()
    }

    pub(crate) async fn stale_commits(
        &self,
        cutoff_ms: u64,
    ) -> Result<Vec<StaleCommit>, StoreError> {
        self.rows(
            "SELECT c.group_id, c.epoch FROM commits c WHERE c.accepted_ms < $1 \
             AND c.epoch < (SELECT max(n.epoch) FROM commits n WHERE n.group_id = c.group_id) \
             ORDER BY c.group_id, c.epoch",
            &[&big(cutoff_ms)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(StaleCommit {
                group: group_id(&col::<Vec<u8>>(r, "group_id")?)?,
                epoch: u64_of(col(r, "epoch")?, "epoch")?,
            })
        })
        .collect()
    }

    pub(crate) async fn send_receipt(
        &self,
        key: &SendKey,
    ) -> Result<Option<SendReceipt>, StoreError> {
        self.row(
            "SELECT message_id, recipients FROM send_receipts \
             WHERE sender = $1 AND created_ms = $2 AND nonce = $3",
            &[
                &key.sender.as_bytes(),
                &big(key.id.created_ms),
                &bits(key.id.nonce),
            ],
        )
        .await?
        .map(|r| {
            Ok(SendReceipt {
                message_id: u64_of(col(&r, "message_id")?, "message_id")?,
                recipients: u32_of(col(&r, "recipients")?, "recipients")?,
            })
        })
        .transpose()
    }

    pub(crate) async fn sends_before(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<SendKey>, StoreError> {
        self.rows(
            "SELECT sender, created_ms, nonce FROM send_receipts WHERE created_ms < $1 \
             ORDER BY created_ms LIMIT $2",
            &[&big(cutoff_ms), &i64::try_from(limit).unwrap_or(i64::MAX)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(SendKey {
                sender: client_id(&col::<Vec<u8>>(r, "sender")?)?,
                id: SendId {
                    created_ms: u64_of(col(r, "created_ms")?, "created_ms")?,
                    nonce: unbits(col(r, "nonce")?),
                },
            })
        })
        .collect()
    }

    pub(crate) async fn queue_depth(&self, client: &ClientId) -> Result<u64, StoreError> {
        match self
            .row(
                "SELECT head - acked AS depth FROM queues WHERE client = $1",
                &[&client.as_bytes()],
            )
            .await?
        {
            Some(r) => u64_of(col(&r, "depth")?, "queue depth"),
            None => Ok(0),
        }
    }

    pub(crate) async fn invite(&self, code: &str) -> Result<Option<InviteRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM invites WHERE code = $1",
            rows::INVITE_COLUMNS
        );
        self.row(&sql, &[&code])
            .await?
            .map(|r| rows::invite(&r))
            .transpose()
    }

    pub(crate) async fn invites(&self) -> Result<Vec<StoredInvite>, StoreError> {
        let sql = format!(
            "SELECT code, {} FROM invites ORDER BY code",
            rows::INVITE_COLUMNS
        );
        self.rows(&sql, &[])
            .await?
            .iter()
            .map(|r| {
                Ok(StoredInvite {
                    code: col(r, "code")?,
                    record: rows::invite(r)?,
                })
            })
            .collect()
    }

    pub(crate) async fn usage(&self, client: &ClientId) -> Result<ClientUsage, StoreError> {
        Ok(
            match self
                .row(
                    "SELECT groups_created FROM usage WHERE client = $1",
                    &[&client.as_bytes()],
                )
                .await?
            {
                Some(r) => ClientUsage {
                    groups_created: u32_of(col(&r, "groups_created")?, "groups_created")?,
                },
                None => ClientUsage::default(),
            },
        )
    }

    /// Store a new session if `client` is still registered with `key`; the
    /// client's row is locked meanwhile, so a recovery or deletion either
    /// comes first (nothing stored) or deletes this session too.
    pub(crate) async fn share_session(
        &self,
        session: &SharedSession,
        key: &[u8],
    ) -> Result<bool, StoreError> {
        let conn = self.connection().await?;
        let stored = conn
            .execute(
                "INSERT INTO sessions (id, client, key, expires_ms) \
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM clients \
                   WHERE id = $2 AND deleted_ms IS NULL AND signature_key = $5 FOR SHARE)",
                &[
                    &&session.id[..],
                    &session.client.as_bytes(),
                    &&session.key[..],
                    &big(session.expires_ms),
                    &key,
                ],
            )
            .await
            .map_err(db)?;
        Ok(stored == 1)
    }

    /// A session stored by any node, while it has not expired.
    pub(crate) async fn shared_session(
        &self,
        id: &[u8; SESSION_ID_LEN],
    ) -> Result<Option<SharedSession>, StoreError> {
        let Some(row) = self
            .row(
                "SELECT client, key, expires_ms FROM sessions WHERE id = $1 AND expires_ms > $2",
                &[&&id[..], &big(now_ms())],
            )
            .await?
        else {
            return Ok(None);
        };
        let key: Vec<u8> = col(&row, "key")?;
        Ok(Some(SharedSession {
            id: *id,
            client: client_id(&col::<Vec<u8>>(&row, "client")?)?,
            key: key
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("session key of {} bytes", key.len())))?,
            expires_ms: u64_of(col(&row, "expires_ms")?, "expires_ms")?,
        }))
    }

    /// Delete the sessions that expired.
    pub(crate) async fn forget_expired_sessions(&self) -> Result<u64, StoreError> {
        let conn = self.connection().await?;
        conn.execute(
            "DELETE FROM sessions WHERE expires_ms <= $1",
            &[&big(now_ms())],
        )
        .await
        .map_err(db)
    }

    /// Read the gauges of `/metrics` (queue totals, messages, bytes).
    pub(crate) async fn refresh_gauges(&self) -> Result<(), StoreError> {
        let row = self
            .row(
                "SELECT (SELECT COALESCE(sum(head - acked), 0)::bigint FROM queues) AS entries, \
                 (SELECT COALESCE(max(head - acked), 0)::bigint FROM queues) AS deepest, \
                 (SELECT count(*) FROM messages) AS messages, \
                 pg_database_size(current_database()) AS bytes",
                &[],
            )
            .await?
            .ok_or_else(|| StoreError::Corrupt("no gauge row".into()))?;
        let gauges = Gauges {
            queue_entries: u64_of(col(&row, "entries")?, "entries")?,
            queue_depth_max: u64_of(col(&row, "deepest")?, "deepest")?,
            stored_messages: u64_of(col(&row, "messages")?, "messages")?,
            size_on_disk: u64_of(col(&row, "bytes")?, "bytes")?,
        };
        *self.gauges.lock().unwrap_or_else(|e| e.into_inner()) = gauges;
        Ok(())
    }
}
