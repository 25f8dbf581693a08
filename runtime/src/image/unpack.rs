//! Applying one image layer (an OCI or Docker layer tar, plain, gzip or zstd) to a snapshot
//! directory, with the semantics of containerd's `archive.Apply`, and the digest of the
//! uncompressed stream (the layer's diff_id) computed on the way.
//!
//! This module owns the bytes of one layer from the moment they leave the content store until
//! they are files under `target`: decompression, tar parsing, whiteouts, ownership, modes, times,
//! extended attributes, links and device nodes. It writes under `target` and nowhere else, and it
//! treats every layer as hostile: paths are normalized lexically and resolved only beneath
//! `target`, never through a symlink, so no entry can create, change or link anything outside.
//!
//! It does not own the snapshot directory itself: the caller creates `target`, and when
//! [`apply_layer`] fails the caller deletes the half-written `target` (nothing outside it was
//! touched, but what is inside is incomplete). It does not verify the compressed blob against its
//! digest (the content store does) nor the diff_id against the image config (the caller compares
//! [`LayerStats::diff_id`]), and it does not mount anything.
//!
//! Path resolution: every parent directory is opened with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` relative to a descriptor of `target`, and every final
//! component is created or changed relative to that parent's descriptor with the `*at` calls that
//! never follow a trailing symlink. A parent path that goes through any symlink is refused rather
//! than resolved inside the root (containerd's `RootPath` behaviour): a layer is a walk of a
//! filesystem, and a walk never descends through a symlink, so no well-formed layer has such an
//! entry; refusing keeps the rule simple to audit and avoids guessing what a symlink from another
//! layer would mean under overlayfs, where it is not even visible in `target`. Where `openat2`
//! is missing (kernels before 5.6, or a seccomp filter), the same check is done one component at
//! a time with `O_NOFOLLOW`.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstat, fstatat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, Mode,
    SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use sha2::{Digest as _, Sha256};

use super::reference::Digest;

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer descriptor's media type; `None` (the option) for a media type
    /// that is not a layer this module can apply.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type.trim() {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// What whiteout entries (`.wh.NAME`, `.wh..wh..opq`) become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhiteoutMode {
    /// For a layer directory that overlayfs stacks on the ones below it: `.wh.NAME` becomes a
    /// 0:0 character device `NAME`, and `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its
    /// directory. `target` is expected to be empty.
    #[default]
    Overlay,
    /// For flattening layers into one plain directory: `.wh.NAME` deletes `NAME`, and
    /// `.wh..wh..opq` deletes everything in its directory that this layer did not write.
    Apply,
}

/// Bounds on what one layer may make the unpacker do, and the choices that are the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of uncompressed tar stream read, and separately most bytes of file content
    /// written (a sparse entry can expand beyond its stream bytes).
    pub max_bytes: u64,
    /// Most tar entries, whiteouts and skipped entries included.
    pub max_files: u64,
    /// Whether character and block device entries are created; refused otherwise. FIFOs are
    /// always allowed.
    pub allow_devices: bool,
    pub whiteouts: WhiteoutMode,
}

impl Default for Limits {
    /// Generous enough for any image seen in practice (the largest single layers are a few tens
    /// of GiB); tighten them per node in the config.
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 30,
            max_files: 1_000_000,
            allow_devices: false,
            whiteouts: WhiteoutMode::Overlay,
        }
    }
}

/// What one layer held, and its diff_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Bytes consumed from the reader (compressed size).
    pub bytes_read: u64,
    /// Length of the uncompressed tar stream, end-of-archive padding included.
    pub tar_bytes: u64,
    /// Bytes of regular-file content written.
    pub content_bytes: u64,
    /// Tar entries seen (as counted against [`Limits::max_files`]).
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Character and block devices.
    pub devices: u64,
    pub fifos: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Entries deliberately not applied: the root directory itself, PAX global headers, AUFS
    /// metadata (`.wh..wh.*`).
    pub skipped: u64,
    /// `sha256` of the whole uncompressed stream: what the image config's `rootfs.diff_ids`
    /// lists for this layer.
    pub diff_id: Digest,
}

/// Why an entry was refused: the layer asked for something this unpacker will not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `..` components climb above the root of the layer.
    EscapesRoot,
    NulInName,
    NameTooLong,
    /// A parent component (named) is a symlink.
    SymlinkInPath(String),
    /// A parent component (named) exists and is not a directory.
    NotADirectory(String),
    /// A parent component is a mount point.
    CrossesMount,
    /// A hard link's target (named) climbs above the root.
    LinkEscapesRoot(String),
    /// A hard link's target (named) does not exist in `target`.
    LinkTargetMissing(String),
    /// A hard link to itself, to the root, or to a directory.
    BadLinkTarget(String),
    /// A symlink with an empty target.
    EmptySymlink,
    DeviceNotAllowed,
    /// An entry type byte this unpacker does not apply (GNU volume labels, multi-volume parts...).
    UnsupportedType(u8),
    /// `.wh.` with nothing after it.
    BadWhiteout,
    /// A header field that cannot be applied (named), such as a uid beyond 32 bits.
    BadHeader(String),
    /// PAX or GNU long-name records larger than [`MAX_METADATA_BYTES`] before one entry.
    MetadataTooLarge,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::EscapesRoot => f.write_str("path climbs above the layer root"),
            Refusal::NulInName => f.write_str("name contains a NUL byte"),
            Refusal::NameTooLong => f.write_str("name longer than the filesystem allows"),
            Refusal::SymlinkInPath(p) => write!(f, "parent {p:?} is a symlink"),
            Refusal::NotADirectory(p) => write!(f, "parent {p:?} is not a directory"),
            Refusal::CrossesMount => f.write_str("path crosses a mount point"),
            Refusal::LinkEscapesRoot(l) => {
                write!(f, "hard link target {l:?} climbs above the layer root")
            }
            Refusal::LinkTargetMissing(l) => write!(f, "hard link target {l:?} does not exist"),
            Refusal::BadLinkTarget(l) => write!(f, "cannot hard link to {l:?}"),
            Refusal::EmptySymlink => f.write_str("symlink has an empty target"),
            Refusal::DeviceNotAllowed => f.write_str("device nodes are not allowed"),
            Refusal::UnsupportedType(t) => {
                write!(f, "unsupported entry type {:?}", char::from(*t))
            }
            Refusal::BadWhiteout => f.write_str("whiteout names no file"),
            Refusal::BadHeader(what) => write!(f, "bad header: {what}"),
            Refusal::MetadataTooLarge => write!(
                f,
                "PAX or long-name records larger than {MAX_METADATA_BYTES} bytes"
            ),
        }
    }
}

/// Why [`apply_layer`] failed. After any of these the caller deletes `target`.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot open layer target {path:?}: {source}")]
    Target { path: PathBuf, source: io::Error },
    #[error("layer entry {entry:?} refused: {reason}")]
    Refused { entry: String, reason: Refusal },
    #[error("layer has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("layer is larger than the limit of {limit} uncompressed bytes")]
    TooLarge { limit: u64 },
    #[error("layer entry {entry:?} is truncated: its header says {expected} bytes, the archive holds {got}")]
    Truncated {
        entry: String,
        expected: u64,
        got: u64,
    },
    #[error("layer is not a valid {compression} tar stream ({position}): {source}")]
    Corrupt {
        compression: Compression,
        position: String,
        source: io::Error,
    },
    #[error("layer entry {entry:?}: {op}: {source}")]
    Io {
        entry: String,
        op: &'static str,
        source: io::Error,
    },
}

impl UnpackError {
    /// Whether the layer itself is at fault (hostile, corrupt or over a limit), as opposed to
    /// the local filesystem: the former is the image's problem and retrying will not help.
    pub fn is_bad_layer(&self) -> bool {
        !matches!(self, UnpackError::Target { .. } | UnpackError::Io { .. })
    }
}

/// Most bytes the tar parser may read between two entries: one PAX header, one GNU long name
/// and one long link name of at most 1 MiB each (Go's `archive/tar` refuses larger ones, so
/// no layer containerd accepts needs more), plus their headers. Without this bound a small
/// compressed layer could make the parser buffer gigabytes of "metadata".
pub const MAX_METADATA_BYTES: u64 = (3 << 20) + (16 << 10);

const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4095;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const XATTR_PAX_PREFIX: &[u8] = b"SCHILY.xattr.";
const COPY_BUFFER: usize = 256 << 10;

/// Applies one layer read from `reader` to the directory `target`, which must exist.
///
/// The whole stream is consumed, trailing padding included, so [`LayerStats::diff_id`] covers
/// exactly what the image config's diff_id does. On error, `target` may hold part of the layer
/// and the caller must delete it; nothing outside `target` has been created, changed or linked.
/// Runs as root: it restores ownership and creates whiteout devices. Nothing is fsynced; the
/// snapshotter makes the layer durable (`syncfs`) before it records the snapshot as committed.
pub fn apply_layer(
    reader: impl Read,
    compression: Compression,
    target: &Path,
    limits: &Limits,
) -> Result<LayerStats, UnpackError> {
    let mut unpacker = Unpacker::new(target, limits)?;

    let compressed_bytes = Cell::new(0u64);
    let counted = CountingReader {
        inner: reader,
        count: &compressed_bytes,
    };
    let corrupt = |position: String, source| UnpackError::Corrupt {
        compression,
        position,
        source,
    };
    let decompressed: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(BufReader::with_capacity(128 << 10, counted)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(counted)
                .map_err(|e| corrupt("opening the stream".into(), e))?,
        ),
    };

    let stream = StreamState::new(limits.max_bytes);
    let mut archive = tar::Archive::new(GuardedReader {
        inner: decompressed,
        state: &stream,
    });
    let mut stats = LayerStats {
        bytes_read: 0,
        tar_bytes: 0,
        content_bytes: 0,
        entries: 0,
        files: 0,
        dirs: 0,
        symlinks: 0,
        hardlinks: 0,
        devices: 0,
        fifos: 0,
        whiteouts: 0,
        opaque_dirs: 0,
        skipped: 0,
        diff_id: Digest::from_sha256([0; 32]),
    };

    let mut last_entry: Option<String> = None;
    let position = |last: &Option<String>| match last {
        Some(name) => format!("after entry {name:?}"),
        None => "before the first entry".to_owned(),
    };
    {
        let mut entries = archive
            .entries()
            .map_err(|e| stream.read_error(e, "", || position(&None), compression))?;
        loop {
            stream.metadata_budget.set(Some(MAX_METADATA_BYTES));
            let next = entries.next();
            stream.metadata_budget.set(None);
            let mut entry = match next {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    return Err(stream.read_error(e, "", || position(&last_entry), compression));
                }
            };
            stats.entries += 1;
            if stats.entries > limits.max_files {
                return Err(UnpackError::TooManyEntries {
                    limit: limits.max_files,
                });
            }
            let name = display_name(&entry.path_bytes());
            unpacker.apply_entry(&mut entry, &name, &mut stats, &stream, compression)?;
            // Whatever the entry's data the unpacker did not need (a hard link's, a whiteout's),
            // read it here so that the metadata budget above only ever counts metadata.
            io::copy(&mut entry, &mut io::sink()).map_err(|e| {
                stream.read_error(e, &name, || format!("in entry {name:?}"), compression)
            })?;
            last_entry = Some(name);
        }
    }

    // Past the end-of-archive marker: padding, which the diff_id covers too.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| {
        stream.read_error(
            e,
            "",
            || "after the end-of-archive marker".to_owned(),
            compression,
        )
    })?;
    drop(rest);

    unpacker.finish()?;

    stats.bytes_read = compressed_bytes.get();
    stats.tar_bytes = stream.total.get();
    stats.content_bytes = unpacker.content_bytes;
    stats.diff_id = Digest::from_sha256(stream.hasher.take().finalize().into());
    Ok(stats)
}

/// The state of the uncompressed stream, shared between the reader the tar parser owns and the
/// loop that drives it.
struct StreamState {
    hasher: RefCell<Sha256>,
    total: Cell<u64>,
    limit: u64,
    over_limit: Cell<bool>,
    /// `Some(bytes left)` while the tar parser is between entries, reading headers and their
    /// PAX or long-name records.
    metadata_budget: Cell<Option<u64>>,
    over_metadata_budget: Cell<bool>,
}

impl StreamState {
    fn new(limit: u64) -> Self {
        StreamState {
            hasher: RefCell::new(Sha256::new()),
            total: Cell::new(0),
            limit,
            over_limit: Cell::new(false),
            metadata_budget: Cell::new(None),
            over_metadata_budget: Cell::new(false),
        }
    }

    /// The error a failed read stands for: the tar parser wraps the reader's own errors, so
    /// the limits are recognized by the flags the reader set.
    fn read_error(
        &self,
        e: io::Error,
        entry: &str,
        position: impl FnOnce() -> String,
        compression: Compression,
    ) -> UnpackError {
        if self.over_limit.get() {
            UnpackError::TooLarge { limit: self.limit }
        } else if self.over_metadata_budget.get() {
            UnpackError::Refused {
                entry: if entry.is_empty() {
                    position()
                } else {
                    entry.to_owned()
                },
                reason: Refusal::MetadataTooLarge,
            }
        } else {
            UnpackError::Corrupt {
                compression,
                position: position(),
                source: e,
            }
        }
    }
}

/// The uncompressed stream as the tar parser sees it: hashed, counted, and cut off at the
/// limits.
struct GuardedReader<'s, R> {
    inner: R,
    state: &'s StreamState,
}

impl<R: Read> Read for GuardedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let state = self.state;
        if state.over_limit.get() || state.over_metadata_budget.get() {
            return Err(io::Error::other("layer limit exceeded"));
        }
        let n = self.inner.read(buf)?;
        let total = state.total.get().saturating_add(n as u64);
        if total > state.limit {
            state.over_limit.set(true);
            return Err(io::Error::other("layer larger than the byte limit"));
        }
        if let Some(left) = state.metadata_budget.get() {
            match left.checked_sub(n as u64) {
                Some(left) => state.metadata_budget.set(Some(left)),
                None => {
                    state.over_metadata_budget.set(true);
                    return Err(io::Error::other("tar metadata larger than allowed"));
                }
            }
        }
        state.hasher.borrow_mut().update(&buf[..n]);
        state.total.set(total);
        Ok(n)
    }
}

struct CountingReader<'c, R> {
    inner: R,
    count: &'c Cell<u64>,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get().saturating_add(n as u64));
        Ok(n)
    }
}

/// Ownership, permissions, times and extended attributes of one entry.
struct Meta {
    mode: Mode,
    uid: Uid,
    gid: Gid,
    atime: TimeSpec,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

enum Lookup {
    Found(OwnedFd),
    Missing,
}

struct Unpacker {
    root: OwnedFd,
    root_dev: u64,
    limits: Limits,
    /// Set once `openat2` turned out to be unavailable.
    walk_only: bool,
    /// Apply mode: every path this layer wrote, and their ancestors, so that an opaque marker
    /// deletes only what came from the layers below.
    written: Option<HashSet<Vec<u8>>>,
    /// Directory times, set at the end: creating entries inside a directory changes its mtime.
    dir_times: Vec<(Vec<u8>, TimeSpec, TimeSpec)>,
    buf: Vec<u8>,
    content_bytes: u64,
}

impl Unpacker {
    fn new(target: &Path, limits: &Limits) -> Result<Self, UnpackError> {
        let target_error = |e: Errno| UnpackError::Target {
            path: target.to_owned(),
            source: e.into(),
        };
        let root = nix::fcntl::open(
            target,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(target_error)?;
        let root_dev = fstat(&root).map_err(target_error)?.st_dev;
        Ok(Unpacker {
            root,
            root_dev,
            limits: limits.clone(),
            walk_only: false,
            written: match limits.whiteouts {
                WhiteoutMode::Apply => Some(HashSet::new()),
                WhiteoutMode::Overlay => None,
            },
            dir_times: Vec::new(),
            buf: vec![0; COPY_BUFFER],
            content_bytes: 0,
        })
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        stats: &mut LayerStats,
        stream: &StreamState,
        compression: Compression,
    ) -> Result<(), UnpackError> {
        let refused = |reason| UnpackError::Refused {
            entry: name.to_owned(),
            reason,
        };
        let raw_path = entry.path_bytes().into_owned();
        // The raw type byte: the tar crate reports both '0' and the old '\0' as regular, and
        // only the latter means a directory when the name ends in '/'.
        let type_byte = entry.header().as_bytes()[156];
        if type_byte == b'g' {
            tracing::debug!("layer entry {name:?}: PAX global header ignored");
            stats.skipped += 1;
            return Ok(());
        }
        let path = normalize(&raw_path).map_err(refused)?;

        if path
            .iter()
            .any(|c| c.starts_with(WHITEOUT_META_PREFIX) && *c != WHITEOUT_OPAQUE)
        {
            tracing::debug!("layer entry {name:?}: AUFS metadata ignored");
            stats.skipped += 1;
            return Ok(());
        }
        let Some((base, parent)) = path.split_last() else {
            tracing::debug!("layer entry {name:?}: the root itself, ignored");
            stats.skipped += 1;
            return Ok(());
        };

        if *base == WHITEOUT_OPAQUE {
            stats.opaque_dirs += 1;
            return self.opaque(name, parent);
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(refused(Refusal::BadWhiteout));
            }
            stats.whiteouts += 1;
            let meta = self.meta(entry, name)?;
            return self.whiteout(name, parent, hidden, &meta);
        }

        let kind = match type_byte {
            b'\0' if raw_path.ends_with(b"/") => b'5',
            b'\0' | b'7' | b'S' => b'0',
            other => other,
        };
        match kind {
            b'0' => {
                let meta = self.meta(entry, name)?;
                let dir = self.parent(name, parent)?;
                self.file(entry, name, &dir, base, &meta, stream, compression)?;
                stats.files += 1;
            }
            b'5' => {
                let meta = self.meta(entry, name)?;
                let dir = self.parent(name, parent)?;
                self.dir(name, &dir, &path, &meta)?;
                stats.dirs += 1;
            }
            b'2' => {
                let meta = self.meta(entry, name)?;
                let target = entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                if target.is_empty() {
                    return Err(refused(Refusal::EmptySymlink));
                }
                if target.contains(&0) {
                    return Err(refused(Refusal::NulInName));
                }
                let dir = self.parent(name, parent)?;
                self.symlink(name, &dir, base, &target, &meta)?;
                stats.symlinks += 1;
            }
            b'1' => {
                let link = entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                let dir = self.parent(name, parent)?;
                self.hardlink(name, &dir, &path, &link)?;
                stats.hardlinks += 1;
            }
            b'3' | b'4' | b'6' => {
                if kind != b'6' && !self.limits.allow_devices {
                    return Err(refused(Refusal::DeviceNotAllowed));
                }
                let meta = self.meta(entry, name)?;
                let header = entry.header();
                // devmajor and devminor sit at the same offsets in ustar and GNU headers.
                let number = |field: io::Result<Option<u32>>, raw: &[u8], what: &str| {
                    numeric(field.map(|n| u64::from(n.unwrap_or(0))), raw)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| refused(Refusal::BadHeader(format!("device {what} number"))))
                };
                let raw = header.as_bytes();
                let major = number(header.device_major(), &raw[329..337], "major")?;
                let minor = number(header.device_minor(), &raw[337..345], "minor")?;
                let kind_flag = match kind {
                    b'3' => SFlag::S_IFCHR,
                    b'4' => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dir = self.parent(name, parent)?;
                self.node(
                    name,
                    &dir,
                    base,
                    kind_flag,
                    libc::makedev(major, minor),
                    &meta,
                )?;
                if kind == b'6' {
                    stats.fifos += 1;
                } else {
                    stats.devices += 1;
                }
            }
            other => return Err(refused(Refusal::UnsupportedType(other))),
        }
        self.note_written(&path);
        Ok(())
    }

    /// The header's metadata, with PAX records (sub-second and access times, xattrs) applied.
    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Meta, UnpackError> {
        let bad = |what: &str| UnpackError::Refused {
            entry: name.to_owned(),
            reason: Refusal::BadHeader(what.to_owned()),
        };
        let header = entry.header();
        let fields = header.as_old();
        let mode =
            numeric(header.mode().map(u64::from), &fields.mode).ok_or_else(|| bad("mode"))?;
        let mode = (mode & 0o7777) as libc::mode_t;
        let id = |v: io::Result<u64>, field: &[u8], what| {
            numeric(v, field)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(what))
        };
        let uid = id(header.uid(), &fields.uid, "uid")?;
        let gid = id(header.gid(), &fields.gid, "gid")?;
        let mtime = numeric(header.mtime(), &fields.mtime).ok_or_else(|| bad("mtime"))?;
        let mut mtime = TimeSpec::new(i64::try_from(mtime).map_err(|_| bad("mtime"))?, 0);
        let mut atime = header
            .as_gnu()
            .and_then(|gnu| gnu.atime().ok())
            .filter(|a| *a != 0)
            .and_then(|a| i64::try_from(a).ok())
            .map(|a| TimeSpec::new(a, 0));
        let mut xattrs = Vec::new();
        if let Some(records) = entry.pax_extensions().map_err(|_| bad("PAX records"))? {
            for record in records {
                let record = record.map_err(|_| bad("PAX records"))?;
                let key = record.key_bytes();
                let value = record.value_bytes();
                if key == b"mtime" {
                    mtime = parse_pax_time(value).ok_or_else(|| bad("PAX mtime"))?;
                } else if key == b"atime" {
                    atime = Some(parse_pax_time(value).ok_or_else(|| bad("PAX atime"))?);
                } else if let Some(xattr) = key.strip_prefix(XATTR_PAX_PREFIX) {
                    if xattr.is_empty() {
                        return Err(bad("empty xattr name"));
                    }
                    // overlayfs's own attributes belong to the snapshotter: a layer carrying
                    // them could redirect lookups or forge origins.
                    if xattr.starts_with(b"trusted.overlay.") || xattr.starts_with(b"user.overlay.")
                    {
                        tracing::warn!(
                            "layer entry {name:?}: xattr {:?} ignored",
                            String::from_utf8_lossy(xattr)
                        );
                        continue;
                    }
                    let key = CString::new(xattr).map_err(|_| bad("xattr name with NUL"))?;
                    xattrs.push((key, value.to_vec()));
                }
            }
        }
        Ok(Meta {
            mode: Mode::from_bits_retain(mode),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            atime: atime.unwrap_or(mtime),
            mtime,
            xattrs,
        })
    }

    fn parent(&mut self, name: &str, parent: &[&[u8]]) -> Result<OwnedFd, UnpackError> {
        match self.resolve_dir(name, parent, true)? {
            Lookup::Found(fd) => Ok(fd),
            // Only a concurrent deletion inside target gets here.
            Lookup::Missing => Err(io_error(name, "opening parent directory", Errno::ENOENT)),
        }
    }

    /// Opens the directory at `comps` beneath the root, never through a symlink; with `create`,
    /// missing directories are made (0755, root-owned, as containerd does).
    fn resolve_dir(
        &mut self,
        name: &str,
        comps: &[&[u8]],
        create: bool,
    ) -> Result<Lookup, UnpackError> {
        if !self.walk_only {
            let path = if comps.is_empty() {
                b".".to_vec()
            } else {
                comps.join(&b'/')
            };
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(
                    ResolveFlag::RESOLVE_BENEATH
                        | ResolveFlag::RESOLVE_NO_SYMLINKS
                        | ResolveFlag::RESOLVE_NO_MAGICLINKS
                        | ResolveFlag::RESOLVE_NO_XDEV,
                );
            match openat2(&self.root, path.as_slice(), how) {
                Ok(fd) => return Ok(Lookup::Found(fd)),
                Err(Errno::ENOENT) if !create => return Ok(Lookup::Missing),
                Err(Errno::EXDEV) => {
                    return Err(UnpackError::Refused {
                        entry: name.to_owned(),
                        reason: Refusal::CrossesMount,
                    })
                }
                Err(Errno::ENOSYS) | Err(Errno::EPERM) => {
                    tracing::warn!(
                        "openat2 unavailable: resolving layer paths one component at a time"
                    );
                    self.walk_only = true;
                }
                // A missing directory to create, or a symlink or file in the way: the walk
                // creates the one and names the other precisely.
                Err(_) => {}
            }
        }
        self.walk(name, comps, create)
    }

    fn walk(&mut self, name: &str, comps: &[&[u8]], create: bool) -> Result<Lookup, UnpackError> {
        let refused = |reason| UnpackError::Refused {
            entry: name.to_owned(),
            reason,
        };
        let mut dir = self
            .root
            .try_clone()
            .map_err(|e| io_error(name, "duplicating the target descriptor", e))?;
        for (i, comp) in comps.iter().enumerate() {
            let mut created = false;
            if create {
                match mkdirat(&dir, *comp, Mode::from_bits_retain(0o755)) {
                    Ok(()) => created = true,
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io_error(name, "creating parent directory", e)),
                }
            }
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let next = match openat(&dir, *comp, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(Lookup::Missing),
                Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => {
                    let shown = String::from_utf8_lossy(&comps[..=i].join(&b'/')).into_owned();
                    let is_symlink = fstatat(&dir, *comp, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
                        .unwrap_or(false);
                    return Err(refused(if is_symlink {
                        Refusal::SymlinkInPath(shown)
                    } else {
                        Refusal::NotADirectory(shown)
                    }));
                }
                Err(e) => return Err(io_error(name, "opening parent directory", e)),
            };
            let st = fstat(&next).map_err(|e| io_error(name, "inspecting parent directory", e))?;
            if st.st_dev != self.root_dev {
                return Err(refused(Refusal::CrossesMount));
            }
            if created {
                // mkdirat's mode went through the umask.
                fchmod(&next, Mode::from_bits_retain(0o755))
                    .map_err(|e| io_error(name, "setting parent directory mode", e))?;
                self.note_written(&comps[..=i]);
            }
            dir = next;
        }
        Ok(Lookup::Found(dir))
    }

    #[allow(clippy::too_many_arguments)]
    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        dir: &OwnedFd,
        base: &[u8],
        meta: &Meta,
        stream: &StreamState,
        compression: Compression,
    ) -> Result<(), UnpackError> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = create_replacing(dir.as_fd(), base, || {
            openat(dir, base, flags, Mode::from_bits_retain(0o600))
        })
        .map_err(|e| io_error(name, "creating file", e))?;
        let mut file = File::from(fd);
        let expected = entry.size();
        let mut got = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(stream.read_error(
                        e,
                        name,
                        || format!("in entry {name:?}"),
                        compression,
                    ))
                }
            };
            got += n as u64;
            self.content_bytes += n as u64;
            if self.content_bytes > self.limits.max_bytes {
                return Err(UnpackError::TooLarge {
                    limit: self.limits.max_bytes,
                });
            }
            file.write_all(&self.buf[..n])
                .map_err(|e| io_error(name, "writing file", e))?;
        }
        if got != expected {
            return Err(UnpackError::Truncated {
                entry: name.to_owned(),
                expected,
                got,
            });
        }
        // chown clears setuid bits and file capabilities, so it goes before both.
        fchown(&file, Some(meta.uid), Some(meta.gid)).map_err(|e| io_error(name, "chown", e))?;
        for (key, value) in &meta.xattrs {
            set_xattr(name, Xattr::Fd(file.as_fd()), key, value)?;
        }
        fchmod(&file, meta.mode).map_err(|e| io_error(name, "chmod", e))?;
        futimens(&file, &meta.atime, &meta.mtime)
            .map_err(|e| io_error(name, "setting times", e))?;
        Ok(())
    }

    fn dir(
        &mut self,
        name: &str,
        parent: &OwnedFd,
        path: &[&[u8]],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let Some(base) = path.last() else {
            return Ok(());
        };
        match mkdirat(parent, *base, Mode::from_bits_retain(0o700)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let is_dir = fstatat(parent, *base, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                    .map_err(|e| io_error(name, "inspecting existing entry", e))?;
                // An existing directory is merged into (its metadata replaced); anything else is
                // replaced.
                if !is_dir {
                    remove_entry(parent.as_fd(), base)
                        .map_err(|e| io_error(name, "removing existing entry", e))?;
                    mkdirat(parent, *base, Mode::from_bits_retain(0o700))
                        .map_err(|e| io_error(name, "creating directory", e))?;
                }
            }
            Err(e) => return Err(io_error(name, "creating directory", e)),
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(parent, *base, flags, Mode::empty())
            .map_err(|e| io_error(name, "opening directory", e))?;
        fchown(&fd, Some(meta.uid), Some(meta.gid)).map_err(|e| io_error(name, "chown", e))?;
        for (key, value) in &meta.xattrs {
            set_xattr(name, Xattr::Fd(fd.as_fd()), key, value)?;
        }
        fchmod(&fd, meta.mode).map_err(|e| io_error(name, "chmod", e))?;
        self.dir_times
            .push((path.join(&b'/'), meta.atime, meta.mtime));
        Ok(())
    }

    fn symlink(
        &mut self,
        name: &str,
        dir: &OwnedFd,
        base: &[u8],
        target: &[u8],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        create_replacing(dir.as_fd(), base, || symlinkat(target, dir, base))
            .map_err(|e| io_error(name, "creating symlink", e))?;
        self.finish_node(name, dir, base, meta, false)
    }

    fn node(
        &mut self,
        name: &str,
        dir: &OwnedFd,
        base: &[u8],
        kind: SFlag,
        dev: libc::dev_t,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        create_replacing(dir.as_fd(), base, || {
            mknodat(dir, base, kind, Mode::from_bits_retain(0o600), dev)
        })
        .map_err(|e| io_error(name, "creating device node", e))?;
        self.finish_node(name, dir, base, meta, true)
    }

    /// Metadata of an entry that must not be opened (a symlink would be followed, a device
    /// opened): everything by name relative to its directory, never following it.
    fn finish_node(
        &self,
        name: &str,
        dir: &OwnedFd,
        base: &[u8],
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), UnpackError> {
        fchownat(
            dir,
            base,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_error(name, "chown", e))?;
        for (key, value) in &meta.xattrs {
            set_xattr(name, Xattr::At(dir.as_fd(), base), key, value)?;
        }
        if chmod {
            // Not a symlink (this call just made it), so following is moot; the no-follow
            // variant is not supported by every kernel.
            fchmodat(dir, base, meta.mode, FchmodatFlags::FollowSymlink)
                .map_err(|e| io_error(name, "chmod", e))?;
        }
        utimensat(
            dir,
            base,
            &meta.atime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_error(name, "setting times", e))?;
        Ok(())
    }

    fn hardlink(
        &mut self,
        name: &str,
        dir: &OwnedFd,
        path: &[&[u8]],
        link: &[u8],
    ) -> Result<(), UnpackError> {
        let shown = String::from_utf8_lossy(link).into_owned();
        let refused = |reason| UnpackError::Refused {
            entry: name.to_owned(),
            reason,
        };
        if link.contains(&0) {
            return Err(refused(Refusal::NulInName));
        }
        let link_path = normalize(link).map_err(|reason| {
            refused(match reason {
                Refusal::EscapesRoot => Refusal::LinkEscapesRoot(shown.clone()),
                other => other,
            })
        })?;
        let Some((link_base, link_parent)) = link_path.split_last() else {
            return Err(refused(Refusal::BadLinkTarget(shown)));
        };
        if link_path == path {
            return Err(refused(Refusal::BadLinkTarget(shown)));
        }
        let Some(base) = path.last() else {
            return Ok(());
        };
        let source_dir = match self.resolve_dir(name, link_parent, false)? {
            Lookup::Found(fd) => fd,
            Lookup::Missing => return Err(refused(Refusal::LinkTargetMissing(shown))),
        };
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself, as tar means it.
        let result = create_replacing(dir.as_fd(), base, || {
            linkat(&source_dir, *link_base, dir, *base, AtFlags::empty())
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                Err(refused(Refusal::LinkTargetMissing(shown)))
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                Err(refused(Refusal::BadLinkTarget(shown)))
            }
            Err(e) => Err(io_error(name, "creating hard link", e)),
        }
    }

    fn whiteout(
        &mut self,
        name: &str,
        parent: &[&[u8]],
        hidden: &[u8],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        match self.limits.whiteouts {
            WhiteoutMode::Overlay => {
                let dir = self.parent(name, parent)?;
                create_replacing(dir.as_fd(), hidden, || {
                    mknodat(
                        &dir,
                        hidden,
                        SFlag::S_IFCHR,
                        Mode::empty(),
                        libc::makedev(0, 0),
                    )
                })
                .map_err(|e| io_error(name, "creating whiteout device", e))?;
                fchownat(
                    &dir,
                    hidden,
                    Some(meta.uid),
                    Some(meta.gid),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io_error(name, "chown whiteout", e))?;
                let mut path = parent.to_vec();
                path.push(hidden);
                self.note_written(&path);
                Ok(())
            }
            WhiteoutMode::Apply => match self.resolve_dir(name, parent, false)? {
                Lookup::Found(dir) => remove_entry(dir.as_fd(), hidden)
                    .map_err(|e| io_error(name, "deleting whited-out entry", e)),
                Lookup::Missing => Ok(()),
            },
        }
    }

    fn opaque(&mut self, name: &str, dir_path: &[&[u8]]) -> Result<(), UnpackError> {
        match self.limits.whiteouts {
            WhiteoutMode::Overlay => {
                let dir = self.parent(name, dir_path)?;
                set_xattr(
                    name,
                    Xattr::Fd(dir.as_fd()),
                    c"trusted.overlay.opaque",
                    b"y",
                )
            }
            WhiteoutMode::Apply => match self.resolve_dir(name, dir_path, false)? {
                Lookup::Found(dir) => {
                    let prefix = dir_path.join(&b'/');
                    self.clear_opaque(dir.as_fd(), &prefix).map_err(|e| {
                        io_error(name, "deleting the contents of an opaque directory", e)
                    })
                }
                Lookup::Missing => Ok(()),
            },
        }
    }

    /// Deletes everything under `dir` that this layer did not write, descending into the
    /// directories it did write (their older contents are hidden too).
    fn clear_opaque(&self, dir: BorrowedFd<'_>, prefix: &[u8]) -> io::Result<()> {
        for child in list_dir(dir)? {
            let mut path = prefix.to_vec();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(child.as_bytes());
            let kept = self.written.as_ref().is_some_and(|w| w.contains(&path));
            if !kept {
                remove_entry(dir, child.as_bytes())?;
                continue;
            }
            let st = fstatat(dir, child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let flags =
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let sub = openat(dir, child.as_c_str(), flags, Mode::empty())?;
                self.clear_opaque(sub.as_fd(), &path)?;
            }
        }
        Ok(())
    }

    fn note_written(&mut self, path: &[&[u8]]) {
        if let Some(written) = &mut self.written {
            for end in 1..=path.len() {
                written.insert(path[..end].join(&b'/'));
            }
        }
    }

    /// Directory times, now that nothing more will be created inside them.
    fn finish(&mut self) -> Result<(), UnpackError> {
        let dir_times = std::mem::take(&mut self.dir_times);
        for (path, atime, mtime) in dir_times {
            let comps: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
            let name = String::from_utf8_lossy(&path).into_owned();
            // A directory replaced later in the layer by something else keeps no times.
            let fd = match self.resolve_dir(&name, &comps, false) {
                Ok(Lookup::Found(fd)) => fd,
                Ok(Lookup::Missing) | Err(UnpackError::Refused { .. }) => continue,
                Err(e) => return Err(e),
            };
            futimens(&fd, &atime, &mtime)
                .map_err(|e| io_error(&name, "setting directory times", e))?;
        }
        Ok(())
    }
}

/// Splits a tar path into components beneath the root: empty and `.` components dropped (so a
/// leading `/` is stripped, as tar does), `..` applied lexically and refused when it climbs
/// above the root.
fn normalize(raw: &[u8]) -> Result<Vec<&[u8]>, Refusal> {
    if raw.contains(&0) {
        return Err(Refusal::NulInName);
    }
    if raw.len() > PATH_MAX {
        return Err(Refusal::NameTooLong);
    }
    let mut comps: Vec<&[u8]> = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if comps.pop().is_none() {
                    return Err(Refusal::EscapesRoot);
                }
            }
            _ if comp.len() > NAME_MAX => return Err(Refusal::NameTooLong),
            _ => comps.push(comp),
        }
    }
    Ok(comps)
}

/// A numeric header field as the tar crate parsed it, except that a field of only NULs and
/// spaces is 0: Go's `archive/tar` reads it so, and some minimal writers leave fields empty.
fn numeric(parsed: io::Result<u64>, raw: &[u8]) -> Option<u64> {
    match parsed {
        Ok(v) => Some(v),
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Some(0),
        Err(_) => None,
    }
}

fn display_name(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

/// A PAX time: decimal seconds, optionally negative, with an optional fraction.
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(digit - b'0') * 10i64.pow(8 - i as u32);
    }
    if negative {
        secs = -secs;
        if nanos > 0 {
            secs -= 1;
            nanos = 1_000_000_000 - nanos;
        }
    }
    Some(TimeSpec::new(secs, nanos))
}

fn io_error(entry: &str, op: &'static str, e: impl Into<io::Error>) -> UnpackError {
    UnpackError::Io {
        entry: entry.to_owned(),
        op,
        source: e.into(),
    }
}

/// Runs `create`; when something already has the name, removes it (a directory with its
/// contents) and runs `create` once more. Later entries replace earlier ones, as in tar.
fn create_replacing<T>(
    dir: BorrowedFd<'_>,
    base: &[u8],
    mut create: impl FnMut() -> nix::Result<T>,
) -> io::Result<T> {
    match create() {
        Err(Errno::EEXIST) => {
            remove_entry(dir, base)?;
            Ok(create()?)
        }
        other => Ok(other?),
    }
}

/// Removes `base` from `dir`, recursively if it is a directory, never following a symlink.
/// A missing entry is not an error.
fn remove_entry(dir: BorrowedFd<'_>, base: &[u8]) -> io::Result<()> {
    match unlinkat(dir, base, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let sub = openat(dir, base, flags, Mode::empty())?;
    for child in list_dir(sub.as_fd())? {
        remove_entry(sub.as_fd(), child.as_bytes())?;
    }
    unlinkat(dir, base, UnlinkatFlags::RemoveDir)?;
    Ok(())
}

/// The names in a directory, collected first so that deleting while iterating is safe.
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = openat(dir, c".", flags, Mode::empty())?;
    let mut listing = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

enum Xattr<'a> {
    /// An open regular file or directory.
    Fd(BorrowedFd<'a>),
    /// A name in a directory, not followed: symlinks and device nodes, which must not be opened.
    At(BorrowedFd<'a>, &'a [u8]),
}

fn set_xattr(entry: &str, on: Xattr<'_>, key: &CStr, value: &[u8]) -> Result<(), UnpackError> {
    let rc = match on {
        // SAFETY: the descriptor is open for the call; key is NUL-terminated; value is a valid
        // slice whose length is passed with it.
        Xattr::Fd(fd) => unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                key.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        },
        Xattr::At(dir, base) => {
            // No `setxattrat` before Linux 6.13: the directory's /proc/self/fd link names the
            // directory itself, and lsetxattr does not follow the final component.
            let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            path.extend_from_slice(base);
            let path = CString::new(path).map_err(|_| UnpackError::Refused {
                entry: entry.to_owned(),
                reason: Refusal::NulInName,
            })?;
            // SAFETY: as above, with a NUL-terminated path.
            unsafe {
                libc::lsetxattr(
                    path.as_ptr(),
                    key.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            }
        }
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    let key_text = key.to_string_lossy();
    match err.raw_os_error() {
        // The filesystem does not store this namespace: containerd skips these too, since the
        // image is still usable without, say, an SELinux label.
        Some(libc::EOPNOTSUPP) => {
            tracing::warn!("layer entry {entry:?}: xattr {key_text:?} not supported here, skipped");
            Ok(())
        }
        // user.* is only allowed on regular files and directories.
        Some(libc::EPERM) if key_text.starts_with("user.") => {
            tracing::warn!(
                "layer entry {entry:?}: xattr {key_text:?} not allowed on this file type, skipped"
            );
            Ok(())
        }
        _ => Err(io_error(entry, "setting xattr", err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::{Builder, EntryType, Header};

    const T0: u64 = 1_600_000_000;

    /// A layer under construction, written the way image builders write them (GNU headers,
    /// PAX records where needed).
    struct Layer {
        b: Builder<Vec<u8>>,
    }

    fn header(kind: EntryType, mode: u32, owner: (u64, u64), mtime: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    impl Layer {
        fn new() -> Self {
            Layer {
                b: Builder::new(Vec::new()),
            }
        }
        fn dir(mut self, path: &str, mode: u32, owner: (u64, u64), mtime: u64) -> Self {
            let mut h = header(EntryType::Directory, mode, owner, mtime);
            self.b.append_data(&mut h, path, io::empty()).expect("dir");
            self
        }
        fn file(
            mut self,
            path: &str,
            data: &[u8],
            mode: u32,
            owner: (u64, u64),
            mtime: u64,
        ) -> Self {
            let mut h = header(EntryType::Regular, mode, owner, mtime);
            h.set_size(data.len() as u64);
            self.b.append_data(&mut h, path, data).expect("file");
            self
        }
        fn f(self, path: &str, data: &[u8]) -> Self {
            self.file(path, data, 0o644, (0, 0), T0)
        }
        fn d(self, path: &str) -> Self {
            self.dir(path, 0o755, (0, 0), T0)
        }
        fn symlink(mut self, path: &str, target: &str, owner: (u64, u64), mtime: u64) -> Self {
            let mut h = header(EntryType::Symlink, 0o777, owner, mtime);
            self.b.append_link(&mut h, path, target).expect("symlink");
            self
        }
        fn hardlink(mut self, path: &str, target: &str) -> Self {
            let mut h = header(EntryType::Link, 0o644, (0, 0), T0);
            self.b.append_link(&mut h, path, target).expect("hardlink");
            self
        }
        fn special(
            mut self,
            path: &str,
            kind: EntryType,
            mode: u32,
            dev: (u32, u32),
            owner: (u64, u64),
        ) -> Self {
            let mut h = header(kind, mode, owner, T0);
            h.set_device_major(dev.0).expect("major");
            h.set_device_minor(dev.1).expect("minor");
            self.b
                .append_data(&mut h, path, io::empty())
                .expect("special");
            self
        }
        fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
            self.b
                .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
                .expect("pax");
            self
        }
        /// An entry with arbitrary name and link bytes, which the Builder would refuse.
        fn raw(mut self, name: &[u8], kind: u8, link: &[u8], data: &[u8]) -> Self {
            let mut h = Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_entry_type(EntryType::new(kind));
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(T0);
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.b.append(&h, data).expect("raw");
            self
        }
        fn bytes(self) -> Vec<u8> {
            self.b.into_inner().expect("finish")
        }
    }

    /// A target directory and, beside it, a sentinel directory that no layer may touch.
    struct Sandbox {
        tmp: tempfile::TempDir,
        target: PathBuf,
        sentinel: PathBuf,
    }

    fn sandbox() -> Sandbox {
        assert!(nix::unistd::geteuid().is_root(), "these tests need root");
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("target");
        let sentinel = tmp.path().join("sentinel");
        std::fs::create_dir(&target).expect("target");
        std::fs::create_dir(&sentinel).expect("sentinel");
        std::fs::write(sentinel.join("secret"), b"untouched").expect("secret");
        Sandbox {
            tmp,
            target,
            sentinel,
        }
    }

    impl Sandbox {
        fn apply(&self, layer: &[u8], limits: &Limits) -> Result<LayerStats, UnpackError> {
            apply_layer(layer, Compression::None, &self.target, limits)
        }

        fn assert_sentinel_untouched(&self) {
            let listing = |p: &Path| {
                let mut names: Vec<String> = std::fs::read_dir(p)
                    .expect("read_dir")
                    .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                names
            };
            assert_eq!(listing(self.tmp.path()), ["sentinel", "target"]);
            assert_eq!(listing(&self.sentinel), ["secret"]);
            let secret = self.sentinel.join("secret");
            let md = std::fs::symlink_metadata(&secret).expect("secret");
            assert!(md.is_file());
            assert_eq!(md.nlink(), 1, "a hard link to the sentinel was made");
            assert_eq!(md.mode() & 0o7777, 0o644);
            assert_eq!(md.uid(), 0);
            assert_eq!(std::fs::read(&secret).expect("read"), b"untouched");
        }

        fn t(&self, rel: &str) -> PathBuf {
            self.target.join(rel)
        }
    }

    fn refused(result: Result<LayerStats, UnpackError>) -> (String, Refusal) {
        match result {
            Err(UnpackError::Refused { entry, reason }) => (entry, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn get_xattr(path: &Path, key: &str) -> Option<Vec<u8>> {
        let path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        let key = CString::new(key).expect("key");
        let mut buf = vec![0u8; 4096];
        // SAFETY: NUL-terminated strings and a buffer whose length is passed with it.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                key.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    fn sha256(data: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::digest(data).into())
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).expect("gzip");
        enc.finish().expect("gzip")
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        zstd::stream::encode_all(data, 1).expect("zstd")
    }

    /// Capability set `cap_net_bind_service+ep`, VFS_CAP_REVISION_2.
    const CAPABILITY: [u8; 20] = [
        0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn media_types() {
        use Compression as C;
        let table = [
            ("application/vnd.oci.image.layer.v1.tar", Some(C::None)),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(C::Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(C::Zstd)),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                Some(C::None),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(C::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Some(C::Zstd),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(C::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Some(C::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Some(C::None),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.zstd",
                Some(C::Zstd),
            ),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", None),
            ("application/vnd.oci.image.manifest.v1+json", None),
            ("application/vnd.oci.image.config.v1+json", None),
            ("", None),
        ];
        for (media_type, expected) in table {
            assert_eq!(
                Compression::from_media_type(media_type),
                expected,
                "{media_type}"
            );
        }
    }

    #[test]
    fn every_entry_type_round_trips() {
        let sb = sandbox();
        let big: Vec<u8> = (0..3 * COPY_BUFFER + 17)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let long_dir = format!("deep/{}", "d".repeat(120));
        let long_file = format!("{long_dir}/{}", "f".repeat(150));
        let layer = Layer::new()
            .dir("etc", 0o755, (0, 0), T0 + 1)
            .file("etc/hostname", b"corral\n", 0o644, (1000, 1001), T0 + 2)
            .file("etc/empty", b"", 0o600, (0, 0), T0 + 3)
            .d("usr")
            .d("usr/bin")
            .pax(&[
                ("SCHILY.xattr.security.capability", &CAPABILITY),
                ("SCHILY.xattr.user.origin", b"layer\0binary\xff"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
            ])
            .file("usr/bin/ping", &big, 0o4755, (0, 0), T0 + 4)
            .hardlink("usr/bin/ping6", "usr/bin/ping")
            .file("usr/bin/sg", b"#!/bin/sh\n", 0o2755, (0, 50), T0 + 5)
            .dir("tmp", 0o1777, (0, 0), T0 + 6)
            .pax(&[("SCHILY.xattr.user.dir", b"yes")])
            .dir("srv", 0o2775, (33, 33), T0 + 7)
            .pax(&[
                ("SCHILY.xattr.trusted.on-symlink", b"1"),
                ("SCHILY.xattr.user.not-on-symlinks", b"2"),
            ])
            .symlink("bin", "usr/bin", (5, 6), T0 + 8)
            .symlink("etc/dangling", "/nonexistent/../../x", (0, 0), T0 + 9)
            .d("dev")
            .special("dev/null", EntryType::Char, 0o666, (1, 3), (0, 0))
            .special("dev/loop0", EntryType::Block, 0o660, (7, 0), (0, 6))
            .special("dev/fifo", EntryType::Fifo, 0o620, (0, 0), (7, 8))
            .d("deep")
            .d(&long_dir)
            .file(&long_file, b"long", 0o640, (2, 3), T0 + 10)
            .bytes();
        let limits = Limits {
            allow_devices: true,
            ..Limits::default()
        };
        let stats = sb.apply(&layer, &limits).expect("apply");
        assert_eq!(stats.files, 5);
        assert_eq!(stats.dirs, 8);
        assert_eq!(stats.symlinks, 2);
        assert_eq!(stats.hardlinks, 1);
        assert_eq!(stats.devices, 2);
        assert_eq!(stats.fifos, 1);
        assert_eq!(stats.entries, 19);
        assert_eq!(stats.content_bytes, (big.len() + 7 + 10 + 4) as u64);
        assert_eq!(stats.tar_bytes, layer.len() as u64);
        assert_eq!(stats.bytes_read, layer.len() as u64);
        assert_eq!(stats.diff_id, sha256(&layer));

        let md = |rel: &str| std::fs::symlink_metadata(sb.t(rel)).expect(rel);
        let check = |rel: &str, mode: u32, uid: u32, gid: u32, mtime: u64| {
            let m = md(rel);
            assert_eq!(m.mode() & 0o7777, mode, "{rel} mode");
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{rel} owner");
            assert_eq!(m.mtime(), mtime as i64, "{rel} mtime");
            assert_eq!(m.atime(), mtime as i64, "{rel} atime");
        };

        check("etc/hostname", 0o644, 1000, 1001, T0 + 2);
        assert_eq!(
            std::fs::read(sb.t("etc/hostname")).expect("read"),
            b"corral\n"
        );
        check("etc/empty", 0o600, 0, 0, T0 + 3);
        assert_eq!(md("etc/empty").len(), 0);
        check("usr/bin/ping", 0o4755, 0, 0, T0 + 4);
        assert_eq!(std::fs::read(sb.t("usr/bin/ping")).expect("read"), big);
        assert_eq!(
            get_xattr(&sb.t("usr/bin/ping"), "security.capability").as_deref(),
            Some(&CAPABILITY[..])
        );
        assert_eq!(
            get_xattr(&sb.t("usr/bin/ping"), "user.origin").as_deref(),
            Some(&b"layer\0binary\xff"[..])
        );
        assert_eq!(
            get_xattr(&sb.t("usr/bin/ping"), "trusted.overlay.redirect"),
            None
        );
        assert_eq!(md("usr/bin/ping6").ino(), md("usr/bin/ping").ino());
        assert_eq!(md("usr/bin/ping").nlink(), 2);
        check("usr/bin/sg", 0o2755, 0, 50, T0 + 5);
        assert!(md("tmp").is_dir());
        check("tmp", 0o1777, 0, 0, T0 + 6);
        check("srv", 0o2775, 33, 33, T0 + 7);
        assert_eq!(
            get_xattr(&sb.t("srv"), "user.dir").as_deref(),
            Some(&b"yes"[..])
        );
        assert!(md("bin").file_type().is_symlink());
        assert_eq!(
            std::fs::read_link(sb.t("bin")).expect("readlink"),
            Path::new("usr/bin")
        );
        assert_eq!((md("bin").uid(), md("bin").gid()), (5, 6));
        // Set on the link itself (the target directory has none); user.* is not allowed on
        // symlinks and is skipped.
        assert_eq!(
            get_xattr(&sb.t("bin"), "trusted.on-symlink").as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(get_xattr(&sb.t("usr/bin"), "trusted.on-symlink"), None);
        assert_eq!(get_xattr(&sb.t("bin"), "user.not-on-symlinks"), None);
        assert_eq!(md("bin").mtime(), (T0 + 8) as i64);
        assert_eq!(
            std::fs::read_link(sb.t("etc/dangling")).expect("readlink"),
            Path::new("/nonexistent/../../x")
        );
        assert!(md("dev/null").file_type().is_char_device());
        assert_eq!(md("dev/null").rdev(), libc::makedev(1, 3));
        assert_eq!(md("dev/null").mode() & 0o7777, 0o666);
        assert!(md("dev/loop0").file_type().is_block_device());
        assert_eq!(md("dev/loop0").rdev(), libc::makedev(7, 0));
        assert_eq!(
            (md("dev/loop0").gid(), md("dev/loop0").mode() & 0o7777),
            (6, 0o660)
        );
        assert!(md("dev/fifo").file_type().is_fifo());
        assert_eq!((md("dev/fifo").uid(), md("dev/fifo").gid()), (7, 8));
        assert_eq!(md("dev/fifo").mode() & 0o7777, 0o620);
        check(&long_file, 0o640, 2, 3, T0 + 10);
        assert_eq!(std::fs::read(sb.t(&long_file)).expect("read"), b"long");
        // Directory times survive the creation of their contents.
        check("etc", 0o755, 0, 0, T0 + 1);
        check("usr/bin", 0o755, 0, 0, T0);
        check("dev", 0o755, 0, 0, T0);
        sb.assert_sentinel_untouched();
    }

    #[test]
    fn pax_times_with_nanoseconds_and_missing_parents() {
        let sb = sandbox();
        let layer = Layer::new()
            .pax(&[
                ("mtime", b"1700000000.123456789"),
                ("atime", b"1600000000.5"),
            ])
            .f("a/b/c/file", b"x")
            .pax(&[("mtime", b"-1.25")])
            .f("old", b"y")
            .bytes();
        sb.apply(&layer, &Limits::default()).expect("apply");
        let m = std::fs::metadata(sb.t("a/b/c/file")).expect("file");
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 123_456_789));
        assert_eq!((m.atime(), m.atime_nsec()), (1_600_000_000, 500_000_000));
        let m = std::fs::metadata(sb.t("old")).expect("old");
        assert_eq!((m.mtime(), m.mtime_nsec()), (-2, 750_000_000));
        for parent in ["a", "a/b", "a/b/c"] {
            let m = std::fs::metadata(sb.t(parent)).expect(parent);
            assert!(m.is_dir());
            assert_eq!(
                (m.mode() & 0o7777, m.uid(), m.gid()),
                (0o755, 0, 0),
                "{parent}"
            );
        }
        assert_eq!(parse_pax_time(b"12"), Some(TimeSpec::new(12, 0)));
        assert_eq!(parse_pax_time(b"12.0000000019"), Some(TimeSpec::new(12, 1)));
        for bad in [&b""[..], b".5", b"1e3", b"1.2.3", b"--1", b"x", b"1.-2"] {
            assert_eq!(
                parse_pax_time(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let layer = Layer::new().pax(&[("mtime", b"soon")]).f("f", b"").bytes();
        let (entry, reason) = refused(sb.apply(&layer, &Limits::default()));
        assert_eq!(
            (entry.as_str(), reason),
            ("f", Refusal::BadHeader("PAX mtime".into()))
        );
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let sb = sandbox();
        let layer = Layer::new()
            .f("a", b"file first")
            .d("a")
            .f("a/inside", b"x")
            .d("b")
            .f("b/inside", b"x")
            .f("b", b"file replaces dir")
            .f("c", b"old")
            .f("c", b"new")
            .d("d")
            .dir("d", 0o700, (1, 1), T0 + 1)
            .bytes();
        sb.apply(&layer, &Limits::default()).expect("apply");
        assert!(sb.t("a").is_dir());
        assert_eq!(std::fs::read(sb.t("a/inside")).expect("a/inside"), b"x");
        assert_eq!(std::fs::read(sb.t("b")).expect("b"), b"file replaces dir");
        assert_eq!(std::fs::read(sb.t("c")).expect("c"), b"new");
        let d = std::fs::metadata(sb.t("d")).expect("d");
        assert_eq!(
            (d.mode() & 0o7777, d.uid(), d.mtime()),
            (0o700, 1, (T0 + 1) as i64)
        );
    }

    #[test]
    fn overlay_mode_writes_whiteout_devices_and_opaque_xattrs() {
        let sb = sandbox();
        let lower = sb.tmp.path().join("lower");
        std::fs::create_dir(&lower).expect("lower");
        let layer1 = Layer::new()
            .d("a")
            .f("a/keep", b"keep")
            .f("a/gone", b"gone")
            .d("a/gonedir")
            .f("a/gonedir/x", b"x")
            .d("o")
            .f("o/old", b"old")
            .d("o/sub")
            .f("o/sub/older", b"older")
            .bytes();
        apply_layer(&layer1[..], Compression::None, &lower, &Limits::default()).expect("layer 1");

        let layer2 = Layer::new()
            .d("a")
            .file("a/.wh.gone", b"", 0o600, (0, 0), T0)
            .file("a/.wh.gonedir", b"", 0o600, (0, 0), T0)
            .d("o")
            .file("o/.wh..wh..opq", b"", 0o600, (0, 0), T0)
            .f("o/new", b"new")
            .f("n/.wh.nothing", b"")
            .d(".wh..wh.plnk")
            .f(".wh..wh.plnk/123.456", b"aufs")
            .bytes();
        let stats = sb.apply(&layer2, &Limits::default()).expect("layer 2");
        assert_eq!(
            (stats.whiteouts, stats.opaque_dirs, stats.skipped),
            (3, 1, 2)
        );
        for hidden in ["a/gone", "a/gonedir", "n/nothing"] {
            let m = std::fs::symlink_metadata(sb.t(hidden)).expect(hidden);
            assert!(m.file_type().is_char_device(), "{hidden}");
            assert_eq!(m.rdev(), 0, "{hidden}");
        }
        assert_eq!(
            get_xattr(&sb.t("o"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(get_xattr(&sb.t("a"), "trusted.overlay.opaque"), None);
        assert!(!sb.t("o/.wh..wh..opq").exists());
        assert!(!sb.t(".wh..wh.plnk").exists());

        // What overlayfs makes of the two layers.
        let mnt = sb.tmp.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mnt");
        let options = format!("lowerdir={}:{}", sb.target.display(), lower.display());
        nix::mount::mount(
            Some("overlay"),
            &mnt,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(options.as_str()),
        )
        .expect("mount overlay");
        let seen = |rel: &str| std::fs::symlink_metadata(mnt.join(rel)).is_ok();
        let result = std::panic::catch_unwind(|| {
            assert!(seen("a/keep"));
            assert!(!seen("a/gone"));
            assert!(!seen("a/gonedir"));
            assert!(seen("o/new"));
            assert!(!seen("o/old"));
            assert!(!seen("o/sub"));
            assert!(!seen("n/nothing"));
        });
        nix::mount::umount(&mnt).expect("umount");
        std::fs::remove_dir(&mnt).expect("rmdir mnt");
        std::fs::remove_dir_all(&lower).expect("rm lower");
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
        sb.assert_sentinel_untouched();
    }

    #[test]
    fn apply_mode_deletes_whited_out_and_opaque_contents() {
        let sb = sandbox();
        let limits = Limits {
            whiteouts: WhiteoutMode::Apply,
            ..Limits::default()
        };
        let layer1 = Layer::new()
            .d("a")
            .f("a/keep", b"keep")
            .f("a/gone", b"gone")
            .d("a/gonedir")
            .d("a/gonedir/deeper")
            .f("a/gonedir/deeper/x", b"x")
            .symlink("a/gonelink", "/", (0, 0), T0)
            .d("o")
            .f("o/old", b"old")
            .d("o/sub")
            .f("o/sub/older", b"older")
            .d("p")
            .f("p/old", b"old")
            .f("shared", b"first layer")
            .bytes();
        sb.apply(&layer1, &limits).expect("layer 1");

        let layer2 = Layer::new()
            .file("a/.wh.gone", b"", 0o600, (0, 0), T0)
            .file("a/.wh.gonedir", b"", 0o600, (0, 0), T0)
            .file("a/.wh.gonelink", b"", 0o600, (0, 0), T0)
            .file("a/.wh.never-existed", b"", 0o600, (0, 0), T0)
            .file("missing/.wh.x", b"", 0o600, (0, 0), T0)
            // Marker first, then what survives it.
            .d("o")
            .file("o/.wh..wh..opq", b"", 0o600, (0, 0), T0)
            .d("o/sub")
            .f("o/sub/new", b"new")
            // What survives first, then the marker.
            .f("p/new", b"new")
            .file("p/.wh..wh..opq", b"", 0o600, (0, 0), T0)
            .hardlink("linked", "shared")
            .bytes();
        sb.apply(&layer2, &limits).expect("layer 2");
        assert_eq!(std::fs::read(sb.t("a/keep")).expect("keep"), b"keep");
        for gone in [
            "a/gone",
            "a/gonedir",
            "a/gonelink",
            "o/old",
            "o/sub/older",
            "p/old",
        ] {
            assert!(
                std::fs::symlink_metadata(sb.t(gone)).is_err(),
                "{gone} survived"
            );
        }
        assert!(!sb.t("missing").exists());
        assert_eq!(std::fs::read(sb.t("o/sub/new")).expect("o/sub/new"), b"new");
        assert_eq!(std::fs::read(sb.t("p/new")).expect("p/new"), b"new");
        assert_eq!(get_xattr(&sb.t("o"), "trusted.overlay.opaque"), None);
        // A hard link to a file from the layer below.
        let shared = std::fs::metadata(sb.t("shared")).expect("shared");
        assert_eq!(
            std::fs::metadata(sb.t("linked")).expect("linked").ino(),
            shared.ino()
        );
        sb.assert_sentinel_untouched();
    }

    #[test]
    fn compressed_layers_give_the_same_tree_and_diff_id() {
        let layer = Layer::new()
            .d("etc")
            .f("etc/os-release", b"ID=corral\n")
            .f("big", &vec![7u8; 1 << 20])
            .bytes();
        let expected = sha256(&layer);
        for (compression, blob) in [
            (Compression::None, layer.clone()),
            (Compression::Gzip, gzip(&layer)),
            (Compression::Zstd, zstd(&layer)),
        ] {
            let sb = sandbox();
            let stats = apply_layer(&blob[..], compression, &sb.target, &Limits::default())
                .unwrap_or_else(|e| panic!("{compression}: {e}"));
            assert_eq!(stats.diff_id, expected, "{compression}");
            assert_eq!(stats.bytes_read, blob.len() as u64, "{compression}");
            assert_eq!(stats.tar_bytes, layer.len() as u64, "{compression}");
            assert_eq!(
                std::fs::read(sb.t("etc/os-release")).expect("read"),
                b"ID=corral\n"
            );
            assert_eq!(
                std::fs::read(sb.t("big")).expect("read"),
                vec![7u8; 1 << 20]
            );
        }
    }

    #[test]
    fn diff_id_covers_padding_after_the_end_marker() {
        let sb = sandbox();
        let mut layer = Layer::new().f("f", b"data").bytes();
        // Go's and GNU tar's writers pad to a 10 KiB record.
        layer.resize(10240, 0);
        let stats = sb.apply(&layer, &Limits::default()).expect("apply");
        assert_eq!(stats.diff_id, sha256(&layer));
        assert_eq!(stats.tar_bytes, 10240);
    }

    #[test]
    fn eof_at_an_entry_boundary_ends_the_layer_as_in_go() {
        // No end-of-archive marker: accepted like Go's archive/tar, and the diff_id (which the
        // caller checks) is that of the bytes received.
        let sb = sandbox();
        let full = Layer::new().f("f", b"data").bytes();
        let cut = &full[..1024];
        let stats = sb.apply(cut, &Limits::default()).expect("apply");
        assert_eq!(stats.diff_id, sha256(cut));
        assert_ne!(stats.diff_id, sha256(&full));
    }

    #[test]
    fn refuses_paths_that_climb_above_the_root() {
        for name in [
            &b"../escape"[..],
            b"a/../../escape",
            b"./../escape",
            b"/../escape",
        ] {
            let sb = sandbox();
            let layer = Layer::new().d("a").raw(name, b'0', b"", b"pwned").bytes();
            let (entry, reason) = refused(sb.apply(&layer, &Limits::default()));
            assert_eq!(entry.as_bytes(), name);
            assert_eq!(reason, Refusal::EscapesRoot);
            assert!(!sb.tmp.path().join("escape").exists());
            sb.assert_sentinel_untouched();
        }
        // A `..` that stays inside is resolved lexically.
        let sb = sandbox();
        let layer = Layer::new()
            .d("a")
            .raw(b"a/../inside", b'0', b"", b"ok")
            .bytes();
        sb.apply(&layer, &Limits::default()).expect("apply");
        assert_eq!(std::fs::read(sb.t("inside")).expect("inside"), b"ok");
    }

    #[test]
    fn absolute_paths_land_inside_the_target() {
        let sb = sandbox();
        let abs = sb.sentinel.join("secret");
        let abs = abs.as_os_str().as_encoded_bytes();
        let layer = Layer::new().raw(abs, b'0', b"", b"pwned").bytes();
        sb.apply(&layer, &Limits::default()).expect("apply");
        let inside = sb
            .target
            .join(sb.sentinel.join("secret").strip_prefix("/").expect("abs"));
        assert_eq!(std::fs::read(inside).expect("inside"), b"pwned");
        sb.assert_sentinel_untouched();
    }

    #[test]
    fn refuses_parents_through_symlinks_from_the_layer() {
        // None: the sentinel's absolute path.
        for (link_target, shown) in [
            (None, "abs"),
            (Some("../sentinel"), "rel"),
            (Some("../../../../../../../../"), "root"),
            (Some("inside"), "inside"),
        ] {
            let sb = sandbox();
            let link_target = link_target
                .map(str::to_owned)
                .unwrap_or_else(|| sb.sentinel.display().to_string());
            let layer = Layer::new()
                .d("inside")
                .symlink("evil", &link_target, (0, 0), T0)
                .f("evil/pwned", b"pwned")
                .bytes();
            let (entry, reason) = refused(sb.apply(&layer, &Limits::default()));
            assert_eq!(entry, "evil/pwned", "{shown}");
            assert_eq!(reason, Refusal::SymlinkInPath("evil".into()), "{shown}");
            assert!(!sb.t("inside/pwned").exists());
            sb.assert_sentinel_untouched();

            // Deeper: the symlink is not the first component, and the entry is a directory.
            let sb = sandbox();
            let layer = Layer::new()
                .d("a")
                .symlink("a/evil", &link_target, (0, 0), T0)
                .d("a/evil/sub")
                .bytes();
            let (_, reason) = refused(sb.apply(&layer, &Limits::default()));
            assert_eq!(reason, Refusal::SymlinkInPath("a/evil".into()), "{shown}");
            sb.assert_sentinel_untouched();
        }
    }

    #[test]
    fn refuses_parents_through_symlinks_already_in_the_target() {
        for mode in [WhiteoutMode::Apply, WhiteoutMode::Overlay] {
            let sb = sandbox();
            std::os::unix::fs::symlink(&sb.sentinel, sb.t("escape")).expect("symlink");
            let limits = Limits {
                whiteouts: mode,
                ..Limits::default()
            };
            for layer in [
                Layer::new().f("escape/pwned", b"pwned").bytes(),
                Layer::new().f("escape/secret", b"pwned").bytes(),
                Layer::new()
                    .file("escape/.wh.secret", b"", 0o600, (0, 0), T0)
                    .bytes(),
                Layer::new()
                    .file("escape/.wh..wh..opq", b"", 0o600, (0, 0), T0)
                    .bytes(),
                Layer::new().hardlink("stolen", "escape/secret").bytes(),
            ] {
                let (_, reason) = refused(sb.apply(&layer, &limits));
                assert_eq!(reason, Refusal::SymlinkInPath("escape".into()), "{mode:?}");
                sb.assert_sentinel_untouched();
                assert_eq!(get_xattr(&sb.sentinel, "trusted.overlay.opaque"), None);
            }
        }
    }

    #[test]
    fn a_final_symlink_is_replaced_never_followed() {
        let sb = sandbox();
        let secret = sb.sentinel.join("secret").display().to_string();
        let layer = Layer::new()
            .symlink("f", &secret, (0, 0), T0)
            .f("f", b"replaced")
            .symlink("d", &sb.sentinel.display().to_string(), (0, 0), T0)
            .dir("d", 0o700, (0, 0), T0)
            .symlink("h", &secret, (0, 0), T0)
            .hardlink("h2", "h")
            .f("h2", b"replaced")
            .symlink("n", &secret, (0, 0), T0)
            .special("n", EntryType::Fifo, 0o600, (0, 0), (0, 0))
            .bytes();
        sb.apply(&layer, &Limits::default()).expect("apply");
        assert_eq!(std::fs::read(sb.t("f")).expect("f"), b"replaced");
        assert!(std::fs::symlink_metadata(sb.t("d")).expect("d").is_dir());
        assert_eq!(
            std::fs::read_link(sb.t("h"))
                .expect("h")
                .display()
                .to_string(),
            secret
        );
        assert!(std::fs::symlink_metadata(sb.t("n"))
            .expect("n")
            .file_type()
            .is_fifo());
        // The sentinel dir's mode was not changed through "d".
        assert_eq!(
            std::fs::metadata(&sb.sentinel).expect("sentinel").mode() & 0o7777,
            0o755
        );
        sb.assert_sentinel_untouched();
    }

    #[test]
    fn refuses_hard_links_outside_the_target() {
        let sb = sandbox();
        let layer = Layer::new()
            .raw(b"stolen", b'1', b"../sentinel/secret", b"")
            .bytes();
        let (entry, reason) = refused(sb.apply(&layer, &Limits::default()));
        assert_eq!(entry, "stolen");
        assert_eq!(
            reason,
            Refusal::LinkEscapesRoot("../sentinel/secret".into())
        );
        sb.assert_sentinel_untouched();

        // An absolute link target means the file inside the target, which is not there.
        let sb = sandbox();
        let abs = sb.sentinel.join("secret").display().to_string();
        let layer = Layer::new()
            .raw(b"stolen", b'1', abs.as_bytes(), b"")
            .bytes();
        let (_, reason) = refused(sb.apply(&layer, &Limits::default()));
        assert_eq!(reason, Refusal::LinkTargetMissing(abs));
        sb.assert_sentinel_untouched();

        // Through a symlink of the layer.
        let sb = sandbox();
        let layer = Layer::new()
            .symlink("evil", &sb.sentinel.display().to_string(), (0, 0), T0)
            .hardlink("stolen", "evil/secret")
            .bytes();
        let (_, reason) = refused(sb.apply(&layer, &Limits::default()));
        assert_eq!(reason, Refusal::SymlinkInPath("evil".into()));
        sb.assert_sentinel_untouched();

        // To itself, to the root, to a directory.
        for (name, link) in [
            (&b"self"[..], &b"self"[..]),
            (b"root", b"/"),
            (b"dir", b"d"),
        ] {
            let sb = sandbox();
            let layer = Layer::new().d("d").raw(name, b'1', link, b"").bytes();
            let (_, reason) = refused(sb.apply(&layer, &Limits::default()));
            assert!(
                matches!(
                    reason,
                    Refusal::BadLinkTarget(_) | Refusal::LinkTargetMissing(_)
                ),
                "{reason}"
            );
        }
    }

    #[test]
    fn refuses_devices_unless_allowed() {
        for kind in [EntryType::Char, EntryType::Block] {
            let sb = sandbox();
            let layer = Layer::new()
                .special("dev/sda", kind, 0o600, (8, 0), (0, 0))
                .bytes();
            let (entry, reason) = refused(sb.apply(&layer, &Limits::default()));
            assert_eq!(
                (entry.as_str(), reason),
                ("dev/sda", Refusal::DeviceNotAllowed)
            );
            assert!(!sb.t("dev/sda").exists());
            sb.assert_sentinel_untouched();
        }
    }

    #[test]
    fn refuses_nul_in_names() {
        let sb = sandbox();
        for layer in [
            Layer::new()
                .pax(&[("path", b"a\0b")])
                .f("placeholder", b"")
                .bytes(),
            Layer::new()
                .pax(&[("linkpath", b"t\0x")])
                .symlink("l", "placeholder", (0, 0), T0)
                .bytes(),
            Layer::new()
                .pax(&[("linkpath", b"t\0x")])
                .hardlink("h", "placeholder")
                .bytes(),
            Layer::new()
                .pax(&[("SCHILY.xattr.user.a\0b", b"v")])
                .f("x", b"")
                .bytes(),
        ] {
            let (_, reason) = refused(sb.apply(&layer, &Limits::default()));
            assert!(
                matches!(reason, Refusal::NulInName | Refusal::BadHeader(_)),
                "{reason}"
            );
        }
        let err = refused(sb.apply(
            &Layer::new().pax(&[("path", b"a\0b")]).f("p", b"").bytes(),
            &Limits::default(),
        ));
        assert_eq!(err, ("a\0b".to_owned(), Refusal::NulInName));
        sb.assert_sentinel_untouched();
    }

    #[test]
    fn refuses_bad_names_and_types() {
        let sb = sandbox();
        let long = "n".repeat(256);
        let (_, reason) =
            refused(sb.apply(&Layer::new().f(&long, b"").bytes(), &Limits::default()));
        assert_eq!(reason, Refusal::NameTooLong);
        let (_, reason) = refused(sb.apply(
            &Layer::new().raw(b"x/.wh.", b'0', b"", b"").bytes(),
            &Limits::default(),
        ));
        assert_eq!(reason, Refusal::BadWhiteout);
        let (_, reason) = refused(sb.apply(
            &Layer::new().raw(b"label", b'V', b"", b"").bytes(),
            &Limits::default(),
        ));
        assert_eq!(reason, Refusal::UnsupportedType(b'V'));
        let (_, reason) = refused(sb.apply(
            &Layer::new().raw(b"empty", b'2', b"", b"").bytes(),
            &Limits::default(),
        ));
        assert_eq!(reason, Refusal::EmptySymlink);
        let mut h = header(EntryType::Regular, 0o644, (1 << 33, 0), T0);
        h.set_cksum();
        let mut b = Builder::new(Vec::new());
        b.append_data(&mut h, "big-uid", io::empty())
            .expect("append");
        let (_, reason) = refused(sb.apply(&b.into_inner().expect("tar"), &Limits::default()));
        assert_eq!(reason, Refusal::BadHeader("uid".into()));
        sb.assert_sentinel_untouched();
    }

    #[test]
    fn empty_numeric_fields_read_as_zero_as_in_go() {
        let sb = sandbox();
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..4].copy_from_slice(b"bare");
        h.set_entry_type(EntryType::Regular);
        h.set_size(2);
        h.set_cksum();
        let mut layer = h.as_bytes().to_vec();
        layer.extend_from_slice(b"hi");
        layer.resize(512 * 2 + 1024, 0);
        sb.apply(&layer, &Limits::default()).expect("apply");
        let m = std::fs::metadata(sb.t("bare")).expect("bare");
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid(), m.mtime()),
            (0, 0, 0, 0)
        );
        assert_eq!(std::fs::read(sb.t("bare")).expect("read"), b"hi");
    }

    #[test]
    fn refuses_too_many_entries() {
        let sb = sandbox();
        let mut layer = Layer::new();
        for i in 0..10 {
            layer = layer.f(&format!("f{i}"), b"");
        }
        let limits = Limits {
            max_files: 5,
            ..Limits::default()
        };
        match sb.apply(&layer.bytes(), &limits) {
            Err(UnpackError::TooManyEntries { limit: 5 }) => {}
            other => panic!("{other:?}"),
        }
        assert!(!sb.t("f5").exists());
        sb.assert_sentinel_untouched();
    }

    /// A 1 GiB file of zeros as a chain of compressed members or frames of `chunk` bytes each:
    /// cheap to build, and long enough compressed that stopping early shows.
    fn bomb(compress: fn(&[u8]) -> Vec<u8>, chunk: usize) -> Vec<u8> {
        let mut h = header(EntryType::Regular, 0o644, (0, 0), T0);
        h.set_path("bomb").expect("path");
        h.set_size(1 << 30);
        h.set_cksum();
        let mut blob = compress(h.as_bytes());
        let compressed = compress(&vec![0u8; chunk]);
        for _ in 0..(1 << 30) / chunk {
            blob.extend_from_slice(&compressed);
        }
        blob.extend_from_slice(&compress(&[0u8; 1024]));
        blob
    }

    #[test]
    fn stops_a_decompression_bomb_early() {
        for (compression, compress, chunk) in [
            (Compression::Gzip, gzip as fn(&[u8]) -> Vec<u8>, 1 << 20),
            (Compression::Zstd, zstd as fn(&[u8]) -> Vec<u8>, 4 << 10),
        ] {
            let sb = sandbox();
            let blob = bomb(compress, chunk);
            let consumed = Cell::new(0u64);
            let reader = CountingReader {
                inner: &blob[..],
                count: &consumed,
            };
            let limits = Limits {
                max_bytes: 8 << 20,
                ..Limits::default()
            };
            match apply_layer(reader, compression, &sb.target, &limits) {
                Err(UnpackError::TooLarge { limit }) => assert_eq!(limit, 8 << 20),
                other => panic!("{compression}: {other:?}"),
            }
            assert!(
                consumed.get() < blob.len() as u64 / 10,
                "{compression}: read {} of {}",
                consumed.get(),
                blob.len()
            );
            let written = std::fs::metadata(sb.t("bomb"))
                .map(|m| m.len())
                .unwrap_or(0);
            assert!(written <= 8 << 20, "{compression}: wrote {written}");
            sb.assert_sentinel_untouched();
        }
    }

    #[test]
    fn refuses_entries_with_more_data_than_their_header_claims() {
        let sb = sandbox();
        let mut h = header(EntryType::Regular, 0o644, (0, 0), T0);
        h.set_path("liar").expect("path");
        h.set_size(10);
        h.set_cksum();
        let mut layer = h.as_bytes().to_vec();
        layer.extend_from_slice(&[b'A'; 2048]);
        layer.extend_from_slice(&[0; 1024]);
        match sb.apply(&layer, &Limits::default()) {
            Err(UnpackError::Corrupt { position, .. }) => {
                assert!(position.contains("liar"), "{position}")
            }
            other => panic!("{other:?}"),
        }
        sb.assert_sentinel_untouched();
    }

    #[test]
    fn refuses_truncated_archives() {
        let content = vec![5u8; 100_000];
        let layer = Layer::new().f("first", b"1").f("big", &content).bytes();
        let big_header = 1024;
        let sb = sandbox();
        match sb.apply(&layer[..big_header + 512 + 50_000], &Limits::default()) {
            Err(UnpackError::Truncated {
                entry,
                expected,
                got,
            }) => {
                assert_eq!((entry.as_str(), expected, got), ("big", 100_000, 50_000));
            }
            other => panic!("{other:?}"),
        }
        match sb.apply(&layer[..big_header + 200], &Limits::default()) {
            Err(UnpackError::Corrupt { position, .. }) => {
                assert!(position.contains("first"), "{position}")
            }
            other => panic!("{other:?}"),
        }
        for (compression, blob) in [
            (Compression::Gzip, gzip(&layer)),
            (Compression::Zstd, zstd(&layer)),
        ] {
            let sb = sandbox();
            let cut = &blob[..blob.len() - 20];
            match apply_layer(cut, compression, &sb.target, &Limits::default()) {
                Err(UnpackError::Corrupt { .. }) | Err(UnpackError::Truncated { .. }) => {}
                other => panic!("{compression}: {other:?}"),
            }
            // Garbage where the stream should be.
            let garbage = vec![0x5a; 4096];
            assert!(
                apply_layer(&garbage[..], compression, &sb.target, &Limits::default()).is_err()
            );
            sb.assert_sentinel_untouched();
        }
    }

    #[test]
    fn refuses_oversized_metadata_records() {
        let sb = sandbox();
        let huge = vec![b'x'; 4 << 20];
        let layer = Layer::new().pax(&[("comment", &huge)]).f("f", b"").bytes();
        let (entry, reason) = refused(sb.apply(&layer, &Limits::default()));
        assert_eq!(reason, Refusal::MetadataTooLarge);
        assert!(entry.contains("before the first entry"), "{entry}");
        // A long path of ordinary size is fine.
        let name = format!("{}/{}", "p".repeat(200), "q".repeat(200));
        sb.apply(&Layer::new().f(&name, b"ok").bytes(), &Limits::default())
            .expect("long name");
    }

    #[test]
    fn errors_say_whether_the_layer_is_at_fault() {
        let missing = Path::new("/nonexistent/corral-target");
        let err = apply_layer(&b""[..], Compression::None, missing, &Limits::default())
            .expect_err("target");
        assert!(!err.is_bad_layer());
        assert!(err.to_string().contains("corral-target"), "{err}");
        let sb = sandbox();
        let err = sb
            .apply(
                &Layer::new().raw(b"../x", b'0', b"", b"").bytes(),
                &Limits::default(),
            )
            .expect_err("refused");
        assert!(err.is_bad_layer());
        assert_eq!(
            err.to_string(),
            "layer entry \"../x\" refused: path climbs above the layer root"
        );
    }

    #[test]
    fn walk_fallback_refuses_the_same_things() {
        // The component walk stands in for openat2 on old kernels; check it on its own.
        let sb = sandbox();
        std::fs::create_dir_all(sb.t("a/b")).expect("a/b");
        std::os::unix::fs::symlink(&sb.sentinel, sb.t("a/link")).expect("symlink");
        std::fs::write(sb.t("a/file"), b"").expect("file");
        let mut u = Unpacker::new(&sb.target, &Limits::default()).expect("unpacker");
        u.walk_only = true;
        assert!(matches!(
            u.resolve_dir("e", &[b"a", b"b"], false),
            Ok(Lookup::Found(_))
        ));
        assert!(matches!(
            u.resolve_dir("e", &[b"a", b"zz"], false),
            Ok(Lookup::Missing)
        ));
        assert!(matches!(
            u.resolve_dir("e", &[b"a", b"new", b"newer"], true),
            Ok(Lookup::Found(_))
        ));
        assert!(sb.t("a/new/newer").is_dir());
        match u.resolve_dir("e", &[b"a", b"link", b"x"], true) {
            Err(UnpackError::Refused { reason, .. }) => {
                assert_eq!(reason, Refusal::SymlinkInPath("a/link".into()))
            }
            other => panic!("{:?}", other.err()),
        }
        match u.resolve_dir("e", &[b"a", b"file", b"x"], true) {
            Err(UnpackError::Refused { reason, .. }) => {
                assert_eq!(reason, Refusal::NotADirectory("a/file".into()))
            }
            other => panic!("{:?}", other.err()),
        }
        sb.assert_sentinel_untouched();
    }
}
