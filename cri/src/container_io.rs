//! Container output for shims other than corral's: FIFOs the shim writes,
//! copied by corrald into the container's CRI log file.
//!
//! corral's own shim writes the CRI log itself (`cri-log://`), so its logs
//! flow while no daemon runs. Any other containerd shim (a RuntimeClass
//! handler such as `io.containerd.runc.v2`) only knows FIFOs; for those
//! containers corrald copies, as containerd does, with the same record
//! format (`corral_proto::cri_log`). While corrald is down their output
//! waits in the pipes, and a restart resumes copying from them.
//!
//! For those containers Attach is served here too: the copiers hand each
//! chunk to the attached clients ([`CopiedStdio`]), and corrald holds the
//! write end of the container's stdin FIFO for them.
//!
//! Exec processes (ExecSync, and Exec through the streaming server) get
//! FIFOs too, read by corrald whatever the shim: [`ExecFifos`].
//!
//! Owns `<state>/io/<id>/{stdout,stderr}`, `<state>/exec/<exec id>/` and
//! the copier threads; it does not start or stop processes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use corral_proto::cri_log::{copy_lines, CriLogFile, Stream};
use corral_runtime::task_service::Stdio;
use k8s_cri::v1 as cri;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// Copier threads move bytes, nothing more.
const COPIER_STACK: usize = 64 * 1024;

/// Chunks queued for one attached client before the copier waits for it.
const ATTACH_QUEUE: usize = 16;

/// The FIFO paths a shim is given for one container.
#[derive(Debug, Clone)]
pub struct Fifos {
    /// Only for a container created with stdin.
    pub stdin: Option<PathBuf>,
    pub stdout: PathBuf,
    /// `None` with a terminal: the shim writes everything to stdout.
    pub stderr: Option<PathBuf>,
}

/// Read ends opened before the shim opens its write ends, plus write ends
/// held until then: a FIFO without writers reads as end-of-file.
pub struct PendingCopy {
    readers: Vec<(Stream, File)>,
    keepalive: Vec<File>,
    log: PathBuf,
    stdio: Arc<CopiedStdio>,
}

/// The log files corrald writes, and the stdio attach clients reach, by
/// container.
#[derive(Default)]
pub struct Copiers {
    logs: Mutex<HashMap<String, Arc<CriLogFile>>>,
    attach: Mutex<HashMap<String, Arc<CopiedStdio>>>,
}

/// What an attached client receives: output as the copiers read it.
pub type Chunk = (Stream, Vec<u8>);

/// A container's stdio for Attach, when corrald copies its output.
///
/// Each chunk goes to every client's bounded queue, the copier waiting for
/// room: a slow client slows the container, corrald does not buffer for it.
pub struct CopiedStdio {
    clients: Mutex<Vec<mpsc::Sender<Chunk>>>,
    /// Write end of the stdin FIFO (opened read-write, so the open never
    /// waits for the shim). A writer clones it and writes outside the lock:
    /// a process that does not read its stdin blocks that writer, never
    /// the end of stdin.
    stdin: Mutex<Option<Arc<pipe::Sender>>>,
    /// `stdin_once` without a terminal: the first client's end is stdin's.
    stdin_once: bool,
    /// Output copiers still running; clients are let go after the last.
    outputs: AtomicUsize,
}

impl CopiedStdio {
    fn new(config: &cri::ContainerConfig, stdin: Option<pipe::Sender>) -> CopiedStdio {
        CopiedStdio {
            clients: Mutex::new(Vec::new()),
            stdin: Mutex::new(stdin.map(Arc::new)),
            stdin_once: config.stdin_once && !config.tty,
            outputs: AtomicUsize::new(0),
        }
    }

    /// The container's output from now on; the receiver ends when the
    /// container's output does.
    pub fn subscribe(&self) -> mpsc::Receiver<Chunk> {
        let (tx, rx) = mpsc::channel(ATTACH_QUEUE);
        if self.outputs.load(Ordering::Acquire) > 0 {
            lock(&self.clients).push(tx);
        }
        rx
    }

    /// Writes to the container's stdin; false once it is closed.
    pub async fn write_stdin(&self, mut data: &[u8]) -> bool {
        let Some(fifo) = lock(&self.stdin).clone() else {
            return false;
        };
        while !data.is_empty() {
            if fifo.writable().await.is_err() {
                return false;
            }
            match fifo.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// A client's stdin ended: with `stdin_once`, so does the container's
    /// (once no write is under way). True if this closed it: the shim
    /// holds its end open until told (CloseIO), as containerd's do.
    pub fn end_stdin(&self) -> bool {
        self.stdin_once && lock(&self.stdin).take().is_some()
    }

    /// Called by a copier thread: waits until every client has room.
    fn broadcast(&self, stream: Stream, data: &[u8]) {
        // Sent outside the lock: a full queue must not block subscribers.
        let clients: Vec<_> = lock(&self.clients).clone();
        if clients.is_empty() {
            return;
        }
        let mut gone = false;
        for client in &clients {
            gone |= client.blocking_send((stream, data.to_vec())).is_err();
        }
        if gone {
            lock(&self.clients).retain(|c| !c.is_closed());
        }
    }

    fn output_started(&self) {
        self.outputs.fetch_add(1, Ordering::AcqRel);
    }

    fn output_ended(&self) {
        if self.outputs.fetch_sub(1, Ordering::AcqRel) == 1 {
            lock(&self.clients).clear();
        }
    }
}

/// Hands every chunk read to the attached clients before the log gets it.
struct TeeReader {
    reader: File,
    stream: Stream,
    stdio: Arc<CopiedStdio>,
}

impl std::io::Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.reader.read(buf)?;
        if n > 0 {
            self.stdio.broadcast(self.stream, &buf[..n]);
        }
        Ok(n)
    }
}

impl Copiers {
    /// Creates the FIFOs of container `id` under `dir` and opens them for
    /// reading (stdin for writing, when the container has one);
    /// [`Copiers::start`] begins copying once the shim has them.
    pub fn prepare(
        dir: &Path,
        config: &cri::ContainerConfig,
        log: &Path,
    ) -> Result<(Fifos, PendingCopy)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create FIFO directory", dir, e))?;
        let fifos = Fifos {
            stdin: config.stdin.then(|| dir.join("stdin")),
            stdout: dir.join("stdout"),
            stderr: (!config.tty).then(|| dir.join("stderr")),
        };
        let stdin = match &fifos.stdin {
            Some(path) => {
                make_fifo(path)?;
                Some(open_stdin(path)?)
            }
            None => None,
        };
        let mut pending = PendingCopy {
            readers: Vec::new(),
            keepalive: Vec::new(),
            log: log.to_path_buf(),
            stdio: Arc::new(CopiedStdio::new(config, stdin)),
        };
        let streams = [
            (Stream::Stdout, Some(&fifos.stdout)),
            (Stream::Stderr, fifos.stderr.as_ref()),
        ];
        for (stream, path) in streams {
            let Some(path) = path else { continue };
            make_fifo(path)?;
            pending.readers.push((stream, open_reader(path)?));
            pending.keepalive.push(open_keepalive(path)?);
        }
        Ok((fifos, pending))
    }

    /// Re-opens the FIFOs of a running container after a restart; the
    /// shim still holds their write ends (and the read end of stdin).
    pub fn resume(dir: &Path, config: &cri::ContainerConfig, log: &Path) -> Result<PendingCopy> {
        let stdin_path = dir.join("stdin");
        let stdin = match config.stdin && stdin_path.exists() {
            true => Some(open_stdin(&stdin_path)?),
            false => None,
        };
        let mut pending = PendingCopy {
            readers: Vec::new(),
            keepalive: Vec::new(),
            log: log.to_path_buf(),
            stdio: Arc::new(CopiedStdio::new(config, stdin)),
        };
        for (stream, name) in [(Stream::Stdout, "stdout"), (Stream::Stderr, "stderr")] {
            let path = dir.join(name);
            match open_reader(&path) {
                Ok(file) => pending.readers.push((stream, file)),
                Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(pending)
    }

    /// Starts one copier thread per stream, writing into the log file.
    pub fn start(&self, id: &str, pending: PendingCopy) -> Result<()> {
        let log = CriLogFile::open(&pending.log)
            .map_err(|e| Error::Internal(format!("container {id}: {e}")))?;
        let log = Arc::new(log);
        let stdio = pending.stdio;
        // Every output counts before any starts: the first to end must not
        // let the clients go while another still copies.
        for _ in &pending.readers {
            stdio.output_started();
        }
        for (stream, reader) in pending.readers {
            let log = log.clone();
            let name = id.to_string();
            let reader = TeeReader {
                reader,
                stream,
                stdio: Arc::clone(&stdio),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("log-{}", &id[..id.len().min(8)]))
                .stack_size(COPIER_STACK)
                .spawn(move || {
                    let stdio = Arc::clone(&reader.stdio);
                    if let Err(e) = copy_lines(reader, stream, &log) {
                        tracing::warn!(container = %name, error = %e, "copying container output");
                    }
                    stdio.output_ended();
                });
            if let Err(e) = spawned {
                stdio.output_ended();
                return Err(Error::Internal(format!("start a log copier: {e}")));
            }
        }
        // The shim has its write ends now: end-of-file will mean it is done.
        drop(pending.keepalive);
        lock(&self.logs).insert(id.to_string(), log);
        lock(&self.attach).insert(id.to_string(), stdio);
        Ok(())
    }

    /// The stdio of a container whose output corrald copies, for Attach.
    pub fn attach(&self, id: &str) -> Option<Arc<CopiedStdio>> {
        lock(&self.attach).get(id).cloned()
    }

    /// Reopens a container's log file after kubelet renamed it; `false` if
    /// corrald does not write this container's log.
    pub fn reopen(&self, id: &str) -> Result<bool> {
        let Some(log) = lock(&self.logs).get(id).cloned() else {
            return Ok(false);
        };
        log.reopen()
            .map_err(|e| Error::Internal(format!("container {id}: {e}")))?;
        Ok(true)
    }

    /// Forgets a removed container and removes its FIFOs.
    pub fn remove(&self, id: &str, dir: &Path) {
        lock(&self.logs).remove(id);
        lock(&self.attach).remove(id);
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(container = %id, error = %e, "removing FIFOs");
            }
        }
    }
}

/// The FIFOs of one exec process's stdio, removed with their directory on
/// drop.
pub struct ExecFifos {
    dir: PathBuf,
    stdin: Option<PathBuf>,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
}

/// corrald's ends of an exec's FIFOs.
pub struct ExecPipes {
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    /// Write ends of the output FIFOs, to hold until the process has
    /// exited: a FIFO without writers reads as EOF, and the shim may open
    /// its own end only after the start returns.
    pub keepalive: Vec<pipe::Sender>,
}

impl ExecFifos {
    /// Makes `dir` and a FIFO in it for each stream asked for.
    pub fn create(dir: &Path, stdin: bool, stdout: bool, stderr: bool) -> Result<ExecFifos> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create exec directory", dir, e))?;
        let fifos = ExecFifos {
            dir: dir.to_path_buf(),
            stdin: stdin.then(|| dir.join("stdin")),
            stdout: stdout.then(|| dir.join("stdout")),
            stderr: stderr.then(|| dir.join("stderr")),
        };
        for path in [&fifos.stdin, &fifos.stdout, &fifos.stderr]
            .into_iter()
            .flatten()
        {
            make_fifo(path)?;
        }
        Ok(fifos)
    }

    /// Opens corrald's ends, before the shim opens its own.
    pub fn open(&self) -> Result<ExecPipes> {
        let mut pipes = ExecPipes {
            stdin: None,
            stdout: None,
            stderr: None,
            keepalive: Vec::new(),
        };
        for (path, slot) in [
            (&self.stdout, &mut pipes.stdout),
            (&self.stderr, &mut pipes.stderr),
        ] {
            if let Some(path) = path {
                *slot = Some(
                    pipe::OpenOptions::new()
                        .open_receiver(path)
                        .map_err(|e| open_error(path, e))?,
                );
                pipes.keepalive.push(
                    pipe::OpenOptions::new()
                        .open_sender(path)
                        .map_err(|e| open_error(path, e))?,
                );
            }
        }
        if let Some(path) = &self.stdin {
            // Read-write, so the open succeeds before the shim opens its
            // reading end.
            pipes.stdin = Some(
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(path)
                    .map_err(|e| open_error(path, e))?,
            );
        }
        Ok(pipes)
    }

    /// The stdio URIs the shim is given.
    pub fn stdio(&self, terminal: bool) -> Stdio {
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        Stdio {
            stdin: path(&self.stdin),
            stdout: path(&self.stdout),
            stderr: path(&self.stderr),
            terminal,
        }
    }
}

fn open_error(path: &Path, e: std::io::Error) -> Error {
    Error::io("open FIFO", path, e)
}

impl Drop for ExecFifos {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A FIFO only the daemon (root) reads and writes; one already there is
/// kept.
pub fn make_fifo(path: &Path) -> Result<()> {
    match nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(Error::io("create FIFO", path, e.into())),
    }
}

/// A blocking read end: opened non-blocking (a FIFO's open waits for a
/// writer otherwise), then switched to blocking for the copier thread.
fn open_reader(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io("open FIFO", path, e))?;
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
    let ok = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(Error::io(
            "make FIFO blocking",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

/// The write end of a container's stdin FIFO, opened read-write: the open
/// does not wait for the shim, and writes never meet a FIFO without readers.
fn open_stdin(path: &Path) -> Result<pipe::Sender> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(|e| Error::io("open FIFO", path, e))
}

fn open_keepalive(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io("open FIFO", path, e))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn output_written_to_the_fifos_lands_in_the_log_in_cri_format() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let copiers = Copiers::default();
        let config = cri::ContainerConfig::default();
        let (fifos, pending) = Copiers::prepare(&dir.path().join("io"), &config, &log).unwrap();
        // The shim's side: write ends opened before the copy starts.
        let mut out = OpenOptions::new().write(true).open(&fifos.stdout).unwrap();
        let mut err = OpenOptions::new()
            .write(true)
            .open(fifos.stderr.as_ref().unwrap())
            .unwrap();
        copiers.start("c1", pending).unwrap();
        out.write_all(b"hello\n").unwrap();
        err.write_all(b"oops\n").unwrap();
        drop(out);
        drop(err);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().count() == 2 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(
            text.lines().any(|l| l.ends_with(" stdout F hello")),
            "{text}"
        );
        assert!(
            text.lines().any(|l| l.ends_with(" stderr F oops")),
            "{text}"
        );

        std::fs::rename(&log, dir.path().join("c.log.1")).unwrap();
        assert!(copiers.reopen("c1").unwrap());
        assert!(log.exists(), "reopen makes a new file at the path at once");
        assert!(!copiers.reopen("unknown").unwrap());
        copiers.remove("c1", &dir.path().join("io"));
        assert!(!dir.path().join("io").exists());
    }

    #[tokio::test]
    async fn exec_fifos_are_made_and_removed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let exec_dir = dir.path().join("exec-x");
        let fifos = ExecFifos::create(&exec_dir, true, true, false).unwrap();
        let stdio = fifos.stdio(true);
        assert!(stdio.stdin.ends_with("/stdin") && stdio.stdout.ends_with("/stdout"));
        assert_eq!(stdio.stderr, "");
        let mut pipes = fifos.open().unwrap();
        // What goes into the stdout FIFO comes out of our reader.
        pipes.keepalive[0].write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        pipes
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut buf)
            .await
            .unwrap();
        assert_eq!(&buf, b"hi");
        drop(pipes);
        drop(fifos);
        assert!(!exec_dir.exists());
    }
}
