//! corrald's Prometheus endpoint scraped as Prometheus scrapes a node: a
//! plain HTTP GET of `/metrics` on `metrics.address`, after CRI calls over
//! the real socket. Needs root (the socket lives under /run) and the built
//! `corrald` (`cargo build -p corral-cri -p corral-shim --bins`).

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use corral_e2e::cri::{api, CriClient, Daemon, DaemonConfig};
use corral_e2e::Cleanup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// The bound on any single RPC or scrape: a hung daemon fails the test.
const TIMEOUT: Duration = Duration::from_secs(10);

async fn with_timeout<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {TIMEOUT:?}"))
}

/// A loopback port nobody listens on now. Another process could take it
/// before corrald binds it; on a test machine that is rare enough.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

fn metrics_yaml(address: SocketAddr) -> String {
    format!("metrics:\n  address: {address}\n")
}

/// A response as read off the wire: status code, headers, body.
struct Response {
    status: u16,
    head: String,
    body: String,
}

/// `GET path` over HTTP/1.1 with `Connection: close`, read to the end.
async fn get(address: SocketAddr, path: &str) -> Response {
    with_timeout("scrape", async {
        let mut stream = TcpStream::connect(address)
            .await
            .unwrap_or_else(|e| panic!("connect to {address}: {e}"));
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        let text = String::from_utf8(raw).expect("response is UTF-8");
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {text:?}"));
        // A whole page with Content-Length is expected; chunked framing
        // would leave chunk sizes in the body the checks below read.
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{head}"
        );
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        Response {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    })
    .await
}

/// The value of the sample named exactly `series` (name and labels).
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_cri_calls_and_report_the_node() {
    let cleanup = Cleanup::new().expect("cleanup");
    let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let daemon = Daemon::start(&cleanup, &metrics_yaml(address)).expect("start corrald");
    let mut client: CriClient = with_timeout("connect", daemon.client())
        .await
        .expect("connect to corrald");

    with_timeout(
        "Version",
        client.runtime.version(api::VersionRequest::default()),
    )
    .await
    .expect("Version");
    with_timeout(
        "ListPodSandbox",
        client
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest::default()),
    )
    .await
    .expect("ListPodSandbox");
    for _ in 0..2 {
        let status = with_timeout(
            "ContainerStatus",
            client
                .runtime
                .container_status(api::ContainerStatusRequest {
                    container_id: "no-such-container".into(),
                    verbose: false,
                }),
        )
        .await
        .expect_err("an unknown container");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }

    let response = get(address, "/metrics").await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert!(
        response
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        response.head
    );
    let page = &response.body;
    let count = |method: &str, code: &str| {
        sample(
            page,
            &format!("corral_cri_requests_total{{method=\"{method}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(count("Version", "OK"), Some(1.0), "{page}");
    assert_eq!(count("ListPodSandbox", "OK"), Some(1.0), "{page}");
    assert_eq!(count("ContainerStatus", "NotFound"), Some(2.0), "{page}");
    assert_eq!(count("ContainerStatus", "OK"), None, "{page}");
    // The histogram agrees with the counters.
    assert_eq!(
        sample(
            page,
            "corral_cri_request_duration_seconds_count{method=\"ContainerStatus\"}"
        ),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(
            page,
            "corral_cri_request_duration_seconds_bucket{method=\"ContainerStatus\",le=\"+Inf\"}"
        ),
        Some(2.0),
        "{page}"
    );
    assert!(
        page.contains("# TYPE corral_cri_request_duration_seconds histogram\n"),
        "{page}"
    );

    // A fresh daemon with no pods: the gauges are there, at zero.
    for state in ["ready", "notready"] {
        let series = format!("corral_pod_sandboxes{{state=\"{state}\"}}");
        assert_eq!(sample(page, &series), Some(0.0), "{page}");
    }
    for state in ["created", "running", "exited", "unknown"] {
        let series = format!("corral_containers{{state=\"{state}\"}}");
        assert_eq!(sample(page, &series), Some(0.0), "{page}");
    }
    assert!(
        page.contains("# TYPE corral_pod_sandboxes gauge\n"),
        "{page}"
    );

    let rss = sample(page, "process_resident_memory_bytes").unwrap_or(0.0);
    assert!(rss > 0.0, "{page}");
    assert!(
        sample(page, "process_open_fds").is_some_and(|n| n > 0.0),
        "{page}"
    );
    assert!(
        sample(page, "process_start_time_seconds").is_some_and(|t| t > 1e9),
        "{page}"
    );

    // The scrape itself is not a CRI call, and other paths are not served.
    let again = get(address, "/metrics").await;
    assert_eq!(
        sample(
            &again.body,
            "corral_cri_requests_total{method=\"Version\",code=\"OK\"}"
        ),
        Some(1.0),
        "{}",
        again.body
    );
    assert_eq!(get(address, "/").await.status, 404);
    assert_eq!(get(address, "/metrics/x").await.status, 404);
}

#[test]
fn a_taken_metrics_address_fails_the_start_naming_it() {
    let cleanup = Cleanup::new().expect("cleanup");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let address = taken.local_addr().expect("local address");
    let config = DaemonConfig::new(&cleanup, &metrics_yaml(address));
    let output = Daemon::run_to_exit(config.clone()).expect("run corrald");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("metrics"), "{stderr}");
    assert!(stderr.contains(&address.to_string()), "{stderr}");
    drop(taken);
}
