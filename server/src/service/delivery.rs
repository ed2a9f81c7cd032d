//! Delivery to clients: fetching a page of one's queue (long-polling for
//! the first entry), acknowledging, the retention bound, and who is
//! listening (a long-poll or a stream open), so that push wake-ups go only
//! to the others. Which entries exist and when they become visible is the
//! backend's; this module decides the limits and how long a fetch waits.

use std::time::Duration;

use mls_ds_protocol::queue::{Ack, Acked};
use mls_ds_protocol::ClientId;
use tokio::time::Instant;

use super::auth::Caller;
use super::error::Result;
use super::Ds;
use crate::backend::records::now_ms;
use crate::backend::{Backend, Page};
use crate::counts::Counted;

/// What a fetch asks for (the query of `GET /v1/queue`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FetchRequest {
    /// Entries after this sequence number.
    pub(crate) after: u64,
    /// At most this many (capped by the policy).
    pub(crate) limit: Option<u64>,
    /// About this many bytes (capped by the policy; at least one entry).
    pub(crate) max_bytes: Option<u64>,
    /// Wait up to this long for the first entry (capped by the policy).
    pub(crate) wait_ms: u64,
    /// Acknowledge up to here first, so that a draining client needs one
    /// request per page.
    pub(crate) ack: Option<u64>,
}

fn capped(asked: Option<u64>, cap: usize) -> usize {
    asked.map_or(cap, |n| usize::try_from(n).unwrap_or(usize::MAX).min(cap))
}

impl<B: Backend> Ds<B> {
    /// `GET /v1/queue`. With `ack`, the acknowledgement is durable before
    /// the page is read, so the page also holds what became visible
    /// meanwhile.
    pub(crate) async fn fetch(&self, caller: &Caller, req: FetchRequest) -> Result<Page> {
        let client = &caller.client;
        let policy = &self.policy;
        let wait = Duration::from_millis(req.wait_ms.min(policy.max_wait_ms));
        if let Some(up_to) = req.ack {
            self.backend.ack(client, up_to).wait().await?;
        }
        self.next_page(client, req.after, req.limit, req.max_bytes, wait)
            .await
    }

    /// The next page of `client`'s queue after `after`, waiting up to
    /// `wait` (not capped by `--max-wait-ms`: a stream's producer waits its
    /// own keep-alive interval) for the first entry.
    pub(crate) async fn next_page(
        &self,
        client: &ClientId,
        after: u64,
        limit: Option<u64>,
        max_bytes: Option<u64>,
        wait: Duration,
    ) -> Result<Page> {
        let policy = &self.policy;
        let limit = capped(limit, policy.max_page_entries);
        let max_bytes = capped(max_bytes, policy.max_page_bytes);
        let _listening = (!wait.is_zero()).then(|| self.listen(client));
        let deadline = Instant::now() + wait;
        loop {
            let wakeup = self.backend.subscribe(client)?;
            // Registered before reading, so an entry published in between
            // is not missed.
            let notified = wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let page = self.backend.page(client, after, limit, max_bytes).await?;
            if !page.entries.is_empty() || Instant::now() >= deadline {
                return Ok(page);
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// Count `client` as listening while the guard lives (a stream holds
    /// one for its whole life, between its long-polls too).
    pub(crate) fn listen(&self, client: &ClientId) -> Counted {
        self.listeners.acquire(client)
    }

    /// A stream's authentication, taken when it opens: [`Self::still_authenticated`]
    /// tells whether it still holds, and the receiver changes whenever it
    /// may not (some client's sessions ended).
    pub(crate) fn stream_authentication(
        &self,
        client: &ClientId,
    ) -> (StreamAuthentication, tokio::sync::watch::Receiver<u64>) {
        (
            StreamAuthentication(self.auth.sessions_ended(client)),
            self.auth.watch_ended_sessions(),
        )
    }

    /// Whether a stream's authentication still holds: false once the
    /// client was deleted or recovered with a new key since it opened.
    pub(crate) fn still_authenticated(
        &self,
        client: &ClientId,
        at_open: StreamAuthentication,
    ) -> bool {
        self.auth.sessions_ended(client) == at_open.0
    }

    /// Whether `client` has a long-poll or a stream open.
    pub(crate) fn is_listening(&self, client: &ClientId) -> bool {
        self.listeners.holds(client)
    }

    /// `POST /v1/queue/ack`.
    pub(crate) async fn ack(&self, caller: &Caller, ack: Ack) -> Result<Acked> {
        let outcome = self.backend.ack(&caller.client, ack.up_to).wait().await?;
        Ok(Acked {
            acked: outcome.acked,
            remaining: outcome.remaining,
        })
    }

    /// Drop unacknowledged entries older than the retention bound (run
    /// periodically). Returns how many were dropped.
    pub(crate) async fn apply_retention(&self) -> Result<usize> {
        let retention_ms = self.policy.retention_secs.saturating_mul(1000);
        if retention_ms == 0 {
            return Ok(0);
        }
        let cutoff = now_ms().saturating_sub(retention_ms);
        Ok(self.backend.expire(cutoff).wait().await?)
    }
}

/// What [`Ds::stream_authentication`] took when a stream opened.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamAuthentication(u64);
