//! One pod through corrald's CRI socket, as kubelet would run it: a sandbox
//! with its CNI network, one container that prints a line into its CRI log
//! file, then both stopped and removed.
//!
//! ```sh
//! cargo run --release -q -p corral-e2e --example cri_pod -- \
//!     /run/corral/corral.sock docker.io/library/busybox:latest [HANDLER]
//! ```
//!
//! The image must be on the node already (`corrald image import`, or a
//! PullImage). The pod's logs go to a fresh directory under the temp dir,
//! removed at the end; the pod is removed even when a step fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use corral_e2e::cri::{api, CriClient};

const SCRIPT: &str =
    "echo hello from a corral pod; busybox hostname; busybox ip -4 -o addr show eth0 || true";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let socket = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/run/corral/corral.sock".into()),
    );
    let image = args
        .next()
        .unwrap_or_else(|| "docker.io/library/busybox:latest".into());
    // A RuntimeClass handler from corrald's `runtimes:`; the default if none.
    let handler = args.next().unwrap_or_default();
    let logs = std::env::temp_dir().join(format!("corral-quickstart-{}", std::process::id()));
    let outcome = run(&socket, &image, &handler, &logs).await;
    let _ = std::fs::remove_dir_all(&logs);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cri_pod: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(socket: &Path, image: &str, handler: &str, logs: &Path) -> Result<(), String> {
    let mut client = CriClient::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let found = client
        .images
        .image_status(api::ImageStatusRequest {
            image: Some(api::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .map_err(|e| format!("ImageStatus: {e}"))?
        .into_inner();
    if found.image.is_none() {
        return Err(format!(
            "image {image} is not on the node: import or pull it first"
        ));
    }

    let name = format!("quickstart-{}", std::process::id());
    let pod_config = api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.clone(),
            namespace: "default".into(),
            uid: name.clone(),
            attempt: 0,
        }),
        hostname: name.clone(),
        log_directory: logs.display().to_string(),
        ..Default::default()
    };
    let started = Instant::now();
    let pod = client
        .runtime
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: handler.to_string(),
        })
        .await
        .map_err(|e| format!("RunPodSandbox: {e}"))?
        .into_inner()
        .pod_sandbox_id;
    let result = run_container(&mut client, &pod, &pod_config, image, logs).await;
    println!("pod {} ran in {:?}", &pod[..12], started.elapsed());
    let stop = client
        .runtime
        .stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let remove = client
        .runtime
        .remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await;
    result?;
    stop.map_err(|e| format!("StopPodSandbox: {e}"))?;
    remove.map_err(|e| format!("RemovePodSandbox: {e}"))?;
    println!("pod stopped and removed");
    Ok(())
}

async fn run_container(
    client: &mut CriClient,
    pod: &str,
    pod_config: &api::PodSandboxConfig,
    image: &str,
    logs: &Path,
) -> Result<(), String> {
    let status = client
        .runtime
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await
        .map_err(|e| format!("PodSandboxStatus: {e}"))?
        .into_inner();
    let ip = status
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    println!("pod {} is ready, IP {ip}", &pod[..12]);
    let id = client
        .runtime
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(api::ContainerConfig {
                metadata: Some(api::ContainerMetadata {
                    name: "hello".into(),
                    attempt: 0,
                }),
                image: Some(api::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                command: vec!["sh".into(), "-c".into(), SCRIPT.into()],
                log_path: "hello/0.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .map_err(|e| format!("CreateContainer: {e}"))?
        .into_inner()
        .container_id;
    client
        .runtime
        .start_container(api::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .map_err(|e| format!("StartContainer: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = client
            .runtime
            .container_status(api::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .map_err(|e| format!("ContainerStatus: {e}"))?
            .into_inner()
            .status
            .ok_or("ContainerStatus without a status")?;
        if status.state == api::ContainerState::ContainerExited as i32 {
            break status;
        }
        if Instant::now() > deadline {
            return Err("the container did not exit within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(logs.join("hello/0.log"))
        .map_err(|e| format!("read the container's log: {e}"))?;
    println!(
        "container {} exited {} ({}); its CRI log:",
        &id[..12],
        status.exit_code,
        status.reason
    );
    print!("{log}");
    client
        .runtime
        .remove_container(api::RemoveContainerRequest { container_id: id })
        .await
        .map_err(|e| format!("RemoveContainer: {e}"))?;
    if status.exit_code != 0 {
        return Err(format!("the container exited {}", status.exit_code));
    }
    Ok(())
}
