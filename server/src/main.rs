//! The `mls-ds` binary: read flags, environment and config file, set up
//! logging, run a subcommand.

use std::process::ExitCode;

use mls_ds_server::admin::{self, AdminCommand};
use mls_ds_server::config::{Cli, ClientCommand, Command, GroupCommand, InviteCommand};
use mls_ds_server::config_file::{self, LoadError};

/// mimalloc instead of glibc's malloc. Under load glibc's allocator took about
/// a sixth of the request threads' CPU: the writer thread frees what request
/// threads allocated (stored bodies, envelopes), which takes the other arena's
/// lock, and fast-bin consolidation ran on the request path. mimalloc frees
/// into per-thread pages without a shared lock: server CPU per request fell by
/// about a tenth (BENCHMARKS.md), with the same peak RSS for 100,000 and
/// 1,000,000 queued messages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps a freed page committed before returning it to the
/// system, in milliseconds, unless `MIMALLOC_PURGE_DELAY` is set. With v3's
/// default (1 s) a server holding 3,000,000 queued messages had 238 MiB
/// resident, against 201 MiB with 10 ms (and 207 with glibc), at no
/// measurable difference in CPU; 0 (purge at once) cost about a tenth more
/// CPU per request.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// `mi_option_purge_delay` of mimalloc.h (v3, as libmimalloc-sys 0.1.49
/// builds it), which the Rust bindings do not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
// The option after it, which the bindings do name, pins the value.
const _: () = assert!(MI_OPTION_PURGE_DELAY == libmimalloc_sys::mi_option_use_numa_nodes - 1);

/// Exit status of a usage error, as clap uses for the command line.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` stores a number in mimalloc's option table;
        // it has no preconditions and may be called at any time from any
        // thread. mimalloc reads the delay each time it schedules a purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    let cli = match config_file::load() {
        Ok(cli) => cli,
        Err(LoadError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("mls-ds: {e}");
            return ExitCode::from(USAGE);
        }
    };
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

fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // Operator commands on a stopped data directory apply the configured
    // limits (e.g. the queue depth for a group deletion's notices).
    let limits = cli.serve.limits.clone();
    let storage = cli.storage();
    let admin_command = match cli.command.unwrap_or(Command::Serve(Box::new(cli.serve))) {
        Command::Serve(args) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = args.workers {
                builder.worker_threads(usize::from(n));
            }
            let runtime = builder
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            runtime.block_on(mls_ds_server::serve(&storage, *args))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Check => AdminCommand::Check,
        Command::Stats => AdminCommand::Stats,
        Command::Compact => AdminCommand::Compact,
        Command::Backup { out } => AdminCommand::Backup(out),
        Command::Restore { from } => AdminCommand::Restore(from),
        Command::Invite(InviteCommand::Create {
            uses,
            valid_for_hours,
        }) => AdminCommand::InviteCreate {
            uses,
            valid_for_hours,
        },
        Command::Invite(InviteCommand::List) => AdminCommand::InviteList,
        Command::Invite(InviteCommand::Revoke { code }) => AdminCommand::InviteRevoke(code),
        Command::Client(ClientCommand::Add { id, key, scheme }) => {
            AdminCommand::ClientAdd { id, scheme, key }
        }
        Command::Client(ClientCommand::List) => AdminCommand::ClientList,
        Command::Client(ClientCommand::Delete { id }) => AdminCommand::ClientDelete(id),
        Command::Group(GroupCommand::List) => AdminCommand::GroupList,
        Command::Group(GroupCommand::Delete { id }) => AdminCommand::GroupDelete(id),
        Command::PruneCommits { older_than_days } => AdminCommand::PruneCommits(older_than_days),
        Command::Migrate { from, to } => {
            let output = mls_ds_server::migrate::run(&from, &to, &limits)?;
            print!("{}", output.text);
            return Ok(if output.failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    let output = admin::run(&storage, &limits, admin_command)?;
    print!("{}", output.text);
    Ok(if output.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
