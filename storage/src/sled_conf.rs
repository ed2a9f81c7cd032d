//! sled's `conf` file: sled writes it when it creates a database and never
//! syncs it, so a power cut soon after creation can leave it empty,
//! zero-filled or cut short, and sled then refuses to open the database
//! ("Read corrupted data") although nothing in it was lost. What the file
//! holds (segment size, compression, format version) follows from the one
//! configuration this crate opens sled with, so a torn one is removed before
//! opening and sled writes it anew; after opening, the file and its
//! directory are synced, so that from then on a cut cannot tear it.

use std::fs::{self, File};
use std::io;
use std::path::Path;

/// The settings sled writes, one `key: value` line each.
const KEYS: [&str; 3] = ["segment_size: ", "use_compression: ", "version: "];

/// Remove `dir/conf` if a power cut tore it (sled then writes it anew).
pub(crate) fn remove_if_torn(dir: &Path) -> io::Result<()> {
    let path = dir.join("conf");
    // No file (a new database), or no directory: sled's open says what is
    // wrong with the path, as it would without this check.
    let Ok(bytes) = fs::read(&path) else {
        return Ok(());
    };
    if is_whole(&bytes) {
        return Ok(());
    }
    tracing::warn!(
        path = %path.display(),
        "sled's configuration file is torn (a power cut after the database was created); writing it anew"
    );
    fs::remove_file(&path)
}

/// Whether `bytes` (settings lines and a 4-byte checksum) hold every
/// setting sled reads.
fn is_whole(bytes: &[u8]) -> bool {
    let Some(body) = bytes.len().checked_sub(4).map(|n| &bytes[..n]) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    KEYS.iter().all(|key| {
        text.lines()
            .any(|line| line.starts_with(key) && line.len() > key.len())
    })
}

/// Sync `dir/conf` and `dir` itself (the entries sled created in it).
pub(crate) fn sync(dir: &Path) -> io::Result<()> {
    File::open(dir.join("conf"))?.sync_all()?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_torn_conf_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        let whole =
            b"segment_size: 524288\nuse_compression: false\nversion: 0.34\n\x01\x02\x03\x04";
        std::fs::write(&conf, whole).unwrap();
        remove_if_torn(dir.path()).unwrap();
        assert_eq!(std::fs::read(&conf).unwrap(), whole);
        for torn in [
            &b""[..],
            &[0u8; 62][..],
            &whole[..30],
            b"segment_size: \n\0\0\0\0",
        ] {
            std::fs::write(&conf, torn).unwrap();
            remove_if_torn(dir.path()).unwrap();
            assert!(!conf.exists(), "{torn:?} is torn");
        }
        remove_if_torn(dir.path()).unwrap();
    }
}
