//! Invitation codes: created, listed and revoked by the operator, used up
//! by registrations when the registration policy asks for one. A code is 32
//! hex digits (128 random bits), with a number of uses and an optional
//! expiry; each registration with it takes one use, conditional on the uses
//! it read, so concurrent registrations never share the last use.

use rand::RngCore;

use super::error::{DsError, Result};
use super::Ds;
use crate::backend::records::{now_ms, InviteRecord};
use crate::backend::write_set::{Change, Condition, WriteSet};
use crate::backend::{Backend, StoredInvite};

/// Random bytes in a code.
const CODE_BYTES: usize = 16;

impl<B: Backend> Ds<B> {
    /// Operator: a new invitation code, good for `uses` registrations, until
    /// `valid_for_secs` from now if given.
    pub(crate) async fn create_invite(
        &self,
        uses: u32,
        valid_for_secs: Option<u64>,
    ) -> Result<StoredInvite> {
        if uses == 0 {
            return Err(DsError::Invalid(
                "an invitation needs at least one use".into(),
            ));
        }
        let mut bytes = [0u8; CODE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let now = now_ms();
        let invite = StoredInvite {
            code: hex::encode(bytes),
            record: InviteRecord {
                uses_left: uses,
                expires_ms: valid_for_secs.map(|s| now.saturating_add(s.saturating_mul(1000))),
                created_ms: now,
            },
        };
        let set = WriteSet {
            changes: vec![Change::PutInvite {
                code: invite.code.clone(),
                record: invite.record.clone(),
            }],
            ..WriteSet::default()
        };
        self.backend.submit(set).wait().await?;
        tracing::info!(uses, valid_for_secs, "created an invitation code");
        Ok(invite)
    }

    /// Operator: every invitation code with its uses left and expiry.
    pub(crate) async fn list_invites(&self) -> Result<Vec<StoredInvite>> {
        Ok(self.backend.invites().await?)
    }

    /// Operator: revoke an invitation code (its remaining uses are gone).
    pub(crate) async fn revoke_invite(&self, code: &str) -> Result<()> {
        if self.backend.invite(code).await?.is_none() {
            return Err(DsError::NotFound(format!("no invitation code {code}")));
        }
        let set = WriteSet {
            changes: vec![Change::RemoveInvite {
                code: code.to_owned(),
            }],
            ..WriteSet::default()
        };
        self.backend.submit(set).wait().await?;
        tracing::info!("revoked an invitation code");
        Ok(())
    }

    /// Add to `set` the use of one registration of `code`, conditional on
    /// the uses left that were read; 403 if the code is unknown, used up or
    /// expired.
    pub(crate) async fn use_invite(&self, code: &str, set: &mut WriteSet) -> Result<()> {
        let refused = || {
            DsError::Forbidden(
                "the invitation code is not valid (unknown, used up, revoked or expired)".into(),
            )
        };
        let record = self.backend.invite(code).await?.ok_or_else(refused)?;
        if record.uses_left == 0 || record.expires_ms.is_some_and(|t| t <= now_ms()) {
            return Err(refused());
        }
        set.conditions.push(Condition::InviteAt {
            code: code.to_owned(),
            uses_left: record.uses_left,
        });
        set.changes.push(if record.uses_left == 1 {
            Change::RemoveInvite {
                code: code.to_owned(),
            }
        } else {
            Change::PutInvite {
                code: code.to_owned(),
                record: InviteRecord {
                    uses_left: record.uses_left - 1,
                    ..record
                },
            }
        });
        Ok(())
    }
}
