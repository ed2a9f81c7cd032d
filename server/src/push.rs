//! The push gateway hook (`--push-url`): when the queue of a client that is
//! not listening (no long-poll, no stream open) grows, the DS POSTs a
//! content-free wake-up to the operator's URL, so that the application's
//! own push service (APNs, FCM, UnifiedPush) can wake the device, which
//! then syncs. A wake-up names the client and its queue position, nothing
//! else: no group, no sender, no message.
//!
//! ```json
//! {"wakeups":[{"client":"bob","position":42}]}
//! ```
//!
//! Wake-ups are gathered for `--push-batch-ms` and sent as one request
//! (with `Authorization: Bearer <--push-token>` if set); a client that got
//! several messages meanwhile is one wake-up with its newest position. A
//! failed request (no connection, or a status other than 2xx) is retried
//! with the wake-ups gathered since, after a backoff that doubles up to a
//! minute. Wake-ups are best effort: the queue itself loses nothing, and
//! the ones pending at shutdown are not sent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use mls_ds_protocol::ClientId;
use tokio_rustls::rustls::{self, RootCertStore};

use crate::backend::Backend;
use crate::service::Ds;
use crate::state_cell::StateCell;

/// Longest wait between two attempts of a failing receiver.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Most clients waiting for a wake-up; beyond, new ones are dropped (and
/// logged), so that a receiver that is down for long cannot exhaust memory.
const MAX_PENDING: usize = 100_000;
/// How long a request to the receiver may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the loop looks again at which DS it serves (after a reopen of
/// storage there is a new one) while nothing happens.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Where wake-ups go.
#[derive(Clone, Debug)]
pub(crate) struct PushConfig {
    /// The receiver (`http://` or `https://`).
    pub(crate) url: Uri,
    /// Sent as `Authorization: Bearer <token>`.
    pub(crate) token: Option<String>,
    /// How long wake-ups are gathered before a request.
    pub(crate) batch: Duration,
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTP(S) client trusting the platform's roots (webpki's without).
fn http_client() -> Result<HttpsClient, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// Send wake-ups for the DS in `cell` until the task is stopped.
pub(crate) async fn run<B: Backend>(cell: Arc<StateCell<Ds<B>>>, config: PushConfig) {
    let client = match http_client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "push gateway disabled");
            return;
        }
    };
    let mut pending: BTreeMap<ClientId, u64> = BTreeMap::new();
    let mut backoff = config.batch;
    loop {
        let Some(ds) = cell.get() else {
            tokio::time::sleep(IDLE_CHECK).await;
            continue;
        };
        let heads = ds.backend().new_heads();
        heads.enable();
        if pending.is_empty() {
            let _ = tokio::time::timeout(IDLE_CHECK, heads.changed()).await;
        }
        // Gather what arrives meanwhile into one request.
        tokio::time::sleep(config.batch).await;
        gather(&ds, &mut pending);
        drop(ds);
        if pending.is_empty() {
            continue;
        }
        match post(&client, &config, &pending).await {
            Ok(()) => {
                tracing::debug!(wakeups = pending.len(), "push wake-ups sent");
                pending.clear();
                backoff = config.batch;
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    wakeups = pending.len(),
                    retry_in_ms = backoff.as_millis() as u64,
                    "push gateway refused or unreachable; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Add the queues that grew while their client was not listening.
fn gather<B: Backend>(ds: &Ds<B>, pending: &mut BTreeMap<ClientId, u64>) {
    let mut dropped = 0usize;
    for (client, head) in ds.backend().new_heads().take() {
        if ds.is_listening(&client) {
            continue;
        }
        if let Some(p) = pending.get_mut(&client) {
            *p = (*p).max(head);
        } else if pending.len() < MAX_PENDING {
            pending.insert(client, head);
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(dropped, "push wake-ups dropped: too many pending");
    }
}

/// The request body.
fn body(pending: &BTreeMap<ClientId, u64>) -> Vec<u8> {
    let wakeups: Vec<serde_json::Value> = pending
        .iter()
        .map(|(client, position)| {
            serde_json::json!({
                "client": String::from_utf8_lossy(client.as_bytes()),
                "position": position,
            })
        })
        .collect();
    serde_json::json!({ "wakeups": wakeups })
        .to_string()
        .into_bytes()
}

async fn post(
    client: &HttpsClient,
    config: &PushConfig,
    pending: &BTreeMap<ClientId, u64>,
) -> Result<(), String> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(config.url.clone())
        .header(CONTENT_TYPE, "application/json");
    if let Some(token) = &config.token {
        req = req.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body(pending))))
        .map_err(|e| e.to_string())?;
    // The status is the answer; the body is dropped unread (a receiver that
    // stalls or floods it costs nothing but its connection).
    let status = tokio::time::timeout(REQUEST_TIMEOUT, client.request(req))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| e.to_string())?
        .status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wakeup_names_the_client_and_its_position_only() {
        let mut pending = BTreeMap::new();
        pending.insert(ClientId::new("bob").unwrap(), 42);
        pending.insert(ClientId::new("carol").unwrap(), 7);
        assert_eq!(
            String::from_utf8(body(&pending)).unwrap(),
            r#"{"wakeups":[{"client":"bob","position":42},{"client":"carol","position":7}]}"#
        );
    }
}
