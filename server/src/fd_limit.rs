//! The open-file limit: raised to the hard maximum at startup, and the
//! connection limit fitted under it, so that connections can never take the
//! descriptors the storage, the listeners and the admin socket need.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept for everything but client connections: sled's files,
/// the listeners, the admin socket and its clients, push and metrics
/// connections, the log.
const RESERVED: u64 = 256;

/// `max_connections`, lowered if the open-file limit (raised to its hard
/// maximum first) leaves less room than that.
pub(crate) fn fit_connections(max_connections: usize) -> usize {
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit = raised,
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    let Some(soft) = limit.current else {
        return max_connections;
    };
    let room = usize::try_from(soft.saturating_sub(RESERVED))
        .unwrap_or(usize::MAX)
        .max(1);
    if max_connections > room {
        tracing::warn!(
            open_file_limit = soft,
            max_connections = room,
            "--max-connections lowered to fit the open-file limit (raise it, e.g. LimitNOFILE= in the systemd unit)"
        );
        return room;
    }
    max_connections
}
