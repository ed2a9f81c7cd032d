//! Crash testing with SDK clients: retrying across server restarts, the
//! records a client keeps of what it sent and what its application received
//! (in its own store, written so that a SIGKILL at any moment leaves them
//! exact), and the loop a client runs in a child process that a test
//! SIGKILLs (`src/bin/crash-client.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use mls_ds_client::{Client, ClientConfig, ClientError, Event};
use mls_ds_storage::{RecordTree, SledStorage};
use rand::{Rng, SeedableRng};

/// Whether an error means the DS was unreachable or failing (a restart is
/// under way), as opposed to a verdict on the request.
pub fn is_transport(e: &ClientError) -> bool {
    e.is_network() || e.status().is_some_and(|s| s >= 500)
}

/// Retry an operation across server restarts (transport errors only; any
/// other error fails the test).
pub async fn retry<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    for _ in 0..200 {
        match op().await {
            Ok(v) => return v,
            Err(e) if is_transport(&e) => tokio::time::sleep(Duration::from_millis(25)).await,
            Err(e) => panic!("operation failed: {e}"),
        }
    }
    panic!("operation kept failing");
}

/// Times [`open_client`] found the store still locked, in this process.
pub static LOCK_WAITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Open a client's store, waiting (up to 2 s) while it is still locked.
/// Reopening a store in the process that just dropped it can find sled's
/// lock still held for a moment: sled 0.34 writes its log buffers on a
/// thread pool whose tasks keep the locked file open until they finish
/// (seen in about one run in ten of the combined crash test, in a child
/// reopening after the DS moved). A lock held by another live process is a
/// test bug and still fails after the wait. Each wait is reported on stderr
/// with the lock's holders from /proc/locks.
pub fn open_client(data_dir: &Path, url: &str, name: &str, config: ClientConfig) -> Client {
    for _ in 0..100 {
        match Client::open(data_dir, url, name, config.clone()) {
            Ok(c) => return c,
            Err(ClientError::Storage(mls_ds_storage::StorageError::InUse { .. })) => {
                LOCK_WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                eprintln!(
                    "lock wait: process {} found {} locked: {:?}",
                    std::process::id(),
                    data_dir.display(),
                    lock_holders(&data_dir.join("db"))
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open {name}'s store: {e}"),
        }
    }
    panic!("{name}'s store stayed locked");
}

/// Lines of /proc/locks about `file` (they name the holder's pid).
fn lock_holders(file: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = std::fs::metadata(file).map(|m| m.ino()) else {
        return Vec::new();
    };
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!(":{ino} ")))
        .map(str::to_owned)
        .collect()
}

/// What a client sent and what its application received, in its own store.
pub struct Log {
    storage: SledStorage,
    attempted: RecordTree,
    queued: RecordTree,
    acked: RecordTree,
    received: RecordTree,
    skipped: RecordTree,
}

/// The records of one client, read back.
#[derive(Debug, Default)]
pub struct Records {
    /// Texts handed to the SDK, in send order.
    pub attempted: Vec<String>,
    /// Texts the SDK took into its durable send outbox (from then on
    /// delivered exactly once), in send order.
    pub queued: Vec<String>,
    /// Texts the DS acknowledged (2xx), in send order, with the epoch they
    /// were encrypted for.
    pub acked: Vec<(String, u64)>,
    /// Application messages as the application got them, in DS order:
    /// (sender, text).
    pub received: Vec<(String, String)>,
    /// Queue entries the SDK skipped, with the reason.
    pub skipped: Vec<String>,
}

impl Log {
    /// The log in `client`'s store.
    pub fn open(client: &Client) -> Log {
        let store = client.store();
        Log {
            storage: store.storage(b"client").expect("client namespace"),
            attempted: store.record_tree("attempted").expect("record tree"),
            queued: store.record_tree("queued").expect("record tree"),
            acked: store.record_tree("acked").expect("record tree"),
            received: store.record_tree("received").expect("record tree"),
            skipped: store.record_tree("skipped").expect("record tree"),
        }
    }

    /// Send `text` as send number `n` (numbers increase in send order). It
    /// is recorded as attempted, durably, before the SDK takes it; as queued
    /// once it is in the SDK's send outbox; and as acknowledged with its
    /// epoch once the DS accepted it. A crash between two records loses only
    /// the knowledge of the later one.
    pub async fn send(
        &self,
        client: &Client,
        group_id: &[u8],
        n: u64,
        text: &str,
    ) -> Result<(), ClientError> {
        let key = n.to_be_bytes();
        self.storage
            .put_raw(self.attempted, &key, text.as_bytes())?;
        let id = client.queue_message(group_id, text.as_bytes()).await?;
        self.storage.put_raw(self.queued, &key, text.as_bytes())?;
        client.flush_sends().await?;
        if let Some(q) = client
            .pending_sends()?
            .into_iter()
            .find(|q| q.send_id == id)
        {
            // Refused for good (its sender was removed meanwhile), or left
            // for a later flush.
            return Err(ClientError::Usage(format!(
                "not delivered yet: {}",
                q.failed.unwrap_or_default()
            )));
        }
        // The client is used by one task, so its epoch has not moved since
        // the send encrypted (after any resync the send did on a 409).
        let epoch = client.epoch(group_id).await?;
        let mut value = epoch.to_be_bytes().to_vec();
        value.extend_from_slice(text.as_bytes());
        self.storage.put_raw(self.acked, &key, &value)?;
        Ok(())
    }

    /// Hand every inbox event to the application exactly once: its record
    /// and its removal from the inbox are one transaction.
    pub fn record_events(&self, client: &Client) -> Result<usize, ClientError> {
        let (received, skipped) = (self.received, self.skipped);
        client.process_events(|tx, ev| {
            match ev {
                Event::Message {
                    seq, sender, data, ..
                } => {
                    let mut value = vec![sender.len() as u8];
                    value.extend_from_slice(sender);
                    value.extend_from_slice(data);
                    tx.put_raw(received, &seq.to_be_bytes(), &value)?;
                }
                Event::Skipped { seq, reason, .. } => {
                    tx.put_raw(skipped, &seq.to_be_bytes(), reason.as_bytes())?;
                }
                _ => {}
            }
            Ok(())
        })
    }

    /// Everything recorded.
    pub fn read(&self) -> Records {
        let scan = |tree| self.storage.scan_raw(tree, b"").expect("scan records");
        let text = |v: &[u8]| String::from_utf8(v.to_vec()).expect("UTF-8 text");
        Records {
            attempted: scan(self.attempted).iter().map(|(_, v)| text(v)).collect(),
            queued: scan(self.queued).iter().map(|(_, v)| text(v)).collect(),
            acked: scan(self.acked)
                .iter()
                .map(|(_, v)| {
                    let (epoch, t) = v.split_at(8);
                    (text(t), u64::from_be_bytes(epoch.try_into().unwrap()))
                })
                .collect(),
            received: scan(self.received)
                .iter()
                .map(|(_, v)| {
                    let (len, rest) = v.split_first().unwrap();
                    let (sender, t) = rest.split_at(usize::from(*len));
                    (text(sender), text(t))
                })
                .collect(),
            skipped: scan(self.skipped).iter().map(|(_, v)| text(v)).collect(),
        }
    }
}

/// What a crash-test child process runs as.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// Client id.
    pub name: String,
    /// The client's data directory.
    pub data_dir: PathBuf,
    /// File holding the DS's current URL (it changes when the DS restarts).
    pub url_file: PathBuf,
    /// Seed of the child's choices.
    pub seed: u64,
    /// Distinguishes this process's sends from those of earlier ones.
    pub incarnation: u32,
    /// Abort right after the DS accepts a commit, before merging it.
    pub abort_after_commit: bool,
}

impl ChildSpec {
    /// As command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.data_dir.display().to_string(),
            self.url_file.display().to_string(),
            self.seed.to_string(),
            self.incarnation.to_string(),
            u8::from(self.abort_after_commit).to_string(),
        ]
    }

    /// From command-line arguments.
    pub fn from_args(args: &[String]) -> ChildSpec {
        assert_eq!(
            args.len(),
            6,
            "NAME DATA_DIR URL_FILE SEED INCARNATION ABORT"
        );
        ChildSpec {
            name: args[0].clone(),
            data_dir: args[1].clone().into(),
            url_file: args[2].clone().into(),
            seed: args[3].parse().expect("seed"),
            incarnation: args[4].parse().expect("incarnation"),
            abort_after_commit: args[5] == "1",
        }
    }
}

/// The child's loop, until it is killed: follow the DS's URL, sync, record
/// what arrived, then mostly send, sometimes self-update or top up key
/// packages. Errors from the DS are expected (it is killed too) and ignored;
/// what matters is what the records say at the end.
pub async fn client_loop(spec: ChildSpec) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut open: Option<(String, Client, Log)> = None;
    let config = ClientConfig {
        abort_after_commit_accepted: spec.abort_after_commit,
        ..ClientConfig::default()
    };
    for n in 1u64.. {
        // The test that started this process is gone (its temporary
        // directory with it, e.g. after a failed assertion): stop, instead
        // of looping forever as an orphan.
        if spec.url_file.parent().is_some_and(|d| !d.exists()) {
            std::process::exit(0);
        }
        let url = std::fs::read_to_string(&spec.url_file).unwrap_or_default();
        if open.as_ref().is_none_or(|(u, _, _)| *u != url) {
            // Release the store before opening it again.
            drop(open.take());
            let waits = LOCK_WAITS.load(std::sync::atomic::Ordering::Relaxed);
            let client = open_client(&spec.data_dir, &url, &spec.name, config.clone());
            if LOCK_WAITS.load(std::sync::atomic::Ordering::Relaxed) != waits {
                // Tells a lock left by the previous process from one this
                // process's previous handle still held.
                eprintln!(
                    "lock wait above: on {} open of process {}",
                    if n == 1 { "the first" } else { "a repeated" },
                    std::process::id()
                );
            }
            let log = Log::open(&client);
            open = Some((url, client, log));
        }
        let Some((_, client, log)) = open.as_ref() else {
            continue;
        };
        let _ = client.sync().await;
        log.record_events(client).expect("record events");
        let Some(gid) = client.groups().await.first().cloned() else {
            // Not a member (yet, or any more): wait for a Welcome.
            if rng.gen_bool(0.1) {
                let _ = client.ensure_key_packages().await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        match rng.gen_range(0..20) {
            0 => {
                let _ = client.self_update(&gid).await;
            }
            1 => {
                let _ = client.ensure_key_packages().await;
            }
            2..=4 => tokio::time::sleep(Duration::from_millis(3)).await,
            _ => {
                let text = format!("{} {}.{n}", spec.name, spec.incarnation);
                let number = (u64::from(spec.incarnation) << 32) | n;
                let _ = log.send(client, &gid, number, &text).await;
            }
        }
    }
}
