//! HTTP front: routing, body limits, content types, authentication and rate
//! limiting, and the one place where results become responses (status codes
//! come from `ServerError::code`).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use mls_ds_protocol::auth::AuthToken;
use mls_ds_protocol::queue::Ack;
use mls_ds_protocol::queue::Acked;
use mls_ds_protocol::{decode, ClientId, CONTENT_TYPE as API_TYPE};

use crate::auth::{Authenticator, Caller, RequestView};
use crate::error::{Result, ServerError};
use crate::state::AppState;
use crate::{clients, commit_ordering, groups, key_packages, messages};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A handler's successful answer.
pub struct Reply {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    /// `Allow` header of a 405.
    allow: Option<String>,
}

impl Reply {
    fn encoded<T: tls_codec::Serialize>(status: u16, value: &T) -> Result<Reply> {
        let body = mls_ds_protocol::encode(value)
            .map_err(|e| ServerError::Internal(format!("encode response: {e:?}")))?;
        Ok(Reply {
            status,
            body,
            content_type: API_TYPE,
            allow: None,
        })
    }

    /// 200 with an encoded body.
    pub fn ok<T: tls_codec::Serialize>(value: &T) -> Result<Reply> {
        Self::encoded(200, value)
    }

    /// 201 with an encoded body.
    pub fn created<T: tls_codec::Serialize>(value: &T) -> Result<Reply> {
        Self::encoded(201, value)
    }

    /// 204.
    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            body: Vec::new(),
            content_type: API_TYPE,
            allow: None,
        }
    }

    fn text(body: String, content_type: &'static str) -> Reply {
        Reply {
            status: 200,
            body: body.into_bytes(),
            content_type,
            allow: None,
        }
    }
}

/// Counts requests being handled, for the in-flight limit.
#[derive(Default)]
pub struct Inflight(AtomicUsize);

struct InflightGuard<'a>(&'a AtomicUsize);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve one request. Never fails: errors become error responses. Generic
/// over the body so that [`handle_bytes`] shares this path; the server
/// itself serves `Request<Incoming>`.
pub async fn handle<B>(
    state: Arc<AppState>,
    inflight: Arc<Inflight>,
    req: Request<B>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let start = Instant::now();
    let n = inflight.0.fetch_add(1, Ordering::Relaxed) + 1;
    let _guard = InflightGuard(&inflight.0);
    let broken = state.flusher.stats.broken();
    let (route, result) = if let Some(e) = broken.filter(|_| req.uri().path() != "/metrics") {
        (
            "storage_failed",
            Err(ServerError::Unavailable(format!(
                "storage failed ({e}); nothing is accepted until the data directory is writable again and the server has reopened its storage"
            ))),
        )
    } else if n > state.limits.max_inflight {
        (
            "overload",
            Err(ServerError::Unavailable(
                "too many requests in flight, retry later".into(),
            )),
        )
    } else {
        dispatch(&state, req).await
    };
    let reply = match result {
        Ok(r) => r,
        Err(e) => {
            if e.code().status() >= 500 {
                tracing::error!(route, error = %e, "request failed");
            } else {
                tracing::debug!(route, error = %e, "request rejected");
            }
            Reply::error(&e)
        }
    };
    state.metrics.record(route, reply.status, start.elapsed());
    Ok(reply.into_response())
}

/// The response for an error raised outside a request's handler.
pub fn error_response(e: ServerError) -> Response<Full<Bytes>> {
    Reply::error(&e).into_response()
}

impl Reply {
    fn error(e: &ServerError) -> Reply {
        Reply {
            status: e.code().status(),
            body: mls_ds_protocol::encode(&e.body()).unwrap_or_default(),
            content_type: API_TYPE,
            allow: match e {
                ServerError::MethodNotAllowed(allowed) => Some(allowed.clone()),
                _ => None,
            },
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body)));
        *resp.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        if let Some(v) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            resp.headers_mut().insert(hyper::header::ALLOW, v);
        }
        resp
    }
}

/// Serve one request given as its parts, through [`handle`] (limits,
/// authentication, routing, error mapping), for callers without a
/// connection, such as the fuzz targets in `tests/fuzz`. `None` if the parts
/// do not form an HTTP request (hyper refuses those before [`handle`]).
pub async fn handle_bytes(
    state: Arc<AppState>,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &[u8])],
    body: Vec<u8>,
) -> Option<(u16, Vec<u8>)> {
    let mut builder = Request::builder().method(method).uri(path_and_query);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder.body(Full::new(Bytes::from(body))).ok()?;
    let Ok(resp) = handle(state, Arc::new(Inflight::default()), req).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body.to_vec()))
}

async fn read_body<B>(
    state: &AppState,
    req: Request<B>,
) -> Result<(hyper::http::request::Parts, Bytes)>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let max = state.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > max as u64) {
        return Err(ServerError::PayloadTooLarge(max));
    }
    let (parts, body) = req.into_parts();
    // A stalled upload holds an in-flight slot only this long.
    let limit = Duration::from_millis(state.limits.read_timeout_ms);
    let collected = tokio::time::timeout(limit, Limited::new(body, max).collect())
        .await
        .map_err(|_| {
            ServerError::BadRequest(format!(
                "request body not received within {} ms",
                limit.as_millis()
            ))
        })?
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ServerError::PayloadTooLarge(max)
            } else {
                ServerError::BadRequest(format!("cannot read body: {e}"))
            }
        })?;
    let bytes = collected.to_bytes();
    if !bytes.is_empty() {
        let ct = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.split(';').next().map(str::trim) != Some(API_TYPE) {
            return Err(ServerError::UnsupportedMediaType(format!(
                "content type must be {API_TYPE}, got {ct:?}"
            )));
        }
    }
    Ok((parts, bytes))
}

/// The request's token and what it must bind (method, path, body).
fn token_and_view<'a>(
    parts: &'a hyper::http::request::Parts,
    body: &'a [u8],
) -> Result<(AuthToken, RequestView<'a>)> {
    let header = parts
        .headers
        .get(mls_ds_protocol::AUTH_HEADER)
        .and_then(|v| v.to_str().ok());
    let token = Authenticator::parse(header)?;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    Ok((
        token,
        RequestView {
            method: parts.method.as_str(),
            path_and_query,
            body,
        },
    ))
}

fn authenticate(
    state: &AppState,
    parts: &hyper::http::request::Parts,
    body: &[u8],
) -> Result<(AuthToken, Caller)> {
    let (token, view) = token_and_view(parts, body)?;
    let caller = match &token {
        AuthToken::Signature(sig) => {
            let record = clients::load(state, &sig.client_id)?
                .filter(|r| !r.is_deleted())
                .ok_or_else(|| {
                    ServerError::Unauthorized(format!("unknown client {}", sig.client_id))
                })?;
            state.auth.verify_signature(sig, &record, &view)?
        }
        AuthToken::Session(s) => state.auth.verify_session(s, &view)?,
    };
    if !state.rate_limiter.allow(&caller.client) {
        return Err(ServerError::TooManyRequests);
    }
    Ok((token, caller))
}

fn query_u64(query: &str, name: &str) -> Result<Option<u64>> {
    for pair in query.split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            if k == name {
                return v.parse().map(Some).map_err(|_| {
                    ServerError::BadRequest(format!("query parameter {name} must be a number"))
                });
            }
        }
    }
    Ok(None)
}

async fn dispatch<B>(state: &AppState, req: Request<B>) -> (&'static str, Result<Reply>)
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (route, allowed) = route_name(&method, &segments);
    if route == "unknown" {
        return (
            route,
            Err(ServerError::NotFound(format!("no route {method} {path}"))),
        );
    }
    if route == "method" {
        return (
            route,
            Err(ServerError::MethodNotAllowed(allowed.join(", "))),
        );
    }
    let result = async {
        // The body first: a client that stalls its upload must not hold up a
        // live backup waiting for the gate.
        let (parts, body) = read_body(state, req).await?;
        // Mutating requests wait while a live backup copies the database.
        let _gate = if method == Method::GET {
            None
        } else {
            Some(state.write_gate.read().await)
        };
        match route {
            "healthz" => Ok(Reply::text("ok\n".into(), "text/plain")),
            "metrics" => Ok(Reply::text(
                state.metrics.render(state),
                "text/plain; version=0.0.4",
            )),
            "register" => {
                // Registration is signed by the key it registers, which the
                // DS does not know yet: it verifies the token itself.
                let (token, view) = token_and_view(&parts, &body)?;
                clients::register(state, &token, &view).await
            }
            _ => {
                let (token, caller) = authenticate(state, &parts, &body)?;
                authenticated(state, route, &segments, &parts, &body, &token, &caller).await
            }
        }
    }
    .await;
    (route, result)
}

async fn authenticated(
    state: &AppState,
    route: &'static str,
    segments: &[&str],
    parts: &hyper::http::request::Parts,
    body: &[u8],
    token: &AuthToken,
    caller: &Caller,
) -> Result<Reply> {
    match route {
        "session" => clients::open_session(state, token, caller),
        "delete_client" => clients::delete(state, caller, &ClientId::new(segments[2])?).await,
        "claim" => key_packages::claim(state, caller, &ClientId::new(segments[2])?).await,
        "publish" => key_packages::publish(state, caller, body).await,
        "count" => key_packages::count(state, caller),
        "create_group" => groups::create(state, caller, body).await,
        "group_info" => groups::info(state, caller, &groups::parse_group_id(segments[2])?).await,
        "commit" => {
            commit_ordering::submit(state, caller, &groups::parse_group_id(segments[2])?, body)
                .await
        }
        "send" => messages::send(state, caller, &groups::parse_group_id(segments[2])?, body).await,
        "fetch" => {
            let q = parts.uri.query().unwrap_or("");
            let after = query_u64(q, "after")?.unwrap_or(0);
            let limits = &state.limits;
            let limit = query_u64(q, "limit")?.map_or(limits.max_page_entries, |l| {
                (l as usize).min(limits.max_page_entries)
            });
            let max_bytes = query_u64(q, "max_bytes")?.map_or(limits.max_page_bytes, |b| {
                (b as usize).min(limits.max_page_bytes)
            });
            let wait = query_u64(q, "wait_ms")?
                .unwrap_or(0)
                .min(limits.max_wait_ms);
            // `ack`: acknowledge first (as `POST /v1/queue/ack`), so a
            // draining client needs one request per page instead of two.
            // The page is read once the ack is durable, so it also holds
            // what became visible meanwhile.
            if let Some(up_to) = query_u64(q, "ack")? {
                state.queues.ack(&caller.client, up_to)?.2.wait().await?;
            }
            let page = state
                .queues
                .fetch(
                    &caller.client,
                    after,
                    limit,
                    max_bytes,
                    Duration::from_millis(wait),
                )
                .await?;
            Reply::ok(&page.wire())
        }
        "ack" => {
            let ack: Ack = decode(body)?;
            let (acked, remaining, durable) = state.queues.ack(&caller.client, ack.up_to)?;
            durable.wait().await?;
            Reply::ok(&Acked { acked, remaining })
        }
        other => Err(ServerError::Internal(format!("unrouted {other}"))),
    }
}

/// Name of the route (also the metrics label); "unknown" for no such path,
/// "method" for a known path with the wrong method; with the path's methods.
fn route_name(method: &Method, segments: &[&str]) -> (&'static str, &'static [&'static str]) {
    let m = method.as_str();
    let (name, allowed): (&'static str, &'static [&'static str]) = match segments {
        ["healthz"] => ("healthz", &["GET"]),
        ["metrics"] => ("metrics", &["GET"]),
        ["v1", "clients"] => ("register", &["POST"]),
        ["v1", "sessions"] => ("session", &["POST"]),
        ["v1", "clients", _] => ("delete_client", &["DELETE"]),
        ["v1", "clients", _, "key-package"] => ("claim", &["POST"]),
        ["v1", "key-packages"] => match m {
            "GET" => ("count", &["GET", "POST"]),
            _ => ("publish", &["GET", "POST"]),
        },
        ["v1", "groups"] => ("create_group", &["POST"]),
        ["v1", "groups", _, "info"] => ("group_info", &["GET"]),
        ["v1", "groups", _, "commits"] => ("commit", &["POST"]),
        ["v1", "groups", _, "messages"] => ("send", &["POST"]),
        ["v1", "queue"] => ("fetch", &["GET"]),
        ["v1", "queue", "ack"] => ("ack", &["POST"]),
        _ => return ("unknown", &[]),
    };
    if allowed.contains(&m) {
        (name, allowed)
    } else {
        ("method", allowed)
    }
}
