//! The one place where results become responses: the status and error body
//! of every failure ([`ApiError::classify`]), and what a client is shown of
//! it. Validation errors keep their precise reasons (clients need them); an
//! internal failure is logged with its detail under an error id, and the
//! client gets a generic message naming only that id.

use http_body_util::Either;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use mls_ds_protocol::{ErrorBody, ErrorCode, CONTENT_TYPE as API_TYPE};

use super::budget::BytesBody;
use super::stream::SseBody;
use crate::rate_limit::RetryAfter;
use crate::service::DsError;

/// Why a request failed, as the HTTP adapter sees it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The DS refused or failed the operation.
    #[error(transparent)]
    Ds(#[from] DsError),
    /// No such path.
    #[error("no route {method} {path}")]
    NoRoute {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// A known path with a method it does not serve.
    #[error("method not allowed; allowed: {}", .0.join(", "))]
    MethodNotAllowed(&'static [&'static str]),
    /// A malformed path parameter, query or request framing.
    #[error("{0}")]
    BadRequest(String),
    /// Framing that could smuggle a second request past a proxy; the
    /// connection is closed after the answer.
    #[error("{0}")]
    AmbiguousFraming(String),
    /// Body over the limit.
    #[error("body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// Wrong content type.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A rate limit of the HTTP front (per client, per source address).
    #[error("rate limit exceeded, retry later")]
    RateLimited(RetryAfter),
    /// Too many requests in flight.
    #[error("too many requests in flight, retry later")]
    Overloaded,
    /// The client has as many streams open as it may.
    #[error("at most {0} streams of one client are open at once")]
    TooManyStreams(usize),
    /// The client or source address holds as much at once as it may
    /// (requests in flight, fetches, bytes of bodies); it may retry once it
    /// has finished what it holds.
    #[error("{0}")]
    TooMuchAtOnce(String),
}

impl From<mls_ds_protocol::DecodeError> for ApiError {
    fn from(e: mls_ds_protocol::DecodeError) -> Self {
        ApiError::Ds(e.into())
    }
}

impl ApiError {
    /// The status and error code of this failure.
    pub(crate) fn classify(&self) -> (StatusCode, ErrorCode) {
        match self {
            ApiError::Ds(e) => match e {
                DsError::Invalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
                DsError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
                DsError::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
                DsError::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
                DsError::WrongEpoch { .. } => (StatusCode::CONFLICT, ErrorCode::WrongEpoch),
                DsError::Conflict(_) => (StatusCode::CONFLICT, ErrorCode::Conflict),
                DsError::RateLimited { .. } => {
                    (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests)
                }
                DsError::QuotaExceeded(_) => {
                    (StatusCode::INSUFFICIENT_STORAGE, ErrorCode::QuotaExceeded)
                }
                DsError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge),
                DsError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable)
                }
                DsError::StorageFailed(_) | DsError::Internal(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal)
                }
            },
            ApiError::NoRoute { .. } => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ApiError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed)
            }
            ApiError::BadRequest(_) | ApiError::AmbiguousFraming(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
            }
            ApiError::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge)
            }
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
            ),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            ApiError::TooManyStreams(_) | ApiError::TooMuchAtOnce(_) => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests)
            }
        }
    }

    /// The error body, and the error's log line. `route` names the request
    /// in the log.
    pub(crate) fn answer(&self, route: &str) -> Response<ApiBody> {
        let (status, code) = self.classify();
        let message = match self {
            ApiError::Ds(DsError::Internal(detail)) => {
                let id = format!("{:016x}", rand::random::<u64>());
                tracing::error!(route, error_id = %id, error = %detail, "request failed");
                format!("internal server error (error id {id})")
            }
            other => {
                if status.is_server_error() {
                    tracing::error!(route, error = %other, "request failed");
                } else {
                    tracing::debug!(route, error = %other, "request refused");
                }
                other.to_string()
            }
        };
        let mut body = ErrorBody::new(code, message);
        if let ApiError::Ds(DsError::WrongEpoch { current, .. }) = self {
            body.current_epoch = Some(*current);
        }
        // An error body always encodes (a code, a short text, an option).
        let bytes = mls_ds_protocol::encode(&body).unwrap_or_default();
        let mut resp = Response::new(Either::Left(BytesBody::new(bytes)));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(API_TYPE));
        if let ApiError::MethodNotAllowed(allowed) = self {
            if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                headers.insert(ALLOW, v);
            }
        }
        let retry_after = match self {
            ApiError::RateLimited(wait) => Some(wait.secs()),
            ApiError::Overloaded | ApiError::TooMuchAtOnce(_) => Some(1),
            ApiError::Ds(DsError::RateLimited {
                retry_after_secs, ..
            }) => Some(*retry_after_secs),
            _ => None,
        };
        if let Some(secs) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::AmbiguousFraming(_)) {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The body of every response: bytes, or a stream of events.
pub(crate) type ApiBody = Either<BytesBody, SseBody>;

/// A successful answer.
pub(crate) struct Reply {
    status: StatusCode,
    body: ReplyBody,
    content_type: &'static str,
}

enum ReplyBody {
    Bytes(BytesBody),
    Stream(SseBody),
}

impl Reply {
    fn encoded<T: tls_codec::Serialize>(status: StatusCode, value: &T) -> Result<Reply, ApiError> {
        let body = mls_ds_protocol::encode(value)
            .map_err(|e| DsError::Internal(format!("encode response: {e:?}")))?;
        Ok(Reply {
            status,
            body: ReplyBody::Bytes(BytesBody::new(body)),
            content_type: API_TYPE,
        })
    }

    /// 200 with an encoded body.
    pub(crate) fn ok<T: tls_codec::Serialize>(value: &T) -> Result<Reply, ApiError> {
        Self::encoded(StatusCode::OK, value)
    }

    /// 201 with an encoded body.
    pub(crate) fn created<T: tls_codec::Serialize>(value: &T) -> Result<Reply, ApiError> {
        Self::encoded(StatusCode::CREATED, value)
    }

    /// 204.
    pub(crate) fn no_content() -> Reply {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: ReplyBody::Bytes(BytesBody::new(Vec::new())),
            content_type: API_TYPE,
        }
    }

    /// 200 with a text body.
    pub(crate) fn text(body: String, content_type: &'static str) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: ReplyBody::Bytes(BytesBody::new(body.into_bytes())),
            content_type,
        }
    }

    /// 200 with a stream of server-sent events.
    pub(crate) fn stream(body: SseBody) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: ReplyBody::Stream(body),
            content_type: "text/event-stream",
        }
    }

    /// The body of an answer in bytes, to take its share of a memory
    /// budget (`None` for a stream).
    pub(crate) fn bytes_mut(&mut self) -> Option<&mut BytesBody> {
        match &mut self.body {
            ReplyBody::Bytes(b) => Some(b),
            ReplyBody::Stream(_) => None,
        }
    }

    /// The response.
    pub(crate) fn into_response(self) -> Response<ApiBody> {
        let streaming = matches!(self.body, ReplyBody::Stream(_));
        let mut resp = Response::new(match self.body {
            ReplyBody::Bytes(b) => Either::Left(b),
            ReplyBody::Stream(s) => Either::Right(s),
        });
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        if streaming {
            // Events must reach the client as they are sent: no caching, and
            // no buffering in a reverse proxy (nginx honours this header).
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use mls_ds_protocol::decode;

    use super::*;
    use crate::backend::StorageFault;

    fn status(e: DsError) -> (u16, ErrorCode) {
        let (s, c) = ApiError::Ds(e).classify();
        (s.as_u16(), c)
    }

    async fn body_of(resp: Response<ApiBody>) -> ErrorBody {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        decode::<ErrorBody>(&bytes).unwrap()
    }

    #[test]
    fn invalid_is_400() {
        assert_eq!(
            status(DsError::Invalid("x".into())),
            (400, ErrorCode::BadRequest)
        );
    }

    #[test]
    fn unauthenticated_is_401() {
        assert_eq!(
            status(DsError::Unauthenticated("x".into())),
            (401, ErrorCode::Unauthorized)
        );
    }

    #[test]
    fn forbidden_is_403() {
        assert_eq!(
            status(DsError::Forbidden("x".into())),
            (403, ErrorCode::Forbidden)
        );
    }

    #[test]
    fn not_found_is_404() {
        assert_eq!(
            status(DsError::NotFound("x".into())),
            (404, ErrorCode::NotFound)
        );
    }

    #[tokio::test]
    async fn wrong_epoch_is_409_and_names_the_current_epoch() {
        let e = DsError::WrongEpoch {
            current: 7,
            reason: "commit is for epoch 6".into(),
        };
        assert_eq!(
            status(DsError::WrongEpoch {
                current: 7,
                reason: String::new()
            }),
            (409, ErrorCode::WrongEpoch)
        );
        let body = body_of(ApiError::Ds(e).answer("commit")).await;
        assert_eq!(body.current_epoch, Some(7));
        assert!(
            body.text().contains("commit is for epoch 6"),
            "{}",
            body.text()
        );
    }

    #[test]
    fn conflict_is_409() {
        assert_eq!(
            status(DsError::Conflict("x".into())),
            (409, ErrorCode::Conflict)
        );
    }

    #[test]
    fn rate_limited_is_429() {
        assert_eq!(
            status(DsError::RateLimited {
                message: "x".into(),
                retry_after_secs: 1
            }),
            (429, ErrorCode::TooManyRequests)
        );
    }

    #[test]
    fn quota_exceeded_is_507() {
        assert_eq!(
            status(DsError::QuotaExceeded("x".into())),
            (507, ErrorCode::QuotaExceeded)
        );
    }

    #[test]
    fn too_large_is_413() {
        assert_eq!(
            status(DsError::TooLarge("x".into())),
            (413, ErrorCode::PayloadTooLarge)
        );
    }

    #[test]
    fn unavailable_is_503() {
        assert_eq!(
            status(DsError::Unavailable("x".into())),
            (503, ErrorCode::Unavailable)
        );
    }

    #[tokio::test]
    async fn storage_failure_is_500_and_names_only_the_os_error() {
        let fault = StorageFault::from_os_error(Some(30));
        assert_eq!(
            status(DsError::StorageFailed(fault.clone())),
            (500, ErrorCode::Internal)
        );
        let text = body_of(ApiError::Ds(DsError::StorageFailed(fault)).answer("send"))
            .await
            .text();
        assert!(text.contains("Read-only file system"), "{text}");
        assert!(text.contains("nothing was acknowledged"), "{text}");
    }

    #[tokio::test]
    async fn internal_is_500_and_its_detail_stays_in_the_log() {
        let detail = "corrupt value in tree app.ds.groups at key 0a0b: bad record";
        let e = ApiError::Ds(DsError::Internal(detail.into()));
        assert_eq!(
            e.classify(),
            (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal)
        );
        let resp = e.answer("commit");
        assert_eq!(resp.status(), 500);
        let text = body_of(resp).await.text();
        assert!(
            text.starts_with("internal server error (error id "),
            "{text}"
        );
        for leak in ["corrupt", "app.ds", "0a0b", "record"] {
            assert!(!text.contains(leak), "{leak} leaked: {text}");
        }
    }

    #[tokio::test]
    async fn the_adapter_s_own_refusals() {
        let cases = [
            (
                ApiError::NoRoute {
                    method: "GET".into(),
                    path: "/x".into(),
                },
                404,
            ),
            (ApiError::MethodNotAllowed(&["GET", "POST"]), 405),
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::AmbiguousFraming("x".into()), 400),
            (ApiError::PayloadTooLarge(10), 413),
            (ApiError::UnsupportedMediaType("x".into()), 415),
            (
                ApiError::RateLimited(RetryAfter(std::time::Duration::from_millis(1500))),
                429,
            ),
            (ApiError::Overloaded, 503),
        ];
        for (e, code) in cases {
            let resp = e.answer("test");
            assert_eq!(resp.status().as_u16(), code, "{e:?}");
            match e {
                ApiError::MethodNotAllowed(_) => assert_eq!(resp.headers()[ALLOW], "GET, POST"),
                ApiError::AmbiguousFraming(_) => assert_eq!(resp.headers()[CONNECTION], "close"),
                ApiError::RateLimited(_) => assert_eq!(resp.headers()[RETRY_AFTER], "2"),
                _ => {}
            }
        }
    }
}
