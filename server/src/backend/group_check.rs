//! What `check` asks of every stored group, whatever the backend: its state
//! exists, loads as a `PublicGroup`, is at the record's epoch, and has the
//! record's roster.

use openmls::prelude::{GroupId as MlsGroupId, PublicGroup};

use super::public_group::PublicGroupStore;
use super::records::{GroupRecord, GroupState};

/// The problems of the group `key` with its `record` and stored `state`.
pub(crate) fn problems(key: &[u8], record: &GroupRecord, state: Option<GroupState>) -> Vec<String> {
    let gid = hex::encode(key);
    let Some(state) = state else {
        return vec![format!("group {gid}: no GroupInfo or PublicGroup stored")];
    };
    let mls_id = MlsGroupId::from_slice(key);
    let loaded = PublicGroupStore::new(&mls_id, state.public_group)
        .map_err(|e| e.to_string())
        .and_then(|store| PublicGroup::load(&store, &mls_id).map_err(|e| e.to_string()));
    match loaded {
        Ok(Some(pg)) => {
            let mut problems = Vec::new();
            let epoch = pg.group_context().epoch().as_u64();
            if epoch != record.epoch {
                problems.push(format!(
                    "group {gid}: record says epoch {}, PublicGroup is at {epoch}",
                    record.epoch
                ));
            }
            // Distinct ids: a recovered client's stale leaf shares its id.
            let ids: std::collections::HashSet<Vec<u8>> = pg
                .members()
                .filter_map(|m| {
                    openmls::prelude::BasicCredential::try_from(m.credential)
                        .ok()
                        .map(|c| c.identity().to_vec())
                })
                .collect();
            if ids.len() != record.members.len() {
                problems.push(format!("group {gid}: roster size differs from PublicGroup"));
            }
            problems
        }
        Ok(None) => vec![format!("group {gid}: PublicGroup state missing")],
        Err(e) => vec![format!("group {gid}: PublicGroup does not load: {e}")],
    }
}
