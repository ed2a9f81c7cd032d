//! A write set's changes on PostgreSQL: each one's statements, inside the
//! write's transaction. Deleting or recovering a client also deletes its
//! sessions and tells every node to drop them (`NOTIFY`, at commit).

use deadpool_postgres::Transaction;
use mls_ds_protocol::ClientId;

use super::rows::{big, int};
use super::writes::{exec, query_one, Step, CREDENTIALS};
use crate::backend::write_set::Change;

/// One change's statements.
pub(crate) async fn stage(tx: &Transaction<'_>, change: &Change) -> Result<(), Step> {
    match change {
        Change::PutClient { id, record } => {
            let replaced: bool = query_one(
                tx,
                "INSERT INTO clients (id, signature_scheme, signature_key, registered_ms, \
                 deleted_ms, recovery_hash) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (id) DO UPDATE SET signature_scheme = EXCLUDED.signature_scheme, \
                 signature_key = EXCLUDED.signature_key, registered_ms = EXCLUDED.registered_ms, \
                 deleted_ms = EXCLUDED.deleted_ms, recovery_hash = EXCLUDED.recovery_hash \
                 RETURNING xmax::text <> '0' AS replaced",
                &[
                    &id.as_bytes(),
                    &i32::from(record.signature_scheme),
                    &record.signature_key,
                    &big(record.registered_ms),
                    &record.deleted_ms.map(big),
                    &record.recovery_hash,
                ],
            )
            .await?
            .try_get("replaced")?;
            if replaced {
                // A recovery: sessions opened with the old key end everywhere.
                announce_credentials(tx, id).await?;
            }
            exec(
                tx,
                "INSERT INTO queues (client) VALUES ($1) ON CONFLICT (client) DO NOTHING",
                &[&id.as_bytes()],
            )
            .await?;
        }
        Change::DeleteClient { id, tombstone } => {
            announce_credentials(tx, id).await?;
            let id = id.as_bytes();
            exec(
                tx,
                "UPDATE clients SET deleted_ms = $2, recovery_hash = $3 WHERE id = $1",
                &[
                    &id,
                    &tombstone.deleted_ms.map(big),
                    &tombstone.recovery_hash,
                ],
            )
            .await?;
            exec(tx, "DELETE FROM key_packages WHERE owner = $1", &[&id]).await?;
            exec(tx, "DELETE FROM last_resorts WHERE owner = $1", &[&id]).await?;
            exec(
                tx,
                "UPDATE queues SET closed = true, acked = head WHERE client = $1",
                &[&id],
            )
            .await?;
            // The messages this leaves without entries go at the next full
            // sweep (a client's deletion is rare).
            exec(tx, "DELETE FROM queue_entries WHERE client = $1", &[&id]).await?;
        }
        Change::PutKeyPackage { owner, record } => {
            exec(
                tx,
                "INSERT INTO key_packages (owner, kp_ref, message, not_after, claims) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, kp_ref) DO UPDATE SET \
                 message = EXCLUDED.message, not_after = EXCLUDED.not_after, \
                 claims = EXCLUDED.claims",
                &[
                    &owner.as_bytes(),
                    &record.kp_ref,
                    &record.message,
                    &big(record.not_after),
                    &big(record.claims),
                ],
            )
            .await?;
        }
        Change::PutLastResort { owner, record } => {
            exec(
                tx,
                "INSERT INTO last_resorts (owner, kp_ref, message, not_after, claims) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner) DO UPDATE SET \
                 kp_ref = EXCLUDED.kp_ref, message = EXCLUDED.message, \
                 not_after = EXCLUDED.not_after, claims = EXCLUDED.claims",
                &[
                    &owner.as_bytes(),
                    &record.kp_ref,
                    &record.message,
                    &big(record.not_after),
                    &big(record.claims),
                ],
            )
            .await?;
        }
        Change::RemoveKeyPackage { owner, kp_ref } => {
            exec(
                tx,
                "DELETE FROM key_packages WHERE owner = $1 AND kp_ref = $2",
                &[&owner.as_bytes(), kp_ref],
            )
            .await?;
        }
        Change::PutKeyPackageOwner { kp_ref, owner } => {
            exec(
                tx,
                "INSERT INTO key_package_owners (kp_ref, owner) VALUES ($1, $2) \
                 ON CONFLICT (kp_ref) DO UPDATE SET owner = EXCLUDED.owner",
                &[kp_ref, &owner.as_bytes()],
            )
            .await?;
        }
        Change::DeleteGroup { id } => {
            // Its state and commit records go with it (ON DELETE CASCADE).
            exec(tx, "DELETE FROM groups WHERE id = $1", &[&id.as_bytes()]).await?;
        }
        Change::RemoveCommit { group, epoch } => {
            exec(
                tx,
                "DELETE FROM commits WHERE group_id = $1 AND epoch = $2",
                &[&group.as_bytes(), &big(*epoch)],
            )
            .await?;
        }
        Change::PutGroup { id, record } => {
            exec(
                tx,
                "INSERT INTO groups (id, epoch, revision, open, members, creator, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET \
                 epoch = EXCLUDED.epoch, revision = EXCLUDED.revision, open = EXCLUDED.open, \
                 members = EXCLUDED.members, creator = EXCLUDED.creator, \
                 created_ms = EXCLUDED.created_ms",
                &[
                    &id.as_bytes(),
                    &big(record.epoch),
                    &big(record.revision),
                    &record.open,
                    &record.members,
                    &record.creator,
                    &big(record.created_ms),
                ],
            )
            .await?;
        }
        Change::PutGroupState { id, state } => {
            let pg = &state.public_group;
            let refs: Vec<&[u8]> = pg.proposals.iter().map(|p| &p.reference[..]).collect();
            let proposals: Vec<&[u8]> = pg.proposals.iter().map(|p| &p.proposal[..]).collect();
            exec(
                tx,
                "INSERT INTO group_states (id, group_info, tree, context, \
                 interim_transcript_hash, confirmation_tag, proposal_refs, proposals) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET \
                 group_info = EXCLUDED.group_info, tree = EXCLUDED.tree, \
                 context = EXCLUDED.context, \
                 interim_transcript_hash = EXCLUDED.interim_transcript_hash, \
                 confirmation_tag = EXCLUDED.confirmation_tag, \
                 proposal_refs = EXCLUDED.proposal_refs, proposals = EXCLUDED.proposals",
                &[
                    &id.as_bytes(),
                    &state.group_info,
                    &pg.tree,
                    &pg.context,
                    &pg.interim_transcript_hash,
                    &pg.confirmation_tag,
                    &refs,
                    &proposals,
                ],
            )
            .await?;
        }
        Change::PutCommit {
            group,
            epoch,
            record,
        } => {
            exec(
                tx,
                "INSERT INTO commits (group_id, epoch, commit_hash, committer, new_epoch, \
                 recipients, accepted_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (group_id, epoch) DO UPDATE SET commit_hash = EXCLUDED.commit_hash, \
                 committer = EXCLUDED.committer, new_epoch = EXCLUDED.new_epoch, \
                 recipients = EXCLUDED.recipients, accepted_ms = EXCLUDED.accepted_ms",
                &[
                    &group.as_bytes(),
                    &big(*epoch),
                    &&record.commit_hash[..],
                    &record.committer,
                    &big(record.new_epoch),
                    &int(record.recipients),
                    &big(record.accepted_ms),
                ],
            )
            .await?;
        }
        Change::PutInvite { code, record } => {
            exec(
                tx,
                "INSERT INTO invites (code, uses_left, expires_ms, created_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (code) DO UPDATE SET \
                 uses_left = EXCLUDED.uses_left, expires_ms = EXCLUDED.expires_ms, \
                 created_ms = EXCLUDED.created_ms",
                &[
                    code,
                    &int(record.uses_left),
                    &record.expires_ms.map(big),
                    &big(record.created_ms),
                ],
            )
            .await?;
        }
        Change::RemoveInvite { code } => {
            exec(tx, "DELETE FROM invites WHERE code = $1", &[code]).await?;
        }
        Change::PutUsage { client, usage } => {
            exec(
                tx,
                "INSERT INTO usage (client, groups_created) VALUES ($1, $2) \
                 ON CONFLICT (client) DO UPDATE SET groups_created = EXCLUDED.groups_created",
                &[&client.as_bytes(), &int(usage.groups_created)],
            )
            .await?;
        }
        Change::RemoveKeyPackagesOf { owner } => {
            exec(
                tx,
                "DELETE FROM key_packages WHERE owner = $1",
                &[&owner.as_bytes()],
            )
            .await?;
            exec(
                tx,
                "DELETE FROM last_resorts WHERE owner = $1",
                &[&owner.as_bytes()],
            )
            .await?;
        }
    }
    Ok(())
}

/// End `client`'s sessions: deleted from the table, and every node told
/// (`NOTIFY`, delivered at commit) to drop what it holds.
async fn announce_credentials(tx: &Transaction<'_>, client: &ClientId) -> Result<(), Step> {
    exec(
        tx,
        "DELETE FROM sessions WHERE client = $1",
        &[&client.as_bytes()],
    )
    .await?;
    exec(
        tx,
        "SELECT pg_notify($1, $2)",
        &[&CREDENTIALS, &hex::encode(client.as_bytes())],
    )
    .await?;
    Ok(())
}
