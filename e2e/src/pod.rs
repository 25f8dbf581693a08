//! Pods through corrald, over its CRI socket, the way kubelet runs them.
//!
//! - [`BridgeNetwork`]: a CNI bridge network of the test's own: a conflist
//!   with a unique bridge name and /24, host-local IPAM whose leases live in
//!   the test's directory, and portmap. Dropping it deletes the bridge.
//! - [`busybox_image`]: the test image, busybox with every applet linked.
//! - [`PodNode`]: corrald with that network, runc state in the test's run
//!   directory, the image pulled through CRI, and helpers for pods and
//!   containers. On drop (also when the test panics) every pod is stopped
//!   and removed through CRI, corrald is stopped, the bridge deleted, and
//!   what was left behind (network namespaces, veths, portmap rules, shims,
//!   bundles, container cgroups) fails the test.
//! - [`pod_config`], [`container_config`], [`parse_cri_log`]: the CRI
//!   messages and the log format, shared with the benchmark that drives
//!   containerd the same way.
//!
//! The OCI runtime of the default handler is runc, or the binary named by
//! `$CORRAL_E2E_OCI_RUNTIME` (a runc wrapper, crun).
//!
//! Nothing here decides what corrald should answer: tests assert that.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tonic::Status;

use crate::bin;
use crate::cleanup::{run_command, Cleanup};
use crate::cri::{api, CriClient, Daemon, DaemonConfig};
use crate::error::{Context, Error, Result};
use crate::image_builder::{BuiltImage, Layer, Tar, BUSYBOX};
use crate::registry::{PushedImage, Registry};
use crate::runc::Runc;

/// The bound on one RPC a helper makes: a hung daemon fails the test
/// instead of hanging the run.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// How long what a pod leaves behind gets to go away (a shim exits after
/// its last task is deleted, not at once).
pub const SETTLE: Duration = Duration::from_secs(10);

/// The repository the test image is pushed as.
pub const IMAGE_REPO: &str = "e2e/busybox";

const POLL: Duration = Duration::from_millis(50);

/// `PATH` of the test image: where `busybox --list-full` puts the applets.
const IMAGE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn random() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Bounds `f` by [`RPC_TIMEOUT`]; a timeout becomes [`Error::Timeout`].
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(RPC_TIMEOUT, f)
        .await
        .map_err(|_| Error::Timeout(format!("{what} took longer than {RPC_TIMEOUT:?}")))
}

/// An RPC's result as a fixture result: the status code and message kept.
fn rpc<T>(what: &str, result: std::result::Result<tonic::Response<T>, Status>) -> Result<T> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|s| Error::Protocol(format!("{what}: {:?}: {}", s.code(), s.message())))
}

/// A CNI bridge network of one test.
#[derive(Debug)]
pub struct BridgeNetwork {
    /// Also the CNI network's name, which portmap writes into its rules.
    bridge: String,
    /// The `a.b` of `10.a.b.0/24`.
    octets: (u8, u8),
    conf_file: PathBuf,
    removed: bool,
}

/// Subnets handed out in this process, so that parallel tests never pick
/// the same one before either has made its bridge.
static SUBNETS: OnceLock<Mutex<HashSet<(u8, u8)>>> = OnceLock::new();

impl BridgeNetwork {
    /// Writes `<conf_dir>/10-<bridge>.conflist`: bridge (gateway, no
    /// masquerade: the tests stay on the node) with host-local IPAM keeping
    /// its leases in `<work_dir>/ipam`, then portmap. The bridge itself
    /// appears with the first pod.
    pub fn create(cleanup: &Cleanup, conf_dir: &Path) -> Result<BridgeNetwork> {
        let (bridge, octets) = Self::pick()?;
        let ipam_dir = cleanup.work_dir().join("ipam");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("10.{}.{}.0/24", octets.0, octets.1)}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": ipam_dir,
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        fs::create_dir_all(conf_dir).context(|| format!("create {}", conf_dir.display()))?;
        let conf_file = conf_dir.join(format!("10-{bridge}.conflist"));
        let text = serde_json::to_string_pretty(&conflist).context(|| "encode conflist".into())?;
        fs::write(&conf_file, text).context(|| format!("write {}", conf_file.display()))?;
        Ok(BridgeNetwork {
            bridge,
            octets,
            conf_file,
            removed: false,
        })
    }

    /// A bridge name no interface has and a /24 no route covers.
    fn pick() -> Result<(String, (u8, u8))> {
        let routes = run_command(Command::new("ip").args(["-4", "route", "show", "table", "all"]))?;
        let taken = SUBNETS.get_or_init(|| Mutex::new(HashSet::new()));
        let mut taken = taken.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..100 {
            let r = random();
            // 10.100.0.0 to 10.227.255.0: clear of the 10.0/16 and
            // 10.250/16 ranges other fixtures and examples use.
            let octets = (100 + (r % 128) as u8, ((r >> 8) % 256) as u8);
            let bridge = format!("crlp{:08x}", (r >> 16) as u32);
            let prefix = format!("10.{}.{}.", octets.0, octets.1);
            let route_clash = routes.lines().any(|l| l.contains(&prefix));
            let link_clash = Path::new("/sys/class/net").join(&bridge).exists();
            if !route_clash && !link_clash && taken.insert(octets) {
                return Ok((bridge, octets));
            }
        }
        Err(Error::Unavailable(
            "no free 10.x.y.0/24 for a test bridge".into(),
        ))
    }

    /// The bridge's name, which is also the CNI network's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn conf_file(&self) -> &Path {
        &self.conf_file
    }

    /// `10.a.b.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.{}.{}.0/24", self.octets.0, self.octets.1)
    }

    /// The bridge's own address, the pods' gateway: `10.a.b.1`.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octets.0, self.octets.1, 1)
    }

    /// Whether `ip` lies in the network's /24.
    pub fn contains(&self, ip: &str) -> bool {
        ip.parse::<Ipv4Addr>()
            .map(|ip| {
                let o = ip.octets();
                o[0] == 10 && (o[1], o[2]) == self.octets
            })
            .unwrap_or(false)
    }

    /// The interfaces enslaved to the bridge: one veth per pod.
    pub fn veths(&self) -> Vec<String> {
        let dir = Path::new("/sys/class/net").join(&self.bridge).join("brif");
        let mut names: Vec<String> = fs::read_dir(dir)
            .into_iter()
            .flat_map(|e| e.flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The iptables NAT rules that name this network (portmap writes the
    /// network's name into every rule it adds for a pod).
    pub fn nat_rules(&self) -> Vec<String> {
        let Ok(out) = run_command(Command::new("iptables-save").args(["-t", "nat"])) else {
            return Vec::new();
        };
        // The name is quoted inside a quoted comment: `\"crlp…\"`.
        let needle = self.bridge.as_str();
        out.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Deletes the bridge; a bridge that never came up is fine.
    pub fn remove(&mut self) -> Result<()> {
        self.removed = true;
        if !Path::new("/sys/class/net").join(&self.bridge).exists() {
            return Ok(());
        }
        run_command(Command::new("ip").args(["link", "del", &self.bridge])).map(|_| ())
    }
}

impl Drop for BridgeNetwork {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.remove();
        }
    }
}

/// Environment variable naming the OCI runtime binary pods run with
/// (a runc wrapper, crun); runc when unset.
pub const OCI_RUNTIME_ENV: &str = "CORRAL_E2E_OCI_RUNTIME";

/// The OCI runtime binary of the fixture's default handler.
pub fn oci_runtime() -> String {
    std::env::var(OCI_RUNTIME_ENV)
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "runc".to_string())
}

/// The test image: Debian's busybox-static with every applet linked where
/// `busybox --list-full` puts it (so `PATH` finds `echo`, `wget`, `httpd`),
/// a passwd and group file, and a world-writable `/tmp`. `runtime` is the
/// config's `config` section (Entrypoint, Cmd, Env, User).
pub fn busybox_image(runtime: serde_json::Value) -> Result<BuiltImage> {
    let busybox =
        fs::read(BUSYBOX).context(|| format!("read {BUSYBOX} (Debian's busybox-static)"))?;
    let applets = run_command(Command::new(BUSYBOX).arg("--list-full"))?;
    let mut tar = Tar::new();
    for (dir, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
    ] {
        tar = tar.dir(dir, mode);
    }
    tar = tar
        .file("bin/busybox", &busybox, 0o755)
        .file("etc/passwd", PASSWD.as_bytes(), 0o644)
        .file("etc/group", GROUP.as_bytes(), 0o644);
    for applet in applets.lines().map(|l| l.trim().trim_start_matches('/')) {
        // A path leaving the root would be a broken busybox, not an applet.
        if !applet.is_empty() && applet != "bin/busybox" && !applet.contains("..") {
            tar = tar.symlink(applet, "/bin/busybox");
        }
    }
    BuiltImage::new(vec![Layer::tar(tar.finish())], runtime)
}

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// A pod's config as kubelet sends it: metadata, a log directory, a cgroup
/// parent, the pod network namespace mode.
pub fn pod_config(
    name: &str,
    namespace: &str,
    uid: &str,
    log_directory: &Path,
    cgroup_parent: &str,
) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        hostname: name.chars().take(63).collect(),
        log_directory: log_directory.display().to_string(),
        labels: [("e2e-pod".to_string(), name.to_string())].into(),
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.to_string(),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container's config as kubelet sends it: `cmd` as the command, its log
/// at `<name>.log` in the pod's log directory.
pub fn container_config(name: &str, image: &str, cmd: &[&str]) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: [("e2e-container".to_string(), name.to_string())].into(),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(api::LinuxContainerResources::default()),
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// The namespaces kubelet asks for a pod without `shareProcessNamespace`:
/// network and IPC of the pod, a PID namespace per container (so that a
/// container's first process is its PID 1).
pub fn kubelet_namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Pod as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// One line of a CRI log file: `<RFC 3339 time> <stream> <P|F> <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub time: String,
    pub stream: String,
    pub tag: String,
    pub text: String,
}

/// The lines of a CRI log file; a line not in the format is an error, so
/// that a broken writer fails the test.
pub fn parse_cri_log(text: &str) -> Result<Vec<LogLine>> {
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let mut next = || parts.next().unwrap_or_default().to_string();
            let (time, stream, tag, text) = (next(), next(), next(), next());
            let ok = time.len() >= 20
                && time.contains('T')
                && (time.ends_with('Z')
                    || time.contains('+')
                    || time.get(19..).is_some_and(|t| t.contains('-')))
                && matches!(stream.as_str(), "stdout" | "stderr")
                && matches!(tag.as_str(), "P" | "F");
            if ok {
                Ok(LogLine {
                    time,
                    stream,
                    tag,
                    text,
                })
            } else {
                Err(Error::Protocol(format!("not a CRI log line: {line:?}")))
            }
        })
        .collect()
}

/// What a daemon has made on the node that a pod or container owns: after
/// a failed call, and after the last pod is gone, there must be nothing
/// new.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// `<state>/netns/*`.
    pub netns: Vec<String>,
    /// `<state>/sandboxes/*`.
    pub sandbox_dirs: Vec<String>,
    /// `<root>/tasks/*/*` and `<state>/tasks/*/*`: the shims' bundles.
    pub bundles: Vec<String>,
    /// `<root>/images/snapshots/*`: image layers and writable layers.
    pub snapshots: Vec<String>,
    /// Ports of the test's bridge.
    pub veths: Vec<String>,
    /// NAT rules portmap wrote for the test's network.
    pub nat_rules: Vec<String>,
    /// Pids of the daemon's shims.
    pub shims: Vec<i32>,
    /// Cgroups below the pods' cgroup parents (containers and sandboxes).
    pub cgroups: Vec<String>,
}

impl Leftovers {
    /// What is in `self` but not in `before`.
    pub fn new_since(&self, before: &Leftovers) -> Leftovers {
        fn minus<T: PartialEq + Clone>(a: &[T], b: &[T]) -> Vec<T> {
            a.iter().filter(|x| !b.contains(x)).cloned().collect()
        }
        Leftovers {
            netns: minus(&self.netns, &before.netns),
            sandbox_dirs: minus(&self.sandbox_dirs, &before.sandbox_dirs),
            bundles: minus(&self.bundles, &before.bundles),
            snapshots: minus(&self.snapshots, &before.snapshots),
            veths: minus(&self.veths, &before.veths),
            nat_rules: minus(&self.nat_rules, &before.nat_rules),
            shims: minus(&self.shims, &before.shims),
            cgroups: minus(&self.cgroups, &before.cgroups),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }
}

/// The processes running `binary_name` whose working directory lies under
/// `dir`: a shim runs in its bundle, which lies in its daemon's directories.
pub fn processes_of(binary_name: &str, dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flat_map(|e| e.flatten()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let exe = fs::read_link(entry.path().join("exe")).unwrap_or_default();
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
        // A rebuilt binary shows as "name (deleted)".
        let is_binary = name.is_some_and(|n| n.split(' ').next() == Some(binary_name));
        let in_dir = fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir));
        if is_binary && in_dir && crate::cleanup::pid_alive(pid) {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

/// A `Name:  123 kB` field of `/proc/<pid>/status`, in KiB.
pub fn proc_status_kib(pid: i32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The cgroup directory of `pid` for `controller` (`memory`, `cpu`…), on
/// cgroup v1 or v2.
pub fn cgroup_dir(pid: u32, controller: &str) -> Result<PathBuf> {
    let path = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&path).context(|| format!("read {path}"))?;
    let base = Path::new(crate::cleanup::CGROUP_MOUNT);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, relative) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(relative)) = (controllers, relative) else {
            continue;
        };
        let relative = relative.trim_start_matches('/');
        if controllers.split(',').any(|c| c == controller) {
            return Ok(base.join(controller).join(relative));
        }
        if controllers.is_empty() && !base.join(controller).exists() {
            // Unified hierarchy: one tree for every controller.
            let unified =
                if base.join("unified").is_dir() && !base.join("cgroup.controllers").exists() {
                    base.join("unified")
                } else {
                    base.to_path_buf()
                };
            return Ok(unified.join(relative));
        }
    }
    Err(Error::Protocol(format!(
        "{path} names no {controller} cgroup: {text}"
    )))
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `timeout`.
pub async fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How long busybox httpd gets to listen.
const HTTPD_WAIT: Duration = Duration::from_secs(30);

/// The runtime handler every [`PodNode`] has besides the default (corral's
/// shim): Debian's `containerd-shim-runc-v2`, whose containers' output
/// corrald copies itself.
pub const RUNC_V2_HANDLER: &str = "runc-v2";

/// corrald with a CNI bridge network, runc state and pod cgroups of one
/// test, a registry holding a busybox image, and that image pulled.
pub struct PodNode {
    client: CriClient,
    /// Where the CRI connections live: they must keep being served while
    /// the test's own runtime is blocked in `Drop`, or corrald's graceful
    /// stop waits its whole grace for a connection nobody answers.
    io: IoRuntime,
    daemon: Option<Daemon>,
    config: DaemonConfig,
    network: BridgeNetwork,
    image: PushedImage,
    runc_root: PathBuf,
    /// Configs of the pods run through [`PodNode::run_pod_with`], by id:
    /// CreateContainer needs them, and teardown looks below their cgroup
    /// parents.
    pods: Mutex<BTreeMap<String, api::PodSandboxConfig>>,
    /// What the node held once the image was pulled and before any pod:
    /// the image's own snapshots.
    baseline: Leftovers,
    /// Earlier daemons' logs, for failure messages after a restart.
    old_logs: String,
    torn_down: bool,
    // Dropped after the daemon is stopped: the registry, then everything
    // the test made on the node.
    registry: Registry,
    cleanup: Cleanup,
}

impl PodNode {
    /// Starts everything; `extra_yaml` is added to corrald's config (keys
    /// other than `runtimes`, which the fixture sets).
    pub async fn start() -> Result<PodNode> {
        PodNode::start_with("").await
    }

    /// As [`PodNode::start`], with more top-level YAML for corrald.
    pub async fn start_with(extra_yaml: &str) -> Result<PodNode> {
        let cleanup = Cleanup::new()?;
        let registry = Registry::start(cleanup.work_dir().join("registry"))?;
        let built = busybox_image(
            serde_json::json!({"Env": [format!("PATH={IMAGE_PATH}")], "Cmd": ["sh"]}),
        )?;
        let image = registry
            .push_image(IMAGE_REPO, "1.0", &built)
            .map_err(|e| {
                Error::Protocol(format!("push the test image: {e}\n{}", registry.log()))
            })?;
        let mut config = DaemonConfig::new(&cleanup, "");
        let runc_root = cleanup.run_dir().join("runc");
        // The shim keeps each task namespace's containers in a directory
        // of its own below the root; kubelet's pods are in `k8s.io`.
        cleanup.track_runc_root(&Runc::new(&runc_root));
        cleanup.track_runc_root(&Runc::new(runc_root.join("k8s.io")));
        let network = BridgeNetwork::create(&cleanup, &config.cni_conf_dir)?;
        config.yaml = format!(
            "runtimes:\n  \"\":\n    shim: io.containerd.corral.v2\n    binary: {runc}\n    root: {root}\n  \
             {RUNC_V2_HANDLER}:\n    shim: io.containerd.runc.v2\n    binary: {runc}\n    root: {root}\n{extra_yaml}",
            runc = oci_runtime(),
            root = runc_root.display()
        );
        // Bundles and the snapshots holding the image live under the
        // daemon's root: a crashed test's mounts are found there.
        let daemon = Daemon::start_with(&cleanup, config)?;
        let config = daemon.config().clone();
        let io = IoRuntime::new()?;
        let mut client = io.connect(&config.socket).await?;
        let pulled = within(
            "PullImage",
            client.images.pull_image(api::PullImageRequest {
                image: Some(api::ImageSpec {
                    image: image.reference.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await?;
        rpc(&format!("PullImage {}", image.reference), pulled).map_err(|e| {
            Error::Protocol(format!(
                "{e}\ncorrald: {}\nregistry: {}",
                daemon.stderr(),
                registry.log()
            ))
        })?;
        let mut node = PodNode {
            client,
            io,
            daemon: Some(daemon),
            config,
            network,
            image,
            runc_root,
            pods: Mutex::new(BTreeMap::new()),
            baseline: Leftovers::default(),
            old_logs: String::new(),
            torn_down: false,
            registry,
            cleanup,
        };
        node.baseline = node.leftovers();
        Ok(node)
    }

    /// What the node held before the first pod: the pulled image's
    /// snapshots, nothing else.
    pub fn baseline(&self) -> &Leftovers {
        &self.baseline
    }

    /// A CRI client on the daemon's socket (a clone: cheap, shares the
    /// connection).
    pub fn client(&self) -> CriClient {
        self.client.clone()
    }

    pub fn cleanup(&self) -> &Cleanup {
        &self.cleanup
    }

    pub fn network(&self) -> &BridgeNetwork {
        &self.network
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// The pulled image's reference.
    pub fn image(&self) -> &str {
        &self.image.reference
    }

    pub fn pushed_image(&self) -> &PushedImage {
        &self.image
    }

    /// runc's state directory for this daemon's containers.
    pub fn runc_root(&self) -> &Path {
        &self.runc_root
    }

    /// The running daemon's pid, if one runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// What every daemon of this node has logged so far.
    pub fn daemon_log(&self) -> String {
        let current = self.daemon.as_ref().map(Daemon::stderr).unwrap_or_default();
        format!("{}{current}", self.old_logs)
    }

    /// The pod config [`PodNode::run_pod`] uses: `name` plus a unique
    /// namespace and uid, a log directory in the test's work directory, a
    /// cgroup parent in the test's cgroup subtree.
    pub fn pod_config(&self, name: &str) -> api::PodSandboxConfig {
        let local = self.cleanup.local_name(name);
        pod_config(
            name,
            &format!("e2e-{}", self.cleanup.unique()),
            &self.cleanup.name("uid"),
            &self.cleanup.work_dir().join("pods").join(&local),
            &self.cleanup.cgroup_path(&local),
        )
    }

    /// A container config for the test image running `cmd`.
    pub fn container_config(&self, name: &str, cmd: &[&str]) -> api::ContainerConfig {
        container_config(name, &self.image.reference, cmd)
    }

    /// RunPodSandbox with [`PodNode::pod_config`]`(name)`.
    pub async fn run_pod(&self, name: &str) -> Result<String> {
        self.run_pod_with(self.pod_config(name)).await
    }

    /// RunPodSandbox with `config`; the pod is remembered for
    /// [`PodNode::create_container`] and the teardown.
    pub async fn run_pod_with(&self, config: api::PodSandboxConfig) -> Result<String> {
        let result = self.try_run_pod(config).await;
        result.map_err(|s| self.rpc_error("RunPodSandbox", s))
    }

    /// RunPodSandbox with `config`, the status as corrald returned it.
    pub async fn try_run_pod(
        &self,
        config: api::PodSandboxConfig,
    ) -> std::result::Result<String, Status> {
        self.try_run_pod_on(config, "").await
    }

    /// RunPodSandbox of [`PodNode::pod_config`]`(name)` under the runtime
    /// handler `handler` (a RuntimeClass).
    pub async fn run_pod_on(&self, name: &str, handler: &str) -> Result<String> {
        let result = self.try_run_pod_on(self.pod_config(name), handler).await;
        result.map_err(|s| self.rpc_error("RunPodSandbox", s))
    }

    async fn try_run_pod_on(
        &self,
        config: api::PodSandboxConfig,
        handler: &str,
    ) -> std::result::Result<String, Status> {
        let mut client = self.client();
        let request = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        let response = tokio::time::timeout(RPC_TIMEOUT, client.runtime.run_pod_sandbox(request))
            .await
            .map_err(|_| Status::deadline_exceeded("RunPodSandbox: fixture timeout"))??;
        let id = response.into_inner().pod_sandbox_id;
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), config);
        Ok(id)
    }

    /// The config a pod was run with.
    pub fn pod_config_of(&self, pod: &str) -> Option<api::PodSandboxConfig> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.get(pod).cloned()
    }

    /// CreateContainer in `pod` (run by this fixture) with `config`.
    pub async fn create_container(
        &self,
        pod: &str,
        config: api::ContainerConfig,
    ) -> Result<String> {
        let result = self.try_create_container(pod, config).await;
        result.map_err(|s| self.rpc_error("CreateContainer", s))
    }

    /// CreateContainer, the status as corrald returned it.
    pub async fn try_create_container(
        &self,
        pod: &str,
        config: api::ContainerConfig,
    ) -> std::result::Result<String, Status> {
        let mut client = self.client();
        let request = api::CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config),
            sandbox_config: self.pod_config_of(pod),
        };
        let response = tokio::time::timeout(RPC_TIMEOUT, client.runtime.create_container(request))
            .await
            .map_err(|_| Status::deadline_exceeded("CreateContainer: fixture timeout"))??;
        Ok(response.into_inner().container_id)
    }

    /// StartContainer.
    pub async fn start_container(&self, container: &str) -> Result<()> {
        let mut client = self.client();
        let request = api::StartContainerRequest {
            container_id: container.to_string(),
        };
        self.done("StartContainer", client.runtime.start_container(request))
            .await
    }

    /// CreateContainer and StartContainer of `cmd` in `pod`.
    pub async fn run_container(&self, pod: &str, name: &str, cmd: &[&str]) -> Result<String> {
        let id = self
            .create_container(pod, self.container_config(name, cmd))
            .await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// Runs busybox httpd serving `token` on port 80 in `pod` and waits
    /// until it listens; the container's id.
    pub async fn run_http_server(&self, pod: &str, token: &str) -> Result<String> {
        let script = format!(
            "mkdir -p /www && echo {token} > /www/index.html && exec httpd -f -p 80 -h /www"
        );
        let id = self
            .run_container(pod, "web", &["sh", "-c", &script])
            .await?;
        let pid = self.container_pid(&id).await?;
        // Listening once its namespace's TCP table has port 80 (0050) in
        // state LISTEN (0A); busybox httpd listens on IPv6's any address
        // when it can.
        let listening = poll(HTTPD_WAIT, || {
            ["tcp", "tcp6"]
                .iter()
                .filter_map(|t| fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
                .any(|t| {
                    t.lines()
                        .any(|l| l.contains(":0050 ") && l.contains(" 0A "))
                })
                .then_some(())
        })
        .await;
        if listening.is_none() {
            let log = self.read_log(&id).await.unwrap_or_default();
            return Err(Error::Timeout(format!(
                "httpd in {pod} does not listen on :80; its log: {log:?}"
            )));
        }
        Ok(id)
    }

    /// Awaits an RPC whose answer is only success, within the fixture's
    /// timeout; a failure carries corrald's log.
    async fn done<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    ) -> Result<()> {
        within(what, call)
            .await?
            .map(drop)
            .map_err(|s| self.rpc_error(what, s))
    }

    /// StopContainer with `timeout` seconds of grace.
    pub async fn stop(&self, container: &str, timeout: i64) -> Result<()> {
        let mut client = self.client();
        let request = api::StopContainerRequest {
            container_id: container.to_string(),
            timeout,
        };
        self.done("StopContainer", client.runtime.stop_container(request))
            .await
    }

    /// RemoveContainer.
    pub async fn remove_container(&self, container: &str) -> Result<()> {
        let mut client = self.client();
        let request = api::RemoveContainerRequest {
            container_id: container.to_string(),
        };
        self.done("RemoveContainer", client.runtime.remove_container(request))
            .await
    }

    /// StopPodSandbox.
    pub async fn stop_pod(&self, pod: &str) -> Result<()> {
        let mut client = self.client();
        let request = api::StopPodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        };
        self.done("StopPodSandbox", client.runtime.stop_pod_sandbox(request))
            .await
    }

    /// RemovePodSandbox.
    pub async fn remove_pod(&self, pod: &str) -> Result<()> {
        let mut client = self.client();
        let request = api::RemovePodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        };
        self.done(
            "RemovePodSandbox",
            client.runtime.remove_pod_sandbox(request),
        )
        .await
    }

    /// ContainerStatus, verbose: the status and the parsed `info` JSON.
    pub async fn container_status(
        &self,
        container: &str,
    ) -> Result<(api::ContainerStatus, serde_json::Value)> {
        let mut client = self.client();
        let request = api::ContainerStatusRequest {
            container_id: container.to_string(),
            verbose: true,
        };
        let result = within("ContainerStatus", client.runtime.container_status(request)).await?;
        let response = result
            .map_err(|s| self.rpc_error("ContainerStatus", s))?
            .into_inner();
        let info = response
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or(serde_json::Value::Null);
        let status = response
            .status
            .ok_or_else(|| Error::Protocol(format!("ContainerStatus {container}: no status")))?;
        Ok((status, info))
    }

    /// The host pid of a running container's process (verbose info `pid`).
    pub async fn container_pid(&self, container: &str) -> Result<u32> {
        let (_, info) = self.container_status(container).await?;
        info["pid"]
            .as_u64()
            .filter(|p| *p > 0)
            .map(|p| p as u32)
            .ok_or_else(|| Error::Protocol(format!("ContainerStatus info has no pid: {info}")))
    }

    /// PodSandboxStatus, verbose: the status and the parsed `info` JSON.
    pub async fn pod_status(
        &self,
        pod: &str,
    ) -> Result<(api::PodSandboxStatus, serde_json::Value)> {
        let mut client = self.client();
        let request = api::PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_string(),
            verbose: true,
        };
        let result = within(
            "PodSandboxStatus",
            client.runtime.pod_sandbox_status(request),
        )
        .await?;
        let response = result
            .map_err(|s| self.rpc_error("PodSandboxStatus", s))?
            .into_inner();
        let info = response
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or(serde_json::Value::Null);
        let status = response
            .status
            .ok_or_else(|| Error::Protocol(format!("PodSandboxStatus {pod}: no status")))?;
        Ok((status, info))
    }

    /// Polls ContainerStatus until the container has exited.
    pub async fn wait_exited(
        &self,
        container: &str,
        timeout: Duration,
    ) -> Result<api::ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, _) = self.container_status(container).await?;
            if status.state == api::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "container {container} not exited after {timeout:?}: {status:?}\ncorrald: {}",
                    self.daemon_log()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// ExecSync of `cmd` with a timeout in seconds (0: none); the status as
    /// corrald returned it.
    pub async fn exec_sync(
        &self,
        container: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> std::result::Result<api::ExecSyncResponse, Status> {
        let mut client = self.client();
        let request = api::ExecSyncRequest {
            container_id: container.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        };
        let response = tokio::time::timeout(RPC_TIMEOUT, client.runtime.exec_sync(request))
            .await
            .map_err(|_| Status::deadline_exceeded("ExecSync: fixture timeout"))??;
        Ok(response.into_inner())
    }

    /// The container's log file, as written so far.
    pub async fn read_log(&self, container: &str) -> Result<String> {
        let (status, _) = self.container_status(container).await?;
        if status.log_path.is_empty() {
            return Err(Error::Protocol(format!(
                "container {container} has no log path"
            )));
        }
        fs::read_to_string(&status.log_path).context(|| format!("read {}", status.log_path))
    }

    /// Polls the container's log until a line's text is `text`; returns the
    /// whole log.
    pub async fn wait_log_line(
        &self,
        container: &str,
        text: &str,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.read_log(container).await.unwrap_or_default();
            if parse_cri_log(&log).is_ok_and(|lines| lines.iter().any(|l| l.text == text)) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "no line {text:?} in the log of {container} after {timeout:?}: {log:?}\ncorrald: {}",
                    self.daemon_log()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// ListPodSandbox without a filter: ids.
    pub async fn pod_ids(&self) -> Result<Vec<String>> {
        let mut client = self.client();
        let request = api::ListPodSandboxRequest { filter: None };
        let result = within("ListPodSandbox", client.runtime.list_pod_sandbox(request)).await?;
        let items = result.map_err(|s| self.rpc_error("ListPodSandbox", s))?;
        Ok(items.into_inner().items.into_iter().map(|p| p.id).collect())
    }

    /// ListContainers without a filter: ids.
    pub async fn container_ids(&self) -> Result<Vec<String>> {
        let mut client = self.client();
        let request = api::ListContainersRequest { filter: None };
        let result = within("ListContainers", client.runtime.list_containers(request)).await?;
        let items = result.map_err(|s| self.rpc_error("ListContainers", s))?;
        Ok(items
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect())
    }

    /// SIGKILLs corrald and waits for it to be gone; pods keep running.
    pub fn kill_daemon(&mut self) -> Result<()> {
        let Some(mut daemon) = self.daemon.take() else {
            return Ok(());
        };
        daemon.signal(Signal::SIGKILL)?;
        daemon.wait_exit(Duration::from_secs(10))?;
        self.old_logs.push_str(&daemon.stderr());
        self.old_logs.push_str("---- corrald killed ----\n");
        Ok(())
    }

    /// Starts corrald again on the same config and reconnects.
    pub async fn restart_daemon(&mut self) -> Result<()> {
        if let Some(daemon) = &self.daemon {
            return Err(Error::Protocol(format!(
                "corrald {} still runs",
                daemon.pid()
            )));
        }
        let daemon = Daemon::start_with(&self.cleanup, self.config.clone()).map_err(|e| {
            Error::Protocol(format!("restart corrald: {e}\nearlier: {}", self.old_logs))
        })?;
        self.client = self.io.connect(&daemon.config().socket).await?;
        self.daemon = Some(daemon);
        Ok(())
    }

    /// What the daemon owns on the node right now.
    pub fn leftovers(&self) -> Leftovers {
        let state = &self.config.state;
        let root = &self.config.root;
        let mut bundles = Vec::new();
        for tasks in [root.join("tasks"), state.join("tasks")] {
            for ns in listing(&tasks) {
                bundles.extend(
                    listing(&tasks.join(&ns))
                        .into_iter()
                        .map(|id| format!("{ns}/{id}")),
                );
            }
        }
        bundles.sort();
        Leftovers {
            netns: listing(&state.join("netns")),
            sandbox_dirs: listing(&state.join("sandboxes")),
            bundles,
            snapshots: listing(&root.join("images").join("snapshots")),
            veths: self.network.veths(),
            nat_rules: self.network.nat_rules(),
            shims: processes_of(bin::SHIM, &self.config.dir),
            cgroups: self.pod_cgroups(),
        }
    }

    /// Polls until nothing is left beyond `before`; returns what still is.
    pub async fn settled_since(&self, before: &Leftovers) -> Leftovers {
        let mut last = Leftovers::default();
        let found = poll(SETTLE, || {
            last = self.leftovers().new_since(before);
            last.is_empty().then_some(())
        })
        .await;
        match found {
            Some(()) => Leftovers::default(),
            None => last,
        }
    }

    /// Cgroup directories below the cgroup parents of this fixture's pods.
    fn pod_cgroups(&self) -> Vec<String> {
        let base = Path::new(crate::cleanup::CGROUP_MOUNT);
        let hierarchy = if base.join("memory").is_dir() {
            base.join("memory")
        } else {
            base.to_path_buf()
        };
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = Vec::new();
        for config in pods.values() {
            let Some(parent) = config.linux.as_ref().map(|l| l.cgroup_parent.clone()) else {
                continue;
            };
            let dir = hierarchy.join(parent.trim_start_matches('/'));
            found.extend(
                listing_dirs(&dir)
                    .into_iter()
                    .map(|d| format!("{parent}/{d}")),
            );
        }
        found.sort();
        found
    }

    fn rpc_error(&self, what: &str, status: Status) -> Error {
        Error::Protocol(format!(
            "{what}: {:?}: {}\ncorrald log:\n{}",
            status.code(),
            status.message(),
            tail(&self.daemon_log(), 60)
        ))
    }

    /// Stops and removes every pod through CRI, stops corrald, deletes the
    /// bridge; returns what was left behind (empty: clean). Runs once; on a
    /// thread of its own with its own tokio runtime, so it works from a
    /// test's runtime, from a bench's `main`, and from `Drop`.
    pub fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => runtime.block_on(self.teardown_steps()),
                    Err(e) => vec![format!("teardown: tokio runtime: {e}")],
                }
            });
            worker
                .join()
                .unwrap_or_else(|_| vec!["teardown panicked".to_string()])
        })
    }

    async fn teardown_steps(&mut self) -> Vec<String> {
        let mut leaks = Vec::new();
        let daemon_alive = self.daemon.is_some();
        if !daemon_alive {
            // A test that killed corrald and failed before restarting it:
            // only a daemon can undo its pods.
            if let Err(e) = self.restart_daemon().await {
                leaks.push(format!("restart corrald for the teardown: {e}"));
            }
        }
        if self.daemon.is_some() && leaks.is_empty() {
            self.remove_all_pods(&mut leaks).await;
            let baseline = self.baseline.clone();
            let left = self.settled_since(&baseline).await;
            if !left.is_empty() {
                leaks.push(format!("left after every pod was removed: {left:?}"));
            }
        }
        if let Some(mut daemon) = self.daemon.take() {
            match daemon.stop() {
                Ok(status) if status.success() => {}
                Ok(status) => leaks.push(format!("corrald exited with {status} on SIGTERM")),
                Err(e) => leaks.push(format!("stop corrald: {e}")),
            }
            self.old_logs.push_str(&daemon.stderr());
        }
        if let Err(e) = self.network.remove() {
            leaks.push(format!("delete bridge {}: {e}", self.network.bridge()));
        }
        leaks
    }

    async fn remove_all_pods(&mut self, leaks: &mut Vec<String>) {
        let pods = match self.pod_ids().await {
            Ok(pods) => pods,
            Err(e) => {
                leaks.push(format!("list pods for the teardown: {e}"));
                return;
            }
        };
        for pod in &pods {
            if let Err(e) = self.stop_pod(pod).await {
                leaks.push(format!("teardown: {e}"));
            }
            if let Err(e) = self.remove_pod(pod).await {
                leaks.push(format!("teardown: {e}"));
            }
        }
        match (self.pod_ids().await, self.container_ids().await) {
            (Ok(p), Ok(c)) if p.is_empty() && c.is_empty() => {}
            (p, c) => leaks.push(format!(
                "listed after the teardown: pods {p:?}, containers {c:?}"
            )),
        }
    }
}

impl Drop for PodNode {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let leaks = self.teardown();
        if panicking {
            eprintln!(
                "corral-e2e pod node {}: corrald log:\n{}",
                self.cleanup.unique(),
                tail(&self.old_logs, 200)
            );
        }
        if leaks.is_empty() {
            return;
        }
        for leak in &leaks {
            eprintln!("corral-e2e pod node {}: {leak}", self.cleanup.unique());
        }
        if !panicking {
            panic!(
                "pod node {} left {} thing(s) behind: {leaks:?}\ncorrald log:\n{}",
                self.cleanup.unique(),
                leaks.len(),
                tail(&self.old_logs, 80)
            );
        }
    }
}

/// A small runtime of the fixture's own for its CRI connections; shut down
/// without blocking, so that dropping it inside a test's runtime is fine.
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn new() -> Result<IoRuntime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pod-node-io")
            .enable_all()
            .build()
            .map(|rt| IoRuntime(Some(rt)))
            .context(|| "start the CRI connections' runtime".into())
    }

    /// A client whose connection is driven by this runtime, usable from
    /// any other.
    async fn connect(&self, socket: &Path) -> Result<CriClient> {
        let rt = self
            .0
            .as_ref()
            .ok_or_else(|| Error::Protocol("the CRI connections' runtime is gone".into()))?;
        let socket = socket.to_path_buf();
        let task = rt.spawn(async move { CriClient::connect(socket).await });
        within("connect", task)
            .await?
            .map_err(|e| Error::Protocol(format!("connect task: {e}")))?
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Names in `dir`, sorted; none if it does not exist.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flat_map(|e| e.flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Subdirectories of `dir`, sorted.
fn listing_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flat_map(|e| e.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_parse_and_garbage_does_not() {
        let lines = parse_cri_log(
            "2024-05-01T10:00:00.123456789Z stdout F hello World\n\
             2024-05-01T10:00:00.2Z stderr P part\n",
        )
        .expect("parse");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].stream, "stdout");
        assert_eq!(lines[0].tag, "F");
        assert_eq!(lines[0].text, "hello World");
        assert_eq!(lines[1].tag, "P");
        assert!(parse_cri_log("hello World\n").is_err());
        assert!(parse_cri_log("2024-05-01T10:00:00Z stdin F x\n").is_err());
    }

    #[test]
    fn leftovers_subtract() {
        let before = Leftovers {
            shims: vec![1, 2],
            netns: vec!["a".into()],
            ..Default::default()
        };
        let after = Leftovers {
            shims: vec![1, 2, 3],
            netns: vec!["a".into()],
            ..Default::default()
        };
        assert_eq!(after.new_since(&before).shims, vec![3]);
        assert!(before.new_since(&after).is_empty());
    }
}
