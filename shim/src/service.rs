//! The task service: containerd's task API v3 for every container of one
//! pod, and corral's `Log` service for their CRI log files.
//!
//! Owns the table of containers and the ordering of their events. Each RPC
//! takes the lock only to read or change that table; the runtime runs
//! outside it, so a slow `runc create` never stalls a `State` or a `Wait`.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, SystemTime},
};

use containerd_shim::ExitSignal;
use corral_proto::{
    containerd::{
        api::{self, ProcessInfo},
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
            TaskPaused, TaskResumed, TaskStart,
        },
        protobuf::well_known_types::empty::Empty,
        protobuf::{well_known_types::any::Any, Message, MessageField},
        shim::oci::{Options, ProcessDetails},
    },
    shim::log::ReopenRequest,
    ttrpc::{self, TtrpcContext},
};
use serde::{Deserialize, Serialize};

use crate::{
    cgroup::{self, Cgroup},
    container::{Container, Process, ProcessStatus},
    error::{Error, Result},
    publisher::{Publisher, TaskEvent},
    reaper::{Exit, Reaper},
    runc::{Launch, Runc},
    stdio::{PendingIo, StdioUris},
    timestamp,
};

/// How long an exit waits for the process's output to reach its
/// destination before it is reported anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Exits of pids not (yet) known: an exec can exit before its pid file is
/// read. Older ones are dropped beyond this.
const ORPHAN_EXITS: usize = 256;
const OPTIONS_FILE: &str = "options.json";
const INIT_PID_FILE: &str = "init.pid";
const RUNC_LOG: &str = "log.json";

/// The runtime options the shim persists in the bundle, so the `delete`
/// action can clean up with the same runtime after the shim died.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RuntimeOptions {
    pub binary_name: String,
    pub root: String,
    pub systemd_cgroup: bool,
}

impl RuntimeOptions {
    pub fn from_proto(o: &Options) -> Self {
        RuntimeOptions {
            binary_name: o.binary_name.clone(),
            root: o.root.clone(),
            systemd_cgroup: o.systemd_cgroup,
        }
    }

    /// Reads `options.json` from a bundle; absent means the defaults.
    pub fn load(bundle: &Path) -> Result<Self> {
        let path = bundle.join(OPTIONS_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::io_path("read", &path, e)),
        }
    }

    pub fn store(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(OPTIONS_FILE);
        let bytes = serde_json::to_vec(self).map_err(|e| Error::Internal(e.to_string()))?;
        fs::write(&path, bytes).map_err(|e| Error::io_path("write", &path, e))
    }

    /// The runtime these options name, with containerd's defaults: `runc`,
    /// state under `/run/containerd/runc/<namespace>`.
    pub fn runtime(&self, namespace: &str) -> Result<Runc> {
        let binary = if self.binary_name.is_empty() {
            "runc"
        } else {
            &self.binary_name
        };
        let root = if self.root.is_empty() {
            PathBuf::from("/run/containerd/runc")
        } else {
            PathBuf::from(&self.root)
        };
        Ok(Runc::new(
            binary,
            &root.join(namespace),
            self.systemd_cgroup,
        )?)
    }
}

pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    reaper: Arc<Reaper>,
    publisher: Arc<Publisher>,
    state: Mutex<State>,
    /// Notified whenever a process is marked stopped.
    stopped: Condvar,
    exit_signal: Arc<ExitSignal>,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    /// Ids between the start and the end of a Create.
    creating: HashSet<String>,
    orphan_exits: VecDeque<Exit>,
}

impl Service {
    pub fn new(
        namespace: &str,
        reaper: Arc<Reaper>,
        publisher: Publisher,
        exit_signal: Arc<ExitSignal>,
    ) -> Service {
        let inner = Arc::new(Inner {
            namespace: namespace.to_string(),
            reaper: Arc::clone(&reaper),
            publisher: Arc::new(publisher),
            state: Mutex::new(State::default()),
            stopped: Condvar::new(),
            exit_signal,
        });
        let weak = Arc::downgrade(&inner);
        reaper.set_exit_handler(move |exit| {
            if let Some(inner) = weak.upgrade() {
                inner.process_exited(exit);
            }
        });
        Service { inner }
    }

    pub fn task(&self) -> TaskService {
        TaskService(Arc::clone(&self.inner))
    }

    pub fn log(&self) -> LogService {
        LogService(Arc::clone(&self.inner))
    }

    /// Delivers the events still queued, at most `timeout`.
    pub fn flush_events(&self, timeout: std::time::Duration) {
        self.inner.publisher.flush(timeout);
    }
}

/// The ttrpc face of the task API.
pub struct TaskService(Arc<Inner>);
/// The ttrpc face of `corral.shim.v1.Log`.
pub struct LogService(Arc<Inner>);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ids become paths and runc arguments: refuse what could escape a directory.
fn check_id(id: &str, what: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 128
        || id == "."
        || id == ".."
        || id.contains('/')
        || id.contains('\0')
    {
        return Err(Error::InvalidArgument(format!("invalid {what} {id:?}")));
    }
    Ok(())
}

impl State {
    fn container(&self, id: &str) -> Result<&Container> {
        self.containers.get(id).ok_or_else(|| Inner::not_found(id))
    }

    fn container_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| Inner::not_found(id))
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn not_found(id: &str) -> Error {
        Error::NotFound(format!("container {id} not found"))
    }

    fn publish<E: TaskEvent>(&self, event: &E) {
        self.publisher.publish(event);
    }

    // ---- Create --------------------------------------------------------

    fn create(self: &Arc<Self>, req: &api::CreateTaskRequest) -> Result<u32> {
        check_id(&req.id, "container id")?;
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(
                "restore from a checkpoint is not supported".into(),
            ));
        }
        self.reserve(&req.id)?;
        let result = self.create_reserved(req);
        let mut state = self.lock();
        state.creating.remove(&req.id);
        match result {
            Ok(container) => {
                let pid = container.init.pid;
                self.publish(&TaskCreate {
                    container_id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                });
                state.containers.insert(req.id.clone(), container);
                self.claim_orphan_exit(&mut state, pid);
                Ok(pid)
            }
            Err(e) => Err(e),
        }
    }

    fn reserve(&self, id: &str) -> Result<()> {
        let mut state = self.lock();
        if state.containers.contains_key(id) || !state.creating.insert(id.to_string()) {
            return Err(Error::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        Ok(())
    }

    /// Steps of Create; on failure everything made so far is undone.
    fn create_reserved(&self, req: &api::CreateTaskRequest) -> Result<Container> {
        let bundle = crate::error::absolute(&req.bundle, "bundle")?;
        check_spec(&bundle)?;
        let options = self.runtime_options(req, &bundle)?;
        let runc = options.runtime(&self.namespace)?;
        options.store(&bundle)?;
        let mounted_rootfs = mount_rootfs(&req.rootfs, &bundle)?;
        let uris = StdioUris {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        match self.create_process(&req.id, &bundle, &runc, &uris) {
            Ok(init) => {
                let oom = self.watch_oom(&req.id, init.pid);
                Ok(Container {
                    id: req.id.clone(),
                    bundle,
                    runc,
                    mounted_rootfs,
                    init,
                    execs: HashMap::new(),
                    paused: false,
                    _oom: oom,
                })
            }
            Err(e) => {
                let _ = runc.delete(&self.reaper, &req.id, true);
                if mounted_rootfs {
                    unmount_rootfs(&bundle);
                }
                let _ = fs::remove_file(bundle.join(INIT_PID_FILE));
                Err(e)
            }
        }
    }

    fn create_process(
        &self,
        id: &str,
        bundle: &Path,
        runc: &Runc,
        uris: &StdioUris,
    ) -> Result<Process> {
        let mut io = PendingIo::prepare(uris)?;
        let pid_file = bundle.join(INIT_PID_FILE);
        let stdio = io.child_stdio();
        let console = io.console_socket().map(Path::to_path_buf);
        let launch = Launch {
            pid_file: &pid_file,
            log_file: &bundle.join(RUNC_LOG),
            console_socket: console.as_deref(),
            stdio,
        };
        runc.create(&self.reaper, id, bundle, launch)?;
        let pid = read_pid(&pid_file)?;
        let mut process = Process::new("", uris.clone());
        process.pid = pid;
        process.status = ProcessStatus::Created;
        process.io = Some(io.start(id, Some(bundle))?);
        Ok(process)
    }

    /// The options in the request win; else those `start` saved in the
    /// bundle; else the defaults.
    fn runtime_options(
        &self,
        req: &api::CreateTaskRequest,
        bundle: &Path,
    ) -> Result<RuntimeOptions> {
        if let Some(any) = req.options.as_ref() {
            if any.type_url.ends_with("containerd.runc.v1.Options") {
                let opts = Options::parse_from_bytes(&any.value).map_err(|e| {
                    Error::InvalidArgument(format!("runtime options of {}: {e}", req.id))
                })?;
                return Ok(RuntimeOptions::from_proto(&opts));
            }
            if !any.type_url.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "runtime options of type {} are not understood",
                    any.type_url
                )));
            }
        }
        RuntimeOptions::load(bundle)
    }

    fn watch_oom(&self, id: &str, pid: u32) -> Option<cgroup::OomWatch> {
        let cg = match Cgroup::of_pid(pid as i32) {
            Ok(cg) => cg,
            Err(e) => {
                log::warn!("container {id}: no cgroup to watch for OOM: {e}");
                return None;
            }
        };
        let publisher = Arc::clone(&self.publisher);
        let container_id = id.to_string();
        match cgroup::watch_oom(&cg, move || {
            publisher.publish(&TaskOOM {
                container_id: container_id.clone(),
                ..Default::default()
            })
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("container {id}: OOM watch: {e}");
                None
            }
        }
    }

    // ---- Start ---------------------------------------------------------

    fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        if exec_id.is_empty() {
            self.start_init(id)
        } else {
            self.start_exec(id, exec_id)
        }
    }

    fn start_init(&self, id: &str) -> Result<u32> {
        let runc = {
            let mut state = self.lock();
            let c = state.container_mut(id)?;
            if c.init.status != ProcessStatus::Created || c.init.starting {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is not in the created state"
                )));
            }
            // An exit seen from here until TaskStart is out waits for it.
            c.init.starting = true;
            c.runc.clone()
        };
        let started = runc.start(&self.reaper, id);
        let mut state = self.lock();
        let c = state.container_mut(id)?;
        c.init.starting = false;
        let parked = c.init.parked_exit.take();
        let pid = c.init.pid;
        if started.is_ok() {
            if c.init.status == ProcessStatus::Created {
                c.init.status = ProcessStatus::Running;
            }
            self.publish(&TaskStart {
                container_id: id.to_string(),
                pid,
                ..Default::default()
            });
        }
        if let Some(exit) = parked {
            self.finish_exit(&mut state, id, "", exit);
        }
        started?;
        Ok(pid)
    }

    fn start_exec(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let (runc, bundle, spec, uris) = {
            let mut state = self.lock();
            let c = state.container_mut(id)?;
            if c.init.status != ProcessStatus::Running {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is not running"
                )));
            }
            let runc = c.runc.clone();
            let bundle = c.bundle.clone();
            let p = c.exec_mut(exec_id)?;
            if p.status != ProcessStatus::Added {
                return Err(Error::FailedPrecondition(format!(
                    "exec {exec_id} was already started"
                )));
            }
            // Claimed now so a concurrent Start of the same exec is refused.
            p.status = ProcessStatus::Created;
            (runc, bundle, std::mem::take(&mut p.spec), p.uris.clone())
        };
        match self.launch_exec(id, exec_id, &runc, &bundle, &spec, &uris) {
            Ok((pid, io)) => {
                let mut state = self.lock();
                let c = state.container_mut(id)?;
                let p = c.exec_mut(exec_id)?;
                p.pid = pid;
                p.status = ProcessStatus::Running;
                p.io = Some(io);
                self.publish(&TaskExecStarted {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    pid,
                    ..Default::default()
                });
                self.claim_orphan_exit(&mut state, pid);
                Ok(pid)
            }
            Err(e) => {
                let mut state = self.lock();
                if let Some(p) = state
                    .containers
                    .get_mut(id)
                    .and_then(|c| c.execs.get_mut(exec_id))
                {
                    p.status = ProcessStatus::Stopped;
                    p.exit = Some((255, SystemTime::now()));
                }
                self.stopped.notify_all();
                Err(e)
            }
        }
    }

    fn launch_exec(
        &self,
        id: &str,
        exec_id: &str,
        runc: &Runc,
        bundle: &Path,
        spec: &[u8],
        uris: &StdioUris,
    ) -> Result<(u32, crate::stdio::ProcessIo)> {
        let spec_file = bundle.join(format!(".exec-{exec_id}.json"));
        let pid_file = bundle.join(format!(".exec-{exec_id}.pid"));
        fs::write(&spec_file, spec).map_err(|e| Error::io_path("write", &spec_file, e))?;
        let result = (|| {
            let mut io = PendingIo::prepare(uris)?;
            let stdio = io.child_stdio();
            let console = io.console_socket().map(Path::to_path_buf);
            let launch = Launch {
                pid_file: &pid_file,
                log_file: &bundle.join(RUNC_LOG),
                console_socket: console.as_deref(),
                stdio,
            };
            runc.exec(&self.reaper, id, &spec_file, launch)?;
            let pid = read_pid(&pid_file)?;
            Ok((pid, io.start(&format!("{id}-{exec_id}"), None)?))
        })();
        let _ = fs::remove_file(&spec_file);
        let _ = fs::remove_file(&pid_file);
        result
    }

    // ---- Exits -----------------------------------------------------------

    /// Called by the reaper for every exit that is not a runc command.
    fn process_exited(self: &Arc<Self>, exit: Exit) {
        let mut state = self.lock();
        if !self.dispatch_exit(&mut state, exit) {
            if state.orphan_exits.len() >= ORPHAN_EXITS {
                state.orphan_exits.pop_front();
            }
            state.orphan_exits.push_back(exit);
        }
    }

    /// Hands the exit of a known pid to a thread that waits for the
    /// process's output to reach its destination (so a reader of the log who
    /// learns of the exit finds all of it), then records it. False if the pid
    /// is no process of ours (yet).
    fn dispatch_exit(self: &Arc<Self>, state: &mut State, exit: Exit) -> bool {
        let found = state.containers.iter_mut().find_map(|(id, c)| {
            c.process_by_pid(exit.pid as u32).map(|p| {
                (
                    id.clone(),
                    p.exec_id.clone(),
                    p.io.as_ref().map(|io| (io.drain_waiter(), io.attach_hub())),
                )
            })
        });
        let Some((id, exec_id, io)) = found else {
            return false;
        };
        let inner = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("exit".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                if let Some((drain, attach)) = io {
                    drain.wait(DRAIN_TIMEOUT);
                    // Attached clients learn of the end now, even if a
                    // process that outlived the container holds the output.
                    if let Some(hub) = attach {
                        hub.close();
                    }
                }
                inner.mark_stopped(&id, &exec_id, exit);
            });
        if let Err(e) = spawned {
            log::error!("exit of pid {}: {e}", exit.pid);
        }
        true
    }

    fn mark_stopped(&self, id: &str, exec_id: &str, exit: Exit) {
        let mut state = self.lock();
        let Some(p) = state
            .containers
            .get_mut(id)
            .and_then(|c| c.process_mut(exec_id))
        else {
            return;
        };
        if p.starting {
            p.parked_exit = Some(exit);
            return;
        }
        self.finish_exit(&mut state, id, exec_id, exit);
    }

    /// Records an exit and publishes TaskExit, under the lock so that it is
    /// ordered before any TaskDelete of the same process.
    fn finish_exit(&self, state: &mut State, id: &str, exec_id: &str, exit: Exit) {
        let Some(p) = state
            .containers
            .get_mut(id)
            .and_then(|c| c.process_mut(exec_id))
        else {
            return;
        };
        if p.status == ProcessStatus::Stopped {
            return;
        }
        p.status = ProcessStatus::Stopped;
        p.exit = Some((exit.status as u32, exit.at));
        let pid = p.pid;
        self.publish(&TaskExit {
            container_id: id.to_string(),
            id: if exec_id.is_empty() {
                id.to_string()
            } else {
                exec_id.to_string()
            },
            pid,
            exit_status: exit.status as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        });
        self.stopped.notify_all();
    }

    /// An exit reaped before its pid was recorded belongs to the process
    /// just registered with that pid.
    fn claim_orphan_exit(self: &Arc<Self>, state: &mut State, pid: u32) {
        if let Some(pos) = state.orphan_exits.iter().position(|e| e.pid as u32 == pid) {
            if let Some(exit) = state.orphan_exits.remove(pos) {
                self.dispatch_exit(state, exit);
            }
        }
    }

    // ---- Delete --------------------------------------------------------

    fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        if !exec_id.is_empty() {
            return self.delete_exec(id, exec_id);
        }
        let (runc, bundle) = {
            let state = self.lock();
            let c = state.container(id)?;
            if c.init.status == ProcessStatus::Running {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is running: kill it before Delete"
                )));
            }
            (c.runc.clone(), c.bundle.clone())
        };
        runc.delete(&self.reaper, id, true)?;
        let mut state = self.lock();
        let c = state
            .containers
            .remove(id)
            .ok_or_else(|| Self::not_found(id))?;
        drop(state);
        if c.mounted_rootfs {
            unmount_rootfs(&bundle);
        }
        let _ = fs::remove_file(bundle.join(INIT_PID_FILE));
        // A container deleted before it ran was killed by the runtime.
        let (status, at) = c
            .init
            .exit
            .unwrap_or((128 + libc::SIGKILL as u32, SystemTime::now()));
        self.publish(&TaskDelete {
            container_id: id.to_string(),
            pid: c.init.pid,
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            id: id.to_string(),
            ..Default::default()
        });
        Ok(api::DeleteResponse {
            pid: c.init.pid,
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    fn delete_exec(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let mut state = self.lock();
        let c = state.container_mut(id)?;
        if c.exec_mut(exec_id)?.is_live() {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} of container {id} is running: kill it before Delete"
            )));
        }
        let Some(p) = c.execs.remove(exec_id) else {
            return Err(Error::Internal(format!("exec {exec_id} of {id} vanished")));
        };
        let (status, at) = p.exit.unwrap_or((0, SystemTime::now()));
        Ok(api::DeleteResponse {
            pid: p.pid,
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    // ---- The rest of the task API -------------------------------------

    fn exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        check_id(&req.exec_id, "exec id")?;
        let spec = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("exec {}: no process spec", req.exec_id))
            })?;
        serde_json::from_slice::<serde_json::Value>(&spec).map_err(|e| {
            Error::InvalidArgument(format!(
                "exec {}: the process spec is not JSON: {e}",
                req.exec_id
            ))
        })?;
        let mut state = self.lock();
        let c = state.container_mut(&req.id)?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {} of container {} already exists",
                req.exec_id, req.id
            )));
        }
        let mut p = Process::new(
            &req.exec_id,
            StdioUris {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        );
        p.spec = spec;
        c.execs.insert(req.exec_id.clone(), p);
        self.publish(&TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    fn state(&self, id: &str, exec_id: &str) -> Result<api::StateResponse> {
        let state = self.lock();
        let c = state.container(id)?;
        let p = c.process_or_err(exec_id)?;
        let (exit_status, exited_at) = match p.exit {
            Some((status, at)) => (status, MessageField::some(timestamp(at))),
            None => (0, MessageField::none()),
        };
        Ok(api::StateResponse {
            id: id.to_string(),
            bundle: c.bundle.display().to_string(),
            pid: p.pid,
            status: p.api_status(c.paused).into(),
            stdin: p.uris.stdin.clone(),
            stdout: p.uris.stdout.clone(),
            stderr: p.uris.stderr.clone(),
            terminal: p.uris.terminal,
            exit_status,
            exited_at,
            exec_id: exec_id.to_string(),
            ..Default::default()
        })
    }

    fn kill(&self, req: &api::KillRequest) -> Result<()> {
        let (runc, pid) = {
            let state = self.lock();
            let c = state.container(&req.id)?;
            let p = c.process_or_err(&req.exec_id)?;
            let kill_all_of_init = req.exec_id.is_empty() && req.all;
            let finished = !(p.is_live() || kill_all_of_init);
            if finished {
                return Err(Error::NotFound(format!(
                    "process {} of container {} already finished",
                    if req.exec_id.is_empty() {
                        "init"
                    } else {
                        &req.exec_id
                    },
                    req.id
                )));
            }
            (c.runc.clone(), p.pid)
        };
        if req.exec_id.is_empty() {
            return match runc.kill(&self.reaper, &req.id, req.signal, req.all) {
                Err(crate::runc::RuncError::Failed { message, .. })
                    if message.contains("not running") || message.contains("no such process") =>
                {
                    Err(Error::NotFound(format!(
                        "container {} is not running",
                        req.id
                    )))
                }
                other => Ok(other?),
            };
        }
        let signal = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("invalid signal {}", req.signal)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).map_err(|e| {
            if e == nix::errno::Errno::ESRCH {
                Error::NotFound(format!("exec {} already finished", req.exec_id))
            } else {
                Error::io("kill", e.into())
            }
        })
    }

    fn wait(&self, id: &str, exec_id: &str) -> Result<api::WaitResponse> {
        let mut state = self.lock();
        loop {
            let c = state.container(id)?;
            let p = c.process_or_err(exec_id)?;
            if let (ProcessStatus::Stopped, Some((status, at))) = (p.status, p.exit) {
                return Ok(api::WaitResponse {
                    exit_status: status,
                    exited_at: MessageField::some(timestamp(at)),
                    ..Default::default()
                });
            }
            state = self
                .stopped
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn pids(&self, id: &str) -> Result<api::PidsResponse> {
        let (runc, execs) = {
            let state = self.lock();
            let c = state.container(id)?;
            let execs: HashMap<u32, String> = c
                .execs
                .values()
                .filter(|p| p.is_live())
                .map(|p| (p.pid, p.exec_id.clone()))
                .collect();
            (c.runc.clone(), execs)
        };
        let processes = runc
            .ps(&self.reaper, id)?
            .into_iter()
            .map(|pid| {
                let info = execs.get(&pid).and_then(|exec_id| {
                    let details = ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    details.write_to_bytes().ok().map(|value| Any {
                        type_url: "containerd.runc.v1.ProcessDetails".into(),
                        value,
                        ..Default::default()
                    })
                });
                ProcessInfo {
                    pid,
                    info: info.into(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let runc = {
            let state = self.lock();
            let c = state.container(id)?;
            if c.init.status != ProcessStatus::Running {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is not running"
                )));
            }
            c.runc.clone()
        };
        if pause {
            runc.pause(&self.reaper, id)?;
        } else {
            runc.resume(&self.reaper, id)?;
        }
        let mut state = self.lock();
        if let Some(c) = state.containers.get_mut(id) {
            c.paused = pause;
        }
        if pause {
            self.publish(&TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            });
        } else {
            self.publish(&TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            });
        }
        Ok(())
    }

    fn update(&self, req: &api::UpdateTaskRequest) -> Result<()> {
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| Error::InvalidArgument(format!("update of {}: no resources", req.id)))?;
        // containerd's typeurl carries OCI LinuxResources as JSON.
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&resources).map_err(
            |e| {
                Error::InvalidArgument(format!(
                    "update of {}: resources are not a JSON object: {e}",
                    req.id
                ))
            },
        )?;
        let runc = {
            let state = self.lock();
            let c = state.container(&req.id)?;
            if !c.init.is_live() {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is not running",
                    req.id
                )));
            }
            c.runc.clone()
        };
        Ok(runc.update(&self.reaper, &req.id, &resources)?)
    }

    fn stats(&self, id: &str) -> Result<api::StatsResponse> {
        let pid = {
            let state = self.lock();
            let c = state.container(id)?;
            if !c.init.is_live() {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is not running"
                )));
            }
            c.init.pid
        };
        let cg = Cgroup::of_pid(pid as i32).map_err(|e| Error::Internal(e.to_string()))?;
        let stats = cg.stats().map_err(|e| Error::Internal(e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    fn with_io<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&crate::stdio::ProcessIo) -> Result<T>,
    ) -> Result<T> {
        let state = self.lock();
        let c = state.container(id)?;
        let p = c.process_or_err(exec_id)?;
        let io = p.io.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!("process {exec_id:?} of {id} has not started"))
        })?;
        f(io)
    }

    fn connect(&self, id: &str) -> api::ConnectResponse {
        let state = self.lock();
        api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: state.containers.get(id).map(|c| c.init.pid).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }
    }

    fn shutdown(&self, now: bool) {
        let state = self.lock();
        if now || (state.containers.is_empty() && state.creating.is_empty()) {
            self.exit_signal.signal();
        }
    }
}

fn read_pid(path: &Path) -> Result<u32> {
    let text = fs::read_to_string(path).map_err(|e| Error::io_path("read pid file", path, e))?;
    text.trim()
        .parse::<u32>()
        .map_err(|e| Error::Internal(format!("pid file {}: {e}", path.display())))
}

/// A bundle's `config.json` must exist and be a JSON object before runc
/// sees it, so the caller gets NotFound or InvalidArgument, not runc's text.
fn check_spec(bundle: &Path) -> Result<()> {
    let path = bundle.join("config.json");
    let bytes = fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(format!("bundle {} has no config.json", bundle.display()))
        } else {
            Error::io_path("read", &path, e)
        }
    })?;
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).map_err(|e| {
        Error::InvalidArgument(format!("{}: malformed OCI spec: {e}", path.display()))
    })?;
    Ok(())
}

fn mount_rootfs(mounts: &[corral_proto::containerd::api::Mount], bundle: &Path) -> Result<bool> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = bundle.join("rootfs");
    fs::create_dir_all(&target).map_err(|e| Error::io_path("create", &target, e))?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = crate::mount::mount_one(&m.type_, &m.source, &m.options, &target) {
            if i > 0 {
                unmount_rootfs(bundle);
            }
            return Err(e);
        }
    }
    Ok(true)
}

/// Undoes every mount stacked on `<bundle>/rootfs`.
pub fn unmount_rootfs(bundle: &Path) {
    crate::mount::unmount_all(&bundle.join("rootfs"));
}

// ---- ttrpc glue: decode, call, map the error ----------------------------

type TtrpcResult<T> = ttrpc::Result<T>;

fn reply<T>(r: Result<T>) -> TtrpcResult<T> {
    r.map_err(Error::into_ttrpc)
}

impl corral_proto::containerd::shim_sync::Task for TaskService {
    fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        reply(self.0.state(&req.id, &req.exec_id))
    }

    fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        reply(self.0.create(&req).map(|pid| api::CreateTaskResponse {
            pid,
            ..Default::default()
        }))
    }

    fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        reply(
            self.0
                .start(&req.id, &req.exec_id)
                .map(|pid| api::StartResponse {
                    pid,
                    ..Default::default()
                }),
        )
    }

    fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        reply(self.0.delete(&req.id, &req.exec_id))
    }

    fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        reply(self.0.pids(&req.id))
    }

    fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        reply(self.0.pause(&req.id, true).map(|_| Empty::new()))
    }

    fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        reply(self.0.pause(&req.id, false).map(|_| Empty::new()))
    }

    fn checkpoint(&self, _: &TtrpcContext, req: api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        reply(Err(Error::Unimplemented(format!(
            "checkpoint of {} is not supported by corral's shim",
            req.id
        ))))
    }

    fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        reply(self.0.kill(&req).map(|_| Empty::new()))
    }

    fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        reply(self.0.exec(&req).map(|_| Empty::new()))
    }

    fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        reply(
            self.0
                .with_io(&req.id, &req.exec_id, |io| io.resize(req.width, req.height))
                .map(|_| Empty::new()),
        )
    }

    fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        reply(
            self.0
                .with_io(&req.id, &req.exec_id, |io| {
                    if req.stdin {
                        io.close_stdin();
                    }
                    Ok(())
                })
                .map(|_| Empty::new()),
        )
    }

    fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        reply(self.0.update(&req).map(|_| Empty::new()))
    }

    fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        reply(self.0.wait(&req.id, &req.exec_id))
    }

    fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        reply(self.0.stats(&req.id))
    }

    fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(self.0.connect(&req.id))
    }

    fn shutdown(&self, _: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        self.0.shutdown(req.now);
        Ok(Empty::new())
    }
}

impl corral_proto::shim::log_ttrpc::Log for LogService {
    fn reopen(&self, _: &TtrpcContext, req: ReopenRequest) -> TtrpcResult<Empty> {
        reply(
            self.0
                .with_io(&req.id, "", |io| io.reopen_log())
                .map(|_| Empty::new()),
        )
    }
}
