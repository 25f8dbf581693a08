//! Prometheus metrics of corrald, served as text (exposition format 0.0.4)
//! on `GET /metrics` at `metrics.address`.
//!
//! This module owns:
//! - [`Registry`]: per-CRI-method request counters (by gRPC status code) and
//!   latency histograms, all plain atomics so that recording a request
//!   takes no lock shared with other requests;
//! - [`MetricsLayer`]: the tower layer in front of the RuntimeService and
//!   ImageService servers that records every request into the registry;
//! - [`MetricsServer`]: the HTTP listener, bound at daemon start and
//!   stopped with the daemon;
//! - the rendering of the text format, including the gauges of pods and
//!   containers and corrald's own `process_*` metrics.
//!
//! It must not touch the node's state: pods and containers are counted
//! through [`Node`]'s listing functions and each record's own lock, read
//! only, at scrape time. It never fails an RPC: a request it cannot
//! classify is counted under `method="other"`.

use std::fmt::{Display, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tonic::codegen::http;
use tonic::Code;

use crate::node::Node;

/// The content type of the text exposition format this module writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every CRI v1 RPC of RuntimeService and ImageService (their names do not
/// overlap), sorted for a binary search. Anything else is "other".
const METHODS: &[&str] = &[
    "Attach",
    "CheckpointContainer",
    "ContainerStats",
    "ContainerStatus",
    "CreateContainer",
    "Exec",
    "ExecSync",
    "GetContainerEvents",
    "ImageFsInfo",
    "ImageStatus",
    "ListContainerStats",
    "ListContainers",
    "ListImages",
    "ListMetricDescriptors",
    "ListPodSandbox",
    "ListPodSandboxMetrics",
    "ListPodSandboxStats",
    "PodSandboxStats",
    "PodSandboxStatus",
    "PortForward",
    "PullImage",
    "RemoveContainer",
    "RemoveImage",
    "RemovePodSandbox",
    "ReopenContainerLog",
    "RunPodSandbox",
    "RuntimeConfig",
    "StartContainer",
    "Status",
    "StopContainer",
    "StopPodSandbox",
    "UpdateContainerResources",
    "UpdateRuntimeConfig",
    "Version",
];

/// The label of requests whose method is not in [`METHODS`].
const OTHER_METHOD: &str = "other";

/// Upper bounds of the latency buckets, in seconds: from a cached status
/// (~1 ms) to an image pull or a slow CNI ADD (tens of seconds).
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// gRPC status codes 0..=16, named as grpc-go (and so containerd's and
/// CRI-O's metrics) names them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Why the metrics server could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Config validation accepts only `IP:PORT`; this guards callers that
    /// skip it.
    #[error("metrics address {0:?} is not of the form IP:PORT")]
    Address(String),

    #[error("bind the metrics server on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bind failure is a start failure of the daemon; it never reaches a
/// client, so it becomes the daemon's I/O error naming the address.
impl From<MetricsError> for crate::Error {
    fn from(e: MetricsError) -> crate::Error {
        match e {
            MetricsError::Address(_) => crate::Error::Internal(e.to_string()),
            MetricsError::Bind { address, source } => {
                crate::Error::io("bind the metrics server on", address.to_string(), source)
            }
        }
    }
}

/// The counters of one method.
struct MethodStats {
    /// Requests by gRPC status code.
    codes: [AtomicU64; CODES.len()],
    /// Observations per bucket, not cumulative (one increment per request;
    /// the rendering accumulates); the last one is above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of the durations, in nanoseconds (584 years before it wraps).
    sum_nanos: AtomicU64,
}

impl MethodStats {
    fn new() -> MethodStats {
        MethodStats {
            codes: std::array::from_fn(|_| AtomicU64::new(0)),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

/// The CRI request metrics: one [`MethodStats`] per method plus "other".
pub struct Registry {
    methods: Box<[MethodStats]>,
    /// When corrald started, for `process_start_time_seconds` should /proc
    /// not tell.
    started: SystemTime,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            methods: (0..=METHODS.len()).map(|_| MethodStats::new()).collect(),
            started: SystemTime::now(),
        }
    }

    /// Records one request to the gRPC `path` (`/runtime.v1.RuntimeService/
    /// Version`) that ended with `code` after `elapsed`. Lock-free.
    pub fn record(&self, path: &str, code: Code, elapsed: Duration) {
        let stats = &self.methods[method_index(path)];
        // Relaxed: each counter is independent; a scrape may see one
        // request's count before its bucket, which the format tolerates.
        stats.codes[code_index(code)].fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        stats.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        stats.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The request counters and histograms, in the text format. Methods
    /// never called are left out, as client libraries leave out label
    /// sets never observed.
    fn render_requests(&self, out: &mut Text) {
        out.header(
            "corral_cri_requests_total",
            "CRI requests handled, by method and gRPC status code.",
            "counter",
        );
        for (name, stats) in self.named() {
            for (code, count) in CODES.iter().zip(&stats.codes) {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    out.sample(
                        "corral_cri_requests_total",
                        &[("method", name), ("code", code)],
                        count,
                    );
                }
            }
        }
        out.header(
            "corral_cri_request_duration_seconds",
            "Time from a CRI request to its response headers, by method.",
            "histogram",
        );
        for (name, stats) in self.named() {
            let counts: Vec<u64> = stats
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(&counts) {
                cumulative += count;
                out.sample(
                    "corral_cri_request_duration_seconds_bucket",
                    &[("method", name), ("le", &bound.to_string())],
                    cumulative,
                );
            }
            out.sample(
                "corral_cri_request_duration_seconds_bucket",
                &[("method", name), ("le", "+Inf")],
                total,
            );
            let sum = stats.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            out.sample(
                "corral_cri_request_duration_seconds_sum",
                &[("method", name)],
                sum,
            );
            // The +Inf bucket's value, not a separate counter: the format
            // requires the two to be equal.
            out.sample(
                "corral_cri_request_duration_seconds_count",
                &[("method", name)],
                total,
            );
        }
    }

    fn named(&self) -> impl Iterator<Item = (&'static str, &MethodStats)> {
        METHODS
            .iter()
            .copied()
            .chain([OTHER_METHOD])
            .zip(self.methods.iter())
    }

    /// The whole page: the node's gauges (when the node is still there),
    /// the request metrics and the process metrics.
    pub fn render(&self, node: Option<&Node>) -> String {
        let mut out = Text::default();
        if let Some(node) = node {
            NodeCounts::of(node).render(&mut out);
        }
        self.render_requests(&mut out);
        ProcessStats::read(self.started).render(&mut out);
        out.0
    }
}

/// Index in [`Registry::methods`] of the method a gRPC path names.
fn method_index(path: &str) -> usize {
    let name = path.rsplit('/').next().unwrap_or(path);
    METHODS.binary_search(&name).unwrap_or(METHODS.len())
}

fn code_index(code: Code) -> usize {
    // `Code` is 0..=16 by construction; an out-of-range value counts as
    // Unknown, as tonic itself reads one.
    let i = code as usize;
    if i < CODES.len() {
        i
    } else {
        Code::Unknown as usize
    }
}

/// The gRPC status a response carries in its headers (a trailers-only
/// response: every error tonic returns from a unary handler). A response
/// without one is a success whose status follows in the trailers.
fn response_code<B>(response: &http::Response<B>) -> Code {
    match response.headers().get("grpc-status") {
        None => Code::Ok,
        Some(value) => Code::from_bytes(value.as_bytes()),
    }
}

/// Pods and containers by CRI state, at scrape time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeCounts {
    pub sandboxes_ready: u64,
    pub sandboxes_notready: u64,
    pub containers_created: u64,
    pub containers_running: u64,
    pub containers_exited: u64,
    pub containers_unknown: u64,
}

impl NodeCounts {
    /// Counts through the CRI state mapping ListPodSandbox and
    /// ListContainers use, so the gauges agree with what crictl shows.
    pub fn of(node: &Node) -> NodeCounts {
        use k8s_cri::v1::{ContainerState as C, PodSandboxState as P};
        let mut counts = NodeCounts::default();
        for sandbox in node.sandboxes() {
            let state = sandbox.record().state;
            match crate::sandbox::cri_state(state) {
                P::SandboxReady => counts.sandboxes_ready += 1,
                P::SandboxNotready => counts.sandboxes_notready += 1,
            }
        }
        for container in node.containers() {
            let state = container.record().state;
            match crate::container::cri_state(state) {
                C::ContainerCreated => counts.containers_created += 1,
                C::ContainerRunning => counts.containers_running += 1,
                C::ContainerExited => counts.containers_exited += 1,
                C::ContainerUnknown => counts.containers_unknown += 1,
            }
        }
        counts
    }

    fn render(&self, out: &mut Text) {
        out.header(
            "corral_pod_sandboxes",
            "Pod sandboxes on this node, by state.",
            "gauge",
        );
        for (state, n) in [
            ("ready", self.sandboxes_ready),
            ("notready", self.sandboxes_notready),
        ] {
            out.sample("corral_pod_sandboxes", &[("state", state)], n);
        }
        out.header(
            "corral_containers",
            "Containers on this node, by state.",
            "gauge",
        );
        for (state, n) in [
            ("created", self.containers_created),
            ("running", self.containers_running),
            ("exited", self.containers_exited),
            ("unknown", self.containers_unknown),
        ] {
            out.sample("corral_containers", &[("state", state)], n);
        }
    }
}

/// corrald's own process metrics, named as the Prometheus client libraries
/// name them; each is left out when /proc cannot tell it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub resident_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub cpu_seconds_total: Option<f64>,
}

impl ProcessStats {
    /// Reads /proc/self; `started` stands in for the start time should
    /// /proc/self/stat or /proc/stat not be readable.
    pub fn read(started: SystemTime) -> ProcessStats {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(SelfStat::parse);
        let ticks = clock_ticks();
        let start_time_seconds = stat
            .zip(boot_time())
            .zip(ticks)
            .map(|((stat, boot), ticks)| boot as f64 + stat.start_ticks as f64 / ticks)
            .or_else(|| {
                started
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs_f64())
            });
        ProcessStats {
            resident_memory_bytes: resident_memory(),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as u64),
            start_time_seconds,
            cpu_seconds_total: stat
                .zip(ticks)
                .map(|(stat, ticks)| stat.cpu_ticks as f64 / ticks),
        }
    }

    fn render(&self, out: &mut Text) {
        if let Some(v) = self.cpu_seconds_total {
            out.header(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                "counter",
            );
            out.sample("process_cpu_seconds_total", &[], v);
        }
        if let Some(v) = self.open_fds {
            out.header(
                "process_open_fds",
                "Number of open file descriptors.",
                "gauge",
            );
            out.sample("process_open_fds", &[], v);
        }
        if let Some(v) = self.resident_memory_bytes {
            out.header(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                "gauge",
            );
            out.sample("process_resident_memory_bytes", &[], v);
        }
        if let Some(v) = self.start_time_seconds {
            out.header(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                "gauge",
            );
            out.sample("process_start_time_seconds", &[], v);
        }
    }
}

/// The fields of /proc/self/stat used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SelfStat {
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Start time after boot, in clock ticks.
    start_ticks: u64,
}

impl SelfStat {
    /// Fields are counted after the command name's closing parenthesis:
    /// the name itself may hold spaces and parentheses.
    fn parse(text: &str) -> Option<SelfStat> {
        let after = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // proc(5) numbers fields from 1 with `state` as field 3, the first
        // after the name: field n is fields[n - 3].
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(SelfStat {
            cpu_ticks: field(14)?.checked_add(field(15)?)?,
            start_ticks: field(22)?,
        })
    }
}

/// `VmRSS` of /proc/self/status, in bytes.
fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// `btime` of /proc/stat: the boot time, in seconds since the epoch.
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Clock ticks per second, the unit of /proc/self/stat's times.
fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}

/// A text-format page being written.
#[derive(Debug, Default)]
struct Text(String);

impl Text {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        // Writing into a String cannot fail.
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// HELP text escapes backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', r"\\").replace('\n', r"\n")
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(text: &str) -> String {
    text.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Records every request passing through into a [`Registry`].
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    registry: Arc<Registry>,
}

impl MetricsLayer {
    pub fn new(registry: Arc<Registry>) -> MetricsLayer {
        MetricsLayer { registry }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService {
            inner,
            registry: self.registry.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    registry: Arc<Registry>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let registry = self.registry.clone();
        let start = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(response) => response_code(response),
                // The connection failed under the service: the client saw
                // no status.
                Err(_) => Code::Unknown,
            };
            registry.record(&path, code, start.elapsed());
            result
        })
    }
}

/// The HTTP server of `/metrics`; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    address: SocketAddr,
    serve: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        // A scrape in flight is cut short: Prometheus retries at its next
        // interval, and a stopping daemon must not wait for it.
        self.serve.abort();
    }
}

impl MetricsServer {
    /// Binds `address` (`IP:PORT`) and serves `/metrics` until dropped.
    pub async fn start(
        address: &str,
        registry: Arc<Registry>,
        node: Weak<Node>,
    ) -> Result<MetricsServer, MetricsError> {
        let address: SocketAddr = address
            .parse()
            .map_err(|_| MetricsError::Address(address.to_string()))?;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| MetricsError::Bind { address, source })?;
        // Port 0 in the address: report the port actually bound.
        let address = listener.local_addr().unwrap_or(address);
        let router = router(registry, node);
        let serve = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(%address, "metrics server stopped: {e}");
            }
        });
        tracing::info!("Prometheus metrics on http://{address}/metrics");
        Ok(MetricsServer { address, serve })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

/// `GET /metrics`; anything else, other methods on that path included, is
/// 404.
fn router(registry: Arc<Registry>, node: Weak<Node>) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::routing::get;

    let not_found = || async { StatusCode::NOT_FOUND };
    let scrape = move || {
        let registry = registry.clone();
        let node = node.clone();
        async move {
            // A node gone means the daemon is stopping: its gauges are
            // left out rather than reported as zero pods.
            let page = registry.render(node.upgrade().as_deref());
            ([(header::CONTENT_TYPE, CONTENT_TYPE)], page)
        }
    };
    axum::Router::new()
        .route("/metrics", get(scrape).fallback(not_found))
        .fallback(not_found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_sorted_for_the_binary_search() {
        assert!(METHODS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(method_index("/runtime.v1.RuntimeService/Version"), 33);
        assert_eq!(
            method_index("/runtime.v1.ImageService/PullImage"),
            METHODS
                .iter()
                .position(|m| *m == "PullImage")
                .expect("PullImage")
        );
        assert_eq!(method_index("/grpc.health.v1.Health/Check"), METHODS.len());
        assert_eq!(method_index(""), METHODS.len());
    }

    #[test]
    fn labels_and_help_are_escaped() {
        let mut out = Text::default();
        out.header("x", "a \\ b\nc \"q\"", "gauge");
        out.sample("x", &[("a", "q\"b\\s\nn"), ("b", "plain")], 1);
        out.sample("y", &[], 0.5);
        assert_eq!(
            out.0,
            "# HELP x a \\\\ b\\nc \"q\"\n\
             # TYPE x gauge\n\
             x{a=\"q\\\"b\\\\s\\nn\",b=\"plain\"} 1\n\
             y 0.5\n"
        );
    }

    #[test]
    fn requests_render_as_counters_and_cumulative_histograms() {
        let registry = Registry::new();
        let path = "/runtime.v1.RuntimeService/RunPodSandbox";
        registry.record(path, Code::Ok, Duration::from_micros(500));
        registry.record(path, Code::Ok, Duration::from_millis(20));
        registry.record(path, Code::NotFound, Duration::from_secs(90));
        registry.record("/x.Y/Z", Code::Unimplemented, Duration::from_millis(1));

        let mut out = Text::default();
        registry.render_requests(&mut out);
        let bucket = |method: &str, le: &str, n: u64| {
            format!(
                "corral_cri_request_duration_seconds_bucket{{method=\"{method}\",le=\"{le}\"}} {n}\n"
            )
        };
        let mut expected = String::from(
            "# HELP corral_cri_requests_total CRI requests handled, by method and gRPC status code.\n\
             # TYPE corral_cri_requests_total counter\n\
             corral_cri_requests_total{method=\"RunPodSandbox\",code=\"OK\"} 2\n\
             corral_cri_requests_total{method=\"RunPodSandbox\",code=\"NotFound\"} 1\n\
             corral_cri_requests_total{method=\"other\",code=\"Unimplemented\"} 1\n\
             # HELP corral_cri_request_duration_seconds Time from a CRI request to its response headers, by method.\n\
             # TYPE corral_cri_request_duration_seconds histogram\n",
        );
        // 0.5 ms, 20 ms and 90 s: 1 in le=0.001, 2 from le=0.025, the 90 s
        // one only in +Inf.
        let les = [
            "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
            "5", "10", "30", "60",
        ];
        for (i, le) in les.iter().enumerate() {
            expected += &bucket("RunPodSandbox", le, if i < 4 { 1 } else { 2 });
        }
        expected += &bucket("RunPodSandbox", "+Inf", 3);
        expected += "corral_cri_request_duration_seconds_sum{method=\"RunPodSandbox\"} 90.0205\n\
                     corral_cri_request_duration_seconds_count{method=\"RunPodSandbox\"} 3\n";
        // Exactly on a bound counts in that bucket (`le`).
        for le in les {
            expected += &bucket("other", le, 1);
        }
        expected += &bucket("other", "+Inf", 1);
        expected += "corral_cri_request_duration_seconds_sum{method=\"other\"} 0.001\n\
                     corral_cri_request_duration_seconds_count{method=\"other\"} 1\n";
        assert_eq!(out.0, expected);
    }

    #[test]
    fn node_and_process_gauges_render() {
        let mut out = Text::default();
        NodeCounts {
            sandboxes_ready: 2,
            sandboxes_notready: 1,
            containers_created: 0,
            containers_running: 3,
            containers_exited: 4,
            containers_unknown: 0,
        }
        .render(&mut out);
        ProcessStats {
            resident_memory_bytes: Some(4096),
            open_fds: None,
            start_time_seconds: Some(1700000000.25),
            cpu_seconds_total: None,
        }
        .render(&mut out);
        assert_eq!(
            out.0,
            "# HELP corral_pod_sandboxes Pod sandboxes on this node, by state.\n\
             # TYPE corral_pod_sandboxes gauge\n\
             corral_pod_sandboxes{state=\"ready\"} 2\n\
             corral_pod_sandboxes{state=\"notready\"} 1\n\
             # HELP corral_containers Containers on this node, by state.\n\
             # TYPE corral_containers gauge\n\
             corral_containers{state=\"created\"} 0\n\
             corral_containers{state=\"running\"} 3\n\
             corral_containers{state=\"exited\"} 4\n\
             corral_containers{state=\"unknown\"} 0\n\
             # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             process_resident_memory_bytes 4096\n\
             # HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n\
             # TYPE process_start_time_seconds gauge\n\
             process_start_time_seconds 1700000000.25\n"
        );
    }

    #[test]
    fn own_process_is_read_from_proc() {
        let stats = ProcessStats::read(SystemTime::now());
        assert!(
            stats.resident_memory_bytes.is_some_and(|b| b > 0),
            "{stats:?}"
        );
        assert!(stats.open_fds.is_some_and(|n| n >= 3), "{stats:?}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64();
        let start = stats.start_time_seconds.expect("start time");
        // This test process started within the last day, not in the future.
        assert!(
            start <= now + 1.0 && start > now - 86400.0,
            "{start} vs {now}"
        );
    }

    #[test]
    fn stat_fields_count_after_the_command_name() {
        // A name with a space and a parenthesis, as a process may call
        // itself; fields 14, 15 (utime, stime) and 22 (starttime).
        let line = "42 (a) b) S 1 42 42 0 -1 4194304 100 0 0 0 7 5 0 0 20 0 1 0 12345 1000 50";
        assert_eq!(
            SelfStat::parse(line),
            Some(SelfStat {
                cpu_ticks: 12,
                start_ticks: 12345
            })
        );
        assert_eq!(SelfStat::parse("42 (a) S 1"), None);
    }

    #[test]
    fn response_code_reads_trailers_only_status() {
        let ok = http::Response::new(());
        assert_eq!(response_code(&ok), Code::Ok);
        let mut not_found = http::Response::new(());
        not_found
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(response_code(&not_found), Code::NotFound);
    }
}
