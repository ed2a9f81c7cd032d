//! Harness for system tests: builds and starts the real `mls-ds` binary on
//! 127.0.0.1 with an ephemeral port and a temporary data directory (and its
//! metrics listener on another ephemeral port), restarts
//! it on the same directory, stops it gracefully or kills it; low-level
//! clients ([`raw`]) for tests that need to step outside the SDK; and what
//! crash tests share ([`crashing`]: retries across restarts, exact records
//! of sends and deliveries, the loop of a client run as a child process);
//! a PostgreSQL server of the tests' own ([`postgres`]), on which every
//! server keeps its state when `MLS_DS_TEST_BACKEND=postgres`.

pub mod crashing;
pub mod lean_http;
pub mod postgres;
pub mod powercut;
pub mod raw;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The texts of the application messages among `events`, in order.
pub fn message_texts(events: &[mls_ds_client::Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            mls_ds_client::Event::Message { data, .. } => {
                Some(String::from_utf8_lossy(data).into_owned())
            }
            _ => None,
        })
        .collect()
}

/// Every file under `dir`, concatenated (to search a store's files for
/// what must or must not be in them).
pub fn dir_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(dir_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).expect("read file"));
        }
    }
    out
}

/// The benchmarks' server flags: every limit and quota at its default,
/// except what synthetic clients exceed by design (32 requests in flight
/// from one client at tens of thousands a second, tens of thousands of
/// registrations from one address, thousands of members claimed by one
/// client). Those limits are raised, not switched off, so their checks
/// still run on every request.
pub const BENCH_SERVER_FLAGS: &[&str] = &[
    "--max-inflight",
    "100000",
    "--rate-limit-per-sec",
    "100000000",
    "--rate-limit-burst",
    "100000000",
    "--ip-rate-limit-per-min",
    "100000000",
    "--ip-rate-limit-burst",
    "100000000",
    "--claim-rate-per-min",
    "100000000",
    "--claim-burst",
    "100000000",
];

/// (user + system) CPU seconds a process has used, from `/proc` (0 if it is
/// gone): what the benchmarks divide by the requests they made.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime is field 14, stime 15 (1-based, counting pid and comm): index 11, 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size of a process, in MiB (0 if it is gone).
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Bytes the files under `dir` occupy on disk (allocated blocks, so sparse
/// files count what they use).
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// The number in the environment variable `var`, or `default`.
pub fn env_or(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Path of a workspace binary, built (once per test process) if it is missing
/// or older than the sources it is made of. `cargo test --workspace` has built
/// it already; rebuilding unconditionally would cost a relink per test file.
pub fn binary(package: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join(name);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !built.iter().any(|b| b == name) && stale(&path, &root) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root)
            .args(["build", "-q", "-p", package, "--bin", name]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    built.push(name.to_owned());
    path
}

/// Whether `bin` is missing or older than any source it could depend on.
fn stale(bin: &Path, root: &Path) -> bool {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    let mut dirs = vec![root.join("Cargo.lock")];
    for d in ["server", "storage", "client-sdk"] {
        dirs.push(root.join(d));
    }
    let mut stack = dirs;
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.modified().is_ok_and(|m| m > built) {
            return true;
        }
    }
    false
}

/// Path of the server binary.
pub fn server_binary() -> PathBuf {
    binary("mls-ds-server", "mls-ds")
}

/// Run futures concurrently on the current task and collect their outputs in
/// order (tests fire many requests at once without spawning).
pub async fn join_all<F: std::future::Future>(fs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Option<std::pin::Pin<Box<F>>>> =
        fs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut results: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// A running server process.
pub struct Server {
    child: Option<Child>,
    data_dir: PathBuf,
    log: PathBuf,
    addr: String,
    metrics_addr: String,
    extra: Vec<String>,
    /// Whether the rate limits' bursts and the per-source limits are
    /// lifted (see `spawn`).
    lift_limits: bool,
    /// The open-file limit (soft and hard) the server runs under, if set.
    open_files: Option<u64>,
    /// What `--listen` gets: an ephemeral port, or the last one again.
    listen: String,
    /// The database it keeps its state in, if one was named (see
    /// [`Server::start_on_database`]).
    database: Option<String>,
}

/// Where a launched server writes its addresses (the metrics one first).
struct PortFiles {
    api: PathBuf,
    metrics: PathBuf,
}

impl Server {
    /// Start a server on `data_dir` with extra flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_logging_to(data_dir, &data_dir.join("server.log"), extra)
    }

    /// Like [`Server::start`], with the log in `log` instead of the data
    /// directory: a test that breaks the data directory's file system still
    /// reads what the server said about it.
    pub fn start_logging_to(data_dir: &Path, log: &Path, extra: &[&str]) -> Server {
        let mut s = Server {
            child: None,
            data_dir: data_dir.to_owned(),
            log: log.to_owned(),
            addr: String::new(),
            metrics_addr: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            lift_limits: true,
            open_files: None,
            listen: "127.0.0.1:0".into(),
            database: None,
        };
        s.spawn();
        s
    }

    /// Like [`Server::start`], keeping the state in the PostgreSQL database
    /// `url` (which other servers may share); `data_dir` holds only the log
    /// and the port files.
    pub fn start_on_database(data_dir: &Path, url: &str, extra: &[&str]) -> Server {
        let mut s = Server {
            child: None,
            data_dir: data_dir.to_owned(),
            log: data_dir.join("server.log"),
            addr: String::new(),
            metrics_addr: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            lift_limits: true,
            open_files: None,
            listen: "127.0.0.1:0".into(),
            database: Some(url.to_owned()),
        };
        s.spawn();
        s
    }

    /// Like [`Server::start`], with every limit at its default (nothing
    /// lifted for the test's many clients on one address).
    pub fn start_at_defaults(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_at_defaults_with_open_files(data_dir, extra, None)
    }

    /// Like [`Server::start_at_defaults`], under an open-file limit of
    /// `open_files` (soft and hard, set by `prlimit`).
    pub fn start_at_defaults_with_open_files(
        data_dir: &Path,
        extra: &[&str],
        open_files: Option<u64>,
    ) -> Server {
        let mut s = Server {
            child: None,
            data_dir: data_dir.to_owned(),
            log: data_dir.join("server.log"),
            addr: String::new(),
            metrics_addr: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            lift_limits: false,
            open_files,
            listen: "127.0.0.1:0".into(),
            database: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let files = self.launch();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The server writes the metrics port file before the other.
            if let Ok(addr) = std::fs::read_to_string(&files.api) {
                if !addr.is_empty() {
                    self.addr = addr;
                    self.metrics_addr =
                        std::fs::read_to_string(&files.metrics).expect("metrics port file");
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                // The log's end in the message: a temporary directory holding
                // the log is gone by the time anyone reads the panic.
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(8)..].join("\n");
                panic!(
                    "mls-ds exited early with {status}; the end of {}:\n{tail}",
                    self.log_path().display()
                );
            }
            assert!(Instant::now() < deadline, "mls-ds did not start in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start the process, without waiting for it to serve: the files it
    /// writes its addresses to once it does.
    fn launch(&mut self) -> PortFiles {
        let port_file = self.data_dir.join("test-port");
        let metrics_port_file = self.data_dir.join("test-metrics-port");
        let _ = std::fs::remove_file(&port_file);
        let _ = std::fs::remove_file(&metrics_port_file);
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        // The server logs (tracing, no colour codes off a terminal) and
        // reports panics on stderr, and prints command output on stdout: both
        // go to the log, so tests can look for what it said.
        let stdout = log.try_clone().expect("log file handle");
        let mut cmd = match self.open_files {
            None => Command::new(server_binary()),
            Some(n) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(server_binary());
                cmd
            }
        };
        // Tests of other things run many synthetic clients from one address
        // at full speed: the rate limits' bursts and the per-source limits
        // are lifted for them through the environment, which a test's own
        // flags override (the limits themselves are tested at their
        // defaults in server_limits.rs and fault_hostile_load.rs).
        for var in [
            "MLS_DS_RATE_BURST",
            "MLS_DS_IP_RATE_BURST",
            "MLS_DS_CLAIM_BURST",
            "MLS_DS_TARGET_CLAIM_BURST",
            "MLS_DS_MAX_INFLIGHT_PER_SOURCE",
            "MLS_DS_MAX_CONNECTIONS_PER_SOURCE",
            "MLS_DS_MAX_REQUEST_BUFFER_PER_SOURCE_MB",
        ] {
            if self.lift_limits {
                cmd.env(var, "100000000");
            } else {
                cmd.env_remove(var);
            }
        }
        let child = cmd
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(self.database_args())
            .args(["--listen", &self.listen, "--log", "info"])
            .arg("--port-file")
            .arg(&port_file)
            .args(["--metrics-listen", "127.0.0.1:0", "--metrics-port-file"])
            .arg(&metrics_port_file)
            .args(&self.extra)
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .expect("spawn mls-ds");
        self.child = Some(child);
        PortFiles {
            api: port_file,
            metrics: metrics_port_file,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT` of the metrics listener (`GET /metrics`).
    pub fn metrics_url(&self) -> String {
        format!("http://{}", self.metrics_addr)
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    /// Peak resident set size of the running server in KiB (`VmHWM` in
    /// `/proc/<pid>/status`), the high-water mark since it started.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// The server's resident memory now, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// SIGTERM and wait; returns whether the exit status was success.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop the process where it is (SIGSTOP): it answers nothing, its
    /// sockets fill, until [`Server::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.pid().expect("server running");
        let status = Command::new("kill")
            .args([which, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} {pid}");
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same directory (after `stop` or `kill`).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Start again on the same directory (after `stop` or `kill`) and
    /// SIGKILL the process `after` it was launched, whether it serves by
    /// then or not: whether it was still starting (its address not yet
    /// written).
    pub fn kill_while_starting(&mut self, after: Duration) -> bool {
        self.stop();
        let files = self.launch();
        std::thread::sleep(after);
        let starting = std::fs::read_to_string(&files.api).map_or(true, |a| a.is_empty());
        self.kill();
        starting
    }

    /// Stop gracefully, then start again on the same directory and the same
    /// port, so that clients reconnect to the URL they have.
    pub fn restart_on_same_port(&mut self) {
        self.stop();
        self.listen = self.addr.clone();
        self.spawn();
        self.listen = "127.0.0.1:0".into();
    }

    /// SIGKILL, then start again on the same directory and the same port,
    /// so that clients reconnect to the URL they have.
    pub fn kill_and_restart_on_same_port(&mut self) {
        self.kill();
        self.listen = self.addr.clone();
        self.spawn();
        self.listen = "127.0.0.1:0".into();
    }

    /// Stop gracefully (asserting exit 0) and assert that `mls-ds check`
    /// finds the data directory intact.
    pub fn stop_and_check(&mut self) {
        assert!(self.stop(), "graceful shutdown exits 0");
        let check = self.admin(&["check"]);
        assert!(
            check.status.success(),
            "mls-ds check: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }

    /// Run `mls-ds <args>` and assert that it succeeded; its output.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "mls-ds {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// `--database <url>` when the tests run on PostgreSQL: the database
    /// of this server's data directory.
    fn database_args(&self) -> Vec<String> {
        if let Some(url) = &self.database {
            return vec!["--database".into(), url.clone()];
        }
        match postgres::backend() {
            postgres::TestBackend::Sled => Vec::new(),
            postgres::TestBackend::Postgres => {
                vec!["--database".into(), postgres::database_for(&self.data_dir)]
            }
        }
    }

    /// Run `mls-ds <args>` (an admin subcommand) on this data dir (or its
    /// database).
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        Command::new(server_binary())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(self.database_args())
            .args(args)
            .output()
            .expect("run mls-ds admin command")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
