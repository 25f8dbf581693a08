//! Starts shims as containerd 2.x starts them, keeps one connection per
//! shim, and finds them again after the daemon restarts.
//!
//! Owns bundles and shim processes; knows nothing of what runs inside a
//! task (that is the task service's business, through the task API).
//!
//! Starting a task's shim, in order: create the bundle, resolve the shim
//! binary from the runtime name, open the shim's log, run `<shim> start`
//! in the bundle with containerd's flags and environment, parse and persist
//! its bootstrap, connect. A failure at any step removes the bundle.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use containerd_shim_protos::{
    api::{self, ConnectRequest, ShutdownRequest},
    events::task::{TaskDelete, TaskExit},
};
use corral_proto::protobuf::{well_known_types::timestamp::Timestamp, Message};
use tokio::{io::AsyncReadExt, process::Command};

use crate::{
    bundle::{Bootstrap, Bundle},
    error::{Error, Result},
    events::{Event, EventExchange, TaskEvent},
    handlers::RuntimeHandler,
    task_client::TaskClient,
};

/// The most a `start` or `delete` action may take: a shim that never
/// answers must not hang the daemon.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long re-attaching waits for one shim's socket: kept short, since a
/// dead shim's socket refuses at once and a hung one must not hold up the
/// others (containerd issue 11409: serial 100 s dials made restarts take an hour).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Re-attach this many shims at once.
const REATTACH_PARALLELISM: usize = 16;
/// 128 + SIGKILL: the exit of a task whose shim died with it.
pub const KILLED: u32 = 137;

#[derive(Debug, Clone)]
pub struct ShimManagerConfig {
    /// Persistent work directories: `ROOT/NAMESPACE/ID`.
    pub root: PathBuf,
    /// Bundles: `STATE/NAMESPACE/ID`; gone at reboot.
    pub state: PathBuf,
    /// The daemon's own socket, passed as `-address` (shims derive their
    /// socket path from it).
    pub daemon_address: PathBuf,
    /// The daemon binary, passed as `-publish-binary`.
    pub publish_binary: PathBuf,
    /// Directories searched for shim binaries before `PATH`.
    pub shim_dirs: Vec<PathBuf>,
    /// Passed as `-debug` to the shims.
    pub debug: bool,
}

/// A task's shim: its bundle and a connection to it.
pub struct ShimTask {
    pub bundle: Bundle,
    pub bootstrap: Bootstrap,
    pub binary: PathBuf,
    pub client: TaskClient,
    /// Copies the shim's log into the daemon's while the task lives.
    log_copier: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ShimTask {
    pub fn key(&self) -> String {
        key(&self.bundle.namespace, &self.bundle.id)
    }
}

impl Drop for ShimTask {
    fn drop(&mut self) {
        if let Some(copier) = lock(&self.log_copier).take() {
            copier.abort();
        }
    }
}

/// What re-attaching found.
#[derive(Debug, Default)]
pub struct Reattached {
    /// Tasks whose shim answered.
    pub live: Vec<(String, String)>,
    /// Tasks whose shim was dead: cleaned up, with the exit `delete` reported.
    pub dead: Vec<DeadTask>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeadTask {
    pub namespace: String,
    pub id: String,
    pub pid: u32,
    pub exit_status: u32,
    pub exited_at: SystemTime,
}

pub struct ShimManager {
    config: ShimManagerConfig,
    events: Arc<EventExchange>,
    tasks: Mutex<HashMap<String, Arc<ShimTask>>>,
    /// One connection per shim address: the containers of a pod share it.
    connections: tokio::sync::Mutex<HashMap<String, TaskClient>>,
}

fn key(namespace: &str, id: &str) -> String {
    format!("{namespace}/{id}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ShimManager {
    pub fn new(config: ShimManagerConfig, events: Arc<EventExchange>) -> ShimManager {
        ShimManager {
            config,
            events,
            tasks: Mutex::new(HashMap::new()),
            connections: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, namespace: &str, id: &str) -> Result<Arc<ShimTask>> {
        lock(&self.tasks)
            .get(&key(namespace, id))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("task {namespace}/{id} not found")))
    }

    pub fn list(&self) -> Vec<Arc<ShimTask>> {
        lock(&self.tasks).values().cloned().collect()
    }

    /// Starts (or joins) the shim for a new task; see the module doc.
    pub async fn start(
        &self,
        namespace: &str,
        id: &str,
        spec: &[u8],
        handler: &RuntimeHandler,
    ) -> Result<Arc<ShimTask>> {
        let binary = self.resolve_shim(&handler.shim)?;
        if lock(&self.tasks).contains_key(&key(namespace, id)) {
            return Err(Error::AlreadyExists(format!(
                "task {namespace}/{id} already exists"
            )));
        }
        let bundle = Bundle::create(&self.config.root, &self.config.state, namespace, id, spec)?;
        match self.start_in(&bundle, &binary, handler).await {
            Ok(task) => {
                lock(&self.tasks).insert(task.key(), Arc::clone(&task));
                Ok(task)
            }
            Err(e) => {
                bundle.remove();
                Err(e)
            }
        }
    }

    async fn start_in(
        &self,
        bundle: &Bundle,
        binary: &Path,
        handler: &RuntimeHandler,
    ) -> Result<Arc<ShimTask>> {
        let log_copier = copy_shim_log(bundle)?;
        let stdin = handler
            .options()
            .write_to_bytes()
            .map_err(|e| Error::Internal(format!("encode runtime options: {e}")))?;
        let output = self
            .run_action(bundle, binary, "start", Some(stdin))
            .await?;
        let bootstrap = Bootstrap::parse(&output).map_err(|e| Error::shim(shim_name(binary), e))?;
        bundle.write_bootstrap(&bootstrap)?;
        bundle.write_shim_binary(binary)?;
        let client = self.connect(&bootstrap, binary).await?;
        let connected = client
            .connect_info(&ConnectRequest {
                id: bundle.id.clone(),
                ..Default::default()
            })
            .await?;
        bundle.write_shim_pid(connected.shim_pid)?;
        Ok(Arc::new(ShimTask {
            bundle: bundle.clone(),
            bootstrap,
            binary: binary.to_path_buf(),
            client,
            log_copier: Mutex::new(Some(log_copier)),
        }))
    }

    /// The connection to the shim at the bootstrap's address, shared.
    async fn connect(&self, bootstrap: &Bootstrap, binary: &Path) -> Result<TaskClient> {
        let mut connections = self.connections.lock().await;
        if let Some(client) = connections.get(&bootstrap.address) {
            return Ok(client.clone());
        }
        let client = TaskClient::connect(
            &bootstrap.address,
            bootstrap.api()?,
            &shim_name(binary),
            DIAL_TIMEOUT,
        )
        .await?;
        connections.insert(bootstrap.address.clone(), client.clone());
        Ok(client)
    }

    /// Forgets a deleted task: asks its shim to shut down (a shim still
    /// serving other tasks of its pod ignores this) and removes the bundle.
    pub async fn remove(&self, namespace: &str, id: &str) -> Result<()> {
        let task = lock(&self.tasks).remove(&key(namespace, id));
        let Some(task) = task else {
            return Ok(());
        };
        let shared = lock(&self.tasks)
            .values()
            .any(|t| t.bootstrap.address == task.bootstrap.address);
        if !shared {
            let req = ShutdownRequest {
                id: id.to_string(),
                ..Default::default()
            };
            if let Err(e) = task.client.shutdown(&req).await {
                tracing::warn!(task = %task.key(), error = %e, "shim shutdown");
            }
            self.connections
                .lock()
                .await
                .remove(&task.bootstrap.address);
        }
        task.bundle.remove();
        Ok(())
    }

    /// Finds every bundle left by an earlier daemon: reconnects to each
    /// live shim, and cleans up after each dead one (its `delete` action,
    /// synthetic TaskExit and TaskDelete events, the bundle removed).
    pub async fn reattach(self: &Arc<Self>) -> Result<Reattached> {
        let found = Bundle::list(&self.config.state)?;
        self.remove_orphan_work_dirs(&found);
        let limit = Arc::new(tokio::sync::Semaphore::new(REATTACH_PARALLELISM));
        let mut jobs = tokio::task::JoinSet::new();
        for (namespace, id) in found {
            let manager = Arc::clone(self);
            let limit = Arc::clone(&limit);
            jobs.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let outcome = manager.reattach_one(&namespace, &id).await;
                (namespace, id, outcome)
            });
        }
        let mut report = Reattached::default();
        while let Some(joined) = jobs.join_next().await {
            let (namespace, id, outcome) =
                joined.map_err(|e| Error::Internal(format!("re-attach: {e}")))?;
            match outcome {
                Ok(None) => report.live.push((namespace, id)),
                Ok(Some(dead)) => report.dead.push(dead),
                Err(e) => tracing::warn!(task = %key(&namespace, &id), error = %e, "re-attach"),
            }
        }
        Ok(report)
    }

    /// `None` when the shim is alive and reconnected.
    async fn reattach_one(&self, namespace: &str, id: &str) -> Result<Option<DeadTask>> {
        let bundle = Bundle::load(&self.config.root, &self.config.state, namespace, id)?;
        let (bootstrap, binary) = match (bundle.read_bootstrap(), bundle.read_shim_binary()) {
            (Ok(b), Ok(p)) => (b, p),
            // A start that never finished: nothing runs, nothing to report.
            _ => {
                bundle.remove();
                return Err(Error::NotFound(format!(
                    "task {namespace}/{id} had an unfinished bundle; removed"
                )));
            }
        };
        let alive = self.connect_alive(&bootstrap, &binary, id).await;
        if let Err(Error::Timeout(_)) = &alive {
            // Connected but silent: a hung shim. Its task cannot be served;
            // stop it before its `delete` cleans up after it.
            kill_shim(&bundle, &binary);
        }
        if let Ok(client) = alive {
            let log_copier = copy_shim_log(&bundle).ok();
            let task = Arc::new(ShimTask {
                bundle,
                bootstrap,
                binary,
                client,
                log_copier: Mutex::new(log_copier),
            });
            lock(&self.tasks).insert(task.key(), task);
            return Ok(None);
        }
        Ok(Some(self.cleanup_dead(&bundle, &binary).await))
    }

    /// Work dirs whose bundle is gone (the state dir did not survive a
    /// reboot) belong to no task any more.
    fn remove_orphan_work_dirs(&self, bundles: &[(String, String)]) {
        let Ok(orphans) = Bundle::list(&self.config.root) else {
            return;
        };
        for (namespace, id) in orphans {
            if !bundles.iter().any(|(n, i)| *n == namespace && *i == id) {
                let dir = self.config.root.join(&namespace).join(&id);
                tracing::info!(task = %key(&namespace, &id), "removing work dir of a vanished task");
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(path = %dir.display(), error = %e, "removing work dir");
                }
            }
        }
    }

    /// Connects and checks that the shim still knows the task.
    async fn connect_alive(
        &self,
        bootstrap: &Bootstrap,
        binary: &Path,
        id: &str,
    ) -> Result<TaskClient> {
        let client = self.connect(bootstrap, binary).await?;
        let req = ConnectRequest {
            id: id.to_string(),
            ..Default::default()
        };
        match tokio::time::timeout(DIAL_TIMEOUT, client.connect_info(&req)).await {
            Ok(Ok(_)) => Ok(client),
            failed => {
                self.connections.lock().await.remove(&bootstrap.address);
                Err(match failed {
                    Ok(Err(e)) => e,
                    _ => Error::Timeout(format!("shim at {} did not answer", bootstrap.address)),
                })
            }
        }
    }

    /// After a shim died: its `delete` action, then the synthetic events a
    /// task's watchers would otherwise never see, then the bundle.
    async fn cleanup_dead(&self, bundle: &Bundle, binary: &Path) -> DeadTask {
        let (namespace, id) = (bundle.namespace.clone(), bundle.id.clone());
        let mut dead = DeadTask {
            namespace: namespace.clone(),
            id: id.clone(),
            pid: 0,
            exit_status: KILLED,
            exited_at: SystemTime::now(),
        };
        match self.run_action(bundle, binary, "delete", None).await {
            Ok(out) => match api::DeleteResponse::parse_from_bytes(&out) {
                Ok(resp) => {
                    dead.pid = resp.pid;
                    if resp.exit_status != 0 {
                        dead.exit_status = resp.exit_status;
                    }
                    if let Some(at) = resp.exited_at.as_ref() {
                        dead.exited_at = UNIX_EPOCH
                            + Duration::new(at.seconds.max(0) as u64, at.nanos.max(0) as u32);
                    }
                }
                Err(e) => {
                    tracing::warn!(task = %key(&namespace, &id), error = %e, "decode delete reply")
                }
            },
            Err(e) => {
                tracing::warn!(task = %key(&namespace, &id), error = %e, "shim delete action")
            }
        }
        let exited_at = Some(timestamp(dead.exited_at)).into();
        for (topic, event) in [
            (
                "/tasks/exit",
                Event::Exit(TaskExit {
                    container_id: id.clone(),
                    id: id.clone(),
                    pid: dead.pid,
                    exit_status: dead.exit_status,
                    exited_at: Some(timestamp(dead.exited_at)).into(),
                    ..Default::default()
                }),
            ),
            (
                "/tasks/delete",
                Event::Delete(TaskDelete {
                    container_id: id.clone(),
                    id: id.clone(),
                    pid: dead.pid,
                    exit_status: dead.exit_status,
                    exited_at,
                    ..Default::default()
                }),
            ),
        ] {
            self.events.publish(TaskEvent {
                namespace: namespace.clone(),
                topic: topic.to_string(),
                timestamp: SystemTime::now(),
                event,
            });
        }
        bundle.remove();
        dead
    }

    /// Runs a shim action in the bundle, as containerd does, and returns
    /// its stdout. The action's whole process group is killed if it
    /// overruns [`ACTION_TIMEOUT`].
    async fn run_action(
        &self,
        bundle: &Bundle,
        binary: &Path,
        action: &str,
        stdin: Option<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let shim = shim_name(binary);
        let mut cmd = Command::new(binary);
        cmd.args(["-namespace", &bundle.namespace])
            .arg("-address")
            .arg(&self.config.daemon_address)
            .arg("-publish-binary")
            .arg(&self.config.publish_binary)
            .args(["-id", &bundle.id]);
        if action == "delete" {
            cmd.arg("-bundle").arg(&bundle.path);
        }
        if self.config.debug {
            cmd.arg("-debug");
        }
        cmd.arg(action)
            .current_dir(&bundle.path)
            .env("TTRPC_ADDRESS", self.events.socket())
            .env("GRPC_ADDRESS", &self.config.daemon_address)
            .env("NAMESPACE", &bundle.namespace)
            .env("MAX_SHIM_VERSION", "2")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::shim(&shim, format!("run {}: {e}", binary.display())))?;
        let pgid = child.id();
        let mut pipe = child.stdin.take();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let run = async {
            if let (Some(input), Some(pipe)) = (stdin, pipe.as_mut()) {
                use tokio::io::AsyncWriteExt;
                // A shim that does not read its stdin is judged by its reply.
                let _ = pipe.write_all(&input).await;
            }
            drop(pipe.take());
            let read_out = async {
                if let Some(s) = stdout.as_mut() {
                    let _ = s.read_to_end(&mut out).await;
                }
            };
            let read_err = async {
                if let Some(s) = stderr.as_mut() {
                    let _ = s.read_to_end(&mut err).await;
                }
            };
            tokio::join!(read_out, read_err);
            child.wait().await
        };
        let status = match tokio::time::timeout(ACTION_TIMEOUT, run).await {
            Ok(status) => status.map_err(|e| Error::shim(&shim, format!("{action}: {e}")))?,
            Err(_) => {
                if let Some(pgid) = pgid {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(Error::shim(
                    &shim,
                    format!("{action} did not finish within {ACTION_TIMEOUT:?}"),
                ));
            }
        };
        if !status.success() {
            let reason = String::from_utf8_lossy(&err);
            return Err(Error::shim(
                &shim,
                format!("{action} failed ({status}): {}", reason.trim()),
            ));
        }
        Ok(out)
    }

    /// `io.containerd.NAME.vN` → `containerd-shim-NAME-vN`, looked up in the
    /// configured directories, then `PATH`.
    fn resolve_shim(&self, runtime: &str) -> Result<PathBuf> {
        let name = crate::handlers::shim_binary_name(runtime)?;
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        self.config
            .shim_dirs
            .iter()
            .chain(path_dirs.iter())
            .map(|dir| dir.join(&name))
            .find(|candidate| is_executable(candidate))
            .ok_or_else(|| {
                Error::shim(
                    &name,
                    format!("binary {name} not found for runtime {runtime}"),
                )
            })
    }
}

/// Kills the shim recorded in the bundle, if that pid still runs `binary`
/// (a recycled pid is someone else's process).
fn kill_shim(bundle: &Bundle, binary: &Path) {
    let Some(pid) = bundle.read_shim_pid() else {
        return;
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let same = exe
        .as_deref()
        .and_then(|e| std::fs::canonicalize(binary).ok().map(|b| b == e))
        .unwrap_or(false);
    if same {
        tracing::warn!(task = %key(&bundle.namespace, &bundle.id), pid, "killing a shim that does not answer");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn shim_name(binary: &Path) -> String {
    binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| binary.display().to_string())
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// The shim writes its own log into the bundle's `log` FIFO; a shim that
/// opens it for writing blocks until there is a reader (containerd's runc
/// shim does), so the reader is there before `start`. Lines go to the
/// daemon's log, tagged with the task.
fn copy_shim_log(bundle: &Bundle) -> Result<tokio::task::JoinHandle<()>> {
    let path = bundle.log();
    match nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(Error::io("mkfifo", &path, e.into())),
    }
    // Opened read-write so it never reads EOF between two shims' writers.
    let receiver = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&path)
        .map_err(|e| Error::io("open shim log", &path, e))?;
    let task = format!("{}/{}", bundle.namespace, bundle.id);
    Ok(tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(receiver).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "shim", task = %task, "{line}");
        }
    }))
}
