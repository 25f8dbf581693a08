//! Overlayfs snapshots: one committed, read-only directory per layer chain, shared by every
//! image that has that chain, and containers' writable snapshots on top of them.
//!
//! ```text
//! <root>/snapshots/<n>/fs      a committed layer (overlay whiteouts as unpacked), or a
//!                              container's upper directory
//! <root>/snapshots/<n>/work    overlayfs' work directory (writable snapshots only)
//! <root>/snapshots/new-*       a snapshot being built; never named by a record
//! ```
//!
//! `n` is a short number from the metadata store, not the chain id, so that an overlay
//! `lowerdir=` list of many layers stays under the kernel's one-page limit for mount options.
//! A committed snapshot is built in a `new-*` directory, flushed with `syncfs`, renamed to its
//! number, and only then recorded (in the same write transaction that allocated the number):
//! after a crash a directory without a record is garbage and [`Snapshotter::remove_orphans`]
//! deletes it.
//!
//! Owns everything under `<root>/snapshots` and the `snapshots`/`active` tables. It does not
//! mount anything: it hands out containerd's `Mount` descriptions (the shim mounts them), it
//! does not decide which snapshots are still needed (the store's garbage collection does), and
//! it never reads the content store except through the closure a caller gives to
//! [`Snapshotter::commit_with`].

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use containerd_shim_protos::api::Mount;

use super::error::{ImageError, Result};
use super::metadata::{now_secs, ActiveRecord, Metadata, SnapshotRecord, Table, Tx};
use super::reference::Digest;

const ID_COUNTER: &str = "snapshot";
const TEMP_PREFIX: &str = "new-";
/// One page: the most option bytes `mount(2)` passes to overlayfs.
const MAX_MOUNT_OPTIONS: usize = 4096;

/// Disk use of a snapshot: allocated bytes and inodes, hard links counted once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.bytes += o.bytes;
        self.inodes += o.inodes;
    }
}

/// A committed layer snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub chain_id: Digest,
    pub parent: Option<Digest>,
    pub usage: Usage,
    /// The directory holding the layer's files.
    pub path: PathBuf,
}

/// A container's writable snapshot or a read-only view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveInfo {
    pub key: String,
    pub parent: Option<Digest>,
    pub readonly: bool,
}

/// The overlayfs snapshotter.
#[derive(Debug)]
pub struct Snapshotter {
    dir: PathBuf,
    meta: Arc<Metadata>,
    /// Whether the kernel knows overlayfs' `index` option: `index=off` lets one lower
    /// directory sit under many mounts without the inode index tying them together.
    overlay_index: bool,
    temp_seq: AtomicU64,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_owned();
    move |e| ImageError::Internal(format!("snapshots: {what} {}: {e}", path.display()))
}

fn parse_chain(s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| ImageError::internal("snapshot metadata", e))
}

impl Snapshotter {
    pub(crate) fn open(dir: PathBuf, meta: Arc<Metadata>) -> Result<Snapshotter> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        Ok(Snapshotter {
            dir,
            meta,
            overlay_index: Path::new("/sys/module/overlay/parameters/index").exists(),
            temp_seq: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.dir
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string()).join("fs")
    }

    fn info_of(&self, chain: &str, r: &SnapshotRecord) -> Result<SnapshotInfo> {
        Ok(SnapshotInfo {
            chain_id: parse_chain(chain)?,
            parent: r.parent.as_deref().map(parse_chain).transpose()?,
            usage: Usage {
                bytes: r.bytes,
                inodes: r.inodes,
            },
            path: self.fs_dir(r.id),
        })
    }

    /// The committed snapshot of `chain`, if there is one.
    pub fn info(&self, chain: &Digest) -> Result<Option<SnapshotInfo>> {
        let r = self.meta.read()?;
        match r.get::<SnapshotRecord>(Table::Snapshots, &chain.to_string())? {
            Some(rec) => Ok(Some(self.info_of(&chain.to_string(), &rec)?)),
            None => Ok(None),
        }
    }

    /// Every committed snapshot.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let r = self.meta.read()?;
        r.list::<SnapshotRecord>(Table::Snapshots)?
            .iter()
            .map(|(k, v)| self.info_of(k, v))
            .collect()
    }

    /// Every writable snapshot and view.
    pub fn list_active(&self) -> Result<Vec<ActiveInfo>> {
        let r = self.meta.read()?;
        r.list::<ActiveRecord>(Table::Active)?
            .into_iter()
            .map(|(key, a)| {
                Ok(ActiveInfo {
                    key,
                    parent: a.parent.as_deref().map(parse_chain).transpose()?,
                    readonly: a.readonly,
                })
            })
            .collect()
    }

    fn temp_dir(&self) -> PathBuf {
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()))
    }

    /// Builds the committed snapshot of `chain` on `parent`: `fill` writes the layer into an
    /// empty directory, which becomes the snapshot only if `fill` succeeds. Returns `None`
    /// (and does not call `fill`) when the snapshot exists already. Blocking.
    ///
    /// Callers make sure one chain is not built twice at once (the puller's in-flight map);
    /// if it happens anyway the second result is discarded.
    pub(crate) fn commit_with<T>(
        &self,
        chain: &Digest,
        parent: Option<&Digest>,
        fill: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<Option<T>> {
        let key = chain.to_string();
        {
            let r = self.meta.read()?;
            if r.get::<SnapshotRecord>(Table::Snapshots, &key)?.is_some() {
                return Ok(None);
            }
            if let Some(p) = parent {
                if r.get::<SnapshotRecord>(Table::Snapshots, &p.to_string())?
                    .is_none()
                {
                    return Err(ImageError::NotFound(format!(
                        "snapshots: parent {p} of {chain} does not exist"
                    )));
                }
            }
        }
        let tmp = self.temp_dir();
        let fs_dir = tmp.join("fs");
        let built = (|| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&fs_dir)
                .map_err(io_err("create", &fs_dir))?;
            let out = fill(&fs_dir)?;
            sync_fs(&fs_dir)?;
            let usage = disk_usage(&fs_dir)?;
            Ok((out, usage))
        })();
        let (out, usage) = match built {
            Ok(v) => v,
            Err(e) => {
                remove_dir_quiet(&tmp);
                return Err(e);
            }
        };

        let w = self.meta.write()?;
        if w.get::<SnapshotRecord>(Table::Snapshots, &key)?.is_some() {
            drop(w);
            remove_dir_quiet(&tmp);
            return Ok(None);
        }
        let final_dir = match self.place(&w, &tmp) {
            Ok((id, dir)) => {
                w.put(
                    Table::Snapshots,
                    &key,
                    &SnapshotRecord {
                        id,
                        parent: parent.map(ToString::to_string),
                        bytes: usage.bytes,
                        inodes: usage.inodes,
                        created: now_secs(),
                    },
                )?;
                dir
            }
            Err(e) => {
                remove_dir_quiet(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = w.commit() {
            remove_dir_quiet(&final_dir);
            return Err(e);
        }
        Ok(Some(out))
    }

    /// Renames a finished temp directory to a fresh number, within `w` (which allocates it).
    fn place(&self, w: &super::metadata::WriteTx<'_>, tmp: &Path) -> Result<(u64, PathBuf)> {
        loop {
            let id = w.next_id(ID_COUNTER)?;
            let dir = self.dir.join(id.to_string());
            // A directory with this number can only be a leftover of a crash between the
            // rename and the commit that is not cleaned up yet: skip the number.
            if dir.symlink_metadata().is_ok() {
                continue;
            }
            fs::rename(tmp, &dir).map_err(io_err("rename into", &dir))?;
            fsync_dir(&self.dir)?;
            return Ok((id, dir));
        }
    }

    /// The lower directories of `parent`'s chain, top first.
    fn lowers(&self, r: &super::metadata::ReadTx<'_>, parent: &Digest) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut next = Some(parent.to_string());
        while let Some(chain) = next {
            let rec: SnapshotRecord = r.get(Table::Snapshots, &chain)?.ok_or_else(|| {
                ImageError::NotFound(format!("snapshots: layer snapshot {chain} does not exist"))
            })?;
            out.push(self.fs_dir(rec.id));
            next = rec.parent;
            if out.len() > 4096 {
                return Err(ImageError::Internal(format!(
                    "snapshots: chain of {parent} loops"
                )));
            }
        }
        Ok(out)
    }

    fn create_active(
        &self,
        key: &str,
        parent: Option<&Digest>,
        readonly: bool,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(ImageError::InvalidArgument(
                "snapshots: empty snapshot key".into(),
            ));
        }
        let tmp = self.temp_dir();
        let made = (|| {
            for sub in ["fs", "work"] {
                let p = tmp.join(sub);
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&p)
                    .map_err(io_err("create", &p))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            remove_dir_quiet(&tmp);
            return Err(e);
        }
        let w = self.meta.write()?;
        let checked = (|| {
            if w.get::<ActiveRecord>(Table::Active, key)?.is_some() {
                return Err(ImageError::AlreadyExists(format!(
                    "snapshots: snapshot {key:?} already exists"
                )));
            }
            if let Some(p) = parent {
                if w.get::<SnapshotRecord>(Table::Snapshots, &p.to_string())?
                    .is_none()
                {
                    return Err(ImageError::NotFound(format!(
                        "snapshots: parent {p} of {key:?} does not exist"
                    )));
                }
            }
            Ok(())
        })();
        if let Err(e) = checked {
            remove_dir_quiet(&tmp);
            return Err(e);
        }
        let (id, dir) = match self.place(&w, &tmp) {
            Ok(v) => v,
            Err(e) => {
                remove_dir_quiet(&tmp);
                return Err(e);
            }
        };
        let rec = ActiveRecord {
            id,
            parent: parent.map(ToString::to_string),
            readonly,
            created: now_secs(),
        };
        let done = w.put(Table::Active, key, &rec).and_then(|()| w.commit());
        if let Err(e) = done {
            remove_dir_quiet(&dir);
            return Err(e);
        }
        self.mounts(key)
    }

    /// A writable snapshot `key` on the layer chain `parent` (the image's top chain id; `None`
    /// for an image without layers): an overlay of a fresh upper directory on the chain.
    pub fn prepare(&self, key: &str, parent: Option<&Digest>) -> Result<Vec<Mount>> {
        self.create_active(key, parent, false)
    }

    /// A read-only view `key` of the chain `parent`: a read-only bind mount for a single
    /// layer, an overlay without upper directory for more.
    pub fn view(&self, key: &str, parent: Option<&Digest>) -> Result<Vec<Mount>> {
        self.create_active(key, parent, true)
    }

    /// The mounts of the writable snapshot or view `key`, as [`Snapshotter::prepare`] gave them.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self.meta.read()?;
        let rec: ActiveRecord = r
            .get(Table::Active, key)?
            .ok_or_else(|| ImageError::NotFound(format!("snapshots: no snapshot {key:?}")))?;
        let lowers = match &rec.parent {
            Some(p) => self.lowers(&r, &parse_chain(p)?)?,
            None => Vec::new(),
        };
        let own = self.dir.join(rec.id.to_string());
        let mount = |type_: &str, source: &Path, options: Vec<String>| Mount {
            type_: type_.to_owned(),
            source: source.display().to_string(),
            options,
            ..Default::default()
        };
        let lowerdir = || {
            format!(
                "lowerdir={}",
                lowers
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            )
        };
        let mut overlay_opts = Vec::new();
        if self.overlay_index {
            overlay_opts.push("index=off".to_owned());
        }
        let m = if rec.readonly {
            match lowers.len() {
                0 => mount("bind", &own.join("fs"), vec!["ro".into(), "rbind".into()]),
                1 => mount("bind", &lowers[0], vec!["ro".into(), "rbind".into()]),
                _ => {
                    overlay_opts.push(lowerdir());
                    mount("overlay", Path::new("overlay"), overlay_opts)
                }
            }
        } else if lowers.is_empty() {
            mount("bind", &own.join("fs"), vec!["rw".into(), "rbind".into()])
        } else {
            overlay_opts.push(format!("workdir={}", own.join("work").display()));
            overlay_opts.push(format!("upperdir={}", own.join("fs").display()));
            overlay_opts.push(lowerdir());
            mount("overlay", Path::new("overlay"), overlay_opts)
        };
        // The kernel copies mount options into one page; a longer list would fail in the
        // shim with a bare EINVAL, so say what is wrong here.
        let len: usize = m.options.iter().map(|o| o.len() + 1).sum();
        if len >= MAX_MOUNT_OPTIONS {
            return Err(ImageError::FailedPrecondition(format!(
                "snapshots: {key:?} stacks {} layers, whose overlay options ({len} bytes) exceed \
                 the kernel's {MAX_MOUNT_OPTIONS}",
                lowers.len()
            )));
        }
        Ok(vec![m])
    }

    /// Removes the writable snapshot or view `key` (unmounted by the caller); `Ok(false)` if
    /// there was none, so that a retried removal succeeds.
    pub fn remove(&self, key: &str) -> Result<bool> {
        let w = self.meta.write()?;
        let Some(rec) = w.get::<ActiveRecord>(Table::Active, key)? else {
            return Ok(false);
        };
        w.remove(Table::Active, key)?;
        w.commit()?;
        remove_dir_quiet(&self.dir.join(rec.id.to_string()));
        Ok(true)
    }

    /// What the writable snapshot `key` holds: the container's writable layer.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec: ActiveRecord = self
            .meta
            .read()?
            .get(Table::Active, key)?
            .ok_or_else(|| ImageError::NotFound(format!("snapshots: no snapshot {key:?}")))?;
        disk_usage(&self.fs_dir(rec.id))
    }

    /// Total use of the writable snapshots: the container filesystem of ImageFsInfo.
    pub fn active_usage(&self) -> Result<Usage> {
        let r = self.meta.read()?;
        let mut total = Usage::default();
        for (_, rec) in r.list::<ActiveRecord>(Table::Active)? {
            total += disk_usage(&self.fs_dir(rec.id))?;
        }
        Ok(total)
    }

    /// Deletes the directory of a committed snapshot whose record the caller removed.
    pub(crate) fn delete_dir(&self, id: u64) {
        remove_dir_quiet(&self.dir.join(id.to_string()));
    }

    /// Deletes every directory no record names: `new-*` builds and numbered directories a
    /// crash left between rename and commit. Run at open, before any build starts.
    pub(crate) fn remove_orphans(&self) -> Result<usize> {
        let r = self.meta.read()?;
        let mut known: HashSet<u64> = HashSet::new();
        for (_, s) in r.list::<SnapshotRecord>(Table::Snapshots)? {
            known.insert(s.id);
        }
        for (_, a) in r.list::<ActiveRecord>(Table::Active)? {
            known.insert(a.id);
        }
        drop(r);
        let mut removed = 0;
        let entries = fs::read_dir(&self.dir).map_err(io_err("read", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("read", &self.dir))?;
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| known.contains(&id));
            if !keep {
                tracing::info!(path = %entry.path().display(), "removing a snapshot directory no record names");
                remove_dir_quiet(&entry.path());
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn sync_fs(dir: &Path) -> Result<()> {
    let f = fs::File::open(dir).map_err(io_err("open", dir))?;
    // One syncfs flushes every file of the layer, far cheaper than an fsync per file.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io_err("syncfs", dir)(io::Error::last_os_error()));
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn remove_dir_quiet(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove snapshot directory");
        }
    }
}

/// Allocated bytes and inodes under `root` (itself included), like `du`: symlinks are not
/// followed, a file with several links is counted once.
pub(crate) fn disk_usage(root: &Path) -> Result<Usage> {
    let mut usage = Usage::default();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![root.to_owned()];
    let top = match root.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(usage),
        Err(e) => return Err(io_err("stat", root)(e)),
    };
    usage.inodes += 1;
    usage.bytes += top.blocks() * 512;
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("read", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("read", &dir))?;
            let path = entry.path();
            let m = match path.symlink_metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            usage.inodes += 1;
            usage.bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).expect("digest")
    }

    fn setup() -> (tempfile::TempDir, Arc<Metadata>, Snapshotter) {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = Arc::new(Metadata::open(&dir.path().join("meta.db")).expect("meta"));
        let snaps = Snapshotter::open(dir.path().join("snapshots"), meta.clone()).expect("open");
        (dir, meta, snaps)
    }

    fn write_file(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
        fs::write(dir.join(name), data).map_err(|e| ImageError::internal("test", e))
    }

    #[test]
    fn commit_prepare_view_remove() {
        let (_t, _m, s) = setup();
        let (a, b, c) = (digest('a'), digest('b'), digest('c'));
        assert_eq!(
            s.commit_with(&a, None, |d| write_file(d, "a", b"A"))
                .expect("a"),
            Some(())
        );
        // Built once: a second commit of the chain does not run its closure.
        assert_eq!(
            s.commit_with(&a, None, |_| -> Result<()> { panic!("rebuilt") })
                .expect("again"),
            None
        );
        s.commit_with(&b, Some(&a), |d| write_file(d, "b", b"B"))
            .expect("b");
        // A failed build leaves nothing behind.
        let err = s
            .commit_with(&c, Some(&b), |d| {
                write_file(d, "partial", b"x")?;
                Err::<(), _>(ImageError::BadImage("hostile".into()))
            })
            .expect_err("failed build");
        assert!(matches!(err, ImageError::BadImage(_)));
        assert!(s.info(&c).expect("info").is_none());
        let names: Vec<_> = fs::read_dir(s.root())
            .expect("read")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| n.parse::<u64>().is_ok()), "{names:?}");
        // Missing parent.
        assert!(matches!(
            s.commit_with(&c, Some(&digest('d')), |_| Ok(())),
            Err(ImageError::NotFound(_))
        ));

        let info_a = s.info(&a).expect("info").expect("a exists");
        let info_b = s.info(&b).expect("info").expect("b exists");
        assert_eq!(info_b.parent, Some(a.clone()));
        assert!(info_b.usage.inodes >= 2);

        let m = s.prepare("ctr", Some(&b)).expect("prepare");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].type_, "overlay");
        let lower = format!(
            "lowerdir={}:{}",
            info_b.path.display(),
            info_a.path.display()
        );
        assert!(m[0].options.contains(&lower), "{:?}", m[0].options);
        assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=")));
        assert!(m[0].options.iter().any(|o| o.starts_with("workdir=")));
        assert_eq!(s.mounts("ctr").expect("mounts"), m);
        assert!(matches!(
            s.prepare("ctr", Some(&b)),
            Err(ImageError::AlreadyExists(_))
        ));

        let v = s.view("view", Some(&a)).expect("view");
        assert_eq!(v[0].type_, "bind");
        assert_eq!(v[0].source, info_a.path.display().to_string());
        assert!(v[0].options.contains(&"ro".to_owned()));
        let v2 = s.view("view2", Some(&b)).expect("view2");
        assert_eq!(v2[0].type_, "overlay");
        assert!(!v2[0].options.iter().any(|o| o.starts_with("upperdir=")));
        let empty = s.prepare("scratch", None).expect("scratch");
        assert_eq!(empty[0].type_, "bind");
        assert!(empty[0].options.contains(&"rw".to_owned()));

        assert_eq!(s.list_active().expect("active").len(), 4);
        assert!(s.usage("ctr").expect("usage").inodes >= 1);
        assert!(s.remove("ctr").expect("remove"));
        assert!(!s.remove("ctr").expect("remove again"));
        assert!(matches!(s.mounts("ctr"), Err(ImageError::NotFound(_))));
    }

    #[test]
    fn orphans_are_removed_on_open() {
        let (t, meta, s) = setup();
        let a = digest('a');
        s.commit_with(&a, None, |d| write_file(d, "a", b"A"))
            .expect("a");
        // What a crash leaves: a build in progress and a renamed but unrecorded directory.
        fs::create_dir_all(s.root().join("new-1-0/fs")).expect("mkdir");
        fs::create_dir_all(s.root().join("999/fs")).expect("mkdir");
        drop(s);
        let s = Snapshotter::open(t.path().join("snapshots"), meta).expect("reopen");
        assert_eq!(s.remove_orphans().expect("orphans"), 2);
        assert!(s.info(&a).expect("info").is_some());
        assert_eq!(fs::read_dir(s.root()).expect("read").count(), 1);
    }

    #[test]
    fn usage_counts_hard_links_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("f"), vec![1u8; 8192]).expect("write");
        fs::hard_link(dir.path().join("f"), dir.path().join("g")).expect("link");
        let u = disk_usage(dir.path()).expect("usage");
        assert_eq!(u.inodes, 2); // the directory and the file
        assert!(u.bytes >= 8192);
    }
}
