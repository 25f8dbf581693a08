//! corrald driven from outside, as kubelet drives it: the built daemon
//! started with a config of its own, and a CRI v1 client on its socket.
//!
//! - [`CriClient`]: tonic's `RuntimeService` and `ImageService` clients
//!   over a unix socket, the transport kubelet and crictl use.
//! - [`DaemonConfig`]: a config file whose socket, root, state and CNI
//!   configuration directory are unique to the test, under its
//!   [`Cleanup`] run directory, merged with the YAML the test gives.
//! - [`Daemon`]: the running `corrald`; waits for its socket, stops it with
//!   SIGTERM, kills it on drop. Its stdout and stderr go to files in its
//!   directory, so that a test can read what it said without a pipe that
//!   could fill up and block it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_norway::{Mapping, Value};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cleanup::Cleanup;
use crate::error::{Context, Error, Result};

pub use k8s_cri::v1 as api;
pub use k8s_cri::v1::image_service_client::ImageServiceClient;
pub use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

/// How long a daemon gets to open its socket. Generous: the first test of a
/// cold machine also pays for loading the binary.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a daemon gets to exit after SIGTERM: its own grace for RPCs in
/// flight is 10 s.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a run of corrald that is expected to end (a bad config,
/// `--version`) may take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(20);

const POLL: Duration = Duration::from_millis(20);

/// A CRI v1 client, both services on one connection.
#[derive(Clone, Debug)]
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the CRI socket at `socket`.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<CriClient> {
        let socket = socket.as_ref().to_path_buf();
        let path = socket.clone();
        // The URI is required by tonic but never dialled: the connector
        // below ignores it and opens the unix socket.
        let channel =
            Endpoint::from_static("http://corrald.invalid")
                .connect_timeout(Duration::from_secs(10))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| {
                    Error::Unavailable(format!("connect to CRI socket {}: {e:?}", socket.display()))
                })?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}

/// A corrald config for one test: unique paths plus the test's own keys.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The daemon's own directory: config file, logs, working directory.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// YAML the test adds. A key it sets wins over the fixture's value of
    /// that key (`socket`, `root`, `state`, `cni.conf_dir`), and the
    /// fields above then report the test's value.
    pub yaml: String,
    /// Environment variables set for the daemon (such as `RUST_LOG`), on
    /// top of the test's own environment.
    pub env: Vec<(String, String)>,
}

impl DaemonConfig {
    /// Fresh paths in a new directory under the cleanup's run directory
    /// (short, so that the socket path fits in `sun_path`).
    pub fn new(cleanup: &Cleanup, yaml: &str) -> DaemonConfig {
        let dir = cleanup.run_dir().join(cleanup.local_name("corrald"));
        DaemonConfig {
            socket: dir.join("corral.sock"),
            root: dir.join("root"),
            state: dir.join("state"),
            cni_conf_dir: dir.join("net.d"),
            yaml: yaml.to_string(),
            env: Vec::new(),
            dir,
        }
    }

    /// The config file's path.
    pub fn file(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    /// Writes the config file and creates the (empty) CNI configuration
    /// directory; returns the file's path. YAML that does not parse as a
    /// mapping is written as it is, for tests of corrald's refusal.
    pub fn write(&mut self) -> Result<PathBuf> {
        fs::create_dir_all(&self.dir).context(|| format!("create {}", self.dir.display()))?;
        let text = match serde_norway::from_str::<Value>(&self.yaml) {
            Ok(Value::Null) => self.merged(Mapping::new()),
            Ok(Value::Mapping(mapping)) => self.merged(mapping),
            _ => self.yaml.clone(),
        };
        fs::create_dir_all(&self.cni_conf_dir)
            .context(|| format!("create {}", self.cni_conf_dir.display()))?;
        let file = self.file();
        fs::write(&file, text).context(|| format!("write {}", file.display()))?;
        Ok(file)
    }

    /// The test's mapping with the fixture's paths filled in where it has
    /// none; the fields take the test's paths where it has some.
    fn merged(&mut self, mut top: Mapping) -> String {
        take_or_set(&mut top, "socket", &mut self.socket);
        take_or_set(&mut top, "root", &mut self.root);
        take_or_set(&mut top, "state", &mut self.state);
        let cni = top
            .entry(Value::from("cni"))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if let Value::Mapping(cni) = cni {
            take_or_set(cni, "conf_dir", &mut self.cni_conf_dir);
        }
        // Serializing a mapping of strings cannot fail; should it, the
        // daemon gets the test's text unmerged and says what is wrong.
        serde_norway::to_string(&Value::Mapping(top)).unwrap_or_else(|_| self.yaml.clone())
    }
}

fn take_or_set(mapping: &mut Mapping, key: &str, field: &mut PathBuf) {
    match mapping.get(key).and_then(Value::as_str) {
        Some(value) => *field = PathBuf::from(value),
        None => {
            mapping.insert(
                Value::from(key),
                Value::from(field.to_string_lossy().into_owned()),
            );
        }
    }
}

/// A running corrald.
pub struct Daemon {
    child: Child,
    config: DaemonConfig,
}

impl Daemon {
    /// Starts corrald with the test's `yaml` (may be empty) and waits until
    /// its socket answers.
    pub fn start(cleanup: &Cleanup, yaml: &str) -> Result<Daemon> {
        Daemon::start_with(cleanup, DaemonConfig::new(cleanup, yaml))
    }

    /// Starts corrald with `config` and waits until its socket answers.
    pub fn start_with(cleanup: &Cleanup, config: DaemonConfig) -> Result<Daemon> {
        let mut daemon = Daemon::spawn(cleanup, config)?;
        daemon.wait_ready(START_TIMEOUT)?;
        Ok(daemon)
    }

    /// Starts corrald with `config` without waiting for it.
    pub fn spawn(cleanup: &Cleanup, mut config: DaemonConfig) -> Result<Daemon> {
        let file = config.write()?;
        let child = corrald_command(&config)?
            .arg("--config")
            .arg(&file)
            .spawn()
            .context(|| format!("spawn corrald --config {}", file.display()))?;
        cleanup.track_pid(child.id());
        Ok(Daemon { child, config })
    }

    /// Runs corrald with `config` until it exits by itself (a config it
    /// must refuse, a socket it must not take), and returns what it did.
    pub fn run_to_exit(mut config: DaemonConfig) -> Result<Output> {
        let file = config.write()?;
        let mut command = corrald_command(&config)?;
        command.arg("--config").arg(&file);
        run_with_timeout(command, &config.dir, RUN_TIMEOUT)
    }

    /// Polls until the socket accepts a connection; fails at once, with the
    /// daemon's stderr, if it exits first.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context(|| "wait for corrald".into())?
            {
                return Err(self.exited(status));
            }
            if std::os::unix::net::UnixStream::connect(&self.config.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "corrald did not answer on {} within {timeout:?}; stderr: {}",
                    self.config.socket.display(),
                    self.stderr()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// A new CRI client on the daemon's socket.
    pub async fn client(&self) -> Result<CriClient> {
        CriClient::connect(&self.config.socket).await
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon has written to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.config.dir.join("corrald.stderr")).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.child.id())
            .map_err(|_| Error::Protocol(format!("pid {} out of range", self.child.id())))?;
        kill(Pid::from_raw(pid), signal).context(|| format!("send {signal} to corrald {pid}"))
    }

    /// SIGTERM, then waits for the daemon to exit.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(STOP_TIMEOUT)
    }

    /// Waits for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context(|| "wait for corrald".into())?
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "corrald {} still running after {timeout:?}; stderr: {}",
                    self.child.id(),
                    self.stderr()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    fn exited(&self, status: ExitStatus) -> Error {
        Error::Command {
            command: format!("corrald --config {}", self.config.file().display()),
            status,
            stdout: fs::read_to_string(self.config.dir.join("corrald.stdout")).unwrap_or_default(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the built corrald with `args` (such as `--version`) until it exits.
pub fn run_corrald(args: &[&str]) -> Result<Output> {
    let mut command = Command::new(crate::bin::daemon());
    command.args(args);
    let output = command
        .stdin(Stdio::null())
        .output()
        .context(|| format!("run corrald {}", args.join(" ")))?;
    Ok(output)
}

/// `corrald` with its working directory in the config's directory (the
/// cleanup kills what runs there), its output into files there, and the
/// config's environment.
fn corrald_command(config: &DaemonConfig) -> Result<Command> {
    let dir = config.dir.as_path();
    let stdout = File::create(dir.join("corrald.stdout"))
        .context(|| format!("create {}", dir.join("corrald.stdout").display()))?;
    let stderr = File::create(dir.join("corrald.stderr"))
        .context(|| format!("create {}", dir.join("corrald.stderr").display()))?;
    let mut command = Command::new(crate::bin::daemon());
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .envs(config.env.iter().map(|(k, v)| (k, v)));
    Ok(command)
}

fn run_with_timeout(mut command: Command, dir: &Path, timeout: Duration) -> Result<Output> {
    let what = format!("{command:?}");
    let mut child = command.spawn().context(|| format!("spawn {what}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context(|| format!("wait for {what}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Timeout(format!(
                "{what} still running after {timeout:?}; stderr: {}",
                fs::read_to_string(dir.join("corrald.stderr")).unwrap_or_default()
            )));
        }
        std::thread::sleep(POLL);
    };
    Ok(Output {
        status,
        stdout: fs::read(dir.join("corrald.stdout")).unwrap_or_default(),
        stderr: fs::read(dir.join("corrald.stderr")).unwrap_or_default(),
    })
}
