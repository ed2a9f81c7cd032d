//! Request authentication: verifies [`AuthToken`]s against what the request
//! binds (method, path and query, body: a [`RequestView`], no HTTP types),
//! keeps sessions and the replay state (nonce cache, per-session counter
//! windows).
//!
//! Sessions live in this process's memory: after a restart clients get 401
//! and open a new session with a signature. Losing them loses no data, and a
//! captured request cannot be replayed into a fresh server because its
//! session is gone. A backend shared by several processes also keeps them
//! (the services store each new one and take in one they do not know,
//! `clients.rs`); this table is then that process's view, with its own
//! counter windows.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use mls_ds_protocol::auth::{
    self, AuthToken, SessionAuth, SessionCreated, SignatureAuth, MAX_CLOCK_SKEW_MS, SESSION_ID_LEN,
    SESSION_KEY_LEN, SESSION_MAX_OVERTAKEN,
};
use mls_ds_protocol::ClientId;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::SignatureScheme;
use rand::RngCore;

use crate::backend::records::now_ms;
use crate::service::error::{DsError, Result};
use crate::service::signatures::SignatureBatcher;
pub use crate::service::signatures::SignatureCounts;

struct Session {
    client: ClientId,
    key: [u8; SESSION_KEY_LEN],
    expires_ms: u64,
    replay: ReplayGuard,
}

/// Which counters a session may still use: any above the highest used,
/// and those below it that have not arrived yet (overtaken by later ones),
/// at most [`SESSION_MAX_OVERTAKEN`] of them, the oldest forgotten first.
/// A request in flight stays acceptable however many later ones are
/// answered before it arrives; its memory is one entry while it is late.
#[derive(Default)]
struct ReplayGuard {
    highest: u64,
    /// Ascending.
    missing: Vec<u64>,
}

impl ReplayGuard {
    /// Whether `counter` may be used; if so it is used now.
    fn accept(&mut self, counter: u64) -> bool {
        if counter > self.highest {
            let skipped = counter - self.highest - 1;
            let kept = skipped.min(SESSION_MAX_OVERTAKEN as u64);
            self.missing.extend(counter - kept..counter);
            let excess = self.missing.len().saturating_sub(SESSION_MAX_OVERTAKEN);
            self.missing.drain(..excess);
            self.highest = counter;
            return true;
        }
        match self.missing.binary_search(&counter) {
            Ok(i) => {
                self.missing.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// Most sessions one client holds at once; opening one more ends its
/// oldest. A client keeps one session per running instance (an app and
/// its background process, a few devices restored from one backup), so
/// this is generous for it, while one client id (or a stolen key) that
/// opens sessions in a loop pushes out only its own, not everyone else's.
pub(crate) const MAX_SESSIONS_PER_CLIENT: usize = 32;

/// Open sessions by id, and their ids in the order they expire: every
/// session lives as long, so that is the order they were opened. Expired
/// sessions are reclaimed from the front at each opening, and a full table
/// gives up its oldest session for the new one, so nobody is locked out
/// and no opening sweeps the table. Each client's sessions are also listed
/// apart (at most [`MAX_SESSIONS_PER_CLIENT`]), oldest first.
#[derive(Default)]
struct Sessions {
    by_id: HashMap<[u8; SESSION_ID_LEN], Session>,
    /// May name sessions already gone (ended, or expired when used); they
    /// leave when they reach the front.
    by_expiry: VecDeque<(u64, [u8; SESSION_ID_LEN])>,
    /// Each client's live sessions, oldest first.
    by_client: HashMap<ClientId, VecDeque<[u8; SESSION_ID_LEN]>>,
}

impl Sessions {
    /// Make room for one more under `max`: expired sessions go first, then
    /// the oldest. Returns how many live sessions were given up.
    fn make_room(&mut self, now: u64, max: usize) -> usize {
        let mut evicted = 0;
        while let Some(&(expires_ms, id)) = self.by_expiry.front() {
            let full = self.by_id.len() >= max.max(1);
            if expires_ms >= now && !full {
                break;
            }
            self.by_expiry.pop_front();
            // Only the entry the queue was made for (a session id is
            // random: one reused is not expected, but is not mistaken).
            if self
                .by_id
                .get(&id)
                .is_some_and(|s| s.expires_ms == expires_ms)
            {
                self.remove(&id);
                if expires_ms >= now {
                    evicted += 1;
                }
            }
        }
        evicted
    }

    /// Add a session; returns whether its client's oldest session had to
    /// end for it.
    fn insert(&mut self, id: [u8; SESSION_ID_LEN], session: Session) -> bool {
        let own = self.by_client.entry(session.client.clone()).or_default();
        own.push_back(id);
        let oldest = (own.len() > MAX_SESSIONS_PER_CLIENT)
            .then(|| own.pop_front())
            .flatten();
        self.by_expiry.push_back((session.expires_ms, id));
        self.by_id.insert(id, session);
        // Its entry in `by_expiry` leaves when it reaches the front.
        let replaced = oldest.is_some_and(|old| self.by_id.remove(&old).is_some());
        // Entries of sessions gone before their turn (ended, replaced) wait
        // behind the oldest live one; a client opening sessions in a loop
        // must not grow the queue without bound. Dropping them once they
        // outnumber the live ones costs O(1) per opening, amortised.
        if self.by_expiry.len() > 2 * self.by_id.len() + 1024 {
            let by_id = &self.by_id;
            self.by_expiry.retain(|(expires_ms, id)| {
                by_id.get(id).is_some_and(|s| s.expires_ms == *expires_ms)
            });
        }
        replaced
    }

    /// Drop one session.
    fn remove(&mut self, id: &[u8; SESSION_ID_LEN]) {
        let Some(session) = self.by_id.remove(id) else {
            return;
        };
        if let Some(own) = self.by_client.get_mut(&session.client) {
            // At most MAX_SESSIONS_PER_CLIENT long.
            own.retain(|other| other != id);
            if own.is_empty() {
                self.by_client.remove(&session.client);
            }
        }
    }

    /// Drop every session of `client`.
    fn remove_client(&mut self, client: &ClientId) {
        for id in self.by_client.remove(client).unwrap_or_default() {
            self.by_id.remove(&id);
        }
    }

    fn clear(&mut self) {
        self.by_id.clear();
        self.by_client.clear();
    }
}

#[derive(Default)]
struct Nonces {
    seen: HashMap<[u8; 16], u64>,
    order: VecDeque<([u8; 16], u64)>,
}

/// The authenticator shared by all requests.
pub struct Authenticator {
    crypto: RustCrypto,
    /// Ed25519 signatures waiting to be verified together.
    ed25519: Arc<SignatureBatcher>,
    sessions: Mutex<Sessions>,
    nonces: Mutex<Nonces>,
    session_ttl_ms: u64,
    max_sessions: usize,
    /// Per client, how often its sessions were ended (a deletion, a
    /// recovery): what a queue stream, authenticated once when it opened,
    /// compares to see that it must end too. Only such clients are here.
    ended: Mutex<HashMap<ClientId, u64>>,
    /// Bumped whenever any client's sessions end, to wake the streams.
    ended_tx: tokio::sync::watch::Sender<u64>,
    /// How often every client's sessions were ended at once.
    all_ended: std::sync::atomic::AtomicU64,
}

/// A request's verified identity.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The authenticated client.
    pub client: ClientId,
    /// Whether it authenticated with its signature key (not a session).
    pub by_signature: bool,
    /// The public key a signature token was verified with (empty for a
    /// session), so that a session opened with it can be dropped if a
    /// recovery replaced the key meanwhile.
    pub signed_with: Vec<u8>,
}

/// The key a signature token must verify with: the registered one, or the
/// one being registered.
#[derive(Clone, Copy, Debug)]
pub struct RegisteredKey<'a> {
    /// MLS signature scheme code point.
    pub scheme: u16,
    /// Public key.
    pub public_key: &'a [u8],
}

/// What a request looks like to the authenticator.
pub struct RequestView<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path with query string.
    pub path_and_query: &'a str,
    /// The raw body.
    pub body: &'a [u8],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Authenticator {
    /// New authenticator; sessions last `session_ttl_ms`.
    pub fn new(session_ttl_ms: u64, max_sessions: usize) -> Self {
        Authenticator {
            crypto: RustCrypto::default(),
            ed25519: Arc::default(),
            sessions: Mutex::new(Sessions::default()),
            nonces: Mutex::new(Nonces::default()),
            session_ttl_ms,
            max_sessions,
            ended: Mutex::new(HashMap::new()),
            ended_tx: tokio::sync::watch::Sender::new(0),
            all_ended: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Parse the `Authorization` header value.
    pub fn parse(header: Option<&str>) -> Result<AuthToken> {
        let value =
            header.ok_or_else(|| DsError::Unauthenticated("missing authorization".into()))?;
        auth::parse_header(value).map_err(|e| DsError::Unauthenticated(e.to_string()))
    }

    fn check_clock(timestamp_ms: u64) -> Result<()> {
        let now = now_ms();
        if timestamp_ms.abs_diff(now) > MAX_CLOCK_SKEW_MS {
            return Err(DsError::Unauthenticated(format!(
                "stale token: timestamp {timestamp_ms} is more than {MAX_CLOCK_SKEW_MS} ms from the server's clock {now}"
            )));
        }
        Ok(())
    }

    /// Verify a signature token with `key`. Consumes the nonce. Ed25519
    /// signatures of concurrent requests are verified in batches
    /// (`signatures.rs`).
    pub async fn verify_signature(
        &self,
        token: &SignatureAuth,
        key: RegisteredKey<'_>,
        req: &RequestView<'_>,
    ) -> Result<Caller> {
        Self::check_clock(token.timestamp_ms)?;
        let scheme = SignatureScheme::try_from(key.scheme).map_err(|_| {
            DsError::Unauthenticated(format!("unsupported signature scheme {:#06x}", key.scheme))
        })?;
        let payload = auth::signature_payload(
            req.method,
            req.path_and_query,
            &auth::body_hash(req.body),
            token.timestamp_ms,
            &token.client_id,
            &token.nonce,
        );
        // OpenMLS signs `SignContent { label, content }`; the DS uses the raw
        // payload, which carries its own label.
        let valid = if scheme == SignatureScheme::ED25519 {
            self.ed25519
                .verify(key.public_key, payload, token.signature.as_slice())
                .await
        } else {
            self.crypto
                .verify_signature(scheme, &payload, key.public_key, token.signature.as_slice())
                .is_ok()
        };
        if !valid {
            return Err(DsError::Unauthenticated("bad signature".into()));
        }
        self.consume_nonce(token.nonce, token.timestamp_ms)?;
        Ok(Caller {
            client: token.client_id.clone(),
            by_signature: true,
            signed_with: key.public_key.to_vec(),
        })
    }

    fn consume_nonce(&self, nonce: [u8; 16], timestamp_ms: u64) -> Result<()> {
        let mut n = lock(&self.nonces);
        // Nonces only need remembering while their timestamp is acceptable.
        let horizon = now_ms().saturating_sub(2 * MAX_CLOCK_SKEW_MS);
        while let Some((old, ts)) = n.order.front().copied() {
            if ts >= horizon {
                break;
            }
            n.order.pop_front();
            n.seen.remove(&old);
        }
        if n.seen.insert(nonce, timestamp_ms).is_some() {
            return Err(DsError::Unauthenticated("replayed token".into()));
        }
        n.order.push_back((nonce, timestamp_ms));
        Ok(())
    }

    /// Verify a session token.
    pub fn verify_session(&self, token: &SessionAuth, req: &RequestView<'_>) -> Result<Caller> {
        Self::check_clock(token.timestamp_ms)?;
        let payload = auth::session_payload(
            req.method,
            req.path_and_query,
            &auth::body_hash(req.body),
            token.timestamp_ms,
            &token.session_id,
            token.counter,
        );
        let mut sessions = lock(&self.sessions);
        let s = sessions
            .by_id
            .get_mut(&token.session_id)
            .ok_or_else(|| DsError::Unauthenticated("unknown or expired session".into()))?;
        if s.expires_ms < now_ms() {
            sessions.remove(&token.session_id);
            return Err(DsError::Unauthenticated("session expired".into()));
        }
        if !auth::verify_mac(&s.key, &payload, &token.mac) {
            return Err(DsError::Unauthenticated("bad session MAC".into()));
        }
        if !s.replay.accept(token.counter) {
            return Err(DsError::Unauthenticated("replayed token".into()));
        }
        Ok(Caller {
            client: s.client.clone(),
            by_signature: false,
            signed_with: Vec::new(),
        })
    }

    /// Open a session for an authenticated client.
    pub fn open_session(&self, client: &ClientId) -> Result<SessionCreated> {
        let mut id = [0u8; SESSION_ID_LEN];
        let mut key = [0u8; SESSION_KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut key);
        let now = now_ms();
        let expires_ms = now + self.session_ttl_ms;
        let mut sessions = lock(&self.sessions);
        let evicted = sessions.make_room(now, self.max_sessions);
        if evicted > 0 {
            tracing::debug!(
                evicted,
                "session table full: the oldest session gave way to a new one"
            );
        }
        let replaced = sessions.insert(
            id,
            Session {
                client: client.clone(),
                key,
                expires_ms,
                replay: ReplayGuard::default(),
            },
        );
        if replaced {
            tracing::debug!(
                client = %client,
                "client at its session limit: its oldest session gave way to a new one"
            );
        }
        Ok(SessionCreated {
            session_id: id,
            session_key: key,
            expires_at_ms: expires_ms,
        })
    }

    /// Whether this process holds session `id` (expired or not).
    pub fn knows_session(&self, id: &[u8; SESSION_ID_LEN]) -> bool {
        lock(&self.sessions).by_id.contains_key(id)
    }

    /// Hold a session another process opened (read from shared storage),
    /// with a replay window of this process's own.
    pub fn adopt_session(
        &self,
        id: [u8; SESSION_ID_LEN],
        client: ClientId,
        key: [u8; SESSION_KEY_LEN],
        expires_ms: u64,
    ) {
        let mut sessions = lock(&self.sessions);
        sessions.make_room(now_ms(), self.max_sessions);
        sessions.insert(
            id,
            Session {
                client,
                key,
                expires_ms,
                replay: ReplayGuard::default(),
            },
        );
    }

    /// Drop every session of a client that was deleted or recovered with a
    /// new key, and end its queue streams.
    pub fn end_sessions(&self, client: &ClientId) {
        lock(&self.sessions).remove_client(client);
        *lock(&self.ended).entry(client.clone()).or_default() += 1;
        self.ended_tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Drop every session and end every queue stream (credential changes
    /// elsewhere may have been missed).
    pub fn end_all_sessions(&self) {
        lock(&self.sessions).clear();
        self.all_ended
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.ended_tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// How often `client`'s sessions were ended so far ([`Self::end_sessions`],
    /// [`Self::end_all_sessions`]).
    pub fn sessions_ended(&self, client: &ClientId) -> u64 {
        lock(&self.ended)
            .get(client)
            .copied()
            .unwrap_or(0)
            .wrapping_add(self.all_ended.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Changes whenever some client's sessions end.
    pub fn watch_ended_sessions(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ended_tx.subscribe()
    }

    /// How the Ed25519 signatures were verified so far (in rounds).
    pub fn signature_counts(&self) -> SignatureCounts {
        self.ed25519.counts()
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session_of(a: &Authenticator, created: &SessionCreated) -> Result<Caller> {
        let view = RequestView {
            method: "GET",
            path_and_query: "/v1/queue",
            body: &[],
        };
        let ts = now_ms();
        let payload = auth::session_payload(
            view.method,
            view.path_and_query,
            &auth::body_hash(view.body),
            ts,
            &created.session_id,
            1,
        );
        let token = SessionAuth {
            session_id: created.session_id,
            counter: 1,
            timestamp_ms: ts,
            mac: auth::mac(&created.session_key, &payload),
        };
        a.verify_session(&token, &view)
    }

    #[test]
    fn a_full_session_table_gives_up_its_oldest_session() {
        let a = Authenticator::new(3_600_000, 3);
        let c = ClientId::new("c").unwrap();
        let opened: Vec<SessionCreated> = (0..5).map(|_| a.open_session(&c).unwrap()).collect();
        assert_eq!(a.session_count(), 3);
        for (i, created) in opened.iter().enumerate() {
            let verified = session_of(&a, created);
            assert_eq!(verified.is_ok(), i >= 2, "session {i}");
        }
        // Ended sessions leave the queue without counting as evicted.
        a.end_sessions(&c);
        assert_eq!(a.session_count(), 0);
        for _ in 0..3 {
            a.open_session(&c).unwrap();
        }
        assert_eq!(a.session_count(), 3);
        assert!(lock(&a.sessions).by_expiry.len() <= 3 + 3);
    }

    #[test]
    fn a_client_at_its_limit_ends_only_its_own_oldest_session() {
        let a = Authenticator::new(3_600_000, MAX_SESSIONS_PER_CLIENT + 8);
        let other = ClientId::new("other").unwrap();
        let kept = a.open_session(&other).unwrap();
        let c = ClientId::new("c").unwrap();
        let opened: Vec<SessionCreated> = (0..3000).map(|_| a.open_session(&c).unwrap()).collect();
        assert!(
            session_of(&a, &kept).is_ok(),
            "the other client keeps its session"
        );
        assert_eq!(a.session_count(), MAX_SESSIONS_PER_CLIENT + 1);
        let first_live = opened.len() - MAX_SESSIONS_PER_CLIENT;
        for (i, created) in opened.iter().enumerate() {
            assert_eq!(
                session_of(&a, created).is_ok(),
                i >= first_live,
                "session {i}"
            );
        }
        // The sessions that gave way do not pile up in the expiry order.
        let sessions = lock(&a.sessions);
        assert!(sessions.by_expiry.len() <= 2 * sessions.by_id.len() + 1024 + 1);
        assert_eq!(sessions.by_client[&c].len(), MAX_SESSIONS_PER_CLIENT);
        drop(sessions);
        a.end_sessions(&c);
        assert_eq!(a.session_count(), 1);
        assert!(!lock(&a.sessions).by_client.contains_key(&c));
    }

    #[test]
    fn expired_sessions_are_reclaimed_before_live_ones_go() {
        let a = Authenticator::new(30, 2);
        let c = ClientId::new("c").unwrap();
        a.open_session(&c).unwrap();
        a.open_session(&c).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(40));
        let live = a.open_session(&c).unwrap();
        let mut sessions = lock(&a.sessions);
        assert_eq!(sessions.by_id.len(), 1, "both expired ones reclaimed");
        assert_eq!(sessions.make_room(now_ms(), 2), 0, "room without eviction");
        drop(sessions);
        assert!(session_of(&a, &live).is_ok());
    }

    #[test]
    fn each_counter_is_accepted_once_in_any_order() {
        let mut g = ReplayGuard::default();
        for c in [5, 3, 4, 1, 2, 200] {
            assert!(g.accept(c), "{c}");
        }
        for c in [5, 3, 200, 0] {
            assert!(!g.accept(c), "{c} replayed or zero");
        }
        assert!(g.accept(199));
        assert!(g.accept(6), "late, but never used");
        assert_eq!(g.missing.len(), 200 - 7 - 1);
    }

    #[test]
    fn a_late_request_is_accepted_however_many_later_ones_came_first() {
        let mut g = ReplayGuard::default();
        // Counter 1 is on its way while 100,000 later ones are answered.
        for c in 2..=100_001 {
            assert!(g.accept(c));
        }
        assert_eq!(g.missing, vec![1]);
        assert!(g.accept(1));
        assert!(!g.accept(1));
        assert!(g.missing.is_empty());
    }

    #[test]
    fn at_most_the_bound_of_overtaken_counters_is_remembered() {
        let mut g = ReplayGuard::default();
        assert!(g.accept(1_000_000));
        assert_eq!(g.missing.len(), SESSION_MAX_OVERTAKEN);
        assert!(!g.accept(1_000_000 - SESSION_MAX_OVERTAKEN as u64 - 1));
        assert!(g.accept(1_000_000 - SESSION_MAX_OVERTAKEN as u64));
        // Each gap adds to the missing ones; the oldest go first.
        for c in (1_000_002..1_000_100).step_by(2) {
            assert!(g.accept(c));
        }
        assert_eq!(g.missing.len(), SESSION_MAX_OVERTAKEN);
        assert!(g.accept(1_000_001), "a gap of the loop");
        let oldest_kept = g.missing[0];
        assert!(!g.accept(oldest_kept - 1), "forgotten for later gaps");
        assert!(g.accept(oldest_kept));
        assert!(g.accept(999_990));
    }
}
