//! Connections: how many the DS holds (in total and per source address),
//! and the upkeep that closes those that hold a place without using it.
//!
//! A connection is closed when
//! - it has not started a request within `first_request` of being accepted
//!   (silent sockets, a stalled TLS handshake or h2 preface);
//! - it has been idle (no request running, no response being sent) for
//!   `idle`: told to close gracefully (h2 `GOAWAY`), dropped if it has not
//!   within [`CLOSE_GRACE`];
//! - the peer stopped reading: a write has been blocked for `write_stall`,
//!   or a response is being sent and nothing was written for that long
//!   (this catches an h2 peer whose flow-control window stays shut, where
//!   no write is even attempted).
//!
//! Each connection's [`Activity`] is fed by its socket ([`Watched`]), by its
//! requests ([`Activity::request`]) and by its response bodies
//! ([`Tracked`]); a watchdog in the connection's task reads it at the next
//! deadline. Nothing here runs per byte beyond a clock read per write.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::counts::{Counted, Full, SourceCounts};

/// How long a connection told to close (idle) may take to do so.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Connection limits and timeouts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnLimits {
    /// Connections open at once, in total.
    pub(crate) max_total: usize,
    /// Connections open at once from one source address.
    pub(crate) max_per_source: usize,
    /// How soon after accepting a connection its first request must start.
    pub(crate) first_request: Duration,
    /// How long a connection may sit idle.
    pub(crate) idle: Duration,
    /// How long a response may go without a byte written.
    pub(crate) write_stall: Duration,
}

/// The open connections.
pub(crate) struct Connections {
    limits: ConnLimits,
    open: Arc<SourceCounts>,
    /// Behind a reverse proxy on this machine: loopback peers are the
    /// proxy, and count only against the total.
    proxy_on_loopback: bool,
}

impl Connections {
    /// No connection open yet.
    pub(crate) fn new(limits: ConnLimits, proxy_on_loopback: bool) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            open: Arc::default(),
            proxy_on_loopback,
        })
    }

    /// The limits.
    pub(crate) fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// A place for a connection from `peer` (its source address, as
    /// `limit_key` gives it), held until the connection ends.
    pub(crate) fn admit(&self, peer: IpAddr, source: IpAddr) -> Result<Counted<IpAddr>, Full> {
        let per_source = if self.proxy_on_loopback && peer.is_loopback() {
            usize::MAX
        } else {
            self.limits.max_per_source
        };
        self.open
            .try_acquire(&source, per_source, self.limits.max_total)
    }

    /// Connections open now.
    pub(crate) fn open_count(&self) -> usize {
        self.open.total()
    }
}

/// "Not blocked" in [`Activity::write_blocked_since`].
const NEVER: u64 = u64::MAX;

/// What one connection is doing, in milliseconds since it was accepted.
pub(crate) struct Activity {
    accepted: Instant,
    /// Requests started so far.
    started: AtomicU64,
    /// Requests whose handler runs.
    running: AtomicUsize,
    /// Response bodies not yet sent to the end.
    sending: AtomicUsize,
    /// When `running` or `sending` last went down.
    idle_since: AtomicU64,
    /// When a write last went through.
    last_write: AtomicU64,
    /// Since when a write has been refused for want of room ([`NEVER`]: it
    /// is not).
    write_blocked_since: AtomicU64,
}

/// What the watchdog does about a connection now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing; look again after this long.
    Wait(Duration),
    /// Idle too long: close gracefully.
    Idle,
    /// Close at once, for this reason.
    Drop(&'static str),
}

impl Activity {
    /// A connection accepted now.
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            accepted: Instant::now(),
            started: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            last_write: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(NEVER),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    /// A request starts; it runs until the guard drops.
    pub(crate) fn request(self: &Arc<Self>) -> Running {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::Relaxed);
        Running(self.clone())
    }

    fn wrote(&self) {
        let now = self.now_ms();
        self.last_write.store(now, Ordering::Relaxed);
        self.write_blocked_since.store(NEVER, Ordering::Relaxed);
    }

    fn write_blocked(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) == NEVER {
            let now = self.now_ms();
            self.write_blocked_since.store(now, Ordering::Relaxed);
        }
    }

    fn went_down(&self, counter: &AtomicUsize) {
        counter.fetch_sub(1, Ordering::Relaxed);
        let now = self.now_ms();
        self.idle_since.store(now, Ordering::Relaxed);
    }

    /// What to do about the connection now, under `limits`.
    pub(crate) fn verdict(&self, limits: &ConnLimits) -> Verdict {
        self.verdict_at(self.now_ms(), limits)
    }

    fn verdict_at(&self, now: u64, limits: &ConnLimits) -> Verdict {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NEVER - 1);
        let left =
            |since: u64, limit: Duration| ms(limit).saturating_sub(now.saturating_sub(since));
        if self.started.load(Ordering::Relaxed) == 0 {
            return match left(0, limits.first_request) {
                0 => Verdict::Drop("no request started in time"),
                wait => Verdict::Wait(Duration::from_millis(wait)),
            };
        }
        let blocked = self.write_blocked_since.load(Ordering::Relaxed);
        if blocked != NEVER && left(blocked, limits.write_stall) == 0 {
            return Verdict::Drop("the peer stopped reading");
        }
        let sending = self.sending.load(Ordering::Relaxed) > 0;
        if sending && left(self.last_write.load(Ordering::Relaxed), limits.write_stall) == 0 {
            return Verdict::Drop("a response got no byte out in time");
        }
        // Look again at least this often: a write may block, or a response
        // start, after this look.
        let recheck = ms(limits.write_stall).max(1);
        if sending || self.running.load(Ordering::Relaxed) > 0 {
            return Verdict::Wait(Duration::from_millis(recheck));
        }
        match left(self.idle_since.load(Ordering::Relaxed), limits.idle) {
            0 => Verdict::Idle,
            wait => Verdict::Wait(Duration::from_millis(wait.min(recheck))),
        }
    }
}

/// A running request of a connection (see [`Activity::request`]).
pub(crate) struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.went_down(&self.0.running);
    }
}

/// A response body, counted as being sent until it ends or is dropped.
pub(crate) struct Tracked<B> {
    inner: B,
    activity: Option<Arc<Activity>>,
}

impl<B> Tracked<B> {
    /// `inner`, sent on the connection of `activity`.
    pub(crate) fn new(inner: B, activity: &Arc<Activity>) -> Tracked<B> {
        activity.sending.fetch_add(1, Ordering::Relaxed);
        Tracked {
            inner,
            activity: Some(activity.clone()),
        }
    }

    fn done(&mut self) {
        if let Some(activity) = self.activity.take() {
            activity.went_down(&activity.sending);
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.done();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket, reporting its writes to the connection's
/// [`Activity`].
pub(crate) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    /// Watch `inner` for `activity`.
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { inner, activity }
    }

    fn after_write<T>(&self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &polled {
            Poll::Ready(Ok(_)) => self.activity.wrote(),
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Err(_)) => {}
        }
        polled
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        this.after_write(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.after_write(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ConnLimits = ConnLimits {
        max_total: 10,
        max_per_source: 2,
        first_request: Duration::from_secs(10),
        idle: Duration::from_secs(120),
        write_stall: Duration::from_secs(30),
    };

    fn secs(s: u64) -> u64 {
        s * 1000
    }

    #[test]
    fn a_connection_must_start_a_request_in_time() {
        let a = Activity::new();
        assert_eq!(
            a.verdict_at(secs(4), &LIMITS),
            Verdict::Wait(Duration::from_secs(6))
        );
        assert!(matches!(a.verdict_at(secs(10), &LIMITS), Verdict::Drop(_)));
        let _r = a.request();
        assert!(matches!(a.verdict_at(secs(10), &LIMITS), Verdict::Wait(_)));
    }

    #[test]
    fn idle_connections_close_gracefully_busy_ones_do_not() {
        let a = Activity::new();
        let running = a.request();
        assert_eq!(
            a.verdict_at(secs(500), &LIMITS),
            Verdict::Wait(LIMITS.write_stall)
        );
        drop(running);
        a.idle_since.store(secs(100), Ordering::Relaxed);
        assert_eq!(
            a.verdict_at(secs(200), &LIMITS),
            Verdict::Wait(Duration::from_secs(20))
        );
        assert_eq!(a.verdict_at(secs(220), &LIMITS), Verdict::Idle);
    }

    #[test]
    fn a_peer_that_stops_reading_is_dropped() {
        let a = Activity::new();
        let _r = a.request();
        // A write refused for want of room, for the whole stall time.
        a.write_blocked_since.store(secs(5), Ordering::Relaxed);
        assert!(matches!(a.verdict_at(secs(20), &LIMITS), Verdict::Wait(_)));
        assert!(matches!(a.verdict_at(secs(35), &LIMITS), Verdict::Drop(_)));
        a.wrote();
        // A response being sent with no write at all (h2, window shut).
        let body = Tracked::new((), &a);
        a.last_write.store(secs(40), Ordering::Relaxed);
        assert!(matches!(a.verdict_at(secs(60), &LIMITS), Verdict::Wait(_)));
        assert!(matches!(a.verdict_at(secs(70), &LIMITS), Verdict::Drop(_)));
        drop(body);
        assert!(matches!(a.verdict_at(secs(70), &LIMITS), Verdict::Wait(_)));
    }

    #[test]
    fn connections_are_limited_per_source_except_a_local_proxy() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let direct = Connections::new(LIMITS, false);
        let (a, b) = (ip("127.0.0.2"), ip("127.0.0.3"));
        let held: Vec<_> = (0..2).map(|_| direct.admit(a, a).unwrap()).collect();
        assert_eq!(direct.admit(a, a).err(), Some(Full::Key));
        assert!(direct.admit(b, b).is_ok());
        drop(held);
        assert_eq!(direct.open_count(), 0);
        let proxied = Connections::new(LIMITS, true);
        let held: Vec<_> = (0..10).map(|_| proxied.admit(a, a).unwrap()).collect();
        assert_eq!(proxied.admit(a, a).err(), Some(Full::Total));
        assert_eq!(proxied.open_count(), held.len());
    }
}
