//! corrald's pods and containers over its real socket, as kubelet drives
//! them: a real registry, the real CNI bridge and portmap plugins, runc,
//! real cgroups. Every test has a node of its own ([`PodNode`]: its corrald,
//! bridge, /24, runc root, cgroup subtree), so the tests run in parallel;
//! the node's teardown fails a test that leaves a netns, veth, portmap
//! rule, shim, bundle or cgroup behind.
//!
//! Needs root, `docker-registry`, `busybox-static`, runc, the CNI plugins
//! in /usr/lib/cni, iptables, and the built binaries
//! (`cargo build --workspace --bins` with the same profile and target dir).
//! `$CORRAL_E2E_OCI_RUNTIME` replaces runc (see `corral_e2e::pod`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use corral_e2e::cri::api;
use corral_e2e::pod::{cgroup_dir, parse_cri_log, poll, LogLine, PodNode};
use tonic::Code;

const EXIT_WAIT: Duration = Duration::from_secs(30);
const LOG_WAIT: Duration = Duration::from_secs(15);

async fn node() -> PodNode {
    PodNode::start().await.expect("start the pod node")
}

fn created() -> i32 {
    api::ContainerState::ContainerCreated as i32
}
fn running() -> i32 {
    api::ContainerState::ContainerRunning as i32
}
fn exited() -> i32 {
    api::ContainerState::ContainerExited as i32
}

/// 64 hex characters no object has.
fn unknown_id() -> String {
    format!(
        "{:064x}",
        u128::from(std::process::id()) << 64 | 0xdead_beef
    )
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn lines(log: &str) -> Vec<LogLine> {
    parse_cri_log(log).unwrap_or_else(|e| panic!("{e}\nlog: {log:?}"))
}

fn code_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) -> tonic::Status {
    match result {
        Ok(value) => panic!("{what} succeeded: {value:?}"),
        Err(status) => status,
    }
}

/// A container config with a security context tweaked by `f`.
fn with_security(
    mut config: api::ContainerConfig,
    f: impl FnOnce(&mut api::LinuxContainerSecurityContext),
) -> api::ContainerConfig {
    let linux = config.linux.get_or_insert_with(Default::default);
    f(linux.security_context.get_or_insert_with(Default::default));
    config
}

/// Runs `cmd` to its end in `pod`; returns its status and log.
async fn run_to_exit(
    node: &PodNode,
    pod: &str,
    config: api::ContainerConfig,
) -> (api::ContainerStatus, String) {
    let id = node
        .create_container(pod, config)
        .await
        .expect("CreateContainer");
    node.start_container(&id).await.expect("StartContainer");
    let status = node.wait_exited(&id, EXIT_WAIT).await.expect("exit");
    // No wait here: the shim drains a process's output into the log
    // before it reports the exit, as containerd's shim does.
    let log = node.read_log(&id).await.expect("read log");
    (status, log)
}

fn stream_text(log: &str, stream: &str) -> String {
    lines(log)
        .into_iter()
        .filter(|l| l.stream == stream)
        .map(|l| l.text)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_pods_whole_life() {
    let node = node().await;
    let config = node.pod_config("life");
    let pod = node
        .run_pod_with(config.clone())
        .await
        .expect("RunPodSandbox");
    assert_eq!(pod.len(), 64, "{pod}");
    assert!(pod.bytes().all(|b| b.is_ascii_hexdigit()), "{pod}");

    let (status, info) = node.pod_status(&pod).await.expect("PodSandboxStatus");
    assert_eq!(
        status.state,
        api::PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    assert_eq!(status.metadata, config.metadata);
    assert_eq!(status.labels, config.labels);
    assert!(status.created_at > 0);
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        node.network().contains(&ip),
        "pod IP {ip:?} is not in {}",
        node.network().subnet()
    );
    let netns = info["netns"].as_str().unwrap_or_default().to_string();
    assert!(Path::new(&netns).exists(), "netns {netns:?} of {info}");
    assert_eq!(node.network().veths().len(), 1, "one veth on the bridge");
    // A prefix names the pod too.
    let by_prefix = node.pod_status(&pod[..12]).await.expect("status by prefix");
    assert_eq!(by_prefix.0.id, pod);

    let container = node
        .create_container(
            &pod,
            node.container_config("app", &["sh", "-c", "echo hello World; sleep 3600"]),
        )
        .await
        .expect("CreateContainer");
    assert_eq!(container.len(), 64);
    let (status, _) = node.container_status(&container).await.expect("status");
    assert_eq!(status.state, created(), "{status:?}");
    assert!(
        status.created_at > 0 && status.started_at == 0,
        "{status:?}"
    );
    assert_eq!(
        status.log_path,
        Path::new(&config.log_directory)
            .join("app.log")
            .display()
            .to_string()
    );
    assert_eq!(
        status.image.as_ref().map(|i| i.image.as_str()),
        Some(node.image())
    );
    assert_eq!(status.image_id, node.pushed_image().id);

    node.start_container(&container)
        .await
        .expect("StartContainer");
    let (status, _) = node.container_status(&container).await.expect("status");
    assert_eq!(status.state, running(), "{status:?}");
    assert!(status.started_at >= status.created_at, "{status:?}");
    // What the teardown's leak check looks for is there while the pod
    // lives: it would see a leak.
    let live = node.leftovers().new_since(node.baseline());
    assert_eq!(
        (
            live.netns.len(),
            live.sandbox_dirs.len(),
            live.veths.len(),
            live.shims.len()
        ),
        (1, 1, 1, 1),
        "{live:?}"
    );
    assert!(
        live.bundles.len() >= 2 && live.cgroups.len() >= 2,
        "{live:?}"
    );
    assert_eq!(live.snapshots.len(), 1, "the writable layer: {live:?}");

    let log = node
        .wait_log_line(&container, "hello World", LOG_WAIT)
        .await
        .expect("log line");
    let hello: Vec<LogLine> = lines(&log)
        .into_iter()
        .filter(|l| l.text == "hello World")
        .collect();
    assert_eq!(hello.len(), 1, "{log:?}");
    assert_eq!(
        (hello[0].stream.as_str(), hello[0].tag.as_str()),
        ("stdout", "F"),
        "{log:?}"
    );

    let exec = node
        .exec_sync(&container, &["echo", "-n", "hello"], 10)
        .await
        .expect("ExecSync");
    assert_eq!(exec.stdout, b"hello", "{exec:?}");
    assert!(exec.stderr.is_empty(), "{exec:?}");
    assert_eq!(exec.exit_code, 0);
    let exec = node
        .exec_sync(&container, &["sh", "-c", "echo oops >&2; exit 5"], 10)
        .await
        .expect("ExecSync");
    assert_eq!(
        (
            exec.stdout.as_slice(),
            exec.stderr.as_slice(),
            exec.exit_code
        ),
        (&b""[..], &b"oops\n"[..], 5)
    );

    // sh is its container's PID 1: SIGTERM does nothing, SIGKILL comes
    // after the timeout.
    let began = Instant::now();
    node.stop(&container, 2).await.expect("StopContainer");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "StopContainer took {took:?} with a 2 s timeout"
    );
    assert!(
        took < Duration::from_secs(12),
        "StopContainer took {took:?}"
    );
    let (status, _) = node.container_status(&container).await.expect("status");
    assert_eq!(status.state, exited(), "{status:?}");
    assert_eq!(status.exit_code, 137, "{status:?}");
    assert_eq!(status.reason, "Error", "{status:?}");
    assert!(status.finished_at >= status.started_at, "{status:?}");
    assert!(node
        .container_ids()
        .await
        .expect("list")
        .contains(&container));

    node.remove_container(&container)
        .await
        .expect("RemoveContainer");
    let mut client = node.client();
    let gone = code_of(
        client
            .runtime
            .container_status(api::ContainerStatusRequest {
                container_id: container.clone(),
                verbose: false,
            })
            .await,
        "ContainerStatus of a removed container",
    );
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(!node
        .container_ids()
        .await
        .expect("list")
        .contains(&container));

    node.stop_pod(&pod).await.expect("StopPodSandbox");
    let (status, _) = node.pod_status(&pod).await.expect("status");
    assert_eq!(status.state, api::PodSandboxState::SandboxNotready as i32);
    assert!(
        node.network().veths().is_empty(),
        "veth after StopPodSandbox"
    );
    assert!(
        !Path::new(&netns).exists(),
        "netns {netns} after StopPodSandbox"
    );
    node.stop_pod(&pod).await.expect("StopPodSandbox again");

    node.remove_pod(&pod).await.expect("RemovePodSandbox");
    let gone = code_of(
        client
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await,
        "PodSandboxStatus of a removed pod",
    );
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(node.pod_ids().await.expect("list").is_empty());
    let left = node.settled_since(node.baseline()).await;
    assert!(left.is_empty(), "left after the pod's life: {left:?}");
}

#[tokio::test]
async fn exit_codes_and_reasons() {
    let node = node().await;
    let pod = node.run_pod("exits").await.expect("RunPodSandbox");
    let (three, _) = run_to_exit(
        &node,
        &pod,
        node.container_config("three", &["sh", "-c", "exit 3"]),
    )
    .await;
    assert_eq!(
        (three.exit_code, three.reason.as_str()),
        (3, "Error"),
        "{three:?}"
    );
    let (zero, _) = run_to_exit(&node, &pod, node.container_config("zero", &["true"])).await;
    assert_eq!(
        (zero.exit_code, zero.reason.as_str()),
        (0, "Completed"),
        "{zero:?}"
    );
    for status in [&three, &zero] {
        assert!(status.started_at > 0, "{status:?}");
        assert!(status.finished_at >= status.started_at, "{status:?}");
    }
}

#[tokio::test]
async fn two_pods_reach_each_other() {
    let node = node().await;
    let server_pod = node.run_pod("server").await.expect("server pod");
    let client_pod = node.run_pod("client").await.expect("client pod");
    let token = format!("token-{}", node.cleanup().unique());
    node.run_http_server(&server_pod, &token)
        .await
        .expect("web server");
    let client = node
        .run_container(&client_pod, "client", &["sleep", "3600"])
        .await
        .expect("client container");

    let ip_of = |status: &api::PodSandboxStatus| status.network.clone().unwrap_or_default().ip;
    let server_ip = ip_of(&node.pod_status(&server_pod).await.expect("status").0);
    let client_ip = ip_of(&node.pod_status(&client_pod).await.expect("status").0);
    assert_ne!(server_ip, client_ip);
    assert!(node.network().contains(&server_ip) && node.network().contains(&client_ip));
    assert_eq!(node.network().veths().len(), 2);

    let url = format!("http://{server_ip}/index.html");
    // `timeout`, not wget's own -T: Debian's busybox-static wget crashes
    // (SIGSEGV) whenever -T is given, in a container or not.
    let exec = node
        .exec_sync(
            &client,
            &["timeout", "10", "wget", "-q", "-O", "-", &url],
            20,
        )
        .await
        .expect("ExecSync wget");
    assert_eq!(
        (exec.exit_code, String::from_utf8_lossy(&exec.stdout).trim()),
        (0, token.as_str()),
        "{exec:?}"
    );
    // The client's own address is the one the server sees: no NAT between pods.
    let exec = node
        .exec_sync(&client, &["sh", "-c", "ip -4 -o addr show eth0"], 10)
        .await
        .expect("ExecSync ip");
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains(&format!("{client_ip}/24")),
        "{exec:?}"
    );
}

fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// The node's first global IPv4 address that is not on a test bridge.
fn node_ip() -> Option<Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            let interface = words.nth(1)?;
            if interface.starts_with("crlp") || interface.starts_with("cni") {
                return None;
            }
            words.nth(1)?.split('/').next()?.parse().ok()
        })
}

#[tokio::test]
async fn host_port_reaches_the_pod() {
    let node = node().await;
    let host_port = std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut config = node.pod_config("ports");
    config.port_mappings = vec![api::PortMapping {
        protocol: api::Protocol::Tcp as i32,
        container_port: 80,
        host_port: i32::from(host_port),
        host_ip: String::new(),
    }];
    let pod = node.run_pod_with(config).await.expect("RunPodSandbox");
    let token = format!("port-{}", node.cleanup().unique());
    node.run_http_server(&pod, &token)
        .await
        .expect("web server");
    assert!(
        !node.network().nat_rules().is_empty(),
        "portmap wrote no rules"
    );

    let pod_ip: Ipv4Addr = node
        .pod_status(&pod)
        .await
        .expect("status")
        .0
        .network
        .unwrap_or_default()
        .ip
        .parse()
        .expect("pod IP");
    let direct = http_get(SocketAddr::from((pod_ip, 80)));
    assert!(
        direct.as_deref().is_ok_and(|b| b.contains(&token)),
        "pod IP: {direct:?}"
    );

    let mut candidates = vec![("gateway (bridge address)", node.network().gateway())];
    if let Some(ip) = node_ip() {
        candidates.push(("node address", ip));
    }
    candidates.push(("loopback", Ipv4Addr::LOCALHOST));
    let mut reached = Vec::new();
    for (what, ip) in &candidates {
        let answer = http_get(SocketAddr::from((*ip, host_port)));
        let ok = answer.as_deref().is_ok_and(|b| b.contains(&token));
        eprintln!(
            "host port {host_port} via {what} {ip}: {}",
            if ok {
                "reached the pod".to_string()
            } else {
                format!("{answer:?}")
            }
        );
        if ok {
            reached.push(*what);
        }
    }
    assert!(
        reached.contains(&"gateway (bridge address)"),
        "the host port is not reachable through the gateway; reached through {reached:?}"
    );

    node.stop_pod(&pod).await.expect("StopPodSandbox");
    assert!(
        node.network().nat_rules().is_empty(),
        "portmap rules after StopPodSandbox: {:?}",
        node.network().nat_rules()
    );
    let after = http_get(SocketAddr::from((node.network().gateway(), host_port)));
    assert!(
        !after.as_deref().is_ok_and(|b| b.contains(&token)),
        "host port still answers"
    );
}

/// Pids of processes whose command line is exactly `args`.
fn processes_running(args: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .into_iter()
        .flat_map(|e| e.flatten())
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmdline == want).then_some(pid)
        })
        .collect()
}

#[tokio::test]
async fn exec_sync_timeout_kills_the_process() {
    let node = node().await;
    let pod = node.run_pod("exectimeout").await.expect("RunPodSandbox");
    let container = node
        .run_container(&pod, "sleeper", &["sleep", "3600"])
        .await
        .expect("container");
    let began = Instant::now();
    let err = code_of(
        node.exec_sync(&container, &["sleep", "4321"], 1).await,
        "ExecSync past its timeout",
    );
    let took = began.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        took < Duration::from_secs(10),
        "ExecSync with timeout 1 took {took:?}"
    );
    let gone = poll(Duration::from_secs(5), || {
        processes_running(&["sleep", "4321"])
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "sleep 4321 still runs: {:?}",
        processes_running(&["sleep", "4321"])
    );
    // The container is none the worse for it.
    let exec = node
        .exec_sync(&container, &["echo", "-n", "still here"], 10)
        .await
        .expect("ExecSync");
    assert_eq!(exec.stdout, b"still here");
    let (status, _) = node.container_status(&container).await.expect("status");
    assert_eq!(status.state, running());
}

/// Output of a command that ends at once: the shim must be writing to the
/// FIFOs before corrald lets go of its own write ends, or a read sees EOF
/// early and the output is lost.
#[tokio::test]
async fn exec_sync_output_is_complete_every_time() {
    let node = node().await;
    let pod = node.run_pod("execoutput").await.expect("RunPodSandbox");
    let container = node
        .run_container(&pod, "sleeper", &["sleep", "3600"])
        .await
        .expect("container");
    let mut incomplete = Vec::new();
    for i in 0..30 {
        let exec = node
            .exec_sync(
                &container,
                &["sh", "-c", "echo out; echo err >&2; exit 4"],
                10,
            )
            .await
            .expect("ExecSync");
        if (
            exec.stdout.as_slice(),
            exec.stderr.as_slice(),
            exec.exit_code,
        ) != (&b"out\n"[..], &b"err\n"[..], 4)
        {
            incomplete.push((i, exec));
        }
    }
    assert!(
        incomplete.is_empty(),
        "{} of 30 ExecSync answers incomplete: {incomplete:?}",
        incomplete.len()
    );
}

#[tokio::test]
async fn security_context_user_and_read_only_rootfs() {
    let node = node().await;
    let pod = node.run_pod("secuser").await.expect("RunPodSandbox");

    let config = with_security(
        node.container_config("user", &["sh", "-c", "id -u; id -g"]),
        |s| {
            s.run_as_user = Some(api::Int64Value { value: 1001 });
            s.run_as_group = Some(api::Int64Value { value: 1002 });
        },
    );
    let (status, log) = run_to_exit(&node, &pod, config).await;
    assert_eq!(status.exit_code, 0, "{status:?} {log:?}");
    assert_eq!(stream_text(&log, "stdout"), "1001\n1002", "{log:?}");

    let config = with_security(node.container_config("ro", &["touch", "/x"]), |s| {
        s.readonly_rootfs = true
    });
    let (status, log) = run_to_exit(&node, &pod, config).await;
    assert_ne!(
        status.exit_code, 0,
        "touch on a read-only rootfs succeeded: {log:?}"
    );
    assert!(
        stream_text(&log, "stderr").contains("Read-only file system"),
        "{log:?}"
    );

    // The same command on a writable rootfs: the refusal above was the
    // read-only flag's doing.
    let (status, log) =
        run_to_exit(&node, &pod, node.container_config("rw", &["touch", "/x"])).await;
    assert_eq!(status.exit_code, 0, "{status:?} {log:?}");
}

#[tokio::test]
async fn security_context_dropped_capability() {
    let node = node().await;
    let pod = node.run_pod("seccaps").await.expect("RunPodSandbox");
    let script = [
        "sh",
        "-c",
        "grep CapEff /proc/self/status; touch /f && chown 1000 /f",
    ];

    let (status, log) = run_to_exit(&node, &pod, node.container_config("withchown", &script)).await;
    assert_eq!(
        status.exit_code, 0,
        "chown with the default capabilities failed: {log:?}"
    );
    let default_caps = stream_text(&log, "stdout");

    let config = with_security(node.container_config("nochown", &script), |s| {
        s.capabilities = Some(api::Capability {
            drop_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        });
    });
    let (status, log) = run_to_exit(&node, &pod, config).await;
    assert_ne!(
        status.exit_code, 0,
        "chown without CAP_CHOWN succeeded: {log:?}"
    );
    assert!(
        stream_text(&log, "stderr").contains("Operation not permitted"),
        "{log:?}"
    );
    let effective = |text: &str| {
        let hex = text
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        u64::from_str_radix(&hex, 16).unwrap_or_else(|_| panic!("CapEff in {text:?}"))
    };
    let (with, without) = (
        effective(&default_caps),
        effective(&stream_text(&log, "stdout")),
    );
    assert_eq!(with & 1, 1, "CAP_CHOWN missing by default: {with:x}");
    assert_eq!(
        without,
        with & !1,
        "dropping CHOWN changed more than bit 0: {with:x} -> {without:x}"
    );
}

#[tokio::test]
async fn security_context_seccomp() {
    let node = node().await;
    let pod = node.run_pod("seccomp").await.expect("RunPodSandbox");
    // unshare(CLONE_NEWUSER) needs no capability, so only a seccomp filter
    // refuses it here: the default profile allows unshare only with
    // CAP_SYS_ADMIN.
    let script = [
        "sh",
        "-c",
        "grep '^Seccomp:' /proc/self/status; unshare -U true; echo rc=$?",
    ];
    let profile = |kind: api::security_profile::ProfileType| {
        Some(api::SecurityProfile {
            profile_type: kind as i32,
            ..Default::default()
        })
    };

    let config = with_security(node.container_config("default", &script), |s| {
        s.seccomp = profile(api::security_profile::ProfileType::RuntimeDefault)
    });
    let (_, log) = run_to_exit(&node, &pod, config).await;
    let out = stream_text(&log, "stdout");
    assert!(out.contains("Seccomp:\t2"), "RuntimeDefault: {log:?}");
    assert!(
        !out.contains("rc=0"),
        "RuntimeDefault let unshare(CLONE_NEWUSER) through: {log:?}"
    );
    assert!(
        stream_text(&log, "stderr").contains("Operation not permitted"),
        "{log:?}"
    );

    let (_, log) = run_to_exit(&node, &pod, node.container_config("nil", &script)).await;
    let out = stream_text(&log, "stdout");
    assert!(out.contains("Seccomp:\t0"), "no profile: {log:?}");
    assert!(
        out.contains("rc=0"),
        "no profile, yet unshare failed: {log:?}"
    );

    let config = with_security(node.container_config("unconfined", &script), |s| {
        s.seccomp = profile(api::security_profile::ProfileType::Unconfined)
    });
    let (_, log) = run_to_exit(&node, &pod, config).await;
    assert!(
        stream_text(&log, "stdout").contains("Seccomp:\t0"),
        "Unconfined: {log:?}"
    );
}

fn read_trimmed(dir: &Path, file: &str) -> String {
    let path = dir.join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

#[tokio::test]
async fn resources_reach_the_cgroup() {
    let node = node().await;
    let config = node.pod_config("resources");
    let parent = config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    let pod = node.run_pod_with(config).await.expect("RunPodSandbox");
    let mut container_config = node.container_config("limited", &["sleep", "3600"]);
    container_config
        .linux
        .get_or_insert_with(Default::default)
        .resources = Some(api::LinuxContainerResources {
        cpu_shares: 512,
        cpu_period: 100_000,
        cpu_quota: 50_000,
        memory_limit_in_bytes: 64 << 20,
        ..Default::default()
    });
    let container = node
        .create_container(&pod, container_config)
        .await
        .expect("CreateContainer");
    node.start_container(&container)
        .await
        .expect("StartContainer");
    let pid = node.container_pid(&container).await.expect("pid");

    let cpu = cgroup_dir(pid, "cpu").expect("cpu cgroup");
    let memory = cgroup_dir(pid, "memory").expect("memory cgroup");
    assert!(
        cpu.to_string_lossy()
            .contains(parent.trim_start_matches('/')),
        "container cgroup {} is not under the pod's parent {parent}",
        cpu.display()
    );
    let v1 = cpu.join("cpu.shares").exists();
    if v1 {
        assert_eq!(read_trimmed(&cpu, "cpu.shares"), "512");
        assert_eq!(read_trimmed(&cpu, "cpu.cfs_period_us"), "100000");
        assert_eq!(read_trimmed(&cpu, "cpu.cfs_quota_us"), "50000");
        assert_eq!(
            read_trimmed(&memory, "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
    } else {
        assert_eq!(read_trimmed(&cpu, "cpu.max"), "50000 100000");
        assert_eq!(
            read_trimmed(&memory, "memory.max"),
            (64u64 << 20).to_string()
        );
        assert_ne!(
            read_trimmed(&cpu, "cpu.weight"),
            "100",
            "shares 512 left the default weight"
        );
    }

    let mut client = node.client();
    client
        .runtime
        .update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: container.clone(),
            linux: Some(api::LinuxContainerResources {
                cpu_shares: 512,
                cpu_period: 100_000,
                cpu_quota: 20_000,
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("UpdateContainerResources");
    if v1 {
        assert_eq!(read_trimmed(&cpu, "cpu.cfs_quota_us"), "20000");
    } else {
        assert_eq!(read_trimmed(&cpu, "cpu.max"), "20000 100000");
    }
    let (status, _) = node.container_status(&container).await.expect("status");
    let reported = status.resources.and_then(|r| r.linux).map(|l| l.cpu_quota);
    assert_eq!(
        reported,
        Some(20_000),
        "ContainerStatus resources after the update"
    );
}

async fn container_stats(node: &PodNode, id: &str) -> api::ContainerStats {
    let mut client = node.client();
    client
        .runtime
        .container_stats(api::ContainerStatsRequest {
            container_id: id.to_string(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats")
}

#[tokio::test]
async fn stats_move_when_a_container_burns_cpu() {
    let node = node().await;
    let pod = node.run_pod("stats").await.expect("RunPodSandbox");
    let busy = node
        .run_container(&pod, "busy", &["sh", "-c", "while :; do :; done"])
        .await
        .expect("busy container");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = container_stats(&node, &busy).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = container_stats(&node, &busy).await;

    let used = |s: &api::ContainerStats| {
        s.cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds)
            .map(|v| v.value)
            .unwrap_or(0)
    };
    let (a, b) = (used(&first), used(&second));
    assert!(
        b > a + 100_000_000,
        "CPU time moved from {a} to {b} ns in 2 s of a busy loop"
    );
    assert_eq!(
        second.attributes.as_ref().map(|a| a.id.as_str()),
        Some(busy.as_str())
    );
    let working_set = second
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(
        working_set.is_some_and(|w| w > 0),
        "memory {:?}",
        second.memory
    );
    let rate = second
        .cpu
        .as_ref()
        .and_then(|c| c.usage_nano_cores)
        .map(|v| v.value);
    eprintln!(
        "busy loop: {} ms of CPU in 2 s; usage_nano_cores {rate:?}",
        (b - a) / 1_000_000
    );
    assert!(
        second.cpu.as_ref().map_or(0, |c| c.timestamp)
            > first.cpu.as_ref().map_or(0, |c| c.timestamp)
    );
}

async fn events_of_one_container(cmd: &[&str]) {
    let node = node().await;
    let pod = node.run_pod("events").await.expect("RunPodSandbox");
    let mut client = node.client();
    let mut stream = client
        .runtime
        .get_container_events(api::GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            if tx.send(event).is_err() {
                break;
            }
        }
    });

    let container = node
        .create_container(&pod, node.container_config("evented", cmd))
        .await
        .expect("create");
    node.start_container(&container).await.expect("start");
    node.wait_exited(&container, EXIT_WAIT).await.expect("exit");
    node.remove_container(&container).await.expect("remove");

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 4 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) if event.container_id == container => seen.push(event),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    reader.abort();
    let kinds: Vec<String> = seen
        .iter()
        .map(|e| {
            api::ContainerEventType::try_from(e.container_event_type)
                .map(|k| k.as_str_name().to_string())
                .unwrap_or_else(|_| e.container_event_type.to_string())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "CONTAINER_CREATED_EVENT",
            "CONTAINER_STARTED_EVENT",
            "CONTAINER_STOPPED_EVENT",
            "CONTAINER_DELETED_EVENT"
        ],
        "events of {cmd:?}"
    );
    for event in &seen {
        assert_eq!(
            event.pod_sandbox_status.as_ref().map(|s| s.id.as_str()),
            Some(pod.as_str()),
            "{event:?}"
        );
        assert!(event.created_at > 0);
    }
    let stopped = &seen[2];
    assert!(
        stopped
            .containers_statuses
            .iter()
            .any(|s| s.id == container && s.state == exited()),
        "the STOPPED event carries the exited status: {stopped:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].created_at <= w[1].created_at),
        "timestamps out of order"
    );
}

#[tokio::test]
async fn container_events_in_order() {
    events_of_one_container(&["sleep", "1"]).await;
}

#[tokio::test]
async fn container_events_in_order_for_a_process_that_exits_at_once() {
    // The exit may be reported before StartContainer returns; kubelet's
    // evented PLEG still needs STARTED before STOPPED.
    events_of_one_container(&["true"]).await;
}

#[tokio::test]
async fn restart_recovery() {
    let mut node = node().await;
    let pod = node.run_pod("survivor").await.expect("RunPodSandbox");
    let ticker = node
        .run_container(
            &pod,
            "ticker",
            &[
                "sh",
                "-c",
                "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done",
            ],
        )
        .await
        .expect("ticker");
    let quitter = node
        .run_container(&pod, "quitter", &["sh", "-c", "sleep 3; exit 7"])
        .await
        .expect("quitter");
    node.wait_log_line(&ticker, "tick 2", LOG_WAIT)
        .await
        .expect("ticks");
    let (pod_before, info) = node.pod_status(&pod).await.expect("status");
    let netns = info["netns"].as_str().unwrap_or_default().to_string();
    let log_path = node
        .container_status(&ticker)
        .await
        .expect("status")
        .0
        .log_path;
    let quitter_pid = node.container_pid(&quitter).await.expect("pid");
    assert_eq!(node.network().veths().len(), 1);

    node.kill_daemon().expect("kill -9 corrald");
    let ticks = || lines(&std::fs::read_to_string(&log_path).unwrap_or_default()).len();
    let at_kill = ticks();
    let quit = poll(Duration::from_secs(15), || {
        (!Path::new(&format!("/proc/{quitter_pid}")).exists()).then_some(())
    })
    .await;
    assert!(quit.is_some(), "quitter {quitter_pid} still runs");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let while_down = ticks();
    assert!(
        while_down > at_kill,
        "the log did not grow while corrald was down ({at_kill} -> {while_down})"
    );

    let restarted_at = now_ns();
    node.restart_daemon().await.expect("restart corrald");
    let (pod_after, _) = node.pod_status(&pod).await.expect("status after restart");
    assert_eq!(
        pod_after.state,
        api::PodSandboxState::SandboxReady as i32,
        "{pod_after:?}"
    );
    assert_eq!(pod_after.network, pod_before.network);
    assert!(Path::new(&netns).exists(), "netns {netns} lost");
    assert_eq!(node.network().veths().len(), 1);

    let (status, _) = node.container_status(&ticker).await.expect("ticker status");
    assert_eq!(status.state, running(), "{status:?}");
    let (status, _) = node
        .container_status(&quitter)
        .await
        .expect("quitter status");
    assert_eq!(
        (status.state, status.exit_code, status.reason.as_str()),
        (exited(), 7, "Error"),
        "{status:?}"
    );
    // The shim's exit time, not the moment the daemon learnt of it.
    assert!(
        status.finished_at > status.started_at && status.finished_at < restarted_at,
        "{status:?}"
    );
    let mut listed = node.container_ids().await.expect("list");
    listed.sort();
    let mut want = vec![ticker.clone(), quitter.clone()];
    want.sort();
    assert_eq!(listed, want);
    let exec = node
        .exec_sync(&ticker, &["echo", "-n", "alive"], 10)
        .await
        .expect("ExecSync after restart");
    assert_eq!(exec.stdout, b"alive");
    let grew = poll(Duration::from_secs(5), || {
        (ticks() > while_down).then_some(())
    })
    .await;
    assert!(grew.is_some(), "the log stopped growing after the restart");

    node.stop_pod(&pod)
        .await
        .expect("StopPodSandbox after restart");
    let (status, _) = node.container_status(&ticker).await.expect("status");
    assert_eq!(status.state, exited());
    assert!(
        node.network().veths().is_empty(),
        "veth after StopPodSandbox: {:?}",
        node.network().veths()
    );
    assert!(!Path::new(&netns).exists(), "netns after StopPodSandbox");
    node.remove_pod(&pod).await.expect("RemovePodSandbox");
}

#[tokio::test]
async fn bad_pod_input_leaves_nothing() {
    let node = node().await;
    let before = node.leftovers();
    let check_clean = |what: &'static str| {
        let node = &node;
        let before = before.clone();
        async move {
            let left = node.settled_since(&before).await;
            assert!(left.is_empty(), "after {what}: {left:?}");
        }
    };

    let mut config = node.pod_config("noname");
    config.metadata.as_mut().expect("metadata").name.clear();
    let err = code_of(
        node.try_run_pod(config).await,
        "RunPodSandbox with an empty name",
    );
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    check_clean("an empty name").await;

    let mut config = node.pod_config("nometa");
    config.metadata = None;
    let err = code_of(
        node.try_run_pod(config).await,
        "RunPodSandbox without metadata",
    );
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let mut config = node.pod_config("relativelogs");
    config.log_directory = "relative/logs".into();
    let err = code_of(
        node.try_run_pod(config).await,
        "RunPodSandbox with a relative log directory",
    );
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    check_clean("a relative log directory").await;

    let mut client = node.client();
    let err = code_of(
        client
            .runtime
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(node.pod_config("nohandler")),
                runtime_handler: "no-such-handler".into(),
            })
            .await,
        "RunPodSandbox with an unknown handler",
    );
    eprintln!(
        "unknown runtime handler: {:?}: {}",
        err.code(),
        err.message()
    );
    assert!(
        matches!(
            err.code(),
            Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
        ),
        "{err:?}"
    );
    assert!(err.message().contains("no-such-handler"), "{err:?}");
    check_clean("an unknown handler").await;

    let config = node.pod_config("dup");
    let first = node.run_pod_with(config.clone()).await.expect("first pod");
    let with_first = node.leftovers();
    let err = code_of(
        node.try_run_pod(config.clone()).await,
        "RunPodSandbox of a name in use",
    );
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let left = node.settled_since(&with_first).await;
    assert!(left.is_empty(), "after a duplicate name: {left:?}");
    assert_eq!(
        node.pod_ids().await.expect("list"),
        std::slice::from_ref(&first)
    );
    node.stop_pod(&first).await.expect("stop the first");
    let err = code_of(
        node.try_run_pod(config.clone()).await,
        "RunPodSandbox of a name held by a stopped pod",
    );
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    node.remove_pod(&first).await.expect("remove the first");
    let second = node
        .run_pod_with(config)
        .await
        .expect("the name is free once its holder is removed");
    assert_ne!(second, first);
}

#[tokio::test]
async fn bad_container_input_leaves_nothing() {
    let node = node().await;
    let pod = node.run_pod("badinput").await.expect("RunPodSandbox");
    let log_dir = node.pod_config_of(&pod).expect("config").log_directory;
    let before = node.leftovers();
    let check_clean = |what: String| {
        let node = &node;
        let before = before.clone();
        async move {
            let left = node.settled_since(&before).await;
            assert!(left.is_empty(), "after {what}: {left:?}");
            assert!(
                node.container_ids().await.expect("list").is_empty(),
                "after {what}"
            );
        }
    };

    let escape = format!("escape-{}.log", node.cleanup().unique());
    let mut cases: Vec<(&str, api::ContainerConfig, Code)> = Vec::new();
    let mut config = node.container_config("dotdot", &["true"]);
    config.log_path = format!("../{escape}");
    cases.push(("a log path with ../", config, Code::InvalidArgument));
    let mut config = node.container_config("abslog", &["true"]);
    config.log_path = "/etc/corral-e2e-escape.log".into();
    cases.push(("an absolute log path", config, Code::InvalidArgument));
    let mut config = node.container_config("nomount", &["true"]);
    config.mounts = vec![api::Mount {
        container_path: "/data".into(),
        host_path: format!("/nonexistent/{}", node.cleanup().unique()),
        ..Default::default()
    }];
    cases.push((
        "a mount of a missing host path",
        config,
        Code::InvalidArgument,
    ));
    let mut config = node.container_config("noimage", &["true"]);
    config.image = Some(api::ImageSpec {
        image: format!("{}/e2e/absent:1", node.registry().host()),
        ..Default::default()
    });
    cases.push(("an image that is not present", config, Code::NotFound));
    let mut config = node.container_config("", &["true"]);
    config.log_path = "noname.log".into();
    cases.push(("an empty container name", config, Code::InvalidArgument));

    for (what, config, code) in cases {
        let err = code_of(node.try_create_container(&pod, config).await, what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        check_clean(what.to_string()).await;
    }
    let outside = Path::new(&log_dir).parent().expect("parent").join(&escape);
    for path in [outside.as_path(), Path::new("/etc/corral-e2e-escape.log")] {
        assert!(!path.exists(), "{} was created", path.display());
    }

    let err = code_of(
        node.try_create_container(&unknown_id(), node.container_config("orphan", &["true"]))
            .await,
        "CreateContainer in an unknown pod",
    );
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    check_clean("an unknown pod id".into()).await;

    // An id of the other kind is not found.
    let container = node
        .create_container(&pod, node.container_config("real", &["sleep", "3600"]))
        .await
        .expect("CreateContainer");
    let mut client = node.client();
    let err = code_of(
        client
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: container.clone(),
                verbose: false,
            })
            .await,
        "PodSandboxStatus of a container id",
    );
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = code_of(
        client
            .runtime
            .container_status(api::ContainerStatusRequest {
                container_id: pod.clone(),
                verbose: false,
            })
            .await,
        "ContainerStatus of a pod id",
    );
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = code_of(
        node.exec_sync(&container, &["true"], 5).await,
        "ExecSync in a created container",
    );
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = code_of(
        client
            .runtime
            .start_container(api::StartContainerRequest {
                container_id: unknown_id(),
            })
            .await,
        "StartContainer of an unknown id",
    );
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Stop and Remove of what does not exist succeed, as kubelet retries them.
    for _ in 0..2 {
        node.stop(&unknown_id(), 0)
            .await
            .expect("StopContainer of an unknown id");
        node.remove_container(&unknown_id())
            .await
            .expect("RemoveContainer of an unknown id");
        node.stop_pod(&unknown_id())
            .await
            .expect("StopPodSandbox of an unknown id");
        node.remove_pod(&unknown_id())
            .await
            .expect("RemovePodSandbox of an unknown id");
    }
    node.remove_container(&container)
        .await
        .expect("RemoveContainer");
    node.remove_container(&container)
        .await
        .expect("RemoveContainer again");
    let left = node.settled_since(&before).await;
    assert!(left.is_empty(), "after removing the container: {left:?}");
}

#[tokio::test]
async fn reopen_container_log_starts_a_new_file() {
    let node = node().await;
    let pod = node.run_pod("reopen").await.expect("RunPodSandbox");
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
        .expect("ticker");
    node.wait_log_line(&ticker, "tick 1", LOG_WAIT)
        .await
        .expect("ticks");
    let path = node
        .container_status(&ticker)
        .await
        .expect("status")
        .0
        .log_path;
    let rotated = format!("{path}.1");
    // What kubelet's log rotation does: rename, then ask for a new file.
    std::fs::rename(&path, &rotated).expect("rename the log");
    let mut client = node.client();
    client
        .runtime
        .reopen_container_log(api::ReopenContainerLogRequest {
            container_id: ticker.clone(),
        })
        .await
        .expect("ReopenContainerLog");
    let fresh = poll(LOG_WAIT, || {
        let text = std::fs::read_to_string(&path).ok()?;
        (parse_cri_log(&text)
            .ok()?
            .iter()
            .any(|l| l.text.starts_with("tick ")))
        .then_some(())
    })
    .await;
    assert!(fresh.is_some(), "no new line in a new {path}");
    let old_len = std::fs::metadata(&rotated).expect("rotated").len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::metadata(&rotated).expect("rotated").len(),
        old_len,
        "the rotated file still grows"
    );
    lines(&std::fs::read_to_string(&rotated).expect("rotated"));
    lines(&std::fs::read_to_string(&path).expect("new log"));

    node.stop(&ticker, 0).await.expect("StopContainer");
    let err = code_of(
        client
            .runtime
            .reopen_container_log(api::ReopenContainerLogRequest {
                container_id: ticker.clone(),
            })
            .await,
        "ReopenContainerLog of an exited container",
    );
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn list_filters() {
    let node = node().await;
    let mut config = node.pod_config("lista");
    config.labels.insert("tier".into(), "front".into());
    let front = node.run_pod_with(config).await.expect("front pod");
    let back = node.run_pod("listb").await.expect("back pod");
    let mut running_config = node.container_config("run", &["sleep", "3600"]);
    running_config.labels.insert("role".into(), "server".into());
    let running = node
        .create_container(&front, running_config)
        .await
        .expect("create");
    node.start_container(&running).await.expect("start");
    let created = node
        .create_container(&back, node.container_config("idle", &["true"]))
        .await
        .expect("create");
    node.stop_pod(&back).await.expect("stop the back pod");

    let client = node.client();
    let pods = |filter: api::PodSandboxFilter| {
        let mut client = client.clone();
        async move {
            let mut ids: Vec<String> = client
                .runtime
                .list_pod_sandbox(api::ListPodSandboxRequest {
                    filter: Some(filter),
                })
                .await
                .expect("ListPodSandbox")
                .into_inner()
                .items
                .into_iter()
                .map(|p| p.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let ready = api::PodSandboxStateValue {
        state: api::PodSandboxState::SandboxReady as i32,
    };
    assert_eq!(
        pods(api::PodSandboxFilter {
            state: Some(ready),
            ..Default::default()
        })
        .await,
        vec![front.clone()]
    );
    assert_eq!(
        pods(api::PodSandboxFilter {
            label_selector: [("tier".to_string(), "front".to_string())].into(),
            ..Default::default()
        })
        .await,
        vec![front.clone()]
    );
    assert_eq!(
        pods(api::PodSandboxFilter {
            id: back[..10].to_string(),
            ..Default::default()
        })
        .await,
        vec![back.clone()]
    );
    let mut both = vec![front.clone(), back.clone()];
    both.sort();
    assert_eq!(pods(api::PodSandboxFilter::default()).await, both);

    let containers = |filter: api::ContainerFilter| {
        let mut client = client.clone();
        async move {
            let mut ids: Vec<String> = client
                .runtime
                .list_containers(api::ListContainersRequest {
                    filter: Some(filter),
                })
                .await
                .expect("ListContainers")
                .into_inner()
                .containers
                .into_iter()
                .map(|c| c.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let state = |s: api::ContainerState| Some(api::ContainerStateValue { state: s as i32 });
    assert_eq!(
        containers(api::ContainerFilter {
            state: state(api::ContainerState::ContainerRunning),
            ..Default::default()
        })
        .await,
        vec![running.clone()]
    );
    assert_eq!(
        containers(api::ContainerFilter {
            pod_sandbox_id: back.clone(),
            ..Default::default()
        })
        .await,
        vec![created.clone()]
    );
    assert_eq!(
        containers(api::ContainerFilter {
            label_selector: [("role".to_string(), "server".to_string())].into(),
            ..Default::default()
        })
        .await,
        vec![running.clone()]
    );
    assert_eq!(
        containers(api::ContainerFilter {
            id: running[..10].to_string(),
            ..Default::default()
        })
        .await,
        vec![running.clone()]
    );
    assert!(containers(api::ContainerFilter {
        id: running[..10].to_string(),
        pod_sandbox_id: back.clone(),
        ..Default::default()
    })
    .await
    .is_empty());
}
