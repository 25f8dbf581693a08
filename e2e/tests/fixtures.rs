//! Proves the fixtures against the real things: runc, a busybox rootfs,
//! namespaces, cgroups, ttrpc. Needs root. Corral's own shim is not used
//! here: shim lifecycle tests belong with the shim.

use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_e2e::cleanup::{cgroup_hierarchies, CGROUP_PARENT};
use corral_e2e::events::Event;
use corral_e2e::rootfs::{BusyboxRootfs, Flavor};
use corral_e2e::runc::ContainerIo;
use corral_e2e::shim::{BootstrapForm, ShimCommand, ShimStdin};
use corral_e2e::{Cleanup, EventsSink};
use corral_proto::containerd::events::task::TaskExit;
use corral_proto::containerd::shim::event::Envelope;
use corral_proto::containerd::shim::events::ForwardRequest;
use corral_proto::containerd::shim::shim::{CreateTaskRequest, ShutdownRequest};
use corral_proto::containerd::shim_sync::EventsClient;
use corral_proto::protobuf::well_known_types::any::Any;
use corral_proto::protobuf::{Message, MessageFull};
use corral_proto::ttrpc;

const TIMEOUT: Duration = Duration::from_secs(10);

/// What a test leaves that must be gone once its `Cleanup` dropped.
struct Footprint {
    paths: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
}

impl Footprint {
    fn of(cleanup: &Cleanup) -> Self {
        let subtree = format!("{CGROUP_PARENT}/{}", cleanup.unique());
        Footprint {
            paths: vec![cleanup.run_dir().into(), cleanup.work_dir().into()],
            cgroups: cgroup_hierarchies()
                .iter()
                .map(|h| h.join(subtree.trim_start_matches('/')))
                .collect(),
        }
    }

    fn assert_gone(&self) {
        for path in self.paths.iter().chain(&self.cgroups) {
            assert!(!path.exists(), "{} survived the cleanup", path.display());
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        for path in &self.paths {
            assert!(
                !mounts.contains(&*path.to_string_lossy()),
                "a mount under {} survived",
                path.display()
            );
        }
    }
}

fn cgroup_exists(controller: &str, cgroup: &str) -> bool {
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(cgroup.trim_start_matches('/'))
        .is_dir()
}

#[test]
fn runc_run_prints_hello_and_uid_and_cleans_up() {
    let cleanup = Cleanup::new().expect("cleanup");
    let footprint = Footprint::of(&cleanup);
    let bundle =
        cleanup
            .busybox_bundle("run")
            .expect("rootfs")
            .args(["sh", "-c", "echo hello; id -u"]);
    bundle.write().expect("write bundle");
    let runc = cleanup.runc();
    let id = cleanup.name("run");

    let out = runc.run(bundle.dir(), &id).expect("runc run");

    assert!(out.status.success(), "runc run failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n0\n");
    drop(cleanup);
    footprint.assert_gone();
}

#[test]
fn runc_create_start_delete() {
    let cleanup = Cleanup::new().expect("cleanup");
    let footprint = Footprint::of(&cleanup);
    let bundle =
        cleanup
            .busybox_bundle("create")
            .expect("rootfs")
            .args(["sh", "-c", "echo hello; id -u"]);
    bundle.write().expect("write bundle");
    let runc = cleanup.runc();
    let id = cleanup.name("c");
    let stdout = bundle.dir().join("stdout");
    let io = ContainerIo::files(&stdout, &bundle.dir().join("stderr")).expect("stdio files");

    let pid = runc.create(bundle.dir(), &id, io).expect("runc create");
    let state = runc.state(&id).expect("state");
    assert_eq!((state.status.as_str(), state.pid), ("created", pid));
    assert!(cgroup_exists("memory", bundle.cgroup()), "no memory cgroup");
    runc.start(&id).expect("runc start");
    runc.wait_status(&id, "stopped", TIMEOUT)
        .expect("container stops");
    runc.delete(&id).expect("runc delete");

    assert_eq!(
        std::fs::read_to_string(&stdout).expect("stdout"),
        "hello\n0\n"
    );
    assert!(runc.list_ids().expect("list").is_empty());
    assert!(
        !cgroup_exists("memory", bundle.cgroup()),
        "runc delete left the cgroup"
    );
    drop(cleanup);
    footprint.assert_gone();
}

#[test]
fn bundle_user_readonly_rootfs_and_memory_limit_reach_the_container() {
    let cleanup = Cleanup::new().expect("cleanup");
    let script = "id -u; id -g; whoami; \
                  touch /x 2>/dev/null && echo writable || echo readonly; \
                  cat /sys/fs/cgroup/memory/memory.limit_in_bytes; hostname";
    let bundle = cleanup
        .busybox_bundle("user")
        .expect("rootfs")
        .args(["sh", "-c", script])
        .user(1000, 1000)
        .readonly_rootfs(true)
        .memory_limit(64 << 20);
    bundle.write().expect("write bundle");

    let out = cleanup
        .runc()
        .run(bundle.dir(), &cleanup.name("u"))
        .expect("runc run");

    assert!(out.status.success(), "runc run failed: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("1000\n1000\nuser\nreadonly\n{}\ncorral-e2e\n", 64 << 20)
    );
}

#[test]
fn cleanup_after_a_panic_removes_a_running_container() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cleanup = Cleanup::new().expect("cleanup");
        let bundle = cleanup
            .busybox_bundle("panic")
            .expect("rootfs")
            .args(["sleep", "1000"]);
        bundle.write().expect("write bundle");
        let runc = cleanup.runc();
        let id = cleanup.name("p");
        let pid = runc
            .create(bundle.dir(), &id, ContainerIo::null())
            .expect("runc create");
        runc.start(&id).expect("runc start");
        seen = Some((Footprint::of(&cleanup), pid, bundle.cgroup().to_string()));
        panic!("the test failed while its container ran");
    }));

    assert!(result.is_err());
    let (footprint, pid, cgroup) = seen.expect("the test got as far as the panic");
    footprint.assert_gone();
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
    assert!(!cgroup_exists("memory", &cgroup));
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[test]
fn stale_leftovers_of_a_dead_test_process_are_swept() {
    let cleanup = Cleanup::new().expect("cleanup");
    // A pid that existed and is now gone stands for a test binary killed by SIGKILL.
    let mut child = std::process::Command::new("true").spawn().expect("spawn");
    let dead = child.id();
    child.wait().expect("wait");
    let name = format!("{dead}-0-abcdef");
    let dir = Path::new(corral_e2e::cleanup::RUN_BASE).join(&name);
    std::fs::create_dir_all(dir.join("runc")).expect("stale dir");
    let cgroup = Path::new("/sys/fs/cgroup/pids")
        .join(CGROUP_PARENT.trim_start_matches('/'))
        .join(&name);
    std::fs::create_dir_all(cgroup.join("child")).expect("stale cgroup");

    let problems = corral_e2e::cleanup::sweep_stale();

    assert!(problems.is_empty(), "{problems:?}");
    assert!(!dir.exists() && !cgroup.exists());
    assert!(
        cleanup.run_dir().exists(),
        "a live test's directory was swept"
    );
}

#[test]
fn busybox_rootfs_has_applets_users_and_dirs() {
    let cleanup = Cleanup::new().expect("cleanup");
    let rootfs = cleanup.busybox_rootfs("rootfs").expect("rootfs");
    let root = rootfs.path();
    assert_eq!(rootfs.flavor(), Flavor::Static);
    for path in [
        "bin/sh",
        "bin/ls",
        "usr/bin/env",
        "tmp",
        "proc",
        "dev",
        "sys",
    ] {
        assert!(root.join(path).symlink_metadata().is_ok(), "{path} missing");
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    for user in ["root:x:0:0", "user:x:1000:1000", "nobody:x:65534"] {
        assert!(passwd.contains(user), "{user} missing from passwd");
    }
    assert!(root.join("etc/group").is_file() && root.join("etc/hostname").is_file());
}

#[test]
fn dynamic_busybox_runs_with_its_libc() {
    let cleanup = Cleanup::new().expect("cleanup");
    let dir = cleanup.work_dir().join("dyn");
    let rootfs = match BusyboxRootfs::build_dynamic(dir.join("rootfs")) {
        Ok(rootfs) => rootfs,
        Err(corral_e2e::Error::Unavailable(why)) => {
            eprintln!("skipped: dynamic busybox unavailable: {why}");
            return;
        }
        Err(e) => panic!("dynamic rootfs: {e}"),
    };
    assert!(rootfs.path().join("lib64/ld-linux-x86-64.so.2").is_file());
    let bundle = corral_e2e::Bundle::new(&dir, &rootfs)
        .cgroups_path(cleanup.cgroup_path("dyn"))
        .args(["sh", "-c", "echo dynamic"]);
    bundle.write().expect("write bundle");

    let out = cleanup
        .runc()
        .run(bundle.dir(), &cleanup.name("d"))
        .expect("runc run");

    assert!(out.status.success(), "runc run failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "dynamic\n");
}

fn exit_envelope(namespace: &str, container: &str, status: u32) -> ForwardRequest {
    let exit = TaskExit {
        container_id: container.into(),
        exit_status: status,
        ..Default::default()
    };
    let envelope = Envelope {
        namespace: namespace.into(),
        topic: "/tasks/exit".into(),
        event: Some(Any {
            type_url: TaskExit::descriptor().full_name().into(),
            value: exit.write_to_bytes().expect("encode"),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    ForwardRequest {
        envelope: Some(envelope).into(),
        ..Default::default()
    }
}

#[test]
fn events_sink_records_a_forward_call() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let client = EventsClient::new(ttrpc::Client::connect(&sink.address()).expect("connect"));

    client
        .forward(
            ttrpc::context::with_duration(TIMEOUT),
            &exit_envelope("ns", "c1", 7),
        )
        .expect("forward");

    let got = sink
        .wait_for(
            "/tasks/exit",
            |e| e.event.container_id() == Some("c1"),
            TIMEOUT,
        )
        .expect("event arrives");
    assert_eq!(got.namespace, "ns");
    assert!(matches!(&got.event, Event::Exit(exit) if exit.exit_status == 7));
    assert!(sink
        .wait_for(
            "/tasks/exit",
            |e| e.event.container_id() == Some("c2"),
            Duration::from_millis(50)
        )
        .is_err());

    let socket = sink.socket_path().to_path_buf();
    drop(sink);
    assert!(!socket.exists(), "the sink left its socket");
}

#[test]
fn events_sink_keeps_the_order_of_100_events() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let client = EventsClient::new(ttrpc::Client::connect(&sink.address()).expect("connect"));
    let topics = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ];

    for i in 0..100u32 {
        let mut req = exit_envelope("ns", &format!("c{i}"), i);
        req.mut_envelope().topic = topics[i as usize % 4].into();
        client
            .forward(ttrpc::context::with_duration(TIMEOUT), &req)
            .expect("forward");
    }

    let events = sink.wait_for_count(100, TIMEOUT).expect("all arrive");
    let ids: Vec<String> = events
        .iter()
        .map(|e| e.event.container_id().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, (0..100).map(|i| format!("c{i}")).collect::<Vec<_>>());
    let expected: Vec<&str> = (0..100).map(|i| topics[i % 4]).collect();
    assert_eq!(sink.topics(), expected);
}

#[test]
fn events_sink_can_refuse_events() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let client = EventsClient::new(ttrpc::Client::connect(&sink.address()).expect("connect"));
    sink.reject(true);
    let ctx = || ttrpc::context::with_duration(TIMEOUT);
    assert!(client.forward(ctx(), &exit_envelope("ns", "a", 0)).is_err());
    sink.reject(false);
    client
        .forward(ctx(), &exit_envelope("ns", "b", 0))
        .expect("forward");
    assert_eq!(sink.len(), 1);
}

/// The shim fixture against a minimal shim built on the containerd-shim crate,
/// the bootstrap library corral's shim uses too.
fn fake_shim_command(cleanup: &Cleanup, sink: &EventsSink, stdin: ShimStdin) -> ShimCommand {
    let bundle = cleanup.work_dir().join(cleanup.local_name("bundle"));
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    let mut cmd = ShimCommand::new(
        env!("CARGO_BIN_EXE_corral-e2e-fake-shim"),
        cleanup.name("ns"),
        cleanup.name("task"),
        &bundle,
        cleanup.run_dir().join("containerd.sock").to_string_lossy(),
        sink.socket_path().to_string_lossy(),
    );
    cmd.stdin = stdin;
    cmd
}

#[test]
fn shim_fixture_starts_connects_publishes_and_deletes() {
    let cleanup = Cleanup::new().expect("cleanup");
    let footprint = Footprint::of(&cleanup);
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let cmd = fake_shim_command(&cleanup, &sink, ShimStdin::Empty);

    let shim = cmd.start(&cleanup).expect("shim start");

    assert_eq!(shim.bootstrap().form, BootstrapForm::Json);
    assert_eq!(shim.bootstrap().version, 3);
    assert_eq!(
        shim.connect_response().map(|c| c.shim_pid),
        Some(shim.pid())
    );
    assert!(shim.is_alive());
    let ctx = || ttrpc::context::with_duration(TIMEOUT);
    shim.task()
        .create(
            ctx(),
            &CreateTaskRequest {
                id: "ctr".into(),
                bundle: cmd.bundle.to_string_lossy().into(),
                ..Default::default()
            },
        )
        .expect("create");
    let created = sink
        .wait_for(
            "/tasks/create",
            |e| e.event.container_id() == Some("ctr"),
            TIMEOUT,
        )
        .expect("create event");
    assert_eq!(created.namespace, cmd.namespace);
    assert!(created.timestamp.is_some());
    assert!(
        shim.log().contains("fake shim serving"),
        "log: {:?}",
        shim.log()
    );

    let again = shim.connect_again().expect("second connection");
    let _ = again.shutdown(ctx(), &ShutdownRequest::default());
    shim.wait_exit(TIMEOUT).expect("shim exits on Shutdown");
    let deleted = cmd.delete().expect("delete action");
    assert_eq!(deleted.exit_status, 137);

    let socket = corral_e2e::shim::socket_path(shim.address()).expect("socket path");
    drop(shim);
    drop(sink);
    drop(cleanup);
    footprint.assert_gone();
    assert!(!socket.exists(), "the shim socket survived");
}

#[test]
fn shim_fixture_kills_a_shim_left_running() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let params = corral_proto::containerd::bootstrap_api::BootstrapParams::default();
    let mut cmd = fake_shim_command(&cleanup, &sink, ShimStdin::Empty);
    // containerd 2.3's protobuf bootstrap: the reply is a BootstrapResult.
    cmd.stdin = ShimStdin::Bootstrap(corral_proto::containerd::bootstrap_api::BootstrapParams {
        instance_id: cmd.id.clone(),
        namespace: cmd.namespace.clone(),
        containerd_ttrpc_address: cmd.ttrpc_address.clone(),
        containerd_grpc_address: cmd.daemon_address.clone(),
        ..params
    });

    let shim = cmd.start(&cleanup).expect("shim start");
    assert_eq!(shim.bootstrap().form, BootstrapForm::Protobuf);
    let pid = shim.pid();
    drop(shim);
    drop(sink);
    drop(cleanup);

    assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
}

#[test]
fn bin_dir_is_the_profile_dir_of_this_test() {
    let dir = corral_e2e::bin::bin_dir();
    let exe = std::env::current_exe().expect("current exe");
    assert!(
        exe.starts_with(&dir),
        "{} not under {}",
        exe.display(),
        dir.display()
    );
    assert!(
        dir.join("corral-e2e-fake-shim").is_file() || std::env::var_os("CORRAL_BIN_DIR").is_some()
    );
}

#[test]
fn cleanup_removes_the_socket_of_a_server_it_kills() {
    let cleanup = Cleanup::new().expect("cleanup");
    let sink = EventsSink::start_in(&cleanup).expect("events sink");
    let bundle = cleanup.work_dir().join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    // A plain file: the shim logs into it without anyone draining a FIFO.
    std::fs::write(bundle.join("log"), "").expect("log file");
    // Outside the test's directories, like a shim socket under /run/containerd/s.
    let socket = PathBuf::from(format!("/run/corral-e2e-{}.sock", cleanup.unique()));
    // The server half of a shim, as `start` would spawn it, but by hand and
    // never registered: only its working directory ties it to the test.
    // Not waited for here: reaping it is the cleanup's job under test.
    #[allow(clippy::zombie_processes)]
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_corral-e2e-fake-shim"))
        .args([
            "-namespace",
            "ns",
            "-id",
            "x",
            "-address",
            "/nowhere",
            "-socket",
        ])
        .arg(format!("unix://{}", socket.display()))
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", sink.socket_path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn server");
    let deadline = std::time::Instant::now() + TIMEOUT;
    // Connectable, not merely present: bound but not yet listening is not a
    // listening socket yet.
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never listened"
        );
        assert!(
            server.try_wait().expect("try_wait").is_none(),
            "the server exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    drop(cleanup);

    let survived = socket.exists();
    // Outside every directory a cleanup or sweep owns: a failure must not leak it.
    let _ = std::fs::remove_file(&socket);
    assert!(!survived, "the killed server's socket survived");
    // The cleanup reaped it, being its parent.
    assert!(!Path::new(&format!("/proc/{}", server.id())).exists());
}
