//! Image references and content digests, parsed and normalized the way kubelet, crictl and
//! containerd's CRI plugin do it (the `distribution/reference` grammar with Docker Hub
//! normalization).
//!
//! This module owns the text form of a reference: `busybox` and `docker.io/library/busybox:latest`
//! name the same image, and the second is what [`Reference`]'s `Display` gives, so it is the form
//! to store and compare. It owns the [`Digest`] type (`algorithm:hex`) that the content store,
//! the manifests and the layer unpacker share.
//!
//! It does no I/O and knows nothing of registries beyond Docker Hub's two names (`docker.io` in
//! references, `registry-1.docker.io` on the wire): mirrors, credentials and TLS belong to the
//! registry client.

use std::fmt;
use std::str::FromStr;

/// The registry a reference without one refers to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The host that serves [`DEFAULT_REGISTRY`]'s distribution API.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";
/// Docker Hub's legacy name; references written with it mean [`DEFAULT_REGISTRY`].
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";
/// Docker Hub's namespace for single-component names (`busybox` is `library/busybox`).
const OFFICIAL_NAMESPACE: &str = "library/";
/// The tag a reference with neither tag nor digest gets.
pub const DEFAULT_TAG: &str = "latest";
/// Longest repository path (the name without registry), as distribution enforces it.
pub const MAX_REPOSITORY_LEN: usize = 255;
/// Longest tag: one word character and up to 127 more.
pub const MAX_TAG_LEN: usize = 128;
/// Longest registry host (with port): a DNS name is at most 253 characters.
pub const MAX_REGISTRY_LEN: usize = 255;

/// Why a reference or a digest was refused. Every variant names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid image reference: empty")]
    Empty,
    #[error("invalid image reference {0:?}: repository name must be lowercase")]
    Uppercase(String),
    #[error("invalid image reference {0:?}: repository name longer than {MAX_REPOSITORY_LEN} characters")]
    NameTooLong(String),
    #[error("invalid image reference {0:?}: a 64-character hexadecimal string is an image id, not a repository name")]
    IdentifierAsName(String),
    #[error("invalid image reference {input:?}: {reason}")]
    Format { input: String, reason: &'static str },
    #[error("invalid image reference {input:?}: bad registry {registry:?}")]
    Registry { input: String, registry: String },
    #[error("invalid image reference {input:?}: bad tag {tag:?}")]
    Tag { input: String, tag: String },
    #[error("invalid image reference {input:?}: {source}")]
    Digest {
        input: String,
        #[source]
        source: DigestError,
    },
}

/// Why a digest was refused. Every variant names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {0:?}: expected algorithm:hex")]
    Format(String),
    #[error("invalid digest {0:?}: unsupported algorithm (sha256 and sha512 are)")]
    Algorithm(String),
    #[error("invalid digest {0:?}: wrong length or not lowercase hex for its algorithm")]
    Encoding(String),
}

/// A digest algorithm that OCI registers and this runtime verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex encoding of one hash.
    pub fn hex_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 64,
            DigestAlgorithm::Sha512 => 128,
        }
    }
}

impl fmt::Display for DigestAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A content digest, `algorithm:hex`, with the hex checked against the algorithm (length, and
/// lowercase only: `sha256:ABC…` names no blob, since registries and stores compare the text).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: DigestAlgorithm,
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(DigestError::Format(s.to_owned()));
        };
        if algorithm.is_empty() || hex.is_empty() {
            return Err(DigestError::Format(s.to_owned()));
        }
        let algorithm = match algorithm {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            _ => return Err(DigestError::Algorithm(s.to_owned())),
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Encoding(s.to_owned()));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// The digest of a finished SHA-256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest {
            algorithm: DigestAlgorithm::Sha256,
            hex: hex::encode(hash),
        }
    }

    /// The digest of a finished SHA-512 hash.
    pub fn from_sha512(hash: [u8; 64]) -> Digest {
        Digest {
            algorithm: DigestAlgorithm::Sha512,
            hex: hex::encode(hash),
        }
    }

    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// A normalized image reference. After [`Reference::parse`] the registry is never empty, and a
/// reference without a digest always has a tag (`latest` when none was written); one with a
/// digest keeps the tag only if one was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Host and optional port as written (`docker.io`, `localhost:5000`, `[::1]:5000`).
    pub registry: String,
    /// The path inside the registry (`library/busybox`).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalizes `s` as `[registry/]path[:tag][@digest]`.
    ///
    /// The first path component is the registry when it contains `.` or `:`, is `localhost`, or
    /// has an uppercase letter (the last rule is distribution's: a repository path is lowercase,
    /// so such a component can only be a host). Otherwise the registry is `docker.io`, and a
    /// single-component Docker Hub name gets the `library/` namespace. `index.docker.io` is
    /// rewritten to `docker.io`.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let format = |reason| ReferenceError::Format {
            input: s.to_owned(),
            reason,
        };
        // A bare image id is ambiguous with a repository called that; distribution refuses it
        // so an id is never pulled from Docker Hub by mistake.
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ReferenceError::IdentifierAsName(s.to_owned()));
        }

        // Neither a name nor a tag can hold '@', so the first one starts the digest.
        let (name_and_tag, digest) = match s.split_once('@') {
            Some((before, after)) => {
                if after.is_empty() {
                    return Err(format("empty digest after '@'"));
                }
                let digest = Digest::parse(after).map_err(|source| ReferenceError::Digest {
                    input: s.to_owned(),
                    source,
                })?;
                (before, Some(digest))
            }
            None => (s, None),
        };

        // A ':' after the last '/' starts the tag; one before it belongs to a registry port.
        let last_slash = name_and_tag.rfind('/');
        let (name, tag) = match name_and_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
            }
            _ => (name_and_tag, None),
        };
        if name.is_empty() {
            return Err(format("no repository name"));
        }

        let (registry, repository) = split_registry(name);
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase(s.to_owned()));
        }
        if !valid_registry(registry) {
            return Err(ReferenceError::Registry {
                input: s.to_owned(),
                registry: registry.to_owned(),
            });
        }
        if !valid_repository(&repository) {
            return Err(format(
                "repository path components are lowercase letters and digits joined by '.', '_', '__' or dashes",
            ));
        }
        if repository.len() > MAX_REPOSITORY_LEN {
            return Err(ReferenceError::NameTooLong(s.to_owned()));
        }
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(ReferenceError::Tag {
                    input: s.to_owned(),
                    tag: tag.to_owned(),
                });
            }
        }

        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) to send distribution API requests to, before any mirror.
    pub fn endpoint_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What goes after `/manifests/` in a distribution API request: the digest when there is
    /// one (it pins the content, the tag does not), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// Splits a name (no tag, no digest) into registry and repository path, adding Docker Hub's
/// defaults. The pieces are not validated here.
fn split_registry(name: &str) -> (&str, String) {
    let Some((first, rest)) = name.split_once('/') else {
        return (DEFAULT_REGISTRY, format!("{OFFICIAL_NAMESPACE}{name}"));
    };
    let (registry, path) = if first == "localhost"
        || first.contains(['.', ':'])
        || first.bytes().any(|b| b.is_ascii_uppercase())
    {
        let registry = if first == LEGACY_DEFAULT_REGISTRY {
            DEFAULT_REGISTRY
        } else {
            first
        };
        (registry, rest)
    } else {
        (DEFAULT_REGISTRY, name)
    };
    if registry == DEFAULT_REGISTRY && !path.contains('/') {
        (registry, format!("{OFFICIAL_NAMESPACE}{path}"))
    } else {
        (registry, path.to_owned())
    }
}

/// `host[:port]`, host being DNS-like labels (letters of either case, digits, inner dashes)
/// joined by dots, or a bracketed IPv6 address without zone.
fn valid_registry(registry: &str) -> bool {
    if registry.is_empty() || registry.len() > MAX_REGISTRY_LEN {
        return false;
    }
    let (host_ok, port) = if let Some(inner) = registry.strip_prefix('[') {
        let Some((addr, after)) = inner.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        let addr_ok = !addr.is_empty() && addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        (addr_ok, port)
    } else {
        let (host, port) = match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        };
        (host.split('.').all(valid_host_label), port)
    };
    host_ok && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn valid_host_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
}

/// Path components joined by '/', each lowercase alphanumeric runs joined by one separator:
/// `.`, `_`, `__`, or any number of dashes.
fn valid_repository(path: &str) -> bool {
    path.split('/').all(valid_path_component)
}

fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        // One alphanumeric run is required here: at the start and after every separator.
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `[\w][\w.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let bytes = tag.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            bytes.len() <= MAX_TAG_LEN
                && word(first)
                && rest.iter().all(|b| word(b) || *b == b'.' || *b == b'-')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA256_F: &str =
        "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
    const SHA256_A: &str =
        "sha256:7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa";

    fn sha512_f() -> String {
        format!("sha512:{}", "f".repeat(128))
    }

    /// (input, normalized, registry, repository, tag, digest)
    type Case = (
        String,
        String,
        &'static str,
        String,
        Option<String>,
        Option<String>,
    );

    fn valid_cases() -> Vec<Case> {
        let s = |x: &str| x.to_owned();
        let o = |x: &str| Some(x.to_owned());
        let long_path = "a/".repeat(127) + "a";
        vec![
            // Docker Hub familiar names.
            (
                s("busybox"),
                s("docker.io/library/busybox:latest"),
                "docker.io",
                s("library/busybox"),
                o("latest"),
                None,
            ),
            (
                s("busybox:1.36"),
                s("docker.io/library/busybox:1.36"),
                "docker.io",
                s("library/busybox"),
                o("1.36"),
                None,
            ),
            (
                s("user/app"),
                s("docker.io/user/app:latest"),
                "docker.io",
                s("user/app"),
                o("latest"),
                None,
            ),
            (
                s("user/app/sub"),
                s("docker.io/user/app/sub:latest"),
                "docker.io",
                s("user/app/sub"),
                o("latest"),
                None,
            ),
            (
                s("docker.io/busybox"),
                s("docker.io/library/busybox:latest"),
                "docker.io",
                s("library/busybox"),
                o("latest"),
                None,
            ),
            (
                s("docker.io/library/busybox:latest"),
                s("docker.io/library/busybox:latest"),
                "docker.io",
                s("library/busybox"),
                o("latest"),
                None,
            ),
            (
                s("index.docker.io/library/busybox"),
                s("docker.io/library/busybox:latest"),
                "docker.io",
                s("library/busybox"),
                o("latest"),
                None,
            ),
            (
                s("index.docker.io/busybox"),
                s("docker.io/library/busybox:latest"),
                "docker.io",
                s("library/busybox"),
                o("latest"),
                None,
            ),
            // Registries.
            (
                s("localhost/x"),
                s("localhost/x:latest"),
                "localhost",
                s("x"),
                o("latest"),
                None,
            ),
            (
                s("localhost:5000/x"),
                s("localhost:5000/x:latest"),
                "localhost:5000",
                s("x"),
                o("latest"),
                None,
            ),
            (
                s("127.0.0.1:5000/a/b:v1"),
                s("127.0.0.1:5000/a/b:v1"),
                "127.0.0.1:5000",
                s("a/b"),
                o("v1"),
                None,
            ),
            (
                s("registry.k8s.io/pause:3.9"),
                s("registry.k8s.io/pause:3.9"),
                "registry.k8s.io",
                s("pause"),
                o("3.9"),
                None,
            ),
            (
                s("test.com/repo:tag"),
                s("test.com/repo:tag"),
                "test.com",
                s("repo"),
                o("tag"),
                None,
            ),
            (
                s("test:5000/repo"),
                s("test:5000/repo:latest"),
                "test:5000",
                s("repo"),
                o("latest"),
                None,
            ),
            (
                s("test-com:8080/foo"),
                s("test-com:8080/foo:latest"),
                "test-com:8080",
                s("foo"),
                o("latest"),
                None,
            ),
            (
                s("sub-dom1.foo.com/bar/baz/quux:some-long-tag"),
                s("sub-dom1.foo.com/bar/baz/quux:some-long-tag"),
                "sub-dom1.foo.com",
                s("bar/baz/quux"),
                o("some-long-tag"),
                None,
            ),
            (
                s("b.gcr.io/test.example.com/my-app:test.example.com"),
                s("b.gcr.io/test.example.com/my-app:test.example.com"),
                "b.gcr.io",
                s("test.example.com/my-app"),
                o("test.example.com"),
                None,
            ),
            (
                s("xn--n3h.com/myimage:xn--n3h.com"),
                s("xn--n3h.com/myimage:xn--n3h.com"),
                "xn--n3h.com",
                s("myimage"),
                o("xn--n3h.com"),
                None,
            ),
            (
                s("192.168.1.1/repo"),
                s("192.168.1.1/repo:latest"),
                "192.168.1.1",
                s("repo"),
                o("latest"),
                None,
            ),
            (
                s("192.168.1.1:5000/repo:5050"),
                s("192.168.1.1:5000/repo:5050"),
                "192.168.1.1:5000",
                s("repo"),
                o("5050"),
                None,
            ),
            (
                s("[2001:db8::1]/repo"),
                s("[2001:db8::1]/repo:latest"),
                "[2001:db8::1]",
                s("repo"),
                o("latest"),
                None,
            ),
            (
                s("[2001:db8::1]:5000/repo:tag"),
                s("[2001:db8::1]:5000/repo:tag"),
                "[2001:db8::1]:5000",
                s("repo"),
                o("tag"),
                None,
            ),
            (
                s("[::1]:5000/repo"),
                s("[::1]:5000/repo:latest"),
                "[::1]:5000",
                s("repo"),
                o("latest"),
                None,
            ),
            (
                s("Example.COM/repo"),
                s("Example.COM/repo:latest"),
                "Example.COM",
                s("repo"),
                o("latest"),
                None,
            ),
            // distribution treats an uppercase first component as a host (see parse's doc).
            (
                s("Uppercase/lowercase:tag"),
                s("Uppercase/lowercase:tag"),
                "Uppercase",
                s("lowercase"),
                o("tag"),
                None,
            ),
            // A single component is always a Docker Hub name, even when it looks like a host:
            // what follows its ':' is a tag.
            (
                s("test_com"),
                s("docker.io/library/test_com:latest"),
                "docker.io",
                s("library/test_com"),
                o("latest"),
                None,
            ),
            (
                s("test.com:tag"),
                s("docker.io/library/test.com:tag"),
                "docker.io",
                s("library/test.com"),
                o("tag"),
                None,
            ),
            (
                s("test.com:5000"),
                s("docker.io/library/test.com:5000"),
                "docker.io",
                s("library/test.com"),
                o("5000"),
                None,
            ),
            (
                s("localhost"),
                s("docker.io/library/localhost:latest"),
                "docker.io",
                s("library/localhost"),
                o("latest"),
                None,
            ),
            (
                s("localhost:5000"),
                s("docker.io/library/localhost:5000"),
                "docker.io",
                s("library/localhost"),
                o("5000"),
                None,
            ),
            (
                s("foo_bar.com:8080"),
                s("docker.io/library/foo_bar.com:8080"),
                "docker.io",
                s("library/foo_bar.com"),
                o("8080"),
                None,
            ),
            (
                s("foo/foo_bar.com:8080"),
                s("docker.io/foo/foo_bar.com:8080"),
                "docker.io",
                s("foo/foo_bar.com"),
                o("8080"),
                None,
            ),
            (
                s("192.168.1.1:5000"),
                s("docker.io/library/192.168.1.1:5000"),
                "docker.io",
                s("library/192.168.1.1"),
                o("5000"),
                None,
            ),
            // Separators.
            (
                s("a__b/c.d/e---f/g_h"),
                s("docker.io/a__b/c.d/e---f/g_h:latest"),
                "docker.io",
                s("a__b/c.d/e---f/g_h"),
                o("latest"),
                None,
            ),
            (
                s("0/1"),
                s("docker.io/0/1:latest"),
                "docker.io",
                s("0/1"),
                o("latest"),
                None,
            ),
            // Tags: any case, word characters, dots and dashes after the first.
            (
                s("lowercase:Uppercase"),
                s("docker.io/library/lowercase:Uppercase"),
                "docker.io",
                s("library/lowercase"),
                o("Uppercase"),
                None,
            ),
            (
                s("x:_"),
                s("docker.io/library/x:_"),
                "docker.io",
                s("library/x"),
                o("_"),
                None,
            ),
            (
                s("x:v1.0-rc_1"),
                s("docker.io/library/x:v1.0-rc_1"),
                "docker.io",
                s("library/x"),
                o("v1.0-rc_1"),
                None,
            ),
            (
                format!("x:{}", "t".repeat(128)),
                format!("docker.io/library/x:{}", "t".repeat(128)),
                "docker.io",
                s("library/x"),
                Some("t".repeat(128)),
                None,
            ),
            // Digests: no tag is added; a written tag is kept.
            (
                format!("busybox@{SHA256_A}"),
                format!("docker.io/library/busybox@{SHA256_A}"),
                "docker.io",
                s("library/busybox"),
                None,
                o(SHA256_A),
            ),
            (
                format!("busybox:1.36@{SHA256_A}"),
                format!("docker.io/library/busybox:1.36@{SHA256_A}"),
                "docker.io",
                s("library/busybox"),
                o("1.36"),
                o(SHA256_A),
            ),
            (
                format!("test:5000/repo@{SHA256_F}"),
                format!("test:5000/repo@{SHA256_F}"),
                "test:5000",
                s("repo"),
                None,
                o(SHA256_F),
            ),
            (
                format!("test:5000/repo:tag@{SHA256_F}"),
                format!("test:5000/repo:tag@{SHA256_F}"),
                "test:5000",
                s("repo"),
                o("tag"),
                o(SHA256_F),
            ),
            (
                format!("[2001:db8::1]:5000/repo:tag@{SHA256_F}"),
                format!("[2001:db8::1]:5000/repo:tag@{SHA256_F}"),
                "[2001:db8::1]:5000",
                s("repo"),
                o("tag"),
                o(SHA256_F),
            ),
            (
                format!("xn--7o8h.com/myimage:xn--7o8h.com@{}", sha512_f()),
                format!("xn--7o8h.com/myimage:xn--7o8h.com@{}", sha512_f()),
                "xn--7o8h.com",
                s("myimage"),
                o("xn--7o8h.com"),
                Some(sha512_f()),
            ),
            // Length: 255 characters of path is the most.
            (
                long_path.clone(),
                format!("docker.io/{long_path}:latest"),
                "docker.io",
                long_path.clone(),
                o("latest"),
                None,
            ),
            (
                format!("{long_path}:tag-puts-this-over-max"),
                format!("docker.io/{long_path}:tag-puts-this-over-max"),
                "docker.io",
                long_path,
                o("tag-puts-this-over-max"),
                None,
            ),
        ]
    }

    #[test]
    fn valid_references_normalize() {
        for (input, normalized, registry, repository, tag, digest) in valid_cases() {
            let r = Reference::parse(&input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(r.to_string(), normalized, "{input:?}");
            assert_eq!(r.registry, registry, "{input:?}");
            assert_eq!(r.repository, repository, "{input:?}");
            assert_eq!(r.tag, tag, "{input:?}");
            assert_eq!(
                r.digest.as_ref().map(|d| d.to_string()),
                digest,
                "{input:?}"
            );
            // The normalized form is a fixed point.
            let again =
                Reference::parse(&normalized).unwrap_or_else(|e| panic!("{normalized:?}: {e}"));
            assert_eq!(again, r, "{normalized:?}");
        }
    }

    #[test]
    fn invalid_references_are_refused() {
        use ReferenceError as E;
        let is_format = |e: &E| matches!(e, E::Format { .. });
        let is_registry = |e: &E| matches!(e, E::Registry { .. });
        let is_tag = |e: &E| matches!(e, E::Tag { .. });
        let is_upper = |e: &E| matches!(e, E::Uppercase(_));
        let is_long = |e: &E| matches!(e, E::NameTooLong(_));
        let is_id = |e: &E| matches!(e, E::IdentifierAsName(_));
        let is_empty = |e: &E| matches!(e, E::Empty);
        let is_dfmt = |e: &E| {
            matches!(
                e,
                E::Digest {
                    source: DigestError::Format(_),
                    ..
                }
            )
        };
        let is_dalg = |e: &E| {
            matches!(
                e,
                E::Digest {
                    source: DigestError::Algorithm(_),
                    ..
                }
            )
        };
        let is_denc = |e: &E| {
            matches!(
                e,
                E::Digest {
                    source: DigestError::Encoding(_),
                    ..
                }
            )
        };
        type Check = fn(&ReferenceError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            (String::new(), is_empty),
            (":justtag".into(), is_format),
            (format!("@{SHA256_F}"), is_format),
            ("busybox@".into(), is_format),
            ("repo@sha256:ffffffffffffffffffffffffffffffffff".into(), is_denc),
            (format!("repo@{}", SHA256_F.to_uppercase().replace("SHA256", "sha256")), is_denc),
            (format!("repo@sha512:{}", "f".repeat(64)), is_denc),
            ("validname@invaliddigest:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff".into(), is_dalg),
            (format!("repo@sha384:{}", "f".repeat(96)), is_dalg),
            ("repo@sha256".into(), is_dfmt),
            (format!("repo@{SHA256_F}@{SHA256_F}"), is_denc),
            ("Uppercase:tag".into(), is_upper),
            ("Busybox".into(), is_upper),
            ("test:5000/Uppercase/lowercase:tag".into(), is_upper),
            ("docker.io/Library/busybox".into(), is_upper),
            ("aa/asdf$$^/aa".into(), is_format),
            ("a/".repeat(128) + "a:tag", is_long),
            (format!("docker.io/{}", "a".repeat(256)), is_long),
            ("ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff".into(), is_id),
            // Hosts: no underscore, no empty port, no zone, no leading or trailing dash.
            ("foo_bar.com:8080/x".into(), is_registry),
            ("test:/x".into(), is_registry),
            ("test:50a0/x".into(), is_registry),
            ("-test.com/x".into(), is_registry),
            ("test-.com/x".into(), is_registry),
            ("test..com/x".into(), is_registry),
            ("http://test.com/x".into(), is_registry),
            ("[fe80::1%eth0]:5000/repo".into(), is_registry),
            // The first '@' starts the digest, as in distribution's grammar.
            ("[fe80::1%@invalidzone]:5000/repo".into(), is_dalg),
            ("[]:5000/repo".into(), is_registry),
            ("[::1]x/repo".into(), is_registry),
            (format!("{}.com/x", "a".repeat(252)), is_registry),
            // A lone bracketed address is a (bad) Docker Hub name, as in distribution.
            ("[2001:db8::1]".into(), is_format),
            ("[2001:db8::1]:5000".into(), is_format),
            ("[2001:db8::1]:tag".into(), is_format),
            // Path components.
            ("foo..bar".into(), is_format),
            ("foo-".into(), is_format),
            ("-foo".into(), is_format),
            (".foo".into(), is_format),
            ("foo___bar".into(), is_format),
            ("foo._bar".into(), is_format),
            ("foo/".into(), is_format),
            ("/foo".into(), is_format),
            ("foo//bar".into(), is_format),
            ("docker.io/".into(), is_format),
            ("localhost:5000/".into(), is_format),
            ("fo o".into(), is_format),
            ("foo\0bar".into(), is_format),
            ("föö".into(), is_format),
            // Tags.
            ("foo:".into(), is_tag),
            ("foo:-tag".into(), is_tag),
            ("foo:.tag".into(), is_tag),
            ("foo:t@g".into(), is_dfmt),
            ("foo:ta/g".into(), is_registry),
            ("foo:t+g".into(), is_tag),
            (format!("foo:{}", "t".repeat(129)), is_tag),
        ];
        for (input, check) in cases {
            match Reference::parse(&input) {
                Ok(r) => panic!("{input:?} parsed as {r}"),
                Err(e) => {
                    assert!(check(&e), "{input:?}: unexpected error {e:?}");
                    // Every message names what was refused.
                    if !input.is_empty() {
                        assert!(e.to_string().contains(&format!("{input:?}")), "{e}");
                    }
                }
            }
        }
    }

    #[test]
    fn endpoint_host_maps_docker_hub_only() {
        let host = |s: &str| Reference::parse(s).map(|r| r.endpoint_host().to_owned());
        assert_eq!(host("busybox").as_deref(), Ok("registry-1.docker.io"));
        assert_eq!(
            host("index.docker.io/x/y").as_deref(),
            Ok("registry-1.docker.io")
        );
        assert_eq!(host("127.0.0.1:5000/a").as_deref(), Ok("127.0.0.1:5000"));
        assert_eq!(
            host("registry.k8s.io/pause").as_deref(),
            Ok("registry.k8s.io")
        );
    }

    #[test]
    fn name_and_manifest_reference() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.name(), "docker.io/library/busybox");
        assert_eq!(r.manifest_reference(), "latest");
        let r = Reference::parse(&format!("busybox:1.36@{SHA256_A}")).unwrap();
        assert_eq!(r.manifest_reference(), SHA256_A);
    }

    #[test]
    fn digests() {
        let d = Digest::parse(SHA256_A).unwrap();
        assert_eq!(d.algorithm(), DigestAlgorithm::Sha256);
        assert_eq!(d.hex(), &SHA256_A[7..]);
        assert_eq!(d.to_string(), SHA256_A);
        assert_eq!(SHA256_A.parse::<Digest>(), Ok(d.clone()));
        let d512 = Digest::parse(&sha512_f()).unwrap();
        assert_eq!(d512.algorithm(), DigestAlgorithm::Sha512);
        assert_eq!(d512.hex().len(), 128);
        assert_eq!(
            Digest::from_sha256([0xab; 32]).to_string(),
            format!("sha256:{}", "ab".repeat(32))
        );
        assert_eq!(
            Digest::from_sha512([0x01; 64]).to_string(),
            format!("sha512:{}", "01".repeat(64))
        );

        for bad in [
            "",
            ":",
            "sha256",
            "sha256:",
            ":abc",
            "SHA256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "sha256:fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "sha256:fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "sha256:Ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "sha256:gfffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff f",
            "sha256+b64:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha512:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
