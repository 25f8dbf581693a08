//! The OCI distribution client: fetches manifests and blobs from registries.
//!
//! Owns the HTTP side of a pull and nothing else: connections (hyper 1 + rustls, HTTP/1.1),
//! the choice of endpoint (mirrors in order, then the upstream), TLS trust (system roots plus
//! a per-host CA file), plain HTTP for insecure hosts only, authentication (anonymous, Basic,
//! and the Bearer token flow, with tokens cached per host, repository and user), redirects,
//! and the mapping of every failure to a [`RegistryError`] that names the image and the host.
//!
//! It does not parse image references (the caller hands over host, repository and tag or
//! digest), choose platforms, unpack, or write to disk: a blob comes back as a
//! [`BlobStream`] and the caller feeds it to the content store, which verifies the digest.
//! Manifests are small, so [`RegistryClient::resolve`] returns them whole, capped at
//! [`MAX_MANIFEST_SIZE`] and checked against the digest they were fetched by.
//!
//! Schemes: a mirror URL with an explicit scheme is used as written. Otherwise HTTPS is
//! tried; for an insecure host (configured so, or any loopback host unless configured
//! `insecure: false`) a connection or TLS failure falls back to plain HTTP, as Docker and
//! containerd do, and the working scheme is remembered per host.
//!
//! Credentials: those passed with a call (the CRI PullImage auth) and the configured ones of
//! the image's registry go to that registry only; a mirror gets only the credentials
//! configured for the mirror's own host. `Authorization` is never sent to a host a redirect
//! points at (blob storage).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures::Stream;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use super::content::Algorithm;
use super::reference::Digest;

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// The manifest media types a pull can use, in the order they are offered.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST,
];

/// Larger manifests are refused: real ones are a few KiB, and the whole body is held in
/// memory (the same cap containerd applies).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// How much of an error response is read to quote the registry's own message.
const MAX_ERROR_BODY: usize = 64 << 10;
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// A username and password, for Basic auth or to obtain a Bearer token.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Settings for one registry host (a key of `registries:` in the daemon config).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Base URLs tried in order before the upstream, e.g. `http://127.0.0.1:5000`.
    pub mirrors: Vec<String>,
    /// Plain HTTP allowed. `None`: only for loopback hosts (127.0.0.0/8, ::1, localhost).
    pub insecure: Option<bool>,
    /// PEM file of extra CA certificates trusted for this host, on top of the system roots.
    pub ca_file: Option<PathBuf>,
    pub auth: Option<Credentials>,
}

/// The client's configuration: per-host settings, keyed by `host` or `host:port` as they
/// appear in image references (`docker.io`, `127.0.0.1:5000`).
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    pub hosts: HashMap<String, HostConfig>,
    /// TCP connect and TLS handshake, per attempt.
    pub connect_timeout: Duration,
    /// Longest wait for response headers, and for each piece of a body.
    pub read_timeout: Duration,
    pub max_redirects: usize,
    pub user_agent: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            hosts: HashMap::new(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            max_redirects: 10,
            user_agent: concat!("corral/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl RegistryConfig {
    /// The settings for `host` (`host:port` first, then the bare host name).
    pub fn host(&self, host: &str) -> Option<&HostConfig> {
        self.hosts
            .get(host)
            .or_else(|| self.hosts.get(strip_port(host)))
    }

    /// Whether plain HTTP may be used with `host`.
    pub fn is_insecure(&self, host: &str) -> bool {
        match self.host(host).and_then(|h| h.insecure) {
            Some(insecure) => insecure,
            None => is_loopback(host),
        }
    }
}

/// Every way a registry operation fails. `image` is the `host/repository:tag` or
/// `host/repository@digest` the caller asked for; `host` is the server that failed, which
/// can be a mirror, a token server or a storage host a redirect pointed at.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{image}: access denied by {host} (HTTP {status}){detail}")]
    Unauthorized {
        image: String,
        host: String,
        status: u16,
        detail: String,
    },
    #[error("{image}: not found on {host}{detail}")]
    NotFound {
        image: String,
        host: String,
        detail: String,
    },
    #[error("{image}: registry {host} failed with HTTP {status}{detail}")]
    Server {
        image: String,
        host: String,
        status: u16,
        detail: String,
    },
    #[error("{image}: unexpected HTTP {status} from {host}{detail}")]
    UnexpectedStatus {
        image: String,
        host: String,
        status: u16,
        detail: String,
    },
    #[error("{image}: cannot connect to {host}: {detail}")]
    Connect {
        image: String,
        host: String,
        detail: String,
    },
    #[error("{image}: TLS failure with {host}: {detail}")]
    Tls {
        image: String,
        host: String,
        detail: String,
    },
    #[error("{image}: HTTP failure with {host}: {detail}")]
    Http {
        image: String,
        host: String,
        detail: String,
    },
    #[error("{image}: {host} closed the connection after {received} bytes of the body: {detail}")]
    Interrupted {
        image: String,
        host: String,
        received: u64,
        detail: String,
    },
    #[error("{image}: {host} ended the blob at byte {received}, {expected} expected")]
    Truncated {
        image: String,
        host: String,
        expected: u64,
        received: u64,
    },
    #[error("{image}: {host} sent a blob larger than its declared {expected} bytes (at least {received})")]
    SizeExceeded {
        image: String,
        host: String,
        expected: u64,
        received: u64,
    },
    #[error("{image}: no answer from {host} within {after:?}")]
    Timeout {
        image: String,
        host: String,
        after: Duration,
    },
    #[error("{image}: manifest from {host} exceeds {limit} bytes")]
    ManifestTooLarge {
        image: String,
        host: String,
        limit: usize,
    },
    #[error("{image}: digest mismatch from {host}: expected {expected}, got {actual}")]
    DigestMismatch {
        image: String,
        host: String,
        expected: String,
        actual: String,
    },
    #[error("{image}: {host} answered with unsupported manifest media type {media_type:?}")]
    UnsupportedMediaType {
        image: String,
        host: String,
        media_type: String,
    },
    #[error("{image}: more than {limit} redirects from {host}")]
    TooManyRedirects {
        image: String,
        host: String,
        limit: usize,
    },
    #[error("{image}: {host} redirected to {location}, refused: {reason}")]
    BadRedirect {
        image: String,
        host: String,
        location: String,
        reason: &'static str,
    },
    #[error("{image}: invalid response from {host}: {detail}")]
    BadResponse {
        image: String,
        host: String,
        detail: String,
    },
    #[error("{image}: {host} cannot serve the blob from byte {offset} (HTTP 416)")]
    RangeNotSatisfiable {
        image: String,
        host: String,
        offset: u64,
    },
    #[error("invalid {what}: {value:?}")]
    InvalidArgument { what: &'static str, value: String },
    #[error("registry configuration: {0}")]
    Config(String),
}

impl RegistryError {
    /// The host the failure came from, where there is one.
    pub fn host(&self) -> Option<&str> {
        use RegistryError::*;
        match self {
            Unauthorized { host, .. }
            | NotFound { host, .. }
            | Server { host, .. }
            | UnexpectedStatus { host, .. }
            | Connect { host, .. }
            | Tls { host, .. }
            | Http { host, .. }
            | Interrupted { host, .. }
            | Truncated { host, .. }
            | SizeExceeded { host, .. }
            | Timeout { host, .. }
            | ManifestTooLarge { host, .. }
            | DigestMismatch { host, .. }
            | UnsupportedMediaType { host, .. }
            | TooManyRedirects { host, .. }
            | BadRedirect { host, .. }
            | BadResponse { host, .. }
            | RangeNotSatisfiable { host, .. } => Some(host),
            InvalidArgument { .. } | Config(_) => None,
        }
    }

    /// A failure of the connection rather than an answer: worth retrying later, or with
    /// another endpoint.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Connect { .. }
                | RegistryError::Http { .. }
                | RegistryError::Interrupted { .. }
                | RegistryError::Timeout { .. }
                | RegistryError::Server { .. }
        )
    }
}

/// A manifest (or index) as the registry served it.
#[derive(Clone, Debug)]
pub struct ResolvedManifest {
    /// The digest of `bytes`: verified against the requested digest, or computed for a tag.
    pub digest: Digest,
    /// One of [`MANIFEST_MEDIA_TYPES`].
    pub media_type: String,
    pub bytes: Bytes,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The OCI distribution client. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: RegistryConfig,
    /// One connection pool per set of trusted roots: the system roots alone, and the
    /// system roots plus each configured CA file.
    clients: HashMap<PathBuf, HttpClient>,
    default_client: HttpClient,
    auth: Mutex<AuthCache>,
    /// Insecure hosts found to speak plain HTTP, so HTTPS is not tried on each request.
    plain_http: Mutex<HashMap<String, ()>>,
}

#[derive(Default)]
struct AuthCache {
    /// Hosts that asked for Basic auth: later requests send it without waiting for a 401.
    basic: HashMap<String, ()>,
    /// Bearer tokens by (host, repository, user).
    tokens: HashMap<String, CachedToken>,
}

struct CachedToken {
    header: HeaderValue,
    expires: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// One place to try: a mirror or the upstream.
#[derive(Clone, Debug)]
struct Endpoint {
    /// Given by a mirror URL; otherwise chosen per request (HTTPS, or HTTP fallback).
    scheme: Option<Scheme>,
    authority: String,
    /// Path before `/v2`, from a mirror URL such as `https://mirror.example/prefix`.
    prefix: String,
    insecure: bool,
    is_mirror: bool,
    config_creds: Option<Credentials>,
}

/// What one operation is about, for error messages and auth.
struct Ctx<'a> {
    image: String,
    repository: &'a str,
    creds: Option<&'a Credentials>,
}

impl RegistryClient {
    /// Builds the client, loading the system roots and every configured CA file (a missing
    /// or empty CA file is an error now rather than a TLS failure at the first pull).
    pub fn new(config: RegistryConfig) -> Result<RegistryClient, RegistryError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let native = rustls_native_certs::load_native_certs();
        if !native.errors.is_empty() {
            tracing::debug!(errors = ?native.errors, "some system CA certificates were not loaded");
        }
        let mut system = rustls::RootCertStore::empty();
        let (added, ignored) = system.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "system CA certificates");

        let default_client = build_client(&config, &provider, system.clone())?;
        let mut clients = HashMap::new();
        for (host, hc) in &config.hosts {
            let Some(ca) = &hc.ca_file else { continue };
            if clients.contains_key(ca) {
                continue;
            }
            let mut roots = system.clone();
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| {
                    RegistryError::Config(format!("ca_file {} of {host}: {e}", ca.display()))
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    RegistryError::Config(format!("ca_file {} of {host}: {e}", ca.display()))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(RegistryError::Config(format!(
                    "ca_file {} of {host} holds no usable certificate",
                    ca.display()
                )));
            }
            clients.insert(ca.clone(), build_client(&config, &provider, roots)?);
        }
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                config,
                clients,
                default_client,
                auth: Mutex::new(AuthCache::default()),
                plain_http: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// Fetches the manifest or index that `reference` (a tag or a digest) names.
    ///
    /// Mirrors are tried first, in order; any failure of a mirror (down, 404, 401, a bad
    /// answer) moves on to the next, and the upstream's answer is final.
    pub async fn resolve(
        &self,
        host: &str,
        repository: &str,
        reference: &str,
        creds: Option<&Credentials>,
    ) -> Result<ResolvedManifest, RegistryError> {
        validate_host(host)?;
        validate_repository(repository)?;
        let by_digest = if reference.contains(':') {
            Some(
                Digest::parse(reference).map_err(|_| RegistryError::InvalidArgument {
                    what: "digest",
                    value: reference.to_string(),
                })?,
            )
        } else {
            validate_tag(reference)?;
            None
        };
        let sep = if by_digest.is_some() { '@' } else { ':' };
        let ctx = Ctx {
            image: format!("{host}/{repository}{sep}{reference}"),
            repository,
            creds,
        };
        let path = format!("/v2/{repository}/manifests/{reference}");
        let endpoints = self.endpoints(host)?;
        let mut last = None;
        for ep in &endpoints {
            match self
                .fetch_manifest(ep, &ctx, &path, by_digest.as_ref())
                .await
            {
                Ok(m) => return Ok(m),
                Err(e) if ep.is_mirror => {
                    tracing::warn!(mirror = %ep.authority, error = %e, "mirror failed, trying the next endpoint");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config(format!("no endpoint for {host}"))))
    }

    /// Starts fetching a blob at byte `offset` (0 for all of it; more to resume into an
    /// existing ingest). The stream yields the bytes from `offset` on, whether or not the
    /// server honoured the Range header.
    ///
    /// The stream does not hash (the content store does, once); call
    /// [`BlobStream::expect_size`] with the descriptor's size so that a blob that grows past
    /// it, or ends short of it, fails at once.
    pub async fn fetch_blob(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
        creds: Option<&Credentials>,
    ) -> Result<BlobStream, RegistryError> {
        validate_host(host)?;
        validate_repository(repository)?;
        let ctx = Ctx {
            image: format!("{host}/{repository}@{digest}"),
            repository,
            creds,
        };
        let path = format!("/v2/{repository}/blobs/{digest}");
        let endpoints = self.endpoints(host)?;
        let mut last = None;
        for ep in &endpoints {
            match self.open_blob(ep, &ctx, &path, offset).await {
                Ok(s) => return Ok(s),
                Err(e) if ep.is_mirror => {
                    tracing::warn!(mirror = %ep.authority, error = %e, "mirror failed, trying the next endpoint");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config(format!("no endpoint for {host}"))))
    }

    fn endpoints(&self, host: &str) -> Result<Vec<Endpoint>, RegistryError> {
        let config = &self.inner.config;
        let mut out = Vec::new();
        for mirror in config
            .host(host)
            .map(|h| h.mirrors.as_slice())
            .unwrap_or(&[])
        {
            out.push(self.mirror_endpoint(mirror)?);
        }
        let hc = config.host(host);
        out.push(Endpoint {
            scheme: None,
            // Docker Hub's registry API is not served on the name images use.
            authority: match host {
                "docker.io" | "index.docker.io" => "registry-1.docker.io".to_string(),
                other => other.to_string(),
            },
            prefix: String::new(),
            insecure: config.is_insecure(host),
            is_mirror: false,
            config_creds: hc.and_then(|h| h.auth.clone()),
        });
        Ok(out)
    }

    fn mirror_endpoint(&self, url: &str) -> Result<Endpoint, RegistryError> {
        let bad = || RegistryError::Config(format!("invalid mirror URL {url:?}"));
        let (scheme, rest) = match url.split_once("://") {
            Some(("http", rest)) => (Some(Scheme::Http), rest),
            Some(("https", rest)) => (Some(Scheme::Https), rest),
            Some(_) => return Err(bad()),
            None => (None, url),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || validate_host(authority).is_err() {
            return Err(bad());
        }
        let path = path.trim_end_matches('/');
        let prefix = path.strip_suffix("/v2").unwrap_or(path).to_string();
        let config = &self.inner.config;
        let hc = config.host(authority);
        Ok(Endpoint {
            scheme,
            authority: authority.to_string(),
            prefix,
            insecure: config.is_insecure(authority),
            is_mirror: true,
            config_creds: hc.and_then(|h| h.auth.clone()),
        })
    }

    /// The connection pool whose roots apply to `host` (a registry, mirror or token
    /// server); a redirect keeps the pool of the request that was redirected.
    fn client_for(&self, host: &str) -> &HttpClient {
        self.inner
            .config
            .host(host)
            .and_then(|h| h.ca_file.as_ref())
            .and_then(|ca| self.inner.clients.get(ca))
            .unwrap_or(&self.inner.default_client)
    }

    async fn fetch_manifest(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        path: &str,
        by_digest: Option<&Digest>,
    ) -> Result<ResolvedManifest, RegistryError> {
        let accept = MANIFEST_MEDIA_TYPES.join(", ");
        let resp = self.get(ep, ctx, path, Some(&accept), 0).await?;
        let host = ep.authority.clone();
        if !resp.status().is_success() {
            return Err(self.status_error(ctx, &host, resp).await);
        }
        let too_large = || RegistryError::ManifestTooLarge {
            image: ctx.image.clone(),
            host: host.clone(),
            limit: MAX_MANIFEST_SIZE,
        };
        if content_length(resp.headers()).is_some_and(|n| n > MAX_MANIFEST_SIZE as u64) {
            return Err(too_large());
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = match self
            .read_limited(resp.into_body(), MAX_MANIFEST_SIZE, ctx, &host)
            .await?
        {
            Some(b) => b,
            None => return Err(too_large()),
        };

        let algorithm = match by_digest {
            Some(d) => Algorithm::of(d).map_err(|_| RegistryError::InvalidArgument {
                what: "digest algorithm",
                value: d.to_string(),
            })?,
            None => Algorithm::Sha256,
        };
        let mut hasher = algorithm.hasher();
        hasher.update(&bytes);
        let actual = hasher.finish();
        let mismatch = |expected: String| RegistryError::DigestMismatch {
            image: ctx.image.clone(),
            host: host.clone(),
            expected,
            actual: actual.clone(),
        };
        if let Some(expected) = by_digest {
            if expected.to_string() != actual {
                return Err(mismatch(expected.to_string()));
            }
        } else if let Some(claimed) = header_digest {
            // Only comparable when the registry used the same algorithm.
            if claimed.starts_with("sha256:") && claimed != actual {
                return Err(mismatch(claimed));
            }
        }
        let digest = Digest::parse(&actual).map_err(|_| RegistryError::BadResponse {
            image: ctx.image.clone(),
            host: host.clone(),
            detail: format!("computed digest {actual} does not parse"),
        })?;
        let media_type = manifest_media_type(&content_type, &bytes).ok_or_else(|| {
            RegistryError::UnsupportedMediaType {
                image: ctx.image.clone(),
                host: host.clone(),
                media_type: content_type.clone(),
            }
        })?;
        Ok(ResolvedManifest {
            digest,
            media_type,
            bytes,
        })
    }

    async fn open_blob(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        path: &str,
        offset: u64,
    ) -> Result<BlobStream, RegistryError> {
        let resp = self.get(ep, ctx, path, None, offset).await?;
        let host = ep.authority.clone();
        let status = resp.status();
        let bad = |detail: String| RegistryError::BadResponse {
            image: ctx.image.clone(),
            host: host.clone(),
            detail,
        };
        let (skip, total) = match status {
            StatusCode::OK => {
                // No (or an ignored) Range: the body starts at byte 0.
                let total = content_length(resp.headers());
                (offset, total)
            }
            StatusCode::PARTIAL_CONTENT => {
                let range = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| bad("206 without Content-Range".to_string()))?;
                let (start, total) = parse_content_range(range)
                    .ok_or_else(|| bad(format!("invalid Content-Range {range:?}")))?;
                if start != offset {
                    return Err(bad(format!(
                        "asked for bytes from {offset}, got Content-Range {range:?}"
                    )));
                }
                (0, total)
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(RegistryError::RangeNotSatisfiable {
                    image: ctx.image.clone(),
                    host,
                    offset,
                })
            }
            _ => return Err(self.status_error(ctx, &host, resp).await),
        };
        let idle = self.inner.config.read_timeout;
        Ok(BlobStream {
            body: resp.into_body(),
            skip,
            offset,
            received: 0,
            size: None,
            total,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            image: ctx.image.clone(),
            host,
            done: false,
        })
    }

    /// A GET against one endpoint, with scheme choice, auth and redirects.
    async fn get(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        path: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<Response<Incoming>, RegistryError> {
        let schemes: &[Scheme] = match ep.scheme {
            Some(Scheme::Http) => &[Scheme::Http],
            Some(Scheme::Https) => &[Scheme::Https],
            None if !ep.insecure => &[Scheme::Https],
            None if self.lock_plain_http().contains_key(&ep.authority) => &[Scheme::Http],
            None => &[Scheme::Https, Scheme::Http],
        };
        let mut first_err = None;
        for (i, &scheme) in schemes.iter().enumerate() {
            match self
                .get_authorized(ep, scheme, ctx, path, accept, range_from)
                .await
            {
                Ok(resp) => {
                    if i > 0 {
                        self.lock_plain_http().insert(ep.authority.clone(), ());
                    }
                    return Ok(resp);
                }
                Err(Failure::Connect(e)) if i + 1 < schemes.len() => {
                    tracing::debug!(host = %ep.authority, error = %e, "HTTPS failed, trying plain HTTP");
                    first_err = Some(e);
                }
                Err(Failure::Connect(e)) => {
                    // A TLS error says more than "plain HTTP did not work either".
                    return Err(match first_err {
                        Some(tls @ RegistryError::Tls { .. }) => tls,
                        _ => e,
                    });
                }
                Err(Failure::Other(e)) => return Err(e),
            }
        }
        Err(first_err.unwrap_or_else(|| RegistryError::Config("no scheme to try".to_string())))
    }

    async fn get_authorized(
        &self,
        ep: &Endpoint,
        scheme: Scheme,
        ctx: &Ctx<'_>,
        path: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<Response<Incoming>, Failure> {
        let url = format!(
            "{}://{}{}{}",
            scheme.as_str(),
            ep.authority,
            ep.prefix,
            path
        );
        let creds = if ep.is_mirror {
            ep.config_creds.as_ref()
        } else {
            ctx.creds.or(ep.config_creds.as_ref())
        };
        let cache_key = token_key(&ep.authority, ctx.repository, creds);
        let mut retried = false;
        loop {
            let authorization = self.cached_authorization(&ep.authority, &cache_key, creds);
            let resp = self
                .send(
                    &url,
                    &ep.authority,
                    ctx,
                    accept,
                    range_from,
                    authorization.as_ref(),
                )
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(resp);
            }
            retried = true;
            let challenges: Vec<String> = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect();
            let learned = self
                .authenticate(ep, ctx, &challenges, creds, &cache_key)
                .await
                .map_err(Failure::Other)?;
            if !learned {
                return Ok(resp);
            }
        }
    }

    fn lock_plain_http(&self) -> std::sync::MutexGuard<'_, HashMap<String, ()>> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.inner
            .plain_http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, AuthCache> {
        self.inner.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached_authorization(
        &self,
        authority: &str,
        key: &str,
        creds: Option<&Credentials>,
    ) -> Option<HeaderValue> {
        let mut cache = self.lock_auth();
        if let Some(t) = cache.tokens.get(key) {
            if t.expires > Instant::now() {
                return Some(t.header.clone());
            }
            cache.tokens.remove(key);
        }
        if cache.basic.contains_key(authority) {
            return creds.and_then(basic_header);
        }
        None
    }

    /// Answers a 401. `Ok(true)` when there is something new to retry with.
    async fn authenticate(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        challenges: &[String],
        creds: Option<&Credentials>,
        cache_key: &str,
    ) -> Result<bool, RegistryError> {
        let parsed: Vec<Challenge> = challenges
            .iter()
            .filter_map(|c| parse_challenge(c))
            .collect();
        if let Some(bearer) = parsed.iter().find(|c| c.scheme == "bearer") {
            let token = self.fetch_token(ep, ctx, bearer, creds).await?;
            self.lock_auth().tokens.insert(cache_key.to_string(), token);
            return Ok(true);
        }
        if parsed.iter().any(|c| c.scheme == "basic") {
            let mut cache = self.lock_auth();
            if creds.is_none() || cache.basic.contains_key(&ep.authority) {
                // Nothing to offer, or the credentials were just refused.
                return Ok(false);
            }
            cache.basic.insert(ep.authority.clone(), ());
            return Ok(true);
        }
        Ok(false)
    }

    /// The token flow of the distribution spec: GET the realm with service and scope, with
    /// Basic credentials when there are any (anonymous tokens otherwise).
    async fn fetch_token(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        challenge: &Challenge,
        creds: Option<&Credentials>,
    ) -> Result<CachedToken, RegistryError> {
        let realm = challenge.param("realm").unwrap_or_default();
        let realm_uri: Uri = realm.parse().map_err(|_| RegistryError::BadResponse {
            image: ctx.image.clone(),
            host: ep.authority.clone(),
            detail: format!("Bearer challenge with invalid realm {realm:?}"),
        })?;
        let realm_host = realm_uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let bad = |detail: String| RegistryError::BadResponse {
            image: ctx.image.clone(),
            host: realm_host.clone(),
            detail,
        };
        match realm_uri.scheme_str() {
            Some("https") => {}
            Some("http") if self.inner.config.is_insecure(&realm_host) || ep.insecure => {}
            _ => return Err(bad(format!("token realm {realm:?} is not an allowed URL"))),
        }
        let mut query = Vec::new();
        if let Some(service) = challenge.param("service") {
            query.push(format!("service={}", query_escape(service)));
        }
        let scope = challenge
            .param("scope")
            .map(str::to_string)
            .unwrap_or_else(|| format!("repository:{}:pull", ctx.repository));
        query.push(format!("scope={}", query_escape(&scope)));
        let sep = if realm.contains('?') { '&' } else { '?' };
        let url = format!("{realm}{sep}{}", query.join("&"));
        let authorization = creds.and_then(basic_header);
        // The registry's trust settings apply: a private registry's token server is
        // usually signed by the same private CA.
        let resp = self
            .send(&url, &ep.authority, ctx, None, 0, authorization.as_ref())
            .await
            .map_err(Failure::into_error)?;
        if !resp.status().is_success() {
            return Err(self.status_error(ctx, &realm_host, resp).await);
        }
        let body = self
            .read_limited(resp.into_body(), MAX_TOKEN_RESPONSE, ctx, &realm_host)
            .await?
            .ok_or_else(|| bad("token response too large".to_string()))?;
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| bad(format!("token response: {e}")))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("token response without a token".to_string()))?;
        let header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| bad("token is not a valid header value".to_string()))?;
        // The spec's default lifetime is 60 s; stop using a token a little before it ends
        // rather than racing its expiry.
        let lifetime = parsed.expires_in.unwrap_or(60).clamp(60, 24 * 3600);
        Ok(CachedToken {
            header,
            expires: Instant::now() + Duration::from_secs(lifetime - 10),
        })
    }

    /// One GET with redirects followed. `Authorization` goes only to the origin.
    /// `pool_host` is the configured host whose trusted roots (CA file) apply.
    async fn send(
        &self,
        url: &str,
        pool_host: &str,
        ctx: &Ctx<'_>,
        accept: Option<&str>,
        range_from: u64,
        authorization: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, Failure> {
        let config = &self.inner.config;
        let mut uri: Uri = url.parse().map_err(|_| {
            Failure::Other(RegistryError::InvalidArgument {
                what: "URL",
                value: url.to_string(),
            })
        })?;
        let origin = (
            uri.scheme_str().map(str::to_string),
            uri.authority().cloned(),
        );
        let client = self.client_for(pool_host);
        let mut hops = 0;
        loop {
            let host = uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| pool_host.to_string());
            let same_origin = (
                uri.scheme_str().map(str::to_string),
                uri.authority().cloned(),
            ) == origin;
            let mut req = Request::builder()
                .method(Method::GET)
                .uri(uri.clone())
                .header(header::USER_AGENT, config.user_agent.as_str());
            if let Some(accept) = accept {
                req = req.header(header::ACCEPT, accept);
            }
            if range_from > 0 {
                req = req.header(header::RANGE, format!("bytes={range_from}-"));
            }
            if let (true, Some(a)) = (same_origin, authorization) {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            let req = req.body(Empty::new()).map_err(|e| {
                Failure::Other(RegistryError::InvalidArgument {
                    what: "request",
                    value: e.to_string(),
                })
            })?;
            tracing::debug!(%uri, "GET");
            let resp = match tokio::time::timeout(config.read_timeout, client.request(req)).await {
                Err(_) => {
                    return Err(Failure::Other(RegistryError::Timeout {
                        image: ctx.image.clone(),
                        host,
                        after: config.read_timeout,
                    }))
                }
                Ok(Err(e)) => return Err(classify(e, &ctx.image, &host)),
                Ok(Ok(resp)) => resp,
            };
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            hops += 1;
            if hops > config.max_redirects {
                return Err(Failure::Other(RegistryError::TooManyRedirects {
                    image: ctx.image.clone(),
                    host,
                    limit: config.max_redirects,
                }));
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let refuse = |reason| {
                Failure::Other(RegistryError::BadRedirect {
                    image: ctx.image.clone(),
                    host: host.clone(),
                    location: location.clone(),
                    reason,
                })
            };
            let next =
                resolve_location(&uri, &location).ok_or_else(|| refuse("invalid Location"))?;
            if next.scheme_str() == Some("http") {
                let target = next.authority().map(|a| a.to_string()).unwrap_or_default();
                if !config.is_insecure(&target) {
                    return Err(refuse("plain HTTP to a host that is not insecure"));
                }
            }
            uri = next;
        }
    }

    /// Reads at most `limit` bytes of a body; `None` if it is longer.
    async fn read_limited(
        &self,
        mut body: Incoming,
        limit: usize,
        ctx: &Ctx<'_>,
        host: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        let timeout = self.inner.config.read_timeout;
        let mut out = Vec::new();
        loop {
            let frame = match tokio::time::timeout(timeout, body.frame()).await {
                Err(_) => {
                    return Err(RegistryError::Timeout {
                        image: ctx.image.clone(),
                        host: host.to_string(),
                        after: timeout,
                    })
                }
                Ok(None) => return Ok(Some(Bytes::from(out))),
                Ok(Some(Err(e))) => {
                    return Err(RegistryError::Interrupted {
                        image: ctx.image.clone(),
                        host: host.to_string(),
                        received: out.len() as u64,
                        detail: error_chain(&e),
                    })
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    return Ok(None);
                }
                out.extend_from_slice(&data);
            }
        }
    }

    /// Turns an unsuccessful response into an error, quoting the registry's message.
    async fn status_error(
        &self,
        ctx: &Ctx<'_>,
        host: &str,
        resp: Response<Incoming>,
    ) -> RegistryError {
        let status = resp.status();
        let body = self
            .read_limited(resp.into_body(), MAX_ERROR_BODY, ctx, host)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let detail = registry_message(&body)
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let image = ctx.image.clone();
        let host = host.to_string();
        match status.as_u16() {
            401 | 403 => RegistryError::Unauthorized {
                image,
                host,
                status: status.as_u16(),
                detail,
            },
            404 => RegistryError::NotFound {
                image,
                host,
                detail,
            },
            500..=599 => RegistryError::Server {
                image,
                host,
                status: status.as_u16(),
                detail,
            },
            code => RegistryError::UnexpectedStatus {
                image,
                host,
                status: code,
                detail,
            },
        }
    }
}

fn build_client(
    config: &RegistryConfig,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    roots: rustls::RootCertStore,
) -> Result<HttpClient, RegistryError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https))
}

/// A request failure, split by whether another scheme is worth trying.
enum Failure {
    /// No HTTP answer at all: TCP connect or TLS handshake failed.
    Connect(RegistryError),
    Other(RegistryError),
}

impl Failure {
    fn into_error(self) -> RegistryError {
        match self {
            Failure::Connect(e) | Failure::Other(e) => e,
        }
    }
}

impl From<Failure> for RegistryError {
    fn from(f: Failure) -> Self {
        f.into_error()
    }
}

fn classify(e: hyper_util::client::legacy::Error, image: &str, host: &str) -> Failure {
    let detail = error_chain(&e);
    let tls = std::error::Error::source(&e).is_some_and(is_tls_error);
    let image = image.to_string();
    let host = host.to_string();
    if tls {
        Failure::Connect(RegistryError::Tls {
            image,
            host,
            detail,
        })
    } else if e.is_connect() {
        Failure::Connect(RegistryError::Connect {
            image,
            host,
            detail,
        })
    } else {
        Failure::Other(RegistryError::Http {
            image,
            host,
            detail,
        })
    }
}

/// Whether a rustls error is somewhere in the chain. io::Error::source() skips the error it
/// wraps (and the connector nests io::Errors), so wrapped errors are looked into explicitly.
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if is_tls_error(inner) {
            return true;
        }
    }
    e.source().is_some_and(is_tls_error)
}

/// `a: b: c` from an error and its sources, skipping repeats (hyper nests the same text).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// A blob body being received. Yields the bytes from the requested offset on; ends with an
/// error, not a clean end, if the connection drops, the body runs past the declared size,
/// ends short of it, or stalls for longer than the read timeout.
pub struct BlobStream {
    body: Incoming,
    /// Bytes still to drop because the server ignored the Range header.
    skip: u64,
    offset: u64,
    received: u64,
    size: Option<u64>,
    total: Option<u64>,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    image: String,
    host: String,
    done: bool,
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("image", &self.image)
            .field("host", &self.host)
            .field("offset", &self.offset)
            .field("received", &self.received)
            .field("size", &self.size)
            .finish()
    }
}

impl BlobStream {
    /// The byte of the blob the stream starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes yielded so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The blob's full size as the server announced it, if it did.
    pub fn announced_size(&self) -> Option<u64> {
        self.total
    }

    /// The host that is serving the bytes (a mirror or the upstream).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Holds the stream to the descriptor's size: more bytes, or an early end, is an error.
    /// A server that announces a larger blob is refused before any byte is read.
    pub fn expect_size(mut self, size: u64) -> Result<BlobStream, RegistryError> {
        if let Some(total) = self.total {
            if total > size {
                return Err(RegistryError::SizeExceeded {
                    image: self.image.clone(),
                    host: self.host.clone(),
                    expected: size,
                    received: total,
                });
            }
        }
        self.size = Some(size);
        Ok(self)
    }

    /// The next piece of the blob; `None` at a complete end.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, RegistryError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    fn fail(&mut self, e: RegistryError) -> Poll<Option<Result<Bytes, RegistryError>>> {
        self.done = true;
        Poll::Ready(Some(Err(e)))
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let next = tokio::time::Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                    let Ok(mut data) = frame.into_data() else {
                        continue; // trailers
                    };
                    if this.skip > 0 {
                        let n = this.skip.min(data.len() as u64);
                        data.advance(n as usize);
                        this.skip -= n;
                    }
                    if data.is_empty() {
                        continue;
                    }
                    this.received += data.len() as u64;
                    let at = this.offset + this.received;
                    if let Some(size) = this.size {
                        if at > size {
                            let e = RegistryError::SizeExceeded {
                                image: this.image.clone(),
                                host: this.host.clone(),
                                expected: size,
                                received: at,
                            };
                            return this.fail(e);
                        }
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Poll::Ready(Some(Err(e))) => {
                    let e = RegistryError::Interrupted {
                        image: this.image.clone(),
                        host: this.host.clone(),
                        received: this.received,
                        detail: error_chain(&e),
                    };
                    return this.fail(e);
                }
                Poll::Ready(None) => {
                    let at = this.offset + this.received;
                    let expected = this.size.or(this.total);
                    if this.skip > 0 || expected.is_some_and(|s| at < s) {
                        let e = RegistryError::Truncated {
                            image: this.image.clone(),
                            host: this.host.clone(),
                            expected: expected.unwrap_or(this.offset),
                            received: at.saturating_sub(this.skip),
                        };
                        return this.fail(e);
                    }
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        let e = RegistryError::Timeout {
                            image: this.image.clone(),
                            host: this.host.clone(),
                            after: this.idle,
                        };
                        return this.fail(e);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The media type of a manifest: the Content-Type when it is one we accept, else the
/// document's own `mediaType`, else its shape (OCI allows both to be missing).
fn manifest_media_type(content_type: &str, bytes: &[u8]) -> Option<String> {
    if MANIFEST_MEDIA_TYPES.contains(&content_type) {
        return Some(content_type.to_string());
    }
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u64>,
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).ok()?;
    if probe.schema_version != Some(2) {
        return None;
    }
    match probe.media_type {
        Some(mt) => MANIFEST_MEDIA_TYPES.contains(&mt.as_str()).then_some(mt),
        None if probe.manifests.is_some() => Some(MEDIA_TYPE_OCI_INDEX.to_string()),
        None if probe.config.is_some() => Some(MEDIA_TYPE_OCI_MANIFEST.to_string()),
        None => None,
    }
}

/// `code: message` of the first error in a distribution-spec error body.
fn registry_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let parsed: Errors = serde_json::from_slice(body).ok()?;
    let first = parsed.errors.into_iter().next()?;
    match (first.code, first.message) {
        (Some(c), Some(m)) => Some(format!("{c}: {m}")),
        (Some(c), None) => Some(c),
        (None, Some(m)) => Some(m),
        (None, None) => None,
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// `bytes START-END/TOTAL` → (START, TOTAL if known).
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    if location.is_empty() {
        return None;
    }
    let parsed: Uri = location.parse().ok()?;
    if parsed.scheme().is_some() && parsed.authority().is_some() {
        return Some(parsed);
    }
    let scheme = base.scheme_str()?;
    let authority = base.authority()?;
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}").parse().ok();
    }
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}").parse().ok()
}

/// One `WWW-Authenticate` challenge: scheme (lower-cased) and its parameters.
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `Bearer realm="…",service="…",scope="…"` (quoted strings may hold commas and
/// escaped quotes, as multi-scope challenges do).
fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = match value.find(' ') {
        Some(i) => (&value[..i], value[i + 1..].trim()),
        None => (value, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_ascii_lowercase(), val.trim().to_string()));
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

fn token_key(authority: &str, repository: &str, creds: Option<&Credentials>) -> String {
    let user = creds.map(|c| c.username.as_str()).unwrap_or("");
    format!("{authority}\n{repository}\n{user}")
}

fn basic_header(creds: &Credentials) -> Option<HeaderValue> {
    let raw = format!("{}:{}", creds.username, creds.password);
    let mut value =
        HeaderValue::from_str(&format!("Basic {}", base64(raw.as_bytes(), false))).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Base64 with padding (`url_safe`: the URL alphabet without padding, as JWTs use).
pub(crate) fn base64(data: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..4 {
            if i < symbols {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if !url_safe {
                out.push('=');
            }
        }
    }
    out
}

fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:/,".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn is_loopback(host: &str) -> bool {
    let name = strip_port(host);
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn validate_host(host: &str) -> Result<(), RegistryError> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
        && format!("https://{host}/").parse::<Uri>().is_ok();
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidArgument {
            what: "registry host",
            value: host.to_string(),
        })
    }
}

/// Repository names as the distribution spec allows them; anything else would let a
/// caller's string change the URL path.
fn validate_repository(repository: &str) -> Result<(), RegistryError> {
    let ok = !repository.is_empty()
        && repository.len() <= 255
        && repository.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
        });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidArgument {
            what: "repository",
            value: repository.to_string(),
        })
    }
}

fn validate_tag(tag: &str) -> Result<(), RegistryError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && (tag.as_bytes()[0].is_ascii_alphanumeric() || tag.as_bytes()[0] == b'_');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidArgument {
            what: "tag",
            value: tag.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    //! Tests against real `docker-registry` processes (Debian's package) on 127.0.0.1, each
    //! with its own port and storage directory, plus small in-test HTTP servers for the
    //! hostile cases. The fixtures here (registry process, push helper, image builder) are
    //! meant to move to e2e/ once more than this module needs them.
    //!
    //! Needs Debian's `docker-registry`, `apache2-utils` (htpasswd) and `openssl` installed.

    use super::super::content::{ContentError, ContentStore};
    use super::super::testing::*;
    use super::*;
    use std::io::Write as _;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // ---------------------------------------------------------------- helpers

    fn test_config(hosts: Vec<(String, HostConfig)>) -> RegistryConfig {
        RegistryConfig {
            hosts: hosts.into_iter().collect(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            ..RegistryConfig::default()
        }
    }

    fn creds(u: &str, p: &str) -> Credentials {
        Credentials {
            username: u.to_string(),
            password: p.to_string(),
        }
    }

    // ---------------------------------------------------------------- image builder

    fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, *data).expect("tar entry");
        }
        b.into_inner().expect("tar")
    }

    struct TestImage {
        layer: Vec<u8>,
        layer_digest: Digest,
        config: Vec<u8>,
        manifest: Vec<u8>,
        manifest_digest: Digest,
    }

    /// A one-layer image; `docker` picks the Docker v2 schema 2 media types over OCI's.
    fn build_image(files: &[(&str, &[u8])], docker: bool) -> TestImage {
        let layer = layer_tar(files);
        let layer_digest = digest_of(&layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]},
        }))
        .expect("config json");
        let (mt, config_mt, layer_mt) = if docker {
            (
                MEDIA_TYPE_DOCKER_MANIFEST,
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar",
            )
        } else {
            (
                MEDIA_TYPE_OCI_MANIFEST,
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar",
            )
        };
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": config_mt, "digest": digest_of(&config).to_string(), "size": config.len()},
            "layers": [{"mediaType": layer_mt, "digest": layer_digest.to_string(), "size": layer.len()}],
        }))
        .expect("manifest json");
        let manifest_digest = digest_of(&manifest);
        TestImage {
            layer,
            layer_digest,
            config,
            manifest,
            manifest_digest,
        }
    }

    async fn push_image(p: &Pusher, repo: &str, tag: &str, img: &TestImage, docker: bool) {
        p.blob(repo, &img.layer).await;
        p.blob(repo, &img.config).await;
        let mt = if docker {
            MEDIA_TYPE_DOCKER_MANIFEST
        } else {
            MEDIA_TYPE_OCI_MANIFEST
        };
        p.manifest(repo, tag, mt, &img.manifest).await;
    }

    async fn collect(mut s: BlobStream) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        while let Some(chunk) = s.next_chunk().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[derive(Debug)]
    enum PullError {
        Registry(RegistryError),
        Content(ContentError),
    }

    /// The pull path for one blob: resume the ingest, fetch from its offset, stream into the
    /// store, commit.
    async fn pull_blob(
        store: &ContentStore,
        client: &RegistryClient,
        host: &str,
        repo: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<(), PullError> {
        let mut w = match store.writer(&digest.to_string(), digest, Some(size)) {
            Ok(w) => w,
            Err(ContentError::AlreadyExists(_)) => return Ok(()),
            Err(e) => return Err(PullError::Content(e)),
        };
        let mut s = client
            .fetch_blob(host, repo, digest, w.offset(), None)
            .await
            .and_then(|s| s.expect_size(size))
            .map_err(PullError::Registry)?;
        while let Some(chunk) = s.next_chunk().await {
            let chunk = chunk.map_err(PullError::Registry)?;
            w.write(&chunk).map_err(PullError::Content)?;
        }
        w.commit().map_err(PullError::Content)
    }

    // ---------------------------------------------------------------- tiny HTTP server

    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    enum Reply {
        /// A complete response on a kept-alive connection.
        Full {
            status: u16,
            headers: Vec<(String, String)>,
            body: Vec<u8>,
        },
        /// Bytes written as they are, then the connection is closed.
        Raw(Vec<u8>),
        /// Bytes written, then nothing more, with the connection held open.
        Stall(Vec<u8>),
    }

    fn reply(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Reply {
        Reply::Full {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.into(),
        }
    }

    /// An HTTP/1.1 server on 127.0.0.1 that answers with whatever the handler says and
    /// records what it was asked. TLS client hellos (the client's HTTPS attempt on an
    /// insecure host) are answered by closing the connection.
    struct TinyServer {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        connections: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TinyServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TinyServer {
        async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> TinyServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let connections = Arc::new(AtomicUsize::new(0));
            let handler = Arc::new(handler);
            let (seen2, conns2) = (seen.clone(), connections.clone());
            let task = tokio::spawn(async move {
                while let Ok((sock, _)) = listener.accept().await {
                    conns2.fetch_add(1, Ordering::SeqCst);
                    let (handler, seen) = (handler.clone(), seen2.clone());
                    tokio::spawn(async move {
                        let _ = serve_conn(sock, &*handler, &seen).await;
                    });
                }
            });
            TinyServer {
                addr,
                seen,
                connections,
                task,
            }
        }

        fn host(&self) -> String {
            self.addr.to_string()
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("seen").clone()
        }
    }

    async fn serve_conn(
        mut sock: tokio::net::TcpStream,
        handler: &(dyn Fn(&Seen) -> Reply + Send + Sync),
        seen: &Mutex<Vec<Seen>>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if buf.first() == Some(&0x16) {
                    return Ok(()); // a TLS handshake: not spoken here
                }
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = sock.read(&mut chunk).await?;
                if n == 0 || buf.len() > 65536 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            buf.drain(..head_end);
            let mut lines = head.split("\r\n");
            let mut first = lines.next().unwrap_or("").split(' ');
            let req = Seen {
                method: first.next().unwrap_or("").to_string(),
                path: first.next().unwrap_or("").to_string(),
                headers: lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect(),
            };
            seen.lock().expect("seen").push(req.clone());
            match handler(&req) {
                Reply::Full {
                    status,
                    headers,
                    body,
                } => {
                    let mut out =
                        format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                    for (k, v) in headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    sock.write_all(out.as_bytes()).await?;
                    sock.write_all(&body).await?;
                }
                Reply::Raw(bytes) => {
                    sock.write_all(&bytes).await?;
                    sock.shutdown().await?;
                    return Ok(());
                }
                Reply::Stall(bytes) => {
                    sock.write_all(&bytes).await?;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Ok(());
                }
            }
        }
    }

    // ---------------------------------------------------------------- tests: real registry

    #[tokio::test]
    async fn push_then_resolve_by_tag_and_digest() {
        let reg = RegistryProc::start(RegistryOpts::default());
        let pusher = Pusher::new(&reg.url(), None, None);
        let img = build_image(&[("hello.txt", b"hello\n")], false);
        push_image(&pusher, "test/app", "v1", &img, false).await;
        let docker = build_image(&[("docker.txt", b"docker\n")], true);
        push_image(&pusher, "test/app", "docker", &docker, true).await;
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_INDEX,
            "manifests": [{
                "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "digest": img.manifest_digest.to_string(),
                "size": img.manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
            }],
        }))
        .expect("index");
        let index_digest = pusher
            .manifest("test/app", "multi", MEDIA_TYPE_OCI_INDEX, &index)
            .await;

        let client = RegistryClient::new(test_config(vec![])).expect("client");
        let m = client
            .resolve(&reg.host, "test/app", "v1", None)
            .await
            .expect("resolve by tag");
        assert_eq!(m.digest, img.manifest_digest);
        assert_eq!(m.media_type, MEDIA_TYPE_OCI_MANIFEST);
        assert_eq!(&m.bytes[..], &img.manifest[..]);

        let by_digest = client
            .resolve(
                &reg.host,
                "test/app",
                &img.manifest_digest.to_string(),
                None,
            )
            .await
            .expect("resolve by digest");
        assert_eq!(by_digest.digest, img.manifest_digest);
        assert_eq!(&by_digest.bytes[..], &img.manifest[..]);

        let d = client
            .resolve(&reg.host, "test/app", "docker", None)
            .await
            .expect("docker manifest");
        assert_eq!(d.media_type, MEDIA_TYPE_DOCKER_MANIFEST);
        assert_eq!(d.digest, docker.manifest_digest);

        let i = client
            .resolve(&reg.host, "test/app", "multi", None)
            .await
            .expect("index");
        assert_eq!(i.media_type, MEDIA_TYPE_OCI_INDEX);
        assert_eq!(i.digest, index_digest);

        for (repo, reference) in [("test/app", "bad tag"), ("Test/App", "v1"), ("../x", "v1")] {
            assert!(
                matches!(
                    client.resolve(&reg.host, repo, reference, None).await,
                    Err(RegistryError::InvalidArgument { .. })
                ),
                "{repo} {reference}"
            );
        }
    }

    #[tokio::test]
    async fn fetch_blob_whole_resumed_and_into_the_store() {
        let reg = RegistryProc::start(RegistryOpts::default());
        let pusher = Pusher::new(&reg.url(), None, None);
        let big: Vec<u8> = (0..400_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let img = build_image(&[("big.bin", &big)], false);
        push_image(&pusher, "test/big", "v1", &img, false).await;
        let size = img.layer.len() as u64;
        let client = RegistryClient::new(test_config(vec![])).expect("client");

        let whole = client
            .fetch_blob(&reg.host, "test/big", &img.layer_digest, 0, None)
            .await
            .expect("fetch");
        assert_eq!(whole.announced_size(), Some(size));
        let whole = collect(whole.expect_size(size).expect("size"))
            .await
            .expect("body");
        assert_eq!(whole, img.layer);

        let tail = client
            .fetch_blob(&reg.host, "test/big", &img.layer_digest, 100_000, None)
            .await
            .expect("fetch from offset");
        assert_eq!(tail.offset(), 100_000);
        let tail = collect(tail.expect_size(size).expect("size"))
            .await
            .expect("body");
        assert_eq!(&tail[..], &img.layer[100_000..]);

        // An interrupted pull: the first 150 000 bytes reach the store, then everything is
        // dropped. The next pull resumes from the ingest and fetches only the rest.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("store");
        let d = &img.layer_digest;
        {
            let mut w = store.writer(&d.to_string(), d, Some(size)).expect("writer");
            let mut s = client
                .fetch_blob(&reg.host, "test/big", d, 0, None)
                .await
                .expect("fetch");
            while w.offset() < 150_000 {
                let chunk = s.next_chunk().await.expect("more").expect("chunk");
                let room = (150_000 - w.offset()) as usize;
                w.write(&chunk[..chunk.len().min(room)]).expect("write");
            }
        }
        let w = store.writer(&d.to_string(), d, Some(size)).expect("resume");
        assert_eq!(w.offset(), 150_000);
        drop(w);
        pull_blob(&store, &client, &reg.host, "test/big", d, size)
            .await
            .expect("resumed pull");
        assert_eq!(store.read_all(d).expect("read"), img.layer);
        assert!(store.ingests().expect("ingests").is_empty());
        let log = reg.log();
        // The access log shows a 206 carrying only the missing bytes.
        let partial = format!("\" 206 {} ", size - 150_000);
        assert!(log.contains(&partial), "resume used a Range request: {log}");

        // The config blob, whole, through the same path.
        let cd = digest_of(&img.config);
        pull_blob(
            &store,
            &client,
            &reg.host,
            "test/big",
            &cd,
            img.config.len() as u64,
        )
        .await
        .expect("config");
        assert_eq!(store.read_all(&cd).expect("read"), img.config);
    }

    #[tokio::test]
    async fn not_found_names_the_image() {
        let reg = RegistryProc::start(RegistryOpts::default());
        let client = RegistryClient::new(test_config(vec![])).expect("client");
        let err = client
            .resolve(&reg.host, "nothing/here", "latest", None)
            .await
            .expect_err("no such image");
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{}/nothing/here:latest", reg.host)),
            "{msg}"
        );
        assert!(
            msg.contains("UNKNOWN"),
            "the registry's own code is quoted: {msg}"
        );

        let d = digest_of(b"absent");
        let err = client
            .fetch_blob(&reg.host, "nothing/here", &d, 0, None)
            .await
            .expect_err("no such blob");
        assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(&d.to_string()), "{err}");
    }

    #[tokio::test]
    async fn htpasswd_auth_over_tls() {
        let certs = tempfile::tempdir().expect("tempdir");
        let tls = make_tls(certs.path());
        let reg = RegistryProc::start(RegistryOpts {
            htpasswd: Some(("alice", "s3cret")),
            tls: Some(&tls),
            ..RegistryOpts::default()
        });
        let basic = basic_header(&creds("alice", "s3cret"))
            .and_then(|h| h.to_str().ok().map(str::to_string));
        let pusher = Pusher::new(&format!("https://{}", reg.host), Some(&tls.ca), basic);
        let img = build_image(&[("secret.txt", b"s3cret\n")], false);
        push_image(&pusher, "private/app", "v1", &img, false).await;

        let host_cfg = |auth: Option<Credentials>| HostConfig {
            ca_file: Some(tls.ca.clone()),
            auth,
            ..HostConfig::default()
        };

        // No credentials.
        let anon = RegistryClient::new(test_config(vec![(reg.host.clone(), host_cfg(None))]))
            .expect("client");
        let err = anon
            .resolve(&reg.host, "private/app", "v1", None)
            .await
            .expect_err("anonymous");
        match &err {
            RegistryError::Unauthorized { status, image, .. } => {
                assert_eq!(*status, 401);
                assert_eq!(image, &format!("{}/private/app:v1", reg.host));
            }
            other => panic!("expected Unauthorized, got {other:?}"),
        }
        // Wrong credentials with the call.
        let err = anon
            .resolve(
                &reg.host,
                "private/app",
                "v1",
                Some(&creds("alice", "wrong")),
            )
            .await
            .expect_err("wrong password");
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
        // Right credentials with the call, on the same client.
        let m = anon
            .resolve(
                &reg.host,
                "private/app",
                "v1",
                Some(&creds("alice", "s3cret")),
            )
            .await
            .expect("right credentials");
        assert_eq!(m.digest, img.manifest_digest);

        // Credentials from the configuration.
        let cfg = RegistryClient::new(test_config(vec![(
            reg.host.clone(),
            host_cfg(Some(creds("alice", "s3cret"))),
        )]))
        .expect("client");
        let m = cfg
            .resolve(&reg.host, "private/app", "v1", None)
            .await
            .expect("configured credentials");
        assert_eq!(m.digest, img.manifest_digest);
        let blob = cfg
            .fetch_blob(&reg.host, "private/app", &img.layer_digest, 0, None)
            .await
            .expect("blob");
        assert_eq!(collect(blob).await.expect("body"), img.layer);

        // Without the CA, and not insecure: a TLS error, not a fallback to plain HTTP.
        let strict = RegistryClient::new(test_config(vec![(
            reg.host.clone(),
            HostConfig {
                insecure: Some(false),
                auth: Some(creds("alice", "s3cret")),
                ..HostConfig::default()
            },
        )]))
        .expect("client");
        let err = strict
            .resolve(&reg.host, "private/app", "v1", None)
            .await
            .expect_err("untrusted certificate");
        assert!(matches!(err, RegistryError::Tls { .. }), "{err:?}");
        assert!(err.to_string().contains(&reg.host), "{err}");

        // A missing CA file is a configuration error at construction.
        let bad = RegistryClient::new(test_config(vec![(
            reg.host.clone(),
            HostConfig {
                ca_file: Some(certs.path().join("missing.pem")),
                ..HostConfig::default()
            },
        )]));
        assert!(matches!(bad, Err(RegistryError::Config(_))));
    }

    /// Signs a registry JWT (RS256, `x5c` header) with the openssl command line.
    fn sign_token(dir: &Path, repo: &str) -> (String, PathBuf) {
        let key = dir.join("token.key");
        let cert = dir.join("token.pem");
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
            .args(["-days", "2", "-subj", "/CN=corral-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(der.status.success());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let header =
            serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [base64(&der.stdout, false)]});
        let claims = serde_json::json!({
            "iss": "corral-test-issuer", "sub": "alice", "aud": "corral-test",
            "exp": now + 3600, "nbf": now - 60, "iat": now - 60, "jti": "corral-test-1",
            "access": [{"type": "repository", "name": repo, "actions": ["pull", "push"]}],
        });
        let input = format!(
            "{}.{}",
            base64(header.to_string().as_bytes(), true),
            base64(claims.to_string().as_bytes(), true)
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("sign input");
        let sig = child.wait_with_output().expect("openssl");
        assert!(sig.status.success());
        (format!("{input}.{}", base64(&sig.stdout, true)), cert)
    }

    #[tokio::test]
    async fn bearer_token_auth() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (jwt, bundle) = sign_token(dir.path(), "secure/app");
        let expected_basic = basic_header(&creds("alice", "s3cret"))
            .and_then(|h| h.to_str().ok().map(str::to_string))
            .expect("header");
        let token_body = serde_json::json!({"token": jwt, "expires_in": 300}).to_string();
        let token_server = TinyServer::start(move |req| {
            if req.header("authorization") == Some(expected_basic.as_str()) {
                reply(
                    200,
                    &[("Content-Type", "application/json")],
                    token_body.clone(),
                )
            } else {
                reply(
                    401,
                    &[],
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                )
            }
        })
        .await;
        let realm = format!("http://{}/token", token_server.host());
        let reg = RegistryProc::start(RegistryOpts {
            token: Some((realm, bundle)),
            ..RegistryOpts::default()
        });
        let pusher = Pusher::new(&reg.url(), None, Some(format!("Bearer {jwt}")));
        let img = build_image(&[("t.txt", b"token\n")], false);
        push_image(&pusher, "secure/app", "v1", &img, false).await;

        let client = RegistryClient::new(test_config(vec![])).expect("client");
        let err = client
            .resolve(&reg.host, "secure/app", "v1", None)
            .await
            .expect_err("anonymous");
        match &err {
            RegistryError::Unauthorized { host, image, .. } => {
                assert_eq!(host, &token_server.host(), "names the token server");
                assert!(image.contains("secure/app:v1"));
            }
            other => panic!("expected Unauthorized, got {other:?}"),
        }
        let alice = creds("alice", "s3cret");
        let m = client
            .resolve(&reg.host, "secure/app", "v1", Some(&alice))
            .await
            .expect("with credentials");
        assert_eq!(m.digest, img.manifest_digest);
        let before = token_server.seen().len();
        let blob = client
            .fetch_blob(&reg.host, "secure/app", &img.layer_digest, 0, Some(&alice))
            .await
            .expect("blob");
        assert_eq!(collect(blob).await.expect("body"), img.layer);
        client
            .resolve(&reg.host, "secure/app", "v1", Some(&alice))
            .await
            .expect("again");
        assert_eq!(token_server.seen().len(), before, "the token is cached");
        let q = &token_server.seen()[before - 1].path;
        assert!(
            q.contains("service=corral-test") && q.contains("scope=repository:secure/app:pull"),
            "{q}"
        );
    }

    #[tokio::test]
    async fn mirrors_down_or_empty_are_skipped() {
        let reg = RegistryProc::start(RegistryOpts::default());
        let empty = RegistryProc::start(RegistryOpts::default());
        let pusher = Pusher::new(&reg.url(), None, None);
        let img = build_image(&[("m.txt", b"mirror\n")], false);
        push_image(&pusher, "test/app", "v1", &img, false).await;
        let dead = format!("http://127.0.0.1:{}", free_port());
        let client = RegistryClient::new(test_config(vec![(
            reg.host.clone(),
            HostConfig {
                mirrors: vec![dead, empty.url()],
                ..HostConfig::default()
            },
        )]))
        .expect("client");
        let m = client
            .resolve(&reg.host, "test/app", "v1", None)
            .await
            .expect("upstream after the mirrors");
        assert_eq!(m.digest, img.manifest_digest);
        let blob = client
            .fetch_blob(&reg.host, "test/app", &img.layer_digest, 0, None)
            .await
            .expect("blob");
        assert_eq!(collect(blob).await.expect("body"), img.layer);
        assert!(
            empty.log().contains("/v2/test/app/manifests/v1"),
            "the empty mirror was asked"
        );
    }

    #[tokio::test]
    async fn a_mirror_with_the_image_is_used() {
        let mirror = RegistryProc::start(RegistryOpts::default());
        let pusher = Pusher::new(&mirror.url(), None, None);
        let img = build_image(&[("m.txt", b"from the mirror\n")], false);
        push_image(&pusher, "library/app", "v1", &img, false).await;
        // The upstream answers 500 to anything and counts connections.
        let upstream = TinyServer::start(|_| reply(500, &[], "upstream must not be asked")).await;
        let client = RegistryClient::new(test_config(vec![(
            upstream.host(),
            HostConfig {
                mirrors: vec![format!("{}/v2", mirror.url())],
                ..HostConfig::default()
            },
        )]))
        .expect("client");
        let m = client
            .resolve(&upstream.host(), "library/app", "v1", None)
            .await
            .expect("resolved through the mirror");
        assert_eq!(m.digest, img.manifest_digest);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("store");
        pull_blob(
            &store,
            &client,
            &upstream.host(),
            "library/app",
            &img.layer_digest,
            img.layer.len() as u64,
        )
        .await
        .expect("blob through the mirror");
        assert_eq!(
            upstream.connections.load(Ordering::SeqCst),
            0,
            "upstream untouched"
        );

        // With the mirror gone, the upstream's own error is what the caller sees.
        drop(mirror);
        let err = client
            .resolve(&upstream.host(), "library/app", "v1", None)
            .await
            .expect_err("upstream fails");
        assert!(
            matches!(err, RegistryError::Server { status: 500, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&upstream.host()), "{err}");
    }

    #[tokio::test]
    async fn unreachable_registry_is_a_connect_error() {
        let host = format!("127.0.0.1:{}", free_port());
        let client = RegistryClient::new(test_config(vec![])).expect("client");
        let err = client
            .resolve(&host, "test/app", "v1", None)
            .await
            .expect_err("nothing listens");
        assert!(matches!(err, RegistryError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains(&host), "{err}");
        assert!(err.is_transient());
    }

    // ---------------------------------------------------------------- tests: hostile servers

    const HOSTILE_BLOB: &[u8] = b"the blob that the descriptor describes, 64 bytes long, exactly.!";

    async fn hostile_pull(server: &TinyServer) -> (ContentStore, tempfile::TempDir, PullError) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("store");
        let client = RegistryClient::new(test_config(vec![])).expect("client");
        let d = digest_of(HOSTILE_BLOB);
        let err = pull_blob(
            &store,
            &client,
            &server.host(),
            "evil/app",
            &d,
            HOSTILE_BLOB.len() as u64,
        )
        .await
        .expect_err("hostile blob must fail");
        assert!(store.info(&d).expect("info").is_none(), "no blob for {d}");
        assert!(store.list().expect("list").is_empty());
        (store, dir, err)
    }

    #[tokio::test]
    async fn hostile_wrong_content() {
        let server = TinyServer::start(|_| {
            let mut wrong = HOSTILE_BLOB.to_vec();
            wrong[10] ^= 1;
            reply(200, &[], wrong)
        })
        .await;
        let (store, _dir, err) = hostile_pull(&server).await;
        match err {
            PullError::Content(ContentError::DigestMismatch { expected, actual }) => {
                assert_eq!(expected, digest_of(HOSTILE_BLOB));
                assert_ne!(actual, expected.to_string());
            }
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        assert!(
            store.ingests().expect("ingests").is_empty(),
            "no ingest left"
        );
    }

    #[tokio::test]
    async fn hostile_oversized_blob() {
        // Announced larger than the descriptor: refused before any byte is stored.
        let announced = TinyServer::start(|_| {
            let mut more = HOSTILE_BLOB.to_vec();
            more.extend_from_slice(&[b'x'; 100]);
            reply(200, &[], more)
        })
        .await;
        let (_s, _d, err) = hostile_pull(&announced).await;
        match err {
            PullError::Registry(e @ RegistryError::SizeExceeded { .. }) => {
                assert!(e.to_string().contains("evil/app@sha256:"), "{e}");
                assert!(e.to_string().contains(&announced.host()), "{e}");
            }
            other => panic!("expected SizeExceeded, got {other:?}"),
        }

        // Not announced (no Content-Length, body until close): refused at the byte past.
        let unannounced = TinyServer::start(|_| {
            let mut raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            raw.extend_from_slice(HOSTILE_BLOB);
            raw.extend_from_slice(&[b'x'; 100_000]);
            Reply::Raw(raw)
        })
        .await;
        let (store, _d, err) = hostile_pull(&unannounced).await;
        match err {
            PullError::Registry(RegistryError::SizeExceeded { expected, .. }) => {
                assert_eq!(expected, HOSTILE_BLOB.len() as u64)
            }
            other => panic!("expected SizeExceeded, got {other:?}"),
        }
        // The first bytes were within the size and stay resumable; nothing is committed.
        let ingests = store.ingests().expect("ingests");
        assert!(ingests
            .iter()
            .all(|i| i.offset <= HOSTILE_BLOB.len() as u64));
    }

    #[tokio::test]
    async fn hostile_close_mid_body() {
        let server = TinyServer::start(|_| {
            let mut raw = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                HOSTILE_BLOB.len()
            )
            .into_bytes();
            raw.extend_from_slice(&HOSTILE_BLOB[..20]);
            Reply::Raw(raw)
        })
        .await;
        let (store, _d, err) = hostile_pull(&server).await;
        match err {
            PullError::Registry(e @ RegistryError::Interrupted { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&server.host()) && msg.contains("after 20 bytes"),
                    "{msg}"
                );
            }
            other => panic!("expected Interrupted, got {other:?}"),
        }
        // The 20 good bytes are kept for a resume; a later good server completes the blob
        // with a Range request from byte 20.
        let ingests = store.ingests().expect("ingests");
        assert_eq!(ingests.len(), 1);
        assert_eq!(ingests[0].offset, 20);
        let good = TinyServer::start(|req| match req.header("range") {
            Some("bytes=20-") => reply(
                206,
                &[(
                    "Content-Range",
                    &format!("bytes 20-{}/{}", HOSTILE_BLOB.len() - 1, HOSTILE_BLOB.len()),
                )],
                HOSTILE_BLOB[20..].to_vec(),
            ),
            _ => reply(400, &[], "expected a range request"),
        })
        .await;
        let client = RegistryClient::new(test_config(vec![])).expect("client");
        let d = digest_of(HOSTILE_BLOB);
        pull_blob(
            &store,
            &client,
            &good.host(),
            "evil/app",
            &d,
            HOSTILE_BLOB.len() as u64,
        )
        .await
        .expect("resume from a good server");
        assert_eq!(store.read_all(&d).expect("read"), HOSTILE_BLOB);
    }

    #[tokio::test]
    async fn ignored_range_is_skipped_and_a_stall_times_out() {
        // A server without Range support sends the whole blob; the stream drops the prefix.
        let no_range = TinyServer::start(|_| reply(200, &[], HOSTILE_BLOB.to_vec())).await;
        let client = RegistryClient::new(test_config(vec![])).expect("client");
        let d = digest_of(HOSTILE_BLOB);
        let s = client
            .fetch_blob(&no_range.host(), "evil/app", &d, 20, None)
            .await
            .expect("fetch");
        let s = s.expect_size(HOSTILE_BLOB.len() as u64).expect("size");
        assert_eq!(collect(s).await.expect("body"), &HOSTILE_BLOB[20..]);
        assert_eq!(no_range.seen()[0].header("range"), Some("bytes=20-"));

        // Headers, a few bytes, then silence: a timeout error, not a hang.
        let stall = TinyServer::start(|_| {
            let mut raw = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                HOSTILE_BLOB.len()
            )
            .into_bytes();
            raw.extend_from_slice(&HOSTILE_BLOB[..10]);
            Reply::Stall(raw)
        })
        .await;
        let client = RegistryClient::new(RegistryConfig {
            read_timeout: Duration::from_millis(500),
            ..RegistryConfig::default()
        })
        .expect("client");
        let started = Instant::now();
        let s = client
            .fetch_blob(&stall.host(), "evil/app", &d, 0, None)
            .await
            .expect("headers arrive");
        let err = collect(s).await.expect_err("stalled body");
        assert!(matches!(err, RegistryError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn hostile_manifests() {
        let good = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#.to_vec();
        let good_digest = digest_of(&good);
        let good2 = good.clone();
        let server = TinyServer::start(move |req| {
            let ct = ("Content-Type", MEDIA_TYPE_OCI_MANIFEST);
            match req.path.rsplit('/').next().unwrap_or("") {
                "huge" => reply(200, &[ct], vec![b' '; MAX_MANIFEST_SIZE + 1]),
                "schema1" => reply(
                    200,
                    &[(
                        "Content-Type",
                        "application/vnd.docker.distribution.manifest.v1+prettyjws",
                    )],
                    r#"{"schemaVersion":1}"#,
                ),
                "lying" => reply(
                    200,
                    &[ct, ("Docker-Content-Digest", &digest_of(b"x").to_string())],
                    good2.clone(),
                ),
                "broken" => reply(
                    503,
                    &[],
                    r#"{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}"#,
                ),
                "forbidden" => reply(403, &[], ""),
                // Any digest asked for gets the same (wrong) bytes.
                _ => reply(
                    200,
                    &[ct],
                    b"{\"schemaVersion\":2,\"manifests\":[]}".to_vec(),
                ),
            }
        })
        .await;
        let host = server.host();
        let client = RegistryClient::new(test_config(vec![])).expect("client");
        let err = |r: Result<ResolvedManifest, RegistryError>| r.expect_err("must fail");

        let e = err(client.resolve(&host, "evil/app", "huge", None).await);
        assert!(matches!(e, RegistryError::ManifestTooLarge { .. }), "{e:?}");
        let e = err(client.resolve(&host, "evil/app", "schema1", None).await);
        assert!(
            matches!(e, RegistryError::UnsupportedMediaType { .. }),
            "{e:?}"
        );
        let e = err(client.resolve(&host, "evil/app", "lying", None).await);
        assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e:?}");
        let e = err(client.resolve(&host, "evil/app", "broken", None).await);
        assert!(
            matches!(e, RegistryError::Server { status: 503, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("UNAVAILABLE: try later"), "{e}");
        let e = err(client.resolve(&host, "evil/app", "forbidden", None).await);
        assert!(
            matches!(e, RegistryError::Unauthorized { status: 403, .. }),
            "{e:?}"
        );
        let e = err(client
            .resolve(&host, "evil/app", &good_digest.to_string(), None)
            .await);
        match e {
            RegistryError::DigestMismatch {
                expected, image, ..
            } => {
                assert_eq!(expected, good_digest.to_string());
                assert_eq!(image, format!("{host}/evil/app@{good_digest}"));
            }
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn redirects_drop_authorization_and_are_bounded() {
        let storage = TinyServer::start(|_| reply(200, &[], HOSTILE_BLOB.to_vec())).await;
        let storage_url = format!("http://{}/storage/blob?sig=abc", storage.host());
        let registry = TinyServer::start(move |req| {
            if req.path.contains("/loop/") {
                return reply(302, &[("Location", req.path.as_str())], "");
            }
            if req.header("authorization").is_none() {
                return reply(401, &[("WWW-Authenticate", "Basic realm=\"test\"")], "");
            }
            reply(307, &[("Location", storage_url.as_str())], "")
        })
        .await;
        let client = RegistryClient::new(test_config(vec![(
            registry.host(),
            HostConfig {
                auth: Some(creds("bob", "pw")),
                ..HostConfig::default()
            },
        )]))
        .expect("client");
        let d = digest_of(HOSTILE_BLOB);
        let s = client
            .fetch_blob(&registry.host(), "evil/app", &d, 0, None)
            .await
            .expect("redirected fetch");
        assert_eq!(s.host(), registry.host());
        assert_eq!(collect(s).await.expect("body"), HOSTILE_BLOB);
        let at_storage = storage.seen();
        assert_eq!(at_storage.len(), 1);
        assert_eq!(at_storage[0].path, "/storage/blob?sig=abc");
        assert_eq!(at_storage[0].method, "GET");
        assert!(
            at_storage[0].header("authorization").is_none(),
            "no credentials to storage"
        );
        assert!(registry
            .seen()
            .iter()
            .any(|r| r.header("authorization").is_some()));

        let err = client
            .fetch_blob(&registry.host(), "evil/loop/app", &d, 0, None)
            .await
            .expect_err("redirect loop");
        assert!(
            matches!(err, RegistryError::TooManyRedirects { limit: 10, .. }),
            "{err:?}"
        );
    }

    /// Pulls run on a multi-threaded runtime: the futures and the stream must be Send.
    #[tokio::test]
    async fn futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let client = RegistryClient::new(RegistryConfig::default()).expect("client");
        let d = digest_of(b"x");
        is_send(&client.resolve("h", "r", "t", None));
        is_send(&client.fetch_blob("h", "r", &d, 0, None));
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<RegistryClient>();
        is_send_sync::<BlobStream>();
    }

    #[test]
    fn challenge_parsing() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push repository:c:pull""#,
        )
        .expect("parses");
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("service"), Some("registry.example"));
        assert_eq!(
            c.param("scope"),
            Some("repository:a/b:pull,push repository:c:pull")
        );
        let b = parse_challenge(r#"Basic realm="x \"y\"""#).expect("parses");
        assert_eq!(b.scheme, "basic");
        assert_eq!(b.param("realm"), Some(r#"x "y""#));
        assert_eq!(
            query_escape("repository:a/b:pull push"),
            "repository:a/b:pull%20push"
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(base64(b"alice:s3cret", false), "YWxpY2U6czNjcmV0");
        assert_eq!(base64(b"a", false), "YQ==");
        assert_eq!(base64(b"ab", true), "YWI");
        assert!(is_loopback("127.0.0.1:5000") && is_loopback("127.9.9.9"));
        assert!(is_loopback("[::1]:5000") && is_loopback("localhost:80"));
        assert!(!is_loopback("registry.example:5000") && !is_loopback("10.0.0.1"));
        assert_eq!(strip_port("[::1]:5000"), "::1");
        assert_eq!(parse_content_range("bytes 20-63/64"), Some((20, Some(64))));
        assert_eq!(parse_content_range("bytes 0-9/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes 9-0/10"), None);
        let base: Uri = "https://r.example/v2/a/blobs/x".parse().expect("uri");
        assert_eq!(
            resolve_location(&base, "/s/1").map(|u| u.to_string()),
            Some("https://r.example/s/1".to_string())
        );
        assert_eq!(
            resolve_location(&base, "//cdn.example/z").map(|u| u.to_string()),
            Some("https://cdn.example/z".to_string())
        );
        let mut cfg = RegistryConfig::default();
        assert!(cfg.is_insecure("127.0.0.1:5000"));
        assert!(!cfg.is_insecure("docker.io"));
        cfg.hosts.insert(
            "127.0.0.1:5000".into(),
            HostConfig {
                insecure: Some(false),
                ..HostConfig::default()
            },
        );
        assert!(!cfg.is_insecure("127.0.0.1:5000"));
        let dbg = format!("{:?}", creds("u", "hunter2"));
        assert!(!dbg.contains("hunter2"));
    }
}
