//! The streaming server's cost: an exec of `true` through it (Exec RPC,
//! HTTP upgrade to SPDY, the exec, its exit status) next to ExecSync, and
//! one port-forward connection moving 256 MiB into a pod (median of 5) next to raw
//! loopback TCP.
//!
//! A plain program (`harness = false`) printing median and p95 of each
//! exec path and the throughputs with their ratio.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo bench -p corral-e2e --bench streaming   # CORRAL_BENCH_N=50, CORRAL_BENCH_MIB=256
//! ```
//!
//! Needs root. Errors are values (the bench profile aborts on panic, which
//! would skip the fixture's cleanup).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use corral_e2e::bench::{ms, ratio, Stats};
use corral_e2e::cri::api;
use corral_e2e::pod::PodNode;
use corral_e2e::streaming_client::{exec_spdy, ExecInput, SpdyPortForward};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RUNS_ENV: &str = "CORRAL_BENCH_N";
const MIB_ENV: &str = "CORRAL_BENCH_MIB";
/// `cargo test --all-targets` runs this program too, without `--bench`.
const SMOKE_RUNS: usize = 3;
const SMOKE_MIB: usize = 8;
const WARMUP: usize = 2;
const SINK_PORT: u16 = 9000;
/// Port-forward transfers (each next to a raw one) the medians come from.
const TRANSFERS: usize = 5;
const TIMEOUT: Duration = Duration::from_secs(120);

type Result<T> = std::result::Result<T, String>;

fn count(env: &str, default: usize, smoke: usize, bench: bool) -> Result<usize> {
    match std::env::var(env) {
        Ok(v) => v.parse().map_err(|_| format!("{env}={v:?} is not a count")),
        Err(_) if bench => Ok(default),
        Err(_) => Ok(smoke),
    }
}

fn main() -> ExitCode {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes = count(RUNS_ENV, 50, SMOKE_RUNS, bench)
        .and_then(|runs| Ok((runs, count(MIB_ENV, 256, SMOKE_MIB, bench)?)));
    let (runs, mib) = match sizes {
        Ok(sizes) => sizes,
        Err(e) => {
            eprintln!("streaming bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("streaming bench: tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(runs, mib)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streaming bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(runs: usize, mib: usize) -> Result<()> {
    let node = PodNode::start().await.map_err(|e| e.to_string())?;
    let pod = node
        .run_pod("bench-stream")
        .await
        .map_err(|e| e.to_string())?;
    let container = node
        .run_container(&pod, "sleeper", &["sleep", "3600"])
        .await
        .map_err(|e| e.to_string())?;
    let script = format!("while true; do nc -l -p {SINK_PORT} > /dev/null; done");
    node.run_container(&pod, "sink", &["sh", "-c", &script])
        .await
        .map_err(|e| e.to_string())?;

    let (mut streamed, mut sync) = (Vec::new(), Vec::new());
    for i in 0..runs + WARMUP {
        let a = time_streamed_exec(&node, &container).await?;
        let b = time_exec_sync(&node, &container).await?;
        if i >= WARMUP {
            streamed.push(a);
            sync.push(b);
        }
    }
    let streamed = Stats::of(streamed).map_err(|e| e.to_string())?;
    let sync = Stats::of(sync).map_err(|e| e.to_string())?;
    println!("exec of /bin/true, {runs} runs          median        p95");
    println!(
        "  Exec + SPDY stream       {}  {}",
        ms(streamed.median),
        ms(streamed.p95)
    );
    println!(
        "  ExecSync                 {}  {}",
        ms(sync.median),
        ms(sync.p95)
    );
    println!(
        "  ratio streamed/ExecSync  {:7.2}x",
        ratio(streamed.median, sync.median)
    );

    // One transfer is at the mercy of the scheduler on a small machine:
    // several, alternating with the raw baseline, and the medians.
    let bytes = mib << 20;
    let (mut forwarded, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..TRANSFERS {
        let took = tokio::time::timeout(TIMEOUT, forward_bytes(&node, &pod, bytes))
            .await
            .map_err(|_| "port-forward transfer timed out".to_string())??;
        forwarded.push(took);
        raw.push(loopback_bytes(bytes).await?);
    }
    let forwarded = Stats::of(forwarded).map_err(|e| e.to_string())?.median;
    let raw = Stats::of(raw).map_err(|e| e.to_string())?.median;
    let rate = |d: Duration| (bytes as f64 / (1 << 20) as f64) / d.as_secs_f64();
    println!("{mib} MiB into the pod, median of {TRANSFERS} transfers");
    println!("  one port-forward stream  {:8.1} MiB/s", rate(forwarded));
    println!("  raw loopback TCP         {:8.1} MiB/s", rate(raw));
    println!("  ratio port-forward/raw   {:7.3}", ratio(raw, forwarded));
    Ok(())
}

async fn time_streamed_exec(node: &PodNode, container: &str) -> Result<Duration> {
    let start = Instant::now();
    let request = api::ExecRequest {
        container_id: container.to_string(),
        cmd: vec!["/bin/true".into()],
        stdout: true,
        ..Default::default()
    };
    let url = node
        .client()
        .runtime
        .exec(request)
        .await
        .map_err(|e| format!("Exec: {e}"))?
        .into_inner()
        .url;
    let input = ExecInput {
        stdout: true,
        ..Default::default()
    };
    let got = tokio::time::timeout(TIMEOUT, exec_spdy(&url, input))
        .await
        .map_err(|_| "exec timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if got.exit_code() != Some(0) {
        return Err(format!(
            "exec failed: {}",
            String::from_utf8_lossy(&got.error)
        ));
    }
    Ok(start.elapsed())
}

async fn time_exec_sync(node: &PodNode, container: &str) -> Result<Duration> {
    let start = Instant::now();
    let got = node
        .exec_sync(container, &["/bin/true"], 30)
        .await
        .map_err(|e| format!("ExecSync: {e}"))?;
    if got.exit_code != 0 {
        return Err(format!("ExecSync exit code {}", got.exit_code));
    }
    Ok(start.elapsed())
}

/// Sends `bytes` through one port-forward connection to `nc` in the pod;
/// the time runs until the pod's side has closed (it read everything).
async fn forward_bytes(node: &PodNode, pod: &str, bytes: usize) -> Result<Duration> {
    let url = node
        .client()
        .runtime
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: pod.to_string(),
            port: vec![SINK_PORT as i32],
        })
        .await
        .map_err(|e| format!("PortForward: {e}"))?
        .into_inner()
        .url;
    let pf = SpdyPortForward::connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let (mut data, mut error) = pf.open(SINK_PORT).await.map_err(|e| e.to_string())?;
    let chunk = vec![0x5au8; 32 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        data.write(&chunk).await.map_err(|e| e.to_string())?;
        sent += chunk.len();
    }
    data.close().await.map_err(|e| e.to_string())?;
    let (_, failure) = tokio::join!(data.read_all(), error.read_all());
    if !failure.is_empty() {
        return Err(String::from_utf8_lossy(&failure).into_owned());
    }
    Ok(start.elapsed())
}

async fn loopback_bytes(bytes: usize) -> Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let sink = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 64 * 1024];
        while socket.read(&mut buf).await.map_err(|e| e.to_string())? > 0 {}
        Ok::<_, String>(())
    });
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let chunk = vec![0x5au8; 32 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        socket.write_all(&chunk).await.map_err(|e| e.to_string())?;
        sent += chunk.len();
    }
    socket.shutdown().await.map_err(|e| e.to_string())?;
    sink.await.map_err(|e| e.to_string())??;
    Ok(start.elapsed())
}
