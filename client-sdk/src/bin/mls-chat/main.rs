//! `mls-chat`: a small command-line chat on the SDK. Each data directory is
//! one client; its MLS state survives restarts. `chat` is a conversation in
//! one terminal ([`chat`]); the other commands do one thing and exit.

mod chat;
mod display;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use mls_ds_client::{Client, ClientConfig, ClientError, RecoveryCode, StoreKey};

use display::{event_line, explain};

/// Chat through an mls-ds delivery service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Directory holding this client's identity and MLS state.
    #[arg(long, env = "MLS_CHAT_DATA_DIR")]
    data_dir: std::path::PathBuf,
    /// Base URL of the delivery service (`https://` or `http://`).
    #[arg(long, env = "MLS_CHAT_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// PEM file of a CA (or the DS's self-signed certificate) to trust for
    /// an `https://` server, besides the platform's roots.
    #[arg(long, env = "MLS_CHAT_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// File whose first line is the passphrase the local store is encrypted
    /// with (Argon2id). Give it from the first command on (`register`) and
    /// with every later one; a store made without it stays unencrypted.
    #[arg(long, env = "MLS_CHAT_PASSPHRASE_FILE")]
    passphrase_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this client's identity (first time) and register it with the DS.
    Register {
        /// Client id: letters, digits and . _ ~ @ -
        #[arg(long)]
        name: String,
        /// Invitation code from the DS's operator, if its registration
        /// policy asks for one.
        #[arg(long)]
        invite: Option<String>,
    },
    /// Take a name back after this client's data directory was lost:
    /// a new identity in an empty `--data-dir`, the recovery code shown at
    /// registration, and every group rejoined. If it fails midway, run it
    /// again with the same `--data-dir` and code.
    Recover {
        /// The client id to take back.
        #[arg(long)]
        name: String,
        /// The recovery code printed by `register` (or by the last `recover`).
        #[arg(long, env = "MLS_CHAT_RECOVERY_CODE", hide_env_values = true)]
        code: String,
        /// The new code a failed `recover` printed, to run it again;
        /// otherwise a new one is made and printed first.
        #[arg(long, hide_env_values = true)]
        new_code: Option<String>,
    },
    /// List groups with their epoch and members.
    Groups,
    /// Create a group; prints its id.
    CreateGroup {
        /// Let any registered client join by external commit.
        #[arg(long)]
        open: bool,
    },
    /// Add clients to a group.
    Invite {
        /// Group id (hex).
        group: String,
        /// Client ids to add.
        #[arg(required = true)]
        clients: Vec<String>,
    },
    /// Remove a client from a group.
    Remove {
        /// Group id (hex).
        group: String,
        /// Client id to remove.
        client: String,
    },
    /// Join a group by external commit (open groups, or to resync).
    Join {
        /// Group id (hex).
        group: String,
    },
    /// Refresh this client's keys in a group.
    Update {
        /// Group id (hex).
        group: String,
    },
    /// Send a message.
    Send {
        /// Group id (hex).
        group: String,
        /// Text to send.
        text: String,
    },
    /// Chat in a group in this terminal: type messages, see what arrives
    /// as it comes, `/help` for commands.
    Chat {
        /// Group id (hex).
        group: String,
    },
    /// Receive and print messages (and joins, commits, removals).
    Recv {
        /// Keep waiting for new messages (long-poll) until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

/// The store key from the first line of a passphrase file.
fn passphrase(file: &std::path::Path) -> Result<StoreKey, ClientError> {
    // Wiped from memory when dropped, like the key made from it.
    let text = std::fs::read_to_string(file)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| {
            ClientError::Usage(format!(
                "cannot read passphrase file {}: {e}",
                file.display()
            ))
        })?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(ClientError::Usage(format!(
            "passphrase file {} is empty",
            file.display()
        )));
    }
    Ok(StoreKey::from_passphrase(line))
}

fn group_id(hex_id: &str) -> Result<Vec<u8>, ClientError> {
    hex::decode(hex_id).map_err(|e| ClientError::Usage(format!("group id must be hex: {e}")))
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    let mut config = ClientConfig::default();
    if let Some(ca) = &cli.ca_cert {
        config.tls.add_ca_pem_file(ca)?;
    }
    if let Some(file) = &cli.passphrase_file {
        config.store_key = Some(passphrase(file)?);
    }
    if let Cmd::Recover {
        name,
        code,
        new_code,
    } = &cli.command
    {
        let code: RecoveryCode = code.parse()?;
        let next = match new_code {
            Some(c) => c.parse()?,
            None => RecoveryCode::generate(),
        };
        // Shown before it is bound: a crash midway must not lose it.
        println!("new recovery code (it replaces the old one once this succeeds; if this fails, run it again with --new-code and the same --data-dir):");
        println!("{next}");
        let client =
            Client::recover(&cli.data_dir, &cli.server, name, &code, &next, config).await?;
        println!("recovered {}", client.id());
        for gid in client.groups().await {
            println!("rejoined {}", hex::encode(gid));
        }
        return Ok(());
    }
    let client = match &cli.command {
        Cmd::Register { name, .. } => Client::open(&cli.data_dir, &cli.server, name, config)?,
        _ => Client::open_existing(&cli.data_dir, &cli.server, config)?,
    };
    match cli.command {
        Cmd::Register { invite, .. } => {
            let code = client.register_with_invite(invite.as_deref()).await?;
            println!("registered {}", client.id());
            match code {
                Some(code) => {
                    println!("recovery code (keep it apart from this machine; it takes the name back if this data directory is lost):");
                    println!("{code}");
                }
                None => {
                    println!("(its recovery code is the one shown when it was first registered)")
                }
            }
        }
        // Handled before a client is opened.
        Cmd::Recover { .. } => {}
        Cmd::Groups => {
            client.sync().await?;
            for gid in client.groups().await {
                println!(
                    "{} epoch {} members {}",
                    hex::encode(&gid),
                    client.epoch(&gid).await?,
                    client.members(&gid).await?.join(",")
                );
            }
        }
        Cmd::CreateGroup { open } => {
            let gid = client.create_group(open).await?;
            println!("{}", hex::encode(gid));
        }
        Cmd::Invite { group, clients } => {
            let names: Vec<&str> = clients.iter().map(String::as_str).collect();
            let epoch = client.invite(&group_id(&group)?, &names).await?;
            println!("invited {}; epoch {epoch}", clients.join(","));
        }
        Cmd::Remove { group, client: who } => {
            let epoch = client.remove(&group_id(&group)?, &who).await?;
            println!("removed {who}; epoch {epoch}");
        }
        Cmd::Join { group } => {
            let epoch = client.join_external(&group_id(&group)?).await?;
            println!("joined; epoch {epoch}");
        }
        Cmd::Update { group } => {
            let epoch = client.self_update(&group_id(&group)?).await?;
            println!("updated; epoch {epoch}");
        }
        Cmd::Send { group, text } => {
            let gid = group_id(&group)?;
            client.sync().await?;
            client.send(&gid, text.as_bytes()).await?;
        }
        Cmd::Chat { group } => {
            let gid = group_id(&group)?;
            chat::run(Arc::new(client), gid).await?;
        }
        Cmd::Recv { follow } => loop {
            client.sync_wait(if follow { 25_000 } else { 0 }).await?;
            // Print first, then drop from the inbox: a crash in between shows
            // an event twice rather than never.
            let events = client.events()?;
            for e in &events {
                println!("{}", event_line(e, None));
            }
            if let Some(last) = events.last() {
                client.ack_events(last.seq())?;
            }
            if !follow {
                break;
            }
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MLS_CHAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mls-chat: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let data_dir = cli.data_dir.clone();
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mls-chat: {}", explain(&e, &data_dir));
            ExitCode::FAILURE
        }
    }
}
