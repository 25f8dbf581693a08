//! corral's shim driven from outside exactly as containerd drives it: the
//! `start` action with its flags and environment, the bootstrap read back,
//! the task API over ttrpc, events at the daemon's address, with real runc
//! and a busybox rootfs. Needs root.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use corral_e2e::{
    events::Event,
    task::{ctx, rpc, runc_options, PodShim, CONTAINER_TYPE, RPC_TIMEOUT, SANDBOX_ID},
    Bundle, Cleanup, EventsSink,
};
use corral_proto::{
    containerd::{
        api::Status,
        protobuf::{well_known_types::any::Any, Message},
        shim::shim as api,
        topics,
    },
    shim::{log::ReopenRequest, log_ttrpc::LogClient},
    ttrpc::{self, Code},
};

const TIMEOUT: Duration = Duration::from_secs(20);

fn pod(cleanup: &Cleanup, sink: &EventsSink, name: &str) -> PodShim {
    let sandbox = cleanup
        .busybox_bundle(name)
        .expect("sandbox rootfs")
        .args(["sleep", "1000"])
        .annotation(CONTAINER_TYPE, "sandbox");
    PodShim::start(cleanup, sink, &sandbox).expect("start the pod's shim")
}

/// A container of `pod`: its annotations name the pod's sandbox.
fn container(cleanup: &Cleanup, pod: &PodShim, name: &str) -> Bundle {
    cleanup
        .busybox_bundle(name)
        .expect("container rootfs")
        .annotation(SANDBOX_ID, pod.sandbox_id.as_str())
        .annotation(CONTAINER_TYPE, "container")
}

fn id_of(bundle: &Bundle) -> String {
    bundle
        .dir()
        .file_name()
        .expect("bundle dir name")
        .to_string_lossy()
        .into_owned()
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn cri_log_uri(path: &Path) -> String {
    format!("cri-log://{}", path.display())
}

fn code_of(err: &ttrpc::Error) -> Code {
    match err {
        ttrpc::Error::RpcStatus(status) => status.code(),
        other => panic!("not an RPC status: {other:?}"),
    }
}

fn create(pod: &PodShim, bundle: &Bundle, stdout: &str, stderr: &str) -> u32 {
    bundle.write().expect("write bundle");
    let req = pod.create_request(bundle, stdout, stderr).expect("request");
    pod.task().create(ctx(), &req).expect("create").pid
}

fn start(pod: &PodShim, id: &str, exec_id: &str) -> u32 {
    pod.start_task(id, exec_id).expect("start")
}

fn wait(pod: &PodShim, id: &str, exec_id: &str) -> u32 {
    pod.wait(id, exec_id).expect("wait")
}

fn state(pod: &PodShim, id: &str, exec_id: &str) -> api::StateResponse {
    pod.task()
        .state(
            ctx(),
            &api::StateRequest {
                id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            },
        )
        .expect("state")
}

fn kill(pod: &PodShim, id: &str, exec_id: &str, signal: i32) {
    pod.kill(id, exec_id, signal).expect("kill")
}

fn delete(pod: &PodShim, id: &str, exec_id: &str) -> api::DeleteResponse {
    pod.delete(id, exec_id).expect("delete")
}

/// An exec's OCI process: the container's own, with other args.
fn exec_spec(bundle: &Bundle, args: &[&str], terminal: bool) -> Any {
    let mut process = bundle.spec()["process"].clone();
    process["args"] = serde_json::json!(args);
    process["terminal"] = serde_json::json!(terminal);
    Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: serde_json::to_vec(&process).expect("encode process"),
        ..Default::default()
    }
}

fn exec(
    pod: &PodShim,
    bundle: &Bundle,
    exec_id: &str,
    args: &[&str],
    terminal: bool,
    stdout: &str,
    stderr: &str,
) {
    pod.task()
        .exec(
            ctx(),
            &api::ExecProcessRequest {
                id: id_of(bundle),
                exec_id: exec_id.into(),
                terminal,
                stdout: stdout.into(),
                stderr: stderr.into(),
                spec: Some(exec_spec(bundle, args, terminal)).into(),
                ..Default::default()
            },
        )
        .expect("exec");
}

/// Polls `f` until it holds, for at most TIMEOUT.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cgroup_file(bundle: &Bundle, controller: &str, file: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(bundle.cgroup().trim_start_matches('/'))
        .join(file)
}

/// The text of every record of a CRI log file, checking each record's format.
fn cri_log_lines(path: &Path) -> Vec<(String, String)> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let ts = parts.next().expect("timestamp");
            let stream = parts.next().expect("stream").to_string();
            let tag = parts.next().expect("tag");
            let body = parts.next().unwrap_or("").to_string();
            assert!(
                ts.ends_with('Z') && ts.contains('T'),
                "timestamp {ts:?} in {line:?}"
            );
            assert!(stream == "stdout" || stream == "stderr", "{line:?}");
            assert!(tag == "F" || tag == "P", "{line:?}");
            (stream, body)
        })
        .collect()
}

#[test]
fn a_container_lives_its_whole_life_through_the_shim() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let pod = pod(&cleanup, &sink, "life-sb");
    let bundle = container(&cleanup, &pod, "life").args([
        "sh",
        "-c",
        "echo started; echo warning >&2; trap 'echo bye; exit 42' TERM; while :; do sleep 0.1; done",
    ]);
    let id = id_of(&bundle);
    let log = cleanup.work_dir().join("life.log");

    // Create and start: output lands in the CRI log, written by the shim.
    let pid = create(&pod, &bundle, &cri_log_uri(&log), &cri_log_uri(&log));
    assert!(pid > 0);
    assert_eq!(
        state(&pod, &id, "").status.enum_value(),
        Ok(Status::CREATED)
    );
    assert_eq!(start(&pod, &id, ""), pid);
    assert_eq!(
        state(&pod, &id, "").status.enum_value(),
        Ok(Status::RUNNING)
    );
    eventually("the container's output in its CRI log", || {
        cri_log_lines(&log).len() >= 2
    });
    let lines = cri_log_lines(&log);
    assert!(
        lines.contains(&("stdout".into(), "started".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "warning".into())),
        "{lines:?}"
    );

    // Exec without a terminal: streams kept apart, exact exit code.
    let (out, err) = (
        cleanup.work_dir().join("exec.out"),
        cleanup.work_dir().join("exec.err"),
    );
    exec(
        &pod,
        &bundle,
        "plain",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
        &file_uri(&out),
        &file_uri(&err),
    );
    let exec_pid = start(&pod, &id, "plain");
    assert!(exec_pid > 0 && exec_pid != pid);
    assert_eq!(wait(&pod, &id, "plain"), 3);
    assert_eq!(fs::read_to_string(&out).expect("exec stdout"), "out\n");
    assert_eq!(fs::read_to_string(&err).expect("exec stderr"), "err\n");
    assert_eq!(
        state(&pod, &id, "plain").status.enum_value(),
        Ok(Status::STOPPED)
    );
    assert_eq!(delete(&pod, &id, "plain").exit_status, 3);

    // Exec with a terminal: the resize reaches it.
    let tty_out = cleanup.work_dir().join("tty.out");
    exec(
        &pod,
        &bundle,
        "tty",
        &["sh", "-c", "sleep 0.5; stty size"],
        true,
        &file_uri(&tty_out),
        "",
    );
    start(&pod, &id, "tty");
    pod.task()
        .resize_pty(
            ctx(),
            &api::ResizePtyRequest {
                id: id.clone(),
                exec_id: "tty".into(),
                width: 101,
                height: 37,
                ..Default::default()
            },
        )
        .expect("resize");
    assert_eq!(wait(&pod, &id, "tty"), 0);
    let tty_text = fs::read_to_string(&tty_out).expect("tty output");
    assert_eq!(tty_text.trim(), "37 101", "{tty_text:?}");
    delete(&pod, &id, "tty");

    // Pids: the init and the sleep it runs, all in the container.
    let pids = pod
        .task()
        .pids(
            ctx(),
            &api::PidsRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .expect("pids");
    let pids: Vec<u32> = pids.processes.iter().map(|p| p.pid).collect();
    assert!(pids.contains(&pid), "{pids:?}");

    // Stats: cgroup v1 metrics of the container's cgroup.
    let stats = pod
        .task()
        .stats(
            ctx(),
            &api::StatsRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .expect("stats");
    let metrics =
        corral_proto::containerd::cgroups::metrics::Metrics::parse_from_bytes(&stats.stats.value)
            .expect("v1 metrics");
    assert_eq!(stats.stats.type_url, "io.containerd.cgroups.v1.Metrics");
    assert!(metrics.memory.usage.usage > 0, "{metrics:?}");
    assert!(metrics.pids.current >= 1, "{metrics:?}");

    // Update: the new memory limit is the cgroup's.
    let resources = serde_json::json!({"memory": {"limit": 96 * 1024 * 1024}});
    pod.task()
        .update(
            ctx(),
            &api::UpdateTaskRequest {
                id: id.clone(),
                resources: Some(Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                        .into(),
                    value: serde_json::to_vec(&resources).expect("json"),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            },
        )
        .expect("update");
    let limit = fs::read_to_string(cgroup_file(&bundle, "memory", "memory.limit_in_bytes"))
        .expect("memory limit");
    assert_eq!(limit.trim(), (96 * 1024 * 1024).to_string());

    // Pause and resume: the freezer and the reported state follow.
    pod.task()
        .pause(
            ctx(),
            &api::PauseRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .expect("pause");
    assert_eq!(state(&pod, &id, "").status.enum_value(), Ok(Status::PAUSED));
    let freezer =
        fs::read_to_string(cgroup_file(&bundle, "freezer", "freezer.state")).expect("freezer");
    assert_eq!(freezer.trim(), "FROZEN");
    pod.task()
        .resume(
            ctx(),
            &api::ResumeRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .expect("resume");
    assert_eq!(
        state(&pod, &id, "").status.enum_value(),
        Ok(Status::RUNNING)
    );

    // Kill with SIGTERM: the trap's exit code, exactly.
    kill(&pod, &id, "", libc::SIGTERM);
    assert_eq!(wait(&pod, &id, ""), 42);
    let stopped = state(&pod, &id, "");
    assert_eq!(stopped.status.enum_value(), Ok(Status::STOPPED));
    assert_eq!(stopped.exit_status, 42);
    assert!(stopped.exited_at.is_some());
    // The output written just before the exit was in the log when the exit was reported.
    assert!(cri_log_lines(&log).contains(&("stdout".into(), "bye".into())));

    let deleted = delete(&pod, &id, "");
    assert_eq!((deleted.pid, deleted.exit_status), (pid, 42));
    let gone = pod
        .task()
        .state(
            ctx(),
            &api::StateRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .expect_err("deleted");
    assert_eq!(code_of(&gone), Code::NOT_FOUND);

    // Events, in the order containerd requires.
    sink.wait_for(
        topics::TASK_DELETE_EVENT_TOPIC,
        |e| e.event.container_id() == Some(id.as_str()),
        TIMEOUT,
    )
    .expect("delete event");
    let mine: Vec<String> = sink
        .events()
        .into_iter()
        .filter(|e| e.event.container_id() == Some(id.as_str()))
        .map(|e| e.topic)
        .collect();
    let expected = [
        topics::TASK_CREATE_EVENT_TOPIC,
        topics::TASK_START_EVENT_TOPIC,
        topics::TASK_EXEC_ADDED_EVENT_TOPIC,
        topics::TASK_EXEC_STARTED_EVENT_TOPIC,
        topics::TASK_EXIT_EVENT_TOPIC,
        topics::TASK_EXEC_ADDED_EVENT_TOPIC,
        topics::TASK_EXEC_STARTED_EVENT_TOPIC,
        topics::TASK_EXIT_EVENT_TOPIC,
        topics::TASK_PAUSED_EVENT_TOPIC,
        topics::TASK_RESUMED_EVENT_TOPIC,
        topics::TASK_EXIT_EVENT_TOPIC,
        topics::TASK_DELETE_EVENT_TOPIC,
    ];
    assert_eq!(mine, expected);
    let exit = sink.events().into_iter().rev().find_map(|e| match e.event {
        Event::Exit(x) if x.container_id == id => Some(x),
        _ => None,
    });
    let exit = exit.expect("init exit event");
    assert_eq!(
        (exit.pid, exit.exit_status, exit.id.as_str()),
        (pid, 42, id.as_str())
    );
}

#[test]
fn containers_of_a_sandbox_share_its_shim_which_exits_after_the_last_one() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let pod = pod(&cleanup, &sink, "two-sb");
    let sandbox_bundle = cleanup.work_dir().join("two-sb");

    // The sandbox itself runs in the shim, as the pod's first task.
    let sandbox_req = api::CreateTaskRequest {
        id: pod.sandbox_id.clone(),
        bundle: sandbox_bundle.display().to_string(),
        options: Some(runc_options(&pod.runc_root)).into(),
        ..Default::default()
    };
    pod.task()
        .create(ctx(), &sandbox_req)
        .expect("create sandbox");
    start(&pod, &pod.sandbox_id, "");

    let a = container(&cleanup, &pod, "two-a").args(["sh", "-c", "echo a; exit 5"]);
    let b = container(&cleanup, &pod, "two-b").args(["sh", "-c", "echo b; exit 6"]);
    for bundle in [&a, &b] {
        let address = pod
            .start_container_shim(&cleanup, bundle)
            .expect("start for a container");
        assert_eq!(
            address,
            pod.shim.address(),
            "a container of the pod got another shim"
        );
    }
    let (log_a, log_b) = (
        cleanup.work_dir().join("a.log"),
        cleanup.work_dir().join("b.log"),
    );
    create(&pod, &a, &cri_log_uri(&log_a), &cri_log_uri(&log_a));
    create(&pod, &b, &cri_log_uri(&log_b), &cri_log_uri(&log_b));
    start(&pod, &id_of(&a), "");
    start(&pod, &id_of(&b), "");
    assert_eq!(wait(&pod, &id_of(&a), ""), 5);
    assert_eq!(wait(&pod, &id_of(&b), ""), 6);
    assert_eq!(
        cri_log_lines(&log_a),
        vec![("stdout".to_string(), "a".to_string())]
    );
    assert_eq!(
        cri_log_lines(&log_b),
        vec![("stdout".to_string(), "b".to_string())]
    );
    delete(&pod, &id_of(&a), "");
    delete(&pod, &id_of(&b), "");

    // Shutdown while the sandbox still runs is refused silently: the shim stays.
    let _ = pod.task().shutdown(
        ctx(),
        &api::ShutdownRequest {
            id: pod.sandbox_id.clone(),
            ..Default::default()
        },
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(pod.shim.is_alive(), "the shim exited while its sandbox ran");

    kill(&pod, &pod.sandbox_id, "", libc::SIGKILL);
    assert_eq!(wait(&pod, &pod.sandbox_id, ""), 137);
    delete(&pod, &pod.sandbox_id, "");
    pod.shutdown()
        .expect("the shim exits after its last container");
    assert!(!pod.shim.is_alive());
    let socket = pod.shim.address().trim_start_matches("unix://").to_string();
    assert!(
        !Path::new(&socket).exists(),
        "the shim left its socket {socket}"
    );
}

#[test]
fn delete_after_the_shim_was_killed_reports_137_and_cleans_up() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let pod = pod(&cleanup, &sink, "dead-sb");
    // The rootfs comes as a mount the shim makes, as containerd passes a
    // snapshot: the shim must undo it even after dying.
    let image = cleanup.busybox_rootfs("dead-image").expect("rootfs");
    let dir = cleanup.work_dir().join("dead");
    fs::create_dir_all(dir.join("rootfs")).expect("mkdir rootfs");
    cleanup.track_mount(dir.join("rootfs"));
    let bundle = cleanup
        .bundle("dead", dir.join("rootfs"))
        .annotation(SANDBOX_ID, pod.sandbox_id.as_str())
        .args(["sleep", "1000"]);
    bundle.write().expect("write bundle");
    let id = id_of(&bundle);
    let mut req = pod.create_request(&bundle, "", "").expect("request");
    req.rootfs = vec![corral_proto::containerd::api::Mount {
        type_: "bind".into(),
        source: image.path().display().to_string(),
        options: vec!["rbind".into(), "rw".into()],
        ..Default::default()
    }];
    let pid = pod.task().create(ctx(), &req).expect("create").pid;
    start(&pod, &id, "");
    let rootfs = dir.join("rootfs").display().to_string();
    let mounted = || {
        fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .contains(&format!(" {rootfs} "))
    };
    assert!(mounted(), "the shim did not mount the rootfs");

    pod.shim
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill the shim");
    pod.shim.wait_exit(TIMEOUT).expect("the shim dies");

    let mut command = pod.command.clone();
    command.id = id.clone();
    command.bundle = bundle.dir().to_path_buf();
    let deleted = command.delete().expect("delete action");
    assert_eq!(deleted.exit_status, 137);
    assert_eq!(deleted.pid, pid);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (now - deleted.exited_at.seconds).abs() < 60,
        "exited_at {:?}",
        deleted.exited_at
    );

    // runc no longer knows the container, its process is gone, its rootfs unmounted.
    let listed = std::process::Command::new("runc")
        .arg("--root")
        .arg(pod.runc_root.join(&pod.namespace))
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !listed.lines().any(|l| l == id),
        "runc still lists {id}: {listed}"
    );
    eventually("the container's process to be gone", || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    });
    assert!(!mounted(), "the rootfs is still mounted after delete");
}

/// The code of a failed call, or a panic naming `what` if it succeeded.
fn code<T: std::fmt::Debug>(what: &str, r: corral_e2e::Result<T>) -> Code {
    let err = r.expect_err(what);
    err.rpc_code()
        .unwrap_or_else(|| panic!("{what}: not an RPC status: {err}"))
}

/// A Create of `bundle` (written as is) with `options` as runtime options.
fn try_create(pod: &PodShim, bundle: &Path, id: &str, options: Any) -> corral_e2e::Result<u32> {
    let req = api::CreateTaskRequest {
        id: id.into(),
        bundle: bundle.display().to_string(),
        options: Some(options).into(),
        ..Default::default()
    };
    pod.task()
        .create(ctx(), &req)
        .map(|r| r.pid)
        .map_err(rpc("create"))
}

fn runc_list(pod: &PodShim) -> Vec<String> {
    let listed = std::process::Command::new("runc")
        .arg("--root")
        .arg(pod.runc_root.join(&pod.namespace))
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bad_requests_get_clear_codes_and_leave_the_shim_serving() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let pod = pod(&cleanup, &sink, "bad-sb");
    let options = runc_options(&pod.runc_root);

    // A running container of the pod that every failure must leave alone.
    let good = container(&cleanup, &pod, "bad-good").args(["sleep", "1000"]);
    let good_id = id_of(&good);
    pod.create_and_start(&good, "", "").expect("good container");

    // Bundles the shim must refuse before runc sees them.
    let empty = cleanup.work_dir().join("bad-empty");
    fs::create_dir_all(&empty).expect("mkdir");
    let malformed = cleanup.work_dir().join("bad-malformed");
    fs::create_dir_all(&malformed).expect("mkdir");
    fs::write(malformed.join("config.json"), "{\"ociVersion\": ").expect("write");
    assert_eq!(
        code(
            "no config.json",
            try_create(&pod, &empty, "bad-empty", options.clone())
        ),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(
            "malformed config.json",
            try_create(&pod, &malformed, "bad-malformed", options.clone())
        ),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(
            "an id with ..",
            try_create(&pod, &malformed, "../escape", options.clone())
        ),
        Code::INVALID_ARGUMENT
    );

    // A runtime binary that does not exist: named in the error.
    let nobin = container(&cleanup, &pod, "bad-nobin").args(["true"]);
    nobin.write().expect("write");
    let missing_runtime = corral_proto::containerd::shim::oci::Options {
        binary_name: "corral-no-such-runc".into(),
        root: pod.runc_root.display().to_string(),
        ..Default::default()
    };
    let missing_runtime = Any {
        type_url: "containerd.runc.v1.Options".into(),
        value: missing_runtime.write_to_bytes().expect("encode"),
        ..Default::default()
    };
    let err =
        try_create(&pod, nobin.dir(), "bad-nobin", missing_runtime).expect_err("missing runtime");
    assert_eq!(err.rpc_code(), Some(Code::FAILED_PRECONDITION));
    assert!(err.to_string().contains("corral-no-such-runc"), "{err}");

    // A process runc cannot start: runc's reason comes back.
    let noexec = container(&cleanup, &pod, "bad-noexec").args(["/no/such/binary"]);
    let err = pod
        .create_and_start(&noexec, "", "")
        .expect_err("missing executable");
    assert!(err.to_string().contains("/no/such/binary"), "{err}");

    // A stdout scheme nobody speaks.
    let bad_uri = container(&cleanup, &pod, "bad-uri").args(["true"]);
    assert_eq!(
        code(
            "binary:// stdout",
            pod.create_and_start(&bad_uri, "binary:///bin/logger", "")
        ),
        Code::INVALID_ARGUMENT
    );

    // Unknown ids, a second Create, a duplicate exec, calls out of order.
    assert_eq!(
        code("start of unknown", pod.start_task("nope", "")),
        Code::NOT_FOUND
    );
    assert_eq!(
        code("kill of unknown", pod.kill("nope", "", libc::SIGKILL)),
        Code::NOT_FOUND
    );
    assert_eq!(
        code("delete of unknown", pod.delete("nope", "")),
        Code::NOT_FOUND
    );
    assert_eq!(
        code("wait of unknown", pod.wait("nope", "")),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(
            "second create",
            try_create(&pod, good.dir(), &good_id, options.clone())
        ),
        Code::ALREADY_EXISTS
    );
    assert_eq!(
        code("start of a running task", pod.start_task(&good_id, "")),
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code("delete of a running task", pod.delete(&good_id, "")),
        Code::FAILED_PRECONDITION
    );
    exec(&pod, &good, "dup", &["true"], false, "", "");
    let dup = api::ExecProcessRequest {
        id: good_id.clone(),
        exec_id: "dup".into(),
        spec: Some(exec_spec(&good, &["true"], false)).into(),
        ..Default::default()
    };
    assert_eq!(
        code(
            "duplicate exec",
            pod.task().exec(ctx(), &dup).map_err(rpc("exec"))
        ),
        Code::ALREADY_EXISTS
    );
    assert_eq!(
        code("start of unknown exec", pod.start_task(&good_id, "nope")),
        Code::NOT_FOUND
    );
    let checkpoint = api::CheckpointTaskRequest {
        id: good_id.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(
            "checkpoint",
            pod.task()
                .checkpoint(ctx(), &checkpoint)
                .map_err(rpc("checkpoint"))
        ),
        Code::UNIMPLEMENTED
    );

    // The failures left no runc container behind, and the shim still serves.
    assert_eq!(runc_list(&pod), vec![good_id.clone()]);
    assert_eq!(
        state(&pod, &good_id, "").status.enum_value(),
        Ok(Status::RUNNING)
    );
    let after = container(&cleanup, &pod, "bad-after").args(["sh", "-c", "exit 9"]);
    assert_eq!(
        pod.run_to_exit(&after, "", "")
            .expect("a good container after the bad ones"),
        9
    );

    pod.stop_and_delete(&good_id)
        .expect("stop the good container");
    pod.shutdown().expect("shutdown");
}

#[test]
fn the_cri_log_survives_rotation_and_a_missing_daemon_and_stdin_reaches_the_process() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let pod = pod(&cleanup, &sink, "log-sb");
    let bundle = container(&cleanup, &pod, "log").args([
        "sh",
        "-c",
        "i=0; while read line; do i=$((i+1)); echo \"got $line\"; done; echo \"total $i\"",
    ]);
    let id = id_of(&bundle);
    let log = cleanup.work_dir().join("log").join("0.log");
    let stdin = cleanup.work_dir().join("log.stdin");
    nix::unistd::mkfifo(&stdin, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");

    bundle.write().expect("write");
    let mut req = pod
        .create_request(&bundle, &cri_log_uri(&log), &cri_log_uri(&log))
        .expect("request");
    req.stdin = stdin.display().to_string();
    pod.task().create(ctx(), &req).expect("create");
    start(&pod, &id, "");
    let mut input = fs::OpenOptions::new()
        .write(true)
        .open(&stdin)
        .expect("open stdin");
    writeln!(input, "one").expect("write stdin");
    eventually("the first line", || cri_log_lines(&log).len() == 1);

    // kubelet rotates: rename, then ask for a reopen.
    let rotated = log.with_extension("log.1");
    fs::rename(&log, &rotated).expect("rotate");
    let logs = LogClient::new(
        corral_e2e::shim::connect(pod.shim.address(), RPC_TIMEOUT).expect("connect"),
    );
    logs.reopen(
        ctx(),
        &ReopenRequest {
            id: id.clone(),
            ..Default::default()
        },
    )
    .expect("reopen");
    writeln!(input, "two").expect("write stdin");
    eventually("the second line in the new file", || {
        cri_log_lines(&log).len() == 1
    });

    // The daemon goes away: output keeps reaching the file.
    drop(sink);
    writeln!(input, "three").expect("write stdin");
    drop(input);
    eventually("the rest in the new file", || {
        cri_log_lines(&log).len() == 3
    });
    assert_eq!(
        cri_log_lines(&rotated),
        vec![("stdout".to_string(), "got one".to_string())]
    );
    assert_eq!(
        cri_log_lines(&log),
        vec![
            ("stdout".to_string(), "got two".to_string()),
            ("stdout".to_string(), "got three".to_string()),
            ("stdout".to_string(), "total 3".to_string()),
        ]
    );
    assert_eq!(wait(&pod, &id, ""), 0);
    let unknown = logs
        .reopen(
            ctx(),
            &ReopenRequest {
                id: "nope".into(),
                ..Default::default()
            },
        )
        .expect_err("unknown");
    assert_eq!(code_of(&unknown), Code::NOT_FOUND);
    delete(&pod, &id, "");
    pod.shutdown().expect("shutdown");
}

#[test]
fn an_oom_kill_is_published_and_reported_as_137() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let pod = pod(&cleanup, &sink, "oom-sb");
    let bundle = container(&cleanup, &pod, "oom")
        .memory_limit(16 * 1024 * 1024)
        .edit(|spec| {
            spec["linux"]["resources"]["memory"]["swap"] = serde_json::json!(16 * 1024 * 1024)
        })
        .args([
            "sh",
            "-c",
            "x=$(head -c 134217728 /dev/zero | tr '\\0' a); echo survived",
        ]);
    let id = id_of(&bundle);
    create(&pod, &bundle, "", "");
    start(&pod, &id, "");
    assert_eq!(wait(&pod, &id, ""), 137);
    sink.wait_for(
        topics::TASK_OOM_EVENT_TOPIC,
        |e| e.event.container_id() == Some(id.as_str()),
        TIMEOUT,
    )
    .expect("TaskOOM event");
    delete(&pod, &id, "");
    pod.shutdown().expect("shutdown");
}
