//! Taking a client id back after losing the whole store: `register` gives a
//! recovery code for the user to keep apart from the device; with it,
//! `Client::recover` binds the id to a new key on the DS, publishes key
//! packages and rejoins every group, and the members converge.
//!
//! ```sh
//! cargo run --release -p mls-ds-server --bin mls-ds        # terminal 1
//! cargo run --release -p mls-ds-client --example recover   # terminal 2
//! ```

use mls_ds_client::{Client, ClientConfig, ClientError, Event, RecoveryCode};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let run = std::process::id();
    let dir = std::env::temp_dir().join(format!("mls-ds-recover-{run}"));
    let (a, b) = (format!("alice-{run}"), format!("bob-{run}"));
    let alice = Client::open(dir.join("alice"), &url, &a, ClientConfig::default())?;
    let bob = Client::open(dir.join("bob"), &url, &b, ClientConfig::default())?;
    alice.register().await?;
    // The first registration of an id answers with its recovery code.
    let code = bob
        .register()
        .await?
        .ok_or_else(|| ClientError::Usage("bob was registered before".into()))?;
    println!("bob's recovery code (shown once, kept by the user): {code}");
    let group = alice.create_group(false).await?;
    alice.invite(&group, &[b.as_str()]).await?;
    bob.receive(0).await?;

    // Bob's device is lost with everything on it.
    drop(bob);
    std::fs::remove_dir_all(dir.join("bob"))
        .map_err(|e| ClientError::Usage(format!("cannot remove bob's store: {e}")))?;

    // The code that replaces it: shown before the recovery, so that a
    // crash midway cannot lose it (a retry passes the same two codes).
    let next = RecoveryCode::generate();
    println!("bob's next recovery code: {next}");
    let bob = Client::recover(
        dir.join("bob-new"),
        &url,
        &b,
        &code,
        &next,
        ClientConfig::default(),
    )
    .await?;
    for e in bob.events()? {
        if let Event::Resynced { to_epoch, .. } = e {
            println!("bob rejoined the group at epoch {to_epoch}");
        }
    }
    alice.receive(0).await?;
    alice.send(&group, b"welcome back").await?;
    for e in bob.receive(0).await? {
        if let Event::Message { data, .. } = e {
            println!("bob got: {}", String::from_utf8_lossy(&data));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
