//! A pod's life through CRI, and the cost of 50 pods, for corrald and — when
//! Debian's containerd is installed — containerd's CRI plugin in the same run.
//!
//! A plain program (`harness = false`) that prints:
//!
//! - median and p95 of each CRI call of a pod's life (RunPodSandbox,
//!   CreateContainer, StartContainer, StopContainer, RemoveContainer,
//!   StopPodSandbox, RemovePodSandbox) and of the whole cycle; the container
//!   traps SIGTERM and exits, so StopContainer measures the stop signal's
//!   path, not a timeout;
//! - with 50 pods of one `sleep` container each: the daemon's VmRSS, the
//!   mean VmRSS of its shims, and the median of 20 ListContainers and 20
//!   ListPodSandbox calls;
//! - the ratios corrald / containerd.
//!
//! Both daemons join the same CNI bridge network (one conflist, one
//! host-local lease directory) and pull the same busybox image from a
//! docker-registry on loopback; containerd's sandbox image is a busybox
//! `sleep` pushed there too. The lives alternate between the two daemons
//! so that a disturbance on the machine hits both alike.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo bench -p corral-e2e --bench pods   # CORRAL_BENCH_N=20, CORRAL_BENCH_PODS=50
//! ```
//!
//! Needs root. Everything it makes is removed on exit, failure included:
//! errors are values here, since the bench profile aborts on panic and an
//! abort would skip the cleanup.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use corral_e2e::bench::{count, ms, ratio, Stats};
use corral_e2e::bin;
use corral_e2e::cleanup::Cleanup;
use corral_e2e::cri::{api, CriClient};
use corral_e2e::pod::{
    busybox_image, container_config, pod_config, proc_status_kib, processes_of, PodNode,
};

const RUNS_ENV: &str = "CORRAL_BENCH_N";
const PODS_ENV: &str = "CORRAL_BENCH_PODS";
const DEFAULT_RUNS: usize = 20;
const DEFAULT_PODS: usize = 50;
/// `cargo test --all-targets` runs this program too, without `--bench`: a
/// few runs prove it works without spending a benchmark's time.
const SMOKE_RUNS: usize = 2;
const SMOKE_PODS: usize = 3;
const WARMUP: usize = 2;
const LIST_CALLS: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Seconds of grace StopContainer gives; the container exits on SIGTERM
/// long before.
const STOP_GRACE: i64 = 10;
const CONTAINERD: &str = "/usr/bin/containerd";
const CONTAINERD_SHIM: &str = "containerd-shim-runc-v2";

type Result<T, E = String> = std::result::Result<T, E>;

const CALLS: [&str; 7] = [
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
];

fn main() -> ExitCode {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let sizes = count(RUNS_ENV, DEFAULT_RUNS, SMOKE_RUNS, bench_mode)
        .and_then(|runs| Ok((runs, count(PODS_ENV, DEFAULT_PODS, SMOKE_PODS, bench_mode)?)));
    let (runs, pods) = match sizes {
        Ok(sizes) => sizes,
        Err(message) => {
            eprintln!("pods bench: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(message) = bin::require_shim() {
        eprintln!("pods bench: {message}");
        return ExitCode::FAILURE;
    }
    if bin::try_binary(bin::DAEMON).is_none() {
        eprintln!(
            "pods bench: {} not found in {}: run `cargo build --release --workspace --bins` first",
            bin::DAEMON,
            bin::bin_dir().display()
        );
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pods bench: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut node = match rt.block_on(PodNode::start()) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("pods bench: starting corrald: {e}");
            return ExitCode::FAILURE;
        }
    };
    let containerd_cleanup = Cleanup::new();
    let outcome = match &containerd_cleanup {
        Ok(cleanup) => rt.block_on(bench(&node, cleanup, runs, pods)),
        Err(e) => Err(format!("setting up: {e}")),
    };
    if let Ok(report) = &outcome {
        print!("{report}");
    }
    // corrald's pods go through corrald; containerd's leftovers, if any,
    // through the cleanup (shims killed, mounts detached).
    let leaks = node.teardown();
    drop(node);
    drop(containerd_cleanup);
    drop(rt);
    if !leaks.is_empty() {
        eprintln!("pods bench: corrald left: {leaks:?}");
        return ExitCode::FAILURE;
    }
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pods bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What one daemon measured.
struct Figures {
    /// One entry per call of [`CALLS`], then the whole cycle.
    calls: Vec<Stats>,
    daemon_rss_kib: u64,
    shim_rss_kib: f64,
    shims: usize,
    list_containers: Duration,
    list_pods: Duration,
}

struct Report {
    runs: usize,
    pods: usize,
    corrald: Figures,
    containerd: Option<Figures>,
    containerd_skipped: Option<String>,
}

/// A memory or list row: its name, how a daemon's figure shows, the ratio.
type Row = (
    &'static str,
    fn(&Figures) -> String,
    fn(&Figures, &Figures) -> f64,
);

fn mib(kib: f64) -> String {
    format!("{:7.1} MiB", kib / 1024.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pod life through CRI, n={} ({WARMUP} warm-up lives not counted); median / p95",
            self.runs
        )?;
        writeln!(
            f,
            "{:<18} {:>24} {:>24} {:>14}",
            "call", "corrald", "containerd", "ratio median"
        )?;
        let names = CALLS.iter().copied().chain(["whole cycle"]);
        for (i, name) in names.enumerate() {
            let ours = &self.corrald.calls[i];
            let theirs = self.containerd.as_ref().map(|c| &c.calls[i]);
            let pair = |s: &Stats| format!("{} /{}", ms(s.median), ms(s.p95));
            writeln!(
                f,
                "{name:<18} {:>24} {:>24} {:>14}",
                pair(ours),
                theirs.map(pair).unwrap_or_else(|| "-".into()),
                theirs
                    .map(|t| format!("{:.2}", ratio(ours.median, t.median)))
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        writeln!(f, "{} pods, one sleep container each", self.pods)?;
        let rows: [Row; 4] = [
            (
                "daemon VmRSS",
                |x| mib(x.daemon_rss_kib as f64),
                |a, b| a.daemon_rss_kib as f64 / (b.daemon_rss_kib as f64).max(1.0),
            ),
            (
                "mean shim VmRSS",
                |x| format!("{} ({} shims)", mib(x.shim_rss_kib), x.shims),
                |a, b| a.shim_rss_kib / b.shim_rss_kib.max(1.0),
            ),
            (
                "ListContainers",
                |x| ms(x.list_containers),
                |a, b| ratio(a.list_containers, b.list_containers),
            ),
            (
                "ListPodSandbox",
                |x| ms(x.list_pods),
                |a, b| ratio(a.list_pods, b.list_pods),
            ),
        ];
        for (name, show, ratio_of) in rows {
            writeln!(
                f,
                "{name:<18} {:>24} {:>24} {:>14}",
                show(&self.corrald),
                self.containerd
                    .as_ref()
                    .map(show)
                    .unwrap_or_else(|| "-".into()),
                self.containerd
                    .as_ref()
                    .map(|c| format!("{:.2}", ratio_of(&self.corrald, c)))
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        writeln!(f, "(List* figures: median of {LIST_CALLS} calls)")?;
        if let Some(why) = &self.containerd_skipped {
            writeln!(f, "containerd: not measured: {why}")?;
        }
        Ok(())
    }
}

async fn within<T, E: fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what} took longer than {TIMEOUT:?}")),
    }
}

/// How pods are named and configured on one daemon.
struct PodMaker {
    daemon: &'static str,
    image: String,
    namespace: String,
    dir: PathBuf,
    cgroup_base: String,
    next: usize,
}

impl PodMaker {
    fn pod(&mut self, what: &str) -> Result<api::PodSandboxConfig> {
        self.next += 1;
        let name = format!("{}-{what}{}", self.daemon, self.next);
        let log_dir = self.dir.join(&name);
        // kubelet makes the pod's log directory; containerd expects it.
        fs::create_dir_all(&log_dir).map_err(|e| format!("create {}: {e}", log_dir.display()))?;
        Ok(pod_config(
            &name,
            &self.namespace,
            &format!("{}-uid", name),
            &log_dir,
            &format!("{}/{name}", self.cgroup_base),
        ))
    }

    fn container(&self, cmd: &[&str]) -> api::ContainerConfig {
        container_config("main", &self.image, cmd)
    }
}

/// One pod's life; the time of each call of [`CALLS`], then the total.
async fn life(client: &mut CriClient, maker: &mut PodMaker) -> Result<Vec<Duration>> {
    let config = maker.pod("life")?;
    let container = maker.container(&["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]);
    let mut times = Vec::with_capacity(CALLS.len() + 1);
    let began = Instant::now();
    let mut lap = Instant::now();
    let mut record = |times: &mut Vec<Duration>| {
        times.push(lap.elapsed());
        lap = Instant::now();
    };

    let pod = within(
        "RunPodSandbox",
        client.runtime.run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        }),
    )
    .await?
    .into_inner()
    .pod_sandbox_id;
    record(&mut times);
    let result = async {
        let id = within(
            "CreateContainer",
            client
                .runtime
                .create_container(api::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(container),
                    sandbox_config: Some(config),
                }),
        )
        .await?
        .into_inner()
        .container_id;
        record(&mut times);
        within(
            "StartContainer",
            client.runtime.start_container(api::StartContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await?;
        record(&mut times);
        within(
            "StopContainer",
            client.runtime.stop_container(api::StopContainerRequest {
                container_id: id.clone(),
                timeout: STOP_GRACE,
            }),
        )
        .await?;
        record(&mut times);
        within(
            "RemoveContainer",
            client
                .runtime
                .remove_container(api::RemoveContainerRequest { container_id: id }),
        )
        .await?;
        record(&mut times);
        Ok::<_, String>(())
    }
    .await;
    let stop = within(
        "StopPodSandbox",
        client.runtime.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }),
    )
    .await;
    record(&mut times);
    let remove = within(
        "RemovePodSandbox",
        client
            .runtime
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            }),
    )
    .await;
    record(&mut times);
    times.push(began.elapsed());
    result?;
    stop?;
    remove?;
    Ok(times)
}

/// `pods` pods of one `sleep` container each; their ids.
async fn fill(client: &mut CriClient, maker: &mut PodMaker, pods: usize) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(pods);
    for _ in 0..pods {
        let config = maker.pod("many")?;
        let pod = within(
            "RunPodSandbox",
            client.runtime.run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }),
        )
        .await?
        .into_inner()
        .pod_sandbox_id;
        ids.push(pod.clone());
        let id = within(
            "CreateContainer",
            client
                .runtime
                .create_container(api::CreateContainerRequest {
                    pod_sandbox_id: pod,
                    config: Some(maker.container(&["sleep", "3600"])),
                    sandbox_config: Some(config),
                }),
        )
        .await?
        .into_inner()
        .container_id;
        within(
            "StartContainer",
            client
                .runtime
                .start_container(api::StartContainerRequest { container_id: id }),
        )
        .await?;
    }
    Ok(ids)
}

async fn empty(client: &mut CriClient, pods: &[String]) -> Result<()> {
    for pod in pods {
        within(
            "StopPodSandbox",
            client.runtime.stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }),
        )
        .await?;
        within(
            "RemovePodSandbox",
            client
                .runtime
                .remove_pod_sandbox(api::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                }),
        )
        .await?;
    }
    Ok(())
}

/// Stops and removes every pod the daemon lists, ignoring failures: the
/// cleanup after an error.
async fn remove_all(client: &mut CriClient) {
    let listed = within(
        "ListPodSandbox",
        client
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None }),
    )
    .await;
    if let Ok(listed) = listed {
        let ids: Vec<String> = listed
            .into_inner()
            .items
            .into_iter()
            .map(|p| p.id)
            .collect();
        let _ = empty(client, &ids).await;
    }
}

/// Medians of [`LIST_CALLS`] ListContainers and ListPodSandbox calls,
/// checking that each lists `pods` items.
async fn list_latency(client: &mut CriClient, pods: usize) -> Result<(Duration, Duration)> {
    let mut containers = Vec::with_capacity(LIST_CALLS);
    let mut sandboxes = Vec::with_capacity(LIST_CALLS);
    for _ in 0..LIST_CALLS {
        let began = Instant::now();
        let listed = within(
            "ListContainers",
            client
                .runtime
                .list_containers(api::ListContainersRequest { filter: None }),
        )
        .await?
        .into_inner()
        .containers
        .len();
        containers.push(began.elapsed());
        let began = Instant::now();
        let listed_pods = within(
            "ListPodSandbox",
            client
                .runtime
                .list_pod_sandbox(api::ListPodSandboxRequest { filter: None }),
        )
        .await?
        .into_inner()
        .items
        .len();
        sandboxes.push(began.elapsed());
        if listed != pods || listed_pods != pods {
            return Err(format!(
                "{listed} containers and {listed_pods} pods listed, {pods} expected"
            ));
        }
    }
    let median = |v: Vec<Duration>| Stats::of(v).map(|s| s.median).map_err(|e| e.to_string());
    Ok((median(containers)?, median(sandboxes)?))
}

/// VmRSS of the daemon and the mean of its shims'.
fn memory(daemon_pid: u32, shim_binary: &str, dir: &Path) -> Result<(u64, f64, usize)> {
    let daemon = proc_status_kib(daemon_pid as i32, "VmRSS")
        .ok_or_else(|| format!("no VmRSS for daemon {daemon_pid}"))?;
    let shims = processes_of(shim_binary, dir);
    let rss: Vec<u64> = shims
        .iter()
        .filter_map(|pid| proc_status_kib(*pid, "VmRSS"))
        .collect();
    if rss.is_empty() {
        return Err(format!("no {shim_binary} process under {}", dir.display()));
    }
    let mean = rss.iter().sum::<u64>() as f64 / rss.len() as f64;
    Ok((daemon, mean, rss.len()))
}

fn stats(samples: Vec<Vec<Duration>>) -> Result<Vec<Stats>> {
    (0..=CALLS.len())
        .map(|i| {
            let column: Vec<Duration> = samples.iter().filter_map(|s| s.get(i).copied()).collect();
            Stats::of(column).map_err(|e| e.to_string())
        })
        .collect()
}

async fn bench(node: &PodNode, cleanup: &Cleanup, runs: usize, pods: usize) -> Result<Report> {
    let mut ours = node.client();
    let mut our_maker = PodMaker {
        daemon: "corrald",
        image: node.image().to_string(),
        namespace: format!("bench-{}", node.cleanup().unique()),
        dir: node.cleanup().work_dir().join("bench-pods"),
        cgroup_base: node.cleanup().cgroup_path("bench"),
        next: 0,
    };
    let (containerd, containerd_skipped) = match start_containerd(node, cleanup).await {
        Ok(c) => (Some(c), None),
        Err(why) => {
            eprintln!("pods bench: containerd not measured: {why}");
            (None, Some(why))
        }
    };
    let mut theirs = containerd.as_ref().map(|c| c.client.clone());
    let mut their_maker = PodMaker {
        daemon: "containerd",
        image: node.image().to_string(),
        namespace: format!("bench-{}", cleanup.unique()),
        dir: cleanup.work_dir().join("bench-pods"),
        cgroup_base: cleanup.cgroup_path("bench"),
        next: 0,
    };

    let mut our_lives = Vec::with_capacity(runs);
    let mut their_lives = Vec::with_capacity(runs);
    for i in 0..WARMUP + runs {
        let t = life(&mut ours, &mut our_maker).await.map_err(|e| {
            format!(
                "corrald: {e}\n{}",
                corral_e2e::pod::tail(&node.daemon_log(), 40)
            )
        })?;
        if i >= WARMUP {
            our_lives.push(t);
        }
        if let Some(client) = theirs.as_mut() {
            let t = life(client, &mut their_maker)
                .await
                .map_err(|e| format!("containerd: {e}"))?;
            if i >= WARMUP {
                their_lives.push(t);
            }
        }
    }

    let ids = fill(&mut ours, &mut our_maker, pods).await?;
    let (list_containers, list_pods) = list_latency(&mut ours, pods).await?;
    let daemon_pid = node.daemon_pid().ok_or("corrald is not running")?;
    let (daemon_rss_kib, shim_rss_kib, shims) = memory(daemon_pid, bin::SHIM, &node.config().dir)?;
    empty(&mut ours, &ids).await?;
    let corrald = Figures {
        calls: stats(our_lives)?,
        daemon_rss_kib,
        shim_rss_kib,
        shims,
        list_containers,
        list_pods,
    };

    let containerd = match (containerd, theirs.as_mut()) {
        (Some(mut daemon), Some(client)) => {
            let figures = async {
                let ids = fill(client, &mut their_maker, pods).await?;
                let (list_containers, list_pods) = list_latency(client, pods).await?;
                let (daemon_rss_kib, shim_rss_kib, shims) =
                    memory(daemon.child.id(), CONTAINERD_SHIM, &daemon.dir)?;
                empty(client, &ids).await?;
                Ok::<_, String>(Figures {
                    calls: stats(their_lives)?,
                    daemon_rss_kib,
                    shim_rss_kib,
                    shims,
                    list_containers,
                    list_pods,
                })
            }
            .await;
            // Whatever a failure above left: containerd's pods go through
            // containerd, so that their network namespaces go too.
            remove_all(client).await;
            daemon.stop();
            Some(figures.map_err(|e| format!("containerd: {e}\n{}", daemon.log_tail()))?)
        }
        _ => None,
    };
    Ok(Report {
        runs,
        pods,
        corrald,
        containerd,
        containerd_skipped,
    })
}

/// containerd with a config of its own: root, state, sockets, runc root
/// in the cleanup's run directory, the CRI plugin on the same CNI network
/// and registry as corrald.
struct Containerd {
    child: Child,
    dir: PathBuf,
    client: CriClient,
}

impl Containerd {
    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        corral_e2e::pod::tail(&log, 40)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

async fn start_containerd(node: &PodNode, cleanup: &Cleanup) -> Result<Containerd> {
    if !Path::new(CONTAINERD).is_file() {
        return Err(format!("{CONTAINERD} is not installed"));
    }
    // containerd needs a real pause image: busybox sleeping, as its entrypoint.
    let built = busybox_image(serde_json::json!({"Entrypoint": ["/bin/sleep", "2147483647"]}))
        .map_err(|e| format!("build the pause image: {e}"))?;
    let pause = node
        .registry()
        .push_image("e2e/pause", "1", &built)
        .map_err(|e| format!("push the pause image: {e}"))?;

    let dir = cleanup.run_dir().join("containerd");
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let socket = dir.join("containerd.sock");
    let host = node.registry().host();
    let config = format!(
        r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"

[debug]
  address = "{dir}/debug.sock"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj (sandboxes ask
  # for -998); corrald clamps by itself then, containerd when told to.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{dir}/runc"
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{conf_dir}"

  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
    endpoint = ["http://{host}"]
"#,
        dir = dir.display(),
        socket = socket.display(),
        pause = pause.reference,
        conf_dir = node.config().cni_conf_dir.display(),
        // The same OCI runtime binary corrald's pods get.
        runc = corral_e2e::pod::oci_runtime(),
    );
    let config_path = dir.join("config.toml");
    fs::write(&config_path, config).map_err(|e| format!("write {}: {e}", config_path.display()))?;
    let log = fs::File::create(dir.join("containerd.log")).map_err(|e| format!("log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("log: {e}"))?;
    let child = Command::new(CONTAINERD)
        .arg("--config")
        .arg(&config_path)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("spawn {CONTAINERD}: {e}"))?;
    cleanup.track_pid(child.id());
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(30);
    let log_tail = || {
        corral_e2e::pod::tail(
            &fs::read_to_string(dir.join("containerd.log")).unwrap_or_default(),
            40,
        )
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("containerd exited with {status}: {}", log_tail()));
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("containerd did not answer: {}", log_tail()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = match within("connect to containerd", CriClient::connect(&socket)).await {
        Ok(client) => client,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let mut daemon = Containerd { child, dir, client };
    // The CRI plugin comes up after the socket; Status answers once it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = daemon
            .client
            .runtime
            .status(api::StatusRequest { verbose: false })
            .await;
        match status {
            Ok(s) => {
                let ready = s
                    .into_inner()
                    .status
                    .is_some_and(|s| s.conditions.iter().all(|c| c.status));
                if ready {
                    break;
                }
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!("containerd CRI: {e}: {}", daemon.log_tail()))
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            return Err(format!("containerd CRI not ready: {}", daemon.log_tail()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for image in [pause.reference.as_str(), node.image()] {
        within(
            "containerd PullImage",
            daemon.client.images.pull_image(api::PullImageRequest {
                image: Some(api::ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| format!("{e}: {}", daemon.log_tail()))?;
    }
    Ok(daemon)
}
