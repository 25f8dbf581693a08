//! What corral's runtime layer adds over its shim, and how fast a restarted
//! daemon is back.
//!
//! A plain program (`harness = false`) that prints a table:
//!
//! - create+start+wait+delete of a `/bin/true` task through `TaskService`,
//!   each task in a pod of its own (its shim started and shut down with it,
//!   as for a pod sandbox);
//! - the same with every task joining one running pod's shim (the `start`
//!   action still runs per task, as containerd runs it);
//! - the same straight against one shim over ttrpc, with no runtime layer
//!   (`corral_e2e::task::PodShim`, the figure of `--bench shim`);
//! - the time a new `TaskService` takes to `reattach()` to live shims, each
//!   a pod with one running `sleep 1000` task.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo bench -p corral-e2e --bench runtime   # CORRAL_BENCH_N=200, CORRAL_BENCH_PODS=100
//! ```
//!
//! The three loops are interleaved, so that a disturbance on the machine
//! hits them alike. Needs root. Everything it makes is removed on exit,
//! failure included: errors are values here, since the bench profile aborts
//! on panic and an abort would skip the cleanup.

use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_e2e::bench::{count, ms, ratio, Stats};
use corral_e2e::runtime::{track_shim_socket, Node, CORRAL};
use corral_e2e::task::{PodShim, CONTAINER_TYPE, SANDBOX_ID};
use corral_e2e::{bin, Bundle, Cleanup, EventsSink};
use corral_runtime::task_service::TaskService;

const RUNS_ENV: &str = "CORRAL_BENCH_N";
const PODS_ENV: &str = "CORRAL_BENCH_PODS";
const DEFAULT_RUNS: usize = 50;
const DEFAULT_PODS: usize = 20;
/// `cargo test --all-targets` runs this program too, without `--bench`: a
/// few runs prove it works without spending a benchmark's time.
const SMOKE_RUNS: usize = 3;
const SMOKE_PODS: usize = 3;
const WARMUP: usize = 3;
/// New services that re-attach, one after the other, to the same shims.
const REATTACH_ROUNDS: usize = 5;
const TIMEOUT: Duration = Duration::from_secs(30);

type Result<T, E = String> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let sizes = count(RUNS_ENV, DEFAULT_RUNS, SMOKE_RUNS, bench_mode)
        .and_then(|runs| Ok((runs, count(PODS_ENV, DEFAULT_PODS, SMOKE_PODS, bench_mode)?)));
    let (runs, pods) = match sizes {
        Ok(sizes) => sizes,
        Err(message) => {
            eprintln!("runtime bench: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(message) = bin::require_shim() {
        eprintln!("runtime bench: {message}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime bench: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cleanup = match Cleanup::new() {
        Ok(cleanup) => cleanup,
        Err(e) => {
            eprintln!("runtime bench: setting up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = bench(&rt, &cleanup, runs, pods);
    if let Ok(report) = &outcome {
        print!("{report}");
    }
    // The shims and containers go before the runtime that talks to them.
    drop(cleanup);
    drop(rt);
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runtime bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Report {
    runs: usize,
    pods: usize,
    shim_binary: std::path::PathBuf,
    own_pod: Stats,
    joined: Stats,
    shim_only: Stats,
    reattach: Stats,
    reattach_max: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.runs;
        writeln!(f, "shim {}", self.shim_binary.display())?;
        writeln!(
            f,
            "/bin/true in a busybox rootfs, create+start+wait+delete, n={n}, {WARMUP} warm-up runs not counted"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, what: &str, s: &Stats| {
            writeln!(f, "{what:<44} median {}  p95 {}", ms(s.median), ms(s.p95))
        };
        row(f, "TaskService, a pod (shim) per task", &self.own_pod)?;
        row(f, "TaskService, tasks joining one pod's shim", &self.joined)?;
        row(
            f,
            "shim alone (ttrpc to one shim, no runtime)",
            &self.shim_only,
        )?;
        writeln!(
            f,
            "{:<44} median {:.2}     p95 {:.2}",
            "ratio joined / shim alone",
            ratio(self.joined.median, self.shim_only.median),
            ratio(self.joined.p95, self.shim_only.p95)
        )?;
        writeln!(
            f,
            "{:<44} median {}  max {}  ({REATTACH_ROUNDS} new services)",
            format!("reattach() to {} live shims", self.pods),
            ms(self.reattach.median),
            ms(self.reattach_max)
        )
    }
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .map_err(|_| format!("{what} took longer than {TIMEOUT:?}"))
}

/// Create, Start, Wait and Delete of one task; the time they took.
async fn life(
    service: &TaskService,
    node: &Node,
    ns: &str,
    id: &str,
    spec: &Bundle,
) -> Result<Duration> {
    let req = node.create_request(ns, id, CORRAL, spec);
    let began = Instant::now();
    within("create", service.create(req))
        .await?
        .map_err(|e| format!("create {id}: {e}"))?;
    let took = async {
        within("start", service.start_process(ns, id, ""))
            .await?
            .map_err(|e| format!("start {id}: {e}"))?;
        let exit = within("wait", service.wait(ns, id, ""))
            .await?
            .map_err(|e| format!("wait {id}: {e}"))?;
        within("delete", service.delete(ns, id))
            .await?
            .map_err(|e| format!("delete {id}: {e}"))?;
        if exit.status != 0 {
            return Err(format!("/bin/true in {id} exited with {}", exit.status));
        }
        Ok(began.elapsed())
    }
    .await;
    if took.is_err() {
        // A task left half-made would outlive the bench's service.
        let _ = service.kill(ns, id, "", libc::SIGKILL as u32, true).await;
        let _ = within("delete", service.delete(ns, id)).await;
    }
    took
}

fn bench(
    rt: &tokio::runtime::Runtime,
    cleanup: &Cleanup,
    runs: usize,
    pods: usize,
) -> Result<Report> {
    let node = Node::new(cleanup).map_err(|e| format!("node: {e}"))?;
    let ns = node.namespace(cleanup);
    let service = rt
        .block_on(node.service())
        .map_err(|e| format!("task service: {e}"))?;

    // The pod the joining tasks share.
    let sandbox_id = "sandbox";
    let sandbox = node
        .spec(cleanup, sandbox_id, &["sleep", "1000"])
        .annotation(SANDBOX_ID, sandbox_id)
        .annotation(CONTAINER_TYPE, "sandbox");
    rt.block_on(async {
        let req = node.create_request(&ns, sandbox_id, CORRAL, &sandbox);
        within("create", service.create(req))
            .await?
            .map_err(|e| format!("create the sandbox: {e}"))?;
        within("start", service.start_process(&ns, sandbox_id, ""))
            .await?
            .map_err(|e| format!("start the sandbox: {e}"))?;
        track_shim_socket(cleanup, &service, &ns, sandbox_id);
        Ok::<_, String>(())
    })?;

    // The shim alone: one pod's shim driven over ttrpc as the shim bench does.
    let sink = EventsSink::start_in(cleanup).map_err(|e| format!("events sink: {e}"))?;
    let shim_sandbox_id = "shim-sandbox";
    let shim_sandbox = cleanup
        .bundle(shim_sandbox_id, node.rootfs.path())
        .args(["sleep", "1000"])
        .annotation(SANDBOX_ID, shim_sandbox_id)
        .annotation(CONTAINER_TYPE, "sandbox");
    let pod =
        PodShim::start(cleanup, &sink, &shim_sandbox).map_err(|e| format!("pod shim: {e}"))?;
    pod.create_and_start(&shim_sandbox, "", "")
        .map_err(|e| format!("the shim's sandbox: {e}"))?;

    let mut own_pod = Vec::with_capacity(runs);
    let mut joined = Vec::with_capacity(runs);
    let mut shim_only = Vec::with_capacity(runs);
    for i in 0..WARMUP + runs {
        let id = format!("own{i}");
        let spec = node.spec(cleanup, &id, &["/bin/true"]);
        let own = rt.block_on(life(&service, &node, &ns, &id, &spec))?;

        let id = format!("joined{i}");
        let spec = node
            .spec(cleanup, &id, &["/bin/true"])
            .annotation(SANDBOX_ID, sandbox_id)
            .annotation(CONTAINER_TYPE, "container");
        let join = rt.block_on(life(&service, &node, &ns, &id, &spec))?;

        let name = format!("shim{i}");
        let bundle = cleanup
            .bundle(&name, node.rootfs.path())
            .args(["/bin/true"])
            .annotation(SANDBOX_ID, shim_sandbox_id)
            .annotation(CONTAINER_TYPE, "container");
        bundle.write().map_err(|e| format!("bundle {name}: {e}"))?;
        let began = Instant::now();
        let status = pod
            .run_to_exit(&bundle, "", "")
            .map_err(|e| format!("{name} through the shim: {e}"))?;
        let alone = began.elapsed();
        if status != 0 {
            return Err(format!("/bin/true in {name} exited with {status}"));
        }

        if i >= WARMUP {
            own_pod.push(own);
            joined.push(join);
            shim_only.push(alone);
        }
    }
    pod.stop_and_delete(shim_sandbox_id)
        .map_err(|e| format!("the shim's sandbox: {e}"))?;
    pod.shutdown().map_err(|e| format!("the pod shim: {e}"))?;

    let reattach = rt.block_on(reattach_bench(
        cleanup, &node, &ns, service, sandbox_id, pods,
    ))?;
    let reattach_max = reattach.iter().max().copied().unwrap_or_default();

    Ok(Report {
        runs,
        pods,
        shim_binary: bin::shim(),
        own_pod: Stats::of(own_pod).map_err(|e| e.to_string())?,
        joined: Stats::of(joined).map_err(|e| e.to_string())?,
        shim_only: Stats::of(shim_only).map_err(|e| e.to_string())?,
        reattach: Stats::of(reattach).map_err(|e| e.to_string())?,
        reattach_max,
    })
}

/// `pods` pods with a running task each, then [`REATTACH_ROUNDS`] new
/// services re-attaching to them; each round's `reattach()` time.
async fn reattach_bench(
    cleanup: &Cleanup,
    node: &Node,
    ns: &str,
    service: Arc<TaskService>,
    sandbox_id: &str,
    pods: usize,
) -> Result<Vec<Duration>> {
    within(
        "kill",
        service.kill(ns, sandbox_id, "", libc::SIGKILL as u32, false),
    )
    .await?
    .map_err(|e| format!("kill the sandbox: {e}"))?;
    within("wait", service.wait(ns, sandbox_id, ""))
        .await?
        .map_err(|e| format!("wait for the sandbox: {e}"))?;
    within("delete", service.delete(ns, sandbox_id))
        .await?
        .map_err(|e| format!("delete the sandbox: {e}"))?;

    let ids: Vec<String> = (0..pods).map(|i| format!("pod{i}")).collect();
    for id in &ids {
        let spec = node.spec(cleanup, id, &["sleep", "1000"]);
        let req = node.create_request(ns, id, CORRAL, &spec);
        within("create", service.create(req))
            .await?
            .map_err(|e| format!("create {id}: {e}"))?;
        track_shim_socket(cleanup, &service, ns, id);
        within("start", service.start_process(ns, id, ""))
            .await?
            .map_err(|e| format!("start {id}: {e}"))?;
    }
    within("shutdown", service.shutdown()).await?;
    drop(service);

    let mut times = Vec::with_capacity(REATTACH_ROUNDS);
    let mut last = None;
    for round in 0..REATTACH_ROUNDS {
        let service = node
            .service()
            .await
            .map_err(|e| format!("task service: {e}"))?;
        let began = Instant::now();
        let found = within("reattach", service.reattach())
            .await?
            .map_err(|e| format!("reattach: {e}"))?;
        times.push(began.elapsed());
        if found.live.len() != pods || !found.dead.is_empty() {
            return Err(format!(
                "round {round}: reattach found {} live and {} dead shims, not {pods} live",
                found.live.len(),
                found.dead.len()
            ));
        }
        if round + 1 < REATTACH_ROUNDS {
            within("shutdown", service.shutdown()).await?;
        } else {
            last = Some(service);
        }
    }

    // The last service tears the pods down, checking that it can.
    let service = last.ok_or("no service re-attached")?;
    for id in &ids {
        within(
            "kill",
            service.kill(ns, id, "", libc::SIGKILL as u32, false),
        )
        .await?
        .map_err(|e| format!("kill {id}: {e}"))?;
        within("wait", service.wait(ns, id, ""))
            .await?
            .map_err(|e| format!("wait for {id}: {e}"))?;
        within("delete", service.delete(ns, id))
            .await?
            .map_err(|e| format!("delete {id}: {e}"))?;
    }
    service.shutdown().await;
    Ok(times)
}
