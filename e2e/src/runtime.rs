//! corral's runtime layer driven as the CRI front end drives it: plain Rust
//! calls into a [`TaskService`] over real shims, real runc and a busybox
//! rootfs that reaches each task as a bind mount, the way containerd passes
//! a snapshot.
//!
//! A [`Node`] is one test's node: the runtime's root and state directories,
//! the events socket, the daemon address shims derive their socket from, a
//! runc root, and the runtime handlers (corral's shim, Debian's
//! `containerd-shim-runc-v2`, and any fake shims the test writes). Every
//! `TaskService` a test builds over the same node sees the same disk, which
//! is what a daemon restart is.
//!
//! Shared by the runtime's end-to-end tests and its benchmark; everything
//! is registered with the test's [`Cleanup`].

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use corral_runtime::{
    handlers::{Handlers, RuntimeHandler},
    shim_manager::ShimManagerConfig,
    task_service::{CreateTask, ExecProcess, Mount, Stdio, TaskService, TaskServiceConfig},
};

use crate::{
    bin,
    bundle::Bundle,
    cleanup::{pid_alive, Cleanup},
    error::{Context, Error, Result},
    rootfs::BusyboxRootfs,
    runc::Runc,
    shim::{socket_path, PUBLISH_BINARY},
};

/// The handler name of corral's shim driving runc.
pub const CORRAL: &str = "corral";
/// The handler name of Debian's `containerd-shim-runc-v2` (containerd 1.6,
/// task API v2).
pub const RUNC_V2: &str = "runc-v2";
/// The runtime name of Debian's shim, found in `PATH`.
pub const RUNC_V2_RUNTIME: &str = "io.containerd.runc.v2";

/// One test's node: the runtime's directories and handlers.
pub struct Node {
    /// Work directories, `ROOT/NAMESPACE/ID`: kept across restarts.
    pub root: PathBuf,
    /// Bundles, `STATE/NAMESPACE/ID`.
    pub state: PathBuf,
    /// The events service, the shims' `TTRPC_ADDRESS`.
    pub events_socket: PathBuf,
    /// `-address`: corral's shim puts its socket in `s/` beside it.
    pub daemon_address: PathBuf,
    /// runc's `--root`; the shims keep each namespace in a subdirectory.
    pub runc_root: PathBuf,
    pub shim_dirs: Vec<PathBuf>,
    handlers: HashMap<String, RuntimeHandler>,
    /// What every task's rootfs mount binds.
    pub rootfs: BusyboxRootfs,
}

impl Node {
    /// A node in the test's directories, with the handlers [`CORRAL`] (also
    /// the default) and [`RUNC_V2`], both on this node's runc root.
    pub fn new(cleanup: &Cleanup) -> Result<Node> {
        let corral_dir = bin::shim()
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::Protocol("corral's shim has no directory".into()))?;
        let run = cleanup.run_dir();
        let mut node = Node {
            root: cleanup.work_dir().join("root"),
            state: run.join("state"),
            events_socket: run.join("events.sock"),
            daemon_address: run.join("corral.sock"),
            runc_root: run.join("runc"),
            shim_dirs: vec![corral_dir],
            handlers: HashMap::new(),
            rootfs: cleanup.busybox_rootfs("image")?,
        };
        node.add_handler("", corral_proto::SHIM_RUNTIME_NAME);
        node.add_handler(CORRAL, corral_proto::SHIM_RUNTIME_NAME);
        node.add_handler(RUNC_V2, RUNC_V2_RUNTIME);
        Ok(node)
    }

    /// Adds handler `name` running the shim of runtime `shim` with runc on
    /// this node's runc root.
    pub fn add_handler(&mut self, name: &str, shim: &str) {
        self.handlers.insert(
            name.to_string(),
            RuntimeHandler {
                shim: shim.to_string(),
                binary: "runc".to_string(),
                root: self.runc_root.clone(),
                systemd_cgroup: false,
            },
        );
    }

    /// Writes `script` as the shim binary `containerd-shim-<name>-v2` in a
    /// shim directory of this node and adds a handler `name` for it.
    pub fn fake_shim(&mut self, cleanup: &Cleanup, name: &str, script: &str) -> Result<()> {
        let dir = cleanup.run_dir().join("fake-shims");
        fs::create_dir_all(&dir).context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!("containerd-shim-{name}-v2"));
        fs::write(&path, script).context(|| format!("write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .context(|| format!("chmod {}", path.display()))?;
        if !self.shim_dirs.contains(&dir) {
            self.shim_dirs.insert(0, dir);
        }
        self.add_handler(name, &format!("io.containerd.{name}.v2"));
        Ok(())
    }

    pub fn config(&self) -> TaskServiceConfig {
        TaskServiceConfig {
            shims: ShimManagerConfig {
                root: self.root.clone(),
                state: self.state.clone(),
                daemon_address: self.daemon_address.clone(),
                publish_binary: PathBuf::from(PUBLISH_BINARY),
                shim_dirs: self.shim_dirs.clone(),
                debug: false,
            },
            events_socket: self.events_socket.clone(),
            handlers: Handlers::new(self.handlers.clone()).expect("the node's handlers are valid"),
        }
    }

    /// A new task service over this node's directories: a daemon (re)start.
    pub async fn service(&self) -> corral_runtime::Result<Arc<TaskService>> {
        TaskService::start(self.config()).await
    }

    /// A new namespace name; the runc containers the shims keep for it are
    /// force-deleted on drop.
    pub fn namespace(&self, cleanup: &Cleanup) -> String {
        let namespace = cleanup.name("ns");
        cleanup.track_runc_root(&Runc::new(self.runc_root.join(&namespace)));
        namespace
    }

    /// The spec builder of task `id` running `args`: root `rootfs` (where
    /// the shim mounts [`Node::rootfs`]), its cgroup in the test's subtree.
    pub fn spec(&self, cleanup: &Cleanup, id: &str, args: &[&str]) -> Bundle {
        cleanup
            .bundle(id, cleanup.work_dir().join(id).join("rootfs"))
            .args(args.iter().copied())
    }

    /// The Create of task `namespace/id` from `spec`, with the rootfs as
    /// a bind mount and no stdio.
    pub fn create_request(
        &self,
        namespace: &str,
        id: &str,
        handler: &str,
        spec: &Bundle,
    ) -> CreateTask {
        CreateTask {
            namespace: namespace.to_string(),
            id: id.to_string(),
            spec: serde_json::to_vec(&spec.spec()).expect("encode config.json"),
            rootfs: vec![self.rootfs_mount()],
            stdio: Stdio::default(),
            runtime_handler: handler.to_string(),
        }
    }

    pub fn rootfs_mount(&self) -> Mount {
        Mount {
            type_: "bind".into(),
            source: self.rootfs.path().display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        }
    }

    /// `STATE/NAMESPACE/ID`.
    pub fn bundle_dir(&self, namespace: &str, id: &str) -> PathBuf {
        self.state.join(namespace).join(id)
    }

    /// `ROOT/NAMESPACE/ID`.
    pub fn work_dir(&self, namespace: &str, id: &str) -> PathBuf {
        self.root.join(namespace).join(id)
    }

    /// Every bundle on disk, as `namespace/id`.
    pub fn bundles(&self) -> Vec<String> {
        let mut found = Vec::new();
        for ns in fs::read_dir(&self.state).into_iter().flatten().flatten() {
            for task in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                found.push(format!(
                    "{}/{}",
                    ns.file_name().to_string_lossy(),
                    task.file_name().to_string_lossy()
                ));
            }
        }
        found.sort();
        found
    }
}

/// Registers the socket of the shim serving `namespace/id` for removal:
/// Debian's shim puts it in /run/containerd/s, outside the test's
/// directories, and a killed shim leaves it behind.
pub fn track_shim_socket(cleanup: &Cleanup, service: &TaskService, namespace: &str, id: &str) {
    if let Some(path) = service
        .shim_address(namespace, id)
        .ok()
        .and_then(|address| socket_path(&address))
    {
        cleanup.track_path(path);
    }
}

/// An exec of `args` with the task's own process settings.
pub fn exec_process(spec: &Bundle, exec_id: &str, args: &[&str]) -> ExecProcess {
    let mut process = spec.spec()["process"].clone();
    process["args"] = serde_json::json!(args);
    ExecProcess {
        exec_id: exec_id.to_string(),
        spec: serde_json::to_vec(&process).expect("encode the exec's process"),
        stdio: Stdio::default(),
    }
}

/// The shim server whose working directory is `bundle`: both corral's shim
/// and Go shims run in the bundle of the task that started them.
pub fn shim_pid_in(bundle: &Path) -> Option<u32> {
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok();
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
            let is_shim = exe
                .as_ref()
                .and_then(|e| e.file_name())
                .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim"));
            is_shim && cwd.as_deref() == Some(bundle) && pid_alive(*pid as i32)
        })
}

/// Live processes whose working directory lies under `dir`: a shim (or a
/// fake one) left running in a bundle.
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
                && pid_alive(*pid as i32)
        })
        .collect()
}

/// Whether `pid` has exited (a zombie counts: its reaper is not ours).
pub fn gone(pid: u32) -> bool {
    !pid_alive(pid as i32)
}

/// Polls `f` every 20 ms until it holds; false after `timeout`.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
