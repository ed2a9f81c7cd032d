//! Serving one request: the route, admission (the DS is up and its storage
//! healthy, the in-flight limit), the body, authentication and the rate
//! limit, the call into the core, and the answer. Every failure becomes a
//! response in `response`; this module only decides which.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Either;
use hyper::body::Body;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response};
use mls_ds_protocol::auth::AuthToken;
use mls_ds_protocol::{decode, ClientId, AUTH_HEADER};

use super::body::{self, BoxError, ReadLimits, Received};
use super::budget::{Budgets, BytesBody, MemoryLimits};
use super::conn::{ConnLimits, Connections};
use super::response::{ApiBody, ApiError, Reply};
use super::route::{ClientRoute, Route};
use super::stream::{self, StreamLimits, Streams};
use crate::backend::Backend;
use crate::counts::{ClientCounts, Counted, Full, SourceCounts};
use crate::metrics::{FrontGauges, Metrics};
use crate::rate_limit::Rate;
use crate::rate_limit::RateLimiter;
use crate::service::auth::{Authenticator, Caller, RequestView};
use crate::service::clients::Registration;
use crate::service::groups::Deleter;
use crate::service::{Ds, DsError};
use crate::state_cell::{StateCell, REOPENING};

/// Limits the HTTP adapter enforces.
#[derive(Clone, Debug)]
pub(crate) struct HttpLimits {
    /// Largest request body.
    pub(crate) max_body_bytes: usize,
    /// How long a client may take to send its body.
    pub(crate) read_timeout: Duration,
    /// Most requests handled at once.
    pub(crate) max_inflight: usize,
    /// Most requests handled at once from one source address.
    pub(crate) max_inflight_per_source: usize,
    /// Most fetches (`GET /v1/queue`, long-polls included) of one client
    /// at once.
    pub(crate) max_fetches_per_client: usize,
    /// Bytes of request and response bodies held at once.
    pub(crate) memory: MemoryLimits,
    /// Requests per client.
    pub(crate) per_client: Rate,
    /// Registrations and session openings per source address.
    pub(crate) per_address: Rate,
    /// Take the source address of connections from loopback (a reverse
    /// proxy on this machine) from `X-Forwarded-For`.
    pub(crate) trust_forwarded_for: bool,
    /// Queue streams.
    pub(crate) streams: StreamLimits,
    /// Connections.
    pub(crate) connections: ConnLimits,
}

/// The HTTP front of a DS: what outlives a reopening of its storage.
pub(crate) struct Front<B> {
    cell: Arc<StateCell<Ds<B>>>,
    limits: HttpLimits,
    metrics: Metrics,
    per_client: RateLimiter<ClientId>,
    per_address: RateLimiter<IpAddr>,
    inflight: Arc<SourceCounts>,
    fetches: Arc<ClientCounts>,
    budgets: Arc<Budgets>,
    streams: Arc<Streams>,
    connections: Arc<Connections>,
}

/// A request's answer and the label it is counted under in the metrics.
struct Outcome {
    label: &'static str,
    result: Result<Reply, ApiError>,
}

impl Outcome {
    fn new(label: &'static str, result: Result<Reply, ApiError>) -> Outcome {
        Outcome { label, result }
    }
}

impl<B: Backend> Front<B> {
    /// A front serving the DS in `cell`.
    pub(crate) fn new(cell: Arc<StateCell<Ds<B>>>, limits: HttpLimits) -> Front<B> {
        Front {
            cell,
            per_client: RateLimiter::new(limits.per_client),
            per_address: RateLimiter::new(limits.per_address),
            streams: Streams::new(limits.streams),
            budgets: Arc::new(Budgets::new(limits.memory)),
            connections: Connections::new(limits.connections, limits.trust_forwarded_for),
            limits,
            metrics: Metrics::default(),
            inflight: Arc::default(),
            fetches: Arc::default(),
        }
    }

    /// Serve one request that came from `peer`; never fails (errors become
    /// error responses).
    pub(crate) async fn handle<Bd>(&self, req: Request<Bd>, peer: IpAddr) -> Response<ApiBody>
    where
        Bd: Body<Data = Bytes>,
        Bd::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let source = self.source(req.headers(), peer);
        let slot = self.inflight.try_acquire(
            &source,
            self.limits.max_inflight_per_source,
            self.limits.max_inflight,
        );
        let head = req.method() == Method::HEAD;
        let Outcome { label, result } = self.answer(req, slot, source).await;
        let mut resp = match result {
            Ok(reply) => reply.into_response(),
            Err(e) => e.answer(label),
        };
        self.metrics
            .record(label, resp.status().as_u16(), start.elapsed());
        if head {
            without_body(&mut resp);
        }
        resp
    }

    /// A request's answer, and its metrics label; `slot` is its place
    /// among the requests in flight, if it got one.
    async fn answer<Bd>(
        &self,
        req: Request<Bd>,
        slot: Result<Counted<IpAddr>, Full>,
        source: IpAddr,
    ) -> Outcome
    where
        Bd: Body<Data = Bytes>,
        Bd::Error: Into<BoxError>,
    {
        if let Err(e) = body::check_framing(&req) {
            return Outcome::new("bad_request", Err(e));
        }
        let route = match Route::parse(req.method(), req.uri().path(), req.uri().query()) {
            Ok(route) => route,
            Err(e @ ApiError::NoRoute { .. }) => return Outcome::new("unknown", Err(e)),
            Err(e @ ApiError::MethodNotAllowed(_)) => return Outcome::new("method", Err(e)),
            Err(e) => return Outcome::new("bad_request", Err(e)),
        };
        let Some(ds) = self.cell.get() else {
            let reopening = DsError::Unavailable(REOPENING.into());
            return Outcome::new(route.name(), Err(reopening.into()));
        };
        if let Err(e) = ds.backend().health() {
            return Outcome::new("storage_failed", Err(DsError::from(e).into()));
        }
        let _slot = match slot {
            Ok(slot) => slot,
            Err(Full::Total) => return Outcome::new("overload", Err(ApiError::Overloaded)),
            Err(Full::Key) => {
                let busy = ApiError::TooMuchAtOnce(format!(
                    "at most {} requests from one address are handled at once",
                    self.limits.max_inflight_per_source
                ));
                return Outcome::new("overload_source", Err(busy));
            }
        };
        // Registrations and session openings are signature-verified by
        // nature: limited per source address before their body is read.
        let signed_by_nature = matches!(
            route,
            Route::Register | Route::Recover(_) | Route::Client(ClientRoute::OpenSession)
        );
        if signed_by_nature {
            if let Err(wait) = self.per_address.check(&source) {
                return Outcome::new(route.name(), Err(ApiError::RateLimited(wait)));
            }
        }
        let label = route.name();
        let served = self.serve(&ds, route, req, source, signed_by_nature);
        Outcome::new(label, served.await)
    }

    /// `source` is the address the request counts against; `counted`, that
    /// it was counted there already.
    async fn serve<Bd>(
        &self,
        ds: &Ds<B>,
        route: Route,
        req: Request<Bd>,
        source: IpAddr,
        counted: bool,
    ) -> Result<Reply, ApiError>
    where
        Bd: Body<Data = Bytes>,
        Bd::Error: Into<BoxError>,
    {
        match route {
            Route::Healthz => Ok(Reply::text("ok\n".into(), "text/plain")),
            Route::Register => {
                let Received {
                    parts,
                    body,
                    share: _share,
                } = self.read(req, source).await?;
                let (token, view) = token_and_view(&parts, &body)?;
                match ds.register(&token, &view, decode(&body)?).await? {
                    Registration::Created(r) => Reply::created(&r),
                    Registration::Existing(r) => Reply::ok(&r),
                }
            }
            Route::Recover(id) => {
                let Received {
                    parts,
                    body,
                    share: _share,
                } = self.read(req, source).await?;
                let (token, view) = token_and_view(&parts, &body)?;
                Reply::ok(&ds.recover(&token, &view, id, decode(&body)?).await?)
            }
            Route::Client(route) => {
                let Received { parts, body, share } = self.read(req, source).await?;
                let (token, view) = token_and_view(&parts, &body)?;
                // A signature costs far more to verify than a session's MAC,
                // and verification comes before the per-client limit: any
                // signature-authenticated request counts per address.
                if !counted && matches!(token, AuthToken::Signature(_)) {
                    self.per_address
                        .check(&source)
                        .map_err(ApiError::RateLimited)?;
                }
                let caller = ds.authenticate(&token, &view).await?;
                self.per_client
                    .check(&caller.client)
                    .map_err(ApiError::RateLimited)?;
                if let ClientRoute::Stream { after } = route {
                    let after = last_event_id(&parts).map_or(after, |id| id.max(after));
                    let ticket = self.streams.admit(&caller.client)?;
                    return Ok(Reply::stream(stream::start(
                        self.cell.clone(),
                        self.budgets.clone(),
                        caller,
                        after,
                        ticket,
                    )));
                }
                let _fetching = match route {
                    ClientRoute::Fetch(_) => Some(self.fetch_slot(&caller.client)?),
                    _ => None,
                };
                let repeatable = route.repeatable();
                let mut reply = client_call(ds, &caller, route, &body).await?;
                drop(share);
                if let Some(bytes) = reply.bytes_mut() {
                    self.budgets.response(&caller.client, bytes, repeatable)?;
                }
                Ok(reply)
            }
        }
    }

    /// The address a request is counted against: the peer's, or behind a
    /// trusted local proxy the last `X-Forwarded-For` entry (with or
    /// without a port); an IPv6 address by its /64, which one host usually
    /// holds whole.
    fn source(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let ip = if self.limits.trust_forwarded_for && peer.is_loopback() {
            headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .next_back()
                .and_then(|last| forwarded_ip(last.trim()))
                .unwrap_or(peer)
        } else {
            peer
        };
        limit_key(ip)
    }

    /// End every queue stream and open no more (shutdown): their
    /// connections can then close.
    pub(crate) fn end_streams(&self) {
        self.streams.close_all();
    }

    /// The metrics page (`metrics_listener`): this front's request counters
    /// and the backend's stats. Served whatever the storage's health, so a
    /// failure shows in the counters; only while storage is being reopened
    /// there is no backend to ask.
    pub(crate) fn metrics_page(&self) -> Result<Reply, ApiError> {
        let Some(ds) = self.cell.get() else {
            return Err(DsError::Unavailable(REOPENING.into()).into());
        };
        let (request_bytes, response_bytes) = self.budgets.held();
        let front = FrontGauges {
            sessions: ds.authenticator().session_count(),
            streams: self.streams.open_count(),
            connections: self.connections.open_count(),
            request_bytes,
            response_bytes,
            signatures: ds.authenticator().signature_counts(),
        };
        Ok(Reply::text(
            self.metrics.render(&ds.backend().stats(), &front),
            "text/plain; version=0.0.4",
        ))
    }

    /// The connections this front serves.
    pub(crate) fn connections(&self) -> Arc<Connections> {
        self.connections.clone()
    }

    /// A connection was closed at accept because `full`.
    pub(crate) fn connection_refused(&self, full: Full) {
        self.metrics.connection_refused(full == Full::Key);
    }

    async fn read<Bd>(&self, req: Request<Bd>, source: IpAddr) -> Result<Received, ApiError>
    where
        Bd: Body<Data = Bytes>,
        Bd::Error: Into<BoxError>,
    {
        let limits = ReadLimits {
            max: self.limits.max_body_bytes,
            timeout: self.limits.read_timeout,
            budgets: &self.budgets,
            source,
        };
        body::read(req, limits).await
    }

    /// One of the few fetches a client may run at once.
    fn fetch_slot(&self, client: &ClientId) -> Result<Counted<ClientId>, ApiError> {
        let most = self.limits.max_fetches_per_client;
        self.fetches
            .try_acquire(client, most, usize::MAX)
            .map_err(|_| {
                ApiError::TooMuchAtOnce(format!("at most {most} fetches of one client run at once"))
            })
    }
}

/// Call the service a registered client's route names.
async fn client_call<B: Backend>(
    ds: &Ds<B>,
    caller: &Caller,
    route: ClientRoute,
    body: &[u8],
) -> Result<Reply, ApiError> {
    match route {
        ClientRoute::OpenSession => Reply::ok(&ds.open_session(caller).await?),
        ClientRoute::DeleteClient(id) => {
            ds.delete_client(caller, &id).await?;
            Ok(Reply::no_content())
        }
        ClientRoute::ClaimKeyPackage(target) => {
            Reply::ok(&ds.claim_key_package(caller, &target).await?)
        }
        ClientRoute::PublishKeyPackages => {
            Reply::ok(&ds.publish_key_packages(caller, decode(body)?).await?)
        }
        ClientRoute::CountKeyPackages => Reply::ok(&ds.key_package_count(caller).await?),
        ClientRoute::CreateGroup => Reply::created(&ds.create_group(caller, decode(body)?).await?),
        ClientRoute::ListGroups => Reply::ok(&ds.groups_of(caller).await?),
        ClientRoute::DeleteGroup(id) => {
            ds.delete_group(&id, Deleter::Member(caller)).await?;
            Ok(Reply::no_content())
        }
        ClientRoute::GroupInfo(id) => Reply::ok(&ds.group_info(caller, &id).await?),
        ClientRoute::Commit(id) => Reply::ok(&ds.commit(caller, &id, decode(body)?).await?),
        ClientRoute::SendMessage(id) => {
            Reply::ok(&ds.send_message(caller, &id, decode(body)?).await?)
        }
        ClientRoute::Fetch(query) => Reply::ok(&ds.fetch(caller, query).await?.wire()),
        ClientRoute::Ack => Reply::ok(&ds.ack(caller, decode(body)?).await?),
        // Served by the front, which owns the streams.
        ClientRoute::Stream { .. } => Err(ApiError::BadRequest("not a stream route".into())),
    }
}

/// The `Last-Event-ID` of a reconnecting event stream.
fn last_event_id(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get("last-event-id")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The request's token and what it must bind (method, path, body).
/// An `X-Forwarded-For` entry: an address, or an address with a port
/// (`192.0.2.7:4711`, `[2001:db8::7]:4711`).
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// The key an address is limited under: IPv4 as it is (also when mapped
/// into IPv6), IPv6 by its /64 prefix.
pub(crate) fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
            )),
        },
    }
}

fn token_and_view<'a>(
    parts: &'a Parts,
    body: &'a [u8],
) -> Result<(AuthToken, RequestView<'a>), ApiError> {
    let header = parts.headers.get(AUTH_HEADER).and_then(|v| v.to_str().ok());
    let token = Authenticator::parse(header)?;
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    Ok((
        token,
        RequestView {
            method: parts.method.as_str(),
            path_and_query,
            body,
        },
    ))
}

/// The answer to a `HEAD`: the `GET`'s status and headers, with the length
/// its body would have had, and no body (HTTP/2 forbids one).
pub(crate) fn without_body(resp: &mut Response<ApiBody>) {
    let len = resp.body().size_hint().exact().unwrap_or(0);
    *resp.body_mut() = Either::Left(BytesBody::new(Vec::new()));
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_entries_with_and_without_ports() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(forwarded_ip("192.0.2.7"), Some(ip("192.0.2.7")));
        assert_eq!(forwarded_ip("192.0.2.7:4711"), Some(ip("192.0.2.7")));
        assert_eq!(forwarded_ip("2001:db8::7"), Some(ip("2001:db8::7")));
        assert_eq!(forwarded_ip("[2001:db8::7]:4711"), Some(ip("2001:db8::7")));
        assert_eq!(forwarded_ip("unknown"), None);
    }

    #[test]
    fn ipv6_is_limited_by_its_64_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            limit_key(ip("2001:db8:1:2:bbbb::9")),
            limit_key(ip("2001:db8:1:2:aaaa::1"))
        );
        assert_ne!(limit_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(limit_key(ip("192.0.2.7")), ip("192.0.2.7"));
    }
}
