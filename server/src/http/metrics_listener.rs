//! The metrics listener (`--metrics-listen`): a second, plain-HTTP listener
//! that answers `GET /metrics` (and its `HEAD`) with the API front's
//! Prometheus page and 404 or 405 otherwise. It is apart from the API port
//! so that an operator can keep it off the open internet; it has no TLS and
//! no authentication for the same reason. Its requests are not counted in
//! the request metrics: scrapes are not API traffic.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::handler::{without_body, Front};
use super::response::{ApiBody, ApiError};
use crate::backend::Backend;

/// The one path served.
const PATH: &str = "/metrics";
/// The label error responses are logged under.
const LABEL: &str = "metrics";
/// How long open scrapes may take to finish at shutdown; a page renders
/// from memory, so this only covers a slow reader.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Accept connections on `listener` and answer them from `front` until
/// `shutdown` resolves.
pub(crate) async fn serve<B: Backend>(
    listener: TcpListener,
    front: Arc<Front<B>>,
    head_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    // No framing guard or watchdog here: hyper times request heads.
    let builder = super::connection_builder(Some(head_timeout));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let front = front.clone();
        let service = service_fn(move |req| {
            let front = front.clone();
            async move { Ok::<_, std::convert::Infallible>(answer(&front, &req)) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("some metrics connections did not finish in time");
    }
}

/// The answer to one request; its body, if any, is never read.
fn answer<B: Backend>(front: &Front<B>, req: &Request<Incoming>) -> Response<ApiBody> {
    let result = if req.uri().path().trim_end_matches('/') != PATH {
        Err(ApiError::NoRoute {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
        })
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        Err(ApiError::MethodNotAllowed(&["GET"]))
    } else {
        front.metrics_page()
    };
    let mut resp = match result {
        Ok(reply) => reply.into_response(),
        Err(e) => e.answer(LABEL),
    };
    if req.method() == Method::HEAD {
        without_body(&mut resp);
    }
    resp
}
