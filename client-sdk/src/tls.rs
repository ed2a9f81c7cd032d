//! How the SDK trusts a DS over HTTPS: rustls with the `ring` provider (no C
//! toolchain beyond gcc), the platform's trust roots (webpki's bundled roots
//! where the platform has none, e.g. a container without `ca-certificates`),
//! and any private CA the application adds. ALPN offers h2 and http/1.1.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls::{self, ClientConfig as RustlsConfig, RootCertStore};

use crate::error::{ClientError, Result};

/// Which certificate authorities the SDK trusts for `https://` DS URLs.
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    extra_roots: Vec<CertificateDer<'static>>,
    only_extra_roots: bool,
}

impl TlsConfig {
    /// Also trust the CA certificates in a PEM file (a private CA, or a DS's
    /// self-signed certificate).
    pub fn add_ca_pem_file(&mut self, path: &Path) -> Result<()> {
        let pem = std::fs::read(path).map_err(|e| {
            ClientError::Usage(format!("cannot read CA file {}: {e}", path.display()))
        })?;
        self.add_ca_pem(&pem)
            .map_err(|e| ClientError::Usage(format!("{}: {e}", path.display())))
    }

    /// Also trust the CA certificates in PEM text.
    pub fn add_ca_pem(&mut self, pem: &[u8]) -> Result<()> {
        let before = self.extra_roots.len();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| ClientError::Usage(format!("bad CA certificate: {e}")))?;
            self.extra_roots.push(cert);
        }
        if self.extra_roots.len() == before {
            return Err(ClientError::Usage("no certificate in the CA PEM".into()));
        }
        Ok(())
    }

    /// Trust only the added CAs, not the platform's or webpki's roots (for a
    /// deployment whose DS certificate comes from its own CA).
    pub fn only_added_roots(mut self) -> TlsConfig {
        self.only_extra_roots = true;
        self
    }

    /// The rustls configuration: roots, protocol versions, ALPN.
    pub(crate) fn rustls(&self) -> Result<RustlsConfig> {
        let mut roots = RootCertStore::empty();
        for cert in &self.extra_roots {
            roots
                .add(cert.clone())
                .map_err(|e| ClientError::Usage(format!("unusable CA certificate: {e}")))?;
        }
        if !self.only_extra_roots {
            add_default_roots(&mut roots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // ALPN (h2, http/1.1) is set by the connector that uses this.
        let config = RustlsConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Usage(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(config)
    }
}

/// The platform's roots, or webpki's if the platform offers none.
fn add_default_roots(roots: &mut RootCertStore) {
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("platform trust roots: {e}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::debug!("no platform trust roots; using webpki's");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
}
