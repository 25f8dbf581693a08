//! corrald's streaming server with the real kubectl as its client: exec,
//! attach and port-forward go through a stand-in API server
//! (`corral_e2e::kube_api`) that makes kubelet's CRI calls and proxies the
//! connection to corrald, so SPDY and WebSocket framing meet Kubernetes'
//! own Go implementation. kubectl is `$CORRAL_KUBECTL`, else `kubectl` on
//! `PATH`; a missing kubectl fails every test.

use std::time::Duration;

use corral_e2e::kube_api::{run_bounded, Input, KubeApi, Kubectl, Output, StreamRecord};
use corral_e2e::pod::PodNode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The bound on one kubectl run: a hang fails the test.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(90);

const WAIT: Duration = Duration::from_secs(30);

/// How kubectl is told to stream exec and attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Spdy,
    WebSocket,
}

impl Protocol {
    fn env(self) -> (&'static str, &'static str) {
        let on = if self == Protocol::WebSocket {
            "true"
        } else {
            "false"
        };
        ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", on)
    }

    /// The remote-command subprotocol corrald must pick for kubectl: the
    /// newest each transport has.
    fn subprotocol(self) -> &'static str {
        match self {
            Protocol::Spdy => "v4.channel.k8s.io",
            Protocol::WebSocket => "v5.channel.k8s.io",
        }
    }
}

/// A pod node, the stand-in API server in front of it and kubectl.
struct Cluster {
    // Dropped first: proxied connections end before the pods go.
    api: KubeApi,
    kubectl: Kubectl,
    version: (u32, u32),
    node: PodNode,
}

impl Cluster {
    async fn start() -> Cluster {
        let node = PodNode::start().await.expect("start the pod node");
        let api = KubeApi::start(node.client()).expect("start the fake API server");
        let dir = node.cleanup().work_dir().join("kubectl");
        let kubeconfig = api
            .write_kubeconfig(&dir, &namespace(&node))
            .expect("write the kubeconfig");
        let kubectl = Kubectl::find(&kubeconfig, &dir.join("cache"))
            .unwrap_or_else(|e| panic!("these tests need kubectl: {e}"));
        let version = kubectl.version().expect("kubectl version");
        eprintln!(
            "kubectl {} is v{}.{}",
            kubectl.binary().display(),
            version.0,
            version.1
        );
        Cluster {
            api,
            kubectl,
            version,
            node,
        }
    }

    /// SPDY always; WebSocket where this kubectl speaks it for exec and
    /// attach (1.30 on, KEP-4006).
    fn protocols(&self) -> Vec<Protocol> {
        let mut protocols = vec![Protocol::Spdy];
        if self.version >= (1, 30) {
            protocols.push(Protocol::WebSocket);
        }
        protocols
    }

    /// `kubectl args...` speaking `protocol`, `stdin` as its input.
    async fn kubectl(&self, protocol: Protocol, args: &[&str], stdin: &[u8]) -> Output {
        let mut command = self.kubectl.command(args);
        let (key, value) = protocol.env();
        command.env(key, value);
        run_bounded(command, Input::Bytes(stdin), KUBECTL_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}\n{}", self.diagnostics()))
    }

    /// `kubectl args...` in a terminal of `cols`×`rows` made by `script`,
    /// whose input stays open until it exits.
    async fn kubectl_in_terminal(
        &self,
        protocol: Protocol,
        args: &[&str],
        (cols, rows): (u16, u16),
        stdin: &[u8],
    ) -> Output {
        let line = format!(
            "stty cols {cols} rows {rows}; {}",
            self.kubectl.shell_line(args)
        );
        let mut command = tokio::process::Command::new("script");
        command.args(["-qec", &line, "/dev/null"]);
        let (key, value) = protocol.env();
        command.env(key, value);
        run_bounded(command, Input::KeptOpen(stdin), KUBECTL_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("script {line:?}: {e}\n{}", self.diagnostics()))
    }

    /// The streaming connections since the first `since`.
    fn streams_since(&self, since: usize) -> Vec<StreamRecord> {
        self.api.streams().into_iter().skip(since).collect()
    }

    /// Asserts that kubectl made exactly one streaming connection of
    /// `kind` since `since`, upgraded to `protocol`.
    fn assert_streamed(&self, since: usize, kind: &str, protocol: Protocol) {
        let streams = self.streams_since(since);
        let [stream] = streams.as_slice() else {
            panic!(
                "expected one {kind} connection over {protocol:?}, got {streams:#?}\n{}",
                self.diagnostics()
            );
        };
        assert_eq!(stream.kind, kind);
        assert!(stream.upgraded(), "not upgraded: {stream:?}");
        match protocol {
            Protocol::Spdy => assert!(stream.is_spdy(), "{stream:?}"),
            Protocol::WebSocket => assert!(stream.is_websocket(), "{stream:?}"),
        }
        assert_eq!(stream.negotiated, protocol.subprotocol(), "{stream:?}");
    }

    fn diagnostics(&self) -> String {
        format!(
            "requests: {:#?}\nstreams: {:#?}\ncorrald log:\n{}",
            self.api.requests(),
            self.api.streams(),
            corral_e2e::pod::tail(&self.node.daemon_log(), 40)
        )
    }

    /// A pod running `sleep` in container `c`.
    async fn sleeper_pod(&self, name: &str) -> String {
        let pod = self.node.run_pod(name).await.unwrap();
        self.node
            .run_container(&pod, "c", &["sleep", "3600"])
            .await
            .unwrap();
        pod
    }
}

fn namespace(node: &PodNode) -> String {
    node.pod_config("any")
        .metadata
        .map(|m| m.namespace)
        .unwrap_or_default()
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {:?}\nstderr: {:?}",
        output.status,
        output.stdout_text(),
        output.stderr_text()
    )
}

#[tokio::test]
async fn exec_keeps_streams_apart_and_returns_the_exit_code() {
    let cluster = Cluster::start().await;
    cluster.sleeper_pod("kc-exec").await;

    for protocol in cluster.protocols() {
        let since = cluster.api.streams().len();
        let out = cluster
            .kubectl(
                protocol,
                &[
                    "exec",
                    "kc-exec",
                    "-c",
                    "c",
                    "--",
                    "sh",
                    "-c",
                    "echo out; echo err >&2; exit 3",
                ],
                b"",
            )
            .await;
        assert_eq!(
            out.stdout_text(),
            "out\n",
            "{protocol:?}: {}",
            describe(&out)
        );
        assert!(
            out.stderr_text().contains("err"),
            "{protocol:?}: {}",
            describe(&out)
        );
        assert_eq!(out.code(), Some(3), "{protocol:?}: {}", describe(&out));
        cluster.assert_streamed(since, "exec", protocol);
    }
}

#[tokio::test]
async fn exec_stdin_is_echoed_byte_for_byte() {
    let cluster = Cluster::start().await;
    cluster.sleeper_pod("kc-stdin").await;
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();

    for protocol in cluster.protocols() {
        let since = cluster.api.streams().len();
        let out = cluster
            .kubectl(
                protocol,
                &["exec", "-i", "kc-stdin", "-c", "c", "--", "cat"],
                &big,
            )
            .await;
        assert_eq!(
            out.code(),
            Some(0),
            "{protocol:?}: exit {:?}, stderr {:?}",
            out.status,
            out.stderr_text()
        );
        assert_eq!(out.stdout.len(), big.len(), "{protocol:?}");
        assert!(out.stdout == big, "{protocol:?}: cat echoed other bytes");
        cluster.assert_streamed(since, "exec", protocol);
    }
}

/// `stty size` in `kubectl exec -it`, run in a terminal of 123×45.
async fn terminal_size(cluster: &Cluster, protocol: Protocol, pod: &str, script: &str) -> Output {
    let since = cluster.api.streams().len();
    let out = cluster
        .kubectl_in_terminal(
            protocol,
            &["exec", "-it", pod, "-c", "c", "--", "sh", "-c", script],
            (123, 45),
            b"",
        )
        .await;
    assert_eq!(out.code(), Some(0), "{protocol:?}: {}", describe(&out));
    cluster.assert_streamed(since, "exec", protocol);
    out
}

#[tokio::test]
async fn exec_in_a_terminal_follows_its_size() {
    let cluster = Cluster::start().await;
    cluster.sleeper_pod("kc-tty").await;

    for protocol in cluster.protocols() {
        // Waits for the first resize, however late it comes: this checks
        // that kubectl's size reaches the terminal, not when.
        let out = terminal_size(
            &cluster,
            protocol,
            "kc-tty",
            "until stty size 2>/dev/null | grep -q '^[1-9]'; do sleep 0.1; done; stty size",
        )
        .await;
        assert!(
            out.stdout_text().contains("45 123"),
            "{protocol:?}: {}",
            describe(&out)
        );
    }
}

#[tokio::test]
async fn exec_in_a_terminal_starts_with_its_size() {
    let cluster = Cluster::start().await;
    cluster.sleeper_pod("kc-tty0").await;

    // What a user sees from `kubectl exec -it pod -- stty size`: the size
    // must be set before the command reads it. Every protocol is tried
    // before failing, so that the message says which ones are wrong.
    let mut wrong = Vec::new();
    for protocol in cluster.protocols() {
        let out = terminal_size(&cluster, protocol, "kc-tty0", "stty size").await;
        if !out.stdout_text().contains("45 123") {
            wrong.push(format!("{protocol:?}: {}", describe(&out)));
        }
    }
    assert!(
        wrong.is_empty(),
        "the command started before the terminal had kubectl's size:\n{}",
        wrong.join("\n")
    );
}

/// A pod serving `token` over HTTP on port 80, once it listens.
async fn http_pod(node: &PodNode, name: &str, token: &str) -> String {
    let pod = node.run_pod(name).await.unwrap();
    node.run_http_server(&pod, token).await.unwrap();
    pod
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn http_get(port: u16) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the forwarded port");
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
        .await
        .expect("send GET");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .expect("read the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn port_forward_serves_concurrent_connections() {
    let cluster = Cluster::start().await;
    let token = cluster.node.cleanup().unique().to_string();
    http_pod(&cluster.node, "kc-pf", &token).await;

    // kubectl 1.32 tries WebSocket first (SPDY tunnelled in it, which the
    // API server translates for kubelet) and falls back to SPDY; with the
    // tunnel switched off it speaks SPDY alone.
    for tunnel in ["false", "true"] {
        let since = cluster.api.streams().len();
        let port = free_port();
        let mapping = format!("{port}:80");
        let mut command =
            cluster
                .kubectl
                .command(&["port-forward", "--address", "127.0.0.1", "kc-pf", &mapping]);
        command
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", tunnel)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("spawn kubectl port-forward");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Forwarding from") {
                    return Some(line);
                }
            }
            None
        })
        .await;
        if !matches!(ready, Ok(Some(_))) {
            let _ = child.start_kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = tokio::time::timeout(WAIT, pipe.read_to_string(&mut stderr)).await;
            }
            panic!(
                "kubectl port-forward never said it forwards: {stderr}\n{}",
                cluster.diagnostics()
            );
        }
        // kubectl prints a line per connection: keep reading so its pipe
        // never fills.
        let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let mut gets = tokio::task::JoinSet::new();
        for _ in 0..20 {
            gets.spawn(http_get(port));
        }
        let mut answered = 0;
        while let Some(result) = tokio::time::timeout(WAIT, gets.join_next())
            .await
            .expect("a GET through kubectl hangs")
        {
            let body = result.expect("GET task");
            assert!(
                body.starts_with("HTTP/1.") && body.contains(&token),
                "tunnel={tunnel}: {body:?}\n{}",
                cluster.diagnostics()
            );
            answered += 1;
        }
        assert_eq!(answered, 20);
        child.start_kill().expect("kill kubectl port-forward");
        let _ = tokio::time::timeout(WAIT, child.wait()).await;
        drain.abort();

        // What carried the data: SPDY's portforward.k8s.io, after at most
        // one refused WebSocket attempt.
        let streams = cluster.streams_since(since);
        let Some((last, attempts)) = streams.split_last() else {
            panic!("no port-forward connection: {}", cluster.diagnostics());
        };
        assert!(last.is_spdy() && last.upgraded(), "{streams:#?}");
        assert_eq!(last.negotiated, "portforward.k8s.io");
        assert!(
            attempts.iter().all(|a| a.is_websocket() && !a.upgraded()),
            "{streams:#?}"
        );
        eprintln!("port-forward tunnel={tunnel}: {streams:#?}");
    }
}

/// A container `name` in `pod` created with stdin (and `tty`), registered
/// with the API server so the pod object says so.
async fn stdin_container(
    cluster: &Cluster,
    pod: &str,
    name: &str,
    tty: bool,
    cmd: &[&str],
) -> String {
    let mut config = cluster.node.container_config(name, cmd);
    config.stdin = true;
    config.stdin_once = true;
    config.tty = tty;
    let id = cluster
        .node
        .create_container(pod, config.clone())
        .await
        .unwrap();
    cluster.node.start_container(&id).await.unwrap();
    cluster.api.describe_container(pod, &config);
    id
}

const ECHO_LOOP: &str = r#"while read l; do echo "echo: $l"; done; echo bye"#;

#[tokio::test]
async fn attach_with_stdin_once_ends_with_the_container() {
    let cluster = Cluster::start().await;
    let pod = cluster.node.run_pod("kc-attach").await.unwrap();

    for protocol in cluster.protocols() {
        // stdin_once: the first attach's end closes the container's stdin,
        // so each protocol needs a container of its own.
        let name = format!("c-{protocol:?}").to_lowercase();
        let id = stdin_container(&cluster, &pod, &name, false, &["sh", "-c", ECHO_LOOP]).await;
        let since = cluster.api.streams().len();
        let out = cluster
            .kubectl(
                protocol,
                &["attach", "-i", "kc-attach", "-c", &name],
                b"a\nb\n",
            )
            .await;
        assert_eq!(
            out.stdout_text(),
            "echo: a\necho: b\nbye\n",
            "{protocol:?}: {}\n{}",
            describe(&out),
            cluster.diagnostics()
        );
        assert_eq!(out.code(), Some(0), "{protocol:?}: {}", describe(&out));
        cluster.assert_streamed(since, "attach", protocol);
        let status = cluster.node.wait_exited(&id, WAIT).await.unwrap();
        assert_eq!(status.exit_code, 0, "{status:?}");
    }
}

#[tokio::test]
async fn attach_to_a_terminal() {
    let cluster = Cluster::start().await;
    let pod = cluster.node.run_pod("kc-attach-tty").await.unwrap();

    for protocol in cluster.protocols() {
        let name = format!("t-{protocol:?}").to_lowercase();
        let id = stdin_container(
            &cluster,
            &pod,
            &name,
            true,
            &[
                "sh",
                "-c",
                r#"read l; echo "got: $l"; [ -t 0 ] && echo stdin-is-a-terminal"#,
            ],
        )
        .await;
        let since = cluster.api.streams().len();
        let out = cluster
            .kubectl_in_terminal(
                protocol,
                &["attach", "-it", "kc-attach-tty", "-c", &name],
                (100, 30),
                b"hello\r",
            )
            .await;
        let text = out.stdout_text();
        assert!(
            text.contains("got: hello") && text.contains("stdin-is-a-terminal"),
            "{protocol:?}: {}\n{}",
            describe(&out),
            cluster.diagnostics()
        );
        assert_eq!(out.code(), Some(0), "{protocol:?}: {}", describe(&out));
        cluster.assert_streamed(since, "attach", protocol);
        let status = cluster.node.wait_exited(&id, WAIT).await.unwrap();
        assert_eq!(status.exit_code, 0, "{status:?}");
    }
}
