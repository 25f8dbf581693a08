//! How fast corrald pulls an image, next to containerd.
//!
//! A plain program (`harness = false`) that builds a 3-layer image of about
//! 50 MiB of incompressible bytes (uncompressed tar layers, so that no
//! decompressor speed hides in the figures), pushes it to a fresh Debian
//! `docker-registry` on 127.0.0.1, and prints:
//!
//! - cold pull: PullImage over corrald's CRI socket, a new daemon on a new
//!   root each run; time and MB/s of image bytes;
//! - warm re-pull: the same PullImage again on that daemon;
//! - unpack: the image store's own figure (`pull_with_stats`: tar bytes
//!   through the unpacker per second of unpacker time), in this process on
//!   a new root each run;
//! - containerd: Debian's `ctr images pull --plain-http` (fetch and unpack
//!   into overlayfs snapshots) against a new `containerd` with its own root,
//!   state and socket each run, when both are installed; and the ratio.
//!
//! ```sh
//! cargo build --release -p corral-cri --bins
//! cargo bench -p corral-e2e --bench images   # CORRAL_BENCH_N=5, CORRAL_BENCH_IMAGE_MIB=50
//! ```
//!
//! The three pulls are interleaved per run so that a disturbance hits them
//! alike, after one warm-up round that puts the registry's files in the page
//! cache for all of them. Needs root. Everything it starts is stopped and
//! everything it makes is removed on exit, failure included: errors are
//! values here, since the bench profile aborts on panic.

use std::fmt;
use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use corral_e2e::bench::{count, ms, ratio, Stats};
use corral_e2e::cleanup::mounts_under;
use corral_e2e::cri::{api, Daemon};
use corral_e2e::image_builder::{noise, BuiltImage, Layer, Tar};
use corral_e2e::registry::Registry;
use corral_e2e::{bin, Cleanup};
use corral_runtime::image::{ImageStore, StoreOptions};

const RUNS_ENV: &str = "CORRAL_BENCH_N";
const SIZE_ENV: &str = "CORRAL_BENCH_IMAGE_MIB";
const DEFAULT_RUNS: usize = 5;
const DEFAULT_MIB: usize = 50;
/// `cargo test --all-targets` runs this program too, without `--bench`: one
/// small round proves it works without spending a benchmark's time.
const SMOKE_RUNS: usize = 1;
const SMOKE_MIB: usize = 3;
/// How the image's bytes are split over its three layers, in parts.
const LAYER_PARTS: [usize; 3] = [5, 3, 2];
/// Files per layer are at most this large, as in a real image.
const FILE_BYTES: usize = 2 << 20;
const REPOSITORY: &str = "bench/app";
const TAG: &str = "v1";
const CONTAINERD: &str = "/usr/bin/containerd";
const CTR: &str = "/usr/bin/ctr";
const TIMEOUT: Duration = Duration::from_secs(120);

type Result<T, E = String> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let sizes = count(RUNS_ENV, DEFAULT_RUNS, SMOKE_RUNS, bench_mode)
        .and_then(|runs| Ok((runs, count(SIZE_ENV, DEFAULT_MIB, SMOKE_MIB, bench_mode)?)));
    let (runs, mib) = match sizes {
        Ok(sizes) => sizes,
        Err(message) => return failed(&message),
    };
    let Some(corrald) = bin::try_binary(bin::DAEMON) else {
        return failed(&format!(
            "{} not found in {}: run `cargo build --release -p corral-cri --bins` first, \
             or point {} at the directory that holds it",
            bin::DAEMON,
            bin::bin_dir().display(),
            bin::BIN_DIR_ENV
        ));
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return failed(&format!("tokio runtime: {e}")),
    };
    let cleanup = match Cleanup::new() {
        Ok(cleanup) => cleanup,
        Err(e) => return failed(&format!("setting up: {e}")),
    };
    let warmup = usize::from(bench_mode);
    let outcome = bench(&rt, &cleanup, runs, warmup, mib);
    if let Ok(report) = &outcome {
        println!("corrald {}", corrald.display());
        print!("{report}");
    }
    drop(cleanup);
    drop(rt);
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => failed(&e),
    }
}

fn failed(message: &str) -> ExitCode {
    eprintln!("images bench failed: {message}");
    ExitCode::FAILURE
}

struct Report {
    reference: String,
    image_bytes: u64,
    layers: usize,
    runs: usize,
    warmup: usize,
    cold: Stats,
    warm: Stats,
    /// The store's unpacker time per pull, and the tar bytes it went through.
    unpack: Stats,
    unpacked_bytes: u64,
    /// The whole in-process pull, for comparison with the one over CRI.
    in_process: Stats,
    containerd: Result<(String, Stats)>,
}

/// Megabytes (10^6 bytes) per second.
fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(f64::MIN_POSITIVE)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} layers, {:.1} MB of uncompressed tar and config (incompressible), \
             Debian docker-registry on loopback",
            self.reference,
            self.layers,
            self.image_bytes as f64 / 1e6
        )?;
        writeln!(
            f,
            "n={}, {} warm-up round(s) not counted; MB = 10^6 bytes",
            self.runs, self.warmup
        )?;
        let bytes = self.image_bytes;
        let row = |f: &mut fmt::Formatter<'_>, what: &str, s: &Stats, mbs: Option<f64>| {
            let rate = mbs.map(|r| format!("{r:8.1} MB/s")).unwrap_or_default();
            writeln!(
                f,
                "{what:<48} median {}  p95 {}  {rate}",
                ms(s.median),
                ms(s.p95)
            )
        };
        row(
            f,
            "corral cold pull (CRI PullImage, new root)",
            &self.cold,
            Some(mb_per_s(bytes, self.cold.median)),
        )?;
        row(f, "corral warm re-pull (same daemon)", &self.warm, None)?;
        row(
            f,
            "corral pull in-process (ImageStore, new root)",
            &self.in_process,
            Some(mb_per_s(bytes, self.in_process.median)),
        )?;
        row(
            f,
            "corral unpack (unpacker time, all layers)",
            &self.unpack,
            Some(mb_per_s(self.unpacked_bytes, self.unpack.median)),
        )?;
        match &self.containerd {
            Ok((version, stats)) => {
                row(
                    f,
                    "containerd ctr images pull --plain-http",
                    stats,
                    Some(mb_per_s(bytes, stats.median)),
                )?;
                writeln!(
                    f,
                    "{:<48} median {:.2}      p95 {:.2}   ({version})",
                    "ratio corral cold / containerd",
                    ratio(self.cold.median, stats.median),
                    ratio(self.cold.p95, stats.p95)
                )
            }
            Err(why) => writeln!(f, "containerd: not measured: {why}"),
        }
    }
}

fn bench(
    rt: &tokio::runtime::Runtime,
    cleanup: &Cleanup,
    runs: usize,
    warmup: usize,
    mib: usize,
) -> Result<Report> {
    let image = build_image(mib)?;
    let registry = Registry::start(cleanup.work_dir().join("registry"))
        .map_err(|e| format!("registry: {e}"))?;
    let pushed = registry
        .push_image(REPOSITORY, TAG, &image)
        .map_err(|e| format!("push: {e}"))?;
    let reference = pushed.reference.clone();
    let containerd_version = containerd_available();

    let mut cold = Vec::with_capacity(runs);
    let mut warm = Vec::with_capacity(runs);
    let mut unpack = Vec::with_capacity(runs);
    let mut in_process = Vec::with_capacity(runs);
    let mut unpacked_bytes = 0;
    let mut containerd = Vec::with_capacity(runs);
    for round in 0..warmup + runs {
        let (c, w) = rt.block_on(corrald_pulls(cleanup, &reference, round))?;
        let stats = rt.block_on(in_process_pull(cleanup, &reference, round))?;
        let ctr = match &containerd_version {
            Ok(_) => Some(ctr_pull(cleanup, &reference, round)?),
            Err(_) => None,
        };
        if round < warmup {
            continue;
        }
        cold.push(c);
        warm.push(w);
        in_process.push(stats.elapsed);
        unpack.push(stats.unpack_time);
        unpacked_bytes = stats.unpacked_bytes;
        containerd.extend(ctr);
    }
    drop(registry);

    let stats = |samples| Stats::of(samples).map_err(|e| e.to_string());
    Ok(Report {
        reference,
        image_bytes: image.size(),
        layers: image.layers.len(),
        runs,
        warmup,
        cold: stats(cold)?,
        warm: stats(warm)?,
        unpack: stats(unpack)?,
        unpacked_bytes,
        in_process: stats(in_process)?,
        containerd: containerd_version.and_then(|v| Ok((v, stats(containerd)?))),
    })
}

/// Three layers of files of noise, `mib` MiB in all.
fn build_image(mib: usize) -> Result<BuiltImage> {
    let total = mib << 20;
    let parts: usize = LAYER_PARTS.iter().sum();
    let mut seed = 0;
    let layers = LAYER_PARTS
        .iter()
        .enumerate()
        .map(|(n, part)| {
            let mut left = total * part / parts;
            let mut tar = Tar::new().dir(&format!("layer{n}"), 0o755);
            while left > 0 {
                let size = left.min(FILE_BYTES);
                seed += 1;
                tar = tar.file(
                    &format!("layer{n}/file{seed}.bin"),
                    &noise(seed, size),
                    0o644,
                );
                left -= size;
            }
            Layer::tar(tar.finish())
        })
        .collect();
    BuiltImage::new(layers, serde_json::json!({"Cmd": ["/bin/true"]}))
        .map_err(|e| format!("build the image: {e}"))
}

/// A new corrald on a new root: the cold PullImage, then the warm one.
async fn corrald_pulls(
    cleanup: &Cleanup,
    reference: &str,
    round: usize,
) -> Result<(Duration, Duration)> {
    // On the same file system as containerd's root below.
    let root = cleanup.work_dir().join(format!("corral-root{round}"));
    let yaml = format!("root: {}\n", root.display());
    let mut daemon = Daemon::start(cleanup, &yaml).map_err(|e| format!("corrald: {e}"))?;
    let result = async {
        let mut client = daemon.client().await.map_err(|e| format!("connect: {e}"))?;
        let cold = pull(&mut client, reference).await?;
        let warm = pull(&mut client, reference).await?;
        Ok((cold, warm))
    }
    .await;
    let stopped = daemon.stop().map_err(|e| format!("stop corrald: {e}"));
    let _ = fs::remove_dir_all(&root);
    let pulls = result.map_err(|e: String| format!("{e}; corrald said: {}", daemon.stderr()))?;
    stopped?;
    Ok(pulls)
}

async fn pull(client: &mut corral_e2e::cri::CriClient, reference: &str) -> Result<Duration> {
    let request = api::PullImageRequest {
        image: Some(api::ImageSpec {
            image: reference.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let began = Instant::now();
    tokio::time::timeout(TIMEOUT, client.images.pull_image(request))
        .await
        .map_err(|_| format!("PullImage {reference} took longer than {TIMEOUT:?}"))?
        .map_err(|e| format!("PullImage {reference}: {e}"))?;
    Ok(began.elapsed())
}

/// The image store in this process on a new root: its own figures.
async fn in_process_pull(
    cleanup: &Cleanup,
    reference: &str,
    round: usize,
) -> Result<corral_runtime::image::PullStats> {
    let root = cleanup.work_dir().join(format!("store{round}"));
    let result = async {
        let store = ImageStore::open(StoreOptions::new(&root))
            .await
            .map_err(|e| format!("open the store: {e}"))?;
        let (_, stats) = tokio::time::timeout(TIMEOUT, store.pull_with_stats(reference, None))
            .await
            .map_err(|_| format!("pull of {reference} took longer than {TIMEOUT:?}"))?
            .map_err(|e| format!("in-process pull: {e}"))?;
        Ok(stats)
    }
    .await;
    let _ = fs::remove_dir_all(&root);
    result
}

/// `containerd --version`, or why containerd is not measured.
fn containerd_available() -> Result<String> {
    for program in [CONTAINERD, CTR] {
        if !Path::new(program).is_file() {
            return Err(format!("{program} is not installed"));
        }
    }
    let out = Command::new(CONTAINERD)
        .arg("--version")
        .output()
        .map_err(|e| format!("{CONTAINERD} --version: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A new containerd, and the time `ctr images pull --plain-http` takes on
/// it (the ctr process's own start included, a few milliseconds).
fn ctr_pull(cleanup: &Cleanup, reference: &str, round: usize) -> Result<Duration> {
    let containerd = Containerd::start(cleanup, round)?;
    let began = Instant::now();
    let out = containerd
        .ctr()
        .args(["images", "pull", "--plain-http", reference])
        .output()
        .map_err(|e| format!("run ctr images pull: {e}"))?;
    let took = began.elapsed();
    if !out.status.success() {
        return Err(format!(
            "ctr images pull {reference}: {}{}; containerd said: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            containerd.log()
        ));
    }
    // Without its unpack, ctr's figure would not be the same work.
    if !String::from_utf8_lossy(&out.stdout).contains("unpacking") {
        return Err(format!(
            "ctr images pull did not unpack: {}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(took)
}

/// A running containerd with everything of its own in one directory; stopped
/// and its directory removed on drop.
struct Containerd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    fn start(cleanup: &Cleanup, round: usize) -> Result<Containerd> {
        let dir = cleanup.work_dir().join(format!("containerd{round}"));
        let socket = cleanup.run_dir().join(format!("ctrd{round}.sock"));
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // Only what a pull needs: no CRI plugin (it would look for CNI and
        // start a streaming server), nothing outside `dir`.
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{socket}\"\n\
             [ttrpc]\n  address = \"{socket}.ttrpc\"\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            opt = dir.join("opt").display(),
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).map_err(|e| format!("write containerd config: {e}"))?;
        let log = fs::File::create(dir.join("containerd.log"))
            .map_err(|e| format!("create containerd log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("containerd log: {e}"))?;
        let mut command = Command::new(CONTAINERD);
        command
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork
        // and exec. Should this process die without unwinding, containerd
        // goes with it.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("start {CONTAINERD}: {e}"))?;
        cleanup.track_pid(child.id());
        let mut containerd = Containerd { child, dir, socket };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    fn ctr(&self) -> Command {
        let mut command = Command::new(CTR);
        command
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "bench"])
            .stdin(Stdio::null());
        command
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("containerd exited with {status}: {}", self.log()));
            }
            if self.socket.exists() {
                let ok = self
                    .ctr()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("containerd did not answer: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        let log = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        // The end says why it failed; the start is plugin loading.
        let start = log.len().saturating_sub(4000);
        log.get(start..).unwrap_or(&log).to_string()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A pull leaves no mounts; should one be left, it goes before the
        // directory does, or the removal would reach through it.
        for mount in mounts_under(&[self.dir.as_path()]) {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(self.socket.with_extension("sock.ttrpc"));
    }
}
