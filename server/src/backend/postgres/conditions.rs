//! A write set's conditions on PostgreSQL: each checked inside the write's
//! transaction against the latest committed state, and kept true until it
//! commits by locking what it read (`writes.rs` says which lock for which
//! condition). A row that must not exist yet is guarded by a
//! transaction-scoped advisory lock on its key, so that two nodes inserting
//! it wait for each other and the second sees the first's row; a send's
//! receipt by its primary key instead (see `SendNew`).

use deadpool_postgres::Transaction;
use sha2::{Digest, Sha256};

use super::rows::{big, bits, int};
use super::writes::{exec, query_opt, Step};
use crate::backend::write_set::Condition;

/// Transaction-scoped advisory lock on a key that must not exist yet.
async fn guard_absent(tx: &Transaction<'_>, domain: &str, key: &[&[u8]]) -> Result<(), Step> {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    for part in key {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    exec(
        tx,
        "SELECT pg_advisory_xact_lock($1)",
        &[&i64::from_be_bytes(first)],
    )
    .await?;
    Ok(())
}

/// Whether a condition holds, locking what it read (module doc).
pub(crate) async fn holds(tx: &Transaction<'_>, c: &Condition) -> Result<bool, Step> {
    Ok(match c {
        Condition::ClientAbsent(id) => {
            guard_absent(tx, "client", &[id.as_bytes()]).await?;
            query_opt(tx, "SELECT 1 FROM clients WHERE id = $1", &[&id.as_bytes()])
                .await?
                .is_none()
        }
        Condition::ClientActive(id) => query_opt(
            tx,
            "SELECT 1 FROM clients WHERE id = $1 AND deleted_ms IS NULL FOR SHARE",
            &[&id.as_bytes()],
        )
        .await?
        .is_some(),
        Condition::ClientKeyIs { client, key } => query_opt(
            tx,
            "SELECT 1 FROM clients WHERE id = $1 AND deleted_ms IS NULL \
                 AND signature_key = $2 FOR SHARE",
            &[&client.as_bytes(), key],
        )
        .await?
        .is_some(),
        Condition::GroupAbsent(id) => {
            guard_absent(tx, "group", &[id.as_bytes()]).await?;
            query_opt(tx, "SELECT 1 FROM groups WHERE id = $1", &[&id.as_bytes()])
                .await?
                .is_none()
        }
        Condition::GroupPresent(id) => query_opt(
            tx,
            "SELECT 1 FROM groups WHERE id = $1 FOR KEY SHARE",
            &[&id.as_bytes()],
        )
        .await?
        .is_some(),
        Condition::GroupAt { group, revision } => query_opt(
            tx,
            "SELECT revision FROM groups WHERE id = $1 FOR NO KEY UPDATE",
            &[&group.as_bytes()],
        )
        .await?
        .is_some_and(|row| row.try_get::<_, i64>(0).ok() == Some(big(*revision))),
        Condition::KeyPackageUnclaimed { owner, kp_ref } => query_opt(
            tx,
            "SELECT 1 FROM key_packages WHERE owner = $1 AND kp_ref = $2 FOR UPDATE",
            &[&owner.as_bytes(), kp_ref],
        )
        .await?
        .is_some(),
        Condition::LastResortAt {
            owner,
            kp_ref,
            claims,
        } => query_opt(
            tx,
            "SELECT 1 FROM last_resorts WHERE owner = $1 AND kp_ref = $2 AND claims = $3 \
                 FOR UPDATE",
            &[&owner.as_bytes(), kp_ref, &big(*claims)],
        )
        .await?
        .is_some(),
        Condition::InviteAt { code, uses_left } => query_opt(
            tx,
            "SELECT 1 FROM invites WHERE code = $1 AND uses_left = $2 FOR UPDATE",
            &[code, &int(*uses_left)],
        )
        .await?
        .is_some(),
        // No lock: the receipt's primary key is the guard. Two writes of
        // one send that both find no receipt both insert one; the second
        // waits for the first's commit, fails with a unique violation, and
        // runs again, when it finds the receipt.
        Condition::SendNew(key) => query_opt(
            tx,
            "SELECT 1 FROM send_receipts WHERE sender = $1 AND created_ms = $2 AND nonce = $3",
            &[
                &key.sender.as_bytes(),
                &big(key.id.created_ms),
                &bits(key.id.nonce),
            ],
        )
        .await?
        .is_none(),
        Condition::UsageAt { client, usage } => {
            // Absent counts as the default: make the row exist to lock it.
            exec(
                tx,
                "INSERT INTO usage (client, groups_created) VALUES ($1, 0) \
                 ON CONFLICT (client) DO NOTHING",
                &[&client.as_bytes()],
            )
            .await?;
            query_opt(
                tx,
                "SELECT 1 FROM usage WHERE client = $1 AND groups_created = $2 FOR UPDATE",
                &[&client.as_bytes(), &int(usage.groups_created)],
            )
            .await?
            .is_some()
        }
    })
}
