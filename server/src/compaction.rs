//! When the server compacts its database on its own: at every
//! [`CHECK_EVERY_PASSES`]th maintenance pass, if the file has grown to
//! several times the live records (sled 0.34 keeps
//! the space of deleted records, e.g. of a drained backlog, until the last
//! segments of its file empty out). The compaction itself is the backend's
//! (`mls-ds compact`); this module only decides.

/// Maintenance passes (10 minutes apart) between two looks at the
/// database: a look reads every record, so not more than once an hour, and
/// not at startup.
pub(crate) const CHECK_EVERY_PASSES: u64 = 6;

/// The operator's compaction settings (`--compact-factor`,
/// `--compact-min-mb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CompactionPolicy {
    /// Compact when disk exceeds this many times the live bytes; 0: never.
    pub(crate) factor: u64,
    /// Least space a compaction must give back to be worth it.
    pub(crate) min_bytes: u64,
}

impl CompactionPolicy {
    /// Whether a database of `disk` bytes can give back enough to be worth
    /// reading every record to find out (the live bytes are at least 0).
    pub(crate) fn worth_measuring(&self, disk: u64) -> bool {
        self.factor > 0 && disk >= self.min_bytes
    }

    /// Whether a database of `disk` bytes holding `live` bytes of records is
    /// due for compaction.
    pub(crate) fn due(&self, disk: u64, live: u64) -> bool {
        self.factor > 0
            && disk > live.saturating_mul(self.factor)
            && disk.saturating_sub(live) >= self.min_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn compaction_is_due_only_when_much_space_is_dead() {
        let p = CompactionPolicy {
            factor: 3,
            min_bytes: 256 * MIB,
        };
        // A drained backlog: 670 MiB on disk for 1 MiB live.
        assert!(p.due(670 * MIB, MIB));
        // Small databases are left alone, whatever the ratio.
        assert!(!p.due(200 * MIB, MIB));
        // A big live data set within the factor is left alone.
        assert!(!p.due(2900 * MIB, 1000 * MIB));
        assert!(p.due(3100 * MIB, 1000 * MIB));
        assert!(p.worth_measuring(670 * MIB));
        assert!(!p.worth_measuring(200 * MIB));
        let off = CompactionPolicy { factor: 0, ..p };
        assert!(!off.due(670 * MIB, MIB));
        assert!(!off.worth_measuring(670 * MIB));
    }
}
