//! The `mls-ds` binary: parse flags, set up logging, run a subcommand.

use std::process::ExitCode;

use clap::Parser;
use mls_ds_server::config::{Cli, Command};
use mls_ds_server::{admin, db::Db, error::ServerError, open_store};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr (stdout is for command output such as `stats`),
    // colored only on a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mls-ds: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, ServerError> {
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    match command {
        Command::Serve(args) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = args.workers {
                builder.worker_threads(usize::from(n));
            }
            let runtime = builder
                .enable_all()
                .build()
                .map_err(|e| ServerError::Internal(format!("cannot start runtime: {e}")))?;
            runtime.block_on(mls_ds_server::serve(&cli.data_dir, args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => admin_command(&cli.data_dir, "check", |db| {
            admin::check(db).map(|(report, problems)| (report, problems > 0))
        }),
        Command::Stats => admin_command(&cli.data_dir, "stats", |db| {
            admin::stats(db).map(|r| (r, false))
        }),
        Command::Backup { out } => {
            // The running server resolves the path in its own directory.
            let out = std::path::absolute(&out)
                .map_err(|e| ServerError::BadRequest(format!("bad --out path: {e}")))?;
            let line = format!("backup {}", out.display());
            admin_command(&cli.data_dir, &line, |db| {
                admin::backup(db, &out).map(|r| (r, false))
            })
        }
    }
}

/// Run an admin command: directly on the database if no server holds it,
/// otherwise through the running server's admin socket.
fn admin_command(
    data_dir: &std::path::Path,
    line: &str,
    offline: impl FnOnce(&Db) -> Result<(String, bool), ServerError>,
) -> Result<ExitCode, ServerError> {
    match with_db(data_dir, offline) {
        Ok((report, failed)) => {
            print!("{report}");
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(ServerError::Unavailable(_)) if data_dir.join(admin::SOCKET).exists() => {
            use std::io::{Read, Write};
            let mut stream = std::os::unix::net::UnixStream::connect(data_dir.join(admin::SOCKET))
                .map_err(|e| {
                    ServerError::Unavailable(format!("cannot reach the running server: {e}"))
                })?;
            stream
                .write_all(format!("{line}\n").as_bytes())
                .map_err(|e| ServerError::Internal(e.to_string()))?;
            let mut reply = String::new();
            stream
                .read_to_string(&mut reply)
                .map_err(|e| ServerError::Internal(e.to_string()))?;
            let (report, code) = reply.rsplit_once("EXIT ").unwrap_or((reply.as_str(), "1"));
            print!("{report}");
            Ok(if code.trim() == "0" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(e) => Err(e),
    }
}

/// Run an admin command on the stopped database.
fn with_db<T>(
    data_dir: &std::path::Path,
    f: impl FnOnce(&Db) -> Result<T, ServerError>,
) -> Result<T, ServerError> {
    if !data_dir.join("db").exists() {
        return Err(ServerError::NotFound(format!(
            "no database in {}",
            data_dir.display()
        )));
    }
    let store = open_store(data_dir, 64).map_err(|e| match e {
        ServerError::Storage(ref s) if s.to_string().contains("lock") => {
            ServerError::Unavailable(format!(
                "{} is in use by a running server that does not answer on {}",
                data_dir.display(),
                admin::SOCKET
            ))
        }
        other => other,
    })?;
    let db = Db::new(store)?;
    f(&db)
}
