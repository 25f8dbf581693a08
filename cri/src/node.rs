//! The pods and containers of this node, as corrald knows them.
//!
//! [`Node`] holds what every pod and container operation needs (the task
//! service, the image store, CNI, the metadata store) and the in-memory
//! index of sandboxes and containers: ids, unique prefixes, and the names
//! that are taken. The operations themselves live in `sandbox.rs` and
//! `container.rs`; the reaction to task events (exits, OOM kills) and the
//! recovery after a restart live in `lifecycle.rs`.
//!
//! Every object carries its record behind a plain mutex (held only to read
//! or change fields, never across an await) and an async lock that
//! serializes the operations that change its life (create, start, stop,
//! remove), so that two kubelet retries of one call do not interleave.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use corral_runtime::handlers::Handlers;
use corral_runtime::image::ImageStore;
use corral_runtime::task_service::TaskService;
use k8s_cri::v1 as cri;
use tokio::sync::broadcast;

use crate::cni::CniManager;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{ContainerRecord, SandboxRecord, Store};

/// The containerd namespace CRI's tasks live in, as containerd names it: a
/// shim started by either daemon is recognisable.
pub const TASK_NAMESPACE: &str = "k8s.io";

/// A pod sandbox.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    /// `<state>/sandboxes/<id>`: hostname, hosts, resolv.conf, shm.
    pub dir: PathBuf,
    record: Mutex<SandboxRecord>,
    /// Serializes Run/Stop/Remove of this sandbox.
    pub op: tokio::sync::Mutex<()>,
}

impl Sandbox {
    pub fn new(config: cri::PodSandboxConfig, record: SandboxRecord, dir: PathBuf) -> Sandbox {
        Sandbox {
            id: record.id.clone(),
            config,
            dir,
            record: Mutex::new(record),
            op: tokio::sync::Mutex::new(()),
        }
    }

    pub fn record(&self) -> MutexGuard<'_, SandboxRecord> {
        lock(&self.record)
    }

    pub fn snapshot(&self) -> SandboxRecord {
        self.record().clone()
    }

    pub fn metadata(&self) -> cri::PodSandboxMetadata {
        self.config.metadata.clone().unwrap_or_default()
    }

    pub fn host_network(&self) -> bool {
        namespace_mode(&self.config, |o| o.network) == cri::NamespaceMode::Node
    }
}

/// The pod's namespace option for one namespace (POD when unset).
pub fn namespace_mode(
    config: &cri::PodSandboxConfig,
    pick: impl Fn(&cri::NamespaceOption) -> i32,
) -> cri::NamespaceMode {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .map(|o| cri::NamespaceMode::try_from(pick(o)).unwrap_or(cri::NamespaceMode::Pod))
        .unwrap_or(cri::NamespaceMode::Pod)
}

/// A container of a pod.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub sandbox_id: String,
    pub config: cri::ContainerConfig,
    record: Mutex<ContainerRecord>,
    /// Serializes Create/Start/Stop/Remove of this container.
    pub op: tokio::sync::Mutex<()>,
}

impl Container {
    pub fn new(config: cri::ContainerConfig, record: ContainerRecord) -> Container {
        Container {
            id: record.id.clone(),
            sandbox_id: record.sandbox_id.clone(),
            config,
            record: Mutex::new(record),
            op: tokio::sync::Mutex::new(()),
        }
    }

    pub fn record(&self) -> MutexGuard<'_, ContainerRecord> {
        lock(&self.record)
    }

    pub fn snapshot(&self) -> ContainerRecord {
        self.record().clone()
    }

    pub fn metadata(&self) -> cri::ContainerMetadata {
        self.config.metadata.clone().unwrap_or_default()
    }
}

#[derive(Default)]
struct Index {
    sandboxes: BTreeMap<String, Arc<Sandbox>>,
    containers: BTreeMap<String, Arc<Container>>,
    /// Reserved names, to the id holding them.
    names: HashMap<String, String>,
}

/// Everything a pod or container operation needs.
pub struct Node {
    pub config: Arc<Config>,
    /// The configured runtime handlers, built once from `config`.
    pub handlers: Handlers,
    pub tasks: Arc<TaskService>,
    pub images: ImageStore,
    pub cni: CniManager,
    pub store: Store,
    /// The built-in pause process's rootfs.
    pub pause_rootfs: PathBuf,
    /// CRI container events, for GetContainerEvents subscribers.
    pub events: broadcast::Sender<cri::ContainerEventResponse>,
    pub cpu_rates: crate::stats::CpuRates,
    pub layer_usage: crate::stats::LayerUsage,
    /// Log copiers of containers whose shim is not corral's.
    pub copiers: crate::container_io::Copiers,
    /// The lowest `oom_score_adj` runc can set here (see
    /// [`crate::spec::oom_score_adj_floor`]).
    pub oom_floor: Option<i32>,
    index: Mutex<Index>,
}

/// Events buffered per subscriber before it counts as too slow and misses
/// some (kubelet then relists, as with containerd's bounded queue).
const EVENT_BUFFER: usize = 1024;

impl Node {
    pub fn new(
        config: Arc<Config>,
        handlers: Handlers,
        tasks: Arc<TaskService>,
        images: ImageStore,
        cni: CniManager,
        store: Store,
        pause_rootfs: PathBuf,
    ) -> Node {
        Node {
            config,
            handlers,
            tasks,
            images,
            cni,
            store,
            pause_rootfs,
            events: broadcast::channel(EVENT_BUFFER).0,
            cpu_rates: Default::default(),
            layer_usage: Default::default(),
            copiers: Default::default(),
            oom_floor: crate::spec::oom_score_adj_floor(),
            index: Mutex::new(Index::default()),
        }
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// `<state>/sandboxes/<id>`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.state.join("sandboxes").join(id)
    }

    /// `<state>/netns`.
    pub fn netns_dir(&self) -> PathBuf {
        self.config.state.join("netns")
    }

    /// Takes `name` for `id`; AlreadyExists names the holder.
    pub fn reserve_name(&self, name: &str, id: &str) -> Result<()> {
        let mut index = self.index();
        if let Some(holder) = index.names.get(name) {
            return Err(Error::AlreadyExists(format!(
                "name {name:?} is reserved for {holder}"
            )));
        }
        index.names.insert(name.to_string(), id.to_string());
        Ok(())
    }

    pub fn release_name(&self, name: &str) {
        self.index().names.remove(name);
    }

    pub fn insert_sandbox(&self, sandbox: Arc<Sandbox>) {
        self.index().sandboxes.insert(sandbox.id.clone(), sandbox);
    }

    pub fn insert_container(&self, container: Arc<Container>) {
        self.index()
            .containers
            .insert(container.id.clone(), container);
    }

    pub fn forget_sandbox(&self, id: &str) {
        self.index().sandboxes.remove(id);
    }

    pub fn forget_container(&self, id: &str) {
        self.index().containers.remove(id);
    }

    /// The sandbox whose id is `query` or starts with it (a unique prefix).
    pub fn sandbox(&self, query: &str) -> Result<Arc<Sandbox>> {
        let index = self.index();
        find(&index.sandboxes, query, "pod sandbox")
    }

    pub fn container(&self, query: &str) -> Result<Arc<Container>> {
        let index = self.index();
        find(&index.containers, query, "container")
    }

    /// [`Node::container`], refused as FailedPrecondition unless it runs:
    /// what exec, attach and log reopening need.
    pub fn running_container(&self, query: &str) -> Result<Arc<Container>> {
        let container = self.container(query)?;
        if container.record().state != crate::store::ContainerState::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                container.id
            )));
        }
        Ok(container)
    }

    /// Like [`Node::sandbox`], with `None` for an id nothing matches.
    pub fn find_sandbox(&self, query: &str) -> Result<Option<Arc<Sandbox>>> {
        optional(self.sandbox(query))
    }

    pub fn find_container(&self, query: &str) -> Result<Option<Arc<Container>>> {
        optional(self.container(query))
    }

    /// Like [`Node::sandbox`], without the error for an id nothing matches.
    pub fn sandbox_by_exact_id(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.index().sandboxes.get(id).cloned()
    }

    pub fn container_by_exact_id(&self, id: &str) -> Option<Arc<Container>> {
        self.index().containers.get(id).cloned()
    }

    pub fn sandboxes(&self) -> Vec<Arc<Sandbox>> {
        self.index().sandboxes.values().cloned().collect()
    }

    pub fn containers(&self) -> Vec<Arc<Container>> {
        self.index().containers.values().cloned().collect()
    }

    pub fn containers_of(&self, sandbox_id: &str) -> Vec<Arc<Container>> {
        self.index()
            .containers
            .values()
            .filter(|c| c.sandbox_id == sandbox_id)
            .cloned()
            .collect()
    }

    /// Sends a CRI container event; nobody listening is fine.
    pub fn publish(&self, event: cri::ContainerEventResponse) {
        let _ = self.events.send(event);
    }
}

fn find<T>(map: &BTreeMap<String, Arc<T>>, query: &str, kind: &str) -> Result<Arc<T>> {
    if query.is_empty() {
        return Err(Error::InvalidArgument(format!("{kind} id is empty")));
    }
    if let Some(found) = map.get(query) {
        return Ok(found.clone());
    }
    let mut matches = map
        .range(query.to_string()..)
        .take_while(|(id, _)| id.starts_with(query));
    match (matches.next(), matches.next()) {
        (Some((_, found)), None) => Ok(found.clone()),
        (Some(_), Some(_)) => Err(Error::InvalidArgument(format!(
            "{kind} id prefix {query:?} is ambiguous"
        ))),
        (None, _) => Err(Error::NotFound(format!("{kind} {query:?} not found"))),
    }
}

fn optional<T>(found: Result<Arc<T>>) -> Result<Option<Arc<T>>> {
    match found {
        Ok(t) => Ok(Some(t)),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A task that is already gone is what Stop and Remove want.
pub fn ignore_not_found(result: corral_runtime::Result<()>) -> Result<()> {
    match result {
        Err(corral_runtime::Error::NotFound(_)) => Ok(()),
        other => other.map_err(Error::from),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent field by field; a panic
    // elsewhere must not make every later RPC fail.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Nanoseconds since the epoch, as CRI timestamps are.
pub fn now_ns() -> i64 {
    to_ns(SystemTime::now())
}

pub fn to_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A new object id: 64 hex characters from the kernel's CSPRNG, as
/// containerd and CRI-O make them.
pub fn new_id() -> Result<String> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Internal(format!("getrandom: {e}")));
        }
        filled += n as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_lowercase_hex_and_distinct() {
        let a = new_id().unwrap();
        let b = new_id().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_unique_prefix_finds_its_object_and_an_ambiguous_one_is_refused() {
        let mut map = BTreeMap::new();
        for id in ["abc1", "abc2", "abd3"] {
            map.insert(id.to_string(), Arc::new(id.to_string()));
        }
        assert_eq!(*find(&map, "abd", "x").unwrap(), "abd3");
        assert_eq!(*find(&map, "abc1", "x").unwrap(), "abc1");
        assert!(matches!(
            find(&map, "abc", "x"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(find(&map, "zz", "x"), Err(Error::NotFound(_))));
        assert!(matches!(
            find(&map, "", "x"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
