//! The config file with the real binary: precedence is command-line flag >
//! environment variable > config file > built-in default, for options of
//! the default command, of `mls-ds serve` and global ones; a broken file
//! stops `mls-ds` before it listens, saying which file and key.
//!
//! Each run sets `port-file` and `max-body-bytes` in more places than the
//! last; which port file appears shows where `port-file` came from, and
//! which body sizes get 413 shows where `max-body-bytes` came from. The
//! server is started here rather than by the harness, which passes the
//! options under test as flags; its environment is cleared of `MLS_DS_*`
//! so that only what a run sets counts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mls_ds_protocol::{paths, CONTENT_TYPE};
use mls_ds_tests::raw::raw_request;
use mls_ds_tests::server_binary;

/// `mls-ds` with `args` and exactly the `MLS_DS_*` variables in `env`.
fn command(args: &[&str], env: &[(&str, &Path)]) -> Command {
    let mut cmd = Command::new(server_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MLS_DS_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// A server process, killed if a test fails before stopping it.
struct Running(Option<Child>);

impl Running {
    fn start(args: &[&str], env: &[(&str, &Path)], log: &Path) -> Running {
        let log = std::fs::File::create(log).unwrap();
        let child = command(args, env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn mls-ds");
        Running(Some(child))
    }

    /// The address written to `port_file`, once it is.
    fn wait_for(&mut self, port_file: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = std::fs::read_to_string(port_file) {
                if !addr.is_empty() {
                    return format!("http://{addr}");
                }
            }
            if let Some(Ok(Some(status))) = self.0.as_mut().map(Child::try_wait) {
                panic!("mls-ds exited early with {status}");
            }
            assert!(Instant::now() < deadline, "mls-ds did not start in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; the exit status must be success.
    fn stop(mut self) {
        let mut child = self.0.take().unwrap();
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        assert!(child.wait().unwrap().success(), "graceful stop exits 0");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a request body of `len` bytes is refused as too large.
async fn too_large(url: &str, len: usize) -> bool {
    let headers = [("content-type", CONTENT_TYPE.to_string())];
    let (status, _) = raw_request(url, "POST", paths::CLIENTS, &headers, vec![0; len]).await;
    status == 413
}

/// The body-size limit is `limit`: at it, no 413; above it, 413.
async fn assert_limit(url: &str, limit: usize, run: &str) {
    assert!(
        !too_large(url, limit).await,
        "{run}: {limit} bytes accepted"
    );
    assert!(
        too_large(url, limit + 1).await,
        "{run}: {} bytes refused",
        limit + 1
    );
}

#[tokio::test]
async fn a_flag_beats_the_environment_which_beats_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    let (data, config) = (at("data-from-file"), at("mls-ds.toml"));
    let (from_file, from_env, from_flag) = (at("port-file"), at("port-env"), at("port-flag"));
    let metrics_port = at("metrics-port");
    let quoted = |p: &Path| format!("{:?}", p.to_str().unwrap());
    std::fs::write(
        &config,
        format!(
            "data-dir = {}\nlog = \"info\"\nlisten = \"127.0.0.1:0\"\nport-file = {}\n\
             max-body-bytes = 1000\nmetrics-listen = \"127.0.0.1:0\"\n\
             metrics-port-file = {}\n",
            quoted(&data),
            quoted(&from_file),
            quoted(&metrics_port),
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    let written = |p: &PathBuf| p.exists();

    // 1. The file alone (named by the flag): its port file, its limit, its
    //    data directory and its metrics listener.
    let mut server = Running::start(&["--config", config_arg], &[], &at("1.log"));
    let url = server.wait_for(&from_file);
    assert_limit(&url, 1000, "file").await;
    assert!(data.is_dir(), "the data directory from the file is used");
    let metrics = std::fs::read_to_string(&metrics_port).unwrap();
    let (status, _) =
        raw_request(&format!("http://{metrics}"), "GET", "/metrics", &[], vec![]).await;
    assert_eq!(status, 200, "the metrics listener from the file");
    server.stop();
    std::fs::remove_file(&from_file).unwrap();

    // 2. `serve`, the file named by the environment, and the environment
    //    setting both options: the environment's values win.
    let env_over_file = [
        ("MLS_DS_CONFIG", config.as_path()),
        ("MLS_DS_PORT_FILE", from_env.as_path()),
        ("MLS_DS_MAX_BODY", Path::new("2000")),
    ];
    let mut server = Running::start(&["serve"], &env_over_file, &at("2.log"));
    let url = server.wait_for(&from_env);
    assert_limit(&url, 2000, "environment over file").await;
    assert!(!written(&from_file), "the file's port file is not written");
    server.stop();
    std::fs::remove_file(&from_env).unwrap();

    // 3. The same environment, and flags: the flags win.
    let mut server = Running::start(
        &[
            "--config",
            config_arg,
            "--port-file",
            from_flag.to_str().unwrap(),
            "--max-body-bytes",
            "3000",
        ],
        &env_over_file,
        &at("3.log"),
    );
    let url = server.wait_for(&from_flag);
    assert_limit(&url, 3000, "flag over environment").await;
    assert!(
        !written(&from_file) && !written(&from_env),
        "neither the file's nor the environment's port file is written"
    );
    server.stop();

    // A global option from the file reaches an admin command too.
    let stats = command(&["--config", config_arg, "stats"], &[])
        .output()
        .unwrap();
    assert!(stats.status.success(), "{}", text(&stats));
    let empty = command(
        &["--data-dir", at("nothing").to_str().unwrap(), "stats"],
        &[],
    )
    .output()
    .unwrap();
    assert!(
        !empty.status.success(),
        "stats fails where there is no database: {}",
        text(&empty)
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_broken_config_file_stops_mls_ds_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("port");
    let cases = [
        (
            "max-body-bytes = 1000\nmax-body = 10\n",
            "unknown key `max-body`",
        ),
        (
            "max-body-bytes = \"1MiB\"\n",
            "key `max-body-bytes` must be an integer, not string",
        ),
        ("listen = \"127.0.0.1:0\n", "is not valid TOML"),
    ];
    for (i, (toml, expected)) in cases.into_iter().enumerate() {
        let config = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&config, toml).unwrap();
        let out = command(
            &[
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                port_file.to_str().unwrap(),
                "--data-dir",
                dir.path().join("data").to_str().unwrap(),
            ],
            &[],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{toml:?}: {said}");
        assert!(said.contains(expected), "{toml:?}: {said}");
        assert!(
            said.contains(config.to_str().unwrap()),
            "names the file: {said}"
        );
        assert!(!port_file.exists(), "{toml:?}: it never listened");
    }

    let missing = dir.path().join("missing.toml");
    let out = command(&["stats"], &[("MLS_DS_CONFIG", &missing)])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("cannot read the config file") && said.contains("missing.toml"),
        "{said}"
    );

    // Half a TLS pair from the file is refused by the server, not ignored.
    let half = dir.path().join("half-tls.toml");
    std::fs::write(&half, "tls-cert = \"/nonexistent/cert.pem\"\n").unwrap();
    let out = command(
        &[
            "--config",
            half.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            port_file.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ],
        &[],
    )
    .output()
    .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("--tls-cert and --tls-key must be given together"),
        "{said}"
    );
    assert!(!port_file.exists(), "it never listened");
}
