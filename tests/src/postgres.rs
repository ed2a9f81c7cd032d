//! A PostgreSQL server of the tests' own: `initdb` in a temporary
//! directory and `pg_ctl` on a free port of 127.0.0.1, one per test
//! process, with trust authentication for the `postgres` role over
//! 127.0.0.1 only. No system service is used or touched. A watchdog
//! process stops the server and deletes its directory once the test
//! process is gone, however it ended.
//!
//! The server binaries are looked for where Debian installs them
//! (`/usr/lib/postgresql/<version>/bin`) and on `PATH`. Without them,
//! [`cluster`] is `None` and the tests that need it say so and do not run.
//!
//! [`backend`] tells whether the system tests run on PostgreSQL
//! (`MLS_DS_TEST_BACKEND=postgres`) instead of each server's data
//! directory; `.ci/run` runs the suites that apply both ways.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the system tests keep the DS's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestBackend {
    /// Each server's data directory (the default).
    Sled,
    /// A database per data directory on this process's PostgreSQL server.
    Postgres,
}

/// The backend chosen by `MLS_DS_TEST_BACKEND` (`sled`, the default, or
/// `postgres`).
pub fn backend() -> TestBackend {
    match std::env::var("MLS_DS_TEST_BACKEND").as_deref() {
        Ok("postgres") => TestBackend::Postgres,
        Ok("sled") | Ok("") | Err(_) => TestBackend::Sled,
        Ok(other) => panic!("MLS_DS_TEST_BACKEND={other}: expected sled or postgres"),
    }
}

/// A running PostgreSQL server.
pub struct Cluster {
    bin: PathBuf,
    port: u16,
    next_db: AtomicU64,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

/// This process's server if [`cluster`] started one (never starts it).
pub fn cluster_if_started() -> Option<&'static Cluster> {
    CLUSTER.get().and_then(Option::as_ref)
}

/// This process's server, started on first use; `None` (with the reason
/// printed once) if no PostgreSQL server binaries are installed.
pub fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(|| match bin_dir() {
            Some(bin) => Some(Cluster::start(bin)),
            None => {
                eprintln!(
                    "PostgreSQL: no server binaries (initdb, pg_ctl, postgres) in \
                     /usr/lib/postgresql/*/bin or on PATH; install them (e.g. Debian's \
                     postgresql package) to run the PostgreSQL tests; .ci/run does"
                );
                None
            }
        })
        .as_ref()
}

/// The newest `/usr/lib/postgresql/<version>/bin`, or the directory of
/// `initdb` on `PATH`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether this process runs as root (initdb refuses to).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Cluster {
    fn start(bin: PathBuf) -> Cluster {
        let root = std::env::temp_dir().join(format!("mls-ds-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("cluster directory");
        let data = root.join("data");
        let root_s = root.to_string_lossy().into_owned();
        // As root, the server runs as the `postgres` user, which must own
        // the directory.
        let as_postgres = is_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres", &root_s])
                .status()
                .expect("chown");
            assert!(status.success(), "chown {root_s} to postgres");
        }
        let run = |tool: &str, args: &[&str]| {
            let mut cmd = if as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
                c
            } else {
                Command::new(bin.join(tool))
            };
            let out = cmd
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("run {tool}: {e}"));
            assert!(
                out.status.success(),
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data_s = data.to_string_lossy().into_owned();
        run(
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let port = free_port();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root_s} \
             -c max_connections=300 -c shared_buffers=64MB"
        );
        let log = root.join("server.log").to_string_lossy().into_owned();
        run(
            "pg_ctl",
            &[
                "-D", &data_s, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        );
        // Stop it and delete its files once this process is gone.
        let stop = if as_postgres {
            format!("runuser -u postgres -- {}", bin.join("pg_ctl").display())
        } else {
            bin.join("pg_ctl").display().to_string()
        };
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {stop} -D '{data_s}' -m immediate stop >/dev/null 2>&1; rm -rf '{root_s}'",
            pid = std::process::id()
        );
        // Started in the background by a shell that exits at once, so
        // that it is nobody's child to wait for.
        let status = Command::new("sh")
            .args(["-c", &format!("({watchdog}) </dev/null >/dev/null 2>&1 &")])
            .status()
            .expect("start the cluster's watchdog");
        assert!(status.success(), "start the cluster's watchdog");
        let cluster = Cluster {
            bin,
            port,
            next_db: AtomicU64::new(0),
        };
        cluster.wait_ready();
        cluster
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.psql("postgres", "SELECT 1").status.success() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run one SQL command with `psql` on database `db`.
    pub fn psql(&self, db: &str, sql: &str) -> std::process::Output {
        Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    /// Like [`Cluster::psql`], asserting success; its output.
    pub fn psql_ok(&self, db: &str, sql: &str) -> String {
        let out = self.psql(db, sql);
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new, empty database; its URL.
    pub fn new_database(&self) -> String {
        let n = self.next_db.fetch_add(1, Ordering::SeqCst);
        let name = format!("ds_{n}");
        self.psql_ok("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The URL of database `name` (TLS off: the server has none).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        )
    }

    /// CPU seconds (user + system) the server's processes have used: the
    /// postmaster and its children alive now (a pool's connections live as
    /// long as the DS nodes, so their backends' CPU is all there).
    pub fn cpu_seconds(&self) -> f64 {
        let root = std::env::temp_dir().join(format!("mls-ds-pg-{}", std::process::id()));
        let Some(postmaster) = std::fs::read_to_string(root.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return 0.0;
        };
        let mut total = crate::cpu_seconds(postmaster);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if parent == Some(postmaster) {
                total += crate::cpu_seconds(pid);
            }
        }
        total
    }

    /// Stop the server (fast: sessions are ended) and start it again.
    pub fn restart(&self) {
        let root = std::env::temp_dir().join(format!("mls-ds-pg-{}", std::process::id()));
        let data = root.join("data").to_string_lossy().into_owned();
        // With its log in a file: the server must not hold pg_ctl's output
        // open, or waiting for pg_ctl never ends.
        let log = root.join("server.log").to_string_lossy().into_owned();
        self.pg_ctl(&[
            "-D", &data, "-l", &log, "-m", "fast", "-w", "-t", "60", "restart",
        ]);
        self.wait_ready();
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The database a test server on `data_dir` keeps its state in when the
/// tests run on PostgreSQL: one per data directory, made on first use, so
/// that a restart on the same directory finds the same state.
pub fn database_for(data_dir: &Path) -> String {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static BY_DIR: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let cluster = cluster().expect(
        "MLS_DS_TEST_BACKEND=postgres needs PostgreSQL's server binaries (see tests/src/postgres.rs)",
    );
    let mut map = BY_DIR
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.entry(data_dir.to_owned())
        .or_insert_with(|| cluster.new_database())
        .clone()
}
