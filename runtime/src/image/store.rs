//! The image store: the one object the daemon holds for images. It ties the content store,
//! the snapshotter, the registry client and the metadata database together.
//!
//! ```text
//! <root>/meta.db       metadata (names, targets, snapshots, leases)
//! <root>/content/      the content store (blobs by digest, ingests)
//! <root>/snapshots/    the overlayfs snapshots
//! <root>/tmp/          scratch space of imports, emptied at open
//! ```
//!
//! Owns the image records (names and what they resolve to), lookups by name, id, digest or id
//! prefix, removal, garbage collection of blobs and snapshots that nothing uses, leases that
//! protect a pull or an import in progress, and disk usage. The pull pipeline lives in
//! `pull.rs` and the archive import in `import.rs`; both finish by calling
//! [`ImageStore::record`]. It knows nothing of containers beyond the writable snapshots
//! they hold (a snapshot's parent keeps its chain alive), and nothing of CRI.
//!
//! Naming follows containerd's CRI plugin, which kubelet's image handling expects: a pull of
//! `repo:tag` records the names `repo:tag`, `repo@<digest>` and the id `sha256:<config>`;
//! a reference with both tag and digest is recorded by its digest alone. An image is the set
//! of names whose targets share one config digest (its id).
//!
//! Garbage collection rule: a blob or committed snapshot stays while a target record or a
//! live lease names it (and a snapshot while a writable snapshot sits on it or on one of its
//! descendants). Collection and lease writes are serialized by `gc_lock`, so a pull that has
//! written its lease never sees a blob vanish under it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::content::{ContentError, ContentStore};
use super::error::{ImageError, Result};
use super::metadata::{
    now_secs, ActiveRecord, LeaseRecord, Metadata, NameRecord, SnapshotRecord, Table, TargetRecord,
    Tx,
};
use super::oci::ImageConfig;
use super::reference::{Digest, Reference};
use super::registry::{RegistryClient, RegistryConfig};
use super::snapshot::{Snapshotter, Usage};
use super::unpack::Limits;

/// How the store is set up.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The image root, e.g. `/var/lib/corral/images`.
    pub root: PathBuf,
    pub registry: RegistryConfig,
    /// Blobs fetched at once, across all pulls.
    pub max_concurrent_downloads: usize,
    /// What one layer may make the unpacker do.
    pub limits: Limits,
    /// How long the blobs of a pull that did not finish are kept for it to resume.
    pub lease_expiry: Duration,
}

impl StoreOptions {
    pub fn new(root: impl Into<PathBuf>) -> StoreOptions {
        StoreOptions {
            root: root.into(),
            registry: RegistryConfig::default(),
            max_concurrent_downloads: 3,
            limits: Limits::default(),
            // containerd's default for the leases of its pulls.
            lease_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

/// An image as CRI reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The config digest, `sha256:…`.
    pub id: String,
    /// `registry/repository:tag`, sorted.
    pub repo_tags: Vec<String>,
    /// `registry/repository@sha256:…`, sorted.
    pub repo_digests: Vec<String>,
    /// Compressed layers plus config, in bytes.
    pub size: u64,
    /// The digest the image's names resolve to: an index or a manifest.
    pub target: Digest,
    /// The platform manifest that was unpacked.
    pub manifest: Digest,
    /// One per layer, bottom first.
    pub chain_ids: Vec<Digest>,
    pub config: ImageConfig,
}

impl Image {
    /// The chain id of the top layer: the parent of a container's writable snapshot (`None`
    /// for an image without layers).
    pub fn top_chain(&self) -> Option<&Digest> {
        self.chain_ids.last()
    }
}

/// Disk use of the image filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsUsage {
    /// Blobs, ingests and committed layer snapshots.
    pub images: Usage,
    /// Containers' writable layers.
    pub containers: Usage,
}

/// The image store. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct ImageStore {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.inner.root)
            .finish()
    }
}

pub(crate) type SharedUnit =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<UnitOutput>>>;
pub(crate) type WeakUnit =
    futures::future::WeakShared<futures::future::BoxFuture<'static, Result<UnitOutput>>>;

/// What one shared download or unpack did, for the pull's figures.
#[derive(Debug, Clone, Default)]
pub(crate) struct UnitOutput {
    pub fetched: u64,
    pub unpacked_bytes: u64,
    pub unpack_time: Duration,
    pub unpacked: bool,
}

pub(crate) struct Inner {
    pub(crate) root: PathBuf,
    pub(crate) meta: Arc<Metadata>,
    pub(crate) content: ContentStore,
    pub(crate) snapshots: Arc<Snapshotter>,
    pub(crate) registry: RegistryClient,
    pub(crate) limits: Limits,
    pub(crate) downloads: Arc<tokio::sync::Semaphore>,
    /// Downloads and unpacks in progress, by `blob:<digest>` / `chain:<id>`: a second pull of
    /// the same content awaits the first one's instead of starting its own. Weak, so that a
    /// unit every pull gave up on is dropped (its ingest stays for a resume).
    pub(crate) inflight: Mutex<HashMap<String, WeakUnit>>,
    /// Blocking work (a blob writer, an unpack) still running per key, which can outlive the
    /// future that started it; a failed pull waits for its own to end before it cleans up.
    pub(crate) busy: Mutex<HashMap<String, usize>>,
    pub(crate) lease_expiry: Duration,
    /// Leases of pulls and imports running in this process.
    pub(crate) live_leases: Mutex<HashSet<String>>,
    pub(crate) lease_seq: AtomicU64,
    pub(crate) gc_lock: RwLock<()>,
}

/// Removes a key from [`Inner::busy`] when the blocking work holding it ends.
pub(crate) struct BusyGuard {
    inner: Arc<Inner>,
    key: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut busy = lock(&self.inner.busy);
        if let Some(n) = busy.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.key);
            }
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it consistent (single inserts and
    // removes), so the poison flag carries no information.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs blocking work (file I/O, metadata commits) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::internal("image store task", e))?
}

/// How a lookup matched.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Match {
    /// By id, full or prefix: the whole image.
    Id,
    /// By one of its names.
    Name(String),
}

/// The name under which `reference` is recorded: normalized as kubelet writes it, with the
/// tag dropped when a digest is present (containerd's `ParseDockerRef`).
pub fn canonical_name(reference: &str) -> Result<String> {
    let mut r =
        Reference::parse(reference).map_err(|e| ImageError::InvalidArgument(e.to_string()))?;
    if r.digest.is_some() {
        r.tag = None;
    }
    Ok(r.to_string())
}

fn is_tag_name(name: &str) -> bool {
    !name.starts_with("sha256:") && !name.contains('@')
}

fn is_digest_name(name: &str) -> bool {
    !name.starts_with("sha256:") && name.contains('@')
}

fn parse_digests(list: &[String]) -> Result<Vec<Digest>> {
    list.iter()
        .map(|s| Digest::parse(s).map_err(|e| ImageError::internal("image metadata", e)))
        .collect()
}

impl ImageStore {
    /// Opens (creating) the store at `options.root`, and removes what a crash or an expired
    /// pull left: snapshot directories and ingests no record names, blobs and snapshots no
    /// image uses, leases past their expiry.
    pub async fn open(options: StoreOptions) -> Result<ImageStore> {
        blocking(move || ImageStore::open_blocking(options)).await
    }

    fn open_blocking(options: StoreOptions) -> Result<ImageStore> {
        let root = options.root.clone();
        fs::create_dir_all(&root)
            .map_err(|e| ImageError::internal(format!("creating {}", root.display()), e))?;
        let meta = Arc::new(Metadata::open(&root.join("meta.db"))?);
        let content = ContentStore::open(root.join("content"))?;
        let snapshots = Arc::new(Snapshotter::open(root.join("snapshots"), meta.clone())?);
        let registry = RegistryClient::new(options.registry)?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .map_err(|e| ImageError::internal(format!("emptying {}", tmp.display()), e))?;
        }
        snapshots.remove_orphans()?;
        let store = ImageStore {
            inner: Arc::new(Inner {
                root,
                meta,
                content,
                snapshots,
                registry,
                limits: options.limits,
                downloads: Arc::new(tokio::sync::Semaphore::new(
                    options.max_concurrent_downloads.max(1),
                )),
                inflight: Mutex::new(HashMap::new()),
                busy: Mutex::new(HashMap::new()),
                lease_expiry: options.lease_expiry,
                live_leases: Mutex::new(HashSet::new()),
                lease_seq: AtomicU64::new(0),
                gc_lock: RwLock::new(()),
            }),
        };
        store.gc_blocking(false)?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The snapshotter, for containers' writable snapshots (`prepare` on
    /// [`Image::top_chain`], `mounts`, `remove`, `usage`).
    pub fn snapshots(&self) -> &Snapshotter {
        &self.inner.snapshots
    }

    pub fn content(&self) -> &ContentStore {
        &self.inner.content
    }

    /// The image `query` names: a reference (`busybox`, `repo:tag`, `repo@sha256:…`), an id
    /// (`sha256:…` or its 64 hex digits), or a unique prefix of an id's hex as crictl
    /// abbreviates it.
    pub async fn get(&self, query: &str) -> Result<Image> {
        let store = self.clone();
        let query = query.to_owned();
        blocking(move || store.get_blocking(&query)).await
    }

    pub(crate) fn get_blocking(&self, query: &str) -> Result<Image> {
        let r = self.inner.meta.read()?;
        let Some((id, _)) = resolve(&r, query)? else {
            return Err(ImageError::NotFound(format!("image {query:?} not found")));
        };
        images(&r, Some(&id))?
            .pop()
            .ok_or_else(|| ImageError::NotFound(format!("image {query:?} not found")))
    }

    /// Every image, or those `filter` names (as [`ImageStore::get`] reads it).
    pub async fn list(&self, filter: Option<&str>) -> Result<Vec<Image>> {
        if let Some(f) = filter.filter(|f| !f.is_empty()) {
            return match self.get(f).await {
                Ok(i) => Ok(vec![i]),
                Err(ImageError::NotFound(_)) => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        }
        let store = self.clone();
        blocking(move || images(&store.inner.meta.read()?, None)).await
    }

    /// Removes the image `query` names. By id: the image with all its names. By name: that
    /// name, and the whole image when no tag is left (as Docker does). Then frees the blobs
    /// and snapshots nothing uses any more. `Ok(false)` when there was no such image.
    ///
    /// An image whose top layer holds a container's writable snapshot is not removed
    /// (`FailedPrecondition`) unless another image keeps that layer.
    pub async fn remove(&self, query: &str) -> Result<bool> {
        let store = self.clone();
        let query = query.to_owned();
        blocking(move || {
            let removed = store.remove_blocking(&query)?;
            if removed {
                store.gc_blocking(false)?;
            }
            Ok(removed)
        })
        .await
    }

    fn remove_blocking(&self, query: &str) -> Result<bool> {
        let w = self.inner.meta.write()?;
        let Some((id, how)) = resolve(&w, query)? else {
            return Ok(false);
        };
        let names: Vec<(String, NameRecord)> = w.list(Table::Names)?;
        let targets: HashMap<String, TargetRecord> = w.list(Table::Targets)?.into_iter().collect();
        let config_of = |n: &NameRecord| targets.get(&n.target).map(|t| t.config.as_str());
        let group: Vec<&(String, NameRecord)> = names
            .iter()
            .filter(|(_, n)| config_of(n) == Some(id.as_str()))
            .collect();
        let delete: Vec<String> = match &how {
            Match::Id => group.iter().map(|(k, _)| k.clone()).collect(),
            Match::Name(name) => {
                let tags_left = group.iter().any(|(k, _)| k != name && is_tag_name(k));
                if tags_left {
                    vec![name.clone()]
                } else {
                    group.iter().map(|(k, _)| k.clone()).collect()
                }
            }
        };
        let delete_set: HashSet<&String> = delete.iter().collect();
        let remaining_targets: HashSet<&String> = names
            .iter()
            .filter(|(k, _)| !delete_set.contains(k))
            .map(|(_, n)| &n.target)
            .collect();

        // A container's writable layer sits on the image's top chain: refuse to drop the last
        // image that provides that chain (its snapshot would stay, but nothing would show it).
        let dropped_tops: HashSet<&String> = targets
            .iter()
            .filter(|(t, _)| !remaining_targets.contains(t))
            .filter_map(|(_, rec)| rec.chain_ids.last())
            .collect();
        let kept_tops: HashSet<&String> = targets
            .iter()
            .filter(|(t, _)| remaining_targets.contains(t))
            .filter_map(|(_, rec)| rec.chain_ids.last())
            .collect();
        let group_targets: HashSet<&String> = group.iter().map(|(_, n)| &n.target).collect();
        for (key, active) in w.list::<ActiveRecord>(Table::Active)? {
            let Some(parent) = &active.parent else {
                continue;
            };
            let ours = group_targets
                .iter()
                .filter_map(|t| targets.get(*t))
                .any(|rec| rec.chain_ids.last() == Some(parent));
            if ours && dropped_tops.contains(parent) && !kept_tops.contains(parent) {
                return Err(ImageError::FailedPrecondition(format!(
                    "image {query:?} ({id}) is in use by container snapshot {key:?}"
                )));
            }
        }

        for name in &delete {
            w.remove(Table::Names, name)?;
        }
        for t in targets.keys() {
            if !remaining_targets.contains(t) {
                w.remove(Table::Targets, t)?;
            }
        }
        w.commit()?;
        tracing::info!(image = %query, id = %id, names = ?delete, "image names removed");
        Ok(true)
    }

    /// Disk use of the image filesystem (blobs, ingests, committed snapshots) and of the
    /// containers' writable layers, for ImageFsInfo.
    pub async fn fs_usage(&self) -> Result<FsUsage> {
        let store = self.clone();
        blocking(move || {
            let (bytes, inodes) = store.inner.content.usage()?;
            let mut images = Usage { bytes, inodes };
            for s in store.inner.snapshots.list()? {
                images += s.usage;
            }
            Ok(FsUsage {
                images,
                containers: store.inner.snapshots.active_usage()?,
            })
        })
        .await
    }

    /// Collects blobs and snapshots that no image, lease or writable snapshot uses.
    pub async fn gc(&self) -> Result<()> {
        let store = self.clone();
        blocking(move || store.gc_blocking(false)).await
    }

    /// `settle`: after a failed pull, wait for ingest locks other units of it still hold, so
    /// that their partial ingests go too.
    pub(crate) fn gc_blocking(&self, settle: bool) -> Result<()> {
        let inner = &self.inner;
        let _gc = inner.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let live = lock(&inner.live_leases).clone();
        let now = now_secs();
        let w = inner.meta.write()?;

        let mut blobs: HashSet<String> = HashSet::new();
        let mut chains: HashSet<String> = HashSet::new();
        for (_, t) in w.list::<TargetRecord>(Table::Targets)? {
            blobs.extend(t.blobs);
            chains.extend(t.chain_ids);
        }
        for (id, lease) in w.list::<LeaseRecord>(Table::Leases)? {
            if lease.expires < now && !live.contains(&id) {
                tracing::info!(lease = %id, image = %lease.image, "lease expired");
                w.remove(Table::Leases, &id)?;
                continue;
            }
            blobs.extend(lease.blobs);
            chains.extend(lease.chains);
        }
        let snapshots: HashMap<String, SnapshotRecord> =
            w.list(Table::Snapshots)?.into_iter().collect();
        let mut keep: HashSet<String> = HashSet::new();
        let mut roots: Vec<String> = chains.into_iter().collect();
        for (_, a) in w.list::<ActiveRecord>(Table::Active)? {
            roots.extend(a.parent);
        }
        for root in roots {
            let mut next = Some(root);
            while let Some(c) = next {
                if !keep.insert(c.clone()) {
                    break;
                }
                next = snapshots.get(&c).and_then(|s| s.parent.clone());
            }
        }
        let mut doomed = Vec::new();
        for (chain, rec) in &snapshots {
            if !keep.contains(chain) {
                w.remove(Table::Snapshots, chain)?;
                doomed.push((chain.clone(), rec.id));
            }
        }
        w.commit()?;
        for (chain, id) in doomed {
            tracing::info!(chain = %chain, id, "removing unused snapshot");
            inner.snapshots.delete_dir(id);
        }

        for (digest, _) in inner.content.list()? {
            if !blobs.contains(&digest.to_string()) {
                tracing::info!(blob = %digest, "removing unused blob");
                inner.content.delete(&digest)?;
            }
        }
        for ingest in inner.content.ingests()? {
            if blobs.contains(&ingest.expected.to_string()) {
                continue;
            }
            let mut tries = if settle { 250 } else { 1 };
            loop {
                match inner.content.abort_ingest(&ingest.reference) {
                    Ok(_) => break,
                    Err(ContentError::Locked { .. }) if tries > 1 => {
                        tries -= 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // Someone is writing it: it will be committed or resumed.
                    Err(ContentError::Locked { .. }) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ leases

    /// Starts a lease that keeps `blobs` and `chains` while a pull or import of `image` runs.
    pub(crate) fn lease_begin(&self, image: &str, blobs: &[String]) -> Result<String> {
        let inner = &self.inner;
        let id = format!(
            "{image}\n{}-{}-{}",
            std::process::id(),
            now_secs(),
            inner.lease_seq.fetch_add(1, Ordering::Relaxed)
        );
        lock(&inner.live_leases).insert(id.clone());
        let _gc = inner.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let w = inner.meta.write()?;
        w.put(
            Table::Leases,
            &id,
            &LeaseRecord {
                image: image.to_owned(),
                blobs: blobs.to_vec(),
                chains: Vec::new(),
                expires: now_secs() + inner.lease_expiry.as_secs(),
            },
        )?;
        w.commit()?;
        Ok(id)
    }

    pub(crate) fn lease_add(&self, id: &str, blobs: &[String], chains: &[String]) -> Result<()> {
        let inner = &self.inner;
        let _gc = inner.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let w = inner.meta.write()?;
        let mut lease: LeaseRecord = w.get(Table::Leases, id)?.unwrap_or_default();
        let have: BTreeSet<String> = lease.blobs.iter().cloned().collect();
        lease
            .blobs
            .extend(blobs.iter().filter(|b| !have.contains(*b)).cloned());
        let have: BTreeSet<String> = lease.chains.iter().cloned().collect();
        lease
            .chains
            .extend(chains.iter().filter(|c| !have.contains(*c)).cloned());
        w.put(Table::Leases, id, &lease)?;
        w.commit()
    }

    /// Ends a lease. A failed pull whose content is bad drops its lease and collects (`gc`);
    /// one that failed for a transient reason keeps it, so the next pull resumes.
    pub(crate) fn lease_end(&self, id: &str, keep: bool) -> Result<()> {
        lock(&self.inner.live_leases).remove(id);
        if keep {
            return Ok(());
        }
        let w = self.inner.meta.write()?;
        w.remove(Table::Leases, id)?;
        w.commit()
    }

    /// Writes an image's records in one transaction: the target, every name pointing at it,
    /// the id name; drops the lease (and stale leases of earlier attempts of the same image),
    /// since the target now keeps its content.
    pub(crate) fn record(
        &self,
        names: &[String],
        target: &Digest,
        rec: &TargetRecord,
        lease: &str,
    ) -> Result<()> {
        self.record_inner(names, target, rec, lease, true)
    }

    /// [`ImageStore::record`] for one image of several (an import): the lease stays for the
    /// next ones.
    pub(crate) fn record_keep_lease(
        &self,
        names: &[String],
        target: &Digest,
        rec: &TargetRecord,
        lease: &str,
    ) -> Result<()> {
        self.record_inner(names, target, rec, lease, false)
    }

    fn record_inner(
        &self,
        names: &[String],
        target: &Digest,
        rec: &TargetRecord,
        lease: &str,
        end_lease: bool,
    ) -> Result<()> {
        let inner = &self.inner;
        let live = lock(&inner.live_leases).clone();
        let w = inner.meta.write()?;
        let image = w.get::<LeaseRecord>(Table::Leases, lease)?.map(|l| l.image);
        w.put(Table::Targets, &target.to_string(), rec)?;
        let now = now_secs();
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push(&rec.config);
        for name in all {
            w.put(
                Table::Names,
                name,
                &NameRecord {
                    target: target.to_string(),
                    created: now,
                },
            )?;
        }
        if end_lease {
            w.remove(Table::Leases, lease)?;
        }
        if let Some(image) = image.filter(|_| end_lease) {
            for (id, l) in w.list::<LeaseRecord>(Table::Leases)? {
                if l.image == image && !live.contains(&id) {
                    w.remove(Table::Leases, &id)?;
                }
            }
        }
        // Targets that lost their last name (a tag moved to a new digest keeps the old image
        // by its digest and id names, so this only drops targets of names overwritten here).
        let names_now: Vec<(String, NameRecord)> = w.list(Table::Names)?;
        let used: HashSet<&String> = names_now.iter().map(|(_, n)| &n.target).collect();
        for (t, _) in w.list::<TargetRecord>(Table::Targets)? {
            if !used.contains(&t) {
                w.remove(Table::Targets, &t)?;
            }
        }
        w.commit()?;
        if end_lease {
            lock(&inner.live_leases).remove(lease);
        }
        Ok(())
    }

    /// Marks `key` busy until the returned guard drops.
    pub(crate) fn busy(&self, key: &str) -> BusyGuard {
        *lock(&self.inner.busy).entry(key.to_owned()).or_insert(0) += 1;
        BusyGuard {
            inner: self.inner.clone(),
            key: key.to_owned(),
        }
    }

    /// Waits (bounded) until none of `keys` has blocking work running.
    pub(crate) async fn settle(&self, keys: &[String]) {
        for _ in 0..3000 {
            let idle = {
                let busy = lock(&self.inner.busy);
                keys.iter().all(|k| !busy.contains_key(k))
            };
            if idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!(?keys, "blocking work of a failed pull did not end in 30s");
    }
}

/// Finds the image `query` names: its id and how it matched.
fn resolve(tx: &impl Tx, query: &str) -> Result<Option<(String, Match)>> {
    let query = query.trim();
    if query.is_empty() {
        return Ok(None);
    }
    let id_of = |name: &str| -> Result<Option<String>> {
        let Some(n) = tx.get::<NameRecord>(Table::Names, name)? else {
            return Ok(None);
        };
        Ok(tx
            .get::<TargetRecord>(Table::Targets, &n.target)?
            .map(|t| t.config))
    };
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if let Some(h) = query.strip_prefix("sha256:") {
        if h.len() == 64 && hex(h) {
            return Ok(id_of(query)?.map(|id| (id, Match::Id)));
        }
    }
    if query.len() == 64 && hex(query) {
        let full = format!("sha256:{query}");
        return Ok(id_of(&full)?.map(|id| (id, Match::Id)));
    }
    if let Ok(name) = canonical_name(query) {
        if let Some(id) = id_of(&name)? {
            return Ok(Some((id, Match::Name(name))));
        }
    }
    let prefix = query.strip_prefix("sha256:").unwrap_or(query);
    if !prefix.is_empty() && hex(prefix) {
        let want = format!("sha256:{prefix}");
        let mut found: BTreeSet<String> = BTreeSet::new();
        for (name, _) in tx.list::<NameRecord>(Table::Names)? {
            if name.starts_with(&want) {
                found.insert(name);
            }
        }
        match found.len() {
            0 => {}
            1 => {
                let name = found.into_iter().next().unwrap_or_default();
                return Ok(id_of(&name)?.map(|id| (id, Match::Id)));
            }
            n => {
                return Err(ImageError::InvalidArgument(format!(
                    "image id prefix {query:?} is ambiguous: {n} images match"
                )))
            }
        }
    }
    Ok(None)
}

/// The images in the metadata (only the one with id `only`, when given).
fn images(tx: &impl Tx, only: Option<&str>) -> Result<Vec<Image>> {
    let targets: HashMap<String, TargetRecord> = tx.list(Table::Targets)?.into_iter().collect();
    // id -> (names, the most recently pointed name's target)
    let mut groups: HashMap<String, (Vec<String>, (u64, String))> = HashMap::new();
    for (name, n) in tx.list::<NameRecord>(Table::Names)? {
        let Some(t) = targets.get(&n.target) else {
            continue;
        };
        if only.is_some_and(|id| id != t.config) {
            continue;
        }
        let g = groups
            .entry(t.config.clone())
            .or_insert_with(|| (Vec::new(), (0, n.target.clone())));
        // A tag's target wins over a digest-only name's, the newest over older ones.
        let rank = n.created * 2 + u64::from(is_tag_name(&name));
        if rank >= g.1 .0 {
            g.1 = (rank, n.target.clone());
        }
        g.0.push(name);
    }
    let mut out = Vec::new();
    for (id, (mut names, (_, target))) in groups {
        names.sort();
        let Some(t) = targets.get(&target) else {
            continue;
        };
        out.push(Image {
            id,
            repo_tags: names.iter().filter(|n| is_tag_name(n)).cloned().collect(),
            repo_digests: names
                .iter()
                .filter(|n| is_digest_name(n))
                .cloned()
                .collect(),
            size: t.size,
            target: Digest::parse(&target)
                .map_err(|e| ImageError::internal("image metadata", e))?,
            manifest: Digest::parse(&t.manifest)
                .map_err(|e| ImageError::internal("image metadata", e))?,
            chain_ids: parse_digests(&t.chain_ids)?,
            config: t.image_config.clone(),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}
