//! Operator commands on a sled data directory: `check` (every record
//! decodes, every group's `PublicGroup` loads at its recorded epoch, every
//! creator's group count matches its groups, every queue is gap-free), `stats` (counts) and `backup` (a copy into a new
//! directory). They run on an opened [`Layout`], either of a stopped server
//! or inside the running one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use mls_ds_storage::codec::decode_record;

use super::layout::{Layout, Tree};
use super::queue_startup::{self, Serving};
use super::receipts::Receipts;
use super::rosters;
use crate::backend::error::StoreError;
use crate::backend::group_check;
use crate::backend::records::{
    ClientRecord, ClientUsage, CommitRecord, GroupRecord, GroupState, InviteRecord,
    KeyPackageRecord,
};
use crate::backend::AdminReport;

/// Count the records of `tree`, noting each that does not decode as `T`.
fn decode_all<T: bincode::Decode<()>>(
    layout: &Layout,
    tree: Tree,
    what: &str,
    problems: &mut Vec<String>,
) -> Result<usize, StoreError> {
    let rows = layout.storage.scan_raw(tree.handle, b"")?;
    for (k, v) in &rows {
        if let Err(e) = decode_record::<T>(tree.name, k, v) {
            problems.push(format!("{what}: {e}"));
        }
    }
    Ok(rows.len())
}

/// Problems of one group: its state must exist, decode, and agree with
/// the group record (`group_check`).
fn check_group(
    layout: &Layout,
    key: &[u8],
    record: &GroupRecord,
) -> Result<Vec<String>, StoreError> {
    let t = layout.trees.group_states;
    let state = match layout.storage.get_raw(t.handle, key)? {
        None => None,
        Some(raw) => match decode_record::<GroupState>(t.name, key, &raw) {
            Ok(s) => Some(s),
            Err(e) => return Ok(vec![format!("group {}: {e}", hex::encode(key))]),
        },
    };
    Ok(group_check::problems(key, record, state))
}

/// `mls-ds check`, on a stopped server's data directory or (`Running`)
/// inside the server.
pub(crate) fn check(layout: &Layout, serving: Serving) -> Result<AdminReport, StoreError> {
    let t = &layout.trees;
    let mut problems = Vec::new();
    let clients = decode_all::<ClientRecord>(layout, t.clients, "client record", &mut problems)?;
    let key_packages = decode_all::<KeyPackageRecord>(
        layout,
        t.key_packages,
        "key package record",
        &mut problems,
    )?;
    decode_all::<CommitRecord>(layout, t.commits, "commit record", &mut problems)?;
    decode_all::<InviteRecord>(layout, t.invites, "invitation record", &mut problems)?;
    let groups = layout.storage.scan_raw(t.groups.handle, b"")?;
    let mut created: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    for (k, v) in &groups {
        match decode_record::<GroupRecord>(t.groups.name, k, v) {
            Err(e) => problems.push(format!("group {}: {e}", hex::encode(k))),
            Ok(record) => {
                *created.entry(record.creator.clone()).or_default() += 1;
                problems.extend(check_group(layout, k, &record)?);
            }
        }
    }
    // The group quota's counts: one per existing group, by its creator.
    for (k, v) in layout.storage.scan_raw(t.usage.handle, b"")? {
        match decode_record::<ClientUsage>(t.usage.name, &k, &v) {
            Err(e) => problems.push(format!("usage record: {e}")),
            Ok(usage) => {
                let actual = created.remove(&k).unwrap_or(0);
                if usage.groups_created != actual {
                    problems.push(format!(
                        "client {} is counted as the creator of {} groups, but {actual} exist",
                        String::from_utf8_lossy(&k),
                        usage.groups_created
                    ));
                }
            }
        }
    }
    for (creator, n) in created {
        problems.push(format!(
            "client {} created {n} existing groups, but has no usage record",
            String::from_utf8_lossy(&creator)
        ));
    }
    let queues = queue_startup::verify(layout, serving);
    problems.extend(queues.problems);
    let receipts = match Receipts::open(layout) {
        Ok(receipts) => {
            problems.extend(receipts.problems()?);
            receipts.counts().total()
        }
        Err(e) => {
            problems.push(format!("send receipts: {e}"));
            0
        }
    };
    let checked = format!(
        "checked {clients} clients, {key_packages} key packages, {} groups, {} queue entries, {} stored messages, {receipts} send receipts\n",
        groups.len(),
        queues.entries,
        queues.messages
    );
    Ok(AdminReport::of_check(checked, &problems))
}

/// `mls-ds stats`.
pub(crate) fn stats(layout: &Layout) -> Result<AdminReport, StoreError> {
    let t = &layout.trees;
    let count = |tree: Tree| -> Result<usize, StoreError> {
        Ok(layout.storage.scan_raw(tree.handle, b"")?.len())
    };
    let queues = queue_startup::verify(layout, Serving::Running);
    let mut text = String::new();
    let _ = writeln!(text, "clients            {}", count(t.clients)?);
    let _ = writeln!(text, "key packages       {}", count(t.key_packages)?);
    let _ = writeln!(text, "groups             {}", count(t.groups)?);
    let _ = writeln!(text, "accepted commits   {}", count(t.commits)?);
    let _ = writeln!(text, "queue entries      {}", queues.entries);
    let _ = writeln!(text, "stored messages    {}", queues.messages);
    let receipts = Receipts::open(layout)?.counts();
    let _ = writeln!(
        text,
        "send receipts      {} ({} fresh, {} in {} runs whose filters take {} bytes of memory)",
        receipts.total(),
        receipts.fresh,
        receipts.frozen,
        receipts.runs,
        receipts.run_memory
    );
    let rosters = rosters::stored(layout)?;
    let _ = writeln!(
        text,
        "rosters            {} ({} members, {} bytes)",
        rosters.rosters, rosters.members, rosters.bytes
    );
    let _ = writeln!(
        text,
        "live records       {} bytes",
        layout.store.live_bytes()?
    );
    let _ = writeln!(
        text,
        "size on disk       {} bytes",
        layout.store.size_on_disk()?
    );
    Ok(AdminReport {
        text,
        failed: !queues.problems.is_empty(),
    })
}

/// `mls-ds compact`: copy the live records into a database that replaces
/// this one when the data directory is next opened. The caller writes
/// nothing more through `layout` (the writer thread retires; offline, the
/// caller closes it and opens the directory again).
pub(crate) fn compact(layout: &Layout) -> Result<AdminReport, StoreError> {
    let before = layout.store.size_on_disk()?;
    let staged = layout.store.stage_compaction()?;
    Ok(AdminReport {
        text: format!(
            "compacted {} records of {} trees: {} bytes on disk before, {} after\n",
            staged.copied.entries, staged.copied.trees, before, staged.bytes
        ),
        failed: false,
    })
}

/// `mls-ds backup --out target`: copy every tree into a new database at
/// `target`. The caller makes sure nothing is written meanwhile (a stopped
/// server, or the running server's writer thread, which runs it as a job).
pub(crate) fn backup(layout: &Layout, target: &Path) -> Result<AdminReport, StoreError> {
    let exported = layout.store.export_to(target)?;
    Ok(AdminReport {
        text: format!(
            "backup of {} trees written to {}\n",
            exported.trees,
            target.display()
        ),
        failed: false,
    })
}
