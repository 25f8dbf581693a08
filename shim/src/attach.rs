//! The attach socket of one container (`<bundle>/attach`, framing in
//! `corral_proto::attach`): the container's output goes to every connected
//! client as well as to its log, and clients may write its stdin and size
//! its terminal.
//!
//! Owns the listening socket, the connected clients and one thread per
//! client reading what it sends. It does not own the process's stdio: the
//! output copiers in `stdio` hand it each chunk they read, and it writes
//! stdin through the process's [`StdinPort`].
//!
//! Writes to clients are synchronous, in the copier's thread: a client that
//! reads slowly slows the container's output, and nothing is buffered for
//! it here. Closing shuts every client's socket, which also frees a copier
//! blocked on one; a client that goes away is dropped at the next write.

use std::{
    fs::File,
    io::ErrorKind,
    os::{
        fd::AsRawFd,
        unix::{
            fs::{OpenOptionsExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use corral_proto::attach::{self, Kind, ATTACH_SOCKET};

use crate::{
    error::{Error, Result},
    stdio::{resize_console, short, StdinPort},
};

/// Threads that only move frames: a small stack keeps an idle container's
/// cost low.
const THREAD_STACK: usize = 64 * 1024;

/// How long accept waits after a failure that may pass (out of
/// descriptors, an aborted connection).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct AttachHub {
    listener: UnixListener,
    socket: PathBuf,
    clients: Mutex<Vec<Arc<Client>>>,
    next_client: AtomicU64,
    stdin: Arc<StdinPort>,
    console: Option<Arc<File>>,
    /// CRI `stdin_once` without a terminal: the first client that ends its
    /// stdin ends the container's.
    stdin_once: bool,
    /// Output copiers still running; the socket closes after the last.
    outputs: AtomicUsize,
    closed: AtomicBool,
}

struct Client {
    id: u64,
    stream: UnixStream,
    /// Held for a whole frame: the copiers of stdout and stderr write to
    /// the same client.
    writing: Mutex<()>,
}

/// Held by an output copier; the last one dropped closes the socket, so
/// attached clients see the end of the container's output.
pub struct OutputGuard(Arc<AttachHub>);

impl Drop for OutputGuard {
    fn drop(&mut self) {
        if self.0.outputs.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.close();
        }
    }
}

impl AttachHub {
    /// Listens on `<bundle>/attach` and starts accepting clients.
    pub fn listen(
        id: &str,
        bundle: &Path,
        stdin: Arc<StdinPort>,
        console: Option<Arc<File>>,
        stdin_once: bool,
    ) -> Result<Arc<AttachHub>> {
        let socket = bundle.join(ATTACH_SOCKET);
        let listener = bind(bundle)?;
        // With a terminal, stdin stays open for the next client, as
        // containerd and CRI-O do.
        let stdin_once = stdin_once && console.is_none();
        let hub = Arc::new(AttachHub {
            listener,
            socket,
            clients: Mutex::new(Vec::new()),
            next_client: AtomicU64::new(0),
            stdin,
            console,
            stdin_once,
            outputs: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        });
        let accepting = Arc::clone(&hub);
        thread::Builder::new()
            .name(format!("attach-{}", short(id)))
            .stack_size(THREAD_STACK)
            .spawn(move || accepting.accept_loop())
            .map_err(|e| Error::io("start the attach listener", e))?;
        Ok(hub)
    }

    /// Registers an output copier; see [`OutputGuard`].
    pub fn output(self: &Arc<Self>) -> OutputGuard {
        self.outputs.fetch_add(1, Ordering::AcqRel);
        OutputGuard(Arc::clone(self))
    }

    /// Sends `data` to every client, waiting for each to take it. The list
    /// is copied first: a client slow to read must not keep others from
    /// connecting, or `close` from shutting it.
    pub fn broadcast(&self, kind: Kind, data: &[u8]) {
        let clients = lock(&self.clients).clone();
        for client in clients {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let sent = {
                let _frame = lock(&client.writing);
                attach::write_frame(&mut &client.stream, kind, data)
            };
            if let Err(e) = sent {
                log::debug!("attach client {} dropped: {e}", client.id);
                self.drop_client(client.id);
            }
        }
    }

    /// Stops accepting, ends every client's connection and removes the
    /// socket. Idempotent; never waits for a client.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: shutdown on a descriptor this hub owns; it wakes the
        // thread blocked in accept, which then sees `closed`.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for c in lock(&self.clients).drain(..) {
            // Also fails a copier's write blocked on this client.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    fn accept_loop(self: Arc<Self>) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) if self.closed.load(Ordering::Acquire) => return,
                Err(e) if is_transient(&e) => {
                    log::debug!("attach socket {}: {e}", self.socket.display());
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
                Err(e) => {
                    // Refuse later clients rather than leave them hanging
                    // in a backlog nobody accepts from.
                    log::warn!("attach socket {}: {e}; closed", self.socket.display());
                    self.close();
                    return;
                }
            };
            if let Err(e) = self.add_client(stream) {
                log::warn!("attach client: {e}");
            }
        }
    }

    /// Starts the client's reader, then lets it receive output.
    fn add_client(self: &Arc<Self>, stream: UnixStream) -> Result<()> {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let reader = stream
            .try_clone()
            .map_err(|e| Error::io("attach client", e))?;
        let client = Arc::new(Client {
            id,
            stream,
            writing: Mutex::new(()),
        });
        let mut clients = lock(&self.clients);
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let hub = Arc::clone(self);
        thread::Builder::new()
            .name("attach-client".into())
            .stack_size(THREAD_STACK)
            .spawn(move || hub.serve_client(id, reader))
            .map_err(|e| Error::io("start an attach client", e))?;
        clients.push(client);
        Ok(())
    }

    /// Applies what one client sends until it goes away. A client that
    /// opened stdin ends it by leaving, however it leaves.
    fn serve_client(&self, id: u64, mut stream: UnixStream) {
        let mut buf = Vec::new();
        let mut writes_stdin = false;
        loop {
            match attach::read_frame(&mut stream, &mut buf) {
                Ok(Some(Kind::OpenStdin)) => writes_stdin = true,
                Ok(Some(Kind::Stdin)) => {
                    self.stdin.write(&buf);
                }
                Ok(Some(Kind::CloseStdin)) => {
                    writes_stdin = false;
                    self.end_stdin();
                }
                Ok(Some(Kind::Resize)) => self.resize(&buf),
                Ok(Some(kind)) => {
                    log::debug!("attach client {id} sent a {kind:?} frame; ignored");
                }
                Ok(None) => break,
                Err(e) => {
                    log::debug!("attach client {id}: {e}");
                    break;
                }
            }
        }
        if writes_stdin {
            self.end_stdin();
        }
        self.drop_client(id);
    }

    fn end_stdin(&self) {
        if self.stdin_once {
            self.stdin.close();
        }
    }

    fn drop_client(&self, id: u64) {
        let mut clients = lock(&self.clients);
        if let Some(pos) = clients.iter().position(|c| c.id == id) {
            let c = clients.swap_remove(pos);
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn resize(&self, payload: &[u8]) {
        let (Some(console), Some((width, height))) = (&self.console, attach::parse_resize(payload))
        else {
            return;
        };
        if let Err(e) = resize_console(console, width.into(), height.into()) {
            log::debug!("attach resize: {e}");
        }
    }
}

/// Accept failures that pass: out of descriptors or memory for a moment, a
/// client gone before it was accepted, a signal.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Interrupted | ErrorKind::ConnectionAborted | ErrorKind::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Binds the socket through the bundle directory's descriptor: a deep
/// bundle path may not fit in a socket address, `/proc/self/fd/N/attach`
/// always does.
fn bind(bundle: &Path) -> Result<UnixListener> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(bundle)
        .map_err(|e| Error::io_path("open bundle", bundle, e))?;
    let socket = bundle.join(ATTACH_SOCKET);
    // A socket left by an earlier process of the same id would refuse bind.
    let _ = std::fs::remove_file(&socket);
    let address = format!("/proc/self/fd/{}/{ATTACH_SOCKET}", dir.as_raw_fd());
    let listener = UnixListener::bind(&address)
        .map_err(|e| Error::io_path("bind attach socket", &socket, e))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io_path("chmod attach socket", &socket, e))?;
    Ok(listener)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// A bundle directory deeper than a socket address can hold.
    fn deep_bundle(root: &Path) -> PathBuf {
        let dir = root.join("b".repeat(60)).join("c".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn connect(bundle: &Path) -> UnixStream {
        let dir = File::open(bundle).unwrap();
        UnixStream::connect(format!("/proc/self/fd/{}/{ATTACH_SOCKET}", dir.as_raw_fd())).unwrap()
    }

    fn stdin_pipe() -> (Arc<StdinPort>, File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (Arc::new(StdinPort::pipe(File::from(w))), File::from(r))
    }

    /// Polls until `n` clients are registered.
    fn wait_clients(hub: &AttachHub, n: usize) {
        for _ in 0..500 {
            if lock(&hub.clients).len() == n {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("never {n} clients");
    }

    #[test]
    fn every_client_gets_output_and_writes_stdin_until_stdin_once_ends_it() {
        let root = tempfile::tempdir().unwrap();
        let bundle = deep_bundle(root.path());
        let (stdin, mut process_stdin) = stdin_pipe();
        let hub = AttachHub::listen("c1", &bundle, stdin, None, true).unwrap();
        let _output = hub.output();
        let mut a = connect(&bundle);
        let mut b = connect(&bundle);
        wait_clients(&hub, 2);

        hub.broadcast(Kind::Stdout, b"hello");
        hub.broadcast(Kind::Stderr, b"oops");
        let mut buf = Vec::new();
        for client in [&mut a, &mut b] {
            assert_eq!(
                attach::read_frame(client, &mut buf).unwrap(),
                Some(Kind::Stdout)
            );
            assert_eq!(buf, b"hello");
            assert_eq!(
                attach::read_frame(client, &mut buf).unwrap(),
                Some(Kind::Stderr)
            );
            assert_eq!(buf, b"oops");
        }

        attach::write_frame(&mut a, Kind::OpenStdin, b"").unwrap();
        attach::write_frame(&mut a, Kind::Stdin, b"abc").unwrap();
        let mut got = [0u8; 3];
        process_stdin.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        attach::write_frame(&mut b, Kind::Stdin, b"def").unwrap();
        process_stdin.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"def");
        attach::write_frame(&mut a, Kind::CloseStdin, b"").unwrap();
        // stdin_once: the first client's end is the process's EOF.
        let mut rest = Vec::new();
        process_stdin.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        hub.close();
    }

    #[test]
    fn without_stdin_once_stdin_outlives_a_client() {
        let root = tempfile::tempdir().unwrap();
        let (stdin, mut process_stdin) = stdin_pipe();
        let hub = AttachHub::listen("c2", root.path(), Arc::clone(&stdin), None, false).unwrap();
        let mut a = connect(root.path());
        attach::write_frame(&mut a, Kind::OpenStdin, b"").unwrap();
        attach::write_frame(&mut a, Kind::Stdin, b"x").unwrap();
        let mut got = [0u8; 1];
        process_stdin.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        attach::write_frame(&mut a, Kind::CloseStdin, b"").unwrap();
        drop(a);
        let mut b = connect(root.path());
        attach::write_frame(&mut b, Kind::Stdin, b"y").unwrap();
        process_stdin.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"y");
        hub.close();
    }

    #[test]
    fn with_stdin_once_a_client_that_vanishes_ends_stdin() {
        let root = tempfile::tempdir().unwrap();
        let (stdin, mut process_stdin) = stdin_pipe();
        let hub = AttachHub::listen("c5", root.path(), stdin, None, true).unwrap();
        // Output only: leaving ends nothing.
        let watcher = connect(root.path());
        wait_clients(&hub, 1);
        drop(watcher);
        wait_clients(&hub, 0);
        let mut writer = connect(root.path());
        attach::write_frame(&mut writer, Kind::OpenStdin, b"").unwrap();
        attach::write_frame(&mut writer, Kind::Stdin, b"z").unwrap();
        let mut got = [0u8; 1];
        process_stdin.read_exact(&mut got).unwrap();
        // Gone without a word (a crashed corrald): its stdin ends all the same.
        drop(writer);
        let mut rest = Vec::new();
        process_stdin.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        hub.close();
    }

    #[test]
    fn closing_frees_a_copier_blocked_on_a_client_and_a_blocked_stdin_writer() {
        let root = tempfile::tempdir().unwrap();
        let (stdin, _process_stdin) = stdin_pipe();
        let hub = AttachHub::listen("c6", root.path(), Arc::clone(&stdin), None, false).unwrap();
        let _slow = connect(root.path());
        wait_clients(&hub, 1);
        let (done_tx, done_rx) = mpsc::channel();
        let copier_hub = Arc::clone(&hub);
        let done = done_tx.clone();
        thread::spawn(move || {
            let chunk = vec![1u8; 64 * 1024];
            for _ in 0..128 {
                copier_hub.broadcast(Kind::Stdout, &chunk);
            }
            let _ = done.send("copier");
        });
        // A process that never reads its stdin: the writer waits for room.
        let writer_port = Arc::clone(&stdin);
        thread::spawn(move || {
            let ok = writer_port.write(&vec![2u8; 1 << 20]);
            let _ = done_tx.send(if ok { "wrote" } else { "writer" });
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err());
        // Neither close waits for them, and both give up.
        hub.close();
        stdin.close();
        let mut ended = [
            done_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            done_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        ];
        ended.sort();
        assert_eq!(ended, ["copier", "writer"]);
    }

    #[test]
    fn a_client_that_does_not_read_holds_the_output_back() {
        let root = tempfile::tempdir().unwrap();
        let (stdin, _process_stdin) = stdin_pipe();
        let hub = AttachHub::listen("c3", root.path(), stdin, None, false).unwrap();
        let mut slow = connect(root.path());
        wait_clients(&hub, 1);

        // Far more than a socket buffers.
        let (done_tx, done_rx) = mpsc::channel();
        let writer = Arc::clone(&hub);
        let copier = thread::spawn(move || {
            let chunk = vec![1u8; 64 * 1024];
            for _ in 0..128 {
                writer.broadcast(Kind::Stdout, &chunk);
            }
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "8 MiB went out to a client that read nothing"
        );
        let mut total = 0;
        let mut buf = Vec::new();
        while total < 128 * 64 * 1024 {
            attach::read_frame(&mut slow, &mut buf).unwrap();
            total += buf.len();
        }
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        copier.join().unwrap();
        assert_eq!(total, 128 * 64 * 1024);
        hub.close();
    }

    #[test]
    fn the_end_of_the_output_ends_every_client_and_the_socket() {
        let root = tempfile::tempdir().unwrap();
        let (stdin, _process_stdin) = stdin_pipe();
        let hub = AttachHub::listen("c4", root.path(), stdin, None, false).unwrap();
        let stdout = hub.output();
        let stderr = hub.output();
        let mut client = connect(root.path());
        wait_clients(&hub, 1);
        drop(stdout);
        assert!(root.path().join(ATTACH_SOCKET).exists(), "closed early");
        drop(stderr);
        let mut buf = Vec::new();
        assert_eq!(attach::read_frame(&mut client, &mut buf).unwrap(), None);
        assert!(!root.path().join(ATTACH_SOCKET).exists());
        let dir = File::open(root.path()).unwrap();
        assert!(
            UnixStream::connect(format!("/proc/self/fd/{}/{ATTACH_SOCKET}", dir.as_raw_fd()))
                .is_err()
        );
    }
}
