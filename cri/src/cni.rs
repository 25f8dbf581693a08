//! CNI: the network configuration pods join, and running its plugins.
//!
//! This module owns reading `cni.conf_dir` the way libcni does (files ending
//! in `.conflist`, `.conf` or `.json`, in lexical order, the first loadable
//! one winning, a single `.conf` wrapped into a list of one), running the
//! plugins of that list with the conflist rules of the CNI spec (ADD in
//! order with each result passed on as `prevResult`, DEL in reverse order,
//! `runtimeConfig` holding only the capabilities a plugin declares), and its
//! own cache directory, where the exact list and runtime configuration used
//! at ADD are kept per pod so that DEL undoes what ADD did even if the
//! operator has changed `conf_dir` since.
//!
//! It must not touch the network itself (interfaces, addresses, routes,
//! iptables): that is the plugins' work, and the namespace is `netns.rs`'s.
//! Plugins run with an empty environment but `PATH` and the `CNI_*`
//! variables, so the daemon's own settings never leak into them.
//!
//! The directory is read on every call rather than watched: an operator (or
//! a CNI daemonset) drops a file there at any moment, `Status` is called
//! every few seconds, and reading a handful of small files is cheaper than
//! keeping a watch right across the directory being created and removed.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder};
use std::io::{self, ErrorKind};
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::netns::NetNs;

/// The extensions libcni loads; which file wins is decided by name alone.
const EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

/// The pod's interface, as every CRI runtime names it.
const IFNAME: &str = "eth0";

/// How long one plugin may run; a hung plugin must not hold a pod forever.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `PATH` for plugins when the daemon has none (iptables lives in sbin).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Marks the cache format, so that a later version can tell it apart.
const CACHE_KIND: &str = "corral-cni-attachment-v1";

/// Whether pods can get a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkStatus {
    /// `file` holds the network `name` that pods will join.
    Ready { file: PathBuf, name: String },
    /// No loadable configuration; `message` says what is missing or wrong.
    NotReady { message: String },
}

/// The network status as the configuration directory says it is now.
pub fn network_status(conf_dir: &Path) -> NetworkStatus {
    match find_network(conf_dir) {
        Ok((file, list)) => NetworkStatus::Ready {
            file,
            name: list.name,
        },
        Err(message) => NetworkStatus::NotReady { message },
    }
}

/// What CNI is told about one pod.
#[derive(Debug, Clone)]
pub struct PodNetwork<'a> {
    /// The sandbox id: `CNI_CONTAINERID` and the cache key.
    pub id: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    /// The pinned network namespace (`CNI_NETNS`).
    pub netns: &'a Path,
    /// Mappings with `host_port == 0` are left out: they only document a
    /// container port and portmap refuses them.
    pub port_mappings: Vec<PortMapping>,
    pub bandwidth: Option<Bandwidth>,
}

/// One `portMappings` capability entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// Empty for every host address.
    pub host_ip: String,
}

/// The `bandwidth` capability, in bits per second and bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bandwidth {
    pub ingress_rate: u64,
    pub ingress_burst: u64,
    pub egress_rate: u64,
    pub egress_burst: u64,
}

/// What ADD gave the pod.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkResult {
    /// The addresses on the pod's interface, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// The last plugin's result, as it printed it.
    pub raw: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No loadable network configuration: pods cannot get a network yet
    /// (a failed precondition; `Status` says NetworkReady=false).
    #[error("network not ready: {0}")]
    NotReady(String),

    /// A pod field that cannot be passed to CNI (invalid input).
    #[error("invalid pod network input: {0}")]
    InvalidInput(String),

    /// The configuration names a plugin no bin dir holds.
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    PluginNotFound { plugin: String, dirs: String },

    /// A plugin ran and failed; `code`, `msg` and `details` are its own
    /// error report (CNI error codes), or its exit status and stderr.
    #[error("CNI plugin {plugin} failed on {command}: {}", describe(*.code, .msg, .details))]
    Plugin {
        plugin: String,
        command: &'static str,
        code: Option<u64>,
        msg: String,
        details: String,
    },

    /// A plugin did not finish in time and was killed.
    #[error("CNI plugin {plugin} did not finish {command} within {timeout:?} and was killed")]
    Timeout {
        plugin: String,
        command: &'static str,
        timeout: Duration,
    },

    /// Starting a plugin or keeping the cache failed (system failure).
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn describe(code: Option<u64>, msg: &str, details: &str) -> String {
    let mut text = match code {
        Some(code) => format!("{msg} (code {code})"),
        None => msg.to_string(),
    };
    if !details.is_empty() {
        text.push_str(": ");
        text.push_str(details);
    }
    text
}

/// Runs the node's CNI network for pods.
#[derive(Debug)]
pub struct CniManager {
    conf_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    cache_dir: PathBuf,
    timeout: Duration,
    /// `PATH` and `CNI_PATH`, fixed at start.
    path: OsString,
    cni_path: OsString,
}

impl CniManager {
    /// `cache_dir` should survive reboots (e.g. under `/var/lib`): IPAM
    /// leases such as host-local's do, and DEL must release them.
    pub fn new(conf_dir: PathBuf, bin_dirs: Vec<PathBuf>, cache_dir: PathBuf) -> Self {
        let path = std::env::var_os("PATH")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_PATH.into());
        let mut cni_path = OsString::new();
        for (i, dir) in bin_dirs.iter().enumerate() {
            if i > 0 {
                cni_path.push(":");
            }
            cni_path.push(dir);
        }
        CniManager {
            conf_dir,
            bin_dirs,
            cache_dir,
            timeout: DEFAULT_TIMEOUT,
            path,
            cni_path,
        }
    }

    /// Replaces the per-plugin time limit (60 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Attaches the pod to the network: ADD on each plugin of the list.
    ///
    /// On failure the whole list is DELeted before returning, so nothing is
    /// left; should that DEL fail too, the cache entry is kept for
    /// [`CniManager::teardown`] to retry. The future should not be dropped
    /// half-way (run it in its own task): a plugin killed mid-ADD leaves
    /// whatever it had done for teardown to undo.
    pub async fn setup(&self, pod: &PodNetwork<'_>) -> Result<NetworkResult, CniError> {
        let (_, network) = find_network(&self.conf_dir).map_err(CniError::NotReady)?;
        let mut attachment = Attachment::new(pod, network)?;
        // Cached before ADD: a daemon that dies mid-ADD still knows at
        // restart which configuration to DEL.
        self.write_cache(&attachment)?;
        let netns = pod.netns.as_os_str();
        let added = match self.add_list(&attachment, netns).await {
            Ok(result) => {
                attachment.result = Some(result);
                // Without the result DEL would lack its prevResult: a pod
                // that cannot be torn down as the spec says is not set up.
                self.write_cache(&attachment)
            }
            Err(failure) => Err(failure),
        };
        if let Err(failure) = added {
            self.roll_back(&attachment, netns).await;
            return Err(failure);
        }
        let raw = attachment.result.unwrap_or_default();
        Ok(NetworkResult {
            ips: pod_ips(&raw),
            raw,
        })
    }

    /// Detaches the pod: DEL on each plugin in reverse order, with the
    /// configuration ADD used (the current one if none was cached).
    ///
    /// Idempotent: a second call, or a call once the namespace is gone
    /// (`CNI_NETNS` is then empty; plugins still release what lives outside
    /// it), succeeds. The first failing plugin stops the list, as the CNI
    /// spec requires, and the cache entry stays for a retry.
    pub async fn teardown(&self, pod: &PodNetwork<'_>) -> Result<(), CniError> {
        let attachment = match self.read_cache(pod.id)? {
            Some(cached) => cached,
            None => match find_network(&self.conf_dir) {
                Ok((_, network)) => Attachment::new(pod, network)?,
                Err(why) => {
                    // Nothing was cached, so no ADD ever started here.
                    tracing::warn!(pod = pod.id, %why, "no CNI configuration to tear down with");
                    return Ok(());
                }
            },
        };
        let netns = match NetNs::open(pod.netns) {
            Ok(ns) => ns.path().as_os_str().to_owned(),
            Err(_) => OsString::new(),
        };
        for plugin in attachment.network.plugins.iter().rev() {
            let config = attachment.plugin_config(plugin, attachment.prev_result_on_del());
            self.exec("DEL", plugin, &config, &attachment, &netns)
                .await?;
        }
        self.remove_cache(pod.id)
    }

    /// ADD on each plugin in order, each given the previous one's result.
    async fn add_list(&self, attachment: &Attachment, netns: &OsStr) -> Result<Value, CniError> {
        let mut prev_result: Option<Value> = None;
        for plugin in &attachment.network.plugins {
            let config = attachment.plugin_config(plugin, prev_result.as_ref());
            let stdout = self.exec("ADD", plugin, &config, attachment, netns).await?;
            let result = serde_json::from_slice(&stdout).map_err(|e| CniError::Plugin {
                plugin: plugin_type(plugin).to_string(),
                command: "ADD",
                code: None,
                msg: format!("printed no valid result: {e}"),
                details: String::from_utf8_lossy(&stdout).trim().to_string(),
            })?;
            prev_result = Some(result);
        }
        // The list has at least one plugin: find_network refuses empty ones.
        Ok(prev_result.unwrap_or(Value::Null))
    }

    /// Best-effort DEL of the whole list after a failed ADD, as the CNI spec
    /// asks, including plugins ADD never reached. Unlike teardown it goes on
    /// past failures, and skips plugins that are not installed: they cannot
    /// have done anything.
    async fn roll_back(&self, attachment: &Attachment, netns: &OsStr) {
        let mut clean = true;
        for plugin in attachment.network.plugins.iter().rev() {
            let config = attachment.plugin_config(plugin, attachment.prev_result_on_del());
            match self.exec("DEL", plugin, &config, attachment, netns).await {
                Ok(_) | Err(CniError::PluginNotFound { .. }) => {}
                Err(e) => {
                    clean = false;
                    let id = &attachment.container_id;
                    tracing::warn!(pod = %id, error = %e, "rolling back a failed CNI ADD");
                }
            }
        }
        if clean {
            if let Err(e) = self.remove_cache(&attachment.container_id) {
                tracing::warn!(error = %e, "removing the CNI cache entry of a rolled back ADD");
            }
        }
    }

    /// Runs one plugin and returns its stdout; a failure carries the
    /// plugin's own error report.
    async fn exec(
        &self,
        command: &'static str,
        plugin: &Map<String, Value>,
        config: &Value,
        attachment: &Attachment,
        netns: &OsStr,
    ) -> Result<Vec<u8>, CniError> {
        let kind = plugin_type(plugin);
        let binary = self.find_plugin(kind)?;
        // Serializing a Value cannot fail: its keys are strings.
        let stdin = serde_json::to_vec(config).unwrap_or_default();
        let mut cmd = Command::new(&binary);
        cmd.env_clear()
            .env("PATH", &self.path)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &attachment.container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", &attachment.if_name)
            .env("CNI_ARGS", &attachment.cni_args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Dropping the future at the timeout kills the plugin.
            .kill_on_drop(true);
        let child = spawn(&mut cmd)
            .await
            .map_err(|e| io_error("running CNI plugin", &binary, e))?;
        let output = tokio::time::timeout(self.timeout, feed_and_wait(child, &stdin))
            .await
            .map_err(|_| CniError::Timeout {
                plugin: kind.to_string(),
                command,
                timeout: self.timeout,
            })?
            .map_err(|e| io_error("running CNI plugin", &binary, e))?;
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(plugin_failure(kind, command, &output))
        }
    }

    /// The plugin's binary: the first bin dir holding it wins.
    fn find_plugin(&self, kind: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|dir| dir.join(kind))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: kind.to_string(),
                dirs: self.cni_path.to_string_lossy().into_owned(),
            })
    }

    fn cache_file(&self, id: &str) -> PathBuf {
        self.cache_dir.join(format!("{id}.json"))
    }

    /// Written to a temporary file and renamed, so a crash leaves either
    /// the old entry or the new one. Not fsynced: after a power loss the
    /// namespaces are gone, and a torn entry falls back to the current
    /// configuration; a sync per pod start costs more than that risk.
    fn write_cache(&self, attachment: &Attachment) -> Result<(), CniError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cache_dir)
            .map_err(|e| io_error("creating CNI cache directory", &self.cache_dir, e))?;
        let file = self.cache_file(&attachment.container_id);
        let temporary = self
            .cache_dir
            .join(format!(".{}.json.tmp", attachment.container_id));
        let bytes = serde_json::to_vec(attachment).unwrap_or_default();
        fs::write(&temporary, bytes)
            .map_err(|e| io_error("writing CNI cache entry", &temporary, e))?;
        fs::rename(&temporary, &file).map_err(|e| {
            let _ = fs::remove_file(&temporary);
            io_error("writing CNI cache entry", &file, e)
        })
    }

    /// The entry ADD wrote; an unreadable one counts as none (with a
    /// warning), since the current configuration is the only other guide.
    fn read_cache(&self, id: &str) -> Result<Option<Attachment>, CniError> {
        validate_id(id)?;
        let file = self.cache_file(id);
        let bytes = match fs::read(&file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("reading CNI cache entry", &file, e)),
        };
        let cached = serde_json::from_slice::<Attachment>(&bytes)
            .ok()
            .filter(|cached| cached.kind == CACHE_KIND && cached.container_id == id);
        if cached.is_none() {
            let file = file.display();
            tracing::warn!(%file, "unusable CNI cache entry, using the current configuration");
        }
        Ok(cached)
    }

    fn remove_cache(&self, id: &str) -> Result<(), CniError> {
        let file = self.cache_file(id);
        match fs::remove_file(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("removing CNI cache entry", &file, e)),
        }
    }
}

/// A network configuration list, with a single `.conf` as a list of one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkList {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cni_version: Option<String>,
    plugins: Vec<Map<String, Value>>,
}

/// Everything one pod's ADD ran with: the cache entry.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Attachment {
    kind: String,
    container_id: String,
    if_name: String,
    cni_args: String,
    network: NetworkList,
    runtime_config: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
}

impl Attachment {
    fn new(pod: &PodNetwork<'_>, network: NetworkList) -> Result<Self, CniError> {
        validate_id(pod.id)?;
        Ok(Attachment {
            kind: CACHE_KIND.to_string(),
            container_id: pod.id.to_string(),
            if_name: IFNAME.to_string(),
            cni_args: cni_args(pod)?,
            network,
            runtime_config: runtime_config(pod),
            result: None,
        })
    }

    /// The ADD result for DEL's `prevResult`, which the spec gives from
    /// version 0.4.0 on (older plugins may refuse the field).
    fn prev_result_on_del(&self) -> Option<&Value> {
        let version = self.network.cni_version.as_deref()?;
        let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        self.result.as_ref().filter(|_| (major, minor) >= (0, 4))
    }

    /// What one plugin reads on stdin: its own configuration with the list's
    /// name and version, the previous result, and the runtime values of the
    /// capabilities it declares (and no others).
    fn plugin_config(&self, plugin: &Map<String, Value>, prev_result: Option<&Value>) -> Value {
        let mut config = plugin.clone();
        config.insert("name".into(), self.network.name.clone().into());
        if let Some(version) = &self.network.cni_version {
            config.insert("cniVersion".into(), version.clone().into());
        }
        if let Some(prev) = prev_result {
            config.insert("prevResult".into(), prev.clone());
        }
        let declared = plugin.get("capabilities").and_then(Value::as_object);
        let runtime: Map<String, Value> = self
            .runtime_config
            .iter()
            .filter(|(capability, _)| {
                declared
                    .and_then(|d| d.get(capability.as_str()))
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !runtime.is_empty() {
            config.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        Value::Object(config)
    }
}

/// The first loadable configuration in `conf_dir`, or why there is none.
fn find_network(conf_dir: &Path) -> Result<(PathBuf, NetworkList), String> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!(
                "no network config found in {}: the directory does not exist",
                conf_dir.display()
            ))
        }
        Err(e) => return Err(format!("cannot read {}: {e}", conf_dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e))
        })
        // Follows symlinks: configuration is often a link into a package's
        // or a daemonset's own directory.
        .filter(|p| p.is_file())
        .collect();
    files.sort();

    let mut problems = Vec::new();
    for file in files {
        match load(&file) {
            Ok(list) => return Ok((file, list)),
            Err(why) => problems.push(format!("{}: {why}", file.display())),
        }
    }
    if problems.is_empty() {
        Err(format!("no network config found in {}", conf_dir.display()))
    } else {
        Err(format!(
            "no valid network config in {}: {}",
            conf_dir.display(),
            problems.join("; ")
        ))
    }
}

/// The file as a list, if it is a configuration libcni would load.
fn load(file: &Path) -> Result<NetworkList, String> {
    let text = fs::read_to_string(file).map_err(|e| e.to_string())?;
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err("not a JSON object".into());
    };
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or("no \"name\"")?
        .to_string();
    let cni_version = object
        .get("cniVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    let is_list = file.extension().and_then(|e| e.to_str()) == Some("conflist");
    let plugins = if is_list {
        let plugins = object
            .get("plugins")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty())
            .ok_or("no \"plugins\" in the list")?;
        plugins
            .iter()
            .enumerate()
            .map(|(i, plugin)| {
                let plugin = plugin
                    .as_object()
                    .ok_or_else(|| format!("plugin {i} is not an object"))?;
                check_type(plugin).map_err(|why| format!("plugin {i} {why}"))?;
                Ok(plugin.clone())
            })
            .collect::<Result<Vec<_>, String>>()?
    } else {
        check_type(&object)?;
        vec![object]
    };
    Ok(NetworkList {
        name,
        cni_version,
        plugins,
    })
}

/// A plugin's `type` is a file name in a bin dir, never a path.
fn check_type(plugin: &Map<String, Value>) -> Result<(), String> {
    match plugin.get("type").and_then(Value::as_str) {
        None | Some("") => Err("has no \"type\"".into()),
        Some(t) if t.contains('/') || t == "." || t == ".." => {
            Err(format!("has \"type\" {t:?}, which is not a plugin name"))
        }
        Some(_) => Ok(()),
    }
}

fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The id names the cache file: it must be a plain file name.
fn validate_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() || id == "." || id == ".." || id.contains(['/', '\0']) {
        return Err(CniError::InvalidInput(format!(
            "pod id {id:?} is not a plain name"
        )));
    }
    Ok(())
}

/// `CNI_ARGS` as kubelet-era runtimes pass it; `IgnoreUnknown` lets plugins
/// that do not know the Kubernetes keys accept them.
fn cni_args(pod: &PodNetwork<'_>) -> Result<String, CniError> {
    let pairs = [
        ("K8S_POD_NAMESPACE", pod.namespace),
        ("K8S_POD_NAME", pod.name),
        ("K8S_POD_INFRA_CONTAINER_ID", pod.id),
        ("K8S_POD_UID", pod.uid),
    ];
    let mut args = String::from("IgnoreUnknown=1");
    for (key, value) in pairs {
        if value.contains([';', '=', '\0']) {
            return Err(CniError::InvalidInput(format!(
                "{key} {value:?} cannot be passed in CNI_ARGS"
            )));
        }
        args.push_str(&format!(";{key}={value}"));
    }
    Ok(args)
}

/// The capability values the runtime offers; each plugin gets the subset it
/// declares.
fn runtime_config(pod: &PodNetwork<'_>) -> Map<String, Value> {
    let mappings: Vec<Value> = pod
        .port_mappings
        .iter()
        .filter(|p| p.host_port != 0)
        .map(|p| {
            json!({
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol.to_lowercase(),
                "hostIP": p.host_ip,
            })
        })
        .collect();
    let mut config = Map::new();
    config.insert("portMappings".into(), Value::Array(mappings));
    if let Some(b) = pod.bandwidth {
        config.insert(
            "bandwidth".into(),
            json!({
                "ingressRate": b.ingress_rate,
                "ingressBurst": b.ingress_burst,
                "egressRate": b.egress_rate,
                "egressBurst": b.egress_burst,
            }),
        );
    }
    config
}

/// The addresses of the pod's interface in a result: 1.0/0.4/0.3 `ips`
/// (leaving out those on a known interface that is not the pod's), or the
/// `ip4`/`ip6` of 0.2/0.1. IPv4 first, each family in the plugin's order.
fn pod_ips(result: &Value) -> Vec<IpAddr> {
    let interfaces = result.get("interfaces").and_then(Value::as_array);
    let on_pod_interface = |entry: &Value| {
        let Some(index) = entry.get("interface").and_then(Value::as_u64) else {
            return true;
        };
        let interface = usize::try_from(index)
            .ok()
            .and_then(|i| interfaces.and_then(|list| list.get(i)));
        match interface {
            Some(interface) => {
                interface.get("name").and_then(Value::as_str) == Some(IFNAME)
                    && interface
                        .get("sandbox")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
            }
            None => interfaces.is_none(),
        }
    };
    let listed = result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|entry| on_pod_interface(entry))
        .filter_map(|entry| entry.get("address").and_then(Value::as_str));
    let legacy = ["ip4", "ip6"]
        .into_iter()
        .filter_map(|key| result.get(key)?.get("ip")?.as_str());
    let mut ips: Vec<IpAddr> = listed
        .chain(legacy)
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect();
    ips.sort_by_key(IpAddr::is_ipv6);
    ips
}

/// Spawns, retrying briefly while the binary is still open for writing
/// (ETXTBSY): a plugin being installed, or a fork elsewhere in the daemon
/// that briefly holds a descriptor of a just-written file.
async fn spawn(cmd: &mut Command) -> io::Result<Child> {
    let mut attempts = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Writes the configuration while reading the output, so that neither side
/// can fill a pipe and wait on the other.
async fn feed_and_wait(mut child: Child, input: &[u8]) -> io::Result<Output> {
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A plugin that exits without reading gets EPIPE here; its exit
            // status is what counts.
            let _ = stdin.write_all(input).await;
        }
    };
    let (_, output) = tokio::join!(feed, child.wait_with_output());
    output
}

/// The plugin's JSON error report if it printed one, else its exit status
/// and stderr.
fn plugin_failure(plugin: &str, command: &'static str, output: &Output) -> CniError {
    #[derive(Deserialize)]
    struct Report {
        code: Option<u64>,
        msg: Option<String>,
        details: Option<String>,
    }
    let (code, msg, details) = match serde_json::from_slice::<Report>(&output.stdout) {
        Ok(report) if report.code.is_some() || report.msg.is_some() => (
            report.code,
            report.msg.unwrap_or_default(),
            report.details.unwrap_or_default(),
        ),
        _ => {
            let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
            if text.is_empty() {
                text = String::from_utf8_lossy(&output.stdout).trim().to_string();
            }
            (None, output.status.to_string(), truncate(text, 2048))
        }
    };
    CniError::Plugin {
        plugin: plugin.to_string(),
        command,
        code,
        msg,
        details,
    }
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> CniError {
    CniError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::ffi::CStr;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    const BRIDGE_LIST: &str = r#"{
        "cniVersion": "1.0.0",
        "name": "corral",
        "plugins": [
            {"type": "bridge", "bridge": "corral0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }"#;

    fn is_ready(dir: &Path) -> bool {
        matches!(network_status(dir), NetworkStatus::Ready { .. })
    }

    #[test]
    fn a_missing_directory_is_not_ready_and_named() {
        let dir = Path::new("/nonexistent/net.d");
        match network_status(dir) {
            NetworkStatus::NotReady { message } => {
                assert!(message.contains("/nonexistent/net.d"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_directory_is_not_ready_until_a_conflist_appears() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_ready(dir.path()));
        fs::write(dir.path().join("README"), "not a config").expect("write");
        assert!(!is_ready(dir.path()));
        fs::write(dir.path().join("10-corral.conflist"), BRIDGE_LIST).expect("write");
        assert_eq!(
            network_status(dir.path()),
            NetworkStatus::Ready {
                file: dir.path().join("10-corral.conflist"),
                name: "corral".into()
            }
        );
    }

    #[test]
    fn a_single_plugin_conf_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("99-loop.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .expect("write");
        assert!(is_ready(dir.path()));
    }

    #[test]
    fn broken_files_are_skipped_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("00-broken.conflist"), "{not json").expect("write");
        fs::write(
            dir.path().join("05-empty.conflist"),
            r#"{"name":"x","plugins":[]}"#,
        )
        .expect("write");
        fs::write(dir.path().join("07-notype.conf"), r#"{"name":"y"}"#).expect("write");
        fs::write(
            dir.path().join("08-path.conflist"),
            r#"{"name":"z","plugins":[{"type":"../../bin/sh"}]}"#,
        )
        .expect("write");
        match network_status(dir.path()) {
            NetworkStatus::NotReady { message } => {
                assert!(message.contains("00-broken.conflist"), "{message}");
                assert!(message.contains("no \"plugins\""), "{message}");
                assert!(message.contains("no \"type\""), "{message}");
                assert!(message.contains("not a plugin name"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // A later valid file wins over earlier broken ones.
        fs::write(dir.path().join("10-corral.conflist"), BRIDGE_LIST).expect("write");
        assert!(is_ready(dir.path()));
    }

    #[test]
    fn pod_ips_keep_the_pod_interface_and_put_ipv4_first() {
        let current = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "eth0", "sandbox": "/run/netns/x"}
            ],
            "ips": [
                {"address": "fd00:1::5/64", "interface": 1},
                {"address": "10.1.0.1/24", "interface": 0},
                {"address": "10.1.0.5/24", "interface": 1, "gateway": "10.1.0.1"}
            ]
        });
        assert_eq!(
            pod_ips(&current),
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00:1::5".parse().unwrap()
            ]
        );
        let old = json!({
            "cniVersion": "0.2.0",
            "ip6": {"ip": "fd00::7/64"},
            "ip4": {"ip": "10.2.0.7/16"}
        });
        assert_eq!(
            pod_ips(&old),
            vec![
                "10.2.0.7".parse::<IpAddr>().unwrap(),
                "fd00::7".parse().unwrap()
            ]
        );
        assert!(pod_ips(&json!({})).is_empty());
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    fn random_hex(bytes: usize) -> String {
        let mut buffer = vec![0; bytes];
        fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut buffer)
            .unwrap();
        buffer.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A 10.x.y.0/24 that no route of the host covers or lies in.
    fn free_subnet() -> [u8; 2] {
        let routes = fs::read_to_string("/proc/net/route").unwrap();
        let field = |text: &str| {
            u32::from_str_radix(text, 16)
                .ok()
                .map(|raw| u32::from_be_bytes(raw.to_ne_bytes()))
        };
        let taken: Vec<(u32, u32)> = routes
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                Some((field(fields.get(1)?)?, field(fields.get(7)?)?))
            })
            .filter(|(_, mask)| *mask != 0)
            .collect();
        loop {
            let bytes = u32::from_str_radix(&random_hex(2), 16).unwrap();
            let candidate = [100 + (bytes >> 8) as u8 % 150, bytes as u8];
            let network = u32::from_be_bytes([10, candidate[0], candidate[1], 0]);
            let overlaps = taken.iter().any(|(dst, mask)| {
                let common = mask & 0xffff_ff00;
                dst & common == network & common
            });
            if !overlaps {
                return candidate;
            }
        }
    }

    fn free_host_port() -> u16 {
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        probe.local_addr().unwrap().port()
    }

    fn portmap() -> Value {
        json!({"type": "portmap", "capabilities": {"portMappings": true}})
    }

    /// One test's network: a conflist in a temporary directory with a bridge
    /// and a one-address host-local range of its own, a namespace, a pod id.
    /// Dropping it tears the pod down and deletes the namespace and bridge,
    /// whatever the test got to.
    struct Lab {
        manager: CniManager,
        netns: NetNs,
        bridge: String,
        subnet: [u8; 2],
        network: String,
        id: String,
        dir: tempfile::TempDir,
    }

    impl Lab {
        fn new(more_plugins: Vec<Value>) -> Lab {
            let dir = tempfile::tempdir().unwrap();
            let suffix = random_hex(4);
            let (bridge, network, id) = (
                format!("crl{suffix}"),
                format!("crltest-{suffix}"),
                format!("corraltest{suffix}"),
            );
            let subnet = free_subnet();
            let [x, y] = subnet;
            let mut plugins = vec![json!({
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": format!("10.{x}.{y}.0/24"),
                        "rangeStart": format!("10.{x}.{y}.10"),
                        "rangeEnd": format!("10.{x}.{y}.10"),
                        "gateway": format!("10.{x}.{y}.1")
                    }]],
                    "dataDir": dir.path().join("ipam")
                }
            })];
            plugins.extend(more_plugins);
            let list = json!({"cniVersion": "1.0.0", "name": network, "plugins": plugins});
            let conf_dir = dir.path().join("net.d");
            fs::create_dir(&conf_dir).unwrap();
            fs::write(conf_dir.join("10-test.conflist"), list.to_string()).unwrap();
            let netns = NetNs::create(&dir.path().join("netns"), &id).unwrap();
            let manager = CniManager::new(
                conf_dir,
                vec![dir.path().join("bin"), PathBuf::from("/usr/lib/cni")],
                dir.path().join("cache"),
            );
            Lab {
                manager,
                netns,
                bridge,
                subnet,
                network,
                id,
                dir,
            }
        }

        fn pod(&self, port_mappings: Vec<PortMapping>) -> PodNetwork<'_> {
            PodNetwork {
                id: &self.id,
                name: "web",
                namespace: "default",
                uid: "0f6b8d4e-uid",
                netns: self.netns.path(),
                port_mappings,
                bandwidth: None,
            }
        }

        /// The only address host-local may hand out.
        fn pod_address(&self) -> Ipv4Addr {
            Ipv4Addr::new(10, self.subnet[0], self.subnet[1], 10)
        }

        fn lease(&self) -> PathBuf {
            self.dir
                .path()
                .join("ipam")
                .join(&self.network)
                .join(self.pod_address().to_string())
        }

        fn veths(&self) -> usize {
            fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge))
                .map(|entries| entries.count())
                .unwrap_or(0)
        }

        /// The NAT rules whose comment names this pod (bridge's masquerade
        /// and portmap's DNAT rules carry its id).
        fn nat_rules(&self) -> Vec<String> {
            let out = std::process::Command::new("iptables")
                .args(["-w", "-t", "nat", "-S"])
                .output()
                .unwrap();
            assert!(out.status.success());
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|rule| rule.contains(&self.id))
                .map(str::to_string)
                .collect()
        }

        fn nat_rules_name_the_pod(&self) -> bool {
            !self.nat_rules().is_empty()
        }

        /// Deletes what a failed test or a plugin left: rules naming the
        /// pod, and the per-pod chains holding them. `iptables -S` quotes
        /// its output for a shell, hence `sh -c`.
        fn purge_nat_rules(&self) {
            let rules = self.nat_rules();
            let chains: Vec<&str> = rules
                .iter()
                .filter_map(|rule| rule.strip_prefix("-A "))
                .filter_map(|rule| rule.split(' ').next())
                .filter(|chain| chain.starts_with("CNI-") && !chain.starts_with("CNI-HOSTPORT"))
                .collect();
            for rule in rules.iter().filter_map(|r| r.strip_prefix("-A ")) {
                let _ = std::process::Command::new("sh")
                    .args(["-c", &format!("iptables -w -t nat -D {rule}")])
                    .stderr(Stdio::null())
                    .status();
            }
            for chain in chains {
                for action in ["-F", "-X"] {
                    let _ = std::process::Command::new("iptables")
                        .args(["-w", "-t", "nat", action, chain])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }

        fn cached(&self) -> bool {
            self.dir
                .path()
                .join("cache")
                .join(format!("{}.json", self.id))
                .exists()
        }

        fn assert_nothing_left(&self) {
            assert!(!self.lease().exists(), "the address is still leased");
            assert_eq!(self.veths(), 0, "a veth is still on {}", self.bridge);
            assert!(!self.nat_rules_name_the_pod(), "NAT rules are left");
            assert!(!self.cached(), "the cache entry is left");
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            let _ = block_on(self.manager.teardown(&self.pod(Vec::new())));
            let _ = self.netns.remove();
            self.purge_nat_rules();
            let _ = std::process::Command::new("ip")
                .args(["link", "delete", &self.bridge])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// (name, flags, IPv4 address) of each address entry of the calling
    /// thread's namespace.
    fn interfaces() -> Vec<(String, u32, Option<Ipv4Addr>)> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        assert_eq!(unsafe { libc::getifaddrs(&mut head) }, 0);
        let mut found = Vec::new();
        let mut cursor = head;
        while !cursor.is_null() {
            let entry = unsafe { &*cursor };
            let name = unsafe { CStr::from_ptr(entry.ifa_name) };
            let family =
                (!entry.ifa_addr.is_null()).then(|| unsafe { (*entry.ifa_addr).sa_family } as i32);
            let address = (family == Some(libc::AF_INET)).then(|| {
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
            });
            found.push((
                name.to_string_lossy().into_owned(),
                entry.ifa_flags,
                address,
            ));
            cursor = entry.ifa_next;
        }
        unsafe { libc::freeifaddrs(head) };
        found
    }

    /// A connection to `to` lands on `listener` and carries bytes back.
    fn assert_reaches(listener: &TcpListener, to: SocketAddr) {
        let mut client = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"pong").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reply = [0; 4];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"pong");
    }

    #[test]
    fn setup_gives_the_pod_an_address_reachable_from_the_host_and_a_host_port() {
        let lab = Lab::new(vec![portmap()]);
        // Bound before the interface exists: the wildcard takes eth0 later.
        let listener = lab
            .netns
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .unwrap()
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let host_port = free_host_port();
        let pod = lab.pod(vec![PortMapping {
            host_port,
            container_port: port,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }]);

        let result = block_on(lab.manager.setup(&pod)).unwrap();
        let address = lab.pod_address();
        assert_eq!(result.ips, vec![IpAddr::V4(address)]);
        assert_eq!(result.raw["cniVersion"], "1.0.0");

        let inside = lab.netns.run(interfaces).unwrap();
        assert!(
            inside
                .iter()
                .any(|(name, _, a)| name == "eth0" && *a == Some(address)),
            "{inside:?}"
        );
        assert!(
            inside
                .iter()
                .any(|(name, flags, _)| name == "lo" && flags & libc::IFF_UP as u32 != 0),
            "{inside:?}"
        );
        assert_eq!(lab.veths(), 1);

        assert_reaches(&listener, SocketAddr::from((address, port)));
        // portmap's SNAT mode turns route_localnet on for the bridge, so the
        // host port answers on the node's loopback, as kubelet's tests ask.
        assert_reaches(
            &listener,
            SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)),
        );
    }

    #[test]
    fn teardown_frees_everything_and_is_idempotent_even_without_the_namespace() {
        let lab = Lab::new(vec![portmap()]);
        let mapping = PortMapping {
            host_port: free_host_port(),
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        };
        let pod = lab.pod(vec![mapping]);
        block_on(lab.manager.setup(&pod)).unwrap();
        assert!(lab.lease().exists());
        assert_eq!(lab.veths(), 1);
        assert!(lab.nat_rules_name_the_pod());
        assert!(lab.cached());

        block_on(lab.manager.teardown(&pod)).unwrap();
        lab.assert_nothing_left();
        let inside = lab.netns.run(interfaces).unwrap();
        assert!(
            !inside.iter().any(|(name, ..)| name == "eth0"),
            "{inside:?}"
        );
        block_on(lab.manager.teardown(&pod)).unwrap();

        // The range holds one address: getting it again proves it was freed.
        let again = block_on(lab.manager.setup(&pod)).unwrap();
        assert_eq!(again.ips, vec![IpAddr::V4(lab.pod_address())]);
        lab.netns.remove().unwrap();
        block_on(lab.manager.teardown(&pod)).unwrap();
        assert!(!lab.lease().exists());
        assert!(!lab.cached());
        // portmap's rules go; bridge (1.1.1) finds its masquerade rules
        // through the interface's addresses, so without the namespace it
        // leaves them: why corrald DELs before removing the namespace.
        let left = lab.nat_rules();
        assert!(!left.iter().any(|r| r.contains("dnat name")), "{left:?}");
        // The veth goes with the namespace, which the kernel frees lazily.
        let deadline = Instant::now() + Duration::from_secs(5);
        while lab.veths() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(lab.veths(), 0);
    }

    #[test]
    fn teardown_uses_the_configuration_cached_at_add() {
        let lab = Lab::new(vec![portmap()]);
        let pod = lab.pod(Vec::new());
        block_on(lab.manager.setup(&pod)).unwrap();
        // The operator replaces the network: DEL through this list would
        // fail, and through any other list would leak the lease.
        let conf_dir = lab.dir.path().join("net.d");
        fs::remove_file(conf_dir.join("10-test.conflist")).unwrap();
        fs::write(
            conf_dir.join("20-other.conflist"),
            r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"corral-absent-plugin"}]}"#,
        )
        .unwrap();
        block_on(lab.manager.teardown(&pod)).unwrap();
        lab.assert_nothing_left();
    }

    #[test]
    fn a_missing_plugin_fails_naming_it_and_leaves_nothing() {
        let lab = Lab::new(vec![portmap(), json!({"type": "corral-absent-plugin"})]);
        let pod = lab.pod(vec![PortMapping {
            host_port: free_host_port(),
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }]);
        let error = block_on(lab.manager.setup(&pod)).unwrap_err();
        let named = |p: &str| p == "corral-absent-plugin";
        assert!(
            matches!(&error, CniError::PluginNotFound { plugin, .. } if named(plugin)),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("corral-absent-plugin"),
            "{error}"
        );
        lab.assert_nothing_left();
    }

    #[test]
    fn a_failing_plugin_is_reported_with_its_error_and_the_list_rolled_back() {
        let lab = Lab::new(vec![json!({
            "type": "tuning",
            "sysctl": {"net.ipv4.conf.eth0.corral_no_such_setting": "1"}
        })]);
        let error = block_on(lab.manager.setup(&lab.pod(Vec::new()))).unwrap_err();
        match &error {
            CniError::Plugin {
                plugin,
                command,
                code,
                msg,
                ..
            } => {
                assert_eq!(plugin, "tuning");
                assert_eq!(*command, "ADD");
                assert!(code.is_some(), "{error:?}");
                assert!(!msg.is_empty(), "{error:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            error
                .to_string()
                .starts_with("CNI plugin tuning failed on ADD"),
            "{error}"
        );
        lab.assert_nothing_left();
    }

    /// A shell plugin that records its stdin, environment and call, and on
    /// ADD prints the result stored beside it.
    fn recording_plugin(bin: &Path, name: &str, result: &Value) {
        fs::create_dir_all(bin).unwrap();
        fs::write(bin.join(format!("{name}.result")), result.to_string()).unwrap();
        let script = format!(
            "#!/bin/sh\n\
             here=$(dirname \"$0\")\n\
             echo \"$CNI_COMMAND {name}\" >> \"$here/calls\"\n\
             cat > \"$here/{name}.$CNI_COMMAND.json\"\n\
             env > \"$here/{name}.$CNI_COMMAND.env\"\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then cat \"$here/{name}.result\"; fi\n"
        );
        let path = bin.join(name);
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn read_json(path: PathBuf) -> Value {
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
    }

    #[test]
    fn plugins_get_the_list_name_version_prev_result_and_only_their_capabilities() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let first_result = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"address": "10.213.7.5/24", "interface": 0}]
        });
        let final_result = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/x"}],
            "ips": [
                {"address": "fd00:c0:1::6/64", "interface": 1},
                {"address": "10.213.7.1/24", "interface": 0},
                {"address": "10.213.7.6/24", "interface": 1}
            ]
        });
        recording_plugin(&bin, "first", &first_result);
        recording_plugin(&bin, "second", &final_result);
        let conf_dir = dir.path().join("net.d");
        fs::create_dir(&conf_dir).unwrap();
        fs::write(
            conf_dir.join("10-rec.conflist"),
            json!({
                "cniVersion": "1.0.0",
                "name": "recorded",
                "plugins": [
                    {"type": "first", "name": "ignored", "capabilities": {"portMappings": true}},
                    {"type": "second", "cniVersion": "0.3.1", "keep": 7,
                     "capabilities": {"bandwidth": true, "portMappings": false, "ips": true}}
                ]
            })
            .to_string(),
        )
        .unwrap();
        let netns = NetNs::create(&dir.path().join("netns"), "recorded").unwrap();
        let manager = CniManager::new(conf_dir, vec![bin.clone()], dir.path().join("cache"));
        let bandwidth = Bandwidth {
            ingress_rate: 1_000_000,
            ingress_burst: 2_000_000,
            egress_rate: 3_000_000,
            egress_burst: 4_000_000,
        };
        let pod = PodNetwork {
            id: "rec0123",
            name: "web",
            namespace: "prod",
            uid: "u-1",
            netns: netns.path(),
            port_mappings: vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "TCP".into(),
                    host_ip: "127.0.0.1".into(),
                },
                PortMapping {
                    host_port: 0,
                    container_port: 9090,
                    protocol: "tcp".into(),
                    host_ip: String::new(),
                },
            ],
            bandwidth: Some(bandwidth),
        };

        let result = block_on(manager.setup(&pod));
        let _ = netns.remove();
        let result = result.unwrap();
        assert_eq!(
            result.ips,
            vec![
                "10.213.7.6".parse::<IpAddr>().unwrap(),
                "fd00:c0:1::6".parse().unwrap()
            ]
        );
        assert_eq!(result.raw, final_result);

        let first = read_json(bin.join("first.ADD.json"));
        assert_eq!(first["name"], "recorded");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert_eq!(
            first["runtimeConfig"],
            json!({"portMappings": [
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}
            ]})
        );
        let second = read_json(bin.join("second.ADD.json"));
        assert_eq!(second["cniVersion"], "1.0.0");
        assert_eq!(second["keep"], 7);
        assert_eq!(second["prevResult"], first_result);
        assert_eq!(
            second["runtimeConfig"],
            json!({"bandwidth": {
                "ingressRate": 1_000_000, "ingressBurst": 2_000_000,
                "egressRate": 3_000_000, "egressBurst": 4_000_000
            }})
        );

        let env = fs::read_to_string(bin.join("first.ADD.env")).unwrap();
        let vars: Vec<&str> = env.lines().collect();
        for expected in [
            "CNI_COMMAND=ADD".to_string(),
            "CNI_CONTAINERID=rec0123".into(),
            format!("CNI_NETNS={}", netns.path().display()),
            "CNI_IFNAME=eth0".into(),
            concat!(
                "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web;",
                "K8S_POD_INFRA_CONTAINER_ID=rec0123;K8S_POD_UID=u-1"
            )
            .into(),
            format!("CNI_PATH={}", bin.display()),
        ] {
            assert!(
                vars.contains(&expected.as_str()),
                "{expected} not in {vars:?}"
            );
        }
        // Only PATH, the CNI variables and what sh sets itself.
        for var in &vars {
            let name = var.split('=').next().unwrap();
            assert!(
                name.starts_with("CNI_") || ["PATH", "PWD", "SHLVL", "_"].contains(&name),
                "{var} leaked into the plugin's environment"
            );
        }

        // The namespace is gone: DEL runs with an empty CNI_NETNS, in
        // reverse order, each plugin given the final ADD result.
        block_on(manager.teardown(&pod)).unwrap();
        let calls = fs::read_to_string(bin.join("calls")).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            ["ADD first", "ADD second", "DEL second", "DEL first"]
        );
        let deleted = read_json(bin.join("first.DEL.json"));
        assert_eq!(deleted["prevResult"], final_result);
        assert!(deleted["runtimeConfig"]["portMappings"].is_array());
        let env = fs::read_to_string(bin.join("first.DEL.env")).unwrap();
        assert!(env.lines().any(|l| l == "CNI_NETNS="), "{env}");
        assert!(!dir.path().join("cache").join("rec0123.json").exists());
    }

    #[test]
    fn a_hung_plugin_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let script = bin.join("hang");
        fs::write(
            &script,
            concat!(
                "#!/bin/sh\n",
                "if [ \"$CNI_COMMAND\" = ADD ]; then echo $$ > \"$0.pid\"; exec sleep 30; fi\n"
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let conf_dir = dir.path().join("net.d");
        fs::create_dir(&conf_dir).unwrap();
        fs::write(
            conf_dir.join("hang.conf"),
            r#"{"cniVersion":"1.0.0","name":"hang","type":"hang"}"#,
        )
        .unwrap();
        let manager = CniManager::new(conf_dir, vec![bin.clone()], dir.path().join("cache"))
            .with_timeout(Duration::from_millis(500));
        let pod = PodNetwork {
            id: "hang0",
            name: "p",
            namespace: "n",
            uid: "u",
            netns: Path::new("/nonexistent"),
            port_mappings: Vec::new(),
            bandwidth: None,
        };
        let started = Instant::now();
        let error = block_on(manager.setup(&pod)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(&error, CniError::Timeout { plugin, command: "ADD", .. } if plugin == "hang"),
            "{error:?}"
        );
        let pid = fs::read_to_string(bin.join("hang.pid")).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        // Killed: gone, or a zombie until the runtime reaps it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = || {
            fs::read_to_string(&stat)
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        };
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "the hung plugin still runs");
    }

    #[test]
    fn setup_refuses_input_cni_cannot_carry_and_a_missing_network() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("net.d");
        fs::create_dir(&conf_dir).unwrap();
        let cache = dir.path().join("cache");
        let manager = CniManager::new(
            conf_dir.clone(),
            vec![PathBuf::from("/usr/lib/cni")],
            cache.clone(),
        );
        let pod = PodNetwork {
            id: "ok",
            name: "p",
            namespace: "n",
            uid: "u",
            netns: Path::new("/nonexistent"),
            port_mappings: Vec::new(),
            bandwidth: None,
        };
        assert!(matches!(
            block_on(manager.setup(&pod)),
            Err(CniError::NotReady(_))
        ));
        fs::write(conf_dir.join("10.conflist"), BRIDGE_LIST).unwrap();
        for bad in [
            PodNetwork {
                id: "../x",
                ..pod.clone()
            },
            PodNetwork {
                name: "a;b",
                ..pod.clone()
            },
            PodNetwork {
                namespace: "K=V",
                ..pod.clone()
            },
        ] {
            assert!(
                matches!(
                    block_on(manager.setup(&bad)),
                    Err(CniError::InvalidInput(_))
                ),
                "{bad:?}"
            );
        }
        assert!(!cache.exists());
    }
}
