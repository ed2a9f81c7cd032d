//! The whole two-client flow against a running DS:
//!
//! ```sh
//! cargo run --release -p mls-ds-server --bin mls-ds            # terminal 1
//! cargo run --release -p mls-ds-client --example two_clients    # terminal 2
//! ```
//!
//! Pass another DS URL as the first argument if it does not listen on
//! 127.0.0.1:8080. State goes to a fresh temporary directory per run.

use mls_ds_client::{Client, ClientConfig, ClientError, Event};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let dir = std::env::temp_dir().join(format!("mls-ds-example-{}", std::process::id()));
    // Ids must be unique on the DS; the process id keeps reruns apart.
    let (a, b) = (
        format!("alice-{}", std::process::id()),
        format!("bob-{}", std::process::id()),
    );
    let alice = Client::open(dir.join("alice"), &url, &a, ClientConfig::default())?;
    let bob = Client::open(dir.join("bob"), &url, &b, ClientConfig::default())?;
    alice.register().await?;
    bob.register().await?;

    let group = alice.create_group(false).await?;
    alice.invite(&group, &[b.as_str()]).await?;
    alice.send(&group, b"hello bob").await?;

    for event in bob.receive(5_000).await? {
        match event {
            Event::Joined { .. } => println!("bob joined the group"),
            Event::Message { sender, data, .. } => println!(
                "bob got from {}: {}",
                String::from_utf8_lossy(&sender),
                String::from_utf8_lossy(&data)
            ),
            other => println!("bob: {other:?}"),
        }
    }
    bob.send(&group, b"hi alice").await?;
    bob.self_update(&group).await?;
    for event in alice.receive(5_000).await? {
        println!("alice: {event:?}");
    }
    println!(
        "both at epoch {} with members {:?}",
        alice.epoch(&group).await?,
        alice.members(&group).await?
    );
    Ok(())
}
