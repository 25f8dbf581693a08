//! Exec and PortForward through corrald's streaming server (issue 6), with
//! SPDY/3.1 and WebSocket clients, against real pods.

use std::time::Duration;

use corral_e2e::cri::api;
use corral_e2e::pod::{poll, PodNode};
use corral_e2e::streaming_client::{
    exec_spdy, exec_websocket, request, ExecInput, SpdyPortForward, WsClient,
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
        &["sh", "-c", "sleep 0.5; stty size"],
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

/// `sh -c` serving `token` over HTTP on port 80 with busybox httpd.
async fn http_pod(node: &PodNode, name: &str, token: &str) -> String {
    let pod = node.run_pod(name).await.unwrap();
    let script =
        format!("mkdir -p /www && echo {token} > /www/index.html && exec httpd -f -p 80 -h /www");
    let id = node
        .run_container(&pod, "web", &["sh", "-c", &script])
        .await
        .unwrap();
    let pid = node.container_pid(&id).await.unwrap();
    let listening = poll(WAIT, || {
        ["tcp", "tcp6"]
            .iter()
            .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
            .any(|t| {
                t.lines()
                    .any(|l| l.contains(":0050 ") && l.contains(" 0A "))
            })
            .then_some(())
    })
    .await;
    assert!(listening.is_some(), "httpd does not listen");
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
