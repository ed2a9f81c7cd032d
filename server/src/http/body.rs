//! Reading a request body: the framing must be unambiguous, the size within
//! the limit, the upload finished within the read timeout, and the content
//! type the API's.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::Request;
use mls_ds_protocol::CONTENT_TYPE as API_TYPE;

use super::framing::AMBIGUOUS_LENGTH;
use super::response::ApiError;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Refuse framing a proxy in front could read differently (RFC 9112 §6.1):
/// a request that carried both `Content-Length` and `Transfer-Encoding`,
/// marked by the [`framing`](super::framing) guard. (hyper itself refuses
/// differing `Content-Length` values.)
pub(crate) fn check_framing<B>(req: &Request<B>) -> Result<(), ApiError> {
    if req.headers().contains_key(AMBIGUOUS_LENGTH) {
        return Err(ApiError::AmbiguousFraming(
            "a request may not carry both Content-Length and Transfer-Encoding".into(),
        ));
    }
    Ok(())
}

/// The request's head and its whole body (at most `max` bytes, received
/// within `timeout`).
pub(crate) async fn read<B>(
    req: Request<B>,
    max: usize,
    timeout: Duration,
) -> Result<(Parts, Bytes), ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > max as u64) {
        return Err(ApiError::PayloadTooLarge(max));
    }
    let (parts, body) = req.into_parts();
    // A stalled upload holds an in-flight slot only this long.
    let collected = tokio::time::timeout(timeout, Limited::new(body, max).collect())
        .await
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "request body not received within {} ms",
                timeout.as_millis()
            ))
        })?
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::PayloadTooLarge(max)
            } else {
                ApiError::BadRequest(format!("cannot read body: {e}"))
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
            return Err(ApiError::UnsupportedMediaType(format!(
                "content type must be {API_TYPE}, got {ct:?}"
            )));
        }
    }
    Ok((parts, bytes))
}
