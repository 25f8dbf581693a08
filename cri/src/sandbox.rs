//! Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox and what
//! they report.
//!
//! A sandbox is a network namespace with the pod's CNI network, a directory
//! of files its containers bind-mount (hostname, hosts, resolv.conf, a
//! `/dev/shm` tmpfs), and a pause process started through the pod's shim,
//! holding the pod's IPC, UTS and PID namespaces. This module owns the order
//! in which those are made and undone; the pieces are `netns.rs`, `cni.rs`,
//! `sandbox_files.rs`, `spec.rs` and `pause.rs`.
//!
//! Undoing is written once ([`teardown`]): it is idempotent step by step,
//! so a RunPodSandbox that fails half-way, a StopPodSandbox, a retry of
//! either, and a recovery after a crash all use it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corral_runtime::image::ImageError;
use corral_runtime::task_service::{CreateTask, Mount, Stdio};
use k8s_cri::v1 as cri;

use crate::cni::{Bandwidth, PodNetwork, PortMapping};
use crate::config::CgroupDriver;
use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::node::{
    ignore_not_found, namespace_mode, new_id, now_ns, Node, Sandbox, TASK_NAMESPACE,
};
use crate::store::{SandboxRecord, SandboxState};
use crate::{pause, sandbox_files, spec};

/// How long a stopping sandbox's pause process gets to exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// RunPodSandbox: returns the new sandbox's id.
pub async fn run(node: &Node, config: cri::PodSandboxConfig, handler: &str) -> Result<String> {
    let metadata = validate(&config)?;
    node.handlers.get(handler)?;
    let id = new_id()?;
    let name = sandbox_name(&metadata);
    node.reserve_name(&name, &id)?;

    let record = SandboxRecord {
        id: id.clone(),
        runtime_handler: handler.to_string(),
        created_at: now_ns(),
        state: SandboxState::Creating,
        pid: 0,
        netns: None,
        ips: Vec::new(),
        cgroups_path: cgroups_path(node, &config, &id),
        network_up: false,
        image: None,
    };
    let sandbox = Arc::new(Sandbox::new(config, record, node.sandbox_dir(&id)));
    // Recorded first: whatever exists on the node after a crash below has
    // a record that recovery finds and tears down.
    if let Err(e) = node.store.put_sandbox(&sandbox.snapshot(), &sandbox.config) {
        node.release_name(&name);
        return Err(e.into());
    }
    // Not in the index yet, so no other call can reach it: no op lock.
    match set_up(node, &sandbox).await {
        Ok(()) => {
            node.insert_sandbox(sandbox);
            tracing::info!(sandbox = %id, pod = %name, "pod sandbox ready");
            Ok(id)
        }
        Err(e) => {
            tracing::warn!(sandbox = %id, pod = %name, error = %e, "RunPodSandbox failed; undoing");
            if let Err(undo) = remove_everything(node, &sandbox).await {
                tracing::error!(sandbox = %id, error = %undo, "undoing a failed RunPodSandbox");
            }
            Err(e)
        }
    }
}

/// The steps of RunPodSandbox after the record: files, network, pause.
async fn set_up(node: &Node, sandbox: &Sandbox) -> Result<()> {
    prepare_files(sandbox)?;
    if !sandbox.host_network() {
        let netns = NetNs::create(&node.netns_dir(), &sandbox.id)?;
        sandbox.record().netns = Some(netns.path().to_path_buf());
        persist(node, sandbox)?;
        let result = node.cni.setup(&pod_network(sandbox, netns.path())).await;
        // Recorded as up even on failure: CNI may have done part of its work,
        // and teardown's DEL must undo that part.
        sandbox.record().network_up = true;
        let result = result?;
        sandbox.record().ips = result.ips.iter().map(|ip| ip.to_string()).collect();
        persist(node, sandbox)?;
    }
    let ips = sandbox.snapshot().ips;
    let ips: Vec<std::net::IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    sandbox_files::write_hosts(
        &sandbox.dir,
        &hostname(sandbox),
        &ips,
        sandbox.host_network(),
    )?;
    start_pause(node, sandbox).await?;
    sandbox.record().state = SandboxState::Ready;
    persist(node, sandbox)
}

fn prepare_files(sandbox: &Sandbox) -> Result<()> {
    std::fs::create_dir_all(&sandbox.dir)
        .map_err(|e| Error::io("create sandbox directory", &sandbox.dir, e))?;
    sandbox_files::write_hostname(&sandbox.dir, &hostname(sandbox))?;
    sandbox_files::write_resolv_conf(&sandbox.dir, sandbox.config.dns_config.as_ref())?;
    if namespace_mode(&sandbox.config, |o| o.ipc) != cri::NamespaceMode::Node {
        sandbox_files::mount_shm(&sandbox.dir)?;
    }
    Ok(())
}

async fn start_pause(node: &Node, sandbox: &Sandbox) -> Result<()> {
    let (args, rootfs_dir, rootfs) = match node.config.sandbox_image.as_str() {
        "" => (
            pause::PAUSE_ARGS.iter().map(|s| s.to_string()).collect(),
            node.pause_rootfs.clone(),
            Vec::new(),
        ),
        image => sandbox_image(node, sandbox, image).await?,
    };
    let record = sandbox.snapshot();
    let shm = sandbox.dir.join("shm");
    let has_shm = namespace_mode(&sandbox.config, |o| o.ipc) != cri::NamespaceMode::Node;
    let input = spec::SandboxSpecInput {
        id: &sandbox.id,
        config: &sandbox.config,
        pause_args: args,
        rootfs: &rootfs_dir,
        netns: record.netns.as_deref(),
        cgroups_path: record.cgroups_path.clone(),
        shm: has_shm.then_some(shm.as_path()),
    };
    let mut spec = spec::sandbox_spec(&input)?;
    spec::restrict_oom_score_adj(&mut spec, node.oom_floor);
    let spec = serde_json::to_vec(&spec)
        .map_err(|e| Error::Internal(format!("encode sandbox spec: {e}")))?;
    node.tasks
        .create(CreateTask {
            namespace: TASK_NAMESPACE.into(),
            id: sandbox.id.clone(),
            spec,
            rootfs,
            stdio: Stdio::default(),
            runtime_handler: record.runtime_handler.clone(),
        })
        .await?;
    let pid = node
        .tasks
        .start_process(TASK_NAMESPACE, &sandbox.id, "")
        .await?;
    sandbox.record().pid = pid;
    Ok(())
}

/// The configured `sandbox_image` instead of the built-in pause: pulled if
/// the node lacks it, run on a writable snapshot of its layers (runc makes
/// its mount points there; the spec's root is read-only all the same).
async fn sandbox_image(
    node: &Node,
    sandbox: &Sandbox,
    reference: &str,
) -> Result<(Vec<String>, PathBuf, Vec<Mount>)> {
    let image = match node.images.get(reference).await {
        Ok(image) => image,
        Err(ImageError::NotFound(_)) => node.images.pull(reference, None).await?,
        Err(e) => return Err(e.into()),
    };
    let config = &image.config;
    let args: Vec<String> = config
        .entrypoint
        .iter()
        .chain(&config.cmd)
        .cloned()
        .collect();
    if args.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "sandbox_image {reference} has neither an entrypoint nor a command"
        )));
    }
    sandbox.record().image = Some(reference.to_string());
    persist(node, sandbox)?;
    let mounts = node
        .images
        .snapshots()
        .prepare(&sandbox_snapshot(&sandbox.id), image.top_chain())?;
    // Relative: the bundle's rootfs, where the shim mounts the snapshot.
    Ok((args, PathBuf::from("rootfs"), mounts))
}

/// The key of a sandbox's snapshot of its `sandbox_image`.
fn sandbox_snapshot(id: &str) -> String {
    format!("sandbox-{id}")
}

/// StopPodSandbox: every container stopped, the pause process gone, the
/// network torn down. Unknown ids and repeated calls succeed.
pub async fn stop(node: &Node, query: &str) -> Result<()> {
    let Some(sandbox) = node.find_sandbox(query)? else {
        return Ok(());
    };
    let _op = sandbox.op.lock().await;
    for container in node.containers_of(&sandbox.id) {
        crate::container::stop(node, &container.id, 0).await?;
    }
    stop_pause(node, &sandbox).await?;
    take_down_network(node, &sandbox).await?;
    sandbox_files::unmount_shm(&sandbox.dir)?;
    sandbox.record().state = SandboxState::NotReady;
    persist(node, &sandbox)?;
    tracing::info!(sandbox = %sandbox.id, "pod sandbox stopped");
    Ok(())
}

/// RemovePodSandbox: stopped if it was not, its containers removed, and
/// nothing of it left. Unknown ids succeed.
pub async fn remove(node: &Node, query: &str) -> Result<()> {
    let Some(sandbox) = node.find_sandbox(query)? else {
        return Ok(());
    };
    for container in node.containers_of(&sandbox.id) {
        crate::container::remove(node, &container.id).await?;
    }
    let _op = sandbox.op.lock().await;
    remove_everything(node, &sandbox).await?;
    tracing::info!(sandbox = %sandbox.id, "pod sandbox removed");
    Ok(())
}

/// Undoes everything a sandbox may have made, in reverse order; each step
/// is a no-op when its part does not exist. Also the rollback of a failed
/// RunPodSandbox and the cleanup of one a crash interrupted.
pub async fn remove_everything(node: &Node, sandbox: &Sandbox) -> Result<()> {
    stop_pause(node, sandbox).await?;
    take_down_network(node, sandbox).await?;
    sandbox_files::remove_all(&sandbox.dir)?;
    if sandbox.snapshot().image.is_some() {
        node.images
            .snapshots()
            .remove(&sandbox_snapshot(&sandbox.id))?;
    }
    node.store.delete_sandbox(&sandbox.id)?;
    node.forget_sandbox(&sandbox.id);
    node.release_name(&sandbox_name(&sandbox.metadata()));
    Ok(())
}

/// Kills the pause process and deletes its task, if there is one.
async fn stop_pause(node: &Node, sandbox: &Sandbox) -> Result<()> {
    let tasks = &node.tasks;
    match tasks.state(TASK_NAMESPACE, &sandbox.id, "").await {
        Err(corral_runtime::Error::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
        Ok(state) if state.exit.is_none() => {
            ignore_not_found(tasks.kill(TASK_NAMESPACE, &sandbox.id, "", 9, true).await)?;
            let wait = tasks.wait(TASK_NAMESPACE, &sandbox.id, "");
            match tokio::time::timeout(KILL_WAIT, wait).await {
                Ok(result) => {
                    ignore_not_found(result.map(|_| ()))?;
                }
                Err(_) => {
                    return Err(Error::Internal(format!(
                        "pause process of sandbox {} did not exit {KILL_WAIT:?} after SIGKILL",
                        sandbox.id
                    )))
                }
            }
        }
        Ok(_) => {}
    }
    ignore_not_found(tasks.delete(TASK_NAMESPACE, &sandbox.id).await.map(|_| ()))
}

/// CNI DEL and the namespace's removal, once.
async fn take_down_network(node: &Node, sandbox: &Sandbox) -> Result<()> {
    let record = sandbox.snapshot();
    let Some(path) = record.netns else {
        return Ok(());
    };
    if record.network_up {
        // DEL runs even if the namespace is gone: IPAM leases and host-side
        // rules live outside it.
        node.cni.teardown(&pod_network(sandbox, &path)).await?;
        sandbox.record().network_up = false;
        persist(node, sandbox)?;
    }
    NetNs::open(&path).map(|ns| ns.remove()).ok().transpose()?;
    sandbox.record().netns = None;
    persist(node, sandbox)
}

fn persist(node: &Node, sandbox: &Sandbox) -> Result<()> {
    Ok(node
        .store
        .put_sandbox(&sandbox.snapshot(), &sandbox.config)?)
}

/// What CNI is told about the pod.
pub fn pod_network<'a>(sandbox: &'a Sandbox, netns: &'a Path) -> PodNetwork<'a> {
    let metadata = sandbox.config.metadata.as_ref();
    let field = |f: fn(&cri::PodSandboxMetadata) -> &str| metadata.map(f).unwrap_or("");
    PodNetwork {
        id: &sandbox.id,
        name: field(|m| &m.name),
        namespace: field(|m| &m.namespace),
        uid: field(|m| &m.uid),
        netns,
        port_mappings: sandbox
            .config
            .port_mappings
            .iter()
            // A mapping without a host port only documents the container
            // port; CNI's portmap has nothing to do for it.
            .filter(|p| p.host_port > 0)
            .map(|p| PortMapping {
                host_port: p.host_port as u16,
                container_port: p.container_port as u16,
                protocol: protocol_name(p.protocol),
                host_ip: p.host_ip.clone(),
            })
            .collect(),
        bandwidth: bandwidth(&sandbox.config),
    }
}

fn protocol_name(protocol: i32) -> String {
    match cri::Protocol::try_from(protocol) {
        Ok(cri::Protocol::Udp) => "udp",
        Ok(cri::Protocol::Sctp) => "sctp",
        _ => "tcp",
    }
    .to_string()
}

/// The pod's bandwidth annotations, as kubelet's bandwidth shaping writes
/// them (`kubernetes.io/ingress-bandwidth: 10M`), in bits per second.
fn bandwidth(config: &cri::PodSandboxConfig) -> Option<Bandwidth> {
    let rate = |key: &str| config.annotations.get(key).and_then(|v| parse_quantity(v));
    let ingress = rate("kubernetes.io/ingress-bandwidth");
    let egress = rate("kubernetes.io/egress-bandwidth");
    if ingress.is_none() && egress.is_none() {
        return None;
    }
    // The burst kubelet's shaper used: effectively unlimited, in bits.
    const BURST: u64 = i32::MAX as u64;
    Some(Bandwidth {
        ingress_rate: ingress.unwrap_or(0),
        ingress_burst: if ingress.is_some() { BURST } else { 0 },
        egress_rate: egress.unwrap_or(0),
        egress_burst: if egress.is_some() { BURST } else { 0 },
    })
}

/// A Kubernetes quantity such as `10M`, `1Gi` or `500k`, as a number.
fn parse_quantity(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return None,
    };
    let value = number * factor;
    (value.is_finite() && value >= 0.0).then_some(value as u64)
}

fn hostname(sandbox: &Sandbox) -> String {
    if !sandbox.config.hostname.is_empty() {
        return sandbox.config.hostname.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn cgroups_path(node: &Node, config: &cri::PodSandboxConfig, id: &str) -> String {
    let parent = config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.as_str())
        .unwrap_or("");
    container_cgroups_path(node.config.cgroup_driver, parent, id)
}

/// The cgroups path of a sandbox or container `id` under the pod's parent:
/// a path for cgroupfs, `slice:prefix:name` for systemd, as runc reads them.
pub fn container_cgroups_path(driver: CgroupDriver, parent: &str, id: &str) -> String {
    match driver {
        CgroupDriver::Systemd => {
            let slice = if parent.is_empty() {
                "system.slice"
            } else {
                parent
            };
            format!("{slice}:corral:{id}")
        }
        CgroupDriver::Cgroupfs => {
            let parent = if parent.is_empty() { "/corral" } else { parent };
            format!("{}/{id}", parent.trim_end_matches('/'))
        }
    }
}

/// The metadata RunPodSandbox needs; a request without it is refused before
/// anything is made.
fn validate(config: &cri::PodSandboxConfig) -> Result<cri::PodSandboxMetadata> {
    let metadata = config
        .metadata
        .clone()
        .ok_or_else(|| Error::InvalidArgument("pod sandbox config has no metadata".into()))?;
    for (field, value) in [
        ("name", &metadata.name),
        ("namespace", &metadata.namespace),
        ("uid", &metadata.uid),
    ] {
        if value.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "pod sandbox metadata.{field} is empty"
            )));
        }
    }
    // Checked here, not only in the pause's spec: a refused sysctl must not
    // cost a network set up and torn down again.
    spec::validate_pod_sysctls(config)?;
    if !config.log_directory.is_empty() && !Path::new(&config.log_directory).is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "pod log_directory {:?} is not an absolute path",
            config.log_directory
        )));
    }
    Ok(metadata)
}

/// The name a sandbox reserves, as kubelet composes it in containerd and
/// CRI-O: one pod attempt, one sandbox.
pub fn sandbox_name(m: &cri::PodSandboxMetadata) -> String {
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

/// The CRI state of a record.
pub fn cri_state(state: SandboxState) -> cri::PodSandboxState {
    match state {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady,
        SandboxState::Creating | SandboxState::NotReady => cri::PodSandboxState::SandboxNotready,
    }
}

/// PodSandboxStatus.
pub fn status(node: &Node, sandbox: &Sandbox, verbose: bool) -> cri::PodSandboxStatusResponse {
    let record = sandbox.snapshot();
    let network = (!sandbox.host_network()).then(|| {
        let mut ips = record.ips.iter();
        cri::PodSandboxNetworkStatus {
            ip: ips.next().cloned().unwrap_or_default(),
            additional_ips: ips.map(|ip| cri::PodIp { ip: ip.clone() }).collect(),
        }
    });
    let options = sandbox
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let status = cri::PodSandboxStatus {
        id: sandbox.id.clone(),
        metadata: sandbox.config.metadata.clone(),
        state: cri_state(record.state) as i32,
        created_at: record.created_at,
        network,
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(options),
            }),
        }),
        labels: sandbox.config.labels.clone(),
        annotations: sandbox.config.annotations.clone(),
        runtime_handler: record.runtime_handler.clone(),
    };
    let info = if verbose {
        let info = serde_json::json!({
            "pid": record.pid,
            "netns": record.netns,
            "cgroupsPath": record.cgroups_path,
            "runtimeHandler": record.runtime_handler,
            "image": record.image.clone().unwrap_or_else(|| "corral built-in pause".into()),
            "stateDir": sandbox.dir,
            "containers": node.containers_of(&sandbox.id).iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        });
        [("info".to_string(), info.to_string())].into()
    } else {
        Default::default()
    };
    cri::PodSandboxStatusResponse {
        status: Some(status),
        info,
        ..Default::default()
    }
}

/// ListPodSandbox's filter.
pub fn matches(sandbox: &Sandbox, filter: &cri::PodSandboxFilter) -> bool {
    if !filter.id.is_empty() && !sandbox.id.starts_with(&filter.id) {
        return false;
    }
    if let Some(state) = &filter.state {
        if cri_state(sandbox.record().state) as i32 != state.state {
            return false;
        }
    }
    labels_match(&sandbox.config.labels, &filter.label_selector)
}

pub fn labels_match(
    labels: &std::collections::HashMap<String, String>,
    selector: &std::collections::HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub fn summary(sandbox: &Sandbox) -> cri::PodSandbox {
    let record = sandbox.snapshot();
    cri::PodSandbox {
        id: sandbox.id.clone(),
        metadata: sandbox.config.metadata.clone(),
        state: cri_state(record.state) as i32,
        created_at: record.created_at,
        labels: sandbox.config.labels.clone(),
        annotations: sandbox.config.annotations.clone(),
        runtime_handler: record.runtime_handler,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_quantity("10M"), Some(10_000_000));
        assert_eq!(parse_quantity("1Gi"), Some(1 << 30));
        assert_eq!(parse_quantity("500k"), Some(500_000));
        assert_eq!(parse_quantity("1.5M"), Some(1_500_000));
        assert_eq!(parse_quantity("12"), Some(12));
        assert_eq!(parse_quantity("10X"), None);
        assert_eq!(parse_quantity(""), None);
    }

    #[test]
    fn cgroups_paths_follow_the_driver() {
        assert_eq!(
            container_cgroups_path(CgroupDriver::Cgroupfs, "/kubepods/burstable/pod1/", "abc"),
            "/kubepods/burstable/pod1/abc"
        );
        assert_eq!(
            container_cgroups_path(CgroupDriver::Cgroupfs, "", "abc"),
            "/corral/abc"
        );
        assert_eq!(
            container_cgroups_path(CgroupDriver::Systemd, "kubepods-pod1.slice", "abc"),
            "kubepods-pod1.slice:corral:abc"
        );
    }

    /// A config with complete metadata and nothing else.
    fn named_pod() -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "a".into(),
                namespace: "b".into(),
                uid: "c".into(),
                attempt: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn metadata_fields_are_required() {
        let mut config = named_pod();
        assert!(validate(&config).is_ok());
        config.metadata.as_mut().unwrap().uid.clear();
        assert!(matches!(validate(&config), Err(Error::InvalidArgument(m)) if m.contains("uid")));
        config.metadata = None;
        assert!(validate(&config).is_err());
    }

    #[test]
    fn a_node_wide_sysctl_is_refused_before_anything_is_made() {
        let mut config = cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..named_pod()
        };
        let sysctls = &mut config.linux.as_mut().unwrap().sysctls;
        sysctls.insert("kernel.shm_rmid_forced".into(), "1".into());
        assert!(validate(&config).is_ok());
        let sysctls = &mut config.linux.as_mut().unwrap().sysctls;
        sysctls.insert("vm.swappiness".into(), "10".into());
        let err = validate(&config).unwrap_err();
        assert!(
            matches!(&err, Error::Spec(spec::SpecError::InvalidArgument(m)) if m.contains("vm.swappiness")),
            "{err}"
        );
    }
}
