//! An encrypted local store: alice's store is sealed under 32 bytes the app
//! keeps (here a fixed demo key; an app takes it from the platform's
//! keychain), bob's under a passphrase (Argon2id). Reopening with a wrong
//! key is refused and changes nothing.
//!
//! ```sh
//! cargo run --release -p mls-ds-server --bin mls-ds                 # terminal 1
//! cargo run --release -p mls-ds-client --example encrypted_store    # terminal 2
//! ```

use mls_ds_client::{Client, ClientConfig, ClientError, StorageError, StoreKey};

fn with_key(key: StoreKey) -> ClientConfig {
    ClientConfig {
        store_key: Some(key),
        ..ClientConfig::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let run = std::process::id();
    let dir = std::env::temp_dir().join(format!("mls-ds-encrypted-{run}"));
    let (a, b) = (format!("alice-{run}"), format!("bob-{run}"));
    let alice_key = [0x42; 32];
    let alice = Client::open(
        dir.join("alice"),
        &url,
        &a,
        with_key(StoreKey::from_bytes(alice_key)),
    )?;
    let bob = Client::open(
        dir.join("bob"),
        &url,
        &b,
        with_key(StoreKey::from_passphrase("correct horse battery staple")),
    )?;
    alice.register().await?;
    bob.register().await?;
    let group = alice.create_group(false).await?;
    alice.invite(&group, &[b.as_str()]).await?;
    alice.send(&group, b"sealed at rest on both ends").await?;
    for e in bob.receive(0).await? {
        if let mls_ds_client::Event::Message { data, .. } = e {
            println!("bob got: {}", String::from_utf8_lossy(&data));
        }
    }

    drop(alice);
    match Client::open(
        dir.join("alice"),
        &url,
        &a,
        with_key(StoreKey::from_bytes([0; 32])),
    ) {
        Err(ClientError::Storage(StorageError::WrongKey(why))) => {
            println!("a wrong key is refused: {why}")
        }
        Err(e) => return Err(e),
        Ok(_) => println!("unexpected: a wrong key opened the store"),
    }
    let alice = Client::open(
        dir.join("alice"),
        &url,
        &a,
        with_key(StoreKey::from_bytes(alice_key)),
    )?;
    println!(
        "alice reopened with her key, epoch {}",
        alice.epoch(&group).await?
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
