//! HTTP(S) transport to the DS: request signing, sessions, and decoding of
//! error bodies. Connections come from an [`HttpPool`], which speaks plain
//! HTTP to `http://` URLs and TLS (h2 or http/1.1 by ALPN) to `https://` ones.
//!
//! Over 500 lines because one request's path is read best in one place: the
//! authentication mode, the 401 retry with a new session, the 429 wait and
//! the timeout all wrap the same send, each a few lines; sessions already
//! live in `transport/session.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use mls_ds_protocol::auth::{self, AuthToken, SignatureAuth, NONCE_LEN};
use mls_ds_protocol::{decode, ClientId, ErrorBody, ErrorCode, CONTENT_TYPE};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::signatures::Signer;
use rand::RngCore;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::{mls, ClientError, Result};
use crate::tls::TlsConfig;

mod session;

use self::session::Session;

/// A request's token, and its place among its session's requests in
/// flight (if any), held until the DS has answered.
struct Authorized {
    token: Option<AuthToken>,
    lease: Option<OwnedSemaphorePermit>,
}

type Connector = HttpsConnector<HttpConnector>;

/// Keep-alive HTTP and HTTPS connections (TCP_NODELAY), cheap to clone:
/// transports of many identities in one process can share one pool instead
/// of each opening its own connections.
#[derive(Clone)]
pub struct HttpPool(HyperClient<Connector, Full<Bytes>>);

impl HttpPool {
    /// An empty pool trusting the default roots for `https://` URLs.
    pub fn new() -> Result<HttpPool> {
        Self::with_tls(&TlsConfig::default())
    }

    /// An empty pool trusting the roots of `tls` for `https://` URLs.
    pub fn with_tls(tls: &TlsConfig) -> Result<HttpPool> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.rustls()?)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        Ok(HttpPool(
            HyperClient::builder(TokioExecutor::new()).build(connector),
        ))
    }
}

/// Authenticated HTTP access to one DS for one client.
pub struct Transport {
    base: String,
    http: HyperClient<Connector, Full<Bytes>>,
    client_id: ClientId,
    signer: SignatureKeyPair,
    session: Mutex<Option<Arc<Session>>>,
    /// Sign every request instead of using a session (slower; for tests and
    /// clients that keep no session state).
    pub always_sign: bool,
    /// Longest a request waits in total, following the DS's `Retry-After`,
    /// before a 429 is returned (default: none; a [`crate::Client`] uses
    /// [`crate::ClientConfig::rate_limit_wait`]).
    pub rate_limit_wait: Duration,
    /// Longest one request may go without its whole answer, beyond the
    /// long-poll wait it asks the DS for (default 30 s; a [`crate::Client`]
    /// uses [`crate::ClientConfig::request_timeout`]). Then it fails with
    /// [`ClientError::ConnectionLost`], a network error: a DS that accepted
    /// the connection but stopped answering (a stopped process, a stuck
    /// proxy) cannot hold a caller forever.
    pub request_timeout: Duration,
}

/// [`Transport::request_timeout`] unless set.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `url` without a trailing slash, if it is an `http://` or `https://` URL
/// with a host and no path, query or fragment.
fn checked_base_url(url: &str) -> Result<String> {
    let base = url.trim_end_matches('/');
    let bad = |why: &str| {
        ClientError::Usage(format!(
            "bad DS URL {url:?}: {why} (expected e.g. https://ds.example.org or http://127.0.0.1:8080)"
        ))
    };
    let uri: hyper::Uri = base.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("the scheme must be http or https")),
    }
    if uri.authority().is_none() {
        return Err(bad("no host"));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(bad("a DS URL has no path"));
    }
    Ok(base.to_owned())
}

/// An error's causes, outermost first, without the wrappers that only say
/// "client error" (so that the reader sees "Connection refused" or the
/// certificate problem).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    // The last causes are the specific ones; the first is hyper's summary.
    if parts.len() > 1 {
        parts.remove(0);
    }
    parts.join(": ")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a request authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// No `Authorization` header.
    None,
    /// Signature token with the client's key.
    Signature,
    /// Session MAC (opening a session first if needed).
    Session,
}

impl Transport {
    /// Transport to `base_url` (e.g. `https://ds.example.org` or
    /// `http://127.0.0.1:8080`) as `client_id`, trusting the default roots.
    pub fn new(base_url: &str, client_id: ClientId, signer: SignatureKeyPair) -> Result<Transport> {
        Self::with_pool(base_url, client_id, signer, HttpPool::new()?)
    }

    /// Like [`Transport::new`], with connections from a shared `pool`.
    pub fn with_pool(
        base_url: &str,
        client_id: ClientId,
        signer: SignatureKeyPair,
        pool: HttpPool,
    ) -> Result<Transport> {
        Ok(Transport {
            base: checked_base_url(base_url)?,
            http: pool.0,
            client_id,
            signer,
            session: Mutex::new(None),
            always_sign: false,
            rate_limit_wait: Duration::ZERO,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// The DS's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The client this transport speaks for.
    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    /// The signature key pair.
    pub fn signer(&self) -> &SignatureKeyPair {
        &self.signer
    }

    /// Build a signature token for a request.
    pub fn signature_token(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<AuthToken> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ts = now_ms();
        let payload = auth::signature_payload(
            method,
            path_and_query,
            &auth::body_hash(body),
            ts,
            &self.client_id,
            &nonce,
        );
        let signature = self
            .signer
            .sign(&payload)
            .map_err(|e| mls(format!("signing failed: {e:?}")))?;
        Ok(AuthToken::Signature(SignatureAuth {
            client_id: self.client_id.clone(),
            timestamp_ms: ts,
            nonce,
            signature: signature.into(),
        }))
    }

    /// The `Authorization` header value for a request, for callers that
    /// send it with their own HTTP client (`None` for [`AuthMode::None`]).
    /// With [`AuthMode::Session`] this opens a session first if there is no
    /// fresh one; each value is good for one request. This transport does
    /// not see such a request end, so it cannot count it in flight: a
    /// caller sending many at once keeps at most half of
    /// [`SESSION_MAX_OVERTAKEN`](mls_ds_protocol::auth::SESSION_MAX_OVERTAKEN)
    /// in flight per session.
    pub async fn authorization(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        mode: AuthMode,
    ) -> Result<Option<String>> {
        let authorized = self
            .token(method, path_and_query, body, self.effective(mode))
            .await?;
        Ok(authorized.token.as_ref().map(auth::header_value))
    }

    /// `mode`, with sessions replaced by signatures if [`Self::always_sign`].
    fn effective(&self, mode: AuthMode) -> AuthMode {
        if self.always_sign && mode == AuthMode::Session {
            AuthMode::Signature
        } else {
            mode
        }
    }

    async fn token(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        mode: AuthMode,
    ) -> Result<Authorized> {
        Ok(match mode {
            AuthMode::None => Authorized {
                token: None,
                lease: None,
            },
            AuthMode::Signature => Authorized {
                token: Some(self.signature_token(method, path_and_query, body)?),
                lease: None,
            },
            AuthMode::Session => {
                let s = self.session().await?;
                let (token, lease) = self.session_token(&s, method, path_and_query, body).await;
                Authorized {
                    token: Some(token),
                    lease,
                }
            }
        })
    }

    /// Send a request and return the body of a 2xx response; other statuses
    /// become [`ClientError::Server`]. With [`AuthMode::Session`] a 401 (for
    /// example after a server restart) opens a new session and retries once.
    /// A 429 is retried after the DS's `Retry-After`, as long as the waits
    /// add up to at most [`Transport::rate_limit_wait`]; then the 429 is
    /// returned (its [`ClientError::retry_after`] says how long to wait).
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        mode: AuthMode,
    ) -> Result<Bytes> {
        self.send_waiting(method, path_and_query, body, mode, Duration::ZERO)
            .await
    }

    /// [`Transport::send`] for a request that asks the DS to hold its answer
    /// up to `wait` (a long poll): the request's timeout is extended by it.
    pub async fn send_waiting(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        mode: AuthMode,
        wait: Duration,
    ) -> Result<Bytes> {
        let mut waited = Duration::ZERO;
        loop {
            match self
                .send_authenticated(method.clone(), path_and_query, body.clone(), mode, wait)
                .await
            {
                Err(e @ ClientError::Server { status: 429, .. }) => {
                    let pause = Duration::from_secs(e.retry_after().unwrap_or(1).max(1));
                    if waited + pause > self.rate_limit_wait {
                        return Err(e);
                    }
                    tracing::debug!(
                        path = path_and_query,
                        wait_s = pause.as_secs(),
                        "rate limited; waiting"
                    );
                    tokio::time::sleep(pause).await;
                    waited += pause;
                }
                other => return other,
            }
        }
    }

    async fn send_authenticated(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        mode: AuthMode,
        wait: Duration,
    ) -> Result<Bytes> {
        let mode = self.effective(mode);
        match self
            .send_raw(method.clone(), path_and_query, body.clone(), mode, wait)
            .await
        {
            Err(ClientError::Server { status: 401, .. }) if mode == AuthMode::Session => {
                *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.send_raw(method, path_and_query, body, mode, wait)
                    .await
            }
            other => other,
        }
    }

    async fn send_raw(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        mode: AuthMode,
        wait: Duration,
    ) -> Result<Bytes> {
        let authorized = self
            .token(method.as_str(), path_and_query, &body, mode)
            .await?;
        let answer = self
            .send_once(method, path_and_query, body, authorized.token, wait)
            .await;
        // Held until the answer: by then the DS has checked the counter.
        drop(authorized.lease);
        answer
    }

    /// Open a response that streams (`GET /v1/queue/stream`): its body,
    /// once the status is 200; other statuses become
    /// [`ClientError::Server`]. A 401 opens a new session and retries once,
    /// as [`Transport::send`] does.
    pub async fn open_stream(&self, path_and_query: &str) -> Result<Incoming> {
        let mode = self.effective(AuthMode::Session);
        match self.stream_once(path_and_query, mode).await {
            Err(ClientError::Server { status: 401, .. }) if mode == AuthMode::Session => {
                *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.stream_once(path_and_query, mode).await
            }
            other => other,
        }
    }

    async fn stream_once(&self, path_and_query: &str, mode: AuthMode) -> Result<Incoming> {
        let authorized = self.token("GET", path_and_query, &[], mode).await?;
        let resp = self
            .request(
                Method::GET,
                path_and_query,
                Vec::new(),
                authorized.token,
                Duration::ZERO,
            )
            .await?;
        drop(authorized.lease);
        if resp.status() == hyper::StatusCode::OK {
            return Ok(resp.into_body());
        }
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let bytes = self.collect(resp.into_body()).await?;
        Err(server_error(status, &bytes, retry_after))
    }

    async fn send_once(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        token: Option<AuthToken>,
        wait: Duration,
    ) -> Result<Bytes> {
        let resp = self
            .request(method, path_and_query, body, token, wait)
            .await?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let bytes = self.collect(resp.into_body()).await?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        Err(server_error(status, &bytes, retry_after))
    }

    async fn collect(&self, body: Incoming) -> Result<Bytes> {
        let collected = tokio::time::timeout(self.request_timeout, body.collect())
            .await
            .map_err(|_| self.timed_out(self.request_timeout))?;
        Ok(collected
            .map_err(|e| ClientError::ConnectionLost {
                url: self.base.clone(),
                detail: causes(&e),
            })?
            .to_bytes())
    }

    fn timed_out(&self, after: Duration) -> ClientError {
        ClientError::ConnectionLost {
            url: self.base.clone(),
            detail: format!("no answer within {} ms", after.as_millis()),
        }
    }

    /// Send one request; its response, whatever the status.
    async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        token: Option<AuthToken>,
        wait: Duration,
    ) -> Result<hyper::Response<Incoming>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path_and_query));
        if !body.is_empty() {
            builder = builder.header(hyper::header::CONTENT_TYPE, CONTENT_TYPE);
        }
        if let Some(t) = &token {
            builder = builder.header(mls_ds_protocol::AUTH_HEADER, auth::header_value(t));
        }
        let req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Usage(format!("bad request to {}: {e}", self.base)))?;
        let limit = self.request_timeout.saturating_add(wait);
        let answer = tokio::time::timeout(limit, self.http.request(req))
            .await
            .map_err(|_| self.timed_out(limit))?;
        answer.map_err(|e| {
            let detail = causes(&e);
            if e.is_connect() {
                ClientError::Unreachable {
                    url: self.base.clone(),
                    detail,
                }
            } else {
                ClientError::ConnectionLost {
                    url: self.base.clone(),
                    detail,
                }
            }
        })
    }
}

/// The `Retry-After` of an answer, in seconds.
fn retry_after(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The error a non-2xx answer stands for.
fn server_error(status: u16, bytes: &[u8], retry_after: Option<u64>) -> ClientError {
    let body = decode::<ErrorBody>(bytes).unwrap_or_else(|_| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("undecodable error body: {}", String::from_utf8_lossy(bytes)),
        )
    });
    ClientError::Server {
        status,
        body,
        retry_after,
    }
}
