//! corrald driven over its real socket as kubelet drives it: the node-level
//! RuntimeService calls, the socket's mode, config refusal, and the
//! daemon's start and stop. Needs root (the socket lives under /run) and the
//! built `corrald` (`cargo build --workspace --bins`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use corral_e2e::cri::{api, run_corrald, CriClient, Daemon, DaemonConfig};
use corral_e2e::Cleanup;
use tonic::Code;

/// The bound on any single RPC: a hung daemon fails the test, not the run.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A bridge network as a node would configure it; no plugin runs here, the
/// daemon only has to find it.
const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "corral-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "corral-e2e0",
      "isGateway": true,
      "ipMasq": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.250.0.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

async fn with_timeout<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(RPC_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {RPC_TIMEOUT:?}"))
}

fn start(cleanup: &Cleanup, yaml: &str) -> Daemon {
    Daemon::start(cleanup, yaml).expect("start corrald")
}

async fn client(daemon: &Daemon) -> CriClient {
    with_timeout("connect", daemon.client())
        .await
        .expect("connect to corrald")
}

async fn status(client: &mut CriClient, verbose: bool) -> api::StatusResponse {
    with_timeout(
        "Status",
        client.runtime.status(api::StatusRequest { verbose }),
    )
    .await
    .expect("Status")
    .into_inner()
}

fn condition<'a>(status: &'a api::StatusResponse, kind: &str) -> &'a api::RuntimeCondition {
    status
        .status
        .as_ref()
        .expect("status present")
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status:?}"))
}

async fn cgroup_driver(client: &mut CriClient) -> api::CgroupDriver {
    let response = with_timeout(
        "RuntimeConfig",
        client.runtime.runtime_config(api::RuntimeConfigRequest {}),
    )
    .await
    .expect("RuntimeConfig")
    .into_inner();
    let linux = response.linux.expect("linux runtime config");
    api::CgroupDriver::try_from(linux.cgroup_driver).expect("a known cgroup driver")
}

#[tokio::test]
async fn version_names_corral_and_cri_v1() {
    let cleanup = Cleanup::new().expect("cleanup");
    let daemon = start(&cleanup, "");
    let mut client = client(&daemon).await;
    let version = with_timeout(
        "Version",
        client.runtime.version(api::VersionRequest {
            version: "v1".into(),
        }),
    )
    .await
    .expect("Version")
    .into_inner();
    assert_eq!(version.version, "0.1.0");
    assert_eq!(version.runtime_name, "corral");
    assert_eq!(version.runtime_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.runtime_api_version, "v1");
}

#[tokio::test]
async fn network_becomes_ready_when_a_cni_config_appears() {
    let cleanup = Cleanup::new().expect("cleanup");
    let daemon = start(&cleanup, "");
    let mut client = client(&daemon).await;

    let before = status(&mut client, false).await;
    assert!(condition(&before, "RuntimeReady").status, "{before:?}");
    let network = condition(&before, "NetworkReady");
    assert!(!network.status, "{before:?}");
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(
        network
            .message
            .contains(&daemon.config().cni_conf_dir.display().to_string()),
        "the message names the directory: {network:?}"
    );
    assert!(before.info.is_empty(), "info only when verbose");

    // No restart and no signal: the directory is read on every call.
    fs::write(
        daemon.config().cni_conf_dir.join("10-corral-e2e.conflist"),
        BRIDGE_CONFLIST,
    )
    .expect("write conflist");
    let after = status(&mut client, true).await;
    assert!(condition(&after, "RuntimeReady").status, "{after:?}");
    let network = condition(&after, "NetworkReady");
    assert!(network.status, "{after:?}");
    assert_eq!(network.reason, "");

    let config: serde_json::Value =
        serde_json::from_str(&after.info["config"]).expect("verbose config is JSON");
    assert_eq!(
        config["stateDir"],
        daemon.config().state.display().to_string()
    );
    assert_eq!(after.runtime_handlers.len(), 1);
    assert_eq!(after.runtime_handlers[0].name, "");
}

#[tokio::test]
async fn runtime_config_reports_the_cgroup_driver() {
    let cleanup = Cleanup::new().expect("cleanup");
    let default = start(&cleanup, "");
    let mut client = client(&default).await;
    assert_eq!(
        cgroup_driver(&mut client).await,
        api::CgroupDriver::Cgroupfs
    );

    let systemd = start(&cleanup, "cgroup_driver: systemd\n");
    let mut client = self::client(&systemd).await;
    assert_eq!(cgroup_driver(&mut client).await, api::CgroupDriver::Systemd);
}

#[tokio::test]
async fn update_runtime_config_stores_the_pod_cidr() {
    let cleanup = Cleanup::new().expect("cleanup");
    let daemon = start(&cleanup, "");
    let mut client = client(&daemon).await;
    let update = |cidr: &str| api::UpdateRuntimeConfigRequest {
        runtime_config: Some(api::RuntimeConfig {
            network_config: Some(api::NetworkConfig {
                pod_cidr: cidr.into(),
            }),
        }),
    };

    with_timeout(
        "UpdateRuntimeConfig",
        client
            .runtime
            .update_runtime_config(update("10.244.1.0/24")),
    )
    .await
    .expect("UpdateRuntimeConfig");
    let verbose = status(&mut client, true).await;
    let config: serde_json::Value =
        serde_json::from_str(&verbose.info["config"]).expect("config JSON");
    assert_eq!(config["podCIDR"], "10.244.1.0/24");

    let err = with_timeout(
        "UpdateRuntimeConfig",
        client.runtime.update_runtime_config(update("10.244.1.0")),
    )
    .await
    .expect_err("a CIDR without prefix");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("10.244.1.0"), "{err:?}");
}

#[tokio::test]
async fn unimplemented_rpcs_say_which() {
    let cleanup = Cleanup::new().expect("cleanup");
    let daemon = start(&cleanup, "");
    let mut client = client(&daemon).await;

    let err = with_timeout(
        "CheckpointContainer",
        client
            .runtime
            .checkpoint_container(api::CheckpointContainerRequest::default()),
    )
    .await
    .expect_err("not implemented yet");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("CheckpointContainer"), "{err:?}");

    // A pod call without its config is refused for that reason, by name.
    let err = with_timeout(
        "RunPodSandbox",
        client
            .runtime
            .run_pod_sandbox(api::RunPodSandboxRequest::default()),
    )
    .await
    .expect_err("no config");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("config"), "{err:?}");
}

#[test]
fn the_socket_is_owner_and_group_only() {
    let cleanup = Cleanup::new().expect("cleanup");
    let daemon = start(&cleanup, "");
    let mode = fs::metadata(daemon.socket())
        .expect("stat socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "mode {mode:o}");
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let cleanup = Cleanup::new().expect("cleanup");
    let config = DaemonConfig::new(&cleanup, "cni:\n  conf_dirs: /etc/cni/net.d\n");
    let output = Daemon::run_to_exit(config.clone()).expect("run corrald");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("conf_dirs"), "{stderr}");
    assert!(stderr.contains("cni"), "{stderr}");
    assert!(!config.socket.exists(), "no socket for a refused config");
}

#[test]
fn a_bad_cgroup_driver_is_refused() {
    let cleanup = Cleanup::new().expect("cleanup");
    let config = DaemonConfig::new(&cleanup, "cgroup_driver: cgroupfs2\n");
    let output = Daemon::run_to_exit(config).expect("run corrald");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("cgroup_driver"), "{stderr}");
    assert!(stderr.contains("cgroupfs2"), "{stderr}");
}

#[test]
fn version_flag_prints_the_version() {
    let output = run_corrald(&["--version"]).expect("run corrald --version");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.trim(),
        format!("corrald {}", env!("CARGO_PKG_VERSION"))
    );
}

// Multi-threaded: the client's connection must keep being driven (to
// answer the server's GOAWAY and PING) while the test blocks in stop().
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_it_cleanly_and_removes_the_socket() {
    let cleanup = Cleanup::new().expect("cleanup");
    let mut daemon = start(&cleanup, "");
    assert!(daemon.socket().exists());
    // kubelet keeps its connection open between calls: an idle connection
    // must not hold the stop up until the grace period runs out.
    let mut client = client(&daemon).await;
    status(&mut client, false).await;

    let started = std::time::Instant::now();
    let status = daemon.stop().expect("stop");
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}; stderr: {}",
        daemon.stderr()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
    assert!(!daemon.socket().exists(), "socket left behind");
    drop(client);
}

#[test]
fn sigint_stops_it_too() {
    let cleanup = Cleanup::new().expect("cleanup");
    let mut daemon = start(&cleanup, "");
    daemon
        .signal(nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let status = daemon
        .wait_exit(corral_e2e::cri::STOP_TIMEOUT)
        .expect("exit");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!daemon.socket().exists(), "socket left behind");
}

#[tokio::test]
async fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let cleanup = Cleanup::new().expect("cleanup");
    let first = start(&cleanup, "");
    let mut second = DaemonConfig::new(&cleanup, "");
    second.socket = first.socket().to_path_buf();
    let output = Daemon::run_to_exit(second).expect("run second corrald");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("already serving"), "{stderr}");

    // The first one is unharmed and still answers on its socket.
    let mut client = client(&first).await;
    let status = status(&mut client, false).await;
    assert!(condition(&status, "RuntimeReady").status);
}

#[test]
fn a_stale_socket_is_taken_over() {
    let cleanup = Cleanup::new().expect("cleanup");
    let mut first = start(&cleanup, "");
    // A daemon killed outright leaves its socket file behind.
    first
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL");
    first
        .wait_exit(corral_e2e::cri::STOP_TIMEOUT)
        .expect("killed");
    assert!(first.socket().exists(), "SIGKILL leaves the socket");

    let mut config = DaemonConfig::new(&cleanup, "");
    config.socket = first.socket().to_path_buf();
    let mut second = Daemon::start_with(&cleanup, config).expect("start over a stale socket");
    assert_eq!(second.stop().expect("stop").code(), Some(0));
}

#[test]
fn rust_log_wins_over_the_configured_level() {
    let cleanup = Cleanup::new().expect("cleanup");
    let quiet = |rust_log: Option<&str>| {
        let mut config = DaemonConfig::new(&cleanup, "log_level: error\n");
        config
            .env
            .push(("RUST_LOG".into(), rust_log.unwrap_or("").into()));
        let mut daemon = Daemon::start_with(&cleanup, config).expect("start corrald");
        daemon.stop().expect("stop");
        daemon.stderr()
    };
    let configured = quiet(None);
    assert!(
        !configured.contains("serving CRI"),
        "log_level error hides info lines: {configured}"
    );
    let overridden = quiet(Some("info"));
    assert!(
        overridden.contains("serving CRI"),
        "RUST_LOG=info shows them: {overridden}"
    );
}
