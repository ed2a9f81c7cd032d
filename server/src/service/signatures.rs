//! Ed25519 signature checks of concurrent requests, verified together.
//!
//! A registration, a session opening and every signature token need one
//! Ed25519 verification: about 38 µs on the 2-core machine the DS is
//! measured on, half of a registration's CPU. ed25519-dalek's
//! `verify_batch` checks n signatures with one multiscalar multiplication
//! (coefficients derived from all of its inputs) for about 19 µs each from
//! eight on (BENCHMARKS.md). So signatures queue here: the request that
//! finds nobody verifying starts a task that lets the other ready tasks run
//! first (they queue theirs), then verifies what is queued, round after
//! round until nothing waits; requests that arrive during a round wait for
//! the next. A round of one is verified alone (`verify_strict`), so no
//! request waits for company.
//!
//! What is accepted: a batch that fails is verified again one by one with
//! `verify_strict`, so a bad signature fails only its own request. A batch
//! that passes accepts what `verify_strict` would accept, but for one case
//! only a key's holder can produce: a signature whose R (or whose key)
//! carries a component of small order, built to fail `verify_strict`'s
//! cofactorless equation, may pass a batch (whose random coefficients
//! cancel that component with probability at most 1/2). Such a signature
//! needs the private key all the same, so it proves possession as well.
//! Keys of small order, for which anyone could build signatures, are
//! refused before they reach a batch.
//!
//! After a failed batch, rounds verify one by one until one passes whole:
//! a client sending bad signatures costs what verification cost before
//! batching, not the re-verification of every batch it spoils.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ed25519_dalek::{Signature, VerifyingKey};
use tokio::sync::oneshot;

/// Most signatures verified in one round: a round blocks its worker thread
/// (about 0.6 ms at this size), and larger batches cost no less per
/// signature (18.1 µs at 32, 19.0 at 64: docs/benchmarks-history.md).
const MAX_ROUND: usize = 32;

/// One signature waiting for its round.
struct Pending {
    key: VerifyingKey,
    signature: Signature,
    message: Vec<u8>,
    reply: oneshot::Sender<bool>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    /// A task is verifying rounds; whoever queues while it is set leaves
    /// its signature to it.
    running: bool,
    /// The last batch failed: verify one by one until a round passes whole.
    one_by_one: bool,
}

/// The queue of Ed25519 signatures waiting to be verified.
#[derive(Default)]
pub(crate) struct SignatureBatcher {
    queue: Mutex<Queue>,
    counts: Counters,
}

#[derive(Default)]
struct Counters {
    signatures: AtomicU64,
    rounds: AtomicU64,
    failed_batches: AtomicU64,
}

/// How the signatures were verified so far (`/metrics`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SignatureCounts {
    /// Signatures verified (malformed ones and weak keys, refused before,
    /// are not counted).
    pub signatures: u64,
    /// Rounds they were verified in: a round of several is one batch.
    pub rounds: u64,
    /// Batches that failed and were verified again one by one.
    pub failed_batches: u64,
}

/// The leading task's hold on the queue. Should the task end other than by
/// finding nothing to verify (a panic, the runtime shutting down), whoever
/// queues next leads: the signatures waiting are not left without one.
struct Leading<'a> {
    batcher: &'a SignatureBatcher,
    done: bool,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.batcher.lock().running = false;
        }
    }
}

/// A round's signatures and how to verify them.
struct Round {
    items: Vec<Pending>,
    one_by_one: bool,
}

impl SignatureBatcher {
    /// How the signatures were verified so far.
    pub(crate) fn counts(&self) -> SignatureCounts {
        SignatureCounts {
            signatures: self.counts.signatures.load(Ordering::Relaxed),
            rounds: self.counts.rounds.load(Ordering::Relaxed),
            failed_batches: self.counts.failed_batches.load(Ordering::Relaxed),
        }
    }

    /// Whether `signature` by `key` (32 bytes) over `message` verifies as
    /// `verify_strict` would have it (see the module doc for the one
    /// difference a key's holder can provoke). Malformed keys and
    /// signatures, and keys of small order, are refused at once.
    pub(crate) async fn verify(
        self: &Arc<Self>,
        key: &[u8],
        message: Vec<u8>,
        signature: &[u8],
    ) -> bool {
        let Ok(key) = VerifyingKey::try_from(key) else {
            return false;
        };
        let Ok(signature) = Signature::from_slice(signature) else {
            return false;
        };
        if key.is_weak() {
            return false;
        }
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut q = self.lock();
            q.waiting.push(Pending {
                key,
                signature,
                message,
                reply,
            });
            !std::mem::replace(&mut q.running, true)
        };
        if lead {
            // A task of its own: a request's future may be dropped at any
            // await (its connection closed), and the rounds must go on.
            tokio::spawn(self.clone().lead());
        }
        answer.await.unwrap_or(false)
    }

    /// Verify rounds until nothing waits. Before each round it yields, so
    /// that the tasks ready on this worker queue their signatures first.
    async fn lead(self: Arc<Self>) {
        let mut leading = Leading {
            batcher: &self,
            done: false,
        };
        loop {
            tokio::task::yield_now().await;
            match self.take() {
                Some(round) => self.check(round),
                None => {
                    leading.done = true;
                    return;
                }
            }
        }
    }

    /// The next round, or `None` (and nobody verifying) if nothing waits.
    fn take(&self) -> Option<Round> {
        let mut q = self.lock();
        if q.waiting.is_empty() {
            q.running = false;
            return None;
        }
        let n = q.waiting.len().min(MAX_ROUND);
        Some(Round {
            items: q.waiting.drain(..n).collect(),
            one_by_one: q.one_by_one,
        })
    }

    /// Verify a round and answer each of its requests.
    fn check(&self, round: Round) {
        let batched = !round.one_by_one && round.items.len() > 1;
        let all_valid = batched && {
            let messages: Vec<&[u8]> = round.items.iter().map(|p| p.message.as_slice()).collect();
            let signatures: Vec<Signature> = round.items.iter().map(|p| p.signature).collect();
            let keys: Vec<VerifyingKey> = round.items.iter().map(|p| p.key).collect();
            ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
        };
        let results: Vec<bool> = if all_valid {
            vec![true; round.items.len()]
        } else {
            round
                .items
                .iter()
                .map(|p| p.key.verify_strict(&p.message, &p.signature).is_ok())
                .collect()
        };
        let passed_whole = results.iter().all(|ok| *ok);
        let counts = &self.counts;
        counts
            .signatures
            .fetch_add(round.items.len() as u64, Ordering::Relaxed);
        counts.rounds.fetch_add(1, Ordering::Relaxed);
        if batched && !all_valid {
            counts.failed_batches.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                signatures = round.items.len(),
                "a batch of signatures failed; verifying one by one until a round passes"
            );
        }
        {
            let mut q = self.lock();
            if batched && !all_valid {
                q.one_by_one = true;
            } else if round.one_by_one && passed_whole {
                q.one_by_one = false;
            }
        }
        for (p, ok) in round.items.into_iter().zip(results) {
            // The request may have gone (its connection closed).
            let _ = p.reply.send(ok);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the next round verifies one by one (tests).
    #[cfg(test)]
    fn one_by_one(&self) -> bool {
        self.lock().one_by_one
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signer(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// `n` signatures by different keys over different messages.
    fn signed(n: usize) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let k = signer(i as u8 + 1);
                let message = format!("request {i}").into_bytes();
                let signature = k.sign(&message).to_bytes().to_vec();
                (k.verifying_key().to_bytes().to_vec(), message, signature)
            })
            .collect()
    }

    async fn verify_all(
        b: &Arc<SignatureBatcher>,
        items: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    ) -> Vec<bool> {
        let tasks: Vec<_> = items
            .into_iter()
            .map(|(key, message, signature)| {
                let b = b.clone();
                tokio::spawn(async move { b.verify(&key, message, &signature).await })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        results
    }

    #[tokio::test]
    async fn a_lone_signature_verifies_and_a_wrong_one_fails() {
        let b = Arc::new(SignatureBatcher::default());
        let (key, message, signature) = signed(1).remove(0);
        assert!(b.verify(&key, message.clone(), &signature).await);
        assert!(!b.verify(&key, b"other".to_vec(), &signature).await);
        assert!(!b.verify(&key[..31], message.clone(), &signature).await);
        assert!(!b.verify(&key, message, &signature[..63]).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_signatures_each_get_their_own_answer() {
        let b = Arc::new(SignatureBatcher::default());
        let mut items = signed(200);
        // Every seventh is spoiled: its own request fails, the others pass.
        for (i, item) in items.iter_mut().enumerate() {
            if i % 7 == 3 {
                item.1.push(b'!');
            }
        }
        let results = verify_all(&b, items).await;
        for (i, ok) in results.iter().enumerate() {
            assert_eq!(*ok, i % 7 != 3, "signature {i}");
        }
        // All valid again: the rounds go back to batches.
        let results = verify_all(&b, signed(100)).await;
        assert!(results.iter().all(|ok| *ok));
        assert!(!b.one_by_one());
    }

    /// On one thread every task queues its signature before the round runs:
    /// the first round is one batch of `MAX_ROUND`, which a spoiled
    /// signature fails.
    #[tokio::test]
    async fn a_spoiled_batch_is_verified_again_one_by_one() {
        let b = Arc::new(SignatureBatcher::default());
        let mut items = signed(MAX_ROUND);
        items[MAX_ROUND / 2].2[0] ^= 1;
        let results = verify_all(&b, items).await;
        for (i, ok) in results.iter().enumerate() {
            assert_eq!(*ok, i != MAX_ROUND / 2, "signature {i}");
        }
        assert!(b.one_by_one());
        let counts = b.counts();
        assert_eq!((counts.signatures, counts.rounds), (MAX_ROUND as u64, 1));
        assert_eq!(counts.failed_batches, 1);
        let results = verify_all(&b, signed(3)).await;
        assert!(results.iter().all(|ok| *ok));
        assert!(!b.one_by_one());
    }

    #[test]
    fn a_failed_batch_verifies_one_by_one_until_a_round_passes_whole() {
        let b = SignatureBatcher::default();
        let pending = |(key, message, signature): (Vec<u8>, Vec<u8>, Vec<u8>)| {
            let (reply, answer) = oneshot::channel();
            let p = Pending {
                key: VerifyingKey::try_from(key.as_slice()).unwrap(),
                signature: Signature::from_slice(&signature).unwrap(),
                message,
                reply,
            };
            (p, answer)
        };
        let mut items = signed(4);
        items[2].1.push(b'!');
        let (round, mut answers): (Vec<_>, Vec<_>) = items.into_iter().map(pending).unzip();
        b.check(Round {
            items: round,
            one_by_one: false,
        });
        let got: Vec<bool> = answers.iter_mut().map(|a| a.try_recv().unwrap()).collect();
        assert_eq!(got, [true, true, false, true]);
        assert!(b.one_by_one());
        let (round, mut answers): (Vec<_>, Vec<_>) = signed(3).into_iter().map(pending).unzip();
        b.check(Round {
            items: round,
            one_by_one: true,
        });
        assert!(answers.iter_mut().all(|a| a.try_recv().unwrap()));
        assert!(!b.one_by_one());
    }

    /// A leading task that ends without finding the queue empty (here: its
    /// hold dropped as a panic or the runtime's shutdown would drop it)
    /// leaves the lead to whoever queues next, who verifies what waited.
    #[tokio::test]
    async fn signatures_left_by_a_lead_that_ended_are_verified_by_the_next() {
        let b = Arc::new(SignatureBatcher::default());
        let mut items = signed(2);
        let (key, message, signature) = items.remove(0);
        let (reply, mut answer) = oneshot::channel();
        {
            let mut q = b.lock();
            q.waiting.push(Pending {
                key: VerifyingKey::try_from(key.as_slice()).unwrap(),
                signature: Signature::from_slice(&signature).unwrap(),
                message,
                reply,
            });
            q.running = true;
        }
        drop(Leading {
            batcher: &b,
            done: false,
        });
        let (key, message, signature) = items.remove(0);
        assert!(b.verify(&key, message, &signature).await);
        assert!(answer.try_recv().unwrap());
    }

    #[tokio::test]
    async fn a_key_of_small_order_is_refused() {
        let b = Arc::new(SignatureBatcher::default());
        // The identity point: anyone can make signatures that verify
        // against it in a cofactorless batch with some probability.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let signature = [0u8; 64];
        assert!(!b.verify(&identity, b"x".to_vec(), &signature).await);
    }
}
