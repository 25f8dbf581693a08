//! Images built in memory, for pushing to a test registry or saving as a
//! `docker save` tarball.
//!
//! - [`Tar`]: a layer written entry by entry. Names and link targets go into
//!   the archive exactly as given (`../x`, `/abs`), which is what a hostile
//!   layer needs and what `tar(1)` and the `tar` crate refuse to write.
//! - [`Layer`]: an uncompressed layer blob with its digest.
//! - [`BuiltImage`]: layers, an OCI config and an OCI manifest, all with
//!   their digests; [`BuiltImage::docker_save`] writes them as `docker save`
//!   does.
//!
//! Nothing here touches the file system except [`busybox_layer`], which
//! reads Debian's busybox-static.

use corral_runtime::image::oci::sha256_digest;

use crate::error::{Context, Result};

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

const BLOCK: usize = 512;
/// The same instant for every entry, so that a layer's digest depends on its
/// content only.
const MTIME: u64 = 1_700_000_000;

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    sha256_digest(bytes).to_string()
}

/// The host's architecture in OCI's names, as an image config carries it.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A cheap deterministic byte stream (xorshift): different per seed, and as
/// incompressible as random data, for benchmark layers.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tar stream in the ustar format, with PAX records for names and link
/// targets longer than its fields hold.
#[derive(Debug, Default)]
pub struct Tar {
    out: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Kind {
    File,
    HardLink,
    Symlink,
    Dir,
}

impl Kind {
    fn flag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::HardLink => b'1',
            Kind::Symlink => b'2',
            Kind::Dir => b'5',
        }
    }
}

impl Tar {
    pub fn new() -> Tar {
        Tar::default()
    }

    pub fn dir(self, path: &str, mode: u32) -> Tar {
        self.entry(Kind::Dir, path, "", mode, &[])
    }

    pub fn file(self, path: &str, data: &[u8], mode: u32) -> Tar {
        self.entry(Kind::File, path, "", mode, data)
    }

    pub fn symlink(self, path: &str, target: &str) -> Tar {
        self.entry(Kind::Symlink, path, target, 0o777, &[])
    }

    /// A hard link `path` to the archive member (or, for a hostile layer,
    /// anything else) `target`.
    pub fn hardlink(self, path: &str, target: &str) -> Tar {
        self.entry(Kind::HardLink, path, target, 0o644, &[])
    }

    /// The stream, with its two zero blocks of end.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.resize(self.out.len() + 2 * BLOCK, 0);
        self.out
    }

    fn entry(mut self, kind: Kind, path: &str, link: &str, mode: u32, data: &[u8]) -> Tar {
        // ustar's name field holds 100 bytes and its link field 100: longer
        // values go in a PAX header before the entry, as GNU tar writes them.
        let mut pax = Vec::new();
        if path.len() > 100 {
            pax.extend(pax_record("path", path));
        }
        if link.len() > 100 {
            pax.extend(pax_record("linkpath", link));
        }
        if !pax.is_empty() {
            let header = header(b'x', "PaxHeaders/entry", "", 0o644, pax.len());
            self.out.extend_from_slice(&header);
            self.append_data(&pax);
        }
        let header = header(kind.flag(), path, link, mode, data.len());
        self.out.extend_from_slice(&header);
        self.append_data(data);
        self
    }

    fn append_data(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        let padded = data.len().div_ceil(BLOCK) * BLOCK;
        self.out.resize(self.out.len() + padded - data.len(), 0);
    }
}

/// One ustar header block. Fields too long for it are truncated: the PAX
/// record written before it carries their full value.
fn header(flag: u8, path: &str, link: &str, mode: u32, size: usize) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    put(&mut h[0..100], path.as_bytes());
    put(&mut h[100..108], format!("{mode:07o}").as_bytes());
    put(&mut h[108..116], b"0000000");
    put(&mut h[116..124], b"0000000");
    put(&mut h[124..136], format!("{size:011o}").as_bytes());
    put(&mut h[136..148], format!("{MTIME:011o}").as_bytes());
    h[156] = flag;
    put(&mut h[157..257], link.as_bytes());
    put(&mut h[257..263], b"ustar\0");
    put(&mut h[263..265], b"00");
    put(&mut h[265..297], b"root");
    put(&mut h[297..329], b"root");
    // The checksum is computed with its own field read as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h[148..156], format!("{sum:06o}\0 ").as_bytes());
    h
}

fn put(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// `"<len> key=value\n"`, where `<len>` counts the whole record, its own
/// digits included.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

/// An uncompressed layer as pushed: its tar is its blob, so the digest and
/// the diff_id are the same.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub digest: String,
    pub diff_id: String,
}

impl Layer {
    pub fn tar(tar: Vec<u8>) -> Layer {
        let digest = digest(&tar);
        Layer {
            blob: tar,
            media_type: MEDIA_TYPE_OCI_LAYER.to_string(),
            diff_id: digest.clone(),
            digest,
        }
    }
}

/// Debian's busybox-static as `/bin/busybox`, with `/bin/sh` a symlink to it.
pub fn busybox_layer() -> Result<Layer> {
    let busybox =
        std::fs::read(BUSYBOX).context(|| format!("read {BUSYBOX} (Debian's busybox-static)"))?;
    Ok(Layer::tar(
        Tar::new()
            .dir("bin", 0o755)
            .file("bin/busybox", &busybox, 0o755)
            .symlink("bin/sh", "busybox")
            .finish(),
    ))
}

/// An OCI image: layers, config and manifest, each with its digest.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    /// The image id.
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub media_type: String,
}

impl BuiltImage {
    /// An image of `layers` for this host's platform, whose config's
    /// `config` (User, Env, Cmd...) is `runtime`.
    pub fn new(layers: Vec<Layer>, runtime: serde_json::Value) -> Result<BuiltImage> {
        let config = serde_json::json!({
            "architecture": oci_arch(),
            "os": "linux",
            "created": "2024-05-01T00:00:00Z",
            "config": runtime,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        });
        let config = serde_json::to_vec(&config).context(|| "encode an image config".into())?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_OCI_CONFIG,
                "digest": digest(&config),
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type,
                "digest": l.digest,
                "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        });
        let mut image = BuiltImage {
            layers,
            config_digest: digest(&config),
            config,
            manifest: Vec::new(),
            manifest_digest: String::new(),
            media_type: MEDIA_TYPE_OCI_MANIFEST.to_string(),
        };
        image.set_manifest(&manifest)?;
        Ok(image)
    }

    /// Rewrites the manifest (for a hostile one: a size that lies, a media
    /// type nobody knows) and its digest.
    pub fn edit_manifest(&mut self, edit: impl FnOnce(&mut serde_json::Value)) -> Result<()> {
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&self.manifest).context(|| "decode the manifest".into())?;
        edit(&mut manifest);
        if let Some(media_type) = manifest["mediaType"].as_str() {
            self.media_type = media_type.to_string();
        }
        self.set_manifest(&manifest)
    }

    /// Layers plus config, in bytes: the size a registry pull reports.
    pub fn size(&self) -> u64 {
        let layers: usize = self.layers.iter().map(|l| l.blob.len()).sum();
        (layers + self.config.len()) as u64
    }

    /// The image as `docker save` writes it: `manifest.json` naming the
    /// config, the tags and the layers, each layer as `<hex>/layer.tar`.
    pub fn docker_save(&self, repo_tags: &[&str]) -> Result<Vec<u8>> {
        let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
        let config_name = format!("{}.json", hex(&self.config_digest));
        let layer_names: Vec<String> = self
            .layers
            .iter()
            .map(|l| format!("{}/layer.tar", hex(&l.diff_id)))
            .collect();
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": repo_tags,
            "Layers": layer_names,
        }]);
        let manifest = serde_json::to_vec(&manifest).context(|| "encode manifest.json".into())?;
        let mut tar = Tar::new().file(&config_name, &self.config, 0o644);
        for (layer, name) in self.layers.iter().zip(&layer_names) {
            tar = tar
                .dir(&hex(&layer.diff_id), 0o755)
                .file(name, &layer.blob, 0o644);
        }
        Ok(tar.file("manifest.json", &manifest, 0o644).finish())
    }

    fn set_manifest(&mut self, manifest: &serde_json::Value) -> Result<()> {
        self.manifest = serde_json::to_vec(manifest).context(|| "encode the manifest".into())?;
        self.manifest_digest = digest(&self.manifest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn pax_record_counts_its_own_length() {
        let r = pax_record("path", "a");
        assert_eq!(r, b"9 path=a\n");
        let long = "x".repeat(200);
        let r = pax_record("path", &long);
        let text = String::from_utf8(r.clone()).expect("utf-8");
        let (len, _) = text.split_once(' ').expect("len");
        assert_eq!(len.parse::<usize>().expect("number"), r.len());
    }

    #[test]
    fn gnu_tar_reads_what_tar_writes() {
        let dir = std::env::temp_dir().join(format!("corral-e2e-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let long = format!("d/{}", "n".repeat(150));
        let tar = Tar::new()
            .dir("d", 0o755)
            .file("d/f", b"hello", 0o640)
            .file(&long, b"long", 0o644)
            .symlink("d/s", "f")
            .hardlink("d/h", "d/f")
            .finish();
        let path = dir.join("t.tar");
        std::fs::write(&path, &tar).expect("write");
        let out = Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
            .expect("tar");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8_lossy(&out.stdout);
        for want in ["d/f", &long, "d/s -> f", "d/h link to d/f"] {
            assert!(listing.contains(want), "{want} not in {listing}");
        }
    }
}
