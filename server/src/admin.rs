//! Operator commands: `check`, `stats`, `compact`, `backup`, `restore`, invitation
//! codes, clients, groups, commit pruning. sled allows one process per data
//! directory, so a command runs on the directory directly when no server
//! holds it, and otherwise inside the running server: it listens on the
//! Unix socket `<data-dir>/admin.sock` (mode 0600: only the server's user,
//! and root, may connect) for one command line per connection and answers
//! with the report and a final `EXIT <code>` line. On PostgreSQL
//! (`--database`) every command runs on the database directly.
//!
//! Over 500 lines because the command set, its one-line wire form over the
//! socket, the three places a command runs (a stopped directory, the
//! running server, a database) and their shared executor belong together:
//! split apart, each would need the others' types.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mls_ds_protocol::ClientId;
use mls_ds_storage::{StorageError, Store, StoreConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::backend::records::GroupId;
use crate::backend::sled::{admin as sled_admin, layout::Layout, layout::StoreTuning, Serving};
use crate::backend::{AdminReport, Backend, StoreError};
use crate::config::{Limits, Storage};
use crate::database;
use crate::embedded::{self, SledDs};
use crate::service::clients::Registration;
use crate::service::Ds;
use crate::state_cell::{StateCell, REOPENING};

/// Name of the admin socket in the data directory.
pub(crate) const SOCKET: &str = "admin.sock";

/// An operator command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminCommand {
    /// Integrity check.
    Check,
    /// Counts.
    Stats,
    /// Rewrite the database with only its live records.
    Compact,
    /// A consistent copy into a new directory.
    Backup(PathBuf),
    /// A backup restored into the (new) data directory.
    Restore(PathBuf),
    /// A new invitation code.
    InviteCreate {
        /// Registrations it allows.
        uses: u32,
        /// Hours it stays valid.
        valid_for_hours: Option<u64>,
    },
    /// The invitation codes.
    InviteList,
    /// Revoke an invitation code.
    InviteRevoke(String),
    /// Register a client with its public key.
    ClientAdd {
        /// Its id.
        id: String,
        /// MLS signature scheme.
        scheme: u16,
        /// Public key, hex.
        key: String,
    },
    /// The clients.
    ClientList,
    /// Delete a client.
    ClientDelete(String),
    /// The groups.
    GroupList,
    /// Delete a group (id in hex).
    GroupDelete(String),
    /// Prune commit records older than this many days.
    PruneCommits(u64),
}

impl AdminCommand {
    /// The line sent over the admin socket (words; a path is the rest of
    /// the line).
    fn line(&self) -> String {
        match self {
            AdminCommand::Check => "check".into(),
            AdminCommand::Stats => "stats".into(),
            AdminCommand::Compact => "compact".into(),
            AdminCommand::Backup(out) => format!("backup {}", out.display()),
            AdminCommand::Restore(from) => format!("restore {}", from.display()),
            AdminCommand::InviteCreate {
                uses,
                valid_for_hours,
            } => match valid_for_hours {
                Some(h) => format!("invite-create {uses} {h}"),
                None => format!("invite-create {uses}"),
            },
            AdminCommand::InviteList => "invite-list".into(),
            AdminCommand::InviteRevoke(code) => format!("invite-revoke {code}"),
            AdminCommand::ClientAdd { id, scheme, key } => {
                format!("client-add {id} {scheme} {key}")
            }
            AdminCommand::ClientList => "client-list".into(),
            AdminCommand::ClientDelete(id) => format!("client-delete {id}"),
            AdminCommand::GroupList => "group-list".into(),
            AdminCommand::GroupDelete(id) => format!("group-delete {id}"),
            AdminCommand::PruneCommits(days) => format!("prune-commits {days}"),
        }
    }

    /// Parse a line written by [`AdminCommand::line`].
    fn parse(line: &str) -> Option<AdminCommand> {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let words: Vec<&str> = rest.split_whitespace().collect();
        fn number<T: std::str::FromStr>(words: &[&str], i: usize) -> Option<T> {
            words.get(i).and_then(|w| w.parse().ok())
        }
        let word = |i: usize| words.get(i).map(|w| (*w).to_owned());
        Some(match cmd {
            "check" => AdminCommand::Check,
            "stats" => AdminCommand::Stats,
            "compact" => AdminCommand::Compact,
            "backup" => AdminCommand::Backup(PathBuf::from(rest)),
            "restore" => AdminCommand::Restore(PathBuf::from(rest)),
            "invite-create" => AdminCommand::InviteCreate {
                uses: number(&words, 0)?,
                valid_for_hours: number(&words, 1),
            },
            "invite-list" => AdminCommand::InviteList,
            "invite-revoke" => AdminCommand::InviteRevoke(word(0)?),
            "client-add" => AdminCommand::ClientAdd {
                id: word(0)?,
                scheme: number(&words, 1)?,
                key: word(2)?,
            },
            "client-list" => AdminCommand::ClientList,
            "client-delete" => AdminCommand::ClientDelete(word(0)?),
            "group-list" => AdminCommand::GroupList,
            "group-delete" => AdminCommand::GroupDelete(word(0)?),
            "prune-commits" => AdminCommand::PruneCommits(number(&words, 0)?),
            _ => return None,
        })
    }
}

/// What a command printed, and whether it found a problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminOutput {
    /// The report.
    pub text: String,
    /// Exit non-zero.
    pub failed: bool,
}

/// Why a command could not run.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nothing to run it on.
    #[error("no database in {0}")]
    NoDatabase(PathBuf),
    /// A path could not be resolved.
    #[error("bad path {path}: {source}")]
    BadPath {
        /// The path given.
        path: PathBuf,
        /// Why it did not resolve.
        source: std::io::Error,
    },
    /// A server holds the directory and its socket does not answer.
    #[error("{dir} is in use by a running server that does not answer on {SOCKET}: {source}")]
    Unreachable {
        /// The data directory.
        dir: PathBuf,
        /// Why the socket failed.
        source: std::io::Error,
    },
    /// The command failed.
    #[error("{0}")]
    Failed(String),
}

/// Run `command` on `storage`. On a data directory: directly (with
/// `limits`) if no server holds it, otherwise through the running server's
/// admin socket. On a database: directly, beside any running servers.
pub fn run(
    storage: &Storage,
    limits: &Limits,
    command: AdminCommand,
) -> Result<AdminOutput, AdminError> {
    match storage {
        Storage::Directory(dir) => run_on_directory(dir, limits, command),
        Storage::Database { url, pool_size } => run_on_database(url, *pool_size, limits, command),
    }
}

/// Run `command` on the PostgreSQL database `url`. `restore` copies a sled
/// backup into a data directory, which does not apply here (see
/// `mls-ds backup` on PostgreSQL).
fn run_on_database(
    url: &str,
    pool_size: usize,
    limits: &Limits,
    command: AdminCommand,
) -> Result<AdminOutput, AdminError> {
    if let AdminCommand::Restore(_) = command {
        return Err(AdminError::Failed(
            "restore copies a backup into a new data directory; on PostgreSQL, restore the \
             database with pg_restore or from a base backup"
                .into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AdminError::Failed(format!("cannot start a runtime: {e}")))?;
    let report = runtime.block_on(async {
        let ds = database::open(url, pool_size.min(4), limits)
            .await
            .map_err(|e| AdminError::Failed(e.to_string()))?;
        let report = on_ds(&ds, &command).await;
        ds.backend().close();
        Ok::<_, AdminError>(report)
    })?;
    Ok(output(report))
}

/// [`run`] on a data directory.
fn run_on_directory(
    data_dir: &Path,
    limits: &Limits,
    command: AdminCommand,
) -> Result<AdminOutput, AdminError> {
    let absolute = |path: &Path| {
        std::path::absolute(path).map_err(|source| AdminError::BadPath {
            path: path.to_owned(),
            source,
        })
    };
    let command = match command {
        // The running server resolves paths in its own directory.
        AdminCommand::Backup(out) => AdminCommand::Backup(absolute(&out)?),
        AdminCommand::Restore(from) => return restore(data_dir, &absolute(&from)?),
        other => other,
    };
    if !data_dir.join("db").exists() {
        return Err(AdminError::NoDatabase(data_dir.to_owned()));
    }
    match run_offline(data_dir, limits, &command) {
        Ok(report) => Ok(output(report)),
        Err(StoreError::Storage(StorageError::InUse { .. })) => through_socket(data_dir, &command),
        Err(e) => Err(AdminError::Failed(e.to_string())),
    }
}

/// Run a command on a data directory no server holds: `check`, `stats` and
/// `backup` on the layout alone (so that `check` reports what a start would
/// refuse), the others on a DS opened on it.
fn run_offline(
    data_dir: &Path,
    limits: &Limits,
    command: &AdminCommand,
) -> Result<AdminReport, StoreError> {
    match command {
        AdminCommand::Check => sled_admin::check(
            &Layout::open(data_dir, StoreTuning::admin())?,
            Serving::Stopped,
        ),
        AdminCommand::Stats => sled_admin::stats(&Layout::open(data_dir, StoreTuning::admin())?),
        AdminCommand::Backup(out) => {
            sled_admin::backup(&Layout::open(data_dir, StoreTuning::admin())?, out)
        }
        AdminCommand::Compact => {
            let report = sled_admin::compact(&Layout::open(data_dir, StoreTuning::admin())?)?;
            // Opening the directory again swaps the copy in now.
            drop(Layout::open(data_dir, StoreTuning::admin())?);
            Ok(report)
        }
        other => {
            let ds = embedded::open(data_dir, limits)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Unavailable(format!("cannot start a runtime: {e}")))?;
            runtime.block_on(async {
                let report = on_ds(&ds, other).await;
                ds.backend().shut_down().await?;
                Ok(report)
            })
        }
    }
}

/// Copy the backup in `from` into the new data directory `data_dir` and
/// check the copy.
fn restore(data_dir: &Path, from: &Path) -> Result<AdminOutput, AdminError> {
    let failed = |e: &dyn std::fmt::Display| AdminError::Failed(e.to_string());
    let occupied = std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied {
        return Err(AdminError::Failed(format!(
            "{} exists and is not empty; restore only into a new data directory",
            data_dir.display()
        )));
    }
    if !from.join("db").exists() {
        return Err(AdminError::NoDatabase(from.to_owned()));
    }
    // `export_to` creates the directory itself.
    if data_dir.exists() {
        std::fs::remove_dir(data_dir).map_err(|e| failed(&e))?;
    }
    let backup = Store::open(from, StoreConfig::default()).map_err(|e| failed(&e))?;
    let copied = backup.export_to(data_dir).map_err(|e| failed(&e))?;
    drop(backup);
    let check = Layout::open(data_dir, StoreTuning::admin())
        .and_then(|layout| sled_admin::check(&layout, Serving::Stopped))
        .map_err(|e| failed(&e))?;
    Ok(AdminOutput {
        text: format!(
            "restored {} trees ({} records) from {} into {}\n{}",
            copied.trees,
            copied.entries,
            from.display(),
            data_dir.display(),
            check.text
        ),
        failed: check.failed,
    })
}

fn output(report: AdminReport) -> AdminOutput {
    AdminOutput {
        text: report.text,
        failed: report.failed,
    }
}

fn through_socket(data_dir: &Path, command: &AdminCommand) -> Result<AdminOutput, AdminError> {
    let unreachable = |source| AdminError::Unreachable {
        dir: data_dir.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(data_dir.join(SOCKET)).map_err(unreachable)?;
    stream
        .write_all(format!("{}\n", command.line()).as_bytes())
        .map_err(unreachable)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(unreachable)?;
    let (text, code) = reply.rsplit_once("EXIT ").unwrap_or((reply.as_str(), "1"));
    Ok(AdminOutput {
        text: text.to_owned(),
        failed: code.trim() != "0",
    })
}

/// Serve admin commands on `<data_dir>/admin.sock` until the task is dropped.
pub(crate) async fn serve_socket(cell: Arc<StateCell<SledDs>>, data_dir: PathBuf) {
    let path = data_dir.join(SOCKET);
    // A socket file left by a killed server would make bind fail.
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "admin socket unavailable; live admin commands disabled");
            return;
        }
    };
    // Connecting needs write permission on the socket: the server's user
    // only, whatever the umask.
    if let Err(e) =
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
    {
        tracing::warn!(error = %e, path = %path.display(), "cannot restrict the admin socket; live admin commands disabled");
        let _ = std::fs::remove_file(&path);
        return;
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let cell = cell.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let report = match (cell.get(), AdminCommand::parse(line.trim())) {
                (Some(ds), Some(command)) => on_ds(&ds, &command).await,
                (None, _) => failure(REOPENING),
                (_, None) => failure(&format!("unknown admin command {:?}", line.trim())),
            };
            let code = i32::from(report.failed);
            let _ = write
                .write_all(format!("{}EXIT {code}\n", report.text).as_bytes())
                .await;
        });
    }
}

fn failure(why: &str) -> AdminReport {
    AdminReport {
        text: format!("{why}\n"),
        failed: true,
    }
}

/// Run a command on a DS (the running server's, or one opened offline).
async fn on_ds<B: Backend>(ds: &Ds<B>, command: &AdminCommand) -> AdminReport {
    let done = |text: String| AdminReport {
        text,
        failed: false,
    };
    let result: Result<AdminReport, String> = match command {
        AdminCommand::Check => ds.backend().check().await.map_err(|e| e.to_string()),
        AdminCommand::Stats => ds.backend().report().await.map_err(|e| e.to_string()),
        AdminCommand::Backup(out) => ds.backend().backup(out).await.map_err(|e| e.to_string()),
        AdminCommand::Compact => ds.backend().compact().await.map_err(|e| e.to_string()),
        AdminCommand::Restore(_) => {
            Err("restore works on a stopped server, into a new data directory".into())
        }
        AdminCommand::InviteCreate {
            uses,
            valid_for_hours,
        } => ds
            .create_invite(*uses, valid_for_hours.map(|h| h.saturating_mul(3600)))
            .await
            .map(|i| {
                done(format!(
                    "{}\n{} uses, {}\n",
                    i.code,
                    i.record.uses_left,
                    expiry(i.record.expires_ms)
                ))
            })
            .map_err(|e| e.to_string()),
        AdminCommand::InviteList => ds
            .list_invites()
            .await
            .map(|invites| {
                let mut text = String::new();
                for i in invites {
                    let _ = writeln!(
                        text,
                        "{} uses_left={} {} created_ms={}",
                        i.code,
                        i.record.uses_left,
                        expiry(i.record.expires_ms),
                        i.record.created_ms
                    );
                }
                done(text)
            })
            .map_err(|e| e.to_string()),
        AdminCommand::InviteRevoke(code) => ds
            .revoke_invite(code)
            .await
            .map(|()| done(format!("revoked {code}\n")))
            .map_err(|e| e.to_string()),
        AdminCommand::ClientAdd { id, scheme, key } => add_client(ds, id, *scheme, key).await,
        AdminCommand::ClientList => ds
            .list_clients()
            .await
            .map(|clients| {
                let mut text = String::new();
                for c in clients {
                    let _ = writeln!(
                        text,
                        "{} registered_ms={} deleted={} queue={}",
                        c.id, c.registered_ms, c.deleted, c.queue_depth
                    );
                }
                done(text)
            })
            .map_err(|e| e.to_string()),
        AdminCommand::ClientDelete(id) => match ClientId::new(id) {
            Ok(id) => ds
                .operator_delete_client(&id)
                .await
                .map(|()| done(format!("deleted client {id}\n")))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        AdminCommand::GroupList => ds
            .list_groups()
            .await
            .map(|groups| {
                let mut text = String::new();
                for g in groups {
                    let _ = writeln!(
                        text,
                        "{} epoch={} members={} open={} creator={} created_ms={}",
                        g.id, g.epoch, g.members, g.open, g.creator, g.created_ms
                    );
                }
                done(text)
            })
            .map_err(|e| e.to_string()),
        AdminCommand::GroupDelete(hex_id) => match group_id(hex_id) {
            Ok(id) => ds
                .operator_delete_group(&id)
                .await
                .map(|()| done(format!("deleted group {id}\n")))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        },
        AdminCommand::PruneCommits(days) => ds
            .prune_commits(days.saturating_mul(24 * 3600 * 1000))
            .await
            .map(|n| done(format!("pruned {n} commit records\n")))
            .map_err(|e| e.to_string()),
    };
    result.unwrap_or_else(|e| failure(&e))
}

async fn add_client<B: Backend>(
    ds: &Ds<B>,
    id: &str,
    scheme: u16,
    key: &str,
) -> Result<AdminReport, String> {
    let id = ClientId::new(id).map_err(|e| e.to_string())?;
    let key = hex::decode(key).map_err(|e| format!("--key is not hex: {e}"))?;
    if key.is_empty() || key.len() > 1024 {
        return Err("the key must be 1 to 1024 bytes".into());
    }
    let text = match ds
        .operator_add_client(id, scheme, key)
        .await
        .map_err(|e| e.to_string())?
    {
        Registration::Created(r) => format!("added client {}\n", r.client_id),
        Registration::Existing(r) => {
            format!("client {} was already added with this key\n", r.client_id)
        }
    };
    Ok(AdminReport {
        text,
        failed: false,
    })
}

fn group_id(hex_id: &str) -> Result<GroupId, String> {
    let bytes = hex::decode(hex_id).map_err(|e| format!("group id is not hex: {e}"))?;
    GroupId::new(&bytes).map_err(|e| e.to_string())
}

fn expiry(expires_ms: Option<u64>) -> String {
    match expires_ms {
        Some(ms) => format!("expires_ms={ms}"),
        None => "no expiry".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_goes_over_the_socket_unchanged() {
        let commands = [
            AdminCommand::Check,
            AdminCommand::Stats,
            AdminCommand::Compact,
            AdminCommand::Backup(PathBuf::from("/backups/a b")),
            AdminCommand::InviteCreate {
                uses: 3,
                valid_for_hours: Some(48),
            },
            AdminCommand::InviteCreate {
                uses: 1,
                valid_for_hours: None,
            },
            AdminCommand::InviteList,
            AdminCommand::InviteRevoke("00ff".into()),
            AdminCommand::ClientAdd {
                id: "alice".into(),
                scheme: 0x0807,
                key: "ab".into(),
            },
            AdminCommand::ClientList,
            AdminCommand::ClientDelete("alice".into()),
            AdminCommand::GroupList,
            AdminCommand::GroupDelete("0a0b".into()),
            AdminCommand::PruneCommits(30),
        ];
        for c in commands {
            assert_eq!(
                AdminCommand::parse(&c.line()),
                Some(c.clone()),
                "{}",
                c.line()
            );
        }
        assert_eq!(AdminCommand::parse("nonsense"), None);
        assert_eq!(AdminCommand::parse("invite-create x"), None);
    }
}
