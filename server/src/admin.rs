//! Operator commands: `check` (integrity), `stats` (counts) and `backup`
//! (consistent copy). sled allows one process per database, so they run on
//! an opened [`Db`] directly when the server is stopped, and inside the
//! running server otherwise: it listens on the Unix socket
//! `<data-dir>/admin.sock` (reachable only by users who may write the data
//! directory) for one command per connection and answers with the report and
//! a final `EXIT <code>` line.

use std::fmt::Write as _;
use std::path::Path;

use mls_ds_storage::codec::decode_record;
use openmls::prelude::{GroupId, PublicGroup};

use crate::db::{ClientRecord, CommitRecord, Db, GroupRecord, KeyPackageRecord};
use crate::error::{Result, ServerError};

/// Verify every record decodes, every queue entry points to a stored
/// message, and every group's `PublicGroup` loads with the recorded epoch.
/// Returns a report and the number of problems.
pub fn check(db: &Db) -> Result<(String, usize)> {
    let s = &db.storage;
    let mut problems = Vec::new();
    let mut counts = [0usize; 5];
    for (k, v) in s.scan_raw(db.clients, b"")? {
        counts[0] += 1;
        if let Err(e) = decode_record::<ClientRecord>("app.ds.clients", &k, &v) {
            problems.push(format!("client record: {e}"));
        }
    }
    for (k, v) in s.scan_raw(db.key_packages, b"")? {
        counts[1] += 1;
        if let Err(e) = decode_record::<KeyPackageRecord>("app.ds.key_packages", &k, &v) {
            problems.push(format!("key package record: {e}"));
        }
    }
    for (k, v) in s.scan_raw(db.groups, b"")? {
        counts[2] += 1;
        let gid = hex::encode(&k);
        match decode_record::<GroupRecord>("app.ds.groups", &k, &v) {
            Err(e) => problems.push(format!("group {gid}: {e}")),
            Ok(record) => match PublicGroup::load(s, &GroupId::from_slice(&k)) {
                Ok(Some(pg)) => {
                    let epoch = pg.group_context().epoch().as_u64();
                    if epoch != record.epoch {
                        problems.push(format!(
                            "group {gid}: record says epoch {}, PublicGroup is at {epoch}",
                            record.epoch
                        ));
                    }
                    if pg.members().count() != record.members.len() {
                        problems.push(format!("group {gid}: roster size differs from PublicGroup"));
                    }
                }
                Ok(None) => problems.push(format!("group {gid}: PublicGroup state missing")),
                Err(e) => problems.push(format!("group {gid}: PublicGroup does not load: {e}")),
            },
        }
        if s.get_raw(db.group_infos, &k)?.is_none() {
            problems.push(format!("group {gid}: no GroupInfo stored"));
        }
    }
    for (k, v) in s.scan_raw(db.commits, b"")? {
        if let Err(e) = decode_record::<CommitRecord>("app.ds.commits", &k, &v) {
            problems.push(format!("commit record: {e}"));
        }
    }
    let queues = crate::queues::verify(db)?;
    counts[3] = queues.entries as usize;
    counts[4] = queues.messages;
    problems.extend(queues.problems);
    let mut report = format!(
        "checked {} clients, {} key packages, {} groups, {} queue entries, {} stored messages\n",
        counts[0], counts[1], counts[2], counts[3], counts[4]
    );
    for p in &problems {
        let _ = writeln!(report, "PROBLEM: {p}");
    }
    let _ = writeln!(
        report,
        "{}",
        if problems.is_empty() { "OK" } else { "FAILED" }
    );
    Ok((report, problems.len()))
}

/// Counts of what the database holds.
pub fn stats(db: &Db) -> Result<String> {
    let s = &db.storage;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "clients            {}",
        s.scan_raw(db.clients, b"")?.len()
    );
    let _ = writeln!(
        out,
        "key packages       {}",
        s.scan_raw(db.key_packages, b"")?.len()
    );
    let _ = writeln!(
        out,
        "groups             {}",
        s.scan_raw(db.groups, b"")?.len()
    );
    let _ = writeln!(
        out,
        "accepted commits   {}",
        s.scan_raw(db.commits, b"")?.len()
    );
    let (entries, messages) = crate::queues::counts(db)?;
    let _ = writeln!(out, "queue entries      {entries}");
    let _ = writeln!(out, "stored messages    {messages}");
    let _ = writeln!(out, "size on disk       {} bytes", db.store.size_on_disk()?);
    Ok(out)
}

/// Name of the admin socket in the data directory.
pub const SOCKET: &str = "admin.sock";

/// Copy every tree into a new database at `out`. The caller makes sure no
/// write runs meanwhile (a stopped server, or the running server's write
/// gate held exclusively), so the copy is consistent.
pub fn backup(db: &Db, out: &Path) -> Result<String> {
    if out.exists() {
        return Err(ServerError::BadRequest(format!(
            "backup target {} exists; choose a new directory",
            out.display()
        )));
    }
    let trees = db.store.export_to(out)?.trees;
    Ok(format!(
        "backup of {trees} trees written to {}\n",
        out.display()
    ))
}

/// Serve admin commands on `<data_dir>/admin.sock` until the task is dropped.
pub async fn serve_socket(
    cell: std::sync::Arc<crate::recovery::StateCell>,
    data_dir: std::path::PathBuf,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
            let (report, code) = match cell.get() {
                Some(state) => run_command(&state, line.trim()).await,
                None => (format!("{}\n", crate::recovery::REOPENING), 1),
            };
            let _ = write
                .write_all(format!("{report}EXIT {code}\n").as_bytes())
                .await;
        });
    }
}

async fn run_command(state: &std::sync::Arc<crate::state::AppState>, line: &str) -> (String, i32) {
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    let db = state.db.clone();
    let result = match cmd {
        "check" => {
            tokio::task::spawn_blocking(move || check(&db).map(|(r, n)| (r, i32::from(n > 0))))
                .await
        }
        "stats" => tokio::task::spawn_blocking(move || stats(&db).map(|r| (r, 0))).await,
        "backup" => {
            let out = std::path::PathBuf::from(arg);
            let _exclusive = state.write_gate.write().await;
            tokio::task::spawn_blocking(move || backup(&db, &out).map(|r| (r, 0))).await
        }
        other => return (format!("unknown admin command {other:?}\n"), 2),
    };
    match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => (format!("{e}\n"), 1),
        Err(e) => (format!("admin task failed: {e}\n"), 1),
    }
}
