//! What a pod's config asks of the node, seen from inside its containers
//! and through the CRI socket, as kubelet relies on it: DNS, hostname and
//! hosts; sysctls; the PID, IPC and network namespace modes; pod and
//! container stats. Each test has a [`PodNode`] of its own (corrald, bridge,
//! runc root, cgroup subtree), so they run in parallel; the node's teardown
//! fails a test that leaves anything behind.
//!
//! Needs root, `docker-registry`, `busybox-static`, runc, the CNI plugins
//! in /usr/lib/cni, iptables, and the built binaries
//! (`cargo build --workspace --bins` with the same profile and target dir).

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use corral_e2e::cri::api;
use corral_e2e::pod::PodNode;
use tonic::Code;

/// How long a figure gets to move (stats are sampled, traffic takes a
/// moment to be counted): a bound for polling, never a measurement.
const MOVE_WAIT: Duration = Duration::from_secs(30);

async fn node() -> PodNode {
    PodNode::start().await.expect("start the pod node")
}

/// Runs `cmd` in `container`; its stdout, which must come with exit 0.
async fn exec_ok(node: &PodNode, container: &str, cmd: &[&str]) -> String {
    let out = node
        .exec_sync(container, cmd, 30)
        .await
        .unwrap_or_else(|s| panic!("ExecSync {cmd:?}: {:?}: {}", s.code(), s.message()));
    assert_eq!(
        out.exit_code,
        0,
        "{cmd:?} exited {}: stdout {:?} stderr {:?}",
        out.exit_code,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pod's security context, made if missing.
fn pod_security(config: &mut api::PodSandboxConfig) -> &mut api::LinuxSandboxSecurityContext {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

/// A pod config whose namespaces are `pid`, `ipc`, `network`.
fn with_namespaces(
    mut config: api::PodSandboxConfig,
    pid: api::NamespaceMode,
    ipc: api::NamespaceMode,
    network: api::NamespaceMode,
) -> api::PodSandboxConfig {
    let options = pod_security(&mut config)
        .namespace_options
        .get_or_insert_with(Default::default);
    options.pid = pid as i32;
    options.ipc = ipc as i32;
    options.network = network as i32;
    config
}

/// A container config with the namespaces kubelet gives it in a pod whose
/// namespaces are `pid`, `ipc`, `network` (kubelet copies the pod's).
fn container_in(
    mut config: api::ContainerConfig,
    pid: api::NamespaceMode,
    ipc: api::NamespaceMode,
    network: api::NamespaceMode,
) -> api::ContainerConfig {
    let options = config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default);
    options.pid = pid as i32;
    options.ipc = ipc as i32;
    options.network = network as i32;
    config
}

/// The namespace link (`ipc:[4026531839]`) of a namespace of this process.
fn host_ns(kind: &str) -> String {
    fs::read_link(format!("/proc/self/ns/{kind}"))
        .expect("read the host's namespace link")
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------
// DNS, hostname, hosts

#[tokio::test]
async fn dns_hostname_and_hosts_reach_the_containers() {
    let node = node().await;
    let mut config = node.pod_config("dns");
    config.hostname = "web-0.example".into();
    config.dns_config = Some(api::DnsConfig {
        servers: vec!["10.10.10.10".into(), "10.10.10.11".into()],
        searches: vec!["google.com".into(), "svc.cluster.local".into()],
        options: vec!["ndots:8".into(), "edns0".into()],
    });
    let pod = node.run_pod_with(config).await.expect("RunPodSandbox");
    let app = node
        .run_container(&pod, "app", &["sleep", "3600"])
        .await
        .expect("container");

    let resolv = exec_ok(&node, &app, &["cat", "/etc/resolv.conf"]).await;
    let lines: Vec<&str> = resolv.lines().collect();
    assert_eq!(
        lines,
        [
            "search google.com svc.cluster.local",
            "nameserver 10.10.10.10",
            "nameserver 10.10.10.11",
            "options ndots:8 edns0"
        ],
        "{resolv:?}"
    );
    assert_eq!(
        exec_ok(&node, &app, &["cat", "/etc/hostname"]).await,
        "web-0.example\n"
    );
    assert_eq!(
        exec_ok(&node, &app, &["hostname"]).await.trim(),
        "web-0.example"
    );
    let (status, _) = node.pod_status(&pod).await.expect("PodSandboxStatus");
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(node.network().contains(&ip), "pod IP {ip:?}");
    let hosts = exec_ok(&node, &app, &["cat", "/etc/hosts"]).await;
    assert!(
        hosts.lines().any(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(ip.as_str()) && words.any(|w| w == "web-0.example")
        }),
        "no line naming {ip} web-0.example in /etc/hosts: {hosts:?}"
    );
    assert!(
        hosts
            .lines()
            .any(|l| l.starts_with("127.0.0.1") && l.contains("localhost")),
        "{hosts:?}"
    );
    // The name resolves inside the pod, through the files above.
    let resolved = exec_ok(
        &node,
        &app,
        &["ping", "-c", "1", "-W", "5", "web-0.example"],
    )
    .await;
    assert!(resolved.contains(&ip), "{resolved:?}");

    // A pod without DNS config gets the node's resolv.conf.
    let plain = node.run_pod("plain").await.expect("RunPodSandbox");
    let other = node
        .run_container(&plain, "app", &["sleep", "3600"])
        .await
        .expect("container");
    let host_resolv = fs::read_to_string("/etc/resolv.conf").expect("host resolv.conf");
    assert_eq!(
        exec_ok(&node, &other, &["cat", "/etc/resolv.conf"]).await,
        host_resolv
    );

    // A DNS entry that would add lines to the file is refused, and the
    // refused pod leaves nothing behind.
    let before = node.leftovers();
    let mut bad = node.pod_config("baddns");
    bad.dns_config = Some(api::DnsConfig {
        servers: vec!["10.0.0.1\nnameserver 6.6.6.6".into()],
        ..Default::default()
    });
    let err = node
        .try_run_pod(bad)
        .await
        .expect_err("RunPodSandbox with a server spanning two lines");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let left = node.settled_since(&before).await;
    assert!(left.is_empty(), "after a refused DNS config: {left:?}");
}

// ---------------------------------------------------------------------------
// Sysctls

fn host_sysctl(path: &str) -> String {
    fs::read_to_string(format!("/proc/sys/{path}"))
        .unwrap_or_else(|e| panic!("read /proc/sys/{path}: {e}"))
        .trim()
        .to_string()
}

#[tokio::test]
async fn pod_sysctls_reach_the_containers_and_node_wide_ones_are_refused() {
    let node = node().await;
    let host_port_start = host_sysctl("net/ipv4/ip_unprivileged_port_start");
    let host_rmid = host_sysctl("kernel/shm_rmid_forced");

    let mut config = node.pod_config("sysctls");
    config.linux.get_or_insert_with(Default::default).sysctls = HashMap::from([
        ("net.ipv4.ip_unprivileged_port_start".into(), "0".into()),
        ("kernel.shm_rmid_forced".into(), "1".into()),
    ]);
    let pod = node.run_pod_with(config).await.expect("RunPodSandbox");
    let mut app = node.container_config("app", &["sleep", "3600"]);
    // Not root, so binding port 80 needs the pod's sysctl.
    app.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .run_as_user = Some(api::Int64Value { value: 65534 });
    let app = node.create_container(&pod, app).await.expect("create");
    node.start_container(&app).await.expect("start");
    let second = node
        .run_container(&pod, "second", &["sleep", "3600"])
        .await
        .expect("second container");

    for container in [&app, &second] {
        assert_eq!(
            exec_ok(
                &node,
                container,
                &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
            )
            .await
            .trim(),
            "0"
        );
        assert_eq!(
            exec_ok(
                &node,
                container,
                &["cat", "/proc/sys/kernel/shm_rmid_forced"]
            )
            .await
            .trim(),
            "1"
        );
    }
    // What the sysctl is for: a user without capabilities binds port 80
    // (httpd binds, then goes to the background and returns 0).
    assert_eq!(exec_ok(&node, &app, &["id", "-u"]).await.trim(), "65534");
    exec_ok(&node, &app, &["httpd", "-p", "80", "-h", "/tmp"]).await;
    // The node's own values are untouched.
    assert_eq!(
        host_sysctl("net/ipv4/ip_unprivileged_port_start"),
        host_port_start
    );
    assert_eq!(host_sysctl("kernel/shm_rmid_forced"), host_rmid);

    // Sysctls that no namespace of the pod holds would change the node:
    // refused, by name, before anything is made.
    let host_swappiness = host_sysctl("vm/swappiness");
    let before = node.leftovers();
    for (name, value) in [
        ("vm.swappiness", "17"),
        ("kernel.pid_max", "40000"),
        ("kernel.hostname", "renamed"),
    ] {
        let mut config = node.pod_config(&format!("bad-{}", name.replace('.', "-")));
        config.linux.get_or_insert_with(Default::default).sysctls =
            HashMap::from([(name.to_string(), value.to_string())]);
        let err = node
            .try_run_pod(config)
            .await
            .expect_err(&format!("RunPodSandbox with sysctl {name}"));
        eprintln!("sysctl {name}: {:?}: {}", err.code(), err.message());
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(name), "{name}: {err:?}");
        let left = node.settled_since(&before).await;
        assert!(left.is_empty(), "after refusing {name}: {left:?}");
    }
    assert_eq!(host_sysctl("vm/swappiness"), host_swappiness);

    // A pod on the host's network may not set the host's net.* sysctls.
    let mut config = with_namespaces(
        node.pod_config("hostnet-sysctl"),
        api::NamespaceMode::Container,
        api::NamespaceMode::Pod,
        api::NamespaceMode::Node,
    );
    config.linux.get_or_insert_with(Default::default).sysctls =
        HashMap::from([("net.ipv4.ip_unprivileged_port_start".into(), "0".into())]);
    let err = node
        .try_run_pod(config)
        .await
        .expect_err("RunPodSandbox with a net sysctl on the host network");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let left = node.settled_since(&before).await;
    assert!(
        left.is_empty(),
        "after refusing a host-network sysctl: {left:?}"
    );
    assert_eq!(
        host_sysctl("net/ipv4/ip_unprivileged_port_start"),
        host_port_start
    );
}

// ---------------------------------------------------------------------------
// PID namespaces

/// The command lines of the processes `container` sees, from `/proc`.
async fn visible_commands(node: &PodNode, container: &str) -> Vec<String> {
    let out = exec_ok(
        node,
        container,
        &[
            "sh",
            "-c",
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done",
        ],
    )
    .await;
    out.lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

async fn pid1_of(node: &PodNode, container: &str) -> String {
    exec_ok(
        node,
        container,
        &["sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline"],
    )
    .await
    .trim()
    .to_string()
}

/// A pod `name` whose PID namespace mode is `pid` (IPC and network: the
/// pod's), running `sleep SECONDS` for each of `seconds`: the containers.
async fn sleepers(
    node: &PodNode,
    name: &str,
    pid: api::NamespaceMode,
    seconds: [&str; 2],
) -> Vec<String> {
    use api::NamespaceMode::Pod;
    let pod = node
        .run_pod_with(with_namespaces(node.pod_config(name), pid, Pod, Pod))
        .await
        .expect("RunPodSandbox");
    let mut ids = Vec::new();
    for (name, seconds) in ["one", "two"].into_iter().zip(seconds) {
        ids.push(start_in(node, &pod, name, &["sleep", seconds], (pid, Pod, Pod)).await);
    }
    ids
}

/// Creates and starts `cmd` as container `name` of `pod`, in the PID, IPC
/// and network namespace modes given.
async fn start_in(
    node: &PodNode,
    pod: &str,
    name: &str,
    cmd: &[&str],
    (pid, ipc, net): (api::NamespaceMode, api::NamespaceMode, api::NamespaceMode),
) -> String {
    let config = container_in(node.container_config(name, cmd), pid, ipc, net);
    let id = node.create_container(pod, config).await.expect("create");
    node.start_container(&id).await.expect("start");
    id
}

#[tokio::test]
async fn pid_namespace_modes() {
    use api::NamespaceMode::{Container, Node, Pod};
    let node = node().await;

    // CONTAINER (kubelet's default): each container is its own PID 1 and
    // sees nothing of its neighbour.
    let ids = sleepers(&node, "pid-container", Container, ["3601", "3602"]).await;
    assert_eq!(pid1_of(&node, &ids[0]).await, "sleep 3601");
    assert_eq!(pid1_of(&node, &ids[1]).await, "sleep 3602");
    let seen = visible_commands(&node, &ids[0]).await;
    assert!(
        !seen.iter().any(|c| c == "sleep 3602"),
        "container one sees container two: {seen:?}"
    );

    // POD (shareProcessNamespace): the containers see each other, and PID 1
    // is the pod's own init, not an app.
    let ids = sleepers(&node, "pid-pod", Pod, ["3611", "3612"]).await;
    for id in &ids {
        let seen = visible_commands(&node, id).await;
        for other in ["sleep 3611", "sleep 3612"] {
            assert!(
                seen.iter().any(|c| c == other),
                "{other} not seen: {seen:?}"
            );
        }
        let pid1 = pid1_of(&node, id).await;
        assert!(!pid1.starts_with("sleep"), "PID 1 is an app: {pid1:?}");
    }

    // NODE (hostPID): the container sees the node's processes, corrald
    // among them, and the node's PID 1.
    let pod = node
        .run_pod_with(with_namespaces(node.pod_config("pid-node"), Node, Pod, Pod))
        .await
        .expect("RunPodSandbox");
    let id = start_in(&node, &pod, "app", &["sleep", "3621"], (Node, Pod, Pod)).await;
    let host_pid1 = fs::read("/proc/1/cmdline").expect("host pid 1");
    let host_pid1 = String::from_utf8_lossy(&host_pid1).replace('\0', " ");
    assert_eq!(pid1_of(&node, &id).await, host_pid1.trim());
    let daemon = node.daemon_pid().expect("corrald runs");
    let cmdline = exec_ok(&node, &id, &["cat", &format!("/proc/{daemon}/cmdline")]).await;
    assert!(cmdline.contains("corrald"), "{cmdline:?}");
    assert_eq!(
        exec_ok(&node, &id, &["readlink", "/proc/self/ns/pid"])
            .await
            .trim(),
        host_ns("pid")
    );
}

// ---------------------------------------------------------------------------
// IPC and network namespaces

#[tokio::test]
async fn ipc_and_network_namespace_modes() {
    use api::NamespaceMode::{Container, Node, Pod};
    let node = node().await;
    let host_ipc = host_ns("ipc");
    let host_net = host_ns("net");

    // IPC of the pod: shared by its containers, not the node's.
    let pod = node
        .run_pod_with(with_namespaces(
            node.pod_config("ipc-pod"),
            Container,
            Pod,
            Pod,
        ))
        .await
        .expect("RunPodSandbox");
    let one = node
        .run_container(&pod, "one", &["sleep", "3600"])
        .await
        .expect("one");
    let two = node
        .run_container(&pod, "two", &["sleep", "3600"])
        .await
        .expect("two");
    let ipc_one = exec_ok(&node, &one, &["readlink", "/proc/self/ns/ipc"]).await;
    let ipc_two = exec_ok(&node, &two, &["readlink", "/proc/self/ns/ipc"]).await;
    assert_eq!(ipc_one, ipc_two, "the pod's containers share IPC");
    assert_ne!(ipc_one.trim(), host_ipc, "a pod's IPC is not the node's");
    // A file in one container's /dev/shm is in the other's.
    exec_ok(&node, &one, &["sh", "-c", "echo shared > /dev/shm/token"]).await;
    assert_eq!(
        exec_ok(&node, &two, &["cat", "/dev/shm/token"]).await,
        "shared\n"
    );

    // IPC of the node.
    let pod = node
        .run_pod_with(with_namespaces(
            node.pod_config("ipc-node"),
            Container,
            Node,
            Pod,
        ))
        .await
        .expect("RunPodSandbox");
    let app = start_in(
        &node,
        &pod,
        "app",
        &["sleep", "3600"],
        (Container, Node, Pod),
    )
    .await;
    assert_eq!(
        exec_ok(&node, &app, &["readlink", "/proc/self/ns/ipc"])
            .await
            .trim(),
        host_ipc
    );
    let veths_before = node.network().veths();

    // Network of the node: the node's namespace and interfaces, no veth,
    // no pod IP, the node's hostname and hosts file.
    let host_name = fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    let mut config = with_namespaces(node.pod_config("hostnet"), Container, Pod, Node);
    // kubelet names a host-network pod after the node.
    config.hostname = host_name.clone();
    let pod = node.run_pod_with(config).await.expect("RunPodSandbox");
    let app = start_in(
        &node,
        &pod,
        "app",
        &["sleep", "3600"],
        (Container, Pod, Node),
    )
    .await;
    assert_eq!(
        exec_ok(&node, &app, &["readlink", "/proc/self/ns/net"])
            .await
            .trim(),
        host_net
    );
    assert_eq!(
        node.network().veths(),
        veths_before,
        "a veth for a host-network pod"
    );
    let (status, info) = node.pod_status(&pod).await.expect("PodSandboxStatus");
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(
        ip.is_empty() || !node.network().contains(&ip),
        "pod IP {ip:?}"
    );
    assert!(
        info["netns"].is_null(),
        "a netns for a host-network pod: {info}"
    );
    // The bridge the other pods made is in the container's view.
    let interfaces = exec_ok(&node, &app, &["cat", "/proc/net/dev"]).await;
    let bridge = node.network().bridge();
    assert!(
        interfaces.contains(&format!("{bridge}:")),
        "{bridge} not among {interfaces}"
    );
    assert_eq!(exec_ok(&node, &app, &["hostname"]).await.trim(), host_name);
    assert_eq!(
        exec_ok(&node, &app, &["cat", "/etc/hosts"]).await,
        fs::read_to_string("/etc/hosts").expect("host hosts")
    );

    // Each pod goes away without leaving anything (the teardown checks the
    // rest); the host-network pod's removal does not touch the node's net.
    let before_removal = node.baseline().clone();
    for pod in node.pod_ids().await.expect("list") {
        node.stop_pod(&pod).await.expect("stop");
        node.remove_pod(&pod).await.expect("remove");
    }
    let left = node.settled_since(&before_removal).await;
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(host_ns("net"), host_net);
}

// ---------------------------------------------------------------------------
// Stats

fn cpu_ns(cpu: Option<&api::CpuUsage>) -> u64 {
    cpu.and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value)
}

fn interface_bytes(stats: &api::PodSandboxStats) -> Option<(String, u64, u64)> {
    let network = stats.linux.as_ref()?.network.as_ref()?;
    let default = network.default_interface.as_ref()?;
    Some((
        default.name.clone(),
        default.rx_bytes.as_ref()?.value,
        default.tx_bytes.as_ref()?.value,
    ))
}

async fn pod_stats(node: &PodNode, pod: &str) -> api::PodSandboxStats {
    let mut client = node.client();
    client
        .runtime
        .pod_sandbox_stats(api::PodSandboxStatsRequest {
            pod_sandbox_id: pod.to_string(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .expect("stats")
}

async fn list_pod_stats(node: &PodNode, filter: api::PodSandboxStatsFilter) -> Vec<String> {
    let mut client = node.client();
    let mut ids: Vec<String> = client
        .runtime
        .list_pod_sandbox_stats(api::ListPodSandboxStatsRequest {
            filter: Some(filter),
        })
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats
        .into_iter()
        .map(|s| s.attributes.map(|a| a.id).unwrap_or_default())
        .collect();
    ids.sort();
    ids
}

async fn list_container_stats(
    node: &PodNode,
    filter: Option<api::ContainerStatsFilter>,
) -> Vec<api::ContainerStats> {
    let mut client = node.client();
    client
        .runtime
        .list_container_stats(api::ListContainerStatsRequest { filter })
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats
}

fn ids_of(stats: &[api::ContainerStats]) -> Vec<String> {
    let mut ids: Vec<String> = stats
        .iter()
        .map(|s| {
            s.attributes
                .as_ref()
                .map(|a| a.id.clone())
                .unwrap_or_default()
        })
        .collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test]
async fn pod_and_container_stats() {
    let node = node().await;
    let config = node.pod_config("stats");
    let pod = node
        .run_pod_with(config.clone())
        .await
        .expect("RunPodSandbox");
    let busy = node
        .run_container(&pod, "busy", &["sh", "-c", "while :; do :; done"])
        .await
        .expect("busy");
    let idle = node
        .run_container(&pod, "idle", &["sleep", "3600"])
        .await
        .expect("idle");
    let other_pod = node.run_pod("other").await.expect("second pod");
    let other = node
        .run_container(&other_pod, "idle", &["sleep", "3600"])
        .await
        .expect("other");

    // The pod's CPU moves with its busy container; memory is in use.
    let first = pod_stats(&node, &pod).await;
    let attributes = first.attributes.clone().expect("attributes");
    assert_eq!(attributes.id, pod);
    assert_eq!(attributes.metadata, config.metadata);
    assert_eq!(attributes.labels, config.labels);
    let linux = first.linux.clone().expect("linux stats");
    assert!(
        linux.cpu.as_ref().is_some_and(|c| c.timestamp > 0),
        "{linux:?}"
    );
    assert_eq!(
        ids_of(&linux.containers),
        sorted(vec![busy.clone(), idle.clone()])
    );
    let start = cpu_ns(linux.cpu.as_ref());
    let deadline = Instant::now() + MOVE_WAIT;
    let moved = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = pod_stats(&node, &pod).await;
        let used = cpu_ns(now.linux.as_ref().and_then(|l| l.cpu.as_ref()));
        if used > start + 200_000_000 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "pod CPU stuck at {used} ns (from {start}) with a busy loop"
        );
    };
    let linux = moved.linux.expect("linux stats");
    // The pause, `sh` and `sleep`: kubelet reports this as the pod's
    // process count.
    let processes = linux
        .process
        .as_ref()
        .and_then(|p| p.process_count.as_ref());
    assert_eq!(processes.map(|c| c.value), Some(3), "{:?}", linux.process);
    let memory = linux.memory.expect("memory");
    assert!(memory.timestamp > 0);
    assert!(
        memory.working_set_bytes.is_some_and(|w| w.value > 0),
        "{memory:?}"
    );
    let busy_stats = linux
        .containers
        .iter()
        .find(|c| c.attributes.as_ref().is_some_and(|a| a.id == busy))
        .expect("the busy container in the pod's stats");
    assert!(
        busy_stats
            .cpu
            .as_ref()
            .and_then(|c| c.usage_nano_cores)
            .is_some_and(|v| v.value > 0),
        "a busy loop at zero cores: {:?}",
        busy_stats.cpu
    );

    // The pod's interface counts traffic: a ping to the gateway.
    let (name, rx, tx) = interface_bytes(&pod_stats(&node, &pod).await)
        .expect("no network usage in PodSandboxStats");
    assert_eq!(name, "eth0");
    let gateway = node.network().gateway().to_string();
    exec_ok(&node, &idle, &["ping", "-c", "3", "-W", "5", &gateway]).await;
    let deadline = Instant::now() + MOVE_WAIT;
    loop {
        let (_, rx_now, tx_now) =
            interface_bytes(&pod_stats(&node, &pod).await).expect("network usage went away");
        // Three echo requests and replies of 84 bytes each at least.
        if rx_now >= rx + 3 * 84 && tx_now >= tx + 3 * 84 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "eth0 rx {rx} -> {rx_now}, tx {tx} -> {tx_now} after 3 pings"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // ListPodSandboxStats and its filters.
    let all = list_pod_stats(&node, Default::default()).await;
    assert_eq!(all, sorted(vec![pod.clone(), other_pod.clone()]));
    let by_id = list_pod_stats(
        &node,
        api::PodSandboxStatsFilter {
            id: pod.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_id, std::slice::from_ref(&pod));
    let by_label = |k: &str, v: &str| api::PodSandboxStatsFilter {
        label_selector: HashMap::from([(k.to_string(), v.to_string())]),
        ..Default::default()
    };
    assert_eq!(
        list_pod_stats(&node, by_label("e2e-pod", "other")).await,
        std::slice::from_ref(&other_pod)
    );
    assert!(list_pod_stats(&node, by_label("e2e-pod", "nobody"))
        .await
        .is_empty());

    // ListContainerStats and its filters; what kubelet reads is set.
    let every = list_container_stats(&node, None).await;
    assert_eq!(
        ids_of(&every),
        sorted(vec![busy.clone(), idle.clone(), other.clone()])
    );
    for stats in &every {
        let attributes = stats.attributes.as_ref().expect("attributes");
        assert!(attributes
            .metadata
            .as_ref()
            .is_some_and(|m| !m.name.is_empty()));
        assert!(
            stats.cpu.as_ref().is_some_and(|c| c.timestamp > 0),
            "{stats:?}"
        );
        assert!(
            stats.memory.as_ref().is_some_and(|m| m.timestamp > 0),
            "{stats:?}"
        );
        assert!(
            stats
                .writable_layer
                .as_ref()
                .is_some_and(|w| w.timestamp > 0),
            "{stats:?}"
        );
    }
    let of_pod = list_container_stats(
        &node,
        Some(api::ContainerStatsFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(ids_of(&of_pod), sorted(vec![busy.clone(), idle.clone()]));
    let one = list_container_stats(
        &node,
        Some(api::ContainerStatsFilter {
            id: other.clone(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(ids_of(&one), std::slice::from_ref(&other));
    let labelled = |v: &str| {
        Some(api::ContainerStatsFilter {
            label_selector: HashMap::from([("e2e-container".to_string(), v.to_string())]),
            ..Default::default()
        })
    };
    assert_eq!(
        ids_of(&list_container_stats(&node, labelled("busy")).await),
        std::slice::from_ref(&busy)
    );
    assert!(list_container_stats(&node, labelled("baz"))
        .await
        .is_empty());

    // An unknown container is NotFound.
    let mut client = node.client();
    let err = client
        .runtime
        .container_stats(api::ContainerStatsRequest {
            container_id: format!("{:064x}", 0xdead_beef_u64),
        })
        .await
        .expect_err("ContainerStats of an unknown id");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = client
        .runtime
        .pod_sandbox_stats(api::PodSandboxStatsRequest {
            pod_sandbox_id: format!("{:064x}", 0xdead_beef_u64),
        })
        .await
        .expect_err("PodSandboxStats of an unknown id");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}
