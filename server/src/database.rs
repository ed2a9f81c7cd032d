//! The DS on PostgreSQL (`--database`): the same services and limits as on
//! the embedded backend, on a database that any number of DS processes
//! share. The server and the admin commands open it the same way.

use crate::backend::postgres::{PgBackend, PgConfig};
use crate::backend::StoreError;
use crate::config::Limits;
use crate::embedded::policy;
use crate::service::Ds;

/// The DS on PostgreSQL.
pub(crate) type PgDs = Ds<PgBackend>;

/// Connect to `url` (migrating its schema) and build the DS on it.
pub(crate) async fn open(url: &str, pool_size: usize, limits: &Limits) -> Result<PgDs, StoreError> {
    let backend = PgBackend::open(PgConfig {
        url: url.to_owned(),
        pool_size,
        max_queue_depth: limits.max_queue_depth,
    })
    .await?;
    Ok(Ds::new(backend, policy(limits)))
}
