//! The API's routes, parsed once from method, path and query into a
//! [`Route`] with typed parameters (client ids, group ids, the fetch query).

use hyper::Method;
use mls_ds_protocol::ClientId;

use super::response::ApiError;
use crate::backend::records::GroupId;
use crate::service::delivery::FetchRequest;

/// One endpoint of the API with its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /healthz`
    Healthz,
    /// `POST /v1/clients`: authenticated by the key it registers.
    Register,
    /// `POST /v1/clients/{id}/recover`: authenticated by the new key.
    Recover(ClientId),
    /// Every other endpoint: for registered clients only.
    Client(ClientRoute),
}

/// An endpoint for registered clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ClientRoute {
    /// `POST /v1/sessions`
    OpenSession,
    /// `DELETE /v1/clients/{id}`
    DeleteClient(ClientId),
    /// `POST /v1/clients/{id}/key-package`
    ClaimKeyPackage(ClientId),
    /// `POST /v1/key-packages`
    PublishKeyPackages,
    /// `GET /v1/key-packages`
    CountKeyPackages,
    /// `POST /v1/groups`
    CreateGroup,
    /// `GET /v1/groups`
    ListGroups,
    /// `DELETE /v1/groups/{id}`
    DeleteGroup(GroupId),
    /// `GET /v1/groups/{id}/info`
    GroupInfo(GroupId),
    /// `POST /v1/groups/{id}/commits`
    Commit(GroupId),
    /// `POST /v1/groups/{id}/messages`
    SendMessage(GroupId),
    /// `GET /v1/queue?after=&limit=&max_bytes=&wait_ms=&ack=`
    Fetch(FetchRequest),
    /// `GET /v1/queue/stream?after=`
    Stream {
        /// Entries after this sequence number.
        after: u64,
    },
    /// `POST /v1/queue/ack`
    Ack,
}

impl ClientRoute {
    /// Whether asking again changes nothing that the first request did not
    /// (reads, and a fetch's acknowledgement, which is idempotent): such an
    /// answer may be refused for want of memory, and the client repeats the
    /// request. The answer to any other route is the only report of a
    /// change already made, and is always sent.
    pub(crate) fn repeatable(&self) -> bool {
        matches!(
            self,
            ClientRoute::CountKeyPackages
                | ClientRoute::ListGroups
                | ClientRoute::GroupInfo(_)
                | ClientRoute::Fetch(_)
        )
    }
}

/// The path a route is on, before its method is checked.
enum Path<'a> {
    Healthz,
    Clients,
    Sessions,
    Client(&'a str),
    ClaimKeyPackage(&'a str),
    Recover(&'a str),
    KeyPackages,
    Groups,
    Group(&'a str),
    GroupInfo(&'a str),
    Commits(&'a str),
    Messages(&'a str),
    Queue,
    QueueAck,
    QueueStream,
}

impl Path<'_> {
    fn parse(path: &str) -> Option<Path<'_>> {
        // No route has more than four segments: kept on the stack.
        let mut segments = [""; 4];
        let mut n = 0;
        for part in path.trim_end_matches('/').split('/').skip(1) {
            *segments.get_mut(n)? = part;
            n += 1;
        }
        Some(match &segments[..n] {
            ["healthz"] => Path::Healthz,
            ["v1", "clients"] => Path::Clients,
            ["v1", "sessions"] => Path::Sessions,
            ["v1", "clients", id] => Path::Client(id),
            ["v1", "clients", id, "key-package"] => Path::ClaimKeyPackage(id),
            ["v1", "clients", id, "recover"] => Path::Recover(id),
            ["v1", "key-packages"] => Path::KeyPackages,
            ["v1", "groups"] => Path::Groups,
            ["v1", "groups", id] => Path::Group(id),
            ["v1", "groups", id, "info"] => Path::GroupInfo(id),
            ["v1", "groups", id, "commits"] => Path::Commits(id),
            ["v1", "groups", id, "messages"] => Path::Messages(id),
            ["v1", "queue"] => Path::Queue,
            ["v1", "queue", "ack"] => Path::QueueAck,
            ["v1", "queue", "stream"] => Path::QueueStream,
            _ => return None,
        })
    }

    /// Methods served on this path (`HEAD` goes wherever `GET` does, as
    /// for every HTTP server, and is not listed).
    fn allowed(&self) -> &'static [&'static str] {
        match self {
            Path::Healthz | Path::GroupInfo(_) | Path::Queue | Path::QueueStream => &["GET"],
            Path::Client(_) | Path::Group(_) => &["DELETE"],
            Path::KeyPackages | Path::Groups => &["GET", "POST"],
            Path::Clients
            | Path::Sessions
            | Path::ClaimKeyPackage(_)
            | Path::Recover(_)
            | Path::Commits(_)
            | Path::Messages(_)
            | Path::QueueAck => &["POST"],
        }
    }
}

impl Route {
    /// Parse a request line. A `HEAD` is the `GET` of the same path (the
    /// adapter sends no body).
    pub(crate) fn parse(
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> Result<Route, ApiError> {
        let Some(p) = Path::parse(path) else {
            return Err(ApiError::NoRoute {
                method: method.to_string(),
                path: path.to_owned(),
            });
        };
        let allowed = p.allowed();
        let get = method == Method::GET || method == Method::HEAD;
        let as_get = if method == Method::HEAD {
            "GET"
        } else {
            method.as_str()
        };
        if !allowed.contains(&as_get) {
            return Err(ApiError::MethodNotAllowed(allowed));
        }
        let client = match p {
            Path::Healthz => return Ok(Route::Healthz),
            Path::Clients => return Ok(Route::Register),
            Path::Recover(id) => return Ok(Route::Recover(client_id(id)?)),
            Path::Sessions => ClientRoute::OpenSession,
            Path::Client(id) => ClientRoute::DeleteClient(client_id(id)?),
            Path::ClaimKeyPackage(id) => ClientRoute::ClaimKeyPackage(client_id(id)?),
            Path::KeyPackages if get => ClientRoute::CountKeyPackages,
            Path::KeyPackages => ClientRoute::PublishKeyPackages,
            Path::Groups if get => ClientRoute::ListGroups,
            Path::Groups => ClientRoute::CreateGroup,
            Path::Group(id) => ClientRoute::DeleteGroup(group_id(id)?),
            Path::GroupInfo(id) => ClientRoute::GroupInfo(group_id(id)?),
            Path::Commits(id) => ClientRoute::Commit(group_id(id)?),
            Path::Messages(id) => ClientRoute::SendMessage(group_id(id)?),
            Path::Queue => ClientRoute::Fetch(fetch_query(query.unwrap_or(""))?),
            Path::QueueAck => ClientRoute::Ack,
            Path::QueueStream => ClientRoute::Stream {
                after: fetch_query(query.unwrap_or(""))?.after,
            },
        };
        Ok(Route::Client(client))
    }

    /// The route's name (the `route` label of the request metrics).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Register => "register",
            Route::Recover(_) => "recover",
            Route::Client(c) => match c {
                ClientRoute::OpenSession => "session",
                ClientRoute::DeleteClient(_) => "delete_client",
                ClientRoute::ClaimKeyPackage(_) => "claim",
                ClientRoute::PublishKeyPackages => "publish",
                ClientRoute::CountKeyPackages => "count",
                ClientRoute::CreateGroup => "create_group",
                ClientRoute::ListGroups => "list_groups",
                ClientRoute::DeleteGroup(_) => "delete_group",
                ClientRoute::GroupInfo(_) => "group_info",
                ClientRoute::Commit(_) => "commit",
                ClientRoute::SendMessage(_) => "send",
                ClientRoute::Fetch(_) => "fetch",
                ClientRoute::Ack => "ack",
                ClientRoute::Stream { .. } => "stream",
            },
        }
    }
}

fn client_id(segment: &str) -> Result<ClientId, ApiError> {
    ClientId::new(segment).map_err(|e| ApiError::BadRequest(format!("client id in path: {e}")))
}

fn group_id(hex_id: &str) -> Result<GroupId, ApiError> {
    GroupId::from_hex(hex_id).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn fetch_query(query: &str) -> Result<FetchRequest, ApiError> {
    let mut req = FetchRequest::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        let slot = match name {
            "after" => &mut req.after,
            "wait_ms" => &mut req.wait_ms,
            "limit" => req.limit.insert(0),
            "max_bytes" => req.max_bytes.insert(0),
            "ack" => req.ack.insert(0),
            _ => continue,
        };
        *slot = value.parse().map_err(|_| {
            ApiError::BadRequest(format!("query parameter {name} must be a number"))
        })?;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use mls_ds_protocol::paths;

    use super::*;

    fn parse(method: &str, target: &str) -> Result<Route, ApiError> {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        Route::parse(&Method::from_bytes(method.as_bytes()).unwrap(), path, query)
    }

    #[test]
    fn every_protocol_path_parses_to_its_route() {
        let alice = ClientId::new("alice").unwrap();
        let g = GroupId::new(b"g1").unwrap();
        let cases = [
            ("GET", paths::HEALTHZ.to_string(), Route::Healthz),
            ("POST", paths::CLIENTS.to_string(), Route::Register),
            (
                "POST",
                paths::SESSIONS.to_string(),
                Route::Client(ClientRoute::OpenSession),
            ),
            (
                "DELETE",
                paths::client(&alice),
                Route::Client(ClientRoute::DeleteClient(alice.clone())),
            ),
            (
                "POST",
                paths::claim_key_package(&alice),
                Route::Client(ClientRoute::ClaimKeyPackage(alice.clone())),
            ),
            (
                "POST",
                paths::KEY_PACKAGES.to_string(),
                Route::Client(ClientRoute::PublishKeyPackages),
            ),
            (
                "GET",
                paths::KEY_PACKAGES.to_string(),
                Route::Client(ClientRoute::CountKeyPackages),
            ),
            (
                "HEAD",
                paths::KEY_PACKAGES.to_string(),
                Route::Client(ClientRoute::CountKeyPackages),
            ),
            (
                "POST",
                paths::GROUPS.to_string(),
                Route::Client(ClientRoute::CreateGroup),
            ),
            (
                "DELETE",
                paths::group(g.as_bytes()),
                Route::Client(ClientRoute::DeleteGroup(g.clone())),
            ),
            (
                "GET",
                paths::group_info(g.as_bytes()),
                Route::Client(ClientRoute::GroupInfo(g.clone())),
            ),
            (
                "POST",
                paths::commits(g.as_bytes()),
                Route::Client(ClientRoute::Commit(g.clone())),
            ),
            (
                "POST",
                paths::messages(g.as_bytes()),
                Route::Client(ClientRoute::SendMessage(g.clone())),
            ),
            (
                "POST",
                paths::QUEUE_ACK.to_string(),
                Route::Client(ClientRoute::Ack),
            ),
            (
                "GET",
                paths::queue_page(Some(4), 3, 10, 500),
                Route::Client(ClientRoute::Fetch(FetchRequest {
                    after: 3,
                    limit: Some(10),
                    max_bytes: None,
                    wait_ms: 500,
                    ack: Some(4),
                })),
            ),
        ];
        for (method, target, route) in cases {
            assert_eq!(parse(method, &target).unwrap(), route, "{method} {target}");
        }
    }

    #[test]
    fn unknown_paths_wrong_methods_and_bad_parameters_are_refused() {
        // The metrics page has its own listener (`metrics_listener`).
        for target in ["/v2/nothing", "/metrics"] {
            assert!(
                matches!(parse("GET", target), Err(ApiError::NoRoute { .. })),
                "{target}"
            );
        }
        match parse("POST", "/healthz") {
            Err(ApiError::MethodNotAllowed(allowed)) => assert_eq!(allowed, ["GET"]),
            other => panic!("{other:?}"),
        }
        for target in [
            "/v1/groups/zz/commits",
            "/v1/groups//info",
            "/v1/queue?after=x",
            "/v1/queue?limit=-1",
        ] {
            let method = if target.ends_with("commits") {
                "POST"
            } else {
                "GET"
            };
            assert!(
                matches!(parse(method, target), Err(ApiError::BadRequest(_))),
                "{target}"
            );
        }
        assert!(matches!(
            parse("DELETE", "/v1/clients/a%20b"),
            Err(ApiError::BadRequest(_))
        ));
    }
}
