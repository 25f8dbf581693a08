//! What corral's shim costs over raw runc, and what one pod's shim weighs.
//!
//! A plain program (`harness = false`) that prints a table:
//!
//! - Create+Start+Wait+Delete of a `/bin/true` container through one
//!   long-lived shim, each run a fresh container of the same pod;
//! - the same steps with raw runc (`create`, `start`, wait for the init as
//!   its subreaper, `delete`) on an identical bundle;
//! - their ratio;
//! - the shim's VmRSS and VmHWM while it serves a sandbox and two containers.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo bench -p corral-e2e --bench shim        # CORRAL_BENCH_N=200 for more runs
//! ```
//!
//! `cargo bench` builds in the bench profile, which lands in `target/release`,
//! so the release shim beside it is the one measured (or `$CORRAL_BIN_DIR`).
//! Needs root. Everything it makes is removed on exit, failure included.

use std::fmt;
use std::process::ExitCode;
use std::time::Instant;

use corral_e2e::bench::{ms, ratio, Stats};
use corral_e2e::runc::ContainerIo;
use corral_e2e::task::{PodShim, CONTAINER_TYPE, SANDBOX_ID};
use corral_e2e::{bin, Bundle, BusyboxRootfs, Cleanup, Error, EventsSink, Result, Runc};
use nix::sys::prctl::set_child_subreaper;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

const RUNS_ENV: &str = "CORRAL_BENCH_N";
const DEFAULT_RUNS: usize = 50;
/// `cargo test --all-targets` runs this program too, without `--bench`: a
/// few runs prove it works without spending a benchmark's time.
const SMOKE_RUNS: usize = 3;
const WARMUP: usize = 3;

fn main() -> ExitCode {
    let runs = match runs() {
        Ok(runs) => runs,
        Err(message) => {
            eprintln!("shim bench: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(message) = bin::require_shim() {
        eprintln!("shim bench: {message}");
        return ExitCode::FAILURE;
    }
    let cleanup = match Cleanup::new() {
        Ok(cleanup) => cleanup,
        Err(e) => {
            eprintln!("shim bench: setting up: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Errors come back as values, never as panics, so that the cleanup
    // below always runs.
    let outcome = bench(&cleanup, runs);
    if let Ok(report) = &outcome {
        print!("{report}");
    }
    drop(cleanup);
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shim bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runs() -> std::result::Result<usize, String> {
    match std::env::var(RUNS_ENV) {
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{RUNS_ENV}={text:?} is not a positive number")),
        },
        Err(_) if std::env::args().any(|a| a == "--bench") => Ok(DEFAULT_RUNS),
        Err(_) => Ok(SMOKE_RUNS),
    }
}

struct Report {
    runs: usize,
    shim_binary: std::path::PathBuf,
    runc_version: String,
    shim: Stats,
    raw: Stats,
    pod_memory: Memory,
    memory_after_runs: Memory,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.runs;
        writeln!(f, "shim {}", self.shim_binary.display())?;
        writeln!(
            f,
            "/bin/true in a busybox bundle, {}, {WARMUP} warm-up runs not counted",
            self.runc_version
        )?;
        writeln!(
            f,
            "shim     create+start+wait+delete  n={n}  median {}  p95 {}",
            ms(self.shim.median),
            ms(self.shim.p95)
        )?;
        writeln!(
            f,
            "raw runc create+start+wait+delete  n={n}  median {}  p95 {}",
            ms(self.raw.median),
            ms(self.raw.p95)
        )?;
        writeln!(
            f,
            "ratio (shim/raw)                          median {:.2}     p95 {:.2}",
            ratio(self.shim.median, self.raw.median),
            ratio(self.shim.p95, self.raw.p95)
        )?;
        writeln!(
            f,
            "shim RSS with sandbox + 2 containers:   {}",
            self.pod_memory
        )?;
        writeln!(
            f,
            "shim RSS after {:>3} more containers:    {}",
            n + WARMUP,
            self.memory_after_runs
        )
    }
}

struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    /// Proportional share: libc's pages count once across every process
    /// that maps them; what one more pod really costs the node.
    pss_kib: u64,
    anon_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Result<Memory> {
        let status = read_kib_fields(&format!("/proc/{pid}/status"))?;
        let rollup = read_kib_fields(&format!("/proc/{pid}/smaps_rollup"))?;
        Ok(Memory {
            rss_kib: status("VmRSS")?,
            hwm_kib: status("VmHWM")?,
            pss_kib: rollup("Pss")?,
            anon_kib: rollup("Anonymous")?,
        })
    }
}

/// A reader of the `Name:   123 kB` lines of a /proc file.
fn read_kib_fields(path: &str) -> Result<impl Fn(&str) -> Result<u64>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("read {path}"),
        source,
    })?;
    let path = path.to_string();
    Ok(move |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| Error::Protocol(format!("no {name} in {path}")))
    })
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |kib: u64| kib as f64 / 1024.0;
        write!(
            f,
            "VmRSS {:.1} MiB  VmHWM {:.1} MiB  Pss {:.1} MiB  anonymous {:.1} MiB",
            mib(self.rss_kib),
            mib(self.hwm_kib),
            mib(self.pss_kib),
            mib(self.anon_kib)
        )
    }
}

fn bench(cleanup: &Cleanup, runs: usize) -> Result<Report> {
    let sink = EventsSink::start_in(cleanup)?;
    // One rootfs for every container: building one costs more than a run.
    let rootfs = cleanup.busybox_rootfs("rootfs")?;
    let sandbox_id = "sandbox";
    let sandbox = cleanup
        .bundle(sandbox_id, &rootfs)
        .args(["sleep", "1000"])
        .annotation(SANDBOX_ID, sandbox_id)
        .annotation(CONTAINER_TYPE, "sandbox");
    let pod = PodShim::start(cleanup, &sink, &sandbox)?;
    // The shim keeps runc's state in <root>/<namespace>, below the root
    // PodShim registers, where the cleanup would not look.

    pod.create_and_start(&sandbox, "", "")?;
    let mut running = vec![pod.sandbox_id.clone()];
    for name in ["app1", "app2"] {
        let bundle = member(cleanup, &rootfs, &pod.sandbox_id, name).args(["sleep", "1000"]);
        let address = pod.start_container_shim(cleanup, &bundle)?;
        if address != pod.shim.address() {
            return Err(Error::Protocol(format!(
                "container {name} of sandbox {} was sent to {address}, not to the sandbox's shim at {}",
                pod.sandbox_id,
                pod.shim.address()
            )));
        }
        // Like kubelet's containers, these log through the shim: its copier
        // threads are part of what a pod costs.
        let log = format!(
            "cri-log://{}",
            cleanup.work_dir().join(format!("{name}.log")).display()
        );
        pod.create_and_start(&bundle, &log, &log)?;
        running.push(name.to_string());
    }
    let pod_memory = Memory::of(pod.shim.pid())?;

    let raw = Runc::new(cleanup.run_dir().join("raw-runc"));
    cleanup.track_runc_root(&raw);
    let runc_version = runc_version(&raw);
    // runc create leaves the container's init behind when it exits; as the
    // init's subreaper this process can wait for it, as a shim does.
    set_child_subreaper(true).map_err(|e| Error::Io {
        context: "prctl(PR_SET_CHILD_SUBREAPER)".into(),
        source: e.into(),
    })?;
    let mut shim_samples = Vec::with_capacity(runs);
    let mut raw_samples = Vec::with_capacity(runs);
    // Interleaved, so that a disturbance on the machine hits both alike.
    for i in 0..WARMUP + runs {
        let bundle =
            member(cleanup, &rootfs, &pod.sandbox_id, &format!("shim{i}")).args(["/bin/true"]);
        bundle.write()?;
        let started = Instant::now();
        let status = pod.run_to_exit(&bundle, "", "")?;
        let shim_took = started.elapsed();
        check_status(bundle.dir().display(), status)?;

        let bundle =
            member(cleanup, &rootfs, &pod.sandbox_id, &format!("raw{i}")).args(["/bin/true"]);
        bundle.write()?;
        let started = Instant::now();
        let status = raw_run(&raw, &bundle, &format!("raw{i}"))?;
        let raw_took = started.elapsed();
        check_status(bundle.dir().display(), status)?;

        if i >= WARMUP {
            shim_samples.push(shim_took);
            raw_samples.push(raw_took);
        }
    }
    let _ = set_child_subreaper(false);
    let memory_after_runs = Memory::of(pod.shim.pid())?;

    for id in running.iter().rev() {
        pod.stop_and_delete(id)?;
    }
    pod.shutdown()?;

    Ok(Report {
        runs,
        shim_binary: pod.command.binary.clone(),
        runc_version,
        shim: Stats::of(shim_samples)?,
        raw: Stats::of(raw_samples)?,
        pod_memory,
        memory_after_runs,
    })
}

/// A bundle for container `name` of the pod, carrying the annotations by
/// which it joins the sandbox's shim; its cgroup is its own.
fn member(cleanup: &Cleanup, rootfs: &BusyboxRootfs, sandbox_id: &str, name: &str) -> Bundle {
    cleanup
        .bundle(name, rootfs)
        .annotation(SANDBOX_ID, sandbox_id)
        .annotation(CONTAINER_TYPE, "container")
}

/// `runc create`, `runc start`, wait for the init, `runc delete`; the init's
/// exit code.
fn raw_run(runc: &Runc, bundle: &Bundle, id: &str) -> Result<i32> {
    let pid = runc.create(bundle.dir(), id, ContainerIo::null())?;
    runc.start(id)?;
    let pid = i32::try_from(pid).map_err(|_| Error::Protocol(format!("runc pid {pid}")))?;
    let code = loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, signal, _)) => break 128 + signal as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(Error::Io {
                    context: format!("wait for the init {pid} of {id}"),
                    source: e.into(),
                })
            }
        }
    };
    runc.delete(id)?;
    Ok(code)
}

fn check_status(what: impl fmt::Display, status: impl Into<i64>) -> Result<()> {
    match status.into() {
        0 => Ok(()),
        status => Err(Error::Protocol(format!(
            "/bin/true in {what} exited with {status}"
        ))),
    }
}

fn runc_version(runc: &Runc) -> String {
    std::process::Command::new(runc.binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "runc (version unknown)".into())
}
