//! Taking a client id back after losing the whole store: the recovery code
//! made with the identity (its hash went to the DS at registration) proves
//! the id is this client's; [`Client::recover`] binds the id to a new key
//! on the DS, publishes key packages, and rejoins every group the DS lists
//! for the id by external commit, replacing the old leaves
//! ([`Event::Resynced`](crate::Event::Resynced) for each).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use mls_ds_protocol::clients::{recovery_hash, RECOVERY_SECRET_LEN};
use rand::RngCore;

use super::{Client, ClientConfig};
use crate::error::{ClientError, Result};

/// A client's recovery code: a random secret shown as 64 hex digits, for
/// the user to keep apart from the device (a backup code). Whoever holds it
/// can take the client id over, so treat it like a password.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryCode([u8; RECOVERY_SECRET_LEN]);

impl RecoveryCode {
    /// A new random code.
    pub fn generate() -> RecoveryCode {
        let mut secret = [0u8; RECOVERY_SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        RecoveryCode(secret)
    }

    pub(super) fn secret(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for RecoveryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RecoveryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryCode(…)")
    }
}

impl FromStr for RecoveryCode {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<RecoveryCode> {
        let bytes = hex::decode(s.trim())
            .map_err(|_| ClientError::Usage("a recovery code is 64 hexadecimal digits".into()))?;
        bytes
            .as_slice()
            .try_into()
            .map(RecoveryCode)
            .map_err(|_| ClientError::Usage("a recovery code is 64 hexadecimal digits".into()))
    }
}

impl Client {
    /// Take `client_id` back after its store was lost: a new identity in
    /// the empty `data_dir`, bound to the id on the DS with `code`; new key
    /// packages; every group the DS lists for the id rejoined. The DS ends
    /// the old key's sessions and drops its key packages. `code` is spent;
    /// `next` (made by the application with [`RecoveryCode::generate`] and
    /// shown to the user *before* this call) takes its place.
    ///
    /// If this fails midway (a network error, a crash), call it again with
    /// the same `data_dir`, `code` and `next`: it goes on where it stopped.
    pub async fn recover(
        data_dir: impl AsRef<Path>,
        ds_url: &str,
        client_id: &str,
        code: &RecoveryCode,
        next: &RecoveryCode,
        config: ClientConfig,
    ) -> Result<Client> {
        let client = Client::open(data_dir.as_ref(), ds_url, client_id, config)?;
        client
            .api
            .recover(code.secret(), recovery_hash(next.secret()))
            .await?;
        client.ensure_key_packages().await?;
        let listed = client.api.groups().await?;
        let tx = client.storage().begin();
        for gid in &listed.groups {
            client.suspect(&tx, gid.as_slice(), "recovered from a lost store")?;
        }
        tx.commit()?;
        client.heal().await?;
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_back_and_bad_ones_are_refused() {
        let code = RecoveryCode::generate();
        let text = code.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<RecoveryCode>().unwrap(), code);
        assert!("abc".parse::<RecoveryCode>().is_err());
        assert!("zz".repeat(32).parse::<RecoveryCode>().is_err());
        assert_eq!(format!("{code:?}"), "RecoveryCode(…)");
    }
}
