//! corrald's YAML configuration: the keys of DESIGN.md ("What users see"),
//! their defaults, and their validation.
//!
//! This module owns reading the file, refusing what it cannot mean (an
//! unknown key, a cgroup driver that does not exist, a shim name containerd
//! could not resolve, a relative path) with an error that names the key, and
//! turning `runtimes` into the runtime layer's [`Handlers`]. Every key is
//! optional; an absent file section takes the defaults below, which serve a
//! single node.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use corral_runtime::handlers::{shim_binary_name, Handlers, RuntimeHandler};
use serde::Deserialize;

/// Where kubelet and crictl reach corrald.
pub const DEFAULT_SOCKET: &str = "/run/corral/corral.sock";
/// What survives a reboot: metadata, content, snapshots, bundles.
pub const DEFAULT_ROOT: &str = "/var/lib/corral";
/// What a reboot wipes: shim sockets, runtime state.
pub const DEFAULT_STATE: &str = "/run/corral";
/// libcni's and kubelet's conventional CNI configuration directory.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Debian's containernetworking-plugins directory first, then the upstream one.
pub const DEFAULT_CNI_BIN_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];
/// The streaming server listens on loopback only unless told otherwise, as
/// containerd's does: kubelet proxies streams from the API server.
pub const DEFAULT_STREAMING_ADDRESS: &str = "127.0.0.1";

/// `sun_path` is 108 bytes including the terminating NUL; a longer path fails
/// at bind time with an errno that does not say why.
const MAX_SOCKET_PATH: usize = 107;

/// Why a configuration was refused. Every variant names the file and,
/// where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Malformed YAML, a value of the wrong type or an unknown key. The
    /// parser's message already carries the key's path and its line and
    /// column (`cni: unknown field `conf_dirs`, expected ... at line 3 column 3`).
    #[error("config {source_name}: {source}")]
    Parse {
        source_name: String,
        #[source]
        source: serde_norway::Error,
    },

    /// Well-formed, but a value is not acceptable.
    #[error("config {source_name}: {key}: {message}")]
    Invalid {
        source_name: String,
        key: String,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub log_level: LogLevel,
    pub cgroup_driver: CgroupDriver,
    /// Empty: pods run corral's built-in pause process.
    pub sandbox_image: String,
    pub cni: CniConfig,
    pub streaming: StreamingConfig,
    /// RuntimeClass handler name → how its pods run; `""` is the default
    /// handler, which exists even when not listed.
    pub runtimes: BTreeMap<String, RuntimeEntry>,
    /// Registry host (`registry.k8s.io`, `127.0.0.1:5000`) → how to reach it.
    pub registries: BTreeMap<String, RegistryConfig>,
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: DEFAULT_SOCKET.into(),
            root: DEFAULT_ROOT.into(),
            state: DEFAULT_STATE.into(),
            log_level: LogLevel::default(),
            cgroup_driver: CgroupDriver::default(),
            sandbox_image: String::new(),
            cni: CniConfig::default(),
            streaming: StreamingConfig::default(),
            runtimes: BTreeMap::new(),
            registries: BTreeMap::new(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// The level of corrald's own logs when `RUST_LOG` is not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The name `tracing`'s filters understand.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Who manages pod cgroups; kubelet must be configured with the same one,
/// which is why `RuntimeConfig` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    #[default]
    Cgroupfs,
    Systemd,
}

impl CgroupDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupDriver::Cgroupfs => "cgroupfs",
            CgroupDriver::Systemd => "systemd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CniConfig {
    /// Network configurations (`*.conflist`, `*.conf`, `*.json`).
    pub conf_dir: PathBuf,
    /// Where plugin binaries are looked up, in order.
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: DEFAULT_CNI_CONF_DIR.into(),
            bin_dirs: DEFAULT_CNI_BIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// The exec/attach/port-forward server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    pub address: String,
    /// 0: any free port.
    pub port: u16,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: DEFAULT_STREAMING_ADDRESS.into(),
            port: 0,
        }
    }
}

/// One RuntimeClass handler.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeEntry {
    /// The shim's runtime name, `io.containerd.NAME.vN`; containerd's rule
    /// turns it into the binary `containerd-shim-NAME-vN`.
    pub shim: String,
    /// The OCI runtime binary the shim drives; empty: the shim's default.
    pub binary: String,
    /// The OCI runtime's state directory; empty: the shim's default.
    pub root: PathBuf,
}

impl Default for RuntimeEntry {
    fn default() -> Self {
        RuntimeEntry {
            shim: corral_runtime::handlers::RuntimeHandler::default().shim,
            binary: String::new(),
            root: PathBuf::new(),
        }
    }
}

/// How to reach one registry host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Endpoints tried before the host itself, each `http://` or `https://`.
    pub mirrors: Vec<String>,
    /// Plain HTTP, or HTTPS without certificate verification.
    pub insecure: bool,
    pub auth: Option<RegistryAuth>,
    /// A PEM bundle trusted for this host in addition to the system's.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to serve Prometheus metrics on; empty: no metrics server.
    pub address: String,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `source_name` (the file's path) goes
    /// into every error.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        // An empty file, or one holding only comments, is a YAML null: all
        // defaults, as if no file had been given.
        let parsed: Option<Config> =
            serde_norway::from_str(text).map_err(|source| ConfigError::Parse {
                source_name: source_name.to_string(),
                source,
            })?;
        let config = parsed.unwrap_or_default();
        config.validate(source_name)?;
        Ok(config)
    }

    /// Checks what the types alone cannot: paths, shim names, addresses.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            source_name: source_name.to_string(),
            key: key.to_string(),
            message,
        };
        let absolute = |key: &str, path: &Path| {
            if path.is_absolute() {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!("{} is not an absolute path", path.display()),
                ))
            }
        };

        absolute("socket", &self.socket)?;
        let socket_len = self.socket.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(invalid(
                "socket",
                format!(
                    "{} is {socket_len} bytes long; a unix socket path may have at most {MAX_SOCKET_PATH}",
                    self.socket.display()
                ),
            ));
        }
        absolute("root", &self.root)?;
        absolute("state", &self.state)?;
        absolute("cni.conf_dir", &self.cni.conf_dir)?;
        for dir in &self.cni.bin_dirs {
            absolute("cni.bin_dirs", dir)?;
        }

        if self.streaming.address.parse::<IpAddr>().is_err() {
            return Err(invalid(
                "streaming.address",
                format!("{:?} is not an IP address", self.streaming.address),
            ));
        }
        if !self.metrics.address.is_empty() && self.metrics.address.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.address",
                format!(
                    "{:?} is not of the form IP:PORT (empty disables metrics)",
                    self.metrics.address
                ),
            ));
        }

        for (name, entry) in &self.runtimes {
            shim_binary_name(&entry.shim)
                .map_err(|e| invalid(&format!("runtimes.{name:?}.shim"), e.to_string()))?;
            if !entry.root.as_os_str().is_empty() {
                absolute(&format!("runtimes.{name:?}.root"), &entry.root)?;
            }
        }

        for (host, registry) in &self.registries {
            if host.is_empty() || host.contains('/') {
                return Err(invalid(
                    "registries",
                    format!("{host:?} is not a registry host (HOST or HOST:PORT)"),
                ));
            }
            for mirror in &registry.mirrors {
                if !(mirror.starts_with("http://") || mirror.starts_with("https://")) {
                    return Err(invalid(
                        &format!("registries.{host:?}.mirrors"),
                        format!("{mirror:?} does not start with http:// or https://"),
                    ));
                }
            }
            if let Some(ca) = &registry.ca_file {
                absolute(&format!("registries.{host:?}.ca_file"), ca)?;
            }
        }
        Ok(())
    }

    /// The handlers the runtime layer runs pods with. The default handler
    /// `""` is corral's shim driving runc unless `runtimes` overrides it.
    pub fn handlers(&self) -> Result<Handlers, corral_runtime::Error> {
        let systemd_cgroup = self.cgroup_driver == CgroupDriver::Systemd;
        let mut map = HashMap::new();
        // Listed or not, the default handler follows the cgroup driver: a
        // shim that disagrees with kubelet about it puts pods in cgroups
        // kubelet does not account.
        map.insert(
            String::new(),
            RuntimeHandler {
                systemd_cgroup,
                ..RuntimeHandler::default()
            },
        );
        for (name, entry) in &self.runtimes {
            map.insert(
                name.clone(),
                RuntimeHandler {
                    shim: entry.shim.clone(),
                    binary: entry.binary.clone(),
                    root: entry.root.clone(),
                    systemd_cgroup,
                },
            );
        }
        Handlers::new(map)
    }

    /// Where the image store lives: `<root>/images`.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The `registries` section as the image store's registry client reads
    /// it. `insecure: false` (the default) leaves the client's own rule in
    /// place: plain HTTP for loopback hosts only.
    pub fn registry_config(&self) -> corral_runtime::image::RegistryConfig {
        use corral_runtime::image::{Credentials, HostConfig};
        let hosts = self
            .registries
            .iter()
            .map(|(host, r)| {
                (
                    host.clone(),
                    HostConfig {
                        mirrors: r.mirrors.clone(),
                        insecure: r.insecure.then_some(true),
                        ca_file: r.ca_file.clone(),
                        auth: r.auth.as_ref().map(|a| Credentials {
                            username: a.username.clone(),
                            password: a.password.clone(),
                        }),
                    },
                )
            })
            .collect();
        corral_runtime::image::RegistryConfig {
            hosts,
            ..Default::default()
        }
    }

    /// Names of the RuntimeClass handlers, `""` (the default) first.
    pub fn handler_names(&self) -> Vec<String> {
        let mut names = vec![String::new()];
        names.extend(self.runtimes.keys().filter(|n| !n.is_empty()).cloned());
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, "test.yaml")
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        for text in ["", "# only a comment\n", "---\n"] {
            let config = parse(text).expect(text);
            assert_eq!(config, Config::default(), "{text:?}");
        }
        let config = Config::default();
        assert_eq!(config.socket, Path::new("/run/corral/corral.sock"));
        assert_eq!(config.root, Path::new("/var/lib/corral"));
        assert_eq!(config.state, Path::new("/run/corral"));
        assert_eq!(config.log_level, LogLevel::Info);
        assert_eq!(config.cgroup_driver, CgroupDriver::Cgroupfs);
        assert_eq!(config.sandbox_image, "");
        assert_eq!(config.cni.conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(
            config.cni.bin_dirs,
            [Path::new("/usr/lib/cni"), Path::new("/opt/cni/bin")]
        );
        assert_eq!(config.streaming.address, "127.0.0.1");
        assert_eq!(config.streaming.port, 0);
        assert_eq!(config.metrics.address, "");
    }

    #[test]
    fn the_design_documents_example_parses() {
        let text = r#"
socket: /run/corral/corral.sock
root: /var/lib/corral
state: /run/corral
log_level: debug
cgroup_driver: systemd
sandbox_image: ""
cni:
  conf_dir: /etc/cni/net.d
  bin_dirs: [/usr/lib/cni, /opt/cni/bin]
streaming:
  address: 127.0.0.1
  port: 0
runtimes:
  "":
    shim: io.containerd.corral.v2
    binary: runc
  runc-v2:
    shim: io.containerd.runc.v2
registries:
  registry.k8s.io:
    mirrors: ["http://127.0.0.1:5000"]
  127.0.0.1:5000:
    insecure: true
  private.example:
    auth: { username: u, password: p }
    ca_file: /etc/corral/certs/private.pem
metrics:
  address: ""
"#;
        let config = parse(text).expect("parse");
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(config.cgroup_driver, CgroupDriver::Systemd);
        assert_eq!(config.runtimes["runc-v2"].shim, "io.containerd.runc.v2");
        assert_eq!(config.runtimes["runc-v2"].binary, "");
        assert!(config.registries["127.0.0.1:5000"].insecure);
        assert_eq!(
            config.registries["private.example"].auth,
            Some(RegistryAuth {
                username: "u".into(),
                password: "p".into()
            })
        );
        assert_eq!(config.handler_names(), ["", "runc-v2"]);

        let registry = config.registry_config();
        assert_eq!(registry.hosts["127.0.0.1:5000"].insecure, Some(true));
        assert_eq!(registry.hosts["registry.k8s.io"].insecure, None);
        assert_eq!(
            registry.hosts["registry.k8s.io"].mirrors,
            ["http://127.0.0.1:5000"]
        );
        let private = &registry.hosts["private.example"];
        assert_eq!(
            private.auth.as_ref().map(|a| a.username.as_str()),
            Some("u")
        );
        assert_eq!(
            private.ca_file.as_deref(),
            Some(Path::new("/etc/corral/certs/private.pem"))
        );
        assert_eq!(config.images_dir(), Path::new("/var/lib/corral/images"));

        let handlers = config.handlers().expect("handlers");
        let runc_v2 = handlers.get("runc-v2").expect("runc-v2");
        assert_eq!(runc_v2.shim, "io.containerd.runc.v2");
        assert!(runc_v2.systemd_cgroup);
        assert_eq!(handlers.get("").expect("default").binary, "runc");
    }

    #[test]
    fn a_partial_section_keeps_the_other_defaults() {
        let config = parse("cni:\n  conf_dir: /tmp/net.d\n").expect("parse");
        assert_eq!(config.cni.conf_dir, Path::new("/tmp/net.d"));
        assert_eq!(config.cni.bin_dirs, CniConfig::default().bin_dirs);
        assert_eq!(config.socket, Path::new(DEFAULT_SOCKET));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name_and_place() {
        let err = parse("socket: /run/x.sock\nsokcet: /run/y.sock\n").expect_err("unknown");
        let msg = err.to_string();
        assert!(msg.contains("sokcet"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("test.yaml"), "{msg}");

        let err = parse("cni:\n  conf_dirs: /x\n").expect_err("nested unknown");
        let msg = err.to_string();
        assert!(msg.contains("conf_dirs"), "{msg}");
        assert!(msg.contains("cni"), "{msg}");

        let err = parse("runtimes:\n  kata:\n    shim: io.containerd.kata.v2\n    bin: x\n")
            .expect_err("unknown runtime key");
        assert!(err.to_string().contains("bin"), "{err}");

        let err =
            parse("registries:\n  r.example:\n    auth: {username: u, password: p, token: t}\n")
                .expect_err("unknown auth key");
        assert!(err.to_string().contains("token"), "{err}");
    }

    #[test]
    fn a_bad_cgroup_driver_names_the_key_and_the_choices() {
        let err = parse("cgroup_driver: systemdd\n").expect_err("bad driver");
        let msg = err.to_string();
        assert!(msg.contains("cgroup_driver"), "{msg}");
        assert!(msg.contains("systemdd"), "{msg}");
        assert!(msg.contains("cgroupfs") && msg.contains("systemd"), "{msg}");
    }

    #[test]
    fn a_bad_log_level_is_refused() {
        let err = parse("log_level: loud\n").expect_err("bad level");
        assert!(err.to_string().contains("log_level"), "{err}");
    }

    #[test]
    fn shim_names_must_resolve_to_a_binary() {
        let err = parse("runtimes:\n  fast:\n    shim: crun\n").expect_err("bad shim");
        let msg = err.to_string();
        assert!(msg.contains(r#"runtimes."fast".shim"#), "{msg}");
        assert!(msg.contains("io.containerd.NAME.vN"), "{msg}");
        assert!(matches!(err, ConfigError::Invalid { .. }));
    }

    #[test]
    fn a_runtime_entry_defaults_to_corrals_shim() {
        let config = parse("runtimes:\n  plain: {}\n").expect("parse");
        assert_eq!(config.runtimes["plain"].shim, "io.containerd.corral.v2");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            ("socket: relative.sock\n", "socket"),
            ("root: var/lib\n", "root"),
            ("state: run\n", "state"),
            ("cni:\n  conf_dir: net.d\n", "cni.conf_dir"),
            ("cni:\n  bin_dirs: [bin]\n", "cni.bin_dirs"),
            ("streaming:\n  address: localhost:1\n", "streaming.address"),
            ("metrics:\n  address: nowhere\n", "metrics.address"),
            (
                "registries:\n  r.example:\n    mirrors: [r2.example]\n",
                "mirrors",
            ),
            (
                "registries:\n  r.example:\n    ca_file: ca.pem\n",
                "ca_file",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).expect_err(text);
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if k.contains(key)),
                "{text:?}: {err}"
            );
        }
        let long = format!("socket: /{}\n", "s".repeat(120));
        let err = parse(&long).expect_err("long socket");
        assert!(err.to_string().contains("at most 107"), "{err}");
    }

    #[test]
    fn a_port_out_of_range_is_refused() {
        let err = parse("streaming:\n  port: 70000\n").expect_err("port");
        assert!(err.to_string().contains("streaming"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = Config::load(Path::new("/nonexistent/corral.yaml")).expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/corral.yaml"),
            "{err}"
        );
    }
}
