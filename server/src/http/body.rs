//! Reading a request body: the framing must be unambiguous, the size within
//! the limit and the source address's memory budget, the upload finished
//! within the read timeout, and the content type the API's.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::Request;
use mls_ds_protocol::CONTENT_TYPE as API_TYPE;

use super::budget::{Budgets, RequestShare};
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

/// A request read whole.
pub(crate) struct Received {
    pub(crate) parts: Parts,
    pub(crate) body: Bytes,
    /// The body's share of the memory budget, held while it is in use.
    pub(crate) share: RequestShare,
}

/// Where a request body is read from, and within which limits.
pub(crate) struct ReadLimits<'a> {
    pub(crate) max: usize,
    pub(crate) timeout: Duration,
    pub(crate) budgets: &'a Budgets,
    pub(crate) source: IpAddr,
}

/// The request's head and its whole body (at most `max` bytes, received
/// within `timeout`, held in the memory budget of `source`).
pub(crate) async fn read<B>(req: Request<B>, limits: ReadLimits<'_>) -> Result<Received, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let max = limits.max;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > max as u64) {
        return Err(ApiError::PayloadTooLarge(max));
    }
    let declared = declared.map_or(0, |l| l as usize);
    let mut share = limits.budgets.request(limits.source, declared)?;
    let (parts, body) = req.into_parts();
    // A stalled upload holds an in-flight slot only this long.
    let timeout = limits.timeout;
    let body = tokio::time::timeout(timeout, collect(body, &limits, declared, &mut share))
        .await
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "request body not received within {} ms",
                timeout.as_millis()
            ))
        })??;
    if !body.is_empty() {
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
    Ok(Received { parts, body, share })
}

/// The body's bytes, growing `share` (which holds `reserved` bytes) as
/// they arrive beyond it. A body of one frame is not copied.
async fn collect<B>(
    body: B,
    limits: &ReadLimits<'_>,
    mut reserved: usize,
    share: &mut RequestShare,
) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: BoxError = e.into();
            ApiError::BadRequest(format!("cannot read body: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        if len > limits.max {
            return Err(ApiError::PayloadTooLarge(limits.max));
        }
        if len > reserved {
            limits.budgets.grow_request(share, len - reserved)?;
            reserved = len;
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            held => {
                if let Some(held) = held {
                    joined.extend_from_slice(&held);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(joined)))
}
