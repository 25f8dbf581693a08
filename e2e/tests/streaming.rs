//! Exec and PortForward through corrald's streaming server (issue 6), with
//! SPDY/3.1 and WebSocket clients, against real pods.

use std::path::Path;
use std::time::Duration;

use corral_e2e::cri::api;
use corral_e2e::pod::{poll, proc_status_kib, PodNode, RUNC_V2_HANDLER};
use corral_e2e::streaming_client::{
    exec_spdy, exec_websocket, request, ClientStream, ExecInput, SpdyClient, SpdyPortForward,
    WsClient,
};

const WAIT: Duration = Duration::from_secs(30);

async fn node() -> PodNode {
    PodNode::start().await.expect("start the pod node")
}

async fn exec_url(node: &PodNode, container: &str, cmd: &[&str], input: &ExecInput) -> String {
    let request = api::ExecRequest {
        container_id: container.to_string(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: input.tty,
        stdin: input.stdin.is_some(),
        stdout: input.stdout,
        stderr: input.stderr,
    };
    node.client()
        .runtime
        .exec(request)
        .await
        .expect("Exec")
        .into_inner()
        .url
}

async fn exec(
    node: &PodNode,
    container: &str,
    cmd: &[&str],
    input: ExecInput,
) -> corral_e2e::streaming_client::ExecOutput {
    let url = exec_url(node, container, cmd, &input).await;
    tokio::time::timeout(WAIT, exec_spdy(&url, input))
        .await
        .expect("exec timed out")
        .expect("exec over SPDY")
}

fn out_err() -> ExecInput {
    ExecInput {
        stdout: true,
        stderr: true,
        ..Default::default()
    }
}

/// The pids whose command line is exactly `cmdline` (NUL-separated).
fn pids_with_cmdline(cmdline: &[u8]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .as_deref()
                == Some(cmdline)
        })
        .collect()
}

#[tokio::test]
async fn exec_over_spdy() {
    let node = node().await;
    let pod = node.run_pod("stream-exec").await.unwrap();
    let container = node
        .run_container(&pod, "sleeper", &["sleep", "3600"])
        .await
        .unwrap();

    // Streams kept apart, the exit code in the v4 status.
    let got = exec(
        &node,
        &container,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        out_err(),
    )
    .await;
    assert_eq!(got.protocol, "v4.channel.k8s.io");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&got.stderr), "err\n");
    assert_eq!(
        got.exit_code(),
        Some(3),
        "status: {}",
        String::from_utf8_lossy(&got.error)
    );
    let got = exec(&node, &container, &["true"], out_err()).await;
    assert_eq!(got.error, br#"{"metadata":{},"status":"Success"}"#);

    // stdin reaches the process and its EOF ends `cat`.
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let got = exec(
        &node,
        &container,
        &["cat"],
        ExecInput {
            stdin: Some(big.clone()),
            stdout: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(got.stdout.len(), big.len());
    assert!(got.stdout == big, "cat echoed other bytes");
    assert_eq!(got.exit_code(), Some(0));

    // A terminal, resized before the command asks for its size.
    let got = exec(
        &node,
        &container,
        &["stty", "size"],
        ExecInput {
            stdout: true,
            tty: true,
            resize: Some((123, 45)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "45 123");
    assert_eq!(got.exit_code(), Some(0));

    // A URL serves once.
    let url = exec_url(&node, &container, &["true"], &out_err()).await;
    exec_spdy(&url, out_err()).await.expect("first use");
    let (_, answer) = request(&url, &[("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")])
        .await
        .unwrap();
    assert_eq!(answer.status, 404);

    // Bad requests are refused at the RPC.
    let mut client = node.client();
    let mut bad = api::ExecRequest {
        container_id: container.clone(),
        cmd: vec!["true".into()],
        ..Default::default()
    };
    let status = client.runtime.exec(bad.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    bad.stdout = true;
    bad.container_id = "0".repeat(64);
    let status = client.runtime.exec(bad).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // A client that leaves mid-exec leaves no process behind.
    let marker = ["sleep", "4242"];
    let url = exec_url(&node, &container, &marker, &out_err()).await;
    let client = tokio::spawn(async move { exec_spdy(&url, out_err()).await });
    let cmdline = b"sleep\x004242\x00";
    let started = poll(WAIT, || {
        (!pids_with_cmdline(cmdline).is_empty()).then_some(())
    })
    .await;
    assert!(started.is_some(), "the exec never started");
    client.abort();
    let _ = client.await;
    let gone = poll(WAIT, || pids_with_cmdline(cmdline).is_empty().then_some(())).await;
    assert!(gone.is_some(), "the exec outlived its client");
}

/// A pod serving `token` over HTTP on port 80, once it listens.
async fn http_pod(node: &PodNode, name: &str, token: &str) -> String {
    let pod = node.run_pod(name).await.unwrap();
    node.run_http_server(&pod, token).await.unwrap();
    pod
}

async fn port_forward_url(node: &PodNode, pod: &str, ports: &[i32]) -> String {
    node.client()
        .runtime
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: pod.to_string(),
            port: ports.to_vec(),
        })
        .await
        .expect("PortForward")
        .into_inner()
        .url
}

const GET: &[u8] = b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n";

#[tokio::test]
async fn port_forward_to_httpd() {
    let node = node().await;
    let token = node.cleanup().unique();
    let pod = http_pod(&node, "stream-pf", token).await;

    // SPDY: 20 connections at once on one port-forward, and one to a port
    // nothing listens on, refused on its own error stream.
    let url = port_forward_url(&node, &pod, &[]).await;
    let pf = std::sync::Arc::new(SpdyPortForward::connect(&url).await.unwrap());
    let mut gets = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let pf = std::sync::Arc::clone(&pf);
        gets.spawn(async move { pf.round_trip(80, GET).await });
    }
    let (refused, failure) = tokio::time::timeout(WAIT, pf.round_trip(81, GET))
        .await
        .unwrap()
        .unwrap();
    assert!(refused.is_empty());
    let failure = String::from_utf8_lossy(&failure);
    assert!(failure.contains("port 81"), "{failure}");
    let mut answered = 0;
    while let Some(result) = tokio::time::timeout(WAIT, gets.join_next()).await.unwrap() {
        let (body, failure) = result.unwrap().unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("HTTP/1.") && body.contains(token),
            "{body}"
        );
        assert!(failure.is_empty());
        answered += 1;
    }
    assert_eq!(answered, 20);

    // WebSocket: the port on channels 0 and 1, each first saying the port.
    let url = port_forward_url(&node, &pod, &[80]).await;
    let mut ws = WsClient::connect(&format!("{url}?port=80"), &["v4.channel.k8s.io"])
        .await
        .unwrap();
    assert_eq!(ws.protocol, "v4.channel.k8s.io");
    ws.send(0, GET).await.unwrap();
    let mut data = Vec::new();
    let mut prefixes = 0;
    while let Some((channel, payload)) = tokio::time::timeout(WAIT, ws.recv())
        .await
        .unwrap()
        .unwrap()
    {
        if payload == 80u16.to_le_bytes() && prefixes < 2 {
            prefixes += 1;
            continue;
        }
        assert_eq!(channel, 0, "error: {}", String::from_utf8_lossy(&payload));
        data.extend_from_slice(&payload);
    }
    assert_eq!(prefixes, 2);
    assert!(String::from_utf8_lossy(&data).contains(token));
}

#[tokio::test]
async fn exec_over_websocket() {
    let node = node().await;
    let pod = node.run_pod("stream-ws").await.unwrap();
    let container = node
        .run_container(&pod, "sleeper", &["sleep", "3600"])
        .await
        .unwrap();
    let input = ExecInput {
        stdin: Some(Vec::new()),
        stdout: true,
        stderr: true,
        ..Default::default()
    };

    // v5: stdin closed with the close-channel message.
    let url = exec_url(
        &node,
        &container,
        &["sh", "-c", "cat; echo err >&2; exit 7"],
        &input,
    )
    .await;
    let got = tokio::time::timeout(
        WAIT,
        exec_websocket(&url, "v5.channel.k8s.io", Some(b"hello\n")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(got.protocol, "v5.channel.k8s.io");
    assert_eq!(got.stdout, b"hello\n");
    assert_eq!(got.stderr, b"err\n");
    assert_eq!(got.exit_code(), Some(7));

    // v4 base64: text messages.
    let url = exec_url(&node, &container, &["echo", "b64"], &out_err()).await;
    let got = tokio::time::timeout(WAIT, exec_websocket(&url, "v4.base64.channel.k8s.io", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.protocol, "v4.base64.channel.k8s.io");
    assert_eq!(got.stdout, b"b64\n");
    assert_eq!(got.exit_code(), Some(0));

    // An implementation nobody here wrote: Python's websocket-client.
    let has_client = std::process::Command::new("python3")
        .args(["-c", "import websocket"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        eprintln!(
            "SKIPPED the Python websocket-client check: `pip install websocket-client` is missing"
        );
        return;
    }
    let url = exec_url(
        &node,
        &container,
        &["sh", "-c", "echo py-out; echo py-err >&2; exit 4"],
        &out_err(),
    )
    .await;
    let script = r#"
import sys, json, websocket
ws = websocket.create_connection(sys.argv[1].replace("http://", "ws://"), subprotocols=["v4.channel.k8s.io"])
got = {}
while True:
    op, data = ws.recv_data(control_frame=False)
    if op == websocket.ABNF.OPCODE_CLOSE:
        break
    if data:
        got.setdefault(data[0], b"")
        got[data[0]] += data[1:]
print(json.dumps({str(k): v.decode() for k, v in got.items()}))
"#;
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", script, &url])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(got["1"], "py-out\n");
    assert_eq!(got["2"], "py-err\n");
    let status: serde_json::Value = serde_json::from_str(got["3"].as_str().unwrap()).unwrap();
    assert_eq!(status["details"]["causes"][0]["message"], "4");
}

async fn attach_url(
    node: &PodNode,
    container: &str,
    input: &ExecInput,
) -> Result<String, tonic::Status> {
    let request = api::AttachRequest {
        container_id: container.to_string(),
        tty: input.tty,
        stdin: input.stdin.is_some(),
        stdout: input.stdout,
        stderr: input.stderr,
    };
    Ok(node
        .client()
        .runtime
        .attach(request)
        .await?
        .into_inner()
        .url)
}

/// A started container of `cmd` with stdin (and `tty`) as given.
async fn stdin_container(
    node: &PodNode,
    pod: &str,
    name: &str,
    cmd: &[&str],
    stdin_once: bool,
    tty: bool,
) -> String {
    let mut config = node.container_config(name, cmd);
    config.stdin = true;
    config.stdin_once = stdin_once;
    config.tty = tty;
    let id = node.create_container(pod, config).await.unwrap();
    node.start_container(&id).await.unwrap();
    id
}

/// Reads `stream` until what it delivered contains `needle`; everything read.
async fn read_until(stream: &mut ClientStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(data) = stream.read().await {
            seen.extend_from_slice(&data);
            if String::from_utf8_lossy(&seen).contains(needle) {
                return true;
            }
        }
        false
    })
    .await;
    let seen = String::from_utf8_lossy(&seen).into_owned();
    assert!(found == Ok(true), "never saw {needle:?}, only {seen:?}");
    seen
}

/// An attach with stdin and stdout over SPDY (and a resize stream with a
/// terminal): the connection and those streams; the error stream is opened
/// and left.
async fn attach_stdin(
    node: &PodNode,
    container: &str,
    tty: bool,
) -> (SpdyClient, ClientStream, ClientStream, Option<ClientStream>) {
    let input = ExecInput {
        stdin: Some(Vec::new()),
        stdout: true,
        tty,
        ..Default::default()
    };
    let url = attach_url(node, container, &input).await.unwrap();
    let conn = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    let _error = conn.open(&[("streamType", "error")]).await.unwrap();
    let stdin = conn.open(&[("streamType", "stdin")]).await.unwrap();
    let stdout = conn.open(&[("streamType", "stdout")]).await.unwrap();
    let resize = match tty {
        true => Some(conn.open(&[("streamType", "resize")]).await.unwrap()),
        false => None,
    };
    (conn, stdin, stdout, resize)
}

/// stdin_once: an attached client's stdin reaches the container, its end
/// ends the container's, the container exits and the client hears
/// success; the log got the output as well. Returns the exited container.
async fn attach_stdin_once(node: &PodNode, pod: &str) -> String {
    let echo = stdin_container(
        node,
        pod,
        "echo",
        &[
            "sh",
            "-c",
            "while read l; do echo \"echo: $l\"; done; echo bye; echo gone >&2",
        ],
        true,
        false,
    )
    .await;
    let input = ExecInput {
        stdin: Some(b"a\nb\n".to_vec()),
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let url = attach_url(node, &echo, &input).await.unwrap();
    let got = tokio::time::timeout(WAIT, exec_spdy(&url, input))
        .await
        .expect("attach timed out")
        .expect("attach over SPDY");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "echo: a\necho: b\nbye\n"
    );
    assert_eq!(String::from_utf8_lossy(&got.stderr), "gone\n");
    assert_eq!(got.error, br#"{"metadata":{},"status":"Success"}"#);
    let status = node.wait_exited(&echo, WAIT).await.unwrap();
    assert_eq!(status.exit_code, 0);
    // The log got the output as well.
    let log = node.wait_log_line(&echo, "bye", WAIT).await.unwrap();
    assert!(log.contains("stdout F echo: a"), "{log}");
    echo
}

/// Polls, through ExecSync, until the container's terminal is `size`
/// ("rows cols").
async fn wait_terminal_size(node: &PodNode, container: &str, size: &str) {
    for _ in 0..100 {
        let got = node
            .exec_sync(container, &["stty", "-F", "/dev/console", "size"], 10)
            .await
            .map(|r| String::from_utf8_lossy(&r.stdout).trim().to_string());
        if got.as_deref().ok() == Some(size) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the terminal of {container} never became {size}");
}

/// A terminal container attached twice: the first client sizes it to
/// `(width, height)` and types a line (then ends its stdin, if
/// `end_stdin`) and leaves; the second's line is read all the same.
async fn terminal_attaches(
    node: &PodNode,
    pod: &str,
    (width, height): (u16, u16),
    end_stdin: bool,
) {
    let term = stdin_container(
        node,
        pod,
        "term",
        &["sh", "-c", "while read l; do echo \"got $l\"; done"],
        false,
        true,
    )
    .await;
    let (conn, stdin, mut stdout, resize) = attach_stdin(node, &term, true).await;
    let size = format!("{{\"Width\":{width},\"Height\":{height}}}");
    let resize = resize.expect("a terminal's resize stream");
    resize.write(size.as_bytes()).await.unwrap();
    wait_terminal_size(node, &term, &format!("{height} {width}")).await;
    stdin.write(b"one\n").await.unwrap();
    read_until(&mut stdout, "got one").await;
    if end_stdin {
        stdin.close().await.unwrap();
    }
    drop((stdin, stdout, resize, conn));
    let (_conn, stdin, mut stdout, _resize) = attach_stdin(node, &term, true).await;
    stdin.write(b"two\n").await.unwrap();
    read_until(&mut stdout, "got two").await;
}

#[tokio::test]
async fn attach_over_spdy() {
    let node = node().await;
    let pod = node.run_pod("stream-attach").await.unwrap();

    let echo = attach_stdin_once(&node, &pod).await;

    // Output only: a client sees what is written while it is attached;
    // leaving detaches, the container runs on, and the next one sees more.
    let ticker = node
        .run_container(
            &pod,
            "ticker",
            &[
                "sh",
                "-c",
                "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done",
            ],
        )
        .await
        .unwrap();
    let out_only = ExecInput {
        stdout: true,
        ..Default::default()
    };
    for _ in 0..2 {
        let url = attach_url(&node, &ticker, &out_only).await.unwrap();
        let conn = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
            .await
            .unwrap();
        let _error = conn.open(&[("streamType", "error")]).await.unwrap();
        let mut stdout = conn.open(&[("streamType", "stdout")]).await.unwrap();
        let first = read_until(&mut stdout, "\n").await;
        let n: u32 = first
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        read_until(&mut stdout, &format!("tick {}\n", n + 3)).await;
        drop((stdout, conn));
    }
    let (status, _) = node.container_status(&ticker).await.unwrap();
    assert_eq!(
        status.state,
        api::ContainerState::ContainerRunning as i32,
        "detaching stopped the container"
    );

    // A terminal: a resize reaches it, typed input is echoed and read, and
    // without stdin_once the container's stdin outlives a client that ends
    // its own.
    terminal_attaches(&node, &pod, (123, 45), true).await;

    // Without stdin_once, the end of a client's stdin ends its attach (as
    // containerd's) but not the container's stdin: the next client's
    // input is read.
    let reader = stdin_container(
        &node,
        &pod,
        "reader",
        &["sh", "-c", "while read l; do echo \"got $l\"; done"],
        false,
        false,
    )
    .await;
    let input = ExecInput {
        stdin: Some(b"one\n".to_vec()),
        stdout: true,
        ..Default::default()
    };
    let url = attach_url(&node, &reader, &input).await.unwrap();
    let got = tokio::time::timeout(WAIT, exec_spdy(&url, input))
        .await
        .expect("an attach whose stdin ended went on")
        .unwrap();
    assert_eq!(got.error, br#"{"metadata":{},"status":"Success"}"#);
    let (conn, stdin, mut stdout, _) = attach_stdin(&node, &reader, false).await;
    stdin.write(b"two\n").await.unwrap();
    read_until(&mut stdout, "got two").await;
    drop((stdin, stdout, conn));

    // Bad requests are refused at the RPC.
    let with_stdin = ExecInput {
        stdin: Some(Vec::new()),
        stdout: true,
        ..Default::default()
    };
    let status = attach_url(&node, &ticker, &with_stdin).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = attach_url(&node, &echo, &out_only).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let status = attach_url(&node, &"0".repeat(64), &out_only)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let status = attach_url(&node, &ticker, &ExecInput::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

/// corrald's resident memory, in KiB.
fn daemon_rss_kib(node: &PodNode) -> u64 {
    let pid = node.daemon_pid().expect("corrald runs");
    proc_status_kib(pid as i32, "VmRSS").expect("corrald's VmRSS")
}

/// Once the writer has started and while `conn` reads nothing, the
/// writer must stay blocked (`writing` still true 2 s later) and corrald
/// must not take its output into memory (`rss_before` plus well under
/// what was written).
async fn assert_held_back(
    node: &PodNode,
    conn: &SpdyClient,
    rss_before: u64,
    writing: impl Fn() -> bool,
) {
    // Unthrottled, 64 MiB pass through in well under this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        writing(),
        "the process wrote everything while its client read nothing"
    );
    let grown_mib = daemon_rss_kib(node).saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 24,
        "corrald grew by {grown_mib} MiB holding a slow client's output"
    );
    conn.pause_reading(false);
}

#[tokio::test]
async fn slow_client_slows_the_process() {
    const TOTAL: usize = 64 << 20;
    let node = node().await;
    let pod = node.run_pod("stream-slow").await.unwrap();
    let sleeper = node
        .run_container(&pod, "sleeper", &["sleep", "3600"])
        .await
        .unwrap();

    // Exec: 64 MiB to a client that stops reading.
    let rss_before = daemon_rss_kib(&node);
    let cmd = ["dd", "if=/dev/zero", "bs=65536", "count=1024"];
    let input = ExecInput {
        stdout: true,
        ..Default::default()
    };
    let url = exec_url(&node, &sleeper, &cmd, &input).await;
    let conn = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    conn.pause_reading(true);
    let mut error = conn.open(&[("streamType", "error")]).await.unwrap();
    let mut stdout = conn.open(&[("streamType", "stdout")]).await.unwrap();
    // busybox's dd rewrites its command line: `if=x` reads as `if\0x`.
    let dd = b"dd\x00if\x00/dev/zero\x00bs\x0065536\x00count\x001024\x00";
    let started = poll(WAIT, || (!pids_with_cmdline(dd).is_empty()).then_some(())).await;
    assert!(started.is_some(), "the writer never started");
    assert_held_back(&node, &conn, rss_before, || {
        !pids_with_cmdline(dd).is_empty()
    })
    .await;
    let (out, status) = tokio::time::timeout(WAIT, async {
        tokio::join!(stdout.read_all(), error.read_all())
    })
    .await
    .expect("the exec never ended once read");
    assert_eq!(out.len(), TOTAL, "bytes lost or added");
    assert!(out.iter().all(|b| *b == 0));
    assert_eq!(status, br#"{"metadata":{},"status":"Success"}"#);

    // Attach: the container itself waits for its slow client.
    let writer = stdin_container(
        &node,
        &pod,
        "writer",
        &[
            "sh",
            "-c",
            "read go; echo started >&2; dd if=/dev/zero bs=65536 count=1023 2>/dev/null; echo done",
        ],
        false,
        false,
    )
    .await;
    let rss_before = daemon_rss_kib(&node);
    let input = ExecInput {
        stdin: Some(Vec::new()),
        stdout: true,
        ..Default::default()
    };
    let url = attach_url(&node, &writer, &input).await.unwrap();
    let conn = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    let _error = conn.open(&[("streamType", "error")]).await.unwrap();
    let stdin = conn.open(&[("streamType", "stdin")]).await.unwrap();
    let mut stdout = conn.open(&[("streamType", "stdout")]).await.unwrap();
    conn.pause_reading(true);
    stdin.write(b"go\n").await.unwrap();
    node.wait_log_line(&writer, "started", WAIT).await.unwrap();
    let pid = node.container_pid(&writer).await.unwrap();
    assert_held_back(&node, &conn, rss_before, || {
        Path::new(&format!("/proc/{pid}")).exists()
    })
    .await;
    let out = tokio::time::timeout(WAIT, stdout.read_all())
        .await
        .expect("the attach never ended once read");
    assert_eq!(out.len(), 1023 * 65536 + 5, "bytes lost or added");
    assert!(out.ends_with(b"done\n"));
    assert_eq!(node.wait_exited(&writer, WAIT).await.unwrap().exit_code, 0);
}

#[tokio::test]
async fn attach_to_another_shims_container() {
    // Debian's containerd-shim-runc-v2 knows only FIFOs: corrald copies the
    // output to the log and to attached clients, and holds stdin.
    let node = node().await;
    let pod = node
        .run_pod_on("stream-attach-v2", RUNC_V2_HANDLER)
        .await
        .unwrap();
    attach_stdin_once(&node, &pod).await;

    // A terminal, resized through the task API, and a client that leaves
    // without ending its stdin.
    terminal_attaches(&node, &pod, (77, 21), false).await;
}

#[tokio::test]
async fn attach_after_corrald_was_killed() {
    // The shim keeps its attach socket; for another shim's container the
    // next corrald reopens the stdin FIFO and resumes the copy.
    let mut node = node().await;
    let cmd = ["sh", "-c", "while read l; do echo \"got $l\"; done"];
    let mut readers = Vec::new();
    for (name, handler) in [
        ("stream-restart", ""),
        ("stream-restart-v2", RUNC_V2_HANDLER),
    ] {
        let pod = node.run_pod_on(name, handler).await.unwrap();
        readers.push(stdin_container(&node, &pod, "reader", &cmd, false, false).await);
    }
    node.kill_daemon().unwrap();
    node.restart_daemon().await.unwrap();
    for reader in &readers {
        let (_conn, stdin, mut stdout, _) = attach_stdin(&node, reader, false).await;
        stdin.write(b"after\n").await.unwrap();
        read_until(&mut stdout, "got after").await;
    }
}
