//! The `mls-ds` binary: parse flags, set up logging, run a subcommand.

use std::process::ExitCode;

use clap::Parser;
use mls_ds_server::config::{Cli, Command};
use mls_ds_server::{admin, db::Db, error::ServerError, open_store};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
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
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| ServerError::Internal(format!("cannot start runtime: {e}")))?;
            runtime.block_on(mls_ds_server::serve(&cli.data_dir, args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let (report, problems) = with_db(&cli.data_dir, admin::check)?;
            print!("{report}");
            Ok(if problems == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Stats => {
            print!("{}", with_db(&cli.data_dir, admin::stats)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { out } => {
            print!("{}", with_db(&cli.data_dir, |db| admin::backup(db, &out))?);
            Ok(ExitCode::SUCCESS)
        }
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
        ServerError::Storage(ref s) if s.to_string().contains("lock") => ServerError::Unavailable(
            format!(
                "{} is in use by a running server; stop it first (mls-ds backup/check/stats read the database directly)",
                data_dir.display()
            ),
        ),
        other => other,
    })?;
    let db = Db::new(store)?;
    f(&db)
}
