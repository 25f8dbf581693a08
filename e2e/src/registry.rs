//! A real OCI registry for tests: Debian's `docker-registry` on 127.0.0.1,
//! with its own port and storage directory, killed and its directory removed
//! when dropped (also if the test panics; if the test process dies without
//! unwinding, the registry gets SIGKILL from the kernel).
//!
//! [`Registry::push_busybox`] pushes a one-layer image (busybox-static as
//! `/bin/busybox`, an OCI config with a chosen `USER`) with the distribution
//! push API over plain HTTP, so that a test can pull it through corrald.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

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

/// A running `docker-registry serve`.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: PathBuf,
    host: String,
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

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Registry {
    /// Starts a registry whose storage lives in a new directory `dir`
    /// (removed on drop).
    pub fn start(dir: impl Into<PathBuf>) -> Result<Registry> {
        let dir = dir.into();
        if !Path::new(REGISTRY_BIN).exists() {
            return Err(Error::Unavailable(format!(
                "{REGISTRY_BIN} (Debian's docker-registry) is not installed"
            )));
        }
        std::fs::create_dir_all(&dir).context(|| format!("create {}", dir.display()))?;
        for _ in 0..5 {
            let port = free_port()?;
            let config = format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
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
