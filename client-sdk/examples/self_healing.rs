//! Self-healing: bob's queue loses two of alice's commits before bob reads
//! them (here his own credentials acknowledge them from elsewhere; on a real
//! DS, retention can do the same to a device that stays away too long).
//! Bob's next sync notices the gap, rejoins the group by external commit,
//! and tells the application (`Event::QueueGap`, `Event::Resynced`); both
//! end in the same epoch with the same secrets.
//!
//! ```sh
//! cargo run --release -p mls-ds-server --bin mls-ds              # terminal 1
//! cargo run --release -p mls-ds-client --example self_healing    # terminal 2
//! ```

use mls_ds_client::{Client, ClientConfig, ClientError, Event};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let run = std::process::id();
    let dir = std::env::temp_dir().join(format!("mls-ds-healing-{run}"));
    let (a, b) = (format!("alice-{run}"), format!("bob-{run}"));
    let alice = Client::open(dir.join("alice"), &url, &a, ClientConfig::default())?;
    let bob = Client::open(dir.join("bob"), &url, &b, ClientConfig::default())?;
    alice.register().await?;
    bob.register().await?;
    let group = alice.create_group(false).await?;
    alice.invite(&group, &[b.as_str()]).await?;
    bob.receive(0).await?;

    // Two commits bob never reads: acknowledged (so deleted) behind his back.
    alice.self_update(&group).await?;
    alice.self_update(&group).await?;
    let head = bob.api().fetch(bob.cursor()?, 1, 0).await?.head;
    bob.api().ack(head).await?;

    for e in bob.receive(0).await? {
        match e {
            Event::QueueGap { from, seq } => {
                println!("bob: queue entries {from}..={seq} were lost")
            }
            Event::Resynced {
                from_epoch,
                to_epoch,
                reason,
                ..
            } => println!("bob: rejoined from epoch {from_epoch} to {to_epoch} ({reason})"),
            other => println!("bob: {other:?}"),
        }
    }
    alice.receive(0).await?;
    println!(
        "epochs: alice {}, bob {}; same secret: {}",
        alice.epoch(&group).await?,
        bob.epoch(&group).await?,
        alice.export_secret(&group, "example", 32).await?
            == bob.export_secret(&group, "example", 32).await?
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
