//! The content store: image blobs (layers, configs, manifests) kept by digest on local disk.
//!
//! Owns everything under its root directory and nothing outside it:
//!
//! ```text
//! <root>/blobs/<algorithm>/<hex>      committed blobs, read-only (0444), content == digest
//! <root>/ingest/<sha256(ref)>/data    bytes received so far for one in-flight write
//! <root>/ingest/<sha256(ref)>/meta.json   { ref, expected, total, started }
//! ```
//!
//! The one promise it keeps: a file under `blobs/` always holds exactly the bytes its name
//! claims. Bytes are streamed into the ingest directory, hashed as they arrive, and only a
//! commit whose size and digest both match renames the data file into `blobs/` (after an
//! fsync of the file, followed by one of the directory). A crash at any point leaves either
//! no blob or a complete one, plus at worst an ingest that the next writer of the same ref
//! resumes (re-hashing what is there) or that [`ContentStore::abort_ingest`] removes.
//!
//! It does not know images, manifests, registries or reference counting: deciding which
//! blobs are still used (garbage collection) belongs to the image metadata store, which
//! calls [`ContentStore::delete`].
//!
//! One writer per ref at a time, across threads and processes: the ingest directory is
//! `flock`ed. A second [`ContentStore::writer`] for a ref that is being written fails at once
//! with [`ContentError::Locked`] instead of waiting. The store is synchronous and a wait
//! would park a thread for the length of a download; sharing one download between two pulls
//! is done where the pulls are (the async puller keeps its in-flight digests and makes the
//! second pull await the first); `Locked` is the signal for the cases that cannot see each
//! other, such as another process, and means "someone is fetching it: wait, then look again
//! with [`ContentStore::info`]". Use the blob digest as the ref so that two pulls of the same
//! blob meet on the same ingest.
//!
//! All calls do blocking file I/O; async callers run them on a blocking thread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::reference::Digest;

/// Size and creation time of a committed blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: u64,
    pub created: SystemTime,
}

/// An ingest found on disk: a write that was started and neither committed nor aborted.
#[derive(Clone, Debug)]
pub struct IngestStatus {
    pub reference: String,
    pub expected: Digest,
    pub total: Option<u64>,
    pub offset: u64,
    pub started: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("content store: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("content store: blob {0} not found")]
    NotFound(Digest),
    #[error("content store: blob {0} already exists")]
    AlreadyExists(Digest),
    #[error("content store: a write of {reference:?} is already in progress")]
    Locked { reference: String },
    #[error("content store: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: String },
    #[error(
        "content store: blob {digest} is larger than its declared size {expected} \
         (received at least {received} bytes)"
    )]
    SizeExceeded {
        digest: Digest,
        expected: u64,
        received: u64,
    },
    #[error("content store: blob {digest} is incomplete: {actual} of {expected} bytes")]
    Incomplete {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("content store: unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("content store: writer for {reference:?} is no longer usable after an earlier error")]
    Poisoned { reference: String },
}

pub type Result<T, E = ContentError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ContentError {
    let path = path.to_path_buf();
    move |source| ContentError::Io { op, path, source }
}

/// The content store rooted at one directory.
#[derive(Clone, Debug)]
pub struct ContentStore {
    root: PathBuf,
}

/// What `meta.json` holds. The write offset is deliberately not in it: the length of
/// `data` is the offset, and a resumed writer re-hashes `data`, so no counter can disagree
/// with the bytes (a counter would need an fsync per write to be trusted after a crash).
#[derive(Serialize, Deserialize)]
struct IngestMeta {
    #[serde(rename = "ref")]
    reference: String,
    expected: String,
    total: Option<u64>,
    /// Seconds since the epoch.
    started: u64,
}

impl ContentStore {
    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ContentStore> {
        let root = root.into();
        for sub in ["blobs", "ingest"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        Ok(ContentStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a committed blob lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf> {
        let alg = Algorithm::of(digest)?;
        Ok(self.root.join("blobs").join(alg.name()).join(digest.hex()))
    }

    fn ingest_dir(&self, reference: &str) -> PathBuf {
        // Refs are caller-chosen strings (often containing ':' and '/'); hashing them gives a
        // fixed-length, path-safe directory name. The ref itself is kept in meta.json.
        self.root
            .join("ingest")
            .join(to_hex(&sha2::Sha256::digest(reference.as_bytes())))
    }

    /// Size and time of a committed blob; `None` if the store does not have it.
    pub fn info(&self, digest: &Digest) -> Result<Option<BlobInfo>> {
        let path = self.blob_path(digest)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(BlobInfo {
                size: m.len(),
                created: m.created().or_else(|_| m.modified()).unwrap_or(UNIX_EPOCH),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Opens a committed blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest)?;
        File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ContentError::NotFound(digest.clone())
            } else {
                io_err("open", &path)(e)
            }
        })
    }

    /// Reads a whole committed blob (meant for manifests and configs, not layers).
    pub fn read_all(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut f = self.open_blob(digest)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(io_err("read", &self.blob_path(digest)?))?;
        Ok(buf)
    }

    /// Re-hashes a committed blob; for a consistency check, not for the read path (blobs
    /// were verified when they were committed).
    pub fn verify(&self, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest)?;
        let mut f = self.open_blob(digest)?;
        let mut hasher = Algorithm::of(digest)?.hasher();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).map_err(io_err("read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual = hasher.finish();
        if actual != digest.to_string() {
            return Err(ContentError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Removes a committed blob. `Ok(false)` if it was not there, so that garbage collection
    /// can run again after a crash without failing on what it already removed.
    pub fn delete(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Every committed blob with its size. Files whose names are not valid digests (which the
    /// store never writes) are skipped.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>> {
        let blobs = self.root.join("blobs");
        let mut out = Vec::new();
        for alg in read_dir_names(&blobs)? {
            let dir = blobs.join(&alg);
            for name in read_dir_names(&dir)? {
                let Ok(digest) = Digest::parse(&format!("{alg}:{name}")) else {
                    tracing::warn!(path = %dir.join(&name).display(), "stray file in content store");
                    continue;
                };
                let path = dir.join(&name);
                match fs::metadata(&path) {
                    Ok(m) if m.is_file() => out.push((digest, m.len())),
                    Ok(_) => {}
                    // Deleted between the listing and the stat.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("stat", &path)(e)),
                }
            }
        }
        out.sort_by(|a, b| a.0.hex().cmp(b.0.hex()));
        Ok(out)
    }

    /// Disk bytes (allocated blocks) and inodes used by the store, ingests included: the
    /// figures kubelet's image garbage collection reads from ImageFsInfo.
    pub fn usage(&self) -> Result<(u64, u64)> {
        let mut bytes = 0u64;
        let mut inodes = 0u64;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read dir", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("read dir", &dir))?;
                let m = match entry.path().symlink_metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("stat", &entry.path())(e)),
                };
                inodes += 1;
                bytes += m.blocks() * 512;
                if m.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        Ok((bytes, inodes))
    }

    /// Starts, or resumes, writing the blob `expected` under the ingest key `reference`.
    ///
    /// If an ingest for `reference` exists with the same expected digest and size, the
    /// writer continues from its end (see [`Writer::offset`]); the caller fetches from there.
    /// An ingest left by a different expectation is discarded. `size` (the descriptor's
    /// size) lets the writer refuse a blob that grows past it at the first byte too many.
    ///
    /// Errors: [`ContentError::AlreadyExists`] if the blob is already committed (nothing to
    /// fetch), [`ContentError::Locked`] if another writer holds the ref.
    pub fn writer(&self, reference: &str, expected: &Digest, size: Option<u64>) -> Result<Writer> {
        let alg = Algorithm::of(expected)?;
        if self.info(expected)?.is_some() {
            return Err(ContentError::AlreadyExists(expected.clone()));
        }
        let dir = self.ingest_dir(reference);
        let lock = self.lock_ingest(&dir, reference)?;
        // The blob may have been committed by a writer that held the lock until just now.
        if self.info(expected)?.is_some() {
            remove_dir_all_quiet(&dir);
            return Err(ContentError::AlreadyExists(expected.clone()));
        }

        let meta_path = dir.join("meta.json");
        let data_path = dir.join("data");
        let resumable = match fs::read(&meta_path) {
            Ok(raw) => match serde_json::from_slice::<IngestMeta>(&raw) {
                Ok(m) => {
                    m.reference == reference
                        && m.expected == expected.to_string()
                        && m.total == size
                }
                Err(_) => false,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err("read", &meta_path)(e)),
        };

        let mut hasher = alg.hasher();
        let mut offset = 0u64;
        let data = if resumable {
            let mut f = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&data_path)
                .map_err(io_err("open", &data_path))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).map_err(io_err("read", &data_path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                offset += n as u64;
            }
            if size.is_some_and(|s| offset > s) {
                // Cannot be the right content: start over rather than fail forever.
                f.set_len(0).map_err(io_err("truncate", &data_path))?;
                hasher = alg.hasher();
                offset = 0;
            }
            f
        } else {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&data_path)
                .map_err(io_err("create", &data_path))?;
            let meta = IngestMeta {
                reference: reference.to_string(),
                expected: expected.to_string(),
                total: size,
                started: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_secs(),
            };
            let raw = serde_json::to_vec(&meta).map_err(|e| ContentError::Io {
                op: "encode",
                path: meta_path.clone(),
                source: io::Error::other(e),
            })?;
            let tmp = dir.join("meta.json.tmp");
            fs::write(&tmp, raw).map_err(io_err("write", &tmp))?;
            fs::rename(&tmp, &meta_path).map_err(io_err("rename", &meta_path))?;
            f
        };

        Ok(Writer {
            blobs: self.root.join("blobs").join(alg.name()),
            dir,
            reference: reference.to_string(),
            expected: expected.clone(),
            total: size,
            offset,
            hasher,
            data,
            state: State::Open,
            _lock: lock,
        })
    }

    /// Creates the ingest directory and takes its lock. A committing writer removes the
    /// directory while it holds the lock, so after locking we check that the directory we
    /// hold is still the one at the path, and start again if it is not.
    fn lock_ingest(&self, dir: &Path, reference: &str) -> Result<Flock<File>> {
        for _ in 0..8 {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            let f = match File::open(dir) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open", dir)(e)),
            };
            let lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(ContentError::Locked {
                        reference: reference.to_string(),
                    })
                }
                Err((_, errno)) => return Err(io_err("lock", dir)(io::Error::from(errno))),
            };
            let held = lock.metadata().map_err(io_err("stat", dir))?;
            match fs::metadata(dir) {
                Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => return Ok(lock),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", dir)(e)),
            }
        }
        Err(ContentError::Locked {
            reference: reference.to_string(),
        })
    }

    /// Ingests left on disk (interrupted pulls). Locked ones are being written now.
    pub fn ingests(&self) -> Result<Vec<IngestStatus>> {
        let root = self.root.join("ingest");
        let mut out = Vec::new();
        for name in read_dir_names(&root)? {
            let dir = root.join(&name);
            let Ok(raw) = fs::read(dir.join("meta.json")) else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<IngestMeta>(&raw) else {
                continue;
            };
            let Ok(expected) = Digest::parse(&meta.expected) else {
                continue;
            };
            let offset = fs::metadata(dir.join("data")).map(|m| m.len()).unwrap_or(0);
            out.push(IngestStatus {
                reference: meta.reference,
                expected,
                total: meta.total,
                offset,
                started: UNIX_EPOCH + Duration::from_secs(meta.started),
            });
        }
        Ok(out)
    }

    /// Removes the ingest of `reference` if no writer holds it. `Ok(false)` if there was none.
    pub fn abort_ingest(&self, reference: &str) -> Result<bool> {
        let dir = self.ingest_dir(reference);
        if !dir.exists() {
            return Ok(false);
        }
        let _lock = self.lock_ingest(&dir, reference)?;
        fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
        Ok(true)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// An earlier error left the writer's hash and the file possibly out of step.
    Poisoned,
}

/// One in-flight blob write. Dropping it without [`Writer::commit`] or [`Writer::abort`]
/// keeps the ingest for a later resume and releases the lock.
#[derive(Debug)]
pub struct Writer {
    blobs: PathBuf,
    dir: PathBuf,
    reference: String,
    expected: Digest,
    total: Option<u64>,
    offset: u64,
    hasher: Hasher,
    data: File,
    state: State,
    _lock: Flock<File>,
}

impl Writer {
    /// Bytes already in the ingest: where the download has to continue from.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn expected(&self) -> &Digest {
        &self.expected
    }

    pub fn total(&self) -> Option<u64> {
        self.total
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// Appends bytes. Refuses, and discards the ingest, as soon as the bytes run past the
    /// declared size: the source is sending something other than the descriptor's blob.
    pub fn write(&mut self, buf: &[u8]) -> Result<()> {
        if self.state != State::Open {
            return Err(ContentError::Poisoned {
                reference: self.reference.clone(),
            });
        }
        let received = self.offset + buf.len() as u64;
        if let Some(total) = self.total {
            if received > total {
                self.state = State::Poisoned;
                remove_dir_all_quiet(&self.dir);
                return Err(ContentError::SizeExceeded {
                    digest: self.expected.clone(),
                    expected: total,
                    received,
                });
            }
        }
        if let Err(e) = self.data.write_all(buf) {
            // Part of `buf` may be in the file but not in the hash; a later resume re-hashes
            // the file, this writer cannot go on.
            self.state = State::Poisoned;
            return Err(io_err("write", &self.dir.join("data"))(e));
        }
        self.hasher.update(buf);
        self.offset = received;
        Ok(())
    }

    /// Verifies size and digest and moves the blob into place.
    ///
    /// A short blob (fewer bytes than the declared size) keeps its ingest, so the rest can
    /// be fetched later. A digest mismatch removes the ingest: those bytes are wrong.
    pub fn commit(self) -> Result<()> {
        if self.state != State::Open {
            return Err(ContentError::Poisoned {
                reference: self.reference.clone(),
            });
        }
        if let Some(total) = self.total {
            if self.offset != total {
                return Err(ContentError::Incomplete {
                    digest: self.expected.clone(),
                    expected: total,
                    actual: self.offset,
                });
            }
        }
        let actual = self.hasher.clone().finish();
        if actual != self.expected.to_string() {
            remove_dir_all_quiet(&self.dir);
            return Err(ContentError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        let data_path = self.dir.join("data");
        self.data.sync_all().map_err(io_err("fsync", &data_path))?;
        // Committed blobs are immutable; a stray writer cannot change bytes under a digest.
        fs::set_permissions(&data_path, fs::Permissions::from_mode(0o444))
            .map_err(io_err("chmod", &data_path))?;
        fs::create_dir_all(&self.blobs).map_err(io_err("create", &self.blobs))?;
        let target = self.blobs.join(self.expected.hex());
        // Another ref may have committed the same digest meanwhile; its bytes are the same,
        // so replacing them atomically is harmless.
        fs::rename(&data_path, &target).map_err(io_err("rename", &target))?;
        fsync_dir(&self.blobs)?;
        remove_dir_all_quiet(&self.dir);
        Ok(())
    }

    /// Discards the ingest.
    pub fn abort(self) -> Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &self.dir)(e)),
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn remove_dir_all_quiet(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove ingest");
        }
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read dir", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("read dir", dir))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// Lower-case hex of a byte string.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// The digest algorithms the store (and the registry client) can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// Read from the digest's `algorithm:hex` form, so that only `Display` of the
    /// reference module's `Digest` is relied on.
    pub(crate) fn of(digest: &Digest) -> Result<Algorithm> {
        let s = digest.to_string();
        let alg = s.split_once(':').map(|(a, _)| a).unwrap_or("");
        match alg {
            "sha256" => Ok(Algorithm::Sha256),
            "sha512" => Ok(Algorithm::Sha512),
            other => Err(ContentError::UnsupportedAlgorithm(other.to_string())),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    pub(crate) fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// A running digest computation.
#[derive(Clone, Debug)]
pub(crate) enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub(crate) fn update(&mut self, buf: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(buf),
            Hasher::Sha512(h) => h.update(buf),
        }
    }

    /// The digest in `algorithm:hex` form.
    pub(crate) fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => format!("sha256:{}", to_hex(&h.finalize())),
            Hasher::Sha512(h) => format!("sha512:{}", to_hex(&h.finalize())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> Digest {
        let mut h = Algorithm::Sha256.hasher();
        h.update(data);
        Digest::parse(&h.finish()).expect("computed digest parses")
    }

    fn store() -> (tempfile::TempDir, ContentStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path().join("content")).expect("open");
        (dir, store)
    }

    fn ingest_entries(store: &ContentStore) -> usize {
        fs::read_dir(store.root().join("ingest"))
            .expect("ingest dir")
            .count()
    }

    #[test]
    fn write_verify_commit_read() {
        let (_t, store) = store();
        let data = b"hello, content store".repeat(1000);
        let d = digest_of(&data);
        let mut w = store
            .writer(&d.to_string(), &d, Some(data.len() as u64))
            .expect("writer");
        assert_eq!(w.offset(), 0);
        for chunk in data.chunks(777) {
            w.write(chunk).expect("write");
        }
        w.commit().expect("commit");

        let info = store.info(&d).expect("info").expect("present");
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(store.read_all(&d).expect("read"), data);
        store.verify(&d).expect("verify");
        let path = store.blob_path(&d).expect("path");
        assert_eq!(
            path,
            store.root().join("blobs/sha256").join(d.hex()),
            "containerd layout"
        );
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o444
        );
        assert_eq!(ingest_entries(&store), 0, "ingest cleaned up");
        assert_eq!(
            store.list().expect("list"),
            vec![(d.clone(), data.len() as u64)]
        );
        let (bytes, inodes) = store.usage().expect("usage");
        assert!(bytes >= data.len() as u64, "{bytes}");
        assert!(inodes >= 4, "{inodes}"); // blobs, ingest, blobs/sha256, the blob

        // Already committed: nothing to write.
        assert!(matches!(
            store.writer("again", &d, None),
            Err(ContentError::AlreadyExists(_))
        ));
        assert!(store.delete(&d).expect("delete"));
        assert!(!store.delete(&d).expect("delete again"));
        assert!(store.info(&d).expect("info").is_none());
        assert!(matches!(
            store.open_blob(&d),
            Err(ContentError::NotFound(_))
        ));
    }

    #[test]
    fn unknown_size_is_verified_by_digest_alone() {
        let (_t, store) = store();
        let data = b"no size given";
        let d = digest_of(data);
        let mut w = store.writer("r", &d, None).expect("writer");
        w.write(data).expect("write");
        w.commit().expect("commit");
        assert_eq!(store.read_all(&d).expect("read"), data);
    }

    #[test]
    fn resume_after_interrupted_write() {
        let (_t, store) = store();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let d = digest_of(&data);
        let size = Some(data.len() as u64);
        {
            let mut w = store.writer("layer", &d, size).expect("writer");
            w.write(&data[..70_000]).expect("write");
            // Dropped mid-way, as a pull that died would.
        }
        let status = store.ingests().expect("ingests");
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].reference, "layer");
        assert_eq!(status[0].offset, 70_000);
        assert_eq!(status[0].expected, d);
        assert_eq!(status[0].total, size);

        // A reopened store (a restarted daemon) resumes where the bytes end.
        let store = ContentStore::open(store.root()).expect("reopen");
        let mut w = store.writer("layer", &d, size).expect("resume");
        assert_eq!(w.offset(), 70_000);
        w.write(&data[70_000..]).expect("write rest");
        w.commit().expect("commit");
        store.verify(&d).expect("verify");
        assert_eq!(ingest_entries(&store), 0);
    }

    #[test]
    fn corrupted_ingest_is_caught_at_commit() {
        // What a crash can leave: an ingest whose bytes are not what was written (a torn
        // page, zeros after a power cut). The resume re-hashes them and the commit refuses.
        let (_t, store) = store();
        let data = b"0123456789abcdef";
        let d = digest_of(data);
        {
            let mut w = store.writer("torn", &d, Some(16)).expect("writer");
            w.write(&data[..8]).expect("write");
        }
        let ingest = store.root().join("ingest");
        let dir = fs::read_dir(&ingest)
            .expect("ingest")
            .next()
            .expect("one ingest")
            .expect("entry")
            .path();
        fs::write(dir.join("data"), b"\0\0\0\0\0\0\0\0").expect("corrupt");
        let mut w = store.writer("torn", &d, Some(16)).expect("resume");
        assert_eq!(w.offset(), 8);
        w.write(&data[8..]).expect("write");
        assert!(matches!(
            w.commit(),
            Err(ContentError::DigestMismatch { .. })
        ));
        assert!(store.info(&d).expect("info").is_none());
        assert_eq!(ingest_entries(&store), 0);
    }

    #[test]
    fn ingest_for_another_digest_is_restarted() {
        let (_t, store) = store();
        let a = digest_of(b"aaaa");
        let b = digest_of(b"bbbb");
        {
            let mut w = store.writer("same-ref", &a, Some(4)).expect("writer");
            w.write(b"aa").expect("write");
        }
        let mut w = store.writer("same-ref", &b, Some(4)).expect("writer");
        assert_eq!(w.offset(), 0, "bytes of another blob are not resumed");
        w.write(b"bbbb").expect("write");
        w.commit().expect("commit");
    }

    #[test]
    fn digest_mismatch_leaves_no_blob_and_no_ingest() {
        let (_t, store) = store();
        let d = digest_of(b"the real content");
        let mut w = store.writer("bad", &d, Some(16)).expect("writer");
        w.write(b"other content!!!").expect("write");
        match w.commit() {
            Err(ContentError::DigestMismatch { expected, actual }) => {
                assert_eq!(expected, d);
                assert_eq!(actual, digest_of(b"other content!!!").to_string());
                let msg = ContentError::DigestMismatch {
                    expected: expected.clone(),
                    actual: actual.clone(),
                }
                .to_string();
                assert!(
                    msg.contains(&d.to_string()) && msg.contains(&actual),
                    "{msg}"
                );
            }
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        assert!(store.info(&d).expect("info").is_none());
        assert_eq!(ingest_entries(&store), 0);
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn size_overflow_is_refused_at_once() {
        let (_t, store) = store();
        let d = digest_of(b"12345678");
        let mut w = store.writer("big", &d, Some(8)).expect("writer");
        w.write(b"12345").expect("within size");
        match w.write(b"6789") {
            Err(ContentError::SizeExceeded {
                expected, received, ..
            }) => {
                assert_eq!(expected, 8);
                assert_eq!(received, 9);
            }
            other => panic!("expected SizeExceeded, got {other:?}"),
        }
        assert!(matches!(w.write(b"x"), Err(ContentError::Poisoned { .. })));
        assert!(w.commit().is_err());
        assert!(store.info(&d).expect("info").is_none());
        assert_eq!(ingest_entries(&store), 0);
    }

    #[test]
    fn short_commit_keeps_the_ingest_for_resume() {
        let (_t, store) = store();
        let d = digest_of(b"0123456789");
        let mut w = store.writer("short", &d, Some(10)).expect("writer");
        w.write(b"01234").expect("write");
        assert!(matches!(
            w.commit(),
            Err(ContentError::Incomplete {
                expected: 10,
                actual: 5,
                ..
            })
        ));
        let mut w = store.writer("short", &d, Some(10)).expect("resume");
        assert_eq!(w.offset(), 5);
        w.write(b"56789").expect("write");
        w.commit().expect("commit");
    }

    #[test]
    fn concurrent_writers_of_one_ref() {
        let (_t, store) = store();
        let data = b"shared download".to_vec();
        let d = digest_of(&data);
        let mut first = store
            .writer(&d.to_string(), &d, Some(data.len() as u64))
            .expect("first");
        // Same process, other thread: refused at once, naming the ref.
        let store2 = store.clone();
        let d2 = d.clone();
        let second = std::thread::spawn(move || store2.writer(&d2.to_string(), &d2, None))
            .join()
            .expect("thread");
        match second {
            Err(ContentError::Locked { reference }) => assert_eq!(reference, d.to_string()),
            other => panic!("expected Locked, got {other:?}"),
        }
        assert!(matches!(
            store.abort_ingest(&d.to_string()),
            Err(ContentError::Locked { .. })
        ));
        // A different ref is independent.
        let other = digest_of(b"other");
        store.writer("other", &other, None).expect("other ref");

        first.write(&data).expect("write");
        first.commit().expect("commit");
        // After the first commit the second sees the blob and has nothing to do.
        assert!(matches!(
            store.writer(&d.to_string(), &d, None),
            Err(ContentError::AlreadyExists(_))
        ));
    }

    #[test]
    fn many_threads_race_for_one_blob() {
        let (_t, store) = store();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
        let d = digest_of(&data);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                let d = d.clone();
                let data = data.clone();
                std::thread::spawn(move || {
                    match store.writer(&d.to_string(), &d, Some(data.len() as u64)) {
                        Ok(mut w) => {
                            for c in data.chunks(1000) {
                                w.write(c)?;
                            }
                            w.commit().map(|()| "wrote")
                        }
                        Err(ContentError::Locked { .. }) => Ok("locked"),
                        Err(ContentError::AlreadyExists(_)) => Ok("exists"),
                        Err(e) => Err(e),
                    }
                })
            })
            .collect();
        let outcomes: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("no error"))
            .collect();
        assert!(outcomes.contains(&"wrote"), "{outcomes:?}");
        store.verify(&d).expect("verify");
        assert_eq!(ingest_entries(&store), 0, "{outcomes:?}");
    }

    #[test]
    fn abort_removes_the_ingest() {
        let (_t, store) = store();
        let d = digest_of(b"x");
        let mut w = store.writer("a", &d, Some(1)).expect("writer");
        w.write(b"x").expect("write");
        w.abort().expect("abort");
        assert_eq!(ingest_entries(&store), 0);
        assert!(store.info(&d).expect("info").is_none());
        {
            let _w = store.writer("b", &d, Some(1)).expect("writer");
        }
        assert!(store.abort_ingest("b").expect("abort ingest"));
        assert!(!store.abort_ingest("b").expect("nothing left"));
    }

    #[test]
    fn sha512_blobs() {
        let (_t, store) = store();
        let mut h = Algorithm::Sha512.hasher();
        h.update(b"five twelve");
        let d = Digest::parse(&h.finish()).expect("digest");
        let mut w = store.writer("512", &d, Some(11)).expect("writer");
        w.write(b"five twelve").expect("write");
        w.commit().expect("commit");
        assert!(store
            .blob_path(&d)
            .expect("path")
            .starts_with(store.root().join("blobs/sha512")));
    }
}
