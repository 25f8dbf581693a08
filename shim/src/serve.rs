//! The shim server: what runs for the lifetime of a pod.
//!
//! Sets the process up (signals, subreaper, logging), then serves the task
//! API and corral's Log service on one ttrpc socket until Shutdown.

use std::{
    os::fd::{AsRawFd, IntoRawFd},
    os::unix::net::UnixListener,
    path::Path,
    sync::Arc,
};

use containerd_shim::{logger::FifoLogger, ExitSignal, Flags};
use corral_proto::{
    containerd::shim_sync::create_task, shim::log_ttrpc::create_log, ttrpc::Server,
};

use crate::{
    error::{Error, Result},
    publisher::Publisher,
    reaper::{self, Reaper},
    service::Service,
};

const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a shutting-down shim tries to deliver its last events.
const EVENT_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

pub fn run(flags: &Flags) -> Result<()> {
    if flags.socket.is_empty() {
        return Err(Error::InvalidArgument("serving needs -socket".into()));
    }
    // Before any thread exists: every thread inherits the mask.
    reaper::block_signals().map_err(|e| Error::io("block signals", e.into()))?;
    limit_malloc_arenas();
    reaper::set_subreaper().map_err(|e| Error::io("become child subreaper", e))?;
    init_logging(flags.debug);

    let socket = flags.socket.trim_start_matches("unix://");
    let listener = match bind(socket)? {
        Some(l) => l,
        // Another server of this pod won the race; it serves.
        None => return Ok(()),
    };

    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    let reaper = Reaper::start().map_err(|e| Error::io("start the reaper", e))?;
    let publisher = Publisher::start(&ttrpc_address, &flags.namespace)
        .map_err(|e| Error::io("start the event publisher", e))?;
    let exit_signal = Arc::new(ExitSignal::default());
    let service = Service::new(
        &flags.namespace,
        reaper,
        publisher,
        Arc::clone(&exit_signal),
    );

    // One idle handler thread per connection, more only under load: a pod's
    // shim sees a handful of RPCs a minute.
    let mut server = Server::new()
        .set_thread_count_min(1)
        .set_thread_count_default(2)
        .add_listener(listener.into_raw_fd())
        .map_err(|e| Error::Internal(format!("ttrpc listener: {e}")))?
        .register_service(create_task(Arc::new(service.task())))
        .register_service(create_log(Arc::new(service.log())));
    server
        .start()
        .map_err(|e| Error::Internal(format!("start ttrpc server: {e}")))?;
    signal_ready();
    log::info!(
        "serving {} for {}/{}",
        flags.socket,
        flags.namespace,
        flags.id
    );

    exit_signal.wait();
    log::info!("shutting down");
    service.flush_events(EVENT_FLUSH);
    // Let the Shutdown reply go out, but never hang on a connection that
    // does not close: ttrpc's shutdown waits for every one.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let _ = std::thread::Builder::new().spawn(move || {
        server.shutdown();
        let _ = done_tx.send(());
    });
    let _ = done_rx.recv_timeout(SHUTDOWN_GRACE);
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(format!("{socket}.lock"));
    std::process::exit(0);
}

/// Binds the socket; `None` if a live server already holds it.
fn bind(socket: &str) -> Result<Option<UnixListener>> {
    if let Some(dir) = Path::new(socket).parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io_path("create", dir, e))?;
    }
    match UnixListener::bind(socket) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(None);
            }
            // A stale socket of a shim that was killed.
            let _ = std::fs::remove_file(socket);
            UnixListener::bind(socket)
                .map(Some)
                .map_err(|e| Error::io(format!("bind {socket}"), e))
        }
        Err(e) => Err(Error::io(format!("bind {socket}"), e)),
    }
}

/// The shim's own log goes to the bundle's `log` FIFO, which the daemon
/// reads and copies to its own log; with no reader there (a bare run, a
/// daemon that is not up) to stderr. The level is the daemon's: `-debug`,
/// else RUST_LOG, else info.
fn init_logging(debug: bool) {
    let logger = match open_log_fifo() {
        Some(fifo) => FifoLogger::with_file(fifo),
        None => FifoLogger::with_file(stderr_file()),
    };
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        std::env::var("RUST_LOG")
            .ok()
            .and_then(|l| l.parse().ok())
            .unwrap_or(log::LevelFilter::Info)
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

/// Opens `log` without waiting for a reader: a blocking open would hang the
/// shim until one came. Writes then block like any pipe's, keeping order.
fn open_log_fifo() -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("log")
        .ok()?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd this function owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Some(file)
}

fn stderr_file() -> std::fs::File {
    use std::os::fd::AsFd;
    match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        // Without a stderr, log nowhere rather than fail to serve.
        Err(_) => match std::fs::OpenOptions::new().write(true).open("/dev/null") {
            Ok(f) => f,
            Err(_) => std::process::exit(1),
        },
    }
}

/// Each thread that allocates gets its own glibc arena by default; a shim
/// moves little memory and many threads, so two arenas keep RSS flat.
fn limit_malloc_arenas() {
    // SAFETY: mallopt only tunes the allocator; called before other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// `start` waits on our stdout: closing it (pointing it at stderr, which is
/// /dev/null) tells it the socket is ready.
fn signal_ready() {
    // SAFETY: dup2 on the process's own standard fds.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}
