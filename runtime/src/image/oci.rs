//! The JSON documents of an image: indexes (and Docker manifest lists), manifests, image
//! configs, and the choice of the host's platform in an index.
//!
//! Owns parsing and validating those documents, and nothing that does I/O: the puller and the
//! importer fetch the bytes, this module says what they mean and refuses what corral cannot
//! run (unknown media types, a config that does not list one diff_id per layer). It also owns
//! the chain id rule, since it is a function of the config alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::error::{ImageError, Result};
use super::reference::Digest;
use super::registry::{
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};
use super::unpack::Compression;

pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MEDIA_TYPE_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The annotation an OCI layout's index uses to name an image (a full reference or a tag).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd and Docker write with the full reference.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn parsed_digest(&self) -> Result<Digest> {
        Digest::parse(&self.digest)
            .map_err(|e| ImageError::BadImage(format!("descriptor with a bad digest: {e}")))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What the manifest bytes turned out to be.
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

pub fn is_index_type(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_INDEX || media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
}

pub fn is_manifest_type(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_OCI_MANIFEST || media_type == MEDIA_TYPE_DOCKER_MANIFEST
}

/// Parses a manifest or an index served (or stored) with `media_type`. An empty media type
/// (an OCI layout's descriptor may omit it) is taken from the document itself.
pub fn parse_document(media_type: &str, bytes: &[u8]) -> Result<Document> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    let mt = if media_type.is_empty() {
        let probe: Probe = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::BadImage(format!("manifest is not valid JSON: {e}")))?;
        match probe.media_type {
            Some(mt) => mt,
            None if probe.manifests.is_some() => MEDIA_TYPE_OCI_INDEX.to_owned(),
            None => MEDIA_TYPE_OCI_MANIFEST.to_owned(),
        }
    } else {
        media_type.to_owned()
    };
    if is_index_type(&mt) {
        let index: Index = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::BadImage(format!("index is not valid: {e}")))?;
        Ok(Document::Index(index))
    } else if is_manifest_type(&mt) {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::BadImage(format!("manifest is not valid: {e}")))?;
        validate_manifest(&manifest)?;
        Ok(Document::Manifest(manifest))
    } else {
        Err(ImageError::BadImage(format!(
            "unsupported manifest media type {mt:?}"
        )))
    }
}

/// Refuses a manifest whose config or layers are of a kind corral cannot run (a Helm chart,
/// a WASM module, an encrypted layer), before anything is fetched.
fn validate_manifest(m: &Manifest) -> Result<()> {
    let ct = m.config.media_type.as_str();
    if ct != MEDIA_TYPE_OCI_CONFIG && ct != MEDIA_TYPE_DOCKER_CONFIG {
        return Err(ImageError::BadImage(format!(
            "unsupported config media type {ct:?}"
        )));
    }
    m.config.parsed_digest()?;
    for layer in &m.layers {
        if Compression::from_media_type(&layer.media_type).is_none() {
            return Err(ImageError::BadImage(format!(
                "layer {} has unsupported media type {:?}",
                layer.digest, layer.media_type
            )));
        }
        layer.parsed_digest()?;
    }
    Ok(())
}

/// The platform this process runs on, in OCI's names.
pub fn host_platform() -> Platform {
    let (architecture, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "x86" => ("386", None),
        "aarch64" => ("arm64", Some("v8")),
        // The arm Rust targets Debian ships are v7 (armhf) and v5/v6 (armel); v7 is what
        // images publish for 32-bit arm nodes.
        "arm" => ("arm", Some("v7")),
        "powerpc64" => {
            if cfg!(target_endian = "little") {
                ("ppc64le", None)
            } else {
                ("ppc64", None)
            }
        }
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        "loongarch64" => ("loong64", None),
        "mips64" => ("mips64le", None),
        other => (other, None),
    };
    Platform {
        architecture: architecture.to_owned(),
        os: "linux".to_owned(),
        variant: variant.map(str::to_owned),
    }
}

/// How well a descriptor's platform fits `want`; `None` when it does not run there.
fn platform_score(have: &Platform, want: &Platform) -> Option<u16> {
    if have.os != want.os || have.architecture != want.architecture {
        return None;
    }
    let have_v = have.variant.as_deref().unwrap_or("");
    let want_v = want.variant.as_deref().unwrap_or("");
    if have_v == want_v {
        return Some(1000);
    }
    // arm64 images rarely write "v8"; containerd treats the two as the same.
    if want.architecture == "arm64" && (have_v.is_empty() || have_v == "v8") {
        return Some(1000);
    }
    if have_v.is_empty() {
        return Some(1);
    }
    // An older arm variant runs on a newer core (v6 on v7), never the reverse.
    if want.architecture == "arm" {
        let n = |v: &str| v.strip_prefix('v').and_then(|x| x.parse::<u8>().ok());
        if let (Some(h), Some(w)) = (n(have_v), n(want_v)) {
            // The newest variant the core runs wins (v7 over v6 on a v8 core).
            if h < w {
                return Some(100 + u16::from(h));
            }
        }
    }
    None
}

/// The manifest of `index` for `want`: the best fitting platform, the first of equals.
/// Entries without a platform are skipped (attestations, or an index of one unnamed image),
/// unless no entry has one and the index holds a single manifest.
pub fn choose_manifest<'a>(index: &'a Index, want: &Platform) -> Result<&'a Descriptor> {
    let mut best: Option<(&Descriptor, u16)> = None;
    for d in &index.manifests {
        if !is_manifest_type(&d.media_type) && !d.media_type.is_empty() {
            continue;
        }
        let Some(p) = &d.platform else { continue };
        if let Some(score) = platform_score(p, want) {
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((d, score));
            }
        }
    }
    if let Some((d, _)) = best {
        return Ok(d);
    }
    if index.manifests.len() == 1 && index.manifests[0].platform.is_none() {
        return Ok(&index.manifests[0]);
    }
    let offered: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    Err(ImageError::NotFound(format!(
        "no manifest for platform {}/{}{} (the index offers {})",
        want.os,
        want.architecture,
        want.variant
            .as_deref()
            .map(|v| format!("/{v}"))
            .unwrap_or_default(),
        if offered.is_empty() {
            "none".to_owned()
        } else {
            offered.join(", ")
        }
    )))
}

/// The runtime settings of an image, from its config's `config` object: what CreateContainer
/// starts from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    pub user: String,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    /// `port/proto`, sorted.
    pub exposed_ports: Vec<String>,
    pub volumes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: String,
    pub architecture: String,
    pub os: String,
    /// RFC 3339, as the config writes it.
    pub created: Option<String>,
}

/// An image config document, as much of it as corral uses.
#[derive(Debug, Clone)]
pub struct ParsedConfig {
    pub config: ImageConfig,
    pub diff_ids: Vec<Digest>,
}

pub fn parse_config(bytes: &[u8]) -> Result<ParsedConfig> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Rootfs {
        #[serde(rename = "type")]
        kind: String,
        diff_ids: Vec<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "PascalCase")]
    struct Runtime {
        user: Option<String>,
        env: Option<Vec<String>>,
        entrypoint: Option<Vec<String>>,
        cmd: Option<Vec<String>>,
        working_dir: Option<String>,
        exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
        volumes: Option<BTreeMap<String, serde_json::Value>>,
        labels: Option<BTreeMap<String, String>>,
        stop_signal: Option<String>,
    }
    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        os: String,
        #[serde(default)]
        created: Option<String>,
        #[serde(default)]
        config: Option<Runtime>,
        rootfs: Rootfs,
    }
    let doc: Doc = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::BadImage(format!("image config is not valid: {e}")))?;
    if doc.rootfs.kind != "layers" {
        return Err(ImageError::BadImage(format!(
            "image config has rootfs type {:?}, \"layers\" expected",
            doc.rootfs.kind
        )));
    }
    let diff_ids = doc
        .rootfs
        .diff_ids
        .iter()
        .map(|d| {
            Digest::parse(d)
                .map_err(|e| ImageError::BadImage(format!("image config has a bad diff_id: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let rt = doc.config.unwrap_or_default();
    Ok(ParsedConfig {
        config: ImageConfig {
            user: rt.user.unwrap_or_default(),
            env: rt.env.unwrap_or_default(),
            entrypoint: rt.entrypoint.unwrap_or_default(),
            cmd: rt.cmd.unwrap_or_default(),
            working_dir: rt.working_dir.unwrap_or_default(),
            exposed_ports: rt.exposed_ports.unwrap_or_default().into_keys().collect(),
            volumes: rt.volumes.unwrap_or_default().into_keys().collect(),
            labels: rt.labels.unwrap_or_default(),
            stop_signal: rt.stop_signal.unwrap_or_default(),
            architecture: doc.architecture,
            os: doc.os,
            created: doc.created,
        },
        diff_ids,
    })
}

/// OCI's chain ids: `chain(L0) = diff(L0)`, `chain(Ln) = sha256(chain(Ln-1) + " " + diff(Ln))`.
/// The snapshot of a layer is keyed by its chain id, so two images that share their lower
/// layers share those snapshots.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => Digest::from_sha256(
                sha2::Sha256::digest(format!("{parent} {diff}").as_bytes()).into(),
            ),
        };
        out.push(next);
    }
    out
}

/// The digest of bytes already in memory.
pub fn sha256_digest(bytes: &[u8]) -> Digest {
    Digest::from_sha256(sha2::Sha256::digest(bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).expect("digest")
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let ids = chain_ids(&[d('a'), d('b'), d('c')]);
        assert_eq!(ids[0], d('a'));
        assert_eq!(
            ids[1],
            sha256_digest(format!("{} {}", d('a'), d('b')).as_bytes())
        );
        assert_eq!(
            ids[2],
            sha256_digest(format!("{} {}", ids[1], d('c')).as_bytes())
        );
        assert!(chain_ids(&[]).is_empty());
    }

    fn desc(arch: &str, variant: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: MEDIA_TYPE_OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn platform_choice() {
        let index = Index {
            media_type: None,
            manifests: vec![
                desc("amd64", None),
                desc("arm", Some("v6")),
                desc("arm", Some("v7")),
                desc("arm64", None),
            ],
        };
        let p = |a: &str, v: Option<&str>| Platform {
            architecture: a.into(),
            os: "linux".into(),
            variant: v.map(Into::into),
        };
        let pick = |want: Platform| {
            choose_manifest(&index, &want)
                .map(|d| d.platform.clone().unwrap_or_default())
                .map_err(|e| e.to_string())
        };
        assert_eq!(pick(p("amd64", None)).unwrap().architecture, "amd64");
        assert_eq!(pick(p("arm64", Some("v8"))).unwrap().architecture, "arm64");
        assert_eq!(
            pick(p("arm", Some("v7"))).unwrap().variant.as_deref(),
            Some("v7")
        );
        assert_eq!(
            pick(p("arm", Some("v8"))).unwrap().variant.as_deref(),
            Some("v7")
        );
        let err = pick(p("s390x", None)).unwrap_err();
        assert!(
            err.contains("linux/s390x") && err.contains("linux/amd64"),
            "{err}"
        );
        let host = host_platform();
        assert_eq!(host.os, "linux");
        assert!(!host.architecture.is_empty());
    }

    #[test]
    fn config_fields() {
        let raw = br#"{"architecture":"amd64","os":"linux","created":"2024-01-01T00:00:00Z",
            "config":{"User":"1000:1000","Env":["A=1"],"Entrypoint":["/e"],"Cmd":["c"],
            "WorkingDir":"/w","ExposedPorts":{"80/tcp":{}},"Volumes":{"/data":{}},
            "Labels":{"k":"v"},"StopSignal":"SIGQUIT"},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = parse_config(raw).unwrap().config;
        assert_eq!(c.user, "1000:1000");
        assert_eq!(c.exposed_ports, vec!["80/tcp"]);
        assert_eq!(c.volumes, vec!["/data"]);
        assert_eq!(c.stop_signal, "SIGQUIT");
        assert!(parse_config(b"{}").is_err());
        assert!(parse_config(br#"{"rootfs":{"type":"other","diff_ids":[]}}"#).is_err());
    }

    #[test]
    fn unknown_media_types_are_refused() {
        let m = |config_mt: &str, layer_mt: &str| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "config": {"mediaType": config_mt, "digest": d('a').to_string(), "size": 1},
                "layers": [{"mediaType": layer_mt, "digest": d('b').to_string(), "size": 1}],
            }))
            .unwrap()
        };
        assert!(parse_document(
            MEDIA_TYPE_OCI_MANIFEST,
            &m(MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_LAYER_GZIP)
        )
        .is_ok());
        let e = parse_document(
            MEDIA_TYPE_OCI_MANIFEST,
            &m(
                "application/vnd.cncf.helm.config.v1+json",
                MEDIA_TYPE_OCI_LAYER,
            ),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("helm"), "{e}");
        let e = parse_document(
            MEDIA_TYPE_OCI_MANIFEST,
            &m(MEDIA_TYPE_OCI_CONFIG, "application/x-bogus"),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("application/x-bogus"), "{e}");
        assert!(matches!(
            parse_document("application/x-other", b"{}"),
            Err(ImageError::BadImage(_))
        ));
    }
}
