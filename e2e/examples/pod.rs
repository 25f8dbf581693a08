//! One pod through corral's shim, as a daemon would run it: a sandbox, one
//! container that prints a few lines into a CRI log file, and the events the
//! shim published along the way.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! CORRAL_BIN_DIR=$PWD/target/release cargo run --release -q -p corral-e2e --example pod
//! ```
//!
//! Needs root, runc and a static busybox (`/bin/busybox`). Everything it
//! makes lives under /run/corral-e2e and the temp dir and is removed before
//! it exits, also when a step fails; after a kill -9 the next run sweeps it.

use std::process::ExitCode;
use std::time::Duration;

use corral_e2e::task::{PodShim, CONTAINER_TYPE, SANDBOX_ID};
use corral_e2e::{bin, Cleanup, Error, EventsSink, Result};

const SCRIPT: &str = "echo hello from corral; uname -a; id";
/// A sandbox and a container, four events each: create, start, exit, delete.
const EXPECTED_EVENTS: usize = 8;

fn main() -> ExitCode {
    if let Err(message) = bin::require_shim() {
        eprintln!("{message}");
        return ExitCode::FAILURE;
    }
    let cleanup = match Cleanup::new() {
        Ok(cleanup) => cleanup,
        Err(e) => {
            eprintln!("setting up: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The release profile aborts on panic, which would skip the cleanup:
    // every step reports failure as a value instead.
    let outcome = run(&cleanup);
    drop(cleanup);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cleanup: &Cleanup) -> Result<()> {
    // Stands in for containerd's (or corrald's) event endpoint.
    let sink = EventsSink::start_in(cleanup)?;
    let rootfs = cleanup.busybox_rootfs("rootfs")?;

    let sandbox_id = "sandbox";
    let sandbox = cleanup
        .bundle(sandbox_id, &rootfs)
        .args(["sleep", "1000"])
        .hostname(Some("corral-pod"))
        .annotation(SANDBOX_ID, sandbox_id)
        .annotation(CONTAINER_TYPE, "sandbox");
    let pod = PodShim::start(cleanup, &sink, &sandbox)?;
    // The shim keeps runc's state in <root>/<namespace>, below the root
    // PodShim registers, where the cleanup would not look.
    println!(
        "shim       {} pid {}, serving {}",
        bin::SHIM,
        pod.shim.pid(),
        pod.shim.address()
    );

    let pid = pod.create_and_start(&sandbox, "", "")?;
    println!("sandbox    {sandbox_id}: `sleep 1000`, pid {pid}");

    let name = "hello";
    let container = cleanup
        .bundle(name, &rootfs)
        .args(["sh", "-c", SCRIPT])
        .hostname(Some("corral-pod"))
        .annotation(SANDBOX_ID, sandbox_id)
        .annotation(CONTAINER_TYPE, "container");
    // containerd runs the shim's `start` for every container; the
    // annotations make it answer with the sandbox's shim.
    let address = pod.start_container_shim(cleanup, &container)?;
    if address != pod.shim.address() {
        return Err(Error::Protocol(format!(
            "container {name} was given the shim at {address}, not the sandbox's"
        )));
    }
    // kubelet's layout: /var/log/pods/<pod>/<container>/<restart>.log.
    let log_dir = cleanup.work_dir().join("pods").join(sandbox_id).join(name);
    std::fs::create_dir_all(&log_dir).map_err(|source| Error::Io {
        context: format!("create {}", log_dir.display()),
        source,
    })?;
    let log = log_dir.join("0.log");
    let uri = format!("cri-log://{}", log.display());
    let pid = pod.create_and_start(&container, &uri, &uri)?;
    println!("container  {name}: `{SCRIPT}`, pid {pid}, joined the sandbox's shim");
    let status = pod.wait(name, "")?;
    pod.delete(name, "")?;
    println!("container  {name}: exited with status {status}, deleted");

    let text = std::fs::read_to_string(&log).map_err(|source| Error::Io {
        context: format!("read {}", log.display()),
        source,
    })?;
    println!("\nCRI log {} (written by the shim):", log.display());
    for line in text.lines() {
        println!("  {line}");
    }

    pod.stop_and_delete(sandbox_id)?;

    // Exit events are published while Wait returns: wait for all of them.
    let events = sink.wait_for_count(EXPECTED_EVENTS, Duration::from_secs(10))?;
    println!("\nevents the shim published, in order:");
    for event in &events {
        println!(
            "  {:<14} {}",
            event.topic,
            event.event.container_id().unwrap_or("-")
        );
    }

    pod.shutdown()?;
    println!(
        "\nsandbox stopped and deleted; shim {} exited",
        pod.shim.pid()
    );
    if status != 0 {
        return Err(Error::Protocol(format!(
            "container {name} exited with {status}"
        )));
    }
    Ok(())
}
