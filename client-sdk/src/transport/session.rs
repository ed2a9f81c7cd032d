//! Sessions of a [`Transport`]: opened with a signature, then each request
//! MAC'd with the next counter. At most half of what the DS lets be
//! overtaken is in flight on one session, so that the DS never takes a
//! request reordered on the way for a replay.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use mls_ds_protocol::auth::{self, AuthToken, SessionAuth, SessionCreated, SESSION_MAX_OVERTAKEN};
use mls_ds_protocol::{decode, paths};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{now_ms, Transport};
use crate::error::{ClientError, Result};

pub(super) struct Session {
    pub(super) created: SessionCreated,
    counter: AtomicU64,
    /// One permit per request in flight on this session.
    in_flight: Arc<Semaphore>,
}

/// Most requests in flight on one session: half of what the DS lets be
/// overtaken, so that however they are reordered on the way (a slow
/// connection, a paused server), the DS never refuses one as a replay.
const MAX_IN_FLIGHT_PER_SESSION: usize = SESSION_MAX_OVERTAKEN / 2;

impl Transport {
    pub(super) async fn session_token(
        &self,
        s: &Session,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> (AuthToken, Option<OwnedSemaphorePermit>) {
        // Never closed; without a permit the request goes all the same.
        let lease = s.in_flight.clone().acquire_owned().await.ok();
        // Taken after the wait, so that counters follow the requests out.
        let counter = s.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let ts = now_ms();
        let payload = auth::session_payload(
            method,
            path_and_query,
            &auth::body_hash(body),
            ts,
            &s.created.session_id,
            counter,
        );
        let token = AuthToken::Session(SessionAuth {
            session_id: s.created.session_id,
            counter,
            timestamp_ms: ts,
            mac: auth::mac(&s.created.session_key, &payload),
        });
        (token, lease)
    }

    pub(super) async fn session(&self) -> Result<Arc<Session>> {
        if let Some(s) = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            if s.created.expires_at_ms > now_ms() + 10_000 {
                return Ok(s);
            }
        }
        let token = self.signature_token("POST", paths::SESSIONS, &[])?;
        let bytes = self
            .send_once(
                Method::POST,
                paths::SESSIONS,
                Vec::new(),
                Some(token),
                Duration::ZERO,
            )
            .await?;
        let created: SessionCreated =
            decode(&bytes).map_err(|e| ClientError::BadResponse(e.to_string()))?;
        let s = Arc::new(Session {
            created,
            counter: AtomicU64::new(0),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_SESSION)),
        });
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
        Ok(s)
    }
}
