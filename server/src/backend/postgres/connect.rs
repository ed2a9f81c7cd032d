//! Reaching the database: the connection settings every connection gets
//! (synchronous commit, read committed), TLS with rustls (`sslmode` in the
//! URL decides whether it is tried, preferred or required), the pool, and
//! the schema: the migrations in `server/migrations/` applied at startup
//! under an advisory lock (so that nodes starting together do not race),
//! and a database whose schema is newer than this build refused.

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::backend::StoreError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory lock key held while migrations run ("mls-ds" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d6c_732d_6473;

/// The settings every connection starts with: a commit returns only once
/// it is durable, whatever the server's default, and every statement sees
/// what committed before it (the write path's row locks rely on it).
const SESSION_OPTIONS: &str =
    "-c synchronous_commit=on -c default_transaction_isolation=read\\ committed";

/// How a backend reaches its database.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Config,
    tls: MakeRustlsConnect,
}

impl Connector {
    /// Parse `url` (`postgres://user:password@host:port/db?sslmode=...`, or
    /// the key=value form) and prepare TLS with the system's and the Web
    /// PKI's roots.
    pub(crate) fn new(url: &str) -> Result<Connector, StoreError> {
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("bad database URL: {e}")))?;
        config.options(SESSION_OPTIONS);
        if config.get_application_name().is_none() {
            config.application_name("mls-ds");
        }
        Ok(Connector {
            config,
            tls: MakeRustlsConnect::new(tls_config()?),
        })
    }

    /// The database's name, for logs (never the password).
    pub(crate) fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        format!(
            "{}/{}",
            hosts.join(","),
            self.config.get_dbname().unwrap_or("")
        )
    }

    /// A pool of at most `size` connections.
    pub(crate) fn pool(&self, size: usize) -> Result<Pool, StoreError> {
        let manager = Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size.max(1))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the connection pool: {e}")))
    }

    /// One connection outside the pool, its driver task spawned; the
    /// returned stream yields what the server sends unasked (notifications)
    /// and ends when the connection does.
    pub(crate) async fn connect(
        &self,
    ) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<Incoming>), StoreError> {
        let (client, mut connection) = self.config.connect(self.tls.clone()).await.map_err(db)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
                match message {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        let notification = Incoming::Notification {
                            channel: n.channel().to_owned(),
                            payload: n.payload().to_owned(),
                        };
                        if tx.send(notification).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        let _ = tx.send(Incoming::Closed(e.to_string()));
                        return;
                    }
                    None => {
                        let _ = tx.send(Incoming::Closed("connection closed".into()));
                        return;
                    }
                }
            }
        });
        Ok((client, rx))
    }

    /// Bring the schema up to this build's, or refuse a newer one.
    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        let (mut client, _incoming) = self.connect().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        let result = migrate_locked(&mut client).await;
        // Closing the connection would release the lock too.
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        result
    }
}

/// What the notification connection receives.
pub(crate) enum Incoming {
    /// A `NOTIFY` on `channel`.
    Notification {
        /// The channel.
        channel: String,
        /// What it carried.
        payload: String,
    },
    /// The connection ended (why).
    Closed(String),
}

async fn migrate_locked(client: &mut Client) -> Result<(), StoreError> {
    let runner = embedded::migrations::runner();
    let known = runner
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0);
    let history = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db)?;
    if history.get::<_, bool>(0) {
        let row = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::bigint FROM refinery_schema_history",
                &[],
            )
            .await
            .map_err(db)?;
        let applied: i64 = row.get(0);
        if applied > known {
            return Err(StoreError::Layout(format!(
                "the database's schema is version {applied}, newer than this build's ({known}); \
                 run the mls-ds that migrated it, or a newer one"
            )));
        }
    }
    let report = runner
        .set_abort_divergent(true)
        .set_abort_missing(true)
        .run_async(client)
        .await
        .map_err(|e| StoreError::Layout(format!("database migration failed: {e}")))?;
    for m in report.applied_migrations() {
        tracing::info!(
            version = m.version(),
            name = m.name(),
            "applied database migration"
        );
    }
    Ok(())
}

/// rustls with the `ring` provider, trusting the system's roots and the
/// Web PKI's.
fn tls_config() -> Result<rustls::ClientConfig, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot parse is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Unavailable(format!("TLS to the database: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A database error as the layer above sees it: a lost or refused
/// connection, or a server out of resources or shutting down, is
/// unavailability (503, retry); anything else an internal failure that the
/// log explains.
pub(crate) fn db(e: tokio_postgres::Error) -> StoreError {
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let transient = e.is_closed()
        || io
        || e.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
        });
    if transient {
        tracing::warn!(error = %e, "the database is unreachable");
        StoreError::Unavailable("the database is unreachable; retry shortly".into())
    } else {
        StoreError::Database(e.to_string())
    }
}
