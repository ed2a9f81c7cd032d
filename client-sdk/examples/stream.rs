//! Receiving as a stream: bob follows his queue as the DS pushes it, while
//! alice sends; each event is acknowledged once the application has it.
//!
//! ```sh
//! cargo run --release -p mls-ds-server --bin mls-ds        # terminal 1
//! cargo run --release -p mls-ds-client --example stream    # terminal 2
//! ```

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;

use futures_core::Stream;
use mls_ds_client::{Client, ClientConfig, ClientError, Event};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let run = std::process::id();
    let dir = std::env::temp_dir().join(format!("mls-ds-stream-{run}"));
    let (a, b) = (format!("alice-{run}"), format!("bob-{run}"));
    let alice = Client::open(dir.join("alice"), &url, &a, ClientConfig::default())?;
    let bob = Arc::new(Client::open(
        dir.join("bob"),
        &url,
        &b,
        ClientConfig::default(),
    )?);
    alice.register().await?;
    bob.register().await?;
    let group = alice.create_group(false).await?;
    alice.invite(&group, &[b.as_str()]).await?;

    // The stream reconnects by itself; dropping it stops it.
    let mut events = bob.event_stream();
    for i in 0..3 {
        alice
            .send(&group, format!("message {i}").as_bytes())
            .await?;
    }
    let mut messages = 0;
    while messages < 3 {
        let Some(event) = poll_fn(|cx| Pin::new(&mut events).poll_next(cx)).await else {
            break;
        };
        let event = event?;
        if let Event::Message { sender, data, .. } = &event {
            println!(
                "{}: {}",
                String::from_utf8_lossy(sender),
                String::from_utf8_lossy(data)
            );
            messages += 1;
        }
        // Handled: it leaves the inbox (else the next stream yields it again).
        bob.ack_events(event.seq())?;
    }
    drop(events);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
