//! OCI runtime specs for pod sandboxes and their containers, built from CRI
//! configs.
//!
//! This module owns one translation: a CRI `PodSandboxConfig`
//! (RunPodSandbox), a `ContainerConfig` plus its image config
//! (CreateContainer), or an exec request, into the `config.json` (or the
//! `Process`) that runc runs. It follows containerd's CRI plugin field by
//! field, because kubelet and critest hold runtimes to that behaviour; where
//! corral deviates, the comment at the spot says why.
//!
//! It only reads: the image's layer directories (for `/etc/passwd` and
//! `/etc/group`, without mounting them), `/proc/self/mountinfo`, host device
//! nodes, and the kernel's capability, cgroup and AppArmor state. It must not
//! create files, mounts or namespaces: the caller prepares the pod's files,
//! its network namespace and the bundle, and writes the spec out.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use corral_runtime::image::ImageConfig;
use k8s_cri::v1 as cri;
use oci_spec::runtime::{
    Capabilities, Capability, Linux, LinuxCapabilities, LinuxCpu, LinuxDevice, LinuxDeviceCgroup,
    LinuxDeviceType, LinuxHugepageLimit, LinuxMemory, LinuxNamespace, LinuxNamespaceType,
    LinuxResources, LinuxSeccomp, Mount, Process, Root, Spec, User,
};

use crate::seccomp::{self, SeccompError};

/// The runtime-spec version written; runc 1.1 and later read it.
const OCI_VERSION: &str = "1.0.2";

/// A container's root filesystem, relative to its bundle: the shim mounts the
/// container's snapshot there.
pub const BUNDLE_ROOTFS: &str = "rootfs";

/// `sandbox` or `container`: what kind of process a spec runs.
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CONTAINER_TYPE_SANDBOX: &str = "sandbox";
pub const CONTAINER_TYPE_CONTAINER: &str = "container";
/// The pod a spec belongs to; shims group a pod's containers by it.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const ANNOTATION_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const ANNOTATION_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const ANNOTATION_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
pub const ANNOTATION_SANDBOX_LOG_DIRECTORY: &str = "io.kubernetes.cri.sandbox-log-directory";
pub const ANNOTATION_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const ANNOTATION_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const ANNOTATION_SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
pub const ANNOTATION_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const ANNOTATION_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
pub const ANNOTATION_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

const DEFAULT_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The pause process is the last thing the OOM killer should pick: losing it
/// tears down the whole pod.
const SANDBOX_OOM_SCORE_ADJ: i32 = -998;

/// The pause process only sleeps; the minimum weight keeps it from competing
/// with the pod's containers.
const SANDBOX_CPU_SHARES: u64 = 2;

/// What a container gets unless its security context adds or drops: the set
/// Docker established and containerd's CRI plugin still grants.
const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Every capability by its kernel number: `ALL` and privileged containers get
/// the first `cap_last_cap + 1` of them.
const KERNEL_CAPABILITIES: [Capability; 41] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::LinuxImmutable,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetAdmin,
    Capability::NetRaw,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::SysChroot,
    Capability::SysPtrace,
    Capability::SysPacct,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysNice,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Mknod,
    Capability::Lease,
    Capability::AuditWrite,
    Capability::AuditControl,
    Capability::Setfcap,
    Capability::MacOverride,
    Capability::MacAdmin,
    Capability::Syslog,
    Capability::WakeAlarm,
    Capability::BlockSuspend,
    Capability::AuditRead,
    Capability::Perfmon,
    Capability::Bpf,
    Capability::CheckpointRestore,
];

/// Hidden from unprivileged processes when the CRI request names no paths.
const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];
const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// RuntimeDefault AppArmor profiles, in order of preference. corral cannot
/// load a profile itself, so it uses the first one an operator (or another
/// runtime on the node) has loaded, and none when none is.
const DEFAULT_APPARMOR_PROFILES: [&str; 3] = [
    "corral-default",
    "cri-containerd.apparmor.d",
    "docker-default",
];

/// The kernel's own limit on symlinks followed in one path lookup.
const MAX_SYMLINKS: usize = 40;

/// `/etc/passwd` and `/etc/group` larger than this are not user databases.
const MAX_ID_FILE_BYTES: u64 = 4 << 20;

/// Why a spec cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The request asks for something invalid or impossible on this node; the
    /// message names the field or value. gRPC InvalidArgument.
    #[error("{0}")]
    InvalidArgument(String),

    /// The seccomp profile the request names cannot be used: invalid input.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),

    /// Reading host or image state failed: a system failure.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn invalid(message: impl Into<String>) -> SpecError {
    SpecError::InvalidArgument(message.into())
}

fn io_error(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> SpecError {
    SpecError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// What RunPodSandbox needs to describe the pod's pause process.
pub struct SandboxSpecInput<'a> {
    pub id: &'a str,
    pub config: &'a cri::PodSandboxConfig,
    /// The pause command, e.g. `["/pause"]`.
    pub pause_args: Vec<String>,
    /// The directory holding the pause binary; mounted read-only as `/`.
    pub rootfs: &'a Path,
    /// The pod's network namespace. `None` with a pod network gives the
    /// pause a fresh, unconnected one; it is ignored for host-network pods.
    pub netns: Option<&'a Path>,
    /// Resolved by the caller: a cgroupfs path or a systemd `slice:prefix:name`.
    pub cgroups_path: String,
    /// The pod's shm directory for `/dev/shm`; `None` binds the host's
    /// `/dev/shm` (IPC=NODE).
    pub shm: Option<&'a Path>,
}

/// What CreateContainer needs to describe one container of a pod.
pub struct ContainerSpecInput<'a> {
    pub id: &'a str,
    /// The pod's id, for the annotations shims group containers by.
    pub sandbox_id: &'a str,
    pub config: &'a cri::ContainerConfig,
    pub sandbox: &'a cri::PodSandboxConfig,
    pub image: &'a ImageConfig,
    /// The image's layer directories, top first, as unpacked (overlay
    /// whiteouts): where user and group names are looked up.
    pub rootfs_layers: &'a [PathBuf],
    /// The pause process, whose namespaces the container joins.
    pub sandbox_pid: u32,
    /// The pod's network namespace; joined instead of the pause's
    /// `/proc/<pid>/ns/net` when given.
    pub netns: Option<&'a Path>,
    /// The pod's files, bound at `/etc/hostname`, `/etc/resolv.conf` and
    /// `/etc/hosts` unless the container mounts over them.
    pub hostname: &'a Path,
    pub resolv_conf: &'a Path,
    pub hosts: &'a Path,
    /// The pod's shm directory for `/dev/shm`; `None` binds the host's.
    pub shm: Option<&'a Path>,
    pub cgroups_path: String,
}

/// The spec of a pod's pause process.
pub fn sandbox_spec(input: &SandboxSpecInput) -> Result<Spec, SpecError> {
    let default_linux = cri::LinuxPodSandboxConfig::default();
    let linux_config = input.config.linux.as_ref().unwrap_or(&default_linux);
    let default_context = cri::LinuxSandboxSecurityContext::default();
    let context = linux_config
        .security_context
        .as_ref()
        .unwrap_or(&default_context);
    let namespaces = PodNamespaces::of(context.namespace_options.as_ref())?;
    if input.pause_args.is_empty() {
        return Err(invalid("the pause process has no command"));
    }

    let capabilities: Capabilities = DEFAULT_CAPABILITIES.into_iter().collect();
    let user = sandbox_user(context)?;
    let seccomp = seccomp_profile(
        context.seccomp.as_ref(),
        sandbox_seccomp_path(context),
        context.privileged,
        &capabilities,
    )?;
    let sysctls = validate_sysctls(&linux_config.sysctls, namespaces)?;

    let mut process = empty_process();
    process.set_args(Some(input.pause_args.clone()));
    process.set_env(Some(vec![DEFAULT_PATH_ENV.to_string()]));
    process.set_user(user);
    process.set_capabilities(Some(capability_sets(capabilities)));
    process.set_no_new_privileges(Some(true));
    process.set_oom_score_adj(Some(SANDBOX_OOM_SCORE_ADJ));

    let mut mounts = system_mounts(false);
    mounts.push(bind_mount(
        "/dev/shm",
        input.shm.unwrap_or(Path::new("/dev/shm")),
        &["rbind", "ro", "nosuid", "nodev", "noexec"],
    ));

    let mut resources = LinuxResources::default();
    resources.set_devices(Some(default_device_rules()));
    let mut cpu = LinuxCpu::default();
    cpu.set_shares(Some(SANDBOX_CPU_SHARES));
    resources.set_cpu(Some(cpu));

    let mut linux = empty_linux();
    linux.set_namespaces(Some(sandbox_namespaces(namespaces, input.netns)));
    linux.set_resources(Some(resources));
    linux.set_cgroups_path(cgroups_path(&input.cgroups_path));
    linux.set_sysctl((!sysctls.is_empty()).then_some(sysctls));
    linux.set_seccomp(seccomp);
    linux.set_masked_paths(Some(strings(&DEFAULT_MASKED_PATHS)));
    linux.set_readonly_paths(Some(strings(&DEFAULT_READONLY_PATHS)));

    // A host-network pod shares the host's UTS namespace: setting a hostname
    // would rename the node.
    let hostname = (!namespaces.host_network && !input.config.hostname.is_empty())
        .then(|| input.config.hostname.clone());

    Ok(assemble(
        root(input.rootfs, true),
        mounts,
        process,
        hostname,
        sandbox_annotations(input, linux_config),
        linux,
    ))
}

/// The spec of one container of a pod.
pub fn container_spec(input: &ContainerSpecInput) -> Result<Spec, SpecError> {
    let config = input.config;
    let default_linux = cri::LinuxContainerConfig::default();
    let linux_config = config.linux.as_ref().unwrap_or(&default_linux);
    let default_context = cri::LinuxContainerSecurityContext::default();
    let context = linux_config
        .security_context
        .as_ref()
        .unwrap_or(&default_context);
    let default_pod_context = cri::LinuxSandboxSecurityContext::default();
    let pod_context = input
        .sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .unwrap_or(&default_pod_context);
    let pod_namespaces = PodNamespaces::of(pod_context.namespace_options.as_ref())?;
    let privileged = context.privileged;
    if privileged && !pod_context.privileged {
        return Err(invalid(
            "a privileged container needs a privileged pod sandbox",
        ));
    }

    let args = process_args(config, input.image)?;
    let cwd = working_dir(config, input.image)?;
    let env = container_env(config, input.image, input.sandbox)?;
    let mut image_ids = ImageIds::new(LayerView {
        layers: input.rootfs_layers,
    });
    let user = container_user(context, &input.image.user, &mut image_ids)?;
    let capabilities = container_capabilities(context)?;
    let apparmor = apparmor_profile(context, privileged)?;
    let seccomp = seccomp_profile(
        context.seccomp.as_ref(),
        container_seccomp_path(context),
        privileged,
        &capabilities,
    )?;
    let (mounts, rootfs_propagation) = container_mounts(input, context, privileged)?;
    let (devices, device_rules) = container_devices(&config.devices, privileged)?;
    let mut resources = resource_limits(linux_config.resources.as_ref())?;
    resources.set_devices(Some(device_rules));
    let namespaces = container_namespaces(input, context, pod_namespaces, privileged)?;
    let (masked_paths, readonly_paths) = protected_paths(context, privileged);

    let mut process = empty_process();
    process.set_terminal(Some(config.tty));
    process.set_args(Some(args));
    process.set_env(Some(env));
    process.set_cwd(cwd);
    process.set_user(user);
    process.set_capabilities(Some(capability_sets(capabilities)));
    process.set_no_new_privileges(Some(context.no_new_privs));
    process.set_apparmor_profile(apparmor);
    process.set_oom_score_adj(oom_score_adj(linux_config.resources.as_ref())?);

    let mut linux = empty_linux();
    linux.set_namespaces(Some(namespaces));
    linux.set_devices((!devices.is_empty()).then_some(devices));
    linux.set_resources(Some(resources));
    linux.set_cgroups_path(cgroups_path(&input.cgroups_path));
    linux.set_seccomp(seccomp);
    linux.set_rootfs_propagation(rootfs_propagation);
    linux.set_masked_paths(masked_paths);
    linux.set_readonly_paths(readonly_paths);

    Ok(assemble(
        root(Path::new(BUNDLE_ROOTFS), context.readonly_rootfs),
        mounts,
        process,
        None,
        container_annotations(input),
        linux,
    ))
}

/// The process of an exec in a container: the container's environment, user,
/// working directory, capabilities and confinement, running `cmd`.
pub fn exec_process(container: &Spec, cmd: &[String], tty: bool) -> Result<Process, SpecError> {
    if cmd.is_empty() {
        return Err(invalid("exec needs a command"));
    }
    let mut process = container
        .process()
        .clone()
        .ok_or_else(|| invalid("the container's spec has no process to exec like"))?;
    process.set_args(Some(cmd.to_vec()));
    process.set_command_line(None);
    process.set_terminal(Some(tty));
    process.set_console_size(None);
    if tty {
        let mut env = process.env().clone().unwrap_or_default();
        set_env(&mut env, "TERM=xterm");
        process.set_env(Some(env));
    }
    Ok(process)
}

fn assemble(
    root: Root,
    mounts: Vec<Mount>,
    process: Process,
    hostname: Option<String>,
    annotations: HashMap<String, String>,
    linux: Linux,
) -> Spec {
    // Spec::default() carries a sample container (hostname "youki", sh, ...):
    // every field is set here so none of it leaks into a real spec.
    let mut spec = Spec::default();
    spec.set_version(OCI_VERSION.to_string());
    spec.set_root(Some(root));
    spec.set_mounts(Some(mounts));
    spec.set_process(Some(process));
    spec.set_hostname(hostname);
    spec.set_domainname(None);
    spec.set_hooks(None);
    spec.set_annotations(Some(annotations));
    spec.set_linux(Some(linux));
    spec.set_solaris(None);
    spec.set_windows(None);
    spec.set_vm(None);
    spec.set_zos(None);
    spec
}

/// A process with nothing set: `Process::default()` is a sample shell.
fn empty_process() -> Process {
    let mut process = Process::default();
    process.set_terminal(Some(false));
    process.set_console_size(None);
    process.set_user(User::default());
    process.set_args(None);
    process.set_command_line(None);
    process.set_env(None);
    process.set_cwd(PathBuf::from("/"));
    process.set_capabilities(None);
    // No rlimits: the container inherits the shim's, as under containerd.
    process.set_rlimits(None);
    process.set_no_new_privileges(None);
    process.set_apparmor_profile(None);
    process.set_oom_score_adj(None);
    process.set_selinux_label(None);
    process.set_io_priority(None);
    process.set_scheduler(None);
    process.set_exec_cpu_affinity(None);
    process
}

/// A Linux section with nothing set: `Linux::default()` carries samples.
fn empty_linux() -> Linux {
    let mut linux = Linux::default();
    linux.set_net_devices(None);
    linux.set_uid_mappings(None);
    linux.set_gid_mappings(None);
    linux.set_sysctl(None);
    linux.set_resources(None);
    linux.set_cgroups_path(None);
    linux.set_namespaces(None);
    linux.set_devices(None);
    linux.set_seccomp(None);
    linux.set_rootfs_propagation(None);
    linux.set_masked_paths(None);
    linux.set_readonly_paths(None);
    linux.set_mount_label(None);
    linux.set_intel_rdt(None);
    linux.set_memory_policy(None);
    linux.set_personality(None);
    linux.set_time_offsets(None);
    linux
}

fn root(path: &Path, readonly: bool) -> Root {
    let mut root = Root::default();
    root.set_path(path.to_path_buf());
    root.set_readonly(Some(readonly));
    root
}

fn cgroups_path(path: &str) -> Option<PathBuf> {
    (!path.is_empty()).then(|| PathBuf::from(path))
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------
// Process: command, environment, working directory

/// containerd's rule (Docker's before it): the CRI command replaces the
/// image's entrypoint, and the CRI args replace the image's cmd; the image's
/// cmd is only used when the CRI gives neither command nor args.
fn process_args(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
) -> Result<Vec<String>, SpecError> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd.clone();
        }
        // An entrypoint of [""] is how an image resets its parent's.
        if image.entrypoint != [""] {
            command = image.entrypoint.clone();
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(invalid(
            "no command: the container config and the image give neither a command nor args",
        ));
    }
    Ok(command)
}

fn working_dir(config: &cri::ContainerConfig, image: &ImageConfig) -> Result<PathBuf, SpecError> {
    let dir = [config.working_dir.as_str(), image.working_dir.as_str()]
        .into_iter()
        .find(|d| !d.is_empty())
        .unwrap_or("/");
    if !dir.starts_with('/') {
        return Err(invalid(format!(
            "working directory {dir:?} is not an absolute path"
        )));
    }
    Ok(PathBuf::from(dir))
}

/// PATH, TERM for a terminal, HOSTNAME, then the image's variables, then the
/// request's; a later value replaces an earlier one with the same name.
fn container_env(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
    sandbox: &cri::PodSandboxConfig,
) -> Result<Vec<String>, SpecError> {
    let mut env = vec![DEFAULT_PATH_ENV.to_string()];
    if config.tty {
        set_env(&mut env, "TERM=xterm");
    }
    let hostname = if sandbox.hostname.is_empty() {
        host_hostname()?
    } else {
        sandbox.hostname.clone()
    };
    set_env(&mut env, &format!("HOSTNAME={hostname}"));
    for entry in &image.env {
        set_env(&mut env, entry);
    }
    for kv in &config.envs {
        set_env(&mut env, &format!("{}={}", kv.key, kv.value));
    }
    Ok(env)
}

/// `NAME=value` replaces or appends; a bare `NAME` (as image configs may
/// carry) unsets.
fn set_env(env: &mut Vec<String>, entry: &str) {
    fn key(e: &str) -> &str {
        e.split_once('=').map_or(e, |(k, _)| k)
    }
    let has_value = entry.contains('=');
    match env.iter().position(|e| key(e) == key(entry)) {
        Some(i) if has_value => env[i] = entry.to_string(),
        Some(i) => {
            env.remove(i);
        }
        None if has_value => env.push(entry.to_string()),
        None => {}
    }
}

fn host_hostname() -> Result<String, SpecError> {
    const PATH: &str = "/proc/sys/kernel/hostname";
    fs::read_to_string(PATH)
        .map(|s| s.trim().to_string())
        .map_err(|e| io_error("reading the host name from", PATH, e))
}

fn oom_score_adj(
    resources: Option<&cri::LinuxContainerResources>,
) -> Result<Option<i32>, SpecError> {
    let Some(resources) = resources else {
        return Ok(None);
    };
    let adj = resources.oom_score_adj;
    if !(-1000..=1000).contains(&adj) {
        return Err(invalid(format!(
            "oom_score_adj {adj} is outside -1000..1000"
        )));
    }
    Ok(Some(adj as i32))
}

// ---------------------------------------------------------------------------
// User and groups

fn sandbox_user(context: &cri::LinuxSandboxSecurityContext) -> Result<User, SpecError> {
    let uid = context
        .run_as_user
        .as_ref()
        .map(|v| id_value(v.value, "run_as_user"))
        .transpose()?;
    let gid = context
        .run_as_group
        .as_ref()
        .map(|v| id_value(v.value, "run_as_group"))
        .transpose()?;
    if uid.is_none() {
        if let Some(gid) = gid {
            return Err(invalid(format!(
                "run_as_group {gid} is set without run_as_user"
            )));
        }
    }
    // The pause rootfs has no /etc/passwd: ids are taken as they are.
    let gid = gid.unwrap_or(0);
    let mut gids = BTreeSet::from([gid]);
    for g in &context.supplemental_groups {
        gids.insert(id_value(*g, "supplemental_groups")?);
    }
    Ok(user(uid.unwrap_or(0), gid, gids))
}

/// The container's uid, gid and groups, as containerd resolves them: the
/// security context's user (and group) or else the image's USER, looked up
/// in the image's `/etc/passwd` and `/etc/group`; groups are the primary
/// gid, the user's memberships in `/etc/group` (policy Merge) and the
/// requested supplemental groups.
fn container_user(
    context: &cri::LinuxContainerSecurityContext,
    image_user: &str,
    ids: &mut ImageIds,
) -> Result<User, SpecError> {
    let requested = requested_user(context, image_user)?;
    let (uid, gid) = match &requested {
        Some(spec) => resolve_user(spec, ids)?,
        None => (0, 0),
    };

    let mut gids = BTreeSet::from([gid]);
    match cri::SupplementalGroupsPolicy::try_from(context.supplemental_groups_policy) {
        Ok(cri::SupplementalGroupsPolicy::Merge) => {
            let member = membership_name(context, image_user);
            gids.extend(member_gids(&member, ids)?);
        }
        Ok(cri::SupplementalGroupsPolicy::Strict) => {}
        Err(_) => {
            return Err(invalid(format!(
                "supplemental_groups_policy {} is not known",
                context.supplemental_groups_policy
            )))
        }
    }
    for g in &context.supplemental_groups {
        gids.insert(id_value(*g, "supplemental_groups")?);
    }
    Ok(user(uid, gid, gids))
}

fn user(uid: u32, gid: u32, gids: BTreeSet<u32>) -> User {
    let mut user = User::default();
    user.set_uid(uid);
    user.set_gid(gid);
    user.set_additional_gids(Some(gids.into_iter().collect()));
    user
}

/// The user string to resolve: `name`, `uid`, `user:gid` from the security
/// context, or else the image's USER as written; `None` runs as root.
fn requested_user(
    context: &cri::LinuxContainerSecurityContext,
    image_user: &str,
) -> Result<Option<String>, SpecError> {
    let user = if !context.run_as_username.is_empty() {
        Some(context.run_as_username.clone())
    } else {
        context
            .run_as_user
            .as_ref()
            .map(|v| id_value(v.value, "run_as_user").map(|uid| uid.to_string()))
            .transpose()?
    };
    let group = context
        .run_as_group
        .as_ref()
        .map(|v| id_value(v.value, "run_as_group"))
        .transpose()?;
    Ok(match (user, group) {
        (Some(user), Some(gid)) => Some(format!("{user}:{gid}")),
        (Some(user), None) => Some(user),
        // A group alone is refused even when the image names a user: the
        // group would otherwise silently apply to whoever the image picks.
        (None, Some(gid)) => {
            return Err(invalid(format!(
                "run_as_group {gid} is set without run_as_user or run_as_username"
            )))
        }
        (None, None) => (!image_user.is_empty()).then(|| image_user.to_string()),
    })
}

/// The user whose `/etc/group` memberships count: the requested name or uid,
/// or the image's user, or root.
fn membership_name(context: &cri::LinuxContainerSecurityContext, image_user: &str) -> String {
    if !context.run_as_username.is_empty() {
        return context.run_as_username.clone();
    }
    if let Some(uid) = &context.run_as_user {
        return uid.value.to_string();
    }
    match image_user.split(':').next() {
        Some(user) if !user.is_empty() => user.to_string(),
        _ => "0".to_string(),
    }
}

/// `uid`, `name`, `uid:gid`, `name:group` (and mixes) to ids: numbers are
/// taken as they are, names must exist in the image.
fn resolve_user(spec: &str, ids: &mut ImageIds) -> Result<(u32, u32), SpecError> {
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        [user] => match user.parse::<u32>() {
            // An unknown uid is fine: it runs with gid 0.
            Ok(uid) => {
                let gid = ids
                    .passwd()?
                    .iter()
                    .find(|e| e.uid == uid)
                    .map_or(0, |e| e.gid);
                Ok((uid, gid))
            }
            Err(_) => {
                let entry = ids.user_named(user)?;
                Ok((entry.uid, entry.gid))
            }
        },
        [user, group] => {
            let uid = match user.parse::<u32>() {
                Ok(uid) => uid,
                Err(_) => ids.user_named(user)?.uid,
            };
            let gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => ids.group_named(group)?,
            };
            Ok((uid, gid))
        }
        _ => Err(invalid(format!(
            "user {spec:?} is not one of user, uid, user:group, uid:gid"
        ))),
    }
}

/// The gids of the groups that list `user` (a name or a uid) as a member,
/// except the group named like the user: that one is its primary group.
fn member_gids(user: &str, ids: &mut ImageIds) -> Result<Vec<u32>, SpecError> {
    let name = match user.parse::<u32>() {
        Ok(uid) => match ids.passwd()?.iter().find(|e| e.uid == uid) {
            Some(entry) => entry.name.clone(),
            None => return Ok(Vec::new()),
        },
        Err(_) => user.to_string(),
    };
    Ok(ids
        .group()?
        .iter()
        .filter(|g| g.name != name && g.members.contains(&name))
        .map(|g| g.gid)
        .collect())
}

fn id_value(value: i64, field: &str) -> Result<u32, SpecError> {
    u32::try_from(value).map_err(|_| invalid(format!("{field} {value} is not a valid id")))
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// The image's user and group databases, read once and only when needed.
struct ImageIds<'a> {
    view: LayerView<'a>,
    passwd: Option<Vec<PasswdEntry>>,
    group: Option<Vec<GroupEntry>>,
}

impl<'a> ImageIds<'a> {
    fn new(view: LayerView<'a>) -> Self {
        ImageIds {
            view,
            passwd: None,
            group: None,
        }
    }

    fn passwd(&mut self) -> Result<&[PasswdEntry], SpecError> {
        if self.passwd.is_none() {
            let text = self.view.read("/etc/passwd")?.unwrap_or_default();
            self.passwd = Some(parse_passwd(&text));
        }
        Ok(self.passwd.as_deref().unwrap_or_default())
    }

    fn group(&mut self) -> Result<&[GroupEntry], SpecError> {
        if self.group.is_none() {
            let text = self.view.read("/etc/group")?.unwrap_or_default();
            self.group = Some(parse_group(&text));
        }
        Ok(self.group.as_deref().unwrap_or_default())
    }

    fn user_named(&mut self, name: &str) -> Result<&PasswdEntry, SpecError> {
        self.passwd()?
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| invalid(format!("user {name:?} is not in the image's /etc/passwd")))
    }

    fn group_named(&mut self, name: &str) -> Result<u32, SpecError> {
        self.group()?
            .iter()
            .find(|g| g.name == name)
            .map(|g| g.gid)
            .ok_or_else(|| invalid(format!("group {name:?} is not in the image's /etc/group")))
    }
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    id_lines(text)
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?.to_string();
            let _password = fields.next()?;
            let uid = fields.next()?.parse().ok()?;
            let gid = fields.next()?.parse().ok()?;
            Some(PasswdEntry { name, uid, gid })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    id_lines(text)
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?.to_string();
            let _password = fields.next()?;
            let gid = fields.next()?.parse().ok()?;
            let members = fields
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some(GroupEntry { name, gid, members })
        })
        .collect()
}

fn id_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// The files of an image as its container will see them, read straight from
/// the layer directories with overlayfs' rules (upper layers win, 0:0
/// character devices are whiteouts, `trusted.overlay.opaque=y` directories
/// hide what is below), without mounting anything. Symlinks are resolved
/// inside this view, never on the host: a link to `/etc/shadow` means the
/// image's.
struct LayerView<'a> {
    layers: &'a [PathBuf],
}

/// One path's entry in the topmost layer that has it.
struct LayerEntry {
    path: PathBuf,
    metadata: fs::Metadata,
}

impl LayerView<'_> {
    /// The contents of the regular file at `path`, `None` when the image has
    /// no such file.
    fn read(&self, path: &str) -> Result<Option<String>, SpecError> {
        let mut pending: Vec<String> = components(path).rev().collect();
        let mut resolved: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                resolved.pop();
                continue;
            }
            resolved.push(part);
            let Some(entry) = self.lookup(&resolved)? else {
                return Ok(None);
            };
            let kind = entry.metadata.file_type();
            if kind.is_symlink() {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Ok(None);
                }
                let target = fs::read_link(&entry.path)
                    .map_err(|e| io_error("reading the image link", &entry.path, e))?;
                resolved.pop();
                if target.is_absolute() {
                    resolved.clear();
                }
                let target = target.to_string_lossy().into_owned();
                pending.extend(components(&target).rev());
            } else if pending.is_empty() {
                return if kind.is_file() {
                    read_regular_file(&entry.path).map(Some)
                } else {
                    Ok(None)
                };
            } else if !kind.is_dir() {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// The topmost entry for `parts` (whose parents resolve to directories).
    fn lookup(&self, parts: &[String]) -> Result<Option<LayerEntry>, SpecError> {
        let Some((name, parents)) = parts.split_last() else {
            return Ok(None);
        };
        'layers: for layer in self.layers {
            let mut dir = layer.clone();
            let mut hides_lower = false;
            for parent in parents {
                dir.push(parent);
                match lstat(&dir)? {
                    None => {
                        if hides_lower {
                            return Ok(None);
                        }
                        continue 'layers;
                    }
                    // A whiteout or a non-directory over a parent hides
                    // every lower layer's copy of it.
                    Some(m) if !m.is_dir() => return Ok(None),
                    Some(_) => hides_lower |= is_opaque(&dir),
                }
            }
            let path = dir.join(name);
            match lstat(&path)? {
                None if hides_lower => return Ok(None),
                None => continue,
                Some(m) if is_whiteout(&m) => return Ok(None),
                Some(metadata) => return Ok(Some(LayerEntry { path, metadata })),
            }
        }
        Ok(None)
    }
}

fn components(path: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(str::to_string)
}

fn lstat(path: &Path) -> Result<Option<fs::Metadata>, SpecError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(io_error("reading the image layer entry", path, e)),
    }
}

fn is_whiteout(metadata: &fs::Metadata) -> bool {
    metadata.file_type().is_char_device() && metadata.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 2];
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // kernel writes at most `value.len()` bytes into `value`.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

fn read_regular_file(path: &Path) -> Result<String, SpecError> {
    // O_NOFOLLOW: the entry was checked to be a regular file; a link swapped
    // in since must not lead outside the layer.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_error("opening the image file", path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_ID_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error("reading the image file", path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

// ---------------------------------------------------------------------------
// Capabilities, seccomp, AppArmor

/// containerd's order: add ALL, drop ALL, then the named adds, then the
/// named drops; privileged containers get every capability regardless.
fn container_capabilities(
    context: &cri::LinuxContainerSecurityContext,
) -> Result<Capabilities, SpecError> {
    if context.privileged {
        return Ok(kernel_capabilities());
    }
    let mut caps: Capabilities = DEFAULT_CAPABILITIES.into_iter().collect();
    let Some(requested) = &context.capabilities else {
        return Ok(caps);
    };
    let is_all = |name: &String| name.eq_ignore_ascii_case("ALL");
    if requested.add_capabilities.iter().any(is_all) {
        caps = kernel_capabilities();
    }
    if requested.drop_capabilities.iter().any(is_all) {
        caps.clear();
    }
    for name in requested.add_capabilities.iter().filter(|n| !is_all(n)) {
        caps.insert(parse_capability(name)?);
    }
    for name in requested.drop_capabilities.iter().filter(|n| !is_all(n)) {
        caps.remove(&parse_capability(name)?);
    }
    Ok(caps)
}

/// `NET_ADMIN`, `CAP_NET_ADMIN`, `net_admin` all name the same capability.
fn parse_capability(name: &str) -> Result<Capability, SpecError> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    bare.parse::<Capability>()
        .map_err(|_| invalid(format!("unknown capability {name:?}")))
}

/// Every capability this kernel knows.
fn kernel_capabilities() -> Capabilities {
    static COUNT: OnceLock<usize> = OnceLock::new();
    let count = *COUNT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .map_or(KERNEL_CAPABILITIES.len(), |last| last + 1)
            .min(KERNEL_CAPABILITIES.len())
    });
    KERNEL_CAPABILITIES[..count].iter().copied().collect()
}

/// `CAP_…` names, sorted, as the seccomp module takes them.
fn capability_names(caps: &Capabilities) -> Vec<String> {
    let mut names: Vec<String> = caps.iter().map(|c| format!("CAP_{c}")).collect();
    names.sort();
    names
}

/// Bounding, effective and permitted; no inheritable or ambient set, so a
/// non-root user ends up with no effective capabilities (Kubernetes is not
/// ambient-aware, as in containerd).
fn capability_sets(caps: Capabilities) -> LinuxCapabilities {
    let mut sets = LinuxCapabilities::default();
    sets.set_bounding(Some(caps.clone()));
    sets.set_effective(Some(caps.clone()));
    sets.set_permitted(Some(caps));
    sets.set_inheritable(None);
    sets.set_ambient(None);
    sets
}

// The deprecated string fields: critest and older kubelets still send them.
#[allow(deprecated)]
fn sandbox_seccomp_path(context: &cri::LinuxSandboxSecurityContext) -> &str {
    &context.seccomp_profile_path
}

#[allow(deprecated)]
fn container_seccomp_path(context: &cri::LinuxContainerSecurityContext) -> &str {
    &context.seccomp_profile_path
}

#[allow(deprecated)]
fn container_apparmor_path(context: &cri::LinuxContainerSecurityContext) -> &str {
    &context.apparmor_profile
}

/// A security profile request, from the new field or the deprecated path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Profile {
    RuntimeDefault,
    Unconfined,
    Localhost(String),
}

fn profile_from_field(profile: &cri::SecurityProfile, what: &str) -> Result<Profile, SpecError> {
    use cri::security_profile::ProfileType;
    let kind = ProfileType::try_from(profile.profile_type).map_err(|_| {
        invalid(format!(
            "{what}: unknown profile type {}",
            profile.profile_type
        ))
    })?;
    if kind != ProfileType::Localhost && !profile.localhost_ref.is_empty() {
        return Err(invalid(format!(
            "{what}: localhost_ref is only allowed with profile type Localhost"
        )));
    }
    Ok(match kind {
        ProfileType::RuntimeDefault => Profile::RuntimeDefault,
        ProfileType::Unconfined => Profile::Unconfined,
        ProfileType::Localhost => {
            let name = profile
                .localhost_ref
                .strip_prefix("localhost/")
                .unwrap_or(&profile.localhost_ref);
            if name.is_empty() {
                return Err(invalid(format!("{what}: Localhost profile without a name")));
            }
            Profile::Localhost(name.to_string())
        }
    })
}

/// The deprecated `runtime/default`, `docker/default`, `unconfined`,
/// `localhost/<name>` strings; empty means not set.
fn profile_from_path(path: &str, what: &str) -> Result<Option<Profile>, SpecError> {
    Ok(Some(match path {
        "" => return Ok(None),
        "runtime/default" | "docker/default" => Profile::RuntimeDefault,
        "unconfined" => Profile::Unconfined,
        other => match other.strip_prefix("localhost/") {
            Some(name) if !name.is_empty() => Profile::Localhost(name.to_string()),
            _ => return Err(invalid(format!("{what} {other:?} is not a valid profile"))),
        },
    }))
}

/// No profile asked for means no filter (critest checks `Seccomp: 0`), and a
/// privileged process is never filtered.
fn seccomp_profile(
    field: Option<&cri::SecurityProfile>,
    deprecated_path: &str,
    privileged: bool,
    caps: &Capabilities,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    if privileged {
        return Ok(None);
    }
    let requested = match field {
        Some(profile) => Some(profile_from_field(profile, "seccomp")?),
        None => profile_from_path(deprecated_path, "seccomp_profile_path")?,
    };
    match requested {
        None | Some(Profile::Unconfined) => Ok(None),
        Some(Profile::RuntimeDefault) => {
            Ok(Some(seccomp::runtime_default(&capability_names(caps))))
        }
        Some(Profile::Localhost(path)) => {
            let path = Path::new(&path);
            if !path.is_absolute() {
                return Err(invalid(format!(
                    "seccomp Localhost profile {} must be an absolute path",
                    path.display()
                )));
            }
            Ok(Some(seccomp::localhost(path)?))
        }
    }
}

fn apparmor_profile(
    context: &cri::LinuxContainerSecurityContext,
    privileged: bool,
) -> Result<Option<String>, SpecError> {
    // The new field wins over the deprecated string when both are set.
    let requested = match &context.apparmor {
        Some(profile) => Some(profile_from_field(profile, "apparmor")?),
        None => profile_from_path(container_apparmor_path(context), "apparmor_profile")?,
    };
    let loaded = if apparmor_enabled() {
        Some(loaded_apparmor_profiles()?)
    } else {
        None
    };
    choose_apparmor(requested, privileged, loaded.as_deref())
}

/// `loaded` is `None` when AppArmor is off. Off, a named profile cannot be
/// honoured and is refused, while the default and unconfined mean nothing;
/// on, the default applies to unprivileged containers when one is loaded,
/// and a named profile must be loaded.
fn choose_apparmor(
    requested: Option<Profile>,
    privileged: bool,
    loaded: Option<&[String]>,
) -> Result<Option<String>, SpecError> {
    let Some(loaded) = loaded else {
        return match requested {
            Some(Profile::Localhost(name)) => Err(invalid(format!(
                "AppArmor profile {name:?} was requested but AppArmor is not enabled on this node"
            ))),
            _ => Ok(None),
        };
    };
    let is_loaded = |name: &str| loaded.iter().any(|p| p == name);
    match requested.unwrap_or(Profile::RuntimeDefault) {
        Profile::Unconfined => Ok(None),
        Profile::RuntimeDefault if privileged => Ok(None),
        Profile::RuntimeDefault => Ok(DEFAULT_APPARMOR_PROFILES
            .into_iter()
            .find(|p| is_loaded(p))
            .map(str::to_string)),
        Profile::Localhost(name) if is_loaded(&name) => Ok(Some(name)),
        Profile::Localhost(name) => {
            Err(invalid(format!("AppArmor profile {name:?} is not loaded")))
        }
    }
}

fn apparmor_enabled() -> bool {
    fs::read_to_string("/sys/module/apparmor/parameters/enabled").is_ok_and(|s| s.trim() == "Y")
}

/// Names of the loaded profiles; lines read `name (mode)`.
fn loaded_apparmor_profiles() -> Result<Vec<String>, SpecError> {
    const PATH: &str = "/sys/kernel/security/apparmor/profiles";
    let text = fs::read_to_string(PATH)
        .map_err(|e| io_error("reading AppArmor profiles from", PATH, e))?;
    Ok(text
        .lines()
        .filter_map(|line| line.rsplit_once(" (").map(|(name, _)| name.to_string()))
        .collect())
}

/// Paths from the request when it names any; containerd's defaults when it
/// names none (kubelet always names them, other clients may not); nothing
/// for privileged containers.
fn protected_paths(
    context: &cri::LinuxContainerSecurityContext,
    privileged: bool,
) -> (Option<Vec<String>>, Option<Vec<String>>) {
    if privileged {
        return (None, None);
    }
    if context.masked_paths.is_empty() && context.readonly_paths.is_empty() {
        return (
            Some(strings(&DEFAULT_MASKED_PATHS)),
            Some(strings(&DEFAULT_READONLY_PATHS)),
        );
    }
    (
        Some(context.masked_paths.clone()),
        Some(context.readonly_paths.clone()),
    )
}

// ---------------------------------------------------------------------------
// Namespaces and sysctls

/// Which of the pod's namespaces are the host's.
#[derive(Debug, Clone, Copy)]
struct PodNamespaces {
    host_network: bool,
    host_pid: bool,
    host_ipc: bool,
}

impl PodNamespaces {
    fn of(options: Option<&cri::NamespaceOption>) -> Result<Self, SpecError> {
        let Some(options) = options else {
            return Ok(PodNamespaces {
                host_network: false,
                host_pid: false,
                host_ipc: false,
            });
        };
        if let Some(userns) = &options.userns_options {
            if namespace_mode(userns.mode, "user")? != cri::NamespaceMode::Node {
                return Err(invalid("user namespaces are not supported"));
            }
        }
        Ok(PodNamespaces {
            host_network: namespace_mode(options.network, "network")? == cri::NamespaceMode::Node,
            host_pid: namespace_mode(options.pid, "pid")? == cri::NamespaceMode::Node,
            host_ipc: namespace_mode(options.ipc, "ipc")? == cri::NamespaceMode::Node,
        })
    }
}

fn namespace_mode(value: i32, which: &str) -> Result<cri::NamespaceMode, SpecError> {
    cri::NamespaceMode::try_from(value)
        .map_err(|_| invalid(format!("unknown {which} namespace mode {value}")))
}

fn namespace(kind: LinuxNamespaceType, path: Option<PathBuf>) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(kind);
    ns.set_path(path);
    ns
}

/// New namespaces for the pause, except the host's where the pod shares
/// them; the network namespace is the pod's pinned one.
fn sandbox_namespaces(pod: PodNamespaces, netns: Option<&Path>) -> Vec<LinuxNamespace> {
    let mut namespaces = vec![namespace(LinuxNamespaceType::Mount, None)];
    if !pod.host_pid {
        namespaces.push(namespace(LinuxNamespaceType::Pid, None));
    }
    if !pod.host_ipc {
        namespaces.push(namespace(LinuxNamespaceType::Ipc, None));
    }
    if !pod.host_network {
        namespaces.push(namespace(LinuxNamespaceType::Uts, None));
        namespaces.push(namespace(
            LinuxNamespaceType::Network,
            netns.map(Path::to_path_buf),
        ));
    }
    namespaces
}

/// A container joins the pod's network, UTS and IPC namespaces (none of them
/// when the pod uses the host's), and the pod's PID namespace unless it asks
/// for its own or the host's. The pod's options decide network and IPC, as
/// containerd joins whatever the pause has.
fn container_namespaces(
    input: &ContainerSpecInput,
    context: &cri::LinuxContainerSecurityContext,
    pod: PodNamespaces,
    privileged: bool,
) -> Result<Vec<LinuxNamespace>, SpecError> {
    let pause = |kind: &str| {
        Some(PathBuf::from(format!(
            "/proc/{}/ns/{kind}",
            input.sandbox_pid
        )))
    };
    let mut namespaces = vec![namespace(LinuxNamespaceType::Mount, None)];
    if !pod.host_network {
        let net = input.netns.map(Path::to_path_buf).or_else(|| pause("net"));
        namespaces.push(namespace(LinuxNamespaceType::Network, net));
        namespaces.push(namespace(LinuxNamespaceType::Uts, pause("uts")));
    }
    if !pod.host_ipc {
        namespaces.push(namespace(LinuxNamespaceType::Ipc, pause("ipc")));
    }
    let options = context.namespace_options.as_ref();
    if let Some(userns) = options.and_then(|o| o.userns_options.as_ref()) {
        if namespace_mode(userns.mode, "user")? != cri::NamespaceMode::Node {
            return Err(invalid("user namespaces are not supported"));
        }
    }
    let pid_mode = namespace_mode(options.map_or(0, |o| o.pid), "pid")?;
    match pid_mode {
        cri::NamespaceMode::Container => {
            namespaces.push(namespace(LinuxNamespaceType::Pid, None));
        }
        cri::NamespaceMode::Pod if !pod.host_pid => {
            namespaces.push(namespace(LinuxNamespaceType::Pid, pause("pid")));
        }
        cri::NamespaceMode::Pod | cri::NamespaceMode::Node => {}
        cri::NamespaceMode::Target => {
            return Err(invalid(
                "pid namespace mode TARGET (sharing another container's) is not supported",
            ))
        }
    }
    // A cgroup namespace hides the host's cgroup tree; cgroup v1 and
    // privileged containers keep the host's view, for compatibility.
    if cgroup_v2() && !privileged {
        namespaces.push(namespace(LinuxNamespaceType::Cgroup, None));
    }
    Ok(namespaces)
}

/// Checks the pod's sysctls against its namespaces, for RunPodSandbox to
/// refuse a pod before it makes its network; [`sandbox_spec`] checks again.
pub fn validate_pod_sysctls(config: &cri::PodSandboxConfig) -> Result<(), SpecError> {
    let Some(linux) = config.linux.as_ref() else {
        return Ok(());
    };
    let options = linux
        .security_context
        .as_ref()
        .and_then(|c| c.namespace_options.as_ref());
    validate_sysctls(&linux.sysctls, PodNamespaces::of(options)?).map(|_| ())
}

/// The IPC namespace's sysctls outside `fs.mqueue.`: the list runc accepts
/// (any other `kernel.` name would reach runc only to be refused there).
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Sysctls go on the pause: containers see them by joining its namespaces.
/// A sysctl that no namespace of the pod holds (`vm.*`, `kernel.pid_max`),
/// or one of a namespace the pod shares with the host, would change the
/// node, so it is refused here, by name, before anything of the pod is
/// made: runc refuses the same ones, but only once the network is up and
/// with an error that reads as the node's failure, not the pod's.
fn validate_sysctls(
    sysctls: &HashMap<String, String>,
    pod: PodNamespaces,
) -> Result<HashMap<String, String>, SpecError> {
    for name in sysctls.keys() {
        let well_formed = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b))
            && name.split(['.', '/']).all(|part| !part.is_empty());
        if !well_formed {
            return Err(invalid(format!("sysctl {name:?} is not a valid name")));
        }
        let dotted = name.replace('/', ".");
        if dotted == "kernel.hostname" {
            // runc refuses it too: the spec's hostname is where it goes.
            return Err(invalid(format!(
                "sysctl {name:?} cannot be set: the pod's hostname field sets it"
            )));
        }
        let uts = dotted == "kernel.domainname";
        let net = dotted.starts_with("net.");
        let ipc = IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.");
        if !(uts || net || ipc) {
            return Err(invalid(format!(
                "sysctl {name:?} is not in a namespace of the pod: setting it would change the node"
            )));
        }
        if pod.host_network && (net || uts) {
            return Err(invalid(format!(
                "sysctl {name:?} cannot be set in a pod that uses the host's network"
            )));
        }
        if pod.host_ipc && ipc {
            return Err(invalid(format!(
                "sysctl {name:?} cannot be set in a pod that uses the host's IPC namespace"
            )));
        }
    }
    Ok(sysctls.clone())
}

// ---------------------------------------------------------------------------
// Mounts

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(destination));
    m.set_typ(Some(kind.to_string()));
    m.set_source(Some(PathBuf::from(source)));
    m.set_options(Some(strings(options)));
    m
}

fn bind_mount(destination: &str, source: &Path, options: &[&str]) -> Mount {
    let mut m = mount(destination, "bind", "", options);
    m.set_source(Some(source.to_path_buf()));
    m
}

/// The kernel file systems every process gets; `/dev/shm` comes from the pod.
fn system_mounts(privileged: bool) -> Vec<Mount> {
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &[
                "nosuid",
                "noexec",
                "nodev",
                if privileged { "rw" } else { "ro" },
            ],
        ),
    ]
}

/// One bind mount to make: a CRI mount, or one of the pod's files.
struct BindRequest {
    container_path: String,
    host_path: PathBuf,
    readonly: bool,
    recursive_readonly: bool,
    propagation: cri::MountPropagation,
    /// A CRI mount whose host path is missing is an error; a missing pod
    /// file is skipped, as containerd does.
    required: bool,
}

/// The system mounts (minus those the request replaces), then the pod's
/// files and the CRI mounts, parents before children. Also the rootfs
/// propagation the mounts need.
fn container_mounts(
    input: &ContainerSpecInput,
    context: &cri::LinuxContainerSecurityContext,
    privileged: bool,
) -> Result<(Vec<Mount>, Option<String>), SpecError> {
    let mut binds = input
        .config
        .mounts
        .iter()
        .map(cri_bind_request)
        .collect::<Result<Vec<_>, _>>()?;
    let requested: HashSet<String> = binds.iter().map(|b| b.container_path.clone()).collect();
    for bind in pod_file_binds(input, context) {
        if !requested.contains(&bind.container_path) {
            binds.push(bind);
        }
    }
    binds.sort_by_key(|b| b.container_path.matches('/').count());
    let destinations: HashSet<&str> = binds.iter().map(|b| b.container_path.as_str()).collect();

    let mode = if privileged { "rw" } else { "ro" };
    let mut mounts: Vec<Mount> = system_mounts(privileged)
        .into_iter()
        .chain([mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", mode],
        )])
        .filter(|m| {
            let dest = m.destination().to_string_lossy();
            let replaced_dev = destinations.contains("/dev") && dest.starts_with("/dev/");
            !destinations.contains(dest.as_ref()) && !replaced_dev
        })
        .collect();

    let mut rootfs_propagation = None;
    for bind in &binds {
        if let Some(m) = bind_request_mount(bind, &mut rootfs_propagation)? {
            mounts.push(m);
        }
    }
    Ok((mounts, rootfs_propagation))
}

fn cri_bind_request(m: &cri::Mount) -> Result<BindRequest, SpecError> {
    let container_path = clean_container_path(&m.container_path).ok_or_else(|| {
        invalid(format!(
            "mount container path {:?} is not an absolute path",
            m.container_path
        ))
    })?;
    if m.host_path.is_empty() {
        return Err(invalid(format!(
            "mount at {container_path} has no host path"
        )));
    }
    if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
        return Err(invalid(format!(
            "mount at {container_path}: image volumes are not supported"
        )));
    }
    if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
        return Err(invalid(format!(
            "mount at {container_path}: id-mapped mounts are not supported"
        )));
    }
    let propagation = cri::MountPropagation::try_from(m.propagation).map_err(|_| {
        invalid(format!(
            "mount at {container_path}: unknown propagation {}",
            m.propagation
        ))
    })?;
    if m.recursive_read_only {
        if !m.readonly {
            return Err(invalid(format!(
                "mount {} at {container_path}: recursive read-only needs readonly",
                m.host_path
            )));
        }
        if propagation != cri::MountPropagation::PropagationPrivate {
            return Err(invalid(format!(
                "mount {} at {container_path}: recursive read-only needs private propagation, not {}",
                m.host_path,
                propagation.as_str_name()
            )));
        }
    }
    Ok(BindRequest {
        container_path,
        host_path: PathBuf::from(&m.host_path),
        readonly: m.readonly,
        recursive_readonly: m.recursive_read_only,
        propagation,
        required: true,
    })
}

/// The pod's hostname, hosts and resolv.conf (read-only with a read-only
/// rootfs), and its shm.
fn pod_file_binds(
    input: &ContainerSpecInput,
    context: &cri::LinuxContainerSecurityContext,
) -> Vec<BindRequest> {
    let file = |container_path: &str, host_path: &Path, readonly: bool| BindRequest {
        container_path: container_path.to_string(),
        host_path: host_path.to_path_buf(),
        readonly,
        recursive_readonly: false,
        propagation: cri::MountPropagation::PropagationPrivate,
        required: false,
    };
    let readonly = context.readonly_rootfs;
    vec![
        file("/etc/hostname", input.hostname, readonly),
        file("/etc/hosts", input.hosts, readonly),
        file("/etc/resolv.conf", input.resolv_conf, readonly),
        file(
            "/dev/shm",
            input.shm.unwrap_or(Path::new("/dev/shm")),
            false,
        ),
    ]
}

fn bind_request_mount(
    bind: &BindRequest,
    rootfs_propagation: &mut Option<String>,
) -> Result<Option<Mount>, SpecError> {
    // The host path may be a symlink (critest's "volume via symlink"): bind
    // what it points to.
    let source = match fs::canonicalize(&bind.host_path) {
        Ok(path) => path,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !bind.required => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(invalid(format!(
                "host path {} of the mount at {} does not exist",
                bind.host_path.display(),
                bind.container_path
            )))
        }
        Err(e) => return Err(io_error("resolving the host path", &bind.host_path, e)),
    };
    let mut options = vec!["rbind"];
    match bind.propagation {
        cri::MountPropagation::PropagationPrivate => options.push("rprivate"),
        cri::MountPropagation::PropagationBidirectional => {
            require_propagation(&source, &["shared:"], "shared")?;
            options.push("rshared");
            *rootfs_propagation = Some("rshared".to_string());
        }
        cri::MountPropagation::PropagationHostToContainer => {
            require_propagation(&source, &["shared:", "master:"], "shared or slave")?;
            options.push("rslave");
            if rootfs_propagation.as_deref() != Some("rshared") {
                *rootfs_propagation = Some("rslave".to_string());
            }
        }
    }
    options.push(match (bind.readonly, bind.recursive_readonly) {
        (true, true) => "rro",
        (true, false) => "ro",
        (false, _) => "rw",
    });
    Ok(Some(bind_mount(&bind.container_path, &source, &options)))
}

/// Propagation only works when the host mount holding `path` propagates
/// itself; otherwise the container would silently see nothing.
fn require_propagation(path: &Path, tags: &[&str], wanted: &str) -> Result<(), SpecError> {
    let info = mount_holding(path)?;
    if info
        .optional
        .iter()
        .any(|o| tags.iter().any(|t| o.starts_with(t)))
    {
        return Ok(());
    }
    Err(invalid(format!(
        "host path {} is on mount {}, which is not a {wanted} mount",
        path.display(),
        info.mount_point.display()
    )))
}

struct MountInfo {
    mount_point: PathBuf,
    /// The optional fields: `shared:N`, `master:N`, ...
    optional: Vec<String>,
}

/// The mount `path` (canonical) is on: the deepest mount point above it,
/// the last one listed when mounts are stacked.
fn mount_holding(path: &Path) -> Result<MountInfo, SpecError> {
    const MOUNTINFO: &str = "/proc/self/mountinfo";
    let text = fs::read_to_string(MOUNTINFO)
        .map_err(|e| io_error("reading the mount table", MOUNTINFO, e))?;
    let mut best: Option<(usize, MountInfo)> = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(separator) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if separator < 6 {
            continue;
        }
        let mount_point = PathBuf::from(unescape_mountinfo(fields[4]));
        if !path.starts_with(&mount_point) {
            continue;
        }
        let depth = mount_point.components().count();
        if best.as_ref().is_some_and(|(d, _)| depth < *d) {
            continue;
        }
        let optional = fields[6..separator].iter().map(|s| s.to_string()).collect();
        best = Some((
            depth,
            MountInfo {
                mount_point,
                optional,
            },
        ));
    }
    best.map(|(_, info)| info).ok_or_else(|| {
        io_error(
            "finding the mount of",
            path,
            io::Error::new(io::ErrorKind::NotFound, "no mount holds it"),
        )
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/a//b/./c/../d/` to `/a/b/d`; `None` unless absolute.
fn clean_container_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

// ---------------------------------------------------------------------------
// Devices and resources

/// The CRI devices, and for privileged containers every host device; with
/// the device cgroup rules that let the container use them.
fn container_devices(
    requested: &[cri::Device],
    privileged: bool,
) -> Result<(Vec<LinuxDevice>, Vec<LinuxDeviceCgroup>), SpecError> {
    let mut devices = Vec::new();
    let mut rules = default_device_rules();
    for device in requested {
        let access = if device.permissions.is_empty() {
            "rwm"
        } else {
            device.permissions.as_str()
        };
        if !access.chars().all(|c| "rwm".contains(c)) {
            return Err(invalid(format!(
                "device {}: permissions {access:?} are not a combination of r, w and m",
                device.host_path
            )));
        }
        for dev in cri_device(device)? {
            rules.push(device_rule(
                true,
                Some(dev.typ()),
                Some(dev.major()),
                Some(dev.minor()),
                access,
            ));
            devices.push(dev);
        }
    }
    if privileged {
        let requested_paths: HashSet<PathBuf> = devices.iter().map(|d| d.path().clone()).collect();
        devices.extend(
            host_devices()?
                .into_iter()
                .filter(|d| !requested_paths.contains(d.path())),
        );
        rules = vec![device_rule(
            true,
            Some(LinuxDeviceType::A),
            None,
            None,
            "rwm",
        )];
    }
    Ok((devices, rules))
}

/// A CRI device: a device node, or a directory of them mapped below the
/// container path.
fn cri_device(device: &cri::Device) -> Result<Vec<LinuxDevice>, SpecError> {
    let host = fs::canonicalize(&device.host_path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => invalid(format!("device {} does not exist", device.host_path)),
        _ => io_error("resolving the device", &device.host_path, e),
    })?;
    let container_path = if device.container_path.is_empty() {
        PathBuf::from(&device.host_path)
    } else {
        PathBuf::from(&device.container_path)
    };
    let metadata = fs::metadata(&host).map_err(|e| io_error("reading the device", &host, e))?;
    if metadata.is_dir() {
        let mut devices = Vec::new();
        walk_devices(&host, &host, &container_path, &mut devices)?;
        return Ok(devices);
    }
    match linux_device(&host, &metadata) {
        Some(mut dev) => {
            dev.set_path(container_path);
            Ok(vec![dev])
        }
        None => Err(invalid(format!(
            "{} is not a device node",
            device.host_path
        ))),
    }
}

/// Every device node under `/dev` except the per-container ones (pts, shm,
/// mqueue, the console) that runc sets up itself.
fn host_devices() -> Result<Vec<LinuxDevice>, SpecError> {
    let mut devices = Vec::new();
    walk_devices(
        Path::new("/dev"),
        Path::new("/dev"),
        Path::new("/dev"),
        &mut devices,
    )?;
    Ok(devices)
}

fn walk_devices(
    root: &Path,
    dir: &Path,
    container_root: &Path,
    out: &mut Vec<LinuxDevice>,
) -> Result<(), SpecError> {
    const SKIPPED_DIRS: [&str; 7] = ["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];
    let entries = fs::read_dir(dir).map_err(|e| io_error("listing devices in", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("listing devices in", dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let metadata = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("reading the device", &path, e)),
        };
        if metadata.is_dir() {
            if !SKIPPED_DIRS.iter().any(|s| name.as_bytes() == s.as_bytes()) {
                walk_devices(root, &path, container_root, out)?;
            }
            continue;
        }
        if name.as_bytes() == b"console" {
            continue;
        }
        if let Some(mut dev) = linux_device(&path, &metadata) {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            dev.set_path(container_root.join(relative));
            out.push(dev);
        }
    }
    Ok(())
}

/// A block or character device node; `None` for anything else.
fn linux_device(path: &Path, metadata: &fs::Metadata) -> Option<LinuxDevice> {
    let kind = metadata.file_type();
    let typ = if kind.is_block_device() {
        LinuxDeviceType::B
    } else if kind.is_char_device() {
        LinuxDeviceType::C
    } else {
        return None;
    };
    let rdev = metadata.rdev();
    let mut dev = LinuxDevice::default();
    dev.set_path(path.to_path_buf());
    dev.set_typ(typ);
    dev.set_major(i64::from(libc::major(rdev)));
    dev.set_minor(i64::from(libc::minor(rdev)));
    dev.set_file_mode(Some(metadata.mode() & 0o7777));
    dev.set_uid(Some(metadata.uid()));
    dev.set_gid(Some(metadata.gid()));
    Some(dev)
}

fn device_rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
    access: &str,
) -> LinuxDeviceCgroup {
    let mut rule = LinuxDeviceCgroup::default();
    rule.set_allow(allow);
    rule.set_typ(typ);
    rule.set_major(major);
    rule.set_minor(minor);
    rule.set_access(Some(access.to_string()));
    rule
}

/// Deny every device, then allow creating nodes and using the few every
/// process needs (null, zero, full, random, urandom, tty, ptmx, ptys): what
/// runc allows by default, written out so the spec says it.
fn default_device_rules() -> Vec<LinuxDeviceCgroup> {
    const C: Option<LinuxDeviceType> = Some(LinuxDeviceType::C);
    let mut rules = vec![
        device_rule(false, None, None, None, "rwm"),
        device_rule(true, C, None, None, "m"),
        device_rule(true, Some(LinuxDeviceType::B), None, None, "m"),
    ];
    for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)] {
        rules.push(device_rule(true, C, Some(major), Some(minor), "rwm"));
    }
    rules.push(device_rule(true, C, Some(136), None, "rwm"));
    rules
}

/// The lowest `oom_score_adj` this daemon can give a process: its own, when
/// it lacks CAP_SYS_RESOURCE (the kernel refuses to lower the score
/// without it and runc's create then fails); `None` when any value works.
/// containerd calls this `restrict_oom_score_adj`; corral applies it when
/// the capability is missing instead of asking the operator.
pub fn oom_score_adj_floor() -> Option<i32> {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())?;
    if effective & (1 << CAP_SYS_RESOURCE) != 0 {
        return None;
    }
    fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Raises the process's `oom_score_adj` to `floor` if it is below it.
pub fn restrict_oom_score_adj(spec: &mut Spec, floor: Option<i32>) {
    let Some(floor) = floor else { return };
    if let Some(process) = spec.process_mut() {
        if process.oom_score_adj().is_some_and(|adj| adj < floor) {
            process.set_oom_score_adj(Some(floor));
        }
    }
}

/// The cgroup limits of UpdateContainerResources, for `runc update`: the
/// translation CreateContainer uses, without device rules (an update must
/// not change which devices a container may use).
pub fn linux_resources(
    resources: &cri::LinuxContainerResources,
) -> Result<LinuxResources, SpecError> {
    resource_limits(Some(resources))
}

fn resource_limits(
    requested: Option<&cri::LinuxContainerResources>,
) -> Result<LinuxResources, SpecError> {
    let mut resources = LinuxResources::default();
    let Some(r) = requested else {
        return Ok(resources);
    };

    let mut cpu = LinuxCpu::default();
    if r.cpu_period != 0 {
        cpu.set_period(Some(non_negative(r.cpu_period, "cpu_period")?));
    }
    if r.cpu_quota != 0 {
        cpu.set_quota(Some(r.cpu_quota));
    }
    if r.cpu_shares != 0 {
        cpu.set_shares(Some(non_negative(r.cpu_shares, "cpu_shares")?));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.set_cpus(Some(r.cpuset_cpus.clone()));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.set_mems(Some(r.cpuset_mems.clone()));
    }
    if cpu != LinuxCpu::default() {
        resources.set_cpu(Some(cpu));
    }

    let mut memory = LinuxMemory::default();
    if r.memory_limit_in_bytes != 0 {
        memory.set_limit(Some(r.memory_limit_in_bytes));
        // Without a swap limit, memory+swap equals memory: no swapping.
        if r.memory_swap_limit_in_bytes == 0 && swap_accounting() {
            memory.set_swap(Some(r.memory_limit_in_bytes));
        }
    }
    if r.memory_swap_limit_in_bytes != 0 && swap_accounting() {
        memory.set_swap(Some(r.memory_swap_limit_in_bytes));
    }
    if memory != LinuxMemory::default() {
        resources.set_memory(Some(memory));
    }

    if !r.hugepage_limits.is_empty() {
        if hugetlb_controller() {
            let limits = r
                .hugepage_limits
                .iter()
                .map(|h| {
                    let limit = i64::try_from(h.limit).map_err(|_| {
                        invalid(format!(
                            "hugepage limit {} for {} is too large",
                            h.limit, h.page_size
                        ))
                    })?;
                    let mut l = LinuxHugepageLimit::default();
                    l.set_page_size(h.page_size.clone());
                    l.set_limit(limit);
                    Ok(l)
                })
                .collect::<Result<Vec<_>, SpecError>>()?;
            resources.set_hugepage_limits(Some(limits));
        } else {
            // containerd's default (tolerate_missing_hugetlb_controller).
            tracing::warn!("hugepage limits requested but the hugetlb cgroup controller is absent; ignoring them");
        }
    }
    if !r.unified.is_empty() {
        resources.set_unified(Some(r.unified.clone()));
    }
    Ok(resources)
}

fn non_negative(value: i64, field: &str) -> Result<u64, SpecError> {
    u64::try_from(value).map_err(|_| invalid(format!("{field} {value} is negative")))
}

fn cgroup_v2() -> bool {
    static V2: OnceLock<bool> = OnceLock::new();
    *V2.get_or_init(|| Path::new("/sys/fs/cgroup/cgroup.controllers").exists())
}

/// Whether memory+swap can be limited: runc fails on a swap limit the
/// kernel does not account.
fn swap_accounting() -> bool {
    static SWAP: OnceLock<bool> = OnceLock::new();
    *SWAP.get_or_init(|| {
        if !cgroup_v2() {
            return Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists();
        }
        // memory.swap.max exists in every non-root cgroup with swap
        // accounting; the daemon's own cgroup is one to look at.
        fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))
            })
            .is_some_and(|own| {
                Path::new("/sys/fs/cgroup")
                    .join(own.trim_start_matches('/'))
                    .join("memory.swap.max")
                    .exists()
            })
    })
}

fn hugetlb_controller() -> bool {
    static HUGETLB: OnceLock<bool> = OnceLock::new();
    *HUGETLB.get_or_init(|| {
        if cgroup_v2() {
            fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
                .is_ok_and(|c| c.split_whitespace().any(|n| n == "hugetlb"))
        } else {
            Path::new("/sys/fs/cgroup/hugetlb").is_dir()
        }
    })
}

// ---------------------------------------------------------------------------
// Annotations

fn pod_annotations(config: &cri::PodSandboxConfig, sandbox_id: &str) -> HashMap<String, String> {
    let metadata = config.metadata.clone().unwrap_or_default();
    HashMap::from([
        (ANNOTATION_SANDBOX_ID.to_string(), sandbox_id.to_string()),
        (ANNOTATION_SANDBOX_NAME.to_string(), metadata.name),
        (ANNOTATION_SANDBOX_NAMESPACE.to_string(), metadata.namespace),
        (ANNOTATION_SANDBOX_UID.to_string(), metadata.uid),
    ])
}

/// The pod's own annotations, then the CRI ones (which win), and the pod's
/// resources as containerd records them: informational, for runtimes (VM
/// based ones) that size the pod from them. The pause itself is not limited.
fn sandbox_annotations(
    input: &SandboxSpecInput,
    linux_config: &cri::LinuxPodSandboxConfig,
) -> HashMap<String, String> {
    let mut annotations = input.config.annotations.clone();
    annotations.extend(pod_annotations(input.config, input.id));
    annotations.insert(
        ANNOTATION_CONTAINER_TYPE.to_string(),
        CONTAINER_TYPE_SANDBOX.to_string(),
    );
    annotations.insert(
        ANNOTATION_SANDBOX_LOG_DIRECTORY.to_string(),
        input.config.log_directory.clone(),
    );
    if let Some(r) = &linux_config.resources {
        annotations.extend([
            (
                ANNOTATION_SANDBOX_CPU_PERIOD.to_string(),
                r.cpu_period.to_string(),
            ),
            (
                ANNOTATION_SANDBOX_CPU_QUOTA.to_string(),
                r.cpu_quota.to_string(),
            ),
            (
                ANNOTATION_SANDBOX_CPU_SHARES.to_string(),
                r.cpu_shares.to_string(),
            ),
            (
                ANNOTATION_SANDBOX_MEMORY.to_string(),
                r.memory_limit_in_bytes.to_string(),
            ),
        ]);
    }
    annotations
}

fn container_annotations(input: &ContainerSpecInput) -> HashMap<String, String> {
    let mut annotations = pod_annotations(input.sandbox, input.sandbox_id);
    let image = input.config.image.clone().unwrap_or_default();
    let image_name = if image.user_specified_image.is_empty() {
        image.image
    } else {
        image.user_specified_image
    };
    let name = input
        .config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    annotations.extend([
        (
            ANNOTATION_CONTAINER_TYPE.to_string(),
            CONTAINER_TYPE_CONTAINER.to_string(),
        ),
        (ANNOTATION_CONTAINER_NAME.to_string(), name),
        (ANNOTATION_IMAGE_NAME.to_string(), image_name),
    ]);
    annotations
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    use cri::security_profile::ProfileType;
    use cri::{MountPropagation, NamespaceMode};
    use tempfile::TempDir;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          www-data:x:33:33::/var/www:/bin/false\n\
                          # a comment\n\
                          app:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
                         www-data:x:33:\n\
                         appgroup:x:1001:\n\
                         staff:x:50:app,www-data\n\
                         audio:x:29:app\n\
                         app:x:1000:app\n";

    /// A pod's files and an image's layers in one temporary directory.
    struct Fixture {
        dir: TempDir,
        hostname: PathBuf,
        hosts: PathBuf,
        resolv_conf: PathBuf,
        shm: PathBuf,
        layers: Vec<PathBuf>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let file = |name: &str| {
                let path = dir.path().join(name);
                fs::write(&path, format!("{name}\n")).unwrap();
                path
            };
            let (hostname, hosts, resolv_conf) =
                (file("hostname"), file("hosts"), file("resolv.conf"));
            let shm = dir.path().join("shm");
            fs::create_dir(&shm).unwrap();
            Fixture {
                hostname,
                hosts,
                resolv_conf,
                shm,
                layers: Vec::new(),
                dir,
            }
        }

        /// An image whose single layer has PASSWD and GROUP.
        fn with_users() -> Self {
            let mut f = Fixture::new();
            f.layer(&[("etc/passwd", PASSWD), ("etc/group", GROUP)]);
            f
        }

        /// Adds a layer below the existing ones (layers are listed top first).
        fn layer(&mut self, files: &[(&str, &str)]) -> PathBuf {
            let layer = self.dir.path().join(format!("layer{}", self.layers.len()));
            fs::create_dir(&layer).unwrap();
            for (path, contents) in files {
                let path = layer.join(path);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(path, contents).unwrap();
            }
            self.layers.push(layer.clone());
            layer
        }

        fn dir(&self, name: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            fs::create_dir_all(&path).unwrap();
            path
        }

        fn input<'a>(
            &'a self,
            config: &'a cri::ContainerConfig,
            sandbox: &'a cri::PodSandboxConfig,
            image: &'a ImageConfig,
        ) -> ContainerSpecInput<'a> {
            ContainerSpecInput {
                id: "c1",
                sandbox_id: "pod1",
                config,
                sandbox,
                image,
                rootfs_layers: &self.layers,
                sandbox_pid: 4321,
                netns: None,
                hostname: &self.hostname,
                resolv_conf: &self.resolv_conf,
                hosts: &self.hosts,
                shm: Some(&self.shm),
                cgroups_path: "/kubepods/pod1/c1".into(),
            }
        }

        fn spec(&self, config: &cri::ContainerConfig) -> Result<Spec, SpecError> {
            self.spec_in(config, &pod_config(None))
        }

        fn spec_in(
            &self,
            config: &cri::ContainerConfig,
            sandbox: &cri::PodSandboxConfig,
        ) -> Result<Spec, SpecError> {
            container_spec(&self.input(config, sandbox, &ImageConfig::default()))
        }
    }

    fn strs(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn namespaces(
        network: NamespaceMode,
        pid: NamespaceMode,
        ipc: NamespaceMode,
    ) -> cri::NamespaceOption {
        cri::NamespaceOption {
            network: network as i32,
            pid: pid as i32,
            ipc: ipc as i32,
            ..Default::default()
        }
    }

    fn pod_config(ns: Option<cri::NamespaceOption>) -> cri::PodSandboxConfig {
        pod_config_with(cri::LinuxSandboxSecurityContext {
            namespace_options: ns,
            ..Default::default()
        })
    }

    fn pod_config_with(context: cri::LinuxSandboxSecurityContext) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "web-0".into(),
            log_directory: "/var/log/pods/web".into(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(context),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn privileged_pod() -> cri::PodSandboxConfig {
        pod_config_with(cri::LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        })
    }

    fn container_config() -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "sha256:abc".into(),
                ..Default::default()
            }),
            command: strs(&["top"]),
            ..Default::default()
        }
    }

    fn with_context(context: cri::LinuxContainerSecurityContext) -> cri::ContainerConfig {
        with_linux(cri::LinuxContainerConfig {
            security_context: Some(context),
            resources: None,
        })
    }

    fn with_linux(linux: cri::LinuxContainerConfig) -> cri::ContainerConfig {
        cri::ContainerConfig {
            linux: Some(linux),
            ..container_config()
        }
    }

    fn with_mounts(mounts: Vec<cri::Mount>) -> cri::ContainerConfig {
        cri::ContainerConfig {
            mounts,
            ..container_config()
        }
    }

    fn cri_mount(container_path: &str, host_path: &Path) -> cri::Mount {
        cri::Mount {
            container_path: container_path.into(),
            host_path: host_path.to_string_lossy().into_owned(),
            ..Default::default()
        }
    }

    fn profile(kind: ProfileType, localhost_ref: &str) -> Option<cri::SecurityProfile> {
        Some(cri::SecurityProfile {
            profile_type: kind as i32,
            localhost_ref: localhost_ref.into(),
        })
    }

    fn is_invalid(result: Result<Spec, SpecError>, needle: &str) -> bool {
        match result {
            Err(SpecError::InvalidArgument(message)) => message.contains(needle),
            _ => false,
        }
    }

    fn process(spec: &Spec) -> &Process {
        spec.process().as_ref().unwrap()
    }

    fn linux(spec: &Spec) -> &Linux {
        spec.linux().as_ref().unwrap()
    }

    fn mount_at<'a>(spec: &'a Spec, destination: &str) -> Vec<&'a Mount> {
        spec.mounts()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|m| m.destination() == Path::new(destination))
            .collect()
    }

    fn options(m: &Mount) -> Vec<String> {
        m.options().clone().unwrap_or_default()
    }

    fn destinations(spec: &Spec) -> Vec<String> {
        spec.mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.destination().to_string_lossy().into_owned())
            .collect()
    }

    /// The namespaces a spec lists, except cgroup (host dependent, checked apart).
    fn namespace_list(spec: &Spec) -> Vec<(LinuxNamespaceType, Option<PathBuf>)> {
        linux(spec)
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Cgroup)
            .map(|n| (n.typ(), n.path().clone()))
            .collect()
    }

    fn caps(items: &[Capability]) -> Capabilities {
        items.iter().copied().collect()
    }

    // --- process ---------------------------------------------------------

    #[test]
    fn process_args_follow_containerds_rule() {
        let image = ImageConfig {
            entrypoint: strs(&["/entry"]),
            cmd: strs(&["image-cmd"]),
            ..Default::default()
        };
        let cases: [(&[&str], &[&str], &[&str]); 4] = [
            (&["/cmd"], &["arg"], &["/cmd", "arg"]),
            (&["/cmd"], &[], &["/cmd"]),
            (&[], &["arg"], &["/entry", "arg"]),
            (&[], &[], &["/entry", "image-cmd"]),
        ];
        let f = Fixture::new();
        let pod = pod_config(None);
        for (command, args, want) in cases {
            let config = cri::ContainerConfig {
                command: strs(command),
                args: strs(args),
                ..container_config()
            };
            let spec = container_spec(&f.input(&config, &pod, &image)).unwrap();
            assert_eq!(
                process(&spec).args().as_ref().unwrap(),
                &strs(want),
                "command {command:?} args {args:?}"
            );
        }
    }

    #[test]
    fn an_empty_entrypoint_resets_it_and_no_command_at_all_is_invalid() {
        let reset = ImageConfig {
            entrypoint: strs(&[""]),
            cmd: strs(&["/bin/app"]),
            ..Default::default()
        };
        let none = cri::ContainerConfig {
            command: vec![],
            ..container_config()
        };
        assert_eq!(process_args(&none, &reset).unwrap(), strs(&["/bin/app"]));

        let f = Fixture::new();
        let pod = pod_config(None);
        let result = container_spec(&f.input(&none, &pod, &ImageConfig::default()));
        assert!(is_invalid(result, "no command"));
    }

    #[test]
    fn env_is_path_term_hostname_then_image_then_request() {
        let image = ImageConfig {
            env: strs(&["PATH=/image/bin", "A=image", "B=image"]),
            ..Default::default()
        };
        let config = cri::ContainerConfig {
            tty: true,
            envs: vec![
                cri::KeyValue {
                    key: "A".into(),
                    value: "cri".into(),
                },
                cri::KeyValue {
                    key: "C".into(),
                    value: "x=y".into(),
                },
            ],
            ..container_config()
        };
        let f = Fixture::new();
        let pod = pod_config(None);
        let spec = container_spec(&f.input(&config, &pod, &image)).unwrap();
        assert_eq!(
            process(&spec).env().as_ref().unwrap(),
            &strs(&[
                "PATH=/image/bin",
                "TERM=xterm",
                "HOSTNAME=web-0",
                "A=cri",
                "B=image",
                "C=x=y"
            ])
        );
        assert_eq!(process(&spec).terminal(), Some(true));

        let mut env = strs(&["A=1", "B=2"]);
        set_env(&mut env, "A");
        assert_eq!(env, strs(&["B=2"]), "a bare name unsets");
    }

    #[test]
    fn hostname_env_falls_back_to_the_hosts_name() {
        let f = Fixture::new();
        let mut pod = pod_config(None);
        pod.hostname.clear();
        let spec = f.spec_in(&container_config(), &pod).unwrap();
        let want = format!("HOSTNAME={}", host_hostname().unwrap());
        assert!(process(&spec).env().as_ref().unwrap().contains(&want));
    }

    #[test]
    fn working_dir_is_the_requests_then_the_images_then_root() {
        let cases = [
            ("", "", "/"),
            ("", "/img", "/img"),
            ("/cri", "/img", "/cri"),
        ];
        let f = Fixture::new();
        let pod = pod_config(None);
        for (cri_dir, image_dir, want) in cases {
            let config = cri::ContainerConfig {
                working_dir: cri_dir.into(),
                ..container_config()
            };
            let image = ImageConfig {
                working_dir: image_dir.into(),
                ..Default::default()
            };
            let spec = container_spec(&f.input(&config, &pod, &image)).unwrap();
            assert_eq!(process(&spec).cwd(), Path::new(want));
        }
        let relative = cri::ContainerConfig {
            working_dir: "rel".into(),
            ..container_config()
        };
        assert!(is_invalid(f.spec(&relative), "rel"));
    }

    #[test]
    fn root_is_the_bundle_rootfs_readonly_on_request() {
        let f = Fixture::new();
        let spec = f.spec(&container_config()).unwrap();
        let root = spec.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("rootfs"));
        assert_eq!(root.readonly(), Some(false));

        let readonly = with_context(cri::LinuxContainerSecurityContext {
            readonly_rootfs: true,
            ..Default::default()
        });
        let spec = f.spec(&readonly).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        for file in ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"] {
            assert!(
                options(mount_at(&spec, file)[0]).contains(&"ro".to_string()),
                "{file}"
            );
        }
        assert!(options(mount_at(&spec, "/dev/shm")[0]).contains(&"rw".to_string()));
    }

    // --- users -----------------------------------------------------------

    fn user_of(
        f: &Fixture,
        context: cri::LinuxContainerSecurityContext,
        image_user: &str,
    ) -> Result<(u32, u32, Vec<u32>), SpecError> {
        let config = with_context(context);
        let image = ImageConfig {
            user: image_user.into(),
            ..Default::default()
        };
        let pod = pod_config(None);
        let spec = container_spec(&f.input(&config, &pod, &image))?;
        let user = process(&spec).user().clone();
        Ok((
            user.uid(),
            user.gid(),
            user.additional_gids().clone().unwrap(),
        ))
    }

    fn uid(v: i64) -> Option<cri::Int64Value> {
        Some(cri::Int64Value { value: v })
    }

    #[test]
    fn users_resolve_through_the_images_passwd_and_group() {
        type Case = (
            cri::LinuxContainerSecurityContext,
            &'static str,
            (u32, u32, Vec<u32>),
        );
        let context = cri::LinuxContainerSecurityContext::default;
        let cases: Vec<Case> = vec![
            // uid in passwd: its gid, and the groups listing "app" but the one named "app".
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(1000),
                    ..context()
                },
                "",
                (1000, 1001, vec![29, 50, 1001]),
            ),
            // uid not in passwd: gid 0.
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(4242),
                    ..context()
                },
                "",
                (4242, 0, vec![0]),
            ),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_username: "www-data".into(),
                    ..context()
                },
                "",
                (33, 33, vec![33, 50]),
            ),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(1000),
                    run_as_group: uid(2000),
                    ..context()
                },
                "",
                (1000, 2000, vec![29, 50, 2000]),
            ),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_username: "app".into(),
                    run_as_group: uid(7),
                    ..context()
                },
                "",
                (1000, 7, vec![7, 29, 50]),
            ),
            // The request wins over the image's USER.
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(33),
                    ..context()
                },
                "app",
                (33, 33, vec![33, 50]),
            ),
            (context(), "www-data", (33, 33, vec![33, 50])),
            (context(), "app:staff", (1000, 50, vec![29, 50])),
            (context(), "33:29", (33, 29, vec![29, 50])),
            (context(), "1000", (1000, 1001, vec![29, 50, 1001])),
            (context(), "", (0, 0, vec![0])),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(1000),
                    supplemental_groups: vec![5678, 1234],
                    ..context()
                },
                "",
                (1000, 1001, vec![29, 50, 1001, 1234, 5678]),
            ),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(1000),
                    supplemental_groups: vec![1234],
                    supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
                    ..context()
                },
                "",
                (1000, 1001, vec![1001, 1234]),
            ),
        ];
        let f = Fixture::with_users();
        for (context, image_user, want) in cases {
            let shown = format!("{context:?} image user {image_user:?}");
            assert_eq!(user_of(&f, context, image_user).unwrap(), want, "{shown}");
        }
    }

    #[test]
    fn bad_users_are_invalid_arguments_naming_them() {
        let context = cri::LinuxContainerSecurityContext::default;
        let cases: Vec<(cri::LinuxContainerSecurityContext, &str, &str)> = vec![
            (
                cri::LinuxContainerSecurityContext {
                    run_as_username: "nobody-here".into(),
                    ..context()
                },
                "",
                "nobody-here",
            ),
            (context(), "ghost", "ghost"),
            (context(), "app:nogroup", "nogroup"),
            (context(), "a:b:c", "a:b:c"),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(-1),
                    ..context()
                },
                "",
                "-1",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(1000),
                    supplemental_groups: vec![-5],
                    ..context()
                },
                "",
                "-5",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_user: uid(1000),
                    supplemental_groups_policy: 9,
                    ..context()
                },
                "",
                "supplemental_groups_policy",
            ),
            // critest: RunAsGroup without RunAsUser must fail, even when the image names a user.
            (
                cri::LinuxContainerSecurityContext {
                    run_as_group: uid(1002),
                    ..context()
                },
                "",
                "run_as_group",
            ),
            (
                cri::LinuxContainerSecurityContext {
                    run_as_group: uid(1002),
                    ..context()
                },
                "app",
                "run_as_group",
            ),
        ];
        let f = Fixture::with_users();
        for (context, image_user, needle) in cases {
            let shown = format!("{context:?} image user {image_user:?}");
            match user_of(&f, context, image_user) {
                Err(SpecError::InvalidArgument(m)) => assert!(m.contains(needle), "{shown}: {m}"),
                other => panic!("{shown}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_image_without_passwd_still_runs_numeric_users() {
        let f = Fixture::new();
        let context = cri::LinuxContainerSecurityContext {
            run_as_user: uid(1234),
            ..Default::default()
        };
        assert_eq!(user_of(&f, context, "").unwrap(), (1234, 0, vec![0]));
        let named = cri::LinuxContainerSecurityContext {
            run_as_username: "nobody".into(),
            ..Default::default()
        };
        assert!(matches!(
            user_of(&f, named, ""),
            Err(SpecError::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_passwd_symlink_out_of_the_image_is_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        let host_passwd = outside.path().join("passwd");
        fs::write(&host_passwd, "evil:x:4242:4242::/:/bin/sh\n").unwrap();
        let targets = [
            host_passwd.to_string_lossy().into_owned(),
            format!("../../../../../../../..{}", host_passwd.display()),
        ];
        for target in targets {
            let mut f = Fixture::new();
            let layer = f.layer(&[("etc/group", GROUP)]);
            symlink(&target, layer.join("etc/passwd")).unwrap();
            let view = LayerView { layers: &f.layers };
            assert_eq!(view.read("/etc/passwd").unwrap(), None, "{target}");
            let context = cri::LinuxContainerSecurityContext {
                run_as_username: "evil".into(),
                ..Default::default()
            };
            assert!(
                matches!(user_of(&f, context, ""), Err(SpecError::InvalidArgument(_))),
                "{target}"
            );
        }
    }

    #[test]
    fn symlinks_resolve_inside_the_image_across_layers() {
        let mut f = Fixture::new();
        let top = f.layer(&[]);
        fs::create_dir(top.join("etc")).unwrap();
        symlink("/usr/lib/passwd", top.join("etc/passwd")).unwrap();
        symlink("../usr/lib/group", top.join("etc/group")).unwrap();
        f.layer(&[("usr/lib/passwd", PASSWD), ("usr/lib/group", GROUP)]);
        let view = LayerView { layers: &f.layers };
        assert_eq!(view.read("/etc/passwd").unwrap().as_deref(), Some(PASSWD));
        assert_eq!(view.read("/etc/./group").unwrap().as_deref(), Some(GROUP));
        let context = cri::LinuxContainerSecurityContext {
            run_as_username: "app".into(),
            ..Default::default()
        };
        assert_eq!(
            user_of(&f, context, "").unwrap(),
            (1000, 1001, vec![29, 50, 1001])
        );
    }

    #[test]
    fn upper_layers_whiteouts_and_opaque_dirs_hide_lower_files() {
        let mut f = Fixture::new();
        let top = f.layer(&[("etc/hostname", "top")]);
        nix::sys::stat::mknod(
            &top.join("etc/group"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
        f.layer(&[
            ("etc/hostname", "bottom"),
            ("etc/passwd", PASSWD),
            ("etc/group", GROUP),
        ]);
        let view = LayerView { layers: &f.layers };
        assert_eq!(view.read("/etc/hostname").unwrap().as_deref(), Some("top"));
        assert_eq!(view.read("/etc/passwd").unwrap().as_deref(), Some(PASSWD));
        assert_eq!(view.read("/etc/group").unwrap(), None, "whiteout");

        let mut opaque = Fixture::new();
        let top = opaque.layer(&[("etc/hostname", "top")]);
        let etc = CString::new(top.join("etc").as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings and a one-byte value that outlive the call.
        let set = unsafe {
            libc::lsetxattr(
                etc.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(set, 0, "{}", io::Error::last_os_error());
        opaque.layer(&[("etc/passwd", PASSWD)]);
        let view = LayerView {
            layers: &opaque.layers,
        };
        assert_eq!(view.read("/etc/passwd").unwrap(), None, "opaque directory");
        assert_eq!(view.read("/etc/hostname").unwrap().as_deref(), Some("top"));

        let mut file_over_dir = Fixture::new();
        file_over_dir.layer(&[("etc", "not a directory")]);
        file_over_dir.layer(&[("etc/passwd", PASSWD)]);
        let view = LayerView {
            layers: &file_over_dir.layers,
        };
        assert_eq!(
            view.read("/etc/passwd").unwrap(),
            None,
            "file over a directory"
        );
    }

    // --- capabilities ----------------------------------------------------

    fn capabilities_of(
        add: &[&str],
        drop: &[&str],
        privileged: bool,
    ) -> Result<Capabilities, SpecError> {
        container_capabilities(&cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: strs(add),
                drop_capabilities: strs(drop),
                ..Default::default()
            }),
            privileged,
            ..Default::default()
        })
    }

    #[test]
    fn capabilities_add_and_drop_with_all_semantics() {
        use Capability::*;
        let default = caps(&DEFAULT_CAPABILITIES);
        let all = kernel_capabilities();
        let last = fs::read_to_string("/proc/sys/kernel/cap_last_cap").unwrap();
        assert_eq!(all.len(), last.trim().parse::<usize>().unwrap() + 1);

        let mut added = default.clone();
        added.extend([NetAdmin, SysTime]);
        added.remove(&NetRaw);
        added.remove(&Mknod);
        let mut all_but_chown = all.clone();
        all_but_chown.remove(&Chown);

        let cases: Vec<(&[&str], &[&str], bool, Capabilities)> = vec![
            (&[], &[], false, default.clone()),
            (
                &["NET_ADMIN", "cap_sys_time"],
                &["CAP_NET_RAW", "mknod"],
                false,
                added,
            ),
            (&["ALL"], &["CHOWN"], false, all_but_chown),
            (
                &["NET_BIND_SERVICE"],
                &["all"],
                false,
                caps(&[NetBindService]),
            ),
            (&[], &["ALL"], false, caps(&[])),
            (&["all"], &[], false, all.clone()),
            (&[], &["ALL"], true, all.clone()),
        ];
        for (add, drop, privileged, want) in cases {
            assert_eq!(
                capabilities_of(add, drop, privileged).unwrap(),
                want,
                "add {add:?} drop {drop:?} privileged {privileged}"
            );
        }
        assert!(
            matches!(capabilities_of(&["NOT_A_CAP"], &[], false), Err(SpecError::InvalidArgument(m)) if m.contains("NOT_A_CAP"))
        );
    }

    #[test]
    fn every_kernel_capability_round_trips_through_its_name() {
        for cap in KERNEL_CAPABILITIES {
            assert_eq!(parse_capability(&format!("CAP_{cap}")).unwrap(), cap);
            assert_eq!(
                parse_capability(&cap.to_string().to_lowercase()).unwrap(),
                cap
            );
        }
    }

    #[test]
    fn the_spec_grants_bounding_effective_permitted_only() {
        let f = Fixture::new();
        let config = with_context(cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: strs(&["SYS_ADMIN"]),
                ..Default::default()
            }),
            ..Default::default()
        });
        let spec = f.spec(&config).unwrap();
        let sets = process(&spec).capabilities().clone().unwrap();
        let mut want = caps(&DEFAULT_CAPABILITIES);
        want.insert(Capability::SysAdmin);
        assert_eq!(sets.bounding().as_ref(), Some(&want));
        assert_eq!(sets.effective().as_ref(), Some(&want));
        assert_eq!(sets.permitted().as_ref(), Some(&want));
        assert_eq!(sets.inheritable(), &None);
        assert_eq!(sets.ambient(), &None);
    }

    #[test]
    fn no_new_privileges_follows_the_request() {
        let f = Fixture::new();
        for nnp in [true, false] {
            let config = with_context(cri::LinuxContainerSecurityContext {
                no_new_privs: nnp,
                ..Default::default()
            });
            assert_eq!(
                process(&f.spec(&config).unwrap()).no_new_privileges(),
                Some(nnp)
            );
        }
    }

    #[test]
    fn privileged_containers_get_everything_and_need_a_privileged_pod() {
        let f = Fixture::new();
        let config = with_context(cri::LinuxContainerSecurityContext {
            privileged: true,
            seccomp: profile(ProfileType::RuntimeDefault, ""),
            masked_paths: strs(&["/proc/kcore"]),
            ..Default::default()
        });
        assert!(is_invalid(f.spec(&config), "privileged"));

        let spec = f.spec_in(&config, &privileged_pod()).unwrap();
        let linux = linux(&spec);
        assert_eq!(
            process(&spec)
                .capabilities()
                .as_ref()
                .unwrap()
                .bounding()
                .as_ref(),
            Some(&kernel_capabilities())
        );
        assert_eq!(linux.masked_paths(), &None);
        assert_eq!(linux.readonly_paths(), &None);
        assert_eq!(linux.seccomp(), &None);
        assert!(options(mount_at(&spec, "/sys")[0]).contains(&"rw".to_string()));
        assert!(options(mount_at(&spec, "/sys/fs/cgroup")[0]).contains(&"rw".to_string()));
        let devices = linux.devices().clone().unwrap();
        assert!(devices.iter().any(|d| d.path() == Path::new("/dev/null")));
        assert!(!devices
            .iter()
            .any(|d| d.path() == Path::new("/dev/console")));
        let rules = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .clone()
            .unwrap();
        assert_eq!(
            rules,
            vec![device_rule(
                true,
                Some(LinuxDeviceType::A),
                None,
                None,
                "rwm"
            )]
        );
        assert!(!linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Cgroup));
    }

    #[test]
    fn masked_and_readonly_paths_come_from_the_request_or_the_defaults() {
        let f = Fixture::new();
        let spec = f.spec(&container_config()).unwrap();
        assert_eq!(
            linux(&spec).masked_paths(),
            &Some(strs(&DEFAULT_MASKED_PATHS))
        );
        assert_eq!(
            linux(&spec).readonly_paths(),
            &Some(strs(&DEFAULT_READONLY_PATHS))
        );

        let config = with_context(cri::LinuxContainerSecurityContext {
            readonly_paths: strs(&["/tmp"]),
            ..Default::default()
        });
        let spec = f.spec(&config).unwrap();
        assert_eq!(linux(&spec).masked_paths(), &Some(vec![]));
        assert_eq!(linux(&spec).readonly_paths(), &Some(strs(&["/tmp"])));
    }

    // --- seccomp and AppArmor ----------------------------------------------

    #[allow(deprecated)]
    fn seccomp_context(
        field: Option<cri::SecurityProfile>,
        path: &str,
    ) -> cri::LinuxContainerSecurityContext {
        cri::LinuxContainerSecurityContext {
            seccomp: field,
            seccomp_profile_path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn seccomp_is_off_unless_asked_for() {
        let f = Fixture::new();
        let default_names = capability_names(&caps(&DEFAULT_CAPABILITIES));
        let runtime_default = Some(seccomp::runtime_default(&default_names));
        let cases = [
            (None, "", None),
            (profile(ProfileType::Unconfined, ""), "", None),
            (None, "unconfined", None),
            (
                profile(ProfileType::RuntimeDefault, ""),
                "",
                runtime_default.clone(),
            ),
            (None, "runtime/default", runtime_default.clone()),
            (None, "docker/default", runtime_default.clone()),
            // The new field wins over the deprecated path.
            (
                profile(ProfileType::Unconfined, ""),
                "runtime/default",
                None,
            ),
        ];
        for (field, path, want) in cases {
            let shown = format!("{field:?} {path:?}");
            let spec = f.spec(&with_context(seccomp_context(field, path))).unwrap();
            assert_eq!(linux(&spec).seccomp(), &want, "{shown}");
        }
        let sandbox = sandbox_spec(&SandboxSpecInput {
            id: "pod1",
            config: &pod_config(None),
            pause_args: strs(&["/pause"]),
            rootfs: Path::new("/"),
            netns: None,
            cgroups_path: String::new(),
            shm: None,
        })
        .unwrap();
        assert_eq!(linux(&sandbox).seccomp(), &None);
    }

    #[test]
    fn runtime_default_seccomp_gets_the_containers_capabilities() {
        let f = Fixture::new();
        let mut context = seccomp_context(profile(ProfileType::RuntimeDefault, ""), "");
        context.capabilities = Some(cri::Capability {
            add_capabilities: strs(&["SYS_ADMIN"]),
            ..Default::default()
        });
        let spec = f.spec(&with_context(context)).unwrap();
        let mut granted = caps(&DEFAULT_CAPABILITIES);
        granted.insert(Capability::SysAdmin);
        let names = capability_names(&granted);
        assert!(names.contains(&"CAP_SYS_ADMIN".to_string()));
        assert_eq!(
            linux(&spec).seccomp(),
            &Some(seccomp::runtime_default(&names))
        );
    }

    #[test]
    fn localhost_seccomp_needs_an_absolute_path_and_privileged_ignores_it() {
        let f = Fixture::new();
        let profile_file = f.dir.path().join("block-chmod.json");
        fs::write(
            &profile_file,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chmod"],"action":"SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        let absolute = profile_file.to_string_lossy().into_owned();

        for (field, path) in [
            (profile(ProfileType::Localhost, "relative.json"), ""),
            (
                profile(ProfileType::Localhost, "localhost/relative.json"),
                "",
            ),
            (None, "localhost/relative.json"),
        ] {
            let shown = format!("{field:?} {path:?}");
            let result = f.spec(&with_context(seccomp_context(field, path)));
            assert!(is_invalid(result, "absolute"), "{shown}");
        }
        // The deprecated path needs its localhost/ prefix.
        assert!(is_invalid(
            f.spec(&with_context(seccomp_context(None, &absolute))),
            &absolute
        ));
        // localhost_ref only goes with Localhost.
        let stray = profile(ProfileType::RuntimeDefault, &absolute);
        assert!(is_invalid(
            f.spec(&with_context(seccomp_context(stray, ""))),
            "localhost_ref"
        ));

        let expected = seccomp::localhost(&profile_file);
        for (field, path) in [
            (profile(ProfileType::Localhost, &absolute), String::new()),
            (
                profile(ProfileType::Localhost, &format!("localhost/{absolute}")),
                String::new(),
            ),
            (None, format!("localhost/{absolute}")),
        ] {
            let result = f.spec(&with_context(seccomp_context(field, &path)));
            match &expected {
                Ok(want) => assert_eq!(linux(&result.unwrap()).seccomp(), &Some(want.clone())),
                Err(_) => assert!(matches!(result, Err(SpecError::Seccomp(_)))),
            }
        }

        let mut privileged = seccomp_context(profile(ProfileType::Localhost, "relative.json"), "");
        privileged.privileged = true;
        let spec = f
            .spec_in(&with_context(privileged), &privileged_pod())
            .unwrap();
        assert_eq!(linux(&spec).seccomp(), &None);
    }

    #[test]
    fn apparmor_profiles_apply_only_when_apparmor_can_enforce_them() {
        let local = |name: &str| Some(Profile::Localhost(name.into()));
        // AppArmor off: nothing applies, a named profile is refused.
        assert_eq!(choose_apparmor(None, false, None).unwrap(), None);
        assert_eq!(
            choose_apparmor(Some(Profile::RuntimeDefault), false, None).unwrap(),
            None
        );
        assert!(choose_apparmor(local("deny-write"), false, None).is_err());

        let loaded = strs(&["docker-default", "deny-write"]);
        let on = Some(loaded.as_slice());
        assert_eq!(
            choose_apparmor(None, false, on).unwrap().as_deref(),
            Some("docker-default")
        );
        assert_eq!(
            choose_apparmor(Some(Profile::RuntimeDefault), true, on).unwrap(),
            None
        );
        assert_eq!(
            choose_apparmor(Some(Profile::Unconfined), false, on).unwrap(),
            None
        );
        assert_eq!(
            choose_apparmor(local("deny-write"), true, on)
                .unwrap()
                .as_deref(),
            Some("deny-write")
        );
        assert!(
            matches!(choose_apparmor(local("missing"), false, on), Err(SpecError::InvalidArgument(m)) if m.contains("missing"))
        );
        assert_eq!(
            choose_apparmor(None, false, Some(&[])).unwrap(),
            None,
            "no default profile loaded"
        );

        // Both spellings of a Localhost name lose their localhost/ prefix.
        let field = cri::SecurityProfile {
            profile_type: ProfileType::Localhost as i32,
            localhost_ref: "localhost/deny-write".into(),
        };
        assert_eq!(
            profile_from_field(&field, "apparmor").unwrap(),
            Profile::Localhost("deny-write".into())
        );
        assert_eq!(
            profile_from_path("localhost/deny-write", "apparmor_profile").unwrap(),
            Some(Profile::Localhost("deny-write".into()))
        );
        assert!(profile_from_path("deny-write", "apparmor_profile").is_err());
    }

    // --- mounts ----------------------------------------------------------

    #[test]
    fn mounts_are_system_then_pod_files_and_requests_parents_first() {
        let f = Fixture::new();
        let data = f.dir("data");
        let sub = f.dir("sub");
        let config = with_mounts(vec![
            cri_mount("/data/sub/", &sub),
            cri_mount("/data", &data),
        ]);
        let spec = f.spec(&config).unwrap();
        assert_eq!(
            destinations(&spec),
            strs(&[
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/data",
                "/data/sub",
                "/etc/hostname",
                "/etc/hosts",
                "/etc/resolv.conf",
                "/dev/shm",
            ])
        );
        let data_mount = mount_at(&spec, "/data")[0];
        assert_eq!(data_mount.typ().as_deref(), Some("bind"));
        assert_eq!(
            data_mount.source().as_deref(),
            Some(fs::canonicalize(&data).unwrap().as_path())
        );
        assert_eq!(options(data_mount), strs(&["rbind", "rprivate", "rw"]));
        assert_eq!(
            mount_at(&spec, "/etc/hosts")[0].source().as_deref(),
            Some(fs::canonicalize(&f.hosts).unwrap().as_path())
        );
        assert_eq!(
            mount_at(&spec, "/dev/shm")[0].source().as_deref(),
            Some(fs::canonicalize(&f.shm).unwrap().as_path())
        );
        assert!(options(mount_at(&spec, "/sys")[0]).contains(&"ro".to_string()));
        assert!(options(mount_at(&spec, "/sys/fs/cgroup")[0]).contains(&"ro".to_string()));
        assert_eq!(linux(&spec).rootfs_propagation(), &None);
    }

    #[test]
    fn requested_mounts_replace_pod_files_and_system_mounts() {
        let f = Fixture::new();
        let hosts = f.dir.path().join("my-hosts");
        fs::write(&hosts, "127.0.0.1 me\n").unwrap();
        let dev = f.dir("dev");
        let config = with_mounts(vec![
            cri_mount("/etc/hosts", &hosts),
            cri_mount("/dev", &dev),
        ]);
        let spec = f.spec(&config).unwrap();
        let etc_hosts = mount_at(&spec, "/etc/hosts");
        assert_eq!(etc_hosts.len(), 1);
        assert_eq!(
            etc_hosts[0].source().as_deref(),
            Some(fs::canonicalize(&hosts).unwrap().as_path())
        );
        let dests = destinations(&spec);
        assert!(!dests.contains(&"/dev/pts".to_string()));
        assert!(!dests.contains(&"/dev/mqueue".to_string()));
        assert_eq!(mount_at(&spec, "/dev").len(), 1);
        assert_eq!(mount_at(&spec, "/dev")[0].typ().as_deref(), Some("bind"));
        assert_eq!(mount_at(&spec, "/dev/shm").len(), 1, "the pod's shm stays");
    }

    #[test]
    fn missing_pod_files_are_skipped_and_missing_host_paths_refused() {
        let f = Fixture::new();
        fs::remove_file(&f.resolv_conf).unwrap();
        let spec = f.spec(&container_config()).unwrap();
        assert!(mount_at(&spec, "/etc/resolv.conf").is_empty());

        let missing = f.dir.path().join("nowhere");
        let result = f.spec(&with_mounts(vec![cri_mount("/data", &missing)]));
        assert!(is_invalid(result, &missing.display().to_string()));
        assert!(is_invalid(
            f.spec(&with_mounts(vec![cri_mount("data", &f.shm)])),
            "absolute"
        ));
    }

    #[test]
    fn a_symlinked_host_path_is_resolved() {
        let f = Fixture::new();
        let real = f.dir("real");
        let link = f.dir.path().join("link");
        symlink(&real, &link).unwrap();
        let spec = f
            .spec(&with_mounts(vec![cri_mount("/data", &link)]))
            .unwrap();
        assert_eq!(
            mount_at(&spec, "/data")[0].source().as_deref(),
            Some(fs::canonicalize(&real).unwrap().as_path())
        );
    }

    #[test]
    fn recursive_read_only_needs_readonly_and_private_propagation() {
        let f = Fixture::new();
        let data = f.dir("data");
        let cases = [
            (
                true,
                true,
                MountPropagation::PropagationPrivate,
                Some("rro"),
            ),
            (
                true,
                false,
                MountPropagation::PropagationPrivate,
                Some("ro"),
            ),
            (
                false,
                false,
                MountPropagation::PropagationPrivate,
                Some("rw"),
            ),
            (false, true, MountPropagation::PropagationPrivate, None),
            (
                true,
                true,
                MountPropagation::PropagationHostToContainer,
                None,
            ),
            (true, true, MountPropagation::PropagationBidirectional, None),
        ];
        for (readonly, recursive, propagation, want) in cases {
            let m = cri::Mount {
                readonly,
                recursive_read_only: recursive,
                propagation: propagation as i32,
                ..cri_mount("/data", &data)
            };
            let result = f.spec(&with_mounts(vec![m]));
            let shown = format!("readonly {readonly} rro {recursive} {propagation:?}");
            match want {
                Some(option) => {
                    let spec = result.unwrap();
                    assert_eq!(
                        options(mount_at(&spec, "/data")[0])
                            .last()
                            .map(String::as_str),
                        Some(option),
                        "{shown}"
                    );
                }
                None => assert!(is_invalid(result, "recursive read-only"), "{shown}"),
            }
        }
    }

    /// A tmpfs mounted for one test, unmounted when dropped.
    struct TestMount(PathBuf);

    impl TestMount {
        fn tmpfs(path: &Path) -> Self {
            use nix::mount::{mount, MsFlags};
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            TestMount(path.to_path_buf())
        }

        fn bind(source: &Path, target: &Path) -> Self {
            use nix::mount::{mount, MsFlags};
            mount(
                Some(source),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
            TestMount(target.to_path_buf())
        }

        fn propagation(&self, flag: nix::mount::MsFlags) {
            nix::mount::mount(None::<&str>, &self.0, None::<&str>, flag, None::<&str>).unwrap();
        }
    }

    impl Drop for TestMount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn propagation_maps_to_rprivate_rslave_rshared_and_needs_a_propagating_host_mount() {
        use nix::mount::MsFlags;
        let f = Fixture::new();
        let propagated = |host: &Path, propagation: MountPropagation| {
            let m = cri::Mount {
                propagation: propagation as i32,
                ..cri_mount("/data", host)
            };
            f.spec(&with_mounts(vec![m]))
        };

        // A private mount propagates nothing: only PRIVATE is accepted.
        let private = f.dir("private");
        let private_mount = TestMount::tmpfs(&private);
        private_mount.propagation(MsFlags::MS_PRIVATE);
        let spec = propagated(&private, MountPropagation::PropagationPrivate).unwrap();
        assert!(options(mount_at(&spec, "/data")[0]).contains(&"rprivate".to_string()));
        assert!(is_invalid(
            propagated(&private, MountPropagation::PropagationBidirectional),
            "shared"
        ));
        assert!(is_invalid(
            propagated(&private, MountPropagation::PropagationHostToContainer),
            "shared or slave"
        ));

        // A shared mount takes both directions.
        let shared = f.dir("shared");
        let shared_mount = TestMount::tmpfs(&shared);
        shared_mount.propagation(MsFlags::MS_SHARED);
        let inside = shared.join("volume");
        fs::create_dir(&inside).unwrap();
        let spec = propagated(&inside, MountPropagation::PropagationBidirectional).unwrap();
        assert!(options(mount_at(&spec, "/data")[0]).contains(&"rshared".to_string()));
        assert_eq!(
            linux(&spec).rootfs_propagation().as_deref(),
            Some("rshared")
        );
        let spec = propagated(&inside, MountPropagation::PropagationHostToContainer).unwrap();
        assert!(options(mount_at(&spec, "/data")[0]).contains(&"rslave".to_string()));
        assert_eq!(linux(&spec).rootfs_propagation().as_deref(), Some("rslave"));

        // A slave of it only receives.
        let slave = f.dir("slave");
        let slave_mount = TestMount::bind(&shared, &slave);
        slave_mount.propagation(MsFlags::MS_SLAVE);
        let spec = propagated(&slave, MountPropagation::PropagationHostToContainer).unwrap();
        assert!(options(mount_at(&spec, "/data")[0]).contains(&"rslave".to_string()));
        assert!(is_invalid(
            propagated(&slave, MountPropagation::PropagationBidirectional),
            "shared"
        ));
        drop(slave_mount);
        drop(shared_mount);
        drop(private_mount);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(
            clean_container_path("/a//b/./c/../d/").as_deref(),
            Some("/a/b/d")
        );
        assert_eq!(clean_container_path("a/b"), None);
    }

    // --- namespaces ------------------------------------------------------

    fn sandbox_input<'a>(
        config: &'a cri::PodSandboxConfig,
        netns: Option<&'a Path>,
    ) -> SandboxSpecInput<'a> {
        SandboxSpecInput {
            id: "pod1",
            config,
            pause_args: strs(&["/pause"]),
            rootfs: Path::new("/var/lib/corral/pause"),
            netns,
            cgroups_path: "/kubepods/pod1/pod1".into(),
            shm: None,
        }
    }

    #[test]
    fn sandbox_namespaces_are_new_unless_the_pod_uses_the_nodes() {
        use LinuxNamespaceType::*;
        use NamespaceMode::{Node, Pod};
        let netns = Path::new("/run/netns/cni-1");
        let cases = [
            (
                (Pod, Pod, Pod),
                vec![
                    (Mount, None),
                    (Pid, None),
                    (Ipc, None),
                    (Uts, None),
                    (Network, Some(netns.to_path_buf())),
                ],
                Some("web-0"),
            ),
            (
                (Node, Pod, Pod),
                vec![(Mount, None), (Pid, None), (Ipc, None)],
                None,
            ),
            (
                (Pod, Node, Pod),
                vec![
                    (Mount, None),
                    (Ipc, None),
                    (Uts, None),
                    (Network, Some(netns.to_path_buf())),
                ],
                Some("web-0"),
            ),
            (
                (Pod, Pod, Node),
                vec![
                    (Mount, None),
                    (Pid, None),
                    (Uts, None),
                    (Network, Some(netns.to_path_buf())),
                ],
                Some("web-0"),
            ),
        ];
        for ((network, pid, ipc), want, hostname) in cases {
            let config = pod_config(Some(namespaces(network, pid, ipc)));
            let spec = sandbox_spec(&sandbox_input(&config, Some(netns))).unwrap();
            assert_eq!(namespace_list(&spec), want, "{network:?} {pid:?} {ipc:?}");
            assert_eq!(spec.hostname().as_deref(), hostname);
        }
        let config = pod_config(None);
        let spec = sandbox_spec(&sandbox_input(&config, None)).unwrap();
        assert!(
            namespace_list(&spec).contains(&(Network, None)),
            "no pinned netns: a new one"
        );
    }

    #[test]
    fn containers_join_the_pods_namespaces_per_option() {
        use LinuxNamespaceType::*;
        use NamespaceMode::{Container, Node, Pod};
        let pause = |kind: &str| Some(PathBuf::from(format!("/proc/4321/ns/{kind}")));
        let pinned = PathBuf::from("/run/netns/cni-1");
        type Case = (
            (NamespaceMode, NamespaceMode, NamespaceMode),
            NamespaceMode,
            Option<PathBuf>,
            Vec<(LinuxNamespaceType, Option<PathBuf>)>,
        );
        let cases: Vec<Case> = vec![
            (
                (Pod, Pod, Pod),
                Pod,
                Some(pinned.clone()),
                vec![
                    (Mount, None),
                    (Network, Some(pinned.clone())),
                    (Uts, pause("uts")),
                    (Ipc, pause("ipc")),
                    (Pid, pause("pid")),
                ],
            ),
            (
                (Pod, Pod, Pod),
                Pod,
                None,
                vec![
                    (Mount, None),
                    (Network, pause("net")),
                    (Uts, pause("uts")),
                    (Ipc, pause("ipc")),
                    (Pid, pause("pid")),
                ],
            ),
            (
                (Pod, Container, Pod),
                Container,
                None,
                vec![
                    (Mount, None),
                    (Network, pause("net")),
                    (Uts, pause("uts")),
                    (Ipc, pause("ipc")),
                    (Pid, None),
                ],
            ),
            (
                (Pod, Node, Pod),
                Node,
                None,
                vec![
                    (Mount, None),
                    (Network, pause("net")),
                    (Uts, pause("uts")),
                    (Ipc, pause("ipc")),
                ],
            ),
            (
                (Pod, Node, Pod),
                Pod,
                None,
                vec![
                    (Mount, None),
                    (Network, pause("net")),
                    (Uts, pause("uts")),
                    (Ipc, pause("ipc")),
                ],
            ),
            (
                (Node, Pod, Pod),
                Pod,
                Some(pinned.clone()),
                vec![(Mount, None), (Ipc, pause("ipc")), (Pid, pause("pid"))],
            ),
            (
                (Pod, Pod, Node),
                Pod,
                None,
                vec![
                    (Mount, None),
                    (Network, pause("net")),
                    (Uts, pause("uts")),
                    (Pid, pause("pid")),
                ],
            ),
        ];
        let f = Fixture::new();
        for ((network, pod_pid, ipc), container_pid, netns, want) in cases {
            let pod = pod_config(Some(namespaces(network, pod_pid, ipc)));
            let config = with_context(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces(network, container_pid, ipc)),
                ..Default::default()
            });
            let image = ImageConfig::default();
            let mut input = f.input(&config, &pod, &image);
            input.netns = netns.as_deref();
            let spec = container_spec(&input).unwrap();
            assert_eq!(
                namespace_list(&spec),
                want,
                "pod {network:?} {pod_pid:?} {ipc:?}, container pid {container_pid:?}"
            );
            let cgroupns = linux(&spec)
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .any(|n| n.typ() == Cgroup);
            assert_eq!(cgroupns, cgroup_v2());
            assert_eq!(spec.hostname(), &None);
        }

        let target = with_context(cri::LinuxContainerSecurityContext {
            namespace_options: Some(namespaces(Pod, NamespaceMode::Target, Pod)),
            ..Default::default()
        });
        assert!(is_invalid(f.spec(&target), "TARGET"));
        let userns = with_context(cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                userns_options: Some(cri::UserNamespace {
                    mode: Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(is_invalid(f.spec(&userns), "user namespaces"));
    }

    // --- resources, sysctls, devices ---------------------------------------

    #[test]
    fn container_resources_carry_cpu_memory_hugepages_unified_and_oom() {
        let f = Fixture::new();
        let config = with_linux(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                cpuset_cpus: "0-1".into(),
                cpuset_mems: "0".into(),
                memory_limit_in_bytes: 64 << 20,
                memory_swap_limit_in_bytes: 128 << 20,
                oom_score_adj: 500,
                hugepage_limits: vec![cri::HugepageLimit {
                    page_size: "2MB".into(),
                    limit: 4 << 20,
                }],
                unified: HashMap::from([("memory.high".to_string(), "1000000".to_string())]),
            }),
            security_context: None,
        });
        let spec = f.spec(&config).unwrap();
        let resources = linux(&spec).resources().clone().unwrap();
        let cpu = resources.cpu().clone().unwrap();
        assert_eq!(
            (cpu.period(), cpu.quota(), cpu.shares()),
            (Some(100_000), Some(50_000), Some(512))
        );
        assert_eq!(
            (cpu.cpus().as_deref(), cpu.mems().as_deref()),
            (Some("0-1"), Some("0"))
        );
        let memory = resources.memory().unwrap();
        assert_eq!(memory.limit(), Some(64 << 20));
        assert_eq!(memory.swap(), swap_accounting().then_some(128 << 20));
        let hugepages = resources.hugepage_limits().clone();
        if hugetlb_controller() {
            let limit = &hugepages.unwrap()[0];
            assert_eq!(
                (limit.page_size().as_str(), limit.limit()),
                ("2MB", 4 << 20)
            );
        } else {
            assert_eq!(hugepages, None);
        }
        assert_eq!(
            resources.unified().as_ref().unwrap()["memory.high"],
            "1000000"
        );
        assert_eq!(process(&spec).oom_score_adj(), Some(500));
        assert_eq!(resources.devices().clone().unwrap(), default_device_rules());
    }

    #[test]
    fn memory_without_swap_limit_forbids_swap_and_bad_values_are_refused() {
        // UpdateContainerResources' translation: the same limits, no device rules.
        let resources = |r: cri::LinuxContainerResources| linux_resources(&r);
        let limited = resources(cri::LinuxContainerResources {
            memory_limit_in_bytes: 15 << 20,
            cpu_quota: 20_000,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(limited.memory().unwrap().limit(), Some(15 << 20));
        assert_eq!(
            limited.memory().unwrap().swap(),
            swap_accounting().then_some(15 << 20)
        );
        assert_eq!(limited.cpu().as_ref().unwrap().quota(), Some(20_000));
        assert_eq!(limited.devices(), &None);
        let none = resource_limits(None).unwrap();
        assert_eq!((none.cpu(), none.memory()), (&None, &None));
        assert!(resources(cri::LinuxContainerResources {
            cpu_shares: -1,
            ..Default::default()
        })
        .is_err());

        let f = Fixture::new();
        let bad_oom = with_linux(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                oom_score_adj: 1001,
                ..Default::default()
            }),
            security_context: None,
        });
        assert!(is_invalid(f.spec(&bad_oom), "oom_score_adj"));
        assert_eq!(
            process(&f.spec(&container_config()).unwrap()).oom_score_adj(),
            None
        );
    }

    #[test]
    fn the_sandbox_is_a_readonly_unlimited_pause_with_the_pods_settings() {
        let mut config = pod_config_with(cri::LinuxSandboxSecurityContext {
            run_as_user: uid(65535),
            run_as_group: uid(65534),
            supplemental_groups: vec![100],
            ..Default::default()
        });
        config.annotations = HashMap::from([
            ("team".to_string(), "a".to_string()),
            (ANNOTATION_SANDBOX_ID.to_string(), "spoofed".to_string()),
        ]);
        let linux_config = config.linux.as_mut().unwrap();
        linux_config.sysctls =
            HashMap::from([("kernel.shm_rmid_forced".to_string(), "1".to_string())]);
        linux_config.resources = Some(cri::LinuxContainerResources {
            cpu_shares: 1024,
            memory_limit_in_bytes: 1 << 30,
            ..Default::default()
        });
        let shm = tempfile::tempdir().unwrap();
        let mut input = sandbox_input(&config, None);
        input.shm = Some(shm.path());
        let spec = sandbox_spec(&input).unwrap();

        let root = spec.root().as_ref().unwrap();
        assert_eq!(
            (root.path().as_path(), root.readonly()),
            (Path::new("/var/lib/corral/pause"), Some(true))
        );
        let p = process(&spec);
        assert_eq!(p.args().as_ref().unwrap(), &strs(&["/pause"]));
        assert_eq!((p.user().uid(), p.user().gid()), (65535, 65534));
        assert_eq!(
            p.user().additional_gids().as_ref().unwrap(),
            &vec![100, 65534]
        );
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.oom_score_adj(), Some(-998));
        assert_eq!(p.rlimits(), &None);
        assert_eq!(
            p.capabilities().as_ref().unwrap().bounding().as_ref(),
            Some(&caps(&DEFAULT_CAPABILITIES))
        );

        let l = linux(&spec);
        let resources = l.resources().clone().unwrap();
        assert_eq!(resources.cpu().as_ref().unwrap().shares(), Some(2));
        assert_eq!(
            resources.memory(),
            &None,
            "the pause is not limited to the pod's total"
        );
        assert_eq!(l.sysctl().as_ref().unwrap()["kernel.shm_rmid_forced"], "1");
        assert_eq!(
            l.cgroups_path().as_deref(),
            Some(Path::new("/kubepods/pod1/pod1"))
        );
        assert_eq!(l.masked_paths(), &Some(strs(&DEFAULT_MASKED_PATHS)));

        let shm_mount = mount_at(&spec, "/dev/shm")[0];
        assert_eq!(shm_mount.source().as_deref(), Some(shm.path()));
        assert_eq!(
            options(shm_mount),
            strs(&["rbind", "ro", "nosuid", "nodev", "noexec"])
        );
        assert!(mount_at(&spec, "/sys/fs/cgroup").is_empty());

        let a = spec.annotations().clone().unwrap();
        assert_eq!(a["team"], "a");
        assert_eq!(a[ANNOTATION_SANDBOX_ID], "pod1");
        assert_eq!(a[ANNOTATION_CONTAINER_TYPE], "sandbox");
        assert_eq!(a[ANNOTATION_SANDBOX_NAME], "web");
        assert_eq!(a[ANNOTATION_SANDBOX_NAMESPACE], "default");
        assert_eq!(a[ANNOTATION_SANDBOX_UID], "uid-1");
        assert_eq!(a[ANNOTATION_SANDBOX_LOG_DIRECTORY], "/var/log/pods/web");
        assert_eq!(a[ANNOTATION_SANDBOX_CPU_SHARES], "1024");
        assert_eq!(a[ANNOTATION_SANDBOX_MEMORY], (1u64 << 30).to_string());

        let host_shm = sandbox_spec(&sandbox_input(&config, None)).unwrap();
        assert_eq!(
            mount_at(&host_shm, "/dev/shm")[0].source().as_deref(),
            Some(Path::new("/dev/shm"))
        );
    }

    #[test]
    fn sandbox_input_errors_are_invalid_arguments() {
        let config = pod_config(None);
        let mut input = sandbox_input(&config, None);
        input.pause_args.clear();
        assert!(is_invalid(sandbox_spec(&input), "command"));

        let group_only = pod_config_with(cri::LinuxSandboxSecurityContext {
            run_as_group: uid(5),
            ..Default::default()
        });
        assert!(is_invalid(
            sandbox_spec(&sandbox_input(&group_only, None)),
            "run_as_group"
        ));

        let bad_mode = pod_config(Some(cri::NamespaceOption {
            network: 17,
            ..Default::default()
        }));
        assert!(is_invalid(
            sandbox_spec(&sandbox_input(&bad_mode, None)),
            "network namespace mode"
        ));
    }

    #[test]
    fn sysctls_are_validated_against_the_pods_namespaces() {
        use NamespaceMode::{Node, Pod};
        let cases = [
            ("kernel.shm_rmid_forced", (Pod, Pod), true),
            ("fs.mqueue.msg_max", (Pod, Pod), true),
            ("net.ipv4.ip_forward", (Pod, Pod), true),
            ("net/ipv4/conf/eth0/forwarding", (Pod, Pod), true),
            ("net.ipv4.ip_forward", (Pod, Node), true),
            ("kernel.msgmax", (Node, Pod), true),
            ("net.ipv4.ip_forward", (Node, Pod), false),
            ("net/ipv4/ip_forward", (Node, Pod), false),
            ("kernel.hostname", (Node, Pod), false),
            ("kernel.domainname", (Pod, Pod), true),
            ("kernel.domainname", (Node, Pod), false),
            // Not in any namespace of a pod: the node's own.
            ("vm.swappiness", (Pod, Pod), false),
            ("kernel.pid_max", (Pod, Pod), false),
            ("fs.file-max", (Pod, Pod), false),
            ("kernel.shm_next_id", (Pod, Pod), false),
            // Namespaced, but the OCI hostname is where it belongs.
            ("kernel.hostname", (Pod, Pod), false),
            ("kernel.shm_rmid_forced", (Pod, Node), false),
            ("kernel.sem", (Pod, Node), false),
            ("fs.mqueue.msg_max", (Pod, Node), false),
            ("Kernel.Shm_rmid_forced", (Pod, Pod), false),
            ("kernel..shm", (Pod, Pod), false),
            ("kernel.shm rmid", (Pod, Pod), false),
            ("", (Pod, Pod), false),
        ];
        for (name, (network, ipc), ok) in cases {
            let mut config = pod_config(Some(namespaces(network, Pod, ipc)));
            config.linux.as_mut().unwrap().sysctls =
                HashMap::from([(name.to_string(), "1".to_string())]);
            let result = sandbox_spec(&sandbox_input(&config, None));
            match result {
                Ok(spec) => {
                    assert!(ok, "{name} {network:?} {ipc:?} was accepted");
                    assert_eq!(linux(&spec).sysctl().as_ref().unwrap()[name], "1");
                }
                Err(SpecError::InvalidArgument(m)) => {
                    assert!(!ok && m.contains(name), "{name}: {m}")
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
        let f = Fixture::new();
        let mut pod = pod_config(None);
        pod.linux.as_mut().unwrap().sysctls =
            HashMap::from([("kernel.shm_rmid_forced".to_string(), "1".to_string())]);
        let spec = f.spec_in(&container_config(), &pod).unwrap();
        assert_eq!(
            linux(&spec).sysctl(),
            &None,
            "containers see the pod's sysctls through its namespaces"
        );
    }

    #[test]
    fn requested_devices_are_added_with_their_cgroup_rule() {
        let f = Fixture::new();
        let device = |host: &str, permissions: &str| cri::Device {
            container_path: "/dev/mynull".into(),
            host_path: host.into(),
            permissions: permissions.into(),
        };
        let config = cri::ContainerConfig {
            devices: vec![device("/dev/null", "rw")],
            ..container_config()
        };
        let spec = f.spec(&config).unwrap();
        let devices = linux(&spec).devices().clone().unwrap();
        assert_eq!(devices.len(), 1);
        let null = &devices[0];
        assert_eq!(
            (
                null.path().as_path(),
                null.typ(),
                null.major(),
                null.minor()
            ),
            (Path::new("/dev/mynull"), LinuxDeviceType::C, 1, 3)
        );
        let rules = linux(&spec)
            .resources()
            .clone()
            .unwrap()
            .devices()
            .clone()
            .unwrap();
        assert_eq!(
            rules[0],
            device_rule(false, None, None, None, "rwm"),
            "deny all first"
        );
        assert_eq!(
            rules.last().unwrap(),
            &device_rule(true, Some(LinuxDeviceType::C), Some(1), Some(3), "rw")
        );

        let missing = f.dir.path().join("no-device");
        let cases = [
            (
                device(&missing.to_string_lossy(), "rwm"),
                missing.to_string_lossy().into_owned(),
            ),
            (
                device(&f.hosts.to_string_lossy(), "rwm"),
                "not a device".to_string(),
            ),
            (device("/dev/null", "rwx"), "rwx".to_string()),
        ];
        for (d, needle) in cases {
            let config = cri::ContainerConfig {
                devices: vec![d],
                ..container_config()
            };
            assert!(is_invalid(f.spec(&config), &needle), "{needle}");
        }
    }

    // --- annotations, exec, serialization -----------------------------------

    #[test]
    fn container_annotations_name_the_pod_container_and_image() {
        let f = Fixture::new();
        let spec = f.spec(&container_config()).unwrap();
        let a = spec.annotations().clone().unwrap();
        assert_eq!(a[ANNOTATION_CONTAINER_TYPE], "container");
        assert_eq!(a[ANNOTATION_SANDBOX_ID], "pod1");
        assert_eq!(a[ANNOTATION_SANDBOX_NAME], "web");
        assert_eq!(a[ANNOTATION_SANDBOX_NAMESPACE], "default");
        assert_eq!(a[ANNOTATION_CONTAINER_NAME], "app");
        assert_eq!(a[ANNOTATION_IMAGE_NAME], "sha256:abc");

        let named = cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: "sha256:abc".into(),
                user_specified_image: "busybox:1.36".into(),
                ..Default::default()
            }),
            ..container_config()
        };
        let spec = f.spec(&named).unwrap();
        assert_eq!(
            spec.annotations().as_ref().unwrap()[ANNOTATION_IMAGE_NAME],
            "busybox:1.36"
        );
    }

    #[test]
    fn an_exec_inherits_the_containers_process() {
        let f = Fixture::with_users();
        let config = with_context(cri::LinuxContainerSecurityContext {
            run_as_username: "app".into(),
            no_new_privs: true,
            ..Default::default()
        });
        let config = cri::ContainerConfig {
            working_dir: "/srv".into(),
            ..config
        };
        let spec = f.spec(&config).unwrap();
        let init = process(&spec);

        let exec = exec_process(&spec, &strs(&["echo", "hi"]), false).unwrap();
        assert_eq!(exec.args().as_ref().unwrap(), &strs(&["echo", "hi"]));
        assert_eq!(exec.terminal(), Some(false));
        assert_eq!(exec.user(), init.user());
        assert_eq!(exec.env(), init.env());
        assert_eq!(exec.cwd(), Path::new("/srv"));
        assert_eq!(exec.capabilities(), init.capabilities());
        assert_eq!(exec.apparmor_profile(), init.apparmor_profile());
        assert_eq!(exec.no_new_privileges(), Some(true));

        let tty = exec_process(&spec, &strs(&["sh"]), true).unwrap();
        assert_eq!(tty.terminal(), Some(true));
        let env = tty.env().clone().unwrap();
        assert_eq!(env.iter().filter(|e| e.starts_with("TERM=")).count(), 1);
        assert!(env.contains(&"TERM=xterm".to_string()));

        assert!(matches!(
            exec_process(&spec, &[], false),
            Err(SpecError::InvalidArgument(_))
        ));
    }

    #[test]
    fn specs_serialize_as_runtime_spec_json_and_back() {
        let f = Fixture::new();
        let container = f.spec(&container_config()).unwrap();
        let config = pod_config(None);
        let sandbox =
            sandbox_spec(&sandbox_input(&config, Some(Path::new("/run/netns/x")))).unwrap();
        for spec in [container, sandbox] {
            let json = serde_json::to_string(&spec).unwrap();
            assert!(!json.contains("youki"), "{json}");
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(value["ociVersion"], "1.0.2");
            assert!(value["process"]["user"]["uid"].is_u64());
            assert!(value["process"]["cwd"].is_string());
            assert!(value["root"]["path"].is_string());
            let kinds: Vec<&str> = value["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["type"].as_str().unwrap())
                .collect();
            assert!(kinds.contains(&"mount"), "{kinds:?}");
            let rule = &value["linux"]["resources"]["devices"][0];
            assert_eq!(
                (rule["allow"].as_bool(), rule["access"].as_str()),
                (Some(false), Some("rwm"))
            );
            let back: Spec = serde_json::from_str(&json).unwrap();
            assert_eq!(back, spec);
        }
    }

    /// A container runc knows about, deleted when dropped.
    struct RuncContainer {
        root: PathBuf,
        id: String,
    }

    impl Drop for RuncContainer {
        fn drop(&mut self) {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&self.root)
                .args(["delete", "-f", &self.id])
                .output();
        }
    }

    #[test]
    fn runc_runs_a_generated_spec_as_the_requested_user() {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let f = Fixture::new();
        let bundle = f.dir("bundle");
        let bin = bundle.join("rootfs/bin");
        fs::create_dir_all(&bin).unwrap();
        fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
        for applet in ["sh", "id"] {
            symlink("busybox", bin.join(applet)).unwrap();
        }

        use NamespaceMode::{Container, Node};
        let pod = pod_config(Some(namespaces(Node, Container, Node)));
        let config = cri::ContainerConfig {
            command: strs(&["/bin/sh", "-c", "id -u; id -G"]),
            ..with_context(cri::LinuxContainerSecurityContext {
                run_as_user: uid(1234),
                supplemental_groups: vec![555],
                namespace_options: Some(namespaces(Node, Container, Node)),
                ..Default::default()
            })
        };
        let id = format!(
            "corral-spec-test-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let image = ImageConfig::default();
        let mut input = f.input(&config, &pod, &image);
        input.id = &id;
        input.sandbox_pid = std::process::id();
        input.cgroups_path = format!("/{id}");
        let spec = container_spec(&input).unwrap();
        spec.save(bundle.join("config.json")).unwrap();

        let guard = RuncContainer {
            root: f.dir("runc-state"),
            id: id.clone(),
        };
        let output = Command::new("runc")
            .arg("--root")
            .arg(&guard.root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "runc: {}{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some("1234"));
        assert_eq!(lines.next(), Some("0 555"));
        drop(guard);
    }
}
