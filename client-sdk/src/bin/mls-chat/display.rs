//! What `mls-chat` prints: events as sentences (who did what), and errors
//! with what to do about them.

use mls_ds_client::{ClientError, Event};
use mls_ds_storage::StorageError;

/// Text from other members, without control characters: a message must
/// not be able to move the cursor, clear the screen or retitle the terminal.
fn clean(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

fn name(id: &[u8]) -> String {
    clean(id)
}

fn names(ids: &[Vec<u8>]) -> String {
    ids.iter().map(|i| name(i)).collect::<Vec<_>>().join(", ")
}

/// An event as a line; the group is shown unless `in_group` is the one the
/// user is chatting in. `None` for events that go to stderr.
pub(crate) fn event_line(e: &Event, in_group: Option<&[u8]>) -> String {
    let group = |gid: &[u8]| {
        if in_group == Some(gid) {
            String::new()
        } else {
            format!("[{}] ", hex::encode(gid))
        }
    };
    match e {
        Event::Message {
            group_id,
            sender,
            data,
            ..
        } => format!(
            "{}{}: {}",
            group(group_id),
            name(sender),
            clean(data)
        ),
        Event::Joined { group_id, by, .. } => {
            format!("{}joined (added by {})", group(group_id), name(by))
        }
        Event::Commit {
            group_id,
            epoch,
            committer,
            added,
            removed,
            ..
        } => format!(
            "{}{} (epoch {epoch})",
            group(group_id),
            commit_sentence(committer, added, removed)
        ),
        Event::Removed { group_id, .. } => {
            format!("{}you were removed from the group", group(group_id))
        }
        Event::GroupDeleted { group_id, .. } => format!("{}group deleted", group(group_id)),
        Event::QueueGap { seq, from } => format!(
            "messages {from}..={seq} of your queue were lost before they were read (the DS keeps a bounded queue)"
        ),
        Event::Resynced {
            group_id,
            to_epoch,
            reason,
            ..
        } => format!(
            "{}rejoined the group at epoch {to_epoch} ({}); messages in between are lost",
            group(group_id),
            clean(reason.as_bytes())
        ),
        Event::Skipped {
            group_id, reason, ..
        } => format!(
            "{}skipped a message: {}",
            group(group_id),
            clean(reason.as_bytes())
        ),
    }
}

/// "alice added bob", "carol joined", "bob rejoined", "alice updated
/// their keys", ...
fn commit_sentence(committer: &[u8], added: &[Vec<u8>], removed: &[Vec<u8>]) -> String {
    let who = name(committer);
    let joined = added.iter().any(|a| a == committer);
    if joined {
        return if removed.iter().any(|r| r == committer) {
            format!("{who} rejoined")
        } else {
            format!("{who} joined")
        };
    }
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("added {}", names(added)));
    }
    if !removed.is_empty() {
        parts.push(format!("removed {}", names(removed)));
    }
    if parts.is_empty() {
        format!("{who} updated their keys")
    } else {
        format!("{who} {}", parts.join(" and "))
    }
}

/// An error with what to do about it.
pub(crate) fn explain(e: &ClientError, data_dir: &std::path::Path) -> String {
    let hint = match e {
        ClientError::Unreachable { .. } => {
            Some("is the DS running, and is --server (MLS_CHAT_SERVER) its address?".to_owned())
        }
        ClientError::Storage(StorageError::InUse { .. }) => Some(format!(
            "another mls-chat is using {}: one process per data directory. `mls-chat chat GROUP` sends and receives in one terminal",
            data_dir.display()
        )),
        ClientError::Storage(StorageError::KeyRequired { .. }) => Some(
            "this store is encrypted: give its passphrase with --passphrase-file (MLS_CHAT_PASSPHRASE_FILE)"
                .into(),
        ),
        ClientError::Storage(StorageError::WrongKey(_)) => {
            Some("check the passphrase file; nothing was changed".into())
        }
        ClientError::Storage(StorageError::NotEncrypted { .. }) => {
            Some("this store was made without a passphrase: leave out --passphrase-file".into())
        }
        ClientError::NotInGroup { .. } => Some("`mls-chat groups` lists your groups".into()),
        ClientError::Usage(m) if m.starts_with("no client in") => Some(format!(
            "register first: mls-chat --data-dir {} register --name NAME",
            data_dir.display()
        )),
        ClientError::Server { status: 401, .. } => {
            Some("is this client registered with this DS? (`register` again is harmless)".into())
        }
        _ => None,
    };
    match hint {
        Some(h) => format!("{e}\n  {h}"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_say_who_did_what() {
        let v = |s: &str| s.as_bytes().to_vec();
        assert_eq!(
            commit_sentence(b"alice", &[v("bob")], &[]),
            "alice added bob"
        );
        assert_eq!(
            commit_sentence(b"alice", &[], &[v("bob"), v("carol")]),
            "alice removed bob, carol"
        );
        assert_eq!(
            commit_sentence(b"carol", &[v("carol")], &[]),
            "carol joined"
        );
        assert_eq!(
            commit_sentence(b"bob", &[v("bob")], &[v("bob")]),
            "bob rejoined"
        );
        assert_eq!(commit_sentence(b"bob", &[], &[]), "bob updated their keys");
        assert_eq!(clean(b"hi\x1b[2Jthere\n"), "hi\u{fffd}[2Jthere\u{fffd}");
    }
}
