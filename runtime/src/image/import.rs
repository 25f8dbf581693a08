//! Importing images from an archive, for nodes without a registry: an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/`) or a `docker save` tarball (`manifest.json` with
//! `Config`, `RepoTags`, `Layers`), plain, gzip or zstd.
//!
//! Owns reading the archive: its entries are treated as hostile (paths are taken lexically,
//! nothing is written outside the store's `tmp/` scratch directory, a symlink that leaves the
//! archive is refused), `blobs/<alg>/<hex>` entries stream straight into the content store and
//! are verified there, and `docker save`'s loose files are hashed and stored. The images are
//! then unpacked and recorded exactly as a pull does it. Names come from `RepoTags`, or from
//! the `io.containerd.image.name` / `org.opencontainers.image.ref.name` annotations when they
//! hold a full reference; an image without a name is reachable by its id.
//!
//! On any failure the lease is dropped and what the import wrote is collected.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde::Deserialize;
use sha2::Digest as _;

use super::content::ContentError;
use super::error::{ImageError, Result};
use super::metadata::{now_secs, TargetRecord};
use super::oci::{
    chain_ids, choose_manifest, host_platform, parse_config, parse_document, sha256_digest,
    Descriptor, Document, Index, Manifest, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME,
    MEDIA_TYPE_DOCKER_CONFIG, MEDIA_TYPE_DOCKER_LAYER, MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
};
use super::reference::Digest;
use super::registry::MEDIA_TYPE_DOCKER_MANIFEST;
use super::store::{blocking, canonical_name, Image, ImageStore};

/// JSON files read whole: manifests, configs, `index.json`. Larger ones are not metadata.
const MAX_SMALL_FILE: u64 = 4 << 20;
const COPY_CHUNK: usize = 1 << 20;

/// Where an archive member ended up.
#[derive(Debug, Clone)]
enum Member {
    Small(Vec<u8>),
    Blob(Digest),
    Extracted(PathBuf),
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn bad(archive: &Path, what: impl std::fmt::Display) -> ImageError {
    ImageError::BadImage(format!("archive {}: {what}", archive.display()))
}

fn io_err(what: &str, path: &Path, e: io::Error) -> ImageError {
    ImageError::Internal(format!("import: {what} {}: {e}", path.display()))
}

/// A member path taken lexically: `./` and empty components dropped; `..` or an absolute
/// path refused.
fn clean_path(raw: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    if raw.starts_with('/') || parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

/// A link target joined to its directory, `..` resolved lexically; `None` when it climbs
/// above the archive's root.
fn resolve_link(joined: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

/// `blobs/sha256/<hex>` → the digest.
fn blob_digest(path: &str) -> Option<Digest> {
    let rest = path.strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

fn sniff(head: &[u8]) -> &'static str {
    if head.starts_with(&[0x1f, 0x8b]) {
        MEDIA_TYPE_DOCKER_LAYER_GZIP
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        MEDIA_TYPE_OCI_LAYER_ZSTD
    } else {
        MEDIA_TYPE_DOCKER_LAYER
    }
}

impl ImageStore {
    /// Imports every image of the archive at `path` and returns them.
    pub async fn import(&self, path: &Path) -> Result<Vec<Image>> {
        let store = self.clone();
        let path = path.to_owned();
        blocking(move || store.import_blocking(&path)).await
    }

    fn import_blocking(&self, archive: &Path) -> Result<Vec<Image>> {
        let label = format!("import {}", archive.display());
        let lease = self.lease_begin(&label, &[])?;
        let seq = self.inner.lease_seq.fetch_add(1, Ordering::Relaxed);
        let scratch = self
            .inner
            .root
            .join("tmp")
            .join(format!("import-{}-{seq}", std::process::id()));
        let result = fs::create_dir_all(&scratch)
            .map_err(|e| io_err("create", &scratch, e))
            .and_then(|()| self.import_archive(archive, &scratch, &lease));
        if let Err(e) = fs::remove_dir_all(&scratch) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %scratch.display(), error = %e, "cannot remove import scratch");
            }
        }
        let ended = self.lease_end(&lease, false);
        match result {
            Ok(images) => {
                ended?;
                Ok(images)
            }
            Err(e) => {
                if let Err(c) = self.gc_blocking(true) {
                    tracing::warn!(error = %c, "cleaning up after a failed import");
                }
                Err(e.context(format!("importing {}", archive.display())))
            }
        }
    }

    fn import_archive(&self, archive: &Path, scratch: &Path, lease: &str) -> Result<Vec<Image>> {
        let members = self.read_archive(archive, scratch, lease)?;
        let small = |path: &str| -> Result<Vec<u8>> {
            match members.get(path) {
                Some(Member::Small(b)) => Ok(b.clone()),
                Some(Member::Blob(d)) => Ok(self.inner.content.read_all(d)?),
                Some(Member::Extracted(p)) => fs::read(p).map_err(|e| io_err("read", p, e)),
                None => Err(bad(archive, format!("{path:?} is missing"))),
            }
        };

        let mut images = Vec::new();
        if members.contains_key("manifest.json") {
            let entries: Vec<DockerEntry> = serde_json::from_slice(&small("manifest.json")?)
                .map_err(|e| bad(archive, format!("manifest.json is not valid: {e}")))?;
            for entry in entries {
                let config = small(&entry.config)?;
                let config_digest = sha256_digest(&config);
                self.lease_add(lease, &[config_digest.to_string()], &[])?;
                self.put_blob(&config_digest, &config)?;
                let mut layers = Vec::new();
                for l in &entry.layers {
                    layers.push(self.docker_layer(archive, &members, l, lease)?);
                }
                let manifest_json = serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
                    "config": {
                        "mediaType": MEDIA_TYPE_DOCKER_CONFIG,
                        "digest": config_digest.to_string(),
                        "size": config.len(),
                    },
                    "layers": layers,
                }))
                .map_err(|e| ImageError::internal("encoding a manifest", e))?;
                let target = sha256_digest(&manifest_json);
                self.lease_add(lease, &[target.to_string()], &[])?;
                self.put_blob(&target, &manifest_json)?;
                let manifest = match parse_document(MEDIA_TYPE_DOCKER_MANIFEST, &manifest_json)? {
                    Document::Manifest(m) => m,
                    Document::Index(_) => {
                        return Err(ImageError::Internal("manifest built as an index".into()))
                    }
                };
                let mut names = Vec::new();
                for tag in entry.repo_tags.unwrap_or_default() {
                    names.push(canonical_name(&tag).map_err(|e| bad(archive, e))?);
                }
                images.push(self.import_image(&target, &target, &manifest, &names, lease)?);
            }
        } else if members.contains_key("index.json") {
            let index: Index = serde_json::from_slice(&small("index.json")?)
                .map_err(|e| bad(archive, format!("index.json is not valid: {e}")))?;
            for desc in &index.manifests {
                let names = ref_names(desc);
                let target = desc.parsed_digest()?;
                let raw = self.inner.content.read_all(&target).map_err(|e| {
                    bad(
                        archive,
                        format!("manifest {target} is not in the archive: {e}"),
                    )
                })?;
                let (manifest_digest, manifest) = match parse_document(&desc.media_type, &raw)? {
                    Document::Manifest(m) => (target.clone(), m),
                    Document::Index(inner_index) => {
                        let d = choose_manifest(&inner_index, &host_platform())?;
                        let digest = d.parsed_digest()?;
                        let raw = self.inner.content.read_all(&digest).map_err(|e| {
                            bad(
                                archive,
                                format!("manifest {digest} is not in the archive: {e}"),
                            )
                        })?;
                        match parse_document(&d.media_type, &raw)? {
                            Document::Manifest(m) => (digest, m),
                            Document::Index(_) => {
                                return Err(bad(
                                    archive,
                                    format!("{digest} is an index inside an index"),
                                ))
                            }
                        }
                    }
                };
                images.push(self.import_image(
                    &target,
                    &manifest_digest,
                    &manifest,
                    &names,
                    lease,
                )?);
            }
        } else {
            return Err(bad(
                archive,
                "neither an OCI layout (index.json) nor a docker save archive (manifest.json)",
            ));
        }
        Ok(images)
    }

    /// Streams the archive: blobs into the content store, small files into memory, other
    /// files into `scratch`. Symlinks and hard links between members are resolved.
    fn read_archive(
        &self,
        archive: &Path,
        scratch: &Path,
        lease: &str,
    ) -> Result<HashMap<String, Member>> {
        let mut head = [0u8; 4];
        let n = File::open(archive)
            .and_then(|mut f| f.read(&mut head))
            .map_err(|e| io_err("read", archive, e))?;
        let file = File::open(archive).map_err(|e| io_err("open", archive, e))?;
        let reader: Box<dyn Read> = match sniff(&head[..n]) {
            MEDIA_TYPE_DOCKER_LAYER_GZIP => {
                Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(file)))
            }
            MEDIA_TYPE_OCI_LAYER_ZSTD => {
                Box::new(zstd::stream::read::Decoder::new(file).map_err(|e| bad(archive, e))?)
            }
            _ => Box::new(io::BufReader::with_capacity(COPY_CHUNK, file)),
        };
        let mut tar = tar::Archive::new(reader);
        let mut members: HashMap<String, Member> = HashMap::new();
        let mut links: Vec<(String, String)> = Vec::new();
        let entries = tar.entries().map_err(|e| bad(archive, e))?;
        for (i, entry) in entries.enumerate() {
            let mut entry = entry.map_err(|e| bad(archive, e))?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(path) = clean_path(&raw) else {
                if raw.trim_matches(['.', '/']).is_empty() {
                    continue; // the archive's root directory
                }
                return Err(bad(archive, format!("member {raw:?} leaves the archive")));
            };
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default();
                if target.starts_with('/') {
                    return Err(bad(
                        archive,
                        format!("link {raw:?} -> {target:?} leaves the archive"),
                    ));
                }
                let joined = if kind.is_symlink() {
                    match path.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target.clone(),
                    }
                } else {
                    target.clone()
                };
                let resolved = resolve_link(&joined).ok_or_else(|| {
                    bad(
                        archive,
                        format!("link {raw:?} -> {target:?} leaves the archive"),
                    )
                })?;
                links.push((path, resolved));
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let size = entry.size();
            if let Some(digest) = blob_digest(&path) {
                self.lease_add(lease, &[digest.to_string()], &[])?;
                self.ingest_reader(&digest, size, &mut entry).map_err(|e| {
                    e.context(format!("archive {} member {path:?}", archive.display()))
                })?;
                members.insert(path, Member::Blob(digest));
            } else if size <= MAX_SMALL_FILE {
                let mut buf = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| bad(archive, format!("member {path:?}: {e}")))?;
                members.insert(path, Member::Small(buf));
            } else {
                let out = scratch.join(i.to_string());
                let mut f = File::create(&out).map_err(|e| io_err("create", &out, e))?;
                io::copy(&mut entry, &mut f)
                    .map_err(|e| bad(archive, format!("member {path:?}: {e}")))?;
                members.insert(path, Member::Extracted(out));
            }
        }
        // Links may point at links (docker save links repeated layers); a few rounds settle
        // any sane archive, a loop stays unresolved.
        for _ in 0..8 {
            for (from, to) in &links {
                if let Some(m) = members.get(to).cloned() {
                    members.entry(from.clone()).or_insert(m);
                }
            }
        }
        Ok(members)
    }

    /// Writes `size` bytes of `reader` as the blob `digest`, verified. Blocking.
    fn ingest_reader(&self, digest: &Digest, size: u64, reader: &mut impl Read) -> Result<()> {
        let content = &self.inner.content;
        let mut w = match content.writer(&digest.to_string(), digest, Some(size)) {
            Ok(w) => w,
            Err(ContentError::AlreadyExists(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if w.offset() > 0 {
            // A leftover ingest of a pull: the archive has all the bytes, start over.
            w.abort()?;
            w = content.writer(&digest.to_string(), digest, Some(size))?;
        }
        let mut buf = vec![0u8; COPY_CHUNK];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| ImageError::BadImage(format!("reading blob {digest}: {e}")))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        Ok(w.commit()?)
    }

    /// A `docker save` layer as a descriptor, its blob stored.
    fn docker_layer(
        &self,
        archive: &Path,
        members: &HashMap<String, Member>,
        path: &str,
        lease: &str,
    ) -> Result<Descriptor> {
        let member = clean_path(path)
            .and_then(|p| members.get(&p))
            .ok_or_else(|| bad(archive, format!("layer {path:?} is missing")))?;
        let mut head = [0u8; 4];
        let (digest, size, n) = match member {
            Member::Blob(d) => {
                let mut f = self.inner.content.open_blob(d)?;
                let n = f
                    .read(&mut head)
                    .map_err(|e| io_err("read", Path::new(path), e))?;
                let size = self
                    .inner
                    .content
                    .info(d)?
                    .map(|i| i.size)
                    .unwrap_or_default();
                (d.clone(), size, n)
            }
            Member::Small(b) => {
                let d = sha256_digest(b);
                self.lease_add(lease, &[d.to_string()], &[])?;
                self.put_blob(&d, b)?;
                let n = b.len().min(4);
                head[..n].copy_from_slice(&b[..n]);
                (d, b.len() as u64, n)
            }
            Member::Extracted(p) => {
                let mut f = File::open(p).map_err(|e| io_err("open", p, e))?;
                let mut hasher = sha2::Sha256::new();
                let mut buf = vec![0u8; COPY_CHUNK];
                let mut size = 0u64;
                loop {
                    let k = f.read(&mut buf).map_err(|e| io_err("read", p, e))?;
                    if k == 0 {
                        break;
                    }
                    if size == 0 {
                        let m = k.min(4);
                        head[..m].copy_from_slice(&buf[..m]);
                    }
                    hasher.update(&buf[..k]);
                    size += k as u64;
                }
                let d = Digest::from_sha256(hasher.finalize().into());
                self.lease_add(lease, &[d.to_string()], &[])?;
                let mut f = File::open(p).map_err(|e| io_err("open", p, e))?;
                self.ingest_reader(&d, size, &mut f)?;
                (d, size, (size as usize).min(4))
            }
        };
        Ok(Descriptor {
            media_type: sniff(&head[..n]).to_owned(),
            digest: digest.to_string(),
            size,
            platform: None,
            annotations: Default::default(),
        })
    }

    /// Unpacks and records one imported image, whose blobs are all in the content store.
    fn import_image(
        &self,
        target: &Digest,
        manifest_digest: &Digest,
        manifest: &Manifest,
        names: &[String],
        lease: &str,
    ) -> Result<Image> {
        let content = &self.inner.content;
        let config_digest = manifest.config.parsed_digest()?;
        let raw = content
            .read_all(&config_digest)
            .map_err(|e| ImageError::BadImage(format!("config {config_digest}: {e}")))?;
        let parsed = parse_config(&raw)?;
        if parsed.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::BadImage(format!(
                "config {config_digest} lists {} diff_ids for {} layers",
                parsed.diff_ids.len(),
                manifest.layers.len()
            )));
        }
        let chains = chain_ids(&parsed.diff_ids);
        self.lease_add(
            lease,
            &[],
            &chains.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )?;
        for (i, layer) in manifest.layers.iter().enumerate() {
            let digest = layer.parsed_digest()?;
            if content.info(&digest)?.is_none() {
                return Err(ImageError::BadImage(format!(
                    "layer {digest} is not in the archive"
                )));
            }
            let parent = i.checked_sub(1).map(|p| &chains[p]);
            self.unpack_blocking(
                &chains[i],
                parent,
                &digest,
                &layer.media_type,
                &parsed.diff_ids[i],
            )?;
        }
        let mut blobs = vec![target.to_string()];
        if manifest_digest != target {
            blobs.push(manifest_digest.to_string());
        }
        blobs.push(config_digest.to_string());
        blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        let rec = TargetRecord {
            media_type: String::new(),
            manifest: manifest_digest.to_string(),
            config: config_digest.to_string(),
            layers: manifest.layers.clone(),
            blobs,
            chain_ids: chains.iter().map(ToString::to_string).collect(),
            size: manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>(),
            image_config: parsed.config,
            created: now_secs(),
        };
        self.record_keep_lease(names, target, &rec, lease)?;
        self.get_blocking(&config_digest.to_string())
    }
}

/// The names an OCI layout gives one of its manifests: the containerd annotation, or the OCI
/// one when it holds a full reference (a bare tag names no repository).
fn ref_names(desc: &Descriptor) -> Vec<String> {
    if let Some(n) = desc.annotations.get(ANNOTATION_CONTAINERD_NAME) {
        if let Ok(name) = canonical_name(n) {
            return vec![name];
        }
    }
    if let Some(n) = desc.annotations.get(ANNOTATION_REF_NAME) {
        if n.contains(['/', ':']) {
            if let Ok(name) = canonical_name(n) {
                return vec![name];
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use serde_json::json;

    use super::super::testing::*;
    use super::*;

    fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append_data(&mut h, path, data).expect("member");
    }

    fn oci_layout(img: &TestImage, ref_name: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        append(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": img.media_type,
                "digest": img.manifest_digest.to_string(),
                "size": img.manifest.len(),
                "annotations": {ANNOTATION_REF_NAME: ref_name},
            }],
        }))
        .expect("index");
        append(&mut b, "index.json", &index);
        let blob = |d: &Digest| format!("blobs/sha256/{}", d.hex());
        for l in &img.layers {
            append(&mut b, &blob(&l.digest), &l.blob);
        }
        append(&mut b, &blob(&img.config_digest), &img.config);
        append(&mut b, &blob(&img.manifest_digest), &img.manifest);
        b.into_inner().expect("tar")
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).expect("gzip");
        enc.finish().expect("gzip")
    }

    /// A legacy `docker save` archive: `<id>/layer.tar` files, the config as `<hex>.json`,
    /// `manifest.json`; the third layer repeats the first through a symlink, as docker does.
    fn docker_save(img: &TestImage, tag: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let ids = ["aaaa", "bbbb", "cccc"];
        for (i, l) in img.layers.iter().enumerate().take(2) {
            append(&mut b, &format!("{}/VERSION", ids[i]), b"1.0");
            append(&mut b, &format!("{}/layer.tar", ids[i]), &l.tar);
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "cccc/layer.tar", "../aaaa/layer.tar")
            .expect("symlink");
        let cfg = format!("{}.json", img.config_digest.hex());
        append(&mut b, &cfg, &img.config);
        let manifest = serde_json::to_vec(&json!([{
            "Config": cfg,
            "RepoTags": [tag],
            "Layers": ["aaaa/layer.tar", "bbbb/layer.tar", "cccc/layer.tar"],
        }]))
        .expect("manifest.json");
        append(&mut b, "manifest.json", &manifest);
        b.into_inner().expect("tar")
    }

    fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, data).expect("write archive");
        p
    }

    #[tokio::test]
    async fn imports_an_oci_layout_and_a_docker_save_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(test_options(&dir.path().join("images")))
            .await
            .expect("open");

        let oci = TestImage::new(
            vec![busybox_layer()],
            json!({"Cmd": ["/bin/sh"]}),
            &host_arch(),
            false,
        );
        let path = write(
            dir.path(),
            "oci.tar.gz",
            &gzip(&oci_layout(&oci, "example.com/imported/oci:1.0")),
        );
        let images = store.import(&path).await.expect("import OCI layout");
        assert_eq!(images.len(), 1);
        let image = &images[0];
        assert_eq!(image.id, oci.config_digest.to_string());
        assert_eq!(image.repo_tags, vec!["example.com/imported/oci:1.0"]);
        assert_eq!(image.config.cmd, vec!["/bin/sh"]);
        let snap = store
            .snapshots()
            .info(&image.chain_ids[0])
            .expect("info")
            .expect("snapshot");
        assert_eq!(
            fs::read(snap.path.join("bin/busybox")).expect("busybox"),
            fs::read("/bin/busybox").expect("busybox")
        );
        // Importing again changes nothing.
        assert_eq!(store.import(&path).await.expect("again"), images);

        let big = Layer::plain(
            TarBuilder::new()
                .file("big", &noise(5, 5 << 20), 0o644)
                .finish(),
            true,
        );
        let small = Layer::plain(
            TarBuilder::new()
                .file("etc/motd", b"imported\n", 0o644)
                .finish(),
            true,
        );
        let docker = TestImage::new(
            vec![big.clone(), small, big],
            json!({"Entrypoint": ["/big"]}),
            &host_arch(),
            true,
        );
        let path = write(
            dir.path(),
            "docker.tar",
            &docker_save(&docker, "busybox:imported"),
        );
        let images = store.import(&path).await.expect("import docker save");
        assert_eq!(images.len(), 1);
        let image = &images[0];
        assert_eq!(image.id, docker.config_digest.to_string());
        assert_eq!(image.repo_tags, vec!["docker.io/library/busybox:imported"]);
        assert_eq!(image.chain_ids.len(), 3);
        assert_eq!(image.config.entrypoint, vec!["/big"]);
        let top = store
            .get("busybox:imported")
            .await
            .expect("get by the short name");
        assert_eq!(&top, image);
        let middle = store
            .snapshots()
            .info(&image.chain_ids[1])
            .expect("info")
            .expect("snapshot");
        assert_eq!(
            fs::read(middle.path.join("etc/motd")).expect("motd"),
            b"imported\n"
        );
        assert_eq!(store.list(None).await.expect("list").len(), 2);
        assert!(listing(&dir.path().join("images/tmp")).is_empty());
    }

    #[tokio::test]
    async fn a_hostile_archive_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("images");
        let store = ImageStore::open(test_options(&root)).await.expect("open");

        let mut b = tar::Builder::new(Vec::new());
        append(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).expect("member");
        let path = write(dir.path(), "evil.tar", &b.into_inner().expect("tar"));
        let e = store.import(&path).await.unwrap_err();
        assert!(matches!(e, ImageError::BadImage(_)), "{e}");
        assert!(e.to_string().contains("leaves the archive"), "{e}");
        assert!(!dir.path().join("escape").exists());

        // A layout whose layer does not match the config's diff_id: refused, nothing kept.
        let mut img = TestImage::new(
            vec![Layer::plain(
                TarBuilder::new().file("a", b"a", 0o644).finish(),
                false,
            )],
            json!({}),
            &host_arch(),
            false,
        );
        let mut cfg: serde_json::Value = serde_json::from_slice(&img.config).expect("config");
        cfg["rootfs"]["diff_ids"][0] = json!(format!("sha256:{}", "cd".repeat(32)));
        img = TestImage::with_config(
            img.layers.clone(),
            serde_json::to_vec(&cfg).expect("json"),
            false,
        );
        let path = write(
            dir.path(),
            "wrong.tar",
            &oci_layout(&img, "example.com/x:1"),
        );
        let e = store.import(&path).await.unwrap_err();
        assert!(matches!(e, ImageError::BadImage(_)), "{e}");
        assert!(e.to_string().contains("diff_id"), "{e}");
        assert!(store.content().list().expect("list").is_empty());
        assert!(listing(&root.join("snapshots")).is_empty());
        assert!(store.list(None).await.expect("list").is_empty());
    }
}
