//! Write sets committed together: each node runs a few lanes, and a lane
//! commits the write sets that arrived while it was busy in one database
//! transaction, as the sled writer commits a cycle's with one fdatasync.
//!
//! Why: a send locks its recipients' queue rows until its commit, so
//! concurrent sends to one group wait for each other's commits (one WAL
//! flush and one round trip per statement each); on the database most of
//! their CPU went to waking waiters. Write sets of one group go to the same
//! lane (chosen by the group of their first delivery), so a lane applies
//! them one after the other inside one transaction and one commit, without
//! waiting on itself; write sets without deliveries go by what their
//! conditions lock ([`subject`]), or round the lanes.
//!
//! Each write set's answer is what it would have been alone, in the order
//! the lane took them: a later set sees an earlier one's writes. The queues
//! the transaction grew are announced once, with its last statement. A set
//! whose conditions fail wrote nothing (conditions are checked before any
//! change), so the others go on. Any other failure before the commit rolls
//! the whole transaction back and the lane applies each set of it alone,
//! with the usual retries. A commit whose outcome is unknown (the
//! connection broke during it) is reported to every set, as it would be to
//! one: none is run again, since it may have committed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mls_ds_protocol::ClientId;
use tokio::sync::{mpsc, oneshot};

use super::deliveries::announce;
use super::writes::{apply_one, conflict, lock_queues, Step, Written};
use super::{connect::db, Inner};
use crate::backend::write_set::{Applied, Condition, WriteSet};
use crate::backend::StoreError;

/// Most write sets in one transaction.
const MAX_BATCH: usize = 64;

/// A write set's answer.
type Answer = Result<Written<Applied>, StoreError>;

/// A write set waiting for its lane.
struct Pending {
    set: WriteSet,
    reply: oneshot::Sender<Answer>,
}

/// The lanes of this node.
pub(crate) struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Pending>>,
    next: AtomicUsize,
}

impl Lanes {
    /// Start `count` lanes (at least one) on `inner`; their tasks end when
    /// the lanes are dropped.
    pub(crate) fn start(inner: &Arc<Inner>, count: usize) -> Lanes {
        let senders = (0..count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(inner.clone(), rx));
                tx
            })
            .collect();
        Lanes {
            senders,
            next: AtomicUsize::new(0),
        }
    }

    /// Apply `set` on its lane; resolves once its transaction committed.
    pub(crate) async fn apply(&self, set: WriteSet) -> Answer {
        let lane = match subject(&set) {
            Some(key) => spread(key),
            None => self.next.fetch_add(1, Ordering::Relaxed),
        } % self.senders.len();
        let (reply, answer) = oneshot::channel();
        let closed = || StoreError::Unavailable("the server is shutting down".into());
        self.senders[lane]
            .send(Pending { set, reply })
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// What decides a write set's lane: the group of its first delivery, or
/// else what its conditions lock that others contend for (a group, a
/// client's key packages, an invitation). Write sets on one lane never
/// wait for each other's locks; on different lanes they rarely lock the
/// same rows, and so rarely deadlock (a deadlock costs PostgreSQL's
/// `deadlock_timeout` before it is broken). The rest, registrations
/// among them, go round the lanes: they rarely contend, and spread
/// evenly that way (keyed by client id, registrations ran a third slower
/// in the load benchmark).
fn subject(set: &WriteSet) -> Option<&[u8]> {
    if let Some(d) = set.deliveries.first() {
        return Some(&d.message.group_id);
    }
    set.conditions
        .iter()
        .filter_map(|c| match c {
            Condition::GroupAt { group, .. }
            | Condition::GroupPresent(group)
            | Condition::GroupAbsent(group) => Some((0, group.as_bytes())),
            Condition::KeyPackageUnclaimed { owner, .. }
            | Condition::LastResortAt { owner, .. } => Some((1, owner.as_bytes())),
            Condition::InviteAt { code, .. } => Some((2, code.as_bytes())),
            Condition::ClientAbsent(_)
            | Condition::ClientActive(_)
            | Condition::ClientKeyIs { .. }
            | Condition::SendNew(_)
            | Condition::UsageAt { .. } => None,
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, key)| key)
}

/// A lane number for a key: FNV-1a, then a finaliser that spreads every
/// input bit over the low bits (ids that differ only in their last
/// characters would otherwise share a lane).
fn spread(key: &[u8]) -> usize {
    let mut hash = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    usize::try_from(hash & 0xffff).unwrap_or(0)
}

/// A lane: take what waits, apply it, answer, again.
async fn run(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut taken = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut taken, MAX_BATCH).await > 0 {
        let mut batch: Vec<Pending> = std::mem::take(&mut taken);
        if batch.len() == 1 {
            if let Some(p) = batch.pop() {
                let answer = inner.apply(&p.set).await;
                let _ = p.reply.send(answer);
            }
            continue;
        }
        let sets: Vec<&WriteSet> = batch.iter().map(|p| &p.set).collect();
        match inner.apply_together(&sets).await {
            Together::Committed(answers) | Together::Unknown(answers) => {
                for (p, answer) in batch.into_iter().zip(answers) {
                    let _ = p.reply.send(answer);
                }
            }
            Together::RolledBack => {
                for p in batch {
                    let answer = inner.apply(&p.set).await;
                    let _ = p.reply.send(answer);
                }
            }
        }
    }
}

/// How a transaction of several write sets ended.
enum Together {
    /// Committed: each set's answer, in order.
    Committed(Vec<Answer>),
    /// The commit failed with an outcome that is not known: the same
    /// error for each set.
    Unknown(Vec<Answer>),
    /// Nothing was written: apply each set alone.
    RolledBack,
}

impl Inner {
    /// Apply `sets` in one transaction (module doc).
    async fn apply_together(&self, sets: &[&WriteSet]) -> Together {
        let started = Instant::now();
        let Ok(mut conn) = self.connection().await else {
            return Together::RolledBack;
        };
        let Ok(tx) = conn.transaction().await else {
            return Together::RolledBack;
        };
        if lock_queues(&tx, sets).await.is_err() {
            return Together::RolledBack;
        }
        let mut answers = Vec::with_capacity(sets.len());
        let mut grown: BTreeMap<ClientId, u64> = BTreeMap::new();
        for set in sets {
            match apply_one(&tx, set, self.max_queue_depth).await {
                Ok(written) => {
                    for (client, head) in &written.grown {
                        let newest = grown.entry(client.clone()).or_default();
                        *newest = (*newest).max(*head);
                    }
                    answers.push(Ok(written));
                }
                Err(Step::Store(e @ StoreError::ConditionFailed(_))) => answers.push(Err(e)),
                Err(_) => return Together::RolledBack,
            }
        }
        let grown: Vec<(ClientId, u64)> = grown.into_iter().collect();
        if announce(&tx, &grown).await.is_err() {
            return Together::RolledBack;
        }
        let applied = started.elapsed();
        match tx.commit().await {
            Ok(()) => {
                let writes = u64::try_from(sets.len()).unwrap_or(u64::MAX);
                self.counters
                    .committed(applied, started.elapsed().saturating_sub(applied), writes);
                Together::Committed(answers)
            }
            // A conflict at commit (a serialisation failure) rolled it back.
            Err(e) if conflict(&e) => Together::RolledBack,
            Err(e) => {
                tracing::warn!(error = %e, sets = sets.len(), "commit of a batch failed");
                let unavailable = matches!(db(e), StoreError::Unavailable(_));
                let answer = || {
                    Err(if unavailable {
                        StoreError::Unavailable("the database is unreachable; retry shortly".into())
                    } else {
                        StoreError::Database("the commit failed".into())
                    })
                };
                Together::Unknown(sets.iter().map(|_| answer()).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn ids_that_differ_only_at_their_end_spread_over_the_lanes() {
        for lanes in [2usize, 4, 8] {
            let mut per_lane = vec![0usize; lanes];
            for i in 0..4000 {
                per_lane[spread(format!("client-{i:05}").as_bytes()) % lanes] += 1;
            }
            let even = 4000 / lanes;
            for n in &per_lane {
                assert!(n.abs_diff(even) < even / 5, "{lanes} lanes: {per_lane:?}");
            }
        }
    }
}
