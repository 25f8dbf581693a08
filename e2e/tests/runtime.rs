//! corral's runtime layer end to end: a TaskService over corral's shim and
//! over Debian's containerd-shim-runc-v2 (containerd 1.6, task API v2), with
//! real runc and a busybox rootfs bind-mounted into each bundle as
//! containerd passes a snapshot. A daemon restart is a TaskService shut down
//! and a new one built over the same directories. Needs root and the built
//! shim (`cargo build --workspace --bins`).

use std::{
    fs,
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use corral_e2e::{
    cleanup::mounts_under,
    runtime::{
        eventually, exec_process, gone, processes_in, shim_pid_in, track_shim_socket, Node, CORRAL,
        RUNC_V2,
    },
    task::{CONTAINER_TYPE, SANDBOX_ID},
    Bundle, Cleanup, Runc,
};
use corral_runtime::{
    events::{Event, TaskEvent},
    shim_manager::{ACTION_TIMEOUT, KILLED},
    task_service::{Status, TaskService, TaskState},
    Error,
};
use tokio::sync::mpsc::UnboundedReceiver;

const TIMEOUT: Duration = Duration::from_secs(30);
/// How long to keep listening after a task's last event, to catch a
/// duplicate.
const GRACE: Duration = Duration::from_millis(700);
const SIGKILL: u32 = libc::SIGKILL as u32;
const SIGTERM: u32 = libc::SIGTERM as u32;
/// Exits 42 on SIGTERM: the exit code proves the signal reached the process.
const TRAP_LOOP: &str = "trap 'exit 42' TERM; while :; do sleep 0.1; done";

/// A hang fails the test instead of blocking the suite.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {TIMEOUT:?}"))
}

struct Setup {
    cleanup: Cleanup,
    node: Node,
    ns: String,
}

fn setup() -> Setup {
    let cleanup = Cleanup::new().expect("cleanup");
    let node = Node::new(&cleanup).expect("node");
    let ns = node.namespace(&cleanup);
    Setup { cleanup, node, ns }
}

impl Setup {
    /// Create of `spec` as task `id` with `handler`; the shim's socket is
    /// registered for cleanup. The init's pid.
    async fn create(&self, service: &TaskService, handler: &str, id: &str, spec: &Bundle) -> u32 {
        let req = self.node.create_request(&self.ns, id, handler, spec);
        let pid = within("create", service.create(req))
            .await
            .unwrap_or_else(|e| panic!("create {id} with {handler}: {e}"));
        track_shim_socket(&self.cleanup, service, &self.ns, id);
        pid
    }

    async fn run(&self, service: &TaskService, handler: &str, id: &str, spec: &Bundle) -> u32 {
        let pid = self.create(service, handler, id, spec).await;
        let started = within("start", service.start_process(&self.ns, id, ""))
            .await
            .expect("start");
        assert_eq!(started, pid, "Start answered another pid than Create");
        pid
    }

    async fn state(&self, service: &TaskService, id: &str, exec_id: &str) -> TaskState {
        within("state", service.state(&self.ns, id, exec_id))
            .await
            .unwrap_or_else(|e| panic!("state of {id}/{exec_id:?}: {e}"))
    }

    async fn wait(&self, service: &TaskService, id: &str, exec_id: &str) -> u32 {
        within("wait", service.wait(&self.ns, id, exec_id))
            .await
            .unwrap_or_else(|e| panic!("wait for {id}/{exec_id:?}: {e}"))
            .status
    }

    async fn kill(&self, service: &TaskService, id: &str, exec_id: &str, signal: u32) {
        within("kill", service.kill(&self.ns, id, exec_id, signal, false))
            .await
            .unwrap_or_else(|e| panic!("kill {id}/{exec_id:?} with {signal}: {e}"));
    }

    async fn delete(&self, service: &TaskService, id: &str) -> u32 {
        within("delete", service.delete(&self.ns, id))
            .await
            .unwrap_or_else(|e| panic!("delete {id}: {e}"))
            .status
    }

    fn assert_bundle_gone(&self, id: &str) {
        let (bundle, work) = (
            self.node.bundle_dir(&self.ns, id),
            self.node.work_dir(&self.ns, id),
        );
        assert!(
            !bundle.exists(),
            "bundle {} is still there",
            bundle.display()
        );
        assert!(!work.exists(), "work dir {} is still there", work.display());
    }

    fn shim_of(&self, id: &str) -> u32 {
        shim_pid_in(&self.node.bundle_dir(&self.ns, id))
            .unwrap_or_else(|| panic!("no shim process runs in the bundle of {id}"))
    }

    /// A file in the shared rootfs: the container sees it at `/tmp/<name>`.
    fn gate(&self, name: &str) -> std::path::PathBuf {
        self.node.rootfs.path().join("tmp").join(name)
    }

    fn runc_lists(&self, id: &str) -> bool {
        Runc::new(self.node.runc_root.join(&self.ns))
            .list_ids()
            .unwrap_or_default()
            .iter()
            .any(|i| i == id)
    }

    fn assert_nothing_mounted(&self) {
        let left = mounts_under(&[&self.node.state, &self.node.root]);
        assert!(left.is_empty(), "mounts left: {left:?}");
    }
}

/// Waits until `f` holds, or fails naming `what`.
async fn until(what: &str, f: impl FnMut() -> bool) {
    assert!(eventually(TIMEOUT, f).await, "timed out waiting for {what}");
}

/// A task that exits with `code` once the file `/tmp/<gate>` exists: its
/// exit happens exactly when the test says, not on a timer racing the test.
fn gated(gate: &str, code: u32) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("while [ ! -e /tmp/{gate} ]; do sleep 0.05; done; exit {code}"),
    ]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// One line per event, naming what tells the events of a task apart.
fn summary(ev: &TaskEvent) -> String {
    let body = match &ev.event {
        Event::Create(_) => "create".to_string(),
        Event::Start(e) => format!("start pid>0:{}", e.pid > 0),
        Event::ExecAdded(e) => format!("exec-added {}", e.exec_id),
        Event::ExecStarted(e) => format!("exec-started {} pid>0:{}", e.exec_id, e.pid > 0),
        Event::Exit(e) => format!("exit {} {}", e.id, e.exit_status),
        Event::Delete(e) => format!("delete {}", e.exit_status),
        other => format!("{other:?}"),
    };
    format!("{} {body}", ev.topic)
}

/// The events about `ns/id` up to its /tasks/delete, and whatever else
/// about it arrives within [`GRACE`] after.
async fn events_until_delete(
    rx: &mut UnboundedReceiver<TaskEvent>,
    ns: &str,
    id: &str,
) -> Vec<TaskEvent> {
    let mut seen = Vec::new();
    let mut until = Instant::now() + TIMEOUT;
    let mut deleted = false;
    while let Ok(Some(ev)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
        if ev.namespace != ns || ev.event.container_id() != Some(id) {
            continue;
        }
        if ev.topic == "/tasks/delete" && !deleted {
            deleted = true;
            until = Instant::now() + GRACE;
        }
        seen.push(ev);
    }
    seen
}

fn summaries(events: &[TaskEvent]) -> Vec<String> {
    events.iter().map(summary).collect()
}

// ---------------------------------------------------------------------------
// 1. A task's whole life.

/// A pod of two tasks sharing one shim: a sandbox and a container that
/// execs, is signalled, waited for and deleted; the shim goes with the
/// pod's last task.
async fn whole_life(handler: &str) {
    let s = setup();
    let service = s.node.service().await.expect("task service");

    let sandbox_id = s.cleanup.local_name("sandbox");
    let sandbox = s
        .node
        .spec(&s.cleanup, &sandbox_id, &["sleep", "1000"])
        .annotation(SANDBOX_ID, sandbox_id.as_str())
        .annotation(CONTAINER_TYPE, "sandbox");
    let sandbox_pid = s.create(&service, handler, &sandbox_id, &sandbox).await;
    assert!(sandbox_pid > 0);
    let created = s.state(&service, &sandbox_id, "").await;
    assert_eq!(created.status, Status::CREATED);
    assert_eq!(created.pid, sandbox_pid);
    assert_eq!(created.bundle, s.node.bundle_dir(&s.ns, &sandbox_id));
    assert!(s.node.work_dir(&s.ns, &sandbox_id).is_dir(), "no work dir");
    let started = within("start", service.start_process(&s.ns, &sandbox_id, ""))
        .await
        .expect("start the sandbox");
    assert_eq!(started, sandbox_pid);
    assert_eq!(
        s.state(&service, &sandbox_id, "").await.status,
        Status::RUNNING
    );
    let shim = s.shim_of(&sandbox_id);

    let id = s.cleanup.local_name("app");
    let app = s
        .node
        .spec(&s.cleanup, &id, &["sh", "-c", TRAP_LOOP])
        .annotation(SANDBOX_ID, sandbox_id.as_str())
        .annotation(CONTAINER_TYPE, "container");
    let pid = s.run(&service, handler, &id, &app).await;
    assert_eq!(
        service.shim_address(&s.ns, &id).expect("address"),
        service.shim_address(&s.ns, &sandbox_id).expect("address"),
        "the container did not join its sandbox's shim"
    );
    let running = s.state(&service, &id, "").await;
    assert_eq!((running.status, running.pid), (Status::RUNNING, pid));
    let pids = within("pids", service.pids(&s.ns, &id))
        .await
        .expect("pids");
    assert!(pids.contains(&pid), "pids {pids:?} lack the init {pid}");
    let mut listed = service.list();
    listed.sort();
    let mut expected = vec![
        (s.ns.clone(), id.clone()),
        (s.ns.clone(), sandbox_id.clone()),
    ];
    expected.sort();
    assert_eq!(listed, expected);

    // An exec that exits on its own, with its code.
    within(
        "exec",
        service.exec(
            &s.ns,
            &id,
            exec_process(&app, "exit3", &["sh", "-c", "exit 3"]),
        ),
    )
    .await
    .expect("exec");
    let exec_pid = within("start exec", service.start_process(&s.ns, &id, "exit3"))
        .await
        .expect("start the exec");
    assert!(exec_pid > 0 && exec_pid != pid);
    assert_eq!(s.wait(&service, &id, "exit3").await, 3);
    let exec_state = s.state(&service, &id, "exit3").await;
    assert_eq!(exec_state.status, Status::STOPPED);
    assert_eq!(exec_state.exit.map(|e| e.status), Some(3));
    let deleted = within("delete exec", service.delete_exec(&s.ns, &id, "exit3"))
        .await
        .expect("delete the exec");
    assert_eq!(deleted.status, 3);

    // An exec killed with SIGKILL.
    within(
        "exec",
        service.exec(
            &s.ns,
            &id,
            exec_process(&app, "sleeper", &["sleep", "1000"]),
        ),
    )
    .await
    .expect("exec");
    within("start exec", service.start_process(&s.ns, &id, "sleeper"))
        .await
        .expect("start the exec");
    assert_eq!(
        s.state(&service, &id, "sleeper").await.status,
        Status::RUNNING
    );
    s.kill(&service, &id, "sleeper", SIGKILL).await;
    assert_eq!(s.wait(&service, &id, "sleeper").await, 128 + SIGKILL);
    within("delete exec", service.delete_exec(&s.ns, &id, "sleeper"))
        .await
        .expect("delete the exec");

    // The init traps SIGTERM and exits 42.
    s.kill(&service, &id, "", SIGTERM).await;
    assert_eq!(s.wait(&service, &id, "").await, 42);
    let stopped = s.state(&service, &id, "").await;
    assert_eq!(stopped.status, Status::STOPPED);
    assert_eq!(stopped.exit.map(|e| e.status), Some(42));
    let exited_at = stopped.exit.expect("exit").at;
    let age = SystemTime::now()
        .duration_since(exited_at)
        .unwrap_or_default();
    assert!(
        age < TIMEOUT,
        "exited_at {exited_at:?} is not a recent time"
    );
    assert_eq!(s.delete(&service, &id).await, 42);
    s.assert_bundle_gone(&id);
    assert!(
        matches!(service.state(&s.ns, &id, "").await, Err(Error::NotFound(_))),
        "a deleted task still has a state"
    );
    assert!(
        !gone(shim),
        "the shim exited while its pod's sandbox still runs"
    );

    // The pod's last task: the shim goes with it.
    s.kill(&service, &sandbox_id, "", SIGKILL).await;
    assert_eq!(s.wait(&service, &sandbox_id, "").await, 128 + SIGKILL);
    assert_eq!(s.delete(&service, &sandbox_id).await, 128 + SIGKILL);
    s.assert_bundle_gone(&sandbox_id);
    until("the shim to exit after the pod's last task", || gone(shim)).await;
    assert!(service.list().is_empty(), "{:?}", service.list());
    assert!(!s.runc_lists(&id) && !s.runc_lists(&sandbox_id));
    s.assert_nothing_mounted();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_lives_its_whole_life_through_corrals_shim() {
    whole_life(CORRAL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_lives_its_whole_life_through_debians_runc_shim() {
    whole_life(RUNC_V2).await;
}

// ---------------------------------------------------------------------------
// 2. Events.

async fn events_in_order(handler: &str) {
    let s = setup();
    let service = s.node.service().await.expect("task service");
    let mut events = service.subscribe();

    let id = s.cleanup.local_name("ev");
    let spec = s.node.spec(&s.cleanup, &id, &["sh", "-c", TRAP_LOOP]);
    s.run(&service, handler, &id, &spec).await;
    within(
        "exec",
        service.exec(
            &s.ns,
            &id,
            exec_process(&spec, "e1", &["sh", "-c", "exit 3"]),
        ),
    )
    .await
    .expect("exec");
    within("start exec", service.start_process(&s.ns, &id, "e1"))
        .await
        .expect("start the exec");
    assert_eq!(s.wait(&service, &id, "e1").await, 3);
    within("delete exec", service.delete_exec(&s.ns, &id, "e1"))
        .await
        .expect("delete the exec");
    s.kill(&service, &id, "", SIGTERM).await;
    assert_eq!(s.wait(&service, &id, "").await, 42);
    s.delete(&service, &id).await;

    let seen = events_until_delete(&mut events, &s.ns, &id).await;
    let expected = vec![
        "/tasks/create create".to_string(),
        "/tasks/start start pid>0:true".into(),
        "/tasks/exec-added exec-added e1".into(),
        "/tasks/exec-started exec-started e1 pid>0:true".into(),
        "/tasks/exit exit e1 3".into(),
        format!("/tasks/exit exit {id} 42"),
        "/tasks/delete delete 42".into(),
    ];
    assert_eq!(summaries(&seen), expected, "events of {id}");
    let stamps: Vec<SystemTime> = seen.iter().map(|e| e.timestamp).collect();
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "event timestamps go backwards: {stamps:?}"
    );
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_corrals_shim_arrive_in_order_each_once() {
    events_in_order(CORRAL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_debians_runc_shim_arrive_in_order_each_once() {
    events_in_order(RUNC_V2).await;
}

// ---------------------------------------------------------------------------
// 3. and 4. A daemon restart.

/// Shuts a service down and drops it, as a daemon that stops.
async fn stop_daemon(service: Arc<TaskService>) {
    within("shutdown", service.shutdown()).await;
    drop(service);
}

async fn restart_while_a_task_runs(handler: &str) {
    let s = setup();
    let first = s.node.service().await.expect("task service");
    let id = s.cleanup.local_name("long");
    let gate = format!("gate-{id}");
    let spec = s.node.spec(&s.cleanup, &id, &args(&gated(&gate, 7)));
    let pid = s.run(&first, handler, &id, &spec).await;
    let shim = s.shim_of(&id);
    // Events the first daemon had not acknowledged when it stopped (the
    // start, published just now) are delivered to the next one: only what
    // happens after the restart is compared below.
    let restarted_at = SystemTime::now();
    stop_daemon(first).await;

    let second = s.node.service().await.expect("a new task service");
    let mut events = second.subscribe();
    let reattached = within("reattach", second.reattach())
        .await
        .expect("reattach");
    assert_eq!(reattached.live, vec![(s.ns.clone(), id.clone())]);
    assert!(reattached.dead.is_empty(), "{:?}", reattached.dead);
    let state = s.state(&second, &id, "").await;
    assert_eq!((state.status, state.pid), (Status::RUNNING, pid));
    assert!(!gone(shim), "the shim did not survive the daemon");
    assert_eq!(second.list(), vec![(s.ns.clone(), id.clone())]);

    fs::write(s.gate(&gate), b"").expect("open the gate");
    assert_eq!(s.wait(&second, &id, "").await, 7);
    assert_eq!(s.delete(&second, &id).await, 7);
    let mut seen = events_until_delete(&mut events, &s.ns, &id).await;
    seen.retain(|e| e.timestamp >= restarted_at);
    assert_eq!(
        summaries(&seen),
        vec![
            format!("/tasks/exit exit {id} 7"),
            "/tasks/delete delete 7".to_string()
        ],
        "events the new service saw"
    );
    s.assert_bundle_gone(&id);
    until("the shim to exit", || gone(shim)).await;
    s.assert_nothing_mounted();
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_finds_a_running_task_of_corrals_shim_and_sees_its_exit() {
    restart_while_a_task_runs(CORRAL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_finds_a_running_task_of_debians_runc_shim_and_sees_its_exit() {
    restart_while_a_task_runs(RUNC_V2).await;
}

async fn exit_while_no_daemon_runs(handler: &str) {
    let s = setup();
    let first = s.node.service().await.expect("task service");
    let id = s.cleanup.local_name("brief");
    let gate = format!("gate-{id}");
    let spec = s.node.spec(&s.cleanup, &id, &args(&gated(&gate, 5)));
    let pid = s.run(&first, handler, &id, &spec).await;
    let shim = s.shim_of(&id);
    stop_daemon(first).await;

    fs::write(s.gate(&gate), b"").expect("open the gate");
    // The shim reaps it: gone, not a zombie, once the shim has its status.
    until("the task to exit", || gone(pid)).await;

    let second = s.node.service().await.expect("a new task service");
    let reattached = within("reattach", second.reattach())
        .await
        .expect("reattach");
    assert_eq!(reattached.live, vec![(s.ns.clone(), id.clone())]);
    let state = s.state(&second, &id, "").await;
    assert_eq!(state.status, Status::STOPPED);
    assert_eq!(state.exit.map(|e| e.status), Some(5));
    assert_eq!(s.wait(&second, &id, "").await, 5);
    assert_eq!(s.delete(&second, &id).await, 5);
    s.assert_bundle_gone(&id);
    until("the shim to exit", || gone(shim)).await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_while_no_daemon_ran_is_reported_with_its_code_by_corrals_shim() {
    exit_while_no_daemon_runs(CORRAL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_while_no_daemon_ran_is_reported_with_its_code_by_debians_runc_shim() {
    exit_while_no_daemon_runs(RUNC_V2).await;
}

// ---------------------------------------------------------------------------
// 5. A shim killed with SIGKILL.

async fn shim_killed(handler: &str) {
    let s = setup();
    let first = s.node.service().await.expect("task service");
    let id = s.cleanup.local_name("doomed");
    let spec = s.node.spec(&s.cleanup, &id, &["sleep", "1000"]);
    let pid = s.run(&first, handler, &id, &spec).await;
    let shim = s.shim_of(&id);
    assert!(
        !mounts_under(&[&s.node.state]).is_empty(),
        "the shim did not mount the rootfs"
    );
    stop_daemon(first).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the shim");
    until("the shim to die", || gone(shim)).await;

    let second = s.node.service().await.expect("a new task service");
    let mut events = second.subscribe();
    let reattached = within("reattach", second.reattach())
        .await
        .expect("reattach");
    assert!(reattached.live.is_empty(), "{:?}", reattached.live);
    let dead: Vec<_> = reattached
        .dead
        .iter()
        .map(|d| (d.namespace.clone(), d.id.clone(), d.exit_status))
        .collect();
    assert_eq!(dead, vec![(s.ns.clone(), id.clone(), KILLED)]);

    let state = s.state(&second, &id, "").await;
    assert_eq!(state.status, Status::STOPPED);
    assert_eq!(state.exit.map(|e| e.status), Some(KILLED));
    assert_eq!(s.wait(&second, &id, "").await, KILLED);
    assert_eq!(second.list(), vec![(s.ns.clone(), id.clone())]);

    let seen = events_until_delete(&mut events, &s.ns, &id).await;
    assert_eq!(
        summaries(&seen),
        vec![
            format!("/tasks/exit exit {id} {KILLED}"),
            format!("/tasks/delete delete {KILLED}"),
        ],
        "synthetic events of the dead shim's task"
    );
    s.assert_bundle_gone(&id);
    until("the container's process to be gone", || gone(pid)).await;
    assert!(!s.runc_lists(&id), "runc still lists {id}");
    s.assert_nothing_mounted();

    assert_eq!(s.delete(&second, &id).await, KILLED);
    assert!(
        matches!(second.state(&s.ns, &id, "").await, Err(Error::NotFound(_))),
        "a deleted dead task still has a state"
    );
    assert!(second.list().is_empty());
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_corral_shim_is_cleaned_up_and_its_task_reported_137() {
    shim_killed(CORRAL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_debian_runc_shim_is_cleaned_up_and_its_task_reported_137() {
    shim_killed(RUNC_V2).await;
}

// ---------------------------------------------------------------------------
// 6. Bad input.

impl Setup {
    /// Nothing of a refused Create is left: no bundle, work dir, mount or
    /// process under the node's directories.
    fn assert_left_nothing(&self) {
        assert!(
            self.node.bundles().is_empty(),
            "bundles left: {:?}",
            self.node.bundles()
        );
        let work: Vec<_> = fs::read_dir(&self.node.root)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|ns| fs::read_dir(ns.path()).into_iter().flatten().flatten())
            .map(|e| e.path())
            .collect();
        assert!(work.is_empty(), "work dirs left: {work:?}");
        self.assert_nothing_mounted();
        let procs = processes_in(&self.node.state);
        assert!(procs.is_empty(), "processes left in bundles: {procs:?}");
    }

    async fn create_err(&self, service: &TaskService, handler: &str, id: &str) -> Error {
        let spec = self.node.spec(&self.cleanup, "refused", &["true"]);
        let req = self.node.create_request(&self.ns, id, handler, &spec);
        match within("create", service.create(req)).await {
            Ok(pid) => panic!("create {id:?} with {handler:?} succeeded (pid {pid})"),
            Err(e) => e,
        }
    }
}

fn assert_shim_error(err: &Error, binary: &str, cause_has: &[&str]) {
    match err {
        Error::Shim { shim, cause } => {
            assert_eq!(shim, binary, "{err}");
            for part in cause_has {
                assert!(cause.contains(part), "{part:?} not in the cause: {err}");
            }
        }
        other => panic!("expected a shim error naming {binary}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_runtime_handler_is_refused_by_name() {
    let s = setup();
    let service = s.node.service().await.expect("task service");
    let err = s.create_err(&service, "no-such-handler", "t").await;
    match &err {
        Error::InvalidArgument(msg) => assert!(msg.contains("no-such-handler"), "{msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert!(
        !s.node.state.exists(),
        "an unknown handler touched the state dir"
    );
    s.assert_left_nothing();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_shim_binary_is_named() {
    let mut s = setup();
    s.node
        .add_handler("ghost", "io.containerd.corral-e2e-ghost.v2");
    let service = s.node.service().await.expect("task service");
    let err = s.create_err(&service, "ghost", "t").await;
    assert_shim_error(
        &err,
        "containerd-shim-corral-e2e-ghost-v2",
        &["containerd-shim-corral-e2e-ghost-v2", "not found"],
    );
    s.assert_left_nothing();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_that_exits_early_is_reported_with_its_status_and_output() {
    let mut s = setup();
    s.node
        .fake_shim(
            &s.cleanup,
            "early",
            "#!/bin/sh\necho 'no runtime for you' >&2\nexit 3\n",
        )
        .expect("fake shim");
    let service = s.node.service().await.expect("task service");
    let err = s.create_err(&service, "early", "t").await;
    assert_shim_error(
        &err,
        "containerd-shim-early-v2",
        &["start", "3", "no runtime for you"],
    );
    s.assert_left_nothing();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_bootstrap_is_refused() {
    let mut s = setup();
    s.node
        .fake_shim(
            &s.cleanup,
            "garbled",
            "#!/bin/sh\necho 'time=now level=info msg=hello'\n",
        )
        .expect("fake shim");
    let nowhere = s.cleanup.run_dir().join("nowhere.sock");
    s.node
        .fake_shim(
            &s.cleanup,
            "astray",
            &format!("#!/bin/sh\necho 'unix://{}'\n", nowhere.display()),
        )
        .expect("fake shim");
    let service = s.node.service().await.expect("task service");

    let err = s.create_err(&service, "garbled", "t").await;
    assert_shim_error(&err, "containerd-shim-garbled-v2", &["malformed bootstrap"]);
    s.assert_left_nothing();

    // Well formed, but nothing listens there.
    let err = s.create_err(&service, "astray", "t").await;
    assert!(
        matches!(&err, Error::Shim { shim, .. } if shim == "containerd-shim-astray-v2")
            || matches!(&err, Error::Timeout(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("nowhere.sock"), "{err}");
    s.assert_left_nothing();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_that_never_answers_times_out_and_is_killed() {
    let mut s = setup();
    let pid_file = s.cleanup.run_dir().join("sleeper.pid");
    s.node
        .fake_shim(
            &s.cleanup,
            "mute",
            &format!(
                "#!/bin/sh\nsleep 1000 &\necho $! > {}\nwait\n",
                pid_file.display()
            ),
        )
        .expect("fake shim");
    let service = s.node.service().await.expect("task service");
    let began = Instant::now();
    let err = s.create_err(&service, "mute", "t").await;
    let took = began.elapsed();
    assert_shim_error(&err, "containerd-shim-mute-v2", &["start"]);
    assert!(
        took >= ACTION_TIMEOUT - Duration::from_millis(500)
            && took < ACTION_TIMEOUT + Duration::from_secs(5),
        "the start failed after {took:?}, not after the manager's {ACTION_TIMEOUT:?}"
    );
    let sleeper: u32 = fs::read_to_string(&pid_file)
        .expect("the fake shim's pid file")
        .trim()
        .parse()
        .expect("a pid");
    until("the fake shim's sleep to be killed", || gone(sleeper)).await;
    s.assert_left_nothing();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_could_escape_are_refused_before_the_disk_is_touched() {
    let s = setup();
    let service = s.node.service().await.expect("task service");
    let long = "x".repeat(77);
    for id in ["", long.as_str(), "a/b", "..", "../escape", "/abs"] {
        let err = s.create_err(&service, CORRAL, id).await;
        assert!(matches!(err, Error::InvalidArgument(_)), "{id:?}: {err:?}");
    }
    let spec = s.node.spec(&s.cleanup, "refused", &["true"]);
    for ns in ["..", "a/b", ""] {
        let req = s.node.create_request(ns, "t", CORRAL, &spec);
        let err = within("create", service.create(req))
            .await
            .expect_err("a bad namespace");
        assert!(matches!(err, Error::InvalidArgument(_)), "{ns:?}: {err:?}");
    }
    assert!(
        !s.node.state.exists() && !s.node.root.exists(),
        "a refused id touched the disk"
    );
    s.assert_left_nothing();
    service.shutdown().await;
}

async fn second_create_already_exists(handler: &str) {
    let s = setup();
    let service = s.node.service().await.expect("task service");
    let id = s.cleanup.local_name("twice");
    let spec = s.node.spec(&s.cleanup, &id, &["sleep", "1000"]);
    let pid = s.run(&service, handler, &id, &spec).await;
    let shim = s.shim_of(&id);

    let req = s.node.create_request(&s.ns, &id, handler, &spec);
    let err = within("create", service.create(req))
        .await
        .expect_err("a second create of the same id");
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
    assert!(err.to_string().contains(&id), "{err}");

    // The first is untouched.
    let state = s.state(&service, &id, "").await;
    assert_eq!((state.status, state.pid), (Status::RUNNING, pid));
    assert!(s.node.bundle_dir(&s.ns, &id).join("config.json").is_file());
    assert!(!gone(shim));

    s.kill(&service, &id, "", SIGKILL).await;
    assert_eq!(s.wait(&service, &id, "").await, KILLED);
    s.delete(&service, &id).await;
    s.assert_bundle_gone(&id);
    until("the shim to exit", || gone(shim)).await;
    s.assert_left_nothing();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_create_of_an_id_already_exists_with_corrals_shim() {
    second_create_already_exists(CORRAL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_create_of_an_id_already_exists_with_debians_runc_shim() {
    second_create_already_exists(RUNC_V2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creates_of_one_id_at_once_make_one_task() {
    let s = setup();
    let service = s.node.service().await.expect("task service");
    let id = s.cleanup.local_name("race");
    let spec = s.node.spec(&s.cleanup, &id, &["sleep", "1000"]);
    let (a, b) = tokio::join!(
        service.create(s.node.create_request(&s.ns, &id, CORRAL, &spec)),
        service.create(s.node.create_request(&s.ns, &id, CORRAL, &spec)),
    );
    track_shim_socket(&s.cleanup, &service, &s.ns, &id);
    let (won, lost) = match (a, b) {
        (Ok(pid), Err(e)) | (Err(e), Ok(pid)) => (pid, e),
        other => panic!("expected one create to win: {other:?}"),
    };
    assert!(matches!(lost, Error::AlreadyExists(_)), "{lost:?}");
    assert_eq!(s.state(&service, &id, "").await.pid, won);
    assert_eq!(s.node.bundles(), vec![format!("{}/{id}", s.ns)]);
    let shim = s.shim_of(&id);
    s.delete(&service, &id).await;
    s.assert_bundle_gone(&id);
    until("the shim to exit", || gone(shim)).await;
    s.assert_left_nothing();
    service.shutdown().await;
}

/// runc refuses the spec: the shim's Create fails after the shim started.
async fn create_refused_by_the_shim(handler: &str) {
    let s = setup();
    let service = s.node.service().await.expect("task service");
    let id = s.cleanup.local_name("bad");
    let spec = s.node.spec(&s.cleanup, &id, &["/no/such/binary"]);
    let req = s.node.create_request(&s.ns, &id, handler, &spec);
    let bundle = s.node.bundle_dir(&s.ns, &id);
    let err = within("create", service.create(req))
        .await
        .expect_err("a task whose binary does not exist");
    assert!(
        err.to_string().contains("/no/such/binary"),
        "the error does not say what runc refused: {err}"
    );
    assert!(
        !bundle.exists(),
        "bundle {} is still there",
        bundle.display()
    );
    until("the shim to exit", || {
        processes_in(&s.node.state).is_empty()
    })
    .await;
    assert!(!s.runc_lists(&id), "runc still lists {id}");
    assert!(service.list().is_empty(), "{:?}", service.list());
    s.assert_left_nothing();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_refused_by_corrals_shim_leaves_nothing() {
    create_refused_by_the_shim(CORRAL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_refused_by_debians_runc_shim_leaves_nothing() {
    create_refused_by_the_shim(RUNC_V2).await;
}

// ---------------------------------------------------------------------------
// Re-attach: what a restarted daemon finds on disk besides live shims.

/// A shim that accepts connections but never answers (stopped) must not
/// hold up the others: it is given up on after the dial timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_shim_does_not_hold_up_reattach() {
    let s = setup();
    let first = s.node.service().await.expect("task service");
    let (hung, fine) = (s.cleanup.local_name("hung"), s.cleanup.local_name("fine"));
    for id in [&hung, &fine] {
        let spec = s.node.spec(&s.cleanup, id, &["sleep", "1000"]);
        s.run(&first, CORRAL, id, &spec).await;
    }
    let hung_shim = s.shim_of(&hung);
    stop_daemon(first).await;
    let stopped = nix::unistd::Pid::from_raw(hung_shim as i32);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).expect("stop the shim");
    // Thawed and killed even if an assertion fails first.
    s.cleanup.defer(move || {
        let _ = nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGCONT);
    });

    let second = s.node.service().await.expect("a new task service");
    let began = Instant::now();
    let reattached = within("reattach", second.reattach())
        .await
        .expect("reattach");
    let took = began.elapsed();
    let bound = corral_runtime::shim_manager::DIAL_TIMEOUT * 2 + ACTION_TIMEOUT;
    assert!(took < bound, "reattach took {took:?} (bound {bound:?})");
    assert_eq!(reattached.live, vec![(s.ns.clone(), fine.clone())]);
    let dead: Vec<_> = reattached.dead.iter().map(|d| d.id.clone()).collect();
    assert_eq!(dead, vec![hung.clone()]);
    assert_eq!(s.state(&second, &fine, "").await.status, Status::RUNNING);
    s.assert_bundle_gone(&hung);
    // The stopped shim itself is left alone, as containerd leaves it: the
    // deferred kill above removes it.

    s.kill(&second, &fine, "", SIGKILL).await;
    assert_eq!(s.wait(&second, &fine, "").await, KILLED);
    s.delete(&second, &fine).await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_bundle_is_removed_on_reattach() {
    let s = setup();
    let bundle = s.node.bundle_dir(&s.ns, "half");
    let work = s.node.work_dir(&s.ns, "half");
    fs::create_dir_all(bundle.join("rootfs")).expect("bundle");
    fs::create_dir_all(&work).expect("work dir");
    fs::write(bundle.join("config.json"), b"{}").expect("config.json");

    let service = s.node.service().await.expect("task service");
    let reattached = within("reattach", service.reattach())
        .await
        .expect("reattach");
    assert!(reattached.live.is_empty() && reattached.dead.is_empty());
    assert!(!bundle.exists(), "the unfinished bundle is still there");
    assert!(!work.exists(), "its work dir is still there");
    assert!(service.list().is_empty());
    service.shutdown().await;
}

/// After a reboot the state dir (tmpfs) is empty but the root persists: a
/// work dir without a bundle belongs to no task (containerd's
/// `cleanupWorkDirs` after loading shims).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_dirs_without_a_bundle_are_removed_on_reattach() {
    let s = setup();
    let orphan = s.node.work_dir(&s.ns, "orphan");
    fs::create_dir_all(&orphan).expect("work dir");
    let service = s.node.service().await.expect("task service");
    within("reattach", service.reattach())
        .await
        .expect("reattach");
    assert!(
        !orphan.exists(),
        "work dir {} of no task survived reattach",
        orphan.display()
    );
    service.shutdown().await;
}
