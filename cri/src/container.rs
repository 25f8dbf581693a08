//! Containers: CreateContainer, StartContainer, StopContainer,
//! RemoveContainer, ExecSync, UpdateContainerResources, ReopenContainerLog
//! and what they report.
//!
//! A container is a task in its pod's shim (joined through the sandbox-id
//! annotation of its spec), on a writable snapshot of its image, writing its
//! output to its CRI log file from the shim. This module owns the order of
//! those steps and the container's record; the OCI spec comes from
//! `spec.rs`, exits are recorded by `lifecycle.rs` as well as here.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corral_proto::attach::{ATTACH_STDIN, ATTACH_STDIN_ONCE};
use corral_proto::CRI_LOG_SCHEME;
use corral_runtime::image::Image;
use corral_runtime::task_service::{CreateTask, ExecProcess, Exit, Stdio};
use k8s_cri::v1 as cri;
use tokio::io::AsyncReadExt;

use crate::container_io::{Copiers, ExecFifos};
use crate::error::{Error, Result};
use crate::node::{
    ignore_not_found, new_id, now_ns, to_ns, Container, Node, Sandbox, TASK_NAMESPACE,
};
use crate::sandbox::{container_cgroups_path, labels_match, sandbox_name};
use crate::spec;
use crate::store::{ContainerRecord, ContainerState, SandboxState};

/// How long a SIGKILLed process gets to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The most ExecSync returns of each stream, as kubelet's own limit: more
/// would not fit its gRPC message anyway.
const EXEC_OUTPUT_LIMIT: usize = 16 << 20;

/// CreateContainer: returns the new container's id.
pub async fn create(node: &Node, sandbox_id: &str, config: cri::ContainerConfig) -> Result<String> {
    let sandbox = node.sandbox(sandbox_id)?;
    if sandbox.record().state != SandboxState::Ready {
        return Err(Error::FailedPrecondition(format!(
            "pod sandbox {} is not ready",
            sandbox.id
        )));
    }
    let metadata = validate(&config)?;
    let reference = config
        .image
        .as_ref()
        .map(|i| i.image.as_str())
        .unwrap_or("");
    let image = node.images.get(reference).await.map_err(|e| match e {
        corral_runtime::image::ImageError::NotFound(_) => Error::NotFound(format!(
            "image {reference:?} is not present on the node: {e}"
        )),
        e => e.into(),
    })?;
    let log_path = log_path(&sandbox, &config)?;

    let id = new_id()?;
    let name = container_name(&metadata, &sandbox.metadata());
    node.reserve_name(&name, &id)?;
    let record = ContainerRecord {
        id: id.clone(),
        sandbox_id: sandbox.id.clone(),
        image_id: image.id.clone(),
        image_name: image_name(&image, reference),
        image_ref: image
            .repo_digests
            .first()
            .cloned()
            .unwrap_or_else(|| image.id.clone()),
        state: ContainerState::Creating,
        pid: 0,
        created_at: now_ns(),
        started_at: 0,
        finished_at: 0,
        exit_code: 0,
        oom_killed: false,
        message: String::new(),
        reason: String::new(),
        log_path: log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        snapshot: id.clone(),
        stop_signal: image.config.stop_signal.clone(),
        resources: None,
    };
    let container = Arc::new(Container::new(config, record));
    // Not in the index yet, so no other call can reach it: no op lock.
    if let Err(e) = node
        .store
        .put_container(&container.snapshot(), &container.config)
    {
        node.release_name(&name);
        return Err(e.into());
    }
    match create_task(node, &sandbox, &container, &image).await {
        Ok(()) => {
            node.insert_container(container.clone());
            publish(
                node,
                &container,
                cri::ContainerEventType::ContainerCreatedEvent,
            );
            Ok(id)
        }
        Err(e) => {
            tracing::warn!(container = %id, error = %e, "CreateContainer failed; undoing");
            if let Err(undo) = remove_everything(node, &container).await {
                tracing::error!(container = %id, error = %undo, "undoing a failed CreateContainer");
            }
            Err(e)
        }
    }
}

/// Snapshot, spec, log file, task: the steps of CreateContainer after the
/// record.
async fn create_task(
    node: &Node,
    sandbox: &Sandbox,
    container: &Container,
    image: &Image,
) -> Result<()> {
    let snapshots = node.images.snapshots();
    let rootfs = snapshots.prepare(&container.id, image.top_chain())?;
    let layers = layer_dirs(node, image)?;
    let record = container.snapshot();
    let sandbox_record = sandbox.snapshot();
    let parent = sandbox
        .config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.as_str())
        .unwrap_or("");
    let shm = sandbox.dir.join("shm");
    let has_shm = shm.exists()
        && crate::node::namespace_mode(&sandbox.config, |o| o.ipc) != cri::NamespaceMode::Node;
    let input = spec::ContainerSpecInput {
        id: &container.id,
        sandbox_id: &sandbox.id,
        config: &container.config,
        sandbox: &sandbox.config,
        image: &image.config,
        rootfs_layers: &layers,
        sandbox_pid: sandbox_record.pid,
        netns: sandbox_record.netns.as_deref(),
        hostname: &sandbox.dir.join("hostname"),
        resolv_conf: &sandbox.dir.join("resolv.conf"),
        hosts: &sandbox.dir.join("hosts"),
        shm: has_shm.then_some(shm.as_path()),
        cgroups_path: container_cgroups_path(node.config.cgroup_driver, parent, &container.id),
    };
    let mut spec = spec::container_spec(&input)?;
    spec::restrict_oom_score_adj(&mut spec, node.oom_floor);
    let spec = serde_json::to_vec(&spec)
        .map_err(|e| Error::Internal(format!("encode container spec: {e}")))?;
    let tty = container.config.tty;
    let mut stdio = Stdio {
        terminal: tty,
        ..Default::default()
    };
    let corral_shim = shim_writes_log(node, &sandbox_record.runtime_handler);
    if container.config.stdin && corral_shim {
        // Held open by the shim for attached clients (for other shims,
        // corrald holds the stdin FIFO below).
        stdio.stdin = if container.config.stdin_once {
            ATTACH_STDIN_ONCE
        } else {
            ATTACH_STDIN
        }
        .to_string();
    }
    let mut copy = None;
    if !record.log_path.is_empty() {
        let path = Path::new(&record.log_path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create log directory", dir, e))?;
        }
        if corral_shim {
            let log = format!("{CRI_LOG_SCHEME}://{}", record.log_path);
            stdio.stderr = if tty { String::new() } else { log.clone() };
            stdio.stdout = log;
        } else {
            let (fifos, pending) =
                Copiers::prepare(&io_dir(node, &container.id), &container.config, path)?;
            stdio.stdin = fifos
                .stdin
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            stdio.stdout = fifos.stdout.display().to_string();
            stdio.stderr = fifos
                .stderr
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            copy = Some(pending);
        }
    }
    let pid = node
        .tasks
        .create(CreateTask {
            namespace: TASK_NAMESPACE.into(),
            id: container.id.clone(),
            spec,
            rootfs,
            stdio,
            runtime_handler: sandbox_record.runtime_handler,
        })
        .await?;
    if let Some(pending) = copy {
        node.copiers.start(&container.id, pending)?;
    }
    {
        let mut r = container.record();
        r.pid = pid;
        r.state = ContainerState::Created;
    }
    persist(node, container)
}

/// StartContainer.
pub async fn start(node: &Node, query: &str) -> Result<()> {
    let container = node.container(query)?;
    let _op = container.op.lock().await;
    let state = container.record().state;
    if state != ContainerState::Created {
        return Err(Error::FailedPrecondition(format!(
            "container {} is {}, not created",
            container.id,
            state_name(state)
        )));
    }
    // Taken before the call: a process that exits at once is reported
    // exited with the shim's time, which must not precede its start.
    let started_at = now_ns();
    match node
        .tasks
        .start_process(TASK_NAMESPACE, &container.id, "")
        .await
    {
        Ok(pid) => {
            {
                let mut r = container.record();
                r.pid = pid;
                r.started_at = started_at;
                // An exit reported before this point (a process that ends at
                // once) has already moved it on.
                if r.state == ContainerState::Created {
                    r.state = ContainerState::Running;
                }
            }
            persist(node, &container)?;
            publish(
                node,
                &container,
                cri::ContainerEventType::ContainerStartedEvent,
            );
            Ok(())
        }
        Err(e) => {
            // Kubelet reads why a container never ran from its status, as
            // containerd reports it.
            {
                let mut r = container.record();
                r.state = ContainerState::Exited;
                r.finished_at = now_ns();
                r.exit_code = 128;
                r.reason = "StartError".into();
                r.message = e.to_string();
            }
            persist(node, &container)?;
            let _ = node.tasks.delete(TASK_NAMESPACE, &container.id).await;
            Err(e.into())
        }
    }
}

/// StopContainer: the stop signal, then SIGKILL after `timeout` seconds.
/// Unknown ids and containers not running succeed.
pub async fn stop(node: &Node, query: &str, timeout: i64) -> Result<()> {
    let Some(container) = node.find_container(query)? else {
        return Ok(());
    };
    let _op = container.op.lock().await;
    stop_locked(node, &container, timeout).await
}

async fn stop_locked(node: &Node, container: &Container, timeout: i64) -> Result<()> {
    if container.record().state != ContainerState::Running {
        return Ok(());
    }
    let tasks = &node.tasks;
    if timeout > 0 {
        let signal = signal_number(&container.snapshot().stop_signal);
        ignore_not_found(
            tasks
                .kill(TASK_NAMESPACE, &container.id, "", signal, false)
                .await,
        )?;
        let wait = tasks.wait(TASK_NAMESPACE, &container.id, "");
        if let Ok(exit) = tokio::time::timeout(Duration::from_secs(timeout as u64), wait).await {
            return record_exit(node, container, exit).await;
        }
        tracing::info!(container = %container.id, timeout, "stop signal ignored; sending SIGKILL");
    }
    ignore_not_found(tasks.kill(TASK_NAMESPACE, &container.id, "", 9, true).await)?;
    let wait = tasks.wait(TASK_NAMESPACE, &container.id, "");
    match tokio::time::timeout(KILL_WAIT, wait).await {
        Ok(exit) => record_exit(node, container, exit).await,
        Err(_) => Err(Error::Internal(format!(
            "container {} did not exit {KILL_WAIT:?} after SIGKILL",
            container.id
        ))),
    }
}

async fn record_exit(
    node: &Node,
    container: &Container,
    exit: corral_runtime::Result<Exit>,
) -> Result<()> {
    match exit {
        Ok(exit) => mark_exited(node, container, exit.status, to_ns(exit.at)),
        // The task is gone already: the event path recorded its exit.
        Err(corral_runtime::Error::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Records an exit once (the event and the caller that waited both report
/// it) and deletes the task so the shim lets go of it. Returns whether this
/// call was the one that recorded it.
pub fn mark_exited(node: &Node, container: &Container, status: u32, at: i64) -> Result<()> {
    {
        let mut r = container.record();
        if r.state == ContainerState::Exited {
            return Ok(());
        }
        r.state = ContainerState::Exited;
        r.exit_code = status as i32;
        r.finished_at = if at > 0 { at } else { now_ns() };
        if r.reason.is_empty() {
            r.reason = exit_reason(r.exit_code, r.oom_killed).into();
        }
    }
    persist(node, container)?;
    publish(
        node,
        container,
        cri::ContainerEventType::ContainerStoppedEvent,
    );
    Ok(())
}

fn exit_reason(code: i32, oom_killed: bool) -> &'static str {
    if oom_killed {
        "OOMKilled"
    } else if code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// RemoveContainer: force-stops a running container, then removes it and
/// its writable layer. Unknown ids succeed.
pub async fn remove(node: &Node, query: &str) -> Result<()> {
    let Some(container) = node.find_container(query)? else {
        return Ok(());
    };
    let _op = container.op.lock().await;
    stop_locked(node, &container, 0).await?;
    remove_everything(node, &container).await?;
    publish(
        node,
        &container,
        cri::ContainerEventType::ContainerDeletedEvent,
    );
    Ok(())
}

/// Undoes everything a container may have made; each step a no-op when its
/// part does not exist.
pub async fn remove_everything(node: &Node, container: &Container) -> Result<()> {
    ignore_not_found(
        node.tasks
            .delete(TASK_NAMESPACE, &container.id)
            .await
            .map(|_| ()),
    )?;
    node.images
        .snapshots()
        .remove(&container.snapshot().snapshot)?;
    node.copiers
        .remove(&container.id, &io_dir(node, &container.id));
    // Per-container samples kept for stats go with the container.
    node.cpu_rates.forget(&container.id);
    node.layer_usage.forget(&container.id);
    node.store.delete_container(&container.id)?;
    node.forget_container(&container.id);
    if let Some(sandbox) = node.sandbox_by_exact_id(&container.sandbox_id) {
        node.release_name(&container_name(&container.metadata(), &sandbox.metadata()));
    } else if let Ok(all) = node.store.sandboxes() {
        // Recovery may remove a container whose sandbox record is gone.
        if let Some((_, config)) = all.iter().find(|(r, _)| r.id == container.sandbox_id) {
            let meta = config.metadata.clone().unwrap_or_default();
            node.release_name(&container_name(&container.metadata(), &meta));
        }
    }
    Ok(())
}

/// ExecSync: runs `cmd` in the container, returns its output and exit code;
/// past `timeout` seconds (0: none) it is killed and DeadlineExceeded
/// returned.
pub async fn exec_sync(
    node: &Node,
    query: &str,
    cmd: Vec<String>,
    timeout: i64,
) -> Result<cri::ExecSyncResponse> {
    let container = node.running_container(query)?;
    if cmd.is_empty() {
        return Err(Error::InvalidArgument("ExecSync cmd is empty".into()));
    }
    let exec_id = format!("exec-{}", &new_id()?[..16]);
    let dir = node.config.state.join("exec").join(&exec_id);
    let fifos = ExecFifos::create(&dir, false, true, true)?;
    let result = run_exec(node, &container, &exec_id, cmd, timeout, &fifos).await;
    let _ = node
        .tasks
        .delete_exec(TASK_NAMESPACE, &container.id, &exec_id)
        .await;
    drop(fifos);
    result
}

async fn run_exec(
    node: &Node,
    container: &Container,
    exec_id: &str,
    cmd: Vec<String>,
    timeout: i64,
    fifos: &ExecFifos,
) -> Result<cri::ExecSyncResponse> {
    let tasks = &node.tasks;
    let spec = container_spec(node, container).await?;
    let process = spec::exec_process(&spec, &cmd, false)?;
    let process = serde_json::to_vec(&process)
        .map_err(|e| Error::Internal(format!("encode exec process: {e}")))?;
    let pipes = fifos.open()?;
    let (Some(mut stdout), Some(mut stderr)) = (pipes.stdout, pipes.stderr) else {
        return Err(Error::Internal("ExecSync FIFOs without output".into()));
    };
    let keepalive = pipes.keepalive;
    tasks
        .exec(
            TASK_NAMESPACE,
            &container.id,
            ExecProcess {
                exec_id: exec_id.to_string(),
                spec: process,
                stdio: fifos.stdio(false),
            },
        )
        .await?;
    tasks
        .start_process(TASK_NAMESPACE, &container.id, exec_id)
        .await?;
    let run = async {
        // Our write ends stay open until the process has exited: the shim
        // may open its own only after Start returns, and a FIFO with no
        // writer at all reads as end-of-file, losing the output.
        let waited = async {
            let exit = tasks.wait(TASK_NAMESPACE, &container.id, exec_id).await;
            drop(keepalive);
            exit
        };
        let (out, err, exit) =
            tokio::join!(read_capped(&mut stdout), read_capped(&mut stderr), waited);
        Ok::<_, Error>((out, err, exit?))
    };
    let outcome = if timeout > 0 {
        match tokio::time::timeout(Duration::from_secs(timeout as u64), run).await {
            Ok(outcome) => outcome?,
            Err(_) => {
                let _ = tasks
                    .kill(TASK_NAMESPACE, &container.id, exec_id, 9, false)
                    .await;
                let _ = tokio::time::timeout(
                    KILL_WAIT,
                    tasks.wait(TASK_NAMESPACE, &container.id, exec_id),
                )
                .await;
                return Err(Error::DeadlineExceeded(format!(
                    "command {cmd:?} in container {} timed out after {timeout}s and was killed",
                    container.id
                )));
            }
        }
    } else {
        run.await?
    };
    let (stdout, stderr, exit) = outcome;
    Ok(cri::ExecSyncResponse {
        stdout,
        stderr,
        exit_code: exit.status as i32,
    })
}

async fn read_capped(reader: &mut tokio::net::unix::pipe::Receiver) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                // Past the limit the rest is drained and dropped, so the
                // process is never blocked on a full pipe.
                let room = EXEC_OUTPUT_LIMIT.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The container's OCI spec, as written into its bundle.
pub async fn container_spec(node: &Node, container: &Container) -> Result<oci_spec::runtime::Spec> {
    let state = node.tasks.state(TASK_NAMESPACE, &container.id, "").await?;
    let path = state.bundle.join("config.json");
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| Error::io("read container spec", &path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Internal(format!("container spec {}: {e}", path.display())))
}

/// UpdateContainerResources.
pub async fn update_resources(
    node: &Node,
    query: &str,
    resources: Option<cri::LinuxContainerResources>,
) -> Result<()> {
    let container = node.container(query)?;
    let Some(resources) = resources else {
        return Ok(());
    };
    let _op = container.op.lock().await;
    let state = container.record().state;
    if !matches!(state, ContainerState::Created | ContainerState::Running) {
        return Err(Error::FailedPrecondition(format!(
            "container {} is {}; only a created or running container can be updated",
            container.id,
            state_name(state)
        )));
    }
    let linux = spec::linux_resources(&resources)?;
    let json = serde_json::to_vec(&linux)
        .map_err(|e| Error::Internal(format!("encode resources: {e}")))?;
    node.tasks
        .update(TASK_NAMESPACE, &container.id, json)
        .await?;
    container.record().resources = Some(prost::Message::encode_to_vec(&resources));
    persist(node, &container)
}

/// ReopenContainerLog: the shim closes the log file and opens it again at
/// its path (kubelet has renamed the old one).
pub async fn reopen_log(node: &Node, query: &str) -> Result<()> {
    let container = node.running_container(query)?;
    if node.copiers.reopen(&container.id)? {
        return Ok(());
    }
    Ok(node.tasks.reopen_log(TASK_NAMESPACE, &container.id).await?)
}

/// Whether the handler's shim writes the CRI log itself (corral's shim) or
/// corrald copies the output from FIFOs (any other containerd shim).
pub fn shim_writes_log(node: &Node, handler: &str) -> bool {
    node.handlers
        .get(handler)
        .map(|h| h.shim == corral_proto::SHIM_RUNTIME_NAME)
        .unwrap_or(true)
}

/// `<state>/io/<id>`: the FIFOs of a container whose log corrald writes.
pub fn io_dir(node: &Node, id: &str) -> PathBuf {
    node.config.state.join("io").join(id)
}

/// ContainerStatus.
pub fn status(container: &Container, verbose: bool) -> cri::ContainerStatusResponse {
    let r = container.snapshot();
    let config = &container.config;
    let resources = r
        .resources
        .as_deref()
        .and_then(|b| <cri::LinuxContainerResources as prost::Message>::decode(b).ok())
        .or_else(|| config.linux.as_ref().and_then(|l| l.resources.clone()));
    let status = cri::ContainerStatus {
        id: container.id.clone(),
        metadata: config.metadata.clone(),
        state: cri_state(r.state) as i32,
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        exit_code: r.exit_code,
        image: Some(cri::ImageSpec {
            image: r.image_name.clone(),
            ..Default::default()
        }),
        image_ref: r.image_ref.clone(),
        image_id: r.image_id.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: config.labels.clone(),
        annotations: config.annotations.clone(),
        mounts: config.mounts.clone(),
        log_path: r.log_path.clone(),
        resources: resources.map(|linux| cri::ContainerResources {
            linux: Some(linux),
            ..Default::default()
        }),
        ..Default::default()
    };
    let info = if verbose {
        let info = serde_json::json!({
            "pid": r.pid,
            "sandboxID": r.sandbox_id,
            "snapshotKey": r.snapshot,
            "imageRef": r.image_ref,
        });
        [("info".to_string(), info.to_string())].into()
    } else {
        Default::default()
    };
    cri::ContainerStatusResponse {
        status: Some(status),
        info,
    }
}

pub fn summary(container: &Container) -> cri::Container {
    let r = container.snapshot();
    cri::Container {
        id: container.id.clone(),
        pod_sandbox_id: container.sandbox_id.clone(),
        metadata: container.config.metadata.clone(),
        image: Some(cri::ImageSpec {
            image: r.image_name.clone(),
            ..Default::default()
        }),
        image_ref: r.image_ref.clone(),
        image_id: r.image_id.clone(),
        state: cri_state(r.state) as i32,
        created_at: r.created_at,
        labels: container.config.labels.clone(),
        annotations: container.config.annotations.clone(),
    }
}

/// ListContainers' filter.
pub fn matches(container: &Container, filter: &cri::ContainerFilter) -> bool {
    if !filter.id.is_empty() && !container.id.starts_with(&filter.id) {
        return false;
    }
    if !filter.pod_sandbox_id.is_empty()
        && !container.sandbox_id.starts_with(&filter.pod_sandbox_id)
    {
        return false;
    }
    if let Some(state) = &filter.state {
        if cri_state(container.record().state) as i32 != state.state {
            return false;
        }
    }
    labels_match(&container.config.labels, &filter.label_selector)
}

pub fn cri_state(state: ContainerState) -> cri::ContainerState {
    match state {
        ContainerState::Creating | ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown,
    }
}

fn state_name(state: ContainerState) -> &'static str {
    match state {
        ContainerState::Creating => "being created",
        ContainerState::Created => "created",
        ContainerState::Running => "running",
        ContainerState::Exited => "exited",
        ContainerState::Unknown => "in an unknown state",
    }
}

/// Sends a container event with the container's and its pod's status, as
/// kubelet's evented PLEG reads them.
pub fn publish(node: &Node, container: &Container, kind: cri::ContainerEventType) {
    let pod_sandbox_status = node
        .sandbox_by_exact_id(&container.sandbox_id)
        .and_then(|s| crate::sandbox::status(node, &s, false).status);
    node.publish(cri::ContainerEventResponse {
        container_id: container.id.clone(),
        container_event_type: kind as i32,
        created_at: now_ns(),
        pod_sandbox_status,
        containers_statuses: status(container, false).status.into_iter().collect(),
    });
}

pub fn persist(node: &Node, container: &Container) -> Result<()> {
    Ok(node
        .store
        .put_container(&container.snapshot(), &container.config)?)
}

/// The image's layer directories, top first: where the spec looks up users.
fn layer_dirs(node: &Node, image: &Image) -> Result<Vec<PathBuf>> {
    let snapshots = node.images.snapshots();
    let mut dirs = Vec::with_capacity(image.chain_ids.len());
    let mut next = image.top_chain().cloned();
    while let Some(chain) = next {
        let Some(info) = snapshots.info(&chain)? else {
            break;
        };
        dirs.push(info.path);
        next = info.parent;
    }
    Ok(dirs)
}

/// The name to report for the image: the reference asked for, normalized,
/// if the image carries it, else its first tag, else the reference.
fn image_name(image: &Image, reference: &str) -> String {
    let normalized = corral_runtime::image::store::canonical_name(reference).ok();
    if let Some(name) = normalized {
        if image.repo_tags.contains(&name) || image.repo_digests.contains(&name) {
            return name;
        }
    }
    image
        .repo_tags
        .first()
        .cloned()
        .unwrap_or_else(|| reference.to_string())
}

/// The log file under the pod's log directory; a path that would leave it
/// is refused.
fn log_path(sandbox: &Sandbox, config: &cri::ContainerConfig) -> Result<Option<PathBuf>> {
    if config.log_path.is_empty() {
        return Ok(None);
    }
    let dir = &sandbox.config.log_directory;
    if dir.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "container log_path {:?} given, but the pod has no log_directory",
            config.log_path
        )));
    }
    let relative = Path::new(&config.log_path);
    let escapes = relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if escapes {
        return Err(Error::InvalidArgument(format!(
            "container log_path {:?} must be a relative path inside the pod's log directory",
            config.log_path
        )));
    }
    Ok(Some(Path::new(dir).join(relative)))
}

fn validate(config: &cri::ContainerConfig) -> Result<cri::ContainerMetadata> {
    let metadata = config
        .metadata
        .clone()
        .ok_or_else(|| Error::InvalidArgument("container config has no metadata".into()))?;
    if metadata.name.is_empty() {
        return Err(Error::InvalidArgument(
            "container metadata.name is empty".into(),
        ));
    }
    if config.image.as_ref().is_none_or(|i| i.image.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "container {:?} names no image",
            metadata.name
        )));
    }
    Ok(metadata)
}

/// The name a container reserves: unique per pod attempt and container
/// attempt, as kubelet composes it.
pub fn container_name(c: &cri::ContainerMetadata, pod: &cri::PodSandboxMetadata) -> String {
    format!("{}_{}_{}", c.name, sandbox_name(pod), c.attempt)
}

/// A signal by name (`SIGTERM`, `TERM`) or number; SIGTERM when empty or
/// unknown.
pub fn signal_number(name: &str) -> u32 {
    let name = name.trim();
    if name.is_empty() {
        return 15;
    }
    if let Ok(n) = name.parse::<u32>() {
        return n;
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map(|s| s as u32)
        .unwrap_or(15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_parse_by_name_and_number() {
        assert_eq!(signal_number(""), 15);
        assert_eq!(signal_number("SIGQUIT"), 3);
        assert_eq!(signal_number("quit"), 3);
        assert_eq!(signal_number("9"), 9);
        assert_eq!(signal_number("SIGRTMIN+3"), 15);
    }

    #[test]
    fn exit_reasons_are_kubelets() {
        assert_eq!(exit_reason(0, false), "Completed");
        assert_eq!(exit_reason(1, false), "Error");
        assert_eq!(exit_reason(137, true), "OOMKilled");
    }

    fn sandbox_with_log_dir(dir: &str) -> Sandbox {
        let record = crate::store::SandboxRecord {
            id: "s".into(),
            runtime_handler: String::new(),
            created_at: 0,
            state: SandboxState::Ready,
            pid: 0,
            netns: None,
            ips: vec![],
            cgroups_path: String::new(),
            network_up: false,
            image: None,
        };
        let config = cri::PodSandboxConfig {
            log_directory: dir.into(),
            ..Default::default()
        };
        Sandbox::new(config, record, PathBuf::from("/nonexistent"))
    }

    #[test]
    fn log_paths_stay_inside_the_pod_log_directory() {
        let sandbox = sandbox_with_log_dir("/var/log/pods/p");
        let config = |p: &str| cri::ContainerConfig {
            log_path: p.into(),
            ..Default::default()
        };
        assert_eq!(
            log_path(&sandbox, &config("c/0.log")).unwrap(),
            Some(PathBuf::from("/var/log/pods/p/c/0.log"))
        );
        assert_eq!(log_path(&sandbox, &config("")).unwrap(), None);
        for bad in ["../x.log", "/etc/passwd", "c/../../x"] {
            assert!(
                matches!(
                    log_path(&sandbox, &config(bad)),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
        let no_dir = sandbox_with_log_dir("");
        assert!(log_path(&no_dir, &config("c/0.log")).is_err());
    }
}
