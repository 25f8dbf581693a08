//! Pulling an image from a registry into the content store and the snapshots.
//!
//! Owns the order of a pull: resolve the reference, choose the host's platform in an index,
//! validate the manifest before anything is fetched, take a lease, fetch config and layers in
//! parallel (bounded by the store's download semaphore) into the content store, unpack each
//! layer onto its parent chain as soon as its blob and its parent are there, check every
//! diff_id against the config, and write the image's records last.
//!
//! Sharing and resuming: every download and every unpack is a unit keyed by its digest or
//! chain id in the store's in-flight map; a second pull of the same content awaits the unit
//! the first one started. A unit that every pull gave up on is dropped, leaving its ingest,
//! and the next pull resumes that ingest from its offset (blobs already committed are not
//! fetched at all).
//!
//! Failure: a bad image (hostile layer, wrong digest, unknown media type) ends the lease and
//! collects what the pull wrote, so nothing of it is left; a transient failure (registry
//! down, connection cut) keeps the lease, so the next pull resumes.
//!
//! It does not speak HTTP (the registry client does), verify digests (the content store
//! does) or write files under a snapshot (the unpacker does).

use std::io::BufReader;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;

use super::content::ContentError;
use super::error::{ImageError, Result};
use super::metadata::{now_secs, TargetRecord};
use super::oci::{
    chain_ids, choose_manifest, host_platform, parse_config, parse_document, Descriptor, Document,
    Manifest,
};
use super::reference::{Digest, Reference};
use super::registry::{Credentials, RegistryError};
use super::store::{blocking, canonical_name, lock, Image, ImageStore, SharedUnit, UnitOutput};
use super::unpack::{apply_layer, Compression};

/// What one pull did.
#[derive(Debug, Clone, Default)]
pub struct PullStats {
    /// Bytes received from the registry by the downloads this pull waited on (a download
    /// two pulls shared counts for both).
    pub fetched_bytes: u64,
    pub layers: usize,
    /// Layers this pull unpacked (0 when every chain was on disk already).
    pub layers_unpacked: usize,
    /// Uncompressed tar bytes of the unpacked layers.
    pub unpacked_bytes: u64,
    /// Time spent inside the unpacker, summed over layers.
    pub unpack_time: Duration,
    pub elapsed: Duration,
}

/// Where the blobs of one pull come from.
#[derive(Clone)]
struct Source {
    host: String,
    repository: String,
    creds: Option<Credentials>,
    image: String,
}

impl ImageStore {
    /// Pulls `reference` (as kubelet or crictl writes it) with the credentials PullImage
    /// carries, if any, and returns the image.
    pub async fn pull(&self, reference: &str, credentials: Option<&Credentials>) -> Result<Image> {
        self.pull_with_stats(reference, credentials)
            .await
            .map(|(image, _)| image)
    }

    /// [`ImageStore::pull`], with the figures of what it did.
    pub async fn pull_with_stats(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> Result<(Image, PullStats)> {
        let started = Instant::now();
        let name = canonical_name(reference)
            .map_err(|e| e.context(format!("pulling image {reference:?}")))?;
        let r = Reference::parse(&name).map_err(|e| ImageError::InvalidArgument(e.to_string()))?;
        let src = Source {
            host: r.registry.clone(),
            repository: r.repository.clone(),
            creds: credentials.cloned(),
            image: name.clone(),
        };
        let mut stats = PullStats::default();
        let image = self
            .pull_reference(&r, &src, &mut stats)
            .await
            .map_err(|e| e.context(format!("pulling image {name}")))?;
        stats.elapsed = started.elapsed();
        tracing::info!(image = %name, id = %image.id, elapsed = ?stats.elapsed, fetched = stats.fetched_bytes, "image pulled");
        Ok((image, stats))
    }

    async fn pull_reference(
        &self,
        r: &Reference,
        src: &Source,
        stats: &mut PullStats,
    ) -> Result<Image> {
        let inner = &self.inner;
        let creds = src.creds.as_ref();
        let resolved = inner
            .registry
            .resolve(&src.host, &src.repository, &r.manifest_reference(), creds)
            .await?;
        let target = resolved.digest.clone();
        let mut docs: Vec<(Digest, Bytes)> = vec![(target.clone(), resolved.bytes.clone())];
        let (manifest_digest, manifest) =
            match parse_document(&resolved.media_type, &resolved.bytes)? {
                Document::Manifest(m) => (target.clone(), m),
                Document::Index(index) => {
                    let desc = choose_manifest(&index, &host_platform())?;
                    let digest = desc.parsed_digest()?;
                    let m = inner
                        .registry
                        .resolve(&src.host, &src.repository, &digest.to_string(), creds)
                        .await?;
                    if m.bytes.len() as u64 != desc.size {
                        return Err(ImageError::BadImage(format!(
                            "manifest {digest} is {} bytes, the index says {}",
                            m.bytes.len(),
                            desc.size
                        )));
                    }
                    let manifest = match parse_document(&m.media_type, &m.bytes)? {
                        Document::Manifest(manifest) => manifest,
                        Document::Index(_) => {
                            return Err(ImageError::BadImage(format!(
                                "{digest} is an index inside an index"
                            )))
                        }
                    };
                    docs.push((digest.clone(), m.bytes));
                    (digest, manifest)
                }
            };

        let mut blobs: Vec<String> = docs.iter().map(|(d, _)| d.to_string()).collect();
        blobs.push(manifest.config.digest.clone());
        blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        let lease = {
            let store = self.clone();
            let (image, blobs) = (src.image.clone(), blobs.clone());
            blocking(move || store.lease_begin(&image, &blobs)).await?
        };

        let result = self
            .pull_content(
                src,
                &target,
                &manifest_digest,
                &manifest,
                docs,
                &lease,
                stats,
            )
            .await;
        match result {
            Ok(image) => Ok(image),
            Err(e) => {
                let bad = matches!(e, ImageError::BadImage(_));
                if bad {
                    let mut keys: Vec<String> = blobs.iter().map(|b| format!("blob:{b}")).collect();
                    keys.extend(
                        lock(&inner.busy)
                            .keys()
                            .filter(|k| k.starts_with("chain:"))
                            .cloned(),
                    );
                    self.settle(&keys).await;
                }
                let store = self.clone();
                let lease2 = lease.clone();
                let cleaned = blocking(move || {
                    store.lease_end(&lease2, !bad)?;
                    if bad {
                        store.gc_blocking(true)?;
                    }
                    Ok(())
                })
                .await;
                if let Err(c) = cleaned {
                    tracing::warn!(error = %c, "cleaning up after a failed pull");
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pull_content(
        &self,
        src: &Source,
        target: &Digest,
        manifest_digest: &Digest,
        manifest: &Manifest,
        docs: Vec<(Digest, Bytes)>,
        lease: &str,
        stats: &mut PullStats,
    ) -> Result<Image> {
        let inner = self.inner.clone();
        for (digest, bytes) in docs {
            let store = self.clone();
            blocking(move || store.put_blob(&digest, &bytes)).await?;
        }

        let config_desc = manifest.config.clone();
        let config_digest = config_desc.parsed_digest()?;
        let layers: Vec<(Digest, Descriptor)> = manifest
            .layers
            .iter()
            .map(|l| Ok((l.parsed_digest()?, l.clone())))
            .collect::<Result<_>>()?;

        // The config first, so that it gets a download slot before the layers.
        let mut fetches: Vec<SharedUnit> =
            vec![self.fetch_unit(src, &config_digest, config_desc.size)];
        for (d, l) in &layers {
            fetches.push(self.fetch_unit(src, d, l.size));
        }
        let all_fetches = futures::future::try_join_all(fetches.iter().cloned());

        let pipeline = async {
            fetches[0].clone().await?;
            let raw = {
                let store = self.clone();
                let d = config_digest.clone();
                blocking(move || Ok(store.inner.content.read_all(&d)?)).await?
            };
            let parsed = parse_config(&raw)?;
            if parsed.diff_ids.len() != layers.len() {
                return Err(ImageError::BadImage(format!(
                    "config {config_digest} lists {} diff_ids for {} layers",
                    parsed.diff_ids.len(),
                    layers.len()
                )));
            }
            let chains = chain_ids(&parsed.diff_ids);
            {
                let store = self.clone();
                let lease = lease.to_owned();
                let c: Vec<String> = chains.iter().map(ToString::to_string).collect();
                blocking(move || store.lease_add(&lease, &[], &c)).await?;
            }
            let mut unpacks = Vec::new();
            for (i, (digest, desc)) in layers.iter().enumerate() {
                fetches[i + 1].clone().await?;
                let parent = i.checked_sub(1).map(|p| chains[p].clone());
                let out = self
                    .unpack_unit(&chains[i], parent, digest, desc, &parsed.diff_ids[i])
                    .await?;
                unpacks.push(out);
            }
            Ok((parsed, chains, unpacks))
        };
        let (fetched, (parsed, chains, unpacks)) = futures::try_join!(all_fetches, pipeline)?;

        stats.layers = layers.len();
        stats.fetched_bytes = fetched.iter().map(|o| o.fetched).sum();
        for u in &unpacks {
            if u.unpacked {
                stats.layers_unpacked += 1;
                stats.unpacked_bytes += u.unpacked_bytes;
                stats.unpack_time += u.unpack_time;
            }
        }

        let mut blobs = vec![target.to_string()];
        if manifest_digest != target {
            blobs.push(manifest_digest.to_string());
        }
        blobs.push(config_digest.to_string());
        blobs.extend(layers.iter().map(|(d, _)| d.to_string()));
        let rec = TargetRecord {
            media_type: String::new(),
            manifest: manifest_digest.to_string(),
            config: config_digest.to_string(),
            layers: layers.iter().map(|(_, l)| l.clone()).collect(),
            blobs,
            chain_ids: chains.iter().map(ToString::to_string).collect(),
            size: config_desc.size + layers.iter().map(|(_, l)| l.size).sum::<u64>(),
            image_config: parsed.config,
            created: now_secs(),
        };
        let r =
            Reference::parse(&src.image).map_err(|e| ImageError::InvalidArgument(e.to_string()))?;
        let mut names = Vec::new();
        if r.digest.is_none() {
            names.push(src.image.clone());
        }
        names.push(format!("{}@{target}", r.name()));
        let store = self.clone();
        let target2 = target.clone();
        let lease = lease.to_owned();
        let id = config_digest.to_string();
        drop(inner);
        blocking(move || {
            store.record(&names, &target2, &rec, &lease)?;
            store.get_blocking(&id)
        })
        .await
    }

    /// Stores a small blob held in memory (a manifest or an index). Blocking.
    pub(crate) fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let content = &self.inner.content;
        for _ in 0..500 {
            match content.writer(&digest.to_string(), digest, Some(bytes.len() as u64)) {
                Ok(mut w) => {
                    if w.offset() > 0 {
                        w.abort()?;
                        continue;
                    }
                    w.write(bytes)?;
                    return Ok(w.commit()?);
                }
                Err(ContentError::AlreadyExists(_)) => return Ok(()),
                Err(ContentError::Locked { .. }) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ImageError::Unavailable(format!(
            "blob {digest} is being written by someone else"
        )))
    }

    /// The shared unit for `key`: the running one if some pull started it, else a new one.
    fn shared_unit(
        &self,
        key: String,
        make: impl FnOnce() -> futures::future::BoxFuture<'static, Result<UnitOutput>>,
    ) -> SharedUnit {
        let mut map = lock(&self.inner.inflight);
        if let Some(unit) = map.get(&key).and_then(|w| w.upgrade()) {
            if unit.peek().is_none() {
                return unit;
            }
        }
        map.retain(|_, w| w.upgrade().is_some_and(|u| u.peek().is_none()));
        let unit = make().shared();
        if let Some(weak) = unit.downgrade() {
            map.insert(key, weak);
        }
        unit
    }

    fn fetch_unit(&self, src: &Source, digest: &Digest, size: u64) -> SharedUnit {
        let key = format!("blob:{digest}");
        let store = self.clone();
        let src = src.clone();
        let digest = digest.clone();
        self.shared_unit(key, move || {
            async move { store.fetch(&src, &digest, size).await }.boxed()
        })
    }

    /// Downloads one blob into the content store, resuming its ingest.
    async fn fetch(&self, src: &Source, digest: &Digest, size: u64) -> Result<UnitOutput> {
        let inner = &self.inner;
        let key = format!("blob:{digest}");
        {
            let store = self.clone();
            let d = digest.clone();
            if blocking(move || Ok(store.inner.content.info(&d)?))
                .await?
                .is_some()
            {
                return Ok(UnitOutput::default());
            }
        }
        let _permit = inner
            .downloads
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ImageError::internal("download slots", e))?;

        enum Msg {
            Data(Bytes),
            Done,
            Abort,
        }
        enum Opened {
            At(u64),
            Exists,
            Locked,
        }
        let mut waited = 0u32;
        loop {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(32);
            let (otx, orx) = tokio::sync::oneshot::channel::<Result<Opened>>();
            let guard = self.busy(&key);
            let content = inner.content.clone();
            let d = digest.clone();
            // The writer lives on one blocking thread from open to commit: it hashes and
            // writes while the network side keeps receiving. If the network side goes away
            // (failure, or every pull dropped the unit), the channel closes and the writer is
            // dropped, keeping the ingest for a resume.
            let job = tokio::task::spawn_blocking(move || -> Result<bool> {
                let _busy = guard;
                let mut w = match content.writer(&d.to_string(), &d, Some(size)) {
                    Ok(w) => w,
                    Err(ContentError::AlreadyExists(_)) => {
                        let _ = otx.send(Ok(Opened::Exists));
                        return Ok(false);
                    }
                    Err(ContentError::Locked { .. }) => {
                        let _ = otx.send(Ok(Opened::Locked));
                        return Ok(false);
                    }
                    Err(e) => {
                        let _ = otx.send(Err(e.into()));
                        return Ok(false);
                    }
                };
                let _ = otx.send(Ok(Opened::At(w.offset())));
                while let Some(msg) = rx.blocking_recv() {
                    match msg {
                        Msg::Data(b) => w.write(&b)?,
                        Msg::Done => {
                            w.commit()?;
                            return Ok(true);
                        }
                        Msg::Abort => {
                            w.abort()?;
                            return Ok(false);
                        }
                    }
                }
                Ok(false)
            });
            let offset = match orx.await {
                Ok(Ok(Opened::At(offset))) => offset,
                Ok(Ok(Opened::Exists)) => return Ok(UnitOutput::default()),
                Ok(Ok(Opened::Locked)) => {
                    // Another process (or a writer of ours that is just closing) holds it.
                    waited += 1;
                    if waited > 3000 {
                        return Err(ImageError::Unavailable(format!(
                            "blob {digest} has been locked by another writer for 5 minutes"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(match job.await {
                        Ok(Err(e)) => e,
                        Ok(Ok(_)) => {
                            ImageError::Internal(format!("blob {digest}: writer vanished"))
                        }
                        Err(e) => ImageError::internal(format!("blob {digest} writer"), e),
                    })
                }
            };
            let finish = |job: tokio::task::JoinHandle<Result<bool>>| async move {
                job.await
                    .map_err(|e| ImageError::internal(format!("blob {digest} writer"), e))?
            };
            if offset == size {
                let _ = tx.send(Msg::Done).await;
                finish(job).await?;
                return Ok(UnitOutput::default());
            }
            if offset > 0 {
                tracing::info!(blob = %digest, offset, size, "resuming an interrupted download");
            }
            let stream = inner
                .registry
                .fetch_blob(
                    &src.host,
                    &src.repository,
                    digest,
                    offset,
                    src.creds.as_ref(),
                )
                .await
                .and_then(|s| s.expect_size(size));
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // A server that cannot serve from our offset would refuse every resume:
                    // start the blob over next time.
                    if matches!(e, RegistryError::RangeNotSatisfiable { .. }) {
                        let _ = tx.send(Msg::Abort).await;
                    }
                    drop(tx);
                    let _ = finish(job).await;
                    return Err(e.into());
                }
            };
            let mut fetched = 0u64;
            let mut failed = None;
            while let Some(chunk) = stream.next_chunk().await {
                match chunk {
                    Ok(b) => {
                        fetched += b.len() as u64;
                        if tx.send(Msg::Data(b)).await.is_err() {
                            break; // the writer failed; its error comes from the join
                        }
                    }
                    Err(e) => {
                        failed = Some(ImageError::from(e));
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                drop(tx);
                let _ = finish(job).await;
                return Err(e);
            }
            let _ = tx.send(Msg::Done).await;
            drop(tx);
            finish(job).await?;
            return Ok(UnitOutput {
                fetched,
                ..UnitOutput::default()
            });
        }
    }

    /// Unpacks one layer as the snapshot of `chain`, shared with concurrent pulls.
    async fn unpack_unit(
        &self,
        chain: &Digest,
        parent: Option<Digest>,
        digest: &Digest,
        desc: &Descriptor,
        diff_id: &Digest,
    ) -> Result<UnitOutput> {
        let key = format!("chain:{chain}");
        let store = self.clone();
        let (chain, digest, diff_id) = (chain.clone(), digest.clone(), diff_id.clone());
        let media_type = desc.media_type.clone();
        let unit = self.shared_unit(key.clone(), move || {
            let guard = store.busy(&key);
            let task = tokio::task::spawn_blocking(move || {
                let _busy = guard;
                store.unpack_blocking(&chain, parent.as_ref(), &digest, &media_type, &diff_id)
            });
            async move {
                task.await
                    .map_err(|e| ImageError::internal("unpack task", e))?
            }
            .boxed()
        });
        unit.await
    }

    /// Unpacks the blob `digest` (stored in the content store) as the snapshot of `chain` on
    /// `parent`, checking its diff_id. Blocking.
    pub(crate) fn unpack_blocking(
        &self,
        chain: &Digest,
        parent: Option<&Digest>,
        digest: &Digest,
        media_type: &str,
        diff_id: &Digest,
    ) -> Result<UnitOutput> {
        let inner = &self.inner;
        let compression = Compression::from_media_type(media_type).ok_or_else(|| {
            ImageError::BadImage(format!(
                "layer {digest} has unsupported media type {media_type:?}"
            ))
        })?;
        let started = Instant::now();
        let built = inner.snapshots.commit_with(chain, parent, |dir| {
            let blob = inner.content.open_blob(digest)?;
            let stats = apply_layer(
                BufReader::with_capacity(256 << 10, blob),
                compression,
                dir,
                &inner.limits,
            )
            .map_err(|e| ImageError::from(e).context(format!("layer {digest}")))?;
            if stats.diff_id != *diff_id {
                return Err(ImageError::BadImage(format!(
                    "layer {digest} unpacks to diff_id {}, the config says {diff_id}",
                    stats.diff_id
                )));
            }
            Ok(stats.tar_bytes)
        })?;
        Ok(match built {
            Some(bytes) => UnitOutput {
                unpacked_bytes: bytes,
                unpack_time: started.elapsed(),
                unpacked: true,
                ..UnitOutput::default()
            },
            None => UnitOutput::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    //! Pulls from a real `docker-registry` on 127.0.0.1 (see `testing`), as root.

    use std::fs;
    use std::path::Path;

    use serde_json::json;

    use super::super::snapshot::Usage;
    use super::super::testing::*;
    use super::super::unpack::{Limits, WhiteoutMode};
    use super::*;

    fn simple_layer(name: &str, data: &[u8]) -> Layer {
        Layer::gzip(
            TarBuilder::new()
                .dir("etc", 0o755)
                .file(&format!("etc/{name}"), data, 0o644)
                .finish(),
            false,
        )
    }

    fn blobs(store: &ImageStore) -> Vec<String> {
        store
            .content()
            .list()
            .expect("list")
            .into_iter()
            .map(|(d, _)| d.to_string())
            .collect()
    }

    #[tokio::test]
    async fn pull_by_tag_by_digest_and_by_both() {
        let fx = Fixture::new();
        let img = TestImage::new(
            vec![simple_layer("hello", b"hi\n")],
            json!({"Cmd": ["/bin/sh"]}),
            &host_arch(),
            false,
        );
        img.push(&fx.pusher, "app/one", "v1").await;
        let store = fx.store().await;
        let host = fx.host();
        let repo = format!("{host}/app/one");

        let by_tag = store
            .pull(&format!("{repo}:v1"), None)
            .await
            .expect("pull by tag");
        assert_eq!(by_tag.id, img.config_digest.to_string());
        assert_eq!(by_tag.repo_tags, vec![format!("{repo}:v1")]);
        assert_eq!(
            by_tag.repo_digests,
            vec![format!("{repo}@{}", img.manifest_digest)]
        );
        assert_eq!(by_tag.size, img.size());
        assert_eq!(by_tag.manifest, img.manifest_digest);
        assert_eq!(by_tag.target, img.manifest_digest);
        assert_eq!(by_tag.chain_ids, vec![img.layers[0].diff_id.clone()]);
        assert_eq!(by_tag.config.cmd, vec!["/bin/sh"]);
        let snap = store
            .snapshots()
            .info(&by_tag.chain_ids[0])
            .expect("info")
            .expect("snapshot");
        assert_eq!(
            fs::read(snap.path.join("etc/hello")).expect("read"),
            b"hi\n"
        );

        let by_digest = store
            .pull(&format!("{repo}@{}", img.manifest_digest), None)
            .await
            .expect("pull by digest");
        assert_eq!(by_digest, by_tag);
        // The tag of `name:tag@digest` is dropped, as containerd does: the digest decides.
        let both = store
            .pull(&format!("{repo}:v1@{}", img.manifest_digest), None)
            .await
            .expect("pull by tag and digest");
        assert_eq!(both, by_tag);

        let hex = img.config_digest.hex().to_owned();
        for q in [
            img.config_digest.to_string(),
            hex.clone(),
            hex[..12].to_owned(),
            format!("{repo}:v1"),
            format!("{repo}@{}", img.manifest_digest),
        ] {
            assert_eq!(store.get(&q).await.expect(&q).id, by_tag.id, "{q}");
        }
        assert!(matches!(
            store.get(&format!("{repo}:v2")).await,
            Err(ImageError::NotFound(_))
        ));
        assert_eq!(store.list(None).await.expect("list").len(), 1);
        assert!(store
            .list(Some("nothing:here"))
            .await
            .expect("list")
            .is_empty());
        assert_eq!(
            store
                .list(Some(&format!("{repo}:v1")))
                .await
                .expect("list")
                .len(),
            1
        );

        // Errors name the image and the cause.
        let e = store
            .pull(&format!("{repo}:missing"), None)
            .await
            .unwrap_err();
        assert!(matches!(e, ImageError::NotFound(_)), "{e}");
        assert!(e.to_string().contains(&format!("{repo}:missing")), "{e}");
        let e = store.pull("Bad Reference", None).await.unwrap_err();
        assert!(matches!(e, ImageError::InvalidArgument(_)), "{e}");
        let e = store
            .pull("127.0.0.1:1/nothing:v1", None)
            .await
            .unwrap_err();
        assert!(matches!(e, ImageError::Unavailable(_)), "{e}");
    }

    /// Flattens layers into one directory, as a reference for what the overlay must show.
    fn flatten(layers: &[Layer], dir: &Path) {
        let limits = Limits {
            whiteouts: WhiteoutMode::Apply,
            ..Limits::default()
        };
        for l in layers {
            apply_layer(l.tar.as_slice(), Compression::None, dir, &limits).expect("flatten");
        }
    }

    fn whiteout_image() -> TestImage {
        let bin = busybox_layer();
        let base = Layer::gzip(
            TarBuilder::new()
                .dir("etc", 0o755)
                .file("etc/keep", b"old keep\n", 0o644)
                .file("etc/gone", b"removed by the next layer\n", 0o644)
                .dir("opt", 0o755)
                .dir("opt/old", 0o750)
                .file("opt/old/a", b"a", 0o644)
                .file("opt/old/b", b"b", 0o644)
                .dir("var", 0o755)
                .file("var/x", b"x", 0o644)
                .finish(),
            false,
        );
        let middle = Layer::plain(
            TarBuilder::new()
                .whiteout("etc", "gone")
                .dir("opt/old", 0o750)
                .opaque("opt/old")
                .file("opt/old/c", b"c after the opaque marker", 0o640)
                .dir("home", 0o755)
                .file_owned("home/secret", b"mine", 0o600, 1000, 1000)
                .hardlink("home/secret2", "home/secret")
                .symlink("lib", "bin")
                .finish(),
            false,
        );
        let top = Layer::gzip(
            TarBuilder::new()
                .whiteout("", "var")
                .dir("data", 0o755)
                .file("data/big", &noise(7, 1 << 20), 0o644)
                .file("etc/keep", b"new keep\n", 0o600)
                .finish(),
            false,
        );
        TestImage::new(
            vec![bin, base, middle, top],
            json!({"Cmd": ["/bin/sh"]}),
            &host_arch(),
            false,
        )
    }

    #[tokio::test]
    async fn whiteouts_and_opaque_dirs_show_right_through_a_real_overlay_mount() {
        let fx = Fixture::new();
        let img = whiteout_image();
        img.push(&fx.pusher, "app/layers", "v1").await;
        let store = fx.store().await;
        let image = store
            .pull(&format!("{}/app/layers:v1", fx.host()), None)
            .await
            .expect("pull");
        assert_eq!(image.chain_ids.len(), 4);

        let work = tempfile::tempdir().expect("tempdir");
        let flat = work.path().join("flat");
        fs::create_dir(&flat).expect("mkdir");
        flatten(&img.layers, &flat);
        let expected = tree(&flat);
        assert!(!expected.contains_key("etc/gone"));
        assert!(!expected.contains_key("opt/old/a"));
        assert!(!expected.contains_key("var"));
        assert!(expected.contains_key("bin/busybox"));

        let merged = work.path().join("merged");
        fs::create_dir(&merged).expect("mkdir");
        let mounts = store
            .snapshots()
            .prepare("ctr-1", image.top_chain())
            .expect("prepare");
        assert_eq!(mounts[0].type_, "overlay");
        {
            mount_all(&mounts, &merged);
            let _guard = Unmount(merged.clone());
            assert_eq!(tree(&merged), expected, "the merged tree");
            // The container's writes land in its own upper directory.
            fs::write(merged.join("etc/written"), vec![5u8; 64 << 10]).expect("write");
            fs::remove_file(merged.join("etc/keep")).expect("rm");
            // A busybox from the image runs from the mount.
            let out = std::process::Command::new(merged.join("bin/busybox"))
                .arg("true")
                .status()
                .expect("run busybox");
            assert!(out.success());
        }
        let usage: Usage = store.snapshots().usage("ctr-1").expect("usage");
        assert!(usage.bytes >= 64 << 10, "{usage:?}");
        assert!(usage.inodes >= 3, "{usage:?}");
        let fsu = store.fs_usage().await.expect("fs usage");
        assert!(fsu.containers.bytes >= 64 << 10);
        assert!(fsu.images.bytes > img.size(), "{fsu:?}");
        // Other layers are untouched by the container's writes.
        let again = work.path().join("again");
        fs::create_dir(&again).expect("mkdir");
        let view = store
            .snapshots()
            .view("view-1", image.top_chain())
            .expect("view");
        {
            mount_all(&view, &again);
            let _guard = Unmount(again.clone());
            assert_eq!(tree(&again), expected, "a read-only view");
            assert!(
                fs::write(again.join("x"), b"x").is_err(),
                "the view is read-only"
            );
        }
        assert!(store.snapshots().remove("ctr-1").expect("remove"));
        assert!(store.snapshots().remove("view-1").expect("remove"));
        assert_eq!(
            store.snapshots().active_usage().expect("usage"),
            Usage::default()
        );
    }

    #[tokio::test]
    async fn an_index_with_two_platforms_gives_the_hosts() {
        let fx = Fixture::new();
        let mine = TestImage::new(
            vec![simple_layer("arch", host_arch().as_bytes())],
            json!({}),
            &host_arch(),
            false,
        );
        let other = TestImage::new(
            vec![simple_layer("arch", other_arch().as_bytes())],
            json!({}),
            other_arch(),
            false,
        );
        for img in [&mine, &other] {
            img.push(&fx.pusher, "multi/app", &img.manifest_digest.to_string())
                .await;
        }
        let (index, index_digest) =
            index_of(&[(&other, other_arch(), None), (&mine, &host_arch(), None)]);
        fx.pusher
            .manifest(
                "multi/app",
                "v1",
                super::super::registry::MEDIA_TYPE_OCI_INDEX,
                &index,
            )
            .await;
        let store = fx.store().await;
        let repo = format!("{}/multi/app", fx.host());
        let image = store.pull(&format!("{repo}:v1"), None).await.expect("pull");
        assert_eq!(image.id, mine.config_digest.to_string());
        assert_eq!(image.manifest, mine.manifest_digest);
        assert_eq!(image.target, index_digest);
        assert_eq!(image.repo_digests, vec![format!("{repo}@{index_digest}")]);
        let snap = store
            .snapshots()
            .info(&image.chain_ids[0])
            .expect("info")
            .expect("snapshot");
        assert_eq!(
            fs::read_to_string(snap.path.join("etc/arch")).expect("read"),
            host_arch()
        );
        // The other platform's layer was never fetched.
        assert!(!blobs(&store).contains(&other.layers[0].digest.to_string()));
        assert!(blobs(&store).contains(&index_digest.to_string()));
    }

    #[tokio::test]
    async fn the_config_is_parsed_back() {
        let fx = Fixture::new();
        let img = TestImage::new(
            vec![busybox_layer()],
            json!({
                "User": "1000:1000",
                "Env": ["PATH=/bin", "GREETING=hello world"],
                "Entrypoint": ["/bin/busybox"],
                "Cmd": ["sh", "-c", "echo $GREETING"],
                "WorkingDir": "/home/app",
                "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
                "Volumes": {"/data": {}},
                "Labels": {"org.example.team": "corral"},
                "StopSignal": "SIGQUIT",
            }),
            &host_arch(),
            true,
        );
        img.push(&fx.pusher, "app/configured", "v1").await;
        let store = fx.store().await;
        let image = store
            .pull(&format!("{}/app/configured:v1", fx.host()), None)
            .await
            .expect("pull");
        let c = &image.config;
        assert_eq!(c.user, "1000:1000");
        assert_eq!(c.env, vec!["PATH=/bin", "GREETING=hello world"]);
        assert_eq!(c.entrypoint, vec!["/bin/busybox"]);
        assert_eq!(c.cmd, vec!["sh", "-c", "echo $GREETING"]);
        assert_eq!(c.working_dir, "/home/app");
        assert_eq!(c.exposed_ports, vec!["53/udp", "8080/tcp"]);
        assert_eq!(c.volumes, vec!["/data"]);
        assert_eq!(
            c.labels.get("org.example.team").map(String::as_str),
            Some("corral")
        );
        assert_eq!(c.stop_signal, "SIGQUIT");
        assert_eq!(c.architecture, host_arch());
        assert_eq!(c.created.as_deref(), Some("2024-05-01T00:00:00Z"));
        // The same config after a restart, from the metadata alone.
        drop(store);
        let store = fx.store().await;
        assert_eq!(store.get(&image.id).await.expect("get").config, *c);
    }

    fn three_layers(seed: u64, sizes: [usize; 3]) -> TestImage {
        let layers = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Layer::gzip(
                    TarBuilder::new()
                        .dir(&format!("l{i}"), 0o755)
                        .file(&format!("l{i}/data"), &noise(seed + i as u64, *n), 0o644)
                        .finish(),
                    false,
                )
            })
            .collect();
        TestImage::new(layers, json!({}), &host_arch(), false)
    }

    #[tokio::test]
    async fn two_pulls_at_once_fetch_each_blob_once() {
        let fx = Fixture::new();
        let img = three_layers(11, [3 << 20, 2 << 20, 1 << 20]);
        img.push(&fx.pusher, "app/shared", "v1").await;
        let proxy = Proxy::start(fx.host()).await;
        let store = fx.store().await;
        let name = format!("{}/app/shared:v1", proxy.host());
        let (a, b) = tokio::join!(store.pull(&name, None), store.pull(&name, None));
        let (a, b) = (a.expect("first pull"), b.expect("second pull"));
        assert_eq!(a, b);
        for d in img
            .layers
            .iter()
            .map(|l| &l.digest)
            .chain([&img.config_digest])
        {
            assert_eq!(
                proxy.blob_gets(d).len(),
                1,
                "blob {d} fetched once: {:?}",
                proxy.seen()
            );
        }
        // A third pull finds everything and fetches no blob.
        proxy.clear();
        let (_, stats) = store
            .pull_with_stats(&name, None)
            .await
            .expect("third pull");
        assert_eq!(stats.fetched_bytes, 0);
        assert_eq!(stats.layers_unpacked, 0);
        assert!(
            proxy.seen().iter().all(|s| !s.path.contains("/blobs/")),
            "{:?}",
            proxy.seen()
        );
    }

    #[tokio::test]
    async fn an_interrupted_pull_resumes_without_refetching() {
        let fx = Fixture::new();
        let img = three_layers(21, [64 << 10, 4 << 20, 32 << 10]);
        img.push(&fx.pusher, "app/resume", "v1").await;
        let proxy = Proxy::start(fx.host()).await;
        let store = fx.store().await;
        let name = format!("{}/app/resume:v1", proxy.host());
        let big = img.layers[1].digest.clone();
        proxy.cut_next(&format!("/blobs/{big}"), 1 << 20);
        let e = store.pull(&name, None).await.unwrap_err();
        assert!(matches!(e, ImageError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains(&name), "{e}");

        let done = blobs(&store);
        let ingest = store
            .content()
            .ingests()
            .expect("ingests")
            .into_iter()
            .find(|i| i.expected == big)
            .expect("the cut blob's ingest is kept");
        assert!(
            ingest.offset > 0 && ingest.offset <= 1 << 20,
            "{}",
            ingest.offset
        );
        assert!(!done.contains(&big.to_string()));

        proxy.clear();
        let image = store.pull(&name, None).await.expect("resumed pull");
        assert_eq!(image.id, img.config_digest.to_string());
        for d in &done {
            let d = Digest::parse(d).expect("digest");
            assert!(proxy.blob_gets(&d).is_empty(), "{d} fetched again");
        }
        let gets = proxy.blob_gets(&big);
        assert_eq!(gets.len(), 1, "{gets:?}");
        // The resumed request asks for the bytes from the ingest's end on (at least; a unit
        // cancelled later may have written more than the first failure saw).
        let range = gets[0].range.clone().expect("a Range request");
        let from: u64 = range
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse()
            .expect("range start");
        assert!(from >= ingest.offset, "{range}");
        assert!(store.content().ingests().expect("ingests").is_empty());
    }

    /// Content and snapshot directories of the store, for "nothing is left" checks.
    fn state(fx: &Fixture) -> (Vec<String>, Vec<String>) {
        let root = fx.root();
        (
            listing(&root.join("content")),
            listing(&root.join("snapshots")),
        )
    }

    #[tokio::test]
    async fn bad_images_fail_clearly_and_leave_nothing() {
        let fx = Fixture::new();
        let host = fx.host().to_owned();
        let good = TestImage::new(
            vec![simple_layer("good", b"good")],
            json!({}),
            &host_arch(),
            false,
        );
        good.push(&fx.pusher, "good/app", "v1").await;
        let store = fx.store().await;
        store
            .pull(&format!("{host}/good/app:v1"), None)
            .await
            .expect("good pull");
        let before = state(&fx);

        let base = simple_layer("base", b"a lower layer that unpacks fine");
        let hostile = |tar: Vec<u8>| {
            TestImage::new(
                vec![base.clone(), Layer::plain(tar, false)],
                json!({}),
                &host_arch(),
                false,
            )
        };
        let mut cases: Vec<(&str, TestImage, &str)> = vec![
            (
                "traversal",
                hostile(TarBuilder::new().raw_file("../escape", b"x").finish()),
                "climbs above",
            ),
            (
                "symlink",
                hostile(
                    TarBuilder::new()
                        .symlink("evil", "/tmp")
                        .file("evil/pwned", b"x", 0o644)
                        .finish(),
                ),
                "symlink",
            ),
            (
                "device",
                hostile(
                    TarBuilder::new()
                        .dir("dev", 0o755)
                        .char_device("dev/mem2", 1, 1)
                        .finish(),
                ),
                "device",
            ),
        ];
        // A config whose diff_id does not match the layer.
        let mut wrong = hostile(TarBuilder::new().file("ok", b"ok", 0o644).finish());
        let mut cfg: serde_json::Value = serde_json::from_slice(&wrong.config).expect("config");
        cfg["rootfs"]["diff_ids"][1] = json!(format!("sha256:{}", "ab".repeat(32)));
        wrong = TestImage::with_config(
            wrong.layers.clone(),
            serde_json::to_vec(&cfg).expect("json"),
            false,
        );
        cases.push(("diffid", wrong, "diff_id"));
        // An unknown layer media type.
        let mut unknown = hostile(TarBuilder::new().file("ok", b"ok", 0o644).finish());
        unknown.layers[1].media_type = "application/vnd.example.unknown".into();
        let unknown = TestImage::with_config(unknown.layers.clone(), unknown.config.clone(), false);
        cases.push(("mediatype", unknown, "unsupported media type"));

        for (repo, img, _) in &cases {
            img.push(&fx.pusher, &format!("bad/{repo}"), "v1").await;
        }
        // Bytes in the registry that do not match their digest.
        let mismatch = hostile(
            TarBuilder::new()
                .file("ok", &noise(3, 10_000), 0o644)
                .finish(),
        );
        mismatch.push(&fx.pusher, "bad/mismatch", "v1").await;
        let stored = fx.registry_blob_path(&mismatch.layers[1].digest);
        let mut bytes = fs::read(&stored).expect("registry blob");
        bytes[5000] ^= 0xff;
        fs::write(&stored, bytes).expect("corrupt");
        cases.push(("mismatch", mismatch, "digest mismatch"));

        for (repo, _, cause) in &cases {
            let name = format!("{host}/bad/{repo}:v1");
            let e = store.pull(&name, None).await.unwrap_err();
            assert!(matches!(e, ImageError::BadImage(_)), "{repo}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(&name), "{repo}: {msg}");
            assert!(msg.contains(cause), "{repo}: {msg}");
            assert_eq!(state(&fx), before, "{repo}: something was left");
            assert!(store.get(&name).await.is_err());
        }
        assert!(!fx.dir.path().join("escape").exists());
        assert!(!Path::new("/tmp/pwned").exists());

        // The store still works.
        let next = TestImage::new(
            vec![simple_layer("next", b"next")],
            json!({}),
            &host_arch(),
            false,
        );
        next.push(&fx.pusher, "good/next", "v1").await;
        store
            .pull(&format!("{host}/good/next:v1"), None)
            .await
            .expect("a good pull after the bad ones");
    }

    #[tokio::test]
    async fn a_restart_keeps_images_and_removes_crash_leftovers() {
        let fx = Fixture::new();
        let img = TestImage::new(vec![busybox_layer()], json!({}), &host_arch(), false);
        img.push(&fx.pusher, "app/restart", "v1").await;
        let name = format!("{}/app/restart:v1", fx.host());
        let (image, mounts) = {
            let store = fx.store().await;
            let image = store.pull(&name, None).await.expect("pull");
            let mounts = store
                .snapshots()
                .prepare("ctr", image.top_chain())
                .expect("prepare");
            (image, mounts)
        };
        // What a crash can leave: a layer being unpacked, a renamed but unrecorded snapshot, a
        // blob and an ingest of a pull whose lease never got written.
        let root = fx.root();
        fs::create_dir_all(root.join("snapshots/new-99999-0/fs/bin")).expect("mkdir");
        fs::create_dir_all(root.join("snapshots/4242/fs")).expect("mkdir");
        let content =
            super::super::content::ContentStore::open(root.join("content")).expect("content");
        let stray = digest_of(b"stray blob");
        let mut w = content
            .writer(&stray.to_string(), &stray, None)
            .expect("writer");
        w.write(b"stray blob").expect("write");
        w.commit().expect("commit");
        let partial = digest_of(b"partial blob");
        let mut w = content
            .writer(&partial.to_string(), &partial, None)
            .expect("writer");
        w.write(b"partial").expect("write");
        drop(w);

        let store = fx.store().await;
        let again = store.get(&name).await.expect("image after restart");
        assert_eq!(again, image);
        assert_eq!(store.snapshots().mounts("ctr").expect("mounts"), mounts);
        assert!(!root.join("snapshots/new-99999-0").exists());
        assert!(!root.join("snapshots/4242").exists());
        assert!(content.info(&stray).expect("info").is_none());
        assert!(content.ingests().expect("ingests").is_empty());
        // A pull of the same image after the restart has nothing to do.
        let (_, stats) = store.pull_with_stats(&name, None).await.expect("re-pull");
        assert_eq!(stats.fetched_bytes, 0);
    }

    #[tokio::test]
    async fn remove_frees_what_nothing_else_uses() {
        let fx = Fixture::new();
        let host = fx.host().to_owned();
        let base = busybox_layer();
        let a = TestImage::new(
            vec![base.clone(), simple_layer("a", b"a")],
            json!({}),
            &host_arch(),
            false,
        );
        let b = TestImage::new(
            vec![base.clone(), simple_layer("b", b"b")],
            json!({}),
            &host_arch(),
            false,
        );
        a.push(&fx.pusher, "rm/a", "v1").await;
        b.push(&fx.pusher, "rm/b", "v1").await;
        b.push(&fx.pusher, "rm/b", "v2").await;
        let store = fx.store().await;
        let ia = store
            .pull(&format!("{host}/rm/a:v1"), None)
            .await
            .expect("pull a");
        let ib = store
            .pull(&format!("{host}/rm/b:v1"), None)
            .await
            .expect("pull b");
        store
            .pull(&format!("{host}/rm/b:v2"), None)
            .await
            .expect("pull b:v2");
        assert_eq!(
            ia.chain_ids[0], ib.chain_ids[0],
            "the base snapshot is shared"
        );
        assert_eq!(store.snapshots().list().expect("list").len(), 3);

        assert!(store
            .remove(&format!("{host}/rm/a:v1"))
            .await
            .expect("remove a"));
        assert!(matches!(
            store.get(&ia.id).await,
            Err(ImageError::NotFound(_))
        ));
        let left = blobs(&store);
        assert!(!left.contains(&a.layers[1].digest.to_string()));
        assert!(!left.contains(&a.config_digest.to_string()));
        assert!(!left.contains(&a.manifest_digest.to_string()));
        assert!(
            left.contains(&base.digest.to_string()),
            "the shared base stays"
        );
        assert!(store
            .snapshots()
            .info(&ia.chain_ids[1])
            .expect("info")
            .is_none());
        assert!(store
            .snapshots()
            .info(&ib.chain_ids[0])
            .expect("info")
            .is_some());
        assert!(
            !store
                .remove(&format!("{host}/rm/a:v1"))
                .await
                .expect("again"),
            "already gone"
        );

        // Untagging one of two tags keeps the image.
        assert!(store
            .remove(&format!("{host}/rm/b:v1"))
            .await
            .expect("untag"));
        let still = store.get(&ib.id).await.expect("b still there");
        assert_eq!(still.repo_tags, vec![format!("{host}/rm/b:v2")]);

        // In use by a container: refused until the container's snapshot goes.
        store
            .snapshots()
            .prepare("ctr", ib.top_chain())
            .expect("prepare");
        let e = store.remove(&ib.id).await.unwrap_err();
        assert!(matches!(e, ImageError::FailedPrecondition(_)), "{e}");
        assert!(e.to_string().contains("ctr"), "{e}");
        assert!(store.snapshots().remove("ctr").expect("remove snapshot"));
        assert!(store
            .remove(&ib.id[7..19])
            .await
            .expect("remove by short id"));
        assert!(store.list(None).await.expect("list").is_empty());
        assert!(blobs(&store).is_empty());
        assert!(store.snapshots().list().expect("list").is_empty());
        assert!(listing(&fx.root().join("snapshots")).is_empty());
    }

    #[tokio::test]
    async fn bench_a_50_mib_three_layer_image() {
        let fx = Fixture::new();
        // Many files per layer, like a real image, of incompressible bytes: ~17 MiB each.
        let layers = (0..3u64)
            .map(|i| {
                let mut t = TarBuilder::new().dir(&format!("d{i}"), 0o755);
                for f in 0..200u64 {
                    t = t.file(&format!("d{i}/f{f}"), &noise(i * 1000 + f, 87 << 10), 0o644);
                }
                Layer::gzip(t.finish(), false)
            })
            .collect();
        let img = TestImage::new(layers, json!({}), &host_arch(), false);
        img.push(&fx.pusher, "bench/app", "v1").await;
        let store = fx.store().await;
        let name = format!("{}/bench/app:v1", fx.host());
        let (_, cold) = store.pull_with_stats(&name, None).await.expect("cold pull");
        let (_, warm) = store.pull_with_stats(&name, None).await.expect("warm pull");
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "bench: image {:.1} MiB compressed in 3 layers; cold pull {:.2?} ({:.1} MiB/s), \
             warm re-pull {:.2?}; unpack {:.1} MiB of tar in {:.2?} ({:.1} MiB/s)",
            mib(img.size()),
            cold.elapsed,
            mib(cold.fetched_bytes) / cold.elapsed.as_secs_f64(),
            warm.elapsed,
            mib(cold.unpacked_bytes),
            cold.unpack_time,
            mib(cold.unpacked_bytes) / cold.unpack_time.as_secs_f64(),
        );
        assert_eq!(cold.layers_unpacked, 3);
        assert_eq!(warm.fetched_bytes, 0);
    }
}
