//! `mls-chat chat GROUP`: one terminal for a conversation. Lines typed are
//! sent to the group; what arrives (from the DS's queue stream) is printed
//! as it comes; `/`-commands manage the group. Ends at end of input or
//! `/quit`.

use std::future::poll_fn;
use std::sync::Arc;

use futures_core::Stream;
use mls_ds_client::{Client, ClientError};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::display::event_line;

const HELP: &str = "type a message and press Enter to send it; commands:
  /members            who is in the group
  /invite NAME...     add clients
  /remove NAME        remove a client
  /update             refresh your keys
  /quit               leave the chat (the group stays)";

/// Chat in `gid` until the input ends.
pub(crate) async fn run(client: Arc<Client>, gid: Vec<u8>) -> Result<(), ClientError> {
    client.sync().await?;
    // Fails early, with the usual error, if this client is not in the group.
    let members = client.members(&gid).await?;
    println!(
        "chatting in {} with {}; /help for commands",
        hex::encode(&gid),
        members.join(", ")
    );
    let mut events = client.event_stream();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            event = poll_fn(|cx| std::pin::Pin::new(&mut events).poll_next(cx)) => match event {
                Some(Ok(e)) => {
                    println!("{}", event_line(&e, Some(&gid)));
                    client.ack_events(e.seq())?;
                }
                Some(Err(e)) => eprintln!("mls-chat: {e}"),
                None => return Ok(()),
            },
            line = lines.next_line() => {
                let Some(line) = line.map_err(|e| ClientError::Usage(format!("reading input: {e}")))? else {
                    return Ok(());
                };
                match command(&client, &gid, line.trim()).await {
                    Ok(Step::Continue) => {}
                    Ok(Step::Quit) => return Ok(()),
                    // A failed command does not end the chat.
                    Err(e) => eprintln!("mls-chat: {e}"),
                }
            }
        }
    }
}

enum Step {
    Continue,
    Quit,
}

async fn command(client: &Client, gid: &[u8], line: &str) -> Result<Step, ClientError> {
    let mut words = line.split_whitespace();
    match words.next() {
        None => {}
        Some("/quit") => return Ok(Step::Quit),
        Some("/help") => println!("{HELP}"),
        Some("/members") => println!("{}", client.members(gid).await?.join(", ")),
        Some("/invite") => {
            let names: Vec<&str> = words.collect();
            if names.is_empty() {
                println!("usage: /invite NAME...");
            } else {
                let epoch = client.invite(gid, &names).await?;
                println!("you added {} (epoch {epoch})", names.join(", "));
            }
        }
        Some("/remove") => match words.next() {
            Some(who) => {
                let epoch = client.remove(gid, who).await?;
                println!("you removed {who} (epoch {epoch})");
            }
            None => println!("usage: /remove NAME"),
        },
        Some("/update") => {
            let epoch = client.self_update(gid).await?;
            println!("you updated your keys (epoch {epoch})");
        }
        Some(other) if other.starts_with('/') => {
            println!("unknown command {other}; /help lists them");
        }
        Some(_) => {
            client.send(gid, line.as_bytes()).await?;
        }
    }
    Ok(Step::Continue)
}
