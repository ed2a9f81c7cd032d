//! The config file (`--config FILE`, env `MLS_DS_CONFIG`): a TOML table
//! whose keys are the long names of the options `mls-ds --help` shows, and
//! the one entry point that turns arguments, environment and file into a
//! [`Cli`].
//!
//! Precedence is flag > environment variable > file > built-in default. The
//! file's values become the clap arguments' default values before parsing,
//! so clap itself ranks them below the environment and the command line;
//! nothing here compares sources. Every option in `config.rs` is settable
//! this way without being listed here: keys are looked up among the
//! arguments of `Cli::command()`.

use std::any::TypeId;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};

use crate::config::Cli;

/// The option naming the config file; it cannot be set in the file itself.
const CONFIG: &str = "config";
/// The subcommand whose options are also the top level's (flattened).
const SERVE: &str = "serve";

/// Why the options could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A command-line or environment error, formatted by clap (`exit` prints
    /// it with the usage and exits with clap's status).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    /// The config file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (line and column included).
        reason: String,
    },
    /// A key that is no option, or an option the file may not set.
    #[error("config file {path}: unknown key `{key}` (the keys are the long names of the options `mls-ds --help` shows, without `--`; see docs/CONFIG.md)")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A key whose option cannot come from the file.
    #[error("config file {path}: key `{key}` cannot be set in a config file: {reason}")]
    NotAllowed {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// A TOML table: options are keys at the top level only.
    #[error("config file {path}: section `[{key}]`: the file has no sections; every key goes at the top level")]
    Section {
        /// The file.
        path: PathBuf,
        /// The table's name.
        key: String,
    },
    /// A value of the wrong TOML type.
    #[error("config file {path}: key `{key}` must be {expected}, not {found}")]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The type the option takes.
        expected: &'static str,
        /// The type given.
        found: &'static str,
    },
    /// A value of the right type that the option refuses.
    #[error("config file {path}: key `{key}`: {reason}")]
    InvalidValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The option's own message.
        reason: String,
    },
}

/// The options of this process: its arguments, the `MLS_DS_*` environment
/// and the config file if one is named.
pub fn load() -> Result<Cli, LoadError> {
    parse_from(std::env::args_os())
}

/// The options given by `args` (the first is the program name), the
/// environment, and the config file if `args` or the environment name one.
fn parse_from<I, T>(args: I) -> Result<Cli, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let (mut command, mut matches) = matches(&args)?;
    Cli::from_arg_matches_mut(&mut matches).map_err(|e| LoadError::Cli(e.format(&mut command)))
}

/// The command with the file's values as defaults, and the parsed matches.
fn matches(args: &[OsString]) -> Result<(Command, ArgMatches), LoadError> {
    let mut command = Cli::command();
    if let Some(path) = config_path(&command, args) {
        let table = read(&path)?;
        command = with_file_defaults(command, &table, &path)?;
    }
    let matches = command.try_get_matches_from_mut(args)?;
    Ok((command, matches))
}

/// The config file named by `--config` in `args`, else by its environment
/// variable. Found before clap parses, because what the file says changes
/// how clap parses.
fn config_path(command: &Command, args: &[OsString]) -> Option<PathBuf> {
    let flag = format!("--{CONFIG}");
    let with_value = format!("--{CONFIG}=");
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        // After `--` nothing is an option.
        if arg == "--" {
            break;
        }
        if *arg == *flag {
            return rest.next().map(PathBuf::from);
        }
        if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix(&with_value)) {
            return Some(PathBuf::from(value));
        }
    }
    let env = command
        .get_arguments()
        .find(|a| a.get_id() == CONFIG)
        .and_then(Arg::get_env)?;
    std::env::var_os(env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn read(path: &Path) -> Result<toml::Table, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| LoadError::Syntax {
        path: path.to_owned(),
        reason: e.to_string().trim_end().to_owned(),
    })
}

/// `command` with each key of `table` as its option's default value, on the
/// top level and, for options of `serve`, on that subcommand too.
fn with_file_defaults(
    mut command: Command,
    table: &toml::Table,
    path: &Path,
) -> Result<Command, LoadError> {
    let mut settings = Vec::new();
    for (key, value) in table {
        let unknown = || LoadError::UnknownKey {
            path: path.to_owned(),
            key: key.clone(),
        };
        if value.is_table() {
            return Err(LoadError::Section {
                path: path.to_owned(),
                key: key.clone(),
            });
        }
        if key == CONFIG {
            return Err(LoadError::NotAllowed {
                path: path.to_owned(),
                key: key.clone(),
                reason: "a config file cannot name another one",
            });
        }
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .ok_or_else(unknown)?;
        if matches!(arg.get_action(), ArgAction::Help | ArgAction::Version) {
            return Err(unknown());
        }
        let values = file_values(arg, value).map_err(|(expected, found)| LoadError::WrongType {
            path: path.to_owned(),
            key: key.clone(),
            expected,
            found,
        })?;
        if arg.get_action().takes_values() {
            for v in &values {
                check_value(arg, v).map_err(|reason| LoadError::InvalidValue {
                    path: path.to_owned(),
                    key: key.clone(),
                    reason,
                })?;
            }
        }
        settings.push((arg.get_id().clone(), values));
    }
    for (id, values) in settings {
        let in_serve = command
            .find_subcommand(SERVE)
            .is_some_and(|s| s.get_arguments().any(|a| *a.get_id() == id));
        command = command.mut_arg(&id, |a| a.default_values(values.clone()));
        if in_serve {
            command =
                command.mut_subcommand(SERVE, |s| s.mut_arg(&id, |a| a.default_values(values)));
        }
    }
    Ok(command)
}

/// The values, as command-line text, that `value` gives `arg`; or the type
/// expected and the type found.
fn file_values(
    arg: &Arg,
    value: &toml::Value,
) -> Result<Vec<String>, (&'static str, &'static str)> {
    let found = value.type_str();
    match arg.get_action() {
        // A switch: `key = true` is the flag given.
        ArgAction::SetTrue | ArgAction::SetFalse => {
            let on = value.as_bool().ok_or(("true or false", found))?;
            let set = matches!(arg.get_action(), ArgAction::SetTrue) == on;
            Ok(vec![set.to_string()])
        }
        ArgAction::Append => match value {
            toml::Value::Array(items) => items.iter().map(|v| scalar(arg, v)).collect(),
            v => Ok(vec![scalar(arg, v)?]),
        },
        ArgAction::Set => Ok(vec![scalar(arg, value)?]),
        _ => Err(("an option that takes a value", found)),
    }
}

/// One value as command-line text, if its TOML type is the option's.
fn scalar(arg: &Arg, value: &toml::Value) -> Result<String, (&'static str, &'static str)> {
    let found = value.type_str();
    let kind = arg.get_value_parser().type_id();
    let integer = [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i8>(),
        TypeId::of::<i16>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<isize>(),
    ]
    .iter()
    .any(|t| kind == *t);
    if integer {
        return match value {
            toml::Value::Integer(n) => Ok(n.to_string()),
            _ => Err(("an integer", found)),
        };
    }
    if kind == TypeId::of::<bool>() {
        return value
            .as_bool()
            .map(|b| b.to_string())
            .ok_or(("true or false", found));
    }
    if kind == TypeId::of::<f64>() || kind == TypeId::of::<f32>() {
        return match value {
            toml::Value::Float(x) => Ok(x.to_string()),
            toml::Value::Integer(n) => Ok(n.to_string()),
            _ => Err(("a number", found)),
        };
    }
    value.as_str().map(str::to_owned).ok_or(("a string", found))
}

/// Whether `arg` takes `value`, checked now so that the error names the file
/// and key (as a default value, clap would only name the flag). clap's value
/// parsers are run through a command holding `arg` alone, since clap does
/// not expose them directly.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let Some(long) = arg.get_long() else {
        return Ok(());
    };
    // Only the value counts: no environment, no default, no requirements.
    let probe = arg
        .clone()
        .env(None)
        .default_values(Vec::<String>::new())
        .required(false)
        .global(false);
    let args = [OsString::from("mls-ds"), format!("--{long}={value}").into()];
    match Command::new("mls-ds").arg(probe).try_get_matches_from(args) {
        Ok(_) => Ok(()),
        Err(e) => Err(clap_message(&e)),
    }
}

/// A clap error's own sentence, without its `error:` prefix and usage hint.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::parser::ValueSource;

    use super::*;
    use crate::config::Command as Sub;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// A config file with `text` in a fresh directory (kept alive by the
    /// returned guard).
    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mls-ds.toml");
        std::fs::write(&path, text).expect("write config");
        (dir, path)
    }

    fn parse(args: &[&str]) -> Result<Cli, LoadError> {
        parse_from(std::iter::once("mls-ds").chain(args.iter().copied()))
    }

    fn with_config(path: &Path, args: &[&str]) -> Result<Cli, LoadError> {
        let mut all = vec!["--config", path.to_str().expect("utf-8 temp path")];
        all.extend_from_slice(args);
        parse(&all)
    }

    #[test]
    fn the_example_file_parses_and_sets_what_it_says() {
        let example = root().join("contrib/mls-ds.toml");
        let cli = match with_config(&example, &[]) {
            Ok(cli) => cli,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cli.data_dir, Path::new("/var/lib/mls-ds/data"));
        assert_eq!(cli.log, "info");
        let serve = &cli.serve;
        assert_eq!(serve.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(
            serve.tls_cert.as_deref(),
            Some(Path::new("/etc/mls-ds/cert.pem"))
        );
        assert_eq!(
            serve.tls_key.as_deref(),
            Some(Path::new("/etc/mls-ds/key.pem"))
        );
        assert_eq!(
            serve.metrics_listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9100")
        );
        assert_eq!(serve.limits.max_body_bytes, 1_048_576);
        assert_eq!(serve.limits.rate_limit_per_sec, 20);
        assert_eq!(serve.limits.rate_limit_burst, 200);
        assert_eq!(serve.limits.retention_secs, 2_592_000);

        // Every key the file sets is one asserted above, and comes from the
        // file (not from a default that happens to be equal).
        let table = read(&example).expect("example reads");
        let keys: BTreeSet<&str> = table.keys().map(String::as_str).collect();
        let asserted = BTreeSet::from([
            "data-dir",
            "log",
            "listen",
            "tls-cert",
            "tls-key",
            "metrics-listen",
            "max-body-bytes",
            "rate-limit-per-sec",
            "rate-limit-burst",
            "retention-secs",
        ]);
        assert_eq!(keys, asserted, "update this test with the example");
        let args = [OsString::from("mls-ds"), "--config".into(), example.into()];
        let (command, matches) = matches(&args).expect("example parses");
        for key in keys {
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(key))
                .expect("a key is an option");
            let id = arg.get_id().as_str();
            assert_eq!(
                matches.value_source(id),
                Some(ValueSource::DefaultValue),
                "{key}"
            );
            let raw: Vec<String> = matches
                .get_raw(id)
                .into_iter()
                .flatten()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let expected = file_values(arg, &table[key]).expect("typed");
            assert_eq!(raw, expected, "{key}");
        }
    }

    #[test]
    fn the_file_sets_global_serve_and_subcommand_options() {
        let (_dir, path) = file(
            "data-dir = \"/srv/ds\"\nlog = \"debug\"\nlisten = \"127.0.0.1:9999\"\n\
             max-wait-ms = 1234\nworkers = 3\n",
        );
        for args in [&[][..], &["serve"][..], &["stats"][..]] {
            let cli = match with_config(&path, args) {
                Ok(cli) => cli,
                Err(e) => panic!("{args:?}: {e}"),
            };
            assert_eq!(cli.data_dir, Path::new("/srv/ds"), "{args:?}");
            assert_eq!(cli.log, "debug", "{args:?}");
            let serve = match &cli.command {
                None => &cli.serve,
                Some(Sub::Serve(serve)) => serve,
                Some(_) => continue,
            };
            assert_eq!(serve.listen.to_string(), "127.0.0.1:9999", "{args:?}");
            assert_eq!(serve.limits.max_wait_ms, 1234, "{args:?}");
            assert_eq!(serve.workers, Some(3), "{args:?}");
        }
    }

    #[test]
    fn a_flag_beats_the_file_wherever_it_is_given() {
        let (_dir, path) = file("max-wait-ms = 1234\ndata-dir = \"/srv/ds\"\n");
        let p = path.to_str().expect("utf-8");
        let inline = format!("--config={p}");
        for args in [
            &["--max-wait-ms", "7", "--data-dir", "/x", "--config", p][..],
            &[
                "--config",
                p,
                "serve",
                "--max-wait-ms",
                "7",
                "--data-dir",
                "/x",
            ][..],
            &["serve", "--config", p, "--max-wait-ms=7", "--data-dir=/x"][..],
            &[&inline, "--max-wait-ms", "7", "--data-dir", "/x"][..],
        ] {
            let cli = match parse(args) {
                Ok(cli) => cli,
                Err(e) => panic!("{args:?}: {e}"),
            };
            assert_eq!(cli.data_dir, Path::new("/x"), "{args:?}");
            let serve = match &cli.command {
                Some(Sub::Serve(serve)) => serve,
                _ => &cli.serve,
            };
            assert_eq!(serve.limits.max_wait_ms, 7, "{args:?}");
        }
    }

    #[test]
    fn half_a_tls_pair_in_the_file_is_left_to_serve_to_refuse() {
        // A flag completing a pair the file starts is accepted (`requires`
        // would not see the file's half); `serve` checks the pair.
        let (_dir, path) = file("tls-cert = \"/etc/c.pem\"\n");
        let cli = match with_config(&path, &["--tls-key", "/etc/k.pem"]) {
            Ok(cli) => cli,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cli.serve.tls_cert.as_deref(), Some(Path::new("/etc/c.pem")));
        assert_eq!(cli.serve.tls_key.as_deref(), Some(Path::new("/etc/k.pem")));
    }

    #[test]
    fn bad_files_are_errors_naming_the_file_and_key() {
        let cases = [
            ("listn = \"x\"\n", "unknown key `listn`"),
            ("help = true\n", "unknown key `help`"),
            ("out = \"/tmp/b\"\n", "unknown key `out`"),
            ("config = \"other.toml\"\n", "key `config` cannot be set"),
            (
                "max-body-bytes = \"1MiB\"\n",
                "key `max-body-bytes` must be an integer, not string",
            ),
            (
                "listen = 8080\n",
                "key `listen` must be a string, not integer",
            ),
            ("workers = 0\n", "key `workers`: invalid value '0'"),
            (
                "max-body-bytes = -1\n",
                "key `max-body-bytes`: invalid value '-1'",
            ),
            (
                "listen = \"nowhere\"\n",
                "key `listen`: invalid value 'nowhere'",
            ),
            ("listen = \"127.0.0.1:1\nlog = 1\n", "is not valid TOML"),
            (
                "[serve]\nlisten = \"127.0.0.1:1\"\n",
                "section `[serve]`: the file has no sections",
            ),
        ];
        for (text, expected) in cases {
            let (_dir, path) = file(text);
            let err = match with_config(&path, &[]) {
                Ok(cli) => panic!("{text:?} accepted: {cli:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.contains(&path.display().to_string()), "{text:?}: {err}");
        }
        let missing = root().join("no-such-config.toml");
        let err = match with_config(&missing, &[]) {
            Ok(cli) => panic!("missing file accepted: {cli:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.starts_with("cannot read the config file") && err.contains("no-such-config.toml"),
            "{err}"
        );
    }

    /// Cells of the option table in `docs/CONFIG.md`: rows whose flag
    /// column holds a `--flag`.
    fn documented_options() -> Vec<Vec<String>> {
        let doc = std::fs::read_to_string(root().join("docs/CONFIG.md")).expect("docs/CONFIG.md");
        doc.lines()
            .filter(|l| l.starts_with('|'))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .filter(|cells| cells.get(1).is_some_and(|c| c.starts_with("`--")))
            .collect()
    }

    #[test]
    fn the_config_reference_lists_exactly_the_options_of_help() {
        let command = Cli::command();
        let options: Vec<&Arg> = command
            .get_arguments()
            .filter(|a| !a.is_hide_set() && a.get_long().is_some())
            .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
            .collect();
        let rows = documented_options();
        let code = |s: &str| format!("`{s}`");
        let documented: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
        let shown: BTreeSet<String> = options
            .iter()
            .filter_map(|a| a.get_long())
            .map(|l| code(&format!("--{l}")))
            .collect();
        let listed: BTreeSet<String> = documented.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            listed.len(),
            documented.len(),
            "a flag listed twice: {documented:?}"
        );
        assert_eq!(
            listed, shown,
            "docs/CONFIG.md's table and `mls-ds --help` list different options"
        );
        for arg in options {
            let long = arg.get_long().unwrap_or_default();
            let row = rows
                .iter()
                .find(|r| r[1] == code(&format!("--{long}")))
                .expect("listed");
            assert_eq!(row.len(), 5, "--{long}: key, flag, env, default, meaning");
            let key = if long == CONFIG {
                "—".to_owned()
            } else {
                code(long)
            };
            assert_eq!(row[0], key, "--{long}: the config key");
            let env = arg
                .get_env()
                .map_or("—".to_owned(), |e| code(&e.to_string_lossy()));
            assert_eq!(row[2], env, "--{long}: the environment variable");
            let default: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| code(&v.to_string_lossy()))
                .collect();
            if default.is_empty() {
                assert!(
                    row[3].starts_with("unset"),
                    "--{long}: no default, row says {}",
                    row[3]
                );
            } else {
                assert!(
                    row[3].starts_with(&default.join(", ")),
                    "--{long}: default {default:?}, row says {}",
                    row[3]
                );
            }
            assert!(!row[4].is_empty(), "--{long}: meaning");
        }
    }

    #[test]
    fn config_is_found_before_parsing_only_where_clap_would_take_it() {
        let command = Cli::command();
        let os = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&command, &os(&["mls-ds", "serve", "--config", "a.toml"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            config_path(&command, &os(&["mls-ds", "--config=b.toml"])),
            Some(PathBuf::from("b.toml"))
        );
        // The program name is no option, and nothing after `--` is.
        for args in [
            &["--config", "c.toml"][..],
            &["mls-ds", "--", "--config", "c.toml"],
        ] {
            assert_ne!(
                config_path(&command, &os(args)),
                Some(PathBuf::from("c.toml")),
                "{args:?}"
            );
        }
    }
}
