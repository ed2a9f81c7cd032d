//! Exactly-once application messages: every message is encrypted into a
//! durable send outbox, in the same write as the ratchet state it used up,
//! with a send id; the outbox is delivered in order, and an entry leaves it
//! only once the DS accepted it. The DS answers a retry with the same send
//! id (after a crash, or a lost answer) with the first answer instead of a
//! second delivery, so a message queued once reaches every recipient once.
//!
//! A message whose epoch the DS no longer takes (409) is encrypted again
//! for the current epoch under the same send id (the DS never accepted that
//! id). One the DS refuses for good (the sender left the group, the group is
//! gone, the send id is older than the DS's deduplication window) stays in
//! the outbox marked failed, for the application to see in
//! [`Client::pending_sends`] and drop with [`Client::discard_send`].

use std::time::{SystemTime, UNIX_EPOCH};

use mls_ds_protocol::groups::SendId;
use mls_ds_storage::codec::decode_record;
use mls_ds_storage::SledStorage;
use rand::RngCore;

use super::{group_mut, wire, Client, RECORDS};
use crate::error::{mls, ClientError, Result};
use crate::records::{self, GroupLeft, PendingSend};

/// A message in the send outbox, as the application sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedSend {
    /// Its send id.
    pub send_id: SendId,
    /// The group it is for.
    pub group_id: Vec<u8>,
    /// The message.
    pub data: Vec<u8>,
    /// Why the DS refused it for good, if it did; `None` while it waits to
    /// be delivered.
    pub failed: Option<String>,
}

fn new_send_id() -> SendId {
    let created_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    SendId {
        created_ms,
        nonce: rand::rngs::OsRng.next_u64(),
    }
}

/// What one pass over the outbox did.
#[derive(Default)]
struct Flushed {
    delivered: usize,
    /// Messages refused for good (now marked failed).
    refused: Vec<Refused>,
}

/// A message the DS refused for good, with its answer.
struct Refused {
    send_id: SendId,
    error: ClientError,
}

/// What the DS said to one attempt.
enum Outcome {
    Accepted,
    /// Encrypt again for the group's current epoch and retry.
    Stale,
    /// Refused for good.
    Refused(ClientError),
}

impl Client {
    /// Encrypt `data` for the group and deliver it exactly once: it is in
    /// the durable outbox when this returns, whatever the outcome. `Ok`
    /// means the DS accepted it (with any messages queued before it, which
    /// are delivered first, in order). On a network error it stays queued
    /// and goes out with the next [`Client::sync`] or
    /// [`Client::flush_sends`]; on a refusal for good, the error is
    /// returned and the message stays in the outbox marked failed.
    pub async fn send(&self, group_id: &[u8], data: &[u8]) -> Result<SendId> {
        let id = self.queue_message(group_id, data).await?;
        let flushed = self.flush().await?;
        if let Some(r) = flushed.refused.into_iter().find(|r| r.send_id == id) {
            return Err(r.error);
        }
        Ok(id)
    }

    /// Encrypt `data` for the group into the outbox (one durable write with
    /// the ratchet state it uses up) without sending it: from here on it is
    /// delivered exactly once, by [`Client::flush_sends`] or the next
    /// [`Client::sync`].
    pub async fn queue_message(&self, group_id: &[u8], data: &[u8]) -> Result<SendId> {
        let mut inner = self.inner.lock().await;
        let g = group_mut(&mut inner, group_id)?;
        let tx = self.provider.begin();
        let message = wire(&g.create_message(&*tx, &self.signer, data).map_err(mls)?)?;
        let send_id = new_send_id();
        let number = self.next_send_number()?;
        tx.storage().put_raw(
            self.records,
            records::SEND_COUNTER,
            &(number + 1).to_be_bytes(),
        )?;
        tx.storage().put_record(
            self.records,
            &records::send_key(number),
            &PendingSend {
                group_id: group_id.to_vec(),
                created_ms: send_id.created_ms,
                nonce: send_id.nonce,
                data: data.to_vec(),
                message,
                failed: None,
            },
        )?;
        tx.commit()?;
        Ok(send_id)
    }

    /// Deliver the outbox, in the order the messages were queued. Returns
    /// how many the DS accepted. A network error stops it (the rest stays
    /// queued, in order); refusals for good mark their message failed and
    /// go on with the next.
    pub async fn flush_sends(&self) -> Result<usize> {
        Ok(self.flush().await?.delivered)
    }

    async fn flush(&self) -> Result<Flushed> {
        let _one_at_a_time = self.sending.lock().await;
        let mut flushed = Flushed::default();
        for (number, _) in self.queued()? {
            let mut attempts = 0u32;
            loop {
                // Re-read: an earlier pass may have encrypted it anew.
                let Some(pending) = self.pending_send(number)? else {
                    break;
                };
                if pending.failed.is_some() {
                    break;
                }
                match self.attempt(&pending).await? {
                    Outcome::Accepted => {
                        self.storage()
                            .remove_raw(self.records, &records::send_key(number))?;
                        flushed.delivered += 1;
                        break;
                    }
                    Outcome::Stale if attempts < self.config.max_commit_retries => {
                        attempts += 1;
                        self.sync_queue(0).await?;
                        self.encrypt_again(number, &pending).await?;
                    }
                    Outcome::Stale => {
                        return Err(ClientError::CommitRetriesExhausted(attempts));
                    }
                    Outcome::Refused(e) => {
                        tracing::warn!(client = %self.id, error = %e, "message refused by the DS");
                        let id = pending.send_id();
                        self.mark_failed(number, pending, e.to_string())?;
                        flushed.refused.push(Refused {
                            send_id: id,
                            error: e,
                        });
                        break;
                    }
                }
            }
        }
        Ok(flushed)
    }

    /// The outbox: messages waiting to be delivered and those refused.
    pub fn pending_sends(&self) -> Result<Vec<QueuedSend>> {
        Ok(self
            .queued()?
            .into_iter()
            .map(|(_, p)| queued_send(p))
            .collect())
    }

    /// Drop a message from the outbox (e.g. one marked failed). Returns
    /// whether it was there.
    pub async fn discard_send(&self, send_id: SendId) -> Result<bool> {
        let _one_at_a_time = self.sending.lock().await;
        for (number, p) in self.queued()? {
            if p.send_id() == send_id {
                self.storage()
                    .remove_raw(self.records, &records::send_key(number))?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One attempt at delivering `pending`.
    async fn attempt(&self, pending: &PendingSend) -> Result<Outcome> {
        let result = self
            .api
            .send_message_once(
                &pending.group_id,
                pending.message.clone(),
                pending.send_id(),
            )
            .await;
        Ok(match result {
            Ok(_) => Outcome::Accepted,
            Err(e) if e.is_wrong_epoch() => Outcome::Stale,
            Err(e) if e.is_network() || e.status().is_some_and(|s| s >= 500 || s == 429) => {
                return Err(e)
            }
            Err(e) => Outcome::Refused(e),
        })
    }

    /// Encrypt the message of outbox entry `number` for the group's current
    /// epoch, under the same send id, and with it every later entry for the
    /// group, in one write with the ratchet state.
    ///
    /// The later ones too: a message queued after this one may already be
    /// encrypted for the current epoch, at an earlier generation than this
    /// one would get now. Delivered in outbox order, the members would then
    /// receive that sender's generations out of order, and OpenMLS refuses a
    /// generation more than its out-of-order tolerance (5) behind the newest
    /// one it has seen. None of the later entries was sent yet: the outbox
    /// goes out in order, and this one was never accepted.
    async fn encrypt_again(&self, number: u64, pending: &PendingSend) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let g = match group_mut(&mut inner, &pending.group_id) {
            Ok(g) => g,
            Err(e) => {
                drop(inner);
                return self.mark_failed(number, pending.clone(), e.to_string());
            }
        };
        let tx = self.provider.begin();
        for (n, p) in self.queued()? {
            if n < number || p.group_id != pending.group_id || p.failed.is_some() {
                continue;
            }
            let message = wire(&g.create_message(&*tx, &self.signer, &p.data).map_err(mls)?)?;
            tx.storage().put_record(
                self.records,
                &records::send_key(n),
                &PendingSend { message, ..p },
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Mark every message queued so far for `group_id` failed, through
    /// `tx` (a [`GroupLeft`] mark; the messages themselves are not
    /// rewritten).
    pub(super) fn fail_queued_sends(
        &self,
        tx: &SledStorage,
        group_id: &[u8],
        why: &str,
    ) -> Result<()> {
        tx.put_record(
            self.records,
            &records::left_key(group_id),
            &GroupLeft {
                below: self.next_send_number()?,
                why: why.to_owned(),
            },
        )?;
        Ok(())
    }

    fn mark_failed(&self, number: u64, pending: PendingSend, why: String) -> Result<()> {
        self.storage().put_record(
            self.records,
            &records::send_key(number),
            &PendingSend {
                failed: Some(why),
                ..pending
            },
        )?;
        Ok(())
    }

    /// Outbox entry `number`, failed if its group was left since.
    fn pending_send(&self, number: u64) -> Result<Option<PendingSend>> {
        let Some(mut pending) = self
            .storage()
            .get_record::<PendingSend>(self.records, &records::send_key(number))?
        else {
            return Ok(None);
        };
        let left: Option<GroupLeft> = self
            .storage()
            .get_record(self.records, &records::left_key(&pending.group_id))?;
        fail_if_left(&mut pending, number, left.as_ref());
        Ok(Some(pending))
    }

    /// The outbox in queue order, with each entry's number; a message for
    /// a group this client left since it was queued shows as failed.
    fn queued(&self) -> Result<Vec<(u64, PendingSend)>> {
        let mut left: Vec<(Vec<u8>, GroupLeft)> = Vec::new();
        for (k, v) in self
            .storage()
            .scan_raw(self.records, records::LEFT_PREFIX)?
        {
            let gid = k[records::LEFT_PREFIX.len()..].to_vec();
            left.push((gid, decode_record(RECORDS, &k, &v)?));
        }
        let mut out = Vec::new();
        for (k, v) in self
            .storage()
            .scan_raw(self.records, records::SEND_PREFIX)?
        {
            let number = records::send_number(&k)
                .ok_or_else(|| ClientError::BadResponse(format!("bad outbox key {k:?}")))?;
            let mut pending: PendingSend = decode_record(RECORDS, &k, &v)?;
            let mark = left
                .iter()
                .find(|(gid, _)| *gid == pending.group_id)
                .map(|(_, mark)| mark);
            fail_if_left(&mut pending, number, mark);
            out.push((number, pending));
        }
        Ok(out)
    }

    /// The next outbox number: numbers only grow (see [`GroupLeft`]).
    fn next_send_number(&self) -> Result<u64> {
        let Some(v) = self
            .storage()
            .get_raw(self.records, records::SEND_COUNTER)?
        else {
            return Ok(0);
        };
        // A damaged counter must not restart the numbers over queued messages.
        let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| {
            ClientError::Storage(mls_ds_storage::StorageError::Corrupt {
                tree: RECORDS.into(),
                key_hex: hex::encode(records::SEND_COUNTER),
                reason: format!("an outbox counter of {} bytes", v.len()),
            })
        })?;
        Ok(u64::from_be_bytes(bytes))
    }
}

/// Outbox entry `number` is failed if the group was left after it was queued.
fn fail_if_left(pending: &mut PendingSend, number: u64, left: Option<&GroupLeft>) {
    if let Some(mark) = left.filter(|m| pending.failed.is_none() && number < m.below) {
        pending.failed = Some(mark.why.clone());
    }
}

fn queued_send(p: PendingSend) -> QueuedSend {
    QueuedSend {
        send_id: p.send_id(),
        group_id: p.group_id,
        data: p.data,
        failed: p.failed,
    }
}
