//! Test fixtures shared by the image modules' tests: a real `docker-registry` process on
//! 127.0.0.1 (its own port and storage per test), a push client, a counting and cutting
//! HTTP proxy to put in front of it, and builders for layers, images and indexes.
//!
//! Owns nothing at run time (`#[cfg(test)]` only). Needs Debian's `docker-registry`,
//! `apache2-utils` (htpasswd), `openssl` and `busybox-static` installed, and root for the
//! tests that mount.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::content::Algorithm;
use super::oci::{
    MEDIA_TYPE_DOCKER_CONFIG, MEDIA_TYPE_DOCKER_LAYER, MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER_GZIP,
};
use super::reference::Digest;
use super::registry::{MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST};
use super::store::{ImageStore, StoreOptions};

// ---------------------------------------------------------------- registry process

pub(crate) fn digest_of(data: &[u8]) -> Digest {
    let mut h = Algorithm::Sha256.hasher();
    h.update(data);
    Digest::parse(&h.finish()).expect("computed digest parses")
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub(crate) fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA and a server certificate for 127.0.0.1 signed by it (rustls refuses
/// a CA certificate used directly as a server certificate).
pub(crate) struct TlsFiles {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

pub(crate) fn make_tls(dir: &Path) -> TlsFiles {
    let p = |n: &str| dir.join(n);
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=corral-test-ca",
        ])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")));
    run(Command::new("openssl")
        .args(["req", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("srv.key"))
        .arg("-out")
        .arg(p("srv.csr")));
    fs_write(
        &p("ext.cnf"),
        b"subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    );
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-set_serial", "1"])
        .arg("-in")
        .arg(p("srv.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("srv.pem")));
    TlsFiles {
        ca: p("ca.pem"),
        cert: p("srv.pem"),
        key: p("srv.key"),
    }
}

pub(crate) fn fs_write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("write test file");
}

// ---------------------------------------------------------------- registry process

#[derive(Default)]
pub(crate) struct RegistryOpts<'a> {
    pub(crate) htpasswd: Option<(&'a str, &'a str)>,
    pub(crate) tls: Option<&'a TlsFiles>,
    /// `auth: token` with this realm, service `corral-test`, issuer `corral-test-issuer`
    /// and the given root certificate bundle.
    pub(crate) token: Option<(String, PathBuf)>,
}

/// A running `docker-registry serve`, killed (and its storage removed) when dropped,
/// even when the test panics.
pub(crate) struct RegistryProc {
    pub(crate) child: Child,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) host: String,
}

impl RegistryProc {
    pub(crate) fn start(opts: RegistryOpts<'_>) -> RegistryProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut auth = String::new();
        if let Some((user, pass)) = opts.htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("htpasswd (apache2-utils) is installed");
            assert!(out.status.success());
            let path = dir.path().join("htpasswd");
            fs_write(&path, &out.stdout);
            auth = format!(
                "auth:\n  htpasswd:\n    realm: corral-test\n    path: {}\n",
                path.display()
            );
        }
        if let Some((realm, bundle)) = &opts.token {
            auth = format!(
                "auth:\n  token:\n    realm: {realm}\n    service: corral-test\n    \
                 issuer: corral-test-issuer\n    rootcertbundle: {}\n",
                bundle.display()
            );
        }
        let tls = opts
            .tls
            .map(|t| {
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    t.cert.display(),
                    t.key.display()
                )
            })
            .unwrap_or_default();
        for _ in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{auth}",
                dir.path().join("data").display()
            );
            let config_path = dir.path().join("config.yml");
            fs_write(&config_path, config.as_bytes());
            let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
            let log2 = log.try_clone().expect("log");
            let mut cmd = Command::new("/usr/bin/docker-registry");
            cmd.arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2);
            // If the test process dies without unwinding, the registry goes with it.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(std::io::Error::from)
                });
            }
            let mut child = cmd.spawn().expect("docker-registry is installed");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return RegistryProc {
                        child,
                        dir,
                        host: format!("127.0.0.1:{port}"),
                    };
                }
                if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                    // Port taken between the probe and the bind, most likely: retry.
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "docker-registry did not start: {}",
            std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    /// The plain-HTTP base URL (TLS registries are addressed as `https://{host}`).
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- push helper

/// Pushes blobs and manifests with the distribution push API (POST an upload, PUT it
/// with `?digest=`, PUT the manifest).
pub(crate) struct Pusher {
    pub(crate) client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    pub(crate) base: String,
    pub(crate) auth: Option<String>,
}

impl Pusher {
    pub(crate) fn new(base: &str, ca: Option<&Path>, auth: Option<String>) -> Pusher {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = ca {
            for c in CertificateDer::pem_file_iter(ca).expect("ca") {
                roots.add(c.expect("cert")).expect("add cert");
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Pusher {
            client: Client::builder(TokioExecutor::new()).build(https),
            base: base.to_string(),
            auth,
        }
    }

    pub(crate) async fn request(
        &self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        if let Some(a) = &self.auth {
            req = req.header(header::AUTHORIZATION, a.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("request");
        let resp = self.client.request(req).await.expect("push request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, headers, body)
    }

    pub(crate) async fn blob(&self, repo: &str, data: &[u8]) -> Digest {
        let digest = digest_of(data);
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let (status, headers, body) = self.request(Method::POST, &url, None, vec![]).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let location = headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .expect("upload location")
            .to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let (status, _, body) = self
            .request(
                Method::PUT,
                &url,
                Some("application/octet-stream"),
                data.to_vec(),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        digest
    }

    pub(crate) async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Digest {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let (status, _, resp) = self
            .request(Method::PUT, &url, Some(media_type), body.to_vec())
            .await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&resp)
        );
        digest_of(body)
    }
}

// ---------------------------------------------------------------- counting, cutting proxy

/// One request the proxy forwarded.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) range: Option<String>,
}

/// A plain-HTTP proxy in front of a registry that records every request and can cut one
/// response short, as a network failure mid-blob would. One request per connection (it
/// answers with `Connection: close`), so every request is seen on its own.
pub(crate) struct Proxy {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// (path fragment, body bytes to forward before closing), used once.
    cut: Arc<Mutex<Option<(String, usize)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub(crate) async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cut: Arc<Mutex<Option<(String, usize)>>> = Arc::new(Mutex::new(None));
        let upstream = upstream.to_owned();
        let (seen2, cut2) = (seen.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (seen, cut, upstream) = (seen2.clone(), cut2.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = proxy_conn(sock, &upstream, &seen, &cut).await;
                });
            }
        });
        Proxy {
            addr,
            seen,
            cut,
            task,
        }
    }

    pub(crate) fn host(&self) -> String {
        self.addr.to_string()
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    pub(crate) fn clear(&self) {
        self.seen.lock().expect("seen").clear();
    }

    /// The next response whose path contains `fragment` is closed after `body_bytes` bytes of
    /// its body.
    pub(crate) fn cut_next(&self, fragment: &str, body_bytes: usize) {
        *self.cut.lock().expect("cut") = Some((fragment.to_owned(), body_bytes));
    }

    /// GETs of blob `digest`.
    pub(crate) fn blob_gets(&self, digest: &Digest) -> Vec<Seen> {
        let suffix = format!("/blobs/{digest}");
        self.seen()
            .into_iter()
            .filter(|s| s.method == "GET" && s.path.ends_with(&suffix))
            .collect()
    }
}

async fn proxy_conn(
    mut sock: tokio::net::TcpStream,
    upstream: &str,
    seen: &Mutex<Vec<Seen>>,
    cut: &Mutex<Option<(String, usize)>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        if buf.first() == Some(&0x16) {
            return Ok(()); // a TLS handshake: the client falls back to plain HTTP
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let mut forwarded = format!("{method} {path} HTTP/1.1\r\n");
    let mut range = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("connection") {
            continue;
        }
        if k.eq_ignore_ascii_case("range") {
            range = Some(v.trim().to_owned());
        }
        forwarded.push_str(&format!("{k}:{v}\r\n"));
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    seen.lock().expect("seen").push(Seen {
        method,
        path: path.clone(),
        range,
    });

    let mut up = tokio::net::TcpStream::connect(upstream).await?;
    up.write_all(forwarded.as_bytes()).await?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp).await?;
    let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        sock.write_all(&resp).await?;
        return Ok(());
    };
    let (rhead, body) = resp.split_at(i + 4);
    let rhead = String::from_utf8_lossy(&rhead[..rhead.len() - 2]).to_string();
    let rhead: String = rhead
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let rhead = format!(
        "{}Connection: close\r\n\r\n",
        rhead.trim_end_matches("\r\n").to_owned() + "\r\n"
    );
    let limit = {
        let mut c = cut.lock().expect("cut");
        match c.as_ref() {
            Some((frag, n)) if path.contains(frag.as_str()) => {
                let n = *n;
                *c = None;
                Some(n)
            }
            _ => None,
        }
    };
    sock.write_all(rhead.as_bytes()).await?;
    match limit {
        Some(n) => {
            sock.write_all(&body[..n.min(body.len())]).await?;
            sock.flush().await?;
        }
        None => sock.write_all(body).await?,
    }
    sock.shutdown().await
}

// ---------------------------------------------------------------- layers and images

/// Builds a layer tar entry by entry, with the raw control a hostile layer needs.
pub(crate) struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

impl TarBuilder {
    pub(crate) fn new() -> TarBuilder {
        TarBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }

    pub(crate) fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.b
            .append_data(&mut h, path, std::io::empty())
            .expect("dir entry");
        self
    }

    pub(crate) fn file(self, path: &str, data: &[u8], mode: u32) -> Self {
        self.file_owned(path, data, mode, 0, 0)
    }

    pub(crate) fn file_owned(
        mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> Self {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_data(&mut h, path, data).expect("file entry");
        self
    }

    pub(crate) fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.b
            .append_link(&mut h, path, target)
            .expect("symlink entry");
        self
    }

    pub(crate) fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        self.b
            .append_link(&mut h, path, target)
            .expect("hardlink entry");
        self
    }

    pub(crate) fn whiteout(self, dir: &str, name: &str) -> Self {
        let path = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&path, b"", 0o644)
    }

    pub(crate) fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    pub(crate) fn char_device(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        self.b
            .append_data(&mut h, path, std::io::empty())
            .expect("device entry");
        self
    }

    /// A regular file whose name is written as is, `..` and all (the tar crate refuses to).
    pub(crate) fn raw_file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        self.b.append(&h, data).expect("raw entry");
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.b.into_inner().expect("tar")
    }
}

/// A layer: its tar, the blob as pushed (maybe compressed), and their digests.
#[derive(Clone)]
pub(crate) struct Layer {
    pub(crate) tar: Vec<u8>,
    pub(crate) blob: Vec<u8>,
    pub(crate) media_type: String,
    pub(crate) diff_id: Digest,
    pub(crate) digest: Digest,
}

impl Layer {
    pub(crate) fn plain(tar: Vec<u8>, docker: bool) -> Layer {
        let mt = if docker {
            MEDIA_TYPE_DOCKER_LAYER
        } else {
            MEDIA_TYPE_OCI_LAYER
        };
        Layer {
            diff_id: digest_of(&tar),
            digest: digest_of(&tar),
            blob: tar.clone(),
            tar,
            media_type: mt.to_owned(),
        }
    }

    pub(crate) fn gzip(tar: Vec<u8>, docker: bool) -> Layer {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&tar).expect("gzip");
        let blob = enc.finish().expect("gzip");
        let mt = if docker {
            MEDIA_TYPE_DOCKER_LAYER_GZIP
        } else {
            MEDIA_TYPE_OCI_LAYER_GZIP
        };
        Layer {
            diff_id: digest_of(&tar),
            digest: digest_of(&blob),
            blob,
            tar,
            media_type: mt.to_owned(),
        }
    }
}

/// A layer holding Debian's busybox-static as `/bin/busybox`, with `/bin/sh` linked to it.
pub(crate) fn busybox_layer() -> Layer {
    let bin = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    Layer::gzip(
        TarBuilder::new()
            .dir("bin", 0o755)
            .file("bin/busybox", &bin, 0o755)
            .symlink("bin/sh", "busybox")
            .finish(),
        false,
    )
}

/// An image built in memory.
#[derive(Clone)]
pub(crate) struct TestImage {
    pub(crate) layers: Vec<Layer>,
    pub(crate) config: Vec<u8>,
    pub(crate) config_digest: Digest,
    pub(crate) manifest: Vec<u8>,
    pub(crate) manifest_digest: Digest,
    pub(crate) media_type: String,
}

impl TestImage {
    /// An image of `layers` with the runtime settings `runtime` (the config's `config`).
    pub(crate) fn new(
        layers: Vec<Layer>,
        runtime: serde_json::Value,
        arch: &str,
        docker: bool,
    ) -> TestImage {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "created": "2024-05-01T00:00:00Z",
            "config": runtime,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
            },
        }))
        .expect("config json");
        Self::with_config(layers, config, docker)
    }

    pub(crate) fn with_config(layers: Vec<Layer>, config: Vec<u8>, docker: bool) -> TestImage {
        let (mt, config_mt) = if docker {
            (MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_CONFIG)
        } else {
            (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_CONFIG)
        };
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": config_mt, "digest": digest_of(&config).to_string(), "size": config.len()},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        }))
        .expect("manifest json");
        TestImage {
            config_digest: digest_of(&config),
            manifest_digest: digest_of(&manifest),
            layers,
            config,
            manifest,
            media_type: mt.to_owned(),
        }
    }

    /// Compressed layers plus config, as the store reports an image's size.
    pub(crate) fn size(&self) -> u64 {
        self.config.len() as u64 + self.layers.iter().map(|l| l.blob.len() as u64).sum::<u64>()
    }

    /// Pushes blobs and manifest, tagged `tag`.
    pub(crate) async fn push(&self, p: &Pusher, repo: &str, tag: &str) {
        for l in &self.layers {
            p.blob(repo, &l.blob).await;
        }
        p.blob(repo, &self.config).await;
        p.manifest(repo, tag, &self.media_type, &self.manifest)
            .await;
    }
}

/// An OCI index of `images` for the given (architecture, variant) platforms.
pub(crate) fn index_of(images: &[(&TestImage, &str, Option<&str>)]) -> (Vec<u8>, Digest) {
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|(img, arch, variant)| {
            let mut platform = serde_json::json!({"architecture": arch, "os": "linux"});
            if let Some(v) = variant {
                platform["variant"] = serde_json::json!(v);
            }
            serde_json::json!({
                "mediaType": img.media_type,
                "digest": img.manifest_digest.to_string(),
                "size": img.manifest.len(),
                "platform": platform,
            })
        })
        .collect();
    let raw = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_INDEX,
        "manifests": manifests,
    }))
    .expect("index json");
    let d = digest_of(&raw);
    (raw, d)
}

/// The OCI architecture name of this host, as the store chooses it.
pub(crate) fn host_arch() -> String {
    super::oci::host_platform().architecture
}

/// Another architecture than this host's.
pub(crate) fn other_arch() -> &'static str {
    if host_arch() == "s390x" {
        "amd64"
    } else {
        "s390x"
    }
}

// ---------------------------------------------------------------- the store under test

/// A registry, a push client for it, and the host to pull from.
pub(crate) struct Fixture {
    pub(crate) registry: RegistryProc,
    pub(crate) pusher: Pusher,
    pub(crate) dir: tempfile::TempDir,
}

impl Fixture {
    pub(crate) fn new() -> Fixture {
        let registry = RegistryProc::start(RegistryOpts::default());
        let pusher = Pusher::new(&registry.url(), None, None);
        Fixture {
            registry,
            pusher,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub(crate) fn host(&self) -> &str {
        &self.registry.host
    }

    pub(crate) fn root(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    pub(crate) async fn store(&self) -> ImageStore {
        ImageStore::open(test_options(&self.root()))
            .await
            .expect("open store")
    }

    /// Where the registry keeps the bytes of blob `d` (to corrupt them).
    pub(crate) fn registry_blob_path(&self, d: &Digest) -> PathBuf {
        self.registry
            .dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }
}

pub(crate) fn test_options(root: &Path) -> StoreOptions {
    let mut o = StoreOptions::new(root);
    o.registry.connect_timeout = Duration::from_secs(5);
    o.registry.read_timeout = Duration::from_secs(20);
    o
}

/// Relative paths of the files and directories under `dir` (for "nothing left" checks).
pub(crate) fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let e = e.expect("entry");
            let p = e.path();
            out.push(p.strip_prefix(dir).expect("prefix").display().to_string());
            if e.file_type().expect("type").is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------- trees and mounts

/// One file as a tree comparison sees it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Node {
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        data: Vec<u8>,
    },
    Symlink {
        target: PathBuf,
    },
    Other {
        mode: u32,
        rdev: u64,
    },
}

/// Every entry under `root`, byte for byte (contents, modes, owners, link targets).
pub(crate) fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            let m = p.symlink_metadata().expect("stat");
            let rel = p.strip_prefix(root).expect("prefix").display().to_string();
            let ft = m.file_type();
            let node = if ft.is_dir() {
                stack.push(p.clone());
                Node::Dir {
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                }
            } else if ft.is_file() {
                Node::File {
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    data: std::fs::read(&p).expect("read"),
                }
            } else if ft.is_symlink() {
                Node::Symlink {
                    target: std::fs::read_link(&p).expect("readlink"),
                }
            } else {
                let _ = ft.is_char_device();
                Node::Other {
                    mode: m.mode(),
                    rdev: m.rdev(),
                }
            };
            out.insert(rel, node);
        }
    }
    out
}

/// Mounts `mounts` (as the snapshotter describes them) on `target`, as the shim will.
pub(crate) fn mount_all(mounts: &[containerd_shim_protos::api::Mount], target: &Path) {
    use nix::mount::{mount, MsFlags};
    for m in mounts {
        if m.type_ == "bind" {
            mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .expect("bind mount");
            if m.options.iter().any(|o| o == "ro") {
                mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .expect("read-only remount");
            }
        } else {
            let data = m.options.join(",");
            mount(
                Some(m.source.as_str()),
                target,
                Some(m.type_.as_str()),
                MsFlags::empty(),
                Some(data.as_str()),
            )
            .unwrap_or_else(|e| panic!("mount {} {data}: {e}", m.type_));
        }
    }
}

/// Unmounts `target` when dropped, so a failing assertion does not leave a mount behind.
pub(crate) struct Unmount(pub(crate) PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A cheap deterministic byte stream (xorshift), incompressible enough for benchmarks.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
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
