//! A real OCI registry for tests: Debian's `docker-registry` on 127.0.0.1,
//! with its own port and storage directory, killed and its directory removed
//! when dropped (also if the test panics; if the test process dies without
//! unwinding, the registry gets SIGKILL from the kernel).
//!
//! [`Registry::push_busybox`] pushes a one-layer image (busybox-static as
//! `/bin/busybox`, an OCI config with a chosen `USER`) with the distribution
//! push API over plain HTTP, so that a test can pull it through corrald;
//! [`Registry::push_image`] pushes any [`BuiltImage`]. A registry started
//! with [`RegistryOptions::htpasswd`] asks for Basic auth, and the pushes
//! send it. [`Registry::blob_path`] is where the registry keeps a blob's
//! bytes, for a test that corrupts them.
//!
//! [`RegistryFront`] stands on its own port in front of a registry and
//! answers chosen paths itself (a manifest of a kind no registry would
//! store), passing everything else through.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::image_builder::{oci_arch, BuiltImage};

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// What a push made: the names a pull of it will report.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `127.0.0.1:PORT/REPO:TAG`.
    pub reference: String,
    /// `127.0.0.1:PORT/REPO`.
    pub repository: String,
    /// The config digest, `sha256:…`: the image id.
    pub id: String,
    /// The manifest digest.
    pub manifest_digest: String,
    /// Compressed layers plus config.
    pub size: u64,
}

/// Status, headers (lower-cased names) and body of one HTTP response.
type HttpResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// How a registry is set up.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// A user and password the registry asks for with Basic auth (an
    /// `htpasswd` file made with `htpasswd -B` from apache2-utils). Pushes
    /// send them; pulls must bring their own.
    pub htpasswd: Option<(String, String)>,
}

/// A running `docker-registry serve`.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: PathBuf,
    host: String,
    /// The `Authorization` header pushes send.
    authorization: Option<String>,
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context(|| "find a free port".to_string())
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context(|| format!("sha256sum {}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    if !out.status.success() || hex.len() != 64 {
        return Err(Error::Protocol(format!(
            "sha256sum {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(format!("sha256:{hex}"))
}

impl Registry {
    /// Starts a registry whose storage lives in a new directory `dir`
    /// (removed on drop).
    pub fn start(dir: impl Into<PathBuf>) -> Result<Registry> {
        Registry::start_with(dir, &RegistryOptions::default())
    }

    /// [`Registry::start`] with `options`.
    pub fn start_with(dir: impl Into<PathBuf>, options: &RegistryOptions) -> Result<Registry> {
        let dir = dir.into();
        if !Path::new(REGISTRY_BIN).exists() {
            return Err(Error::Unavailable(format!(
                "{REGISTRY_BIN} (Debian's docker-registry) is not installed"
            )));
        }
        std::fs::create_dir_all(&dir).context(|| format!("create {}", dir.display()))?;
        let (auth, authorization) = match &options.htpasswd {
            Some((user, password)) => {
                let file = write_htpasswd(&dir, user, password)?;
                let section = format!(
                    "auth:\n  htpasswd:\n    realm: corral-e2e\n    path: {}\n",
                    file.display()
                );
                (section, Some(basic_authorization(user, password)))
            }
            None => (String::new(), None),
        };
        for _ in 0..5 {
            let port = free_port()?;
            let config = format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.join("data").display()
            );
            let config_path = dir.join("config.yml");
            std::fs::write(&config_path, config)
                .context(|| format!("write {}", config_path.display()))?;
            let log_path = dir.join("registry.log");
            let log = std::fs::File::create(&log_path)
                .context(|| format!("create {}", log_path.display()))?;
            let log2 = log.try_clone().context(|| "dup log".to_string())?;
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2);
            // SAFETY: prctl is async-signal-safe; nothing else runs between
            // fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(std::io::Error::from)
                });
            }
            let mut child = cmd.spawn().context(|| format!("start {REGISTRY_BIN}"))?;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Registry {
                        child,
                        dir,
                        host: format!("127.0.0.1:{port}"),
                        authorization,
                    });
                }
                if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                    // Port taken between the probe and the bind, most likely.
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        Err(Error::Timeout(format!(
            "docker-registry did not start: {log}"
        )))
    }

    /// `127.0.0.1:PORT`, as image references name it.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// One plain HTTP/1.1 request; returns the status, the headers
    /// (lower-cased names) and the body.
    fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<HttpResponse> {
        let what = || format!("{method} http://{}{path}", self.host);
        let mut stream = TcpStream::connect(&self.host).context(what)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .context(what)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        if let Some(authorization) = &self.authorization {
            head.push_str(&format!("Authorization: {authorization}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).context(what)?;
        stream.write_all(body).context(what)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).context(what)?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| Error::Protocol(format!("{}: no header end", what())))?;
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| Error::Protocol(format!("{}: bad status line", what())))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect::<Vec<_>>();
        let mut body = response[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Ok((status, headers, body))
    }

    fn expect(&self, want: u16, got: HttpResponse, what: &str) -> Result<Vec<(String, String)>> {
        if got.0 != want {
            return Err(Error::Protocol(format!(
                "{what}: HTTP {} (wanted {want}): {}",
                got.0,
                String::from_utf8_lossy(&got.2)
            )));
        }
        Ok(got.1)
    }

    /// Uploads one blob (monolithic: POST an upload, PUT it with `?digest=`).
    pub fn push_blob(&self, repo: &str, digest: &str, data: &[u8]) -> Result<()> {
        let what = format!("push blob {digest} to {repo}");
        let got = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), None, &[])?;
        let headers = self.expect(202, got, &what)?;
        let location = headers
            .iter()
            .find(|(k, _)| k == "location")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Error::Protocol(format!("{what}: no Location")))?;
        let path = match location.find("/v2/") {
            Some(i) => location[i..].to_string(),
            None => return Err(Error::Protocol(format!("{what}: Location {location:?}"))),
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let got = self.request(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            Some("application/octet-stream"),
            data,
        )?;
        self.expect(201, got, &what).map(|_| ())
    }

    /// Pushes a one-layer image as `repo:tag`: busybox-static as
    /// `/bin/busybox` (uncompressed OCI layer), an OCI config whose `USER`
    /// is `user`. `scratch` is a directory the push may write into.
    pub fn push_busybox(
        &self,
        scratch: &Path,
        repo: &str,
        tag: &str,
        user: &str,
    ) -> Result<PushedImage> {
        let root = scratch.join("rootfs");
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).context(|| format!("create {}", bin.display()))?;
        let target = bin.join("busybox");
        if !target.exists() {
            std::fs::copy(BUSYBOX, &target).context(|| format!("copy {BUSYBOX}"))?;
        }
        let layer_path = scratch.join("layer.tar");
        let out = Command::new("tar")
            .arg("--numeric-owner")
            .arg("--owner=0")
            .arg("--group=0")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&layer_path)
            .arg("bin")
            .output()
            .context(|| "tar the layer".to_string())?;
        if !out.status.success() {
            return Err(Error::Protocol(format!(
                "tar: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let layer = std::fs::read(&layer_path).context(|| "read layer".to_string())?;
        let layer_digest = sha256(&layer_path)?;

        let config = serde_json::json!({
            "architecture": oci_arch(),
            "os": "linux",
            "config": {
                "User": user,
                "Env": ["PATH=/bin"],
                "Cmd": ["/bin/busybox", "top"],
            },
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let config = serde_json::to_vec(&config).context(|| "encode config".to_string())?;
        let config_path = scratch.join("config.json");
        std::fs::write(&config_path, &config).context(|| "write config".to_string())?;
        let config_digest = sha256(&config_path)?;

        self.push_blob(repo, &layer_digest, &layer)?;
        self.push_blob(repo, &config_digest, &config)?;

        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        });
        let manifest = serde_json::to_vec(&manifest).context(|| "encode manifest".to_string())?;
        let manifest_path = scratch.join("manifest.json");
        std::fs::write(&manifest_path, &manifest).context(|| "write manifest".to_string())?;
        let manifest_digest = sha256(&manifest_path)?;
        let got = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            Some("application/vnd.oci.image.manifest.v1+json"),
            &manifest,
        )?;
        self.expect(201, got, &format!("push manifest {repo}:{tag}"))?;

        let repository = format!("{}/{repo}", self.host);
        Ok(PushedImage {
            reference: format!("{repository}:{tag}"),
            repository,
            id: config_digest,
            manifest_digest,
            size: (layer.len() + config.len()) as u64,
        })
    }

    /// Pushes `image` as `repo:tag`: its layers and config, then its
    /// manifest (with the media type it names).
    pub fn push_image(&self, repo: &str, tag: &str, image: &BuiltImage) -> Result<PushedImage> {
        for layer in &image.layers {
            self.push_blob(repo, &layer.digest, &layer.blob)?;
        }
        self.push_blob(repo, &image.config_digest, &image.config)?;
        self.push_manifest(repo, tag, &image.media_type, &image.manifest)?;
        let repository = format!("{}/{repo}", self.host);
        Ok(PushedImage {
            reference: format!("{repository}:{tag}"),
            repository,
            id: image.config_digest.clone(),
            manifest_digest: image.manifest_digest.clone(),
            size: image.size(),
        })
    }

    /// Puts `manifest` under `repo:reference`.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> Result<()> {
        let got = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            Some(media_type),
            manifest,
        )?;
        self.expect(201, got, &format!("push manifest {repo}:{reference}"))
            .map(|_| ())
    }

    /// Where the registry's filesystem storage keeps the bytes of blob
    /// `digest` (`sha256:…`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join("data/docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or_default())
            .join(hex)
            .join("data")
    }
}

/// `user:bcrypt` in `dir/htpasswd`, made by apache2-utils' `htpasswd -B`
/// (docker-registry reads bcrypt entries only).
fn write_htpasswd(dir: &Path, user: &str, password: &str) -> Result<PathBuf> {
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .context(|| "run htpasswd (apache2-utils)".to_string())?;
    if !out.status.success() {
        return Err(Error::Command {
            command: "htpasswd -Bbn".into(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let file = dir.join("htpasswd");
    std::fs::write(&file, &out.stdout).context(|| format!("write {}", file.display()))?;
    Ok(file)
}

/// `Basic <base64(user:password)>`.
pub fn basic_authorization(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return out;
        };
        data = &data[end + 2..];
        if size == 0 || data.len() < size {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What [`RegistryFront`] answers for one path instead of the registry.
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// A plain-HTTP front on its own loopback port: requests for the paths it
/// was given are answered with their [`Canned`] response (a HEAD with its
/// headers only), everything else is passed to the registry behind it and
/// its answer back, byte for byte. One request per connection; stopped on
/// drop.
pub struct RegistryFront {
    host: String,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl RegistryFront {
    /// Starts a front for the registry at `upstream` (`127.0.0.1:PORT`);
    /// `canned` maps request paths (`/v2/repo/manifests/tag`, no query) to
    /// their answers.
    pub fn start(upstream: &str, canned: HashMap<String, Canned>) -> Result<RegistryFront> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context(|| "bind a registry front".to_string())?;
        let host = listener
            .local_addr()
            .map(|a| a.to_string())
            .context(|| "registry front address".to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_string();
        let canned = Arc::new(canned);
        let stopping = stop.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let upstream = upstream.clone();
                let canned = canned.clone();
                // A failed exchange is the client's to notice: it sees the
                // connection close without an answer.
                std::thread::spawn(move || {
                    let _ = serve_front(conn, &upstream, &canned);
                });
            }
        });
        Ok(RegistryFront {
            host,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// `127.0.0.1:PORT`, as image references name it.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Drop for RegistryFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so that it sees the flag.
        let _ = TcpStream::connect(&self.host);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve_front(
    mut client: TcpStream,
    upstream: &str,
    canned: &HashMap<String, Canned>,
) -> std::io::Result<()> {
    let timeout = Some(Duration::from_secs(30));
    client.set_read_timeout(timeout)?;
    let head = read_head(&mut client)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut request_line = text.lines().next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    if let Some(answer) = canned.get(path) {
        let mut reply = format!(
            "HTTP/1.1 {} Canned\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Docker-Distribution-Api-Version: registry/2.0\r\nConnection: close\r\n\r\n",
            answer.status,
            answer.content_type,
            answer.body.len()
        )
        .into_bytes();
        if method != "HEAD" {
            reply.extend_from_slice(&answer.body);
        }
        return client.write_all(&reply);
    }
    // GET and HEAD carry no body: the head is the whole request. The
    // registry closes after its answer, which ends the copy.
    let mut forwarded = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let name = line
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if name != "connection" && name != "keep-alive" {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut registry = TcpStream::connect(upstream)?;
    registry.set_read_timeout(timeout)?;
    registry.write_all(forwarded.as_bytes())?;
    std::io::copy(&mut registry, &mut client)?;
    Ok(())
}

/// The request head, up to and without its blank line.
fn read_head(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || conn.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head not terminated",
            ));
        }
        head.push(byte[0]);
    }
    head.truncate(head.len() - 4);
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_as_the_standard_says() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            basic_authorization("user", "pa:ss"),
            "Basic dXNlcjpwYTpzcw=="
        );
    }
}
