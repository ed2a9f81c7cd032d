//! A client of a DS that serves HTTPS with a certificate from a private CA
//! (or a self-signed one):
//!
//! ```sh
//! mls-ds --tls-cert cert.pem --tls-key key.pem                       # terminal 1
//! cargo run -p mls-ds-client --example https -- https://127.0.0.1:8080 ca.pem
//! ```
//!
//! Without the CA argument only the platform's trust roots are used, which is
//! what a DS with a public certificate needs. An untrusted certificate fails
//! with `ClientError::Unreachable`, whose text names the certificate problem.

use mls_ds_client::{Client, ClientConfig, ClientError};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "https://127.0.0.1:8080".into());
    let mut config = ClientConfig::default();
    if let Some(ca) = args.next() {
        config.tls.add_ca_pem_file(ca.as_ref())?;
    }
    let dir = std::env::temp_dir().join(format!("mls-ds-https-{}", std::process::id()));
    let name = format!("tls-{}", std::process::id());
    let client = Client::open(&dir, &url, &name, config)?;
    let registered = client.register().await;
    let _ = std::fs::remove_dir_all(&dir);
    registered?;
    println!("registered {name} over {url}");
    Ok(())
}
