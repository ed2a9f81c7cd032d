//! Reading queue pages: the entries come from the queue index, their
//! bodies from the index's cache or, beyond it, from the delivery batches
//! (each read once per page).

use std::sync::Arc;

use mls_ds_protocol::ClientId;

use super::batch;
use super::layout::{self, Layout};
use super::queue_index::{QueueIndex, Rows};
use crate::backend::error::StoreError;
use crate::backend::page::{entry_size, Page, PageEntry};

/// The visible entries of `client`'s queue after `after` (see
/// `Backend::page`).
pub(crate) fn page(
    layout: &Layout,
    index: &QueueIndex,
    client: &ClientId,
    after: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Page, StoreError> {
    if index.is_closed() {
        return Err(StoreError::Unavailable(
            "storage was closed to be reopened; retry shortly".into(),
        ));
    }
    let Rows { rows, head, acked } = index.lock().rows(client, after, limit);
    let mut entries = Vec::with_capacity(rows.len());
    let mut bytes = 0usize;
    // Rows of one batch follow each other: it is read once for them.
    let mut last_batch: Option<(u64, Option<Vec<u8>>)> = None;
    for row in rows {
        let stored = match row.cached {
            Some(m) => m,
            None => match read_body(layout, &mut last_batch, row.message_id)? {
                Some(m) => Arc::new(m),
                // Acknowledged (or dropped by retention) while this page was
                // read: the page ends here.
                None if index.lock().client(client).acked >= row.seq => break,
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "queue entry {} of {client} points to missing message {}",
                        row.seq, row.message_id
                    )))
                }
            },
        };
        let kind = stored
            .entry_kind()
            .map_err(|e| StoreError::Corrupt(format!("message {}: {e}", row.message_id)))?;
        bytes += entry_size(&stored);
        entries.push(PageEntry {
            seq: row.seq,
            kind,
            stored,
        });
        // Always at least one entry, so any queue drains.
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(Page {
        entries,
        head,
        acked,
    })
}

fn read_body(
    layout: &Layout,
    last_batch: &mut Option<(u64, Option<Vec<u8>>)>,
    id: u64,
) -> Result<Option<crate::backend::records::StoredMessage>, StoreError> {
    let tree = layout.trees.delivery;
    let number = layout::batch_of(id);
    if last_batch.as_ref().is_none_or(|(n, _)| *n != number) {
        let value = layout
            .storage
            .get_raw(tree.handle, &layout::batch_key(number))?;
        *last_batch = Some((number, value));
    }
    match last_batch {
        Some((_, Some(value))) => batch::find(tree, number, value, layout::slot_of(id)),
        _ => Ok(None),
    }
}
