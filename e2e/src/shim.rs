//! Running a runtime v2 shim the way containerd does.
//!
//! [`ShimCommand`] holds what containerd passes a shim (flags, environment,
//! stdin, working directory). [`ShimCommand::start`] runs the `start` action,
//! reads its combined stdout and stderr as containerd's `CombinedOutput`
//! does, parses the bootstrap reply in all three forms (plain address, JSON,
//! protobuf `BootstrapResult`), connects a task client and finds the server's
//! pid. It also does containerd's part of the shim's `log` FIFO: it is created
//! in the bundle and drained, since a shim that opens it for writing blocks
//! until someone reads. [`ShimCommand::delete`] runs the `delete` action and
//! decodes the `DeleteResponse` on its stdout.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use corral_proto::containerd::bootstrap_api::{BootstrapParams, BootstrapResult};
use corral_proto::containerd::shim::oci::Options as RuncOptions;
use corral_proto::containerd::shim::shim::{ConnectRequest, ConnectResponse, DeleteResponse};
use corral_proto::containerd::shim_sync::TaskClient;
use corral_proto::containerd::TASK_API_VERSION;
use corral_proto::protobuf::well_known_types::any::Any;
use corral_proto::protobuf::{Message, MessageFull};
use corral_proto::ttrpc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cleanup::{pid_alive, Cleanup};
use crate::error::{Context, Error, Result};

/// The containerd binary a shim is told it may publish through.
pub const PUBLISH_BINARY: &str = "/usr/bin/containerd";

/// What containerd sends on the shim's stdin for `start`.
#[derive(Clone, Debug, Default)]
pub enum ShimStdin {
    /// Nothing (containerd ≤ 2.2 without runtime options): stdin is /dev/null.
    #[default]
    Empty,
    /// containerd ≤ 2.2 with runtime options: a protobuf `Any` of
    /// `containerd.runc.v1.Options`, type URL written bare as containerd's
    /// typeurl does.
    RuncOptions(RuncOptions),
    /// containerd 2.3+: `BootstrapParams`; the reply is then a protobuf
    /// `BootstrapResult`.
    Bootstrap(BootstrapParams),
    /// Exactly these bytes.
    Raw(Vec<u8>),
}

impl ShimStdin {
    fn bytes(&self) -> Result<Option<Vec<u8>>> {
        let encode = |e| Error::Protocol(format!("encode shim stdin: {e}"));
        Ok(match self {
            ShimStdin::Empty => None,
            ShimStdin::RuncOptions(options) => {
                let any = Any {
                    type_url: RuncOptions::descriptor().full_name().to_string(),
                    value: options.write_to_bytes().map_err(encode)?,
                    ..Default::default()
                };
                Some(any.write_to_bytes().map_err(encode)?)
            }
            ShimStdin::Bootstrap(params) => Some(params.write_to_bytes().map_err(encode)?),
            ShimStdin::Raw(bytes) => Some(bytes.clone()),
        })
    }
}

/// The shim's reply to `start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bootstrap {
    /// Task API version: 2 for a plain-address reply.
    pub version: i32,
    /// Where the task service listens, `unix:///…`.
    pub address: String,
    /// `ttrpc` or `grpc`.
    pub protocol: String,
    /// Which form the reply came in.
    pub form: BootstrapForm,
}

/// The three forms of the `start` reply containerd accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootstrapForm {
    /// A bare address: a v2 ttrpc shim.
    Plain,
    /// `{"version":…,"address":…,"protocol":…}`.
    Json,
    /// A protobuf `BootstrapResult` (containerd 2.3+).
    Protobuf,
}

/// Parses what a shim printed for `start`, as containerd does: rejects
/// versions above the task API version containerd speaks (3).
pub fn parse_bootstrap(output: &[u8]) -> Result<Bootstrap> {
    let text = String::from_utf8_lossy(output);
    let trimmed = text.trim();
    let bootstrap = if trimmed.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(trimmed)
            .context(|| format!("parse shim bootstrap JSON {trimmed:?}"))?;
        Bootstrap {
            version: value["version"]
                .as_i64()
                .and_then(|v| i32::try_from(v).ok())
                .ok_or_else(|| Error::Protocol(format!("bootstrap without version: {trimmed}")))?,
            address: value["address"].as_str().unwrap_or_default().to_string(),
            protocol: value["protocol"].as_str().unwrap_or_default().to_string(),
            form: BootstrapForm::Json,
        }
    } else if is_plain_address(trimmed) {
        Bootstrap {
            version: 2,
            address: trimmed.to_string(),
            protocol: "ttrpc".into(),
            form: BootstrapForm::Plain,
        }
    } else {
        let result = BootstrapResult::parse_from_bytes(output).map_err(|e| {
            Error::Protocol(format!(
                "shim start printed neither address, JSON nor BootstrapResult ({e}): {text:?}"
            ))
        })?;
        Bootstrap {
            version: result.version,
            address: result.address,
            protocol: result.protocol,
            form: BootstrapForm::Protobuf,
        }
    };
    if bootstrap.address.is_empty() {
        return Err(Error::Protocol(format!(
            "bootstrap without address: {text:?}"
        )));
    }
    if bootstrap.version > TASK_API_VERSION {
        return Err(Error::Protocol(format!(
            "shim speaks task API v{}, containerd at most v{TASK_API_VERSION}",
            bootstrap.version
        )));
    }
    Ok(bootstrap)
}

fn is_plain_address(s: &str) -> bool {
    let scheme = ["unix://", "vsock://", "tcp://", "/"]
        .iter()
        .any(|p| s.starts_with(p));
    scheme && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Everything containerd passes a shim process.
#[derive(Clone, Debug)]
pub struct ShimCommand {
    pub binary: PathBuf,
    pub namespace: String,
    /// `-id`: the task id of the first container (containerd) or the sandbox id.
    pub id: String,
    /// The bundle: working directory of `start`, `-bundle` of `delete`.
    pub bundle: PathBuf,
    /// `-address` and `GRPC_ADDRESS`: containerd's gRPC socket.
    pub daemon_address: String,
    /// `TTRPC_ADDRESS`: where the shim publishes events, a plain path.
    pub ttrpc_address: String,
    /// `-publish-binary`.
    pub publish_binary: PathBuf,
    /// Adds `-debug`.
    pub debug: bool,
    pub stdin: ShimStdin,
    /// Extra environment, after containerd's.
    pub env: Vec<(String, String)>,
    /// How long `start` or `delete` may take.
    pub timeout: Duration,
}

impl ShimCommand {
    /// containerd's invocation of `binary` for task `id` in `namespace`.
    pub fn new(
        binary: impl Into<PathBuf>,
        namespace: impl Into<String>,
        id: impl Into<String>,
        bundle: impl Into<PathBuf>,
        daemon_address: impl Into<String>,
        ttrpc_address: impl Into<String>,
    ) -> Self {
        ShimCommand {
            binary: binary.into(),
            namespace: namespace.into(),
            id: id.into(),
            bundle: bundle.into(),
            daemon_address: daemon_address.into(),
            ttrpc_address: ttrpc_address.into(),
            publish_binary: PathBuf::from(PUBLISH_BINARY),
            debug: false,
            stdin: ShimStdin::Empty,
            env: Vec::new(),
            timeout: Duration::from_secs(20),
        }
    }

    /// The process for `action`, with containerd's flags, environment and
    /// working directory.
    pub fn command(&self, action: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-namespace")
            .arg(&self.namespace)
            .arg("-address")
            .arg(&self.daemon_address)
            .arg("-publish-binary")
            .arg(&self.publish_binary)
            .arg("-id")
            .arg(&self.id);
        if action == "delete" {
            cmd.arg("-bundle").arg(&self.bundle);
        }
        if self.debug {
            cmd.arg("-debug");
        }
        cmd.arg(action)
            .current_dir(&self.bundle)
            .env("GOMAXPROCS", "2")
            .env("MAX_SHIM_VERSION", "2")
            .env("TTRPC_ADDRESS", &self.ttrpc_address)
            .env("GRPC_ADDRESS", &self.daemon_address)
            .env("NAMESPACE", &self.namespace)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `start`, connects to the shim it started and registers its
    /// process and socket with `cleanup`.
    pub fn start(&self, cleanup: &Cleanup) -> Result<ShimProcess> {
        // Whatever happens below, a server may be up: it runs in the bundle.
        cleanup.track_processes_in(&self.bundle);
        let log = ShimLog::open(&self.bundle)?;
        let output = self.run_start()?;
        let bootstrap = parse_bootstrap(&output)?;
        if let Some(path) = socket_path(&bootstrap.address) {
            cleanup.track_path(path);
        }
        let peer_pid = peer_pid(&bootstrap.address).ok();
        if let Some(pid) = peer_pid {
            cleanup.track_pid(pid);
        }
        let client = connect(&bootstrap.address, self.timeout)?;
        let task = TaskClient::new(client);
        let connected = task
            .connect(
                ttrpc::context::with_duration(self.timeout),
                &ConnectRequest {
                    id: self.id.clone(),
                    ..Default::default()
                },
            )
            .ok();
        if let Some(pid) = connected.as_ref().map(|c| c.shim_pid).filter(|p| *p != 0) {
            cleanup.track_pid(pid);
        }
        // The listener's owner is the server unless a start process created the
        // socket and handed it over (Go shims do); then trust Connect.
        let pid = match (connected.as_ref().map(|c| c.shim_pid), peer_pid) {
            (Some(pid), _) if pid != 0 => pid,
            (_, Some(pid)) if pid_alive(pid as i32) => pid,
            _ => {
                return Err(Error::Protocol(format!(
                    "cannot find the pid of the shim serving {}: Connect answered {connected:?}, the socket's owner is {peer_pid:?}",
                    bootstrap.address
                )));
            }
        };
        Ok(ShimProcess {
            command: self.clone(),
            bootstrap,
            pid,
            connect: connected,
            task,
            log,
        })
    }

    /// Runs `start` and returns its combined stdout and stderr.
    fn run_start(&self) -> Result<Vec<u8>> {
        let stdin = self.stdin.bytes()?;
        // Close-on-exec: otherwise the shim inherits the originals of the fds
        // it gets as stdout and stderr, and so does the server it spawns.
        let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context(|| "pipe for shim start".into())?;
        let writer2 = writer
            .try_clone()
            .context(|| "dup pipe for shim start".into())?;
        let mut cmd = self.command("start");
        cmd.stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let what = format!("{cmd:?}");
        let mut child = cmd.spawn().context(|| format!("spawn {what}"))?;
        // Our copies of the write end must go, or the reader never sees EOF.
        drop(cmd);
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = pipe.write_all(&bytes);
            });
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut reader = std::fs::File::from(reader);
            let result = reader.read_to_end(&mut out).map(|_| out);
            let _ = tx.send(result);
        });

        let deadline = Instant::now() + self.timeout;
        let status = wait_child(&mut child, deadline).map_err(|e| {
            Error::Timeout(format!("{what} did not exit in {:?}: {e}", self.timeout))
        })?;
        // containerd reads until EOF: a server that kept the pipe would hang it.
        let output = match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(result) => result.context(|| format!("read output of {what}"))?,
            Err(_) => {
                return Err(Error::Protocol(format!(
                    "{what} exited but its stdout/stderr stayed open: \
                     the shim server inherited them, which hangs containerd"
                )))
            }
        };
        if !status.success() {
            return Err(Error::Command {
                command: what,
                status,
                stdout: String::from_utf8_lossy(&output).into_owned(),
                stderr: String::new(),
            });
        }
        Ok(output)
    }

    /// Runs `delete` and decodes the `DeleteResponse` it prints.
    pub fn delete(&self) -> Result<DeleteResponse> {
        let mut cmd = self.command("delete");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{cmd:?}");
        let child = cmd.spawn().context(|| format!("spawn {what}"))?;
        let (tx, rx) = mpsc::channel();
        let pid = child.id();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let output = match rx.recv_timeout(self.timeout) {
            Ok(output) => output.context(|| format!("wait for {what}"))?,
            Err(_) => {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                return Err(Error::Timeout(format!(
                    "{what} ran longer than {:?}",
                    self.timeout
                )));
            }
        };
        if !output.status.success() {
            return Err(Error::Command {
                command: what,
                status: output.status,
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        DeleteResponse::parse_from_bytes(&output.stdout)
            .context(|| format!("decode DeleteResponse from {what}"))
    }
}

fn wait_child(child: &mut Child, deadline: Instant) -> std::io::Result<std::process::ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(ErrorKind::TimedOut, "killed"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The filesystem path of a `unix://` address; `None` for abstract sockets
/// and other schemes.
pub fn socket_path(address: &str) -> Option<PathBuf> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    path.starts_with('/').then(|| PathBuf::from(path))
}

fn unix_stream(address: &str) -> std::io::Result<UnixStream> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)
        }
        None => UnixStream::connect(path),
    }
}

/// The pid of the process that listens on `address`, by `SO_PEERCRED`.
pub fn peer_pid(address: &str) -> Result<u32> {
    let stream = unix_stream(address).context(|| format!("connect {address}"))?;
    let creds =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials)
            .context(|| format!("SO_PEERCRED of {address}"))?;
    u32::try_from(creds.pid())
        .map_err(|_| Error::Protocol(format!("peer pid {} of {address}", creds.pid())))
}

/// A ttrpc client for `address`, retrying while the socket is not there yet
/// as containerd's dialer does.
pub fn connect(address: &str, timeout: Duration) -> Result<ttrpc::Client> {
    let url = if address.starts_with("unix://") {
        address.to_string()
    } else {
        format!("unix://{address}")
    };
    let deadline = Instant::now() + timeout;
    loop {
        match ttrpc::Client::connect(&url) {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(|| format!("connect to shim at {url}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A started shim: its task client, pid and log.
pub struct ShimProcess {
    command: ShimCommand,
    bootstrap: Bootstrap,
    pid: u32,
    connect: Option<ConnectResponse>,
    task: TaskClient,
    log: ShimLog,
}

impl ShimProcess {
    /// Starts `binary` as containerd would (empty stdin, no `-debug`); see
    /// [`ShimCommand`] for the other choices.
    pub fn start(
        cleanup: &Cleanup,
        binary: impl Into<PathBuf>,
        namespace: &str,
        id: &str,
        bundle: &Path,
        daemon_address: &str,
        ttrpc_address: &str,
    ) -> Result<Self> {
        ShimCommand::new(binary, namespace, id, bundle, daemon_address, ttrpc_address)
            .start(cleanup)
    }

    /// Runs `binary`'s `delete` action for task `id` and decodes its reply.
    pub fn delete(
        binary: impl Into<PathBuf>,
        namespace: &str,
        id: &str,
        bundle: &Path,
        daemon_address: &str,
        ttrpc_address: &str,
    ) -> Result<DeleteResponse> {
        ShimCommand::new(binary, namespace, id, bundle, daemon_address, ttrpc_address).delete()
    }

    /// The task API client on the shim's socket.
    pub fn task(&self) -> &TaskClient {
        &self.task
    }

    /// A task client on a new connection, as a restarted containerd makes.
    pub fn connect_again(&self) -> Result<TaskClient> {
        connect(&self.bootstrap.address, self.command.timeout).map(TaskClient::new)
    }

    /// The shim server's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the `Connect` RPC answered right after start, if it succeeded.
    pub fn connect_response(&self) -> Option<&ConnectResponse> {
        self.connect.as_ref()
    }

    /// The task socket, `unix:///…`.
    pub fn address(&self) -> &str {
        &self.bootstrap.address
    }

    /// The parsed `start` reply.
    pub fn bootstrap(&self) -> &Bootstrap {
        &self.bootstrap
    }

    /// How it was started; `delete` with the same arguments via
    /// [`ShimCommand::delete`].
    pub fn command(&self) -> &ShimCommand {
        &self.command
    }

    /// What the shim wrote into its `log` FIFO so far.
    pub fn log(&self) -> String {
        self.log.contents()
    }

    /// Whether the server still runs.
    pub fn is_alive(&self) -> bool {
        pid_alive(self.pid as i32)
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid as i32), signal)
            .context(|| format!("signal shim {} with {signal}", self.pid))
    }

    /// Waits until the server has exited.
    pub fn wait_exit(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "shim {} still runs after {timeout:?}",
                    self.pid
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for ShimProcess {
    fn drop(&mut self) {
        // A failing test's output is where the shim's side of the story belongs.
        if std::thread::panicking() {
            eprintln!("---- shim {} log ----\n{}", self.pid, self.log());
        }
    }
}

/// Reads the shim's `log` FIFO in the bundle, as containerd does, keeping
/// what it reads.
struct ShimLog {
    buffer: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ShimLog {
    fn open(bundle: &Path) -> Result<Self> {
        let path = bundle.join("log");
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_fifo() => {}
            Ok(_) => {
                return Err(Error::Protocol(format!(
                    "{} exists and is not a FIFO",
                    path.display()
                )))
            }
            Err(_) => nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o700))
                .context(|| format!("mkfifo {}", path.display()))?,
        }
        // Read-write: the open never blocks, and reads never see EOF between
        // a shim closing its end and the next shim (a restart) opening it.
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .context(|| format!("open {}", path.display()))?;
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let buffer = buffer.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("shim-log".into())
                .spawn(move || drain(fifo, &buffer, &stop))
                .context(|| "spawn shim log reader".into())?
        };
        Ok(ShimLog {
            buffer,
            stop,
            thread: Some(thread),
        })
    }

    fn contents(&self) -> String {
        let buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

fn drain(mut fifo: std::fs::File, buffer: &Mutex<Vec<u8>>, stop: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut chunk = [0u8; 8192];
    while !stop.load(Ordering::SeqCst) {
        let ready = {
            let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(100u16))
        };
        match ready {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        loop {
            match fifo.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buffer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}

impl Drop for ShimLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_forms_parse() {
        let plain = parse_bootstrap(b"unix:///run/containerd/s/abc\n").expect("plain");
        assert_eq!((plain.version, plain.form), (2, BootstrapForm::Plain));
        assert_eq!(plain.address, "unix:///run/containerd/s/abc");

        let json = parse_bootstrap(br#"{"version":3,"address":"unix:///s/x","protocol":"ttrpc"}"#)
            .expect("json");
        assert_eq!((json.version, json.form), (3, BootstrapForm::Json));
        assert_eq!(json.protocol, "ttrpc");

        let proto = BootstrapResult {
            version: 3,
            address: "unix:///s/y".into(),
            protocol: "ttrpc".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .expect("encode");
        let parsed = parse_bootstrap(&proto).expect("protobuf");
        assert_eq!(
            (parsed.address.as_str(), parsed.form),
            ("unix:///s/y", BootstrapForm::Protobuf)
        );
    }

    #[test]
    fn bootstrap_rejects_junk_and_future_versions() {
        assert!(parse_bootstrap(b"").is_err());
        assert!(parse_bootstrap(b"time=... level=info msg=starting\nunix:///s").is_err());
        assert!(
            parse_bootstrap(br#"{"version":4,"address":"unix:///s","protocol":"ttrpc"}"#).is_err()
        );
    }

    #[test]
    fn socket_paths() {
        assert_eq!(
            socket_path("unix:///run/a.sock"),
            Some(PathBuf::from("/run/a.sock"))
        );
        assert_eq!(socket_path("unix://@abstract"), None);
    }
}
