//! Key package maintenance: keeping enough of this client's key packages on
//! the DS, and a last-resort one, so that others can always add it to groups.

use mls_ds_storage::SledProvider;
use openmls::prelude::*;

use super::{wire, Client, CIPHERSUITE};
use crate::error::{mls, Result};

impl Client {
    /// Top up the key packages on the DS to the configured minimum, and make
    /// sure a last-resort package is there.
    pub async fn ensure_key_packages(&self) -> Result<()> {
        let count = self.api.key_package_count().await?;
        let need = self
            .config
            .min_key_packages
            .saturating_sub(count.remaining as usize);
        let need_last_resort = !count.has_last_resort.0;
        if need == 0 && !need_last_resort {
            return Ok(());
        }
        // The private keys are stored before the packages are published, so
        // a Welcome to any published package can be opened after a crash.
        let tx = self.provider.begin();
        let fresh = self.new_key_packages(&tx, need)?;
        let last_resort = if need_last_resort {
            Some(self.new_last_resort_key_package(&tx)?)
        } else {
            None
        };
        tx.commit()?;
        self.api.publish_key_packages(fresh, last_resort).await?;
        Ok(())
    }

    /// `count` ordinary key packages (`MLSMessage` bytes), their private keys
    /// written through `tx`.
    fn new_key_packages(&self, tx: &SledProvider, count: usize) -> Result<Vec<Vec<u8>>> {
        let mut fresh = Vec::with_capacity(count);
        for _ in 0..count {
            let bundle = KeyPackage::builder()
                .build(CIPHERSUITE, tx, &self.signer, self.credential.clone())
                .map_err(mls)?;
            fresh.push(wire(&MlsMessageOut::from(bundle.key_package().clone()))?);
        }
        Ok(fresh)
    }

    /// A last-resort key package (`MLSMessage` bytes), its private key
    /// written through `tx`.
    fn new_last_resort_key_package(&self, tx: &SledProvider) -> Result<Vec<u8>> {
        let bundle = KeyPackage::builder()
            .mark_as_last_resort()
            .leaf_node_capabilities(
                Capabilities::builder()
                    .extensions(vec![ExtensionType::LastResort])
                    .build(),
            )
            .build(CIPHERSUITE, tx, &self.signer, self.credential.clone())
            .map_err(mls)?;
        wire(&MlsMessageOut::from(bundle.key_package().clone()))
    }
}
