//! The inbox: events wait in a durable record until the application takes
//! them, so none is lost or repeated across crashes.

use std::collections::BTreeMap;

use mls_ds_storage::codec::decode_record;
use mls_ds_storage::SledStorage;

use super::{Client, RECORDS};
use crate::error::Result;
use crate::records::{self, Event};

impl Client {
    /// Events waiting in the inbox, in DS order.
    pub fn events(&self) -> Result<Vec<Event>> {
        Ok(self.inbox()?.into_values().collect())
    }

    /// The inbox by key (keys sort in DS order).
    pub(super) fn inbox(&self) -> Result<BTreeMap<Vec<u8>, Event>> {
        let mut out = BTreeMap::new();
        for (k, v) in self
            .storage()
            .scan_raw(self.records, records::INBOX_PREFIX)?
        {
            let ev: Event = decode_record(RECORDS, &k, &v)?;
            out.insert(k, ev);
        }
        Ok(out)
    }

    /// Remove events up to `seq` from the inbox (the application has them).
    pub fn ack_events(&self, up_to: u64) -> Result<()> {
        let tx = self.storage().begin();
        for key in self.inbox()?.into_keys() {
            if records::inbox_seq(&key).is_some_and(|seq| seq <= up_to) {
                tx.remove_raw(self.records, &key)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Hand each inbox event to `f` inside a transaction that also removes it
    /// from the inbox: if `f` writes its effects through the given storage
    /// (e.g. `put_raw` into a record tree of [`Client::store`]), every event
    /// is applied exactly once, across crashes.
    pub fn process_events<F>(&self, mut f: F) -> Result<usize>
    where
        F: FnMut(&SledStorage, &Event) -> Result<()>,
    {
        let events = self.inbox()?;
        for (key, ev) in &events {
            let tx = self.storage().begin();
            f(&tx, ev)?;
            tx.remove_raw(self.records, key)?;
            tx.commit()?;
        }
        Ok(events.len())
    }

    /// Sync, then take every inbox event (removing it). Convenient, but an
    /// event taken just before a crash is not shown again: use
    /// [`Client::process_events`] for exactly-once handling.
    pub async fn receive(&self, wait_ms: u64) -> Result<Vec<Event>> {
        self.sync_wait(wait_ms).await?;
        let events = self.events()?;
        if let Some(last) = events.last() {
            self.ack_events(last.seq())?;
        }
        Ok(events)
    }
}
