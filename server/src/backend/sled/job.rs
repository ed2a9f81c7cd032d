//! The jobs the group commit's writer thread runs (write sets, queue
//! acknowledgements and expiry, forgetting old sends, settling, backups,
//! compaction, the checkpoint at a stop), what it makes of them before the flush ([`Prepared`]), and
//! how each is answered once its writes are durable ([`Finish`]).

use std::path::PathBuf;

use mls_ds_protocol::ClientId;
use mls_ds_storage::PendingWrites;

use super::checkpoint::Written;
use crate::backend::committing::CommitReply;
use crate::backend::error::StoreError;
use crate::backend::write_set::{AckOutcome, Applied, Change, Condition, WriteSet};
use crate::backend::AdminReport;

/// A unit of work for the writer thread.
pub(crate) enum Job {
    /// A write set.
    Write {
        set: WriteSet,
        reply: CommitReply<Applied>,
    },
    /// Acknowledge a client's queue up to `up_to`.
    Ack {
        client: ClientId,
        up_to: u64,
        reply: CommitReply<AckOutcome>,
    },
    /// Drop queue entries older than `cutoff_ms`.
    Expire {
        cutoff_ms: u64,
        reply: CommitReply<usize>,
    },
    /// Forget the sends created before `cutoff_ms` (run on the writer
    /// thread, after everything before it is applied).
    ForgetSends {
        cutoff_ms: u64,
        reply: CommitReply<usize>,
    },
    /// Nothing to write: answered once everything before it is durable.
    Settle { reply: CommitReply<()> },
    /// Copy the database while nothing else is written.
    Backup {
        target: PathBuf,
        reply: CommitReply<AdminReport>,
    },
    /// Copy the live records into a database that replaces this one at the
    /// next open; nothing is written after it (the writer retires).
    Compact { reply: CommitReply<AdminReport> },
    /// Write the queue index's checkpoint of everything applied before it;
    /// nothing is written after it (the server is stopping).
    Close { reply: CommitReply<Written> },
}

impl Job {
    /// Whether the job may be prepared while a delivery batch is open,
    /// its writes going before the batch's: a plain send (a write set that
    /// changes nothing but queues) joins the batch; acknowledgements and
    /// expiry take only visible entries, whose batches were written in an
    /// earlier cycle; settling writes nothing. Any other job needs the open
    /// batch written before it.
    pub(crate) fn may_pass_open_batch(&self) -> bool {
        match self {
            Job::Write { set, .. } => set.changes.is_empty(),
            Job::Ack { .. } | Job::Expire { .. } | Job::Settle { .. } => true,
            Job::ForgetSends { .. }
            | Job::Backup { .. }
            | Job::Compact { .. }
            | Job::Close { .. } => false,
        }
    }

    /// Whether the job reads the database to decide what to write, so that
    /// everything queued before it must be applied first. `GroupPresent`
    /// reads memory only ([`Applier::deleted_groups`]): an application
    /// message, the most frequent write, stays in its batch.
    pub(crate) fn reads_first(&self) -> bool {
        match self {
            Job::Write { set, .. } => {
                set.conditions
                    .iter()
                    .any(|c| !matches!(c, Condition::GroupPresent(_) | Condition::SendNew(_)))
                    || set.changes.iter().any(|c| {
                        matches!(c, Change::DeleteClient { .. } | Change::DeleteGroup { .. })
                    })
            }
            Job::ForgetSends { .. }
            | Job::Backup { .. }
            | Job::Compact { .. }
            | Job::Close { .. } => true,
            Job::Ack { .. } | Job::Expire { .. } | Job::Settle { .. } => false,
        }
    }

    /// Answer without doing anything.
    pub(crate) fn refuse(self, e: StoreError) {
        match self {
            Job::Write { reply, .. } => reply.send(Err(e)),
            Job::Ack { reply, .. } => reply.send(Err(e)),
            Job::Expire { reply, .. } => reply.send(Err(e)),
            Job::ForgetSends { reply, .. } => reply.send(Err(e)),
            Job::Settle { reply } => reply.send(Err(e)),
            Job::Backup { reply, .. } => reply.send(Err(e)),
            Job::Compact { reply } => reply.send(Err(e)),
            Job::Close { reply } => reply.send(Err(e)),
        }
    }
}

/// A job turned into writes, waiting for them to be durable.
pub(crate) struct Prepared {
    /// In order; a set of one key is applied as a plain insert or remove.
    pub(crate) writes: Vec<PendingWrites>,
    /// Queue entries that become visible once the writes are durable.
    pub(crate) publish: Vec<(ClientId, u64)>,
    /// Whom to answer, with what.
    pub(crate) finish: Finish,
}

/// The answer a prepared job gets once its writes are durable.
pub(crate) enum Finish {
    Write(CommitReply<Applied>, Applied),
    Ack(CommitReply<AckOutcome>, AckOutcome),
    Expire(CommitReply<usize>, usize),
    Settle(CommitReply<()>),
}

impl Finish {
    /// Answer with the outcome if `result` is `Ok`, else with the error.
    pub(crate) fn answer(self, result: Result<(), StoreError>) {
        match self {
            Finish::Write(reply, applied) => reply.send(result.map(|()| applied)),
            Finish::Ack(reply, outcome) => reply.send(result.map(|()| outcome)),
            Finish::Expire(reply, n) => reply.send(result.map(|()| n)),
            Finish::Settle(reply) => reply.send(result),
        }
    }
}
