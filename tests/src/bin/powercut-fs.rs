//! `powercut-fs BACKING MOUNT`: a FUSE file system over the directory
//! BACKING, mounted at MOUNT, that models a disk with a volatile write
//! cache, so that tests can cut the power under a process.
//!
//! - File contents written but not yet `fsync`ed (or `fdatasync`ed) stay in
//!   this process's memory, by 4 KiB page, as do size changes; reads see
//!   them. `fsync` writes the file's pages and size to BACKING and syncs
//!   them there; nothing else does (`sync_file_range`, a `flush` at close
//!   and sled's own flush reach this process as plain writes).
//! - Creating, removing and renaming files and directories takes effect in
//!   BACKING at once, as if directory changes were journaled synchronously:
//!   the model is strict about file data, not about names.
//! - Every open is `FOPEN_DIRECT_IO` and attributes are not cached, so the
//!   kernel keeps no copy of its own that a cut would not reach.
//!
//! One file of about 600 lines: a FUSE file system is one implementation of
//! fuser's `Filesystem` trait, whose methods make most of its length.
//!
//! Commands, one per line on stdin, each answered by one line on stdout:
//! `cut all` (every unsynced page and size change is lost), `cut random
//! SEED` (each is kept or lost at random, as a drive that wrote some of its
//! cache before the power went, in any order), `quit` (unmount and exit;
//! also at the end of stdin). Cut only while no process uses the mount.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Write as _};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use rand::{Rng, SeedableRng};

const PAGE: u64 = 4096;
/// Nothing is cached by the kernel: a cut must be seen at once.
const NO_CACHE: Duration = Duration::ZERO;
const ROOT: u64 = 1;
/// `O_EXCL` on Linux (x86 and arm alike).
const O_EXCL: i32 = 0o200;

/// What was written to a file since its last `fsync`.
#[derive(Default)]
struct Dirty {
    /// Pages by index, each `PAGE` bytes (the file's size cuts the last).
    pages: BTreeMap<u64, Vec<u8>>,
    /// The file's size as processes see it.
    size: u64,
    /// The smallest size it was cut to since the last sync: BACKING's bytes
    /// from here on are not the file's any more.
    cut_to: u64,
}

/// The file system's state.
struct State {
    backing: PathBuf,
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    dirty: HashMap<u64, Dirty>,
}

struct PowerCutFs(Arc<Mutex<State>>);

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

impl State {
    fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.paths.get(&ino).cloned().ok_or(Errno::ENOENT)
    }

    fn real(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    fn ino_of(&mut self, rel: &Path) -> u64 {
        if let Some(ino) = self.inos.get(rel) {
            return *ino;
        }
        self.next_ino += 1;
        let ino = self.next_ino;
        self.inos.insert(rel.to_owned(), ino);
        self.paths.insert(ino, rel.to_owned());
        ino
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    fn attr(&mut self, rel: &Path) -> Result<FileAttr, Errno> {
        let meta = fs::symlink_metadata(self.real(rel)).map_err(errno)?;
        let ino = self.ino_of(rel);
        let size = self.dirty.get(&ino).map_or(meta.len(), |d| d.size);
        let kind = FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile);
        let time = |secs: i64| std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime()),
            mtime: time(meta.mtime()),
            ctime: time(meta.ctime()),
            crtime: time(meta.ctime()),
            kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    /// The file's unsynced state, started from BACKING if there was none.
    fn dirty(&mut self, ino: u64) -> Result<&mut Dirty, Errno> {
        if !self.dirty.contains_key(&ino) {
            let len = fs::metadata(self.real(&self.path(ino)?))
                .map_err(errno)?
                .len();
            let fresh = Dirty {
                pages: BTreeMap::new(),
                size: len,
                cut_to: len,
            };
            self.dirty.insert(ino, fresh);
        }
        self.dirty.get_mut(&ino).ok_or(Errno::EIO)
    }

    /// Page `index` of the file as processes see it.
    fn page(&self, ino: u64, file: &File, index: u64) -> Result<Vec<u8>, Errno> {
        let dirty = self.dirty.get(&ino);
        if let Some(page) = dirty.and_then(|d| d.pages.get(&index)) {
            return Ok(page.clone());
        }
        let mut page = vec![0u8; PAGE as usize];
        let start = index * PAGE;
        let valid = dirty.map_or(u64::MAX, |d| d.cut_to.min(d.size));
        if start < valid {
            let want = (valid - start).min(PAGE) as usize;
            let mut got = 0;
            while got < want {
                match file.read_at(&mut page[got..want], start + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return Err(errno(e)),
                }
            }
        }
        Ok(page)
    }

    fn open_backing(&self, ino: u64) -> Result<File, Errno> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.real(&self.path(ino)?))
            .map_err(errno)
    }

    /// Write the file's unsynced pages and size to BACKING and sync them.
    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let Some(dirty) = self.dirty.remove(&ino) else {
            return Ok(());
        };
        let file = self.open_backing(ino)?;
        apply(&file, &dirty, |_| true).map_err(errno)?;
        file.sync_all().map_err(errno)
    }

    /// The power goes: unsynced state is lost, all of it or (`rng`) each
    /// page and size change at random.
    fn cut(&mut self, rng: Option<&mut rand::rngs::StdRng>) -> io::Result<(usize, usize)> {
        let dirty = std::mem::take(&mut self.dirty);
        let total: usize = dirty.values().map(|d| d.pages.len()).sum();
        let Some(rng) = rng else {
            return Ok((total, 0));
        };
        let mut kept = 0;
        for (ino, d) in dirty {
            let Ok(file) = self.open_backing(ino) else {
                continue;
            };
            let keep: Vec<bool> = (0..d.pages.len()).map(|_| rng.gen_bool(0.5)).collect();
            kept += keep.iter().filter(|k| **k).count();
            let mut choice = keep.into_iter();
            // The size change (a truncation, an extension) is kept or lost
            // as a whole.
            let original = file.metadata()?.len();
            let sized = if rng.gen_bool(0.5) {
                d
            } else {
                Dirty {
                    size: original,
                    cut_to: original,
                    pages: d.pages,
                }
            };
            apply(&file, &sized, |_| choice.next().unwrap_or(false))?;
            file.sync_all()?;
        }
        Ok((total - kept, kept))
    }

    fn forget_path(&mut self, rel: &Path) {
        let gone: Vec<PathBuf> = self
            .inos
            .keys()
            .filter(|p| p.starts_with(rel))
            .cloned()
            .collect();
        for p in gone {
            if let Some(ino) = self.inos.remove(&p) {
                self.paths.remove(&ino);
                self.dirty.remove(&ino);
            }
        }
    }

    fn moved(&mut self, from: &Path, to: &Path) {
        self.forget_path(to);
        let moved: Vec<(PathBuf, u64)> = self
            .inos
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moved {
            let new = match old.strip_prefix(from) {
                Ok(rest) if rest.as_os_str().is_empty() => to.to_owned(),
                Ok(rest) => to.join(rest),
                Err(_) => continue,
            };
            self.inos.remove(&old);
            self.inos.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
    }
}

/// Write `dirty` (the pages `keep` chooses) to `file`.
fn apply(file: &File, dirty: &Dirty, mut keep: impl FnMut(u64) -> bool) -> io::Result<()> {
    if dirty.cut_to < file.metadata()?.len() {
        file.set_len(dirty.cut_to)?;
    }
    for (index, page) in &dirty.pages {
        if !keep(*index) {
            continue;
        }
        let start = index * PAGE;
        if start >= dirty.size {
            continue;
        }
        let len = (dirty.size - start).min(PAGE) as usize;
        file.write_all_at(&page[..len], start)?;
    }
    file.set_len(dirty.size)
}

impl PowerCutFs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remove `parent/name` from BACKING with `how`, and forget it.
    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        how: impl FnOnce(&Path) -> io::Result<()>,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let result = s.child(parent.0, name).and_then(|rel| {
            how(&s.real(&rel)).map_err(errno)?;
            s.forget_path(&rel);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        match s.child(parent.0, name).and_then(|p| s.attr(&p)) {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let mut s = self.state();
        match s.path(ino.0).and_then(|p| s.attr(&p)) {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        let result = (|| {
            let rel = s.path(ino.0)?;
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt as _;
                fs::set_permissions(s.real(&rel), fs::Permissions::from_mode(mode))
                    .map_err(errno)?;
            }
            if let Some(size) = size {
                let d = s.dirty(ino.0)?;
                d.size = size;
                d.cut_to = d.cut_to.min(size);
                d.pages.retain(|index, _| index * PAGE < size);
                if let Some(last) = d.pages.get_mut(&(size / PAGE)) {
                    last[(size % PAGE) as usize..].fill(0);
                }
            }
            s.attr(&rel)
        })();
        match result {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Unix sockets only (the DS's admin socket): bound in BACKING, the
        // file stays when the listener is dropped.
        if mode & 0o170000 != 0o140000 {
            return reply.error(Errno::EPERM);
        }
        let mut s = self.state();
        let result = s.child(parent.0, name).and_then(|rel| {
            std::os::unix::net::UnixListener::bind(s.real(&rel)).map_err(errno)?;
            s.attr(&rel)
        });
        match result {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        let result = s.child(parent.0, name).and_then(|rel| {
            fs::create_dir(s.real(&rel)).map_err(errno)?;
            s.attr(&rel)
        });
        match result {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, |p| fs::remove_file(p), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, |p| fs::remove_dir(p), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.bits() != 0 {
            return reply.error(Errno::EINVAL);
        }
        let mut s = self.state();
        let result = (|| {
            let from = s.child(parent.0, name)?;
            let to = s.child(newparent.0, newname)?;
            fs::rename(s.real(&from), s.real(&to)).map_err(errno)?;
            s.moved(&from, &to);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.state();
        let result = (|| {
            let file = s.open_backing(ino.0)?;
            let len = match s.dirty.get(&ino.0) {
                Some(d) => d.size,
                None => file.metadata().map_err(errno)?.len(),
            };
            let end = (offset + u64::from(size)).min(len);
            let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
            let mut at = offset;
            while at < end {
                let page = s.page(ino.0, &file, at / PAGE)?;
                let from = (at % PAGE) as usize;
                let to = ((end - at) as usize + from).min(PAGE as usize);
                out.extend_from_slice(&page[from..to]);
                at += (to - from) as u64;
            }
            Ok(out)
        })();
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        let result = (|| {
            let file = s.open_backing(ino.0)?;
            s.dirty(ino.0)?;
            let mut done = 0usize;
            while done < data.len() {
                let at = offset + done as u64;
                let index = at / PAGE;
                let mut page = s.page(ino.0, &file, index)?;
                let from = (at % PAGE) as usize;
                let n = (PAGE as usize - from).min(data.len() - done);
                page[from..from + n].copy_from_slice(&data[done..done + n]);
                let d = s.dirty(ino.0)?;
                d.pages.insert(index, page);
                done += n;
            }
            let d = s.dirty(ino.0)?;
            d.size = d.size.max(offset + data.len() as u64);
            Ok(data.len())
        })();
        match result {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state().sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.state();
        let result = (|| {
            let rel = s.path(ino.0)?;
            let mut names: Vec<_> = fs::read_dir(s.real(&rel))
                .map_err(errno)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect();
            names.sort();
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for name in names {
                let child = rel.join(&name);
                if let Ok(attr) = s.attr(&child) {
                    entries.push((attr.ino.0, attr.kind, name));
                }
            }
            Ok(entries)
        })();
        match result {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            1 << 24,
            1 << 23,
            1 << 23,
            1 << 20,
            1 << 19,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        let result = s.child(parent.0, name).and_then(|rel| {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut options = OpenOptions::new();
            options.write(true).mode(mode & 0o7777);
            if flags & O_EXCL != 0 {
                options.create_new(true);
            } else {
                options.create(true);
            }
            options.open(s.real(&rel)).map_err(errno)?;
            s.attr(&rel)
        });
        match result {
            Ok(attr) => reply.created(
                &NO_CACHE,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, backing, mount] = args.as_slice() else {
        eprintln!("usage: powercut-fs BACKING MOUNT");
        std::process::exit(2);
    };
    let state = Arc::new(Mutex::new(State {
        backing: PathBuf::from(backing),
        paths: HashMap::from([(ROOT, PathBuf::new())]),
        inos: HashMap::from([(PathBuf::new(), ROOT)]),
        next_ino: ROOT,
        dirty: HashMap::new(),
    }));
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("powercut".into())];
    let session = match fuser::spawn_mount2(PowerCutFs(state.clone()), mount, &config) {
        Ok(session) => session,
        Err(e) => {
            println!("error {e}");
            std::process::exit(1);
        }
    };
    println!("mounted");
    let mut out = io::stdout();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let answer = match words.as_slice() {
            ["cut", "all"] => s.cut(None),
            ["cut", "random", seed] => {
                let seed = seed.parse().unwrap_or(0);
                s.cut(Some(&mut rand::rngs::StdRng::seed_from_u64(seed)))
            }
            ["quit"] => break,
            _ => Err(io::Error::other(format!("unknown command {line:?}"))),
        };
        drop(s);
        let reply = match answer {
            Ok((lost, kept)) => format!("cut {lost} {kept}"),
            Err(e) => format!("error {e}"),
        };
        if writeln!(out, "{reply}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    drop(session);
}
