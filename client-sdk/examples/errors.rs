//! Typed errors an application matches on instead of parsing strings: a DS
//! that cannot be reached, a refusal with its code, a group this client is
//! not in, a member that is not there.
//!
//! ```sh
//! cargo run --release -p mls-ds-server --bin mls-ds       # terminal 1
//! cargo run --release -p mls-ds-client --example errors   # terminal 2
//! ```

use mls_ds_client::{Client, ClientConfig, ClientError};

fn describe(what: &str, e: &ClientError) {
    let kind = match e {
        ClientError::Unreachable { url, .. } => format!("the DS at {url} cannot be reached"),
        ClientError::NotInGroup { .. } => "not a member of that group".into(),
        ClientError::NoSuchMember { client, .. } => format!("{client} is not in the group"),
        ClientError::Server { status, .. } => format!(
            "refused by the DS: {status} {:?}{}",
            e.code(),
            e.retry_after()
                .map(|s| format!(", retry after {s} s"))
                .unwrap_or_default()
        ),
        ClientError::Mls { .. } => format!("MLS: {:?}", e.mls_kind()),
        other => format!("other: {other}"),
    };
    println!("{what}: {kind}");
}

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let run = std::process::id();
    let dir = std::env::temp_dir().join(format!("mls-ds-errors-{run}"));
    let name = format!("alice-{run}");

    // Nothing listens on port 9 of this machine.
    let nowhere = Client::open(
        dir.join("nowhere"),
        "http://127.0.0.1:9",
        &name,
        ClientConfig::default(),
    )?;
    if let Err(e) = nowhere.register().await {
        describe("registering with a DS that is not there", &e);
    }

    let alice = Client::open(dir.join("alice"), &url, &name, ClientConfig::default())?;
    alice.register().await?;
    if let Err(e) = alice.send(b"no-such-group", b"hello").await {
        describe("sending to a group alice is not in", &e);
    }
    let group = alice.create_group(false).await?;
    if let Err(e) = alice.remove(&group, "nobody").await {
        describe("removing a member that is not there", &e);
    }
    if let Err(e) = alice.invite(&group, &[&format!("unknown-{run}")]).await {
        describe("inviting a client the DS does not know", &e);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
