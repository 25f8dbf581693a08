//! Where a process's stdio goes: containerd's FIFOs, `file://` URIs, a
//! terminal through runc's console socket, or the CRI log file the shim
//! writes itself (`cri-log://`); and, for a container whose log the shim
//! writes, to clients of its attach socket too (`attach`), who may also
//! write its stdin (`attach://stdin`).
//!
//! Owns the pipes between runc's process and the shim, and the threads that
//! copy between them and the destinations. It does not start processes:
//! [`PendingIo::child_stdio`] is what the runtime hands to the process.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::OpenOptionsExt, net::UnixListener},
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use corral_proto::{
    attach::{Kind, ATTACH_STDIN, ATTACH_STDIN_ONCE},
    CRI_LOG_SCHEME,
};
use nix::{
    fcntl::OFlag,
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
    unistd::pipe2,
};

use crate::{
    attach::{AttachHub, OutputGuard},
    cri_log::{self, CriLogFile, Stream},
    error::{Error, Result},
    runc::ProcessStdio,
};

/// Copier threads move bytes, nothing more: a small stack keeps the shim's
/// footprint per container low.
const COPIER_STACK: usize = 64 * 1024;
const COPY_BUF: usize = 32 * 1024;

/// The stdio URIs of a process, as the task API carries them.
#[derive(Debug, Clone, Default)]
pub struct StdioUris {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// One output destination.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Output {
    Null,
    Fifo(PathBuf),
    File(PathBuf),
    CriLog(PathBuf),
}

impl Output {
    fn parse(uri: &str) -> Result<Output> {
        if uri.is_empty() {
            return Ok(Output::Null);
        }
        let (scheme, rest) = match uri.split_once("://") {
            Some((scheme, rest)) => (scheme, rest),
            None => ("", uri),
        };
        let path = || -> Result<PathBuf> {
            let p = PathBuf::from(rest);
            if !p.is_absolute() || rest.split('/').any(|c| c == "..") {
                return Err(Error::InvalidArgument(format!(
                    "stdio {uri:?}: the path must be absolute, without `..`"
                )));
            }
            Ok(p)
        };
        match scheme {
            "" | "fifo" => Ok(Output::Fifo(path()?)),
            "file" => Ok(Output::File(path()?)),
            s if s == CRI_LOG_SCHEME => Ok(Output::CriLog(path()?)),
            other => Err(Error::InvalidArgument(format!(
                "stdio {uri:?}: the {other}:// scheme is not supported"
            ))),
        }
    }
}

/// Counts the output copiers still running, so an exit is reported only
/// after its last output reached the destination.
#[derive(Default)]
struct Drain {
    live: Mutex<usize>,
    done: Condvar,
}

impl Drain {
    fn enter(self: &Arc<Self>) -> DrainGuard {
        *lock(&self.live) += 1;
        DrainGuard(Arc::clone(self))
    }

    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut live = lock(&self.live);
        while *live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            live = match self.done.wait_timeout(live, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

struct DrainGuard(Arc<Drain>);

#[derive(Clone)]
pub struct DrainWaiter(Arc<Drain>);

impl DrainWaiter {
    /// Waits until every output copier reached EOF, at most `timeout`: a
    /// daemonized grandchild holding the pipe must not delay an exit forever.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.0.wait(timeout)
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        let mut live = lock(&self.0.live);
        *live = live.saturating_sub(1);
        self.0.done.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where a process's stdin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Input {
    Null,
    /// A FIFO the client writes.
    Fifo(PathBuf),
    /// Attached clients; `once`: the first to end its stdin ends it.
    Attach {
        once: bool,
    },
}

impl Input {
    fn parse(uri: &str) -> Result<Input> {
        Ok(match uri {
            "" => Input::Null,
            ATTACH_STDIN => Input::Attach { once: false },
            ATTACH_STDIN_ONCE => Input::Attach { once: true },
            path => Input::Fifo(crate::error::absolute(path, "stdin")?),
        })
    }
}

/// The shim's side of a process's stdio, prepared before the runtime runs.
pub struct PendingIo {
    stdin: Input,
    stdout: Output,
    stderr: Output,
    /// Shim ends of the pipes (non-terminal): write end of stdin, read ends
    /// of stdout and stderr.
    stdin_writer: Option<OwnedFd>,
    stdout_reader: Option<OwnedFd>,
    stderr_reader: Option<OwnedFd>,
    child: Option<ProcessStdio>,
    console: Option<ConsoleSocket>,
}

/// The live stdio of a running process.
pub struct ProcessIo {
    console: Option<Arc<File>>,
    stdin: Arc<StdinPort>,
    stdin_fifo: Option<PathBuf>,
    cri_log: Option<Arc<CriLogFile>>,
    attach: Option<Arc<AttachHub>>,
    drain: Arc<Drain>,
    output_fifos: Vec<PathBuf>,
}

enum StdinTarget {
    Pipe(File),
    Console(Arc<File>),
}

impl StdinTarget {
    fn file(&self) -> &File {
        match self {
            StdinTarget::Pipe(f) => f,
            StdinTarget::Console(f) => f,
        }
    }

    /// The most written at once once the target has room: a pipe takes
    /// PIPE_BUF bytes whole when it polls writable; a terminal's room may
    /// be smaller, so it gets small pieces.
    fn chunk(&self) -> usize {
        match self {
            StdinTarget::Pipe(_) => libc::PIPE_BUF,
            StdinTarget::Console(_) => 256,
        }
    }
}

/// The process's stdin as the shim writes it, shared by the FIFO copier
/// and attached clients.
///
/// Writers never block holding a lock: each waits for room in short polls
/// and gives up once the port is closed, so closing stdin (CloseIO, Delete,
/// `stdin_once`) never waits for a process that does not read it.
#[derive(Default)]
pub struct StdinPort {
    target: Mutex<Option<Arc<StdinTarget>>>,
    closed: AtomicBool,
}

impl StdinPort {
    fn set(&self, target: StdinTarget) {
        *lock(&self.target) = Some(Arc::new(target));
    }

    /// Writes all of `data`; false once stdin is closed or broken.
    pub fn write(&self, mut data: &[u8]) -> bool {
        let Some(target) = lock(&self.target).clone() else {
            return false;
        };
        while !data.is_empty() {
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            match wait_writable(target.file(), STDIN_POLL) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => return false,
            }
            let piece = &data[..data.len().min(target.chunk())];
            match target.file().write(piece) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// The process reads EOF (once any write under way gives up). With a
    /// terminal, the EOF character is sent instead, if the terminal has
    /// room, since the pty stays open for output.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(target) = lock(&self.target).take() {
            if let StdinTarget::Console(master) = &*target {
                if let Ok(true) = wait_writable(master, Duration::ZERO) {
                    let _ = (&**master).write(&[4]);
                }
            }
        }
    }

    /// The FIFO's client closed it: a pipe reads EOF; a terminal stays open
    /// (its output still flows) until CloseIO.
    fn input_ended(&self) {
        let is_pipe = matches!(lock(&self.target).as_deref(), Some(StdinTarget::Pipe(_)));
        if is_pipe {
            self.forget();
        }
    }

    fn forget(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.target).take();
    }

    /// A port writing into `pipe`, for tests of its users.
    #[cfg(test)]
    pub fn pipe(pipe: File) -> StdinPort {
        let port = StdinPort::default();
        port.set(StdinTarget::Pipe(pipe));
        port
    }
}

/// How long a stdin writer waits for room before looking at `closed`.
const STDIN_POLL: Duration = Duration::from_millis(100);

/// Whether `file` has room for a write within `timeout`; an error for a
/// file that never will (its reader is gone).
fn wait_writable(file: &File, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, which lives for the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::Interrupted => Ok(false),
            _ => Err(e),
        };
    }
    if pfd.revents & libc::POLLOUT != 0 {
        return Ok(true);
    }
    if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return Err(io::Error::from(io::ErrorKind::BrokenPipe));
    }
    Ok(false)
}

/// Sets a terminal's size.
pub fn resize_console(console: &File, width: u32, height: u32) -> Result<()> {
    let size = libc::winsize {
        ws_row: height.min(u16::MAX as u32) as u16,
        ws_col: width.min(u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives
    // for the duration of the call.
    let rc = unsafe { libc::ioctl(console.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc != 0 {
        return Err(Error::io("resize terminal", io::Error::last_os_error()));
    }
    Ok(())
}

impl PendingIo {
    /// Parses the URIs and creates the pipes (or the console socket) the
    /// process will be given.
    pub fn prepare(uris: &StdioUris) -> Result<PendingIo> {
        let stdin = Input::parse(&uris.stdin)?;
        let stdout = Output::parse(&uris.stdout)?;
        let stderr = Output::parse(&uris.stderr)?;
        let mut io = PendingIo {
            stdin,
            stdout,
            stderr,
            stdin_writer: None,
            stdout_reader: None,
            stderr_reader: None,
            child: None,
            console: None,
        };
        if uris.terminal {
            io.console = Some(ConsoleSocket::bind()?);
            io.child = Some(ProcessStdio::null());
            return Ok(io);
        }
        let mut child = ProcessStdio::null();
        if io.stdin != Input::Null {
            let (r, w) = cloexec_pipe()?;
            child.stdin = Stdio::from(r);
            io.stdin_writer = Some(w);
        }
        if io.stdout != Output::Null {
            let (r, w) = cloexec_pipe()?;
            child.stdout = Stdio::from(w);
            io.stdout_reader = Some(r);
        }
        if io.stderr != Output::Null {
            let (r, w) = cloexec_pipe()?;
            child.stderr = Stdio::from(w);
            io.stderr_reader = Some(r);
        }
        io.child = Some(child);
        Ok(io)
    }

    /// The stdio to hand to the runtime (taken once).
    pub fn child_stdio(&mut self) -> ProcessStdio {
        self.child.take().unwrap_or_else(ProcessStdio::null)
    }

    /// The console socket's address for runc's `--console-socket`.
    pub fn console_socket(&self) -> Option<&Path> {
        self.console
            .as_ref()
            .map(|c| Path::new(c.runc_address.as_str()))
    }

    /// Starts copying, once the runtime has created the process. With a
    /// terminal, receives the pty master runc sent on the console socket.
    /// `bundle`: a container's init process, whose stdio is open to attach
    /// clients when the shim writes its log or takes stdin from them.
    pub fn start(mut self, id: &str, bundle: Option<&Path>) -> Result<ProcessIo> {
        let drain = Arc::new(Drain::default());
        let cri_log = self.open_cri_log()?;
        let mut io = ProcessIo {
            console: None,
            stdin: Arc::new(StdinPort::default()),
            stdin_fifo: match &self.stdin {
                Input::Fifo(path) => Some(path.clone()),
                _ => None,
            },
            cri_log: cri_log.clone(),
            attach: None,
            drain: Arc::clone(&drain),
            output_fifos: [&self.stdout, &self.stderr]
                .into_iter()
                .filter_map(|o| match o {
                    Output::Fifo(p) => Some(p.clone()),
                    _ => None,
                })
                .collect(),
        };

        let mut outputs = Vec::new();
        if let Some(console) = self.console.take() {
            let master = Arc::new(console.receive_master()?);
            io.console = Some(Arc::clone(&master));
            io.stdin.set(StdinTarget::Console(Arc::clone(&master)));
            let reader = master
                .try_clone()
                .map_err(|e| Error::io("dup console", e))?;
            outputs.push((reader, self.stdout.clone(), Stream::Stdout));
        } else {
            if let Some(w) = self.stdin_writer.take() {
                io.stdin.set(StdinTarget::Pipe(File::from(w)));
            }
            if let Some(r) = self.stdout_reader.take() {
                outputs.push((File::from(r), self.stdout.clone(), Stream::Stdout));
            }
            if let Some(r) = self.stderr_reader.take() {
                outputs.push((File::from(r), self.stderr.clone(), Stream::Stderr));
            }
        }
        if let Some(bundle) = bundle.filter(|_| self.attachable()) {
            let once = matches!(self.stdin, Input::Attach { once: true });
            io.attach = Some(AttachHub::listen(
                id,
                bundle,
                Arc::clone(&io.stdin),
                io.console.clone(),
                once,
            )?);
        }
        // Every output registers with the attach socket before any starts:
        // the first to end must not close it for the others.
        let outputs: Vec<_> = outputs
            .into_iter()
            .map(|(reader, out, stream)| {
                let tee = io
                    .attach
                    .as_ref()
                    .map(|hub| (Arc::clone(hub), hub.output()));
                (reader, out, stream, tee)
            })
            .collect();
        for (reader, out, stream, tee) in outputs {
            spawn_output(id, reader, out, stream, cri_log.clone(), tee, drain.enter())?;
        }
        if let Input::Fifo(fifo) = &self.stdin {
            spawn_stdin(id, fifo.clone(), Arc::clone(&io.stdin))?;
        }
        Ok(io)
    }

    /// Attach serves the containers whose log the shim writes (corrald
    /// knows no other output for them) and those whose stdin it holds.
    fn attachable(&self) -> bool {
        matches!(self.stdin, Input::Attach { .. })
            || matches!(self.stdout, Output::CriLog(_))
            || matches!(self.stderr, Output::CriLog(_))
    }

    /// stdout and stderr of one process share one CRI log file.
    fn open_cri_log(&self) -> Result<Option<Arc<CriLogFile>>> {
        let path = match (&self.stdout, &self.stderr) {
            (Output::CriLog(p), _) | (_, Output::CriLog(p)) => p,
            _ => return Ok(None),
        };
        if let (Output::CriLog(a), Output::CriLog(b)) = (&self.stdout, &self.stderr) {
            if a != b {
                return Err(Error::InvalidArgument(format!(
                    "stdout and stderr name two CRI log files ({} and {}): they share one",
                    a.display(),
                    b.display()
                )));
            }
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io_path("create log dir", parent, e))?;
        }
        CriLogFile::open(path)
            .map(|f| Some(Arc::new(f)))
            .map_err(|e| Error::Internal(e.to_string()))
    }
}

impl ProcessIo {
    /// A handle that waits for the output copiers, usable without holding
    /// the process (the exit path waits on it outside the service's lock).
    pub fn drain_waiter(&self) -> DrainWaiter {
        DrainWaiter(Arc::clone(&self.drain))
    }

    /// The attach socket, to close once the exit is recorded: a process
    /// that outlived the container may hold the output open forever.
    pub fn attach_hub(&self) -> Option<Arc<AttachHub>> {
        self.attach.clone()
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let console = self
            .console
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("the process has no terminal".into()))?;
        resize_console(console, width, height)
    }

    /// Closes the process's stdin: it reads EOF (see [`StdinPort::close`]).
    pub fn close_stdin(&self) {
        self.stdin.close();
    }

    pub fn reopen_log(&self) -> Result<()> {
        let log = self.cri_log.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("the process does not write a CRI log".into())
        })?;
        log.reopen().map_err(|e| Error::Internal(e.to_string()))
    }
}

impl Drop for ProcessIo {
    /// Unblocks copier threads still waiting in `open` for the other side of
    /// a FIFO that never came, so no thread outlives its process.
    fn drop(&mut self) {
        if let Some(hub) = &self.attach {
            hub.close();
        }
        self.stdin.forget();
        if let Some(fifo) = &self.stdin_fifo {
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fifo);
        }
        for fifo in &self.output_fifos {
            let _ = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fifo);
        }
    }
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io("create pipe", e.into()))
}

/// An output's attach socket, and its registration there.
type Tee = (Arc<AttachHub>, OutputGuard);

fn spawn_output(
    id: &str,
    reader: File,
    output: Output,
    stream: Stream,
    cri_log: Option<Arc<CriLogFile>>,
    tee: Option<Tee>,
    guard: DrainGuard,
) -> Result<()> {
    let name = format!("out-{}", short(id));
    thread::Builder::new()
        .name(name)
        .stack_size(COPIER_STACK)
        .spawn(move || {
            let _guard = guard;
            let (hub, _registered) = tee.unzip();
            let kind = match stream {
                Stream::Stdout => Kind::Stdout,
                Stream::Stderr => Kind::Stderr,
            };
            let reader = TeeReader { reader, hub, kind };
            copy_output(reader, &output, stream, cri_log.as_deref());
        })
        .map(drop)
        .map_err(|e| Error::io("start output copier", e))
}

/// Hands every chunk read to the attached clients before the destination
/// gets it.
struct TeeReader {
    reader: File,
    hub: Option<Arc<AttachHub>>,
    kind: Kind,
}

impl Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        if let (Some(hub), true) = (&self.hub, n > 0) {
            hub.broadcast(self.kind, &buf[..n]);
        }
        Ok(n)
    }
}

fn copy_output(
    mut reader: TeeReader,
    output: &Output,
    stream: Stream,
    cri_log: Option<&CriLogFile>,
) {
    let sink = match output {
        Output::CriLog(_) => {
            if let Some(log) = cri_log {
                if let Err(e) = cri_log::copy_lines(&mut reader, stream, log) {
                    log::warn!("copy {stream} to {}: {e}", log.path().display());
                }
                return;
            }
            None
        }
        Output::Fifo(path) => open_output(path, false),
        Output::File(path) => open_output(path, true),
        Output::Null => None,
    };
    copy_raw(&mut reader, sink);
}

fn open_output(path: &Path, append: bool) -> Option<File> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if append {
        opts.create(true).append(true).mode(0o640);
    }
    match opts.open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!("open {}: {e}; discarding output", path.display());
            None
        }
    }
}

/// Copies until EOF. A destination that fails (the reader of a FIFO went
/// away) is dropped, and the pipe keeps being drained so the process never
/// blocks on a full pipe.
fn copy_raw(reader: &mut impl Read, mut sink: Option<File>) {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EIO: the terminal's other side closed, the terminal's EOF.
            Err(_) => return,
        };
        if let Some(out) = sink.as_mut() {
            if out.write_all(&buf[..n]).is_err() {
                sink = None;
            }
        }
    }
}

fn spawn_stdin(id: &str, fifo: PathBuf, target: Arc<StdinPort>) -> Result<()> {
    thread::Builder::new()
        .name(format!("in-{}", short(id)))
        .stack_size(COPIER_STACK)
        .spawn(move || copy_stdin(&fifo, &target))
        .map(drop)
        .map_err(|e| Error::io("start stdin copier", e))
}

fn copy_stdin(fifo: &Path, target: &StdinPort) {
    // Blocks until the client opens its end, as containerd's shims do.
    let mut input = match File::open(fifo) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("open stdin {}: {e}", fifo.display());
            return;
        }
    };
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if !target.write(&buf[..n]) {
            return;
        }
    }
    target.input_ended();
}

/// At most 12 characters of `id`, for thread names.
pub fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// The socket on which runc sends the pty master of a terminal process.
///
/// An abstract socket: nothing on disk to clean up after a crash, and no
/// path length limit from a deep bundle directory. runc (Go) dials the
/// abstract namespace for an address that starts with `@`.
struct ConsoleSocket {
    listener: UnixListener,
    runc_address: String,
}

impl ConsoleSocket {
    fn bind() -> Result<ConsoleSocket> {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("corral-console-{}", unique());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| Error::io("console socket address", e))?;
        let listener =
            UnixListener::bind_addr(&addr).map_err(|e| Error::io("bind console socket", e))?;
        Ok(ConsoleSocket {
            listener,
            runc_address: format!("@{name}"),
        })
    }

    /// runc has connected and sent the fd by the time `runc create` (or
    /// `exec --detach`) returns: the connection waits in the backlog.
    fn receive_master(&self) -> Result<File> {
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("console socket", e))?;
        let (stream, _) = self
            .listener
            .accept()
            .map_err(|e| Error::io("accept the terminal from the runtime", e))?;
        stream
            .set_nonblocking(false)
            .map_err(|e| Error::io("console socket", e))?;
        let mut buf = [0u8; 4096];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| Error::io("receive the terminal", e.into()))?;
        let cmsgs = msg
            .cmsgs()
            .map_err(|e| Error::io("receive the terminal", e.into()))?;
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed `fd` in this process
                    // for us; nothing else owns it.
                    return Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                }
            }
        }
        Err(Error::Internal(
            "the runtime sent no terminal on the console socket".into(),
        ))
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_uri() {
        assert_eq!(Output::parse("").ok(), Some(Output::Null));
        assert_eq!(
            Output::parse("/run/x/stdout").ok(),
            Some(Output::Fifo("/run/x/stdout".into()))
        );
        assert_eq!(
            Output::parse("fifo:///run/x/o").ok(),
            Some(Output::Fifo("/run/x/o".into()))
        );
        assert_eq!(
            Output::parse("file:///var/log/o").ok(),
            Some(Output::File("/var/log/o".into()))
        );
        assert_eq!(
            Output::parse("cri-log:///var/log/pods/p/c/0.log").ok(),
            Some(Output::CriLog("/var/log/pods/p/c/0.log".into()))
        );
    }

    #[test]
    fn refuses_relative_escaping_and_unknown_uris() {
        for bad in [
            "relative",
            "file://relative",
            "cri-log:///var/log/../../etc/x",
            "binary:///bin/logger",
            "http://x/y",
        ] {
            match Output::parse(bad) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(bad), "{msg}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn drain_waits_for_every_copier() {
        let drain = Arc::new(Drain::default());
        let guard = drain.enter();
        assert!(!drain.wait(Duration::from_millis(20)));
        let t = thread::spawn(move || drop(guard));
        assert!(drain.wait(Duration::from_secs(5)));
        t.join().expect("join");
    }
}
