//! Exactly-once sends: a message is queued durably (with a send id) before
//! it leaves; what could not go out stays in the outbox and goes with the
//! next flush or sync; the DS answers a resend with the first answer, so no
//! recipient gets it twice.
//!
//! ```sh
//! cargo run --release -p mls-ds-server --bin mls-ds        # terminal 1
//! cargo run --release -p mls-ds-client --example outbox    # terminal 2
//! ```

use mls_ds_client::{Client, ClientConfig, ClientError};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let run = std::process::id();
    let dir = std::env::temp_dir().join(format!("mls-ds-outbox-{run}"));
    let (a, b) = (format!("alice-{run}"), format!("bob-{run}"));
    let alice = Client::open(dir.join("alice"), &url, &a, ClientConfig::default())?;
    let bob = Client::open(dir.join("bob"), &url, &b, ClientConfig::default())?;
    alice.register().await?;
    bob.register().await?;
    let group = alice.create_group(false).await?;
    alice.invite(&group, &[b.as_str()]).await?;

    // Queue without sending (e.g. offline): from here on it is delivered
    // exactly once, even if the process dies now.
    let id = alice.queue_message(&group, b"written offline").await?;
    println!(
        "queued {id:?}; outbox: {} message(s)",
        alice.pending_sends()?.len()
    );
    // `send` delivers the outbox in order, then its own message.
    alice.send(&group, b"and one more").await?;
    println!("outbox after send: {}", alice.pending_sends()?.len());
    for e in bob.receive(0).await? {
        if let mls_ds_client::Event::Message { data, .. } = e {
            println!("bob got: {}", String::from_utf8_lossy(&data));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
