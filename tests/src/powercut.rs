//! A disk whose power can be cut: `powercut-fs` (src/bin/powercut-fs.rs)
//! mounted over a backing directory. Data written there and not yet
//! `fsync`ed is lost at a cut, all of it or a random part, the way a drive
//! loses its volatile cache; what was synced stays.
//!
//! Mounting needs root and `/dev/fuse`; [`PowerCutDisk::mount`] says so
//! when it cannot mount, and the tests then say that they did not run.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// What a cut loses.
#[derive(Clone, Copy, Debug)]
pub enum Cut {
    /// Everything not synced.
    All,
    /// Each unsynced page and size change at random (seeded).
    Random(u64),
}

/// What a cut did.
#[derive(Clone, Copy, Debug, Default)]
pub struct CutReport {
    /// Unsynced pages lost.
    pub lost_pages: usize,
    /// Unsynced pages that reached the disk all the same.
    pub kept_pages: usize,
}

/// A mounted `powercut-fs`.
pub struct PowerCutDisk {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    mount: PathBuf,
}

impl PowerCutDisk {
    /// Mount a disk in `dir` (its data in `dir/backing`, mounted at
    /// `dir/mnt`), or say why it cannot be done here.
    pub fn mount(dir: &Path) -> Result<PowerCutDisk, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("no /dev/fuse on this machine".into());
        }
        let backing = dir.join("backing");
        let mount = dir.join("mnt");
        for d in [&backing, &mount] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let mut child = Command::new(crate::binary("mls-ds-tests", "powercut-fs"))
            .arg(&backing)
            .arg(&mount)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start powercut-fs: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("powercut-fs has no pipes".into());
        };
        let mut disk = PowerCutDisk {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            mount,
        };
        match disk.read_line().as_str() {
            "mounted" => Ok(disk),
            other => Err(format!(
                "cannot mount a FUSE file system here (it needs root): {other}"
            )),
        }
    }

    /// A disk for `test`, or `None` after printing that the test did not
    /// run, and why.
    pub fn mount_for(dir: &Path, test: &str) -> Option<PowerCutDisk> {
        match PowerCutDisk::mount(dir) {
            Ok(disk) => Some(disk),
            Err(why) => {
                println!("{test} NOT RUN: {why}");
                None
            }
        }
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        line.trim().to_owned()
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Cut the power. Only while no process uses the disk: stop them first.
    pub fn cut(&mut self, cut: Cut) -> CutReport {
        let command = match cut {
            Cut::All => "cut all".to_owned(),
            Cut::Random(seed) => format!("cut random {seed}"),
        };
        writeln!(self.stdin, "{command}").expect("powercut-fs takes commands");
        self.stdin.flush().expect("powercut-fs takes commands");
        let answer = self.read_line();
        let words: Vec<&str> = answer.split_whitespace().collect();
        match words.as_slice() {
            ["cut", lost, kept] => CutReport {
                lost_pages: lost.parse().unwrap_or(0),
                kept_pages: kept.parse().unwrap_or(0),
            },
            _ => panic!("powercut-fs answered {answer:?} to {command:?}"),
        }
    }
}

impl Drop for PowerCutDisk {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
        // If a process still held it, the unmount was refused: detach it.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .stderr(Stdio::null())
            .status();
    }
}
