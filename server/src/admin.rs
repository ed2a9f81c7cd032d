//! Operator commands: `check`, `stats` and `backup`. sled allows one
//! process per data directory, so a command runs on the directory directly
//! when no server holds it, and otherwise inside the running server: it
//! listens on the Unix socket `<data-dir>/admin.sock` (reachable only by
//! users who may write the data directory) for one command per connection
//! and answers with the report and a final `EXIT <code>` line.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mls_ds_storage::StorageError;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::backend::sled::{admin as sled_admin, layout::Layout};
use crate::backend::{AdminReport, Backend, StoreError};
use crate::embedded::SledDs;
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
    /// A consistent copy into a new directory.
    Backup(PathBuf),
}

impl AdminCommand {
    /// The line sent over the admin socket.
    fn line(&self) -> String {
        match self {
            AdminCommand::Check => "check".into(),
            AdminCommand::Stats => "stats".into(),
            AdminCommand::Backup(out) => format!("backup {}", out.display()),
        }
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
    /// `--out` could not be resolved.
    #[error("bad --out path {path}: {source}")]
    BadOut {
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

/// Run `command` on `data_dir`: directly if no server holds it, otherwise
/// through the running server's admin socket.
pub fn run(data_dir: &Path, command: AdminCommand) -> Result<AdminOutput, AdminError> {
    let command = match command {
        // The running server resolves the path in its own directory.
        AdminCommand::Backup(out) => AdminCommand::Backup(
            std::path::absolute(&out).map_err(|source| AdminError::BadOut { path: out, source })?,
        ),
        other => other,
    };
    if !data_dir.join("db").exists() {
        return Err(AdminError::NoDatabase(data_dir.to_owned()));
    }
    match Layout::open(data_dir, 64) {
        Ok(layout) => offline(&layout, &command)
            .map(output)
            .map_err(|e| AdminError::Failed(e.to_string())),
        Err(StoreError::Storage(StorageError::InUse { .. })) => through_socket(data_dir, &command),
        Err(e) => Err(AdminError::Failed(e.to_string())),
    }
}

fn offline(layout: &Layout, command: &AdminCommand) -> Result<AdminReport, StoreError> {
    match command {
        AdminCommand::Check => sled_admin::check(layout),
        AdminCommand::Stats => sled_admin::stats(layout),
        AdminCommand::Backup(out) => sled_admin::backup(layout, out),
    }
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
            tracing::warn!(error = %e, path = %path.display(), "admin socket unavailable; live backup disabled");
            return;
        }
    };
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
            let report = match cell.get() {
                Some(ds) => answer(ds.backend(), line.trim()).await,
                None => AdminReport {
                    text: format!("{REOPENING}\n"),
                    failed: true,
                },
            };
            let code = i32::from(report.failed);
            let _ = write
                .write_all(format!("{}EXIT {code}\n", report.text).as_bytes())
                .await;
        });
    }
}

/// Run one command line on the live backend.
async fn answer<B: Backend>(backend: &B, line: &str) -> AdminReport {
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    let result = match cmd {
        "check" => backend.check().await,
        "stats" => backend.report().await,
        "backup" => backend.backup(Path::new(arg)).await,
        other => Err(StoreError::Unavailable(format!(
            "unknown admin command {other:?}"
        ))),
    };
    result.unwrap_or_else(|e| AdminReport {
        text: format!("{e}\n"),
        failed: true,
    })
}
